"""A real-data trial with recovery on Fashion-MNIST (Debian's ``dataset-fashion-mnist``, which CI
installs): a small CNN trained here on part of the real training split, then one tracked trial
with BatchNorm re-estimation and fine-tuning on the real training images, scored on real test
images. Skipped where the package is absent, except in CI, where its absence is a failure."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from wavesweep import data, models, train
from wavesweep.config import TrialConfig
from wavesweep.tracked_trial import run_tracked_trial

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
pytestmark = pytest.mark.slow

if not DEBIAN.is_dir():
    if os.environ.get("CI"):
        raise RuntimeError(f"{DEBIAN} is missing: CI must install Debian's dataset-fashion-mnist")
    pytest.skip("Debian's dataset-fashion-mnist is not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def fashion_cnn(tmp_path_factory) -> Path:
    """A SmallCNN trained for one epoch on 6,000 real Fashion-MNIST training images (seconds)."""
    bundle = data.load_dataset("fashion-mnist")  # found in Debian's folder without a flag
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    assert bundle.info["root"].startswith(str(DEBIAN))
    part = data.take(bundle.train, np.arange(0, 60000, 10))
    small = data.DatasetBundle(bundle.name, part, data.take(bundle.test, np.arange(0, 10000, 20)), bundle.num_classes,
                               bundle.in_channels, bundle.image_size, bundle.info)  # fmt: skip
    torch.manual_seed(0)
    model = models.build_model("cnn", num_classes=10, in_channels=1, image_size=28)
    info = train.train_model(model, small, train.TrainConfig(epochs=1, batch_size=64, lr=3e-3), device="cpu",
                             progress=False)  # fmt: skip
    assert info["test_top1"] > 0.6, info  # real data, real learning
    path = tmp_path_factory.mktemp("fashion") / "cnn.pt"
    torch.save(model.state_dict(), path)
    return path


def test_real_fashion_mnist_trial_with_finetune_recovery(workdir, fashion_cnn):
    cfg = TrialConfig(model="cnn", dataset="fashion-mnist", weights=str(fashion_cnn), wavelet="bior4.4", level=5,
                      percentile=80.0, layout="filter", eval_limit=500, timing_batches=0, recovery="finetune",
                      recovery_batches=10, finetune_steps=15, finetune_lr=1e-3)  # fmt: skip
    result, run_id = run_tracked_trial(cfg, experiment="real-data")
    assert result.eval_info["n_eval"] == 500 and result.base_eval.top1 > 0.6
    for m, out in result.outcomes.items():
        assert out.recovery.bn_layers == 3 and out.recovery.bn_batches == 10 and out.recovery.finetune_steps == 15
        assert out.prerec_eval is not None and out.prerec_eval.n == 500
        assert 0.0 <= out.eval.top1 <= 1.0 and np.isfinite(out.eval.loss)
    # at 80 % pruned, stale BatchNorm statistics cost accuracy that recovery gives back (magnitude)
    mag = result.outcomes["magnitude"]
    assert mag.eval.top1 > mag.prerec_eval.top1
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["recovery"] == "finetune" and run.data.params["dataset"] == "fashion-mnist"
    assert run.data.metrics["magnitude_prerec_top1"] == mag.prerec_eval.top1
    assert run.data.metrics["magnitude_top1"] == mag.eval.top1
