"""The baselines dwt is compared with, at its budget: magnitude and random pruning of the
target layers' weights, and the one budget-matching step (:func:`matched_amount`,
:func:`prune_matched`). Public through :mod:`wavesweep.pruning`, whose docstring states the
conventions (fractions, counts, ties, +0.0) these functions keep.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping

import numpy as np
import torch
from torch import nn

from wavesweep import wavelets as wv

#: the seeds torch.Generator.manual_seed takes
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_seed(seed: object, hint: str = "") -> int:
    """``seed`` as an int, or a one-line ValueError: not an int (a bool is none), or outside the
    range torch's generator takes (its own message, "Overflow when unpacking long long", named no seed)."""
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not SEED_RANGE[0] <= int(seed) <= SEED_RANGE[1]:
        raise ValueError(f"seed must be an int in -2**63..2**64-1{hint}, got {seed!r}")
    return int(seed)
from wavesweep.names import check_choice
from wavesweep.prune_record import (
    SCOPES,
    LayerPrune,
    PruneResult,
    check_finite_targets,
    defer_host_copy,
    normalise_targets,
    numpy_batched,
    target_layers,
    weight_numpy,
    work_model,
    zero_weight,
)

#: where magnitude/random select their weights: ``"numpy"`` (O(n) partition on CPU), ``"torch"``
#: (one stable sort on the weights' device), ``"auto"`` (torch on an accelerator, numpy on CPU)
BACKENDS: tuple[str, ...] = ("auto", "numpy", "torch")


def _smallest(values: np.ndarray, k: int, generator: torch.Generator | None = None) -> np.ndarray:
    """Bool mask of the ``k`` smallest entries of 1-D ``values``, exactly ``k`` of them.

    O(n) selection (``np.partition``). Entries tied at the k-th value: the lowest-indexed
    ones are selected, or, with ``generator``, a uniformly random subset of them.
    """
    n = values.size
    sel = np.zeros(n, dtype=bool)
    if k <= 0:
        return sel
    if k >= n:
        sel[:] = True
        return sel
    kth = np.partition(values, k - 1)[k - 1]
    np.less_equal(values, kth, out=sel)
    extra = int(np.count_nonzero(sel)) - k  # > 0 only when several entries tie at kth
    if extra > 0:
        tied = np.flatnonzero(values == kth)
        if generator is None:
            sel[tied[len(tied) - extra :]] = False  # keep the lowest-indexed tied entries selected
        else:
            sel[tied[torch.randperm(len(tied), generator=generator)[:extra].numpy()]] = False
    return sel


def _smallest_torch(values: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`_smallest` in torch on ``values``' device: the same mask, bit for bit, for the
    scores the methods use (|w| and uniform keys: no NaN, no -0.0, whose order against +0.0
    sorts may treat differently).

    One stable sort: its first ``k`` indices are the entries ordered by (value, index), i.e.
    everything below the k-th value plus the lowest-indexed ties at it (no host sync). With
    ``generator`` the ties at the k-th value are instead resolved exactly as :func:`_smallest`
    does, by the same ``torch.randperm`` draw from the same CPU generator (one host sync, to
    count the ties), so a seed gives the same random mask on every device.
    """
    return _smallest_torch_layers([values], [k], generator)[0]


def _smallest_torch_layers(
    values: list[torch.Tensor], ks: list[int], generator: torch.Generator | None = None
) -> list[torch.Tensor]:
    """:func:`_smallest_torch` of every ``(values[i], ks[i])``, in that order. With ``generator``
    every layer's tie count comes to the host in one transfer (one sync for all the layers, not
    one each); the layers with ties at their k-th value then draw their ``torch.randperm`` in
    layer order, as the calls one by one would: the same draws, the same masks. Finding a tied
    layer's tied entries is one more sync for that layer (uniform float32 keys: rare, likelier
    the larger the layer)."""
    sels: list[torch.Tensor] = []
    kth: list[torch.Tensor | None] = []  # each layer's k-th value where its ties need counting
    for v, k in zip(values, ks):
        n = v.numel()
        sel = torch.zeros(n, dtype=torch.bool, device=v.device)
        sels.append(sel)
        kth.append(None)
        if k <= 0:
            continue
        if k >= n:
            sel.fill_(True)
            continue
        sorted_vals, order = torch.sort(v, stable=True)
        if generator is None:
            sel.index_fill_(0, order[:k], True)
        else:
            kth[-1] = sorted_vals[k - 1].clone()  # not a view: the sorted copy is freed now
            torch.le(v, kth[-1], out=sel)
    counted = [i for i, t in enumerate(kth) if t is not None]
    if not counted:
        return sels
    counts = torch.stack([sels[i].sum().to(sels[counted[0]].device) for i in counted]).tolist()  # the one sync
    for i, c in zip(counted, counts):
        extra = int(c) - ks[i]  # > 0 only when several entries tie at the k-th value
        if extra > 0:
            tied = torch.nonzero(values[i] == kth[i]).reshape(-1)  # ascending, as np.flatnonzero (a sync)
            drop = torch.randperm(len(tied), generator=generator)[:extra]
            sels[i][tied[drop.to(tied.device, non_blocking=True)]] = False
    return sels


def _float(t: torch.Tensor) -> torch.Tensor:
    """float32 for dtypes :func:`weight_numpy` also widens (half, bfloat16): the same scores."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _check_fraction(what: str, a: object) -> float:
    if not wv.is_real(a) or not (0.0 <= float(a) <= 1.0):
        raise ValueError(f"{what} must be a fraction in [0, 1], got {a!r}")
    return float(a)


def _amounts(
    amount: float | Mapping[str, float], scope: str, names: list[str]
) -> tuple[float | None, dict[str, float] | None]:
    """Normalise ``amount``: ``(global fraction, None)`` or ``(None, per-layer fractions)``."""
    check_choice("scope", scope, SCOPES)
    if isinstance(amount, Mapping):
        if scope == "global":
            raise ValueError("scope='global' needs one fraction, not a dict of per-layer fractions")
        unknown = [k for k in amount if k not in names]
        if unknown:
            raise ValueError(f"amount names unknown layer {unknown[0]!r}; target layers: {', '.join(names)}")
        missing = [n for n in names if n not in amount]
        if missing:
            raise ValueError(f"amount has no fraction for target layer {missing[0]!r}")
        return None, {n: _check_fraction(f"amount[{n!r}]", amount[n]) for n in names}
    a = _check_fraction("amount", amount)
    if scope == "global":
        return a, None
    return None, {n: a for n in names}


def _prune_by_scores(
    model: nn.Module,
    amount: float | Mapping[str, float],
    scope: str,
    targets: tuple[str, ...],
    inplace: bool,
    scores,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    finite_checked: bool = False,
) -> tuple[nn.Module, list[LayerPrune]]:
    """Zero the lowest-scoring weights. ``scores(list of (name, module), on_device) -> list of
    flat scores``: NumPy arrays, or with ``on_device`` torch tensors on the weights' device.

    The numpy path selects on CPU (:func:`_smallest`); the torch path (``backend``, see
    :data:`BACKENDS`) selects on the weights' device (:func:`_smallest_torch`, the same masks)
    and leaves the masks there (:func:`~wavesweep.prune_record.defer_host_copy`: one transfer
    for every layer when the checkpoint first reads them). ``finite_checked``: ``model``'s target
    weights were found finite just before (:func:`prune_matched`), not checked again (on a GPU a sync).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_choice("pruning backend", backend, BACKENDS)
    found = target_layers(model, targets)  # validate before copying the model
    if not finite_checked:
        check_finite_targets(found)
    names = [n for n, _ in found]
    global_amount, per_layer = _amounts(amount, scope, names)
    work = work_model(model, inplace)
    layers = target_layers(work, targets)
    on_device = backend == "torch" or (backend == "auto" and any(m.weight.device.type != "cpu" for _, m in layers))
    s = scores(layers, on_device)
    sizes = [int(x.numel() if on_device else x.size) for x in s]
    if on_device:
        zeroed = None
        if global_amount is not None:
            dev = s[0].device
            masks = torch.split(_smallest_torch(torch.cat([x.to(dev) for x in s]), round(global_amount * sum(sizes)), generator), sizes)
        else:
            ks = [round(per_layer[n] * x.numel()) for x, n in zip(s, names)]
            masks = _smallest_torch_layers(s, ks, generator)
            # a layer's mask holds exactly its k (clamped to [0, n]) dropped weights (_smallest's
            # contract, ties included): the counts are known here, with no copy from the device
            zeroed = [min(max(k, 0), n) for k, n in zip(ks, sizes)]
        with torch.no_grad():
            for (_, m), mask in zip(layers, masks):
                w = m.weight
                w.masked_fill_(mask.to(w.device).reshape(w.shape), 0)  # +0.0; no sync to skip empty masks
        if zeroed is None:
            # one global selection: each layer's share of it in one transfer; the masks stay on the
            # device until the checkpoint reads them (defer_host_copy below: one copy for every layer)
            zeroed = numpy_batched([torch.stack([mask.sum().to(masks[0].device) for mask in masks])])[0].tolist()
    else:
        if global_amount is not None:
            prunes = np.split(_smallest(np.concatenate(s), round(global_amount * sum(sizes)), generator), np.cumsum(sizes)[:-1])
        else:
            prunes = [_smallest(x, round(per_layer[n] * x.size), generator) for x, n in zip(s, names)]
        for (_, m), prune in zip(layers, prunes):
            if prune.any():
                zero_weight(m, prune)
        zeroed = [int(np.count_nonzero(prune)) for prune in prunes]
    out = []
    for i, ((name, m), n_zeroed) in enumerate(zip(layers, zeroed)):
        n = int(m.weight.numel())
        out.append(
            LayerPrune(
                name=name,
                shape=tuple(m.weight.shape),
                params=n,
                n_positions=n,
                n_zeroed=int(n_zeroed),
                keep=None if on_device else ~prunes[i],
            )
        )
    if on_device:
        defer_host_copy(out, [{"keep": ~mask.reshape(-1)} for mask in masks])
    return work, out


def prune_magnitude(
    model: nn.Module,
    amount: float | Mapping[str, float],
    *,
    scope: str = "layer",
    targets: Iterable[str] | str = ("conv",),
    inplace: bool = False,
    backend: str = "auto",
) -> PruneResult:
    """Zero the smallest-|w| weights of the target layers.

    ``amount``: a fraction in [0, 1] for every layer (``scope="layer"``), one fraction of all
    target weights under one global threshold (``scope="global"``), or a dict
    ``{layer name: fraction}`` covering every target layer. Counts: ``round(fraction * n)``.
    Masks equal ``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured`` up to ties.
    ``backend`` (:data:`BACKENDS`): where the weights are selected; every backend gives the same
    masks (tested), ``"auto"`` selects on the weights' own device.
    """
    return _prune_magnitude(model, amount, scope=scope, targets=targets, inplace=inplace, backend=backend)


def _prune_magnitude(model, amount, *, scope, targets, inplace, backend, finite_checked=False) -> PruneResult:
    """:func:`prune_magnitude`; ``finite_checked``: as :func:`_prune_by_scores`'s."""
    targets = normalise_targets(targets)

    def scores(layers, on_device):
        if on_device:
            return [_float(m.weight.detach().abs()).reshape(-1) for _, m in layers]
        return [weight_numpy(m.weight.detach().abs()).reshape(-1) for _, m in layers]

    work, out = _prune_by_scores(model, amount, scope, targets, inplace, scores, backend=backend, finite_checked=finite_checked)
    config = dict(amount=_config_amount(amount), scope=scope, seed=None, targets=list(targets))
    return PruneResult("magnitude", work, out, config, [])


def prune_random(
    model: nn.Module,
    amount: float | Mapping[str, float],
    *,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    scope: str = "layer",
    targets: Iterable[str] | str = ("conv",),
    inplace: bool = False,
    backend: str = "auto",
    keys: RandomKeys | None = None,
) -> PruneResult:
    """Zero uniformly chosen weights of the target layers: same counts as :func:`prune_magnitude`.

    Randomness comes only from ``generator`` (a CPU ``torch.Generator``) or, if none is given,
    ``torch.Generator().manual_seed(seed)``: the same seed gives the same masks. Each layer
    (or, for ``scope="global"``, all target weights at once) draws i.i.d. keys
    ``torch.rand(n, generator=...)`` in ``target_layers`` order and the ``k`` smallest keys are
    zeroed, keys tied at the k-th value resolved by a random permutation from the same
    generator: a uniformly random ``k``-subset (the keys are exchangeable and so is the
    tie-break). The keys always come from that CPU generator, so ``backend``
    (:data:`BACKENDS`) changes where they are selected, never which weights are zeroed.
    ``keys``: the same draws made ahead (:class:`RandomKeys`, which holds the seed and the
    generator; ``seed`` and ``generator`` are then not used): the same masks.
    """
    return _prune_random(model, amount, seed=seed, generator=generator, scope=scope, targets=targets, inplace=inplace,
                         backend=backend, keys=keys)


def _prune_random(model, amount, *, seed, generator, scope, targets, inplace, backend, keys, finite_checked=False) -> PruneResult:
    """:func:`prune_random`; ``finite_checked``: as :func:`_prune_by_scores`'s."""
    targets = normalise_targets(targets)
    if keys is not None:
        if generator is not None:
            raise ValueError("pass either keys= or generator=, not both")
        # its generator: the tie-breaks draw from it after the keys (taken, so drawn, by then)
        generator, seed_logged = keys.generator, keys.seed
    elif generator is None:
        generator = torch.Generator(device="cpu").manual_seed(check_seed(seed, " (or pass generator=)"))
        seed_logged: int | None = int(seed)
    else:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        seed_logged = None  # state of a caller-owned generator; the caller logs its seed

    def scores(layers, on_device):
        sizes = [m.weight.numel() for _, m in layers]
        joint = scope == "global" and not isinstance(amount, Mapping)
        # every key in one buffer: drawn ahead on a thread (keys=), or now
        flat = keys.take(sizes, joint) if keys is not None else _draw_keys(generator, sizes, joint)
        if not on_device:
            return [k.numpy() for k in torch.split(flat, sizes)]
        # drawn on CPU (the same keys on every device), selected where the weights are
        devices = {m.weight.device for _, m in layers}
        if len(devices) == 1:  # one host-to-device copy for every layer's keys, without a sync
            return list(torch.split(flat.to(devices.pop(), non_blocking=True), sizes))
        return [k.to(m.weight.device) for k, (_, m) in zip(torch.split(flat, sizes), layers)]

    work, out = _prune_by_scores(model, amount, scope, targets, inplace, scores, generator, backend, finite_checked)
    config = dict(amount=_config_amount(amount), scope=scope, seed=seed_logged, targets=list(targets))
    return PruneResult("random", work, out, config, [])


def _draw_keys(generator: torch.Generator, sizes: list[int], joint: bool, pin: bool = False) -> torch.Tensor:
    """Random pruning's keys for layers of ``sizes``, in one flat float32 buffer (pinned where
    ``pin``): ``torch.rand(n, generator=generator)`` per layer in order, or one draw of the total
    where ``joint`` (the values of those draws, written in place)."""
    buf = torch.empty(sum(sizes), pin_memory=pin)
    if joint:
        torch.rand(buf.numel(), generator=generator, out=buf)
    else:
        for part in torch.split(buf, sizes):
            torch.rand(part.numel(), generator=generator, out=part)
    return buf


class RandomKeys:
    """Random pruning's keys drawn ahead, on a thread: exactly the draws :func:`prune_random`
    makes from ``torch.Generator().manual_seed(seed)`` for target layers of ``sizes`` (one draw of
    their total where ``joint``: ``scope="global"`` with one fraction; else one per layer, in
    order), written into one host buffer, pinned where ``pin`` (a CUDA trial: its copy to the
    device is then asynchronous, and one copy for all the layers needs no concatenation).

    A trial starts it once its base model is loaded (the keys depend on nothing else) and hands it
    to :func:`prune_matched`: the draws (ResNet-18: 11.2 M keys, 70 ms on the H200's host, every
    random key from the one seeded CPU generator so that a seed gives the same masks on every
    device) then overlap the base evaluation and dwt's pruning instead of following them.
    ``aten::uniform_`` releases the GIL. :attr:`generator` is the one they came from (the random
    tie-breaks draw from it after them, as without this)."""

    def __init__(self, seed: int, sizes: list[int], *, joint: bool, pin: bool = False) -> None:
        check_seed(seed)
        self.seed, self.sizes, self.joint = int(seed), [int(n) for n in sizes], bool(joint)
        self.generator = torch.Generator(device="cpu").manual_seed(self.seed)  # the thread's until take()
        self._buffer: torch.Tensor | None = None
        self._pin = pin
        self._error: BaseException | None = None
        self._taken = False
        self._thread = threading.Thread(target=self._draw, name="wavesweep-random-keys", daemon=True)
        self._thread.start()

    def _draw(self) -> None:
        try:
            self._buffer = _draw_keys(self.generator, self.sizes, self.joint, pin=self._pin)
        except BaseException as exc:  # raised where the keys are taken, not lost in the thread
            self._error = exc

    def take(self, sizes: list[int], joint: bool) -> torch.Tensor:
        """Every key in one flat buffer, once drawn (:attr:`generator` is then past them); a
        ValueError when they were drawn for other layers or another scope. Once: the tie-breaks of
        the pruning that took them draw from :attr:`generator`, so a second pruning with the same
        keys would break its ties from another state than ``prune_random(seed=...)`` (other masks
        where keys tie); a second take is a RuntimeError."""
        self._thread.join()
        if self._error is not None:
            raise self._error
        if self._taken:
            raise RuntimeError(f"random keys of seed {self.seed} were taken by a pruning already; draw them "
                               f"again (RandomKeys({self.seed}, ...)) for another")
        if [int(n) for n in sizes] != self.sizes or bool(joint) != self.joint:
            raise ValueError(f"random keys drawn for {len(self.sizes)} layers of {sum(self.sizes)} weights "
                             f"(joint={self.joint}) cannot prune {len(sizes)} layers of {sum(sizes)} (joint={joint})")
        assert self._buffer is not None
        self._taken = True
        return self._buffer


def _config_amount(amount):
    return {k: float(v) for k, v in amount.items()} if isinstance(amount, Mapping) else float(amount)


# --------------------------------------------------------------------------- matching


def matched_amount(dwt_result: PruneResult, scope: str = "layer") -> float | dict[str, float]:
    """The budget of a dwt result as magnitude/random ``amount``.

    ``scope="layer"``: ``{name: matched fraction}`` of each dwt layer (dropped coefficients /
    coefficients); ``scope="global"``: the same over all layers. Positions that are zero whatever
    the weights (:func:`wavesweep.wavelets.structural_zeros`) are left out of both counts: they
    hold nothing dwt could prune, and counting them would have magnitude and random prune a larger
    share of the weights than dwt dropped of its coefficients.
    """
    check_choice("scope", scope, SCOPES)
    if dwt_result.method != "dwt":
        raise ValueError(f"matched_amount needs a dwt result, got method {dwt_result.method!r}")
    if scope == "layer":
        return {lp.name: lp.matched_fraction for lp in dwt_result.layers}
    return dwt_result.matched_fraction


def prune_matched(
    model: nn.Module,
    dwt_result: PruneResult,
    *,
    scope: str = "layer",
    seed: int = 0,
    targets: Iterable[str] | str | None = None,
    inplace: bool = False,
    backend: str = "auto",
    keys: RandomKeys | None = None,
    finite_checked: bool = False,
) -> dict[str, PruneResult]:
    """Magnitude and random pruning of ``model`` at the budget of ``dwt_result``.

    The one shared budget-matching step: ``amount = matched_amount(dwt_result, scope)``.
    ``targets`` defaults to the dwt result's targets. With ``inplace=True`` only the random
    model is ``model`` itself (the magnitude model is always a copy, so both start from the
    same weights). ``keys``: random's keys drawn ahead (:class:`RandomKeys`, for ``seed``: the
    same masks). ``finite_checked``: the caller has just found these target layers' weights of
    ``model`` finite and not changed them since (a trial: :func:`~wavesweep.pruning.prune_dwt` of
    the same model); they are then not checked for NaN and infinities again (on a GPU, a host
    sync). Otherwise they are checked once, for both. Returns ``{"magnitude": ..., "random": ...}``.
    """
    if keys is not None and keys.seed != seed:
        raise ValueError(f"random keys drawn for seed {keys.seed}, not {seed}")
    if targets is None:
        targets = dwt_result.config.get("targets", ("conv",))
    names = [name for name, _m in target_layers(model, normalise_targets(targets))]
    pruned = [lp.name for lp in dwt_result.layers]
    if names != pruned:  # the budget is dwt's over its layers: on other layers it matches nothing
        raise ValueError(f"targets {targets!r} select {len(names)} layer(s) of model ({', '.join(names[:3])}"
                         f"{', ...' if len(names) > 3 else ''}); dwt pruned {len(pruned)} ({', '.join(pruned[:3])}"
                         f"{', ...' if len(pruned) > 3 else ''}): the baselines prune the layers dwt pruned")  # fmt: skip
    amount = matched_amount(dwt_result, scope)
    magnitude = _prune_magnitude(model, amount, scope=scope, targets=targets, inplace=False, backend=backend,
                                 finite_checked=finite_checked)
    # magnitude pruned a copy of ``model`` after finding its target weights finite: random's
    # pruning of the same weights does not look again (on a GPU, one host sync fewer)
    random = _prune_random(model, amount, seed=seed, generator=None, scope=scope, targets=targets, inplace=inplace,
                           backend=backend, keys=keys, finite_checked=True)
    return {"magnitude": magnitude, "random": random}
