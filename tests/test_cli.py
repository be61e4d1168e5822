"""The console entry point: exit codes, one-line errors, and a normal interpreter exit (output
flushed, atexit handlers and non-daemon threads finished)."""

from __future__ import annotations

import pytest

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:  # a hang fails after 120 s
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{cwd / 'mlflow.db'}"
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.slow  # a subprocess or a fresh MLflow store: seconds, not milliseconds
def test_exit_keeps_code_output_atexit_and_threads(tmp_path):
    proc = _python(
        f"""
        import atexit, threading, time
        from wavesweep import cli
        atexit.register(lambda: open({str(tmp_path / "atexit.txt")!r}, "w").write("ran"))
        def late():
            time.sleep(0.5)
            open({str(tmp_path / "thread.txt")!r}, "w").write("done")
        threading.Thread(target=late).start()
        import concurrent.futures  # an idle pool left open (as MLflow's downloads leave one): must not hang
        pool = concurrent.futures.ThreadPoolExecutor(2)  # kept alive, as a module-level pool
        pool.submit(lambda: None).result()
        print("x" * 200_000, end="")  # buffered: must be flushed at exit
        cli.run(["trial", "--wavelet", "nope"])
        print("not reached")
        """,
        tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stdout == "x" * 200_000
    assert proc.stderr.strip().startswith("wavesweep: error: unknown wavelet 'nope'; valid: bior1.1, ")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert (tmp_path / "atexit.txt").read_text() == "ran"
    assert (tmp_path / "thread.txt").read_text() == "done"


@pytest.mark.slow  # a subprocess or a fresh MLflow store: seconds, not milliseconds
def test_module_entry_point_exit_codes(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}", PYTHONPATH=str(ROOT))
    ok = subprocess.run([sys.executable, "-m", "wavesweep", "trial", "--help"], cwd=tmp_path, env=env,
                        capture_output=True, text=True, timeout=300)  # fmt: skip
    assert ok.returncode == 0 and "--wavelet" in ok.stdout and ok.stdout.rstrip().endswith("no progress bars")
    bad = subprocess.run([sys.executable, "-m", "wavesweep", "trial", "--level", "9"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2
    assert bad.stderr.strip() == "wavesweep: error: level must be an int in 1..5, got 9"


def test_every_option_default_is_in_its_help_and_every_command_in_the_description():
    """``wavesweep COMMAND --help`` shows what an option does when left out: argparse's own default
    (the value the command runs with) is in the option's rendered help. ``wavesweep results --help``
    did not say that ``--out`` defaults to the shipped results page, which a run in a checkout
    overwrites. ``wavesweep --help`` names every command."""
    import argparse
    import re

    from wavesweep import cli

    parser = cli.build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        fmt = sub._get_formatter()
        for a in sub._actions:
            if not a.option_strings or a.default in (None, False, argparse.SUPPRESS) or a.help == argparse.SUPPRESS:
                continue
            shown = " ".join(fmt._expand_help(a).split())
            assert re.search(rf"default: '?{re.escape(str(a.default))}'?[,;) ]", shown + " "), (name, a.option_strings, shown)
    description = parser.description or ""
    for name in subs.choices:
        assert re.search(rf"\b{re.escape(name)}\b", description), (name, description)


def test_models_listing_shows_numbers_to_four_significant_digits(monkeypatch, capsys):
    """`wavesweep models` printed the tags' every digit (ratio=1.073653795821195)."""
    from wavesweep import cli, model_registry

    tags = {"method": "dwt", "wavelet": "haar", "level": "2", "percentile": "50.0", "layout": "filter",
            "recovery": "finetune", "seed": "3", "top1": "0.8166666666666667", "compression_ratio": "1.073653795821195"}  # fmt: skip
    monkeypatch.setattr(model_registry, "list_registered",
                        lambda: [{"name": "m", "version": "3", "aliases": ["champion"], "tags": tags, "run_id": "abc"}])
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    assert f"top1={float(tags['top1']):.4g} ratio={float(tags['compression_ratio']):.4g} run=abc" in out
    assert "top1=0.8167 ratio=1.074" in out and "aliases=champion" in out
    assert "layout=filter recovery=finetune seed=3 top1=" in out


def test_printed_store_locations_are_absolute_and_hide_passwords(tmp_path, monkeypatch):
    """A study or trial printed ``sqlite:///optuna.db``: under ``mlflow run`` (which runs in the
    project directory) that named a file elsewhere than where the user launched it."""
    from wavesweep.cli import located

    monkeypatch.chdir(tmp_path)
    assert located("sqlite:///optuna.db") == f"sqlite:///{(tmp_path / 'optuna.db').resolve()}"
    assert located("sqlite:////abs/mlflow.db") == "sqlite:////abs/mlflow.db"
    assert located("sqlite:///o.db?timeout=60") == "sqlite:///o.db?timeout=60"  # left as given
    assert located("postgresql://u:secret@h/db") == "postgresql://u:***@h/db"


def _file_in_the_way(workdir: Path) -> None:
    (workdir / "afile").write_text("")


@pytest.mark.parametrize("report_dir", ["afile", "afile/rep"])
def test_a_report_dir_that_is_a_file_is_one_line_before_the_study_runs(workdir, capsys, monkeypatch, report_dir):
    """The report is written after the study: `--report-dir FILE` ran every trial, then ended
    in a FileExistsError traceback (exit 1) from the report's mkdir."""
    from wavesweep import cli, study

    _file_in_the_way(workdir)
    spec = ROOT / "sweeps" / "digits-resnet18.yaml"
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("the study ran before --report-dir was checked"))
    assert cli.main(["study", str(spec), "--report-dir", report_dir, "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wavesweep: error: report folder {report_dir}: afile is a file, not a folder (--report-dir)"], err


def test_report_into_a_file_is_one_line(workdir, capsys):
    """`wavesweep report NAME --report-dir FILE` on a study with a complete trial: one line, exit 2."""
    import optuna

    from wavesweep import cli

    _file_in_the_way(workdir)
    url = f"sqlite:///{workdir / 'optuna.db'}"
    s = optuna.create_study(study_name="done", storage=url)
    s.add_trial(optuna.trial.create_trial(value=0.5, params={}, distributions={}))
    capsys.readouterr()  # Optuna's own log line
    assert cli.main(["report", "done", "--storage", url, "--report-dir", "afile"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wavesweep: error: report folder afile: afile is a file, not a folder (--report-dir)"], err


def test_report_of_a_study_not_in_the_storage_names_the_ones_there(workdir, capsys):
    """`wavesweep report NAME` where the storage holds other studies: one line naming the storage
    and its studies, exit 2 (the lookup lives in the study package, the only one importing optuna)."""
    import optuna

    from wavesweep import cli

    url = f"sqlite:///{workdir / 'optuna.db'}"
    for name in ("alpha", "beta"):
        optuna.create_study(study_name=name, storage=url)
    capsys.readouterr()
    assert cli.main(["report", "gamma", "--storage", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wavesweep: error: no study 'gamma' in ") and err[0].endswith(
        "; studies there: alpha, beta"), err
    with open(cli.__file__) as fh:
        assert not [line for line in fh if line.strip().startswith(("import optuna", "from optuna"))]


@pytest.mark.parametrize(("option", "value", "twice"), [
    ("--fractions", "50,70,050", "'050'"), ("--recoveries", "none,bn,none", "'none'"),
    ("--configs", "haar:filter,db2:kernel,haar:filter", "'haar:filter'"),
])  # fmt: skip
def test_a_results_value_given_twice_is_one_line_before_any_trial(workdir, capsys, monkeypatch, option, value, twice):
    """`--fractions 50,50` (or a recovery or config twice) ran the same trials twice and counted
    them twice in the page's summary ("dwt better than magnitude in 0 of 8 settings" for 2)."""
    from wavesweep import cli, results

    monkeypatch.setattr(results, "run_grid", lambda *a, **k: pytest.fail("the grid ran"))
    args = ["results", "--model", "cnn", "--dataset", "digits", "--fractions", "50,70", "--recoveries", "none",
            "--configs", "haar:filter", "--out", "page.md", option, value]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wavesweep: error: {option}={value!r}: {twice} appears twice; give each value once"], err
    assert not (workdir / "page.md").exists()


@pytest.mark.parametrize("port", ["-1", "0", "65536", "99999"])
def test_a_port_out_of_range_is_one_line_before_the_server_starts(workdir, capsys, monkeypatch, port):
    """`wavesweep ui --port 99999` started the server, which printed a 60-line OverflowError
    traceback ("bind(): port must be 0-65535") and exited 1."""
    from wavesweep import cli, mlflow_ui

    monkeypatch.setattr(mlflow_ui, "started", lambda *a, **k: pytest.fail("the server was started"))
    assert cli.main(["ui", "--port", port]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wavesweep: error: --port={port} is not a TCP port: give an integer in 1..65535"], err


_STUDY = "study: s\nbase: {{model: cnn, dataset: digits, eval_limit: 60{base}}}\nspace:\n  {space}\nobjectives: {{top1: maximize}}\nn_trials: 2\n"


@pytest.mark.parametrize(("base", "space", "needle"), [
    (", device: cuda", "percentile: [40, 60]", "device 'cuda' requested but CUDA is not available"),
    ("", "device: [cpu, cuda]", "device 'cuda' requested but CUDA is not available"),
    (", weights: nosuch.pt", "percentile: [40, 60]", "weights file 'nosuch.pt' does not exist"),
])  # fmt: skip
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_study_this_machine_cannot_run_is_one_line_before_anything_is_created(workdir, capsys, monkeypatch, base, space, needle, dry_run):
    """A fixed `device: cuda` without CUDA, or a fixed weights file that is not there, was found by
    each trial in turn: three FAILED trial runs, a FAILED study run, five lines and exit 1, where
    `wavesweep trial` says it in one line before any run. `--dry-run` printed the plan as if the
    study could run: it still prints it (a spec may be previewed on one machine for another), and
    lists what would stop a launch here."""
    import torch

    from wavesweep import cli, study

    if "cuda" in needle and torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    (workdir / "s.yaml").write_text(_STUDY.format(base=base, space=space))
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("the study ran"))
    if dry_run:
        import yaml

        assert cli.main(["study", "s.yaml", "-q", "--dry-run"]) == 0
        out, err = capsys.readouterr()
        stoppers = yaml.safe_load(out)["a launch here would stop"]
        assert len(stoppers) == 1 and needle in stoppers[0] and not err, (stoppers, err)
        assert sorted(p.name for p in workdir.iterdir()) == ["s.yaml"]
        return
    assert cli.main(["study", "s.yaml", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("wavesweep: error: ") and needle in err[0], err
    assert not (workdir / "optuna.db").exists() and not (workdir / "mlflow.db").exists()


@pytest.mark.parametrize("space", ["percentile: [40, 60]", "model: [cnn, resnet18]"])
@pytest.mark.parametrize("dry_run", [False, True])
def test_a_study_of_the_pretrained_base_without_its_weights_file_is_one_line(workdir, capsys, monkeypatch, space, dry_run):
    """resnet18 on imagenet without `weights` is torchvision's IMAGENET1K_V1 file, never
    downloaded: missing from the torch hub cache, the study was created and each trial failed on
    it (FAILED runs, exit 1), and `--dry-run` listed nothing that would stop it."""
    from wavesweep import cli, study

    monkeypatch.setenv("TORCH_HOME", str(workdir / "empty-torch-home"))
    base = "model: resnet18, " if space.startswith("percentile") else ""
    (workdir / "s.yaml").write_text(f"study: s\nbase: {{{base}dataset: imagenet, eval_limit: 60}}\nspace:\n  {space}\n"
                                    "objectives: {top1: maximize}\nn_trials: 2\nfixed: {recovery: none}\n")
    monkeypatch.setattr(study, "run_study", lambda *a, **k: pytest.fail("the study ran"))
    needle = "ResNet-18 IMAGENET1K_V1 weights not found at"
    if dry_run:
        import yaml

        assert cli.main(["study", "s.yaml", "-q", "--dry-run"]) == 0
        stoppers = yaml.safe_load(capsys.readouterr().out)["a launch here would stop"]
        assert len(stoppers) == 1 and needle in stoppers[0], stoppers
    else:
        assert cli.main(["study", "s.yaml", "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("wavesweep: error: ") and needle in err[0], err
    assert sorted(p.name for p in workdir.iterdir()) == ["s.yaml"]


@pytest.mark.parametrize(("recovery", "stops"), [("fixed: {recovery: bn}", True), ("  recovery: [none, finetune]", True),
                                                 ("fixed: {recovery: none}", False)])  # fmt: skip
def test_a_study_whose_recovery_needs_a_training_split_the_data_lacks_is_one_line(workdir, capsys, monkeypatch, recovery, stops):
    """An ImageNet validation folder alone has no training split: a study recovering with bn or
    finetune (fixed, or among the searched choices) failed every such trial on it; it is one line
    before anything is created. recovery none runs."""
    from wavesweep import cli, study, trial
    from wavesweep.data import DatasetBundle

    import torch

    test = torch.utils.data.TensorDataset(torch.zeros(40, 3, 2, 2), torch.arange(40) % 4)
    val_alone = DatasetBundle("imagenet", None, test, 1000, 3, 224, {"train_looked_for": "/data/imagenet/train"})
    monkeypatch.setattr(trial, "load_eval_set", lambda cfg: (val_alone, val_alone.test))
    monkeypatch.setattr(cli, "_check_study_machine", lambda spec: None)  # no pretrained weights file here
    monkeypatch.setattr(study, "run_study", lambda *a, **k: (_ for _ in ()).throw(SystemExit(0)))
    space = "  percentile: [40, 60]\n" + (recovery + "\n" if recovery.startswith("  ") else "")
    fixed = "" if recovery.startswith("  ") else recovery + "\n"
    (workdir / "s.yaml").write_text(f"study: s\nbase: {{model: resnet18, dataset: imagenet}}\nspace:\n{space}"
                                    f"objectives: {{top1: maximize}}\nn_trials: 2\n{fixed}")
    if not stops:
        with pytest.raises(SystemExit):  # reached the study: nothing stopped it
            cli.main(["study", "s.yaml", "-q"])
        return
    assert cli.main(["study", "s.yaml", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the training split of dataset 'imagenet', which is not available here" in err[0], err
    assert "looked for a train/ folder of synset folders at '/data/imagenet/train'" in err[0]
    assert sorted(p.name for p in workdir.iterdir()) == ["s.yaml"]


@pytest.mark.parametrize(("argv", "line"), [
    (["trial", "--model", "cnn", "--seed", "2147483647", "--replicates", "2"],
     "seed=2147483647 with replicates=2: the last replicate's seed 2147483648 is above 2147483647; use seed <= 2147483646"),
    (["train", "--model", "cnn", "--seed", "-1"], "--seed=-1 must be an integer in 0..2147483647"),
    (["train", "--model", "cnn", "--seed", "4294967296"], "--seed=4294967296 must be an integer in 0..2147483647"),
])  # fmt: skip
def test_a_seed_out_of_range_is_one_line_naming_the_seed_given(workdir, capsys, monkeypatch, argv, line):
    """`trial --seed 2147483647 --replicates 2` created a configuration run, closed it FAILED and said
    "seed=2147483648 must be ..." (a seed nobody gave); `train --seed -1` said scikit-learn's
    "The 'random_state' parameter of train_test_split must be ...", naming no option."""
    from wavesweep import cli, train

    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: pytest.fail("a base model was loaded"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wavesweep: error: {line}"], err
    assert not (workdir / "mlflow.db").exists()


@pytest.mark.parametrize(("seed", "key"), [("seed: 2147483646", "fixed.seed"), ("", "space.seed")])
def test_a_study_whose_replicate_seeds_overflow_is_one_line(workdir, capsys, seed, key):
    """A spec with seed 2147483646 (or a searched seed up to it) and replicates: 3 was accepted;
    its trials then failed on "seed=2147483648 must be an integer in 0..2147483647"."""
    from wavesweep import cli

    space = "percentile: [40, 60]" if seed else "seed: {low: 2147483600, high: 2147483646}"
    text = _STUDY.format(base=f", {seed}" if seed else "", space=space) + "replicates: 3\n"
    (workdir / "s.yaml").write_text(text)
    assert cli.main(["study", "s.yaml", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f": {key}: seed=2147483646 with replicates=3: the last replicate's seed 2147483648 is above 2147483647; use seed <= 2147483645" in err[0], err


@pytest.mark.parametrize(("out", "shown"), [("", "."), (".", "."), ("/", "/"), ("..", "..")])
def test_results_out_naming_no_file_is_one_line_naming_the_option(workdir, capsys, monkeypatch, out, shown):
    """`--out ''` (an MLproject-style empty value) or `--out .` said "PosixPath('.') has an empty
    name", naming neither the option nor what to give."""
    from wavesweep import cli, results

    monkeypatch.setattr(results, "run_grid", lambda *a, **k: pytest.fail("the grid ran"))
    assert cli.main(["results", "--model", "cnn", "--dataset", "digits", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wavesweep: error: --out {shown}: {shown} is a folder; give the page's file name (e.g. {Path(out) / 'results.md'})"], err


@pytest.mark.parametrize("value", ["50,150", "-5"])
def test_a_results_fraction_outside_0_100_names_the_option(workdir, capsys, monkeypatch, value):
    """`--fractions 150` said "percentile must be a number in [0, 100]": an option `results` does
    not have. One line naming --fractions and the value, before any trial."""
    from wavesweep import cli, results

    monkeypatch.setattr(results, "run_grid", lambda *a, **k: pytest.fail("the grid ran"))
    args = ["results", "--model", "cnn", "--dataset", "digits", "--fractions", value, "--out", "page.md"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    bad = value.split(",")[-1]
    assert err == [f"wavesweep: error: --fractions={value!r}: {int(bad)} is not a pruned percentage in 0..100"], err


def test_a_study_spec_that_is_a_folder_says_so(workdir, capsys):
    """`wavesweep study /tmp` said the spec "does not exist"."""
    from wavesweep import cli

    (workdir / "specs").mkdir()
    assert cli.main(["study", str(workdir / "specs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wavesweep: error: study spec {str(workdir / 'specs')!r} is a folder; give a spec file "
                   "(e.g. sweeps/digits-resnet18.yaml)"], err


@pytest.mark.parametrize("run_id", ["", "  "])
def test_register_an_empty_run_id_is_one_line_naming_it(workdir, capsys, run_id):
    """`wavesweep register '' --name m` said "no run  to register" (or, with a store, passed
    MLflow's own message on): one line saying the run id is empty and what to give."""
    from wavesweep import cli

    assert cli.main(["register", run_id, "--name", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"wavesweep: error: run_id {run_id!r} is empty: give the id of a trial run (or of one of its "
                   "method runs), as the MLflow UI or `mlflow runs list` shows it"], err
    assert not (workdir / "mlflow.db").exists()
