"""``wavesweep ui``: MLflow's own tracking server (UI + REST API) on this project's store, answering in seconds.

Where ``mlflow ui`` spends its start-up (MLflow 3.17, 2 CPU cores): three Python processes one
after another each import MLflow (2.5-4 s apiece): the ``wavesweep`` command, the ``mlflow ui``
command (which opens the store, then spawns uvicorn), and uvicorn's worker, which imports the ASGI
app ``mlflow.server.fastapi_app:app``. By default uvicorn runs 4 such workers, and a job executor
(huey consumers, for MLflow's GenAI jobs) starts beside them; on two cores they compete for ~20 s.

``wavesweep ui`` runs the same app with one import of MLflow: the command itself imports no MLflow
(unless it must create a new store), and starts one process, ``python -m wavesweep.mlflow_ui``,
which opens the store (schema check: an outdated store fails here, with MLflow's message) and
serves ``mlflow.server.fastapi_app:app`` in one uvicorn worker, with the environment that
``mlflow server`` gives its workers (:func:`server_env`; job executor off). The command polls
``/health`` and prints the URL once the server answers. ``mlflow ui`` itself still works on the
same store (``mlflow ui --backend-store-uri sqlite:///mlflow.db``) for MLflow features that need
its job executor.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

APP = "mlflow.server.fastapi_app:app"  # what `mlflow server` runs under uvicorn
WORKERS = 1  # one person browsing runs; every worker is another ~4 s import of MLflow
# The variables `mlflow server` (mlflow.server._run_server) sets for its uvicorn workers, by their
# names in mlflow.server.constants / mlflow.environment_variables (checked by serve()).
BACKEND_STORE, REGISTRY_STORE = "_MLFLOW_SERVER_FILE_STORE", "_MLFLOW_SERVER_REGISTRY_STORE"
ARTIFACT_ROOT, SERVE_ARTIFACTS = "_MLFLOW_SERVER_ARTIFACT_ROOT", "_MLFLOW_SERVER_SERVE_ARTIFACTS"
ARTIFACTS_DESTINATION = "_MLFLOW_SERVER_ARTIFACT_DESTINATION"  # where served artifacts are stored
BOOT_ID, IN_JOB_EXECUTOR, SGI_NAME = "_MLFLOW_SERVER_BOOT_ID", "_MLFLOW_IN_JOB_EXECUTOR", "_MLFLOW_SGI_NAME"
JOB_EXECUTION = "MLFLOW_SERVER_ENABLE_JOB_EXECUTION"
# `mlflow ui`'s default with --serve-artifacts (on): experiments created in the UI store artifacts
# through the server (./mlartifacts); wavesweep's experiments keep their own location (./mlruns).
DEFAULT_ARTIFACT_ROOT = "mlflow-artifacts:/"
DEFAULT_ARTIFACTS_DESTINATION = "mlartifacts"  # `mlflow server --artifacts-destination`'s default, ./mlartifacts


def server_command(host: str, port: int) -> list[str]:
    """The server process's command line (the store travels in the environment, never in ``ps``)."""
    return [sys.executable, "-m", "wavesweep.mlflow_ui", "--host", host, "--port", str(port), "--workers", str(WORKERS)]


def server_env(uri: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """``environ`` plus what ``mlflow server`` gives its workers, for the store ``uri``; job executor off."""
    env = dict(os.environ if environ is None else environ)
    env.update({
        "MLFLOW_TRACKING_URI": uri, BACKEND_STORE: uri, REGISTRY_STORE: uri,
        ARTIFACT_ROOT: env.get(ARTIFACT_ROOT) or DEFAULT_ARTIFACT_ROOT, SERVE_ARTIFACTS: "true",
        # served artifacts need a destination (MLflow's own option, or ./mlartifacts where the
        # command runs): without one an upload was refused (503) and the listing failed (500)
        ARTIFACTS_DESTINATION: env.get(ARTIFACTS_DESTINATION) or env.get("MLFLOW_ARTIFACTS_DESTINATION")
        or os.path.abspath(DEFAULT_ARTIFACTS_DESTINATION),
        # scorer code is never executed in the server process (MLflow's confinement checks these)
        BOOT_ID: uuid.uuid4().hex, IN_JOB_EXECUTOR: "false", SGI_NAME: "uvicorn",
        JOB_EXECUTION: "false",
    })  # fmt: skip
    return env


def local_host(host: str) -> str:
    """The address to reach a server listening on ``host`` from this machine."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "::1"
    return host


def browse_url(host: str, port: int) -> str:
    h = local_host(host)
    return f"http://[{h}]:{port}" if ":" in h else f"http://{h}:{port}"


def port_taken(host: str, port: int) -> bool:
    """Whether something already listens there (its /health would be mistaken for ours)."""
    try:
        with socket.create_connection((local_host(host), port), timeout=0.5):
            return True
    except OSError:
        return False


def answers(url: str, timeout: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def wait_until_answers(proc: subprocess.Popen, url: str, poll_s: float = 0.1) -> bool:
    """Poll ``url``/health until it answers (True) or the server process has exited (False)."""
    while proc.poll() is None:
        if answers(url):
            return proc.poll() is None
        time.sleep(poll_s)
    return False


@contextlib.contextmanager
def started(host: str, port: int, uri: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """The server process on ``uri`` and the URL to browse. Ctrl-C reaches the server too (same
    process group); a stop that reaches only this process (SIGTERM) is passed on by :func:`stop`."""
    from wavesweep import interrupt

    proc = subprocess.Popen(server_command(host, port), env=server_env(uri))
    try:
        yield proc, browse_url(host, port)
    except KeyboardInterrupt:
        with interrupt.ignored():
            stop(proc)
        raise


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM (uvicorn shuts down gracefully), then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --------------------------------------------------------------------------- the server process


def _check_names() -> None:
    """The variables set by server_env are the ones this MLflow reads; else fail with one line."""
    import mlflow.environment_variables as ev
    from mlflow.server import constants

    expected = {
        "BACKEND_STORE_URI_ENV_VAR": BACKEND_STORE, "REGISTRY_STORE_URI_ENV_VAR": REGISTRY_STORE,
        "ARTIFACT_ROOT_ENV_VAR": ARTIFACT_ROOT, "SERVE_ARTIFACTS_ENV_VAR": SERVE_ARTIFACTS,
        "ARTIFACTS_DESTINATION_ENV_VAR": ARTIFACTS_DESTINATION,
    }  # fmt: skip
    wrong = [k for k, v in expected.items() if getattr(constants, k, None) != v]
    wrong += [k for k, v in (("_MLFLOW_SERVER_BOOT_ID", BOOT_ID), ("_MLFLOW_IN_JOB_EXECUTOR", IN_JOB_EXECUTOR))
              if getattr(getattr(ev, k, None), "name", v) != v]  # fmt: skip
    if wrong:
        raise SystemExit(f"wavesweep ui: this MLflow names its server settings differently ({', '.join(wrong)}); "
                         "use `mlflow ui --backend-store-uri URI` instead")  # fmt: skip


def _exit_with_parent() -> None:
    """Stop (SIGTERM to this process: uvicorn's graceful shutdown) once ``wavesweep ui`` is gone,
    even when it was killed with SIGKILL: no server is left behind on the port."""
    import threading

    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="wavesweep-ui-parent-watch").start()


def serve(argv: list[str] | None = None) -> int:
    """``python -m wavesweep.mlflow_ui --host H --port P``: open the store, then serve until stopped."""
    p = argparse.ArgumentParser(prog="python -m wavesweep.mlflow_ui", description="MLflow's server for `wavesweep ui`")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--workers", type=int, default=WORKERS)
    args = p.parse_args(argv)
    uri = os.environ.get(BACKEND_STORE)
    if not uri:
        raise SystemExit("wavesweep ui: no store given (start it with `wavesweep ui`)")
    # MLflow's import of starlette's WSGI adapter warns on every start; it is not the user's to fix.
    warnings.filterwarnings("ignore", message=r".*starlette\.middleware\.wsgi is deprecated.*")
    import uvicorn  # first: mlflow.server decides at import whether it runs as a server

    import mlflow.server
    from mlflow.server.handlers import initialize_backend_stores

    _check_names()
    _exit_with_parent()
    initialize_backend_stores(uri, os.environ.get(REGISTRY_STORE) or uri, os.environ.get(ARTIFACT_ROOT))
    log_config = Path(mlflow.server.__file__).with_name("uvicorn_log_config.yaml")
    kwargs = {"log_config": str(log_config)} if log_config.is_file() else {}
    uvicorn.run(APP, host=args.host, port=args.port, workers=args.workers, **kwargs)
    return 0


if __name__ == "__main__":
    sys.exit(serve())
