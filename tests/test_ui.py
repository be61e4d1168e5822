"""``wavesweep ui``: the server it starts (one worker, no job executor, the project's store), that
it answers /health and MLflow's REST API, prints its URL, and stops on Ctrl-C. No timed assertions:
``bench/bench_ui.py`` measures start-up."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request

import pytest

from tests.conftest import subprocess_env
from wavesweep import cli, mlflow_ui


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _ExitedServer:
    """A Popen stand-in that records its arguments and has exited (code 3) before answering."""

    calls: list[tuple[list[str], dict[str, str]]] = []
    returncode = 3

    def __init__(self, cmd, env=None, **_kw):
        self.calls.append((list(cmd), dict(env or {})))

    def poll(self):
        return self.returncode


def test_command_line_and_environment_of_the_server(workdir, monkeypatch, capsys):
    (workdir / "mlflow.db").touch()  # a store exists: nothing is created
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")  # overridden: the job executor stays off
    monkeypatch.setattr(subprocess, "Popen", _ExitedServer)
    _ExitedServer.calls.clear()
    port = _free_port()
    assert cli.main(["ui", "--port", str(port), "--host", "127.0.0.1"]) == 1  # the stand-in "exited"
    (cmd, env), = _ExitedServer.calls
    assert cmd[:3] == [sys.executable, "-m", "wavesweep.mlflow_ui"]
    assert cmd[3:] == ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    assert uri not in " ".join(cmd)  # the store (maybe with a password) is not on the command line
    assert env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert env[mlflow_ui.BACKEND_STORE] == env[mlflow_ui.REGISTRY_STORE] == env["MLFLOW_TRACKING_URI"] == uri
    assert env[mlflow_ui.SERVE_ARTIFACTS] == "true" and env[mlflow_ui.ARTIFACT_ROOT] == "mlflow-artifacts:/"
    assert env[mlflow_ui.ARTIFACTS_DESTINATION] == str(workdir / "mlartifacts")  # `mlflow server`'s ./mlartifacts
    assert env[mlflow_ui.IN_JOB_EXECUTOR] == "false" and len(env[mlflow_ui.BOOT_ID]) == 32
    err = capsys.readouterr().err
    assert "stopped (exit code 3) before answering" in err


def test_env_names_are_the_ones_mlflow_reads():
    """The private variables server_env sets are those `mlflow server` sets for its workers."""
    import mlflow.environment_variables as ev
    from mlflow.server import constants

    assert constants.BACKEND_STORE_URI_ENV_VAR == mlflow_ui.BACKEND_STORE
    assert constants.REGISTRY_STORE_URI_ENV_VAR == mlflow_ui.REGISTRY_STORE
    assert constants.ARTIFACT_ROOT_ENV_VAR == mlflow_ui.ARTIFACT_ROOT
    assert constants.SERVE_ARTIFACTS_ENV_VAR == mlflow_ui.SERVE_ARTIFACTS
    assert constants.ARTIFACTS_DESTINATION_ENV_VAR == mlflow_ui.ARTIFACTS_DESTINATION
    assert ev._MLFLOW_SERVER_BOOT_ID.name == mlflow_ui.BOOT_ID
    assert ev._MLFLOW_IN_JOB_EXECUTOR.name == mlflow_ui.IN_JOB_EXECUTOR
    assert ev.MLFLOW_SERVER_ENABLE_JOB_EXECUTION.name == mlflow_ui.JOB_EXECUTION
    mlflow_ui._check_names()


def test_port_in_use_is_one_line_error(workdir, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        assert cli.main(["ui", "--port", str(s.getsockname()[1])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wavesweep: error: port ") and "in use" in err
    assert not (workdir / "mlflow.db").exists()  # refused before any store was created


def test_browse_url():
    assert mlflow_ui.browse_url("0.0.0.0", 5000) == "http://127.0.0.1:5000"
    assert mlflow_ui.browse_url("::", 5000) == "http://[::1]:5000"
    assert mlflow_ui.browse_url("localhost", 80) == "http://localhost:80"


def test_no_mlflow_import_in_the_command(workdir, shared_cache):
    """With a store present, `wavesweep ui` itself imports no MLflow (its server process does)."""
    (workdir / "mlflow.db").touch()
    code = (
        "import subprocess, sys\n"
        "from tests.test_ui import _ExitedServer\n"
        "subprocess.Popen = _ExitedServer\n"
        "from wavesweep import cli\n"
        f"rc = cli.main(['ui', '--port', '{_free_port()}'])\n"
        "print(rc, sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'torch', 'pandas')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=subprocess_env(workdir, shared_cache),
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.stdout.splitlines()[-1] == "1 []", out.stdout + out.stderr


def _get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return json.loads(r.read())


@pytest.mark.slow
def test_ui_answers_health_and_the_experiments_api(workdir, shared_cache):
    """A real `wavesweep ui` on a store with one run: /health, the experiments and runs APIs, the
    web page, the URL line; Ctrl-C (SIGINT to its process group) stops the command and its server."""
    env = subprocess_env(workdir, shared_cache)
    record = ("from wavesweep import tracking\nclient, exp = tracking.init_tracking()\n"
              "run = client.create_run(exp, run_name='one run').info.run_id\n"
              "tracking.log_batch(client, run, params={'method': 'dwt'}, metrics={'top1': 0.5}, tags={'method': 'dwt'})\n")  # fmt: skip
    subprocess.run([sys.executable, "-c", record], cwd=workdir, env=env, check=True, capture_output=True, timeout=120)
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "wavesweep", "ui", "--port", str(port)], cwd=workdir, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    lines = []
    try:
        for line in proc.stdout:  # the URL line comes once the server answers
            lines.append(line)
            if line.startswith("MLflow UI: "):
                break
        assert lines and lines[-1].split()[2] == url, "".join(lines)
        assert urllib.request.urlopen(f"{url}/health", timeout=10).status == 200
        exps = _get_json(f"{url}/ajax-api/2.0/mlflow/experiments/search?max_results=50")["experiments"]
        exp = next(e for e in exps if e["name"] == "wavesweep")
        runs = urllib.request.Request(f"{url}/api/2.0/mlflow/runs/search", method="POST",
                                      data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
                                      headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(runs, timeout=30) as r:
            (run,) = json.loads(r.read())["runs"]
        assert run["info"]["run_name"] == "one run"
        assert {"key": "top1", "value": 0.5} in [{k: m[k] for k in ("key", "value")} for m in run["data"]["metrics"]]
        assert b"<html" in urllib.request.urlopen(f"{url}/", timeout=30).read().lower()
        # an experiment made through the server stores its artifacts through it (mlflow-artifacts:/,
        # in ./mlartifacts): without a destination the upload was refused (503), the listing a 500
        from mlflow import MlflowClient

        client = MlflowClient(url)
        made = client.create_experiment("made in the ui")
        assert client.get_experiment(made).artifact_location == f"mlflow-artifacts:/{made}"
        served = client.create_run(made).info.run_id
        client.log_text(served, "hello", "note.txt")
        assert [f.path for f in client.list_artifacts(served)] == ["note.txt"]
        assert [p.read_text() for p in (workdir / "mlartifacts").rglob("note.txt")] == ["hello"]
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does
        rest, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "wavesweep: interrupted" in rest
    assert not mlflow_ui.answers(url), "the server outlived wavesweep ui"
    assert not any(ln.startswith("Traceback") for ln in rest.splitlines()), rest
