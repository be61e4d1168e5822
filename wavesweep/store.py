"""Where the MLflow tracking store is, without importing MLflow (``wavesweep ui`` starts in a blink)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def cache_dir() -> Path:
    """Where wavesweep caches base models and base evaluations: env ``WAVESWEEP_CACHE`` or
    ``~/.cache/wavesweep``."""
    env = os.environ.get("WAVESWEEP_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "wavesweep"


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (MLflow's store or Optuna's storage), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///") :]).expanduser().resolve()


def store_exists() -> bool:
    """Whether the tracking store can be read without creating it: False only for a SQLite URI
    whose file does not exist (commands that only read must not create a store or an experiment)."""
    db = sqlite_file(tracking_uri())
    return db is None or db.is_file()


def located(url: str) -> str:
    """``url`` as printed: a password hidden, a relative SQLite file made absolute (``mlflow run``
    runs in the project directory: ``sqlite:///optuna.db`` alone does not say which one)."""
    from wavesweep.redact import redact

    db = sqlite_file(url) if "?" not in url else None
    return f"sqlite:///{db}" if db is not None else redact(url)
