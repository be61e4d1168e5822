"""The README's scale-out recipe, for real: a PostgreSQL Optuna storage, an ``mlflow server`` with a
PostgreSQL backend store on 127.0.0.1, and two independent launchers on one study.

Needs ``WAVESWEEP_TEST_PG``: a PostgreSQL URL of a role that may create databases (``.ci/run``
starts such a server; the password comes from ``PGPASSWORD``/``.pgpass``, never the URL). Skipped
without it locally, a failure in CI (``CI=true``).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import study_trial_runs, subprocess_env
from tests.test_study import tiny_weights, write_spec  # noqa: F401 - tiny_weights is a fixture

PG = os.environ.get("WAVESWEEP_TEST_PG")
if not PG:
    if os.environ.get("CI") == "true":
        raise RuntimeError("CI=true but WAVESWEEP_TEST_PG is not set: .ci/run must start PostgreSQL for tests/test_scaleout.py")
    pytestmark = pytest.mark.skip(reason="WAVESWEEP_TEST_PG is not set (a PostgreSQL URL; .ci/run sets it)")
else:
    pytestmark = pytest.mark.slow


def _with_db(url: str, db: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=db).render_as_string(hide_password=False)


@pytest.fixture
def pg_databases():
    """Two fresh databases (Optuna, MLflow) created before any worker starts; dropped afterwards."""
    import psycopg

    names = [f"ws_{kind}_{uuid.uuid4().hex[:10]}" for kind in ("optuna", "mlflow")]
    conninfo = _with_db(PG, "postgres").replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for n in names:
            conn.execute(f'CREATE DATABASE "{n}"')
    yield [_with_db(PG, n) for n in names]
    with psycopg.connect(conninfo, autocommit=True) as conn:
        for n in names:
            conn.execute(f'DROP DATABASE IF EXISTS "{n}" WITH (FORCE)')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(pg_databases, tmp_path):
    """``mlflow server`` as the README starts it: PostgreSQL backend, 127.0.0.1, no job executor."""
    port = _free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", pg_databases[1], "--artifacts-destination",
         str(tmp_path / "artifacts"), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + 240
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=5).status == 200:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > end:
                raise AssertionError("mlflow server did not start: " + (tmp_path / "server.log").read_text()[-3000:])
            time.sleep(1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_two_launchers_on_postgresql_and_a_tracking_server(workdir, tiny_weights, shared_cache, pg_databases, mlflow_server):
    optuna_url = pg_databases[0]
    n = 4
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=n, storage=optuna_url, sampler={"name": "tpe", "seed": 0},
                      space={"percentile": {"low": 5.0, "high": 95.0}, "wavelet": ["haar", "db2"]})  # fmt: skip
    env = subprocess_env(workdir, shared_cache, fresh_store=True) | {"MLFLOW_TRACKING_URI": mlflow_server}
    launchers = []
    for i in range(2):
        log = open(workdir / f"launcher{i}.log", "w")  # noqa: SIM115 - closed with the process
        launchers.append(subprocess.Popen([sys.executable, "-m", "wavesweep", "study", str(spec), "-q"], cwd=workdir, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))  # fmt: skip
    for i, p in enumerate(launchers):
        assert p.wait(timeout=600) == 0, (workdir / f"launcher{i}.log").read_text()[-3000:]

    s = optuna.load_study(study_name="tiny", storage=optuna_url)
    trials = s.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == n, [(t.number, t.state.name, t.user_attrs.get("error")) for t in trials]
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == n, "launchers proposed distinct configurations"

    client = MlflowClient(mlflow_server)
    runs = {r.info.run_id: r for r in study_trial_runs(client, "tiny")}
    for t in complete:  # every trial landed on the server, finished, with its checkpoint
        run = runs[t.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED" and run.data.tags["optuna.trial_number"] == str(t.number)
        assert run.data.metrics["top1"] == pytest.approx(t.user_attrs["top1"])
        assert [a.path for a in client.list_artifacts(run.info.run_id, "checkpoints")] == ["checkpoints/dwt.wsz"]
        children = client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'")
        assert sorted(c.data.tags["method"] for c in children) == ["dwt", "magnitude", "random"]
    finished = [r for r in runs.values() if r.info.status == "FINISHED"]
    assert len(finished) == n
    study_runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                    filter_string="tags.`wavesweep.kind` = 'study' and tags.`optuna.study` = 'tiny'")  # fmt: skip
    assert [r.info.run_id for r in study_runs] == [s.user_attrs["mlflow_run_id"]], "one study run for both launchers"
    assert {r.data.tags["mlflow.parentRunId"] for r in runs.values()} == {s.user_attrs["mlflow_run_id"]}
    study_run = client.get_run(s.user_attrs["mlflow_run_id"])
    assert study_run.info.status == "FINISHED" and study_run.data.metrics["n_complete"] == n
    assert "secret" not in study_run.data.tags["optuna.storage"]
