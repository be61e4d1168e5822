"""The baselines dwt is compared with, at its budget: magnitude and random pruning of the
target layers' weights, and the one budget-matching step (:func:`matched_amount`,
:func:`prune_matched`). Public through :mod:`wavesweep.pruning`, whose docstring states the
conventions (fractions, counts, ties, +0.0) these functions keep.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from wavesweep import wavelets as wv
from wavesweep.names import check_choice
from wavesweep.prune_record import (
    SCOPES,
    LayerPrune,
    PruneResult,
    normalise_targets,
    target_layers,
    weight_numpy,
    work_model,
    zero_weight,
)


def _smallest(values: np.ndarray, k: int, generator: torch.Generator | None = None) -> np.ndarray:
    """Bool mask of the ``k`` smallest entries of 1-D ``values``, exactly ``k`` of them.

    O(n) selection (``np.partition``). Entries tied at the k-th value: the lowest-indexed
    ones are selected, or, with ``generator``, a uniformly random subset of them.
    """
    n = values.size
    sel = np.zeros(n, dtype=bool)
    if k <= 0:
        return sel
    if k >= n:
        sel[:] = True
        return sel
    kth = np.partition(values, k - 1)[k - 1]
    np.less_equal(values, kth, out=sel)
    extra = int(np.count_nonzero(sel)) - k  # > 0 only when several entries tie at kth
    if extra > 0:
        tied = np.flatnonzero(values == kth)
        if generator is None:
            sel[tied[len(tied) - extra :]] = False  # keep the lowest-indexed tied entries selected
        else:
            sel[tied[torch.randperm(len(tied), generator=generator)[:extra].numpy()]] = False
    return sel


def _check_fraction(what: str, a: object) -> float:
    if not wv.is_real(a) or not (0.0 <= float(a) <= 1.0):
        raise ValueError(f"{what} must be a fraction in [0, 1], got {a!r}")
    return float(a)


def _amounts(
    amount: float | Mapping[str, float], scope: str, names: list[str]
) -> tuple[float | None, dict[str, float] | None]:
    """Normalise ``amount``: ``(global fraction, None)`` or ``(None, per-layer fractions)``."""
    check_choice("scope", scope, SCOPES)
    if isinstance(amount, Mapping):
        if scope == "global":
            raise ValueError("scope='global' needs one fraction, not a dict of per-layer fractions")
        unknown = [k for k in amount if k not in names]
        if unknown:
            raise ValueError(f"amount names unknown layer {unknown[0]!r}; target layers: {', '.join(names)}")
        missing = [n for n in names if n not in amount]
        if missing:
            raise ValueError(f"amount has no fraction for target layer {missing[0]!r}")
        return None, {n: _check_fraction(f"amount[{n!r}]", amount[n]) for n in names}
    a = _check_fraction("amount", amount)
    if scope == "global":
        return a, None
    return None, {n: a for n in names}


def _prune_by_scores(
    model: nn.Module,
    amount: float | Mapping[str, float],
    scope: str,
    targets: tuple[str, ...],
    inplace: bool,
    scores,
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, list[LayerPrune]]:
    """Zero the lowest-scoring weights. ``scores(list of (name, module)) -> list of flat arrays``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = [n for n, _ in target_layers(model, targets)]  # validate before copying the model
    global_amount, per_layer = _amounts(amount, scope, names)
    work = work_model(model, inplace)
    layers = target_layers(work, targets)
    s = scores(layers)
    if global_amount is not None:
        sizes = [x.size for x in s]
        k = round(global_amount * sum(sizes))
        prune_all = _smallest(np.concatenate(s), k, generator)
        prunes = np.split(prune_all, np.cumsum(sizes)[:-1])
    else:
        prunes = [_smallest(x, round(per_layer[n] * x.size), generator) for x, n in zip(s, names)]
    out = []
    for (name, m), prune in zip(layers, prunes):
        if prune.any():
            zero_weight(m, prune)
        n = int(prune.size)
        out.append(
            LayerPrune(
                name=name,
                shape=tuple(m.weight.shape),
                params=n,
                n_positions=n,
                n_zeroed=int(np.count_nonzero(prune)),
                keep=~prune,
            )
        )
    return work, out


def prune_magnitude(
    model: nn.Module,
    amount: float | Mapping[str, float],
    *,
    scope: str = "layer",
    targets: Iterable[str] | str = ("conv",),
    inplace: bool = False,
) -> PruneResult:
    """Zero the smallest-|w| weights of the target layers.

    ``amount``: a fraction in [0, 1] for every layer (``scope="layer"``), one fraction of all
    target weights under one global threshold (``scope="global"``), or a dict
    ``{layer name: fraction}`` covering every target layer. Counts: ``round(fraction * n)``.
    Masks equal ``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured`` up to ties.
    """
    targets = normalise_targets(targets)

    def scores(layers):
        return [weight_numpy(m.weight.detach().abs()).reshape(-1) for _, m in layers]

    work, out = _prune_by_scores(model, amount, scope, targets, inplace, scores)
    config = dict(amount=_config_amount(amount), scope=scope, seed=None, targets=list(targets))
    return PruneResult("magnitude", work, out, config, [])


def prune_random(
    model: nn.Module,
    amount: float | Mapping[str, float],
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    scope: str = "layer",
    targets: Iterable[str] | str = ("conv",),
    inplace: bool = False,
) -> PruneResult:
    """Zero uniformly chosen weights of the target layers: same counts as :func:`prune_magnitude`.

    Randomness comes only from ``generator`` (a CPU ``torch.Generator``) or, if none is given,
    ``torch.Generator().manual_seed(seed)``: the same seed gives the same masks. Each layer
    (or, for ``scope="global"``, all target weights at once) draws i.i.d. keys
    ``torch.rand(n, generator=...)`` in ``target_layers`` order and the ``k`` smallest keys are
    zeroed, keys tied at the k-th value resolved by a random permutation from the same
    generator: a uniformly random ``k``-subset (the keys are exchangeable and so is the
    tie-break).
    """
    targets = normalise_targets(targets)
    if generator is None:
        if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int (or pass generator=), got {seed!r}")
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        seed_logged: int | None = int(seed)
    else:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        seed_logged = None  # state of a caller-owned generator; the caller logs its seed

    def scores(layers):
        if scope == "global" and not isinstance(amount, Mapping):
            total = sum(m.weight.numel() for _, m in layers)
            keys = torch.rand(total, generator=generator).numpy()
            return np.split(keys, np.cumsum([m.weight.numel() for _, m in layers])[:-1])
        return [torch.rand(m.weight.numel(), generator=generator).numpy() for _, m in layers]

    work, out = _prune_by_scores(model, amount, scope, targets, inplace, scores, generator)
    config = dict(amount=_config_amount(amount), scope=scope, seed=seed_logged, targets=list(targets))
    return PruneResult("random", work, out, config, [])


def _config_amount(amount):
    return {k: float(v) for k, v in amount.items()} if isinstance(amount, Mapping) else float(amount)


# --------------------------------------------------------------------------- matching


def matched_amount(dwt_result: PruneResult, scope: str = "layer") -> float | dict[str, float]:
    """The budget of a dwt result as magnitude/random ``amount``.

    ``scope="layer"``: ``{name: n_zeroed / n_positions}`` of each dwt layer (its coefficients);
    ``scope="global"``: total zeroed coefficients / total coefficients.
    """
    check_choice("scope", scope, SCOPES)
    if dwt_result.method != "dwt":
        raise ValueError(f"matched_amount needs a dwt result, got method {dwt_result.method!r}")
    if scope == "layer":
        return {lp.name: lp.fraction for lp in dwt_result.layers}
    total = dwt_result.n_positions
    return dwt_result.n_zeroed / total if total else 0.0


def prune_matched(
    model: nn.Module,
    dwt_result: PruneResult,
    *,
    scope: str = "layer",
    seed: int = 0,
    targets: Iterable[str] | str | None = None,
    inplace: bool = False,
) -> dict[str, PruneResult]:
    """Magnitude and random pruning of ``model`` at the budget of ``dwt_result``.

    The one shared budget-matching step: ``amount = matched_amount(dwt_result, scope)``.
    ``targets`` defaults to the dwt result's targets. With ``inplace=True`` only the random
    model is ``model`` itself (the magnitude model is always a copy, so both start from the
    same weights). Returns ``{"magnitude": ..., "random": ...}``.
    """
    if targets is None:
        targets = dwt_result.config.get("targets", ("conv",))
    amount = matched_amount(dwt_result, scope)
    return {
        "magnitude": prune_magnitude(model, amount, scope=scope, targets=targets, inplace=False),
        "random": prune_random(model, amount, seed=seed, scope=scope, targets=targets, inplace=inplace),
    }
