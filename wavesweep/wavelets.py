"""Wavelet codec for one weight tensor: view it in a layout, decompose, threshold, reconstruct.

Inverse pairs, as in ``pywt/_multilevel.py``: :func:`decompose` / :func:`reconstruct`
turn a weight array into one flat coefficient vector plus its :class:`CoeffStructure`
and back. :func:`dwt_prune_array` is the dwt pruning step for one tensor.

Layouts (how a weight tensor of shape ``(out, in, kh, kw)`` or ``(out, in)`` is seen):

========== ================================================ ==========================
layout     array given to PyWavelets                         transform
========== ================================================ ==========================
``kernel`` the 4-D tensor itself                             ``wavedec2`` over axes (-2, -1), one call
``filter`` ``(out, in*kh*kw)``: one row per output filter    ``wavedec`` over axis -1, one call
``matrix`` ``(out, in*kh*kw)``                               ``wavedec2`` over axes (0, 1)
``flat``   ``(out*in*kh*kw,)``                               ``wavedec``
========== ================================================ ==========================

``kernel`` needs a 4-D (conv) weight; the other layouts accept any tensor with ``ndim >= 2``
(``flat`` accepts any tensor). ``nn.Linear`` weights ``(out, in)`` are their own matrix.

Coefficient order (the flat vector, also the order of the on-disk bitmap): the arrays of
``pywt.wavedec``/``wavedec2`` in the order PyWavelets returns them,
``[cA_n, cD_n, ..., cD_1]`` (1-D) or ``[cA_n, (cH_n, cV_n, cD_n), ..., (cH_1, cV_1, cD_1)]``
(2-D), each raveled in C order. The first ``CoeffStructure.n_approx`` entries are the
approximation band. With an effective level of 0 the "transform" is the identity: the
flat vector is the layout array itself and it all counts as the approximation band.

Reconstruction accuracy: float32 round trips are exact to float32 rounding for every
discrete wavelet except ``dmey``, a truncated FIR approximation of the Meyer wavelet that is
not a perfect-reconstruction filter bank (~1e-2 relative error even with nothing zeroed;
PyWavelets leaves it out of its own round-trip tests). Its error shows up in ``rel_l2_error``.

Levels: the requested level is clamped to ``pywt.dwt_max_level`` of the transformed axes
(the minimum over both axes for 2-D transforms). The clamp is computed here
(:func:`effective_level`); the pruning step warns (:class:`LevelClampedWarning`) and records it.
"""

from __future__ import annotations

import functools
import logging
import math
import numbers
import re
import warnings
from dataclasses import dataclass

import numpy as np
import pywt

from wavesweep.names import check_choice, close_matches

log = logging.getLogger(__name__)

WAVELETS: tuple[str, ...] = tuple(pywt.wavelist(kind="discrete"))
MODES: tuple[str, ...] = tuple(pywt.Modes.modes)
LAYOUTS: tuple[str, ...] = ("kernel", "filter", "matrix", "flat")
DEFAULT_MODE = "periodization"
MAX_LEVEL = 5

__all__ = [
    "WAVELETS",
    "MODES",
    "LAYOUTS",
    "DEFAULT_MODE",
    "MAX_LEVEL",
    "LevelClampedWarning",
    "StructuralZerosWarning",
    "CoeffStructure",
    "structural_zeros",
    "check_wavelet",
    "validate_dwt_args",
    "layout_array",
    "effective_level",
    "decompose",
    "reconstruct",
    "percentile_threshold",
    "keep_mask",
    "zero_dropped",
    "dwt_prune_array",
]


class LevelClampedWarning(UserWarning):
    """The effective decomposition level of a layer is lower than the requested level."""


class StructuralZerosWarning(UserWarning):
    """Some coefficient positions of a layer are zero whatever its weights (see :func:`structural_zeros`)."""


def is_real(x: object) -> bool:
    """A real number (Python or NumPy int or float), not a bool."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def validate_percentile(percentile: object) -> float:
    """Return ``percentile`` as a float, or raise ``ValueError`` unless it is a number in [0, 100]."""
    if not is_real(percentile) or not (0.0 <= float(percentile) <= 100.0):  # NaN fails too
        raise ValueError(f"percentile must be a number in [0, 100], got {percentile!r}")
    return float(percentile)


def validate_level(level: object) -> int:
    """Return ``level``, or raise ``ValueError`` unless it is an int in 1..MAX_LEVEL."""
    if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or not 1 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be an int in 1..{MAX_LEVEL}, got {level!r}")
    return int(level)


def _array_level(level: object) -> int:
    """``level`` of the array functions (:func:`decompose`, :func:`effective_level`,
    :func:`dwt_prune_array`): an int in 0..MAX_LEVEL (0: the identity transform); else a one-line
    ``ValueError`` (a level above MAX_LEVEL gave a structure :meth:`CoeffStructure.from_json`
    refuses; a negative or fractional one was taken silently)."""
    if not isinstance(level, (int, np.integer)) or isinstance(level, bool) or not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"level must be an int in 0..{MAX_LEVEL}, got {level!r}")
    return int(level)


def _wavelet_choices() -> str:
    """Every name of :data:`WAVELETS`, in its order, runs of consecutive numbers shortened (``db1..db38``)."""
    parts: list[str] = []
    run: list[tuple[str, int]] = []  # (family, number) of the names in the current run
    for name in WAVELETS + ("",):
        m = re.fullmatch(r"([a-z]+)(\d+)", name)
        if run and not (m and m[1] == run[-1][0] and int(m[2]) == run[-1][1] + 1):
            first, last = f"{run[0][0]}{run[0][1]}", f"{run[-1][0]}{run[-1][1]}"
            parts.append(first if len(run) == 1 else f"{first}, {last}" if len(run) == 2 else f"{first}..{last}")
            run = []
        if m:
            run.append((m[1], int(m[2])))
        elif name:
            parts.append(name)
    return ", ".join(parts)


def check_wavelet(wavelet: object) -> None:
    """Raise a one-line ``ValueError`` unless ``wavelet`` is in :data:`WAVELETS`: it names the value,
    says so if PyWavelets knows it as a continuous wavelet (``morl``, ``cmor1.5-1.0``: no DWT), and
    lists every valid name (runs such as ``db1..db38`` shortened)."""
    if wavelet in WAVELETS:
        return
    why = ""
    if isinstance(wavelet, str):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyWavelets warns about 'cmor' without its parameters
            try:
                if isinstance(pywt.DiscreteContinuousWavelet(wavelet), pywt.ContinuousWavelet):
                    why = " (a continuous wavelet: the DWT needs a discrete one)"
            except (ValueError, TypeError):
                pass
    close = close_matches(wavelet, WAVELETS)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    raise ValueError(f"unknown wavelet {wavelet!r}{why}; valid: {_wavelet_choices()}{hint}")


def validate_dwt_args(*, wavelet: str, level: int, layout: str, mode: str, percentile: float) -> None:
    """Raise a one-line ``ValueError`` naming the bad value and the valid choices, if any argument is bad."""
    check_wavelet(wavelet)
    check_choice("mode", mode, MODES)
    check_choice("layout", layout, LAYOUTS)
    validate_level(level)
    validate_percentile(percentile)


@dataclass(frozen=True)
class CoeffStructure:
    """Everything needed to turn a flat coefficient vector back into a weight array.

    ``shape``: original weight shape. ``array_shape``: the layout array given to the DWT.
    ``shapes``: the shape of every coefficient array, in flat-vector order.
    ``level``: effective level (0 = identity).
    """

    layout: str
    wavelet: str
    mode: str
    level: int
    shape: tuple[int, ...]
    array_shape: tuple[int, ...]
    shapes: tuple[tuple[int, ...], ...]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def n_coeffs(self) -> int:
        """Total number of coefficients (> number of weights for expansive modes / odd lengths)."""
        return sum(self.sizes)

    @property
    def ndim(self) -> int:
        """Transformed (trailing) axes of the layout array: 1 (``filter``, ``flat``) or 2."""
        return 1 if self.layout in ("filter", "flat") else 2

    @property
    def n_approx(self) -> int:
        """Number of coefficients in the approximation band (the first entries of the flat vector)."""
        return self.sizes[0]

    def to_json(self) -> dict:
        return {
            "layout": self.layout,
            "wavelet": self.wavelet,
            "mode": self.mode,
            "level": self.level,
            "shape": list(self.shape),
            "array_shape": list(self.array_shape),
            "coeff_shapes": [list(s) for s in self.shapes],
        }

    @classmethod
    def from_json(cls, d: dict) -> "CoeffStructure":
        """Inverse of :meth:`to_json`; validates names and shapes (``ValueError`` on anything odd)."""
        try:
            check_choice("layout", d["layout"], LAYOUTS)
            check_wavelet(d["wavelet"])
            check_choice("mode", d["mode"], MODES)
            level = d["level"]
            if not isinstance(level, int) or isinstance(level, bool) or not 0 <= level <= MAX_LEVEL:
                raise ValueError(f"bad level {level!r}")

            def shp(x: object) -> tuple[int, ...]:
                if not isinstance(x, list) or not all(isinstance(i, int) and i >= 0 for i in x):
                    raise ValueError(f"bad shape {x!r}")
                return tuple(x)

            return cls(
                layout=d["layout"],
                wavelet=d["wavelet"],
                mode=d["mode"],
                level=level,
                shape=shp(d["shape"]),
                array_shape=shp(d["array_shape"]),
                shapes=tuple(shp(s) for s in d["coeff_shapes"]),
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"bad coefficient structure {d!r}: {e!r}") from None


def layout_array(w: np.ndarray, layout: str) -> tuple[np.ndarray, tuple[int, ...]]:
    """View ``w`` as the layout's array; return ``(array, transformed axes)``.

    kernel: (out, in, kh, kw), axes (-2, -1); filter: (out, in*kh*kw), axis (-1,);
    matrix: (out, in*kh*kw), axes (-2, -1); flat: (numel,), axis (-1,).
    """
    check_choice("layout", layout, LAYOUTS)
    if layout == "kernel":
        if w.ndim != 4:
            raise ValueError(
                f"layout 'kernel' needs a 4-D conv weight (out, in, kh, kw), got shape {tuple(w.shape)}; "
                f"use one of: filter, matrix, flat"
            )
        return w, (-2, -1)
    if layout == "flat":
        return w.reshape(-1), (-1,)
    if w.ndim < 2:
        raise ValueError(f"layout {layout!r} needs a weight with ndim >= 2, got shape {tuple(w.shape)}; use 'flat'")
    arr = w.reshape(w.shape[0], math.prod(w.shape[1:]))  # (out, in*kh*kw); explicit, as out may be 0
    return arr, ((-1,) if layout == "filter" else (-2, -1))


def _max_level(array_shape: tuple[int, ...], axes: tuple[int, ...], wavelet: str) -> int:
    dec_len = pywt.Wavelet(wavelet).dec_len
    return min(pywt.dwt_max_level(array_shape[a], dec_len) for a in axes)


def effective_level(shape: tuple[int, ...], wavelet: str, level: int, layout: str) -> int:
    """Requested ``level`` clamped to ``pywt.dwt_max_level`` of the layout's transformed axes.

    The minimum over both axes for 2-D layouts. May be 0 (identity transform), e.g. a 3x3
    kernel with ``bior4.4`` in the ``kernel`` layout. Does not warn; the pruning step does.
    """
    check_wavelet(wavelet)
    level = _array_level(level)
    arr, axes = layout_array(np.empty(tuple(shape), dtype=np.uint8), layout)
    return max(0, min(level, _max_level(arr.shape, axes, wavelet)))


def _float_array(w: np.ndarray) -> np.ndarray:
    # PyWavelets computes in float32 for float32 and float64 for float64; everything else goes via float32.
    return w if w.dtype in (np.float32, np.float64) else w.astype(np.float32)


def decompose(
    w: np.ndarray, *, wavelet: str, level: int, layout: str, mode: str = DEFAULT_MODE
) -> tuple[np.ndarray, CoeffStructure]:
    """Multilevel DWT of ``w`` in ``layout``: return ``(flat coefficients, structure)``.

    ``level`` is clamped with :func:`effective_level` (``structure.level`` is what was used).
    The flat vector has ``structure.n_coeffs`` entries (see the module docstring for order)
    and the dtype PyWavelets computes in (float32 for float32 input). One PyWavelets call
    per tensor: the batch axes (filters, kernels) are vectorised by PyWavelets itself.
    """
    check_wavelet(wavelet)
    check_choice("mode", mode, MODES)
    level = _array_level(level)
    w = _float_array(np.asarray(w))
    arr, axes = layout_array(w, layout)
    lev = max(0, min(level, _max_level(arr.shape, axes, wavelet)))
    if lev == 0:
        arrays = [arr]
    elif len(axes) == 1:
        arrays = pywt.wavedec(arr, wavelet, mode=mode, level=lev, axis=-1)
    else:
        c = pywt.wavedec2(arr, wavelet, mode=mode, level=lev, axes=(-2, -1))
        arrays = [c[0]] + [band for detail in c[1:] for band in detail]
    flat = np.concatenate([a.ravel() for a in arrays])
    structure = CoeffStructure(
        layout=layout,
        wavelet=wavelet,
        mode=mode,
        level=lev,
        shape=tuple(int(s) for s in w.shape),
        array_shape=tuple(int(s) for s in arr.shape),
        shapes=tuple(tuple(int(s) for s in a.shape) for a in arrays),
    )
    return flat, structure


def reconstruct(flat: np.ndarray, structure: CoeffStructure) -> np.ndarray:
    """Inverse of :func:`decompose`: inverse DWT of ``flat``, cropped to ``structure.shape``."""
    flat = np.asarray(flat)
    if flat.ndim != 1 or flat.size != structure.n_coeffs:
        raise ValueError(f"expected {structure.n_coeffs} coefficients, got array of shape {flat.shape}")
    bounds = np.cumsum([0] + structure.sizes)
    arrays = [flat[bounds[i] : bounds[i + 1]].reshape(s) for i, s in enumerate(structure.shapes)]
    if structure.level == 0:
        arr = arrays[0]
    elif structure.ndim == 1:
        arr = pywt.waverec(arrays, structure.wavelet, mode=structure.mode, axis=-1)
    else:
        c2 = [arrays[0]] + [tuple(arrays[i : i + 3]) for i in range(1, len(arrays), 3)]
        arr = pywt.waverec2(c2, structure.wavelet, mode=structure.mode, axes=(-2, -1))
    # waverec may return one extra sample per transformed axis (odd lengths): crop.
    arr = arr[tuple(slice(0, n) for n in structure.array_shape)]
    return np.ascontiguousarray(arr).reshape(structure.shape)


def percentile_threshold(abs_coeffs: np.ndarray, percentile: float) -> float:
    """``numpy.percentile(abs_coeffs, float(percentile))`` (method 'linear'), bit for bit; 0.0 if
    empty. The percentile is taken as a Python number (:func:`validate_percentile`), so a NumPy
    float64 scalar is weak here as a Python float is, where ``np.percentile`` would keep its
    float64 (a float64 threshold for float32 coefficients).

    ``np.percentile`` partitions around four positions (min, max and the two neighbours of
    the virtual index), about 6x slower than one ``np.partition`` on a 2M-entry layer. Here:
    one partition at the lower neighbour, the upper one as the minimum of the part above,
    and numpy's own interpolation formula (``_lerp``, weak promotion of the weight) in the
    array's dtype. Arrays with NaN, non-float arrays and indexes at the ends take
    ``np.percentile`` itself. ``tests/test_wavelets.py`` checks equality with ``np.percentile``.
    """
    p = validate_percentile(percentile)
    a = np.asarray(abs_coeffs).reshape(-1)
    n = a.size
    if n == 0:
        return 0.0
    q = np.true_divide(p, 100)  # as numpy.percentile, then its 'linear' virtual index
    virtual = float((n - 1) * q)
    if a.dtype.kind != "f" or n < 2 or not (0 <= virtual < n - 1) or np.isnan(a).any():
        return np.percentile(a, p)
    k = int(np.floor(virtual))
    gamma = virtual - k
    part = np.partition(a, k)
    lo = part[k]
    hi = part[k + 1 :].min()
    diff = hi - lo
    return hi - diff * (1 - gamma) if gamma >= 0.5 else lo + diff * gamma


def keep_mask(flat: np.ndarray, threshold: float, *, n_approx: int = 0, magnitudes: np.ndarray | None = None) -> np.ndarray:
    """Boolean mask over ``flat``: True where a coefficient is kept (|c| >= threshold).

    The first ``n_approx`` entries (the approximation band, when it is kept untouched)
    are always kept. ``magnitudes``: ``np.abs(flat)`` when the caller already has it.
    """
    keep = (np.abs(flat) if magnitudes is None else magnitudes) >= threshold
    keep[:n_approx] = True
    return keep


def dwt_prune_array(
    w: np.ndarray,
    *,
    wavelet: str,
    level: int,
    percentile: float | None = None,
    layout: str = "filter",
    mode: str = DEFAULT_MODE,
    keep_approx: bool = False,
    threshold: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, CoeffStructure]:
    """Decompose ``w``, zero coefficients with |c| strictly below the threshold, reconstruct.

    The threshold is ``threshold`` if given (global scope: computed by the caller over all
    layers), else the ``percentile`` of this tensor's |coefficients|. With ``keep_approx``
    the approximation band is excluded from the percentile computation and never zeroed.

    Returns ``(w_rec, coeffs, keep, structure)``: the reconstructed weight (shape and dtype
    of the computation: float32 for float32 input), the thresholded flat coefficients
    (zeros where dropped), the keep mask over them, and the coefficient structure.
    """
    if not isinstance(keep_approx, (bool, np.bool_)):
        raise ValueError(f"keep_approx must be true or false, got {keep_approx!r}")
    if threshold is not None and not (isinstance(threshold, (numbers.Real, np.ndarray)) and np.ndim(threshold) == 0
                                      and np.isfinite(float(threshold))):  # fmt: skip
        raise ValueError(f"threshold must be a finite number, got {threshold!r} (NaN would drop every coefficient)")
    coeffs, st = decompose(w, wavelet=wavelet, level=level, layout=layout, mode=mode)
    n_approx = st.n_approx if keep_approx else 0
    if threshold is None:
        if percentile is None:
            raise ValueError("give a percentile or a threshold")
        threshold = percentile_threshold(np.abs(coeffs[n_approx:]), percentile)
    keep = keep_mask(coeffs, threshold, n_approx=n_approx)
    coeffs = zero_dropped(coeffs, keep)
    return reconstruct(coeffs, st), coeffs, keep, st


_INT_OF = {np.dtype(np.float32): np.int32, np.dtype(np.float64): np.int64}


def zero_dropped(values: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """``np.where(keep, values, 0)`` bit for bit (+0.0 where dropped, kept values untouched), written
    into ``values`` (a 1-D array the caller owns) for float32 and float64: a bitwise AND of their
    bits with all ones where kept and all zeros where dropped, without ``np.where``'s branch per
    entry, which a keep mask in no order mispredicts half the time (8.7 -> 0.9 ms on 2.4 M
    coefficients on this project's CPU). Other dtypes, a ``keep`` that is not a bool mask of
    ``values``' shape, or an array not one writable run: ``np.where``, a new array."""
    ints = _INT_OF.get(values.dtype)
    keep = np.asarray(keep)
    if (ints is None or values.ndim != 1 or not values.flags.c_contiguous or not values.flags.writeable
            or keep.dtype != bool or keep.shape != values.shape):
        return np.where(keep, values, values.dtype.type(0))
    mask = keep.astype(ints)
    np.negative(mask, out=mask)  # kept: -1, all ones; dropped: 0
    bits = values.view(ints)
    np.bitwise_and(bits, mask, out=bits)
    return values


def structural_zeros(st: CoeffStructure) -> np.ndarray:
    """Flat bool mask (the coefficient order of :func:`decompose`) of the positions that are zero
    whatever the weights, to rounding. They come from the signal extension: with ``periodization``
    (or ``symmetric``, ``constant``) an odd length is extended by repeating its last sample, and a
    highpass filter with two non-zero taps (``haar``, ``db1``, ``bior1.x``, ``rbio1.1``) then
    gives exactly 0 for that pair (7 of the 16 positions of a 3x3 kernel in the ``kernel`` layout
    with ``haar``); ``constant`` or ``smooth`` extension times a highpass whose taps sum to 0
    gives the rounding of that sum times the edge value (PyWavelets stores some filters to about
    12 digits: sym3's highpass sums to -3e-12); ``zero`` padding can leave whole coefficients on
    padding alone.

    A coefficient is a linear function of the weights, ``c_p = <a_p, w>``; a position is one
    where ``|a_p|`` is at most :data:`STRUCTURAL_RTOL` of the largest ``|a_q|`` of the layer. The
    norms are estimated as the root mean square of the coefficients of :data:`STRUCTURAL_PROBES`
    standard normal weight arrays of the layer's shape (``E[c_p**2] = |a_p|**2``), or in the
    layouts that transform row by row (``filter``, ``kernel``) over :data:`STRUCTURAL_ROWS` rows of
    one probe, every row of the layer then having the same positions. In ``periodization``,
    ``symmetric``, ``periodic``, ``reflect`` and the anti-modes the norms fall in two groups far apart (at most 1e-13 and at least 1e-4 of the
    largest, over every discrete wavelet, levels up to 5, on five layer shapes), so the mask is
    the exact set. In ``zero``, ``constant`` and ``smooth`` they also run continuously from
    1e-17 to 1e-3 (long filters' small outer taps on few real samples): there the mask is the
    positions below the cut, taken above the filters' rounding. Cached per structure. Read-only."""
    return _structural_zeros(st.shape, st.wavelet, st.level, st.layout, st.mode)


#: standard normal probes the structural-zero norms are estimated from (:func:`structural_zeros`):
#: rows of one probe in the layouts transformed row by row, whole layer-shaped arrays in the others
STRUCTURAL_ROWS = 32
STRUCTURAL_PROBES = 2
#: a position whose coefficient's norm is at most this share of the layer's largest is structural:
#: above the ~1e-11 rounding of PyWavelets' 12-digit filters, far below the 1e-4 of the smallest
#: real coefficient in the modes whose norms have a gap (:func:`structural_zeros`)
STRUCTURAL_RTOL = 1e-10


@functools.lru_cache(maxsize=512)
def _structural_zeros(shape: tuple[int, ...], wavelet: str, level: int, layout: str, mode: str) -> np.ndarray:
    if level == 0:
        return np.zeros(math.prod(shape), dtype=bool)
    rng = np.random.default_rng(12345)
    if layout in ("filter", "kernel"):  # every row by the same map: STRUCTURAL_ROWS rows of it, pooled
        lead = 1 if layout == "filter" else len(shape) - 2
        probe_shape, draws, rows = (STRUCTURAL_ROWS,) + (1,) * (lead - 1) + shape[lead:], 1, math.prod(shape[:lead])
    else:
        probe_shape, draws, rows = shape, STRUCTURAL_PROBES, 1
    power = None
    for _ in range(draws):
        coeffs, st = decompose(rng.standard_normal(probe_shape), wavelet=wavelet, level=level, layout=layout, mode=mode)
        power = coeffs * coeffs if power is None else power + coeffs * coeffs
    assert st.level == level, (st.level, level)
    probe_rows = math.prod(st.array_shape[: len(st.array_shape) - st.ndim])  # 1 in the matrix and flat layouts
    bands, start = [], 0
    for n in st.sizes:  # each band over every row (decompose's order): the probe rows' mean, for each row
        band = power[start : start + n].reshape(probe_rows, n // probe_rows)
        bands.append(np.tile(band.mean(axis=0), rows))
        start += n
    norm = np.sqrt(np.concatenate(bands) / draws)
    mask = norm <= STRUCTURAL_RTOL * norm.max(initial=0.0)  # initial: a layer without weights (0 filters) has no coefficients
    mask.setflags(write=False)
    return mask
