"""What a launch will do before it does it: chosen configurations (``--enqueue``) and the
resolved spec with its search space (``--dry-run``)."""

from __future__ import annotations

from typing import Any

import yaml

from wavesweep.config import TrialConfig
from wavesweep.study.spec import StudySpec
from wavesweep.study.spec import parse_assignments
from wavesweep.study.storage import redact_url


def enqueue_params(spec: StudySpec, item: str) -> dict[str, Any]:
    """``"wavelet=haar,percentile=40"`` -> ``{"wavelet": "haar", "percentile": 40}``, checked against the space.

    Every name must be a searched parameter; a value must be one of a list's choices or inside a
    range (on its step). Names left out are sampled as usual. Raises a one-line ``ValueError``;
    a grid study takes none (its grid is run whole, once).
    """
    if spec.sampler == "grid":
        raise ValueError(f"--enqueue {item!r}: study {spec.name!r} uses the grid sampler, which runs every point of "
                         "its grid once (an enqueued point would run twice and another not at all); leave --enqueue out")  # fmt: skip
    params = parse_assignments([p for p in item.split(",") if p.strip()], "--enqueue")
    if not params:
        raise ValueError(f"--enqueue {item!r} names no parameter; give NAME=VALUE,... over the search space")
    space = {p.name: p for p in spec.space}
    out: dict[str, Any] = {}
    for name, value in params.items():
        p = space.get(name)
        if p is None:
            raise ValueError(f"--enqueue {name}: not a searched parameter of study {spec.name!r}; searched: {', '.join(space) or 'none'}")
        if p.kind == "categorical":
            match = [c for c in p.choices if c == value or str(c) == str(value)]
            if not match:
                raise ValueError(f"--enqueue {name}={value!r} is not one of its choices {list(p.choices)}")
            out[name] = match[0]
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"--enqueue {name}={value!r} is not a number")
        if not p.low <= value <= p.high:
            raise ValueError(f"--enqueue {name}={value} is outside its range [{p.low}, {p.high}]")
        if p.step and abs((value - p.low) / p.step - round((value - p.low) / p.step)) > 1e-9:
            raise ValueError(f"--enqueue {name}={value} is not on its grid (low {p.low}, step {p.step})")
        if p.kind == "int" and not float(value).is_integer():
            raise ValueError(f"--enqueue {name}={value} is not an integer")
        out[name] = int(value) if p.kind == "int" else float(value)
    TrialConfig.from_mapping({**spec.fixed, **out})  # the chosen values must make a valid trial
    return out


def describe(spec: StudySpec, *, url: str, n_trials: int | None, timeout: float | None, workers: int,
             enqueued: list[dict[str, Any]], stoppers: list[str] | None = None) -> str:  # fmt: skip
    """The resolved spec, its search space and what a launch would do, as YAML (``--dry-run``).
    ``stoppers``: what would stop a launch on this machine before anything is created (a device it
    lacks, a weights file not there), listed under "a launch here would stop"; a spec may be
    previewed on one machine for another, so they are shown, not raised."""
    space = {}
    for p in spec.space:
        if p.kind == "categorical":
            space[p.name] = list(p.choices)
        else:
            space[p.name] = {"type": p.kind, "low": p.low, "high": p.high} | ({"step": p.step} if p.step else {}) | (
                {"log": True} if p.log else {})  # fmt: skip
    doc = {
        "study": spec.name,
        "storage": redact_url(url),
        "experiment": spec.experiment or "(MLFLOW_EXPERIMENT_NAME or wavesweep)",
        "n_trials": n_trials or spec.total_trials,
        "timeout": timeout if timeout is not None else spec.timeout,
        "workers": workers,
        "objectives": {o.metric: o.direction for o in spec.objectives},
        "sampler": {"name": spec.sampler, "seed": spec.seed, **spec.sampler_options},
        "pruner": {"name": spec.pruner, **spec.pruner_options},
        "replicates": spec.replicates,
        "fixed": dict(spec.fixed),
        "space": space,
        "trial defaults (not set by the spec)": {
            k: v for k, v in TrialConfig().to_dict().items() if k not in spec.fixed and k not in space
        },
    }  # fmt: skip
    if spec.sampler == "grid":
        doc["grid points"] = spec.grid_size()
    if enqueued:
        doc["enqueued first"] = enqueued
    if stoppers:
        doc["a launch here would stop"] = list(stoppers)
    return "# dry run: nothing was created or run\n" + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None)
