"""Named registries and the one validation helper every module uses for choices.

A registry is a dict with a decorator (timm's `_registry.py` pattern): an unknown
name raises a ValueError that names the bad value and lists the valid ones.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


def close_matches(value: object, choices: Iterable[object], n: int = 3) -> list[str]:
    """Valid names like ``value`` for a "did you mean": the same name in another case (``CNN``,
    ``DB4``: difflib sees no likeness there), else difflib's close matches."""
    if not isinstance(value, str):
        return []
    choices = list(map(str, choices))
    return [c for c in choices if c.lower() == value.lower()][:n] or difflib.get_close_matches(value, choices, n=n)


def check_choice(what: str, value: object, choices: Iterable[object]) -> None:
    """Raise ``ValueError`` naming ``value`` and the valid ``choices`` if it is not one of them."""
    choices = list(choices)
    if value not in choices:
        shown = ", ".join(map(str, choices))
        if len(shown) > 600:  # 106 wavelets: keep the one-line error readable
            shown = shown[:600].rsplit(", ", 1)[0] + ", ..."
        close = close_matches(value, choices)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        raise ValueError(f"unknown {what} {value!r}; valid: {shown}{hint}")


#: names that become file names, folder names or registry filter values: no separators, no
#: quotes, no leading dot (so never "..", a hidden file or an absolute path)
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+=@ -]{0,127}")


def check_name(what: str, value: object) -> str:
    """``value`` if it is a safe name (:data:`NAME_RE`), else a one-line ValueError naming it."""
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} is not a valid name: use 1-128 letters, digits, . _ - + = @ and "
            "spaces, not starting with '.' or a space (no path separators or quotes)"
        )
    return value


def check_model_name(value: object) -> str:
    """A registered-model name: a safe name (:func:`check_name`) without ``@``, which a model
    URI reads as an alias (``models:/a@b/1`` is alias ``b/1`` of model ``a``)."""
    if isinstance(value, str) and NAME_RE.fullmatch(value) and "@" in value:
        raise ValueError(f"registered model name {value!r} contains '@', which models:/ URIs read as an alias: leave it out")
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise ValueError(
            f"registered model name {value!r} is not a valid name: use 1-128 letters, digits, . _ - + = and "
            "spaces, not starting with '.' or a space (no path separators, quotes or '@')"
        )
    return value


#: MLflow's alias rule (mlflow.utils.validation): word characters and '-', at most 255
ALIAS_RE = re.compile(r"[\w-]{1,255}")


def check_alias(value: object) -> str:
    """A registered-model alias MLflow accepts: letters, digits, ``_`` and ``-`` (1-255), not
    ``latest`` (any case) nor ``v`` + digits (a version's name); else one line, before anything
    is registered."""
    if not isinstance(value, str) or not ALIAS_RE.fullmatch(value):
        raise ValueError(f"alias {value!r} is not valid: use 1-255 letters, digits, '_' and '-'")
    if value.lower() == "latest" or re.fullmatch(r"[vV]\d+", value):
        raise ValueError(f"alias {value!r} is reserved by MLflow ('latest', and v1, v2, ... name versions): choose another")
    return value


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
