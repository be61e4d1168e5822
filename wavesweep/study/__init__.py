"""Optuna studies from ``sweeps/*.yaml`` specs: search, resume, parallel workers, early stopping.

The only package that imports optuna. Every study trial is one ``tracked_trial.run_tracked_trial``
(the code path of ``mlflow run`` and ``wavesweep trial``), nested under the study's MLflow run.

* ``spec``: the YAML schema, ``--set`` overrides, validation (``spec_from_mapping`` -> ``StudySpec``);
* ``spec_yaml``: reading a spec file: bounded YAML, line numbers (``load_spec``), ``KEY=VALUE`` items;
* ``storage``: Optuna storage, samplers and pruners by name, create/load the study;
* ``objective``: the thin objective (suggest, run, report chunks, return the values);
* ``workers``: ``run_study``: worker processes, the slot lock, Ctrl-C/SIGTERM, progress, resume, retries;
* ``plan``: ``--enqueue`` configurations and the ``--dry-run`` description;
* ``frame``: the study as a table for reports (``trials_frame``, ``best_trial``, ``build_report``).
"""

from wavesweep.study.frame import best_trial, build_report, study_metrics, trials_frame
from wavesweep.study.plan import describe, enqueue_params
from wavesweep.study.spec import SpecError, StudySpec, spec_from_mapping
from wavesweep.study.spec_yaml import load_spec, parse_assignments
from wavesweep.study.storage import DEFAULT_STORAGE, check_storage_url, open_storage
from wavesweep.study.workers import StudyOutcome, check_timeout, run_study

__all__ = [
    "DEFAULT_STORAGE", "SpecError", "StudyOutcome", "StudySpec", "best_trial", "build_report", "check_storage_url",
    "check_timeout", "describe", "enqueue_params", "load_spec", "open_storage", "parse_assignments", "run_study",
    "spec_from_mapping", "study_metrics", "trials_frame",
]  # fmt: skip
