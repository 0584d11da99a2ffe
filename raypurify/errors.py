"""Errors a user can act on.

Everything the user can fix (a bad config key, an undecodable image, a missing dataset)
raises a `RaypurifyError` whose message is one line naming the field or file. The CLI
prints that line instead of a traceback. Ray wraps exceptions raised inside tasks and
actors, so `user_error` digs the original back out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import os


class RaypurifyError(Exception):
    """An error caused by input the user controls; its message is one actionable line."""


class ConfigError(RaypurifyError):
    """A config file or `--set` override is invalid; the message names the key path."""


class DatasetError(RaypurifyError):
    """A dataset is missing, malformed or inconsistent; the message names the file and row."""


class TrainingError(RaypurifyError):
    """Training cannot go on (e.g. NaN loss); the message names the stage and epoch."""


def unreadable_file(path: str | os.PathLike[str], error: BaseException, what: str) -> DatasetError:
    """The one line for a user's file that numpy or torch could not load safely: a pickle
    is named as such (never with advice to load it with weights_only=False or
    allow_pickle, which would run its code), anything else by the loader's error type."""
    text = str(error).lower()
    pickled = any(w in text for w in ("weights_only", "global", "allow_pickle", "object arr"))
    detail = "pickled objects are never loaded" if pickled else type(error).__name__
    return DatasetError(f"{path}: {what} ({detail})")


# How a traceback names one of our errors: ``raypurify.errors.DatasetError: <message>``.
_RAISED = re.compile(r"^raypurify\.errors\.(\w+): (.+)$", re.MULTILINE)


def user_error(exc: BaseException) -> RaypurifyError | None:
    """Return the RaypurifyError behind `exc` (through Ray's wrappers), or None."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    wrappers: list[BaseException] = []
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(cause, BaseException):
            # Ray's RayTaskError keeps the original in `.cause`. It may itself subclass the
            # original's type, but its message is a whole traceback: look at the cause.
            wrappers.append(e)
            stack.extend([e.__context__, e.__cause__, cause])
            continue
        if isinstance(e, RaypurifyError):
            return e
        # Ray Data and Train chain the original.
        stack.extend([e.__context__, e.__cause__])
    # Ray Data wraps an error raised in a map function in a UserCodeException whose chain is
    # lost on the way to the driver; only the traceback text, which names it, survives.
    for e in wrappers:
        found = _RAISED.findall(str(e))
        if found:
            name, message = found[-1]
            cls = globals().get(name)
            if not (isinstance(cls, type) and issubclass(cls, RaypurifyError)):
                cls = RaypurifyError
            return cls(message.strip())
    return None
