"""The results page: verdicts from paired intervals, the rendered tables and summary, and the
CSV of every trial beside the page (numbers recomputable from it)."""

from __future__ import annotations

import math
import re
import time

import pandas as pd
import pytest
import torch

from wavesweep import results


def _frame() -> pd.DataFrame:
    rows = []
    for lay, gaps in (("filter", [(0.02, 0.01, 0.03), (-0.04, -0.06, -0.02), (0.0, -0.01, 0.01)]),
                      ("kernel", [(0.0, 0.0, 0.0)] * 3)):  # fmt: skip
        for (gap, lo, hi), rec in zip(gaps, ("none", "bn", "finetune")):
            rows.append({
                "wavelet": "bior4.4", "layout": lay, "percentile": 80.0, "recovery": rec, "pruned_fraction": 0.8,
                "levels": "0/5" if lay == "filter" else "0", "seconds": 1.0,
                "dwt_top1": 0.5 + gap, "magnitude_top1": 0.5, "random_top1": 0.1,
                "dwt_vs_magnitude_gap": gap, "dwt_vs_magnitude_low": lo, "dwt_vs_magnitude_high": hi,
                "dwt_vs_random_gap": 0.4 + gap, "dwt_vs_random_low": 0.3, "dwt_vs_random_high": 0.5,
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_render_says_when_pruned_is_not_the_percentile():
    """haar in the `kernel` layout zeroes positions that carry no weight (7 of a 3x3 kernel's 16
    coefficients): a grid run at percentile 60 prunes 29 % (a real cnn trial on digits), and the
    page must say so rather than "the fraction dwt zeroed" beside a 29 % column."""
    grid = results.Grid(model="cnn", configs=(("bior4.4", "filter"), ("bior4.4", "kernel")), fractions=(80,))
    facts = {"date": "d", "machine": "CPU only (x86_64, 2 CPU cores)", "seconds": 60.0, "base_load_seconds": 1.0,
             "base_checksum": "ab" * 32, "base_top1": 0.9, "n_eval": 100, "base_train_top1": 0.91}  # fmt: skip
    plain = results.render(_frame(), facts, grid, "wavesweep results")
    assert "at the fraction dwt zeroed there." in plain and "below the percentile" not in plain
    frame = _frame()
    frame.loc[frame["layout"] == "kernel", ["wavelet", "percentile", "pruned_fraction"]] = ["haar", 60.0, 0.2889]
    text = results.render(frame, facts, grid, "wavesweep results")
    assert "`pruned` is below the percentile asked for in haar `kernel` at 60: 29%." in text
    assert "| 29% | none |" in text


def test_verdict_follows_the_interval():
    assert results.verdict(0.001, 0.2) == "better"
    assert results.verdict(-0.2, -0.001) == "worse"
    assert results.verdict(-0.01, 0.01) == results.verdict(0.0, 0.0) == "equal"
    nan = float("nan")
    assert results.verdict(nan, 0.1) == results.verdict(0.1, nan) == results.verdict(nan, nan) == "n/a"


def test_win_counts_name_every_label_tied_for_the_most():
    """Counts in a fixed order, whatever the rows' order: the old summary took whichever of the
    tied labels came first (the cnn page read "magnitude" over magnitude 4, dwt 4, random 4)."""
    w = pd.Series(["magnitude", "dwt", "random", "tie", "dwt", "magnitude", "random"])
    assert results.win_counts(w) == results.win_counts(w[::-1]) == "dwt 2, magnitude 2, random 2, tie 1"
    assert results.win_counts(pd.Series(["tie", "dwt", "tie"])) == "tie 2, dwt 1"


@pytest.mark.parametrize("argv, needle", [
    (["--fractions", ""], "--fractions='' is empty"),
    (["--fractions", "50,x"], "--fractions='50,x': 'x' is not an integer"),
    (["--recoveries", " , "], "--recoveries=' , ' is empty"),
    (["--configs", ""], "--configs='' is empty"),
    (["--configs", "bior4.4:filter,kernel:db4"],
     "--configs='bior4.4:filter,kernel:db4': 'kernel:db4' is LAYOUT:WAVELET; --configs takes WAVELET:LAYOUT, e.g. db4:kernel"),
])  # fmt: skip
def test_an_empty_or_malformed_grid_is_one_line_before_any_work(workdir, capsys, monkeypatch, argv, needle):
    from wavesweep import cli, train

    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: pytest.fail("work before the grid was checked"))
    assert cli.main(["results", "--model", "cnn", "--out", str(workdir / "p.md"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wavesweep: error: {needle}"), err


@pytest.mark.parametrize("out, needle", [
    ("pages", "--out pages: pages is a folder"),
    ("page.md", "--out page.md: page.progress.csv is a folder"),
    ("afile/page.md", "--out afile/page.md: afile is a file, not a folder"),
    # the CSV beside the page is PAGE.csv: the page was written, then replaced by its CSV ("wrote page.csv")
    ("page.csv", "--out page.csv: the trials' CSV is written to PAGE.csv, which would replace the page"),
    ("new/", "--out new/: new/ names a folder"),  # was a page written to a file named 'new'
])  # fmt: skip
def test_an_out_path_that_cannot_be_written_is_one_line_before_any_work(workdir, capsys, monkeypatch, out, needle):
    """The page is written after the whole grid has run: a folder named like the page (or its
    progress file), or a file where a folder must be, was a traceback at the very end."""
    from wavesweep import cli, train

    (workdir / "pages").mkdir()
    (workdir / "page.progress.csv").mkdir()
    (workdir / "afile").write_text("")
    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: pytest.fail("work before --out was checked"))
    assert cli.main(["results", "--model", "cnn", "--dataset", "digits", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"wavesweep: error: {needle}"), err


def test_a_cuda_device_without_cuda_is_one_line_before_any_work(workdir, capsys, monkeypatch):
    """As for ``wavesweep trial``: exit 2 and one line, not a RuntimeError's traceback (exit 1)."""
    import torch

    from wavesweep import cli, train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: pytest.fail("work before the device was checked"))
    assert cli.main(["results", "--model", "cnn", "--dataset", "digits", "--device", "cuda", "--out", "p.md"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["wavesweep: error: device 'cuda' requested but CUDA is not available; use 'cpu' or 'auto'"], err


def test_render_counts_and_ties(tmp_path):
    grid = results.Grid(model="cnn", configs=(("bior4.4", "filter"), ("bior4.4", "kernel")), fractions=(80,))
    facts = {"date": "d", "machine": "CPU only (x86_64, 2 CPU cores)", "seconds": 60.0, "base_load_seconds": 1.0,
             "base_checksum": "ab" * 32, "base_top1": 0.9, "n_eval": 100, "base_train_top1": 0.91}  # fmt: skip
    text = results.render(_frame(), facts, grid, "wavesweep results --model cnn")
    assert "| 80% | none | 0.5200 | 0.5000 | 0.1000 | +0.020 [+0.010, +0.030] | better |" in text
    assert "| 80% | bn | 0.4600 | 0.5000 | 0.1000 | -0.040 [-0.060, -0.020] | worse |" in text
    assert "| bn | 0 | 1 | 1 | -0.0200 | magnitude 1, tie 1 |" in text  # filter worse, kernel equal (identical)
    assert "| finetune | 0 | 2 | 0 | +0.0000 | tie 2 |" in text  # equal top-1 is a tie, not the first column
    assert "`filter`: dwt better than magnitude in 1 of 3 settings" in text
    assert "is* magnitude pruning here" in text and "Run on the CPU only" in text
    path = results.write_page(text, tmp_path / "page.md", _frame())
    assert path.read_text() == text
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "page.csv"), _frame())


def test_grid_validates_every_trial_before_work():
    with pytest.raises(ValueError, match="unknown layout 'diagonal'"):
        results.Grid(configs=(("bior4.4", "diagonal"),)).trials()
    with pytest.raises(ValueError, match="not WAVELET:LAYOUT"):
        results.parse_configs("bior4.4")
    assert len(results.Grid().trials()) == 5 * 3 * 3


@pytest.mark.parametrize("content", [b"", b'garbage,,"\n', b"\x00\x01\xff binary"], ids=["empty", "unclosed-quote", "binary"])
def test_a_damaged_progress_file_is_one_line_naming_it_and_is_kept(workdir, capsys, monkeypatch, content):
    """A progress file that cannot be read was pandas' own line ("No columns to parse from file",
    "Error tokenizing data...") naming neither the file nor the way out; it now names both, and the
    file is left as it was (it may hold finished trials)."""
    from types import SimpleNamespace

    from wavesweep import cli, train

    base = SimpleNamespace(checksum="ab" * 32, train_info={})
    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: base)
    monkeypatch.setattr(results, "run_trial", lambda *a, **k: pytest.fail("a trial ran beside a damaged progress file"))
    progress = results.progress_path(workdir / "page.md")
    progress.write_bytes(content)
    argv = ["results", "--model", "cnn", "--dataset", "digits", "--configs", "haar:filter", "--fractions", "50",
            "--recoveries", "none", "--device", "cpu", "--out", str(workdir / "page.md")]  # fmt: skip
    assert cli.main(argv) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("INFO")]
    assert len(err) == 1 and err[0].startswith(f"wavesweep: error: progress file {progress} "), err
    assert "--fresh" in err[0] and "move it away" in err[0], err
    assert progress.read_bytes() == content


def test_a_second_results_command_on_one_page_waits_for_the_first(workdir, capsys, monkeypatch):
    """Two `wavesweep results` on one page each ran every trial and each rewrote the progress file
    with its own rows only; the second now says it waits, and runs (resuming from the first's
    progress) only once the first is done."""
    import fcntl
    import threading

    from wavesweep import cli, fileio

    waiting, calls = threading.Event(), []
    real_lock = fileio.file_lock

    def lock(path, on_wait=None):  # the real lock, its on_wait seen by the test too
        return real_lock(path, on_wait=lambda: (on_wait(), waiting.set()))

    monkeypatch.setattr(fileio, "file_lock", lock)
    def run_grid(*args, **kwargs):  # records whether the first still held the page, then stops the command
        calls.append(held[0])
        raise ValueError("stub")

    monkeypatch.setattr(results, "run_grid", run_grid)
    argv = ["results", "--model", "cnn", "--dataset", "digits", "--configs", "haar:filter", "--fractions", "50",
            "--recoveries", "none", "--device", "cpu", "--out", str(workdir / "page.md")]  # fmt: skip
    held = [True]
    with open(workdir / ".page.md.lock", "a+b") as first:  # the first command's hold on the page
        fcntl.flock(first.fileno(), fcntl.LOCK_EX)
        second = threading.Thread(target=lambda: calls.append(cli.main(argv)))
        second.start()
        assert waiting.wait(60), "the second command did not wait for the lock"
        assert calls == []  # nothing ran while the first held the page
        held[0] = False
        fcntl.flock(first.fileno(), fcntl.LOCK_UN)
    second.join(60)
    assert calls == [False, 2]  # the grid ran after the release (then the stub's error: exit 2)
    assert "another wavesweep results is writing" in capsys.readouterr().out


def test_a_command_waiting_for_a_page_resumes_from_the_trials_of_the_one_that_wrote_it(workdir, monkeypatch):
    """The second command on a page said it waited so that the first's trials would be reused, but
    the first removed its progress file once it had written the page, so the second ran every
    trial again; the first keeps the file for a command waiting on the page (seen with two real
    `wavesweep results` on one page: both printed [1/2] and [2/2])."""
    import threading

    from wavesweep import cli, fileio

    progress = results.progress_path(workdir / "page.md")
    second_waits, seen = threading.Event(), []
    real_lock = fileio.file_lock

    def lock(path, on_wait=None):
        return real_lock(path, on_wait=lambda: (on_wait(), second_waits.set()))

    def run_grid(grid, *, progress, **kwargs):
        if not seen:  # the first command: its trials recorded, it finishes once the second waits
            seen.append("first")
            progress.write_text("its rows\n")
            assert second_waits.wait(60), "the second command did not wait for the lock"
        else:
            seen.append(progress.is_file())  # the first's trials there to resume from
        return pd.DataFrame(), {"seconds": 0.0}

    monkeypatch.setattr(fileio, "file_lock", lock)
    monkeypatch.setattr(results, "run_grid", run_grid)
    monkeypatch.setattr(results, "render", lambda *args: "page")
    argv = ["results", "--model", "cnn", "--dataset", "digits", "--configs", "haar:filter", "--fractions", "50",
            "--recoveries", "none", "--device", "cpu", "--out", str(workdir / "page.md")]  # fmt: skip
    codes = []
    first = threading.Thread(target=lambda: codes.append(cli.main(argv)))
    first.start()
    while not seen:
        time.sleep(0.01)
    second = threading.Thread(target=lambda: codes.append(cli.main(argv)))
    second.start()
    first.join(60)
    second.join(60)
    assert codes == [0, 0] and seen == ["first", True]
    assert not progress.exists() and not list(workdir.glob(".page.md.waiting.*"))  # the last one leaves nothing


@pytest.mark.slow  # trains a small base model and runs 10 trials (about 30 s)
def test_an_interrupted_grid_resumes_with_the_same_numbers(workdir):
    """A grid stopped after two trials resumes from its progress file: the finished trials are
    not rerun, and the page's numbers equal those of an uninterrupted run; a progress file of
    another grid (here: another seed) is not reused."""
    grid = results.Grid(model="cnn", dataset="digits", configs=(("haar", "filter"),), fractions=(50, 90),
                        recoveries=("none", "finetune"), eval_limit=120, finetune_steps=2, recovery_batches=2,
                        device="cpu")  # fmt: skip
    whole, whole_facts = results.run_grid(grid)
    assert whole_facts["resumed"] == 0 and len(whole) == 4
    assert whole_facts["bn_batches"] == 2 and "re-estimated on 2 training batches;" in results.render(whole, whole_facts, grid, "c")

    progress = results.progress_path(workdir / "page.md")
    ran = []

    def stop_after_two(i, n, cfg):
        if len(ran) == 2:
            raise KeyboardInterrupt
        ran.append((cfg.percentile, cfg.recovery))

    with pytest.raises(KeyboardInterrupt):
        results.run_grid(grid, on_trial=stop_after_two, progress=progress)
    assert len(pd.read_csv(progress)) == 2

    resumed_calls, ran_again = [], []
    frame, facts = results.run_grid(grid, progress=progress, on_resume=lambda k, n: resumed_calls.append((k, n)),
                                    on_trial=lambda i, n, cfg: ran_again.append((cfg.percentile, cfg.recovery)))
    assert resumed_calls == [(2, 4)] and facts["resumed"] == 2
    assert ran_again == [(90.0, "none"), (90.0, "finetune")]  # the first two were not rerun
    numbers = [c for c in whole.columns if c != "seconds"]
    pd.testing.assert_frame_equal(frame[numbers], whole[numbers], check_dtype=False, check_exact=True)
    assert facts["seconds"] >= frame["seconds"].sum()
    assert "2 of 4 trials were carried over" in results.render(frame, facts, grid, "wavesweep results")
    # every trial carried over: the batches re-estimation ran come from the rows (they fell back to
    # the grid's recovery_batches, which is not what ran where a pass over the split is shorter)
    _, again = results.run_grid(grid, progress=progress)
    assert again["resumed"] == 4 and again["bn_batches"] == 2
    # a progress file written before rows kept those batches: its recovered trials run again
    pd.read_csv(progress).drop(columns="bn_batches").to_csv(progress, index=False)
    rerun = []
    old, old_facts = results.run_grid(grid, progress=progress, on_trial=lambda i, n, cfg: rerun.append(cfg.recovery))
    assert rerun == ["finetune", "finetune"] and old_facts["resumed"] == 2 and old_facts["bn_batches"] == 2
    same = [c for c in numbers if c != "bn_batches"]  # the carried rows of recovery none lack it too
    pd.testing.assert_frame_equal(old[same], whole[same], check_dtype=False, check_exact=True)

    other = results.Grid(**{**grid.__dict__, "seed": 1})
    seen = []
    with pytest.raises(ValueError, match="holds trials of other settings"):  # refused, not overwritten
        results.run_grid(other, progress=progress, on_resume=lambda k, n: seen.append(k),
                         on_trial=lambda i, n, cfg: None)
    assert seen == []  # rows of seed 0 are not rows of seed 1


@pytest.mark.slow  # a subprocess that trains (or loads) a small base model and runs one trial
def test_results_command_runs_where_mlflow_is_not_installed(workdir, shared_cache):
    """`wavesweep results` needs no MLflow (a GPU machine may lack it): with ``import mlflow``
    failing, the page is written, its progress file removed, and no MLflow module was imported."""
    import subprocess
    import sys

    from tests.conftest import subprocess_env

    block = workdir / "block" / "mlflow"
    block.mkdir(parents=True)
    (block / "__init__.py").write_text("raise ImportError('mlflow is not installed (blocked for this test)')\n")
    env = subprocess_env(workdir, shared_cache)
    env["PYTHONPATH"] = f"{workdir / 'block'}:{env['PYTHONPATH']}"
    code = ("import sys\nfrom wavesweep import cli\n"
            "rc = cli.main(['results', '--model', 'cnn', '--dataset', 'digits', '--configs', 'haar:filter',"
            " '--fractions', '50', '--recoveries', 'none', '--eval-limit', '60', '--device', 'cpu', '--out', 'page.md'])\n"
            "print(rc, sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))\n")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.splitlines()[-1] == "0 []", out.stdout + out.stderr
    assert "| 50% | none |" in (workdir / "page.md").read_text()
    assert len(pd.read_csv(workdir / "page.csv")) == 1
    assert not results.progress_path(workdir / "page.md").exists()


def test_the_pruned_column_is_the_budget_the_baselines_were_matched_to(monkeypatch, tmp_path):
    """haar in the kernel layout pads each 3x3 kernel to 16 coefficients, 7 of them zero whatever
    the weights: at percentile 50 dwt zeroes 8 of 16 positions but prunes about 1 of the 9 that carry
    the weights, and magnitude/random prune that 1 in 9. The page's "pruned" column is that matched
    budget (the trial's ``pruned_fraction``), not 50 %. Oracle: the fraction of weights magnitude
    and random actually zeroed."""
    import warnings

    import torch

    from wavesweep import train
    from wavesweep.models import build_model

    monkeypatch.setenv("WAVESWEEP_CACHE", str(tmp_path))
    torch.manual_seed(0)
    torch.save(build_model("cnn", num_classes=10, in_channels=1, image_size=8).state_dict(), tmp_path / "cnn.pt")
    base = train.get_base_model("cnn", "digits", seed=0, weights=tmp_path / "cnn.pt", cache_root=tmp_path, progress=False)
    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: base)
    seen = []
    run_trial = results.run_trial
    monkeypatch.setattr(results, "run_trial", lambda cfg, **kw: seen.append(run_trial(cfg, **kw)) or seen[-1])
    grid = results.Grid(model="cnn", dataset="digits", configs=(("haar", "kernel"),), fractions=(50,),
                        recoveries=("none",), eval_limit=60, device="cpu")  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame, _ = results.run_grid(grid)
    (r,) = seen
    fraction = frame["pruned_fraction"].iloc[0]
    assert fraction == pytest.approx(r.metrics()["parent"]["pruned_fraction"])
    for m in ("magnitude", "random"):
        st = r.outcomes[m].stats
        assert fraction == pytest.approx(st.target_zero_weights / st.target_params, abs=1e-3), m
    assert fraction < 0.2  # not the 50 % of coefficient positions


@pytest.mark.parametrize("page_name", ["results-fashion-mnist", "results-fashion-mnist-cnn-cpu"])
def test_the_committed_page_is_its_csv_rendered(page_name):
    """"Every trial's numbers are written beside the page": the committed page's tables, verdicts,
    summary and per-trial seconds are what its committed CSV renders (a page regenerated without
    its CSV leaves numbers beside it that no row of the page has: the 2026-11-27 page was
    committed beside the 2026-11-26 run's CSV, 21 of 45 rows apart)."""
    from pathlib import Path

    docs = Path(__file__).resolve().parents[1] / "docs"
    page = (docs / f"{page_name}.md").read_text()
    frame = pd.read_csv(docs / f"{page_name}.csv", dtype={"levels": str})
    facts = {"date": "d", "machine": "GPU", "seconds": 1.0, "base_load_seconds": 1.0, "base_checksum": "ab" * 32,
             "base_top1": 0.9, "n_eval": 2000, "base_train_top1": None}  # fmt: skip
    rendered = results.render(frame, facts, results.Grid(eval_limit=2000), "wavesweep results")
    body = lambda text: text[text.index("\n## "):].splitlines()  # noqa: E731  (the header holds the run's facts)
    differ = [(p, r) for p, r in zip(body(page), body(rendered)) if p != r]
    assert len(body(page)) == len(body(rendered)) and not differ, differ[:3]


def test_the_page_names_the_batches_re_estimation_ran_when_a_pass_is_fewer_than_asked():
    """digits' training split makes 22 batches of 64: a grid asking 50 re-estimates on 22 (one
    pass, recovery.epoch_batches), and the page says so instead of "50 training batches"."""
    facts = {"machine": "GPU", "bn_batches": 22}
    lines = "\n".join(results._recovery_and_machine(results.Grid(recovery_batches=50), facts))
    assert "re-estimated on 22 training batches (one pass over the training split; 50 asked);" in lines
    # no trial recovered (a page of recovery none alone): what bn would run, not 50 where a pass is 22
    unknown = "\n".join(results._recovery_and_machine(results.Grid(), {"machine": "GPU"}))
    assert "re-estimated on up to 50 training batches (one pass over the training split at most);" in unknown


def test_an_eval_limit_of_the_whole_split_is_called_all_not_a_subset():
    """digits has 360 test examples: --eval-limit 360 evaluates all of them (data.eval_subset takes
    the whole split), and the page called them "a stratified subset"."""
    grid = results.Grid(eval_limit=360)
    assert results._whole_split(grid, [{"n_eval": 360, "n_test_split": 360}])
    assert results._whole_split(results.Grid(eval_limit=1000), [{"n_eval": 360, "n_test_split": 360}])
    assert not results._whole_split(results.Grid(eval_limit=200), [{"n_eval": 200, "n_test_split": 360}])
    assert results._whole_split(results.Grid(eval_limit=0), [{"n_eval": 360}])
    # facts of an earlier version (no split size): a limit above what was evaluated
    assert results._whole_split(results.Grid(eval_limit=1000), [{"n_eval": 360}])
    assert not results._whole_split(results.Grid(eval_limit=360), [{"n_eval": 360}])
    seeds = [{"n_eval": 360, "n_test_split": 360}, {"n_eval": 200, "n_test_split": 360}]
    assert not results._whole_split(results.Grid(eval_limit=360), seeds)


def test_the_verdict_follows_from_the_printed_interval():
    """The page's rule is "*better*/*worse*: the interval excludes 0; *equal*: it contains 0", read
    off the printed interval: with the whole fashion-mnist test split (10,000 examples), dwt right
    on 4 examples magnitude gets wrong and no others gives the bootstrap interval [+0.0001,
    +0.0008], printed [+0.000, +0.001] beside *better*. Oracle: the rule applied to the printed
    bounds, with the interval from stats.paired_comparison."""
    import re

    import numpy as np

    from wavesweep.stats import paired_comparison

    dwt, magnitude = np.zeros(10_000, bool), np.zeros(10_000, bool)
    dwt[:4] = True
    c = paired_comparison(dwt, magnitude, seed=0)
    assert 0 < c.ci_low < 0.0005  # a bound that is not 0 but rounds to it at 3 decimals
    frame = _frame().iloc[:1].assign(dwt_vs_magnitude_gap=c.gap, dwt_vs_magnitude_low=c.ci_low,
                                     dwt_vs_magnitude_high=c.ci_high)  # fmt: skip
    grid = results.Grid(model="cnn", configs=(("bior4.4", "filter"),), fractions=(80,), recoveries=("none",))
    facts = {"date": "d", "machine": "CPU only (x86_64, 2 CPU cores)", "seconds": 60.0, "base_load_seconds": 1.0,
             "base_checksum": "ab" * 32, "base_top1": 0.9, "n_eval": 10_000, "base_train_top1": 0.91}  # fmt: skip
    text = results.render(frame, facts, grid, "wavesweep results")
    (row,) = [line for line in text.splitlines() if line.startswith("| 80% |")]
    low, high, said = re.search(r"\| \S+ \[(\S+), (\S+)\] \| (\w+) \|", row).groups()
    rule = "better" if float(low) > 0 else "worse" if float(high) < 0 else "equal"
    assert said == results.verdict(c.ci_low, c.ci_high) == rule == "better", row
    assert "largest: +0.0004 at 80%" in text  # the summary's gap of a *better* row is not +0.000 either


@pytest.mark.parametrize("argv, needle", [
    (["--seed", "1"], "(seed 0, not 1)"),
    (["--eval-limit", "60"], "(eval_limit 120, not 60)"),
    (["--fractions", "50"], "(trial haar:filter at 90 with recovery none, which this grid does not have)"),
])  # fmt: skip
def test_a_progress_file_of_other_settings_is_refused_and_kept(workdir, capsys, monkeypatch, argv, needle):
    """A progress file of another command on the same page (another seed, evaluation subset or
    grid) was passed over, and rewritten with this run's rows after its first trial: the other
    run's finished trials were lost without a word (seen: 3 trials of --eval-limit 120 gone after
    a run with --eval-limit 60). It is now one line naming the file and what differs, the file as
    it was, no trial run."""
    from types import SimpleNamespace

    from wavesweep import cli, train

    base = SimpleNamespace(checksum="ab" * 32, train_info={})
    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: base)
    monkeypatch.setattr(results, "run_trial", lambda *a, **k: pytest.fail("a trial ran beside another run's progress"))
    progress = results.progress_path(workdir / "page.md")
    identity = {"model": "cnn", "dataset": "digits", "level": 5, "eval_limit": 120, "seed": 0, "recovery_batches": 50,
                "finetune_steps": 100, "base_checksum": "ab" * 32, "device": "cpu"}  # fmt: skip
    rows = [{"wavelet": "haar", "layout": "filter", "percentile": p, "recovery": "none", "dwt_top1": 0.5, **identity}
            for p in (50.0, 90.0)]  # fmt: skip
    pd.DataFrame(rows).to_csv(progress, index=False)
    content = progress.read_bytes()
    command = ["results", "--model", "cnn", "--dataset", "digits", "--configs", "haar:filter", "--fractions", "50,90",
               "--recoveries", "none", "--eval-limit", "120", "--device", "cpu", "--out", str(workdir / "page.md")]
    assert cli.main(command + argv) == 2
    err = [l for l in capsys.readouterr().err.strip().splitlines() if not l.startswith("INFO")]
    assert len(err) == 1 and err[0].startswith(f"wavesweep: error: progress file {progress} holds trials of other "
                                               f"settings {needle}; move it away"), err  # fmt: skip
    assert "--fresh" in err[0] and progress.read_bytes() == content


def test_an_eval_limit_above_the_test_split_is_said_to_be_all_of_it():
    """`--eval-limit 5000` on digits evaluates the whole 360-example test split (data.eval_subset
    takes all of a split no larger than the limit), and the page said "360 test examples (a
    stratified subset, seed 0)"."""
    grid = results.Grid(model="cnn", dataset="digits", configs=(("bior4.4", "filter"), ("bior4.4", "kernel")),
                        fractions=(80,), eval_limit=5000)  # fmt: skip
    facts = {"date": "d", "machine": "CPU only (x86_64, 2 CPU cores)", "seconds": 60.0, "base_load_seconds": 1.0,
             "base_checksum": "ab" * 32, "base_top1": 0.9, "n_eval": 360, "base_train_top1": 0.91}  # fmt: skip
    assert "- Evaluation: 360 test examples (all); " in results.render(_frame(), facts, grid, "wavesweep results")
    subset = results.Grid(**{**grid.__dict__, "eval_limit": 100})
    text = results.render(_frame(), {**facts, "n_eval": 100}, subset, "wavesweep results")
    assert "- Evaluation: 100 test examples (a stratified subset, seed 0); " in text


@pytest.mark.parametrize("argv, line", [
    (["--seeds", "3"], "--seeds='3' is one seed: give at least 2 distinct seeds in 0..2147483647, comma-separated "
                       "(e.g. --seeds 0,1,2), or --seed 3 for one seed"),
    (["--seeds", "0,1,0"], "--seeds='0,1,0': '0' appears twice; give at least 2 distinct seeds in 0..2147483647, "
                           "comma-separated (e.g. --seeds 0,1,2)"),
    (["--seeds", "0,-1"], "--seeds='0,-1': '-1' is not a seed in 0..2147483647; give at least 2 distinct seeds in "
                          "0..2147483647, comma-separated (e.g. --seeds 0,1,2)"),
    (["--seeds", "0,x"], "--seeds='0,x': 'x' is not an integer; give at least 2 distinct seeds in 0..2147483647, "
                         "comma-separated (e.g. --seeds 0,1,2)"),
    (["--seed", "0", "--seeds", "0,1"], "--seed 0 with --seeds 0,1: give one or the other (--seeds runs the whole "
                                        "grid once per seed listed, e.g. --seeds 0,1,2)"),
    # int() takes these; they ran seeds 10 and 2, 3 and 1, and 0 and 1 (the empty item dropped)
    (["--seeds", "1_0,2"], "--seeds='1_0,2': '1_0' is not an integer; give at least 2 distinct seeds in 0..2147483647, "
                           "comma-separated (e.g. --seeds 0,1,2)"),
    (["--seeds", "\u0663,1"], "--seeds='\u0663,1': '\u0663' is not an integer; give at least 2 distinct seeds in "
                               "0..2147483647, comma-separated (e.g. --seeds 0,1,2)"),
    (["--seeds", "0,,1"], "--seeds='0,,1': '' is not an integer; give at least 2 distinct seeds in 0..2147483647, "
                          "comma-separated (e.g. --seeds 0,1,2)"),
    # a first item with a dash: argparse took it for an option ("expected one argument")
    (["--seeds", "-1,2"], "--seeds='-1,2': '-1' is not a seed in 0..2147483647; give at least 2 distinct seeds in "
                          "0..2147483647, comma-separated (e.g. --seeds 0,1,2)"),
    (["--fractions", "-10,50"], "--fractions='-10,50': -10 is not a pruned percentage in 0..100"),
    (["--seeds", "-1,two"], "--seeds='-1,two': 'two' is not an integer; give at least 2 distinct seeds in 0..2147483647, "
                            "comma-separated (e.g. --seeds 0,1,2)"),
    (["--fraction", "-10,50"], "--fractions='-10,50': -10 is not a pruned percentage in 0..100"),  # argparse's abbreviation
], ids=["one-seed", "repeated", "negative", "not-an-integer", "with-seed", "underscore", "other-digits", "empty-item",
        "negative-first", "negative-fraction-first", "negative-first-not-a-number", "abbreviated"])  # fmt: skip
def test_bad_seeds_are_one_line_before_any_work(workdir, capsys, monkeypatch, argv, line):
    """``--seeds`` is at least 2 distinct non-negative seeds, and not beside an explicit ``--seed``
    (even the default's 0: which page would it be?): one line and exit 2, before a base model."""
    from wavesweep import cli, train

    monkeypatch.setattr(train, "get_base_model", lambda *a, **k: pytest.fail("work before --seeds was checked"))
    assert cli.main(["results", "--model", "cnn", "--dataset", "digits", "--out", str(workdir / "p.md"), *argv]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"wavesweep: error: {line}"]
    assert not (workdir / "p.md").exists()


def _seeds_frame() -> pd.DataFrame:
    """Three seeds of four settings whose gaps over seeds are better, worse, equal and undefined (a NaN gap)."""
    gaps = {"none": (0.02, 0.03, 0.025), "bn": (-0.05, -0.04, -0.06), "finetune": (0.05, -0.04, 0.0),
            "x": (0.01, float("nan"), 0.02)}  # fmt: skip
    seed_ci = {0.02: (0.01, 0.03), 0.03: (-0.01, 0.07), 0.025: (0.005, 0.045), -0.05: (-0.07, -0.03),
               -0.04: (-0.06, -0.02), -0.06: (-0.08, -0.04), 0.05: (0.03, 0.07), 0.0: (-0.01, 0.01),
               0.01: (-0.01, 0.03)}  # fmt: skip
    rows = []
    for seed in range(3):
        for rec, gs in gaps.items():
            gap = gs[seed]
            lo, hi = seed_ci.get(gap, (float("nan"), float("nan")))
            rows.append({
                "seed": seed, "wavelet": "bior4.4", "layout": "filter", "percentile": 80.0, "recovery": rec,
                "pruned_fraction": 0.8 + seed / 1000, "levels": "5", "seconds": 1.0 + seed, "base_top1": 0.9,
                "n_eval": 100, "dwt_top1": 0.5 + (0 if gap != gap else gap) + seed / 100,
                "magnitude_top1": 0.5 + seed / 100, "random_top1": 0.1 * (seed + 1),
                "dwt_vs_magnitude_gap": gap, "dwt_vs_magnitude_low": lo, "dwt_vs_magnitude_high": hi,
                "dwt_vs_random_gap": 0.4 + seed / 10, "dwt_vs_random_low": 0.3, "dwt_vs_random_high": 0.5,
            })  # fmt: skip
    return pd.DataFrame(rows)


def test_the_page_over_seeds_is_the_t_interval_of_the_seeds_gaps():
    """Per setting: mean top-1 over seeds, the mean gap and its 95 % Student-t interval over seeds,
    the verdict from that interval (n/a where a seed's gap is missing) and the seeds' own verdicts
    counted. Oracle: numpy and scipy on the frame's columns, and the page's rule applied to the
    printed bounds."""
    import re

    import numpy as np
    from scipy import stats

    frame = _seeds_frame()
    table = results.over_seeds(frame).set_index("recovery")
    facts = [{"seed": s, "date": "d", "machine": "CPU only (x86_64, 2 CPU cores)", "seconds": 60.0,
              "base_load_seconds": 1.0, "base_checksum": f"{s}a" * 32, "base_top1": 0.9 + s / 100, "n_eval": 100,
              "base_train_top1": 0.91} for s in range(3)]  # fmt: skip
    grid = results.Grid(model="cnn", configs=(("bior4.4", "filter"),), fractions=(80,))
    text = results.render_seeds(frame, facts, grid, "wavesweep results --seeds 0,1,2")
    for rec, part in frame.groupby("recovery"):
        row = table.loc[rec]
        for col in ("dwt_top1", "magnitude_top1", "random_top1", "pruned_fraction"):
            assert row[col] == pytest.approx(np.mean(part[col]), abs=1e-12), (rec, col)
        for other in ("magnitude", "random"):
            gaps = part[f"dwt_vs_{other}_gap"].to_numpy()
            half = stats.t.ppf(0.975, 2) * np.std(gaps, ddof=1) / np.sqrt(3)
            oracle = (np.mean(gaps), np.mean(gaps) - half, np.mean(gaps) + half)
            got = tuple(row[f"dwt_vs_{other}_{k}"] for k in ("gap", "low", "high"))
            assert got == pytest.approx(oracle, abs=1e-12, nan_ok=True), (rec, other, got, oracle)
        (line,) = [ln for ln in text.splitlines() if ln.startswith(f"| 80% | {rec} |")]
        means = [f"{np.mean(part[f'{m}_top1']):.4f}" for m in ("dwt", "magnitude", "random")]
        assert line.startswith(f"| 80% | {rec} | {' | '.join(means)} | "), line
        low, high, said = re.search(r"\| \S+ \[(\S+), (\S+)\] \| (\S+) \|", line).groups()
        rule = "n/a" if "nan" in low + high else "better" if float(low) > 0 else "worse" if float(high) < 0 else "equal"
        assert said == row["verdict"] == rule, line
    assert dict(table["verdict"]) == {"none": "better", "bn": "worse", "finetune": "equal", "x": "n/a"}
    assert dict(table["seed_verdicts"]) == {"none": "2 better, 1 equal", "bn": "3 worse",
                                            "finetune": "1 better, 1 equal, 1 worse", "x": "1 better, 1 equal, 1 n/a"}
    assert "| none | 1 | 0 | 0 |" in text and "| bn | 0 | 0 | 1 |" in text
    assert "differ in 3 of 4 settings (1 of them better for one seed and worse for another)" in text
    for s in range(3):
        assert f"seed {s}: sha256 `{(f'{s}a' * 32)[:16]}…`, top-1 {0.9 + s / 100:.4f} on 100 examples" in text
        assert f"Per-trial seconds, seed {s}: {1 + s}, {1 + s}, {1 + s}, {1 + s}." in text


def test_seeds_gaps_that_cancel_read_as_plus_zero():
    """Gaps of -1, -8 and +9 examples of 2000 over three seeds: their mean is 0 (numpy's float sum
    is -2.9e-19); the CSV holds +0.0 and the page prints +0.000, not -0.000."""
    import numpy as np

    gaps = [-0.0005, -0.004, 0.0045]
    assert np.mean(gaps) < 0  # the float error the page must not show
    frame = pd.DataFrame([{
        "seed": s, "wavelet": "bior4.4", "layout": "filter", "percentile": 70.0, "recovery": "none",
        "pruned_fraction": 0.7, "levels": "5", "seconds": 1.0, "base_top1": 0.9, "n_eval": 2000,
        "dwt_top1": 0.5 + g, "magnitude_top1": 0.5, "random_top1": 0.1, "dwt_vs_magnitude_gap": g,
        "dwt_vs_magnitude_low": g - 0.01, "dwt_vs_magnitude_high": g + 0.01,
        "dwt_vs_random_gap": 0.4, "dwt_vs_random_low": 0.3, "dwt_vs_random_high": 0.5,
    } for s, g in enumerate(gaps)])  # fmt: skip
    row = results.over_seeds(frame).iloc[0]
    assert row["dwt_vs_magnitude_gap"] == 0 and math.copysign(1, row["dwt_vs_magnitude_gap"]) == 1
    facts = [{"seed": s, "date": "d", "machine": "m", "seconds": 1.0, "base_load_seconds": 1.0, "base_checksum": "a" * 64,
              "base_top1": 0.9, "n_eval": 2000, "base_train_top1": 0.9} for s in range(3)]  # fmt: skip
    grid = results.Grid(model="cnn", configs=(("bior4.4", "filter"),), fractions=(70,))
    (line,) = [ln for ln in results.render_seeds(frame, facts, grid, "cmd").splitlines() if ln.startswith("| 70% | none |")]
    assert "| +0.000 [" in line and "-0.000" not in line, line
    assert results._fmt(-0.0) == "+0.000"


def test_seeds_methods_with_the_same_correct_answers_over_the_seeds_tie():
    """dwt right on 1753, 1761, 1708 of 2000 examples over three seeds, magnitude on 1756, 1758,
    1708: the same 5222 answers, but numpy's float means differ in their last bit (0.87033...33
    and ...34). Both printed 0.8703 while the summary named magnitude the winner, not a tie."""
    import numpy as np

    dwt, mag = [1753, 1761, 1708], [1756, 1758, 1708]
    assert np.mean(np.array(dwt) / 2000) != np.mean(np.array(mag) / 2000)  # the float error the page must not show
    frame = pd.DataFrame([{
        "seed": s, "wavelet": "bior4.4", "layout": "filter", "percentile": 70.0, "recovery": "bn",
        "pruned_fraction": 0.7, "levels": "5", "seconds": 1.0, "base_top1": 0.9, "n_eval": 2000,
        "dwt_top1": d / 2000, "magnitude_top1": m / 2000, "random_top1": 0.1, "dwt_vs_magnitude_gap": (d - m) / 2000,
        "dwt_vs_magnitude_low": (d - m) / 2000 - 0.01, "dwt_vs_magnitude_high": (d - m) / 2000 + 0.01,
        "dwt_vs_random_gap": 0.4, "dwt_vs_random_low": 0.3, "dwt_vs_random_high": 0.5,
    } for s, (d, m) in enumerate(zip(dwt, mag))])  # fmt: skip
    row = results.over_seeds(frame).iloc[0]
    assert row["dwt_top1"] == row["magnitude_top1"] == pytest.approx(5222 / 6000, abs=1e-12)
    facts = [{"seed": s, "date": "d", "machine": "m", "seconds": 1.0, "base_load_seconds": 1.0, "base_checksum": "a" * 64,
              "base_top1": 0.9, "n_eval": 2000, "base_train_top1": 0.9} for s in range(3)]  # fmt: skip
    grid = results.Grid(model="cnn", configs=(("bior4.4", "filter"),), fractions=(70,), recoveries=("bn",))
    page = results.render_seeds(frame, facts, grid, "cmd")
    (summary,) = [ln for ln in page.splitlines() if ln.startswith("| bn |")]
    assert "| tie 1 |" in summary and "magnitude 1" not in summary and "dwt 1" not in summary, summary


def test_the_machine_line_names_torchs_threads(monkeypatch):
    """Two runs of one command on one CPU, with 1 and 2 torch threads, trained other base models
    and gave other verdicts under the same line "CPU only (x86_64, 2 CPU cores)"."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert ", 3 torch threads)" in results._machine(torch.device("cpu"))


_SEEDS_GRID = ["--model", "cnn", "--dataset", "digits", "--configs", "haar:filter", "--fractions", "50,90",
               "--recoveries", "none", "--eval-limit", "60", "--device", "cpu"]  # fmt: skip


@pytest.mark.slow  # trains the small base models of seeds 0 and 1 (about 20 s) and runs 8 small trials
def test_each_seed_of_a_several_seed_run_is_that_seeds_own_run(workdir, capsys):
    """``--seeds 0,1``'s CSV holds every trial of every seed, with a ``seed`` column; the rows of
    seed s are those of ``--seed s`` (the oracle: the one-seed command, run apart), every number,
    and the page's header names each seed's base model."""
    from wavesweep import cli, train

    assert cli.main(["results", *_SEEDS_GRID, "--seeds", "0,1", "--out", "multi.md"]) == 0
    assert "wrote multi.md (4 trials of 2 seeds" in capsys.readouterr().out
    multi = pd.read_csv(workdir / "multi.csv", dtype={"levels": str})
    assert list(multi.columns[:2]) == ["seed", "wavelet"] and list(multi["seed"]) == [0, 0, 1, 1]
    page = (workdir / "multi.md").read_text()
    for s in (0, 1):
        assert cli.main(["results", *_SEEDS_GRID, "--seed", str(s), "--out", f"s{s}.md"]) == 0
        single = pd.read_csv(workdir / f"s{s}.csv", dtype={"levels": str})
        mine = multi[multi["seed"] == s].drop(columns=["seed"]).reset_index(drop=True)
        numbers = [c for c in single.columns if c != "seconds"]
        assert list(mine.columns) == list(single.columns)
        pd.testing.assert_frame_equal(mine[numbers], single[numbers], check_exact=True)
        base = train.get_base_model("cnn", "digits", seed=s, device="cpu", progress=False)
        assert f"seed {s}: sha256 `{base.checksum[:16]}…`, top-1 {single['base_top1'].iloc[0]:.4f} on 60 examples" in page
    # the page's tables and summary are its CSV rendered (the header holds the run's facts)
    facts = [{"seed": s, "date": "d", "machine": "m", "seconds": 1.0, "base_load_seconds": 1.0, "base_checksum": "ab" * 32,
              "base_top1": 0.9, "n_eval": 60} for s in (0, 1)]  # fmt: skip
    rendered = results.render_seeds(multi, facts, results.Grid(model="cnn", dataset="digits", eval_limit=60), "c")
    assert page[page.index("\n## "):] == rendered[rendered.index("\n## "):]


@pytest.mark.slow  # the base models of seeds 0 and 1 (cached by the test above when run with it) and 8 small trials
def test_an_interrupted_several_seed_run_resumes_every_seed_and_refuses_another_seeds_list(workdir):
    """One progress file holds the finished trials of every seed: a ``--seeds 0,1`` run stopped in
    seed 1 resumes with seed 0's trials and seed 1's first one not rerun, and the same numbers as an
    uninterrupted run. The file is refused, as it was, by another seeds list and by a one-seed
    run, and a one-seed run's file by a ``--seeds`` run."""
    grid = results.Grid(model="cnn", dataset="digits", configs=(("haar", "filter"),), fractions=(50, 90),
                        recoveries=("none",), eval_limit=60, device="cpu")  # fmt: skip
    whole, _ = results.run_seeds(grid, (0, 1))
    progress = results.progress_path(workdir / "page.md")
    ran = []

    def stop_after_three(i, n, cfg):
        if len(ran) == 3:
            raise KeyboardInterrupt
        ran.append((cfg.seed, cfg.percentile))

    with pytest.raises(KeyboardInterrupt):
        results.run_seeds(grid, (0, 1), on_trial=stop_after_three, progress=progress)
    kept = pd.read_csv(progress, dtype={"seeds": str})
    assert list(zip(kept["seed"], kept["percentile"])) == ran == [(0, 50.0), (0, 90.0), (1, 50.0)]
    assert set(kept["seeds"]) == {"0,1"}
    content = progress.read_bytes()

    for seeds, needle in (((0, 2), "(seeds '0,1', not '0,2')"), ((1, 0), "(seeds '0,1', not '1,0')")):
        with pytest.raises(ValueError, match=re.escape(f"holds trials of other settings {needle}")):
            results.run_seeds(grid, seeds, progress=progress, on_trial=lambda *a: pytest.fail("a trial ran"))
    with pytest.raises(ValueError, match=re.escape("holds trials of other settings (seeds '0,1', not '0')")):
        results.run_grid(grid, progress=progress, on_trial=lambda *a: pytest.fail("a trial ran"))
    assert progress.read_bytes() == content

    resumed, ran_again = [], []
    frame, facts = results.run_seeds(grid, (0, 1), progress=progress, on_resume=lambda k, n: resumed.append((k, n)),
                                     on_trial=lambda i, n, cfg: ran_again.append((cfg.seed, cfg.percentile)))
    assert resumed == [(2, 2), (1, 2)] and [f["resumed"] for f in facts] == [2, 1]
    assert ran_again == [(1, 90.0)]
    numbers = [c for c in whole.columns if c != "seconds"]
    pd.testing.assert_frame_equal(frame[numbers], whole[numbers], check_exact=True)
    assert "3 of 4 trials were carried over" in results.render_seeds(frame, facts, grid, "wavesweep results")

    def stop_at_the_second(i, n, cfg):
        if i == 1:
            raise KeyboardInterrupt

    single = results.progress_path(workdir / "one.md")
    with pytest.raises(KeyboardInterrupt):
        results.run_grid(grid, progress=single, on_trial=stop_at_the_second)
    assert len(pd.read_csv(single)) == 1 and "seeds" not in pd.read_csv(single).columns  # a one-seed file, as before
    with pytest.raises(ValueError, match=re.escape("holds trials of other settings (seeds '0', not '0,1')")):
        results.run_seeds(grid, (0, 1), progress=single, on_trial=lambda *a: pytest.fail("a trial ran"))
