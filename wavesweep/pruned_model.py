"""Loader of a registered wavesweep model: an MLflow pyfunc ``loader_module`` in plain torch.

A registered model is an ordinary ``nn.Module`` saved as data, not as code: its folder holds
``data/state_dict.pt`` (``torch.save`` of the state dict, read back with ``weights_only=True``:
no pickle of objects), ``data/architecture.json`` (the architecture's name and build arguments)
and the compressed checkpoint it was rebuilt from; ``code/`` holds this file and
``architectures.py``. MLflow puts ``code/`` on ``sys.path`` and calls ``_load_pyfunc``, so
loading needs torch, torchvision and MLflow, not wavesweep::

    net = mlflow.pyfunc.load_model("models:/NAME@champion").get_raw_model()  # an nn.Module

(The model's ``pytorch`` flavour, the same module exported with ``torch.export``, is MLflow's own:
``mlflow.pytorch.load_model`` reads it without this file.)

Keep this file free of wavesweep imports (``model_registry.register_model`` ships it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_DICT = "state_dict.pt"
ARCHITECTURE = "architecture.json"


def _architectures():
    try:  # shipped beside this file in the model's code/ folder
        import architectures
    except ImportError:  # saving, inside wavesweep
        from wavesweep import architectures
    return architectures


def load_module(data_path: str | Path) -> torch.nn.Module:
    """The registered ``nn.Module`` (eval mode, CPU) from a model's ``data/`` folder."""
    data = Path(data_path)
    arch = json.loads((data / ARCHITECTURE).read_text())
    model = _architectures().build(arch["model"], num_classes=int(arch["num_classes"]),
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
