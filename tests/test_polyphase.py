"""The CPU synthesis (wavesweep.polyphase, the "gemm" backend), its positions-major order and the
keep mask fused into reconstruct, against PyWavelets and autograd's gradcheck.

Plain equality of every backend with PyWavelets (forward and inverse, every wavelet, layout and
mode) and gradcheck of reconstruct: tests/test_wavelets_torch.py (BACKENDS includes "gemm").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from wavesweep import filterbank, polyphase
from wavesweep import wavelets as wv
from wavesweep import wavelets_torch as wt

from .test_wavelets_torch import GRAD_SHAPES, _cases, _max_err

SHAPES = ((4, 3, 3, 3), (3, 5, 7, 9), (2, 3, 16, 11), (10, 64), (7, 13), (2, 5), (1, 3), (3, 64))


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors: intra-op threads only add overhead


# Every mode with "gemm"; the other backends take keep and positions_major by a multiply and a
# reorder in front of their own (separately tested) synthesis: two modes each.
# The inner loop (-m "not slow") takes the default mode and one expanding mode; the full suite all.
BACKEND_MODES = [("gemm", m) for m in wt.SUPPORTED_MODES] + [
    (b, m) for b in ("taps", "conv") for m in ("periodization", "symmetric")
]
INNER_MODES = ("periodization", "symmetric")


@pytest.fixture(
    params=[bm if bm[1] in INNER_MODES else pytest.param(bm, marks=pytest.mark.slow) for bm in BACKEND_MODES],
    ids=[f"{b}-{m}" for b, m in BACKEND_MODES],
)
def mode(request, monkeypatch):
    backend, mode = request.param
    monkeypatch.setattr(filterbank, "_FORCE_BACKEND", backend)
    return mode


def test_cpu_defaults():
    cpu = torch.device("cpu")
    assert filterbank.synthesis_backend(cpu) == "gemm" and filterbank._backend(cpu) == "taps"
    assert filterbank.synthesis_backend(torch.device("cuda")) == "conv"  # CUDA keeps the conv backend


def test_positions_major_is_each_band_transposed():
    rng = np.random.default_rng(0)
    n = 0
    for wavelet, layout, shape, level in _cases(("haar", "db4", "bior4.4"), SHAPES):
        for mode in ("periodization", "symmetric"):
            st = wt.structure_of(shape, wavelet=wavelet, level=level, layout=layout, mode=mode)
            c = torch.from_numpy(rng.standard_normal(st.n_coeffs))
            pm = wt.to_positions_major(c, st)
            assert torch.equal(wt.from_positions_major(pm, st), c)
            o = 0
            for size, shp in zip(st.sizes, st.shapes):
                band = c[o : o + size]
                if st.level == 0:
                    want = band
                elif layout in ("filter", "flat"):
                    want = band.reshape(-1, shp[-1]).t().reshape(-1)  # (B, L) -> (L, B)
                else:
                    want = band.reshape((-1,) + shp[-2:]).permute(2, 0, 1).reshape(-1)  # (B, H, W) -> (W, B, H)
                assert torch.equal(pm[o : o + size], want), (wavelet, layout, shape, level)
                o += size
            m = torch.from_numpy(rng.random(st.n_coeffs) > 0.5)
            assert torch.equal(wt.from_positions_major(wt.to_positions_major(m, st), st), m)
            n += 1
    assert n > 50


def test_masked_reconstruct_equals_pywavelets(mode):
    # reconstruct(c, keep=m) == PyWavelets' inverse of c * m, in both orders, float64 and float32
    rng = np.random.default_rng(1)
    n = 0
    for wavelet, layout, shape, level in _cases(("haar", "db2", "bior4.4", "sym5", "dmey"), SHAPES):
        st = wt.structure_of(shape, wavelet=wavelet, level=level, layout=layout, mode=mode)
        c = rng.standard_normal(st.n_coeffs)
        m = rng.random(st.n_coeffs) > 0.6
        want = wv.reconstruct(c * m, st)
        case = (wavelet, layout, shape, level)
        ct, mt = torch.from_numpy(c), torch.from_numpy(m)
        for keep in (mt, mt.double()):
            assert _max_err(wt.reconstruct(ct, st, keep=keep), want) < 1e-10, case
            got = wt.reconstruct(wt.to_positions_major(ct, st), st, keep=wt.to_positions_major(keep, st),
                                 positions_major=True)  # fmt: skip
            assert got.dtype == torch.float64 and tuple(got.shape) == shape and _max_err(got, want) < 1e-10, case
        c32 = ct.float()
        got = wt.reconstruct(wt.to_positions_major(c32, st), st, keep=wt.to_positions_major(mt.float(), st),
                             positions_major=True)  # fmt: skip
        assert got.dtype == torch.float32 and _max_err(got, wv.reconstruct((c32 * mt).numpy(), st)) < 1e-5, case
        n += 1
    assert n > 50


@pytest.mark.parametrize("layout", wv.LAYOUTS)
def test_masked_gradcheck(layout, mode):
    shape = GRAD_SHAPES[layout]
    gen = torch.Generator().manual_seed(5)
    for wavelet in ("db2", "bior1.3"):
        st = wt.structure_of(shape, wavelet=wavelet, level=2, layout=layout, mode=mode)
        m = torch.rand(st.n_coeffs, generator=gen) > 0.4
        c = torch.randn(st.n_coeffs, dtype=torch.float64, generator=gen, requires_grad=True)
        for pm in (False, True):
            keep = wt.to_positions_major(m, st) if pm else m
            assert torch.autograd.gradcheck(lambda x: wt.reconstruct(x, st, keep=keep, positions_major=pm), (c,),
                                            fast_mode=True)  # fmt: skip
            c.grad = None
            wt.reconstruct(c, st, keep=keep, positions_major=pm).square().sum().backward()
            assert torch.all(c.grad[~keep] == 0) and c.grad[keep].abs().max() > 0
        c2 = c.detach().requires_grad_(True)
        assert torch.autograd.gradcheck(lambda x: wt.to_positions_major(x, st), (c2,), fast_mode=True)
        assert torch.autograd.gradcheck(lambda x: wt.from_positions_major(x, st), (c2,), fast_mode=True)


def test_gemm_level_plans_cover_short_bands():
    # periodization with bands shorter than the filter: the wrap rows repeat the band several times
    for wavelet in ("db4", "bior4.4", "dmey"):
        for length in (1, 2, 3, 5, 8):
            plan = polyphase._plan(length, wavelet, "periodization")
            rows = plan.n_q + plan.w - 1
            covered = sorted(r for dst, _, n in plan.chunks for r in range(dst, dst + n))
            assert covered == list(range(rows)) and plan.chunks[0][1:] == (0, length)
            assert all(0 <= src and src + n <= length for _, src, n in plan.chunks)


def test_masked_reconstruct_checks_the_mask_shape():
    st = wt.structure_of((4, 8), wavelet="haar", level=1, layout="filter", mode="zero")
    with pytest.raises(ValueError, match="keep"):
        wt.reconstruct(torch.zeros(st.n_coeffs), st, keep=torch.ones(st.n_coeffs + 1, dtype=torch.bool))
