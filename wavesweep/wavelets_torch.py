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

Autograd: first derivatives on every backend (what fine-tuning needs). The CPU defaults
(``taps`` analysis, ``gemm`` synthesis) are ``once_differentiable``: a second derivative through
them is an error; the ``conv`` and ``dense`` backends also give second derivatives.
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
    "percentile_threshold_rows",
    "dwt_prune_tensor",
    "STACKING_LAYOUTS",
    "decompose_stacked",
    "reconstruct_stacked",
    "prune_coefficient_rows",
    "dwt_prune_tensors",
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
    wv.check_wavelet(wavelet)
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
    if uses_dense(structure, flat.device):  # one GEMM, in decompose's order (fine-tuning never asks for the other here)
        if positions_major and structure.level > 0:
            flat = from_positions_major(flat, structure)
            keep = None if keep is None else from_positions_major(keep, structure)
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
    """The (k+1)-th and (k+2)-th smallest values of each row of ``a`` (``(L, n)``, k + 2 <= n),
    as ``(L,)`` tensors.

    Order statistics are exact whatever finds them: ``by_sort`` takes them from one sort (a
    radix sort on a GPU), else one ``kthvalue`` and two elementwise passes (the CPU's path). On an
    H200, ``kthvalue`` took 2.2 ms per ResNet-50 conv, 77 % of dwt pruning's GPU time
    (``bench/profile_cuda.py``); the sort's time there is still to be measured. Both give the
    same values (tested)."""
    if by_sort:
        s = torch.sort(a, dim=-1).values
        return s[:, k], s[:, k + 1]
    lo = torch.kthvalue(a, k + 1, dim=-1).values
    # the (k+2)-th smallest: lo again if it is tied that often, else the least value above it
    # (two elementwise passes, cheaper than a second selection; no host sync)
    above = torch.where(a > lo[:, None], a, torch.full_like(lo[:, None], math.inf)).amin(dim=-1)
    return lo, torch.where((a <= lo[:, None]).sum(dim=-1) >= k + 2, lo, above)


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
    return percentile_threshold_rows(abs_coeffs.detach().reshape(1, -1), percentile)[0]


def percentile_threshold_rows(abs_coeffs: torch.Tensor, percentile: float) -> torch.Tensor:
    """:func:`percentile_threshold` of each row of ``abs_coeffs`` (``(L, n)``) at once: ``(L,)``.

    Row by row the same operations (one sort or ``kthvalue`` along the rows for all of them),
    so each row's threshold is the one :func:`percentile_threshold` gives it alone, bit for bit
    (tested): what :func:`dwt_prune_tensors` uses for layers of one shape.
    """
    p = wv.validate_percentile(percentile)
    a = abs_coeffs.detach()
    if a.ndim != 2:
        raise ValueError(f"expected (rows, n) values, got shape {tuple(a.shape)}")
    if not a.dtype.is_floating_point:
        a = a.to(torch.float64)
    rows, n = a.shape
    if n == 0:
        return torch.zeros(rows, dtype=a.dtype, device=a.device)
    virtual = float((n - 1) * np.true_divide(p, 100))  # numpy's 'linear' virtual index
    if n < 2 or virtual >= n - 1:
        out = a.amax(dim=-1)
    else:
        k = math.floor(virtual)
        gamma = virtual - k
        lo, hi = _order_statistics(a, k, by_sort=a.device.type != "cpu")
        diff = hi - lo
        # the weight as a Python number: rounded to a's dtype inside the product (a float32 tensor
        # times a Python float computes in float32 on CPU and CUDA alike), as numpy rounds a Python
        # float (NEP 50); no tensor made for it (torch.tensor(x, device=...) would wait for the device)
        if gamma >= 0.5:
            out = hi - diff * (1 - gamma)
        else:
            out = lo + diff * gamma
    return torch.where(torch.isnan(a).any(dim=-1), torch.full_like(out, math.nan), out)


def _threshold_tensor(threshold, like: torch.Tensor) -> torch.Tensor:
    """The threshold as the comparison operand numpy would use against ``like``'s dtype.

    A Python float is weak (compared in the coefficients' dtype, NEP 50); a numpy scalar or a
    tensor keeps its own precision (compared in the promoted dtype). The operand has at least one
    dimension: torch's promotion gives a 0-dim tensor no say against a dimensioned one, so a 0-dim
    float64 threshold was rounded to float32 coefficients' dtype before the comparison.
    """
    if isinstance(threshold, torch.Tensor):
        t = threshold.detach().to(device=like.device, dtype=torch.promote_types(threshold.dtype, like.dtype))
        return t.reshape(1) if t.dim() == 0 else t
    dt = like.dtype
    if isinstance(threshold, np.generic):
        dt = torch.promote_types(torch.from_numpy(np.asarray(threshold)).dtype, like.dtype)
    # made on the host (a value beyond the dtype's range rounds to inf, as numpy's comparison
    # operand does; torch.full would raise), then copied without waiting for the device
    return torch.tensor([float(threshold)], dtype=dt).to(like.device, non_blocking=True)


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
    and the coefficient structure. :func:`dwt_prune_tensors` with one tensor.
    """
    rec, coeffs, keep, st = dwt_prune_tensors([w], wavelet=wavelet, level=level, layout=layout, mode=mode,
                                              percentile=percentile, keep_approx=keep_approx, threshold=threshold)  # fmt: skip
    return rec[0], coeffs[0], keep[0], st


# --------------------------------------------------------------------------- several layers of one shape at once

#: layouts transformed row by row (a filter, a kernel): weights of one shape stack along their
#: first axis into one transform, whose rows are theirs
STACKING_LAYOUTS: tuple[str, ...] = ("filter", "kernel")


def _stacked_structure(structure: wv.CoeffStructure, n: int) -> wv.CoeffStructure:
    """The structure of ``n`` weights of ``structure.shape`` concatenated along their first axis."""
    if structure.layout not in STACKING_LAYOUTS:
        raise ValueError(f"layout {structure.layout!r} transforms a weight as a whole; stacking needs one of: "
                         f"{', '.join(STACKING_LAYOUTS)}")  # fmt: skip
    shape = (n * structure.shape[0],) + tuple(structure.shape[1:])
    big = structure_of(shape, wavelet=structure.wavelet, level=structure.level, layout=structure.layout, mode=structure.mode)
    assert big.level == structure.level, (big.level, structure.level)  # the level depends on a row's length only
    return big


def decompose_stacked(ws: list[torch.Tensor], structure: wv.CoeffStructure) -> torch.Tensor:
    """The coefficients of several weights of ``structure.shape`` as rows ``(L, n)``, row ``i``
    the flat vector :func:`decompose` gives ``ws[i]``. In a layout of :data:`STACKING_LAYOUTS`
    one transform runs for all of them (their rows stacked; each band then splits into ``L``
    consecutive blocks); a single weight is :func:`decompose` itself."""
    if len(ws) == 1:
        return decompose(ws[0], structure).reshape(1, -1)
    for w in ws:  # each a weight of the structure's shape, all of one dtype: reshaped, another would be transformed along wrong rows
        if tuple(w.shape) != tuple(structure.shape) or w.dtype != ws[0].dtype:
            raise ValueError(f"weights stacked need the structure's shape {tuple(structure.shape)} and one dtype; "
                             f"got {tuple(w.shape)} {w.dtype} beside {tuple(ws[0].shape)} {ws[0].dtype}")  # fmt: skip
    big = _stacked_structure(structure, len(ws))
    x = torch.cat([w.reshape(structure.shape) for w in ws])
    if big.level > 0 and uses_dense(big, x.device):  # one product and one gather for all of them
        out_dtype = x.dtype
        rows = dense.decompose(x.to(_compute_dtype(x.dtype)), big, rows=True)  # (L * B, n), weight after weight
        return dense.rows_to_stacked(rows, structure, len(ws)).to(out_dtype)
    flat = decompose(x, big)
    return torch.cat([band.reshape(len(ws), n) for band, n in zip(torch.split(flat, big.sizes), structure.sizes)], dim=1)


def reconstruct_stacked(rows: torch.Tensor, structure: wv.CoeffStructure) -> torch.Tensor:
    """Inverse of :func:`decompose_stacked`: ``(L, n)`` coefficient rows -> ``(L, *structure.shape)``."""
    if rows.shape[0] == 1:
        return reconstruct(rows[0], structure).unsqueeze(0)
    if rows.dim() != 2 or rows.shape[1] != structure.n_coeffs:
        raise ValueError(f"expected coefficient rows (L, {structure.n_coeffs}), got tensor of shape {tuple(rows.shape)}")
    big = _stacked_structure(structure, rows.shape[0])
    if big.level > 0 and uses_dense(big, rows.device):  # one gather and one product for all of them
        out_dtype = rows.dtype
        c = dense.stacked_to_rows(rows.to(_compute_dtype(rows.dtype)), structure)
        return dense.reconstruct(c, big, rows=True).reshape((rows.shape[0],) + tuple(structure.shape)).to(out_dtype)
    flat = torch.cat([part.reshape(-1) for part in torch.split(rows, structure.sizes, dim=1)])
    return reconstruct(flat, big).reshape((rows.shape[0],) + tuple(structure.shape))


def prune_coefficient_rows(
    coeffs: torch.Tensor,
    structure: wv.CoeffStructure,
    *,
    percentile: float | None = None,
    keep_approx: bool = False,
    threshold: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Threshold coefficient rows (:func:`decompose_stacked`) and reconstruct: each row at its own
    ``percentile`` (:func:`percentile_threshold_rows`, the approximation band left out with
    ``keep_approx``) or all at ``threshold``. Returns ``(weights (L, *shape), thresholded
    coefficients (L, n), keep (L, n))``."""
    with torch.no_grad():
        n_approx = structure.n_approx if keep_approx else 0
        mag = coeffs.abs()
        if threshold is None:
            if percentile is None:
                raise ValueError("give a percentile or a threshold")
            thr = percentile_threshold_rows(mag[:, n_approx:], percentile)[:, None]
        else:
            thr = _threshold_tensor(threshold, mag)
        keep = mag >= thr
        if n_approx:
            keep[:, :n_approx] = True
        coeffs = coeffs.where(keep, 0)  # masked_fill(~keep, 0) in one kernel
        return reconstruct_stacked(coeffs, structure), coeffs, keep


def dwt_prune_tensors(
    ws: list[torch.Tensor],
    *,
    wavelet: str,
    level: int,
    layout: str,
    mode: str = wv.DEFAULT_MODE,
    percentile: float | None = None,
    keep_approx: bool = False,
    threshold: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, wv.CoeffStructure]:
    """:func:`dwt_prune_tensor` of several weights of one shape, dtype and device at once (more
    than one: a layout of :data:`STACKING_LAYOUTS`), each at its own percentile: one transform,
    one sort and one inverse for all of them, where a GPU would wait on the launches of one per
    weight. Returns ``(weights (L, *shape), coeffs (L, n), keep (L, n), structure)``: row ``i``
    equals what :func:`dwt_prune_tensor` gives ``ws[i]`` alone to float tolerance (tested; bit
    for bit where the transform's products do not depend on how many rows they get)."""
    if not ws:
        raise ValueError("no weights to prune")
    w0 = ws[0]
    for w in ws[1:]:
        if w.shape != w0.shape or w.dtype != w0.dtype or w.device != w0.device:
            raise ValueError(f"weights pruned together need one shape, dtype and device: {tuple(w0.shape)} {w0.dtype} "
                             f"{w0.device} and {tuple(w.shape)} {w.dtype} {w.device}")  # fmt: skip
    st = structure_of(tuple(w0.shape), wavelet=wavelet, level=level, layout=layout, mode=mode)
    with torch.no_grad():
        coeffs = decompose_stacked([w.detach() for w in ws], st)
    return (*prune_coefficient_rows(coeffs, st, percentile=percentile, keep_approx=keep_approx, threshold=threshold), st)
