"""Multilevel synthesis (the inverse DWT of :func:`wavesweep.wavelets_torch.reconstruct`) as one
strided batched matrix product per level and axis: the ``gemm`` backend, the CPU default for
synthesis (what fine-tuning ``W = IDWT(c * m)`` runs every step).

Polyphase form (see :func:`wavesweep.filterbank._taps_synthesis`): output sample ``2q + ph`` of a
level is ``sum_t g[tap(ph, t)] * c_ext[q + o_ph + t]`` over ``t < h = F/2``, for both bands, with
``c_ext`` the coefficients (non-periodization: as they are, ``q < L - h + 1``) or their periodic
extension (periodization, ``q < L``). So the two output samples at ``q`` are a (2 x 2W) tap matrix
times the window of ``W`` consecutive rows of ``c_ext`` (both bands), ``W = h + max(o_ph)``.

Positions-major layout: the transformed axis first, every other axis (rows, kernels, the other
2-D axis) flattened behind it, ``(L, P)``. Then the window at ``q`` is the contiguous block of
rows ``q .. q + W - 1`` of a buffer ``(rows, band, P)``, consecutive windows overlap, and
``torch.matmul(taps, windows)`` over the strided (overlapping, copy-free) view of the windows is
one batched GEMM per level writing ``(q, phase, P)``: the interleaved output, already in the
positions-major layout of the next level (four consecutive pairs per window where four divide
the level, a (8 x 2(W + 3)) tap matrix: fewer, larger products, :func:`_blocked`). Per level and
axis: one copy of the two bands into the buffer (with the few periodic wrap rows), one GEMM; the
backward is the same GEMM with the flipped tap matrix over the zero-padded output gradient, then
the wrap rows folded back. All levels run inside one autograd Function (:func:`synthesize`,
linear, so nothing is saved), whose backward writes each band's gradient straight into one flat
gradient.

The flat coefficients themselves can be stored positions-major too (:func:`reorder`: each band
transposed, ``(B, L)`` -> ``(L, B)``), which is how fine-tuning keeps them: then no band is
transposed per step (a strided transpose costs ~10x a copy on CPU); only the finished weight is
(once forward, once backward). The keep mask is a 0/1 float multiply fused into the buffer fill
(forward) and the gradient write (backward).

Cost on CPU (1 thread): one level of a (512, 4608) weight (bior4.4, 2 x (512, 2304) bands)
~3 ms here against ~24 ms on the taps path; every ResNet-18 layer's synthesis (filter layout,
level 5) forward + backward with the mask, positions-major, ~3x less than the taps path with
``torch.where``. What remains is mostly the GEMMs (~45 %) and copies (~30 %: the weight's one
transpose each way, single-threaded, and the buffer fills). The sums are dot products in BLAS's
order, not PyWavelets' (equal to PyWavelets to float tolerance, tests/test_polyphase.py and
tests/test_wavelets_torch.py): fine for a synthesis; the masks come from the analysis, which
stays on the ``taps`` path, PyWavelets' exact arithmetic.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pywt
import torch

__all__ = ["synthesize", "reorder"]


@dataclass(frozen=True)
class _Plan:
    """One synthesis level of ``L`` coefficients per band: ``n_q`` output pairs, windows of ``w``
    rows, a buffer of ``n_q + w - 1`` rows filled from the coefficient rows by ``chunks``
    ``(buffer row, coefficient row, count)`` (``chunks[0]`` the whole band, the rest wrap rows)."""

    n_q: int
    w: int
    chunks: tuple[tuple[int, int, int], ...]
    taps: np.ndarray  # (2 phases, w * 2 bands), column 2*j + band for window row j


@functools.lru_cache(maxsize=4096)
def _plan(length: int, wavelet: str, mode: str) -> _Plan:
    wv = pywt.Wavelet(wavelet)
    g = (np.asarray(wv.rec_lo, dtype=np.float64), np.asarray(wv.rec_hi, dtype=np.float64))
    h = len(g[0]) // 2
    if mode == "periodization":  # as filterbank._taps_synthesis: c_ext[i] = c[(i + off) mod L]
        s = h - 1
        off = -(s - s // 2)
        # (tap index into g, window row) per term, for each phase
        terms = [[(2 * (h - 1 - t) + (ph + s) % 2, (ph + s) // 2 - s // 2 + t) for t in range(h)] for ph in (0, 1)]
        n_q = length
    else:
        off = 0
        terms = [[(2 * (h - 1 - t) + ph, t) for t in range(h)] for ph in (0, 1)]
        n_q = length - h + 1
    w = 1 + max(r for ts in terms for _, r in ts)
    taps = np.zeros((2, 2 * w))
    for ph, ts in enumerate(terms):
        for k, r in ts:
            taps[ph, 2 * r] = g[0][k]
            taps[ph, 2 * r + 1] = g[1][k]
    rows = n_q + w - 1
    main = -off  # the buffer row of coefficient 0 (all coefficient rows in one chunk)
    chunks = [(main, 0, length)]
    if mode == "periodization":  # the wrap rows before and after, in runs of consecutive rows
        for lo, hi in ((0, main), (main + length, rows)):
            i = lo
            while i < hi:
                src = (i + off) % length
                n = min(hi - i, length - src)
                chunks.append((i, src, n))
                i += n
    assert main >= 0 and main + length <= rows
    return _Plan(n_q=n_q, w=w, chunks=tuple(chunks), taps=taps)


def _blocked(taps: np.ndarray, k: int) -> np.ndarray:
    """The (2 x 2w) taps of one output pair as the (2k x 2(k + w - 1)) taps of ``k`` consecutive
    pairs over one window of ``k + w - 1`` rows (row ``2r + ph``: pair ``r``, phase ``ph``)."""
    w = taps.shape[1] // 2
    out = np.zeros((2 * k, 2 * (k + w - 1)))
    for r in range(k):
        out[2 * r : 2 * r + 2, 2 * r : 2 * (r + w)] = taps
    return out


def _block(n: int) -> int:
    """Output pairs per window: 4 where they divide ``n`` (a (8 x 2(w + 3)) GEMM per window: ~1.6x
    faster than one pair per window on CPU), else 2 or 1."""
    return next(k for k in (4, 2, 1) if n % k == 0)


@functools.lru_cache(maxsize=1024)
def _tap_tensors(length: int, wavelet: str, mode: str, dtype: torch.dtype, device: torch.device):
    """``(forward taps, backward taps)`` of a level, each blocked for its number of output pairs
    (:func:`_block`). Backward: column ``2*j + ph`` of band row ``b`` is forward
    ``[ph, 2*(w - 1 - j) + b]`` (the transposed product over reversed windows)."""
    plan = _plan(length, wavelet, mode)
    fwd = plan.taps
    bwd = fwd.reshape(2, plan.w, 2)[:, ::-1, :].transpose(2, 1, 0).reshape(2, 2 * plan.w)
    n_fwd, n_bwd = plan.n_q, plan.n_q + plan.w - 1
    as_t = lambda a: torch.tensor(np.ascontiguousarray(a), dtype=dtype, device=device)  # noqa: E731
    return as_t(_blocked(fwd, _block(n_fwd))), as_t(_blocked(bwd, _block(n_bwd)))


def _stencil(taps: torch.Tensor, buf: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` output pairs from ``buf`` (rows, 2, P) with blocked ``taps`` (2k x 2(k + w - 1)):
    one batched GEMM over the overlapping windows (a copy-free strided view) -> (n, 2, P)."""
    k = taps.shape[0] // 2
    rows = taps.shape[1] // 2
    p = buf.shape[2]
    windows = buf.as_strided((n // k, 2 * rows, p), (2 * k * p, p, 1), buf.storage_offset())
    return torch.matmul(taps, windows).view(n, 2, p)


def _fill(dst: torch.Tensor, src: torch.Tensor, keep: torch.Tensor | None) -> None:
    """``dst = src * keep`` (``keep`` a 0/1 float mask, or None), in one pass over any strides
    (a float product: ~15x faster on CPU than ``torch.where`` with a bool mask)."""
    if keep is None:
        dst.copy_(src)
    else:
        torch.mul(src, keep, out=dst)


def _level_forward(a, d, plan: _Plan, taps, keep_a=None, keep_d=None) -> torch.Tensor:
    """One level along axis 0: ``a`` (La >= L, *P) (rows past ``L`` cropped, as ``pywt.waverec``
    does), ``d`` (L, *P), each times its keep mask if given -> (2 * n_q, *P)."""
    length, rest = d.shape[0], tuple(d.shape[1:])
    buf = d.new_empty((plan.n_q + plan.w - 1, 2) + rest)
    (main, _, _), *wraps = plan.chunks
    _fill(buf[main : main + length, 0], a[:length], None if keep_a is None else keep_a[:length])
    _fill(buf[main : main + length, 1], d, keep_d)
    for dst, src, n in wraps:
        buf[dst : dst + n].copy_(buf[main + src : main + src + n])
    return _stencil(taps, buf.view(buf.shape[0], 2, -1), plan.n_q).view((2 * plan.n_q,) + rest)


def _level_backward(grad, plan: _Plan, taps_t, length: int, rest: tuple[int, ...]):
    """Adjoint of :func:`_level_forward` (without masks): the gradient of its output, possibly
    cropped (the rows and trailing sizes the next level or the final crop kept: zeros beyond),
    -> the gradients of ``a[:L]`` and ``d``, (L, *P) views."""
    n_q, w = plan.n_q, plan.w
    gpad = grad.new_empty((n_q + 2 * (w - 1), 2) + rest)
    gpad[: w - 1].zero_()
    gpad[w - 1 + n_q :].zero_()
    mid = gpad[w - 1 : w - 1 + n_q].view((2 * n_q,) + rest)
    if tuple(grad.shape) != tuple(mid.shape):
        mid.zero_()
        mid = mid[tuple(slice(0, s) for s in grad.shape)]
    mid.copy_(grad)
    gbuf = _stencil(taps_t, gpad.view(gpad.shape[0], 2, -1), n_q + w - 1)  # (rows, 2 bands, P)
    (main, _, _), *wraps = plan.chunks
    g = gbuf[main : main + length]  # the coefficients' own rows; the wrap rows add onto them
    for dst, src, n in wraps:
        g[src : src + n] += gbuf[dst : dst + n]
    g = g.view((length, 2) + rest)
    return g[:, 0], g[:, 1]


def _band_views(t: torch.Tensor, structure, nd: int, positions_major: bool) -> list[torch.Tensor]:
    """``t`` (flat) as its bands, approximation first: views (B, *L) of the coefficient order, or
    with ``positions_major`` the same bands stored positions-major: 1-D (L, B), 2-D (W, B, H)."""
    out, o = [], 0
    for size, shp in zip(structure.sizes, structure.shapes):
        lens = tuple(shp[len(shp) - nd :])
        v = t[o : o + size]
        if not positions_major:
            out.append(v.view((-1,) + lens))
        else:
            out.append(v.view(lens[0], -1) if nd == 1 else v.view(lens[1], -1, lens[0]))
        o += size
    return out


def _reorder(t: torch.Tensor, structure, nd: int, to_pm: bool) -> torch.Tensor:
    """The coefficient order <-> the positions-major order (each band transposed on its own); an
    exact permutation. 1-D bands: a plain 2-D transpose into a contiguous band (torch's blocked
    transpose copy)."""
    out = torch.empty_like(t)
    for src, dst_nat, dst_pm in zip(_band_views(t, structure, nd, not to_pm), _band_views(out, structure, nd, False),
                                    _band_views(out, structure, nd, True)):  # fmt: skip
        if to_pm:
            dst_pm.copy_(src.t() if nd == 1 else src.permute(2, 0, 1))
        else:
            dst_nat.copy_(src.t() if nd == 1 else src.permute(1, 2, 0))
    return out


class _Reorder(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t: torch.Tensor, structure, nd: int, to_pm: bool) -> torch.Tensor:
        ctx.args = structure, nd, to_pm
        return _reorder(t, structure, nd, to_pm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        structure, nd, to_pm = ctx.args
        return _Reorder.apply(grad, structure, nd, not to_pm), None, None, None


def reorder(t: torch.Tensor, structure, nd: int, *, to_positions_major: bool) -> torch.Tensor:
    """Flat coefficients (or a mask over them) from the coefficient order of :mod:`wavesweep.wavelets`
    to the positions-major order of :func:`synthesize`, or back. Differentiable; a copy."""
    if structure.level == 0:
        return t.clone()
    return _Reorder.apply(t, structure, nd, to_positions_major)


class _Synthesis(torch.autograd.Function):
    """``reconstruct(flat * keep)`` for every level at once, ``flat`` and ``keep`` positions-major
    -> the layout array (B, *N), contiguous. Linear, so nothing is saved but the mask; the
    backward runs the adjoint levels and writes each band's (masked) gradient straight into one
    flat gradient."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, keep: torch.Tensor | None, structure, nd: int) -> torch.Tensor:
        bands = _band_views(flat, structure, nd, True)
        keeps = [None] * len(bands) if keep is None else _band_views(keep, structure, nd, True)
        arr = structure.array_shape[len(structure.array_shape) - nd :]
        wavelet, mode, dt, dev = structure.wavelet, structure.mode, flat.dtype, flat.device
        a, ka = bands[0], keeps[0]
        if nd == 1:
            for d, kd in zip(bands[1:], keeps[1:]):
                length = d.shape[0]
                taps, _ = _tap_tensors(length, wavelet, mode, dt, dev)
                a = _level_forward(a, d, _plan(length, wavelet, mode), taps, ka, kd)
                ka = None
            out = a[: arr[0]].t()
        else:  # columns (axis -1) then rows (axis -2), as PyWavelets' idwtn; (W, B, H) then (H, B, W)
            for i in range(1, len(bands), 3):
                (ch, cv, cd), (kh, kv, kdd) = bands[i : i + 3], keeps[i : i + 3]
                n_w, _, n_h = ch.shape
                a = a[:, :, :n_h]  # waverec's crop of a one-longer approximation (rows; columns in the level)
                ka = None if ka is None else ka[:, :, :n_h]
                pw, (tw, _) = _plan(n_w, wavelet, mode), _tap_tensors(n_w, wavelet, mode, dt, dev)
                lo = _level_forward(a, cv, pw, tw, ka, kv)  # (aa, ad) along columns: (W', B, H)
                hi = _level_forward(ch, cd, pw, tw, kh, kdd)  # (da, dd)
                th, _ = _tap_tensors(n_h, wavelet, mode, dt, dev)
                ph = _plan(n_h, wavelet, mode)
                x = _level_forward(lo.permute(2, 1, 0), hi.permute(2, 1, 0), ph, th)  # along rows: (H', B, W')
                a, ka = x.permute(2, 1, 0), None
            out = a[: arr[1], :, : arr[0]].permute(1, 2, 0)
        if keep is not None:
            ctx.save_for_backward(keep)
        ctx.structure, ctx.nd = structure, nd
        return out.contiguous()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        structure, nd = ctx.structure, ctx.nd
        wavelet, mode, dt, dev = structure.wavelet, structure.mode, grad.dtype, grad.device
        keep = ctx.saved_tensors[0] if ctx.saved_tensors else None
        gflat = grad.new_empty(structure.n_coeffs)
        gbands = _band_views(gflat, structure, nd, True)  # written below, each exactly once
        keeps = [None] * len(gbands) if keep is None else _band_views(keep, structure, nd, True)
        if nd == 1:
            g = grad.t()  # (N, B)
            for i in range(len(gbands) - 1, 0, -1):
                length, rest = gbands[i].shape[0], tuple(gbands[i].shape[1:])
                _, taps_t = _tap_tensors(length, wavelet, mode, dt, dev)
                g, gd = _level_backward(g, _plan(length, wavelet, mode), taps_t, length, rest)
                _fill(gbands[i], gd, keeps[i])
        else:
            g = grad.permute(1, 0, 2)  # (H, B, W): the last level's output
            for i in range(len(gbands) - 3, 0, -3):
                n_w, b, n_h = gbands[i].shape
                pw, (_, tw) = _plan(n_w, wavelet, mode), _tap_tensors(n_w, wavelet, mode, dt, dev)
                _, th = _tap_tensors(n_h, wavelet, mode, dt, dev)
                g_lo, g_hi = _level_backward(g, _plan(n_h, wavelet, mode), th, n_h, (b, 2 * pw.n_q))
                g, g_cv = _level_backward(g_lo.permute(2, 1, 0), pw, tw, n_w, (b, n_h))
                g_ch, g_cd = _level_backward(g_hi.permute(2, 1, 0), pw, tw, n_w, (b, n_h))
                for j, gb in zip(range(i, i + 3), (g_ch, g_cv, g_cd)):
                    _fill(gbands[j], gb, keeps[j])
                g = g.permute(2, 1, 0)  # the previous level's output (H, B, W), cropped
            g = g.permute(2, 1, 0)  # (W, B, H)
        _fill(gbands[0], g, keeps[0])
        return gflat, None, None, None


def synthesize(flat: torch.Tensor, structure, nd: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Multilevel synthesis (``structure.level >= 1``) of ``flat * keep``, both in the
    positions-major order (:func:`reorder`; ``keep`` a 0/1 mask in ``flat``'s dtype, or None;
    gradient ``keep * ...``) -> the layout array (B, *N), cropped as
    :func:`wavesweep.wavelets_torch.reconstruct` crops. Differentiable."""
    return _Synthesis.apply(flat, keep, structure, nd)
