"""Loader of a registered wavesweep model: an MLflow pyfunc ``loader_module`` in plain torch.

A registered model is an ordinary ``nn.Module`` saved as data, not as code: its folder holds
``data/state_dict.pt`` (``torch.save`` of the state dict, read back with ``weights_only=True``:
no pickle of objects), ``data/architecture.json`` (the architecture's name and build arguments)
and the compressed checkpoint it was rebuilt from; ``code/`` holds this file (as
``wavesweep_pruned_model_<sha256>.py``: :func:`loader_module`) and ``architectures.py``. MLflow
puts ``code/`` on ``sys.path`` and calls ``_load_pyfunc``, so loading needs torch, torchvision and
MLflow, not wavesweep::

    net = mlflow.pyfunc.load_model("models:/NAME@champion").get_raw_model()  # an nn.Module

(The model's ``pytorch`` flavour, the same module exported with ``torch.export``, is MLflow's own:
``mlflow.pytorch.load_model`` reads it without this file.)

Each model is built by the ``architectures.py`` in its own ``code/`` folder, read by its path and
imported under a name of its contents (``wavesweep_architectures_<sha256>``), never by the name
``architectures``: MLflow puts a model's ``code/`` first on ``sys.path`` but keeps a module
already imported, so a process that had imported a module of that name (its own
``architectures.py``, or the copy shipped with another model, of another wavesweep version)
built the model with that code, or failed. The loader is shipped under a name of its own
contents too (a model's ``loader_module``), for the same reason: MLflow imports it by name
(models registered before are loaded by their ``pruned_model``, as they were).

Keep this file free of wavesweep imports (``model_registry.register_model`` ships it).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

STATE_DICT = "state_dict.pt"
ARCHITECTURE = "architecture.json"
#: what every ``loader_module`` of this file starts with (:func:`loader_module`)
LOADER_PREFIX = "wavesweep_pruned_model_"
_LOCK = threading.Lock()  # one thread runs a shipped architectures.py; the others wait for it whole


def loader_module(source: bytes) -> str:
    """The name this file, of contents ``source``, is shipped and imported under."""
    return f"{LOADER_PREFIX}{hashlib.sha256(source).hexdigest()[:16]}"


def is_wavesweep_loader(name: object) -> bool:
    """Whether a model's ``loader_module`` is this file's, of any version (``pruned_model``: the
    name it was registered under before)."""
    return isinstance(name, str) and (name == "pruned_model" or name.startswith(LOADER_PREFIX))


def _architectures(data_path: Path) -> ModuleType:
    """The architectures module shipped with the model whose data folder is ``data_path`` (MLflow's
    ``<model>/data/data``: the ``code/architectures.py`` beside the nearest ``MLmodel`` above it;
    without one, the file beside this one), imported by path."""
    own = [folder / "code" / "architectures.py" for folder in data_path.resolve().parents[:3] if (folder / "MLmodel").is_file()]
    for shipped in (*own[:1], Path(__file__).with_name("architectures.py")):
        if shipped.is_file():
            break
    else:
        from wavesweep import architectures  # a data folder outside a model, inside wavesweep

        return architectures
    source = shipped.read_bytes()
    name = f"wavesweep_architectures_{hashlib.sha256(source).hexdigest()[:16]}"
    with _LOCK:  # a module in sys.modules is one that has run to its end (as an import's lock ensures)
        if name not in sys.modules:  # the same code twice is one module; other code, another
            spec = importlib.util.spec_from_file_location(name, shipped)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # before running it, as an import does (dataclasses look themselves up there)
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
        return sys.modules[name]


def load_module(data_path: str | Path) -> torch.nn.Module:
    """The registered ``nn.Module`` (eval mode, CPU) from a model's ``data/`` folder."""
    data = Path(data_path)
    arch = json.loads((data / ARCHITECTURE).read_text())
    model = _architectures(data).build(arch["model"], num_classes=int(arch["num_classes"]),
                                   in_channels=int(arch["in_channels"]), image_size=int(arch["image_size"]))  # fmt: skip
    state = torch.load(data / STATE_DICT, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


class PrunedModel:
    """The pyfunc face of the module: ``predict`` gives logits (B, num_classes) for inputs
    (B, C, H, W) of any batch size; ``get_raw_model`` gives the ``nn.Module`` itself."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def get_raw_model(self) -> torch.nn.Module:
        return self.module

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        x = torch.as_tensor(np.asarray(data, dtype=np.float32))
        training = self.module.training
        self.module.eval()  # prediction is inference, whatever mode the caller left the module in
        try:
            with torch.no_grad():
                return self.module(x).numpy()
        finally:
            self.module.train(training)


def _load_pyfunc(data_path: str) -> PrunedModel:
    """MLflow's entry point for a ``loader_module`` model."""
    return PrunedModel(load_module(data_path))
