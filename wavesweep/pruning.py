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

import logging
import warnings
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from wavesweep import wavelets as wv
from wavesweep.baselines import BACKENDS, matched_amount, prune_magnitude, prune_matched, prune_random
from wavesweep.names import check_choice
from wavesweep.prune_record import (
    SCOPES, TARGETS, LayerPrune, PruneResult, check_finite_targets, defer_host_copy, normalise_targets, numpy_batched, target_layers, weight_numpy, work_model,
    write_weight,
)  # fmt: skip

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("dwt", "magnitude", "random")

# The public names of all three methods: the records and magnitude/random live in
# wavesweep.prune_record and wavesweep.baselines, and are used through this module.
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


def check_layout(model: nn.Module, targets: Iterable[str] | str, layout: str) -> list[tuple[str, nn.Module]]:
    """The target layers of ``model`` (``(name, module)``), after checking that there are some and
    that ``layout`` can take every one's weight (a Linear's 2-D weight in ``kernel`` cannot).
    Shapes only: a model built on the meta device will do, which is how a trial and a study spec
    refuse a bad combination before any base model is trained or loaded."""
    found = target_layers(model, normalise_targets(targets))
    for name, m in found:
        try:
            wv.layout_array(np.empty(tuple(m.weight.shape), dtype=np.uint8), layout)  # shape only, memory untouched
        except ValueError as e:
            raise ValueError(f"target layer {name or '(root)'!r}: {e}") from None
    return found


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
    still counts in ``n_positions`` because it is stored). Levels are clamped per layer
    (:class:`~wavesweep.wavelets.LevelClampedWarning`, recorded in ``result.warnings``).
    At effective level 0 the coefficients are the weights themselves (plain magnitude pruning
    at the percentile), and they all form the approximation band: with ``keep_approx`` such a
    layer is left unpruned.

    ``n_zeroed / n_positions`` of each layer is the coefficient-domain fraction; the
    reconstructed weights are generally *not* sparse.

    ``backend``: ``"numpy"`` (PyWavelets, on CPU), ``"torch"`` (:mod:`wavesweep.wavelets_torch`,
    the same transform on the weights' own device: no NumPy round trip on a GPU), or ``"auto"``
    (torch when the weights are on an accelerator, PyWavelets on CPU, where it is faster). The
    two give the same keep masks on continuous weights (tested) and reconstructions equal to
    float tolerance. At exact ties they can differ: where PyWavelets cancels two equal weights
    to exactly 0, the convolution and dense-matrix level backends leave a rounding residue
    (1e-8 in float32), which can then sit above a threshold of 0 (weights with repeated values,
    e.g. quantized ones, at percentiles where the threshold is 0). And in the modes that repeat
    samples at the boundary (``periodic``, ``reflect``, ``antisymmetric``, ``symmetric`` on short rows) PyWavelets
    can give two exactly equal coefficients where the torch backend's differ by an ulp: when such
    a pair straddles the threshold, one coefficient is kept by one backend and dropped by the
    other (seen: 1 position of 26 on a (2, 1, 3, 3) weight, ``flat`` layout; the weights then
    differ by about 1e-8). ``periodization``, the default, gives no redundant coefficients. The
    record (``keep``, ``coeffs``) reads as CPU NumPy arrays; the torch backend leaves it on the
    weights' device and copies it to the host on first use (the checkpoint), in one transfer per
    dtype (:func:`~wavesweep.prune_record.defer_host_copy`); fine-tuning uses it where it is.
    """
    wv.validate_dwt_args(wavelet=wavelet, level=level, layout=layout, mode=mode, percentile=percentile)
    check_choice("scope", scope, SCOPES)
    check_choice("dwt backend", backend, BACKENDS)
    if not isinstance(keep_approx, (bool, np.bool_)):  # "false" is truthy: it kept the approximation band
        raise ValueError(f"keep_approx must be true or false, got {keep_approx!r}")
    targets = normalise_targets(targets)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = check_layout(model, targets, layout)  # before the copy: no target layers, a weight the layout cannot take
    check_finite_targets(found)  # and NaN weights
    work = work_model(model, inplace)
    layers = target_layers(work, targets)
    percentile = float(percentile)

    on_cpu = all(m.weight.device.type == "cpu" for _, m in layers)
    use_torch = backend == "torch" or (backend == "auto" and not on_cpu)
    if use_torch:
        done = _prune_dwt_torch(layers, wavelet=wavelet, level=level, percentile=percentile, layout=layout, mode=mode,
                                scope=scope, keep_approx=keep_approx)  # fmt: skip
    else:
        done = _prune_dwt_numpy(layers, wavelet=wavelet, level=level, percentile=percentile, layout=layout, mode=mode,
                                scope=scope, keep_approx=keep_approx)  # fmt: skip
    out_layers: list[LayerPrune] = []
    msgs: list[str] = []
    structural: list[str] = []
    for name, m, coeffs, keep, st, n_zeroed, n_struct, struct_dropped in done:
        if n_struct:
            structural.append(f"{name or '<root>'}: {n_struct} of {st.n_coeffs}")
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
                n_positions=int(coeffs.numel() if use_torch else coeffs.size),
                n_zeroed=int(n_zeroed),
                level_requested=int(level),
                level_effective=st.level,
                keep=None if use_torch else keep,
                coeffs=None if use_torch else coeffs,
                structure=st,
                n_structural=int(n_struct),
                n_structural_zeroed=int(struct_dropped),
            )
        )
    if use_torch:  # the record (coefficients, masks) stays on the device until the checkpoint reads it
        defer_host_copy(out_layers, [{"coeffs": c, "keep": k} for _, _, c, k, *_ in done])
    if msgs:
        text = f"effective level lower than requested in {len(msgs)} of {len(out_layers)} layers: " + "; ".join(msgs)
        log.info(text)
        warnings.warn(text, wv.LevelClampedWarning, stacklevel=2)
    if structural:
        text = (f"coefficient positions that are zero whatever the weights (the {mode} extension with {wavelet}; "
                f"see wavelets.structural_zeros) in {len(structural)} of {len(out_layers)} layers: " + "; ".join(structural)
                + "; they are left out of the pruned fraction the baselines are matched to")  # fmt: skip
        msgs.append(text)
        log.info(text)
        warnings.warn(text, wv.StructuralZerosWarning, stacklevel=2)
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


#: the most weights (elements) the torch backend transforms in one stacked call: layers of one
#: shape go through one transform, one sort and one inverse together (fewer kernel launches on a
#: GPU), in groups of at most this many weights (bounded temporary memory)
STACK_ELEMENTS = 1 << 26
#: whether layers on the CPU stack too. Not by default: the CPU is not waiting on launches, and
#: the copies between the stacked and the per-layer coefficient order cost more there than they
#: save (ViT-B/16's Linear layers, torch backend: 3.45 s stacked against 2.35 s one by one on
#: the 2-core CPU of this project, ``bench/bench_pruning.py --only-big``); tests set it
STACK_ON_CPU = False


def _stack_groups(layers: list[tuple[str, nn.Module]], layout: str) -> list[list[int]]:
    """Indices into ``layers``, grouped by weight shape, dtype and device in a layout transformed
    row by row (each group in layer order, groups in order of first appearance, at most
    :data:`STACK_ELEMENTS` weights a group); one layer a group in the other layouts and on the
    CPU (:data:`STACK_ON_CPU`)."""
    from wavesweep import wavelets_torch as wt

    if layout not in wt.STACKING_LAYOUTS:
        return [[i] for i in range(len(layers))]
    groups: dict[tuple, list[list[int]]] = {}
    for i, (_, m) in enumerate(layers):
        w = m.weight
        if w.device.type == "cpu" and not STACK_ON_CPU:
            groups[("alone", i)] = [[i]]
            continue
        parts = groups.setdefault((tuple(w.shape), w.dtype, w.device), [[]])
        if parts[-1] and (len(parts[-1]) + 1) * w.numel() > STACK_ELEMENTS:
            parts.append([])
        parts[-1].append(i)
    return sorted((g for parts in groups.values() for g in parts), key=lambda g: g[0])


def _prune_dwt_torch(layers, *, wavelet, level, percentile, layout, mode, scope, keep_approx) -> list[tuple]:
    """dwt pruning in torch on the weights' devices (:mod:`wavesweep.wavelets_torch`), layers of
    one shape together (:func:`_stack_groups`); ``[(name, module, coeffs, keep, structure,
    dropped count)]`` in layer order, the records on the device."""
    from wavesweep import wavelets_torch as wt

    def weight(m: nn.Module) -> torch.Tensor:
        w = m.weight.detach()
        return w if w.dtype in (torch.float32, torch.float64) else w.float()

    groups = _stack_groups(layers, layout)
    structs = [wt.structure_of(tuple(layers[g[0]][1].weight.shape), wavelet=wavelet, level=level, layout=layout, mode=mode)
               for g in groups]  # fmt: skip

    def coefficient_rows(gi: int) -> torch.Tensor:
        with torch.no_grad():
            return wt.decompose_stacked([weight(layers[i][1]) for i in groups[gi]], structs[gi])

    # scope "layer": each group's coefficients made when it is pruned (one group's at a time);
    # "global": every group's first, for one threshold over all their |coefficients|
    rows: list[torch.Tensor | None] = [None] * len(groups)
    threshold = None
    if scope == "global":
        rows = [coefficient_rows(gi) for gi in range(len(groups))]
        dev = rows[0].device
        threshold = wt.percentile_threshold(
            torch.cat([c[:, (st.n_approx if keep_approx else 0) :].abs().reshape(-1).to(dev) for c, st in zip(rows, structs)]),
            percentile,
        )
    done: list[tuple | None] = [None] * len(layers)
    # per group, on the device: each layer's kept count, then (only where the group has
    # structural zeros) each layer's structural positions dropped; all in one transfer at the end
    counted: list[torch.Tensor] = []
    n_struct: list[int] = []  # per group: positions zero whatever the weights
    for gi, (g, st) in enumerate(zip(groups, structs)):
        c = rows[gi] if rows[gi] is not None else coefficient_rows(gi)
        rows[gi] = None  # freed once pruned
        rec, coeffs, keep = wt.prune_coefficient_rows(
            c, st, percentile=None if threshold is not None else percentile, keep_approx=keep_approx, threshold=threshold
        )
        del c
        n_struct.append(int(wv.structural_zeros(st).sum()))
        counted.append(keep.sum(dim=1))
        if n_struct[-1]:  # the few layouts and wavelets that have them: the mask goes to the device
            struct = torch.from_numpy(wv.structural_zeros(st).copy()).to(keep.device, non_blocking=True)
            counted.append((struct & ~keep).sum(dim=1))
        with torch.no_grad():  # every layer of the group written by one multi-tensor copy
            torch._foreach_copy_([layers[i][1].weight for i in g], list(rec.unbind(0)))
        for j, i in enumerate(g):
            done[i] = (*layers[i], coeffs[j], keep[j], st)
    # the counts of every layer in one transfer (one sync), not one per layer
    counts = numpy_batched([torch.cat([t.to(counted[0].device) for t in counted])])[0].tolist()
    at = 0
    for g, st, ns in zip(groups, structs, n_struct):
        kept, at = counts[at : at + len(g)], at + len(g)
        struct_dropped, at = (counts[at : at + len(g)], at + len(g)) if ns else ([0] * len(g), at)
        for j, i in enumerate(g):
            done[i] = done[i] + (st.n_coeffs - kept[j], ns, struct_dropped[j])
    return done  # type: ignore[return-value]


def _prune_dwt_numpy(layers, *, wavelet, level, percentile, layout, mode, scope, keep_approx) -> list[tuple]:
    """dwt pruning with PyWavelets on the host, layer by layer; ``[(name, module, coeffs, keep,
    structure, dropped count)]``, NumPy records."""
    threshold = None  # scope "layer": each layer's own percentile, inside the per-tensor step
    if scope == "global":  # one threshold over every target layer's |coefficients|
        parts = []
        for _, m in layers:
            coeffs, st = wv.decompose(weight_numpy(m.weight), wavelet=wavelet, level=level, layout=layout, mode=mode)
            parts.append(np.abs(coeffs[(st.n_approx if keep_approx else 0) :]))
        threshold = wv.percentile_threshold(np.concatenate(parts), percentile)
    done = []
    for name, m in layers:
        rec, coeffs, keep, st = wv.dwt_prune_array(
            weight_numpy(m.weight), wavelet=wavelet, level=level, percentile=percentile, layout=layout, mode=mode,
            keep_approx=keep_approx, threshold=threshold,
        )  # fmt: skip
        write_weight(m, rec)
        struct = wv.structural_zeros(st)
        n_struct = int(np.count_nonzero(struct))
        struct_dropped = int(np.count_nonzero(struct & ~keep)) if n_struct else 0
        done.append((name, m, coeffs, keep, st, int(keep.size - np.count_nonzero(keep)), n_struct, struct_dropped))
    return done
