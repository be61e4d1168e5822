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
    SCOPES, TARGETS, LayerPrune, PruneResult, defer_host_copy, normalise_targets, numpy_batched, target_layers, weight_numpy, work_model,
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
    two give the same keep masks (tested) and reconstructions equal to float tolerance. The
    record (``keep``, ``coeffs``) reads as CPU NumPy arrays; the torch backend leaves it on the
    weights' device and copies it to the host on first use (the checkpoint), in one transfer per
    dtype (:func:`~wavesweep.prune_record.defer_host_copy`); fine-tuning uses it where it is.
    """
    wv.validate_dwt_args(wavelet=wavelet, level=level, layout=layout, mode=mode, percentile=percentile)
    check_choice("scope", scope, SCOPES)
    check_choice("dwt backend", backend, BACKENDS)
    targets = normalise_targets(targets)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    target_layers(model, targets)  # raises before the copy if there are none
    work = work_model(model, inplace)
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
            return weight_numpy(m.weight)

        def abs_pool(m: nn.Module) -> np.ndarray:
            coeffs, st = wv.decompose(weight(m), wavelet=wavelet, level=level, layout=layout, mode=mode)
            return np.abs(coeffs[(st.n_approx if keep_approx else 0) :])

        def global_threshold(parts):
            return wv.percentile_threshold(np.concatenate(parts), percentile)

    threshold = None  # scope "layer": each layer's own percentile, inside the per-tensor step
    if scope == "global":  # one threshold over every target layer's |coefficients|
        threshold = global_threshold([abs_pool(m) for _, m in layers])

    done = []
    for name, m in layers:
        rec, coeffs, keep, st = prune_one(
            weight(m), wavelet=wavelet, level=level, percentile=percentile, layout=layout, mode=mode,
            keep_approx=keep_approx, threshold=threshold,
        )  # fmt: skip
        if use_torch:
            with torch.no_grad():
                m.weight.copy_(rec.reshape(m.weight.shape))
        else:
            write_weight(m, rec)
        done.append((name, m, coeffs, keep, st))
    if use_torch:  # the dropped counts of every layer in one transfer (one sync), not one per layer
        zeroed = numpy_batched([torch.stack([(~k).sum() for _, _, _, k, _ in done])])[0].tolist()
    else:
        zeroed = [int(k.size - np.count_nonzero(k)) for _, _, _, k, _ in done]
    out_layers: list[LayerPrune] = []
    msgs: list[str] = []
    for (name, m, coeffs, keep, st), n_zeroed in zip(done, zeroed):
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
            )
        )
    if use_torch:  # the record (coefficients, masks) stays on the device until the checkpoint reads it
        defer_host_copy(out_layers, [{"coeffs": c, "keep": k} for _, _, c, k, _ in done])
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
