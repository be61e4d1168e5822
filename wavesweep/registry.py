"""Named registries and the one validation helper every module uses for choices.

A registry is a dict with a decorator (timm's `_registry.py` pattern): an unknown
name raises a ValueError that names the bad value and lists the valid ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def check_choice(what: str, value: object, choices: Iterable[object]) -> None:
    """Raise ``ValueError`` naming ``value`` and the valid ``choices`` if it is not one of them."""
    choices = list(choices)
    if value not in choices:
        shown = ", ".join(map(str, choices))
        if len(shown) > 600:  # 106 wavelets: keep the one-line error readable
            shown = shown[:600] + ", ..."
        raise ValueError(f"unknown {what} {value!r}; valid: {shown}")


class Registry(Generic[T]):
    """``name -> object`` with a registering decorator and a checked lookup."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        check_choice(self.what, name, self._items)
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
