"""Shared fixtures: every test runs against throwaway stores, caches and working directories."""

from __future__ import annotations

import contextlib
import os
import sqlite3
from pathlib import Path

import pytest


@pytest.hookimpl(optionalhook=True)  # pytest-xdist's hook; without xdist it is never called
def pytest_xdist_auto_num_workers(config) -> int | None:
    """``-n auto``: one worker per CPU this process may run on. xdist's own count is the physical
    cores when psutil is installed, and a 2-vCPU machine that reports 1 core, 2 threads would run
    the suite in one worker (serially). ``PYTEST_XDIST_AUTO_NUM_WORKERS`` still decides when set."""
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS") or not hasattr(os, "sched_getaffinity"):
        return None  # xdist's own rule
    return max(1, len(os.sched_getaffinity(0)))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config) -> None:
    """``-n N`` without ``--dist``: xdist's work stealing (``worksteal``) rather than its ``load``,
    which hands each worker a fixed half of the first tests: a worker that runs out takes queued
    tests from the other. An explicit ``--dist`` is kept."""
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", None) == "no":
        config.option.dist = "worksteal"


def pytest_collection_modifyitems(config, items) -> None:
    """The slow tests (whole trials, studies, CLI processes: seconds to a minute each) first, each
    group in file order: with work stealing (above) the long ones start early and the short ones
    fill the end, instead of a one-minute test starting last beside an idle worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order within each group


@pytest.fixture(scope="session")
def shared_cache(tmp_path_factory) -> Path:
    """One base-model cache for the whole session, so a small base model is trained once."""
    return tmp_path_factory.mktemp("wavesweep-cache")


@pytest.fixture(scope="session", autouse=True)
def mlflow_schema_template(tmp_path_factory):
    """MLflow builds a new SQLite store's schema by running its migrations (about 1 s in this
    process, per store, and every test has its own store). In this process a new, empty SQLite
    store is filled instead with a copy of one such schema, built once by MLflow's own
    ``_initialize_tables`` in this session: the same tables, indexes and alembic revision.
    Only an empty database is filled (anything else goes to MLflow's own code). A child process
    builds its store as MLflow does, unless ``subprocess_env`` has made it here first (it does,
    except for the tests about creating one: ``fresh_store``)."""
    try:
        import sqlalchemy
        from mlflow.store.db import utils as db_utils
        from mlflow.store.model_registry import sqlalchemy_store as registry_store
    except ImportError:  # a machine without MLflow (the GPU machine): its tests need no store
        yield None
        return

    real = getattr(db_utils, "_initialize_tables", None)
    if real is None or getattr(registry_store, "_initialize_tables", None) is not real:
        yield None  # an MLflow whose private names differ: every store migrates as MLflow does (slower, the same)
        return
    template = tmp_path_factory.mktemp("mlflow-schema") / "mlflow.db"
    engine = sqlalchemy.create_engine(f"sqlite:///{template}")
    try:
        real(engine)
    finally:
        engine.dispose()

    def initialize_tables(engine):
        if engine.dialect.name != "sqlite":
            return real(engine)
        raw = engine.raw_connection()
        try:
            conn = raw.driver_connection
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                return real(engine)
            with contextlib.closing(sqlite3.connect(template)) as src:
                src.backup(conn)
        finally:
            raw.close()

    db_utils._initialize_tables = registry_store._initialize_tables = initialize_tables  # the registry's own name for it
    yield template
    db_utils._initialize_tables = registry_store._initialize_tables = real


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_cache: Path) -> Path:
    """A fresh working directory with its own MLflow store; the base-model cache is shared."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WAVESWEEP_CACHE", str(shared_cache))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    # mlflow.set_experiment (used by a test, as users do) exports MLFLOW_EXPERIMENT_ID and keeps an
    # active experiment in the process: neither may leak into the next test's fresh store.
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    # mlflow.set_tracking_uri (called once per process by the CLI) is process-global and
    # outranks the environment: pin it to this test's store so no earlier test's store leaks in.
    import mlflow

    mlflow.set_tracking_uri(uri)
    import mlflow.tracking.fluent as fluent

    monkeypatch.setattr(fluent, "_active_experiment_id", None, raising=False)
    return tmp_path


def subprocess_env(workdir: Path, shared_cache: Path, *, concurrent: bool = False,
                   fresh_store: bool = False) -> dict[str, str]:
    """Environment for a child process that should see the same stores as ``workdir``.
    ``workdir``'s MLflow store is created here, in this process (from the schema template:
    ``mlflow_schema_template``), unless it exists: a child that creates a SQLite store runs
    MLflow's migrations, 1.5-3 s of a tiny trial's 10. ``fresh_store``: none is created here, as
    where the child must create it itself (what the test is about: creation in a race, under a
    stop or an error, a command that must not create one) or uses another store (a server).
    ``concurrent``: the child computes beside another one (two launchers, two trials at once): it
    gets one torch intra-op thread, as each worker of ``--workers 2`` on 2 cores does. With torch's
    default of a thread per core each, two children oversubscribe a 2-core machine and stall in
    OpenMP barriers (two launchers' study: 26 s -> 12.5 s idle, 102 s -> 14 s under load). Every
    child inherits ``OMP_NUM_THREADS=1`` from this session anyway (``one_thread_per_process``)
    unless the suite was started with its own ``OMP_NUM_THREADS``; ``concurrent`` then still holds."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(
        WAVESWEEP_CACHE=str(shared_cache),
        MLFLOW_TRACKING_URI=f"sqlite:///{workdir / 'mlflow.db'}",
        PYTHONPATH=str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", ""),
    )
    if concurrent:
        env["OMP_NUM_THREADS"] = "1"
    if not fresh_store and not (workdir / "mlflow.db").exists():
        try:
            from mlflow import MlflowClient
        except ImportError:  # a machine without MLflow (the GPU machine): the child has no store either
            return env
        MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments(max_results=1)  # creates it
    return env


def study_trial_runs(client, study_name: str) -> list:
    """Every trial run MLflow holds for ``study_name`` (any status, every experiment), oldest first:
    the tests' own reading of the store, beside what Optuna says."""
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps, filter_string=f"tags.`optuna.study` = '{study_name}' and tags.`wavesweep.kind` = 'trial'",
        max_results=50000, order_by=["attributes.start_time ASC"],
    )  # fmt: skip
    return list(runs)


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_process():
    """One torch intra-op thread in this process and (``OMP_NUM_THREADS=1``, inherited) in every
    child it starts: the tests' models and tensors are tiny, and on this shared 2-core machine a
    second OpenMP thread stalls in a barrier whenever the other is descheduled. Measured back to
    back under the machine's usual load (other sessions: load average 2-5): a small CNN forward
    pass of 64 digits 140-200 ms with 2 threads, 3.3-5.5 ms with 1 (a training step 20-490 ms vs
    7-13 ms); test_faults.py 645 s -> 449 s. An ``OMP_NUM_THREADS`` set by whoever runs the suite
    is left as it is (a bigger machine may want more)."""
    if "OMP_NUM_THREADS" in os.environ:
        yield
        return
    import torch

    n = torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)
        os.environ.pop("OMP_NUM_THREADS", None)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: torch's intra-op threads only add overhead (and stall on a shared machine)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def decoding_processes(tmp_path_factory, monkeypatch):
    """Which processes decode image files: ``wavesweep.image_files.read_image`` (every image
    folder's loader, patched before the dataset is loaded) leaves a mark per (process id, split)
    in a folder, from any process, worker ones included (they are forked with the patch). Returns
    ``seen()``: the set of ``(pid, "train" | "val")`` so far."""
    from wavesweep import image_files

    marks = tmp_path_factory.mktemp("decoding-pids")
    real = image_files.read_image

    def read_image(path: str):
        split = "train" if f"{os.sep}train{os.sep}" in path else "val"
        (marks / f"{os.getpid()}-{split}").touch()
        return real(path)

    monkeypatch.setattr(image_files, "read_image", read_image)

    def seen() -> set[tuple[int, str]]:
        return {(int(p.name.split("-")[0]), p.name.split("-")[1]) for p in marks.iterdir()}

    return seen
