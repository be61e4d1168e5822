"""Nothing lost, nothing silently wrong: killed and SIGTERMed workers, SIGTERM of a trial, full disks,
bad storage URLs, retries and chosen configurations. Optuna storage and MLflow are the oracles.

Subprocess tests shorten Optuna's heartbeat (``WAVESWEEP_HEARTBEAT_S``/``WAVESWEEP_GRACE_S``) so a
dead worker's trial is detected in seconds, and make trials slow enough to be caught running
(a few fine-tuning steps).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from tests.conftest import subprocess_env
from tests.test_study import run_cli, tiny_weights, write_spec  # noqa: F401 - tiny_weights is a fixture
from wavesweep import study
from wavesweep.config import MAX_TIMING_BATCHES, TrialConfig

SLOW_TRIAL = {"timing_batches": 0, "layout": "filter", "level": 2, "recovery": "finetune", "finetune_steps": 200}  # long enough that two workers overlap
# A trial held at its recovery while the file WAVESWEEP_TEST_HOLD exists (a sitecustomize hook:
# ``held``): two workers' trials overlap for as long as a test needs, however loaded the machine,
# and once the file is gone the trials and their retries run at full speed (a few fine-tuning steps).
# SLOW_TRIAL's 200 steps, which these tests used before, cost every trial and retry about 20 s more
# than 5 steps (one thread, 2-core machine): three tests took 207 s, now 128 s.
HELD_TRIAL = {"timing_batches": 0, "layout": "filter", "level": 2, "recovery": "finetune", "finetune_steps": 5}
HOLD_AT_RECOVERY = '''
import os, time
import wavesweep.recovery as _recovery

_recover = _recovery.recover
def recover(*args, **kwargs):
    while os.path.exists(os.environ["WAVESWEEP_TEST_HOLD"]):  # a stop (SIGTERM, SIGINT) lands in this sleep
        time.sleep(0.1)
    return _recover(*args, **kwargs)
_recovery.recover = recover
'''
WIDE_SPACE = {"percentile": {"low": 5.0, "high": 95.0}, "wavelet": ["haar", "db2"]}


def spawn(workdir: Path, shared_cache: Path, *argv: str, name: str, concurrent: bool = False,
          env: dict[str, str] | None = None, fresh_store: bool = False) -> subprocess.Popen:
    env = env or subprocess_env(workdir, shared_cache, concurrent=concurrent, fresh_store=fresh_store) | {"WAVESWEEP_HEARTBEAT_S": "1", "WAVESWEEP_GRACE_S": "4"}
    out = open(workdir / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "wavesweep", *argv], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)


def exit_code(p: subprocess.Popen, timeout: float) -> int:
    """``p.wait(timeout)``; a process past its time is killed before the test fails (a resume left
    running went on for minutes after its test, on a machine already loaded)."""
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        raise


def wait_for(predicate, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def trials(workdir: Path, name: str = "tiny") -> list[optuna.trial.FrozenTrial]:
    try:
        return optuna.load_study(study_name=name, storage=f"sqlite:///{workdir / 'optuna.db'}").get_trials()
    except (KeyError, Exception):  # noqa: BLE001 - not created yet
        return []


def running_with_run(workdir: Path) -> list[optuna.trial.FrozenTrial]:
    return [t for t in trials(workdir) if t.state == TrialState.RUNNING and "mlflow_run_id" in t.user_attrs]


def sql_count(db: Path, query: str) -> int:
    import sqlite3

    if not db.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1)) as conn:
            return int(conn.execute(query).fetchone()[0])
    except sqlite3.Error:
        return 0


def mlflow_runs(workdir: Path) -> list:
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exps = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(exps, max_results=10000)


def spawned_workers(pid: int) -> list[int]:
    """Child processes of ``pid`` started by multiprocessing's spawn (not its resource tracker)."""
    out = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmd:
            out.append(int(proc.name))
    return out


def assert_retried_with_same_params(all_trials: list[optuna.trial.FrozenTrial], failed: optuna.trial.FrozenTrial) -> None:
    retries = [t for t in all_trials if failed.number in t.system_attrs.get("retry_history", [])]
    assert retries, f"trial {failed.number} was not retried"
    assert all(t.params == failed.params for t in retries)
    assert any(t.state == TrialState.COMPLETE for t in retries)


# --------------------------------------------------------------------------- fast: one-line errors


STORAGE_ERRORS = [
    ("bogus://x", ["unknown database 'bogus'"]),
    ("not a url", ["'not a url' is not a database URL"]),
    ("{workdir}", ["is not a database URL", "a directory"]),
    ("sqlite:///{workdir}", ["is a directory"]),
    ("sqlite:////nonexistent-wavesweep/dir/x.db", ["'/nonexistent-wavesweep/dir' does not exist"]),
    ("sqlite://", ["in-memory"]),
    ("{workdir}/no/such/s.journal", ["does not exist"]),
    ("postgresql://user:secret@127.0.0.1:1/optuna", ['pip install "psycopg[binary]"', "postgres"]),
]


@pytest.mark.parametrize("url,needles", STORAGE_ERRORS, ids=[u for u, _ in STORAGE_ERRORS])
def test_bad_storage_is_a_one_line_error_and_creates_nothing(workdir, capsys, monkeypatch, url, needles):
    url = url.format(workdir=workdir)
    if url.startswith("postgresql"):  # the driver is missing: as on a machine without the postgres extra
        for mod in ("psycopg", "psycopg2"):
            monkeypatch.setitem(sys.modules, mod, None)
    spec = write_spec(workdir / "tiny.yaml", "w.pt")
    before = set(workdir.iterdir())
    assert run_cli("study", str(spec), "-q", "--storage", url) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("wavesweep: error: storage "), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "secret" not in err  # credentials never echoed
    assert set(workdir.iterdir()) == before, "nothing is created for a bad storage"
    assert not Path("/nonexistent-wavesweep").exists()


@pytest.mark.parametrize("value", ["-5", "0", "nan", "inf"])
def test_bad_timeout_is_a_one_line_error(workdir, capsys, value):
    spec = write_spec(workdir / "tiny.yaml", "w.pt")
    assert run_cli("study", str(spec), "-q", f"--timeout={value}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("wavesweep: error: timeout=") and "positive, finite" in err and len(err.splitlines()) == 1
    assert not (workdir / "optuna.db").exists()


def test_string_n_trials_with_grid_is_a_one_line_error(workdir, capsys):
    spec = write_spec(workdir / "tiny.yaml", "w.pt", n_trials="10", sampler={"name": "grid"})
    assert run_cli("study", str(spec), "-q") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "n_trials must be a positive integer, got '10'" in err and "tiny.yaml:" in err


def test_timing_batches_is_bounded():
    with pytest.raises(ValueError, match=rf"^timing_batches=100000 is above the limit of {MAX_TIMING_BATCHES}$"):
        TrialConfig(timing_batches=100000)
    assert TrialConfig(timing_batches=MAX_TIMING_BATCHES).timing_batches == MAX_TIMING_BATCHES


def test_timing_is_off_by_default_in_accuracy_studies(workdir):
    fixed = {"layout": "filter"}
    acc = study.load_spec(write_spec(workdir / "a.yaml", "w.pt", fixed=fixed))
    assert acc.fixed["timing_batches"] == 0
    timed = study.load_spec(write_spec(workdir / "b.yaml", "w.pt", fixed=fixed, objectives={"top1": "maximize", "infer_median_ms": "minimize"}))
    assert "timing_batches" not in timed.fixed  # TrialConfig's default (timing on)
    explicit = study.load_spec(write_spec(workdir / "c.yaml", "w.pt", fixed={"timing_batches": 2}))
    assert explicit.fixed["timing_batches"] == 2


@pytest.mark.slow  # three 3-trial studies
def test_a_given_sampler_seed_repeats_a_study(workdir, tiny_weights, capsys):
    """A launch's sampler seed is the spec's mixed with a random salt (launchers on several
    machines must differ); ``--sampler-seed N`` takes N as is, so the same study launched afresh
    proposes the same configurations, TPE's model phase included (n_startup_trials: 1)."""
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, sampler={"name": "tpe", "seed": 3, "n_startup_trials": 1},
                      space={"percentile": {"low": 10, "high": 90}, "wavelet": ["haar", "db2"]})  # fmt: skip
    runs = {}
    for db, extra in [("a", ["--sampler-seed", "7"]), ("b", ["--sampler-seed", "7"]), ("c", [])]:
        assert run_cli("study", str(spec), "-q", "--storage", f"sqlite:///{workdir / db}.db", *extra) == 0
        ts = optuna.load_study(study_name="tiny", storage=f"sqlite:///{workdir / db}.db").get_trials()
        runs[db] = [(t.params, t.user_attrs["sampler_seed"]) for t in ts]
    assert len(runs["a"]) == 3 and runs["a"] == runs["b"]
    assert {seed for _, seed in runs["a"]} == {7}
    assert {seed for _, seed in runs["c"]} != {7} and len({seed for _, seed in runs["c"]}) == 1


@pytest.mark.parametrize("value,needle", [("-1", "--sampler-seed=-1 must be an integer in 0..2147483647"),
                                          ("2147483647", "in 0..2147483646 (worker i uses it + i, 2 workers)")])  # fmt: skip
def test_a_bad_sampler_seed_is_one_line(workdir, capsys, value, needle):
    spec = write_spec(workdir / "tiny.yaml", "w.pt")
    workers = ["--workers", "2"] if value == "2147483647" else []
    assert run_cli("study", str(spec), "--sampler-seed", value, *workers) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny.yaml"]


def test_dry_run_prints_the_resolved_spec_and_creates_nothing(workdir, capsys):
    spec = write_spec(workdir / "tiny.yaml", "w.pt")
    argv = ["study", str(spec), "--dry-run", "--set", "n_trials=7", "--set", "eval_limit=100", "--set", "sampler.seed=11",
            "--set", "wavelet=db2", "--enqueue", "percentile=60"]  # fmt: skip
    assert run_cli(*argv) == 0
    import yaml

    out = capsys.readouterr().out
    doc = yaml.safe_load(out)
    assert doc["n_trials"] == 7 and doc["sampler"] == {"name": "random", "seed": 11}
    assert doc["fixed"]["eval_limit"] == 100 and doc["fixed"]["wavelet"] == "db2"
    assert doc["space"] == {"percentile": [20, 40, 60, 80]}  # wavelet pinned by --set: no longer searched
    assert doc["enqueued first"] == [{"percentile": 60}]
    assert doc["a launch here would stop"] == ["weights file 'w.pt' does not exist"]  # not made here
    assert sorted(p.name for p in workdir.iterdir()) == ["tiny.yaml"]


@pytest.mark.parametrize("argv,needle", [
    (["--set", "nosuch=1"], "error: --set nosuch=...: unknown spec key or trial parameter 'nosuch'; valid: base, batch_size,"),
    (["--set", "nosuch.x=1"], "error: --set nosuch.x=...: unknown spec key 'nosuch'; valid: base, description,"),
    (["--set", "n_trials"], "is not KEY=VALUE"),
    (["--set", "n_trials=-1"], "tiny.yaml: --set n_trials: n_trials must be a positive integer, got -1"),
    # a bad value from the command line is not blamed on a line of the file
    (["--set", "sampler.seed=abc"], "tiny.yaml: --set sampler.seed: seed must be an integer, got 'abc'"),
    (["--set", "eval_limit=-3"], "tiny.yaml: --set eval_limit: fixed.eval_limit: eval_limit=-3 must be >= 0"),
    (["--set", "sampler.n_startup_trials=x"], "tiny.yaml: --set sampler.n_startup_trials: unknown RandomSampler option"),
    (["--set", "sampler.name=nope"], "sampler (with --set sampler.name): unknown sampler 'nope'"),
    # the spec has no pruner key: no line of the file is named (it said tiny.yaml:1)
    (["--set", "pruner.name=nope"], "/tiny.yaml: pruner (with --set pruner.name): unknown pruner 'nope'"),
    # pinning every searched parameter: the command line emptied the space, not the file (it named only the file's line)
    (["--set", "percentile=30", "--set", "wavelet=haar"], "space (with --set percentile, wavelet): name at least one searched parameter"),
    (["--enqueue", "percentile=65"], "percentile=65 is not one of its choices [20, 40, 60, 80]"),
    (["--enqueue", "level=3"], "level: not a searched parameter"),
])  # fmt: skip
def test_set_and_enqueue_errors_are_one_line(workdir, capsys, argv, needle):
    spec = write_spec(workdir / "tiny.yaml", "w.pt")
    assert run_cli("study", str(spec), "--dry-run", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


# --------------------------------------------------------------------------- SIGTERM, kill -9


@pytest.mark.slow
def test_sigterm_of_a_trial_leaves_no_running_run(workdir, tiny_weights, shared_cache):
    argv = ["trial", "--model", "cnn", "--weights", tiny_weights, "--eval-limit", "40", "--timing-batches", "0",
            "--recovery", "finetune", "--finetune-steps", "200", "-q"]  # fmt: skip
    p = spawn(workdir, shared_cache, *argv, name="trial")
    try:
        wait_for(lambda: sql_count(workdir / "mlflow.db", "SELECT count(*) FROM runs WHERE status = 'RUNNING'") >= 1, 240,
                 "the trial's MLflow runs")  # read with sqlite3: an MLflow client would race the schema creation
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=120) == 143
    finally:
        p.kill()
    log = (workdir / "trial.log").read_text()
    assert log.strip().splitlines()[-1] == "wavesweep: interrupted (SIGTERM)" and "Traceback" not in log, log[-2000:]
    runs = mlflow_runs(workdir)
    assert runs and not [r for r in runs if r.info.status == "RUNNING"]
    for r in runs:
        assert r.info.status == "KILLED" and r.data.tags["error"] == "interrupted (SIGTERM)"


def _hooked_env(workdir: Path, shared_cache: Path, hook: str, *, fresh_store: bool = False) -> dict[str, str]:
    """``spawn``'s environment with ``hook`` run at the start of every Python process (a
    ``sitecustomize`` module on the path): a stand-in for what takes time in a real run."""
    folder = workdir / "hook"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(hook)
    env = subprocess_env(workdir, shared_cache, fresh_store=fresh_store) | {"WAVESWEEP_HEARTBEAT_S": "1", "WAVESWEEP_GRACE_S": "4"}
    env["PYTHONPATH"] = f"{folder}{os.pathsep}{env['PYTHONPATH']}"
    return env


def held(workdir: Path, shared_cache: Path) -> tuple[dict[str, str], Path]:
    """``spawn``'s environment in which every trial waits at its recovery (``HOLD_AT_RECOVERY``)
    while the returned file exists; the file is created here, and a test deletes it to let go."""
    hold = workdir / "hold"
    hold.touch()
    return _hooked_env(workdir, shared_cache, HOLD_AT_RECOVERY) | {"WAVESWEEP_TEST_HOLD": str(hold)}, hold


#: a sitecustomize hook whose exit handler, registered first so it runs last, writes ``exiting`` and
#: keeps the process 3 s in its exit
SLOW_EXIT = (
    "import atexit, os, time\n"
    "def slow_exit():\n"
    "    open('exiting', 'w').close()\n"
    "    time.sleep(3)\n"
    "atexit.register(slow_exit)\n"
)


@pytest.mark.slow
def test_a_second_sigterm_while_the_process_exits_after_a_stop_does_not_kill_it(workdir, tiny_weights, shared_cache):
    """A scheduler that sends SIGTERM twice, or a second Ctrl-C: the first closed the trial's runs
    KILLED and printed its line, but once the command had handled it the default handlers were
    back, and a second SIGTERM in the process's last moments (its exit took 0.5-1 s on this
    machine; the hook below makes it 3 s) killed it by the signal: status -15, not exit 143.
    After a stop, both signals are ignored until the process has exited."""
    hook = SLOW_EXIT  # the process stays 3 s in its exit handlers
    argv = ["trial", "--model", "cnn", "--weights", tiny_weights, "--eval-limit", "40", "--timing-batches", "0",
            "--recovery", "finetune", "--finetune-steps", "200", "-q"]  # fmt: skip
    out = open(workdir / "trial.log", "w")  # noqa: SIM115 - closed with the process
    p = subprocess.Popen([sys.executable, "-m", "wavesweep", *argv], cwd=workdir, env=_hooked_env(workdir, shared_cache, hook),
                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: sql_count(workdir / "mlflow.db", "SELECT count(*) FROM runs WHERE status = 'RUNNING'") >= 1, 240,
                 "the trial's MLflow runs")  # fmt: skip
        time.sleep(1.0)
        p.send_signal(signal.SIGTERM)
        wait_for(lambda: (workdir / "exiting").exists() or p.poll() is not None, 120, "the process to exit")
        assert p.poll() is None, "the hook keeps the process in its exit for 3 s"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 143
    finally:
        p.kill()
    log = (workdir / "trial.log").read_text()
    assert log.strip().splitlines()[-1] == "wavesweep: interrupted (SIGTERM)" and "Traceback" not in log, log[-2000:]
    runs = mlflow_runs(workdir)
    assert runs and {(r.info.status, r.data.tags["error"]) for r in runs} == {("KILLED", "interrupted (SIGTERM)")}


@pytest.mark.slow
def test_a_sigterm_while_a_finished_trial_exits_does_not_change_its_exit(workdir, tiny_weights, shared_cache):
    """A trial that finished (runs FINISHED, its table printed) and a SIGTERM in its exit handlers
    (a scheduler's time limit landing then): the process died by the signal, status -15. Once the
    command has returned, the signals are ignored: exit 0, the runs as they were."""
    hook = SLOW_EXIT  # the process stays 3 s in its exit handlers
    argv = ["trial", "--model", "cnn", "--weights", tiny_weights, "--eval-limit", "40", "--timing-batches", "0",
            "--recovery", "none", "-q"]  # fmt: skip
    out = open(workdir / "trial.log", "w")  # noqa: SIM115 - closed with the process
    p = subprocess.Popen([sys.executable, "-m", "wavesweep", *argv], cwd=workdir, env=_hooked_env(workdir, shared_cache, hook),
                         stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: (workdir / "exiting").exists() or p.poll() is not None, 300, "the process to exit")
        assert p.poll() is None, "the hook keeps the process in its exit for 3 s"
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == 0
    finally:
        p.kill()
    log = (workdir / "trial.log").read_text()
    assert "Traceback" not in log and "interrupted" not in log and "\ntrial run " in log, log[-2000:]
    runs = mlflow_runs(workdir)
    assert runs and {r.info.status for r in runs} == {"FINISHED"}


@pytest.mark.slow
def test_ctrl_c_while_a_spawned_worker_starts_is_one_line(workdir, tiny_weights, shared_cache):
    """Ctrl-C (SIGINT to the terminal's process group) in the first seconds of `--workers 2`: the
    spawned worker was still importing torch, MLflow and Optuna, before its handlers were in place,
    and printed a KeyboardInterrupt traceback from inside an import. Workers now start with both
    signals blocked and take the stop once their handlers are set: exit 130, one line, no traceback
    (the launcher's line saying it waits for the worker comes before it)."""
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=4, fixed=SLOW_TRIAL, space=WIDE_SPACE)
    p = spawn(workdir, shared_cache, "study", str(spec), "-q", "--workers", "2", name="launch")
    try:
        wait_for(lambda: spawned_workers(p.pid), 240, "the spawned worker")
        time.sleep(0.5)  # it runs Python (its imports take seconds), not yet wavesweep
        for pid in (p.pid, *spawned_workers(p.pid)):  # what a terminal's Ctrl-C does (pytest's group is theirs too)
            os.kill(pid, signal.SIGINT)
        assert p.wait(timeout=240) == 130
    finally:
        p.kill()
    log = (workdir / "launch.log").read_text()
    assert "Traceback" not in log and log.strip().splitlines()[-1] == "wavesweep: interrupted (KeyboardInterrupt)", log[-3000:]
    # while it waits, the launcher says for what (it stayed silent for seconds)
    assert "KeyboardInterrupt: waiting for 1 spawned worker to stop" in log, log[-3000:]
    assert not [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"]
    assert TrialState.RUNNING not in [t.state for t in trials(workdir)]


CTRL_C_IN_EXEC = '''
import signal, sys

class CtrlCInExec:
    """Ctrl-C while the command runs code given to exec() as a string (an import does so for every
    dataclass and namedtuple it defines): at its first import once its stop handler is in place."""

    done = False

    def find_spec(self, name, path=None, target=None):
        handler = signal.getsignal(signal.SIGINT)  # wavesweep's: a Python function, not Python's own
        if not CtrlCInExec.done and callable(handler) and handler is not signal.default_int_handler:
            CtrlCInExec.done = True
            exec("import os, signal, time\\nos.kill(os.getpid(), signal.SIGINT)\\ntime.sleep(30)", {})
        return None

sys.meta_path.insert(0, CtrlCInExec())
'''


@pytest.mark.slow  # three CLI processes, seconds each
@pytest.mark.parametrize("argv", [["trial", "--model", "cnn", "-q"], ["study", "tiny.yaml", "-q"], ["results", "--out", "r.md"]],
                         ids=["trial", "study", "results"])  # fmt: skip
def test_ctrl_c_inside_exec_of_a_string_exits_130_not_by_the_signal(workdir, shared_cache, argv):
    """`python -m wavesweep` (MLproject's commands, the tests') handled such a Ctrl-C (one line,
    runs KILLED), returned 130, and then died by SIGINT (status -2): CPython records a
    KeyboardInterrupt out of exec()/eval() of a string as unhandled, caught or not, and at exit
    kills a `-m` process with SIGINT for it, unless another such exec() came after (mostly one
    did: the launcher of `--workers 2` failed this way rarely, after its one line)."""
    env = _hooked_env(workdir, shared_cache, CTRL_C_IN_EXEC)
    # started as from a terminal, with SIGINT's default action (a process inherits an ignored SIGINT:
    # then Python leaves it ignored and the hook's Ctrl-C did nothing)
    p = subprocess.run([sys.executable, "-m", "wavesweep", *argv], cwd=workdir, env=env, capture_output=True, text=True,
                       timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    assert "Traceback" not in p.stderr and p.stderr.strip().splitlines()[-1] == "wavesweep: interrupted (KeyboardInterrupt)", p.stderr
    assert p.returncode == 130


def kill_one_worker(workdir, launcher) -> None:
    """Once two trials run, kill -9 the launcher's one spawned worker (it dies without any cleanup)."""
    wait_for(lambda: len(running_with_run(workdir)) == 2, 300, "two running trials")
    workers = spawned_workers(launcher.pid)
    assert len(workers) == 1
    os.kill(workers[0], signal.SIGKILL)


@pytest.mark.slow
def test_killed_and_sigtermed_workers_then_one_resume_reaches_the_total(workdir, tiny_weights, shared_cache):
    # two trials: both are running (held) when the worker is killed and the launcher stopped, so the
    # resume's whole total is the two retried
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2, fixed=HELD_TRIAL, space=WIDE_SPACE)
    env, hold = held(workdir, shared_cache)
    p = spawn(workdir, shared_cache, "study", str(spec), "-q", "--workers", "2", name="launch", env=env)
    try:
        kill_one_worker(workdir, p)
        time.sleep(0.5)
        p.send_signal(signal.SIGTERM)  # the launcher is stopped as `timeout` or Slurm would
        assert p.wait(timeout=180) == 143
    finally:
        p.kill()
    hold.unlink()
    log = (workdir / "launch.log").read_text()
    assert "wavesweep: interrupted (SIGTERM)" in log and "Traceback" not in log, log[-3000:]
    before = {t.number: t for t in trials(workdir)}
    interrupted = [t for t in before.values() if t.state == TrialState.FAIL and t.user_attrs.get("interrupted")]
    lost = [t for t in before.values() if t.state == TrialState.RUNNING]
    assert len(interrupted) == 1 and len(lost) == 1, {n: t.state for n, t in before.items()}

    resume = spawn(workdir, shared_cache, "study", str(spec), "-q", name="resume")
    assert exit_code(resume, 400) == 0, (workdir / "resume.log").read_text()[-3000:]
    assert "storage has no heartbeat" not in (workdir / "resume.log").read_text()  # the old, wrong warning
    after = trials(workdir)
    states = [t.state for t in after]
    assert states.count(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in states and TrialState.WAITING not in states
    for t in (*interrupted, *lost):
        assert_retried_with_same_params(after, t)
    runs = mlflow_runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"], "no MLflow run is left RUNNING"
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[lost[0].user_attrs["mlflow_run_id"]].info.status == "FAILED"
    assert "worker lost" in by_id[lost[0].user_attrs["mlflow_run_id"]].data.tags["error"]
    assert by_id[interrupted[0].user_attrs["mlflow_run_id"]].data.tags["error"] == "interrupted (SIGTERM)"
    trial_runs = [r for r in runs if r.data.tags.get("wavesweep.kind") == "trial" and r.info.status == "FINISHED"]
    assert len(trial_runs) == 2


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody has reaped yet has stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_spawned_worker_stops_when_its_launcher_is_killed_alone(workdir, tiny_weights, shared_cache):
    """kill -9 of the launcher's pid alone (not its process group): its spawned worker ran on,
    orphaned, taking trials for a launch that was gone. It now gets SIGTERM when its launcher
    dies, closes its trial KILLED (interrupted) and exits; a relaunch reaches the total (the two
    trials running when the launcher died, retried)."""
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2, fixed=HELD_TRIAL, space=WIDE_SPACE)
    env, hold = held(workdir, shared_cache)  # the worker's trial is held: only the launcher's death ends it
    p = spawn(workdir, shared_cache, "study", str(spec), "-q", "--workers", "2", name="launch", env=env)
    child = None
    try:
        wait_for(lambda: len(running_with_run(workdir)) == 2, 300, "two running trials")
        (child,) = spawned_workers(p.pid)
        p.kill()
        p.wait(timeout=60)
        wait_for(lambda: not _alive(child), 120, "the orphaned worker to stop")
    finally:
        p.kill()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)
    hold.unlink()
    assert "Traceback" not in (workdir / "launch.log").read_text()
    by_id = {r.info.run_id: r for r in mlflow_runs(workdir)}
    closed = [t for t in trials(workdir) if t.state == TrialState.FAIL and t.user_attrs.get("interrupted")]
    assert len(closed) == 1, {t.number: t.state for t in trials(workdir)}  # the worker's; the launcher's died RUNNING
    assert by_id[closed[0].user_attrs["mlflow_run_id"]].info.status == "KILLED"
    resume = spawn(workdir, shared_cache, "study", str(spec), "-q", name="resume")
    assert exit_code(resume, 400) == 0, (workdir / "resume.log").read_text()[-3000:]
    states = [t.state for t in trials(workdir)]
    assert states.count(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in states
    assert not [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_a_killed_worker_is_rerun_by_its_own_launcher(workdir, tiny_weights, shared_cache):
    """kill -9 of a worker while its launcher goes on: the launcher waits for the heartbeat grace
    period, re-runs the lost trial with the same params, and ends at the exact total (exit 0): two
    trials, the launcher's own and the lost one retried."""
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2, fixed=HELD_TRIAL, space=WIDE_SPACE)
    env, hold = held(workdir, shared_cache)
    p = spawn(workdir, shared_cache, "study", str(spec), "-q", "--workers", "2", name="launch", env=env)
    try:
        kill_one_worker(workdir, p)
        hold.unlink()  # the launcher's own trial goes on, then the lost one's retry
        assert p.wait(timeout=400) == 0, (workdir / "launch.log").read_text()[-3000:]
    finally:
        p.kill()
    log = (workdir / "launch.log").read_text()
    assert "Traceback" not in log and "was killed by signal 9" in log, log[-3000:]
    after = trials(workdir)
    states = [t.state for t in after]
    assert states.count(TrialState.COMPLETE) == 2 and TrialState.RUNNING not in states and TrialState.WAITING not in states
    lost = [t for t in after if t.state == TrialState.FAIL]
    assert len(lost) == 1 and "interrupted" not in lost[0].user_attrs
    assert_retried_with_same_params(after, lost[0])
    runs = {r.info.run_id: r for r in mlflow_runs(workdir)}
    assert not [r for r in runs.values() if r.info.status == "RUNNING"]
    assert runs[lost[0].user_attrs["mlflow_run_id"]].info.status == "FAILED"
    assert "worker lost" in runs[lost[0].user_attrs["mlflow_run_id"]].data.tags["error"]
    study_run = [r for r in runs.values() if r.data.tags.get("wavesweep.kind") == "study"]
    assert [r.info.status for r in study_run] == ["FINISHED"] and study_run[0].data.metrics["n_complete"] == 2


@pytest.mark.slow
def test_journal_storage_short_of_its_total_exits_1_and_closes_the_study_run(workdir, tiny_weights, capsys):
    """A journal file has no heartbeats: a RUNNING trial of a process that may be dead is not waited
    for; the launch says how many trials are missing, exits 1 and leaves no run RUNNING."""
    from optuna.storages.journal import JournalFileBackend

    journal = workdir / "s.journal"
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2, storage=str(journal))
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    space = {"percentile": optuna.distributions.CategoricalDistribution([20, 40, 60, 80]),
             "wavelet": optuna.distributions.CategoricalDistribution(["haar", "db2"])}  # fmt: skip
    optuna.create_study(study_name="tiny", storage=storage, direction="maximize").ask(space)  # a worker that died
    assert run_cli("study", str(spec), "-q") == 1
    err = capsys.readouterr().err
    assert "1 of 2 trials missing; 1 trial(s) are RUNNING in a storage without heartbeats" in err, err
    runs = mlflow_runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"], [(r.data.tags.get("wavesweep.kind"), r.info.status) for r in runs]
    study_run = next(r for r in runs if r.data.tags.get("wavesweep.kind") == "study")
    assert study_run.info.status == "FAILED" and "1 of 2 trials missing" in study_run.data.tags["error"]
    assert "relaunch with --requeue-running" in err

    # no launcher runs any more: the dead worker's trial is failed and re-run with its params
    assert run_cli("study", str(spec), "-q", "--requeue-running") == 0
    trials = optuna.load_study(study_name="tiny", storage=storage).get_trials()
    assert [t.state for t in trials].count(TrialState.RUNNING) == 0
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 2
    dead, retry = trials[0], next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert dead.state == TrialState.FAIL and retry.state == TrialState.COMPLETE and retry.params == dead.params
    runs = mlflow_runs(workdir)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    study_run = next(r for r in runs if r.data.tags.get("wavesweep.kind") == "study")
    assert study_run.info.status == "FINISHED" and "error" not in study_run.data.tags


@pytest.mark.slow
def test_a_launcher_that_stops_first_reports_a_partial_view_not_a_final_summary(workdir, tiny_weights, capsys):
    """Another launcher's trial is still RUNNING when this one stops (its timeout): the summary says
    "so far (not final)", no report is written and the study run stays open; the launcher that
    finishes last closes it with the study's final numbers."""
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2)
    s = optuna.create_study(study_name="tiny", storage=study.DEFAULT_STORAGE, direction="maximize")
    other = s.ask()  # another launcher's trial, running (no heartbeat recorded: never stale)
    assert run_cli("study", str(spec), "-q", "--timeout", "10") == 0  # one trial, then waits out its timeout
    out, err = capsys.readouterr()
    assert "study tiny so far (not final): 1 complete" in out and "1 trial(s) still running in other launchers" in err, (out, err)
    assert "report:" not in out and not (workdir / "reports").exists()
    client = MlflowClient()
    run_id = optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE).user_attrs["mlflow_run_id"]
    assert client.get_run(run_id).info.status == "RUNNING"  # left to the launcher still running

    s.tell(other, state=TrialState.FAIL)  # the other launcher's trial ends (failed: one more is needed)
    assert run_cli("study", str(spec), "-q") == 0  # the last launcher
    out = capsys.readouterr().out
    assert "study tiny: 2 complete, 0 pruned, 1 failed" in out and "report:" in out, out
    final = client.get_run(run_id)
    assert final.info.status == "FINISHED" and final.data.metrics["n_complete"] == 2


@pytest.mark.slow
def test_a_launcher_starting_while_another_opens_the_study_run_shares_it(workdir, tiny_weights, monkeypatch):
    """Two launchers started at once on a fresh study: A created the study and is opening its MLflow
    study run when B loads the study. B opened a second study run and nested its trials there (two
    study runs, the trials split between them; seen with two launchers and an MLflow server). B
    now waits for A's run and records its trials under it."""
    import time as time_module

    from wavesweep import tracking
    from wavesweep.study.storage import create_study

    path = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=1)
    spec = study.load_spec(path)
    created = create_study(spec, study.DEFAULT_STORAGE)  # launcher A: the study exists, its run not yet recorded
    client, exp = tracking.init_tracking()
    a_run = tracking.start_study_run(client, exp, study_name="tiny", storage=study.DEFAULT_STORAGE, spec_file=path,
                                     spec_text=spec.text, params=spec.summary_params())  # fmt: skip
    real_sleep = time_module.sleep

    def sleep(seconds):  # while B waits, A records its study run
        if "mlflow_run_id" not in created.user_attrs:
            created.set_user_attr("mlflow_run_id", a_run)
        real_sleep(min(seconds, 0.05))

    monkeypatch.setattr(time_module, "sleep", sleep)
    assert run_cli("study", str(path), "-q") == 0  # launcher B
    runs = mlflow_runs(workdir)
    assert [r.info.run_id for r in runs if r.data.tags.get("wavesweep.kind") == "study"] == [a_run]
    trial_runs = [r for r in runs if r.data.tags.get("wavesweep.kind") == "trial"]
    assert len(trial_runs) == 1 and trial_runs[0].data.tags["mlflow.parentRunId"] == a_run
    assert optuna.load_study(study_name="tiny", storage=study.DEFAULT_STORAGE).user_attrs["mlflow_run_id"] == a_run


@pytest.mark.slow
def test_two_launchers_on_a_fresh_tpe_study_run_distinct_configurations(workdir, tiny_weights, shared_cache):
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=4, space=WIDE_SPACE, sampler={"name": "tpe", "seed": 0})
    procs = [spawn(workdir, shared_cache, "study", str(spec), "-q", name=f"l{i}", concurrent=True, fresh_store=True)
             for i in range(2)]  # both create the MLflow store too, as two launchers in a new project do
    for i, p in enumerate(procs):
        assert p.wait(timeout=400) == 0, (workdir / f"l{i}.log").read_text()[-3000:]
    done = [t for t in trials(workdir) if t.state == TrialState.COMPLETE]
    assert len(done) == 4
    configs = {tuple(sorted(t.params.items())) for t in done}
    assert len(configs) == 4, [t.params for t in done]
    seeds = {t.user_attrs["sampler_seed"] for t in done}
    assert len(seeds) >= 2, "each launcher seeds its own sampler"
    assert not [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_interrupted_tpe_trial_is_retried_with_its_params_and_enqueue_runs_first(workdir, tiny_weights, monkeypatch):
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=3, space=WIDE_SPACE, sampler={"name": "tpe", "seed": 0})
    from wavesweep import tracked_trial

    real, calls = tracked_trial.run_trial, []

    def ctrl_c_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tracked_trial, "run_trial", ctrl_c_on_second)
    assert run_cli("study", str(spec), "-q") == 130
    monkeypatch.setattr(tracked_trial, "run_trial", real)
    first = {t.number: t for t in trials(workdir)}
    assert [first[n].state for n in sorted(first)] == [TrialState.COMPLETE, TrialState.FAIL]
    assert first[1].user_attrs["interrupted"] is True

    assert run_cli("study", str(spec), "-q", "--enqueue", "percentile=33.5,wavelet=db2") == 0
    after = {t.number: t for t in trials(workdir)}
    assert sorted(after) == [0, 1, 2, 3]
    assert after[2].params == first[1].params and after[2].state == TrialState.COMPLETE  # the retry, first
    assert after[2].system_attrs["failed_trial"] == 1 and "error" not in after[2].user_attrs
    assert after[3].params == {"percentile": 33.5, "wavelet": "db2"} and after[3].state == TrialState.COMPLETE
    client = MlflowClient()
    assert client.get_run(after[2].user_attrs["mlflow_run_id"]).info.status == "FINISHED"
    assert client.get_run(first[1].user_attrs["mlflow_run_id"]).info.status == "KILLED"


# --------------------------------------------------------------------------- full disk


def _tmpfs(mnt: Path, options: str):
    """A tmpfs mounted at ``mnt`` with ``options`` for the test's duration (skipped where mounting
    is not allowed)."""
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def full_disk(tmp_path):
    """A 256 KiB tmpfs: too small for a trial's artifacts (skipped where mounting is not allowed)."""
    yield from _tmpfs(tmp_path / "small", "size=256k")


@pytest.mark.slow
def test_a_full_artifact_disk_leaves_no_partial_file_and_no_running_run(workdir, tiny_weights, full_disk, capsys):
    client = MlflowClient()
    client.create_experiment("full", artifact_location=full_disk.as_uri())
    filler = full_disk / "filler"
    filler.write_bytes(b"\0" * (200 * 1024))  # leaves ~56 KiB: the small files fit, the checkpoint does not
    capsys.readouterr()
    rc = run_cli("trial", "--model", "cnn", "--weights", tiny_weights, "--eval-limit", "40", "--timing-batches", "0",
                 "--recovery", "none", "--save-baselines", "true", "-q", "--experiment", "full")  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("wavesweep: error: no space left on the device"), err
    runs = client.search_runs([client.get_experiment_by_name("full").experiment_id])
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FAILED"}
    assert all("No space left" in r.data.tags["error"] or "ENOSPC" in r.data.tags["error"] for r in runs), [r.data.tags.get("error") for r in runs]
    left = [p for p in full_disk.rglob("*") if p.is_file() and p != filler]
    assert not [p for p in left if p.suffix == ".wsz"], left  # no checkpoint, whole or partial
    for p in left:  # whatever small file is left is complete (it parses)
        assert p.stat().st_size > 0


def test_a_full_cache_disk_names_the_file_that_did_not_fit(workdir, full_disk, monkeypatch):
    """A base model trained into a full WAVESWEEP_CACHE: torch.save's error holds only the errno
    (a RuntimeError from an OSError without a filename), so the one line was "no space left on the
    device: ... put the store elsewhere", not saying it was the cache (the MLflow store had room).
    It now names the cache file; no partial file is left."""
    from wavesweep import train
    from wavesweep.failures import environment_error

    monkeypatch.setenv("WAVESWEEP_CACHE", str(full_disk))
    filler = full_disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # every byte of the tmpfs: the model file does not fit
        with contextlib.suppress(OSError):
            while True:
                fh.write(b"\0" * 4096)
    fast = train.TrainConfig(epochs=1, batch_size=64, lr=3e-3)
    with pytest.raises(Exception) as info:
        train.get_base_model("mlp", "digits", train_config=fast, device="cpu", progress=False)
    path = train.cache_path("mlp", "digits", 0, fast.resolved("cpu"), data=train.data_fingerprint(train.load_dataset("digits")))
    assert environment_error(info.value) == (f"no space left on the device while writing {str(path)!r}: free some "
                                             f"space or point WAVESWEEP_CACHE elsewhere (it is {str(full_disk.resolve())!r})")  # fmt: skip
    assert [p.name for p in full_disk.rglob("*") if p.is_file() and p != filler] == [path.with_suffix(".lock").name]


def test_an_unreachable_database_is_one_line_and_exit_1(workdir, capsys):
    """A PostgreSQL storage whose server is not there (connection refused): one line naming the
    failure, exit 1, no traceback, no password."""
    pytest.importorskip("psycopg")
    spec = write_spec(workdir / "unreachable.yaml", "", n_trials=1)
    capsys.readouterr()
    rc = run_cli("study", str(spec), "-q", "--storage", "postgresql://someone@127.0.0.1:1/nowhere")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("wavesweep: error: database: ") and "127.0.0.1" in err[0] and "refused" in err[0], err


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty read-only mount (skipped where mounting is not allowed)."""
    yield from _tmpfs(tmp_path / "ro", "ro,size=64k")


def test_a_storage_on_a_read_only_file_system_is_one_line_and_exit_1(workdir, read_only_dir, capsys):
    """A SQLite storage in a folder mounted read-only: one line naming it, exit 1, no run left
    RUNNING. It was a traceback (OSError EROFS creating the lock file beside the database)."""
    spec = write_spec(workdir / "ro.yaml", "", n_trials=1)
    capsys.readouterr()
    rc = run_cli("study", str(spec), "-q", "--storage", f"sqlite:///{read_only_dir / 'optuna.db'}")
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1, err
    assert err[0].startswith("wavesweep: error: read-only file system: cannot write") and str(read_only_dir) in err[0], err
    assert not [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"]


def test_environment_errors_are_found_through_the_exception_chain():
    import errno
    import sqlite3

    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from wavesweep.failures import environment_error

    full = OSError(errno.ENOSPC, "No space left on device", "/mnt/artifacts/dwt.wsz")
    try:
        try:
            raise full
        except OSError as exc:
            raise MlflowException("failed to upload") from exc
    except MlflowException as wrapped:
        msg = environment_error(wrapped)
    assert msg == "no space left on the device while writing '/mnt/artifacts/dwt.wsz': free some space or put the store elsewhere"
    db_full = sqlalchemy.exc.OperationalError("INSERT ...", {}, sqlite3.OperationalError("database or disk is full"))
    assert environment_error(db_full) == "database: database or disk is full"
    assert environment_error(ValueError("bad value")) is None
    assert environment_error(OSError(errno.EACCES, "Permission denied")) is None
    assert environment_error(OSError(errno.EROFS, "Read-only file system", "/ro/optuna.db.lock")) == (
        "read-only file system: cannot write '/ro/optuna.db.lock': put the store on a writable file system")
    # a file in the cache (base models, base evaluations): the remedy is WAVESWEEP_CACHE, not a store
    cache = Path(os.environ.get("WAVESWEEP_CACHE") or Path.home() / ".cache" / "wavesweep").expanduser().resolve()
    assert environment_error(OSError(errno.EROFS, "Read-only file system", str(cache / "models" / "m.lock"))) == (
        f"read-only file system: cannot write {str(cache / 'models' / 'm.lock')!r}: point WAVESWEEP_CACHE at a "
        f"folder on a writable file system (it is {str(cache)!r})")


def test_a_study_report_uploads_its_own_files_only(workdir):
    """Two launchers finishing together write one report folder: the upload takes the files this
    launcher wrote (linked first), never another's temporary file, even one that vanishes."""
    from wavesweep import tracking

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("reports")).info.run_id
    out = workdir / "reports" / "s"
    out.mkdir(parents=True)
    files = [out / "summary.md", out / "plot.png"]
    for i, p in enumerate(files):
        p.write_bytes(b"x" * (10 + i))
    stray = out / ".plot.png.abc123.tmp"  # another launcher's file in flight
    stray.write_bytes(b"partial")
    real_link = os.link

    def link_then_vanish(src, dst):  # the other launcher renames its file while this one uploads
        real_link(src, dst)
        stray.unlink(missing_ok=True)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking.os, "link", link_then_vanish)
        tracking.log_study_report(client, run_id, files)
    listed = {a.path: a.file_size for a in client.list_artifacts(run_id, "report")}
    assert listed == {"report/summary.md": 10, "report/plot.png": 11}


def test_a_finished_study_run_keeps_an_earlier_launchs_error_as_history(workdir):
    """A launch that fell short closed the study run FAILED while another launcher still ran; when
    that one closes it FINISHED, the old error becomes ``error.previous``, not the run's state."""
    from wavesweep import tracking

    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("history")).info.run_id
    tracking.close_run(client, run_id, "FAILED", error="1 of 2 trials missing", children=False)
    tracking.keep_error_as_history(client, run_id)
    tracking.close_run(client, run_id, "FINISHED", children=False)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and "error" not in run.data.tags
    assert run.data.tags["error.previous"] == "1 of 2 trials missing"
    tracking.keep_error_as_history(client, run_id)  # nothing to move: unchanged
    assert client.get_run(run_id).data.tags["error.previous"] == "1 of 2 trials missing"


# --------------------------------------------------------------------------- stops at the edges


def _kind_status(workdir: Path) -> list[tuple[str, str]]:
    return sorted((r.data.tags.get("wavesweep.kind", ""), r.info.status) for r in mlflow_runs(workdir))


@pytest.mark.slow
def test_a_stop_while_a_finished_trial_is_recorded_retracts_its_run_and_the_retry_counts_once(workdir, tiny_weights, monkeypatch):
    """The trial's MLflow run is FINISHED before Optuna has its numbers (dozens of writes): a stop
    there fails the Optuna trial, so the run and its method runs are retracted (KILLED, tag
    optuna.state=FAIL) and the resume's retry is the only FINISHED run of those params."""
    from wavesweep.study import objective

    # a continuous space: no configuration proposed twice, so every trial runs (a repeat would not)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=3, space=WIDE_SPACE)
    real, calls = objective._set_user_attrs, []

    def stop_recording_the_second(trial, attrs):
        if "examples_evaluated" in attrs:  # the trial's record, after its run finished
            calls.append(trial.number)
            if len(calls) == 2:
                raise KeyboardInterrupt
        real(trial, attrs)

    monkeypatch.setattr(objective, "_set_user_attrs", stop_recording_the_second)
    assert run_cli("study", str(spec), "-q") == 130
    monkeypatch.setattr(objective, "_set_user_attrs", real)
    first = {t.number: t for t in trials(workdir)}
    assert first[1].state == TrialState.FAIL and first[1].user_attrs["interrupted"] is True
    client = MlflowClient()
    stopped = client.get_run(first[1].user_attrs["mlflow_run_id"])
    assert stopped.info.status == "KILLED" and stopped.data.tags["optuna.state"] == "FAIL"
    assert stopped.data.tags["error"] == "interrupted while recording the trial (KeyboardInterrupt)"
    kids = client.search_runs([stopped.info.experiment_id], f"tags.`mlflow.parentRunId` = '{stopped.info.run_id}'")
    assert len(kids) == 3 and {k.info.status for k in kids} == {"KILLED"}

    assert run_cli("study", str(spec), "-q") == 0
    after = {t.number: t for t in trials(workdir)}
    assert sum(t.state == TrialState.COMPLETE for t in after.values()) == 3
    finished = [r for r in mlflow_runs(workdir) if r.data.tags.get("wavesweep.kind") == "trial" and r.info.status == "FINISHED"]
    assert len(finished) == 3  # not 4: the retracted run does not count beside its retry
    complete_runs = {t.user_attrs["mlflow_run_id"] for t in after.values() if t.state == TrialState.COMPLETE}
    assert {r.info.run_id for r in finished} == complete_runs
    assert not [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_a_stop_whose_cleanup_fails_still_stops_the_study(workdir, tiny_weights, monkeypatch):
    """Closing the stopped trial's runs fails (a database locked past its timeout): the stop, not
    that error, propagates. Before, the study took it for an ordinary failed trial, went on deaf
    to further signals and exited 0. The resume closes the run left RUNNING and retries the trial."""
    from mlflow.exceptions import MlflowException

    from wavesweep import tracked_trial, tracking

    # a continuous space: no configuration proposed twice, so every trial runs (a repeat would not)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=3, space=WIDE_SPACE)
    real_trial, calls = tracked_trial.run_trial, []

    def ctrl_c_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_trial(*args, **kwargs)

    real_finish = tracking.TrialRun.finish

    def locked(self, status="FINISHED", **kw):
        if status == "KILLED":
            raise MlflowException("(sqlite3.OperationalError) database is locked")
        return real_finish(self, status, **kw)

    monkeypatch.setattr(tracked_trial, "run_trial", ctrl_c_on_second)
    monkeypatch.setattr(tracking.TrialRun, "finish", locked)
    assert run_cli("study", str(spec), "-q") == 130
    assert len(calls) == 2  # no trial started after the stop
    monkeypatch.setattr(tracked_trial, "run_trial", real_trial)
    monkeypatch.setattr(tracking.TrialRun, "finish", real_finish)
    first = {t.number: t for t in trials(workdir)}
    assert first[1].state == TrialState.FAIL and first[1].user_attrs["interrupted"] is True
    assert MlflowClient().get_run(first[1].user_attrs["mlflow_run_id"]).info.status == "RUNNING"  # the close failed
    assert run_cli("study", str(spec), "-q") == 0
    assert MlflowClient().get_run(first[1].user_attrs["mlflow_run_id"]).info.status == "FAILED"  # reconciled
    after = trials(workdir)
    assert sum(t.state == TrialState.COMPLETE for t in after) == 3
    assert any(t.params == first[1].params and t.state == TrialState.COMPLETE for t in after)  # retried
    assert not [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"]


def test_a_stop_while_a_trial_run_records_its_parameters_closes_it(workdir, monkeypatch):
    """The run exists once create_run returns: a stop before the trial's own cleanup is set up
    (while its parameters are logged) closes it KILLED, not RUNNING for good."""
    from wavesweep import tracked_trial, tracking

    real = tracking.log_batch

    def stop_on_params(client, run_id, **kw):
        if "code_version" in (kw.get("params") or {}):
            raise KeyboardInterrupt
        return real(client, run_id, **kw)

    monkeypatch.setattr(tracking, "log_batch", stop_on_params)
    with pytest.raises(KeyboardInterrupt):
        tracked_trial.run_tracked_trial(TrialConfig(model="cnn", eval_limit=40, timing_batches=0), experiment="edge")
    runs = mlflow_runs(workdir)
    assert [(r.data.tags["wavesweep.kind"], r.info.status) for r in runs] == [("trial", "KILLED")]
    assert runs[0].data.tags["error"] == "while recording its parameters: KeyboardInterrupt"


def _stub_tracked_work(monkeypatch, fail_at: int | None = None) -> None:
    """A tracked trial or configuration without a model: the trial's result holds what is recorded
    of it, ``log_trial`` only creates the three method runs, a configuration's replicates are
    trial runs closed FINISHED at once. Call ``fail_at`` (1-based) of the trial raises RuntimeError."""
    from types import SimpleNamespace

    from wavesweep import tracked_config, tracked_trial, tracking

    calls = []

    def fake_run_trial(cfg, **kw):
        calls.append(cfg.seed)
        if len(calls) == fail_at:
            raise RuntimeError("disk on fire")
        return SimpleNamespace(config=cfg, phase_seconds={}, metrics=lambda: {"parent": {"top1": 0.5 + cfg.seed / 10}},
                               release=lambda: None)  # fmt: skip

    def fake_tracked_trial(cfg, *, parent_run_id, experiment, on_run, **kw):
        result = fake_run_trial(cfg)
        client, exp = tracking.init_tracking(experiment=experiment)
        rid = client.create_run(exp, tags={"wavesweep.kind": "trial", "mlflow.parentRunId": parent_run_id}).info.run_id
        on_run(rid)
        client.set_terminated(rid, "FINISHED")
        return result, rid

    monkeypatch.setattr(tracked_trial, "resolve_base", lambda cfg, progress=False: None)
    monkeypatch.setattr(tracked_trial, "run_trial", fake_run_trial)
    monkeypatch.setattr(tracked_trial, "_write_checkpoints", lambda result, folder, methods: {})
    monkeypatch.setattr(tracking, "log_trial", lambda run, result, checkpoint_files: [run.child(m) for m in ("dwt", "magnitude", "random")])
    monkeypatch.setattr(tracked_config, "run_tracked_trial", fake_tracked_trial)


def _sigterm_when_closing(monkeypatch, status: str) -> None:
    """A real SIGTERM to this process as the first close with ``status`` starts (before it writes)."""
    from wavesweep import tracking

    real, sent = tracking.close_run, []

    def close_run(client, run_id, st, **kw):
        if st == status and not sent:
            sent.append(run_id)
            os.kill(os.getpid(), signal.SIGTERM)  # the handler of stop_signals raises here, or it is ignored
        return real(client, run_id, st, **kw)

    monkeypatch.setattr(tracking, "close_run", close_run)


def _run_tracked(kind: str) -> None:
    from wavesweep.tracked_config import run_tracked_configuration
    from wavesweep.tracked_trial import run_tracked_trial

    cfg = TrialConfig(model="cnn", eval_limit=40, timing_batches=0)
    run_tracked_trial(cfg, experiment="edge") if kind == "trial" else run_tracked_configuration(cfg, 2, experiment="edge")


@pytest.mark.parametrize("kind", ["trial", "configuration"])
def test_a_stop_while_a_finished_trial_or_configuration_closes_leaves_no_running_run(workdir, monkeypatch, kind):
    """The FINISHED close (the parent and its children, several writes) came after the try that
    closes runs on a stop: a SIGTERM landing in it left every run of the trial (or the
    configuration run) RUNNING for good. It is part of the work now: the stop closes them KILLED."""
    from wavesweep import interrupt

    _stub_tracked_work(monkeypatch)
    _sigterm_when_closing(monkeypatch, "FINISHED")
    with pytest.raises(interrupt.Terminated), interrupt.stop_signals():
        _run_tracked(kind)
    runs = mlflow_runs(workdir)
    parent = next(r for r in runs if r.data.tags.get("wavesweep.kind") == kind)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert parent.info.status == "KILLED" and "SIGTERM" in parent.data.tags["error"]


@pytest.mark.parametrize("kind", ["trial", "configuration"])
def test_a_stop_while_a_failed_trial_or_configuration_closes_leaves_no_running_run(workdir, monkeypatch, kind):
    """The FAILED close of a trial (or configuration) whose work raised ran with the stop handler
    live: a SIGTERM landing in it raised out of the close before it wrote, and the runs stayed
    RUNNING. Signals are held while they close: FAILED, and then the stop, which was ignored
    (dropped: a study went on with its next trial) before, is raised with the error as its context."""
    from wavesweep import interrupt

    _stub_tracked_work(monkeypatch, fail_at=1 if kind == "trial" else 2)
    _sigterm_when_closing(monkeypatch, "FAILED")
    raised = None
    with interrupt.stop_signals():
        try:
            _run_tracked(kind)
        except BaseException as exc:  # noqa: BLE001 - a stop cutting the close short fails the test, not pytest
            raised = exc
    assert isinstance(raised, interrupt.Terminated), repr(raised)
    assert isinstance(raised.__context__, RuntimeError) and str(raised.__context__) == "disk on fire", repr(raised.__context__)
    runs = mlflow_runs(workdir)
    parent = next(r for r in runs if r.data.tags.get("wavesweep.kind") == kind)
    assert not [r for r in runs if r.info.status == "RUNNING"]
    assert parent.info.status == "FAILED" and "RuntimeError: disk on fire" in parent.data.tags["error"]


def test_a_stop_while_a_failed_study_trial_closes_stops_the_study(workdir, tiny_weights, monkeypatch, capsys):
    """A SIGTERM (Slurm's, `timeout`'s) landing while a failed trial closed its runs was ignored, and
    dropped: the study went on with its next trials as if nothing had been asked (here they failed
    too, until max_failures: exit 1). The stop is held while the runs close, then stops the study:
    the trial's run FAILED with its error, the study run KILLED, exit 143, one line."""
    from wavesweep import tracked_trial

    def broken(cfg, **kw):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(tracked_trial, "run_trial", broken)
    _sigterm_when_closing(monkeypatch, "FAILED")
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=3)
    assert run_cli("study", str(spec), "-q") == 143
    assert capsys.readouterr().err.strip().splitlines()[-1] == "wavesweep: interrupted (SIGTERM)"
    ts = trials(workdir)
    assert [t.state for t in ts] == [TrialState.FAIL], [(t.number, t.state.name, t.user_attrs.get("error")) for t in ts]
    runs = {r.data.tags.get("wavesweep.kind"): r for r in mlflow_runs(workdir) if r.data.tags.get("wavesweep.kind") in ("trial", "study")}
    assert (runs["trial"].info.status, runs["trial"].data.tags["error"]) == ("FAILED", "RuntimeError: disk on fire")
    assert (runs["study"].info.status, runs["study"].data.tags["error"]) == ("KILLED", "interrupted (SIGTERM)")
    assert not [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"]


@pytest.mark.parametrize("where", ["setup", "spec"])
def test_a_stop_while_a_study_sets_up_closes_its_study_run(workdir, tiny_weights, monkeypatch, where):
    """A stop after the study run exists and before the trials start (reconciling, requeueing;
    or while the study run records its spec) closes it KILLED."""
    from wavesweep import tracking
    from wavesweep.study import workers

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(*((workers, "_reconcile_mlflow") if where == "setup" else (tracking, "_log_files")), stop)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2)
    assert run_cli("study", str(spec), "-q") == 130
    assert _kind_status(workdir) == [("study", "KILLED")]


def _storage_full(*a, **k):
    import sqlalchemy.exc

    raise sqlalchemy.exc.OperationalError("INSERT INTO trials ...", {}, Exception("database or disk is full"))


@pytest.mark.parametrize("where", ["setup", "trials"])
def test_a_storage_error_after_the_study_run_opened_closes_it_failed(workdir, tiny_weights, monkeypatch, capsys, where):
    """The Optuna storage fails (full, read-only, gone) after the study run was opened: one line,
    exit 1, and the study run closed FAILED with the error. It was left RUNNING (only a stop closed it)."""
    from wavesweep.study import workers

    monkeypatch.setattr(workers, "_reconcile_mlflow" if where == "setup" else "_worker_loop", _storage_full)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2)
    capsys.readouterr()
    assert run_cli("study", str(spec), "-q") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wavesweep: error: database: database or disk is full"], err
    (run,) = mlflow_runs(workdir)
    assert (run.data.tags["wavesweep.kind"], run.info.status) == ("study", "FAILED")
    assert run.data.tags["error"] == "database: database or disk is full"


def test_a_storage_error_in_worker_0_stops_the_spawned_workers(workdir, tiny_weights, monkeypatch, capsys):
    """--workers 2, the launcher's own worker fails on its storage: the launch fails (exit 1, the
    study run FAILED) and its spawned worker is stopped with it. It was left running trials for the
    failed launch (the launcher waiting for it at exit, its trials nested under a closed study run)."""
    import multiprocessing

    from wavesweep.study import workers

    monkeypatch.setattr(workers, "_worker_loop", _storage_full)  # this process only: the spawned worker runs the real loop
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2)
    try:
        assert run_cli("study", str(spec), "-q", "--workers", "2") == 1
        assert multiprocessing.active_children() == [], "the spawned worker outlives its failed launch"
    finally:
        for p in multiprocessing.active_children():
            p.kill()
            p.join()
    assert [s for k, s in _kind_status(workdir) if k == "study"] == ["FAILED"]
    assert not [s for _k, s in _kind_status(workdir) if s == "RUNNING"]


def test_a_failed_trial_beside_a_finished_run_is_reconciled(workdir):
    """A worker killed (kill -9) while recording a finished trial in Optuna: the trial is FAIL, its
    run FINISHED. The next launch retracts the run and its method runs (FAILED, optuna.state=FAIL)."""
    from wavesweep import tracking
    from wavesweep.study import workers

    client = MlflowClient()
    exp = client.create_experiment("reconcile")
    run = client.create_run(exp, tags={"wavesweep.kind": "trial"}).info.run_id
    kid = client.create_run(exp, tags={"wavesweep.kind": "method", "mlflow.parentRunId": run}).info.run_id
    other = client.create_run(exp, tags={"wavesweep.kind": "trial"}).info.run_id
    for rid in (kid, run, other):
        tracking.close_run(client, rid, "FINISHED", children=False)
    st = optuna.create_study()
    for rid, state in ((run, TrialState.FAIL), (other, TrialState.COMPLETE)):
        t = st.ask()
        t.set_user_attr("mlflow_run_id", rid)
        st.tell(t, 1.0 if state == TrialState.COMPLETE else None, state=state)
    workers._reconcile_mlflow(st, client)
    assert [client.get_run(r).info.status for r in (run, kid, other)] == ["FAILED", "FAILED", "FINISHED"]
    assert client.get_run(run).data.tags["optuna.state"] == "FAIL"


def test_a_lost_worker_whose_run_finished_is_retracted_by_the_heartbeat(workdir):
    """A worker killed (kill -9) while recording a finished trial in Optuna, with its launcher going
    on: the heartbeat fails the trial and re-queues it in this launch, so its FINISHED run and
    method runs are retracted then (FAILED, optuna.state=FAIL), not left to count beside the retry."""
    from wavesweep import tracking
    from wavesweep.study import storage

    client = MlflowClient()
    exp = client.create_experiment("stale")
    finished = client.create_run(exp, tags={"wavesweep.kind": "trial"}).info.run_id
    kid = client.create_run(exp, tags={"wavesweep.kind": "method", "mlflow.parentRunId": finished}).info.run_id
    for rid in (kid, finished):
        tracking.close_run(client, rid, "FINISHED", children=False)
    running = client.create_run(exp, tags={"wavesweep.kind": "trial"}).info.run_id
    st = optuna.create_study()
    lost = [st.ask() for _ in range(2)]  # both RUNNING when their worker died
    for t, rid in zip(lost, (finished, running)):
        t.suggest_float("percentile", 0, 100)
        t.set_user_attr("mlflow_run_id", rid)
    for t in lost:
        st.tell(t, state=TrialState.FAIL)  # what fail_stale_trials does before calling back
        storage._on_stale_trial(st, st.trials[t.number])
    assert [client.get_run(r).info.status for r in (finished, kid, running)] == ["FAILED", "FAILED", "FAILED"]
    assert {client.get_run(r).data.tags["optuna.state"] for r in (finished, kid, running)} == {"FAIL"}
    waiting = st.get_trials(states=(TrialState.WAITING,))
    assert sorted(t.system_attrs["failed_trial"] for t in waiting) == [0, 1]
    assert [t.params for t in waiting] == [t.params for t in st.trials[:2]]


def _waiting_worker(workdir: Path, index: int, barrier, widen_s: float) -> None:
    """A spawned worker of a launch whose total is reached: its loop fails the lost trial it finds
    (``_worker_loop``'s own call), then returns. Optuna's read of the trial's state and its write of
    FAIL are ``widen_s`` apart here, so that workers that look at once overlap as they can by chance."""
    from optuna.storages import RDBStorage

    from wavesweep.study import workers

    check = RDBStorage.check_trial_is_updatable

    def slow_check(self, trial_id, state):
        check(self, trial_id, state)
        time.sleep(widen_s)

    RDBStorage.check_trial_is_updatable = slow_check
    spec = study.load_spec(workdir / "tiny.yaml")
    launch = workers.Launch(spec=spec, storage_url=f"sqlite:///{workdir / 'optuna.db'}", n_trials=1, timeout=None,
                            parent_run_id="-", experiment=None, lock_path=workdir / ".tiny.slots.lock")  # fmt: skip
    barrier.wait()
    workers._worker_loop(launch, index)


@pytest.mark.slow  # three spawned processes
@pytest.mark.filterwarnings("ignore:Heartbeat of storage is supposed to be used with Study.optimize")  # the test asks a trial by hand
def test_a_lost_trial_found_by_several_workers_at_once_is_requeued_once(workdir, monkeypatch):
    """Workers waiting for the last trials look for lost ones (no heartbeat) every loop. On SQLite
    nothing made Optuna's "read RUNNING, write FAIL" atomic, and that call was made outside the
    slot lock: three workers that found one lost trial at once each failed it and each re-queued it
    (three WAITING copies, with the read and the write 2 s apart), so its configuration ran three
    times, taking the slots of two others (a grid lost two points). Under the lock: re-queued once."""
    import multiprocessing

    from wavesweep.study.storage import create_study, open_storage

    monkeypatch.setenv("WAVESWEEP_HEARTBEAT_S", "1")
    monkeypatch.setenv("WAVESWEEP_GRACE_S", "1")
    spec_path = write_spec(workdir / "tiny.yaml", "w.pt", n_trials=1)
    spec = study.load_spec(spec_path)
    url = f"sqlite:///{workdir / 'optuna.db'}"
    storage = open_storage(url)
    st = create_study(spec, url, storage)
    done = st.ask()
    for p in spec.space:
        p.suggest(done)
    st.tell(done, 0.5)  # the total (1) is reached: the workers only look for lost trials
    lost = st.ask()
    for p in spec.space:
        p.suggest(lost)
    storage.record_heartbeat(lost._trial_id)  # its worker was killed after this beat
    time.sleep(1.5)  # past the grace period
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(3)
    procs = [ctx.Process(target=_waiting_worker, args=(workdir, i, barrier, 2.0)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    trials = st.get_trials()
    assert trials[lost.number].state == TrialState.FAIL
    retries = [t for t in trials if lost.number in t.system_attrs.get("retry_history", [])]
    assert [(t.state, t.params) for t in retries] == [(TrialState.WAITING, trials[lost.number].params)]


@pytest.mark.slow  # a 3-trial study
def test_a_failed_trial_queued_twice_by_two_machines_runs_once(workdir, tiny_weights):
    """Launchers on machines that share no slot lock (PostgreSQL) may each re-queue the same failed
    trial at one moment: two WAITING copies. The second ran it again (a repeat, counted, so a grid
    lost a point). It is now surplus (FAIL, not counted, not retried) and the study runs the
    configuration once and samples the rest."""
    from wavesweep.study.storage import create_study, open_storage, retry

    spec_path = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=3)
    spec = study.load_spec(spec_path)
    url = f"sqlite:///{workdir / 'optuna.db'}"
    st = create_study(spec, url, open_storage(url))
    stopped = st.ask()
    for p in spec.space:
        p.suggest(stopped)
    stopped.set_user_attr("interrupted", True)
    st.tell(stopped, state=TrialState.FAIL)
    frozen = st.get_trials()[stopped.number]
    retry(st, frozen)  # one machine's launcher
    retry(st, frozen)  # another's, at the same moment
    assert run_cli("study", str(spec_path), "-q") == 0
    ts = trials(workdir)
    copies = [t for t in ts if stopped.number in t.system_attrs.get("retry_history", [])]
    assert [(t.state, bool(t.user_attrs.get("surplus"))) for t in copies] == [(TrialState.COMPLETE, False), (TrialState.FAIL, True)]
    assert copies[0].params == frozen.params and "repeat_of" not in copies[0].user_attrs
    assert copies[1].values is None and "mlflow_run_id" not in copies[1].user_attrs  # not run
    # the total counts the configuration once (a sampled trial may still repeat one by chance)
    assert [t.state for t in ts].count(TrialState.COMPLETE) == 3


def test_optunas_failed_with_value_none_line_is_dropped_only_for_a_stop():
    """After a stop Optuna logs "Trial N failed with value None."; the CLI's one line says it."""
    import logging

    from wavesweep import interrupt
    from wavesweep.study import workers

    f = workers._DropInterruptTracebacks()
    rec = logging.LogRecord("optuna", logging.WARNING, __file__, 1, "Trial %d failed with value %s.", (3, None), None)
    assert f.filter(rec)  # no stop: a real failure is shown
    with interrupt.stop_signals():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
        except KeyboardInterrupt as exc:
            assert not f.filter(rec)
            interrupt.caught(exc)
    assert f.filter(rec)


@pytest.mark.parametrize("argv,needle", [
    (["trial", "--seed", "-1", "-q"], "seed=-1 must be an integer in 0..2147483647"),
    (["trial", "--seed", str(2**31), "-q"], f"seed={2**31} must be an integer in 0..2147483647"),
    (["study", "SPEC", "--set", "seed=-1", "--dry-run"], "seed=-1 must be an integer in 0..2147483647"),
    (["study", "SPEC", "--workers", "0", "--dry-run"], "--workers=0 must be an integer >= 1"),
    (["study", "SPEC", "--workers", "-1", "--dry-run"], "--workers=-1 must be an integer >= 1"),
    # a typo started a thousand worker processes, each importing torch: the machine stalled
    (["study", "SPEC", "--workers", "1000", "--dry-run"], f"--workers=1000 is above the limit of {max(2, os.cpu_count() or 1)} here"),
])  # fmt: skip
def test_bad_seed_and_workers_are_one_line(workdir, tiny_weights, capsys, argv, needle):
    spec = write_spec(workdir / "tiny.yaml", tiny_weights)
    assert run_cli(*[str(spec) if a == "SPEC" else a for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err
    assert not (workdir / "mlruns").exists() or not mlflow_runs(workdir)


@pytest.mark.slow  # two tiny studies
@pytest.mark.parametrize("raised, code", [(KeyboardInterrupt, 130), (ValueError("registry said no"), 2)], ids=["stop", "error"])
def test_a_stop_or_error_after_the_study_run_closed_keeps_its_status(workdir, tiny_weights, monkeypatch, raised, code):
    """`mlflow run -e study`: the study run is the run `mlflow run` created. A stop or an error
    while the report is written (after the study run was closed FINISHED) keeps FINISHED, which
    records the complete study, and says what happened in the tag ``error_after_close``."""
    from wavesweep import cli, tracking

    client, exp = tracking.init_tracking(experiment="launched")
    launched = client.create_run(exp).info.run_id  # as `mlflow run` creates it
    monkeypatch.setenv("MLFLOW_RUN_ID", launched)

    def stop_in_report(*a, **k):
        assert MlflowClient().get_run(launched).info.status == "FINISHED"  # the study run was closed before
        raise raised

    monkeypatch.setattr(cli, "_report", stop_in_report)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=1)
    assert run_cli("study", str(spec), "-q") == code
    run = MlflowClient().get_run(launched)
    assert run.data.tags["wavesweep.kind"] == "study" and run.info.status == "FINISHED"
    assert "error" not in run.data.tags
    expected = "interrupted (KeyboardInterrupt)" if code == 130 else "registry said no"
    assert run.data.tags["error_after_close"] == expected


def test_a_failure_of_a_launched_run_still_running_closes_it(workdir):
    """The other side of the rule above: a launched run still RUNNING is closed with the error, and
    one whose error was already recorded where it happened is left as it is."""
    from wavesweep import tracking
    from wavesweep.failures import tag_launched_run

    client, exp = tracking.init_tracking(experiment="launched")
    running, recorded = (client.create_run(exp).info.run_id for _ in range(2))
    tracking.close_run(client, recorded, "FAILED", error="where it happened", children=False)
    tag_launched_run(running, "interrupted (SIGTERM)", status="KILLED")
    tag_launched_run(recorded, "the same error, reported by the CLI")
    a, b = (MlflowClient().get_run(r) for r in (running, recorded))
    assert (a.info.status, a.data.tags["error"]) == ("KILLED", "interrupted (SIGTERM)")
    assert (b.info.status, b.data.tags["error"]) == ("FAILED", "where it happened")
    assert "error_after_close" not in a.data.tags and "error_after_close" not in b.data.tags


@pytest.mark.slow  # a 4-point grid study
def test_a_grid_point_that_failed_is_run_again_in_the_same_launch(workdir, tiny_weights, monkeypatch, capsys):
    """Optuna's grid counts a failed point as visited: once the others were taken it ran a visited
    point again in its place, and the launch ended with exit 0, one point never run and another
    run twice. The failed point is now queued again at once: every point COMPLETE exactly once."""
    from wavesweep.study import objective

    real = objective.run_tracked_trial
    failed = []

    def fail_once(cfg, **kw):
        if (cfg.wavelet, cfg.percentile) == ("haar", 40.0) and not failed:
            failed.append(1)
            raise RuntimeError("a transient failure")
        return real(cfg, **kw)

    monkeypatch.setattr(objective, "run_tracked_trial", fail_once)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, sampler={"name": "grid", "seed": 0},
                      space={"percentile": [20, 40], "wavelet": ["haar", "db2"]}, n_trials=4)  # fmt: skip
    assert run_cli("study", str(spec), "-q") == 0
    ts = trials(workdir)
    done = sorted((t.params["wavelet"], t.params["percentile"]) for t in ts if t.state == TrialState.COMPLETE)
    assert failed and done == sorted((w, p) for w in ("haar", "db2") for p in (20, 40))
    assert [t.state for t in ts].count(TrialState.FAIL) == 1


@pytest.mark.slow  # a 2-point grid study
def test_a_grid_point_that_failed_before_its_params_were_suggested_is_run(workdir, tiny_weights, monkeypatch, capsys):
    """The grid sampler gives a trial its point (grid_id) before any param is suggested. A trial that
    failed while suggesting them was not re-queued (no params to repeat): its point was counted as
    visited and never run, and another point ran twice in its place."""
    from wavesweep.study import spec as spec_mod

    real = spec_mod.Param.suggest
    failed = []

    def fail_once(self, trial):
        if self.name == "wavelet" and not failed:
            failed.append(trial.number)
            raise RuntimeError("storage hiccup while suggesting")
        return real(self, trial)

    monkeypatch.setattr(spec_mod.Param, "suggest", fail_once)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, sampler={"name": "grid", "seed": 0},
                      space={"percentile": [20, 40], "wavelet": ["haar"]}, n_trials=2)  # fmt: skip
    assert run_cli("study", str(spec), "-q") == 0
    ts = trials(workdir)
    assert failed == [0] and "wavelet" not in ts[0].params and ts[0].state == TrialState.FAIL
    done = sorted(t.params["percentile"] for t in ts if t.state == TrialState.COMPLETE)
    assert done == [20, 40]
    assert [t.state for t in ts].count(TrialState.COMPLETE) == 2


@pytest.mark.slow  # a 4-point grid study
def test_a_grid_point_another_launcher_was_stopped_on_is_run_by_the_one_that_runs_on(workdir, tiny_weights, monkeypatch):
    """Two launchers on one grid, one stopped (Ctrl-C, SIGTERM) while the other runs on: the stopped
    one's trial is FAIL (interrupted), which Optuna's grid counts as visited. The launcher that ran
    on queued only its own failed points: the study ended "complete" with that point never run, and
    a relaunch found nothing missing. It is queued again by the launcher that runs on."""
    from wavesweep.study import objective
    from wavesweep.study.spec import load_spec
    from wavesweep.study.storage import load_study, open_storage

    spec_path = write_spec(workdir / "tiny.yaml", tiny_weights, sampler={"name": "grid", "seed": 0},
                           space={"percentile": [20, 40], "wavelet": ["haar", "db2"]}, n_trials=4)  # fmt: skip
    real = objective.run_tracked_trial
    stopped = []

    def other_launcher_stopped(cfg, **kw):
        if not stopped:  # as this launch's first trial runs, another launcher takes a point and is stopped on it
            other = load_study(load_spec(spec_path), open_storage(f"sqlite:///{workdir / 'optuna.db'}"), seed=7, workers=1)
            t = other.ask()
            t.set_user_attr("interrupted", True)
            other.tell(t, state=TrialState.FAIL)
            stopped.append(t.number)
        return real(cfg, **kw)

    monkeypatch.setattr(objective, "run_tracked_trial", other_launcher_stopped)
    assert run_cli("study", str(spec_path), "-q") == 0
    ts = trials(workdir)
    done = sorted((t.params["wavelet"], t.params["percentile"]) for t in ts if t.state == TrialState.COMPLETE)
    assert stopped and done == sorted((w, p) for w in ("haar", "db2") for p in (20, 40))  # every point, once
    assert not [t for t in ts if t.state == TrialState.COMPLETE and t.user_attrs.get("repeat_of") is not None]
    (lost,) = [t for t in ts if t.state == TrialState.FAIL]
    assert lost.number == stopped[0]
    assert any(lost.number in t.system_attrs.get("retry_history", []) for t in ts if t.state == TrialState.COMPLETE)


@pytest.mark.slow  # a study stopped in its first trial
def test_a_launcher_stopped_while_another_runs_trials_leaves_the_study_run_open(workdir, tiny_weights, monkeypatch, caplog):
    """A launcher stopped by Ctrl-C closed the study run KILLED while another launcher was still
    running trials under it (README: the study run is left open for the last launcher). It stays
    open now, saying so; with no other launcher running it is closed KILLED as before."""
    import logging

    from wavesweep.study import objective
    from wavesweep.study.spec import load_spec
    from wavesweep.study.storage import load_study, open_storage

    spec_path = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=3)
    storage = open_storage(f"sqlite:///{workdir / 'optuna.db'}")

    def stop(cfg, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(objective, "run_tracked_trial", stop)
    other = {}

    def study_run_status() -> str:
        (run,) = MlflowClient().search_runs(
            [e.experiment_id for e in MlflowClient().search_experiments()], "tags.`wavesweep.kind` = 'study'")
        return run.info.status

    from wavesweep import tracking

    real_start = tracking.start_study_run

    def start_then_other_launcher(*a, **kw):  # the study exists now: another launcher starts a trial, alive
        run_id = real_start(*a, **kw)
        o = load_study(load_spec(spec_path), storage, seed=9, workers=1)
        t = o.ask()
        storage.record_heartbeat(t._trial_id)
        other["trial"], other["study"] = t, o
        return run_id

    monkeypatch.setattr(tracking, "start_study_run", start_then_other_launcher)
    with caplog.at_level(logging.WARNING):
        assert run_cli("study", str(spec_path), "-q") == 130
    assert study_run_status() == "RUNNING"
    assert any("1 trial(s) of other launchers are still running" in r.getMessage() for r in caplog.records)
    other["study"].tell(other["trial"], state=TrialState.FAIL)  # the other launcher is stopped too, later
    monkeypatch.setattr(tracking, "start_study_run", real_start)
    assert run_cli("study", str(spec_path), "-q") == 130  # alone now: closed KILLED
    assert study_run_status() == "KILLED"


def test_enqueue_is_refused_for_a_grid_study(workdir, capsys):
    spec = write_spec(workdir / "tiny.yaml", "w.pt", sampler={"name": "grid", "seed": 0})
    assert run_cli("study", str(spec), "--dry-run", "--enqueue", "wavelet=haar,percentile=40") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "uses the grid sampler, which runs every point of its grid once" in err, err


def test_an_error_before_a_trials_run_exists_says_why(workdir, tiny_weights, monkeypatch, capsys):
    """An error while the trial's configuration is made (before its MLflow run) left no reason:
    the log said "trial 0 failed: ?" and the launch "last: ?"."""
    from wavesweep.study import objective

    def broken(*a, **k):
        raise ValueError("the objective names could not be set")

    monkeypatch.setattr(objective, "_name_objectives", broken)
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=2, max_failures=2)
    assert run_cli("study", str(spec), "-q") == 1
    assert "last: ValueError: the objective names could not be set" in capsys.readouterr().err
    assert {t.user_attrs.get("error") for t in trials(workdir)} == {"ValueError: the objective names could not be set"}


def test_a_stop_is_resent_only_within_the_block_it_arrived_in(monkeypatch):
    """A stop that nothing caught is sent again (it may have been swallowed by a GC callback), but
    only while its own block lasts: the resend thread of a finished block sent SIGINT into the next
    block of the same process (a test suite's next study) as a stop nobody gave."""
    import signal as sig

    from wavesweep import interrupt

    monkeypatch.setattr(interrupt, "RESEND_S", 0.05)
    with pytest.raises(KeyboardInterrupt):
        with interrupt.stop_signals():
            os.kill(os.getpid(), sig.SIGINT)
            time.sleep(1)  # the handler raises here; nothing calls interrupt.caught
    with interrupt.stop_signals():
        time.sleep(0.5)  # ten resend periods: the old thread would have sent SIGINT here
    assert not interrupt.stop_pending()


def test_runs_a_gone_process_left_running_are_closed_killed_by_the_next_trial(workdir):
    """kill -9 (or the OOM killer) of a `wavesweep trial` leaves its runs RUNNING for good; the next
    trial in the experiment closes KILLED exactly the trial and configuration runs whose process is
    gone (pid and start time, on this machine), their children with them, and leaves alone a live
    process's run, another machine's and a study's (the study's heartbeat and relaunch own those)."""
    from wavesweep import tracking

    client, exp = tracking.init_tracking()
    gone = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    gone_tag = tracking.process_id(gone.pid)
    gone.kill()
    gone.wait()
    assert gone_tag and tracking.process_gone(gone_tag) and not tracking.process_gone(tracking.process_id())

    def run(kind: str, tag: str, parent: str | None = None, start_time: int | None = None, **extra: str) -> str:
        tags = {"wavesweep.kind": kind, tracking.PROCESS_TAG: tag, **extra,
                **({tracking.MLFLOW_PARENT_RUN_ID: parent} if parent else {})}  # fmt: skip
        return client.create_run(exp, tags=tags, start_time=start_time).info.run_id

    dead_trial = run("trial", gone_tag)
    dead_method = run("method", "", dead_trial)
    dead_config = run("configuration", gone_tag)
    replicate = run("trial", gone_tag, dead_config)
    replicate_method = run("method", "", replicate)
    live = run("trial", tracking.process_id())
    elsewhere = run("trial", "another-host/" + gone_tag.split("/", 1)[1])
    host, boot, ns, pid, start = gone_tag.split("/")
    other_container = run("trial", f"{host}/{boot}/1/{pid}/{start}")  # same host and boot, another PID namespace
    before_boot = int(tracking._boot_time() - 3600) * 1000
    rebooted = run("trial", f"{host}/another-boot/{ns}/{os.getpid()}/{start}", start_time=before_boot)  # a pid that runs now
    # another machine of the same host name (containers given one --hostname, a cloud image's default
    # name) has another boot id too; its run, begun since this machine booted, is no earlier boot's
    same_name = run("trial", f"{host}/another-boot/{ns}/{os.getpid()}/{start}")
    in_study = run("trial", gone_tag, **{"optuna.study": "s"})
    untagged = run("trial", "")
    finished = run("trial", gone_tag)
    client.set_terminated(finished, "FINISHED")

    assert sorted(tracking.close_runs_of_dead_processes(client, exp)) == sorted([dead_trial, dead_config, rebooted])
    status = {r: client.get_run(r).info.status for r in (dead_trial, dead_method, dead_config, replicate, replicate_method,
                                                         live, elsewhere, other_container, in_study, untagged, finished,
                                                         same_name)}  # fmt: skip
    assert status == {dead_trial: "KILLED", dead_method: "KILLED", dead_config: "KILLED", replicate: "KILLED",
                      replicate_method: "KILLED", live: "RUNNING", elsewhere: "RUNNING", other_container: "RUNNING",
                      in_study: "RUNNING", untagged: "RUNNING", finished: "FINISHED", same_name: "RUNNING"}  # fmt: skip
    assert f"process {gone.pid} ended without closing this run" in client.get_run(dead_trial).data.tags["error"]
    assert tracking.close_runs_of_dead_processes(client, exp) == []  # nothing left to close

    # `mlflow run` closes the run it launched FAILED once its entry point is killed: a method run
    # that process was recording stays RUNNING below a closed trial run, which the search for
    # RUNNING trial runs never finds. Closed KILLED, unless the trial's process is alive or the
    # method run belongs to a study
    launched = run("trial", gone_tag)
    orphan = run("method", "", launched)
    client.set_terminated(launched, "FAILED")
    alive = run("trial", tracking.process_id())
    alive_method = run("method", "", alive)
    client.set_terminated(alive, "FAILED")
    study_method = run("method", "", launched, **{"optuna.study": "s"})
    assert tracking.close_runs_of_dead_processes(client, exp) == [orphan]
    assert [client.get_run(r).info.status for r in (orphan, launched, alive_method, study_method)] == [
        "KILLED", "FAILED", "RUNNING", "RUNNING"]
    assert f"process {gone.pid} ended while recording this method run" in client.get_run(orphan).data.tags["error"]
    assert tracking.close_runs_of_dead_processes(client, exp) == []


def test_a_run_mlflow_run_created_that_its_entry_point_never_tagged_is_named_not_closed(workdir, caplog):
    """`mlflow run` killed with kill -9 while its entry point's Python starts leaves the run it
    created RUNNING with MLflow's tags alone: nothing says whose it is, so a later trial names it
    (after UNCLAIMED_AFTER_S: a conda environment built first takes minutes) and leaves it."""
    import logging

    from wavesweep import tracking

    client, exp = tracking.init_tracking()
    now_ms = int(time.time() * 1000)
    project = {"mlflow.project.entryPoint": "main", "mlflow.source.type": "PROJECT"}
    old = client.create_run(exp, tags=project, start_time=now_ms - (tracking.UNCLAIMED_AFTER_S + 60) * 1000).info.run_id
    recent = client.create_run(exp, tags=project, start_time=now_ms - 60 * 1000).info.run_id
    claimed = client.create_run(exp, tags={**project, "wavesweep.kind": "trial", tracking.PROCESS_TAG: tracking.process_id()},
                                start_time=now_ms - (tracking.UNCLAIMED_AFTER_S + 60) * 1000).info.run_id  # fmt: skip
    plain = client.create_run(exp, start_time=now_ms - (tracking.UNCLAIMED_AFTER_S + 60) * 1000).info.run_id  # not `mlflow run`'s
    with caplog.at_level(logging.WARNING, logger="wavesweep.tracking"):
        assert tracking.close_runs_of_dead_processes(client, exp) == []
    named = [r.getMessage() for r in caplog.records if "without their entry point starting" in r.getMessage()]
    assert len(named) == 1 and named[0].startswith("1 run(s) `mlflow run` created have been RUNNING for over 30 minutes")
    assert old in named[0] and not {recent, claimed, plain} & set(re.findall(r"[0-9a-f]{32}", named[0]))
    assert {client.get_run(r).info.status for r in (old, recent, claimed, plain)} == {"RUNNING"}


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process check reads /proc")
def test_a_trial_killed_with_sigkill_is_closed_by_the_next_one(workdir, tiny_weights, shared_cache):
    """A real kill -9 of `wavesweep trial` while it runs: its runs stay RUNNING until the next
    trial in the experiment closes them KILLED; nothing is left RUNNING after that trial."""
    args = ["trial", "--model", "cnn", "--weights", tiny_weights, "--eval-limit", "100", "--timing-batches", "0"]
    p = spawn(workdir, shared_cache, *args, "--recovery", "finetune", "--finetune-steps", "100000", name="killed")
    try:
        wait_for(lambda: [r for r in mlflow_runs(workdir) if r.data.tags.get("wavesweep.kind") == "trial"], 300,
                 "the killed trial's run")  # its method runs are made when it records its results
        time.sleep(2)  # into its work
    finally:
        p.kill()
        p.wait(timeout=60)
    assert {r.info.status for r in mlflow_runs(workdir)} == {"RUNNING"}
    again = spawn(workdir, shared_cache, *args, "--recovery", "none", name="next")
    assert again.wait(timeout=300) == 0, (workdir / "next.log").read_text()[-3000:]
    assert "closed 1 run(s) KILLED" in (workdir / "next.log").read_text()
    by_kind = sorted((r.data.tags.get("wavesweep.kind"), r.data.tags.get("recovery", ""), r.info.status) for r in mlflow_runs(workdir))
    assert by_kind == [("method", "", "FINISHED")] * 3 + [("trial", "", "FINISHED"), ("trial", "", "KILLED")], by_kind


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process check reads /proc")
def test_an_adopted_run_a_trial_finished_is_left_to_its_launcher_not_closed_killed(workdir, tiny_weights, shared_cache):
    """`mlflow run` creates the run, runs `wavesweep trial` in it and closes it FINISHED once that
    process has ended; a trial run in the experiment meanwhile (an async launch not waited on yet)
    closed that successful run KILLED as left RUNNING by a gone process, and the launcher then kept
    KILLED (it leaves a terminated run as it is)."""
    from wavesweep import tracking

    client, exp = tracking.init_tracking()
    launched = client.create_run(exp).info.run_id  # as `mlflow run` does, before the entry point
    env = subprocess_env(workdir, shared_cache) | {"MLFLOW_RUN_ID": launched}
    args = ["trial", "--model", "cnn", "--weights", tiny_weights, "--eval-limit", "40", "--timing-batches", "0", "--quiet"]
    entry = subprocess.run([sys.executable, "-m", "wavesweep", *args], cwd=workdir, env=env, capture_output=True, text=True)
    assert entry.returncode == 0, entry.stderr[-3000:]
    assert client.get_run(launched).info.status == "RUNNING"  # the launcher's to close
    assert tracking.close_runs_of_dead_processes(client, exp) == []
    assert client.get_run(launched).info.status == "RUNNING"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the process check reads /proc")
@pytest.mark.parametrize("hidden", [PermissionError, FileNotFoundError])
def test_a_live_process_whose_proc_entry_cannot_be_read_is_not_taken_for_gone(monkeypatch, hidden):
    """/proc mounted with hidepid (shared machines) hides another user's processes: reading its
    /proc/<pid>/stat fails (EACCES with hidepid=1, ENOENT with hidepid=2) while it runs. The check
    took that for a gone process and closed KILLED another user's live trial; it asks the kernel
    whether the pid exists instead, and a dead one is still gone."""
    from wavesweep import tracking

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tag = tracking.process_id(live.pid)
        assert tag and not tracking.process_gone(tag)
        read_text = Path.read_text

        def hidepid(self, *args, **kwargs):
            if str(self) == f"/proc/{live.pid}/stat":
                raise hidden(13 if hidden is PermissionError else 2, "hidden", str(self))
            return read_text(self, *args, **kwargs)

        monkeypatch.setattr(Path, "read_text", hidepid)
        assert not tracking.process_gone(tag)
    finally:
        live.kill()
        live.wait()
    assert tracking.process_gone(tag)  # gone now: no such pid, readable or not


# A stop landing in Optuna's own bookkeeping of a trial, outside wavesweep's objective (which
# handles stops): each hook sends SIGINT to the process at one such point and waits there.
CTRL_C_IN_OPTUNA = {
    # study.ask() has created the trial (RUNNING) and returns it; the heartbeat thread is not started yet
    "ask": '''
import os, signal, time
import optuna

_ask = optuna.Study.ask
def ask(self, *args, **kwargs):
    trial = _ask(self, *args, **kwargs)
    in_memory = type(self._storage).__name__ == "InMemoryStorage"  # the sampler's dry run before the study
    if not os.environ.get("HOOK_DONE") and trial.number == 1 and not in_memory:
        os.environ["HOOK_DONE"] = "1"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(3)
    return trial
optuna.Study.ask = ask
''',
    # the trial's heartbeat thread has started, inside the `with` statement's __enter__ that starts it
    "heartbeat": '''
import os, signal, threading, time

_start = threading.Thread.start
def start(self):
    _start(self)
    target = getattr(self, "_target", None)
    if not os.environ.get("HOOK_DONE") and getattr(target, "__qualname__", "") == "HeartbeatThread._record_heartbeat":
        os.environ["HOOK_DONE"] = "1"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(3)
threading.Thread.start = start
''',
    # the objective returned; Optuna records the trial COMPLETE (tell)
    "tell": '''
import os, signal, time
import optuna.study._tell

_tell = optuna.study._tell._tell_with_warning
def tell(*args, **kwargs):
    if not os.environ.get("HOOK_DONE") and type(kwargs["study"]._storage).__name__ != "InMemoryStorage":
        os.environ["HOOK_DONE"] = "1"
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(3)
    return _tell(*args, **kwargs)
optuna.study._tell._tell_with_warning = tell
import optuna.study._optimize
optuna.study._optimize._tell_with_warning = tell
''',
}


@pytest.mark.slow  # three study launches
@pytest.mark.parametrize("where", list(CTRL_C_IN_OPTUNA))
def test_ctrl_c_in_optunas_bookkeeping_of_a_trial_stops_cleanly_and_leaves_no_trial_running(workdir, tiny_weights,
                                                                                            shared_cache, where):  # fmt: skip
    """A stop landing in Optuna's bookkeeping of a trial, before or after wavesweep's objective runs.
    In study.ask(): the trial it had created stayed RUNNING with no heartbeat, so no launch ever took
    it for lost, and a later launch near the end of the study waited for it forever. In the start of
    its heartbeat thread: the `with` that starts it never ran its exit, the thread recorded
    heartbeats for ever and the process, exiting (130, its one line printed), waited for it: it
    hung. Stops are now held during that bookkeeping and taken inside the objective, where they are
    handled (the trial FAIL, marked interrupted; its runs KILLED), or after Optuna has recorded it."""
    spec = write_spec(workdir / "tiny.yaml", tiny_weights, n_trials=3, space=WIDE_SPACE)
    env = _hooked_env(workdir, shared_cache, CTRL_C_IN_OPTUNA[where])
    p = subprocess.Popen([sys.executable, "-m", "wavesweep", "study", str(spec), "-q"], cwd=workdir, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        out, err = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        pytest.fail(f"the stopped study did not exit: {err[-2000:]}")
    assert p.returncode == 130, err[-3000:]
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "wavesweep: interrupted (KeyboardInterrupt)", err[-3000:]
    first = trials(workdir)
    assert TrialState.RUNNING not in [t.state for t in first], [(t.number, t.state) for t in first]
    assert not [r for r in mlflow_runs(workdir) if r.info.status == "RUNNING"]
    if where == "heartbeat":  # what failed here was the exit (a hang); the other two are resumed
        return
    # the relaunch finishes the study (nothing waits for a trial no one runs), counting each trial once
    resume = subprocess.run([sys.executable, "-m", "wavesweep", "study", str(spec), "-q"], cwd=workdir,
                            env=subprocess_env(workdir, shared_cache) | {"WAVESWEEP_HEARTBEAT_S": "1", "WAVESWEEP_GRACE_S": "4"},
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert resume.returncode == 0, resume.stderr[-3000:]
    after = trials(workdir)
    assert sum(t.state == TrialState.COMPLETE for t in after) == 3 and TrialState.RUNNING not in [t.state for t in after]
    finished = [r for r in mlflow_runs(workdir) if r.data.tags.get("wavesweep.kind") == "trial" and r.info.status == "FINISHED"]
    assert len(finished) == 3


def test_allowed_takes_stops_inside_a_held_block_and_holds_them_again_after():
    """interrupt.allowed(): inside ignored() (signals held), a stop held until the block begins is
    raised at its start; one during it is raised where it lands; after it, stops are held again and
    raised when the ignored block ends; outside an ignored block it changes nothing."""
    from wavesweep import interrupt

    seen = []
    with interrupt.stop_signals():
        # held before the block: raised as it begins, before its first line
        with pytest.raises(interrupt.Terminated), interrupt.ignored():
            os.kill(os.getpid(), signal.SIGTERM)
            seen.append("held")
            with interrupt.allowed():
                seen.append("not reached")
        assert seen == ["held"]
    with interrupt.stop_signals():
        # during the block: raised where it lands, and the handlers of the held block come back after
        with pytest.raises(KeyboardInterrupt), interrupt.ignored():
            with pytest.raises(KeyboardInterrupt), interrupt.allowed():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)
                seen.append("not reached")
            assert signal.getsignal(signal.SIGINT) is interrupt._hold
            os.kill(os.getpid(), signal.SIGINT)
            seen.append("after")
        assert seen == ["held", "after"]
    with interrupt.stop_signals():
        handler = signal.getsignal(signal.SIGINT)
        with interrupt.allowed():  # no held block: nothing changes
            assert signal.getsignal(signal.SIGINT) is handler


def test_a_stop_that_cuts_a_database_read_short_still_closes_the_runs(workdir, monkeypatch):
    """Ctrl-C landing while MLflow read a run (SQLite, a SELECT half read: found by a Ctrl-C fuzz
    of studies) left that cursor, and its read lock, alive in the frames the stop had unwound, kept
    by the exception being handled: closing the trial's runs KILLED waited 20 s for the lock, twice,
    failed ("database is locked", with MLflow's traceback on stderr) and left them RUNNING. The
    handled stop lets go of those frames' locals first."""
    from sqlalchemy.orm import context as orm_context
    from sqlalchemy.orm import loading

    from wavesweep import tracked_trial, tracking

    armed = {"calls": None}
    real_instances, real_log_trial = loading.instances, tracking.log_trial

    def instances(cursor, context):
        if isinstance(armed["calls"], int):
            armed["calls"] += 1
            if armed["calls"] == 2:  # the eager load of a run's tags inside the read of the run: two cursors open
                armed["calls"] = "fired"
                raise KeyboardInterrupt
        return real_instances(cursor, context)

    def log_trial(*args, **kwargs):
        armed["calls"] = 0
        return real_log_trial(*args, **kwargs)

    monkeypatch.setattr(loading, "instances", instances)
    monkeypatch.setattr(orm_context.loading, "instances", instances)
    monkeypatch.setattr(tracking, "log_trial", log_trial)
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        tracked_trial.run_tracked_trial(TrialConfig(model="cnn", eval_limit=40, timing_batches=0, recovery="none"),
                                        experiment="edge")  # fmt: skip
    assert armed["calls"] == "fired"
    runs = mlflow_runs(workdir)
    assert runs and {(r.data.tags["wavesweep.kind"], r.info.status) for r in runs} <= {("trial", "KILLED"), ("method", "KILLED")}
    assert time.perf_counter() - t0 < 20 * 2, "the close waited for a lock"


STOP_WHILE_THE_STORE_IS_CREATED = '''
import os, signal, time
from alembic.ddl import impl as _impl

_create = _impl.DefaultImpl.create_table
def create_table(self, table, *args, **kwargs):
    out = _create(self, table, *args, **kwargs)
    # a table of one of MLflow's migrations created, its version not yet stamped
    if table.name == "trace_info" and not os.environ.get("HOOK_DONE"):
        os.environ["HOOK_DONE"] = "1"
        os.kill(os.getpid(), signal.SIG%s)
        time.sleep(2)
    return out
_impl.DefaultImpl.create_table = create_table
'''


@pytest.mark.slow  # a trial process, three that open the store
def test_a_stop_or_a_kill_while_the_store_is_created_leaves_a_store_that_opens(workdir, shared_cache):
    """MLflow creates a SQLite store table by table (its migrations commit one by one). A Ctrl-C in
    the first seconds of the first command, between a migration's table and its version stamp
    (found by a Ctrl-C fuzz), left a store no command could open: "database: table trace_info
    already exists", for good. A stop now waits until the store is created; a store left so by a
    kill -9 (nothing waits for that) is moved aside and created afresh."""
    from wavesweep import tracking

    trial = [sys.executable, "-m", "wavesweep", "trial", "--model", "cnn", "--eval-limit", "40", "--timing-batches", "0", "-q"]
    opens = [sys.executable, "-c", "from wavesweep import tracking; tracking.init_tracking()"]  # what every command does first
    plain = subprocess_env(workdir, shared_cache, fresh_store=True)
    run = lambda argv, env: subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300,  # noqa: E731
                                           preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    stopped = run(trial, _hooked_env(workdir, shared_cache, STOP_WHILE_THE_STORE_IS_CREATED % "INT", fresh_store=True))
    assert stopped.returncode == 130 and stopped.stderr.strip().splitlines()[-1] == "wavesweep: interrupted (KeyboardInterrupt)", stopped.stderr[-2000:]
    again = run(opens, plain)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sorted(e.name for e in MlflowClient().search_experiments()) == ["Default", "wavesweep"]

    db = workdir / "mlflow.db"
    db.unlink()
    killed = run(opens, _hooked_env(workdir, shared_cache, STOP_WHILE_THE_STORE_IS_CREATED % "KILL", fresh_store=True))
    assert killed.returncode == -signal.SIGKILL
    os.utime(db, (time.time() - tracking.CUT_SHORT_AFTER_S - 5,) * 2)
    cut_short = db.read_bytes()
    after = run(opens, plain)
    assert after.returncode == 0, after.stderr[-2000:]
    aside = sorted(workdir.glob("mlflow.db.cut-short-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == cut_short and f"Moved to {aside[0]}" in after.stderr
    assert sorted(e.name for e in MlflowClient().search_experiments()) == ["Default", "wavesweep"]


def test_only_a_store_without_any_experiment_or_run_left_alone_for_a_minute_is_set_aside(workdir):
    """What _set_aside_if_cut_short moves: MLflow's tables with no experiment and no run, untouched
    for CUT_SHORT_AFTER_S. Not a store holding anything, not one being created now, not an empty
    file (MLflow creates its tables in it), not a database of something else."""
    import sqlite3

    from wavesweep import tracking

    old = time.time() - tracking.CUT_SHORT_AFTER_S - 5
    tracking.init_tracking()
    db = workdir / "mlflow.db"
    os.utime(db, (old, old))
    assert tracking._set_aside_if_cut_short(db) is None and db.is_file()  # the Default and wavesweep experiments
    con = sqlite3.connect(db)
    with con:
        con.execute("PRAGMA foreign_keys = OFF")
        con.execute("DELETE FROM experiment_tags")
        con.execute("DELETE FROM experiments")
    con.close()
    os.utime(db, None)
    assert tracking._set_aside_if_cut_short(db) is None and db.is_file()  # touched just now: maybe being created
    os.utime(db, (old, old))
    aside = tracking._set_aside_if_cut_short(db)
    assert aside is not None and aside.is_file() and not db.exists() and aside.parent == db.parent
    for what in (b"", None):
        if what is None:
            sqlite3.connect(db).execute("CREATE TABLE notes (x)").connection.close()
        else:
            db.write_bytes(what)
        os.utime(db, (old, old))
        assert tracking._set_aside_if_cut_short(db) is None and db.is_file()
        db.unlink()


@pytest.mark.parametrize("kind", ["trial", "method", "configuration", "study", "repeat"])
def test_a_stop_inside_create_run_closes_the_run_it_created(workdir, monkeypatch, kind):
    """A stop landing inside MLflow's create_run, once the store had written the run (here: a real
    SIGINT sent as it returns): the caller never learnt the run's id, and the run stayed RUNNING
    for good (found by a Ctrl-C fuzz of studies: a repeated configuration's run). The stop is held
    until the id is known, then closes the run KILLED and propagates."""
    from wavesweep import interrupt, tracked_config, tracking

    real = MlflowClient.create_run
    wanted = {"trial": "trial", "method": "method", "configuration": "configuration", "study": None, "repeat": "repeat"}[kind]
    fired = []

    def create_run(self, experiment_id, *args, **kwargs):
        run = real(self, experiment_id, *args, **kwargs)
        if not fired and (kwargs.get("tags") or {}).get("wavesweep.kind") == wanted:
            fired.append(run.info.run_id)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)  # the signal lands here, inside create_run
        return run

    monkeypatch.setattr(MlflowClient, "create_run", create_run)
    client, exp_id = tracking.init_tracking()
    cfg = TrialConfig(model="cnn", eval_limit=40, timing_batches=0, recovery="none")
    with pytest.raises(KeyboardInterrupt), interrupt.stop_signals():
        if kind == "trial":
            tracking.TrialRun(client, exp_id, cfg)
        elif kind == "method":
            tracking.TrialRun(client, exp_id, cfg).child("dwt")
        elif kind == "configuration":
            tracked_config.run_tracked_configuration(cfg, 2)
        elif kind == "study":
            tracking.start_study_run(client, exp_id, study_name="s", storage="sqlite:///optuna.db", spec_file=None,
                                     spec_text="", params={})  # fmt: skip
        else:
            tracking.record_repeat(client, exp_id, cfg, parent_run_id=real(client, exp_id).info.run_id, repeat_of_trial=0,
                                   repeat_of_run_id="0" * 32)  # fmt: skip
    assert fired
    got = client.get_run(fired[0])
    where = "while recording a repeated configuration" if kind == "repeat" else "while it was created"
    assert (got.info.status, got.data.tags["error"]) == ("KILLED", f"{where}: KeyboardInterrupt")
