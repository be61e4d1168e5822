"""Honest accounting of a pruned model: per-layer and total stats (:func:`model_stats`).

Stored-bytes encoding, one for all methods (the checkpoint file of :mod:`wavesweep.checkpoint`
is exactly this, plus a header):

* every pruned target-layer weight: a 1-bit-per-position bitmap over the positions the mask
  runs over -- the weights (magnitude, random) or the DWT coefficients (dwt; non-periodization
  modes and odd lengths give more coefficients than weights, and they are all counted) --
  ``ceil(n / 8)`` bytes, followed by the kept values at their dtype size (float32 weights and
  coefficients: 4 B each). Kept = the mask's kept positions (a kept value that happens to be 0
  is still stored). The values are what the model is rebuilt from: weights at the weight's
  dtype, coefficients at the dtype the transform ran in, float32 for float16 and bfloat16
  weights too (PyWavelets has no half precision). So on a half-precision model dwt stores
  4 B per kept value against magnitude's and random's 2 B: at the same fraction its stored
  bytes are nearly twice theirs.
* every other state-dict entry (all other parameters and all buffers: biases of target
  layers, BatchNorm weights and running stats, ``num_batches_tracked``, ...): dense, at its
  dtype size.
* a tensor the state dict lists under several keys (tied weights, one module used twice) is
  stored once, as ``torch.save`` stores it (:func:`wavesweep.checkpoint.shared_keys`): pruned
  when it is a target layer's weight, else dense.

``dense_bytes`` = every distinct state-dict tensor at its dtype size; ``compression_ratio`` =
``dense_bytes / stored_bytes``. A dwt reconstruction is almost never sparse in the weight
domain (``weight_sparsity`` ~ 0): its compression lives in the coefficients.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import pandas as pd
import torch
from torch import nn

# The checkpoint's public names, used through this module by callers written before the split.
from wavesweep.checkpoint import (
    HEADER_FIXED_BYTES,
    MAGIC,
    VERSION,
    load_compressed,
    read_compressed,
    read_header,
    save_compressed,
    shared_keys,
)
from wavesweep.prune_record import LayerPrune, PruneResult

__all__ = [
    "MAGIC",
    "VERSION",
    "HEADER_FIXED_BYTES",
    "LayerStats",
    "ModelStats",
    "model_stats",
    "save_compressed",
    "read_header",
    "read_compressed",
    "load_compressed",
]


@dataclass
class LayerStats:
    """One target layer. Bytes under the shared encoding (module docstring)."""

    name: str
    shape: tuple[int, ...]
    params: int
    zero_weights: int
    weight_sparsity: float
    coeffs: int
    zeroed_coeffs: int
    coeff_sparsity: float
    rel_l2_error: float
    level_requested: int | None
    level_effective: int | None
    dense_bytes: int
    stored_bytes: int


@dataclass
class ModelStats:
    """Per-layer stats and totals of one pruned model.

    target_*: over target-layer weights; model_*: over all parameters (``named_parameters``);
    coeffs / zeroed_coeffs: positions of the stored masks (weights for magnitude/random,
    coefficients for dwt); bytes: over the whole state dict (parameters and buffers), each
    tensor once however many keys list it;
    mean_rel_l2_error: unweighted mean over target layers.
    """

    method: str
    layers: list[LayerStats]
    target_params: int
    target_zero_weights: int
    weight_sparsity_target: float
    model_params: int
    model_zero_weights: int
    weight_sparsity_model: float
    coeffs: int
    zeroed_coeffs: int
    coeff_sparsity: float
    dense_bytes: int
    stored_bytes: int
    compression_ratio: float
    mean_rel_l2_error: float

    def to_frame(self) -> pd.DataFrame:
        """One row per layer; columns = :class:`LayerStats` fields; shape as e.g. ``"64x64x3x3"``."""
        rows = []
        for ls in self.layers:
            d = asdict(ls)
            d["shape"] = "x".join(map(str, ls.shape))
            rows.append(d)
        return pd.DataFrame(rows, columns=[f.name for f in fields(LayerStats)])

    def totals(self) -> dict[str, float]:
        """Flat scalar dict: every field except ``method`` and ``layers``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("method", "layers")}


def _div(a: float, b: float) -> float:
    return a / b if b else 0.0


def _layer_stored_bytes(n_positions: int, kept: int, itemsize: int) -> int:
    return math.ceil(n_positions / 8) + kept * itemsize


def _value_itemsize(lp: LayerPrune, weight: torch.Tensor) -> int:
    """Bytes per kept value: the coefficients' dtype (dwt) or the weight's (magnitude, random)."""
    if lp.has_coeffs:
        return lp.coeff_itemsize
    return weight.element_size()


def _count_zeros(t: torch.Tensor) -> int:
    t = t.detach().cpu()
    if t.dtype in (torch.float32, torch.float64):
        return t.numel() - int(np.count_nonzero(t.numpy()))  # numpy: ~10x faster than torch here
    return t.numel() - int(torch.count_nonzero(t))


def _zeros_later(t: torch.Tensor) -> int | torch.Tensor:
    """Zero count of ``t``: an int on CPU; on an accelerator a 0-dim tensor left there, fetched
    with every other count and norm in one transfer (:func:`_fetch`), not one sync per tensor."""
    t = t.detach()
    if t.device.type == "cpu":
        return _count_zeros(t)
    return t.numel() - torch.count_nonzero(t)


def _norm_later(t: torch.Tensor) -> float | torch.Tensor:
    """float64 L2 norm: a float on CPU, a 0-dim tensor on an accelerator (see :func:`_zeros_later`)."""
    n = torch.linalg.vector_norm(t)
    return float(n) if n.device.type == "cpu" else n


def _fetch(values: list) -> list:
    """``values`` with every accelerator tensor replaced by its host value, in one transfer per
    device. Counts come back in float64 (exact below 2**53) and are made ints again."""
    out = list(values)
    by_dev: dict[torch.device, list[int]] = {}
    for i, v in enumerate(values):
        if isinstance(v, torch.Tensor):
            by_dev.setdefault(v.device, []).append(i)
    for idx in by_dev.values():
        # one stack per dtype (the counts', the norms'), each converted to float64 at once: a few
        # operators (kernel launches on a GPU) for all of them, not one conversion per count
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i in idx:
            by_dtype.setdefault(values[i].dtype, []).append(i)
        parts = [torch.stack([values[i] for i in group]).to(torch.float64) for group in by_dtype.values()]
        host = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu().tolist()
        for i, h in zip((i for group in by_dtype.values() for i in group), host):
            out[i] = int(h) if not values[i].dtype.is_floating_point else h
    return out


def model_stats(
    base_model: nn.Module,
    result: PruneResult,
    *,
    base_cache: dict[str, tuple[torch.Tensor, float | torch.Tensor]] | None = None,
) -> ModelStats:
    """Per-layer and total stats of ``result`` against the unpruned ``base_model``.

    ``base_model`` must hold the weights before pruning (with ``inplace=True`` pruning, keep
    a copy): ``rel_l2_error`` is ``||W' - W|| / ||W||`` per target layer (0 when ``||W|| = 0``),
    in float64. ``base_cache``: a dict shared by calls with the same ``base_model`` (one trial's
    three methods) that keeps each base layer's float64 weight and norm, computed once (the norm
    a float on CPU, a 0-dim tensor on an accelerator, fetched with the other values).
    """
    base = dict(base_model.named_modules())
    pruned_mods = dict(result.model.named_modules())
    cache = {} if base_cache is None else base_cache
    pending = []  # per layer: (zeros, ||W' - W||, ||W||), accelerator values fetched together below
    for lp in result.layers:
        if lp.name not in base:
            raise ValueError(f"layer {lp.name!r} of the pruned model is not in the base model {type(base_model).__name__}")
        wt = pruned_mods[lp.name].weight
        w0 = base[lp.name].weight.detach()
        w1 = wt.detach().to(w0.device)
        if w0.shape != w1.shape:
            raise ValueError(f"layer {lp.name!r}: base shape {tuple(w0.shape)} != pruned shape {tuple(w1.shape)}")
        if lp.name not in cache:
            w0d = w0.double()
            cache[lp.name] = (w0d, _norm_later(w0d))
        w0d, norm0 = cache[lp.name]
        # Difference and norms in float64 (torch, no numpy round trip): exact enough to recompute.
        pending += [_zeros_later(w1), _norm_later(w1.to(torch.float64, copy=True).sub_(w0d)), norm0]
    target_weights = {id(pruned_mods[lp.name].weight) for lp in result.layers}
    params = list(result.model.parameters())
    other_zeros = [_zeros_later(p) for p in params if id(p) not in target_weights]
    fetched = _fetch(pending + other_zeros)
    layers = []
    for i, lp in enumerate(result.layers):
        zeros, diff, norm0 = fetched[3 * i : 3 * i + 3]
        wt = pruned_mods[lp.name].weight
        # The recorded names stay coeffs / zeroed_coeffs / coeff_sparsity (schema.STATS), for every
        # method: users compare them across runs. For magnitude and random they count weights
        # (the record's positions), for dwt coefficients.
        layers.append(
            LayerStats(
                name=lp.name,
                shape=tuple(lp.shape),
                params=lp.params,
                zero_weights=zeros,
                weight_sparsity=_div(zeros, lp.params),
                coeffs=lp.n_positions,
                zeroed_coeffs=lp.n_zeroed,
                coeff_sparsity=lp.fraction,
                rel_l2_error=_div(diff, norm0),
                level_requested=lp.level_requested,
                level_effective=lp.level_effective,
                dense_bytes=lp.params * wt.element_size(),
                stored_bytes=_layer_stored_bytes(
                    lp.n_positions, lp.n_positions - lp.n_zeroed, _value_itemsize(lp, wt)
                ),
            )
        )
    sd = result.model.state_dict()
    pruned_keys = {lp.key for lp in result.layers}
    aliases = shared_keys(sd, pruned_keys)  # a tensor listed under several keys counts once
    dense = sum(t.numel() * t.element_size() for k, t in sd.items() if k not in aliases)
    # The shared encoding: target layers as counted above, every other tensor dense.
    stored = sum(ls.stored_bytes for ls in layers) + sum(
        t.numel() * t.element_size() for k, t in sd.items() if k not in pruned_keys and k not in aliases
    )
    model_params = sum(p.numel() for p in params)
    model_zeros = sum(ls.zero_weights for ls in layers) + sum(fetched[3 * len(result.layers) :])
    tp = sum(ls.params for ls in layers)
    tz = sum(ls.zero_weights for ls in layers)
    nc = sum(ls.coeffs for ls in layers)
    zc = sum(ls.zeroed_coeffs for ls in layers)
    return ModelStats(
        method=result.method,
        layers=layers,
        target_params=tp,
        target_zero_weights=tz,
        weight_sparsity_target=_div(tz, tp),
        model_params=model_params,
        model_zero_weights=model_zeros,
        weight_sparsity_model=_div(model_zeros, model_params),
        coeffs=nc,
        zeroed_coeffs=zc,
        coeff_sparsity=_div(zc, nc),
        dense_bytes=dense,
        stored_bytes=stored,
        compression_ratio=_div(dense, stored),
        mean_rel_l2_error=float(np.mean([ls.rel_l2_error for ls in layers])) if layers else 0.0,
    )
