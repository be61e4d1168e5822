"""Accounting and compressed checkpoints: stats recomputed by hand, file size, round trips, corruption."""

from __future__ import annotations

import json
import math
import struct
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from wavesweep import accounting as A
from wavesweep import checkpoint as C
from wavesweep import pruning as P
from wavesweep import wavelets as wv


def net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 12, 3, bias=False),
        nn.BatchNorm2d(12),
        nn.Flatten(),
        nn.Linear(12 * 4 * 4, 10),
    ).to(dtype)


def skeleton(dtype=torch.float32):
    return net(seed=123, dtype=dtype)


RESULTS = {
    "dwt": lambda m: P.prune_dwt(m, wavelet="db2", level=2, percentile=70, layout="filter", targets=("conv", "linear")),
    "dwt_matrix_sym": lambda m: P.prune_dwt(m, wavelet="sym3", level=2, percentile=40, layout="matrix", mode="symmetric"),
    "dwt_kernel": lambda m: P.prune_dwt(m, wavelet="haar", level=1, percentile=50, layout="kernel", keep_approx=True),
    "magnitude": lambda m: P.prune_magnitude(m, 0.6, targets=("conv", "linear")),
    "random": lambda m: P.prune_random(m, 0.45, seed=5, scope="global"),
}


def _result(kind, model=None):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        return RESULTS[kind](model if model is not None else net())


# --------------------------------------------------------------------------- stats


@pytest.mark.parametrize("kind", RESULTS)
def test_model_stats_recomputed_by_hand(kind):
    base = net()
    res = _result(kind, base)
    st = A.model_stats(base, res)
    sd = res.model.state_dict()
    pruned_keys = {f"{lp.name}.weight": lp for lp in res.layers}
    # independent recomputation of the encoding size
    expect_stored = 0
    for key, t in sd.items():
        if key in pruned_keys:
            lp = pruned_keys[key]
            itemsize = 4  # float32 weights and coefficients
            expect_stored += math.ceil(lp.n_positions / 8) + int(lp.keep.sum()) * itemsize
        else:
            expect_stored += t.numel() * t.element_size()
    expect_dense = sum(t.numel() * t.element_size() for t in sd.values())
    assert st.stored_bytes == expect_stored
    assert st.dense_bytes == expect_dense
    assert st.compression_ratio == pytest.approx(expect_dense / expect_stored)
    # per layer
    base_mods, new_mods = dict(base.named_modules()), dict(res.model.named_modules())
    for ls, lp in zip(st.layers, res.layers, strict=True):
        w0, w1 = base_mods[ls.name].weight.detach().double(), new_mods[ls.name].weight.detach().double()
        assert ls.params == w0.numel() and ls.shape == tuple(w0.shape)
        assert ls.zero_weights == int((w1 == 0).sum())
        assert ls.rel_l2_error == pytest.approx(float((w1 - w0).norm() / w0.norm()), rel=1e-9)
        assert ls.coeffs == lp.n_positions and ls.zeroed_coeffs == lp.n_zeroed
        assert ls.dense_bytes == 4 * ls.params
    assert st.target_params == sum(ls.params for ls in st.layers)
    assert st.model_params == sum(p.numel() for p in res.model.parameters())
    assert st.model_zero_weights == sum(int((p == 0).sum()) for p in res.model.parameters())
    assert st.weight_sparsity_model == st.model_zero_weights / st.model_params
    assert st.coeff_sparsity == st.zeroed_coeffs / st.coeffs
    assert st.mean_rel_l2_error == pytest.approx(np.mean([ls.rel_l2_error for ls in st.layers]))
    if kind in ("magnitude", "random"):
        assert st.coeffs == st.target_params and st.zeroed_coeffs == st.target_zero_weights


def test_dwt_is_not_sparse_in_weights_and_counts_extra_coeffs():
    base = net()
    res = _result("dwt_matrix_sym", base)
    st = A.model_stats(base, res)
    assert st.coeffs > st.target_params  # symmetric mode is expansive, and it is counted
    assert st.coeff_sparsity > 0.35 and st.weight_sparsity_target < 0.05


def test_amount_zero_stats():
    base = net()
    st = A.model_stats(base, P.prune_magnitude(base, 0.0))
    assert st.zeroed_coeffs == 0 and st.mean_rel_l2_error == 0.0
    # a bitmap costs 1 bit per weight over dense: compression ratio just below 1
    assert st.compression_ratio < 1.0 and st.stored_bytes - st.dense_bytes == sum(
        math.ceil(ls.params / 8) for ls in st.layers
    )


def test_frame_and_totals():
    base = net()
    st = A.model_stats(base, _result("magnitude", base))
    df = st.to_frame()
    assert isinstance(df, pd.DataFrame) and len(df) == len(st.layers)
    assert list(df.columns) == [f.name for f in A.fields(A.LayerStats)]
    assert df.loc[0, "shape"] == "16x3x3x3"
    tot = st.totals()
    assert set(tot) == {f.name for f in A.fields(A.ModelStats)} - {"method", "layers"}
    assert all(isinstance(v, (int, float)) for v in tot.values())


# --------------------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("kind", RESULTS)
def test_checkpoint_round_trip_and_size(kind, tmp_path):
    base = net()
    res = _result(kind, base)
    path = tmp_path / "model.wsz"
    size = C.save_compressed(res, path, metadata={"run": "abc", "n": 3})
    head = C.read_header(path)
    st = A.model_stats(base, res)
    assert size == path.stat().st_size == st.stored_bytes + head["header_bytes"]
    assert head["header_bytes"] == C.HEADER_FIXED_BYTES + struct.unpack_from("<Q", path.read_bytes(), 12)[0]
    model, meta = C.load_compressed(path, skeleton())
    assert meta["method"] == res.method and meta["user"] == {"run": "abc", "n": 3}
    assert meta["config"] == json.loads(json.dumps(res.config))
    ref = res.model.state_dict()
    got = model.state_dict()
    assert ref.keys() == got.keys()
    pruned = {f"{lp.name}.weight" for lp in res.layers}
    for k in ref:
        if res.method == "dwt" and k in pruned:
            torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-6)
        else:  # bitwise, including +0.0 for pruned weights
            assert torch.equal(got[k].view(-1).view(torch.uint8) if got[k].dtype.is_floating_point else got[k],
                               ref[k].view(-1).view(torch.uint8) if ref[k].dtype.is_floating_point else ref[k]), k
    sd, meta2 = C.read_compressed(path)
    assert sd.keys() == ref.keys() and meta2["method"] == res.method


def test_checkpoint_dwt_metadata(tmp_path):
    res = _result("dwt")
    path = tmp_path / "d.wsz"
    C.save_compressed(res, path)
    head = C.read_header(path)
    assert (head["wavelet"], head["mode"], head["layout"]) == ("db2", "periodization", "filter")
    assert head["levels"] == {lp.name: lp.level_effective for lp in res.layers}
    dwt_entries = [e for e in head["entries"] if e["kind"] == "dwt"]
    assert [e["key"] for e in dwt_entries] == [f"{lp.name}.weight" for lp in res.layers]
    for e, lp in zip(dwt_entries, res.layers):
        assert e["structure"] == lp.structure.to_json() and e["n"] == lp.n_positions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shared_base_cache_changes_nothing(dtype):
    """One trial's three methods share base norms: same stats as separate calls, no weight touched."""
    base = net(dtype=dtype)
    results = [_result(k, base) for k in ("dwt", "magnitude", "random")]
    before = [{k: v.clone() for k, v in r.model.state_dict().items()} for r in results]
    cache: dict = {}
    shared = [A.model_stats(base, r, base_cache=cache) for r in results]
    alone = [A.model_stats(base, r) for r in results]
    assert shared == alone
    assert set(cache) == {lp.name for r in results for lp in r.layers}
    for r, sd in zip(results, before):
        assert all(torch.equal(r.model.state_dict()[k], v) for k, v in sd.items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_checkpoint_other_dtypes_bitwise(dtype, tmp_path):
    res = P.prune_magnitude(net(dtype=dtype), 0.5)
    path = tmp_path / "x.wsz"
    size = C.save_compressed(res, path)
    st = A.model_stats(net(dtype=dtype), res)
    assert size == st.stored_bytes + C.read_header(path)["header_bytes"]
    model, _ = C.load_compressed(path, skeleton(dtype))
    for k, v in res.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


class _TiedLM(nn.Module):
    """An embedding tied to an output Linear (as in language models), a conv, and one buffer
    registered under two names: tensors ``state_dict()`` lists under two keys each."""

    def __init__(self, shared_module: bool = False):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.conv = nn.Conv2d(2, 6, 3)
        self.head = nn.Linear(24, 50, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("scale", torch.linspace(0, 1, 40))
        self.register_buffer("scale_again", self.scale)
        if shared_module:  # one conv module used twice: its weight and bias under two keys each
            self.conv_again = self.conv


TIED = {
    "dwt_other": lambda m: P.prune_dwt(m, wavelet="haar", level=1, percentile=60, layout="filter"),
    "magnitude_other": lambda m: P.prune_magnitude(m, 0.5),
    "dwt_target": lambda m: P.prune_dwt(m, wavelet="db2", level=2, percentile=60, layout="matrix", targets=("conv", "linear")),
    "random_target": lambda m: P.prune_random(m, 0.4, seed=3, targets=("conv", "linear")),
    "magnitude_shared_module": lambda m: P.prune_magnitude(m, 0.5),
}


@pytest.mark.parametrize("kind", TIED)
def test_shared_tensors_are_counted_and_stored_once(kind, tmp_path):
    """A tensor listed under several state-dict keys is one tensor: dense and stored bytes count
    it once (pruned when it is a target weight), the file holds it once, and it loads back into
    every key. Oracle: a byte count over the model's distinct parameters and buffers."""
    def build():
        torch.manual_seed(0)
        return _TiedLM(shared_module=kind.endswith("shared_module"))

    base = build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        res = TIED[kind](base)
    tensors = list(res.model.parameters()) + list(res.model.buffers())  # distinct tensors
    assert len(res.model.state_dict()) > len(tensors)
    pruned = {id(dict(res.model.named_modules())[lp.name].weight): lp for lp in res.layers}
    expect_stored = 0
    for t in tensors:
        lp = pruned.get(id(t))
        if lp is None:
            expect_stored += t.numel() * t.element_size()
        else:
            itemsize = lp.coeffs.dtype.itemsize if lp.coeffs is not None else t.element_size()
            expect_stored += math.ceil(lp.n_positions / 8) + int(np.count_nonzero(lp.keep)) * itemsize
    st = A.model_stats(base, res)
    assert st.dense_bytes == sum(t.numel() * t.element_size() for t in tensors)
    assert st.stored_bytes == expect_stored
    path = tmp_path / "tied.wsz"
    size = C.save_compressed(res, path)
    assert size == path.stat().st_size == st.stored_bytes + C.read_header(path)["header_bytes"]
    model, _ = C.load_compressed(path, build())
    assert model.head.weight is model.emb.weight
    for k, v in res.model.state_dict().items():
        if res.method == "dwt" and k in {lp.key for lp in res.layers}:
            torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(model.state_dict()[k], v), k


def test_alias_entry_of_a_missing_key_is_one_line_value_error(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "a.wsz"
    C.save_compressed(P.prune_magnitude(_TiedLM(), 0.5), path)
    good = path.read_bytes()
    hb = C.read_header(path)["header_bytes"]
    meta = json.loads(good[24:hb])
    alias = next(e for e in meta["entries"] if e["kind"] == "alias")
    alias["of"] = "nowhere"
    blob = json.dumps(meta).encode()
    data = bytearray(struct.pack("<8sIQI", C.MAGIC, 2, len(blob), 0) + blob + good[hb:])
    assert "alias of 'nowhere'" in _rejects_one_line(tmp_path / "crafted.wsz", _with_crc(data))


def test_checkpoint_bfloat16_with_nothing_kept_reads_back(tmp_path):
    """bfloat16 (no NumPy dtype: read as raw bytes) with zero values to read: a layer global
    magnitude pruned whole, and an empty buffer, round trip bitwise."""
    base = net(dtype=torch.bfloat16)
    with torch.no_grad():
        base[0].weight.mul_(1e-3)  # the smallest weights: global scope prunes this layer whole
    base.register_buffer("empty", torch.zeros(0, dtype=torch.bfloat16))
    res = P.prune_magnitude(base, 0.3, scope="global")
    assert res.layers[0].n_zeroed == res.layers[0].n_positions
    path = tmp_path / "b.wsz"
    size = C.save_compressed(res, path)
    assert size == A.model_stats(base, res).stored_bytes + C.read_header(path)["header_bytes"]
    skel = skeleton(torch.bfloat16)
    skel.register_buffer("empty", torch.ones(0, dtype=torch.bfloat16))
    model, _ = C.load_compressed(path, skel)
    for k, v in res.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v) and model.state_dict()[k].dtype == v.dtype, k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dwt_stores_float32_coefficients(dtype, tmp_path):
    """The documented asymmetry of a half-precision model: dwt's coefficients are float32 (4 B
    a kept value), magnitude's kept weights the weight's 2 B; the file is the accounting either
    way, and dwt's rebuilt weights equal the pruned ones to the dtype's rounding."""
    base = net(dtype=dtype)
    dwt = _result("dwt", base)
    mag = P.prune_matched(base, dwt, seed=0, targets=("conv", "linear"))["magnitude"]
    for res, itemsize in ((dwt, 4), (mag, 2)):
        st = A.model_stats(base, res)
        for ls, lp in zip(st.layers, res.layers, strict=True):
            assert ls.stored_bytes == math.ceil(lp.n_positions / 8) + int(np.count_nonzero(lp.keep)) * itemsize
        path = tmp_path / f"{res.method}.wsz"
        size = C.save_compressed(res, path)
        assert size == st.stored_bytes + C.read_header(path)["header_bytes"]
        pruned = {e["key"]: e for e in C.read_header(path)["entries"] if e["kind"] != "dense"}
        assert {e["value_dtype"] for e in pruned.values()} == {"float32" if res.method == "dwt" else str(dtype)[6:]}
        model, _ = C.load_compressed(path, skeleton(dtype))
        for k, v in res.model.state_dict().items():
            exact = res.method != "dwt" or k not in pruned
            torch.testing.assert_close(model.state_dict()[k], v, **({"rtol": 0, "atol": 0} if exact else {}))


def test_model_mismatch_names_key(tmp_path):
    res = _result("magnitude")
    path = tmp_path / "m.wsz"
    C.save_compressed(res, path)
    other = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 12, 5, bias=False))
    with pytest.raises(ValueError, match=r"'3\.weight'.*\(12, 16, 3, 3\).*\(12, 16, 5, 5\)"):
        C.load_compressed(path, other)
    bigger = nn.Sequential(*skeleton(), nn.Linear(10, 2))
    with pytest.raises(ValueError, match=r"'7\.weight'"):
        C.load_compressed(path, bigger)


def _corrupt(path, fn):
    data = bytearray(path.read_bytes())
    path.write_bytes(bytes(fn(data)))


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda d: d[:10], "truncated"),
        (lambda d: d[:-7], "CRC-32"),  # the whole-file CRC is checked before the metadata is read
        (lambda d: d + b"x", "CRC-32"),
        (lambda d: b"NOTWAVES" + d[8:], "not a wavesweep compressed checkpoint"),
        (lambda d: d[:8] + struct.pack("<I", 99) + d[12:], "unsupported format version 99"),
        (lambda d: d[:24] + b"\xff" + d[25:], "CRC-32"),
        (lambda d: d[:24] + b"[" + d[25:], "CRC-32"),
        (lambda d: d[:-3] + bytes([d[-3] ^ 0xFF]) + d[-2:], "CRC-32"),
        (lambda d: d[:12] + struct.pack("<Q", 10**9) + d[20:], "truncated"),
    ],
)
def test_corrupt_checkpoint_rejected(damage, match, tmp_path):
    path = tmp_path / "c.wsz"
    C.save_compressed(_result("dwt"), path)
    _corrupt(path, damage)
    with pytest.raises(ValueError, match=match) as ei:
        C.load_compressed(path, skeleton())
    assert str(path) in str(ei.value)


def test_missing_file_is_value_error(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        C.read_compressed(tmp_path / "nope.wsz")


def test_write_is_atomic_and_metadata_checked(tmp_path):
    res = _result("random")
    path = tmp_path / "sub" / "r.wsz"
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        C.save_compressed(res, path, metadata={"x": object()})
    assert not path.exists()
    C.save_compressed(res, path)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        C.save_compressed(res, path, metadata={"x": float("nan")})
    assert [p.name for p in path.parent.iterdir()] == ["r.wsz"]  # no temp file left behind
    assert path.read_bytes()[:8] == C.MAGIC


@pytest.mark.slow  # a full-size model: seconds; the round trips above are the same code on small nets
def test_resnet18_dwt_checkpoint(tmp_path):
    """Full-size round trip: ResNet-18, filter layout, bior4.4 level 5."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    base = torchvision.models.resnet18(weights=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        res = P.prune_dwt(base, wavelet="bior4.4", level=5, percentile=80, layout="filter")
    st = A.model_stats(base, res)
    path = tmp_path / "r18.wsz"
    size = C.save_compressed(res, path)
    assert size == st.stored_bytes + C.read_header(path)["header_bytes"]
    assert st.compression_ratio > 3.0  # 80% of conv coefficients dropped
    model, _ = C.load_compressed(path, torchvision.models.resnet18(weights=None))
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- header integrity


def _tiny_checkpoint(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Flatten(), nn.Linear(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", wv.LevelClampedWarning)
        res = P.prune_dwt(model, wavelet="bior1.3", level=1, percentile=50, layout="filter")
    path = tmp_path / "t.wsz"
    C.save_compressed(res, path)
    return path, model


def _rejects_one_line(path, data):
    """Loading ``data`` raises only a one-line ValueError naming the file."""
    path.write_bytes(bytes(data))
    try:
        C.read_compressed(path)
    except ValueError as e:
        msg = str(e)
        assert "\n" not in msg and msg.startswith(str(path)) or msg.startswith("cannot read"), msg
        return msg
    raise AssertionError(f"damaged checkpoint of {len(data)} bytes loaded without error")


def test_one_bit_header_flip_is_rejected(tmp_path):
    """A flipped bit in the JSON (bior1.3 -> bior1.1) must not load as another model."""
    path, _ = _tiny_checkpoint(tmp_path)
    data = bytearray(path.read_bytes())
    at = data.index(b'"bior1.3"', C.HEADER_FIXED_BYTES) + 7  # the "3"
    data[at] ^= 0x02  # "3" -> "1"
    assert bytes(data).count(b"bior1.1") == 1
    assert "CRC-32" in _rejects_one_line(path, data)


def test_fuzz_header_only_one_line_value_errors(tmp_path):
    path, _ = _tiny_checkpoint(tmp_path)
    good = path.read_bytes()
    header = C.read_header(path)["header_bytes"]
    bad = tmp_path / "bad.wsz"
    for i in range(header * 8):  # every bit of the header (fixed part and JSON)
        data = bytearray(good)
        data[i // 8] ^= 1 << (i % 8)
        _rejects_one_line(bad, data)
    for n in range(header + 1):  # truncated at every length of the header
        _rejects_one_line(bad, good[:n])
    rng = np.random.default_rng(0)
    for n in (0, 1, 19, 20, 24, 100, len(good)):  # random bytes, with and without the magic
        _rejects_one_line(bad, rng.bytes(n))
        _rejects_one_line(bad, C.MAGIC + rng.bytes(n))


def _with_crc(data: bytearray) -> bytearray:
    """Re-stamp the file CRC: a deliberately crafted (not accidentally damaged) file."""
    import zlib

    crc = zlib.crc32(bytes(data[24:]), zlib.crc32(bytes(data[:20])))
    data[20:24] = struct.pack("<I", crc)
    return data


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m["entries"][0].__setitem__("shape", [10**30, 10**30]),  # OverflowError territory
        lambda m: m["entries"][0].__setitem__("shape", "x"),
        lambda m: m["entries"][0].__setitem__("n", -1),
        lambda m: m["entries"][0].__setitem__("kept", 1.5),
        lambda m: m["entries"][0].__setitem__("dtype", ["float32"]),  # unhashable
        lambda m: m["entries"][0].__setitem__("structure", {"layout": "filter"}),
        lambda m: m["entries"][0]["structure"].__setitem__("coeff_shapes", 7),
        lambda m: m["entries"].__setitem__(0, None),
        lambda m: m["entries"].__setitem__(0, {"key": 1}),
        lambda m: m.__setitem__("entries", {"a": 1}),
        lambda m: m.__setitem__("payload_bytes", "12"),
        lambda m: m.__setitem__("user", json.loads("[" * 70 + "]" * 70)),  # deeper than the limit
    ],
)
def test_crafted_metadata_with_valid_crc_is_one_line_value_error(edit, tmp_path):
    """A crafted header (valid file CRC) still fails with one line, never another exception type."""
    path, _ = _tiny_checkpoint(tmp_path)
    good = path.read_bytes()
    hb = C.read_header(path)["header_bytes"]
    meta = json.loads(good[24:hb])
    assert meta["entries"][0]["kind"] == "dwt"
    edit(meta)
    blob = json.dumps(meta).encode()
    data = bytearray(struct.pack("<8sIQI", C.MAGIC, 2, len(blob), 0) + blob + good[hb:])
    _rejects_one_line(tmp_path / "crafted.wsz", _with_crc(data))


def test_deeply_nested_metadata_is_one_line_value_error(tmp_path):
    blob = b"[" * 100_000 + b"]" * 100_000
    data = bytearray(struct.pack("<8sIQI", C.MAGIC, 2, len(blob), 0) + blob)
    assert "nested deeper" in _rejects_one_line(tmp_path / "deep.wsz", _with_crc(data))


def test_version_1_files_are_still_read(tmp_path):
    path, model = _tiny_checkpoint(tmp_path)
    good = path.read_bytes()
    hb = C.read_header(path)["header_bytes"]
    meta = json.loads(good[24:hb])
    meta["version"] = 1
    blob = json.dumps(meta).encode()
    v1 = tmp_path / "v1.wsz"
    v1.write_bytes(struct.pack("<8sIQ", C.MAGIC, 1, len(blob)) + blob + good[hb:])
    sd1, m1 = C.read_compressed(v1)
    sd2, m2 = C.read_compressed(path)
    assert (m1["file_version"], m2["file_version"]) == (1, 2)
    assert m1["header_bytes"] == 20 + len(blob)
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    v1.write_bytes(v1.read_bytes()[:-1] + bytes([v1.read_bytes()[-1] ^ 1]))  # v1: payload CRC still checked
    assert "payload CRC-32" in _rejects_one_line(v1, v1.read_bytes())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_accelerator_path_fetches_once_and_changes_nothing(dtype, monkeypatch):
    """On an accelerator, counts and norms stay on the device and come back in one transfer
    (:func:`accounting._fetch`). Simulated on CPU by making them tensors, as on a device: every
    stat equals the CPU path's (numpy counts, float norms), and exactly one stack is fetched."""
    base = net(dtype=dtype)
    results = [_result(k, base) for k in ("dwt", "magnitude", "random")]
    want = [A.model_stats(base, r) for r in results]
    monkeypatch.setattr(A, "_zeros_later", lambda t: t.detach().numel() - torch.count_nonzero(t.detach()))
    monkeypatch.setattr(A, "_norm_later", lambda t: torch.linalg.vector_norm(t))
    calls = []
    real_fetch = A._fetch
    monkeypatch.setattr(A, "_fetch", lambda v: calls.append(sum(isinstance(x, torch.Tensor) for x in v)) or real_fetch(v))
    got = [A.model_stats(base, r) for r in results]
    assert got == want
    assert len(calls) == 3 and all(c > 0 for c in calls)  # one fetch per model, holding every count and norm
    assert all(isinstance(ls.zero_weights, int) for s in got for ls in s.layers)


def test_fetch_groups_by_dtype_and_returns_every_value_in_place():
    """``_fetch`` stacks the device values per dtype (counts, norms) and converts each stack once:
    every value comes back at its own position, equal to its own ``.item()`` (the oracle; counts as
    ints, exact up to 2**53), host values untouched, several dtypes interleaved."""
    g = torch.Generator().manual_seed(0)
    values = []
    for i in range(30):
        values += [torch.tensor(int(torch.randint(0, 2**40, (), generator=g))), torch.rand((), dtype=torch.float64, generator=g),
                   7 * i, torch.rand((), generator=g).to(torch.bfloat16), 0.5 + i, torch.tensor(2**53 - i)]  # fmt: skip
    got = A._fetch(values)
    assert len(got) == len(values)
    for v, h in zip(values, got):
        want = v.item() if isinstance(v, torch.Tensor) else v
        assert h == want and type(h) is type(want), (v, h)
    assert A._fetch([]) == [] and A._fetch([3, 1.5]) == [3, 1.5]
