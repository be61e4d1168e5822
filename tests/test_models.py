"""Models: registry, shapes, the small-input ResNet stem, checked loading, pretrained files."""

from __future__ import annotations

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


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("shape", [(10, 1, 8), (7, 3, 32), (5, 3, 64)])
def test_every_model_gives_logits(name, shape):
    nc, ch, size = shape
    torch.manual_seed(0)
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


def test_pretrained_resnet18_from_file_and_from_hub_cache(random_resnet18_file, tmp_path, monkeypatch):
    m = load_pretrained_resnet18(random_resnet18_file)
    assert not m.training and output_size(m) == 1000
    ref = torch.load(random_resnet18_file, weights_only=True)
    assert torch.equal(m.state_dict()["fc.weight"], ref["fc.weight"])
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=rf"never downloads.*Put {RESNET18_IMAGENET_FILE}.*hub/checkpoints"):
        load_pretrained_resnet18()
    (tmp_path / "torch" / "hub" / "checkpoints").mkdir(parents=True)
    (tmp_path / "torch" / "hub" / "checkpoints" / RESNET18_IMAGENET_FILE).symlink_to(random_resnet18_file)
    assert torch.equal(load_pretrained_resnet18().state_dict()["fc.weight"], ref["fc.weight"])


def test_pretrained_resnet18_rejects_other_architecture(tmp_path):
    path = tmp_path / "small.pth"
    torch.save(build_model("resnet18", num_classes=10, in_channels=1, image_size=8).state_dict(), path)
    with pytest.raises(ValueError, match=r"small.pth: checkpoint does not fit ResNet: .*shape mismatches \(first 'conv1.weight'"):
        load_pretrained_resnet18(path)
    with pytest.raises(FileNotFoundError, match="not found at"):
        load_pretrained_resnet18(tmp_path / "absent.pth")
