"""Wavelet codec: round trips against PyWavelets, effective levels, thresholds, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pywt

from wavesweep import wavelets as wv

# conv (out, in, kh, kw) and linear (out, in) shapes, odd and even along every axis
SHAPES = {
    "conv_odd": (3, 5, 7, 9),
    "conv_even": (4, 2, 8, 16),
    "linear_odd": (5, 301),
    "linear_even": (6, 64),
}


def _weights(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _oracle_coeffs(w, wavelet, level, layout, mode):
    """Flat coefficients computed the slow way: one PyWavelets call per filter / per kernel."""
    if level == 0:
        arr, _ = wv.layout_array(w, layout)
        return arr.ravel()
    if layout == "filter":
        rows = [pywt.wavedec(r, wavelet, mode=mode, level=level) for r in w.reshape(w.shape[0], -1)]
        # stack band by band: (out, band_len) per band, then ravel in C order
        return np.concatenate([np.stack([r[b] for r in rows]).ravel() for b in range(level + 1)])
    if layout == "kernel":
        ks = [pywt.wavedec2(k, wavelet, mode=mode, level=level) for k in w.reshape(-1, *w.shape[-2:])]
        bands = [np.stack([k[0] for k in ks])] + [
            np.stack([k[lv][j] for k in ks]) for lv in range(1, level + 1) for j in range(3)
        ]
        return np.concatenate([b.ravel() for b in bands])
    if layout == "matrix":
        c = pywt.wavedec2(w.reshape(w.shape[0], -1), wavelet, mode=mode, level=level)
        return np.concatenate([c[0].ravel()] + [b.ravel() for d in c[1:] for b in d])
    c = pywt.wavedec(w.ravel(), wavelet, mode=mode, level=level)
    return np.concatenate([b.ravel() for b in c])


def _tol(w, wavelet="haar"):
    # dmey is an FIR approximation of the Meyer wavelet and is not a perfect-reconstruction
    # filter bank: PyWavelets itself leaves it out of its round-trip tests (~1e-2 error).
    scale = 5e-2 if wavelet == "dmey" else 2e-5
    return scale * max(1.0, float(np.abs(w).max()))


@pytest.mark.parametrize("layout", wv.LAYOUTS)
@pytest.mark.parametrize("wavelet", wv.WAVELETS)
def test_round_trip_every_wavelet_periodization(wavelet, layout):
    for kind, shape in SHAPES.items():
        w = _weights(shape)
        if layout == "kernel" and len(shape) != 4:
            with pytest.raises(ValueError, match="kernel"):
                wv.decompose(w, wavelet=wavelet, level=5, layout=layout)
            continue
        flat, st = wv.decompose(w, wavelet=wavelet, level=5, layout=layout, mode="periodization")
        assert flat.dtype == np.float32 and flat.ndim == 1 and flat.size == st.n_coeffs
        assert st.level == wv.effective_level(shape, wavelet, 5, layout)
        rec = wv.reconstruct(flat, st)
        assert rec.dtype == np.float32 and rec.shape == shape
        np.testing.assert_allclose(rec, w, rtol=0, atol=_tol(w, wavelet), err_msg=f"{kind}")
        # threshold 0 zeroes nothing and reconstructs the input
        rec0, coeffs0, keep0, _ = wv.dwt_prune_array(w, wavelet=wavelet, level=5, percentile=0, layout=layout)
        assert keep0.all()
        np.testing.assert_allclose(rec0, w, rtol=0, atol=_tol(w, wavelet))


@pytest.mark.parametrize("layout", wv.LAYOUTS)
@pytest.mark.parametrize("wavelet", ["haar", "db2", "sym5", "bior4.4", "coif3", "rbio3.1"])
def test_vectorised_coeffs_equal_per_filter_pywt(wavelet, layout):
    shape = SHAPES["conv_odd"] if layout == "kernel" else (6, 3, 5, 7)
    w = _weights(shape, seed=1)
    flat, st = wv.decompose(w, wavelet=wavelet, level=3, layout=layout, mode="periodization")
    oracle = _oracle_coeffs(w, wavelet, st.level, layout, "periodization")
    np.testing.assert_allclose(flat, oracle, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [m for m in wv.MODES if m != "periodization"])
@pytest.mark.parametrize("wavelet", ["haar", "db3", "sym4", "bior4.4", "coif2"])
def test_round_trip_other_modes(mode, wavelet):
    for layout in wv.LAYOUTS:
        for shape in SHAPES.values():
            if layout == "kernel" and len(shape) != 4:
                continue
            w = _weights(shape, seed=2)
            flat, st = wv.decompose(w, wavelet=wavelet, level=2, layout=layout, mode=mode)
            rec = wv.reconstruct(flat, st)
            np.testing.assert_allclose(rec, w, rtol=0, atol=_tol(w), err_msg=f"{layout} {shape}")
            assert st.n_coeffs >= math.prod(shape)
            if st.level > 0 and wavelet != "haar":  # expansive modes: more coefficients than weights
                assert st.n_coeffs > math.prod(shape)
            np.testing.assert_allclose(flat, _oracle_coeffs(w, wavelet, st.level, layout, mode), rtol=1e-5, atol=1e-5)


def test_effective_levels():
    assert wv.effective_level((64, 64, 3, 3), "bior4.4", 5, "kernel") == 0
    assert wv.effective_level((64, 64, 3, 3), "haar", 5, "kernel") == 1
    for out, inp in [(64, 64), (128, 64), (128, 128), (256, 128), (256, 256), (512, 256), (512, 512)]:
        assert wv.effective_level((out, inp, 3, 3), "bior4.4", 5, "filter") == 5
    # matrix: minimum over both axes, as PyWavelets computes it
    dec = pywt.Wavelet("db4").dec_len
    expect = min(pywt.dwt_max_level(64, dec), pywt.dwt_max_level(3 * 49, dec))
    assert wv.effective_level((64, 3, 7, 7), "db4", 5, "matrix") == min(5, expect)
    assert wv.effective_level((10, 1000), "haar", 2, "flat") == 2  # below the max: unchanged


@pytest.mark.parametrize("percentile", [0.0, 10.0, 37.5, 50.0, 90.0, 100.0])
@pytest.mark.parametrize("keep_approx", [False, True])
def test_threshold_matches_numpy_percentile(percentile, keep_approx):
    w = _weights((8, 4, 3, 3), seed=3)
    rec, coeffs, keep, st = wv.dwt_prune_array(
        w, wavelet="db2", level=2, percentile=percentile, layout="filter", keep_approx=keep_approx
    )
    full, _ = wv.decompose(w, wavelet="db2", level=2, layout="filter")
    start = st.n_approx if keep_approx else 0
    thr = np.percentile(np.abs(full[start:]), percentile)
    expect_keep = np.abs(full) >= thr
    expect_keep[:start] = True
    np.testing.assert_array_equal(keep, expect_keep)
    np.testing.assert_array_equal(coeffs, np.where(expect_keep, full, 0))
    if keep_approx:
        np.testing.assert_array_equal(coeffs[: st.n_approx], full[: st.n_approx])
    np.testing.assert_allclose(rec, wv.reconstruct(np.where(expect_keep, full, 0).astype(np.float32), st))


def _percentile_cases():
    rng = np.random.default_rng(11)
    for i in range(400):
        n = int(rng.integers(1, 4000))
        a = [
            np.abs(rng.standard_normal(n)).astype(np.float32),
            rng.integers(0, 5, n).astype(np.float32),  # many ties
            np.abs(rng.standard_normal(n)),  # float64
            (rng.integers(0, 50, n) / 7).astype(np.float32),
        ][i % 4]
        for p in (0, 0.1, 10, 33.3, 50, 50.0, 99.9, 100, float(rng.uniform(0, 100))):
            yield a, p


def test_percentile_threshold_is_numpy_percentile_bit_for_bit():
    """The one-partition fast path equals np.percentile exactly (value and type), ties included."""
    n = 0
    for a, p in _percentile_cases():
        got, expect = wv.percentile_threshold(a.copy(), p), np.percentile(a, p)
        assert got == expect and type(got) is type(expect), (a.size, a.dtype, p, got, expect)
        n += 1
    assert n == 3600
    big = np.abs(np.random.default_rng(0).standard_normal(2_000_001)).astype(np.float32)
    for p in (50.0, 12.5, 87.3):
        assert wv.percentile_threshold(big, p) == np.percentile(big, p)
    nan = np.array([1.0, np.nan, 2.0, 3.0], dtype=np.float32)  # NaN: numpy's own answer (nan)
    assert np.isnan(wv.percentile_threshold(nan, 50)) and np.isnan(np.percentile(nan, 50))
    assert wv.percentile_threshold(np.zeros(0, np.float32), 50) == 0.0
    with pytest.raises(ValueError, match="percentile must be a number in \\[0, 100\\], got 101"):
        wv.percentile_threshold(big, 101)


def test_level_zero_is_identity():
    w = _weights((4, 4, 3, 3))
    flat, st = wv.decompose(w, wavelet="bior4.4", level=5, layout="kernel")
    assert st.level == 0 and st.n_approx == st.n_coeffs == w.size
    np.testing.assert_array_equal(flat, w.ravel())
    np.testing.assert_array_equal(wv.reconstruct(flat, st), w)


def test_structure_json_round_trip_and_validation():
    _, st = wv.decompose(_weights((4, 3, 5, 5)), wavelet="sym3", level=2, layout="matrix", mode="symmetric")
    assert wv.CoeffStructure.from_json(st.to_json()) == st
    bad = st.to_json() | {"wavelet": "nope"}
    with pytest.raises(ValueError, match="nope"):
        wv.CoeffStructure.from_json(bad)
    with pytest.raises(ValueError):
        wv.reconstruct(np.zeros(st.n_coeffs + 1, np.float32), st)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(wavelet="db99"), r"unknown wavelet 'db99'; valid: .*haar"),
        (dict(mode="mirror"), r"unknown mode 'mirror'; valid: .*periodization"),
        (dict(layout="rows"), r"unknown layout 'rows'; valid: kernel, filter, matrix, flat"),
        (dict(level=0), r"level .* 1\.\.5, got 0"),
        (dict(level=6), r"got 6"),
        (dict(level=2.0), r"got 2\.0"),
        (dict(level=True), r"got True"),
        (dict(percentile=-0.1), r"\[0, 100\], got -0\.1"),
        (dict(percentile=100.5), r"got 100\.5"),
        (dict(percentile=float("nan")), r"got nan"),
        (dict(percentile="50"), r"got '50'"),
    ],
)
def test_validate_dwt_args_errors(kwargs, match):
    args = dict(wavelet="haar", level=1, layout="filter", mode="periodization", percentile=50.0) | kwargs
    with pytest.raises(ValueError, match=match):
        wv.validate_dwt_args(**args)


def test_validate_accepts_every_registry_entry():
    for wavelet in wv.WAVELETS:
        wv.validate_dwt_args(wavelet=wavelet, level=1, layout="flat", mode="zero", percentile=0)
    for mode in wv.MODES:
        for layout in wv.LAYOUTS:
            wv.validate_dwt_args(wavelet="haar", level=5, layout=layout, mode=mode, percentile=100)


def test_kernel_layout_rejects_linear():
    with pytest.raises(ValueError, match=r"kernel.*4-D.*\(5, 7\)"):
        wv.effective_level((5, 7), "haar", 1, "kernel")


def _names_in(message: str) -> set[str]:
    """The wavelet names a 'valid: ...' list gives, with runs such as ``db1..db38`` expanded."""
    names = set()
    for part in message.split("valid: ", 1)[1].split(";")[0].split(", "):
        first, _, last = part.partition("..")
        if last:
            fam = first.rstrip("0123456789")
            names |= {f"{fam}{i}" for i in range(int(first[len(fam) :]), int(last[len(fam) :]) + 1)}
        else:
            names.add(first)
    return names


@pytest.mark.parametrize(
    "bad, continuous", [("morl", True), ("cmor1.5-1.0", True), ("mexh", True), ("nope", False), ("sym21", False)]
)
def test_unknown_wavelet_error_is_one_line_with_every_discrete_name(bad, continuous):
    """The error names the value, says when PyWavelets knows it as a continuous wavelet (no DWT),
    and its valid list is exactly ``pywt.wavelist(kind='discrete')``. The list used to be cut at
    600 characters, after rbio3.7: rbio3.9 .. rbio6.8 and every sym wavelet were left out, and
    'morl' read like a typo."""
    from wavesweep import wavelets_torch as wt

    if continuous:  # as PyWavelets knows it
        assert isinstance(pywt.DiscreteContinuousWavelet(bad), pywt.ContinuousWavelet)
    for call in (
        lambda: wv.validate_dwt_args(wavelet=bad, level=1, layout="filter", mode="periodization", percentile=50),
        lambda: wv.decompose(np.zeros((2, 8), np.float32), wavelet=bad, level=1, layout="filter"),
        lambda: wt.structure_of((2, 8), wavelet=bad, level=1, layout="filter", mode="periodization"),
    ):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(f"unknown wavelet {bad!r}")
        assert ("continuous wavelet" in msg) == continuous
        assert _names_in(msg) == set(pywt.wavelist(kind="discrete"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_zero_dropped_is_np_where_bit_for_bit(dtype):
    """The branch-free zeroing of dropped coefficients writes exactly ``np.where(keep, c, 0)``'s
    bits: +0.0 where dropped (also for negative values and -0.0), every kept value untouched
    (-0.0, subnormals, infinities included); float16 takes ``np.where`` itself."""
    rng = np.random.default_rng(3)
    c = rng.standard_normal(10_001).astype(dtype)
    c[:6] = [-0.0, 0.0, -np.inf, np.inf, np.finfo(dtype).tiny / 4, -np.finfo(dtype).tiny / 4]
    for keep in (rng.random(c.size) < 0.5, np.ones(c.size, bool), np.zeros(c.size, bool)):
        keep[:6] = [True, True, True, True, False, False] if keep.any() and not keep.all() else keep[:6]
        want = np.where(keep, c, c.dtype.type(0))
        got = wv.zero_dropped(c.copy(), keep)
        assert got.dtype == want.dtype
        assert np.array_equal(got.view(f"u{c.itemsize}"), want.view(f"u{c.itemsize}"))
    assert np.signbit(wv.zero_dropped(np.array([-1.5, -0.0], dtype), np.array([False, False]))).sum() == 0
    ints = (rng.random(c.size) < 0.5).astype(np.int8) * 2  # a keep that is not a bool mask: np.where's truth
    assert np.array_equal(wv.zero_dropped(c.copy(), ints).view(f"u{c.itemsize}"),
                          np.where(ints, c, c.dtype.type(0)).view(f"u{c.itemsize}"))
    view = c[::2]  # not one contiguous run: np.where's new array, the input left alone
    before = view.copy()
    assert np.array_equal(wv.zero_dropped(view, np.zeros(view.size, bool)), np.zeros(view.size, dtype))
    assert np.array_equal(view, before)
