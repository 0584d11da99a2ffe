"""Errors a user can act on.

Everything the user can fix (a bad config key, an undecodable image, a missing dataset)
raises a `RaypurifyError` whose message is one line naming the field or file. The CLI
prints that line instead of a traceback. Ray wraps exceptions raised inside tasks and
actors, so `user_error` digs the original back out.
"""

from __future__ import annotations


class RaypurifyError(Exception):
    """An error caused by input the user controls; its message is one actionable line."""


class ConfigError(RaypurifyError):
    """A config file or `--set` override is invalid; the message names the key path."""


class DatasetError(RaypurifyError):
    """A dataset is missing, malformed or inconsistent; the message names the file and row."""


class TrainingError(RaypurifyError):
    """Training cannot go on (e.g. NaN loss); the message names the stage and epoch."""


def user_error(exc: BaseException) -> RaypurifyError | None:
    """Return the RaypurifyError behind `exc` (through Ray's wrappers), or None."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, RaypurifyError):
            return e
        # Ray's RayTaskError keeps the original in `.cause`; Ray Data and Train chain it.
        stack.extend([getattr(e, "cause", None), e.__cause__, e.__context__])
    return None
