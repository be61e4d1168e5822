"""Three pruning methods over a model's target layers, and the one budget-matching step.

* :func:`prune_dwt` -- per target layer: DWT in a layout, zero coefficients with |c| below a
  percentile threshold (per layer, or one threshold over all target layers), inverse DWT.
* :func:`prune_magnitude` -- zero the smallest-|w| weights: a fraction per layer, one global
  fraction with one global threshold, or a fraction per named layer.
* :func:`prune_random` -- zero the same counts, chosen uniformly by a seeded ``torch.Generator``.
* :func:`prune_matched` -- magnitude and random at the budget of a dwt result
  (:func:`matched_amount`): per layer, the fraction of coefficients dwt zeroed in that layer;
  or the global fraction.

Conventions shared by magnitude and random:

* ``amount`` is always a *fraction* in [0, 1], never a count. The number of weights zeroed in a
  tensor of ``n`` weights is ``round(amount * n)`` (Python's round: half to even), exactly
  as ``torch.nn.utils.prune`` computes it; global scope: ``round(amount * total)``.
* Ties at the threshold are broken deterministically: among equal candidates, lower flat
  indices (layers in ``target_layers`` order, then C order within a weight) are zeroed first.
* Zeroed weights are written as +0.0 (not ``w * 0``, which gives -0.0 for negative ``w``).

The math runs on CPU in numpy (PyWavelets) or torch; results are copied back to each
parameter's device and dtype. The input model is deep-copied unless ``inplace=True``.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from wavesweep import wavelets as wv
from wavesweep.names import check_choice

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("dwt", "magnitude", "random")
SCOPES: tuple[str, ...] = ("layer", "global")
TARGETS: dict[str, type[nn.Module]] = {"conv": nn.Conv2d, "linear": nn.Linear}
BACKENDS: tuple[str, ...] = ("auto", "numpy", "torch")

__all__ = [
    "METHODS",
    "SCOPES",
    "TARGETS",
    "LayerPrune",
    "PruneResult",
    "target_layers",
    "prune_dwt",
    "prune_magnitude",
    "prune_random",
    "matched_amount",
    "prune_matched",
]


@dataclass
class LayerPrune:
    """What pruning did to one target layer's ``weight``.

    ``n_coeffs``: coefficients (dwt) or weights (magnitude/random) the mask runs over.
    ``n_zeroed``: zeroed coefficients (dwt) or zeroed weights (magnitude/random).
    ``keep``: flat bool mask over those positions (True = kept, stored); C order of the
    weight, or the coefficient order of :mod:`wavesweep.wavelets` for dwt.
    ``coeffs``: dwt only, the thresholded flat coefficients (zeros where dropped).
    ``structure``: dwt only, what :func:`wavesweep.wavelets.reconstruct` needs.
    """

    name: str
    shape: tuple[int, ...]
    params: int
    n_coeffs: int
    n_zeroed: int
    level_requested: int | None = None
    level_effective: int | None = None
    keep: np.ndarray | None = field(default=None, repr=False, compare=False)
    coeffs: np.ndarray | None = field(default=None, repr=False, compare=False)
    structure: wv.CoeffStructure | None = field(default=None, repr=False, compare=False)

    @property
    def fraction(self) -> float:
        """``n_zeroed / n_coeffs`` (0.0 for an empty layer)."""
        return self.n_zeroed / self.n_coeffs if self.n_coeffs else 0.0

    @property
    def key(self) -> str:
        """State-dict key of the pruned tensor."""
        return f"{self.name}.weight" if self.name else "weight"


@dataclass
class PruneResult:
    """A pruned model and the per-layer record of how it was pruned."""

    method: str
    model: nn.Module
    layers: list[LayerPrune]
    config: dict
    warnings: list[str] = field(default_factory=list)

    @property
    def n_zeroed(self) -> int:
        return sum(lp.n_zeroed for lp in self.layers)

    @property
    def n_coeffs(self) -> int:
        return sum(lp.n_coeffs for lp in self.layers)


# --------------------------------------------------------------------------- targets


def _normalise_targets(targets: Iterable[str] | str) -> tuple[str, ...]:
    if isinstance(targets, str):
        targets = (targets,)
    targets = tuple(targets)
    if not targets:
        raise ValueError(f"targets must name at least one of: {', '.join(TARGETS)}")
    for t in targets:
        check_choice("target", t, TARGETS)
    return targets


def target_layers(model: nn.Module, targets: Iterable[str] | str = ("conv",)) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every target layer, in ``named_modules`` order.

    ``targets``: kinds from :data:`TARGETS` (``"conv"`` = ``nn.Conv2d``, ``"linear"`` = ``nn.Linear``).
    Raises ``ValueError`` for an unknown kind or a model without target layers.
    """
    targets = _normalise_targets(targets)
    types = tuple(TARGETS[t] for t in targets)
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
    if not layers:
        raise ValueError(
            f"model {type(model).__name__} has no target layers of kinds {list(targets)} "
            f"({', '.join(t.__name__ for t in types)}); valid target kinds: {', '.join(TARGETS)}"
        )
    return layers


def _work_model(model: nn.Module, inplace: bool) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def _weight_numpy(w: torch.Tensor) -> np.ndarray:
    """CPU numpy view/copy of a weight; float32 for dtypes numpy or PyWavelets lack (half, bfloat16)."""
    w = w.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    return w.cpu().numpy()


def _write_weight(module: nn.Module, values: np.ndarray) -> None:
    w = module.weight
    with torch.no_grad():
        w.copy_(torch.from_numpy(np.ascontiguousarray(values)).reshape(w.shape))


def _zero_weight(module: nn.Module, prune: np.ndarray) -> None:
    """Set the weights where ``prune`` (flat bool) is True to +0.0, in place."""
    w = module.weight
    mask = torch.from_numpy(prune).reshape(w.shape).to(w.device)
    with torch.no_grad():
        w.masked_fill_(mask, 0)


# --------------------------------------------------------------------------- dwt


def prune_dwt(
    model: nn.Module,
    *,
    wavelet: str,
    level: int,
    percentile: float,
    layout: str = "filter",
    mode: str = wv.DEFAULT_MODE,
    scope: str = "layer",
    keep_approx: bool = False,
    targets: Iterable[str] | str = ("conv",),
    inplace: bool = False,
    backend: str = "auto",
) -> PruneResult:
    """DWT pruning of every target layer's weight (see :mod:`wavesweep.wavelets`).

    Coefficients with |c| strictly below the threshold become zero. Threshold: the
    ``percentile`` (numpy 'linear') of the layer's |coefficients| (``scope="layer"``) or of
    all target layers' |coefficients| together (``scope="global"``). With ``keep_approx``
    the approximation band is excluded from the threshold computation and never zeroed (it
    still counts in ``n_coeffs`` because it is stored). Levels are clamped per layer
    (:class:`~wavesweep.wavelets.LevelClampedWarning`, recorded in ``result.warnings``).
    At effective level 0 the coefficients are the weights themselves (plain magnitude pruning
    at the percentile), and they all form the approximation band: with ``keep_approx`` such a
    layer is left unpruned.

    ``n_zeroed / n_coeffs`` of each layer is the coefficient-domain fraction; the
    reconstructed weights are generally *not* sparse.

    ``backend``: ``"numpy"`` (PyWavelets, on CPU), ``"torch"`` (:mod:`wavesweep.wavelets_torch`,
    the same transform on the weights' own device: no NumPy round trip on a GPU), or ``"auto"``
    (torch when the weights are on an accelerator, PyWavelets on CPU, where it is faster). The
    two give the same keep masks (tested) and reconstructions equal to float tolerance; the
    record (``keep``, ``coeffs``) is always a CPU NumPy copy, which the checkpoint needs.
    """
    wv.validate_dwt_args(wavelet=wavelet, level=level, layout=layout, mode=mode, percentile=percentile)
    check_choice("scope", scope, SCOPES)
    check_choice("dwt backend", backend, BACKENDS)
    targets = _normalise_targets(targets)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target_layers(model, targets)  # raises before the copy if there are none
    work = _work_model(model, inplace)
    layers = target_layers(work, targets)
    percentile = float(percentile)

    on_cpu = all(m.weight.device.type == "cpu" for _, m in layers)
    use_torch = backend == "torch" or (backend == "auto" and not on_cpu)
    if use_torch:
        from wavesweep import wavelets_torch as wt

        def weight(m: nn.Module) -> torch.Tensor:
            w = m.weight.detach()
            return w if w.dtype in (torch.float32, torch.float64) else w.float()

        decompose, prune_one = wt.decompose, wt.dwt_prune_tensor

        def abs_pool(m: nn.Module) -> torch.Tensor:
            st = wt.structure_of(tuple(m.weight.shape), wavelet=wavelet, level=level, layout=layout, mode=mode)
            return decompose(weight(m), st)[(st.n_approx if keep_approx else 0) :].abs()

        def global_threshold(parts):
            return wt.percentile_threshold(torch.cat([p.to(parts[0].device) for p in parts]), percentile)
    else:
        prune_one = wv.dwt_prune_array

        def weight(m: nn.Module) -> np.ndarray:
            return _weight_numpy(m.weight)

        def abs_pool(m: nn.Module) -> np.ndarray:
            coeffs, st = wv.decompose(weight(m), wavelet=wavelet, level=level, layout=layout, mode=mode)
            return np.abs(coeffs[(st.n_approx if keep_approx else 0) :])

        def global_threshold(parts):
            return wv.percentile_threshold(np.concatenate(parts), percentile)

    threshold = None  # scope "layer": each layer's own percentile, inside the per-tensor step
    if scope == "global":  # one threshold over every target layer's |coefficients|
        threshold = global_threshold([abs_pool(m) for _, m in layers])

    out_layers: list[LayerPrune] = []
    msgs: list[str] = []
    for name, m in layers:
        rec, coeffs, keep, st = prune_one(
            weight(m), wavelet=wavelet, level=level, percentile=percentile, layout=layout, mode=mode,
            keep_approx=keep_approx, threshold=threshold,
        )  # fmt: skip
        if use_torch:
            with torch.no_grad():
                m.weight.copy_(rec.reshape(m.weight.shape))
            coeffs, keep = coeffs.cpu().numpy(), keep.cpu().numpy()  # the record for accounting and the checkpoint
        else:
            _write_weight(m, rec)
        n_zeroed = int(keep.size - np.count_nonzero(keep))
        if st.level < level:
            msgs.append(
                f"{name or '<root>'}: level {level} clamped to {st.level} "
                f"(shape {'x'.join(map(str, st.shape))}, layout {layout}, wavelet {wavelet})"
            )
        out_layers.append(
            LayerPrune(
                name=name,
                shape=tuple(m.weight.shape),
                params=m.weight.numel(),
                n_coeffs=int(coeffs.size),
                n_zeroed=n_zeroed,
                level_requested=int(level),
                level_effective=st.level,
                keep=keep,
                coeffs=coeffs,
                structure=st,
            )
        )
    if msgs:
        text = f"effective level lower than requested in {len(msgs)} of {len(out_layers)} layers: " + "; ".join(msgs)
        log.info(text)
        warnings.warn(text, wv.LevelClampedWarning, stacklevel=2)
    config = dict(
        wavelet=wavelet,
        level=int(level),
        percentile=percentile,
        layout=layout,
        mode=mode,
        scope=scope,
        keep_approx=bool(keep_approx),
        targets=list(targets),
    )
    return PruneResult("dwt", work, out_layers, config, msgs)


# --------------------------------------------------------------------------- magnitude / random


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
    if not wv._is_real(a) or not (0.0 <= float(a) <= 1.0):
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
    work = _work_model(model, inplace)
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
            _zero_weight(m, prune)
        n = int(prune.size)
        out.append(
            LayerPrune(
                name=name,
                shape=tuple(m.weight.shape),
                params=n,
                n_coeffs=n,
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
    targets = _normalise_targets(targets)

    def scores(layers):
        return [_weight_numpy(m.weight.detach().abs()).reshape(-1) for _, m in layers]

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
    targets = _normalise_targets(targets)
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

    ``scope="layer"``: ``{name: n_zeroed / n_coeffs}`` of each dwt layer;
    ``scope="global"``: total zeroed coefficients / total coefficients.
    """
    check_choice("scope", scope, SCOPES)
    if dwt_result.method != "dwt":
        raise ValueError(f"matched_amount needs a dwt result, got method {dwt_result.method!r}")
    if scope == "layer":
        return {lp.name: lp.fraction for lp in dwt_result.layers}
    total = dwt_result.n_coeffs
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
