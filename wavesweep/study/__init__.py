"""Optuna studies from ``sweeps/*.yaml`` specs: search, resume, parallel workers, early stopping.

The only package that imports optuna. Every study trial is one ``tracked_trial.run_tracked_trial``
(the code path of ``mlflow run`` and ``wavesweep trial``), nested under the study's MLflow run.

* ``spec``: the YAML schema and validation (``load_spec`` -> ``StudySpec``); ``spec_yaml``: bounded
  parsing with the line number of every key;
* ``storage``: Optuna storage, samplers and pruners by name, create/load the study;
* ``objective``: the thin objective (suggest, run, report chunks, return the values);
* ``workers``: ``run_study``: worker processes, the slot lock, Ctrl-C/SIGTERM, progress, resume, retries;
* ``plan``: ``--enqueue`` configurations and the ``--dry-run`` description;
* ``frame``: the study as a table for reports (``trials_frame``, ``best_trial``, ``build_report``).
"""

from wavesweep.study.frame import best_trial, build_report, study_metrics, study_objectives, trials_frame
from wavesweep.study.plan import describe, enqueue_params
from wavesweep.study.spec import SpecError, StudySpec, load_spec, parse_assignments, spec_from_mapping
from wavesweep.study.storage import DEFAULT_STORAGE, check_storage_url, load_named_study, open_storage
from wavesweep.study.workers import StudyOutcome, check_sampler_seed, check_timeout, check_workers, run_study

__all__ = [
    "DEFAULT_STORAGE", "SpecError", "StudyOutcome", "StudySpec", "best_trial", "build_report", "check_storage_url",
    "check_sampler_seed", "check_timeout", "check_workers", "describe", "enqueue_params", "load_named_study", "load_spec", "open_storage", "parse_assignments", "run_study",
    "spec_from_mapping", "study_metrics", "study_objectives", "trials_frame",
]  # fmt: skip
