"""One small registry type for every concept: datasets, attacks, defences, models.

A registry is built from an explicit list in the concept's package `__init__`, so adding
an entry is one new module plus one line there, and an unknown name fails with the list
of known names.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Generic, Protocol, TypeVar

from raypurify.errors import ConfigError, RaypurifyError


class Named(Protocol):
    # Read-only, so frozen dataclasses qualify.
    @property
    def name(self) -> str: ...


T = TypeVar("T", bound=Named)


class Registry(Generic[T]):
    def __init__(self, kind: str, entries: Iterable[T], error: type[RaypurifyError] = ConfigError):
        self.kind, self.error = kind, error
        self._entries: dict[str, T] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise ValueError(f"{kind} '{entry.name}' registered twice")
            self._entries[entry.name] = entry

    def get(self, name: str, *, key: str | None = None) -> T:
        """The entry called `name`; `key` is the config path quoted in the error."""
        try:
            return self._entries[name]
        except KeyError:
            where = f"{key}: " if key else ""
            raise self.error(
                f"{where}unknown {self.kind} '{name}' (known: {', '.join(self.names())})"
            ) from None

    def names(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        return iter(self._entries.values())
