"""Differentiable multilevel DWT in torch, equal to PyWavelets (and to :mod:`wavesweep.wavelets`).

The torch twin of the PyWavelets codec: same layouts, same :class:`~wavesweep.wavelets.CoeffStructure`,
same flat coefficient order, same crop rule, but computed with torch ops on the tensor's
device, with autograd. Used where
PyWavelets cannot go: fine-tuning ``W = IDWT(c * m)`` (gradients w.r.t. the kept coefficients)
and dwt pruning on the GPU without numpy round trips.

Inverse pairs: :func:`decompose` / :func:`reconstruct`; :func:`structure_of` gives the structure
without transforming anything; :func:`dwt_prune_tensor` is the twin of
:func:`wavesweep.wavelets.dwt_prune_array`; :func:`percentile_threshold` the twin of
:func:`wavesweep.wavelets.percentile_threshold` (bit for bit on CPU).

The filter bank itself (one level, PyWavelets' conventions, two implementations: ``conv`` on
CUDA, ``taps`` on CPU) is :mod:`wavesweep.filterbank`; on CPU, :func:`reconstruct` runs all
levels at once as strided batched GEMMs (:mod:`wavesweep.polyphase`, the ``gemm`` backend), with
an optional keep mask fused in and the coefficients optionally stored positions-major
(:func:`to_positions_major`): what fine-tuning runs every step.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pywt
import torch

from wavesweep import dense, filterbank, polyphase
from wavesweep import wavelets as wv
from wavesweep.names import check_choice

__all__ = [
    "SUPPORTED_MODES",
    "supports",
    "structure_of",
    "decompose",
    "reconstruct",
    "to_positions_major",
    "from_positions_major",
    "percentile_threshold",
    "dwt_prune_tensor",
]

# Every PyWavelets mode; each is tested against PyWavelets in tests/test_wavelets_torch.py.
SUPPORTED_MODES: tuple[str, ...] = (
    "periodization",
    "zero",
    "constant",
    "symmetric",
    "reflect",
    "periodic",
    "smooth",
    "antisymmetric",
    "antireflect",
)


def supports(mode: str) -> bool:
    """True if :func:`decompose`/:func:`reconstruct` reproduce PyWavelets for ``mode``."""
    return mode in SUPPORTED_MODES


# --------------------------------------------------------------------------- structure


def _layout_shape(shape: tuple[int, ...], layout: str) -> tuple[tuple[int, ...], int]:
    """Shape of the layout array and the number of transformed (trailing) axes (1 or 2).

    Same rules and errors as :func:`wavesweep.wavelets.layout_array`, without an array.
    """
    check_choice("layout", layout, wv.LAYOUTS)
    if layout == "kernel":
        if len(shape) != 4:
            raise ValueError(
                f"layout 'kernel' needs a 4-D conv weight (out, in, kh, kw), got shape {shape}; "
                f"use one of: filter, matrix, flat"
            )
        return shape, 2
    if layout == "flat":
        return (math.prod(shape),), 1
    if len(shape) < 2:
        raise ValueError(f"layout {layout!r} needs a weight with ndim >= 2, got shape {shape}; use 'flat'")
    arr = (shape[0], math.prod(shape[1:]))  # (out, in*kh*kw)
    return arr, (1 if layout == "filter" else 2)


def _coeff_len(n: int, f: int, mode: str) -> int:
    """``pywt.dwt_coeff_len``: ceil(N/2) for periodization, floor((N + F - 1)/2) otherwise."""
    return (n + 1) // 2 if mode == "periodization" else (n + f - 1) // 2


@functools.lru_cache(maxsize=4096)
def _structure(shape: tuple[int, ...], wavelet: str, level: int, layout: str, mode: str) -> wv.CoeffStructure:
    check_choice("wavelet", wavelet, wv.WAVELETS)
    check_choice("mode", mode, SUPPORTED_MODES)
    arr, nd = _layout_shape(shape, layout)
    batch, lens = arr[: len(arr) - nd], arr[len(arr) - nd :]
    flen = pywt.Wavelet(wavelet).dec_len
    lev = max(0, min(int(level), min(pywt.dwt_max_level(n, flen) for n in lens)))
    if lev == 0:
        shapes: list[tuple[int, ...]] = [arr]
    else:
        details = []
        for _ in range(lev):
            lens = tuple(_coeff_len(n, flen, mode) for n in lens)
            details.append([batch + lens] * (3 if nd == 2 else 1))
        # [cA_n, details_n, ..., details_1]
        shapes = [batch + lens] + [s for d in reversed(details) for s in d]
    return wv.CoeffStructure(
        layout=layout, wavelet=wavelet, mode=mode, level=lev, shape=shape, array_shape=arr, shapes=tuple(shapes)
    )


def structure_of(shape: tuple[int, ...], *, wavelet: str, level: int, layout: str, mode: str) -> wv.CoeffStructure:
    """The :class:`~wavesweep.wavelets.CoeffStructure` that :func:`wavesweep.wavelets.decompose`
    returns for a weight of ``shape``: same effective level (``level`` clamped to
    ``pywt.dwt_max_level`` of the transformed axes), same coefficient shapes. No transform runs.

    Raises ``ValueError`` for an unknown wavelet, layout or unsupported mode, or a shape the
    layout cannot take.
    """
    if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or level < 0:
        raise ValueError(f"level must be an int >= 0, got {level!r}")
    return _structure(tuple(int(s) for s in shape), wavelet, int(level), layout, mode)


# --------------------------------------------------------------------------- decompose / reconstruct

def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    if not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"expected a real floating-point tensor, got dtype {dtype}")
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _nd(structure: wv.CoeffStructure) -> int:
    return structure.ndim


def uses_dense(structure: wv.CoeffStructure, device: torch.device) -> bool:
    """True where :func:`decompose` / :func:`reconstruct` run as one matrix product
    (:mod:`wavesweep.dense`): on an accelerator, for rows short enough."""
    return filterbank.dense_backend(device) and dense.applies(structure)


def decompose(w: torch.Tensor, structure: wv.CoeffStructure) -> torch.Tensor:
    """Multilevel DWT of ``w`` (shape ``structure.shape``): the flat coefficient vector.

    Same length (``structure.n_coeffs``) and order as :func:`wavesweep.wavelets.decompose`:
    ``[cA_n, cD_n, ..., cD_1]`` (1-D) or ``[cA_n, cH_n, cV_n, cD_n, ..., cD_1]`` (2-D), each band
    raveled in C order. dtype and device of ``w``; differentiable. Each level is computed for
    all rows/kernels at once (no Python loop over them).
    """
    if tuple(w.shape) != tuple(structure.shape):
        raise ValueError(f"weight shape {tuple(w.shape)} does not match structure shape {structure.shape}")
    check_choice("mode", structure.mode, SUPPORTED_MODES)
    out_dtype = w.dtype
    x = w.to(_compute_dtype(w.dtype))
    if structure.level == 0:
        return x.reshape(-1).to(out_dtype)
    if uses_dense(structure, x.device):  # one GEMM (an accelerator, rows short enough)
        return dense.decompose(x, structure).to(out_dtype)
    nd = _nd(structure)
    arr = structure.array_shape
    x = x.reshape((-1,) + arr[len(arr) - nd :])  # (B, N) or (B, H, W); B = rows / kernels / 1
    details = []
    for _ in range(structure.level):
        bands = filterbank.dwt_level(x, nd, structure.wavelet, structure.mode)  # 2**nd tensors (B, *L)
        x = bands[0]
        # flat order per level: cD (1-D) or cH, cV, cD = (da, ad, dd) (2-D), each over all of B
        details.append([bands[1]] if nd == 1 else [bands[2], bands[1], bands[3]])
    flat = torch.cat([x.reshape(-1)] + [b.reshape(-1) for lv in reversed(details) for b in lv])
    return flat.to(out_dtype)


def reconstruct(
    flat: torch.Tensor,
    structure: wv.CoeffStructure,
    *,
    keep: torch.Tensor | None = None,
    positions_major: bool = False,
) -> torch.Tensor:
    """Inverse of :func:`decompose`: inverse DWT of ``flat``, cropped to ``structure.shape``.

    Same crop rules as :func:`wavesweep.wavelets.reconstruct` (an approximation one sample longer
    than the next detail band is cropped, as ``pywt.waverec`` does; the result is cropped to the
    layout array). dtype and device of ``flat``; differentiable w.r.t. ``flat``.

    ``keep``: a mask over the coefficients (bool, or 0/1 in any float dtype: no cast per call when
    it is already in ``flat``'s compute dtype); if given, the inverse DWT of ``flat * keep``
    (gradient ``keep * ...``: 0 for the dropped coefficients), the product fused into the
    synthesis on CPU. ``positions_major``: ``flat`` and ``keep`` are in the order of
    :func:`to_positions_major` (each band transposed), the CPU synthesis' own order: no transpose
    per call. Both are what fine-tuning ``W = IDWT(c * m)`` runs every step.
    """
    if flat.ndim != 1 or flat.numel() != structure.n_coeffs:
        raise ValueError(f"expected {structure.n_coeffs} coefficients, got tensor of shape {tuple(flat.shape)}")
    if keep is not None and tuple(keep.shape) != tuple(flat.shape):
        raise ValueError(f"keep must have the shape of the coefficients {tuple(flat.shape)}, got {tuple(keep.shape)}")
    check_choice("mode", structure.mode, SUPPORTED_MODES)
    out_dtype = flat.dtype
    flat = flat.to(_compute_dtype(flat.dtype))
    if keep is not None:
        keep = keep.to(device=flat.device, dtype=flat.dtype)  # a bool mask costs a cast here
    nd = _nd(structure)
    if uses_dense(structure, flat.device):  # one GEMM; positions-major is a CPU order, never used here
        return dense.reconstruct(flat, structure, keep=keep).to(out_dtype)
    if structure.level > 0 and filterbank.synthesis_backend(flat.device) == "gemm":  # all levels at once
        if not positions_major:
            flat = polyphase.reorder(flat, structure, nd, to_positions_major=True)
            keep = None if keep is None else polyphase.reorder(keep, structure, nd, to_positions_major=True)
        return polyphase.synthesize(flat, structure, nd, keep).reshape(structure.shape).to(out_dtype)
    if positions_major and structure.level > 0:
        flat = from_positions_major(flat, structure)
        keep = None if keep is None else from_positions_major(keep, structure)
    if keep is not None:
        flat = flat * keep
    if structure.level == 0:
        return flat.reshape(structure.shape).to(out_dtype)
    bands = list(torch.split(flat, structure.sizes))
    per_level = 1 if nd == 1 else 3
    a = bands[0].reshape((-1,) + structure.shapes[0][len(structure.shapes[0]) - nd :])  # (B, *L)
    for i in range(1, len(bands), per_level):
        shp = structure.shapes[i][len(structure.shapes[i]) - nd :]
        d = [b.reshape((-1,) + shp) for b in bands[i : i + per_level]]  # (B, *L) each
        a = a[(slice(None),) + tuple(slice(0, n) for n in shp)]  # waverec's crop of a one-longer approx
        # _idwt band order: 1-D (a, cD); 2-D (aa, ad, da, dd) = (a, cV, cH, cD)
        a = filterbank.idwt_level([a] + d if nd == 1 else [a, d[1], d[0], d[2]], nd, structure.wavelet, structure.mode)
    arr = structure.array_shape
    a = a[(slice(None),) + tuple(slice(0, n) for n in arr[len(arr) - nd :])]
    return a.reshape(structure.shape).to(out_dtype)


def to_positions_major(flat: torch.Tensor, structure: wv.CoeffStructure) -> torch.Tensor:
    """``flat`` (coefficients, or a mask over them, in the order of :func:`decompose`) in the
    positions-major order: each band (B, *L) stored transposed, 1-D as (L, B), 2-D (B, H, W) as
    (W, B, H); level 0 unchanged. The order in which the CPU synthesis reads and writes the bands
    without transposing them (``reconstruct(..., positions_major=True)``); a differentiable copy."""
    return polyphase.reorder(flat, structure, _nd(structure), to_positions_major=True)


def from_positions_major(flat: torch.Tensor, structure: wv.CoeffStructure) -> torch.Tensor:
    """Inverse of :func:`to_positions_major`: back to the order of :func:`decompose`."""
    return polyphase.reorder(flat, structure, _nd(structure), to_positions_major=False)


# --------------------------------------------------------------------------- thresholds and pruning


def _order_statistics(a: torch.Tensor, k: int, *, by_sort: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The (k+1)-th and (k+2)-th smallest values of ``a`` (1-D, k + 2 <= numel), as 0-dim tensors.

    Order statistics are exact whatever finds them: ``by_sort`` takes them from one sort (a
    radix sort on a GPU), else one ``kthvalue`` and two elementwise passes (the CPU's path). On an
    H200, ``kthvalue`` took 2.2 ms per ResNet-50 conv, 77 % of dwt pruning's GPU time
    (``bench/profile_cuda.py``); the sort's time there is still to be measured. Both give the
    same values (tested)."""
    if by_sort:
        s = torch.sort(a).values
        return s[k], s[k + 1]
    lo = torch.kthvalue(a, k + 1).values
    # the (k+2)-th smallest: lo again if it is tied that often, else the least value above it
    # (two elementwise passes, cheaper than a second selection; no host sync)
    above = torch.where(a > lo, a, torch.full_like(lo, math.inf)).min()
    return lo, torch.where((a <= lo).sum() >= k + 2, lo, above)


def percentile_threshold(abs_coeffs: torch.Tensor, percentile: float) -> torch.Tensor:
    """``numpy.percentile(abs_coeffs, percentile)`` (method 'linear') as a 0-dim tensor on the same device.

    The two order statistics around numpy's virtual index come from one ``torch.kthvalue`` (no
    size limit, unlike ``torch.quantile``) and two elementwise passes on CPU, from one sort on
    an accelerator (:func:`_order_statistics`), then numpy's
    interpolation formula (``_lerp``) in the
    tensor's dtype, with the weight rounded to that dtype as numpy does for a Python float. On
    CPU this equals :func:`wavesweep.wavelets.percentile_threshold` bit for bit for float32 and
    float64 (``tests/test_wavelets_torch.py``). Empty input: 0.0. Any NaN: NaN. Non-float
    input is computed in float64 (as ``np.percentile`` does).
    """
    p = wv.validate_percentile(percentile)
    a = abs_coeffs.detach().reshape(-1)
    if not a.dtype.is_floating_point:
        a = a.to(torch.float64)
    n = a.numel()
    if n == 0:
        return torch.zeros((), dtype=a.dtype, device=a.device)
    virtual = float((n - 1) * np.true_divide(p, 100))  # numpy's 'linear' virtual index
    if n < 2 or virtual >= n - 1:
        out = a.max()
    else:
        k = math.floor(virtual)
        gamma = virtual - k
        lo, hi = _order_statistics(a, k, by_sort=a.device.type != "cpu")
        diff = hi - lo
        # the weight as a 0-dim tensor of a's dtype made by torch.full (a fill kernel on a GPU):
        # torch.tensor(x, device=...) copies from the host and waits for the device (a sync per layer)
        if gamma >= 0.5:
            out = hi - diff * torch.full((), 1 - gamma, dtype=a.dtype, device=a.device)
        else:
            out = lo + diff * torch.full((), gamma, dtype=a.dtype, device=a.device)
    return torch.where(torch.isnan(a).any(), torch.full_like(out, math.nan), out)


def _threshold_tensor(threshold, like: torch.Tensor) -> torch.Tensor:
    """The threshold as the comparison operand numpy would use against ``like``'s dtype.

    A Python float is weak (compared in the coefficients' dtype, NEP 50); a numpy scalar or a
    tensor keeps its own precision (compared in the promoted dtype).
    """
    if isinstance(threshold, torch.Tensor):
        return threshold.detach().to(device=like.device, dtype=torch.promote_types(threshold.dtype, like.dtype))
    dt = like.dtype
    if isinstance(threshold, np.generic):
        dt = torch.promote_types(torch.from_numpy(np.asarray(threshold)).dtype, like.dtype)
    # made on the host (a value beyond the dtype's range rounds to inf, as numpy's comparison
    # operand does; torch.full would raise), then copied without waiting for the device
    return torch.tensor(float(threshold), dtype=dt).to(like.device, non_blocking=True)


def dwt_prune_tensor(
    w: torch.Tensor,
    *,
    wavelet: str,
    level: int,
    layout: str,
    mode: str = wv.DEFAULT_MODE,
    percentile: float | None = None,
    keep_approx: bool = False,
    threshold: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, wv.CoeffStructure]:
    """Torch twin of :func:`wavesweep.wavelets.dwt_prune_array`, on ``w``'s device, no numpy.

    Decompose, zero the coefficients with |c| strictly below the threshold (``threshold`` if
    given, else the ``percentile`` of this tensor's |coefficients|, the approximation band left
    out with ``keep_approx``), reconstruct. Runs without autograd (a pruning step; train through
    :func:`decompose`/:func:`reconstruct`).

    Returns ``(w_rec, coeffs, keep, structure)``: the reconstructed weight (shape and dtype of
    ``w``), the thresholded flat coefficients (+0.0 where dropped), the bool keep mask over them,
    and the coefficient structure.
    """
    st = structure_of(tuple(w.shape), wavelet=wavelet, level=level, layout=layout, mode=mode)
    with torch.no_grad():
        coeffs = decompose(w.detach(), st)
        n_approx = st.n_approx if keep_approx else 0
        mag = coeffs.abs()
        if threshold is None:
            if percentile is None:
                raise ValueError("give a percentile or a threshold")
            thr = percentile_threshold(mag[n_approx:], percentile)
        else:
            thr = _threshold_tensor(threshold, mag)
        keep = mag >= thr
        keep[:n_approx] = True
        coeffs = coeffs.masked_fill(~keep, 0)
        return reconstruct(coeffs, st), coeffs, keep, st
