"""Named model builders (resnet18, resnet50, vit_b_16, cnn, mlp) and checked weight loading.

Pruning targets: the ResNets and the CNN are pruned in their ``nn.Conv2d`` layers (the
default ``targets=conv``). ViT-B/16 is a transformer: its only conv is the patch embedding,
so prune it with ``targets=linear`` (or ``conv,linear``): the two MLP Linears and the
attention output projection of each of its 12 blocks plus the head (37 layers, 64M of its
86M weights). The fused q/k/v projection (``in_proj_weight`` of ``nn.MultiheadAttention``)
is a bare parameter, not an ``nn.Linear``, and is never a target.

Nothing here downloads: pretrained ResNet-18 weights come from a local file or the
local torch hub cache, and a missing file is a FileNotFoundError saying where to put it.
"""

from __future__ import annotations

import json
import logging
import operator
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from wavesweep import architectures
from wavesweep.names import Registry

log = logging.getLogger(__name__)

#: name -> ``builder(num_classes, in_channels, image_size) -> nn.Module``
MODELS: Registry[Callable[..., nn.Module]] = Registry("model")

#: torchvision's file name for ResNet18_Weights.IMAGENET1K_V1 (what torch.hub caches)
RESNET18_IMAGENET_FILE = "resnet18-f37072fd.pth"
RESNET18_IMAGENET_URL = "https://download.pytorch.org/models/" + RESNET18_IMAGENET_FILE

# The architectures live in ``architectures`` (plain torch, shipped with registered models).
for _name, _builder in architectures.BUILDERS.items():
    MODELS.register(_name)(_builder)


def build_model(name: str, *, num_classes: int, in_channels: int = 3, image_size: int = 224) -> nn.Module:
    """A freshly initialised model ``name`` (see ``MODELS.names()``) for inputs
    (B, in_channels, image_size, image_size), giving logits (B, num_classes)."""
    builder = MODELS.get(name)
    sizes = {}
    for what, v in (("num_classes", num_classes), ("in_channels", in_channels), ("image_size", image_size)):
        try:  # an int or a NumPy integer, not a bool (True is no class count) or a float
            sizes[what] = operator.index(v) if not isinstance(v, (bool, np.bool_)) else None
        except TypeError:
            sizes[what] = None
        if sizes[what] is None or sizes[what] < 1:
            raise ValueError(f"{what} must be a positive int, got {v!r}")
    return builder(**sizes)


# --------------------------------------------------------------------------- loading


def output_size(model: nn.Module) -> int | None:
    """The number of logits ``model`` produces: ``out_features`` of its last nn.Linear
    (None if it has none)."""
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return None if last is None else last.out_features


def check_num_classes(model: nn.Module, num_classes: int, *, dataset: str) -> None:
    """ValueError if ``model``'s output size differs from ``dataset``'s class count."""
    out = output_size(model)
    if out is not None and out != num_classes:
        raise ValueError(
            f"dataset {dataset!r} has {num_classes} classes but the model outputs {out} logits; "
            f"use a base model trained for {dataset!r} (or a matching dataset)"
        )


def unwrap_state_dict(obj: Any, *, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint: a plain state dict, or a dict holding one
    under ``state_dict``/``model``/``model_state_dict`` (wavesweep's cache files store
    ``{"state_dict", "meta"}``; PyTorch's tutorial checkpoint ``{"epoch", "model_state_dict",
    "optimizer_state_dict", ...}``); a ``module.`` prefix (DataParallel) is removed."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "model_state_dict"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{source}: not a state dict (a mapping of parameter names to tensors), but a {type(obj).__name__}")
    if bad := [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]:
        # name what is there: a training checkpoint ({"epoch", "model_state_dict", ...}) is unwrapped by the user
        holds = (f"entry {bad[0]!r} is of type {type(obj[bad[0]]).__name__}" if len(bad) < len(obj)
                 else f"it holds {_listed(list(obj))}, none of them a tensor")
        raise ValueError(f"{source}: not a state dict (a mapping of parameter names to tensors): {holds}; "
                         "save the model's state_dict() alone, or under the key 'state_dict', 'model' or 'model_state_dict'")
    sd = dict(obj)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _listed(keys: list, most: int = 6) -> str:
    """``'a', 'b' and 3 more``: the first keys of a mapping, for an error line."""
    shown = ", ".join(repr(k) for k in keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")


def check_finite(state_dict: Mapping[str, torch.Tensor], *, source: str) -> None:
    """ValueError naming the first floating-point tensor of ``state_dict`` that holds a NaN or an
    infinity: a base model with one gives a run full of ``nan`` metrics that looks finished.

    First every such tensor's L1 norm in one ``torch._foreach_norm`` (one pass over each, no
    temporary mask): a finite sum of |x| has only finite terms, so all finite norms end the check
    (a cached ResNet-18 on this project's CPU, one thread: 17 -> 6 ms, against ``torch.isfinite`` per tensor).
    Otherwise (a NaN or an infinity, or a sum that overflows with none: float16 past 65,504) the
    exact check, tensor by tensor, names the first bad one."""
    floats = [t.detach() for t in state_dict.values() if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex())]
    if floats and len({t.device for t in floats}) == 1:  # one device: the norms stacked there, one sync
        try:
            with torch.no_grad():
                norms = torch._foreach_norm(floats, 1)
                if len({n.dtype for n in norms}) > 1:  # several dtypes: each norm converted to stack them
                    norms = [n.to(torch.float64) for n in norms]
                if bool(torch.isfinite(torch.stack(norms)).all()):
                    return
        except (RuntimeError, NotImplementedError):  # a dtype without a norm (float8): the exact check says what it says
            pass
    for key, t in state_dict.items():
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()):
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise ValueError(f"{source}: tensor {key!r} has {bad} NaN or infinite value(s) of {t.numel()}; "
                                 "base weights must be finite")  # fmt: skip


def filled_by_batchnorm(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    """The keys a strict ``load_state_dict`` does not miss although ``state_dict`` lacks them:
    ``num_batches_tracked`` of a BatchNorm layer that tracks running statistics, in a state dict
    without PyTorch's version-2 BatchNorm metadata (saved before PyTorch 0.4.1, as torchvision's
    first ImageNet files were, or a plain dict): BatchNorm fills it in itself (with 0)."""
    meta = getattr(state_dict, "_metadata", None) or {}
    out = set()
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            version = meta.get(name, {}).get("version")
            if version is None or version < 2:
                out.add(f"{name}.num_batches_tracked" if name else "num_batches_tracked")
    return out


def load_state_checked(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str, assign: bool = False
) -> nn.Module:
    """Load ``state_dict`` into ``model`` strictly; on any mismatch raise a ValueError naming
    ``source``, the model's class, the first missing key, unexpected key or shape mismatch,
    and the counts — the message for "a checkpoint for another architecture". A NaN or
    infinite value is a ValueError naming the tensor (:func:`check_finite`). ``assign``: the
    model takes the state dict's tensors (``load_state_dict(assign=True)``)."""
    check_finite(state_dict, source=source)
    own = model.state_dict()
    filled = filled_by_batchnorm(model, state_dict)
    missing = [k for k in own if k not in state_dict and k not in filled]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        (k, tuple(state_dict[k].shape), tuple(own[k].shape))
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (first {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (first {unexpected[0]!r})")
        if shapes:
            k, got, want = shapes[0]
            parts.append(f"{len(shapes)} shape mismatches (first {k!r}: checkpoint {got}, model {want})")
        raise ValueError(
            f"{source}: checkpoint does not fit {type(model).__name__}: " + "; ".join(parts)
            + " — a checkpoint for another architecture, class count or input size?"
        )
    model.load_state_dict(state_dict, strict=True, assign=assign)
    return model


def build_loaded(
    name: str, state_dict: Mapping[str, torch.Tensor], *, source: str, adopt: bool = False, **build_kwargs
) -> nn.Module:
    """``build_model(name, **build_kwargs)`` holding ``state_dict`` (checked as :func:`load_state_checked`).

    ``adopt``: the model takes ``state_dict``'s tensors as its own (no copy) and is built on the
    meta device first, so no random initialisation runs (loading a cached ResNet-18 on CPU: 114
    -> 47 ms, bench/bench_speedups.py). Only for a state dict nobody else holds (freshly read) whose floating
    tensors have the model's dtypes; otherwise, or if the model has state outside its state
    dict (a non-persistent buffer), the plain copy into a randomly initialised model."""
    if adopt:
        with torch.device("meta"):
            skeleton = build_model(name, **build_kwargs)
        own = skeleton.state_dict()
        complete = sum(1 for _ in skeleton.buffers()) + sum(1 for _ in skeleton.parameters()) == len(own)
        same_dtypes = all(k in state_dict and state_dict[k].dtype == v.dtype for k, v in own.items())
        if complete and same_dtypes:
            model = load_state_checked(skeleton, state_dict, source=source, assign=True)
            if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
                return model
    return load_state_checked(build_model(name, **build_kwargs), state_dict, source=source)


def expand_path(path: str | os.PathLike, *, what: str = "file") -> Path:
    """``Path(path).expanduser()``, with an unknown ``~user`` as a one-line ValueError."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        raise ValueError(f"{what} {str(path)!r}: cannot expand {str(path).split('/')[0]!r} (no such user or no home)") from None


def weights_file(path: str | os.PathLike) -> Path:
    """``path`` expanded, when it is a file; else a one-line error saying what is there instead
    (nothing: ``FileNotFoundError``; a folder: ``ValueError``)."""
    path = expand_path(path, what="weights file")
    if path.is_dir():
        raise ValueError(f"weights file {str(path)!r} is a folder; give the weights file in it")
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    return path


#: file formats :func:`read_weights` accepts: none of them can run code when read
SAFE_FORMATS = "a state dict (read with torch.load(weights_only=True)), a .safetensors file, or a wavesweep .wsz checkpoint"


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a weights file without running code from it; return ``(state_dict, meta)``.

    By content: wavesweep's compressed checkpoint (magic ``WAVSWEEP``; decoded with json and
    numpy), a ``.safetensors`` file (when the ``safetensors`` package is installed), else
    ``torch.load(weights_only=True)`` (a state dict, or wavesweep's ``{"state_dict", "meta"}``
    cache file; ``meta``: its JSON metadata). An empty, truncated, random or malicious file
    (a pickle that would run code) is a one-line ValueError naming the file.
    """
    path = weights_file(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if not head:
        raise ValueError(f"weights file {str(path)!r} is empty")
    if head == b"WAVSWEEP":
        from wavesweep import checkpoint  # lazy: only a .wsz file needs the checkpoint reader

        sd, meta = checkpoint.read_compressed(path)
        return sd, {"format": "wsz", "checkpoint": {k: meta.get(k) for k in ("method", "config", "user")}}
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"weights file {str(path)!r} is safetensors; install the safetensors package to read it") from None
        try:
            return dict(load_file(str(path), device="cpu")), {"format": "safetensors"}
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise ValueError(f"weights file {str(path)!r}: not a readable safetensors file ({_first_line(exc)})") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # EOFError, UnpicklingError, RuntimeError (zip), ...: all mean "not a state dict"
        text = str(exc)
        # torch's weights-only unpickler says "Weights only load failed" for a pickle naming code it
        # would have to import (GLOBAL) and for bytes that are no pickle at all ("Unsupported operand")
        needs_code = "global" in text.lower() and ("weights_only" in text.lower() or "weights only" in text.lower())
        detail = next((l.strip() for l in text.splitlines() if l.strip().startswith("Unsupported")), "") \
            or _first_line(exc).split(". ", 1)[0]  # not torch's advice to retry with weights_only=False
        what = "a pickle that needs code to load (refused: weights_only=True)" if needs_code \
            else f"not a torch state-dict file ({type(exc).__name__}: {detail})"
        raise ValueError(f"weights file {str(path)!r}: {what}; wavesweep reads {SAFE_FORMATS}") from None
    meta: dict[str, Any] = {"format": "torch"}
    if isinstance(obj, Mapping) and isinstance(obj.get("meta"), str):
        try:
            meta |= json.loads(obj["meta"])
        except ValueError:
            raise ValueError(f"weights file {str(path)!r}: its 'meta' entry is not JSON") from None
    return unwrap_state_dict(obj, source=str(path)), meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict of a weights file (:func:`read_weights`); FileNotFoundError naming the
    path when it is absent."""
    return read_weights(path)[0]


def resnet18_imagenet_path(path: str | os.PathLike | None = None) -> Path:
    """Where the IMAGENET1K_V1 weights are read from: ``path`` if given, else the torch hub
    cache ``torch.hub.get_dir()/checkpoints/resnet18-f37072fd.pth``."""
    if path is not None:
        return expand_path(path, what="weights file")
    return Path(torch.hub.get_dir()) / "checkpoints" / RESNET18_IMAGENET_FILE


def pretrained_resnet18_file(path: str | os.PathLike | None = None) -> Path:
    """The IMAGENET1K_V1 weights file :func:`load_pretrained_resnet18` reads (``path``, else the
    torch hub cache); FileNotFoundError saying where to put it when it is not there."""
    file = resnet18_imagenet_path(path)
    if not file.is_file():
        cache = resnet18_imagenet_path(None)
        raise FileNotFoundError(
            f"ResNet-18 IMAGENET1K_V1 weights not found at {str(file)!r}; wavesweep never "
            f"downloads at run time. Put {RESNET18_IMAGENET_FILE} (from {RESNET18_IMAGENET_URL}) "
            f"at {str(cache)!r} (the torch hub cache; set TORCH_HOME to move it) or pass its path with --weights"
        )
    return file


def load_pretrained_resnet18(path: str | os.PathLike | None = None) -> nn.Module:
    """torchvision ResNet-18 with IMAGENET1K_V1 weights from ``path`` or the local torch hub
    cache, never downloaded. Returned in eval mode on CPU."""
    file = pretrained_resnet18_file(path)
    model = build_loaded("resnet18", load_weights_file(file), source=str(file), num_classes=1000, in_channels=3, image_size=224)
    log.info("loaded ResNet-18 ImageNet weights from %s", file)
    return model.eval()
