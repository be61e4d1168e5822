"""One level of PyWavelets' two-channel filter bank in torch (1-D and separable 2-D), for
:mod:`wavesweep.wavelets_torch` (which adds layouts, levels and the coefficient order).

How PyWavelets' C filter bank maps onto torch ops (``pywt/_extensions/c/convolution.c.src``):

* analysis, every mode but periodization: ``y[o] = sum_j f[j] * x_ext[2*o + 1 - j]``,
  ``o < floor((N + F - 1) / 2)``, ``x_ext`` the mode's extension of ``x`` beyond ``[0, N)``.
  Here: extend by ``F - 2`` samples on the left and ``2*L - N`` on the right, then a
  cross-correlation with the reversed filters at stride 2 (both bands in one conv, 2 channels).
* analysis, periodization: an odd-length signal gets its last sample repeated (length ``N'``),
  then ``y[o] = sum_j f[j] * x[(F/2 + 2*o - j) mod N']``, ``o < N'/2``.
* synthesis, every mode but periodization: ``x[n] = sum_k c[k] * g[n + F - 2 - 2*k]``,
  ``n < 2*L - F + 2``: a transposed conv at stride 2, cropped to ``[F - 2, 2*L)``.
* synthesis, periodization: ``x[n] = sum_k c[k] * g[(n - 2*k + F/2 - 1) mod 2*L]`` (all periodic
  images of the filter summed): the coefficients are extended periodically, then the same
  transposed conv, then a crop of ``2*L`` samples.
* 2-D (``wavedec2``): the separable product. The extensions along the two axes commute, so each
  level is one ``conv2d`` with 4 output channels (lo/hi along rows x lo/hi along columns) on the
  array extended along both axes. ``cH`` is detail along axis -2 (PyWavelets' key ``'da'``),
  ``cV`` detail along axis -1 (``'ad'``), ``cD`` both.

Two implementations of a level, chosen by device (both tested against PyWavelets on CPU):

* ``conv`` (CUDA): the above as written, one ``conv{1,2}d`` / ``conv_transpose{1,2}d`` per level
  (all bands as channels, a 2-D level as one ``conv2d``: the extensions along the two axes
  commute), with TF32 switched off so float32 stays float32-accurate.
* ``taps`` (CPU): the filters as multiply-adds of contiguous slices of the even/odd phases of the
  extended signal, in PyWavelets' summation and axis order, products and sums rounded separately
  as its C loops do (no FMA), so exact cancellations (haar details of a mirrored boundary) are
  exact zeros here too and keep masks equal at such ties. mkldnn's one-channel strided conv is
  30-40x slower on CPU; this path has one custom backward per slice-sum.

Extensions (``common.h``): each extended sample is a fixed linear combination of the samples of
``x`` (one sample for zero/constant/symmetric/reflect/periodic/antisymmetric, up to a few for
smooth and antireflect), computed once per ``(N, F, mode)`` from the C code's rules, including
the repeated reflections when the filter is longer than the signal, and applied as an
``index_select`` (weighted for the multi-sample modes). The right side mirrors the left.

Precision: computes in the tensor's dtype for float32/float64 (as PyWavelets does), in float32 for
float16/bfloat16 (result cast back). Results equal PyWavelets to float rounding (1e-10 in
float64, 1e-5 relative in float32 in the tests); the CPU path is often bit-identical (zero and
constant modes in float64 always were), but near the boundaries of the other modes PyWavelets
sums some terms in another order, and the multi-sample extensions are formed differently.
``dmey`` is computed like every other wavelet, but it is not a
perfect-reconstruction filter bank (see :mod:`wavesweep.wavelets`).
"""

from __future__ import annotations

import contextlib
import functools

import numpy as np
import pywt
import torch
import torch.nn.functional as F

__all__ = ["dwt_level", "idwt_level", "synthesis_backend", "dense_backend", "forced_backend"]

# --------------------------------------------------------------------------- filters and extensions


@functools.lru_cache(maxsize=256)
def _filters(wavelet: str, nd: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(analysis weight, synthesis weight)`` for ``conv{nd}d`` / ``conv_transpose{nd}d``.

    1-D: ``(2, 1, F)``, channels (lo, hi). 2-D: ``(4, 1, F, F)``, channel ``2*r + c`` with
    ``r``/``c`` = 0 (lo) or 1 (hi) along rows (axis -2) / columns (axis -1). Analysis weights are
    the reversed decomposition filters (conv is a cross-correlation); synthesis weights are the
    reconstruction filters as they are (a transposed conv is a true convolution).
    """
    w = pywt.Wavelet(wavelet)
    dec = np.array([w.dec_lo[::-1], w.dec_hi[::-1]], dtype=np.float64)  # (2, F)
    rec = np.array([w.rec_lo, w.rec_hi], dtype=np.float64)  # (2, F)
    if nd == 2:
        dec = np.einsum("ip,jq->ijpq", dec, dec).reshape(4, dec.shape[1], dec.shape[1])
        rec = np.einsum("ip,jq->ijpq", rec, rec).reshape(4, rec.shape[1], rec.shape[1])
    as_t = lambda a: torch.tensor(a[:, None], dtype=dtype, device=device)  # noqa: E731
    return as_t(dec), as_t(rec)


def _left_terms(s: int, n: int, mode: str) -> list[tuple[int, float]]:
    """``x_ext[-s]`` (``s >= 1``) as ``[(index into x, weight), ...]``, following ``convolution.c.src``."""
    if mode == "zero":
        return []
    if mode == "constant" or (mode in ("smooth", "reflect", "antireflect") and n < 2):
        return [(0, 1.0)]
    if mode == "smooth":  # x[0] + s * (x[0] - x[1])
        return [(0, 1.0 + s), (1, -float(s))]
    if mode == "periodic":
        return [((-s) % n, 1.0)]
    if mode == "symmetric":  # half-sample symmetric, period 2N
        u = (s - 1) % (2 * n)
        return [(u, 1.0)] if u < n else [(2 * n - 1 - u, 1.0)]
    if mode == "antisymmetric":  # half-sample antisymmetric: -x[k] for N samples, then +x[N-1-k]
        u = (s - 1) % (2 * n)
        return [(u, -1.0)] if u < n else [(2 * n - 1 - u, 1.0)]
    if mode == "reflect":  # whole-sample symmetric, period 2(N-1)
        u = (s - 1) % (2 * n - 2)
        return [(u + 1, 1.0)] if u < n - 1 else [(2 * n - 3 - u, 1.0)]
    if mode == "antireflect":
        # whole-sample antisymmetric: the C loop keeps a running edge value `le` and alternates
        # tmp = le - (x[k] - x[0]) and tmp = le + (x[N-1-k] - x[N-1]) for k = 1..N-1.
        le = {0: 1.0}
        t = 0
        while True:
            for k in range(1, n):
                tmp = dict(le)
                tmp[k] = tmp.get(k, 0.0) - 1.0
                tmp[0] = tmp.get(0, 0.0) + 1.0
                t += 1
                if t == s:
                    return [(i, c) for i, c in tmp.items() if c != 0.0]
                last = tmp
            le = last
            for k in range(1, n):
                tmp = dict(le)
                tmp[n - 1 - k] = tmp.get(n - 1 - k, 0.0) + 1.0
                tmp[n - 1] = tmp.get(n - 1, 0.0) - 1.0
                t += 1
                if t == s:
                    return [(i, c) for i, c in tmp.items() if c != 0.0]
                last = tmp
            le = last
    raise ValueError(f"unsupported mode {mode!r}")


def _side_plan(positions: list[int], n: int, mode: str):
    """Extension plan for the given out-of-range positions: ``(index (P, K), weight (P, K) or None)``."""
    terms = []
    for t in positions:
        if t < 0:
            terms.append(_left_terms(-t, n, mode))
        else:  # right side: the mirror image of the left
            terms.append([(n - 1 - i, c) for i, c in _left_terms(t - n + 1, n, mode)])
    k = max((len(tt) for tt in terms), default=1) or 1
    idx = np.zeros((len(positions), k), dtype=np.int64)
    wts = np.zeros((len(positions), k), dtype=np.float64)
    for p, tt in enumerate(terms):
        for j, (i, c) in enumerate(tt):
            idx[p, j], wts[p, j] = i, c
    if k == 1 and np.all(wts == 1.0):
        return idx[:, 0], None
    return idx, wts


@functools.lru_cache(maxsize=4096)
def _ext_plan(n: int, f: int, mode: str):
    """How to extend a length-``n`` axis before the analysis conv: ``(left plan, right plan, L)``.

    The extended axis is ``[left samples, x, right samples]`` and the stride-2 correlation with
    the ``F``-tap reversed filter over it gives the ``L`` coefficients. Periodization: indices
    into the odd-length-padded periodic signal (the pad sample is x[N-1]).
    """
    if mode == "periodization":
        n2 = n + n % 2
        lpad = f // 2 - 1  # y[o] = sum_m frev[m] * xp[(2o + m - lpad) mod N']
        total = n2 + f - 2
        left = [min((u - lpad) % n2, n - 1) for u in range(lpad)]
        right = [min((u - lpad) % n2, n - 1) for u in range(lpad + n, total)]
        return (np.array(left, dtype=np.int64), None), (np.array(right, dtype=np.int64), None), n2 // 2
    L = (n + f - 1) // 2
    left = list(range(2 - f, 0))  # x_ext positions -(F-2) .. -1
    right = list(range(n, 2 * L))  # x_ext positions N .. 2L-1
    return _side_plan(left, n, mode), _side_plan(right, n, mode), L


@functools.lru_cache(maxsize=4096)
def _plan_tensors(n: int, f: int, mode: str, dtype: torch.dtype, device: torch.device):
    (li, lw), (ri, rw), L = _ext_plan(n, f, mode)

    def t(idx, wts):
        i = torch.as_tensor(idx, device=device)
        return i, (None if wts is None else torch.as_tensor(wts, dtype=dtype, device=device))

    return t(li, lw), t(ri, rw), L


def _gather(x: torch.Tensor, dim: int, idx: torch.Tensor, wts: torch.Tensor | None) -> torch.Tensor:
    """Extended samples along ``dim``: ``x[idx]`` or ``sum_k x[idx[:, k]] * wts[:, k]``."""
    if wts is None:
        return x.index_select(dim, idx)
    dim = dim % x.ndim
    p, k = idx.shape
    g = x.index_select(dim, idx.reshape(-1))  # (..., P*K, ...) along dim
    g = g.reshape(x.shape[:dim] + (p, k) + x.shape[dim + 1 :])
    w = wts.reshape([p, k] + [1] * (x.ndim - 1 - dim))
    return (g * w).sum(dim=dim + 1)


def _extend(x: torch.Tensor, dim: int, f: int, mode: str) -> tuple[torch.Tensor, int]:
    """Extend ``x`` along ``dim`` for the analysis conv; return ``(extended, number of coefficients)``."""
    n = x.shape[dim]
    (li, lw), (ri, rw), L = _plan_tensors(n, f, mode, x.dtype, x.device)
    if mode == "zero":
        pads = [0, 0] * (x.ndim - 1 - (dim % x.ndim)) + [li.shape[0], ri.shape[0]]
        return F.pad(x, pads), L
    parts = [x]
    if li.shape[0]:
        parts.insert(0, _gather(x, dim, li, lw))
    if ri.shape[0]:
        parts.append(_gather(x, dim, ri, rw))
    return (torch.cat(parts, dim=dim) if len(parts) > 1 else x), L


def _periodic_coeffs(c: torch.Tensor, dim: int, f: int) -> tuple[torch.Tensor, int]:
    """Periodic extension of coefficients along ``dim`` for the periodization synthesis.

    Returns ``(extended, start)``: the transposed conv of the extended coefficients, from
    ``start`` for ``2*L`` samples, is the periodic synthesis.
    """
    L = c.shape[dim]
    m, s = 2 * L, f // 2 - 1
    k_lo = -((f - 1 - s) // 2)  # ceil((s - F + 1) / 2)
    k_hi = (m - 1 + s) // 2
    idx = torch.arange(k_lo, k_hi + 1, device=c.device) % L
    return c.index_select(dim, idx), s - 2 * k_lo


# Two equal implementations of one level (module docstring). "conv": few kernel launches, what
# cuDNN does well. "taps": on CPU 30-40x faster than mkldnn's one-input-channel strided conv
# (3 ms against 90-120 ms for a (512, 4608) level), but ~2F launches per band, too many for a GPU
# fine-tuning step. Chosen by device; the tests run both on CPU. A third, synthesis only:
# "gemm" (wavesweep.polyphase, multilevel, one strided batched GEMM per level and axis), the CPU
# default of wavelets_torch.reconstruct; forcing "gemm" leaves the analysis on "taps". A fourth,
# both ways, whole transform: "dense" (wavesweep.dense, one GEMM per layer with a cached
# transform matrix), the accelerator default where the rows are short enough; forcing it leaves
# other structures on the device's default.
_FORCE_BACKEND: str | None = None  # "conv" | "taps" | "gemm" | "dense" | None (by device); for tests and benches


@contextlib.contextmanager
def forced_backend(name: str | None):
    """Within the block, the backend is ``name`` (None: by device)."""
    global _FORCE_BACKEND
    prev, _FORCE_BACKEND = _FORCE_BACKEND, name
    try:
        yield
    finally:
        _FORCE_BACKEND = prev


def _backend(device: torch.device) -> str:
    """The analysis/level backend: "taps" or "conv"."""
    if _FORCE_BACKEND in ("conv", "taps"):
        return _FORCE_BACKEND
    return "taps" if _FORCE_BACKEND == "gemm" or device.type == "cpu" else "conv"


def synthesis_backend(device: torch.device) -> str:
    """The backend of a multilevel synthesis: "gemm" (CPU default), "taps" or "conv" (CUDA default)."""
    if _FORCE_BACKEND in ("conv", "taps", "gemm"):
        return _FORCE_BACKEND
    return "gemm" if device.type == "cpu" else "conv"


def dense_backend(device: torch.device) -> bool:
    """True where a whole transform goes through :mod:`wavesweep.dense` when its structure allows:
    on an accelerator by default, anywhere when forced."""
    return _FORCE_BACKEND == "dense" or (_FORCE_BACKEND is None and device.type != "cpu")


@functools.lru_cache(maxsize=256)
def _taps(wavelet: str) -> tuple[tuple[tuple[float, ...], ...], tuple[tuple[float, ...], ...]]:
    """``(dec, rec)``: the reversed decomposition filters (lo, hi) and the reconstruction filters (lo, hi)."""
    w = pywt.Wavelet(wavelet)
    return (tuple(w.dec_lo[::-1]), tuple(w.dec_hi[::-1])), (tuple(w.rec_lo), tuple(w.rec_hi))


class _WeightedSlices(torch.autograd.Function):
    """``sum over groups g of (sum over (i, tap, off) in g of tap * srcs[i].narrow(dim, off, length))``.

    Forward: products and sums as separate roundings (no fused multiply-add), each group summed
    in its listed order, then the groups in order: the arithmetic of PyWavelets' C loops, so
    exact cancellations (e.g. haar details of a mirrored boundary) give exact zeros here too.
    Backward: each source's gradient is one zero buffer with the scaled output gradient added
    at every offset (autograd's own slicing would allocate a full buffer per term).
    """

    @staticmethod
    def forward(ctx, dim: int, length: int, groups, *srcs: torch.Tensor) -> torch.Tensor:
        ctx.dim, ctx.length, ctx.groups = dim, length, groups
        ctx.shapes = [s.shape for s in srcs]
        total = tmp = None
        for group in groups:
            acc = None
            for i, tap, off in group:
                sl = srcs[i].narrow(dim, off, length)
                if acc is None:
                    acc = sl * tap
                    continue
                if tmp is None:
                    tmp = torch.empty_like(acc)
                torch.mul(sl, tap, out=tmp)
                acc.add_(tmp)
            if total is None:
                total = acc
            else:
                total.add_(acc)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        grads = [
            grad.new_zeros(shape) if ctx.needs_input_grad[3 + i] else None for i, shape in enumerate(ctx.shapes)
        ]
        for group in ctx.groups:
            for i, tap, off in group:
                if grads[i] is not None:
                    grads[i].narrow(ctx.dim, off, ctx.length).add_(grad, alpha=tap)
        return (None, None, None, *grads)


def _weighted_slices(srcs: list[torch.Tensor], groups, dim: int, length: int) -> torch.Tensor:
    """See :class:`_WeightedSlices`; ``groups``: lists of ``(source index, tap, offset)``."""
    groups = tuple(tuple(g) for g in groups)
    return _WeightedSlices.apply(dim % srcs[0].ndim, length, groups, *srcs)


def _every_other(x: torch.Tensor, dim: int, start: int) -> torch.Tensor:
    return x[(slice(None),) * dim + (slice(start, None, 2),)]


def _extended_phases(x: torch.Tensor, dim: int, f: int, mode: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Even and odd samples of the extended signal along ``dim`` (see :func:`_extend`), and ``L``.

    Built as ``cat(extension samples, every other sample of x, extension samples)``: one pass
    over ``x`` per phase, no extended copy in between, each phase contiguous along ``dim``.
    """
    dim = dim % x.ndim
    n = x.shape[dim]
    (li, lw), (ri, rw), L = _plan_tensors(n, f, mode, x.dtype, x.device)
    pl, pr = li.shape[0], ri.shape[0]
    if mode == "zero":
        shape = list(x.shape)
        shape[dim] = pl
        left = x.new_zeros(shape)
        shape[dim] = pr
        right = x.new_zeros(shape)
    else:
        left, right = _gather(x, dim, li, lw), _gather(x, dim, ri, rw)
    phases = []
    for ph in (0, 1):  # extended position p = ph, ph + 2, ...: left part, then x, then right part
        parts = [
            _every_other(left, dim, ph),
            _every_other(x, dim, (pl + ph) % 2),
            _every_other(right, dim, (pl + n + ph) % 2),
        ]
        phases.append(torch.cat([q for q in parts if q.shape[dim]], dim=dim))
    return phases[0], phases[1], L


def _taps_analysis(x: torch.Tensor, dim: int, wavelet: str, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One analysis level along ``dim``: ``(lo, hi)``, ``y[o] = sum_m frev[m] * x_ext[2*o + m]``."""
    (lo, hi), _ = _taps(wavelet)
    even, odd, L = _extended_phases(x, dim, len(lo), mode)
    # PyWavelets sums filter[j] * x[i - j] for j = 0, 1, ...: here m = F - 1 - j, so m descending
    return tuple(
        _weighted_slices([even, odd], [[(m % 2, taps[m], m // 2) for m in reversed(range(len(taps)))]], dim, L)
        for taps in (lo, hi)
    )


def _taps_synthesis(a: torch.Tensor, d: torch.Tensor, dim: int, wavelet: str, mode: str) -> torch.Tensor:
    """One synthesis level along ``dim`` from approximation ``a`` and detail ``d`` (same length L).

    Output phase ``ph`` (samples ``2q + ph``) is a valid correlation of the coefficients with
    taps ``g[2(h-1-t) + pi]`` (``h = F/2``): non-periodization ``x[2q+ph] = sum_t g[2(h-1-t)+ph] *
    c[q+t]``, ``q < L - h + 1``; periodization ``x[2q+ph] = sum_t g[2(h-1-t)+pi] * c_ext[q+o+t]``
    with ``pi = (ph + h - 1) % 2``, ``o = (ph + h - 1)//2 - (h - 1)//2`` and ``c_ext`` the
    coefficients extended periodically by ``ceil((h-1)/2)`` on the left, ``q < L``.
    The two phases are then interleaved.
    """
    _, (glo, ghi) = _taps(wavelet)
    f = len(glo)
    h = f // 2
    dim = dim % a.ndim
    L = a.shape[dim]
    if mode == "periodization":
        s = h - 1
        off = -(s - s // 2)  # c_ext[i] = c[(i + off) mod L], i < L + h
        idx_l = torch.arange(off, 0, device=a.device) % L
        idx_r = torch.arange(L, L + h + off, device=a.device) % L
        a, d = (torch.cat([c.index_select(dim, idx_l), c, c.index_select(dim, idx_r)], dim=dim) for c in (a, d))
        n_q = L
        # (tap index into g, offset into the coefficients) per term, for each output phase
        phase_terms = [[(2 * (h - 1 - t) + (ph + s) % 2, (ph + s) // 2 - s // 2 + t) for t in range(h)] for ph in (0, 1)]
    else:
        n_q = L - h + 1
        phase_terms = [[(2 * (h - 1 - t) + ph, t) for t in range(h)] for ph in (0, 1)]
    outs = []
    for terms in phase_terms:
        terms = terms[::-1]  # filter index ascending, as PyWavelets sums
        a_terms = [(0, glo[k], o) for k, o in terms]
        d_terms = [(1, ghi[k], o) for k, o in terms]
        # periodization: one running sum over a's terms then d's; otherwise sum_a + sum_d
        groups = [a_terms + d_terms] if mode == "periodization" else [a_terms, d_terms]
        outs.append(_weighted_slices([a, d], groups, dim, n_q))
    return torch.stack(outs, dim=dim + 1).flatten(dim, dim + 1)  # interleave the phases


@contextlib.contextmanager
def _no_tf32(device: torch.device):
    """cuDNN convolutions in full float32 (its default, TF32, keeps 10 mantissa bits: ~1e-3 error)."""
    if device.type != "cuda":
        yield
        return
    # torch 2.9+: the convolutions' own precision (the legacy flag raises a RuntimeError once a
    # caller has given cuDNN's conv and RNN different precisions with the new API)
    conv = getattr(torch.backends.cudnn, "conv", None)
    flags, name = (conv, "fp32_precision") if hasattr(conv, "fp32_precision") else (torch.backends.cudnn, "allow_tf32")
    prev = getattr(flags, name)
    setattr(flags, name, "ieee" if name == "fp32_precision" else False)
    try:
        yield
    finally:
        setattr(flags, name, prev)


def dwt_level(x: torch.Tensor, nd: int, wavelet: str, mode: str) -> list[torch.Tensor]:
    """One analysis level over the last ``nd`` axes of ``x`` (B, *N) -> ``2**nd`` bands (B, *L).

    Band order: 1-D (lo, hi); 2-D ``2*r + c`` with ``r``/``c`` = lo (0) or hi (1) along rows
    (axis -2) / columns (axis -1): (aa, ad, da, dd) in PyWavelets' keys.
    """
    if _backend(x.device) == "taps":
        if nd == 1:
            return list(_taps_analysis(x, -1, wavelet, mode))
        # PyWavelets' order (dwtn): rows (axis -2) first, then columns
        rows = _taps_analysis(x, -2, wavelet, mode)  # lo, hi along rows: (B, Lh, W) each
        (aa, ad), (da, dd) = (_taps_analysis(r, -1, wavelet, mode) for r in rows)
        return [aa, ad, da, dd]
    dec, _ = _filters(wavelet, nd, x.dtype, x.device)
    f = dec.shape[-1]
    for d in range(-nd, 0):
        x, _ = _extend(x, d, f, mode)
    x = x.unsqueeze(1)  # (B, 1, *N_ext)
    with _no_tf32(x.device):
        y = F.conv1d(x, dec, stride=2) if nd == 1 else F.conv2d(x, dec, stride=2)  # (B, 2**nd, *L)
    return list(y.unbind(1))


def idwt_level(bands: list[torch.Tensor], nd: int, wavelet: str, mode: str) -> torch.Tensor:
    """One synthesis level: ``2**nd`` bands (B, *L), order as :func:`dwt_level` -> (B, *N),
    N = 2L (periodization) or 2L - F + 2."""
    if _backend(bands[0].device) == "taps":
        if nd == 1:
            return _taps_synthesis(bands[0], bands[1], -1, wavelet, mode)
        aa, ad, da, dd = bands  # PyWavelets' order (idwtn): columns first, then rows
        lo_r = _taps_synthesis(aa, ad, -1, wavelet, mode)
        hi_r = _taps_synthesis(da, dd, -1, wavelet, mode)
        return _taps_synthesis(lo_r, hi_r, -2, wavelet, mode)
    c = torch.stack(bands, dim=1)  # (B, 2**nd, *L)
    _, rec = _filters(wavelet, nd, c.dtype, c.device)
    f = rec.shape[-1]
    lens = c.shape[2:]
    if mode == "periodization":
        starts = []
        for d in range(-nd, 0):
            c, st = _periodic_coeffs(c, d, f)
            starts.append(st)
        outs = [2 * n for n in lens]
    else:
        starts = [f - 2] * nd
        outs = [2 * n - f + 2 for n in lens]
    with _no_tf32(c.device):
        y = F.conv_transpose1d(c, rec, stride=2) if nd == 1 else F.conv_transpose2d(c, rec, stride=2)
    return y[(slice(None), 0) + tuple(slice(s, s + o) for s, o in zip(starts, outs))]
