"""Trial configuration: one frozen dataclass, validated when built, logged whole.

Field names are the hyperparameter names everywhere: MLproject parameters, CLI flags
(``--eval-limit`` for ``eval_limit``), Optuna ``suggest_*`` names and MLflow params.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from wavesweep.names import check_choice

TARGET_KINDS = ("conv", "linear")

#: (model, dataset) pairs whose base model is published weights, not trained by wavesweep
#: (``train.get_base_model``): the same base model whatever the seed
PRETRAINED_BASES = {("resnet18", "imagenet"): "torchvision's pretrained IMAGENET1K_V1 weights"}


def fixed_base(model: str, dataset: str, weights: str | None = None) -> str | None:
    """What the base model is when the seed does not change it: the weights file given, or the
    published weights of a pretrained pair; None when each seed trains its own base model."""
    if weights:
        return f"the fixed weights {weights!r}"
    return PRETRAINED_BASES.get((model, dataset))
DEVICES_HELP = "auto, cpu, cuda or cuda:N"


def _parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={value!r} is not a boolean; valid: true, false")


MAX_SEED = 2**31 - 1  # seed + replicates (up to 100) and seed + 1 stay within numpy/scikit-learn's 0..2**32 - 1
MAX_TIMING_BATCHES = 100  # timed batches per model: 4 models x 100 ResNet-18 batches of 256 is minutes on a CPU


@dataclass(frozen=True)
class TrialConfig:
    """One prune-and-evaluate trial: a base model, one wavelet configuration, evaluation settings."""

    model: str = "resnet18"
    dataset: str = "digits"
    wavelet: str = "bior1.3"
    level: int = 3  # requested; clamped per layer to pywt.dwt_max_level (effective level recorded)
    percentile: float = 50.0  # coefficients with |c| below this percentile of |c| are zeroed
    layout: str = "filter"  # how a weight tensor is seen by the DWT: kernel, filter, matrix, flat
    mode: str = "periodization"  # PyWavelets signal-extension mode
    scope: str = "layer"  # "layer": one threshold per layer; "global": one across all target layers
    keep_approx: bool = False  # leave the approximation band untouched
    targets: str = "conv"  # comma-separated target kinds: conv, linear
    eval_limit: int = 0  # 0 = the whole evaluation split; else a stratified subset of this size
    val_fraction: float = 0.0  # share of the evaluation examples held out for selection (validation); the rest is test
    seed: int = 0  # data split, subset, base-model training, random pruning
    device: str = "auto"
    batch_size: int = 256
    timing_batches: int = 3  # batches timed per model after one warm-up batch (raise for careful timing)
    weights: str = ""  # base model: "" = pretrained/trained-and-cached; a state-dict file; models:/ or runs:/ URI
    data_root: str = ""  # dataset root ("" = $WAVESWEEP_DATA/<dataset>, then the system copy)
    save_baselines: bool = False  # also log compressed checkpoints of the magnitude and random models
    # Recovery after pruning, identical for dwt, magnitude and random (wavesweep.recovery):
    recovery: str = "bn"  # none (one-shot), bn (re-estimate BatchNorm statistics), finetune (bn + masked fine-tuning)
    recovery_batches: int = 50  # training batches for BatchNorm re-estimation (one pass over the split at most)
    recovery_batch_size: int = 64  # examples per training batch (re-estimation and fine-tuning)
    finetune_steps: int = 100  # optimizer steps (recovery=finetune)
    finetune_lr: float = 1e-4  # (peak) learning rate of the fine-tuning optimizer
    finetune_optimizer: str = "adamw"  # adamw or sgd (momentum 0.9); no weight decay
    finetune_schedule: str = "cosine"  # cosine (to 0 over finetune_steps) or constant

    def __post_init__(self) -> None:
        # Imported here: these registries live in modules that import torch.
        from wavesweep import data, models, wavelets

        check_choice("model", self.model, models.MODELS.names())
        check_choice("dataset", self.dataset, data.DATASETS.names())
        check_choice("scope", self.scope, ("layer", "global"))
        wavelets.validate_dwt_args(
            wavelet=self.wavelet, level=self.level, layout=self.layout, mode=self.mode, percentile=self.percentile
        )
        kinds = self.target_kinds
        if not kinds:
            raise ValueError(f"targets={self.targets!r} names no target kind; valid: {', '.join(TARGET_KINDS)}")
        for kind in kinds:
            check_choice("target kind", kind, TARGET_KINDS)
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed={self.seed} must be an integer in 0..{MAX_SEED}")
        for name in ("eval_limit", "timing_batches"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.timing_batches > MAX_TIMING_BATCHES:  # timing is a side measurement: never an unbounded run
            raise ValueError(f"timing_batches={self.timing_batches} is above the limit of {MAX_TIMING_BATCHES}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1): the share of the evaluation "
                             "examples held out as validation (0 = none; the rest is the test part)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size} must be >= 1")
        self.recovery_settings()  # validates recovery, recovery_batches, finetune_*
        dev = self.device
        if not (dev in ("auto", "cpu", "cuda") or (dev.startswith("cuda:") and dev[5:].isdigit())):
            raise ValueError(f"unknown device {dev!r}; valid: {DEVICES_HELP}")

    def recovery_settings(self):
        """The recovery fields as a :class:`wavesweep.recovery.RecoverySettings` (validated)."""
        from wavesweep.recovery import RecoverySettings

        return RecoverySettings(
            recovery=self.recovery,
            batches=self.recovery_batches,
            steps=self.finetune_steps,
            batch_size=self.recovery_batch_size,
            lr=self.finetune_lr,
            optimizer=self.finetune_optimizer,
            schedule=self.finetune_schedule,
            seed=self.seed,
        )

    @property
    def target_kinds(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.targets.split(",") if k.strip())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "TrialConfig":
        """Build from strings or typed values (MLproject ``-P``, YAML, Optuna), checking names and types.

        Raises ``ValueError`` naming the bad key or value; nothing is coerced silently.
        """
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, raw in values.items():
            if key not in known:
                check_choice("trial parameter", key, list(known))
            default = known[key].default
            kwargs[key] = coerce(key, raw, type(default))
        return cls(**kwargs)


def coerce(name: str, raw: Any, typ: type) -> Any:
    """Turn ``raw`` into ``typ`` (bool, int, float, str) or raise a one-line ValueError naming ``name``."""
    if typ is bool:
        return _parse_bool(name, raw)
    if typ is int:
        if isinstance(raw, bool):
            raise ValueError(f"{name}={raw!r} is not an integer")
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        text = str(raw).strip()
        try:
            return int(text)
        except ValueError:
            pass
        try:  # "3.0" (MLflow float-typed parameters) is the integer 3; "3.5" is not an integer
            f = float(text)
        except ValueError:
            f = None
        if f is not None and f.is_integer():
            return int(f)
        raise ValueError(f"{name}={raw!r} is not an integer")
    if typ is float:
        if isinstance(raw, bool):  # float(True) is 1.0: `percentile: true` in a spec is a mistake, not 1 %
            raise ValueError(f"{name}={raw!r} is not a number")
        try:
            return float(str(raw).strip()) if not isinstance(raw, (int, float)) else float(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not a number") from None
    return str(raw)


FIELD_HELP = {
    "model": "base model architecture: resnet18, cnn, mlp, resnet50, vit_b_16",
    "dataset": "dataset: digits (bundled), fashion-mnist, kmnist, mnist, cifar10, imagenet, imagefolder",
    "wavelet": "any discrete PyWavelets wavelet, e.g. bior1.3, rbio2.2, db4, haar",
    "level": "requested DWT level 1-5; clamped per layer to what PyWavelets allows (effective level recorded)",
    "percentile": "threshold percentile in [0, 100]: coefficients with |c| below it are zeroed",
    "layout": "how a weight tensor is seen by the DWT: kernel (per 2-D kernel), filter (per output filter, 1-D), matrix (out x in*kh*kw, 2-D), flat (1-D)",
    "mode": "PyWavelets signal-extension mode (periodization is non-expansive)",
    "scope": "layer: one threshold per layer; global: one threshold across all target layers",
    "keep_approx": "leave the approximation band untouched (true/false)",
    "targets": "comma-separated target layer kinds: conv, linear",
    "eval_limit": "evaluate on a stratified subset of this many examples (0 = whole evaluation split)",
    "val_fraction": "share of the evaluation examples held out as a validation part (stratified, seeded): studies "
    "select on it; the headline metrics are the test part (0 = no validation part; studies default to 0.5)",
    "seed": "seed for data split, subset, base-model training and random pruning",
    "device": "auto, cpu, cuda or cuda:N",
    "batch_size": "evaluation batch size",
    "timing_batches": "batches timed per model after one warm-up batch (0 = skip timing; at most 100)",
    "weights": "base model weights: empty = pretrained/trained-and-cached; a state-dict file; models:/ or runs:/ URI",
    "data_root": "dataset root directory (empty = $WAVESWEEP_DATA/<dataset>, default ~/.cache/wavesweep/data/<dataset>, "
    "then the system copy: fashion-mnist)",
    "save_baselines": "also log compressed checkpoints of the magnitude and random models (true/false)",
    "recovery": "after pruning, the same for all methods: none (one-shot), bn (re-estimate BatchNorm "
    "statistics on training batches), finetune (fine-tuning with every pruning held exactly, dwt training its "
    "kept wavelet coefficients, then bn on the final weights)",
    "recovery_batches": "training batches for BatchNorm re-estimation (>= 1; at most one pass over the training split)",
    "recovery_batch_size": "examples per training batch during recovery (>= 1)",
    "finetune_steps": "optimizer steps of fine-tuning, recovery=finetune (>= 1)",
    "finetune_lr": "(peak) learning rate of fine-tuning, in (0, 1000]",
    "finetune_optimizer": "fine-tuning optimizer: adamw or sgd (momentum 0.9), no weight decay",
    "finetune_schedule": "fine-tuning learning-rate schedule: cosine or constant",
}
