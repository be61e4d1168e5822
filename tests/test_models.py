"""Models: registry, shapes, the small-input ResNet stem, checked loading, pretrained files."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

from wavesweep.models import (
    MODELS,
    RESNET18_IMAGENET_FILE,
    build_loaded,
    build_model,
    check_num_classes,
    load_pretrained_resnet18,
    load_state_checked,
    output_size,
)
from wavesweep.pruning import target_layers

#: registry entries (25M-86M parameters, seconds to build on 2 cores) run by the registry-wide
#: tests only with the slow ones; their own tests below (slow too: full-size models) cover them
HEAVY = {"resnet50", "vit_b_16"}


def _registry(heavy_mark=None):
    """MODELS.names(), the heavy entries carrying ``heavy_mark`` (e.g. pytest.mark.slow)."""
    return [pytest.param(n, marks=heavy_mark) if heavy_mark and n in HEAVY else n for n in MODELS.names()]


@pytest.mark.parametrize("name", _registry(pytest.mark.slow))
@pytest.mark.parametrize("shape", [(10, 1, 8), (7, 3, 32), (5, 3, 64)])
def test_every_model_gives_logits(name, shape):
    nc, ch, size = shape
    torch.manual_seed(0)
    if name == "vit_b_16" and size % 16:
        with pytest.raises(ValueError, match=rf"vit_b_16 needs image_size divisible by 16, got {size}"):
            build_model(name, num_classes=nc, in_channels=ch, image_size=size)
        return
    m = build_model(name, num_classes=nc, in_channels=ch, image_size=size).eval()
    with torch.no_grad():
        out = m(torch.randn(2, ch, size, size))
    assert out.shape == (2, nc) and output_size(m) == nc


def test_unknown_model_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown model 'vgg'; valid: resnet18, cnn, mlp"):
        build_model("vgg", num_classes=10)
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_model("cnn", num_classes=0)


def test_resnet18_small_stem_keeps_every_residual_conv():
    small = build_model("resnet18", num_classes=10, in_channels=1, image_size=8)
    assert isinstance(small.maxpool, nn.Identity)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.stride == (1, 1)
    assert small.conv1.in_channels == 1 and small.conv1.out_channels == 64
    ref = torchvision.models.resnet18(weights=None, num_classes=10)
    ours = {k: v.shape for k, v in small.state_dict().items() if k.startswith("layer")}
    theirs = {k: v.shape for k, v in ref.state_dict().items() if k.startswith("layer")}
    assert ours == theirs
    n_conv = sum(isinstance(m, nn.Conv2d) for m in small.modules())
    assert n_conv == sum(isinstance(m, nn.Conv2d) for m in ref.modules()) == 20
    big = build_model("resnet18", num_classes=1000, image_size=224)
    assert big.conv1.kernel_size == (7, 7) and isinstance(big.maxpool, nn.MaxPool2d)
    assert big.state_dict().keys() == torchvision.models.resnet18().state_dict().keys()


def test_load_state_checked_names_the_mismatch():
    cnn = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    mlp = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match=r"ckpt: checkpoint does not fit MLP: \d+ missing keys \(first 'net.1.weight'\)"):
        load_state_checked(mlp, cnn.state_dict(), source="ckpt")
    other = build_model("cnn", num_classes=7, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match=r"shape mismatches \(first 'fc.weight': checkpoint \(7, 128\), model \(10, 128\)\)"):
        load_state_checked(cnn, other.state_dict(), source="ckpt")
    twin = build_model("cnn", num_classes=10, in_channels=1, image_size=8)
    load_state_checked(twin, cnn.state_dict(), source="ckpt")
    assert all(torch.equal(a, b) for a, b in zip(twin.state_dict().values(), cnn.state_dict().values()))


def test_build_loaded_keeps_the_mismatch_message():
    cnn = build_model("cnn", num_classes=7, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match=r"ckpt: checkpoint does not fit SmallCNN: 2 shape mismatches \(first 'fc.weight'"):
        build_loaded("cnn", cnn.state_dict(), source="ckpt", num_classes=10, in_channels=1, image_size=8)
    with pytest.raises(ValueError, match=r"ckpt: checkpoint does not fit MLP: \d+ missing keys"):
        build_loaded("mlp", cnn.state_dict(), source="ckpt", num_classes=10, in_channels=1, image_size=8)


def test_check_num_classes():
    m = build_model("mlp", num_classes=10, in_channels=1, image_size=8)
    check_num_classes(m, 10, dataset="digits")
    with pytest.raises(ValueError, match=r"dataset 'imagenet' has 1000 classes but the model outputs 10 logits"):
        check_num_classes(m, 1000, dataset="imagenet")


@pytest.fixture(scope="module")
def random_resnet18_file(tmp_path_factory):
    """Random-initialised ImageNet-shaped ResNet-18 weights in a local file (no download)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / RESNET18_IMAGENET_FILE
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path


@pytest.mark.slow  # an ImageNet-shaped ResNet-18, loaded three times
def test_pretrained_resnet18_from_file_and_from_hub_cache(random_resnet18_file, tmp_path, monkeypatch):
    m = load_pretrained_resnet18(random_resnet18_file)
    assert not m.training and output_size(m) == 1000
    ref = torch.load(random_resnet18_file, weights_only=True)
    assert torch.equal(m.state_dict()["fc.weight"], ref["fc.weight"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=rf"never downloads.*Put {RESNET18_IMAGENET_FILE}.*hub/checkpoints") as err:
        load_pretrained_resnet18()
    from wavesweep import cli  # the way to give the file is an option `wavesweep trial` has

    options = {o for a in cli.build_parser().commands["trial"]._actions for o in a.option_strings}
    named = re.findall(r"--[a-z][a-z-]*", str(err.value))
    assert named and set(named) <= options, (named, str(err.value))
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_IMAGENET_FILE).symlink_to(random_resnet18_file)
    assert torch.equal(load_pretrained_resnet18().state_dict()["fc.weight"], ref["fc.weight"])


@pytest.mark.slow  # builds the ImageNet-shaped ResNet-18 to compare with
def test_pretrained_resnet18_rejects_other_architecture(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(build_model("resnet18", num_classes=10, in_channels=1, image_size=8).state_dict(), path)
    with pytest.raises(ValueError, match=r"small.pth: checkpoint does not fit ResNet: .*shape mismatches \(first 'conv1.weight'"):
        load_pretrained_resnet18(path)
    with pytest.raises(FileNotFoundError, match="not found at"):
        load_pretrained_resnet18(tmp_path / "absent.pth")


@pytest.mark.slow  # a full-size model (25M parameters), built twice
def test_resnet50_small_stem_keeps_every_bottleneck_conv():
    small = build_model("resnet50", num_classes=10, in_channels=1, image_size=28)
    assert isinstance(small.maxpool, nn.Identity)
    assert small.conv1.kernel_size == (3, 3) and small.conv1.in_channels == 1
    with torch.device("meta"):
        ref = torchvision.models.resnet50(weights=None, num_classes=10)
    ours = {k: v.shape for k, v in small.state_dict().items() if k.startswith("layer")}
    assert ours == {k: v.shape for k, v in ref.state_dict().items() if k.startswith("layer")}
    assert len(target_layers(small)) == sum(isinstance(m, nn.Conv2d) for m in ref.modules()) == 53
    big = build_model("resnet50", num_classes=10, in_channels=1, image_size=64)
    assert big.conv1.kernel_size == (7, 7) and big.conv1.in_channels == 1
    with torch.no_grad():
        assert small.eval()(torch.randn(1, 1, 28, 28)).shape == (1, 10)


@pytest.mark.slow  # a full-size model (86M parameters)
def test_vit_b_16_shapes_channels_and_linear_targets():
    """ViT-B/16 is pruned in its Linear layers: 2 MLP + 1 attention output projection per
    block (12 blocks) + the head; its only conv is the patch embedding."""
    with pytest.raises(ValueError, match=r"vit_b_16 needs image_size divisible by 16, got 28"):
        build_model("vit_b_16", num_classes=10, in_channels=1, image_size=28)
    torch.manual_seed(0)
    vit = build_model("vit_b_16", num_classes=7, in_channels=1, image_size=32).eval()
    assert vit.conv_proj.in_channels == 1 and vit.conv_proj.kernel_size == (16, 16)
    assert vit.encoder.pos_embedding.shape == (1, (32 // 16) ** 2 + 1, 768)  # 4 patches + class token
    with torch.device("meta"):
        ref = torchvision.models.vit_b_16(weights=None, num_classes=7, image_size=32)
    assert vit.state_dict().keys() == ref.state_dict().keys()
    linears = target_layers(vit, "linear")
    assert len(linears) == 12 * 3 + 1 and linears[-1][0] == "heads.head"
    assert [n for n, _ in target_layers(vit, "conv")] == ["conv_proj"]
    assert len(target_layers(vit, ("conv", "linear"))) == 38
    with torch.no_grad():
        assert vit(torch.randn(2, 1, 32, 32)).shape == (2, 7)


def test_adopted_state_equals_a_plain_load_without_random_init(monkeypatch):
    """build_loaded(adopt=True) builds on the meta device and takes the state dict's tensors: the
    same model as the plain copy into a randomly initialised one (every tensor, the outputs),
    with trainable Parameters; a state dict of other dtypes, or a model with state outside its
    state dict, takes the plain path."""
    import wavesweep.models as M

    kw = dict(num_classes=10, in_channels=1, image_size=8)
    torch.manual_seed(3)
    state = {k: v.clone() for k, v in M.build_model("resnet18", **kw).state_dict().items()}
    plain = M.build_loaded("resnet18", {k: v.clone() for k, v in state.items()}, source="x", **kw).eval()
    adopted = M.build_loaded("resnet18", state, source="x", adopt=True, **kw).eval()
    for (k, a), (_, b) in zip(plain.state_dict().items(), adopted.state_dict().items()):
        assert torch.equal(a, b) and a.dtype == b.dtype, k
    assert adopted.conv1.weight.data_ptr() == state["conv1.weight"].data_ptr()  # adopted, not copied
    assert all(isinstance(p, nn.Parameter) and p.requires_grad and not p.is_meta for p in adopted.parameters())
    x = torch.randn(4, 1, 8, 8)
    with torch.inference_mode():
        assert torch.equal(adopted(x), plain(x))

    half = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    model = M.build_loaded("resnet18", half, source="x", adopt=True, **kw)
    assert model.conv1.weight.dtype == torch.float32  # copied (and cast) into a float32 model

    class WithScratch(nn.Module):  # state outside the state dict: a non-persistent buffer
        def __init__(self, **_):
            super().__init__()
            self.lin = nn.Linear(3, 2)
            self.register_buffer("scratch", torch.ones(2), persistent=False)

    monkeypatch.setattr(M, "build_model", lambda name, **k: WithScratch())
    lin = {k: v.clone() for k, v in WithScratch().state_dict().items()}
    model = M.build_loaded("x", lin, source="x", adopt=True)
    assert not model.scratch.is_meta and torch.equal(model.scratch, torch.ones(2))
    assert model.lin.weight.data_ptr() != lin["lin.weight"].data_ptr()  # the plain path: copied


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.complex64])
def test_check_finite_equals_isfinite_per_tensor(dtype):
    """``check_finite`` first sums |x| per tensor in one ``_foreach_norm``; it must say what
    ``torch.isfinite(t).all()`` per tensor says (the oracle): all finite; one NaN; one +inf; +inf
    and -inf in one tensor; finite values whose sum of |x| overflows (float16 past 65,504, float32
    past its range), which must pass; several dtypes in one state dict; integer buffers ignored;
    and the error names the first bad tensor with its count, as the tensor-by-tensor check did."""
    from wavesweep.models import check_finite

    big = {torch.float16: 60000.0, torch.bfloat16: 3e38, torch.float32: 3e38, torch.float64: 1e308, torch.complex64: 3e38}[dtype]

    def state(*edits):
        torch.manual_seed(0)
        sd = {"a.weight": torch.randn(4, 3, 3, 3).to(dtype), "a.n": torch.tensor(7), "b.weight": torch.randn(10).to(dtype),
              "c.bias": torch.randn(()).to(dtype), "d.empty": torch.empty(0, dtype=dtype)}
        for key, index, value in edits:
            sd[key].view(-1)[index] = value
        return sd

    nan, inf = float("nan"), float("inf")
    cases = {
        "finite": state(),
        "nan": state(("b.weight", 5, nan)),
        "inf": state(("c.bias", 0, inf)),
        "inf-inf": state(("a.weight", 0, inf), ("a.weight", 1, -inf)),
        "overflowing sum": state(("a.weight", 0, big), ("a.weight", 1, -big), ("a.weight", 2, big)),
        "two bad": state(("b.weight", 1, nan), ("a.weight", 3, -inf)),
        "two dtypes": {**state(("b.weight", 2, nan)), "e": torch.ones(3, dtype=torch.float64)},
        "two dtypes, finite": {**state(), "e": torch.ones(3, dtype=torch.float64)},
    }
    for case, sd in cases.items():
        bad = [(k, int((~torch.isfinite(t)).sum())) for k, t in sd.items() if t.is_floating_point() or t.is_complex()]
        bad = [(k, n) for k, n in bad if n]
        if not bad:
            check_finite(sd, source="f")  # no error
            continue
        k, n = bad[0]
        with pytest.raises(ValueError, match=rf"^f: tensor '{k}' has {n} NaN or infinite value\(s\) of {sd[k].numel()}; "):
            check_finite(sd, source="f")
    if dtype in (torch.float16, torch.float32):  # the exact fallback ran there: the sum of |x| is not finite
        assert not bool(torch.isfinite(torch._foreach_norm([cases["overflowing sum"]["a.weight"]], 1)[0]))


def test_a_state_dict_without_num_batches_tracked_loads_as_pytorch_loads_it(tmp_path):
    """State dicts saved before PyTorch 0.4.1 (torchvision's first ImageNet ResNet files) have no
    BatchNorm ``num_batches_tracked``; BatchNorm fills it in, so torch's strict load takes them,
    and wavesweep refused them as "another architecture". Oracle: torch's own strict load, which
    refuses the same keys missing from a state dict that carries version-2 BatchNorm metadata."""
    from wavesweep.models import build_model, load_pretrained_resnet18, load_state_checked

    src = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    for m in src.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.num_batches_tracked.fill_(7)
    full = src.state_dict()
    old = {k: v for k, v in full.items() if not k.endswith("num_batches_tracked")}  # no metadata: as saved before 0.4.1
    assert len(old) == len(full) - 20
    ours, theirs = (build_model("resnet18", num_classes=10, in_channels=1, image_size=28) for _ in range(2))
    theirs.load_state_dict(old, strict=True)
    load_state_checked(ours, old, source="old.pt")
    for (k, a), (k2, b) in zip(ours.state_dict().items(), theirs.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert int(ours.bn1.num_batches_tracked) == 0 and torch.equal(ours.bn1.running_mean, src.bn1.running_mean)

    versioned = type(full)((k, v) for k, v in full.items() if not k.endswith("num_batches_tracked"))
    versioned._metadata = full._metadata  # BatchNorm version 2: the buffer was saved, so it is missing
    with pytest.raises(RuntimeError, match="num_batches_tracked"):
        theirs.load_state_dict(versioned, strict=True)
    with pytest.raises(ValueError, match=r"20 missing keys \(first 'bn1.num_batches_tracked'\)"):
        load_state_checked(ours, versioned, source="new.pt")

    # the ImageNet loader reads such a file (the IMAGENET1K_V1 layout: 3 channels, 1000 classes, 224 px)
    net = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-old.pth"
    torch.save({k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}, path)
    loaded = load_pretrained_resnet18(path)
    assert all(torch.equal(a, b) for (k, a), b in zip(loaded.state_dict().items(), net.state_dict().values())
               if not k.endswith("num_batches_tracked"))  # fmt: skip


@pytest.mark.parametrize("bad", [True, False, 10.0, "10", 0, -3, None])
def test_build_model_refuses_what_is_no_positive_int_and_takes_numpy_ints(bad):
    import numpy as np

    from wavesweep.models import build_model

    with pytest.raises(ValueError, match=re.escape(f"num_classes must be a positive int, got {bad!r}")):
        build_model("cnn", num_classes=bad, in_channels=1, image_size=8)
    net = build_model("cnn", num_classes=np.int64(7), in_channels=np.int32(1), image_size=np.int64(8))
    assert net(torch.zeros(2, 1, 8, 8)).shape == (2, 7)
