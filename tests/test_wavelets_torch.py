"""Torch DWT against its oracles: PyWavelets via wavesweep.wavelets, numpy's percentile, autograd's gradcheck.

Every implementation is tested on CPU: "taps" (the CPU analysis), "conv" (the CUDA default, cuDNN
there, mkldnn here) and "gemm" (the CPU synthesis, wavesweep.polyphase; its analysis is "taps").
CUDA tests run where a GPU is present. The positions-major order and the fused keep mask of
reconstruct: tests/test_polyphase.py.
"""

from __future__ import annotations

import itertools
import warnings

import numpy as np
import pytest
import torch

from wavesweep import dense, filterbank
from wavesweep import wavelets as wv
from wavesweep import wavelets_torch as wt

WAVELETS = ("haar", "db2", "db4", "sym5", "coif2", "bior1.3", "bior4.4", "rbio2.2", "dmey")

# Weight shapes: 3x3 and 1x1 convs, an odd-sized conv, a first conv (3 input channels), Linear
# layers, a weight shorter than most filters along both axes, a tiny flat tensor.
SHAPES = (
    (4, 3, 3, 3),
    (64, 64, 1, 1),
    (3, 5, 7, 9),
    (2, 3, 16, 11),
    (10, 64),
    (7, 13),
    (2, 5),
    (1, 3),
)
BACKENDS = ("taps", "conv", "gemm", "dense")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: intra-op threads only add overhead


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setattr(filterbank, "_FORCE_BACKEND", request.param)
    if request.param == "dense":  # on CPU the identity's transform is slow for long rows: short ones here
        monkeypatch.setattr(dense, "DENSE_MAX_ELEMENTS", 1 << 20)
    return request.param


def _layouts(shape):
    return [lay for lay in wv.LAYOUTS if lay != "kernel" or len(shape) == 4]


def _cases(wavelets=WAVELETS, shapes=SHAPES, levels=range(1, 6)):
    """(wavelet, layout, shape, level), one level per distinct effective level."""
    for wavelet, shape in itertools.product(wavelets, shapes):
        for layout in _layouts(shape):
            seen = set()
            for level in levels:
                eff = wv.effective_level(shape, wavelet, level, layout)
                if eff not in seen:
                    seen.add(eff)
                    yield wavelet, layout, shape, level


def _max_err(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape
    return float(np.abs(a - b).max(initial=0.0)) / max(1.0, float(np.abs(b).max(initial=0.0)))


# --------------------------------------------------------------------------- structure


def test_supported_modes_are_pywavelets_modes():
    assert wt.SUPPORTED_MODES[0] == "periodization"
    assert set(wt.SUPPORTED_MODES) == set(wv.MODES)  # every PyWavelets mode is reproduced
    assert all(wt.supports(m) for m in wt.SUPPORTED_MODES)
    assert not wt.supports("nope")


@pytest.mark.parametrize("mode", wt.SUPPORTED_MODES)
def test_structure_of_equals_decompose(mode):
    n = 0
    for wavelet, layout, shape, level in _cases():
        _, st = wv.decompose(np.zeros(shape), wavelet=wavelet, level=level, layout=layout, mode=mode)
        assert wt.structure_of(shape, wavelet=wavelet, level=level, layout=layout, mode=mode) == st, (
            wavelet, layout, shape, level)
        n += 1
    assert n > 200


def test_structure_levels_are_clamped_and_real():
    st = wt.structure_of((512, 512, 3, 3), wavelet="bior4.4", level=5, layout="filter", mode="periodization")
    assert st.level == 5 and st.shapes[0] == (512, 144) and st.n_coeffs == 512 * 4608
    st = wt.structure_of((64, 64, 3, 3), wavelet="bior4.4", level=3, layout="kernel", mode="periodization")
    assert st.level == 0 and st.shapes == ((64, 64, 3, 3),)
    st = wt.structure_of((4, 3, 3, 3), wavelet="haar", level=5, layout="kernel", mode="symmetric")
    assert st.level == 1 and st.shapes == ((4, 3, 2, 2),) * 4


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="mode"):
        wt.structure_of((4, 8), wavelet="haar", level=1, layout="filter", mode="nope")
    with pytest.raises(ValueError, match="wavelet"):
        wt.structure_of((4, 8), wavelet="nope", level=1, layout="filter", mode="zero")
    with pytest.raises(ValueError, match="kernel"):
        wt.structure_of((4, 8), wavelet="haar", level=1, layout="kernel", mode="zero")
    with pytest.raises(ValueError, match="level"):
        wt.structure_of((4, 8), wavelet="haar", level=-1, layout="filter", mode="zero")
    st = wt.structure_of((4, 8), wavelet="haar", level=1, layout="filter", mode="zero")
    with pytest.raises(ValueError, match="shape"):
        wt.decompose(torch.zeros(4, 9), st)
    with pytest.raises(ValueError, match="coefficients"):
        wt.reconstruct(torch.zeros(st.n_coeffs + 1), st)
    with pytest.raises(TypeError, match="floating"):
        wt.decompose(torch.zeros(4, 8, dtype=torch.int64), st)


# --------------------------------------------------------------------------- equality with PyWavelets


@pytest.mark.parametrize(
    "mode",  # the inner loop (-m "not slow"): the default mode and one expanding mode; the full suite: all
    [m if m in ("periodization", "symmetric") else pytest.param(m, marks=pytest.mark.slow) for m in wt.SUPPORTED_MODES],
)
def test_float64_equals_pywavelets_every_wavelet(mode, backend):
    rng = np.random.default_rng(0)
    # conv: slow on CPU; dense: builds each structure's matrices from the taps path (tested here for all)
    wavelets = WAVELETS if backend not in ("conv", "dense") else ("haar", "db4", "bior4.4", "coif2", "dmey")
    n = 0
    for wavelet, layout, shape, level in _cases(wavelets):
        w = rng.standard_normal(shape)
        want, st = wv.decompose(w, wavelet=wavelet, level=level, layout=layout, mode=mode)
        got = wt.decompose(torch.from_numpy(w), st)
        case = (wavelet, layout, shape, level, st.level)
        assert got.dtype == torch.float64 and _max_err(got, want) < 1e-10, case
        # reconstruct from arbitrary coefficients (not just a decomposition): every band matters
        c = rng.standard_normal(st.n_coeffs)
        got_w = wt.reconstruct(torch.from_numpy(c), st)
        assert tuple(got_w.shape) == shape and _max_err(got_w, wv.reconstruct(c, st)) < 1e-10, case
        n += 1
    assert n > 100


@pytest.mark.parametrize("mode", ["periodization", "symmetric", "zero", "smooth"])
def test_float32_equals_pywavelets(mode, backend):
    rng = np.random.default_rng(1)
    for wavelet, layout, shape, level in _cases(("haar", "db4", "bior4.4"), ((4, 3, 3, 3), (3, 5, 7, 9), (10, 64))):
        w = rng.standard_normal(shape).astype(np.float32)
        want, st = wv.decompose(w, wavelet=wavelet, level=level, layout=layout, mode=mode)
        got = wt.decompose(torch.from_numpy(w), st)
        assert got.dtype == torch.float32 and _max_err(got, want) < 1e-5, (wavelet, layout, shape, level)
        got_w = wt.reconstruct(torch.from_numpy(want), st)
        assert got_w.dtype == torch.float32 and _max_err(got_w, wv.reconstruct(want, st)) < 1e-5


@pytest.mark.parametrize("mode", wt.SUPPORTED_MODES)
def test_round_trip(mode):
    rng = np.random.default_rng(2)
    # dmey is not a perfect-reconstruction filter bank (see wavesweep.wavelets): left out here
    for wavelet, layout, shape, level in _cases(WAVELETS[:-1], ((3, 5, 7, 9), (10, 64), (2, 5))):
        w = torch.from_numpy(rng.standard_normal(shape))
        st = wt.structure_of(shape, wavelet=wavelet, level=level, layout=layout, mode=mode)
        back = wt.reconstruct(wt.decompose(w, st), st)
        assert back.shape == w.shape and _max_err(back, w) < 1e-10, (wavelet, layout, shape, level)


def test_level_zero_is_identity_and_dtypes_are_kept():
    w = torch.randn(8, 4, 3, 3)
    st = wt.structure_of(tuple(w.shape), wavelet="bior4.4", level=2, layout="kernel", mode="periodization")
    assert st.level == 0
    assert torch.equal(wt.decompose(w, st), w.reshape(-1))
    assert torch.equal(wt.reconstruct(w.reshape(-1), st), w)
    half = torch.randn(16, 40).half()
    st = wt.structure_of((16, 40), wavelet="db2", level=2, layout="filter", mode="periodization")
    c = wt.decompose(half, st)
    assert c.dtype == torch.float16 and wt.reconstruct(c, st).dtype == torch.float16
    want, _ = wv.decompose(half.float().numpy(), wavelet="db2", level=2, layout="filter", mode="periodization")
    assert _max_err(c.float(), want) < 1e-3


# --------------------------------------------------------------------------- gradients


GRAD_SHAPES = {"kernel": (1, 2, 10, 11), "filter": (2, 2, 2, 3), "matrix": (10, 11), "flat": (13,)}


@pytest.mark.parametrize("mode", wt.SUPPORTED_MODES)
@pytest.mark.parametrize("layout", wv.LAYOUTS)
def test_gradcheck(layout, mode, backend):
    shape = GRAD_SHAPES[layout]
    for wavelet in ("db2", "bior1.3"):
        st = wt.structure_of(shape, wavelet=wavelet, level=2, layout=layout, mode=mode)
        assert st.level >= 1
        w = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: wt.decompose(x, st), (w,), fast_mode=True)
        c = torch.randn(st.n_coeffs, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x: wt.reconstruct(x, st), (c,), fast_mode=True)


def test_masked_reconstruction_gradient_is_the_masked_analysis():
    # db2 + periodization on even lengths is an orthogonal transform: the synthesis' adjoint is the
    # analysis, so d/dc ||IDWT(c * m) - T||^2 = m * DWT(2 (IDWT(c * m) - T)), an independent check.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(8, 32, dtype=torch.float64, generator=gen)
    st = wt.structure_of(tuple(w.shape), wavelet="db2", level=3, layout="filter", mode="periodization")
    assert st.level == 3 and st.n_coeffs == w.numel()
    c = wt.decompose(w, st).requires_grad_(True)
    m = torch.rand(st.n_coeffs, generator=gen, dtype=torch.float64) > 0.7
    target = torch.randn(w.shape, generator=gen, dtype=torch.float64)
    rec = wt.reconstruct(c * m, st)
    (rec - target).square().sum().backward()
    want = m * wt.decompose(2 * (rec.detach() - target), st)
    assert torch.all(c.grad[~m] == 0) and c.grad[m].abs().min() > 0
    assert torch.allclose(c.grad, want, rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- percentile and pruning


def _percentile_arrays(rng):
    for dt in (np.float32, np.float64):
        for size in [*range(1, 41), 100, 257, 999, 1000, 4999, 5000, *rng.integers(2, 5000, 4)]:
            yield np.abs(rng.standard_normal(size)).astype(dt)
            yield (rng.integers(0, 5, size) / 7).astype(dt)  # many ties
            yield np.full(size, 0.3, dtype=dt)


@pytest.mark.parametrize("by_sort", [False, True])  # True: the accelerator's path, run on the CPU here
def test_percentile_threshold_bit_identical_on_cpu(by_sort, monkeypatch):
    real = wt._order_statistics
    monkeypatch.setattr(wt, "_order_statistics", lambda a, k, by_sort_=by_sort, **_: real(a, k, by_sort=by_sort_))
    rng = np.random.default_rng(4)
    ps = [0, 0.1, 10, 33.3, 50, 99.9, 100, *rng.uniform(0, 100, 6)]
    n = 0
    for a in _percentile_arrays(rng):
        t = torch.from_numpy(a)
        for p in ps:
            want = np.asarray(wv.percentile_threshold(a, p))
            got = wt.percentile_threshold(t, p)
            assert got.shape == () and got.dtype == t.dtype
            assert got.numpy().tobytes() == want.astype(a.dtype).tobytes() and want.dtype == a.dtype, (a.size, a.dtype, p)
            n += 1
    assert n > 3000


def test_percentile_threshold_edges():
    assert wt.percentile_threshold(torch.empty(0), 50).item() == 0.0
    assert torch.isnan(wt.percentile_threshold(torch.tensor([1.0, float("nan"), 2.0]), 50))
    assert wt.percentile_threshold(torch.tensor([3, 1, 2]), 50).item() == 2.0
    for bad in (-1, 101, float("nan"), "50"):
        with pytest.raises(ValueError, match="percentile"):
            wt.percentile_threshold(torch.ones(3), bad)


PRUNE_CASES = [
    ("filter", "bior4.4", 5, "periodization", (16, 8, 3, 3)),
    ("kernel", "haar", 2, "symmetric", (4, 3, 5, 5)),
    ("matrix", "db2", 3, "zero", (10, 64)),
    ("flat", "sym5", 4, "antireflect", (3, 5, 7, 9)),
    ("kernel", "bior4.4", 3, "periodization", (8, 4, 3, 3)),  # level 0
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("layout,wavelet,level,mode,shape", PRUNE_CASES)
def test_dwt_prune_tensor_equals_dwt_prune_array(layout, wavelet, level, mode, shape, dtype, backend):
    w = np.random.default_rng(5).standard_normal(shape).astype(dtype)
    kw = dict(wavelet=wavelet, level=level, layout=layout, mode=mode)
    tol = 1e-10 if dtype == np.float64 else 1e-5
    for extra in (
        dict(percentile=70.0),
        dict(percentile=33.3, keep_approx=True),
        dict(threshold=0.5),  # a Python float: compared in the coefficients' dtype (numpy NEP 50)
        dict(threshold=np.float32(0.25), keep_approx=True),
        dict(threshold=1e39),  # beyond float32's range: inf there, as numpy's operand (every coefficient dropped)
    ):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # numpy: overflow in the float32 cast
            want_w, want_c, want_keep, want_st = wv.dwt_prune_array(w, **kw, **extra)
        got_w, got_c, got_keep, got_st = wt.dwt_prune_tensor(torch.from_numpy(w), **kw, **extra)
        assert got_st == want_st
        assert got_keep.dtype == torch.bool
        # The masks agree except where a coefficient ties with the threshold within rounding: the
        # two transforms' coefficients differ in the last bits (summation order, the CPU's vector
        # units), which decides a tie, e.g. the exact zeros that symmetric extension gives haar.
        full = np.abs(wv.decompose(w, **kw)[0])
        n_approx = want_st.n_approx if extra.get("keep_approx") else 0
        thr = extra.get("threshold")
        if thr is None:
            thr = wv.percentile_threshold(full[n_approx:], extra["percentile"])
        differ = np.flatnonzero(got_keep.numpy() != want_keep)
        assert differ.size == 0 or np.all(np.abs(full[differ] - float(thr)) <= tol), (extra, full[differ], thr)
        if float(extra.get("threshold", 0.0)) == 1e39:
            assert not want_keep.any() and not got_keep.any()
        if extra.get("percentile") == 70.0:
            assert not got_keep.all()  # (with keep_approx every coefficient may be kept: exact zeros, level 0)
        assert got_c.dtype == torch.from_numpy(w).dtype and _max_err(got_c, want_c) < tol
        assert torch.all(got_c[~got_keep] == 0) and not torch.signbit(got_c[~got_keep]).any()
        assert got_w.shape == w.shape and _max_err(got_w, want_w) < tol
    with pytest.raises(ValueError, match="percentile or a threshold"):
        wt.dwt_prune_tensor(torch.from_numpy(w), **kw)


# --------------------------------------------------------------------------- CUDA


@cuda
@pytest.mark.parametrize("mode", wt.SUPPORTED_MODES)
@pytest.mark.parametrize("device_backend", [None, "taps"])
def test_cuda_equals_cpu(mode, device_backend, monkeypatch):
    rng = np.random.default_rng(6)
    for wavelet, layout, shape, level in _cases(("haar", "db4", "bior4.4"), ((3, 5, 7, 9), (10, 64), (2, 5))):
        w = torch.from_numpy(rng.standard_normal(shape))
        st = wt.structure_of(shape, wavelet=wavelet, level=level, layout=layout, mode=mode)
        monkeypatch.setattr(filterbank, "_FORCE_BACKEND", None)
        want_c = wt.decompose(w, st)
        want_w = wt.reconstruct(want_c, st)
        monkeypatch.setattr(filterbank, "_FORCE_BACKEND", device_backend)
        got_c = wt.decompose(w.cuda(), st)
        got_w = wt.reconstruct(got_c, st)
        assert got_c.device.type == "cuda" and got_w.device.type == "cuda"
        assert _max_err(got_c.cpu(), want_c) < 1e-10 and _max_err(got_w.cpu(), want_w) < 1e-10


@cuda
@pytest.mark.parametrize("mode", ["periodization", "symmetric"])
def test_cuda_float32_equals_pywavelets(mode):
    # float32 on the GPU: full-precision convolutions (no TF32), so ~1e-6 relative, as on CPU
    rng = np.random.default_rng(9)
    for wavelet, layout, shape, level in _cases(("db4", "bior4.4"), ((64, 64, 3, 3), (3, 5, 7, 9), (10, 64))):
        w = rng.standard_normal(shape).astype(np.float32)
        want, st = wv.decompose(w, wavelet=wavelet, level=level, layout=layout, mode=mode)
        got = wt.decompose(torch.from_numpy(w).cuda(), st)
        assert got.dtype == torch.float32 and _max_err(got.cpu(), want) < 1e-5, (wavelet, layout, shape, level)
        got_w = wt.reconstruct(torch.from_numpy(want).cuda(), st)
        assert _max_err(got_w.cpu(), wv.reconstruct(want, st)) < 1e-5


@cuda
@pytest.mark.parametrize("layout", wv.LAYOUTS)
def test_cuda_gradcheck(layout):
    shape = GRAD_SHAPES[layout]
    st = wt.structure_of(shape, wavelet="db2", level=2, layout=layout, mode="periodization")
    w = torch.randn(shape, dtype=torch.float64, device="cuda", requires_grad=True)
    # nondet_tol: CUDA's backward of a convolution sums in a non-deterministic order (atomics), so
    # two backward passes agree to float64 rounding, not bit for bit
    assert torch.autograd.gradcheck(lambda x: wt.decompose(x, st), (w,), fast_mode=True, nondet_tol=1e-12)
    c = torch.randn(st.n_coeffs, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: wt.reconstruct(x, st), (c,), fast_mode=True, nondet_tol=1e-12)


@cuda
@pytest.mark.parametrize("layout,wavelet,level,mode,shape", PRUNE_CASES)
def test_cuda_dwt_prune_tensor(layout, wavelet, level, mode, shape):
    w = np.random.default_rng(7).standard_normal(shape)
    kw = dict(wavelet=wavelet, level=level, layout=layout, mode=mode, percentile=60.0)
    want_w, want_c, want_keep, _ = wv.dwt_prune_array(w, **kw)
    got_w, got_c, got_keep, _ = wt.dwt_prune_tensor(torch.from_numpy(w).cuda(), **kw)
    assert got_keep.device.type == "cuda" and np.array_equal(got_keep.cpu().numpy(), want_keep)
    assert _max_err(got_c.cpu(), want_c) < 1e-10 and _max_err(got_w.cpu(), want_w) < 1e-10


@cuda
def test_cuda_percentile_threshold():
    rng = np.random.default_rng(8)
    for a in _percentile_arrays(rng):
        for p in (0, 10, 33.3, 50, 99.9, 100):
            want = float(wv.percentile_threshold(a, p))
            got = wt.percentile_threshold(torch.from_numpy(a).cuda(), p)
            assert got.device.type == "cuda"
            assert abs(got.item() - want) <= 1e-6 * max(1.0, abs(want))


@cuda
def test_cuda_dwt_pruning_of_a_layer_never_waits_for_the_device():
    """``torch.cuda.set_sync_debug_mode("error")`` raises on any call that synchronises with the
    device (a value read back, a blocking host copy such as ``torch.tensor(x, device=...)``).
    Pruning one layer on the GPU (transform, percentile, threshold, inverse), per layer, layers
    of one shape stacked, and magnitude's selection of several layers run without one, once each cache (filter bank, dense
    matrices) is built; random's tie counts are one sync for all its layers."""
    from wavesweep.baselines import _smallest_torch_layers

    dev = torch.device("cuda")
    w = torch.randn(64, 32, 3, 3, device=dev)
    cases = [dict(layout="filter", wavelet="bior4.4", level=5), dict(layout="kernel", wavelet="haar", level=1),
             dict(layout="matrix", wavelet="db2", level=3), dict(layout="flat", wavelet="bior2.2", level=4)]  # fmt: skip
    stack = [w, w * 3, w - 1]  # layers of one shape, pruned together
    for kw in cases:  # builds the caches; the first use may synchronise
        wt.dwt_prune_tensor(w, percentile=70, **kw)
    for kw in cases[:2]:
        wt.dwt_prune_tensors(stack, percentile=70, **kw)
    scores = [w.abs().reshape(-1), w[:7].abs().reshape(-1)]
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for kw in cases:
            wt.dwt_prune_tensor(w, percentile=70, **kw)
            wt.dwt_prune_tensor(w, threshold=0.25, **kw)
            wt.dwt_prune_tensor(w, threshold=np.float64(0.25), keep_approx=True, **kw)
        for kw in cases[:2]:  # the stacking layouts
            wt.dwt_prune_tensors(stack, percentile=70, **kw)
            wt.dwt_prune_tensors(stack, percentile=40, keep_approx=True, **kw)
        _smallest_torch_layers(scores, [1000, 300])
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError, match="synchroniz"):  # the check can fail: a tie count syncs
            _smallest_torch_layers(scores, [1000, 300], torch.Generator().manual_seed(0))
    finally:
        torch.cuda.set_sync_debug_mode(prev)


@pytest.mark.parametrize(
    "layout,wavelet,level,mode,shape",
    [("filter", "bior4.4", 5, "periodization", (32, 64, 3, 3)), ("kernel", "haar", 2, "symmetric", (6, 4, 8, 7))],
)
def test_dense_backend_is_one_matrix_product_equal_to_pywavelets(layout, wavelet, level, mode, shape, monkeypatch):
    """The dense backend (an accelerator's default for short rows) runs the whole transform as one
    product with the identity's transform, equal to PyWavelets both ways, in either coefficient
    order (flat, rows), with correct gradients."""
    monkeypatch.setattr(filterbank, "_FORCE_BACKEND", "dense")
    w = np.random.default_rng(9).standard_normal(shape)
    want, st = wv.decompose(w, wavelet=wavelet, level=level, layout=layout, mode=mode)
    assert st.level == level and wt.uses_dense(st, torch.device("cpu"))
    assert _max_err(wt.decompose(torch.from_numpy(w), st), want) < 1e-12
    c = np.random.default_rng(10).standard_normal(st.n_coeffs)
    keep = np.random.default_rng(11).random(st.n_coeffs) < 0.4
    want_w = wv.reconstruct(np.where(keep, c, 0.0), st)
    ct, kt = torch.from_numpy(c), torch.from_numpy(keep)
    assert _max_err(wt.reconstruct(ct, st, keep=kt), want_w) < 1e-12
    rows, krows = dense.to_rows(ct, st), dense.to_rows(kt, st)
    assert rows.shape == (dense.rows_of(st), st.n_coeffs // dense.rows_of(st))
    assert torch.equal(dense.from_rows(rows, st), ct)
    assert _max_err(dense.reconstruct(rows, st, keep=krows, rows=True), want_w) < 1e-12
    # positions-major input (the CPU synthesis' order) is honoured here too, not read as decompose's
    pm, kpm = wt.to_positions_major(ct, st), wt.to_positions_major(kt.double(), st)
    assert not torch.equal(pm, ct) and _max_err(wt.reconstruct(pm, st, keep=kpm, positions_major=True), want_w) < 1e-12
    x = torch.from_numpy(c[: min(st.n_coeffs, 400)]).requires_grad_(True)
    pad = torch.from_numpy(c[x.numel():])
    assert torch.autograd.gradcheck(lambda v: wt.reconstruct(torch.cat([v, pad]), st, keep=kt), (x,), fast_mode=True)


def test_dense_backend_as_an_accelerator_default(monkeypatch):
    """Where dense is the default (an accelerator; simulated here on the CPU), decompose and
    reconstruct go through it, and building its matrices uses the filter bank, not itself."""
    monkeypatch.setattr(filterbank, "_FORCE_BACKEND", None)
    monkeypatch.setattr(filterbank, "dense_backend", lambda device: filterbank._FORCE_BACKEND in (None, "dense"))
    monkeypatch.setattr(dense, "_matrices", dense._build_matrices)  # no cache: built here
    w = np.random.default_rng(12).standard_normal((8, 16, 3, 3)).astype(np.float32)
    want, st = wv.decompose(w, wavelet="bior4.4", level=5, layout="filter", mode="periodization")
    assert st.level > 0 and wt.uses_dense(st, torch.device("cpu"))
    got = wt.decompose(torch.from_numpy(w), st)
    assert got.dtype == torch.float32 and _max_err(got, want) < 1e-5
    assert _max_err(wt.reconstruct(torch.from_numpy(want), st), w) < 1e-5


@pytest.fixture
def fp32_precision_flags():
    """torch's per-backend float32 precision flags (torch 2.9+), put back as they were after the test."""
    b = torch.backends
    if not hasattr(b.cuda.matmul, "fp32_precision"):
        pytest.skip("torch before 2.9 has only the legacy allow_tf32 flags")
    flags = [b, b.cudnn, b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn, b.mkldnn, b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn.rnn]
    saved = [f.fp32_precision for f in flags]
    yield b
    for f, value in zip(flags, saved):
        f.fp32_precision = value


def test_full_float32_products_under_the_new_tf32_api(fp32_precision_flags, monkeypatch):
    """Since torch 2.9 TF32 is set per backend (``fp32_precision``), and the legacy ``allow_tf32``
    flags raise a RuntimeError once that API was used: a caller's
    ``torch.backends.cuda.matmul.fp32_precision = "tf32"``, or cuDNN's conv and RNN given different
    precisions. The dense products (an accelerator's default transform) and the conv backend's
    convolutions turned TF32 off through the legacy flags, so on a GPU every dwt pruning and
    fine-tuning step raised there; and after a ``set_float32_matmul_precision("medium")`` the
    products left a state whose ``get_float32_matmul_precision()`` raises. Now: full float32
    inside, the caller's settings as they were after. (The flags are host state: the CUDA branch
    of the conv backend's guard runs here without a GPU.)"""
    b = fp32_precision_flags
    monkeypatch.setattr(filterbank, "_FORCE_BACKEND", "dense")
    w = np.random.default_rng(13).standard_normal((8, 4, 3, 3)).astype(np.float32)
    want, st = wv.decompose(w, wavelet="bior4.4", level=3, layout="filter", mode="periodization")
    assert wt.uses_dense(st, torch.device("cpu"))

    torch.set_float32_matmul_precision("medium")
    with dense._full_precision():
        assert b.cuda.matmul.fp32_precision == "ieee"
    assert torch.get_float32_matmul_precision() == "medium"
    torch.set_float32_matmul_precision("highest")

    b.cuda.matmul.fp32_precision = "tf32"
    b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision = "tf32", "ieee"
    got = wt.decompose(torch.from_numpy(w), st)
    assert _max_err(got, want) < 1e-5 and _max_err(wt.reconstruct(got, st), w) < 1e-5
    with dense._full_precision():
        assert b.cuda.matmul.fp32_precision == "ieee"
    with filterbank._no_tf32(torch.device("cuda")):
        assert b.cudnn.conv.fp32_precision == "ieee" and b.cudnn.rnn.fp32_precision == "ieee"
    assert (b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision, b.cudnn.rnn.fp32_precision) == ("tf32", "tf32", "ieee")


@pytest.mark.parametrize(
    "layout,wavelet,level,mode,shape",
    [("filter", "bior4.4", 5, "periodization", (16, 32, 3, 3)), ("kernel", "haar", 2, "symmetric", (6, 4, 8, 7)),
     ("filter", "db2", 2, "zero", (0, 24))],
)
def test_dense_stacked_transform_is_one_product_and_one_gather_equal_to_pywavelets(layout, wavelet, level, mode, shape, monkeypatch):
    """Layers of one shape on the dense backend (an accelerator's default) go through one product
    and one gather each way: decompose_stacked's rows are each layer's PyWavelets coefficients,
    reconstruct_stacked inverts them, and the gather equals the band-by-band reorder bit for bit
    (to_rows / from_rows too, a layer without rows included). Operators counted: one ``mm`` and
    one ``index_select`` a way, no band split."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket).replace("aten.", ""))
            return func(*args, **(kwargs or {}))

    monkeypatch.setattr(filterbank, "_FORCE_BACKEND", "dense")
    rng = np.random.default_rng(14)
    ws = [rng.standard_normal(shape) for _ in range(3)]
    st = wt.structure_of(shape, wavelet=wavelet, level=level, layout=layout, mode=mode)
    assert st.level == level and wt.uses_dense(st, torch.device("cpu"))
    wt.decompose_stacked([torch.from_numpy(w) for w in ws], st)  # the matrices and index vectors, built once
    with Count() as fwd:
        rows = wt.decompose_stacked([torch.from_numpy(w) for w in ws], st)
    assert rows.shape == (3, st.n_coeffs)
    for w, r in zip(ws, rows):
        assert _max_err(r, wv.decompose(w, wavelet=wavelet, level=level, layout=layout, mode=mode)[0]) < 1e-12
    with Count() as inv:
        back = wt.reconstruct_stacked(rows, st)
    assert back.shape == (3, *shape) and _max_err(back, np.stack(ws)) < 1e-10  # two float64 products of 288-long rows
    if st.n_coeffs:
        assert fwd.ops.count("mm") == inv.ops.count("mm") == 1
        assert fwd.ops.count("index_select") == inv.ops.count("index_select") == 1
        assert "split_with_sizes" not in fwd.ops + inv.ops
    # the gather is the band-by-band reorder, exactly, both ways and for one layer
    layer_rows = torch.from_numpy(rng.standard_normal((3 * dense.rows_of(st), sum(dense.row_sizes(st)))))
    stacked = dense.rows_to_stacked(layer_rows, st, 3)
    by_band = torch.stack([dense._from_rows_by_band(part, st) for part in layer_rows.chunk(3)]) if st.n_coeffs else stacked
    assert torch.equal(stacked, by_band)
    assert torch.equal(dense.stacked_to_rows(stacked, st), layer_rows)
    flat = stacked[0]
    assert torch.equal(dense.to_rows(flat, st), dense._to_rows_by_band(flat, st))
    assert torch.equal(dense.from_rows(dense.to_rows(flat, st), st), flat)


def test_dense_matrix_cache_is_bounded_by_bytes_least_recently_used_first():
    """The cache keeps at most its byte budget (never less than the pair in use), evicts the least
    recently used pair first, and a pair it rebuilds equals the one it dropped."""
    structs = [wt.structure_of((4, n), wavelet="db2", level=2, layout="filter", mode="periodization") for n in (16, 24, 32)]
    keys = [dense._key(st) for st in structs]
    pair_bytes = [2 * 4 * n * n for n in (16, 24, 32)]  # float32, periodization: n coefficients per n samples
    cache = dense._MatrixCache(max_bytes=pair_bytes[0] + pair_bytes[1])
    cpu = torch.device("cpu")
    first = cache(keys[0], cpu, torch.float32)
    assert sum(t.numel() * t.element_size() for t in first) == pair_bytes[0] == cache.nbytes
    cache(keys[1], cpu, torch.float32)
    assert cache(keys[0], cpu, torch.float32) is first  # a hit, and now the most recently used
    cache(keys[2], cpu, torch.float32)  # over budget: keys[1] (least recently used) goes, then keys[0]
    assert len(cache) == 1 and cache.nbytes == pair_bytes[2]
    again = cache(keys[0], cpu, torch.float32)
    assert again is not first and all(torch.equal(a, b) for a, b in zip(again, first))
    tiny = dense._MatrixCache(max_bytes=1)  # smaller than any pair: still holds the one in use
    assert tiny(keys[2], cpu, torch.float32) is tiny(keys[2], cpu, torch.float32) and len(tiny) == 1
    assert dense._matrices.max_bytes == dense.DENSE_CACHE_BYTES


# --------------------------------------------------------------------------- several weights of one shape at once


@pytest.mark.parametrize("by_sort", [False, True])
def test_percentile_threshold_rows_is_each_rows_own_bit_for_bit(by_sort, monkeypatch):
    """Every row's threshold equals percentile_threshold of that row alone, and numpy's, bit for
    bit (ties, NaN rows, constant rows, both selection paths)."""
    real = wt._order_statistics
    monkeypatch.setattr(wt, "_order_statistics", lambda a, k, by_sort_=by_sort, **_: real(a, k, by_sort=by_sort_))
    rng = np.random.default_rng(8)
    for dt in (np.float32, np.float64):
        for n in (1, 2, 3, 17, 1000):
            rows = np.abs(rng.standard_normal((6, n))).astype(dt)
            rows[1] = (rng.integers(0, 4, n) / 3).astype(dt)  # ties
            rows[2] = 0.5
            rows[4, n // 2] = np.nan
            t = torch.from_numpy(rows)
            for p in (0, 0.1, 33.3, 50, 70, 99.9, 100):
                got = wt.percentile_threshold_rows(t, p)
                assert got.shape == (6,) and got.dtype == t.dtype
                for i in range(6):
                    want = np.asarray(wv.percentile_threshold(rows[i], p)).astype(dt)
                    assert got[i].numpy().tobytes() == want.tobytes(), (dt, n, p, i)
                    assert got[i].numpy().tobytes() == wt.percentile_threshold(t[i], p).numpy().tobytes()
    assert wt.percentile_threshold_rows(torch.empty(3, 0), 50).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="expected \\(rows, n\\)"):
        wt.percentile_threshold_rows(torch.ones(4), 50)


STACK_SHAPES = ((6, 3, 3, 3), (4, 5, 6, 7), (5, 40), (8, 2, 1, 1))


@pytest.mark.parametrize("layout", wt.STACKING_LAYOUTS)
@pytest.mark.parametrize("shape", STACK_SHAPES)
@pytest.mark.parametrize("wavelet,mode", [("bior4.4", "periodization"), ("db2", "symmetric"), ("haar", "zero")])
def test_stacked_transform_is_each_weights_own(backend, layout, shape, wavelet, mode):
    """decompose_stacked's row i is decompose(ws[i]) and reconstruct_stacked inverts it, in every
    backend, to float tolerance (float64: 1e-12), against PyWavelets too."""
    if layout == "kernel" and len(shape) != 4:
        pytest.skip("kernel needs a 4-D weight")
    rng = np.random.default_rng(3)
    ws = [torch.from_numpy(rng.standard_normal(shape)) for _ in range(3)]
    st = wt.structure_of(shape, wavelet=wavelet, level=5, layout=layout, mode=mode)
    rows = wt.decompose_stacked(ws, st)
    assert rows.shape == (3, st.n_coeffs) and rows.dtype == torch.float64
    for i, w in enumerate(ws):
        assert _max_err(rows[i], wt.decompose(w, st)) < 1e-12
        assert _max_err(rows[i], wv.decompose(w.numpy(), wavelet=wavelet, level=5, layout=layout, mode=mode)[0]) < 1e-10
    back = wt.reconstruct_stacked(rows, st)
    assert back.shape == (3,) + shape
    for i, w in enumerate(ws):
        assert _max_err(back[i], w) < 1e-10
    assert torch.equal(wt.decompose_stacked(ws[:1], st)[0], wt.decompose(ws[0], st))  # one weight: decompose itself


@pytest.mark.parametrize("layout", wt.STACKING_LAYOUTS)
def test_dwt_prune_tensors_is_dwt_prune_tensor_of_each(backend, layout):
    """Pruned together, each weight gets its own percentile (not one over all of them), its own
    mask and coefficients, as pruned alone; a given threshold applies to all."""
    rng = np.random.default_rng(6)
    shape = (6, 4, 5, 5)
    # different scales: one percentile over all the weights would drop most of the small one
    ws = [torch.from_numpy((rng.standard_normal(shape) * s).astype(np.float32)) for s in (0.01, 1.0, 30.0)]
    kw = dict(wavelet="bior2.2", level=3, layout=layout, mode="periodization")
    for extra in (dict(percentile=60.0), dict(percentile=25.0, keep_approx=True), dict(threshold=0.5)):
        rec, coeffs, keep, st = wt.dwt_prune_tensors(ws, **kw, **extra)
        assert rec.shape == (3,) + shape and keep.dtype == torch.bool
        for i, w in enumerate(ws):
            r1, c1, k1, st1 = wt.dwt_prune_tensor(w, **kw, **extra)
            assert st1 == st
            assert torch.equal(keep[i], k1), (extra, i)
            assert _max_err(coeffs[i], c1) <= 1e-5 * float(w.abs().max())
            assert _max_err(rec[i], r1) <= 1e-5 * float(w.abs().max())
        if "percentile" in extra and not extra.get("keep_approx"):
            frac = (~keep).float().mean(dim=1)
            assert torch.all((frac - 0.6).abs() < 0.01), frac  # each weight its own 60 %


def test_dwt_prune_tensors_refuses_what_cannot_stack():
    kw = dict(wavelet="haar", level=1, percentile=50)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        wt.dwt_prune_tensors([torch.ones(4, 4), torch.ones(4, 5)], layout="filter", **kw)
    with pytest.raises(ValueError, match="one shape, dtype and device"):
        wt.dwt_prune_tensors([torch.ones(4, 4), torch.ones(4, 4, dtype=torch.float64)], layout="filter", **kw)
    with pytest.raises(ValueError, match="layout 'matrix' transforms a weight as a whole; stacking needs one of: filter, kernel"):
        wt.dwt_prune_tensors([torch.ones(4, 4), torch.ones(4, 4)], layout="matrix", **kw)
    with pytest.raises(ValueError, match="no weights"):
        wt.dwt_prune_tensors([], layout="filter", **kw)


def test_stacked_transforms_refuse_weights_and_rows_of_another_shape():
    """With several weights, decompose_stacked reshaped any of as many elements (a (6, 6) weight
    for a (4, 9) structure) and transformed it along the wrong rows; reconstruct_stacked's rows of
    another width were torch's split_with_sizes error."""
    st = wt.structure_of((4, 9), wavelet="haar", level=1, layout="filter", mode="periodization")
    with pytest.raises(ValueError, match=r"weights stacked need the structure's shape \(4, 9\) and one dtype; got \(6, 6\)"):
        wt.decompose_stacked([torch.ones(6, 6), torch.ones(6, 6)], st)
    with pytest.raises(ValueError, match=r"got \(36,\) torch.float32 beside \(4, 9\)"):
        wt.decompose_stacked([torch.ones(4, 9), torch.ones(36)], st)
    with pytest.raises(ValueError, match=r"got \(4, 9\) torch.float64 beside \(4, 9\) torch.float32"):
        wt.decompose_stacked([torch.ones(4, 9), torch.ones(4, 9, dtype=torch.float64)], st)
    rows = wt.decompose_stacked([torch.ones(4, 9), torch.zeros(4, 9)], st)
    with pytest.raises(ValueError, match=rf"expected coefficient rows \(L, {st.n_coeffs}\), got tensor of shape \(2, {st.n_coeffs + 1}\)"):
        wt.reconstruct_stacked(torch.cat([rows, rows[:, :1]], dim=1), st)


@pytest.mark.parametrize("kind", ["numpy", "tensor"])
def test_a_float64_threshold_is_compared_with_float32_coefficients_in_float64(kind):
    """numpy compares float32 |c| with a float64 threshold in float64; torch's promotion rounded a
    0-dim float64 threshold to float32 first (a 0-dim tensor has no say against a dimensioned
    one), so a coefficient just below the threshold was kept. prune_dwt's global threshold over a
    float32 and a float64 layer is such a threshold. Level 0: the coefficients are the weights."""
    c = np.float32(0.75257474)
    thr = float(c) + 2.0 ** -40  # above c in float64, c itself in float32
    assert np.float32(thr) == c and float(c) < thr
    w = np.array([[0.1, float(c), 0.9]], dtype=np.float32)
    threshold = np.float64(thr) if kind == "numpy" else torch.tensor(thr, dtype=torch.float64)
    _, _, keep_np, _ = wv.dwt_prune_array(w, wavelet="db4", level=0, layout="filter", threshold=np.float64(thr))
    _, _, keep, _ = wt.dwt_prune_tensor(torch.from_numpy(w), wavelet="db4", level=0, layout="filter", threshold=threshold)
    assert keep_np.tolist() == [False, False, True]
    assert keep.tolist() == keep_np.tolist()
    # a Python float is weak, as in numpy: compared in the coefficients' float32, where it is c
    _, _, keep_weak, _ = wt.dwt_prune_tensor(torch.from_numpy(w), wavelet="db4", level=0, layout="filter", threshold=thr)
    assert keep_weak.tolist() == wv.dwt_prune_array(w, wavelet="db4", level=0, layout="filter", threshold=thr)[2].tolist() == [False, True, True]


def test_a_global_threshold_over_float32_and_float64_layers_gives_numpys_masks():
    """prune_dwt(scope="global") over a float32 and a float64 layer: the torch backend kept the
    float32 weight just below the float64 threshold that the numpy backend drops."""
    from torch import nn

    from wavesweep import pruning

    net = nn.Sequential(nn.Conv2d(1, 1, 3, bias=False), nn.Conv2d(1, 1, 3, bias=False).double())
    m32 = np.float32(0.5)
    m64 = float(m32) + 2.0 ** -40
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4, float(m32), 0.6, 0.7, 0.8, 0.9]).reshape(1, 1, 3, 3))
        net[1].weight.copy_(torch.tensor([0.11, 0.21, 0.31, 0.41, m64, 0.61, 0.71, 0.81, 0.91], dtype=torch.float64).reshape(1, 1, 3, 3))
    p = 100 * 9 / 17  # of the 18 magnitudes sorted, the threshold falls on m64 exactly
    keeps = {}
    for backend in ("numpy", "torch"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 3x3 kernels' level clamped to 0
            r = pruning.prune_dwt(net, wavelet="db4", level=1, percentile=p, layout="kernel", scope="global", backend=backend)
        keeps[backend] = [np.asarray(lp.keep).astype(int).tolist() for lp in r.layers]
    assert keeps["numpy"][0] == [0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert keeps["torch"] == keeps["numpy"]


@pytest.mark.parametrize("layout, shape", [("kernel", (0, 8, 3, 3)), ("filter", (0, 8, 3, 3)), ("kernel", (4, 0, 5, 5)),
                                           ("filter", (4, 0)), ("matrix", (0, 6))])  # fmt: skip
def test_weights_without_elements_in_every_backend(backend, layout, shape):
    """A layer of 0 channels has a structure (PyWavelets'), no coefficients and no weights back,
    alone and stacked (the dense backend reshaped rows with -1, which 0 elements cannot infer)."""
    kw = dict(wavelet="haar", level=2, layout=layout, percentile=50)
    rec_np, c_np, keep_np, st_np = wv.dwt_prune_array(np.zeros(shape, np.float32), **kw)
    rec, c, keep, st = wt.dwt_prune_tensor(torch.zeros(shape), **kw)
    assert st == st_np and c.numel() == c_np.size == 0 and keep.numel() == 0 and tuple(rec.shape) == shape == rec_np.shape
    if layout in wt.STACKING_LAYOUTS:
        rec, c, keep, _ = wt.dwt_prune_tensors([torch.zeros(shape)] * 3, **kw)
        assert tuple(rec.shape) == (3,) + shape and tuple(c.shape) == (3, 0)
