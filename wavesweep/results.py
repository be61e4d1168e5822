"""A results page anyone can regenerate: top-1 of dwt, magnitude and random pruning at fixed
pruned fractions, under each recovery setting, with paired intervals and plain verdicts.

``wavesweep results`` runs the grid with :func:`wavesweep.trial.run_trial` (no MLflow: the page
is the record, and every number on it is a trial anyone can rerun with ``wavesweep trial``) and
writes one Markdown file. Pure: nothing here prints.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
import platform
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from wavesweep import evaluate, replicates, train
from wavesweep.config import MAX_SEED, TrialConfig
from wavesweep.fileio import atomic_write, file_in_the_way
from wavesweep.trial import run_trial

FRACTIONS: tuple[int, ...] = (50, 70, 80, 90, 95)
RECOVERIES: tuple[str, ...] = ("none", "bn", "finetune")
#: (wavelet, layout): the seed study's method (kernel), the same wavelet with real levels
#: (filter), and one more wavelet family.
CONFIGS: tuple[tuple[str, str], ...] = (("bior4.4", "filter"), ("bior4.4", "kernel"), ("db4", "filter"))


@dataclass(frozen=True)
class Grid:
    model: str = "resnet18"
    dataset: str = "fashion-mnist"
    level: int = 5
    fractions: tuple[int, ...] = FRACTIONS
    recoveries: tuple[str, ...] = RECOVERIES
    configs: tuple[tuple[str, str], ...] = CONFIGS
    eval_limit: int = 0
    seed: int = 0
    device: str = "auto"
    data_root: str = ""
    recovery_batches: int = 50
    finetune_steps: int = 100

    def trials(self) -> list[TrialConfig]:
        """Every trial of the grid, validated before any work."""
        return [
            TrialConfig(
                model=self.model, dataset=self.dataset, wavelet=w, level=self.level, percentile=float(p), layout=lay,
                eval_limit=self.eval_limit, seed=self.seed, device=self.device, data_root=self.data_root,
                timing_batches=0, recovery=r, recovery_batches=self.recovery_batches, finetune_steps=self.finetune_steps,
            )  # fmt: skip
            for w, lay in self.configs
            for p in self.fractions
            for r in self.recoveries
        ]


def verdict(low: float, high: float) -> str:
    """``better`` / ``worse`` when the paired 95 % interval of dwt − other excludes 0, ``equal``
    when it holds 0, ``n/a`` when a bound is missing (NaN: no interval, no verdict)."""
    if math.isnan(low) or math.isnan(high):
        return "n/a"
    return "better" if low > 0 else "worse" if high < 0 else "equal"


def win_counts(winners: pd.Series) -> str:
    """How often each label of ``winners`` (a method, or ``tie``) had the highest top-1, most
    frequent first (ties in count by name): "dwt 7, tie 5, magnitude 3"."""
    counts = winners.value_counts()
    if counts.empty:
        return "-"
    return ", ".join(f"{k} {int(v)}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


#: columns of a progress file that say which grid and base model its rows belong to
_GRID_KEY = ("model", "dataset", "level", "eval_limit", "seed", "recovery_batches", "finetune_steps")
_TEXT_COLUMNS = {"wavelet": str, "layout": str, "recovery": str, "levels": str, "base_checksum": str, "device": str,
                 "seeds": str}


def progress_path(page: Path) -> Path:
    """Where ``wavesweep results --out PAGE`` keeps the trials done so far until the page is written."""
    return page.with_suffix(".progress.csv")


def check_page_path(page: str | os.PathLike) -> Path:
    """``page`` when the page, its CSV and its progress file can be written there; else a one-line
    ``ValueError`` naming what is in the way (a folder by one of those names, a file where a folder
    must be, a page named like its own CSV). Checked before the grid runs: writing the page is its
    last step."""
    text, page = os.fspath(page), Path(page)
    if page.name in ("", "..") or page.is_dir():  # '', '.', '/', '..': no file name to write
        raise ValueError(f"--out {page}: {page} is a folder; give the page's file name (e.g. {page / 'results.md'})")
    if text.endswith(("/", os.sep)):  # 'pages/': a folder, though none is there yet (Path drops the slash)
        raise ValueError(f"--out {text}: {text} names a folder; give the page's file name (e.g. {page / 'results.md'})")
    if page.with_suffix(".csv") == page:  # the CSV beside the page would replace it: "wrote page.csv" held no page
        raise ValueError(f"--out {page}: the trials' CSV is written to PAGE.csv, which would replace the page; "
                         f"give the page another suffix (e.g. {page.with_suffix('.md')})")
    for p in (page, page.with_suffix(".csv"), progress_path(page)):
        if p.is_dir():
            raise ValueError(f"--out {page}: {p} is a folder; give the page's file name (e.g. {p / 'results.md'})")
    if (blocker := file_in_the_way(page.parent)) is not None:
        raise ValueError(f"--out {page}: {blocker} is a file, not a folder")
    return page


#: what a carried-over trial shares with this run's (load_progress refuses any other row): a grid
#: that holds an interrupted one's trials (e.g. more fractions) takes them from its progress file
CARRIED = "the same trials: settings, base model and device type"


def _trial_key(cfg: TrialConfig) -> tuple:
    return (cfg.wavelet, cfg.layout, float(cfg.percentile), cfg.recovery)


def seeds_text(seeds: Sequence[int]) -> str:
    """``(0, 1, 2)`` -> ``"0,1,2"``: how ``--seeds`` is written, and how a progress file records it."""
    return ",".join(str(s) for s in seeds)


def _identity(grid: Grid, checksum: str, device: str, seeds: Sequence[int] | None = None) -> dict:
    ident = {**{k: getattr(grid, k) for k in _GRID_KEY}, "base_checksum": checksum, "device": device}
    if seeds is not None:  # a row of a --seeds run says which list it belongs to (a --seed run's rows have no column)
        ident["seeds"] = seeds_text(seeds)
    return ident


def _row_seeds(row: dict) -> str:
    """The seeds list a progress row belongs to: its ``seeds`` column (a ``--seeds`` run), else its own seed."""
    seeds = row.get("seeds")
    return seeds if isinstance(seeds, str) else str(row.get("seed"))


def load_progress(path: Path, grid: Grid, checksum: str, device: str,
                  seeds: Sequence[int] | None = None) -> tuple[dict[tuple, dict], list[dict]]:
    """The rows of an earlier, interrupted run of the same grid on the same base model and device
    type, by trial, and (with ``seeds``, the whole list of a ``--seeds`` run that ``grid.seed`` is
    one of) the rows of the list's other seeds, kept as they are: their base models are checked
    when their turn comes. A row of any other settings (another seeds list, or a ``--seed`` run's
    row under ``--seeds`` and back), base model or device type, or of a trial this grid does not
    have, is a one-line ``ValueError`` naming the file: it was not reused, and the file was then
    rewritten with this run's rows only, so the other run's finished trials were lost without a word."""
    if not path.is_file():
        return {}, []
    try:
        frame = pd.read_csv(path, dtype=_TEXT_COLUMNS)
    except ValueError as exc:  # pandas' ParserError and EmptyDataError, UnicodeDecodeError: all ValueErrors
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"progress file {path} (the trials an earlier run finished) is not a readable CSV ({detail}); "
                         "move it away to keep it, or pass --fresh to rerun every trial") from None
    want = _identity(grid, checksum, device)
    want_seeds = seeds_text(seeds) if seeds is not None else str(grid.seed)
    wanted = {_trial_key(c) for c in grid.trials()}
    done, kept = {}, []
    for row in frame.to_dict("records"):
        # another seed of this --seeds list: only the settings they share are compared now
        later = seeds is not None and row.get("seed") != grid.seed and row.get("seed") in seeds
        several = seeds is not None or isinstance(row.get("seeds"), str)  # a --seeds run, this one or the file's
        other = [f"seeds {_row_seeds(row)!r}, not {want_seeds!r}"] if several and _row_seeds(row) != want_seeds else []
        other = other or [f"{k} {row.get(k)!r}, not {v!r}" for k, v in want.items()
                          if row.get(k) != v and not (later and k in ("seed", "base_checksum"))]  # fmt: skip
        if not other and _trial_key_of(row) not in wanted:
            w, lay, p, r = _trial_key_of(row)
            other = [f"trial {w}:{lay} at {p:g} with recovery {r}, which this grid does not have"]
        if other:
            raise ValueError(f"progress file {path} holds trials of other settings ({other[0]}); move it away to keep "
                             "them, or pass --fresh to rerun every trial")
        if row.get("recovery") != "none" and pd.isna(row.get("bn_batches")):
            # written before rows kept the batches BatchNorm re-estimation ran (which was then
            # recovery_batches, cycling over a training split shorter than that): run it again
            continue
        if later:
            kept.append(row)
        else:
            done[_trial_key_of(row)] = row
    return done, kept


def run_grid(
    grid: Grid,
    *,
    on_trial: Callable[[int, int, TrialConfig], None] | None = None,
    progress: Path | None = None,
    on_resume: Callable[[int, int], None] | None = None,
    on_base: Callable[[train.BaseModel, float], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> tuple[pd.DataFrame, dict]:
    """Run every trial of ``grid``; one row per trial, plus facts about the run (base model, time).

    With ``progress`` (a CSV path), every finished trial is written there at once, and a trial
    already recorded there by an earlier run of the same grid (same base model, same device
    type) is taken from it instead of being run again: an interrupted grid resumes where it
    stopped. ``on_resume(reused, total)`` is called once when rows are reused; ``on_base(base,
    seconds)`` once the base model is loaded or trained. ``seeds``: the whole list of a
    :func:`run_seeds` run that ``grid.seed`` is one of; the progress file then keeps the rows of
    its other seeds beside this one's."""
    cfgs = grid.trials()
    t0 = time.perf_counter()
    base = train.get_base_model(grid.model, grid.dataset, seed=grid.seed, data_root=grid.data_root or None,
                                device=grid.device, progress=False)  # fmt: skip
    train_seconds = time.perf_counter() - t0
    if on_base is not None:
        on_base(base, train_seconds)
    dev = evaluate.resolve_device(grid.device)
    identity = _identity(grid, base.checksum, dev.type, seeds)
    done, kept = load_progress(progress, grid, base.checksum, dev.type, seeds) if progress is not None else ({}, [])
    wanted = {_trial_key(c) for c in cfgs}
    done = {k: v for k, v in done.items() if k in wanted}
    if done and on_resume is not None:
        on_resume(len(done), len(cfgs))
    rows = []
    for i, cfg in enumerate(cfgs):
        if _trial_key(cfg) in done:
            rows.append(done[_trial_key(cfg)])
            continue
        if on_trial is not None:
            on_trial(i, len(cfgs), cfg)
        t = time.perf_counter()
        r = run_trial(cfg, base=base)
        row = {
            "wavelet": cfg.wavelet,
            "layout": cfg.layout,
            "percentile": cfg.percentile,
            "recovery": cfg.recovery,
            # the budget the baselines are matched to: positions zero whatever the weights left out
            "pruned_fraction": r.outcomes["dwt"].prune.matched_fraction,
            "levels": "/".join(str(v) for v in sorted({lp.level_effective for lp in r.outcomes["dwt"].prune.layers})),
            "seconds": time.perf_counter() - t,
            "base_top1": r.base_eval.top1,
            "n_eval": r.eval_info["n_eval"],
            "n_test_split": r.eval_info["n_test_split"],
            # the BatchNorm re-estimation batches it ran: recovery_batches, or one pass over a smaller training split
            "bn_batches": r.outcomes["dwt"].recovery.bn_batches,
        }
        for m, out in r.outcomes.items():
            row[f"{m}_top1"] = out.eval.top1
            row[f"{m}_prerec_top1"] = out.prerec_eval.top1 if out.prerec_eval is not None else out.eval.top1
        for name, cmp in r.paired.items():
            row[f"{name}_gap"] = cmp.gap
            row[f"{name}_low"] = cmp.ci_low
            row[f"{name}_high"] = cmp.ci_high
            row[f"{name}_p"] = cmp.mcnemar_p
        rows.append({**row, **identity})
        if progress is not None:
            with atomic_write(progress, "w") as fh:
                pd.DataFrame(kept + rows).to_csv(fh, index=False)
    frame = pd.DataFrame(rows).drop(columns=list(identity))
    resumed = [r for r in rows if _trial_key_of(r) in done]
    facts = {
        "base_top1": float(frame["base_top1"].iloc[-1]),
        "base_train_top1": base.train_info.get("test_top1"),
        "base_train_seconds": base.train_info.get("seconds"),
        "base_checksum": base.checksum,
        "n_eval": int(frame["n_eval"].iloc[-1]),
        "n_test_split": _last_known(rows, "n_test_split"),
        # an interrupted run's trials count with the seconds they took then
        "seconds": time.perf_counter() - t0 + sum(float(r["seconds"]) for r in resumed),
        "resumed": len(resumed),
        "base_load_seconds": train_seconds,
        "machine": _machine(dev),
        "bn_batches": _bn_batches(rows),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    return frame, facts


def _last_known(rows: list[dict], key: str) -> int | None:
    """The last row's ``key`` that is known (rows of an earlier version's progress file lack it)."""
    known = [int(r[key]) for r in rows if pd.notna(r.get(key))]
    return known[-1] if known else None


def _bn_batches(rows: list[dict]) -> int | None:
    """The batches BatchNorm re-estimation ran in the recovered trials of ``rows`` (carried-over
    rows included); None where none recovered, or every row is from a progress file written
    before rows recorded it."""
    ran = [int(r["bn_batches"]) for r in rows if r["recovery"] != "none" and pd.notna(r.get("bn_batches"))]
    return max(ran) if ran else None


def run_seeds(
    grid: Grid,
    seeds: Sequence[int],
    *,
    on_seed: Callable[[int], None] | None = None,
    **kwargs,
) -> tuple[pd.DataFrame, list[dict]]:
    """Run ``grid`` once per seed of ``seeds``, each exactly as ``--seed s`` runs it (its own base
    model, trained once and cached; its own split/subset, random pruning and recovery order), with
    one progress file (``kwargs``: those of :func:`run_grid`) holding every seed's finished trials.
    Returns every trial of every seed (a ``seed`` column first, then :func:`run_grid`'s columns),
    and each seed's facts (with its ``seed``). ``on_seed(s)`` is called as each seed starts."""
    frames, facts = [], []
    for s in seeds:
        if on_seed is not None:
            on_seed(s)
        frame, f = run_grid(dataclasses.replace(grid, seed=s), seeds=tuple(seeds), **kwargs)
        frame.insert(0, "seed", s)
        frames.append(frame)
        facts.append({**f, "seed": s})
    return pd.concat(frames, ignore_index=True), facts


def _trial_key_of(row: dict) -> tuple:
    return (row["wavelet"], row["layout"], float(row["percentile"]), row["recovery"])


def _machine(dev: torch.device) -> str:
    # torch's threads: a CPU-trained base model's weights depend on them (the order of its sums),
    # so two runs of one command on one machine can differ in their verdicts
    cpu = f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA), {cpu}, torch {torch.__version__}"
    return f"CPU only ({cpu}), torch {torch.__version__}"


def _budget_note(frame: pd.DataFrame) -> str:
    """Where a trial's ``pruned`` fraction is not its percentile (a two-tap wavelet on odd lengths:
    haar in ``kernel``), what ``pruned`` is and which settings: the page said the baselines took
    "the fraction dwt zeroed", beside a column of 29 % for a grid run at 60."""
    off = frame[(frame["pruned_fraction"] * 100 - frame["percentile"]).abs() >= 0.5]
    if off.empty:
        return ""
    where = ", ".join(f"{w} `{lay}` at {p:g}: {f:.0%}" for (w, lay, p), f in
                      off.groupby(["wavelet", "layout", "percentile"], sort=False)["pruned_fraction"].first().items())
    return (" (the `pruned` column), less the coefficient positions that are zero whatever the weights, which dwt "
            f"zeroes but which are not pruning (see the README's pruned fraction): so `pruned` is below the percentile "
            f"asked for in {where}")


def _fmt(x: float) -> str:
    """``x`` to 3 decimals, or to as many more as it takes for a number that is not 0 not to read
    as ±0.000: the verdict is the interval's sign, and a bound of +0.0001 (4 examples of 10,000)
    printed as [+0.000, +0.001] beside *better*, which the page's rule calls *equal*."""
    x = x + 0.0  # -0.0 (a mean of gaps that cancel) reads as +0.000, not -0.000
    for decimals in range(3, 9):
        text = f"{x:+.{decimals}f}"
        if x == 0 or math.isnan(x) or float(text) != 0:
            return text
    return f"{x:+.1e}"


def _fmt_gap(row: pd.Series, other: str) -> str:
    k = f"dwt_vs_{other}"
    return f"{_fmt(row[k + '_gap'])} [{_fmt(row[k + '_low'])}, {_fmt(row[k + '_high'])}]"


_LEVEL_0 = ("Every layer's effective level is 0 (the kernels are too short for this wavelet): this layout "
            "*is* magnitude pruning here, so every dwt − magnitude gap is 0 by construction (after fine-tuning, up to "
            "the floating-point non-determinism of the device's training kernels).")


def _whole_split(grid: Grid, facts: Sequence[dict]) -> bool:
    """Whether the page's trials evaluated every test example: no ``--eval-limit``, or one at least
    the test split's size (``data.eval_subset`` then takes the whole split; a limit equal to the
    size was called "a stratified subset"). Facts without the split's size (pages of an earlier
    version): a limit above what was evaluated."""
    sizes = [f.get("n_test_split") for f in facts]
    if not grid.eval_limit:
        return True
    if all(isinstance(n, (int, float)) and n == n for n in sizes):
        return all(f["n_eval"] >= n for f, n in zip(facts, sizes))
    return max(f["n_eval"] for f in facts) < grid.eval_limit


def _recovery_and_machine(grid: Grid, facts: dict) -> list[str]:
    """The page's lines on recovery, and (a CPU run of a small model) on the product's target model."""
    machine = facts["machine"]
    n = facts.get("bn_batches")  # what the recovered trials ran: one pass over a smaller training split at most
    if not n:  # no trial here recovered (or rows from before they recorded it): what bn would run
        batches = f"up to {grid.recovery_batches} training batches (one pass over the training split at most)"
    else:
        batches = f"{n} training batches" + (f" (one pass over the training split; {grid.recovery_batches} asked)"
                                             if n < grid.recovery_batches else "")
    return [
        f"- Recovery, identical for the three methods (the same training batches, order and steps): `none` = one-shot; "
        f"`bn` = BatchNorm statistics re-estimated on {batches}; `finetune` = "
        f"{grid.finetune_steps} AdamW steps (lr 1e-4, cosine) with every pruning held exactly (dwt trains its kept "
        f"wavelet coefficients), then bn on the final weights.",
        *([f"- Run on the CPU only (no GPU here), so with the small `{grid.model}` model; the product's target, "
           "ResNet-18, is the same command with `--model resnet18` on a GPU."] if machine.startswith("CPU")
          and grid.model != "resnet18" else []),
    ]


def _section_head(wavelet: str, layout: str, part: pd.DataFrame) -> list[str]:
    """A (wavelet, layout) section's heading with its effective levels, and the level-0 note where every layer is at 0."""
    levels = ", ".join(sorted(set(part["levels"])))
    return [f"## {wavelet}, layout `{layout}` (effective levels: {levels})", "", *([_LEVEL_0, ""] if levels == "0" else [])]


def _winners(part: pd.DataFrame) -> str:
    """:func:`win_counts` of the method with the highest top-1 in each row ("tie" where shared)."""
    tops = part[["dwt_top1", "magnitude_top1", "random_top1"]]
    unique_best = tops.eq(tops.max(axis=1), axis=0).sum(axis=1) == 1
    return win_counts(tops.idxmax(axis=1).str.replace("_top1", "").where(unique_best, "tie"))


def _layout_lines(table: pd.DataFrame, verdicts: str, *, over: str, largest: str) -> list[str]:
    """Per layout, the summary's sentence: in how many settings dwt was better and worse than
    magnitude (by the ``verdicts`` column), each with its largest gap."""
    def at(rows: pd.DataFrame, gap: float | None) -> str:
        if gap is None:
            return ""
        row = rows.loc[rows["dwt_vs_magnitude_gap"] == gap].iloc[0]
        return (f" ({largest}: {_fmt(gap)} at {row['pruned_fraction']:.0%}, {row['wavelet']}, "
                f"recovery {row['recovery']})")

    lines = []
    for lay, part in table.groupby("layout", sort=False):
        better, worse = part[part[verdicts] == "better"], part[part[verdicts] == "worse"]
        top = better["dwt_vs_magnitude_gap"].max() if len(better) else None
        bottom = worse["dwt_vs_magnitude_gap"].min() if len(worse) else None
        lines.append(f"- `{lay}`: dwt better than magnitude{over} in {len(better)} of {len(part)} settings"
                     f"{at(better, top)}, worse in {len(worse)}{at(worse, bottom)}, equal within the interval elsewhere.")
    return lines


def render(frame: pd.DataFrame, facts: dict, grid: Grid, command: str) -> str:
    """The Markdown page."""
    whole = _whole_split(grid, [facts])
    lines = [
        f"# Results: {grid.model} on {grid.dataset}, dwt vs magnitude vs random at the same budget",
        "",
        f"Regenerate with `{command}`.",
        "",
        f"- Date: {facts['date']}; machine: {facts['machine']}; total time {facts['seconds'] / 60:.1f} min "
        f"(base model load or training {facts['base_load_seconds']:.0f} s)"
        + (f"; {facts['resumed']} of {len(frame)} trials were carried over from the progress file of an interrupted "
           f"run ({CARRIED}), counted with the seconds they took then" if facts.get("resumed") else "")
        + ".",
        f"- Base model: {grid.model} trained by wavesweep (seed {grid.seed}; sha256 `{facts['base_checksum'][:16]}…`), "
        f"top-1 {facts['base_top1']:.4f} on the {facts['n_eval']} evaluation examples used here"
        + (f" ({facts['base_train_top1']:.4f} on the whole test split after training)" if facts.get("base_train_top1") else "")
        + ".",
        f"- Evaluation: {facts['n_eval']} test examples ({'all' if whole else 'a stratified subset, seed ' + str(grid.seed)}); "
        f"random-pruning seed {grid.seed}; DWT level {grid.level} requested (effective levels per trial below), "
        f"mode periodization, one threshold per layer; magnitude and random prune each layer at the fraction dwt zeroed there"
        + _budget_note(frame) + ".",
        *_recovery_and_machine(grid, facts),
        "- Gap = dwt top-1 minus the other method's, on the same examples, with its 95 % paired bootstrap interval. "
        "*better*/*worse*: the interval excludes 0; *equal*: it contains 0. The interval is over the "
        "evaluation examples, for this one base model: it does not hold the spread between base models, "
        "which can be larger (another training of the ResNet-18 base model changed 15 of 45 verdicts, "
        "4 from better to worse or back); compare methods over seeds with `wavesweep results --seeds 0,1,2`.",
        "",
    ]
    for (w, lay), part in frame.groupby(["wavelet", "layout"], sort=False):
        lines += _section_head(w, lay, part)
        lines += [
            "| pruned | recovery | dwt | magnitude | random | dwt − magnitude [95 % CI] | verdict | dwt − random [95 % CI] |",
            "|---:|---|---:|---:|---:|---|---|---|",
        ]
        for _, row in part.iterrows():
            lines.append(
                f"| {row['pruned_fraction']:.0%} | {row['recovery']} | {row['dwt_top1']:.4f} | {row['magnitude_top1']:.4f} | "
                f"{row['random_top1']:.4f} | {_fmt_gap(row, 'magnitude')} | {verdict(row['dwt_vs_magnitude_low'], row['dwt_vs_magnitude_high'])} | "
                f"{_fmt_gap(row, 'random')} |"
            )
        lines.append("")
    lines += ["## Summary", ""]
    frame = frame.assign(
        v=[verdict(lo, hi) for lo, hi in zip(frame["dwt_vs_magnitude_low"], frame["dwt_vs_magnitude_high"])]
    )
    lines += ["| recovery | dwt better | equal | dwt worse | mean gap dwt − magnitude | highest top-1 (settings; tie: shared) |", "|---|---:|---:|---:|---:|---|"]
    for rec, part in frame.groupby("recovery", sort=False):
        counts = part["v"].value_counts()
        lines.append(
            f"| {rec} | {counts.get('better', 0)} | {counts.get('equal', 0)} | {counts.get('worse', 0)} | "
            f"{part['dwt_vs_magnitude_gap'].mean():+.4f} | {_winners(part)} |"
        )
    lines.append("")
    lines += _layout_lines(frame, "v", over="", largest="largest")
    lines.append("")
    lines.append("Per-trial seconds: " + ", ".join(f"{s:.0f}" for s in frame["seconds"]) + ".")
    lines.append("")
    return "\n".join(lines)


_SETTING = ["wavelet", "layout", "percentile", "recovery"]


def seed_verdicts(verdicts: Sequence[str]) -> str:
    """How many seeds gave each verdict, in the order better, equal, worse, n/a, none left out
    but those no seed gave: "2 better, 1 equal"."""
    return ", ".join(f"{sum(v == k for v in verdicts)} {k}" for k in ("better", "equal", "worse", "n/a") if k in verdicts)


def over_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per setting (config, fraction, recovery) of a several-seed ``frame`` (the CSV of
    :func:`run_seeds`): ``n_seeds``; the mean over seeds of the pruned fraction and of each
    method's top-1; each gap ``dwt_vs_X`` as its mean over seeds with the 95 % Student-t interval
    over seeds (:func:`wavesweep.replicates.aggregate`; NaN bounds where a seed's gap is missing);
    ``verdict`` from that interval; ``seed_verdicts``, the seeds' own paired verdicts counted."""
    out = []
    for key, part in frame.groupby(_SETTING, sort=False):
        part = part.sort_values("seed")
        row = dict(zip(_SETTING, key))
        row |= {"n_seeds": len(part), "pruned_fraction": part["pruned_fraction"].mean(),
                "levels": "/".join(sorted({v for lv in part["levels"] for v in str(lv).split("/")}, key=int))}
        for m in ("dwt", "magnitude", "random"):
            # a multiple of 1/(seeds x n_eval): two methods with the same correct answers in all split
            # otherwise between the seeds are one mean (a tie), not two whose last bits differ
            row[f"{m}_top1"] = round(float(part[f"{m}_top1"].mean()), 12)
        for other in ("magnitude", "random"):
            k = f"dwt_vs_{other}"
            gaps = part[f"{k}_gap"].to_numpy(float)
            agg = replicates.aggregate([{"gap": g} for g in gaps])
            # gaps are multiples of 1/n_eval: a mean of ones that cancel is 0 (+0.0), not the sum's -2.3e-18 printed as such
            row |= {f"{k}_gap": round(float(np.mean(gaps)), 12) + 0.0, f"{k}_low": agg.get("gap_ci_low", math.nan),
                    f"{k}_high": agg.get("gap_ci_high", math.nan)}  # fmt: skip
        row["verdict"] = verdict(row["dwt_vs_magnitude_low"], row["dwt_vs_magnitude_high"])
        row["seed_verdicts"] = seed_verdicts(
            [verdict(lo, hi) for lo, hi in zip(part["dwt_vs_magnitude_low"], part["dwt_vs_magnitude_high"])])
        out.append(row)
    return pd.DataFrame(out)


def render_seeds(frame: pd.DataFrame, facts: Sequence[dict], grid: Grid, command: str) -> str:
    """The Markdown page of a several-seed run (:func:`run_seeds`): per setting, the mean top-1
    over seeds, the mean gap with its Student-t interval over seeds and its verdict, and the
    seeds' own paired verdicts counted."""
    seeds = [f["seed"] for f in facts]
    n = len(seeds)
    table = over_seeds(frame)
    n_eval = sorted({f["n_eval"] for f in facts})
    whole = _whole_split(grid, facts)
    resumed = sum(f.get("resumed", 0) for f in facts)
    from scipy.stats import t as student_t

    q = float(student_t.ppf(0.5 + replicates.CONFIDENCE / 2, n - 1))  # the quantile aggregate's interval uses
    lines = [
        f"# Results: {grid.model} on {grid.dataset}, dwt vs magnitude vs random at the same budget, over {n} seeds",
        "",
        f"Regenerate with `{command}`.",
        "",
        f"- Date: {facts[-1]['date']}; machine: {facts[-1]['machine']}; total time "
        f"{sum(f['seconds'] for f in facts) / 60:.1f} min (base models' load or training "
        f"{sum(f['base_load_seconds'] for f in facts):.0f} s in all)"
        + (f"; {resumed} of {len(frame)} trials were carried over from the progress file of an interrupted run "
           f"({CARRIED}), counted with the seconds they took then" if resumed else "")
        + ".",
        f"- Seeds {', '.join(map(str, seeds))}: each is the whole grid as `--seed S` runs it, with its own base model "
        f"({grid.model} trained by wavesweep with that seed and cached), evaluation subset, random pruning and "
        "recovery-batch order. The base models, top-1 on the evaluation examples used with each:",
        *[f"  - seed {f['seed']}: sha256 `{f['base_checksum'][:16]}…`, top-1 {f['base_top1']:.4f} on {f['n_eval']} examples"
          + (f" ({f['base_train_top1']:.4f} on the whole test split after training)" if f.get("base_train_top1") else "")
          for f in facts],
        f"- Evaluation: {'/'.join(map(str, n_eval))} test examples per seed "
        f"({'all' if whole else 'a stratified subset drawn with each seed'}); random-pruning seed: the run's seed; "
        f"DWT level {grid.level} requested (effective levels per trial below), mode periodization, one threshold per "
        "layer; magnitude and random prune each layer at the fraction dwt zeroed there" + _budget_note(frame) + ".",
        *_recovery_and_machine(grid, facts[-1]),
        f"- `pruned`, dwt, magnitude, random: the mean over the {n} seeds (of the matched budget, of top-1).",
        f"- Gap = the mean over seeds of dwt top-1 minus the other method's (each seed on its own examples), with its "
        f"95 % Student-t interval over the seeds (mean ± t·sd/√{n}, t = {q:.2f} for {n - 1} degrees of freedom; sd: the "
        "seeds' sample standard deviation): it holds the spread between base models, evaluation subsets and random "
        "draws. *better*/*worse*: that interval excludes 0; *equal*: it contains 0; *n/a*: no interval (a seed's gap missing).",
        "- Per-seed verdicts: how many seeds' own verdict (the 95 % paired bootstrap interval over that seed's "
        "evaluation examples, for its one base model, as on a one-seed page) was better, equal or worse.",
        "",
    ]
    for (w, lay), part in table.groupby(["wavelet", "layout"], sort=False):
        lines += _section_head(w, lay, part)
        lines += [
            "| pruned | recovery | dwt | magnitude | random | dwt − magnitude [95 % t-CI over seeds] | verdict | "
            "per-seed verdicts | dwt − random [95 % t-CI over seeds] |",
            "|---:|---|---:|---:|---:|---|---|---|---|",
        ]
        for _, row in part.iterrows():
            lines.append(
                f"| {row['pruned_fraction']:.0%} | {row['recovery']} | {row['dwt_top1']:.4f} | {row['magnitude_top1']:.4f} | "
                f"{row['random_top1']:.4f} | {_fmt_gap(row, 'magnitude')} | {row['verdict']} | {row['seed_verdicts']} | "
                f"{_fmt_gap(row, 'random')} |"
            )
        lines.append("")
    lines += ["## Summary", ""]
    per_seed = frame.assign(
        v=[verdict(lo, hi) for lo, hi in zip(frame["dwt_vs_magnitude_low"], frame["dwt_vs_magnitude_high"])])
    lines += ["| recovery | dwt better | equal | dwt worse | mean gap dwt − magnitude | highest mean top-1 (settings; tie: shared) "
              "| per-seed verdicts |", "|---|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for rec, part in table.groupby("recovery", sort=False):
        counts = part["verdict"].value_counts()
        lines.append(
            f"| {rec} | {counts.get('better', 0)} | {counts.get('equal', 0)} | {counts.get('worse', 0)} | "
            f"{part['dwt_vs_magnitude_gap'].mean():+.4f} | {_winners(part)} | "
            f"{seed_verdicts(list(per_seed.loc[per_seed['recovery'] == rec, 'v']))} |"
        )
    lines.append("")
    lines += _layout_lines(table, "verdict", over=" over seeds", largest="largest mean gap")
    split = [c for c in table["seed_verdicts"] if "," in c]
    flips = [c for c in split if "better" in c and "worse" in c]
    lines.append(f"- The seeds' own verdicts differ in {len(split)} of {len(table)} settings "
                 f"({len(flips)} of them better for one seed and worse for another).")
    lines.append("")
    for s, part in frame.groupby("seed", sort=False):
        lines.append(f"Per-trial seconds, seed {s}: " + ", ".join(f"{x:.0f}" for x in part["seconds"]) + ".")
    lines.append("")
    return "\n".join(lines)


def write_page(text: str, path: Path, frame: pd.DataFrame | None = None) -> Path:
    """Write the page; with ``frame``, also every trial's numbers beside it (``<page>.csv``)."""
    with atomic_write(path, "w") as fh:
        fh.write(text)
    if frame is not None:
        with atomic_write(path.with_suffix(".csv"), "w") as fh:
            frame.to_csv(fh, index=False)
    return path


def parse_list(text: str, kind: Callable = str, option: str = "list") -> tuple:
    """Comma-separated values of ``option``; none, one that ``kind`` refuses, or one given twice is one line naming it."""
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items:
        raise ValueError(f"{option}={text!r} is empty: give at least one value, comma-separated")
    try:
        values = tuple(kind(x) for x in items)
    except ValueError:
        bad = next(x for x in items if not _parses(kind, x))
        raise ValueError(f"{option}={text!r}: {bad!r} is not {'an integer' if kind is int else 'valid'}") from None
    # a value given twice would run its trials twice and count them twice in the page's summary
    for i, v in enumerate(values):
        if v in values[:i]:
            raise ValueError(f"{option}={text!r}: {items[i]!r} appears twice; give each value once")
    return values


def parse_seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: at least 2 distinct seeds in 0..MAX_SEED, comma-separated; anything else is one
    line naming the value and the valid form (one seed is ``--seed``: its page has no interval over seeds)."""
    form = f"give at least 2 distinct seeds in 0..{MAX_SEED}, comma-separated (e.g. --seeds 0,1,2)"
    items = [x.strip() for x in text.split(",")]
    if not any(items):
        raise ValueError(f"--seeds={text!r} is empty: {form}")
    # ASCII digits only: int() also takes '1_0' (10) and other scripts' digits ('٣', 3), and an empty
    # item ('0,,1') was dropped without a word
    bad = next((x for x in items if not re.fullmatch(r"[+-]?[0-9]+", x)), None)
    if bad is not None:
        raise ValueError(f"--seeds={text!r}: {bad!r} is not an integer; {form}")
    values = tuple(int(x) for x in items)
    for x, v in zip(items, values):
        if not 0 <= v <= MAX_SEED:
            raise ValueError(f"--seeds={text!r}: {x!r} is not a seed in 0..{MAX_SEED}; {form}")
    for i, v in enumerate(values):
        if v in values[:i]:
            raise ValueError(f"--seeds={text!r}: {items[i]!r} appears twice; {form}")
    if len(values) < 2:
        raise ValueError(f"--seeds={text!r} is one seed: {form}, or --seed {values[0]} for one seed")
    return values


def check_fractions(fractions: tuple[int, ...], text: str) -> tuple[int, ...]:
    """``--fractions`` (dwt percentiles) in 0..100, else one line naming the option and the value
    (the trials' own check named only ``percentile``, an option ``results`` does not have)."""
    for f in fractions:
        if not 0 <= f <= 100:
            raise ValueError(f"--fractions={text!r}: {f} is not a pruned percentage in 0..100")
    return fractions


def _parses(kind: Callable, text: str) -> bool:
    try:
        kind(text)
    except ValueError:
        return False
    return True


def parse_configs(text: str) -> tuple[tuple[str, str], ...]:
    """``bior4.4:filter,db4:filter`` -> ``(("bior4.4", "filter"), ("db4", "filter"))``."""
    from wavesweep import wavelets

    out = []
    for item in parse_list(text, option="--configs"):
        if ":" not in item:
            raise ValueError(f"config {item!r} is not WAVELET:LAYOUT (e.g. bior4.4:filter)")
        w, lay = item.split(":", 1)
        if w in wavelets.LAYOUTS and lay not in wavelets.LAYOUTS:  # the two swapped: say so, not "unknown wavelet 'filter'"
            raise ValueError(f"--configs={text!r}: {item!r} is LAYOUT:WAVELET; --configs takes WAVELET:LAYOUT, e.g. {lay}:{w}")
        out.append((w, lay))
    return tuple(out)


def default_command(argv: Sequence[str]) -> str:
    return "wavesweep results " + " ".join(argv)
