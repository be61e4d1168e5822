"""The record of a pruning and the steps every method shares: :class:`LayerPrune` (one target
layer) and :class:`PruneResult` (a pruned model and its layers), the target layers a method
runs over (:func:`target_layers`), and reading, writing and zeroing a layer's weight.

:mod:`wavesweep.pruning` (dwt, and the public names of all three methods) and
:mod:`wavesweep.baselines` (magnitude and random at a matched budget) build on it.
"""

from __future__ import annotations

import copy
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from wavesweep import wavelets as wv
from wavesweep.names import check_choice

SCOPES: tuple[str, ...] = ("layer", "global")
TARGETS: dict[str, type[nn.Module]] = {"conv": nn.Conv2d, "linear": nn.Linear}


@dataclass
class LayerPrune:
    """What pruning did to one target layer's ``weight``.

    ``n_positions``: the positions the mask runs over: coefficients (dwt) or weights
    (magnitude/random); what is stored is one bitmap bit per position plus the kept values.
    ``n_zeroed``: zeroed coefficients (dwt) or zeroed weights (magnitude/random).
    ``keep``: flat bool mask over those positions (True = kept, stored); C order of the
    weight, or the coefficient order of :mod:`wavesweep.wavelets` for dwt.
    ``coeffs``: dwt only, the thresholded flat coefficients (zeros where dropped).
    ``structure``: dwt only, what :func:`wavesweep.wavelets.reconstruct` needs.
    ``n_structural``: dwt only, positions that are zero whatever the weights
    (:func:`wavesweep.wavelets.structural_zeros`); ``n_structural_zeroed`` of them were dropped
    (all, unless the threshold is 0). They are not pruning: :attr:`matched_fraction` leaves them out.
    """

    name: str
    shape: tuple[int, ...]
    params: int
    n_positions: int
    n_zeroed: int
    level_requested: int | None = None
    level_effective: int | None = None
    keep: np.ndarray | None = field(default=None, repr=False, compare=False)
    coeffs: np.ndarray | None = field(default=None, repr=False, compare=False)
    structure: wv.CoeffStructure | None = field(default=None, repr=False, compare=False)
    n_structural: int = 0
    n_structural_zeroed: int = 0

    def tensor(self, what: str, device: torch.device | str) -> torch.Tensor | None:
        """``keep`` or ``coeffs`` (``what``) as a flat torch tensor on ``device``, without a round
        trip through the host where the record still lives on that device (:func:`defer_host_copy`);
        else a copy (to a device: non-blocking; to the host: blocking, as a non-blocking copy to the
        host may be read before it lands). Where nothing moves it is the record itself, or a view
        of the host array: read it, do not change it. None where absent."""
        dev = torch.device(device)
        t = self.device_record(what)
        if t is not None:
            return t.to(dev, non_blocking=dev.type != "cpu")
        a = getattr(self, what)
        if a is None:
            return None
        a = np.asarray(a, dtype=bool) if what == "keep" else np.ascontiguousarray(a)
        return torch.from_numpy(a.reshape(-1)).to(dev, non_blocking=True)

    @property
    def has_coeffs(self) -> bool:
        """Whether the record holds coefficients (dwt); no copy to the host."""
        return self.__dict__.get("_coeffs") is not None

    @property
    def coeff_itemsize(self) -> int | None:
        """Bytes per stored coefficient (dwt), None without coefficients; no copy to the host."""
        t = self.device_record("coeffs")
        if t is not None:
            return t.element_size()
        return None if self.coeffs is None else int(self.coeffs.dtype.itemsize)

    def __getstate__(self) -> dict:
        """Pickled and copied with its record on the host (a deferred record is fetched first)."""
        for what in ("keep", "coeffs"):
            getattr(self, what)
        return {k: v for k, v in self.__dict__.items() if k != "_host_group"}

    def device_record(self, what: str) -> torch.Tensor | None:
        """``keep`` or ``coeffs`` as the flat tensor it is while it waits on its device for its
        copy to the host (:func:`defer_host_copy`); None where it is a host array (or absent)."""
        v = self.__dict__.get("_" + what)
        return v if isinstance(v, torch.Tensor) else None

    @property
    def fraction(self) -> float:
        """``n_zeroed / n_positions`` (0.0 for an empty layer): the share of zeros in what is stored."""
        return self.n_zeroed / self.n_positions if self.n_positions else 0.0

    @property
    def matched_fraction(self) -> float:
        """The share of the positions that carry the weights which pruning dropped: structural
        zeros left out of both counts. The budget the baselines are matched to, and the pruned
        fraction; equal to :attr:`fraction` where there are none (every layout and wavelet but
        the two-tap highpass filters on odd lengths)."""
        n = self.n_positions - self.n_structural
        return (self.n_zeroed - self.n_structural_zeroed) / n if n else 0.0

    @property
    def key(self) -> str:
        """State-dict key of the pruned tensor."""
        return f"{self.name}.weight" if self.name else "weight"


def _record_property(what: str) -> property:
    """``LayerPrune.keep`` / ``.coeffs``: a host NumPy array. A record left on the device by
    :func:`defer_host_copy` comes to the host on first use, every deferred tensor of its group
    in one transfer per dtype (:func:`numpy_batched`). A CPU tensor set here becomes an array."""
    slot = "_" + what

    def get(self):
        v = self.__dict__.get(slot)
        if isinstance(v, torch.Tensor):
            group = self.__dict__.get("_host_group")
            if group is not None:
                group.fetch()
            if isinstance(self.__dict__[slot], torch.Tensor):  # not in its group (a copy): alone
                _fetch([self])
            v = self.__dict__[slot]
        return v

    def set(self, value):
        if isinstance(value, torch.Tensor):
            if not stays_on_device(value):
                value = numpy_batched([value])[0]
            else:  # a device tensor set on its own: a group of its own
                self.__dict__[slot] = value.detach().reshape(-1)
                _HostGroup([self])
                return
        self.__dict__[slot] = value

    return property(get, set, doc=get.__doc__)


LayerPrune.keep = _record_property("keep")  # type: ignore[assignment]
LayerPrune.coeffs = _record_property("coeffs")  # type: ignore[assignment]


_FETCH_LOCK = threading.Lock()  # two threads reading one record: one transfer, never a half-fetched group


def _fetch(layers: list[LayerPrune]) -> None:
    """Every deferred record of ``layers`` to the host: one transfer per dtype and device."""
    with _FETCH_LOCK:
        slots = [(lp, s) for lp in layers for s in ("_keep", "_coeffs") if isinstance(lp.__dict__.get(s), torch.Tensor)]
        for (lp, s), a in zip(slots, numpy_batched([lp.__dict__[s] for lp, s in slots])):
            lp.__dict__[s] = a
        for lp in layers:
            lp.__dict__.pop("_host_group", None)


class _HostGroup:
    """Layers whose device records come to the host together, on the first use of any of them.
    It holds them weakly (each layer holds its group): a dropped result frees its device records
    at once, not at the next garbage collection."""

    def __init__(self, layers: list[LayerPrune]) -> None:
        self._layers = [weakref.ref(lp) for lp in layers]
        for lp in layers:
            lp.__dict__["_host_group"] = self

    def fetch(self) -> None:
        _fetch([lp for lp in (r() for r in self._layers) if lp is not None])


def stays_on_device(t: torch.Tensor) -> bool:
    """Whether a record tensor waits on its device for its copy to the host: everywhere but the
    CPU, where the copy costs no transfer (tests set this to exercise the deferred path on CPU)."""
    return t.device.type != "cpu"


def defer_host_copy(layers: list[LayerPrune], records: list[dict[str, torch.Tensor]]) -> None:
    """Give each layer its record (``{"keep": ..., "coeffs": ...}``, device tensors) without copying
    it to the host now: the copy (one transfer per dtype for all ``layers``) happens when a
    consumer first reads ``keep`` or ``coeffs`` as NumPy (the checkpoint); fine-tuning reads
    them on the device (:meth:`LayerPrune.tensor`), and a trial that writes no checkpoint never
    copies them. CPU tensors become arrays at once."""
    for lp, rec in zip(layers, records):
        for what, t in rec.items():
            if not stays_on_device(t):
                setattr(lp, what, t)
            else:
                lp.__dict__["_" + what] = t.detach().reshape(-1)
    _HostGroup(layers)


@dataclass
class PruneResult:
    """A pruned model and the per-layer record of how it was pruned."""

    method: str
    model: nn.Module | None  # None once released
    layers: list[LayerPrune]
    config: dict
    warnings: list[str] = field(default_factory=list)

    def release(self) -> None:
        """Drop the pruned model and every layer's ``keep`` and ``coeffs`` (on a GPU: device
        memory, a model and its masks) once nothing reads them any more. The counts, shapes and
        levels stay, so ``n_zeroed``, ``n_positions`` and ``fraction`` read as before; ``model``,
        ``keep`` and ``coeffs`` read None after."""
        self.model = None
        for lp in self.layers:
            lp.__dict__.pop("_host_group", None)
            lp.__dict__["_keep"] = lp.__dict__["_coeffs"] = None

    @property
    def n_zeroed(self) -> int:
        return sum(lp.n_zeroed for lp in self.layers)

    @property
    def n_positions(self) -> int:
        """Positions over all target layers: coefficients (dwt) or weights (magnitude/random)."""
        return sum(lp.n_positions for lp in self.layers)

    @property
    def matched_fraction(self) -> float:
        """:attr:`LayerPrune.matched_fraction` over all target layers (structural zeros left out)."""
        n = sum(lp.n_positions - lp.n_structural for lp in self.layers)
        return sum(lp.n_zeroed - lp.n_structural_zeroed for lp in self.layers) / n if n else 0.0


# --------------------------------------------------------------------------- targets


def normalise_targets(targets: Iterable[str] | str) -> tuple[str, ...]:
    """``targets`` as a non-empty tuple of kinds from :data:`TARGETS` (a single kind may be a string)."""
    if isinstance(targets, str):
        targets = (targets,)
    try:
        targets = tuple(targets)
    except TypeError:
        raise ValueError(f"targets must name at least one of: {', '.join(TARGETS)}; got {targets!r}") from None
    if not targets:
        raise ValueError(f"targets must name at least one of: {', '.join(TARGETS)}")
    for t in targets:
        check_choice("target", t, TARGETS)
    return targets


def target_layers(model: nn.Module, targets: Iterable[str] | str = ("conv",)) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every target layer, in ``named_modules`` order.

    ``targets``: kinds from :data:`TARGETS` (``"conv"`` = ``nn.Conv2d``, ``"linear"`` = ``nn.Linear``).
    Raises ``ValueError`` for an unknown kind, a model without target layers, or two target
    layers sharing one weight tensor (tied weights: one record per weight is what the accounting,
    the checkpoint and fine-tuning rely on).
    """
    targets = normalise_targets(targets)
    types = tuple(TARGETS[t] for t in targets)
    layers = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, types) and isinstance(getattr(m, "weight", None), torch.Tensor)
    ]
    owner: dict[int, str] = {}
    for name, m in layers:
        first = owner.setdefault(id(m.weight), name)
        if first != name:
            raise ValueError(
                f"target layers {first or '(root)'!r} and {name or '(root)'!r} share one weight tensor (tied weights), "
                f"which wavesweep cannot prune as two layers; untie them or leave that kind out of the targets"
            )
    if not layers:
        raise ValueError(
            f"model {type(model).__name__} has no target layers of kinds {list(targets)} "
            f"({', '.join(t.__name__ for t in types)}); valid target kinds: {', '.join(TARGETS)}"
        )
    return layers


def check_finite_targets(layers: list[tuple[str, nn.Module]]) -> None:
    """ValueError naming the first target weight holding a NaN or an infinity (one host sync when
    every weight is finite). A NaN makes the percentile NaN, and dwt would then drop every
    coefficient of the layer (of every layer with ``scope=global``) while magnitude kept the NaN.

    First every weight's L1 norm, in one ``torch._foreach_norm`` (one multi-tensor kernel on a
    GPU, one pass over the weights on a CPU: ResNet-50's convs 14 ms against 53 ms for a
    ``torch.isfinite`` per layer here, ``bench/bench_speedups.py --only finite_check``, and 5
    operators a layer fewer to launch): a finite sum of
    |w| has only finite terms (a NaN or an infinity makes it NaN or inf). A sum that overflows
    without either (float16 weights summing past 65,504) is checked exactly, layer by layer."""
    if not layers:
        return
    dev = layers[0][1].weight.device
    with torch.no_grad():
        weights = [m.weight.detach() for _, m in layers]
        norms = torch._foreach_norm(weights, 1)
        if len({(n.device, n.dtype) for n in norms}) == 1:  # one stack, no conversion a layer
            norms = torch.stack(norms).to(dev, torch.float32)
        else:  # weights on several devices or in several dtypes
            norms = torch.stack([n.to(dev, torch.float32) for n in norms])
        if bool(torch.isfinite(norms).all()):
            return
        finite = torch.stack([torch.isfinite(w).all().to(dev) for w in weights])
        if bool(finite.all()):
            return
    name, m = next((n, m) for (n, m), ok in zip(layers, finite.tolist()) if not ok)
    bad = int((~torch.isfinite(m.weight)).sum())
    raise ValueError(f"target layer {name or '(root)'!r}: weight has {bad} NaN or infinite value(s) of {m.weight.numel()}; "
                     "weights must be finite to be pruned")  # fmt: skip


def work_model(model: nn.Module, inplace: bool) -> nn.Module:
    """The model a pruning method writes into: ``model`` itself when ``inplace``, else a deep copy."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return model if inplace else copy.deepcopy(model)


def weight_numpy(w: torch.Tensor) -> np.ndarray:
    """CPU numpy view/copy of a weight; float32 for dtypes numpy or PyWavelets lack (half, bfloat16)."""
    w = w.detach()
    if w.dtype not in (torch.float32, torch.float64):
        w = w.float()
    return w.cpu().numpy()


def numpy_batched(tensors: list[torch.Tensor]) -> list[np.ndarray]:
    """CPU NumPy copies of ``tensors`` (flattened), with one device-to-host transfer per dtype
    instead of one per tensor: on an accelerator each copy to host is a synchronisation, and a
    model has dozens of target layers. On CPU the tensors' own memory is copied. The arrays are
    1-D slices of one host buffer per dtype (never views of a tensor); dtypes NumPy has only
    (widen bfloat16 first, as :func:`weight_numpy` does)."""
    out: list[np.ndarray | None] = [None] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for (_, dev), idx in groups.items():
        parts = [tensors[i].detach().reshape(-1) for i in idx]
        flat = (torch.cat(parts) if len(parts) > 1 else parts[0]).cpu()
        host = flat.numpy().copy() if dev.type == "cpu" else flat.numpy()  # never a view of a live tensor
        for i, a in zip(idx, np.split(host, np.cumsum([p.numel() for p in parts])[:-1])):
            out[i] = a
    return out  # type: ignore[return-value]


def write_weight(module: nn.Module, values: np.ndarray) -> None:
    """Copy ``values`` (any shape with the weight's size) into ``module.weight``, in place."""
    w = module.weight
    with torch.no_grad():
        w.copy_(torch.from_numpy(np.ascontiguousarray(values)).reshape(w.shape))


#: the integer dtype as wide as each floating dtype: zeroing on the CPU is a bitwise AND of a
#: weight's bits (:func:`zero_weight`)
_INT_VIEW: dict[torch.dtype, torch.dtype] = {
    torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16,
}


def zero_weight(module: nn.Module, prune: np.ndarray) -> None:
    """Set the weights where ``prune`` (flat bool) is True to +0.0, in place.

    On the CPU: a bitwise AND of the weight's bits with all ones where kept and all zeros where
    pruned, the bits ``masked_fill_(mask, 0)`` writes (+0.0 where pruned, every other weight
    untouched; tests/test_pruning.py checks them bit for bit) without its branch per weight, which
    a mask in no order (magnitude's, random's) mispredicts half the time: 8.4 -> 0.9 ms on a
    2.4 M-weight layer on this project's CPU. Elsewhere ``masked_fill_`` on the weight's device."""
    w = module.weight
    mask = torch.from_numpy(prune).reshape(w.shape)
    with torch.no_grad():
        if w.device.type == "cpu" and w.dtype in _INT_VIEW:
            ints = _INT_VIEW[w.dtype]
            w.detach().view(ints).bitwise_and_(mask.to(ints).sub_(1))  # pruned: 1 - 1 = 0; kept: 0 - 1 = all ones
        else:
            w.masked_fill_(mask.to(w.device), 0)
