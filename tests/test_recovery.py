"""Recovery: BatchNorm re-estimation against an independent hook computation, fine-tuning
that keeps every pruning exact, and the checkpoint of a fine-tuned dwt model."""

from __future__ import annotations

import copy
import types
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from wavesweep import accounting, checkpoint, data, pruning, recovery
from wavesweep import wavelets as wv


def bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Dropout(0.5),  # must stay off during re-estimation
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 4),
        nn.BatchNorm1d(4),
    ).eval()


def twin_net(seed: int = 0) -> nn.Module:
    """Two convs of one shape (stacked by the torch backend on an accelerator), BatchNorm after each."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4),
    ).eval()  # fmt: skip


def plain_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()


@pytest.fixture(scope="module")
def train_set() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 1, 8, 8, generator=g) * 2 + 0.5
    y = torch.randint(0, 4, (300,), generator=g)
    return TensorDataset(x, y)


def test_training_batches_are_a_pure_function_of_their_arguments(train_set):
    a = list(recovery.training_batches(train_set, batch_size=64, n=12, seed=3))
    b = list(recovery.training_batches(train_set, batch_size=64, n=12, seed=3))
    c = list(recovery.training_batches(train_set, batch_size=64, n=12, seed=4))
    assert len(a) == 12
    assert all(x.shape == (64, 1, 8, 8) for x, _ in a)  # only full batches (300 = 4 * 64 + 44)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    # an epoch is a permutation: the first 4 batches hold 256 distinct examples
    seen = torch.cat([x.reshape(64, -1) for x, _ in a[:4]])
    assert torch.unique(seen, dim=0).shape[0] == 256


def test_training_batches_generic_dataset_matches_tensor_path(train_set):
    class Plain(torch.utils.data.Dataset):
        def __len__(self):
            return len(train_set)

        def __getitem__(self, i):
            return train_set[i]

    a = list(recovery.training_batches(train_set, batch_size=50, n=7, seed=1))
    b = list(recovery.training_batches(Plain(), batch_size=50, n=7, seed=1))
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


@pytest.mark.parametrize("chunk_batches", [None, 1, 2.5, 4])
def test_training_batches_in_memory_images_match_item_by_item(chunk_batches, monkeypatch):
    """Whether the batches are prepared one at a time or several at once (chunks of 1, 2, 4 or
    all 9 here), each is the same examples, normalised the same, bit for bit."""
    from wavesweep.data import TensorImages

    if chunk_batches is not None:
        monkeypatch.setattr(recovery, "TRAIN_CHUNK_BYTES", int(chunk_batches * 32 * 36 * 4))

    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (200, 1, 6, 6), generator=g, dtype=torch.uint8)
    ds = TensorImages(images, torch.randint(0, 3, (200,), generator=g), divisor=255.0, mean=(0.3,), std=(0.2,))
    got = list(recovery.training_batches(ds, batch_size=32, n=9, seed=5))
    idx = [b for b in _index_stream(200, 32, 5, 9)]
    assert len(got) == 9
    for (x, y), i in zip(got, idx):
        items = [ds[int(k)] for k in i]
        assert torch.equal(x, torch.stack([a for a, _ in items])) and y.tolist() == [b for _, b in items]


def _index_stream(size, bs, seed, n):
    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < n:
        perm = torch.randperm(size, generator=gen)
        out += [perm[i : i + bs] for i in range(0, size - bs + 1, bs)]
    return out[:n]


@pytest.mark.parametrize("group", [None, 2, 4, 9])
def test_reestimate_bn_equals_hook_computation(train_set, group):
    """One forward pass per batch (None: CPU's default) and grouped (several batches per forward
    pass, each BatchNorm normalising every batch by its own statistics) against the oracle."""
    model = bn_net()
    batches = list(recovery.training_batches(train_set, batch_size=32, n=9, seed=0))
    oracle = _bn_oracle(bn_net(), batches)  # forward pre-hooks, BatchNorm layers in train mode

    layers, used = recovery.reestimate_bn(model, iter(batches), group=group)
    assert (layers, used) == (3, 9)
    assert all("forward" not in bn.__dict__ for bn in recovery.batchnorm_layers(model))  # the class's forward again
    assert not model.training and all(not m.training for m in model.modules())
    for bn, (mean, var) in zip(recovery.batchnorm_layers(model), oracle, strict=True):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
        assert bn.momentum == 0.1  # restored
        assert int(bn.num_batches_tracked) == 9
    # weights untouched
    ref = bn_net()
    for (k, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
        assert torch.equal(a, b), k


def test_reestimate_bn_is_pytorchs_cumulative_average_bit_for_bit(train_set):
    """The per-batch Python-float factor (no host sync) gives exactly what momentum=None gives."""
    batches = list(recovery.training_batches(train_set, batch_size=32, n=7, seed=2))
    model = bn_net()
    recovery.reestimate_bn(model, iter(batches))
    ref = bn_net()
    ref.eval()
    for bn in recovery.batchnorm_layers(ref):
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    with torch.no_grad():
        for x, _ in batches:
            ref(x)
    for a, b in zip(recovery.batchnorm_layers(model), recovery.batchnorm_layers(ref)):
        assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
        assert torch.equal(a.num_batches_tracked, b.num_batches_tracked)


def _odd_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6, affine=False), nn.ReLU(),
        nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6, eps=1e-3), nn.ReLU(),
        nn.Flatten(2), nn.BatchNorm1d(6), nn.Flatten(), nn.Linear(6 * 64, 3),
    )  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    for bn in recovery.batchnorm_layers(net):  # running statistics that are not the reset ones
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(7.0)
        if bn.affine:  # and affine parameters that are not the default 1 and 0, each channel its own
            bn.weight.data = torch.rand(bn.num_features, generator=g) + 0.5
            bn.bias.data = torch.randn(bn.num_features, generator=g)
    return net.eval()


@pytest.mark.parametrize("channels_last", [False, True])
def test_grouped_reestimation_equals_one_pass_per_batch(train_set, channels_last):
    """Batches of two sizes (a group never mixes them), a group cut short by the size change,
    BatchNorm without affine parameters, with another eps, on (N, C, L) inputs, and a model in
    channels-last: the statistics of the grouped passes equal PyTorch's own one pass per batch to
    float tolerance, and the output is the same tensor in the same memory format."""
    big = list(recovery.training_batches(train_set, batch_size=32, n=5, seed=4))
    small = list(recovery.training_batches(train_set, batch_size=20, n=4, seed=5))
    batches = big[:3] + small + big[3:]  # groups of 3 at group=3: [32 x3] [20 x3] [20] [32 x2]
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        batches = [(x.contiguous(memory_format=fmt), y) for x, y in batches]
    ref, got = _odd_bn_net().to(memory_format=fmt), _odd_bn_net().to(memory_format=fmt)
    assert recovery.reestimate_bn(ref, iter(batches), group=1) == (3, 9)
    assert recovery.reestimate_bn(got, iter(batches), group=3) == (3, 9)
    for a, b in zip(recovery.batchnorm_layers(got), recovery.batchnorm_layers(ref)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 9
        assert a.running_var.abs().sub(7.0).abs().min() > 1e-3  # re-estimated, not the old statistics
    x = batches[0][0]
    with torch.no_grad():
        torch.testing.assert_close(got(x), ref(x), rtol=1e-4, atol=1e-5)
    # inside the grouped pass a BatchNorm layer gives what PyTorch's layer gives a batch alone
    seen = []
    recovery.reestimate_bn(_odd_bn_net().to(memory_format=fmt), iter(batches[:3]), group=3)
    probe = _odd_bn_net().to(memory_format=fmt)
    bn = recovery.batchnorm_layers(probe)[1]
    hook = bn.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].clone(), out.clone())))
    recovery.reestimate_bn(probe, iter(batches[:3]), group=3)
    hook.remove()
    (inp, out), = seen
    assert inp.shape[0] == 96 and out.is_contiguous(memory_format=fmt)
    alone = nn.BatchNorm2d(6, eps=1e-3).train()
    alone.load_state_dict(bn.state_dict())
    with torch.no_grad():
        for i in range(3):
            torch.testing.assert_close(out[32 * i : 32 * (i + 1)], alone(inp[32 * i : 32 * (i + 1)]), rtol=1e-5, atol=1e-5)


def test_grouped_reestimation_of_a_float16_model_sums_in_float32():
    """A float16 layer whose input has variance about 1,900 (any above 65,504 / 50 = 1,311 did):
    its 50 per-batch variances were summed in float16, past its largest value, and the running
    variance of a grouped re-estimation became inf where one pass per batch gives about 1,900.
    Both are now the float64 average of the per-batch statistics to float16 tolerance."""
    dtype = torch.float16
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    with torch.no_grad():
        net[0].weight.mul_(60.0)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(16, 3, 8, 8, generator=g) + 0.3, None) for _ in range(50)]
    with torch.no_grad():  # the oracle: float64 per-batch mean and unbiased variance, averaged
        ins = [copy.deepcopy(net[0]).double()(x.double()) for x, _ in batches]
    mean = torch.stack([i.mean((0, 2, 3)) for i in ins]).mean(0)
    var = torch.stack([i.var((0, 2, 3), unbiased=True) for i in ins]).mean(0)
    assert var.max() > 65504 / 50
    tol = 4e-3  # measured: at most 1.5e-3 (one pass per batch), 7e-4 (grouped)
    for group in (1, 2, 50):
        m = copy.deepcopy(net).to(dtype)
        assert recovery.reestimate_bn(m, iter([(x.to(dtype), y) for x, y in batches]), group=group) == (1, 50)
        bn = m[1]
        assert bn.running_var.dtype == dtype and bool(torch.isfinite(bn.running_var).all()), group
        torch.testing.assert_close(bn.running_var.double(), var, rtol=tol, atol=0, msg=f"group {group}")
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=tol, atol=tol * float(mean.abs().max()),
                                   msg=f"group {group}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group", [None, 1, 10])
def test_a_half_precision_models_statistics_are_averaged_in_float32(dtype, group):
    """50 batches through a bfloat16/float16 model, one pass per batch (the CPU's default): PyTorch's
    own update rounds the running average to the layer's dtype after every batch, and a bfloat16
    running variance ended 3.5 % from the average of the batches' variances, 11x the 0.31 % of
    that average rounded to bfloat16 (float16: 0.096 % against 0.045 %). The oracle: the float64
    average of each batch's mean and unbiased variance (forward hooks), which every group size now
    gives to within twice the rounding of the oracle itself."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)).eval()
    g = torch.Generator().manual_seed(0)
    batches = [((torch.randn(64, 1, 8, 8, generator=g) * 2 + 0.5).to(dtype), None) for _ in range(50)]
    model = copy.deepcopy(net).to(dtype)
    want = _bn_oracle(model, batches)
    best = max(float(((v.to(dtype).double() - v).abs() / v).max()) for _, v in want)  # the oracle in the layer's dtype
    assert recovery.reestimate_bn(model, iter(batches), group=group) == (2, 50)
    for bn, (mean, var) in zip((model[1], model[4]), want):
        assert bn.running_var.dtype == dtype and int(bn.num_batches_tracked) == 50
        err_var = float(((bn.running_var.double() - var).abs() / var).max())
        err_mean = float(((bn.running_mean.double() - mean).abs() / var.sqrt()).max())
        assert err_var <= 2 * best and err_mean <= 2 * best, (group, err_var, err_mean, best)


def test_bn_group_default_and_bad_group(train_set):
    assert not recovery.groups_by_default("cpu") and recovery.groups_by_default(torch.device("cuda"))
    mib = 1 << 20
    assert recovery.bn_group(64 * 64 * 8 * 8 * 4) == 256  # ResNet-18's stem on a digits batch: 1 MiB
    assert recovery.bn_group(64 * 64 * 28 * 28 * 4) == 20
    assert recovery.bn_group(64 * 64 * 112 * 112 * 4) == 1  # a 224 px batch is work enough alone
    assert recovery.bn_group(0) == recovery.BN_GROUP_BYTES and recovery.bn_group(recovery.BN_GROUP_BYTES + mib) == 1
    batches = list(recovery.training_batches(train_set, batch_size=32, n=2, seed=0))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=f"group must be an integer >= 1.*got {bad!r}"):
            recovery.reestimate_bn(bn_net(), iter(batches), group=bad)
    with pytest.raises(ValueError, match="got no batches"):
        recovery.reestimate_bn(bn_net(), iter([]), group=4)


def test_default_grouping_measures_the_first_batch_then_groups_the_rest(train_set, monkeypatch):
    """Where the default groups (an accelerator; forced here on CPU), the first batch goes through
    alone and the bytes of its largest BatchNorm input (16 channels x 8 x 8 float32 per example in
    bn_net) set how many of the others share a pass; the statistics equal one pass per batch."""
    monkeypatch.setattr(recovery, "groups_by_default", lambda device: True)
    per_example = 16 * 8 * 8 * 4
    monkeypatch.setattr(recovery, "BN_GROUP_BYTES", 3 * 32 * per_example)  # three 32-batches a pass
    batches = list(recovery.training_batches(train_set, batch_size=32, n=8, seed=7))
    model, ref = bn_net(), bn_net()
    passes = []
    model.register_forward_pre_hook(lambda mod, args: passes.append(args[0].shape[0]))
    assert recovery.reestimate_bn(model, iter(batches)) == (3, 8)
    assert passes == [32, 96, 96, 32]  # alone, then groups of bn_group(32 * per_example) = 3
    recovery.reestimate_bn(ref, iter(batches), group=1)
    for a, b in zip(recovery.batchnorm_layers(model), recovery.batchnorm_layers(ref)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-5, atol=1e-6)
        assert int(a.num_batches_tracked) == 8


def test_a_model_with_an_untracked_batchnorm_is_never_grouped(train_set, monkeypatch):
    """A BatchNorm layer without running statistics normalises by whatever batch it gets, even in
    eval mode: grouped, by all the batches together. Such a model is re-estimated one pass per
    batch by default, and an explicit group is a one-line error naming the layer."""
    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                             nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()  # fmt: skip

    batches = list(recovery.training_batches(train_set, batch_size=32, n=6, seed=8))
    with pytest.raises(ValueError, match=r"cannot group batches \(group=3\).*'1'.*track_running_stats=False") as err:
        recovery.reestimate_bn(net(), iter(batches), group=3)
    assert "\n" not in str(err.value)
    monkeypatch.setattr(recovery, "groups_by_default", lambda device: True)
    model, ref = net(), net()
    passes = []
    model.register_forward_pre_hook(lambda mod, args: passes.append(args[0].shape[0]))
    recovery.reestimate_bn(model, iter(batches))
    assert passes == [32] * 6
    recovery.reestimate_bn(ref, iter(batches), group=1)
    assert torch.equal(model[4].running_var, ref[4].running_var)


class _EvalOnlyBN(nn.BatchNorm2d):
    """A BatchNorm layer whose train() keeps it in eval mode."""

    def train(self, mode=True):
        return super().train(False)


class _FrozenBN(nn.BatchNorm2d):
    """A BatchNorm layer that normalises by its stored statistics in any mode."""

    def forward(self, x):
        return nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _net_with(bn_class) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), bn_class(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).eval()
    with torch.no_grad():  # the base model's statistics
        net[1].running_mean.copy_(torch.tensor([0.5, -0.3, 0.2, 0.1]))
        net[1].running_var.copy_(torch.tensor([2.0, 3.0, 0.5, 1.5]))
    return net


@pytest.mark.parametrize("group", [None, 1, 3])
def test_a_batchnorm_whose_train_keeps_it_in_eval_mode_is_re_estimated(train_set, monkeypatch, group):
    """One pass per batch put each layer in train mode with its train(): a layer that stays in eval
    mode normalised by its reset statistics and kept them (mean 0, variance 1, the base model's lost),
    while the grouped passes re-estimated it. Now both give the hook computation's cumulative average."""
    monkeypatch.setattr(recovery, "groups_by_default", lambda device: True)  # group None: as on an accelerator
    batches = list(recovery.training_batches(train_set, batch_size=32, n=6, seed=8))
    model = _net_with(_EvalOnlyBN)
    probe = copy.deepcopy(model)
    probe[1].training = True
    seen = []
    probe[1].register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().double()))
    with torch.no_grad():
        for x, _ in batches:
            probe(x)
    assert recovery.reestimate_bn(model, iter(batches), group=group) == (2, 6)
    bn = model[1]
    assert int(bn.num_batches_tracked) == 6 and not bn.training
    mean = torch.stack([x.mean((0, 2, 3)) for x in seen]).mean(0)
    var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in seen]).mean(0)
    torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


def test_a_batchnorm_that_normalises_by_its_stored_statistics_in_any_mode_is_an_error(train_set, monkeypatch):
    """A frozen BatchNorm class (its forward uses the stored statistics in any mode) kept the reset
    statistics (mean 0, variance 1) one pass per batch, silently, where the grouped passes (which
    replace its forward) re-estimated it. Now one pass per batch stops with one line naming the layer,
    and such a model is never grouped (an explicit group is a one-line error, as for an untracked layer)."""
    batches = list(recovery.training_batches(train_set, batch_size=32, n=4, seed=8))
    monkeypatch.setattr(recovery, "groups_by_default", lambda device: True)
    for group in (None, 1):
        with pytest.raises(ValueError, match=r"layer '1' \(_FrozenBN\) kept no statistics in train mode.*recovery=none") as err:
            recovery.reestimate_bn(_net_with(_FrozenBN), iter(batches), group=group)
        assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"cannot group batches \(group=2\).*'1' has its own forward \(_FrozenBN\)"):
        recovery.reestimate_bn(_net_with(_FrozenBN), iter(batches), group=2)


def test_a_batchnorm_called_twice_per_pass_averages_every_call(train_set):
    """PyTorch's momentum=None averages over calls, not forward passes: a layer used twice in a
    forward pass gets the mean over both calls of every batch, one pass per batch or grouped."""
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(self.bn(x.expand(-1, 4, -1, -1))[:, :1]))

    batches = list(recovery.training_batches(train_set, batch_size=32, n=5, seed=9))
    ref = Twice().eval()
    ref.bn.reset_running_stats()
    ref.bn.momentum = None
    ref.bn.train()
    with torch.no_grad():
        for x, _ in batches:
            ref(x)
    for group in (1, 2):
        model = Twice().eval()
        recovery.reestimate_bn(model, iter(batches), group=group)
        torch.testing.assert_close(model.bn.running_mean, ref.bn.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.bn.running_var, ref.bn.running_var, rtol=1e-5, atol=1e-6)
        assert int(model.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked) == 10


@pytest.mark.parametrize("group", [1, 3])
def test_everything_is_put_back_when_a_batch_fails(train_set, group):
    """A batch the model cannot take (the wrong channel count) mid-way: the error reaches the
    caller and every module's mode, each BatchNorm's momentum and forward, and the hooks are as
    before."""
    model = bn_net()
    model.train()
    model[6].eval()  # a mix of modes
    bns = recovery.batchnorm_layers(model)
    bns[0].momentum = None
    own = bns[1].forward  # an instance-level forward (e.g. another tool's patch)
    bns[1].forward = own
    modes = [m.training for m in model.modules()]
    good = list(recovery.training_batches(train_set, batch_size=32, n=4, seed=0))
    bad = [(torch.zeros(32, 3, 8, 8), torch.zeros(32, dtype=torch.long))]
    with pytest.raises(RuntimeError):
        recovery.reestimate_bn(model, iter(good + bad + good), group=group)
    assert [m.training for m in model.modules()] == modes
    assert bns[0].momentum is None and all(m.momentum == 0.1 for m in bns[1:])
    assert bns[1].__dict__["forward"] is own and all("forward" not in m.__dict__ for m in (bns[0], bns[2]))
    assert all(not m._forward_pre_hooks for m in bns)


def test_recover_bn_leaves_pruning_and_weights_alone(train_set):
    res = pruning.prune_magnitude(bn_net(), 0.6)
    before = {k: v.clone() for k, v in res.model.named_parameters()}
    rep = recovery.recover(res, train_set, recovery.RecoverySettings("bn", batches=5, batch_size=32))
    assert rep.bn_layers == 3 and rep.bn_batches == 5 and rep.finetune_steps == 0
    for k, v in res.model.named_parameters():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("asked", [4, 50])
def test_bn_recovery_takes_at_most_one_pass_over_the_training_split(train_set, asked):
    """300 examples make 4 full batches of 64: asking 50 re-estimates on those 4 (each example once,
    the 44 left over by the full batches aside), asking 4 on the same 4. Oracle: PyTorch's
    ``torch.optim.swa_utils.update_bn`` (one pass over its loader, a cumulative average) on a
    copy of the pruned model, fed the first pass of the re-estimation stream."""
    res = pruning.prune_magnitude(bn_net(), 0.6)
    oracle = copy.deepcopy(res.model)
    for name, m in list(oracle.named_children()):
        if isinstance(m, nn.Dropout):  # update_bn runs the whole model in train mode; re-estimation keeps dropout off
            setattr(oracle, name, nn.Identity())
    rep = recovery.recover(res, train_set, recovery.RecoverySettings("bn", batches=asked, batch_size=64))
    assert recovery.epoch_batches(len(train_set), 64) == 4 and rep.bn_batches == 4
    one_pass = list(recovery.training_batches(train_set, batch_size=64, n=4, seed=0))
    assert len(torch.cat([y for _, y in one_pass])) == 256
    torch.optim.swa_utils.update_bn(one_pass, oracle)
    for ours, theirs in zip(recovery.batchnorm_layers(res.model), recovery.batchnorm_layers(oracle), strict=True):
        assert int(ours.num_batches_tracked) == 4
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-5, atol=1e-6)


def test_epoch_batches_counts_the_full_batches_of_one_pass():
    assert [recovery.epoch_batches(n, 64) for n in (0, 1, 63, 64, 127, 128, 1437)] == [0, 1, 1, 1, 1, 2, 22]


def test_model_without_batchnorm_skips_and_says_so(train_set):
    res = pruning.prune_magnitude(plain_net(), 0.5)
    rep = recovery.recover(res, train_set, recovery.RecoverySettings("bn", batches=3))
    assert rep.bn_layers == 0 and rep.bn_batches == 0
    assert "no BatchNorm" in rep.note


def test_model_whose_batchnorm_keeps_no_running_statistics_says_so(train_set):
    """BatchNorm layers with track_running_stats=False have nothing to re-estimate; the note said the
    model had no BatchNorm layers at all."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU(), nn.Flatten(),
                        nn.Linear(8 * 6 * 6, 4)).eval()  # fmt: skip
    res = pruning.prune_magnitude(net, 0.5)
    rep = recovery.recover(res, train_set, recovery.RecoverySettings("bn", batches=3))
    assert rep.bn_layers == 0 and rep.bn_batches == 0
    assert rep.note == "Sequential has no BatchNorm layers that keep running statistics: BatchNorm re-estimation skipped"


@pytest.mark.parametrize("rec", ["bn", "finetune"])
def test_a_batch_of_one_where_batchnorm_needs_two_names_the_setting(train_set, rec):
    """bn_net's last BatchNorm follows a Linear: one value per channel in a batch of one. torch's
    message did not say which setting to change; a batch of two works."""
    res = pruning.prune_magnitude(bn_net(), 0.5)
    with pytest.raises(ValueError, match=r"^recovery_batch_size=1: a BatchNorm layer of Sequential sees one value per channel") as err:
        recovery.recover(res, train_set, recovery.RecoverySettings(rec, batches=2, steps=2, batch_size=1))
    assert "\n" not in str(err.value) and "use recovery_batch_size >= 2" in str(err.value)
    assert recovery.recover(res, train_set, recovery.RecoverySettings(rec, batches=2, steps=2, batch_size=2)).bn_layers == 3


@pytest.mark.parametrize("rec", ["bn", "finetune"])
def test_a_training_split_of_one_example_is_named_not_the_batch_size(train_set, rec):
    """A training split of one example makes every batch one example, whatever
    recovery_batch_size is: the line said "recovery_batch_size=8 ... use recovery_batch_size >= 2"."""
    res = pruning.prune_magnitude(bn_net(), 0.5)
    one = data.take(train_set, np.array([0]))
    with pytest.raises(ValueError, match=r"^the training split holds 1 example: a BatchNorm layer of Sequential sees one "
                                         r"value per channel in a training batch of 1 \(Expected .*\), whatever "
                                         r"recovery_batch_size is; give it at least 2 training examples$") as err:
        recovery.recover(res, one, recovery.RecoverySettings(rec, batches=2, steps=2, batch_size=8))
    assert "\n" not in str(err.value)
    two = data.take(train_set, np.array([0, 1]))
    assert recovery.recover(res, two, recovery.RecoverySettings(rec, batches=2, steps=2, batch_size=8)).bn_layers == 3


def test_recovery_without_training_split_is_one_line_error():
    res = pruning.prune_magnitude(plain_net(), 0.5)
    with pytest.raises(ValueError, match="training split") as err:
        recovery.recover(res, None, recovery.RecoverySettings("finetune"))
    assert "\n" not in str(err.value)
    assert recovery.recover(res, None, recovery.RecoverySettings("none")).recovery == "none"


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(recovery="bogus"), "bogus"),
        (dict(batches=0), "recovery_batches=0"),
        (dict(steps=0), "finetune_steps=0"),
        (dict(batch_size=0), "recovery_batch_size=0"),
        (dict(lr=0.0), "finetune_lr=0.0"),
        (dict(lr=-1e-3), r"finetune_lr=-0.001 must be a number in \(0, 1000\]"),
        (dict(lr=float("nan")), r"finetune_lr=nan must be a number in \(0, 1000\]"),
        (dict(lr=float("inf")), r"finetune_lr=inf must be a number in \(0, 1000\]"),
        # finite, but a float32 optimizer step overflows: AdamW stopped the trial mid-way with a traceback
        (dict(lr=1e300), r"finetune_lr=1e\+300 must be a number in \(0, 1000\]"),
        (dict(lr=True), "finetune_lr=True"),
        (dict(optimizer="adam"), "adam"),
        (dict(schedule="onecycle"), "onecycle"),
    ],
)
def test_bad_settings_name_the_value(kwargs, bad):
    with pytest.raises(ValueError, match=bad):
        recovery.RecoverySettings(**kwargs)


@pytest.mark.parametrize("method", ["magnitude", "random"])
def test_finetune_keeps_zeros_bitwise_positive_zero(train_set, method):
    base = bn_net()
    fn = pruning.prune_magnitude if method == "magnitude" else pruning.prune_random
    res = fn(base, 0.7, targets=("conv", "linear"))
    before = {lp.key: res.model.get_parameter(lp.key).detach().clone() for lp in res.layers}
    settings = recovery.RecoverySettings("finetune", batches=4, steps=15, batch_size=32, lr=1e-2)
    rep = recovery.recover(res, train_set, settings)
    assert rep.finetune_steps == 15 and np.isfinite(rep.final_train_loss)
    assert not res.model.training
    for lp in res.layers:
        w = res.model.get_parameter(lp.key).detach().reshape(-1)
        pruned = torch.from_numpy(~lp.keep)
        assert int(pruned.sum()) == lp.n_zeroed
        z = w[pruned]
        assert torch.all(z == 0) and not torch.any(torch.signbit(z)), lp.key  # bitwise +0.0
        kept_before = before[lp.key].reshape(-1)[~pruned]
        assert not torch.equal(w[~pruned], kept_before), f"{lp.key}: kept weights did not train"
    # the accounting sees the same sparsity as before fine-tuning
    stats = accounting.model_stats(base, res)
    assert stats.zeroed_coeffs == res.n_zeroed


@pytest.mark.parametrize("method", ["dwt", "magnitude", "random"])
def test_finetune_leaves_a_frozen_target_layer_as_it_is_for_every_method(train_set, method):
    """A frozen stem (its pruned weight and BatchNorm requires_grad False, as in transfer learning):
    dwt fine-tuned the rest and left the stem's coefficients alone, while magnitude and random
    stopped with "cannot register a hook on a tensor that doesn't require gradient". Now every
    method leaves the stem bitwise as pruned and trains the other layers with their pruning held."""
    base = bn_net()
    base[0].weight.requires_grad_(False)
    base[1].requires_grad_(False)
    res = _prune(method, base)
    stem = res.model[0].weight.detach().clone()
    stem_coeffs = res.layers[0].coeffs.copy() if method == "dwt" else None
    rest = {lp.key: res.model.get_parameter(lp.key).detach().clone() for lp in res.layers if lp.name != "0"}
    settings = recovery.RecoverySettings("finetune", batches=2, steps=5, batch_size=32, lr=1e-2)
    rep = recovery.recover(res, train_set, settings)
    assert rep.finetune_steps == 5 and np.isfinite(rep.final_train_loss)
    assert not res.model[0].weight.requires_grad
    if method == "dwt":  # the same coefficients; the weight their inverse DWT again (the torch filter bank)
        assert np.array_equal(res.layers[0].coeffs, stem_coeffs)
        torch.testing.assert_close(res.model[0].weight.detach(), stem, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(res.model[0].weight, stem)
        assert res.model[0].weight.reshape(-1)[torch.from_numpy(~res.layers[0].keep)].view(torch.int32).eq(0).all()
    for lp in res.layers[1:]:
        w = res.model.get_parameter(lp.key).detach()
        assert not torch.equal(w, rest[lp.key]), f"{lp.key}: did not train"
        if method != "dwt":
            assert w.reshape(-1)[torch.from_numpy(~lp.keep)].view(torch.int32).eq(0).all(), lp.key  # bitwise +0.0


def _dwt_result(model, layout="filter", wavelet="bior4.4", level=3, percentile=70.0):
    targets = ("conv",) if layout == "kernel" else ("conv", "linear")  # a Linear weight has no kernels
    return pruning.prune_dwt(model, wavelet=wavelet, level=level, percentile=percentile, layout=layout,
                             targets=targets)  # fmt: skip


@pytest.mark.parametrize("layout", ["filter", "kernel", "matrix", "flat"])
def test_finetune_dwt_trains_only_kept_coefficients(train_set, tmp_path, layout):
    pytest.importorskip("wavesweep.wavelets_torch")
    base = bn_net()
    res = _dwt_result(base, layout=layout, wavelet="haar" if layout == "kernel" else "bior2.2")
    keep_before = [lp.keep.copy() for lp in res.layers]
    coeffs_before = [lp.coeffs.copy() for lp in res.layers]
    stats_before = accounting.model_stats(base, res)
    settings = recovery.RecoverySettings("finetune", batches=4, steps=12, batch_size=32, lr=1e-2)
    rep = recovery.recover(res, train_set, settings)
    assert rep.finetune_steps == 12
    changed = 0
    for lp, keep0, c0 in zip(res.layers, keep_before, coeffs_before):
        assert np.array_equal(lp.keep, keep0)
        assert lp.coeffs.dtype == c0.dtype and lp.coeffs.shape == c0.shape
        assert np.all(lp.coeffs[~lp.keep] == 0)
        changed += int(not np.array_equal(lp.coeffs[lp.keep], c0[lp.keep]))
        # the weight is the inverse DWT of the fine-tuned coefficients (PyWavelets as the oracle)
        w = res.model.get_parameter(lp.key).detach().numpy()
        np.testing.assert_allclose(w, wv.reconstruct(lp.coeffs, lp.structure), rtol=1e-4, atol=1e-5)
    assert changed == len(res.layers)
    assert isinstance(res.model[0].weight, nn.Parameter)  # parametrisation removed
    stats = accounting.model_stats(base, res)
    assert stats.stored_bytes == stats_before.stored_bytes
    assert stats.zeroed_coeffs == stats_before.zeroed_coeffs
    # the checkpoint stores the fine-tuned coefficients and rebuilds the fine-tuned model
    path = tmp_path / "dwt.wsz"
    size = checkpoint.save_compressed(res, path)
    assert size == stats.stored_bytes + checkpoint.read_header(path)["header_bytes"]
    rebuilt, _ = checkpoint.load_compressed(path, bn_net(seed=1))
    x = train_set.tensors[0][:16]
    sd, sd_rebuilt = res.model.state_dict(), rebuilt.state_dict()
    assert list(sd) == list(bn_net().state_dict())  # the parametrisation left the state-dict order alone
    for k in sd:
        torch.testing.assert_close(sd[k], sd_rebuilt[k], rtol=1e-4, atol=1e-5, msg=k)
    torch.testing.assert_close(res.model(x), rebuilt(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_finetune_dwt_of_a_half_precision_model_keeps_its_dtype(train_set, tmp_path, dtype):
    """A bfloat16 model: the coefficients train in float32 (the dtype the transform ran
    in, as recorded), W = IDWT(c * m) is the weight's dtype at every step and after, as
    magnitude's weights are. PyWavelets as the oracle, to the dtype's rounding."""
    base = bn_net().to(dtype)
    data = TensorDataset(train_set.tensors[0].to(dtype), train_set.tensors[1])
    res = _dwt_result(base, wavelet="db2", level=2)
    keep0 = [lp.keep.copy() for lp in res.layers]
    bytes0 = accounting.model_stats(base, res).stored_bytes
    settings = recovery.RecoverySettings("finetune", batches=2, steps=4, batch_size=32, lr=1e-2)
    assert recovery.recover(res, data, settings).finetune_steps == 4
    assert all(p.dtype == dtype for p in res.model.parameters())
    for lp, k0 in zip(res.layers, keep0):
        assert np.array_equal(lp.keep, k0) and lp.coeffs.dtype == np.float32 and np.all(lp.coeffs[~lp.keep] == 0)
        want = torch.from_numpy(wv.reconstruct(lp.coeffs, lp.structure)).to(dtype)
        torch.testing.assert_close(res.model.get_parameter(lp.key).detach(), want, rtol=1e-2, atol=1e-3)
    stats = accounting.model_stats(base, res)
    assert stats.stored_bytes == bytes0
    path = tmp_path / "half.wsz"
    assert checkpoint.save_compressed(res, path) == stats.stored_bytes + checkpoint.read_header(path)["header_bytes"]
    rebuilt, _ = checkpoint.load_compressed(path, bn_net(seed=1).to(dtype))
    for k, v in res.model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[k], v, rtol=1e-2, atol=1e-3, msg=k)


@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("rec", ["bn", "finetune"])
@pytest.mark.parametrize("method", ["dwt", "magnitude"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_recovers_on_float32_batches_as_on_batches_in_its_dtype(train_set, monkeypatch, dtype, method, rec, group):
    """The datasets give float32 batches: a float16/bfloat16 model (README: given to run_trial or
    recover in Python, it computes in its own dtype) failed its first re-estimation or fine-tuning
    pass with torch's "Input type (torch.FloatTensor) and weight type ... should be the same".
    The oracle: the same recovery on the batches already rounded to the model's dtype, bit for bit."""
    monkeypatch.setattr(recovery, "groups_by_default", lambda dev: True)  # the accelerator's grouped passes too
    monkeypatch.setattr(recovery, "bn_group", lambda nbytes: group)
    out = []
    for data in (train_set, TensorDataset(train_set.tensors[0].to(dtype), train_set.tensors[1])):
        res = _prune(method, bn_net().to(dtype))
        settings = recovery.RecoverySettings(rec, batches=5, steps=3, batch_size=32, lr=1e-3)
        rep = recovery.recover(res, data, settings)
        out.append((res, rep))
    (got, rep_got), (want, rep_want) = out
    assert rep_got.bn_layers == rep_want.bn_layers == 3
    np.testing.assert_equal(rep_got.final_train_loss, rep_want.final_train_loss)  # nan for bn alone
    sd_got, sd_want = got.model.state_dict(), want.model.state_dict()
    assert list(sd_got) == list(sd_want)
    for k in sd_want:
        assert sd_got[k].dtype == sd_want[k].dtype and torch.equal(sd_got[k], sd_want[k]), k
    assert all(p.dtype == dtype for p in got.model.parameters())


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("method", ["dwt", "magnitude", "random"])
def test_finetune_of_a_float16_model_follows_the_float32_one(train_set, method, optimizer):
    """A float16 model fine-tuned with AdamW had NaN weights for every method (its eps 1e-8 is 0 in
    float16: a zero gradient's update is 0/0), and SGD at lr 3e-4 moved the first conv's weights
    less than half as far as in float32 (updates below half of float16's spacing were lost). The oracle: the same model, the same float16-valued weights
    and inputs, fine-tuned in float32. The float16 one steps in float32 masters and ends float16."""
    out = {}
    for dtype in (torch.float32, torch.float16):
        base = bn_net().half().to(dtype)
        data = TensorDataset(train_set.tensors[0].half().to(dtype), train_set.tensors[1])
        res = _prune(method, base)
        pre = {lp.key: res.model.get_parameter(lp.key).detach().float().clone() for lp in res.layers}
        settings = recovery.RecoverySettings("finetune", batches=2, steps=10, batch_size=32, optimizer=optimizer,
                                             lr=1e-3 if optimizer == "adamw" else 3e-4)  # fmt: skip
        rep = recovery.recover(res, data, settings)
        with torch.no_grad():
            logits = res.model(data.tensors[0][:64]).float()
        out[dtype] = res, pre, rep, logits
    (r16, pre16, rep16, l16), (r32, pre32, rep32, l32) = out[torch.float16], out[torch.float32]
    assert all(p.dtype == torch.float16 and bool(torch.isfinite(p).all()) for p in r16.model.parameters())
    assert rep16.final_train_loss == pytest.approx(rep32.final_train_loss, abs=5e-3)
    torch.testing.assert_close(l16, l32, rtol=0, atol=3e-2)
    for lp in r16.layers:
        w16, w32 = r16.model.get_parameter(lp.key).detach().float(), r32.model.get_parameter(lp.key).detach().float()
        moved = float((w32 - pre32[lp.key]).norm())  # what fine-tuning did in float32
        assert moved > 0 and float((w16 - w32).norm()) < 0.35 * moved, lp.key
        assert float((w16 - pre16[lp.key]).norm()) == pytest.approx(moved, rel=0.3), lp.key  # it trained as much
        if method != "dwt":
            z = w16.reshape(-1)[torch.from_numpy(~lp.keep)]
            assert torch.all(z == 0) and not torch.any(torch.signbit(z)), lp.key


class _TiedHead(nn.Module):
    """A conv, then an output Linear whose weight an embedding shares (tied, as in language
    models): the embedding's rows are per-class offsets added to the logits."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv, self.bn = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 64, 4, bias=False)
        self.emb = nn.Embedding(4, 4 * 64)
        self.emb.weight = self.head.weight

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x))).flatten(1)
        return self.head(h) + self.emb(torch.arange(4, device=x.device)).mean(1)


@pytest.mark.parametrize("method", ["dwt", "magnitude"])
def test_finetune_of_a_target_weight_tied_to_another_module(train_set, tmp_path, method):
    """The embedding tied to the pruned Linear computes with the Linear's weight at every step
    (dwt: W = IDWT(c * m), never the coefficient vector itself), the tie holds afterwards, and
    the pruning, stored bytes and checkpoint are those of an untied layer."""
    base = _TiedHead().eval()
    dwt = pruning.prune_dwt(base, wavelet="db2", level=2, percentile=70, layout="filter", targets=("linear",))
    res = dwt if method == "dwt" else pruning.prune_matched(base, dwt, targets=("linear",))["magnitude"]
    keep0, bytes0 = res.layers[0].keep.copy(), accounting.model_stats(base, res).stored_bytes
    seen = []
    res.model.emb.register_forward_hook(lambda mod, args, out: seen.append(torch.equal(mod.weight, res.model.head.weight)))
    settings = recovery.RecoverySettings("finetune", batches=2, steps=4, batch_size=32, lr=1e-2)
    assert recovery.recover(res, train_set, settings).finetune_steps == 4
    assert seen == [True] * (4 + 2)  # every forward pass: fine-tuning's 4, then re-estimation's 2
    assert res.model.emb.weight is res.model.head.weight and isinstance(res.model.head.weight, nn.Parameter)
    assert list(res.model.state_dict()) == list(_TiedHead().state_dict())
    lp = res.layers[0]
    w = res.model.head.weight.detach().reshape(-1)
    assert np.array_equal(lp.keep, keep0)
    if method == "dwt":
        assert np.all(lp.coeffs[~lp.keep] == 0)
        np.testing.assert_allclose(w.reshape(lp.shape).numpy(), wv.reconstruct(lp.coeffs, lp.structure), rtol=1e-4, atol=1e-5)
    else:
        assert torch.all(w[torch.from_numpy(~lp.keep)] == 0)
    stats = accounting.model_stats(base, res)
    assert stats.stored_bytes == bytes0
    path = tmp_path / "tied.wsz"
    assert checkpoint.save_compressed(res, path) == stats.stored_bytes + checkpoint.read_header(path)["header_bytes"]
    rebuilt, _ = checkpoint.load_compressed(path, _TiedHead(seed=1))
    x = train_set.tensors[0][:8]
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), res.model(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("net", [bn_net, twin_net])
def test_finetune_of_a_record_left_on_the_device_never_copies_it_to_the_host(train_set, tmp_path, monkeypatch, net):
    """As on an accelerator (the record of the torch backends waits on the device for its copy
    to the host, layers of one shape stacked; here forced on CPU): fine-tuning trains from the
    device record and leaves the fine-tuned coefficients there, no record comes to the host
    before the checkpoint reads it, and everything equals the same fine-tuning from a host
    record bit for bit (the checkpoint file too)."""
    pytest.importorskip("wavesweep.wavelets_torch")
    from wavesweep import prune_record

    monkeypatch.setattr(pruning, "STACK_ON_CPU", True)

    settings = recovery.RecoverySettings("finetune", batches=2, steps=5, batch_size=32, lr=1e-2)
    kw = dict(wavelet="bior2.2", level=2, percentile=70, targets=("conv", "linear"), backend="torch")
    out, fetched, real_fetch = {}, [], prune_record._HostGroup.fetch
    monkeypatch.setattr(prune_record._HostGroup, "fetch", lambda self: (fetched.append(1), real_fetch(self))[1])
    for deferred in (False, True):
        monkeypatch.setattr(prune_record, "stays_on_device", lambda t, d=deferred: d)
        fetched.clear()
        base = net()
        dwt = pruning.prune_dwt(base, **kw)
        mag = pruning.prune_matched(base, dwt, targets=kw["targets"], backend="torch")["magnitude"]
        for res in (dwt, mag):
            recovery.recover(res, train_set, settings)
        stats = accounting.model_stats(base, dwt)
        if deferred:
            assert fetched == []
            assert all(lp.device_record("coeffs") is not None and lp.device_record("keep") is not None for lp in dwt.layers)
            assert all(lp.device_record("keep") is not None for lp in mag.layers)
        size = checkpoint.save_compressed(dwt, tmp_path / f"{deferred}.wsz")
        assert size == stats.stored_bytes + checkpoint.read_header(tmp_path / f"{deferred}.wsz")["header_bytes"]
        assert fetched == ([1] if deferred else [])
        out[deferred] = (dwt, mag)
    assert (tmp_path / "False.wsz").read_bytes() == (tmp_path / "True.wsz").read_bytes()
    for m in (0, 1):
        for a, b in zip(out[False][m].layers, out[True][m].layers):
            assert np.array_equal(a.keep, b.keep)
            if m == 0:
                assert a.coeffs.dtype == b.coeffs.dtype and np.array_equal(a.coeffs, b.coeffs)
        for (k, x), (_, y) in zip(out[False][m].model.state_dict().items(), out[True][m].model.state_dict().items()):
            assert torch.equal(x, y), k
    w = out[True][1].model.get_parameter(out[True][1].layers[0].key).detach().reshape(-1)
    assert torch.all(w[torch.from_numpy(~out[True][1].layers[0].keep)] == 0)


@pytest.mark.parametrize("layout", ["filter", "matrix"])
def test_finetune_dwt_same_steps_in_either_coefficient_order(train_set, monkeypatch, layout):
    # On CPU the coefficients train positions-major (the synthesis' own order): a permutation, so
    # AdamW takes the same steps as in the coefficient order ("taps" synthesis, no reorder), up to
    # the synthesis' float rounding; the mask is exact in both, and the result comes back in order.
    from wavesweep import filterbank

    settings = recovery.RecoverySettings("finetune", batches=2, steps=6, batch_size=32, lr=1e-2)
    got = {}
    from wavesweep import dense

    for backend in ("taps", None, "dense"):  # None: the CPU default, "gemm"; dense: an accelerator's
        monkeypatch.setattr(filterbank, "_FORCE_BACKEND", backend)
        res = _dwt_result(bn_net(), layout=layout, wavelet="db2")
        st = res.layers[0].structure
        ww = recovery.WaveletWeight(torch.from_numpy(res.layers[0].keep), st)
        assert st.level > 0 and dense.applies(st)
        assert ww.order == {"taps": "flat", None: "positions_major", "dense": "rows"}[backend], (backend, ww.order)
        c = torch.from_numpy(res.layers[0].coeffs)
        assert torch.equal(ww.from_param(ww.to_param(c)), c)
        recovery.recover(res, train_set, settings)
        got[backend] = res
    for other in (None, "dense"):
        for a, b in zip(got["taps"].layers, got[other].layers):
            assert np.array_equal(a.keep, b.keep) and np.all(b.coeffs[~b.keep] == 0)
            np.testing.assert_allclose(b.coeffs, a.coeffs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["taps", None, "dense"])  # the orders flat, positions_major, rows
def test_finetune_dwt_a_layer_without_outputs_in_every_coefficient_order(backend, monkeypatch):
    """A Linear of 0 outputs (weight (0, 192): a real level, no coefficients) fine-tunes and comes
    back with 0 coefficients in every order. In the rows order (the dense transform, an accelerator's
    default) giving the coefficients back reshaped them to (0, -1), which 0 elements cannot infer:
    finetune raised after its last step."""
    from wavesweep import filterbank

    monkeypatch.setattr(filterbank, "_FORCE_BACKEND", backend)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(192, 0), nn.Linear(0, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = pruning.prune_dwt(net, wavelet="haar", level=2, percentile=50, targets=("linear",), backend="torch")
    assert [(lp.n_positions, lp.structure.level) for lp in res.layers] == [(0, 2), (0, 0)]
    ww = recovery.WaveletWeight(torch.zeros(0, dtype=torch.bool), res.layers[0].structure)
    assert ww.order == {"taps": "flat", None: "positions_major", "dense": "rows"}[backend]
    assert ww.from_param(ww.to_param(torch.zeros(0))).shape == (0,)
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    steps, _ = recovery.finetune(res, batches, recovery.RecoverySettings("finetune", batches=2, steps=2, batch_size=4))
    assert steps == 2 and [lp.coeffs.shape for lp in res.layers] == [(0,), (0,)]
    assert tuple(res.model[1].weight.shape) == (0, 192)


def test_same_recovery_for_every_method(train_set, monkeypatch):
    """All three methods consume identical training batches (the same examples, the same order)."""
    pytest.importorskip("wavesweep.wavelets_torch")
    seen: dict[str, list[torch.Tensor]] = {}
    real = recovery.training_batches

    def spy(*a, **k):
        for x, y in real(*a, **k):
            seen.setdefault(current, []).append(x)
            yield x, y

    monkeypatch.setattr(recovery, "training_batches", spy)
    base = bn_net()
    dwt = _dwt_result(base)
    results = {"dwt": dwt, **pruning.prune_matched(base, dwt, targets=("conv", "linear"))}
    settings = recovery.RecoverySettings("finetune", batches=3, steps=4, batch_size=32)
    for current, res in results.items():
        recovery.recover(res, train_set, settings)
    assert len(seen["dwt"]) == 7
    for m in ("magnitude", "random"):
        assert len(seen[m]) == 7 and all(torch.equal(a, b) for a, b in zip(seen["dwt"], seen[m]))


def _prune(method: str, base: nn.Module) -> pruning.PruneResult:
    if method == "dwt":
        return _dwt_result(base, wavelet="db2", level=2)
    fn = pruning.prune_magnitude if method == "magnitude" else pruning.prune_random
    return fn(base, 0.7, targets=("conv", "linear"))


@pytest.mark.parametrize("method", ["dwt", "magnitude", "random"])
def test_a_diverging_finetune_stops_naming_the_method_step_and_remedy(train_set, method):
    """SGD at lr 100 on a net without BatchNorm: the training loss is inf or NaN from step 11. The
    model's NaN weights were scored as a model (top-1 of the class argmax picks for NaN logits,
    loss nan) and the trial finished; now every method stops with one line at that step."""
    res = _prune(method, plain_net())
    settings = recovery.RecoverySettings("finetune", batches=2, steps=20, batch_size=32, lr=100.0, optimizer="sgd")
    with pytest.raises(ValueError) as info:  # a usage error: exit code 2, the runs FAILED
        recovery.recover(res, train_set, settings)
    msg = str(info.value)
    assert type(info.value).__name__ == "FinetuneDiverged" and "\n" not in msg
    assert msg.startswith(f"{method}: fine-tuning diverged at step 11 of 20 (training loss "), msg
    assert msg.endswith("; lower finetune_lr (it is 100, optimizer sgd)"), msg
    # a diverging lr that stays finite (adamw, or sgd at 10 here) is a finished, honest fine-tune
    for opt, lr in (("adamw", 100.0), ("sgd", 10.0)):
        ok = recovery.RecoverySettings("finetune", batches=2, steps=20, batch_size=32, lr=lr, optimizer=opt)
        assert np.isfinite(recovery.recover(_prune(method, plain_net()), train_set, ok).final_train_loss)


def test_divergence_found_after_the_last_step_names_the_first_bad_one():
    """On an accelerator the losses are checked once, after the last step (no sync per step): the
    step named is still the first whose loss was not finite."""
    res = types.SimpleNamespace(method="random", model=plain_net())
    losses = [torch.tensor(v) for v in (2.0, 1.5, float("inf"), float("nan"), 3.0)]
    settings = recovery.RecoverySettings("finetune", steps=5, lr=0.5, optimizer="sgd")
    with pytest.raises(ValueError, match=r"^random: fine-tuning diverged at step 3 of 5 \(training loss inf\); "
                       r"lower finetune_lr \(it is 0.5, optimizer sgd\)$"):  # fmt: skip
        recovery._check_finite(res, losses, settings)
    recovery._check_finite(res, losses[:2], settings)  # finite losses and weights: nothing to say


@pytest.mark.parametrize("method", ["dwt", "magnitude"])
def test_finetune_stops_on_weights_made_non_finite_by_its_last_step(train_set, monkeypatch, method):
    """Every training loss finite, but the last step leaves a parameter infinite (the loss of a step is
    computed before its update): stopped too, naming the parameter."""
    real = recovery._optimizer

    def poisoned(params, settings):
        opt = real(params, settings)

        class LastStepPoisons(type(opt)):
            def step(self, *a, **k):
                out = super().step(*a, **k)
                if self.state[self.param_groups[0]["params"][0]]["step"] == settings.steps:
                    with torch.no_grad():
                        self.param_groups[0]["params"][-1].fill_(float("inf"))
                return out

        opt.__class__ = LastStepPoisons
        return opt

    monkeypatch.setattr(recovery, "_optimizer", poisoned)
    res = _prune(method, bn_net())
    settings = recovery.RecoverySettings("finetune", batches=2, steps=3, batch_size=32, lr=1e-3)
    with pytest.raises(ValueError, match=rf"^{method}: fine-tuning diverged: parameter '10.bias' is NaN or "
                       r"infinite after step 3 of 3; lower finetune_lr \(it is 0.001, optimizer adamw\)$"):  # fmt: skip
        recovery.recover(res, train_set, settings)


@pytest.mark.parametrize("rec", ["bn", "finetune"])
def test_recovery_seconds_start_and_stop_with_the_device_idle(train_set, rec, monkeypatch):
    """``recovery_seconds`` is this recovery's work: on CUDA kernels run after they are queued (the
    re-estimation never waits for them), so the clock starts after a sync (nothing another method
    queued counts) and stops after one (everything this recovery queued counts): the order of
    the calls (a wall-clock check on CUDA would be a timed test)."""
    events: list[str] = []
    monkeypatch.setattr(recovery, "_sync", lambda dev: events.append(f"sync {torch.device(dev).type}"))
    monkeypatch.setattr(recovery, "time", types.SimpleNamespace(perf_counter=lambda: events.append("clock") or 0.0))
    res = pruning.prune_magnitude(bn_net(), 0.5)
    recovery.recover(res, train_set, recovery.RecoverySettings(rec, batches=2, steps=2, batch_size=32))
    assert events == ["sync cpu", "clock", "sync cpu", "clock"]


def test_recovery_seconds_leave_out_the_training_splits_one_copy_to_the_device(monkeypatch):
    """In-memory images go to the device once (cached on the dataset), on the first method's
    recovery: made before its clock starts, so dwt (recovered first in a trial) does not count
    what magnitude and random get for free. Here: the first ``to()`` (the copy) comes before the
    first clock read of each of three recoveries."""
    from wavesweep.data import TensorImages

    g = torch.Generator().manual_seed(3)
    ds = TensorImages(torch.randint(0, 256, (200, 1, 8, 8), generator=g, dtype=torch.uint8),
                      torch.randint(0, 4, (200,), generator=g), divisor=255.0, mean=(0.4,), std=(0.3,))  # fmt: skip
    events: list[str] = []
    real_to = TensorImages.to
    monkeypatch.setattr(TensorImages, "to", lambda self, device: (events.append("to"), real_to(self, device))[1])
    monkeypatch.setattr(recovery, "time", types.SimpleNamespace(perf_counter=lambda: events.append("clock") or 0.0))
    base = bn_net()
    for res in (pruning.prune_magnitude(base, 0.5), pruning.prune_random(base, 0.5), pruning.prune_magnitude(base, 0.7)):
        events.clear()
        recovery.recover(res, ds, recovery.RecoverySettings("bn", batches=2, batch_size=32))
        assert events[0] == "to" and events.count("clock") == 2, events


def test_trial_recovery_without_training_split_fails_before_any_work(monkeypatch):
    """An evaluation-only dataset (an ImageNet validation folder alone) cannot be recovered:
    one line naming the recovery and the dataset, before the base model is even loaded."""
    from wavesweep import data, train, trial
    from wavesweep.config import TrialConfig

    def val_only(name, **kw):
        x = torch.randn(20, 3, 8, 8)
        return data.DatasetBundle("imagenet", None, TensorDataset(x, torch.arange(20) % 4), 4, 3, 8, {})

    def no_base(*a, **k):
        raise AssertionError("the base model must not be loaded")

    monkeypatch.setattr(data, "load_dataset", val_only)
    monkeypatch.setattr(train, "get_base_model", no_base)
    for rec in ("bn", "finetune"):
        with pytest.raises(ValueError, match=rf"recovery='{rec}' needs the training split of dataset 'imagenet'") as e:
            trial.run_trial(TrialConfig(dataset="imagenet", recovery=rec))
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("rec", ["bn", "finetune"])
def test_recovery_seeds_only_the_generators_it_restores(train_set, monkeypatch, rec):
    """Recovery seeds torch's CPU generator (and its own CUDA device's), the ones its fork puts back,
    never every CUDA device: torch.manual_seed did (before CUDA starts: queued for when it does), so a
    multi-GPU host's other devices, or a CPU trial's later CUDA work, kept the recovery's seed. The
    same numbers as before (the CPU generator gets the same seed)."""
    settings = recovery.RecoverySettings(rec, batches=2, steps=3, batch_size=32, lr=1e-2)
    ref = pruning.prune_magnitude(bn_net(), 0.5, targets=("conv", "linear"))
    recovery.recover(ref, train_set, settings)
    got = pruning.prune_magnitude(bn_net(), 0.5, targets=("conv", "linear"))  # bn_net seeds torch itself
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: pytest.fail("seeded every CUDA device"))
    recovery.recover(got, train_set, settings)
    for k, v in ref.model.state_dict().items():
        assert torch.equal(got.model.state_dict()[k], v), k


def test_finetune_starts_every_method_from_the_same_random_state(train_set):
    """Dropout is random: fine-tuning seeds torch's generator with the recovery seed (in a fork),
    so the result does not depend on the random state before it, and that state is left as it was."""
    settings = recovery.RecoverySettings("finetune", batches=2, steps=4, batch_size=32, lr=1e-2)
    got = []
    for before in (1, 2):
        mag = pruning.prune_magnitude(bn_net(), 0.5, targets=("conv", "linear"))  # bn_net seeds torch
        torch.manual_seed(before)
        torch.rand(before)  # a different global random state each time
        state = torch.random.get_rng_state()
        recovery.recover(mag, train_set, settings)
        assert torch.equal(torch.random.get_rng_state(), state)
        got.append(mag.model.state_dict())
    for k in got[0]:
        assert torch.equal(got[0][k], got[1][k]), k
    other = pruning.prune_magnitude(bn_net(), 0.5, targets=("conv", "linear"))
    recovery.recover(other, train_set, recovery.RecoverySettings("finetune", batches=2, steps=4, batch_size=32,
                                                                 lr=1e-2, seed=5))  # fmt: skip
    assert not torch.equal(other.model.state_dict()["9.weight"], got[0]["9.weight"])  # the seed matters


def _bn_oracle(model: nn.Module, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per BatchNorm layer of a copy of ``model``: the mean over ``batches`` of the per-batch
    per-channel mean and unbiased variance of its input (forward pre-hooks, BatchNorm layers in
    train mode, everything else in eval mode), in float64."""
    oracle = copy.deepcopy(model).eval()
    bns = recovery.batchnorm_layers(oracle)
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(bns))}
    hooks = [bn.register_forward_pre_hook(lambda mod, inp, i=i: seen[i].append(inp[0].detach().double()))
             for i, bn in enumerate(bns)]  # fmt: skip
    for bn in bns:
        bn.train()
    with torch.no_grad():
        for x, _ in batches:
            oracle(x)
    for h in hooks:
        h.remove()
    out = []
    for i in range(len(bns)):
        dims = [0] + list(range(2, seen[i][0].ndim))
        out.append((torch.stack([t.mean(dim=dims) for t in seen[i]]).mean(0),
                    torch.stack([t.var(dim=dims, unbiased=True) for t in seen[i]]).mean(0)))  # fmt: skip
    return out


@pytest.mark.parametrize("method", ["dwt", "magnitude"])
def test_finetune_ends_with_the_cumulative_statistics_of_its_final_weights(train_set, method):
    """Fine-tuning trains BatchNorm layers in train mode (an exponential running average of its
    last batches, under weights still changing): the re-estimation comes after it, so the final
    model's statistics are the cumulative average over ``recovery_batches`` batches of the
    re-estimation stream, of its final weights (oracle: forward hooks on a copy of it)."""
    base = bn_net()
    res = _dwt_result(base) if method == "dwt" else pruning.prune_magnitude(base, 0.5, targets=("conv", "linear"))
    settings = recovery.RecoverySettings("finetune", batches=5, steps=6, batch_size=32, lr=1e-2)
    report = recovery.recover(res, train_set, settings)
    assert (report.finetune_steps, report.bn_batches) == (6, 5)
    batches = list(recovery.training_batches(train_set, batch_size=32, n=5, seed=settings.seed))
    for bn, (mean, var) in zip(recovery.batchnorm_layers(res.model), _bn_oracle(res.model, batches), strict=True):
        assert int(bn.num_batches_tracked) == 5  # re-estimated last: not 5 + 6
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)


class _Flipped(torch.utils.data.Dataset):
    """A training split with a random transform drawn from torch's global generator per item
    (as imagefolder's RandomHorizontalFlip), read through a DataLoader."""

    def __init__(self, base: TensorDataset) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        x, y = self.base[i]
        return (x.flip(-1) if torch.rand(()) < 0.5 else x), y


@pytest.mark.parametrize("rec", ["bn", "finetune"])
def test_recovery_with_random_transforms_is_the_same_for_every_method(train_set, rec, monkeypatch):
    """A random training transform draws from torch's global generator: recovery seeds it (in a
    fork), so every method and every repeat sees the same transformed batches whatever the random
    state before, and that state is left as it was."""
    from wavesweep.data import close_loaders

    flipped = _Flipped(train_set)
    seen: list[list[torch.Tensor]] = []
    real = recovery.training_batches

    def spy(*a, **k):
        for x, y in real(*a, **k):
            seen[-1].append(x)
            yield x, y

    monkeypatch.setattr(recovery, "training_batches", spy)
    settings = recovery.RecoverySettings(rec, batches=4, steps=3, batch_size=32, lr=1e-2)
    base = bn_net()
    dwt = _dwt_result(base)
    results = [dwt, *pruning.prune_matched(base, dwt, targets=("conv", "linear")).values()]
    results.append(pruning.prune_matched(base, _dwt_result(base), targets=("conv", "linear"))["magnitude"])
    stats = []
    try:
        for before, res in enumerate(results):
            torch.manual_seed(100 + before)  # a different global random state each time
            state = torch.random.get_rng_state()
            seen.append([])
            recovery.recover(res, flipped, settings)
            assert torch.equal(torch.random.get_rng_state(), state)
            stats.append({k: v for k, v in res.model.state_dict().items() if "running" in k})
    finally:  # its decoding workers, kept for the next recovery
        close_loaders(flipped)
    assert len(seen[0]) == 4 + (3 if rec == "finetune" else 0)
    for other in seen[1:]:
        assert len(other) == len(seen[0]) and all(torch.equal(a, b) for a, b in zip(seen[0], other))
    for k in stats[1]:  # magnitude recovered twice, from two random states: the same model
        assert torch.equal(stats[1][k], stats[3][k]), k


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("layout", ["filter", "matrix"])
def test_recovery_on_cuda_matches_cpu(train_set, layout, monkeypatch):
    """BatchNorm re-estimation and wavelet-domain fine-tuning on CUDA (dense synthesis for the
    filter layout, conv for the matrix layout): the masks stay exact and the result agrees with
    the CPU run (GEMM synthesis) to float tolerance; the model comes back on the device it was
    recovered on, and magnitude's zeros stay +0.0. No dropout, plain SGD and no TF32 in the convs:
    AdamW's first steps are about lr * sign(gradient), so a near-zero gradient component that
    rounds to the other sign moves 2 lr apart; SGD keeps a rounding difference a rounding
    difference."""
    pytest.importorskip("wavesweep.wavelets_torch")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    settings = recovery.RecoverySettings("finetune", batches=3, steps=6, batch_size=32, lr=1e-2, optimizer="sgd")
    got = {}
    for device in ("cpu", "cuda"):
        base = bn_net()
        base[6].p = 0.0  # dropout: the CPU's and the GPU's generators give different masks for one seed
        dwt = _dwt_result(base, layout=layout, wavelet="bior2.2")
        mag = pruning.prune_matched(base, dwt, targets=("conv", "linear"))["magnitude"]
        keep = [lp.keep.copy() for lp in dwt.layers]
        for res in (dwt, mag):
            recovery.recover(res, train_set, settings, device=device)
        for lp, k in zip(dwt.layers, keep):
            assert np.array_equal(lp.keep, k) and np.all(lp.coeffs[~lp.keep] == 0)
        for lp in mag.layers:
            w = mag.model.get_parameter(lp.key).detach().reshape(-1).cpu()
            z = w[torch.from_numpy(~lp.keep.reshape(-1))]
            assert torch.all(z == 0) and not torch.any(torch.signbit(z))
        assert next(dwt.model.parameters()).device.type == device
        got[device] = (dwt, mag)
    for a, b in zip(got["cpu"][0].layers, got["cuda"][0].layers):
        np.testing.assert_allclose(b.coeffs, a.coeffs, rtol=1e-3, atol=1e-4)
    for m in (0, 1):
        sd_cpu, sd_cuda = got["cpu"][m].model.state_dict(), got["cuda"][m].model.state_dict()
        for k in sd_cpu:
            torch.testing.assert_close(sd_cuda[k].cpu(), sd_cpu[k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_reestimation_on_cuda_matches_one_pass_per_batch_and_cpu(train_set, monkeypatch):
    """On CUDA the default groups the batches (:func:`recovery.bn_group`); its statistics equal
    one forward pass per batch on CUDA and on CPU to float tolerance (no TF32 in the convs)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    batches = list(recovery.training_batches(train_set, batch_size=32, n=20, seed=6))
    assert recovery.groups_by_default("cuda")
    runs = {}
    for device, group in (("cpu", None), ("cuda", 1), ("cuda", None)):
        model = bn_net()
        assert recovery.reestimate_bn(model, iter(batches), device=device, group=group) == (3, 20)
        assert next(model.parameters()).device.type == device
        runs[device, group] = recovery.batchnorm_layers(model)
    for key in (("cuda", 1), ("cuda", None)):
        for a, b in zip(runs[key], runs["cpu", None]):
            torch.testing.assert_close(a.running_mean.cpu(), b.running_mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(a.running_var.cpu(), b.running_var, rtol=1e-4, atol=1e-5)
            assert int(a.num_batches_tracked) == 20


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_reestimation_on_cuda_never_waits_for_the_device(train_set, monkeypatch):
    """Preparing the training batches of in-memory images on the device and the grouped
    re-estimation run without a synchronising call (``torch.cuda.set_sync_debug_mode("error")``
    raises on one), once the dataset's device copy exists; the statistics are the CPU's to
    float tolerance (no TF32 in the convs: with it, an H200 differed by 8.6e-5 in a mean)."""
    from wavesweep.data import TensorImages

    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

    g = torch.Generator().manual_seed(2)
    ds = TensorImages(torch.randint(0, 256, (400, 1, 8, 8), generator=g, dtype=torch.uint8),
                      torch.randint(0, 4, (400,), generator=g), divisor=255.0, mean=(0.4,), std=(0.3,))  # fmt: skip
    model = bn_net().cuda()
    recovery.reestimate_bn(model, recovery.training_batches(ds, batch_size=32, n=3, device="cuda"), device="cuda")
    torch.cuda.synchronize()
    prev = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layers, used = recovery.reestimate_bn(
            model, recovery.training_batches(ds, batch_size=32, n=20, seed=1, device="cuda"), device="cuda"
        )
    finally:
        torch.cuda.set_sync_debug_mode(prev)
    assert (layers, used) == (3, 20)
    ref = bn_net()
    recovery.reestimate_bn(ref, recovery.training_batches(ds, batch_size=32, n=20, seed=1), group=1)
    for a, b in zip(recovery.batchnorm_layers(model), recovery.batchnorm_layers(ref)):
        torch.testing.assert_close(a.running_mean.cpu(), b.running_mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(a.running_var.cpu(), b.running_var, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_finetune_on_the_cpu_of_a_record_made_on_cuda(train_set):
    """Pruned on CUDA (records left there), fine-tuned on the CPU: the records come over intact
    (a blocking copy: a non-blocking one to the host could be read before it lands), the masks
    stay exact, and the result is the all-CPU run's to float tolerance."""
    pytest.importorskip("wavesweep.wavelets_torch")
    settings = recovery.RecoverySettings("finetune", batches=2, steps=4, batch_size=32, lr=1e-2, optimizer="sgd")
    out = {}
    for device in ("cpu", "cuda"):
        base = bn_net()
        base[6].p = 0.0
        dwt = _dwt_result(base.to(device), wavelet="bior2.2")
        mag = pruning.prune_matched(base, dwt, targets=("conv", "linear"))["magnitude"]
        if device == "cuda":
            assert dwt.layers[0].device_record("coeffs").is_cuda and mag.layers[0].device_record("keep").is_cuda
        for res in (dwt, mag):
            recovery.recover(res, train_set, settings, device="cpu")
        out[device] = (dwt, mag)
    for m in (0, 1):
        for a, b in zip(out["cpu"][m].layers, out["cuda"][m].layers):
            assert np.array_equal(a.keep, b.keep)
            if m == 0:
                np.testing.assert_allclose(b.coeffs, a.coeffs, rtol=1e-3, atol=1e-4)
                assert np.all(b.coeffs[~b.keep] == 0)
        sd_cpu, sd_cuda = out["cpu"][m].model.state_dict(), out["cuda"][m].model.state_dict()
        for k in sd_cpu:
            torch.testing.assert_close(sd_cuda[k].cpu(), sd_cpu[k], rtol=1e-3, atol=1e-4, msg=k)


# --------------------------------------------------------------------------- file datasets, worker processes


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """An imagefolder root: train/ and val/, 3 classes of 40x36 JPEGs and PNGs (7 a class)."""
    from tests.test_data import make_image_folder

    root = tmp_path_factory.mktemp("imagefolder")
    for split in ("train", "val"):
        make_image_folder(root / split, ["a", "b", "c"], per_class=7)
    return root


def _imagefolder_train(root):
    """The training split (RandomHorizontalFlip, then the eval transform) at 16 px."""
    from wavesweep.data import load_dataset

    return load_dataset("imagefolder", root=root, image_size=16).train


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_file_batches_with_random_transforms_are_the_same_for_any_worker_count(image_folder):
    """imagefolder's training flips drew from torch's global generator in the main process, and from
    each worker's own (seeded by its worker id) in workers: batches depended on the worker count,
    and two calls differed unless the caller reseeded. Seeded per position, they are one stream."""
    from wavesweep.data import close_loaders

    ds = _imagefolder_train(image_folder)
    try:
        runs = [list(recovery.training_batches(ds, batch_size=4, n=8, seed=3, num_workers=w)) for w in (0, 2, 0, 2, 1)]
    finally:
        close_loaders(ds)
    assert len(runs[0]) == 8 and all(x.shape == (4, 3, 16, 16) for x, _ in runs[0])  # 21 = 5 * 4 + 1: full batches only
    for other in runs[1:]:
        assert _same(runs[0], other)
    other_seed = list(recovery.training_batches(ds, batch_size=4, n=8, seed=4, num_workers=0))
    assert not _same(runs[0], other_seed)


def test_file_batches_are_the_examples_flipped_by_a_draw_seeded_per_position(image_folder):
    """Oracle: the index stream drawn by hand, each image read with PIL and flipped where a
    generator seeded with ``item_seed(seed, position)`` draws below 0.5 (RandomHorizontalFlip's
    one draw), then the split's eval transform. Also a prefix: n batches are the first n of more."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    from wavesweep.data import close_loaders, item_seed

    ds = _imagefolder_train(image_folder)
    flip_tf, eval_tf = ds.transform.transforms
    seed, bs, n = 7, 5, 6
    try:
        got = list(recovery.training_batches(ds, batch_size=bs, n=n, seed=seed, num_workers=2))
        prefix = list(recovery.training_batches(ds, batch_size=bs, n=n - 2, seed=seed, num_workers=2))
    finally:
        close_loaders(ds)
    assert _same(prefix, got[: n - 2])
    flips = 0
    for b, ((x, y), idx) in enumerate(zip(got, _index_stream(len(ds), bs, seed, n))):
        for j, i in enumerate(idx.tolist()):
            path, label = ds.samples[i]
            with open(path, "rb") as fh:
                img = Image.open(fh).convert("RGB")
            g = torch.Generator().manual_seed(item_seed(seed, b * bs + j))
            flip = bool(torch.rand(1, generator=g) < flip_tf.p)
            flips += flip
            assert torch.equal(x[j], eval_tf(TF.hflip(img) if flip else img)), (b, j)
            assert int(y[j]) == label
    assert 0 < flips < n * bs  # both kinds of example were checked


def test_file_batches_leave_the_callers_random_state_alone(image_folder):
    import random

    from wavesweep.data import close_loaders

    ds = _imagefolder_train(image_folder)
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    states = torch.random.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    try:
        list(recovery.training_batches(ds, batch_size=4, n=3, seed=0, num_workers=0))
    finally:
        close_loaders(ds)
    assert torch.equal(torch.random.get_rng_state(), states[0])
    assert random.getstate() == states[1] and np.array_equal(np.random.get_state()[1], states[2])


def rgb_bn_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 3),
    ).eval()  # fmt: skip


@pytest.mark.parametrize("rec", ["bn", "finetune"])
def test_recovery_on_an_imagefolder_is_the_same_with_0_and_2_workers(image_folder, rec, monkeypatch, decoding_processes):
    """``recover`` decoded every training image in the main process (its loader had no workers);
    now in ``data.default_num_workers()`` worker processes, with the same BatchNorm statistics (and
    fine-tuned weights) for 0 and 2 of them, and for every method of a trial from one set of workers."""
    import os

    from wavesweep import data

    settings = recovery.RecoverySettings(rec, batches=5, steps=3, batch_size=4, lr=1e-2)
    out = {}
    for workers in (0, 2):
        monkeypatch.setattr(data, "default_num_workers", lambda w=workers: w)
        ds = _imagefolder_train(image_folder)
        base = rgb_bn_net()
        dwt = _dwt_result(base)
        results = {"dwt": dwt, **pruning.prune_matched(base, dwt, targets=("conv", "linear"))}
        try:
            for m, r in results.items():
                recovery.recover(r, ds, settings)
                out[workers, m] = r.model.state_dict()
            loaders = ds.__dict__.get(data._LOADERS_ATTR, {})
            assert len(loaders) == 1  # one loader, its workers kept, for the three methods
        finally:
            data.close_loaders(ds)
    workers_seen = {pid for pid, split in decoding_processes() if split == "train" and pid != os.getpid()}
    assert workers_seen, "no training image was decoded in a worker process"
    for m in ("dwt", "magnitude", "random"):
        a, b = out[0, m], out[2, m]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), m
        assert not torch.equal(a["1.running_mean"], torch.zeros(8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_file_batches_for_cuda_are_pinned_and_the_same_as_for_cpu(image_folder):
    from wavesweep.data import close_loaders

    ds = _imagefolder_train(image_folder)
    try:
        cpu = list(recovery.training_batches(ds, batch_size=4, n=4, seed=1, num_workers=2))
        cuda = list(recovery.training_batches(ds, batch_size=4, n=4, seed=1, num_workers=2, device="cuda"))
    finally:
        close_loaders(ds)
    assert all(x.is_pinned() and x.device.type == "cpu" for x, _ in cuda)
    assert _same(cpu, cuda)
