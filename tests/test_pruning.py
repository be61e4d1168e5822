"""Pruning methods: torch.nn.utils.prune masks as oracle, exact counts, determinism, errors."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pywt
import pytest
import torch
import torch.nn.utils.prune as tprune
import torchvision
from torch import nn

from wavesweep import baselines
from wavesweep import pruning as P
from wavesweep import wavelets as wv

PRUNE = {"magnitude": P.prune_magnitude, "random": P.prune_random}


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def small_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 5, bias=False),
        nn.Flatten(),
        nn.Linear(6 * 4, 10),
    )


def mid_net(seed=0):
    """Odd-sized convs and a linear layer: fast stand-in for counting tests."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 17, 3),
        nn.Conv2d(17, 33, 5),
        nn.Conv2d(33, 7, 1),
        nn.Flatten(),
        nn.Linear(7, 11),
    )


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _masks_equal_up_to_ties(ours_w, ref_mask, orig_w):
    """Masks agree wherever |w| is not tied with the largest pruned magnitude (numpy: fast)."""
    ours = ours_w.detach().numpy().reshape(-1) != 0
    ref = ref_mask.detach().numpy().reshape(-1) != 0
    a = np.abs(orig_w.detach().numpy().reshape(-1))
    diff = ours != ref
    if diff.any():
        assert np.all(a[diff] == a[~ref].max())
    assert np.count_nonzero(~ours) == np.count_nonzero(~ref)


# --------------------------------------------------------------------------- targets


def test_target_layers(resnet):
    convs = [n for n, m in resnet.named_modules() if isinstance(m, nn.Conv2d)]
    assert [n for n, _ in P.target_layers(resnet)] == convs
    both = [n for n, _ in P.target_layers(resnet, ("conv", "linear"))]
    assert both == convs + ["fc"]
    assert [n for n, _ in P.target_layers(resnet, "linear")] == ["fc"]


def test_target_layer_errors():
    with pytest.raises(ValueError, match=r"Sequential.*no target layers.*\['conv'\]"):
        P.target_layers(nn.Sequential(nn.ReLU(), nn.Linear(2, 2)))
    with pytest.raises(ValueError, match=r"unknown target 'bn'; valid: conv, linear"):
        P.target_layers(small_net(), ("bn",))
    with pytest.raises(ValueError, match="no target layers"):
        P.prune_dwt(nn.Sequential(nn.ReLU()), wavelet="haar", level=1, percentile=50)


def test_tied_weights_are_one_clear_line_and_a_shared_module_is_one_layer():
    """Two target layers sharing one weight tensor cannot be two records (the accounting, the
    checkpoint and fine-tuning hold one per weight): every method stops with one line naming
    both. One module used twice is one layer (``named_modules``), pruned once."""
    tied = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    tied[2].weight = tied[0].weight
    calls = [lambda m: P.target_layers(m), lambda m: P.prune_dwt(m, wavelet="haar", level=1, percentile=50),
             lambda m: P.prune_magnitude(m, 0.5), lambda m: P.prune_random(m, 0.5)]  # fmt: skip
    for call in calls:
        with pytest.raises(ValueError, match=r"^target layers '0' and '2' share one weight tensor \(tied weights\)") as e:
            call(tied)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=r"'\(root\)' and '1\.0'"):
        root = nn.Linear(3, 3)
        root.add_module("1", nn.Sequential(nn.Linear(3, 3)))
        root.get_submodule("1.0").weight = root.weight
        P.target_layers(root, "linear")
    conv = nn.Conv2d(4, 4, 3, padding=1)
    shared = nn.Sequential(conv, nn.ReLU(), conv)
    assert [n for n, _ in P.target_layers(shared)] == ["0"]
    res = P.prune_magnitude(shared, 0.5)
    assert [lp.name for lp in res.layers] == ["0"] and res.model[0] is res.model[2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_zero_weight_writes_the_bits_masked_fill_writes(dtype, channels_last):
    """zero_weight's bitwise AND on the CPU: the same bits as ``masked_fill_(mask, 0)`` (+0.0 where
    pruned, negative weights and -0.0 too; every kept weight untouched, -0.0 and infinities
    included), in any memory format, on a Parameter that requires grad, with its version bumped
    as an in-place write does."""
    from wavesweep.prune_record import zero_weight

    conv = nn.Conv2d(16, 32, 3).to(dtype)
    with torch.no_grad():
        conv.weight.view(-1)[:4] = torch.tensor([-0.0, float("-inf"), float("inf"), -1.0])
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    rng = np.random.default_rng(0)
    for prune in (rng.random(conv.weight.numel()) < 0.5, np.zeros(conv.weight.numel(), bool), np.ones(conv.weight.numel(), bool)):
        want = conv.weight.detach().clone().masked_fill_(torch.from_numpy(prune).reshape(conv.weight.shape), 0)
        got = copy.deepcopy(conv)
        version = got.weight._version
        zero_weight(got, prune)
        assert got.weight._version > version and got.weight.requires_grad and got.weight.dtype == dtype
        assert got.weight.stride() == conv.weight.stride()
        bits = {torch.float64: torch.int64, torch.float32: torch.int32}.get(dtype, torch.int16)
        assert torch.equal(got.weight.detach().view(bits), want.view(bits))


# --------------------------------------------------------------------------- magnitude


#: the torch.nn.utils.prune oracles on a small net (inner loop) and on ResNet-18 (full suite)
ORACLE_NETS = ["mid", pytest.param("resnet18", marks=pytest.mark.slow)]


def _oracle_net(name: str, request: pytest.FixtureRequest) -> nn.Module:
    return mid_net() if name == "mid" else request.getfixturevalue("resnet")


@pytest.mark.parametrize("net", ORACLE_NETS)
@pytest.mark.parametrize("amount", [0.3])
def test_magnitude_equals_torch_l1_unstructured(net, amount, request):
    resnet = _oracle_net(net, request)
    res = P.prune_magnitude(resnet, amount)
    ref = copy.deepcopy(resnet)
    pruned = dict(res.model.named_modules())
    base = dict(resnet.named_modules())
    for name, m in P.target_layers(ref):
        tprune.l1_unstructured(m, "weight", amount)
        _masks_equal_up_to_ties(pruned[name].weight, m.weight_mask, base[name].weight)
        w_ours, w_ref = pruned[name].weight.detach().numpy(), m.weight.detach().numpy()
        both = (w_ours != 0) & (m.weight_mask.numpy() != 0)
        np.testing.assert_array_equal(w_ours[both], w_ref[both])  # kept values untouched


@pytest.mark.parametrize("net", ORACLE_NETS)
@pytest.mark.parametrize("amount", [0.15])  # small k keeps the torch.topk oracle fast
def test_magnitude_global_equals_torch_global_unstructured(net, amount, request):
    resnet = _oracle_net(net, request)
    res = P.prune_magnitude(resnet, amount, scope="global")
    ref = copy.deepcopy(resnet)
    layers = P.target_layers(ref)
    tprune.global_unstructured([(m, "weight") for _, m in layers], tprune.L1Unstructured, amount=amount)
    pruned = dict(res.model.named_modules())
    ours = torch.cat([(pruned[n].weight != 0).reshape(-1) for n, _ in layers])
    refm = torch.cat([m.weight_mask.bool().reshape(-1) for _, m in layers])
    orig = torch.cat([dict(resnet.named_modules())[n].weight.reshape(-1) for n, _ in layers])
    _masks_equal_up_to_ties(ours, refm, orig)
    total = orig.numel()
    assert res.n_zeroed == round(amount * total)


@pytest.mark.parametrize("method", ["magnitude", "random"])
@pytest.mark.parametrize("amount", [0.0, 0.013, 0.5, 0.999, 1.0])
def test_exact_counts_per_layer(method, amount):
    res = PRUNE[method](mid_net(), amount=amount, targets=("conv", "linear"))
    for lp, (name, m) in zip(res.layers, P.target_layers(res.model, ("conv", "linear")), strict=True):
        assert lp.name == name
        n = m.weight.numel()
        assert lp.params == lp.n_positions == n
        assert lp.n_zeroed == round(amount * n)
        assert int((m.weight == 0).sum()) == lp.n_zeroed  # random init: no weight was 0 before
        assert lp.keep.sum() == n - lp.n_zeroed
        assert torch.equal(torch.from_numpy(~lp.keep).reshape(m.weight.shape), m.weight == 0)


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_exact_counts_global(method):
    amount = 0.377
    net = mid_net()
    res = PRUNE[method](net, amount=amount, scope="global")
    total = sum(m.weight.numel() for _, m in P.target_layers(net))
    assert res.n_zeroed == round(amount * total)
    assert sum(int((m.weight == 0).sum()) for _, m in P.target_layers(res.model)) == res.n_zeroed
    fractions = [lp.fraction for lp in res.layers]
    if method == "magnitude":  # one threshold: the layers' fractions differ
        assert max(fractions) > min(fractions)
    else:  # uniform over every weight: each layer near the amount (binomial, 6 standard deviations)
        for lp in res.layers:
            assert abs(lp.fraction - amount) <= 6 * (amount * (1 - amount) / lp.n_positions) ** 0.5


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_amount_zero_changes_nothing(method):
    net = small_net()
    before = _state(net)
    res = PRUNE[method](net, amount=0.0, targets=("conv", "linear"))
    _assert_same_state(before, _state(res.model))
    assert res.n_zeroed == 0
    res = PRUNE[method](net, amount=0.0, scope="global")
    _assert_same_state(before, _state(res.model))


def test_dwt_percentile_zero_changes_nothing_but_rounding():
    net = small_net()
    res = P.prune_dwt(net, wavelet="db2", level=1, percentile=0.0, layout="flat", targets=("conv", "linear"))
    assert res.n_zeroed == 0
    for (n, a), (_, b) in zip(P.target_layers(net, ("conv", "linear")), P.target_layers(res.model, ("conv", "linear"))):
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-5)


def test_ties_broken_by_lowest_index():
    net = nn.Sequential(nn.Linear(4, 5))
    with torch.no_grad():
        net[0].weight.fill_(0.5)
        net[0].weight[0, 0] = 0.1
    res = P.prune_magnitude(net, 0.3, targets="linear")  # round(6.0) = 6: 0.1 and the first 5 ties
    w = res.model[0].weight.reshape(-1)
    assert torch.equal((w == 0).nonzero().reshape(-1), torch.tensor([0, 1, 2, 3, 4, 5]))


def test_rounding_is_python_round_like_torch():
    net = nn.Sequential(nn.Linear(5, 1))  # 5 weights
    for amount in (0.1, 0.3, 0.5, 0.7, 0.9):  # 0.5 -> round(2.5) = 2 (half to even), as torch
        res = P.prune_magnitude(net, amount, targets="linear")
        ref = copy.deepcopy(net)
        tprune.l1_unstructured(ref[0], "weight", amount)
        assert res.n_zeroed == round(amount * 5) == int((ref[0].weight_mask == 0).sum())


def test_per_layer_dict_amount():
    resnet = mid_net()
    names = [n for n, _ in P.target_layers(resnet)]
    amount = {n: (i % 5) / 5 for i, n in enumerate(names)}
    res = P.prune_magnitude(resnet, amount)
    for lp in res.layers:
        assert lp.n_zeroed == round(amount[lp.name] * lp.params)
    with pytest.raises(ValueError, match="no fraction for target layer '0'"):
        P.prune_magnitude(resnet, {n: 0.5 for n in names[1:]})
    with pytest.raises(ValueError, match="unknown layer 'nope'"):
        P.prune_random(resnet, amount | {"nope": 0.1})
    with pytest.raises(ValueError, match="global"):
        P.prune_magnitude(resnet, amount, scope="global")


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_amount(bad):
    with pytest.raises(ValueError, match=r"amount must be a fraction in \[0, 1\], got"):
        P.prune_magnitude(small_net(), bad)
    with pytest.raises(ValueError, match=r"amount must be a fraction"):
        P.prune_random(small_net(), bad)


def test_bad_scope():
    with pytest.raises(ValueError, match=r"unknown scope 'model'; valid: layer, global"):
        P.prune_magnitude(small_net(), 0.5, scope="model")
    with pytest.raises(ValueError, match=r"unknown scope 'model'"):
        P.prune_dwt(small_net(), wavelet="haar", level=1, percentile=5, scope="model")


# --------------------------------------------------------------------------- random


def test_random_same_seed_same_mask_and_generator():
    resnet = mid_net()
    a = P.prune_random(resnet, 0.4, seed=7)
    b = P.prune_random(resnet, 0.4, seed=7)
    c = P.prune_random(resnet, 0.4, seed=8)
    g = P.prune_random(resnet, 0.4, generator=torch.Generator().manual_seed(7))
    for la, lb, lc, lg in zip(a.layers, b.layers, c.layers, g.layers):
        assert np.array_equal(la.keep, lb.keep) and np.array_equal(la.keep, lg.keep)
        assert not np.array_equal(la.keep, lc.keep)
    assert a.config["seed"] == 7
    with pytest.raises(ValueError, match="seed must be an int"):
        P.prune_random(resnet, 0.4, seed="7")


def test_random_mask_is_uniform():
    """Every position is zeroed with probability ~amount over many seeds (chi-square-ish bound)."""
    net = nn.Sequential(nn.Linear(10, 4))  # 40 weights
    hits = np.zeros(40)
    trials = 400
    for s in range(trials):
        hits += ~P.prune_random(net, 0.25, seed=s, targets="linear").layers[0].keep
    p = hits / trials
    assert np.all(np.abs(p - 0.25) < 5 * np.sqrt(0.25 * 0.75 / trials))


def test_random_is_not_magnitude():
    resnet = mid_net()
    r = P.prune_random(resnet, 0.5)
    m = P.prune_magnitude(resnet, 0.5)
    agree = np.mean(np.concatenate([a.keep == b.keep for a, b in zip(r.layers, m.layers)]))
    assert 0.45 < agree < 0.55  # independent masks at 50%: half agree


# --------------------------------------------------------------------------- dwt


def test_dwt_does_not_modify_input_unless_inplace():
    net = small_net()
    before = _state(net)
    for fn in (
        lambda **k: P.prune_dwt(net, wavelet="db2", level=2, percentile=70, layout="flat", **k),
        lambda **k: P.prune_magnitude(net, 0.7, **k),
        lambda **k: P.prune_random(net, 0.7, **k),
    ):
        res = fn()
        assert res.model is not net
        _assert_same_state(before, _state(net))
    res = P.prune_magnitude(net, 0.7, inplace=True)
    assert res.model is net and int((net[0].weight == 0).sum()) == round(0.7 * net[0].weight.numel())


@pytest.mark.parametrize("layout", wv.LAYOUTS)
def test_dwt_layer_counts_match_numpy_oracle(layout):
    resnet = mid_net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        res = P.prune_dwt(resnet, wavelet="db2", level=3, percentile=65, layout=layout)
    base = dict(resnet.named_modules())
    for lp in res.layers:
        w = base[lp.name].weight.detach().numpy()
        flat, st = wv.decompose(w, wavelet="db2", level=3, layout=layout)
        thr = np.percentile(np.abs(flat), 65)
        assert lp.n_zeroed == int((np.abs(flat) < thr).sum())
        assert lp.n_positions == flat.size == st.n_coeffs
        assert abs(lp.fraction - 0.65) <= 1 / lp.n_positions  # numpy's linear percentile, no ties
        assert lp.level_requested == 3 and lp.level_effective == st.level
    cfg = res.config
    assert cfg == dict(
        wavelet="db2", level=3, percentile=65.0, layout=layout, mode="periodization",
        scope="layer", keep_approx=False, targets=["conv"],
    )


@pytest.mark.filterwarnings("ignore::wavesweep.wavelets.LevelClampedWarning")
def test_dwt_global_threshold():
    resnet = mid_net()
    res = P.prune_dwt(resnet, wavelet="sym4", level=2, percentile=55, layout="filter", scope="global")
    base = dict(resnet.named_modules())
    flats = [
        wv.decompose(base[lp.name].weight.detach().numpy(), wavelet="sym4", level=2, layout="filter")[0]
        for lp in res.layers
    ]
    allc = np.abs(np.concatenate(flats))
    thr = np.percentile(allc, 55)
    assert res.n_zeroed == int((allc < thr).sum())
    assert [lp.n_zeroed for lp in res.layers] == [int((np.abs(f) < thr).sum()) for f in flats]


def test_dwt_keep_approx_leaves_approximation_band():
    net = small_net()
    res = P.prune_dwt(net, wavelet="haar", level=1, percentile=90, layout="flat", keep_approx=True)
    for lp, (_, m) in zip(res.layers, P.target_layers(net), strict=True):
        full, st = wv.decompose(m.weight.detach().numpy(), wavelet="haar", level=1, layout="flat")
        n_approx = st.n_approx
        detail = np.abs(full[n_approx:])
        thr = np.percentile(detail, 90)  # threshold over the detail bands only
        assert lp.keep[:n_approx].all()
        np.testing.assert_array_equal(lp.coeffs[:n_approx], full[:n_approx])
        np.testing.assert_array_equal(lp.keep[n_approx:], detail >= thr)
        assert lp.n_zeroed == int((detail < thr).sum()) and lp.n_positions == full.size


def test_effective_level_kernel_bior44_is_zero_and_warned(resnet):
    with pytest.warns(wv.LevelClampedWarning, match=r"level 5 clamped to 0"):
        res = P.prune_dwt(resnet, wavelet="bior4.4", level=5, percentile=50, layout="kernel")
    assert all(lp.level_effective == 0 for lp in res.layers)
    assert len(res.warnings) == len(res.layers)
    # level 0 = plain magnitude pruning of the weights at the percentile threshold
    lp = res.layers[1]
    w = dict(resnet.named_modules())[lp.name].weight.detach()
    thr = np.percentile(w.abs().numpy(), 50)
    assert torch.equal(dict(res.model.named_modules())[lp.name].weight, torch.where(w.abs() >= float(thr), w, 0.0))


def test_effective_level_filter_reaches_5_on_3x3(resnet):
    with pytest.warns(wv.LevelClampedWarning) as rec:
        res = P.prune_dwt(resnet, wavelet="bior4.4", level=5, percentile=50, layout="filter")
    for lp in res.layers:
        if lp.shape[2:] == (3, 3):
            assert lp.level_effective == 5
    clamped = {lp.name for lp in res.layers if lp.level_effective < 5}
    assert clamped and all(lp.shape[2:] != (3, 3) for lp in res.layers if lp.name in clamped)
    assert len(res.warnings) == len(clamped) and len(rec) == 1


def test_dwt_linear_layouts():
    net = small_net()
    for layout in ("filter", "matrix", "flat"):
        res = P.prune_dwt(net, wavelet="haar", level=1, percentile=50, layout=layout, targets="linear")
        assert [lp.name for lp in res.layers] == ["5"]
    with pytest.raises(ValueError, match=r"kernel.*4-D"):
        P.prune_dwt(net, wavelet="haar", level=1, percentile=50, layout="kernel", targets="linear")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(wavelet="morl"), "unknown wavelet 'morl'"),
        (dict(mode="wrap"), "unknown mode 'wrap'"),
        (dict(layout="row"), "unknown layout 'row'"),
        (dict(level=0), "level must be an int in 1..5, got 0"),
        (dict(percentile=101), r"percentile must be a number in \[0, 100\], got 101"),
    ],
)
def test_dwt_errors(kwargs, match):
    args = dict(wavelet="haar", level=1, percentile=50) | kwargs
    with pytest.raises(ValueError, match=match):
        P.prune_dwt(small_net(), **args)


def test_dwt_float64_and_half_models_keep_dtype():
    for dtype in (torch.float64, torch.float16):
        net = small_net().to(dtype)
        res = P.prune_dwt(net, wavelet="db1", level=1, percentile=40, layout="filter")
        assert all(p.dtype == dtype for p in res.model.parameters())


# --------------------------------------------------------------------------- matching


@pytest.mark.filterwarnings("ignore::wavesweep.wavelets.LevelClampedWarning")
def test_matched_per_layer():
    resnet = mid_net()
    dwt = P.prune_dwt(resnet, wavelet="db3", level=2, percentile=72.5, layout="filter")
    amount = P.matched_amount(dwt)
    assert amount == {lp.name: lp.n_zeroed / lp.n_positions for lp in dwt.layers}
    out = P.prune_matched(resnet, dwt, seed=3)
    assert set(out) == {"magnitude", "random"}
    for method, res in out.items():
        assert res.method == method
        for lp, dl in zip(res.layers, dwt.layers):
            assert lp.name == dl.name and lp.n_zeroed == round(dl.fraction * lp.params)
    assert out["random"].config["seed"] == 3


@pytest.mark.filterwarnings("ignore::wavesweep.wavelets.LevelClampedWarning")
def test_matched_global():
    resnet = mid_net()
    dwt = P.prune_dwt(resnet, wavelet="db3", level=2, percentile=40, layout="flat", mode="symmetric")
    frac = P.matched_amount(dwt, "global")
    assert frac == dwt.n_zeroed / dwt.n_positions and dwt.n_positions > sum(lp.params for lp in dwt.layers)
    out = P.prune_matched(resnet, dwt, scope="global")
    total = sum(lp.params for lp in dwt.layers)
    assert out["magnitude"].n_zeroed == out["random"].n_zeroed == round(frac * total)
    with pytest.raises(ValueError, match="needs a dwt result"):
        P.matched_amount(out["magnitude"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_model():
    net = small_net().cuda()
    for res in (
        P.prune_dwt(net, wavelet="db2", level=1, percentile=50, layout="filter"),
        P.prune_magnitude(net, 0.5),
        P.prune_random(net, 0.5),
    ):
        assert all(p.is_cuda for p in res.model.parameters())
    cpu = P.prune_magnitude(small_net(), 0.5)
    assert torch.equal(P.prune_magnitude(net, 0.5).model[0].weight.cpu(), cpu.model[0].weight)


# --------------------------------------------------------------------------- torch backend (GPU path)


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("layout, wavelet", [("filter", "bior4.4"), ("kernel", "haar"), ("matrix", "db2"), ("flat", "rbio2.2")])
def test_prune_dwt_torch_backend_equals_pywavelets(scope, layout, wavelet):
    """The torch transform (what runs on a GPU) gives PyWavelets' masks, coefficients and weights."""
    model = mid_net() if layout == "kernel" else small_net()
    kw = dict(wavelet=wavelet, level=5, percentile=65.0, layout=layout, scope=scope, keep_approx=scope == "global")
    targets = ("conv",) if layout == "kernel" else ("conv", "linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        ref = P.prune_dwt(model, targets=targets, backend="numpy", **kw)
        got = P.prune_dwt(model, targets=targets, backend="torch", **kw)
    assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref.layers]
    for a, b in zip(got.layers, ref.layers):
        assert a.structure == b.structure and a.level_effective == b.level_effective
        assert isinstance(a.keep, np.ndarray) and np.array_equal(a.keep, b.keep), a.name
        np.testing.assert_allclose(a.coeffs, b.coeffs, rtol=1e-5, atol=1e-6)
    for (k, x), (_, y) in zip(got.model.state_dict().items(), ref.model.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)


def test_prune_dwt_backend_is_checked():
    with pytest.raises(ValueError, match="unknown dwt backend 'jax'; valid: auto, numpy, torch"):
        P.prune_dwt(small_net(), wavelet="haar", level=1, percentile=50, backend="jax")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prune_dwt_on_cuda_runs_in_torch_and_matches_cpu():
    model = small_net()
    ref = P.prune_dwt(model, wavelet="bior4.4", level=3, percentile=70, targets=("conv", "linear"))
    got = P.prune_dwt(copy.deepcopy(model).cuda(), wavelet="bior4.4", level=3, percentile=70, targets=("conv", "linear"))
    assert next(got.model.parameters()).is_cuda
    for a, b in zip(got.layers, ref.layers):
        assert np.array_equal(a.keep, b.keep), a.name
    for (k, x), (_, y) in zip(got.model.state_dict().items(), ref.model.state_dict().items()):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-5, msg=k)


# --------------------------------------------------------------------------- magnitude/random on the weights' device


def _tied_net():
    """Weights rounded to a few values: many ties at every threshold."""
    net = mid_net()
    with torch.no_grad():
        for _, m in P.target_layers(net, ("conv", "linear")):
            m.weight.copy_(torch.round(m.weight * 8) / 8)
    return net


@pytest.mark.parametrize("tied", [False, True])
def test_smallest_torch_equals_numpy_selection(tied):
    """The sort-based selection is the partition's mask bit for bit, ties included; with a
    generator it draws the same tie-break from the same generator state."""
    from wavesweep.baselines import _smallest, _smallest_torch

    g = torch.Generator().manual_seed(3)
    for n in (1, 2, 7, 100, 1000):
        v = torch.randint(0, 5, (n,)).float() if tied else torch.rand(n, generator=g)
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n, n + 1}):
            want = _smallest(v.numpy(), k)
            assert np.array_equal(_smallest_torch(v, k).numpy(), want), (n, k)
            ga, gb = torch.Generator().manual_seed(n + k), torch.Generator().manual_seed(n + k)
            want = _smallest(v.numpy(), k, ga)
            got = _smallest_torch(v, k, gb)
            assert np.array_equal(got.numpy(), want), (n, k)
            assert int(got.sum()) == min(max(k, 0), n)
            assert torch.equal(ga.get_state(), gb.get_state())  # the same draws were made


def test_smallest_torch_layers_equal_numpy_layer_by_layer_with_one_generator():
    """Several layers with ties at their k-th values (and some without, k = 0 or k = n), one
    generator: the tie counts fetched together, then the draws in layer order, give the masks and
    the generator state of numpy's selection run layer by layer."""
    from wavesweep.baselines import _smallest, _smallest_torch_layers

    g = torch.Generator().manual_seed(11)
    layers = [torch.randint(0, 4, (n,), generator=g).float() for n in (50, 7, 300, 1, 64, 129)]
    ks = [20, 0, 151, 1, 64, 40]
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    want = [_smallest(v.numpy(), k, ga) for v, k in zip(layers, ks)]
    got = _smallest_torch_layers(layers, ks, gb)
    for w, m, v, k in zip(want, got, layers, ks):
        assert np.array_equal(m.numpy(), w) and int(m.sum()) == min(k, v.numel())
    assert torch.equal(ga.get_state(), gb.get_state())  # the same draws, in the same order
    assert sum(int(((v <= v.sort().values[k - 1]).sum()) > k) for v, k in zip(layers, ks) if 0 < k < v.numel()) >= 3
    # without a generator: the lowest-indexed ties, as numpy's selection
    for m, v, k in zip(_smallest_torch_layers(layers, ks), layers, ks):
        assert np.array_equal(m.numpy(), _smallest(v.numpy(), k))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_magnitude_and_random_torch_backend_equal_numpy(method, scope):
    """What runs on a GPU (selection in torch on the weights' device, one copy of the masks to
    the record) gives the numpy path's masks, counts and weights bit for bit, ties included."""
    net = _tied_net()
    kw = dict(scope=scope, targets=("conv", "linear"))
    names = [n for n, _ in P.target_layers(net, kw["targets"])]
    amounts = [0.0, 0.37, 0.5, 1.0] + ([{n: (i % 4) / 4 + 0.1 for i, n in enumerate(names)}] if scope == "layer" else [])
    for amount in amounts:
        ref = PRUNE[method](net, amount, backend="numpy", **kw)
        got = PRUNE[method](net, amount, backend="torch", **kw)
        assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref.layers]
        for a, b in zip(got.layers, ref.layers):
            assert isinstance(a.keep, np.ndarray) and a.keep.dtype == bool and np.array_equal(a.keep, b.keep), a.name
        for (k, x), (_, y) in zip(got.model.state_dict().items(), ref.model.state_dict().items()):
            assert torch.equal(x, y) and torch.equal(torch.signbit(x), torch.signbit(y)), k


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_per_layer_counts_on_the_device_need_no_transfer_and_equal_the_masks(method, monkeypatch):
    """In layer scope the torch path takes each layer's dropped count from its k (a mask holds
    exactly k, ties included), with no copy of counts from the device (a host sync on a GPU): the
    counts equal those of the masks themselves (the oracle: ``~keep`` counted) and the numpy path's,
    at every amount, on weights with ties at the k-th value."""
    from wavesweep import baselines

    net = _tied_net()
    kw = dict(scope="layer", targets=("conv", "linear"))
    names = [n for n, _ in P.target_layers(net, kw["targets"])]
    ref = {a: PRUNE[method](net, a, backend="numpy", **kw) for a in (0.0, 0.37, 1.0)}
    monkeypatch.setattr(baselines, "numpy_batched", lambda *a: pytest.fail("counts copied from the device"))
    for amount in [0.0, 0.37, 1.0, {n: (i % 4) / 4 + 0.1 for i, n in enumerate(names)}]:
        got = PRUNE[method](net, amount, backend="torch", **kw)
        for lp in got.layers:
            assert lp.n_zeroed == int(np.count_nonzero(~lp.keep)), (amount, lp.name)
        if not isinstance(amount, dict):
            assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref[amount].layers]
            assert [np.array_equal(a.keep, b.keep) for a, b in zip(got.layers, ref[amount].layers)] == [True] * len(names)


def test_matched_pruning_checks_the_weights_finite_once_and_still_refuses_nan(monkeypatch):
    """prune_matched prunes one model twice: its target weights are checked finite once (by
    magnitude; on a GPU each check is a host sync), a NaN still stops it with the same error as
    before, and the results equal magnitude and random run on their own (the oracle)."""
    from wavesweep import baselines

    net = _tied_net()
    dwt = P.prune_dwt(net, wavelet="haar", level=1, percentile=60)
    calls = []
    real = baselines.check_finite_targets
    monkeypatch.setattr(baselines, "check_finite_targets", lambda layers: calls.append(len(layers)) or real(layers))
    got = P.prune_matched(net, dwt, seed=3)
    assert calls == [len(P.target_layers(net))]
    amount = P.matched_amount(dwt)
    for m, want in (("magnitude", P.prune_magnitude(net, amount)), ("random", P.prune_random(net, amount, seed=3))):
        assert [lp.n_zeroed for lp in got[m].layers] == [lp.n_zeroed for lp in want.layers]
        assert all(np.array_equal(a.keep, b.keep) for a, b in zip(got[m].layers, want.layers)), m
        assert all(torch.equal(x, y) for x, y in zip(got[m].model.state_dict().values(), want.model.state_dict().values())), m
    with torch.no_grad():
        net[1].weight.view(-1)[3] = float("nan")
    with pytest.raises(ValueError, match=r"target layer '1': weight has 1 NaN or infinite value\(s\)"):
        P.prune_matched(net, dwt)


def test_magnitude_torch_backend_on_half_precision_weights():
    net = _tied_net().to(torch.bfloat16)
    ref = P.prune_magnitude(net, 0.6, backend="numpy")
    got = P.prune_magnitude(net, 0.6, backend="torch")
    for a, b in zip(got.layers, ref.layers):
        assert np.array_equal(a.keep, b.keep)
    assert got.model[0].weight.dtype == torch.bfloat16


def test_pruning_backend_is_checked():
    with pytest.raises(ValueError, match="unknown pruning backend 'jax'; valid: auto, numpy, torch"):
        P.prune_magnitude(small_net(), 0.5, backend="jax")
    with pytest.raises(ValueError, match="unknown pruning backend 'gpu'"):
        P.prune_matched(small_net(), P.prune_dwt(small_net(), wavelet="haar", level=1, percentile=50), backend="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_matched_pruning_on_cuda_selects_on_the_device_and_matches_cpu(scope, monkeypatch):
    """On CUDA, magnitude and random select on the device (never through numpy's partition) and
    give the CPU masks bit for bit."""
    from wavesweep import baselines

    net = _tied_net()
    dwt = P.prune_dwt(net, wavelet="haar", level=1, percentile=60, scope=scope)
    ref = P.prune_matched(net, dwt, scope=scope)
    monkeypatch.setattr(baselines, "_smallest", lambda *a, **k: pytest.fail("numpy selection on a CUDA model"))
    got = P.prune_matched(copy.deepcopy(net).cuda(), dwt, scope=scope)
    for m in ("magnitude", "random"):
        assert next(got[m].model.parameters()).is_cuda
        for a, b in zip(got[m].layers, ref[m].layers):
            assert np.array_equal(a.keep, b.keep), (m, a.name)
        for (k, x), (_, y) in zip(got[m].model.state_dict().items(), ref[m].model.state_dict().items()):
            assert torch.equal(x.cpu(), y), (m, k)


def test_numpy_batched_copies_each_tensor_in_order():
    from wavesweep.prune_record import numpy_batched

    ts = [torch.arange(6.0).reshape(2, 3), torch.tensor([True, False]), torch.arange(3, dtype=torch.float64), torch.ones(0)]
    got = numpy_batched(ts)
    for a, t in zip(got, ts):
        assert a.dtype == t.numpy().dtype and np.array_equal(a, t.reshape(-1).numpy())
    got[0][0] = 99.0  # copies, never views of the tensors
    assert ts[0][0, 0] == 0.0
    assert numpy_batched([]) == []


# --------------------------------------------------------------------------- records left on the device


@pytest.fixture
def deferred(monkeypatch):
    """The deferred record of an accelerator, on CPU: records wait as tensors for their copy to
    the host; every call of numpy_batched is counted (the number of tensors it got)."""
    from wavesweep import prune_record

    calls = []
    real = prune_record.numpy_batched

    def counted(tensors):
        calls.append(len(tensors))
        return real(tensors)

    monkeypatch.setattr(prune_record, "stays_on_device", lambda t: True)
    monkeypatch.setattr(prune_record, "numpy_batched", counted)
    return calls


@pytest.mark.parametrize("stacked", [False, True])
def test_deferred_dwt_record_comes_to_the_host_in_one_transfer_on_first_use(deferred, stacked, monkeypatch):
    """The torch backend leaves coefficients and masks where they were computed; the first read of
    any layer's record copies every layer's (one call for all 2 x layers tensors), and the arrays
    equal PyWavelets' record. The accounting reads no record (its counts came with the pruning).
    Stacked: layers of one shape pruned together, their records rows of one tensor."""
    from wavesweep import accounting

    monkeypatch.setattr(P, "STACK_ON_CPU", stacked)
    net = repeated_net() if stacked else mid_net()
    kw = dict(wavelet="bior4.4", level=3, percentile=70, targets=("conv", "linear"))
    ref = P.prune_dwt(net, backend="numpy", **kw)
    got = P.prune_dwt(net, backend="torch", **kw)
    assert deferred == [] and all(lp.device_record(w) is not None for lp in got.layers for w in ("keep", "coeffs"))
    assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref.layers]
    assert all(lp.has_coeffs and lp.coeff_itemsize == got.model.get_parameter(lp.key).element_size() for lp in got.layers)
    st_got, st_ref = accounting.model_stats(net, got), accounting.model_stats(net, ref)
    assert deferred == [] and st_got.stored_bytes == st_ref.stored_bytes and st_got.zeroed_coeffs == st_ref.zeroed_coeffs
    keep = got.layers[1].keep  # the first read: all layers at once
    assert deferred == [2 * len(got.layers)] and isinstance(keep, np.ndarray)
    assert {lp.coeffs.dtype for lp in got.layers} == ({np.dtype("float32"), np.dtype("float64")} if stacked else {np.dtype("float32")})
    for a, b in zip(got.layers, ref.layers):
        assert a.device_record("keep") is None and a.device_record("coeffs") is None
        assert a.keep.dtype == bool and np.array_equal(a.keep, b.keep), a.name
        np.testing.assert_allclose(a.coeffs, b.coeffs, rtol=1e-5, atol=1e-6)
        assert np.all(a.coeffs[~a.keep] == 0)
    assert deferred == [2 * len(got.layers)]  # read once, kept
    got.layers[0].keep[0] = not got.layers[0].keep[0]  # the host array is the record, as before
    assert got.layers[0].keep[0] != ref.layers[0].keep[0]


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_deferred_masks_of_magnitude_and_random_equal_numpy(method, deferred):
    net = _tied_net()
    kw = dict(targets=("conv", "linear"))
    ref = PRUNE[method](net, 0.45, backend="numpy", **kw)
    got = PRUNE[method](net, 0.45, backend="torch", **kw)
    assert deferred == []  # no mask on the host yet (the dropped counts: baselines' own reference)
    assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref.layers]
    assert all(not lp.has_coeffs and lp.device_record("keep") is not None for lp in got.layers)
    for a, b in zip(got.layers, ref.layers):
        assert np.array_equal(a.keep, b.keep), a.name
    assert deferred == [len(got.layers)]


def test_deferred_record_checkpoint_equals_the_host_record(deferred, tmp_path):
    """The checkpoint of a deferred record is the same file as that of the record made on the
    host (the same masks and coefficients), and reading it fetched the record once."""
    from wavesweep import checkpoint

    net = mid_net()
    kw = dict(wavelet="haar", level=2, percentile=60, targets=("conv", "linear"), backend="torch")
    got = P.prune_dwt(net, **kw)
    n = checkpoint.save_compressed(got, tmp_path / "deferred.wsz")
    assert deferred == [2 * len(got.layers)]
    with pytest.MonkeyPatch.context() as mp:
        from wavesweep import prune_record

        mp.setattr(prune_record, "stays_on_device", lambda t: False)
        ref = P.prune_dwt(net, **kw)
    assert all(lp.device_record("keep") is None for lp in ref.layers)
    assert checkpoint.save_compressed(ref, tmp_path / "host.wsz") == n
    assert (tmp_path / "deferred.wsz").read_bytes() == (tmp_path / "host.wsz").read_bytes()


# --------------------------------------------------------------------------- torch backend: layers of one shape together


def repeated_net(seed=0):
    """Convs and Linears with repeated shapes (as ResNet's blocks and ViT's layers), scales
    apart, and one float64 conv of a shape that repeats in float32 (never stacked with them)."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 16, 1),
        nn.Conv2d(8, 8, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(16, 16, 3), nn.Conv2d(8, 8, 3),
        nn.Linear(24, 12), nn.Linear(24, 12), nn.Linear(12, 24), nn.Linear(24, 12),
    )  # fmt: skip
    with torch.no_grad():
        for i, m in enumerate(net):
            m.weight.mul_(1.5 ** (i % 5))
    net[7].double()
    return net


@pytest.fixture
def stack_on_cpu(monkeypatch):
    """Layers on the CPU stacked, as on an accelerator."""
    monkeypatch.setattr(P, "STACK_ON_CPU", True)


def test_stack_groups_by_shape_dtype_and_device_in_layer_order(monkeypatch):
    layers = P.target_layers(repeated_net(), ("conv", "linear"))
    assert P._stack_groups(layers, "filter") == [[i] for i in range(12)]  # the CPU's default: one by one
    monkeypatch.setattr(P, "STACK_ON_CPU", True)
    assert P._stack_groups(layers, "filter") == [[0], [1, 2, 4], [3], [5, 6], [7], [8, 9, 11], [10]]
    assert P._stack_groups(layers, "kernel") == P._stack_groups(layers, "filter")
    assert P._stack_groups(layers, "matrix") == [[i] for i in range(12)] == P._stack_groups(layers, "flat")
    monkeypatch.setattr(P, "STACK_ELEMENTS", 2 * 8 * 8 * 9)  # two 8x8x3x3 weights a group at most
    assert P._stack_groups(layers, "filter") == [[0], [1, 2], [3], [4], [5], [6], [7], [8, 9, 11], [10]]


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("layout, wavelet, targets", [("filter", "bior4.4", ("conv", "linear")), ("kernel", "haar", ("conv",))])
def test_prune_dwt_torch_stacks_layers_of_one_shape_and_equals_pywavelets(scope, layout, wavelet, targets, monkeypatch, stack_on_cpu):
    """Layers of one shape pruned together (each at its own percentile, scales apart) give the
    masks, counts, coefficients and weights of PyWavelets layer by layer, and those of the torch
    backend one layer at a time (STACK_ELEMENTS 1), in the filter bank and in the dense GEMM
    backend (a GPU's)."""
    from wavesweep import filterbank

    net = repeated_net()
    kw = dict(wavelet=wavelet, level=5, percentile=65.0, layout=layout, scope=scope, targets=targets)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        ref = P.prune_dwt(net, backend="numpy", **kw)
        for force in (None, "dense"):
            monkeypatch.setattr(filterbank, "_FORCE_BACKEND", force)
            calls = []
            real = P._stack_groups
            monkeypatch.setattr(P, "_stack_groups", lambda *a: (calls.append(real(*a)), calls[-1])[1])
            got = P.prune_dwt(net, backend="torch", **kw)
            assert max(len(g) for g in calls[0]) == 3  # stacked
            monkeypatch.setattr(P, "STACK_ELEMENTS", 1)
            alone = P.prune_dwt(net, backend="torch", **kw)
            assert max(len(g) for g in calls[1]) == 1
            monkeypatch.undo()
            monkeypatch.setattr(P, "STACK_ON_CPU", True)
            assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref.layers] == [lp.n_zeroed for lp in alone.layers]
            for a, b, c in zip(got.layers, ref.layers, alone.layers):
                assert a.structure == b.structure and np.array_equal(a.keep, b.keep) and np.array_equal(a.keep, c.keep), a.name
                np.testing.assert_allclose(a.coeffs, b.coeffs, rtol=1e-5, atol=1e-5)
                assert a.coeffs.dtype == b.coeffs.dtype
            for (k, x), (_, y), (_, z) in zip(got.model.state_dict().items(), ref.model.state_dict().items(),
                                              alone.model.state_dict().items()):  # fmt: skip
                assert x.dtype == y.dtype
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=k)
                torch.testing.assert_close(x, z, rtol=1e-6, atol=1e-6, msg=k)
    if scope == "layer":  # each layer its own 65 %, whatever its scale
        assert all(abs(lp.fraction - 0.65) < 0.02 for lp in ref.layers if lp.level_effective), [lp.fraction for lp in ref.layers]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["filter", "kernel"])
def test_prune_dwt_on_cuda_stacks_layers_and_matches_pywavelets(layout):
    """On CUDA layers of one shape are stacked by default; masks and counts are PyWavelets'
    (within a tie at the threshold, none here), weights to float tolerance, and the record stays
    on the device until read."""
    net = repeated_net()
    kw = dict(wavelet="bior4.4" if layout == "filter" else "haar", level=5, percentile=65.0, layout=layout,
              targets=("conv", "linear") if layout == "filter" else ("conv",))  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        ref = P.prune_dwt(net, backend="numpy", **kw)
        groups = P._stack_groups(P.target_layers(copy.deepcopy(net).cuda(), kw["targets"]), layout)
        assert max(len(g) for g in groups) == 3
        got = P.prune_dwt(copy.deepcopy(net).cuda(), **kw)
    assert all(lp.device_record("keep") is not None and lp.device_record("keep").is_cuda for lp in got.layers)
    assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref.layers]
    for a, b in zip(got.layers, ref.layers):
        assert np.array_equal(a.keep, b.keep), a.name
        np.testing.assert_allclose(a.coeffs, b.coeffs, rtol=1e-4, atol=1e-5)
    for (k, x), (_, y) in zip(got.model.state_dict().items(), ref.model.state_dict().items()):
        torch.testing.assert_close(x.cpu(), y, rtol=1e-4, atol=1e-5, msg=k)


def test_deferred_record_copies_pickles_and_is_freed_without_the_collector(deferred):
    """Copies and pickles of a layer carry host arrays (the record fetched first); a dropped
    result frees its deferred records at once (the group holds its layers weakly: no cycle
    left for the garbage collector)."""
    import gc
    import pickle
    import weakref

    net = mid_net()
    kw = dict(wavelet="haar", level=2, percentile=60, targets=("conv", "linear"))
    ref = P.prune_dwt(net, backend="numpy", **kw)
    for copier in (copy.copy, copy.deepcopy, lambda x: pickle.loads(pickle.dumps(x))):
        got = P.prune_dwt(net, backend="torch", **kw)
        c = copier(got.layers[1])
        assert all(isinstance(c.__dict__[s], np.ndarray) for s in ("_keep", "_coeffs"))  # host arrays, before any read
        assert isinstance(c.keep, np.ndarray) and np.array_equal(c.keep, ref.layers[1].keep)
        assert isinstance(c.coeffs, np.ndarray) and c.device_record("coeffs") is None
        assert "_host_group" not in c.__dict__
    got = P.prune_dwt(net, backend="torch", **kw)
    layer, record = weakref.ref(got.layers[0]), weakref.ref(got.layers[0].device_record("coeffs"))
    gc.disable()
    try:
        del got
        assert layer() is None and record() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("method", ["dwt", "magnitude", "random"])
def test_release_frees_the_model_and_the_deferred_records_and_keeps_the_counts(deferred, method):
    """``PruneResult.release``: the pruned model and every layer's (deferred) record are freed at
    once, nothing is copied to the host for it, and the counts the accounting reads stay."""
    import gc
    import weakref

    net = mid_net()
    kw = dict(targets=("conv", "linear"), backend="torch")
    got = P.prune_dwt(net, wavelet="haar", level=2, percentile=60, **kw) if method == "dwt" else PRUNE[method](net, 0.5, **kw)
    counts = [(lp.name, lp.shape, lp.n_positions, lp.n_zeroed, lp.fraction, lp.level_effective) for lp in got.layers]
    totals = (got.n_zeroed, got.n_positions)
    whats = ("keep", "coeffs") if method == "dwt" else ("keep",)
    records = [weakref.ref(lp.device_record(w)) for lp in got.layers for w in whats]
    model = weakref.ref(got.model)
    gc.disable()
    try:
        got.release()
        assert model() is None and all(r() is None for r in records)
    finally:
        gc.enable()
    assert deferred == []  # nothing came to the host
    assert got.model is None and all(lp.keep is None and lp.coeffs is None and not lp.has_coeffs for lp in got.layers)
    assert [(lp.name, lp.shape, lp.n_positions, lp.n_zeroed, lp.fraction, lp.level_effective) for lp in got.layers] == counts
    assert (got.n_zeroed, got.n_positions) == totals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_pruning_a_model_on_two_devices_on_cuda():
    """Target layers on CUDA and on the CPU (backend auto: torch): every method's masks and counts
    are the CPU's, each record on its layer's device until read."""
    net = mid_net()
    mixed = copy.deepcopy(net)
    mixed[0].cuda()
    kw = dict(targets=("conv", "linear"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        pairs = [(P.prune_dwt(mixed, wavelet="bior2.2", level=2, percentile=60, **kw),
                  P.prune_dwt(net, wavelet="bior2.2", level=2, percentile=60, **kw))]  # fmt: skip
    for method in ("magnitude", "random"):
        pairs.append((PRUNE[method](mixed, 0.5, **kw), PRUNE[method](net, 0.5, **kw)))
    for got, ref in pairs:
        assert got.layers[0].device_record("keep").is_cuda
        assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref.layers]
        for a, b in zip(got.layers, ref.layers):
            assert np.array_equal(a.keep, b.keep), (got.method, a.name)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_a_nan_or_infinite_target_weight_is_one_line_for_every_method(scope):
    """A NaN made dwt's percentile NaN: every coefficient of the layer (of every layer, global
    scope) was dropped, while magnitude kept the NaN. Each method now stops with one line naming
    the layer, before copying the model."""
    from wavesweep import baselines

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3))
    with torch.no_grad():
        net[1].weight[0, 0, 0, 0] = float("nan")
        net[1].weight[1, 0, 0, 0] = float("inf")
    calls = [
        lambda: P.prune_dwt(net, wavelet="db2", level=2, percentile=50, scope=scope),
        lambda: baselines.prune_magnitude(net, 0.5, scope=scope),
        lambda: baselines.prune_random(net, 0.5, scope=scope, seed=0),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"target layer '1': weight has 2 NaN or infinite value\(s\) of 576"):
            call()


def _pywt_kernel_coeffs(w: np.ndarray, wavelet: str) -> np.ndarray:
    """Every 2-D kernel of ``w`` through PyWavelets, level 1, periodization: flat, kernel by kernel."""
    out = []
    for k in w.reshape(-1, *w.shape[-2:]):
        cA, (cH, cV, cD) = pywt.wavedec2(k.astype(np.float64), wavelet, mode="periodization", level=1)
        out += [cA.ravel(), cH.ravel(), cV.ravel(), cD.ravel()]
    return np.concatenate(out)


def test_structural_zeros_are_the_positions_pywavelets_gives_zero_for_any_weights():
    """haar on a 3x3 kernel: the odd length is extended by its last sample, so 7 of the 16
    positions are 0 for any kernel (PyWavelets on two independent random inputs: the oracle);
    a longer highpass (db2) or an even length has none."""
    from wavesweep import wavelets as wv

    rng = np.random.default_rng(7)
    w1, w2 = rng.standard_normal((2, 4, 3, 3, 3))
    _, st = wv.decompose(w1, wavelet="haar", level=1, layout="kernel")
    mask = wv.structural_zeros(st)
    a, b = _pywt_kernel_coeffs(w1, "haar"), _pywt_kernel_coeffs(w2, "haar")
    assert mask.sum() == 7 * 12 and a.size == 16 * 12
    assert (a == 0).sum() == (b == 0).sum() == mask.sum()  # PyWavelets kernel by kernel; wavesweep orders band by band
    c2, _ = wv.decompose(w2, wavelet="haar", level=1, layout="kernel")
    np.testing.assert_array_equal(c2 == 0, mask)  # another input: zeros at exactly these positions
    for wavelet, shape in (("db2", (4, 3, 5, 5)), ("haar", (4, 3, 4, 4)), ("bior4.4", (4, 3, 3, 3))):
        _, st = wv.decompose(rng.standard_normal(shape), wavelet=wavelet, level=1, layout="kernel")
        assert not wv.structural_zeros(st).any(), (wavelet, shape)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_the_matched_budget_leaves_structural_zeros_out(backend, scope):
    """haar, `kernel` layout, 3x3: 7 of every 16 positions are zero whatever the weights. At the
    50th percentile dwt zeroes 2048 of 4096 positions, but 1792 of them were zero anyway: it
    dropped 256 of the 2304 that carry the weights (1/9). Magnitude and random are matched to
    that, 256 weights, not to 50 % (1152). Oracle: PyWavelets and np.percentile directly."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(16, 16, 3, bias=False), nn.ReLU(), nn.Conv2d(16, 8, 3, bias=False))
    with pytest.warns(UserWarning, match="zero whatever the weights"):
        r = P.prune_dwt(net, wavelet="haar", level=1, percentile=50, layout="kernel", scope=scope, backend=backend)
    coeffs = [_pywt_kernel_coeffs(m.weight.detach().double().numpy(), "haar") for m in (net[0], net[2])]
    thr = [np.percentile(np.abs(np.concatenate(coeffs)), 50)] * 2 if scope == "global" else [np.percentile(np.abs(c), 50) for c in coeffs]
    for lp, c, t in zip(r.layers, coeffs, thr):
        structural = int((c == 0).sum())
        dropped = int(((np.abs(c) < t) & (c != 0)).sum())
        assert (lp.n_positions, lp.n_structural, lp.n_zeroed - lp.n_structural_zeroed) == (c.size, structural, dropped)
        assert lp.matched_fraction == pytest.approx(dropped / (c.size - structural))
    if scope == "layer":
        assert (r.layers[0].n_zeroed, r.layers[0].n_structural, r.layers[0].matched_fraction) == (2048, 1792, 256 / 2304)
    amounts = baselines.matched_amount(r, scope)
    out = baselines.prune_matched(net, r, scope=scope, seed=0)
    zeros = [sum(int((m.weight == 0).sum()) for m in (o.model[0], o.model[2])) for o in out.values()]
    want = sum(lp.n_zeroed - lp.n_structural_zeroed for lp in r.layers)
    assert zeros == [want, want]  # both baselines prune what dwt dropped, to the weight
    if scope == "global":
        assert amounts == pytest.approx(want / sum(lp.n_positions - lp.n_structural for lp in r.layers))


@pytest.mark.parametrize("mode, wavelet", [("constant", "db2"), ("smooth", "bior4.4"), ("zero", "bior4.4"), ("symmetric", "haar")])
def test_structural_zeros_of_other_extension_modes_are_zero_for_other_weights(mode, wavelet):
    """Beyond periodization: the positions found on one random input are, on another input 100x
    larger, within rounding of 0 (PyWavelets), every filter of a `filter` layout has the same
    count of them, and every other coefficient is far from 0."""
    from wavesweep import wavelets as wv

    rng = np.random.default_rng(3)
    w = rng.standard_normal((8, 27)) * 100
    coeffs, st = wv.decompose(w, wavelet=wavelet, level=2, layout="filter", mode=mode)
    mask = wv.structural_zeros(st)
    assert mask.any() and mask.sum() % 8 == 0
    mag = np.abs(coeffs)
    assert mag[mask].max() <= 1e-9 * mag.max() and mag[~mask].min() > 1e-6 * mag.max()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("layout", ["kernel", "filter"])
def test_dwt_a_layer_without_filters_is_pruned_as_empty(layout, backend):
    """A conv with 0 output channels (weight (0, 2, 3, 3)) has no coefficients: it is recorded
    with 0 positions, and the other layers are pruned as PyWavelets and np.percentile give
    them. The structural-zero probe took the max of its 0 coefficients and raised numpy's
    'zero-size array to reduction operation maximum', in the kernel and filter layouts only."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(2, 0, 3), nn.Conv2d(0, 3, 3), nn.Conv2d(2, 5, 3, bias=False))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.StructuralZerosWarning)
        r = P.prune_dwt(net, wavelet="haar", level=1, percentile=50, layout=layout, backend=backend)
    assert [(lp.n_positions, lp.n_zeroed, lp.n_structural) for lp in r.layers[:2]] == [(0, 0, 0), (0, 0, 0)]
    w = net[2].weight.detach().numpy()
    if layout == "filter":
        bands = pywt.wavedec(w.reshape(5, -1), "haar", mode="periodization", level=1, axis=-1)
    else:
        ca, details = pywt.wavedec2(w, "haar", mode="periodization", level=1, axes=(-2, -1))
        bands = [ca, *details]
    c = np.concatenate([b.ravel() for b in bands])
    keep = np.abs(c) >= np.percentile(np.abs(c), 50)
    np.testing.assert_array_equal(r.layers[2].keep, keep)
    assert r.layers[2].n_zeroed == int((~keep).sum())
    assert r.matched_fraction == r.layers[2].matched_fraction
    out = P.prune_matched(net, r)
    assert [lp.n_zeroed for lp in out["magnitude"].layers] == [0, 0, round(r.layers[2].matched_fraction * w.size)]


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_dwt_a_layer_the_layout_cannot_take_is_named_and_nothing_is_written(backend):
    """`kernel` needs 4-D conv weights: with Linear layers among the targets the error names the
    layer, and comes before any layer is pruned. It used to come from the Linear layer's turn
    without its name, and with ``inplace=True`` the numpy backend had already overwritten the
    conv before it: the caller's model left half pruned."""
    net = small_net()
    before = _state(net)
    with pytest.raises(ValueError, match=r"target layer '5': layout 'kernel' needs a 4-D conv weight .* got shape \(10, 24\)"):
        P.prune_dwt(net, wavelet="haar", level=1, percentile=50, layout="kernel", targets=("conv", "linear"),
                    inplace=True, backend=backend)  # fmt: skip
    _assert_same_state(before, _state(net))


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_random_keys_drawn_ahead_give_the_same_masks(scope, backend):
    """Keys drawn ahead on a thread (``RandomKeys``, as a trial does from its start) give the masks,
    counts and weights ``prune_random`` gives drawing them itself (any tie-break draws from the
    same generator after the keys), through ``prune_matched`` too. Oracle of the draws: the k
    smallest of ``torch.rand(n, generator=...)`` per layer in order (one draw of the total in the
    global scope)."""
    from wavesweep.baselines import RandomKeys, _smallest

    net = _tied_net()
    targets = ("conv", "linear")
    sizes = [m.weight.numel() for _, m in P.target_layers(net, targets)]
    names = [n for n, _ in P.target_layers(net, targets)]
    amounts = [0.37, 0.5] + ([{n: (i % 4) / 4 + 0.1 for i, n in enumerate(names)}] if scope == "layer" else [])
    for seed in (0, 5):
        for amount in amounts:
            ref = P.prune_random(net, amount, seed=seed, scope=scope, targets=targets, backend=backend)
            keys = RandomKeys(seed, sizes, joint=scope == "global")
            got = P.prune_random(net, amount, seed=seed, scope=scope, targets=targets, backend=backend, keys=keys)
            assert got.config == ref.config
            assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref.layers]
            for a, b in zip(got.layers, ref.layers):
                assert np.array_equal(a.keep, b.keep), a.name
            for (k, x), (_, y) in zip(got.model.state_dict().items(), ref.model.state_dict().items()):
                assert torch.equal(x, y), k
            if isinstance(amount, float):
                g = torch.Generator().manual_seed(seed)
                if scope == "global":
                    keys = torch.rand(sum(sizes), generator=g).numpy()
                    oracle = np.split(_smallest(keys, round(amount * keys.size), g), np.cumsum(sizes)[:-1])
                else:
                    oracle = [_smallest(torch.rand(n, generator=g).numpy(), round(amount * n), g) for n in sizes]
                assert all(np.array_equal(~a.keep, o) for a, o in zip(got.layers, oracle))
    # through prune_matched, as a trial calls it
    dwt = P.prune_dwt(net, wavelet="haar", level=1, percentile=40, scope=scope, targets=targets)
    ref = P.prune_matched(net, dwt, scope=scope, seed=3)["random"]
    got = P.prune_matched(net, dwt, scope=scope, seed=3, keys=RandomKeys(3, sizes, joint=scope == "global"))["random"]
    assert all(np.array_equal(a.keep, b.keep) for a, b in zip(got.layers, ref.layers))


def test_random_keys_for_other_layers_or_another_seed_are_refused():
    from wavesweep.baselines import RandomKeys

    net = _tied_net()
    sizes = [m.weight.numel() for _, m in P.target_layers(net, "conv")]
    with pytest.raises(ValueError, match=r"random keys drawn for \d+ layers"):
        P.prune_random(net, 0.5, targets=("conv", "linear"), keys=RandomKeys(0, sizes, joint=False))
    with pytest.raises(ValueError, match=r"joint=True\) cannot prune"):
        P.prune_random(net, 0.5, targets="conv", keys=RandomKeys(0, sizes, joint=True))
    dwt = P.prune_dwt(net, wavelet="haar", level=1, percentile=40)
    with pytest.raises(ValueError, match="random keys drawn for seed 1, not 0"):
        P.prune_matched(net, dwt, seed=0, keys=RandomKeys(1, sizes, joint=False))
    with pytest.raises(ValueError, match="either keys= or generator="):
        P.prune_random(net, 0.5, targets="conv", keys=RandomKeys(0, sizes, joint=False), generator=torch.Generator())


def test_random_keys_serve_one_pruning():
    """A second pruning with the same drawn keys would break its ties from the generator as the
    first left it, not as ``prune_random(seed=...)`` does: on a net whose keys tie (``_tied_net``
    prunes at amounts that need the tie-break), its masks could differ. So the keys are taken once."""
    from wavesweep.baselines import RandomKeys

    net = _tied_net()
    sizes = [m.weight.numel() for _, m in P.target_layers(net, "conv")]
    keys = RandomKeys(0, sizes, joint=False)
    ref = P.prune_random(net, 0.5, seed=0, targets="conv")
    got = P.prune_random(net, 0.5, targets="conv", keys=keys)
    assert all(np.array_equal(a.keep, b.keep) for a, b in zip(got.layers, ref.layers))
    with pytest.raises(RuntimeError, match="random keys of seed 0 were taken by a pruning already"):
        P.prune_random(net, 0.5, targets="conv", keys=keys)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_cuda_random_keys_drawn_into_pinned_memory_give_the_cpu_masks(scope, device):
    """A CUDA trial draws random's keys on a thread into pinned memory (``RandomKeys(pin=True)``:
    the allocation goes through PyTorch's caching host allocator from that thread, on the device
    whose primary context exists) and copies them to the device without blocking: the masks,
    counts and weights are those of ``prune_random(seed)`` on the CPU. No other test pins the keys
    (the CPU cannot); the CPU case runs the same comparison unpinned."""
    from wavesweep.baselines import RandomKeys

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    net = _tied_net()
    targets = ("conv", "linear")
    sizes = [m.weight.numel() for _, m in P.target_layers(net, targets)]
    dwt = P.prune_dwt(net, wavelet="haar", level=1, percentile=40, scope=scope, targets=targets)
    ref = P.prune_matched(net, dwt, scope=scope, seed=3, targets=targets)["random"]
    on_dev = copy.deepcopy(net).to(device)
    keys = RandomKeys(3, sizes, joint=scope == "global", pin=device == "cuda")
    got = P.prune_matched(on_dev, dwt, scope=scope, seed=3, targets=targets, keys=keys)["random"]
    assert keys._buffer.is_pinned() == (device == "cuda")
    assert all(p.device.type == device for p in got.model.parameters())
    assert [lp.n_zeroed for lp in got.layers] == [lp.n_zeroed for lp in ref.layers]
    assert all(np.array_equal(a.keep, b.keep) for a, b in zip(got.layers, ref.layers))
    for (k, x), (_, y) in zip(got.model.state_dict().items(), ref.model.state_dict().items()):
        assert torch.equal(x.cpu(), y), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_finite_check_equals_isfinite_per_layer(dtype):
    """``check_finite_targets`` first sums |w| per layer in one ``_foreach_norm``; it must say what
    ``torch.isfinite(w).all()`` per layer says (the oracle) in every case: all finite; one NaN; one
    +inf; +inf and -inf in one layer (their sum is NaN); finite weights whose sum of |w| overflows
    (float16 past 65,504; 1e38-sized float32/float64 values past float32's range), which must
    pass; and the error names the first bad layer, as before."""
    from wavesweep.prune_record import check_finite_targets

    big = {torch.float16: 60000.0, torch.float32: 3e38, torch.float64: 3e38}[dtype]

    def net(*edits):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Conv2d(4, 4, 3), nn.Linear(4, 3)).to(dtype)
        with torch.no_grad():
            for layer, index, value in edits:
                m[layer].weight.view(-1)[index] = value
        return [(str(i), m[i]) for i in range(3)]

    cases = {
        "finite": net(),
        "nan": net((1, 5, float("nan"))),
        "inf": net((2, 0, float("inf"))),
        "inf-inf": net((1, 0, float("inf")), (1, 1, -float("inf"))),
        "overflowing sum": net((0, 0, big), (0, 1, -big), (0, 2, big)),
        "two bad": net((2, 1, float("nan")), (0, 3, -float("inf"))),
    }
    mixed = net((1, 2, float("nan")))  # layers in two dtypes: the norms are converted one by one
    mixed[2][1].to(torch.float32 if dtype != torch.float32 else torch.float64)
    cases["two dtypes"], cases["two dtypes, finite"] = mixed, [mixed[0], mixed[2]]
    for case, layers in cases.items():
        bad = [n for n, m in layers if not bool(torch.isfinite(m.weight).all())]
        if not bad:
            check_finite_targets(layers)  # no error
            continue
        with pytest.raises(ValueError, match=rf"target layer '{bad[0]}': weight has \d+ NaN or infinite"):
            check_finite_targets(layers)
    # the exact fallback ran there (the sums are compared in float32)
    assert not bool(torch.isfinite(torch._foreach_norm([cases["overflowing sum"][0][1].weight.detach()], 1)[0].float()))


@pytest.mark.parametrize("mode", ["constant", "smooth", "zero"])
def test_structural_zeros_are_the_same_positions_in_every_row(mode):
    """The ``filter`` and ``kernel`` layouts transform every row (filter, kernel) by the same linear
    map, so every row has the same structural positions. Found on one random input with a cut at
    1e-12 of the largest coefficient, rows differed in these modes, where highpass taps summing to
    rounding (sym3: -3e-12) times each row's edge value sat on both sides of the cut (sym3,
    ``constant``, 8 x 27: 6 of the 8 rows marked; in 103 of 516 wavelet/shape pairs). Every
    wavelet whose highpass sums to rounding, not to 0, and two that sum to exactly 0."""
    import pywt

    from wavesweep import wavelets as wv

    rng = np.random.default_rng(5)
    for wavelet in ("sym3", "bior4.4", "sym8", "db2", "coif3", "rbio3.5"):
        for shape, layout in (((8, 27), "filter"), ((6, 4, 9), "filter"), ((4, 3, 5, 5), "kernel")):
            coeffs, st = wv.decompose(rng.standard_normal(shape), wavelet=wavelet, level=2, layout=layout, mode=mode)
            mask = wv.structural_zeros(st)
            rows = math.prod(st.array_shape[: len(st.array_shape) - st.ndim])
            for band in np.split(mask, np.cumsum(st.sizes)[:-1]):
                per_row = band.reshape(rows, -1)
                assert (per_row == per_row[:1]).all(), (wavelet, shape, mode)
            mag = np.abs(coeffs)  # another input: within rounding of 0 there, and the rest is not
            assert mag[mask].max(initial=0.0) <= 1e-8 * mag.max(), (wavelet, shape, mode)
    # sym3 in constant mode: the detail positions on the extension alone are marked, in every row
    if mode == "constant":
        assert abs(sum(pywt.Wavelet("sym3").dec_hi)) > 1e-12  # why the rows differed
        _, st = wv.decompose(np.ones((8, 27)), wavelet="sym3", level=2, layout="filter", mode=mode)
        assert wv.structural_zeros(st).sum() % 8 == 0 and wv.structural_zeros(st).any()


# --------------------------------------------------------------------------- the Python API's bad input


def test_api_arguments_the_cli_never_gives_are_refused_with_one_line():
    """Calls of the Python API with values the CLI's TrialConfig never produces: each was taken
    silently ("false" kept the approximation band, a level above 5 gave a structure that does not
    round-trip) or failed inside NumPy/torch without naming the argument."""
    net = small_net()
    for bad in ("false", "no", 0, None):
        with pytest.raises(ValueError, match=f"keep_approx must be true or false, got {bad!r}"):
            P.prune_dwt(net, wavelet="haar", level=1, percentile=50, keep_approx=bad)
    assert P.prune_dwt(net, wavelet="haar", level=1, percentile=50, keep_approx=np.bool_(True)).config["keep_approx"] is True
    for fn in (lambda t: P.prune_dwt(net, wavelet="haar", level=1, percentile=50, targets=t),
               lambda t: P.prune_magnitude(net, 0.5, targets=t), lambda t: P.prune_random(net, 0.5, targets=t)):  # fmt: skip
        with pytest.raises(ValueError, match="targets must name at least one of: conv, linear; got None"):
            fn(None)
    for seed in (2**64, -(2**63) - 1, 2**70):
        with pytest.raises(ValueError, match=rf"seed must be an int in -2\*\*63..2\*\*64-1 \(or pass generator=\), got {seed}"):
            P.prune_random(net, 0.5, seed=seed)
        with pytest.raises(ValueError, match=rf"seed must be an int in -2\*\*63..2\*\*64-1, got {seed}"):
            baselines.RandomKeys(seed, [4], joint=False)
    for seed in (2**64 - 1, -(2**63)):  # the ends of torch's range are seeds
        assert torch.equal(torch.tensor(P.prune_random(net, 0.5, seed=seed).layers[0].keep),
                           torch.tensor(P.prune_random(net, 0.5, generator=torch.Generator().manual_seed(seed)).layers[0].keep))  # fmt: skip
    w = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    for thr in (float("nan"), np.float32("nan"), float("inf"), "0.1", np.array([0.1])):
        with pytest.raises(ValueError, match="threshold must be a finite number"):
            wv.dwt_prune_array(w, wavelet="haar", level=1, threshold=thr)
    kept = wv.dwt_prune_array(w, wavelet="haar", level=1, threshold=np.array(0.5))[2]
    assert 0 < kept.sum() < kept.size
    for level in (99, 6, -3, 2.7, True):
        for call in (lambda: wv.decompose(w, wavelet="haar", level=level, layout="filter"),
                     lambda: wv.effective_level(w.shape, "haar", level, "filter"),
                     lambda: wv.dwt_prune_array(w, wavelet="haar", level=level, percentile=50)):  # fmt: skip
            with pytest.raises(ValueError, match=rf"level must be an int in 0..5, got {level!r}"):
                call()
    coeffs, st = wv.decompose(w, wavelet="haar", level=0, layout="filter")  # 0: the identity, as before
    assert st.level == 0 and np.array_equal(coeffs, w.ravel())


def test_matched_baselines_prune_the_layers_dwt_pruned_in_either_scope():
    """prune_matched with targets that select other layers than dwt's: per layer it was refused,
    globally dwt's fraction was spread over layers dwt never pruned (half of a Linear). Refused in
    both scopes now."""
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    for scope in ("layer", "global"):
        dwt = P.prune_dwt(net, wavelet="haar", level=1, percentile=50, targets="conv", scope=scope)
        for targets in (("conv", "linear"), "linear"):
            with pytest.raises(ValueError, match=r"select \d layer\(s\) of model .*dwt pruned 1 \(0\): the baselines prune the layers dwt pruned"):
                baselines.prune_matched(net, dwt, scope=scope, targets=targets)
        out = baselines.prune_matched(net, dwt, scope=scope, targets="conv")
        assert [lp.name for lp in out["magnitude"].layers] == [lp.name for lp in out["random"].layers] == ["0"]
