"""Sampler and pruner options in a spec, checked against Optuna's own constructors: unknown names
(with close matches), YAML value types from the constructor's annotations or defaults, then the
constructor itself, so ``n_startup_trials: x`` is refused when the spec is read, not after three
failed trials."""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import optuna

from wavesweep.study.spec_yaml import SpecError, unknown_choice

# Options that need Python objects, never YAML values.
_NOT_OPTIONS = {"search_space", "seed", "constraints_func", "gamma", "weights", "independent_sampler",
                "mutation", "crossover", "elite_population_selection_strategy", "child_generation_strategy",
                "after_trial_strategy"}  # fmt: skip


def check_options(key: tuple[str, ...], cls: type, options: dict[str, Any]) -> None:
    sig = inspect.signature(cls.__init__).parameters
    valid = [n for n in sig if n not in ("self", "args", "kwargs") and n not in _NOT_OPTIONS]
    for name in options:
        if name not in valid and not valid:
            raise SpecError((*key, name), f"unknown {cls.__name__} option {name!r}: it takes none here (name and seed aside)")
        if name not in valid:
            raise SpecError((*key, name), unknown_choice(f"{cls.__name__} option", name, valid))
    for name, value in options.items():
        _check_option_type((*key, name), cls, sig[name], value)
    if cls is optuna.samplers.GridSampler:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cls(**options)
    except (ValueError, TypeError) as exc:
        raise SpecError(key, f"{cls.__name__}: {exc}") from None


_TYPE_WORDS: dict[str, tuple[type, ...]] = {
    "int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),),
}  # fmt: skip


def _option_types(param: inspect.Parameter) -> tuple[type, ...] | None:
    """The YAML value types an option accepts, from its annotation (``int | None``) or, without
    one, its default; None when the annotation names anything else (no check is possible)."""
    ann = param.annotation
    if ann is not inspect.Parameter.empty:
        words = [w.strip() for w in (ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))).split("|")]
        if not all(w in _TYPE_WORDS for w in words):
            return None
        return tuple(t for w in words for t in _TYPE_WORDS[w])
    default = param.default
    if default is inspect.Parameter.empty or default is None:
        return None
    return _TYPE_WORDS.get(type(default).__name__)


def _check_option_type(key: tuple[str, ...], cls: type, param: inspect.Parameter, value: Any) -> None:
    """A ``SpecError`` when ``value`` is not of the type the constructor's annotation or default
    says: ``n_startup_trials: x`` is refused here, not after three failed trials."""
    types = _option_types(param)
    if types is None:
        return
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok:
        want = " or ".join(sorted({"integer" if t is int else "number" if t is float else "true/false" if t is bool
                                   else "string" if t is str else "null" for t in types}))  # fmt: skip
        raise SpecError(key, f"{cls.__name__} option {param.name}={value!r} must be {want}")
