"""``wavesweep train|trial|study|results|report|register|download|models|ui``.

Only this module prints. Misuse (``ValueError``, ``TypeError``, missing files) becomes a
one-line ``wavesweep: error: ...`` on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from wavesweep import interrupt
from wavesweep.store import located  # a store URL as printed
from wavesweep.failures import USAGE_ERRORS, environment_error, is_mlflow_error, one_line, tag_launched_run
from wavesweep.cli_args import Parser, UsageError, add_trial_options
from wavesweep.config import FIELD_HELP, PRETRAINED_BASES, TrialConfig


def _check_device(device: str) -> None:
    """``--device cuda`` on a machine without CUDA is a usage error, found before any run is created."""
    from wavesweep.evaluate import resolve_device

    try:
        resolve_device(device)
    except RuntimeError as exc:
        raise ValueError(str(exc)) from None


def _trial_config(args: argparse.Namespace) -> TrialConfig:
    given = {f.name: getattr(args, f.name) for f in fields(TrialConfig) if getattr(args, f.name) is not None}
    return TrialConfig.from_mapping(given)


def cmd_trial(args: argparse.Namespace) -> int:
    from wavesweep import tracking
    from wavesweep.replicates import check_replicate_seeds, check_replicates

    try:
        cfg = _trial_config(args)
        n = check_replicates(args.replicates if args.replicates is not None else 1)
        check_replicate_seeds(cfg.seed, n)
        _check_device(cfg.device)
    except USAGE_ERRORS as exc:  # `mlflow run` already created a run: marked FAILED with the reason, never masking it
        with interrupt.ignored():
            tag_launched_run(args.launched_run_id, f"invalid parameters: {one_line(exc)}")
        raise
    if n == 1:
        from wavesweep.tracked_trial import run_tracked_trial

        result, run_id = run_tracked_trial(cfg, experiment=args.experiment, adopt_run_id=args.launched_run_id, progress=not args.quiet)
        _print_trial(result, run_id)
    else:
        from wavesweep import replicates
        from wavesweep.tracked_config import run_tracked_configuration

        def on_replicate(i: int, result: Any, run_id: str) -> None:
            print(f"replicate {i} of {n} (seed {result.config.seed}):")
            _print_trial(result, run_id)
            print(flush=True)

        def on_reused(i: int, run_id: str, from_run_id: str) -> None:  # a replicate an interrupted attempt finished
            print(f"replicate {i} (seed {cfg.seed + i}): reused FINISHED run {run_id} of interrupted configuration {from_run_id}",
                  flush=True)  # fmt: skip

        print(f"configuration: {replicates.seeds_note(cfg, n)}", flush=True)
        out = run_tracked_configuration(cfg, n, experiment=args.experiment, adopt_run_id=args.launched_run_id,
                                        progress=not args.quiet, on_replicate=on_replicate, on_reused=on_reused)  # fmt: skip
        print(f"configuration run {out.run_id} (config_id {out.config_id}; replicate runs are its children)")
        for line in replicates.summary_lines(out.aggregates):
            print(line)
    if note := tracking.default_experiment_note(args.launched_run_id):
        print(note, file=sys.stderr)
    return 0


def _print_trial(result: Any, run_id: str) -> None:
    """One trial's table: top-1 etc. per method, the paired gaps, the effective levels, warnings."""
    from wavesweep import tracking

    o = result.outcomes
    print(f"trial run {run_id} ({located(tracking.tracking_uri())})")
    rec = result.config.recovery
    pre = rec != "none"
    print(f"recovery: {rec}" + (" ('pre top1': the same pruned model before recovery; every other column is after it)" if pre else ""))
    print(f"{'method':<10} {'top1':>7}" + (f" {'pre top1':>8}" if pre else "") + f" {'top5':>7} {'loss':>7} {'f1':>7} {'w-sparsity':>10} {'c-sparsity':>10} {'pruned':>6} {'stored B':>10} {'ratio':>6} {'ms/batch med (p95)':>18}")
    rows = [("base", result.base_eval, None, result.base_timing, None)] + [
        (m, o[m].eval, o[m].stats, o[m].timing, o[m].prerec_eval) for m in o
    ]
    for name, ev, st, tm, pe in rows:
        pt = (f" {pe.top1:8.4f}" if pe is not None else f" {'':>8}") if pre else ""
        ws = f"{st.weight_sparsity_target:10.3f}" if st else f"{'':>10}"
        cs = f"{st.coeff_sparsity:10.3f}" if st else f"{'':>10}"
        pf = f"{o[name].prune.matched_fraction:6.3f}" if st else f"{'':>6}"  # the budget the baselines are matched to
        sb = f"{st.stored_bytes:10d}" if st else f"{'':>10}"
        cr = f"{st.compression_ratio:6.2f}" if st else f"{'':>6}"
        ms = f"{f'{tm.median_ms:.2f} ({tm.p95_ms:.2f})':>18}" if tm else f"{'':>18}"
        print(f"{name:<10} {ev.top1:7.4f}{pt} {ev.top5:7.4f} {ev.loss:7.4f} {ev.f1_macro:7.4f} {ws} {cs} {pf} {sb} {cr} {ms}")
    for k, c in result.paired.items():
        print(f"{k}: gap {c.gap:+.4f} [95% CI {c.ci_low:+.4f}, {c.ci_high:+.4f}], McNemar p={c.mcnemar_p:.3g}")
    if result.base_val_eval is not None:  # val_fraction > 0: the table is the test part
        vals = ", ".join(f"{m} {o[m].val_eval.top1:.4f}" for m in o)
        print(f"validation part ({result.base_val_eval.n} examples; the table is the {result.eval_info['n_eval']} test "
              f"examples): top1 base {result.base_val_eval.top1:.4f}, {vals}")
    levels = sorted({(l.level_requested, l.level_effective) for l in o["dwt"].stats.layers})
    print("dwt levels (requested, effective): " + ", ".join(f"{a}->{b}" for a, b in levels))
    print("note: dwt weights are dense after reconstruction; its compression is in the coefficients (c-sparsity).")
    for w in result.warnings[:5]:
        print(f"warning: {w}")
    if len(result.warnings) > 5:  # all of them are the run's warnings.txt
        print(f"warning: ... and {len(result.warnings) - 5} more (all {len(result.warnings)}: the trial run's warnings.txt)")


def cmd_train(args: argparse.Namespace) -> int:
    from wavesweep import train
    from wavesweep.config import MAX_SEED

    if not 0 <= args.seed <= MAX_SEED:  # else scikit-learn's "'random_state' parameter of train_test_split" line
        raise ValueError(f"--seed={args.seed} must be an integer in 0..{MAX_SEED}")
    _check_device(args.device)
    base = train.get_base_model(args.model, args.dataset, seed=args.seed, data_root=args.data_root, device=args.device,
                                progress=not args.quiet)  # fmt: skip
    print(json.dumps({"model": base.model_name, "dataset": base.dataset_name, "source": base.source,
                      "path": str(base.path), "checksum": base.checksum, **base.train_info}, default=str, indent=2))  # fmt: skip
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from wavesweep import store
    from wavesweep.tracked_trial import register_trial_model

    if not args.run_id.strip():
        raise ValueError(f"run_id {args.run_id!r} is empty: give the id of a trial run (or of one of its method runs), "
                         "as the MLflow UI or `mlflow runs list` shows it")
    if not store.store_exists():  # as `models` and `download`: reading a run must not create a store
        raise ValueError(f"no MLflow store at {located(store.tracking_uri())}: no run {args.run_id} to register "
                         "(run this where the trial ran, or set MLFLOW_TRACKING_URI)")
    mv = register_trial_model(args.run_id, name=args.name, alias=args.alias or None, method=args.method)
    alias = f" alias {args.alias}" if args.alias else ""
    # the trial run the model comes from: a method run's trial, a configuration run's first replicate
    source = (mv.tags or {}).get("source_run_id") or args.run_id
    given = f" (given {args.run_id})" if source != args.run_id else ""
    print(f"registered {mv.name} version {mv.version}{alias} from trial run {source}{given}")
    if args.alias:
        print(f"load it with: mlflow.pyfunc.load_model('models:/{mv.name}@{args.alias}').get_raw_model()  # an nn.Module")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from wavesweep import model_registry

    path = model_registry.download(args.uri, Path(args.dst), force=args.force)
    print(path)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from wavesweep import model_registry

    rows = model_registry.list_registered()
    if not rows:
        print("no registered wavesweep models")
    for r in rows:
        t = r["tags"]
        print(f"{r['name']} v{r['version']} aliases={','.join(r['aliases']) or '-'} method={t.get('method')} "
              f"wavelet={t.get('wavelet')} level={t.get('level')} percentile={t.get('percentile')} layout={t.get('layout')} "
              f"recovery={t.get('recovery')} seed={t.get('seed')} top1={_short(t.get('top1'))} ratio={_short(t.get('compression_ratio'))} run={r['run_id']}")  # fmt: skip
    return 0


MAX_PORT = 65535


def _short(tag: str | None) -> str | None:
    """A number tag to 4 significant digits for a listing (the tag keeps every digit)."""
    try:
        return f"{float(tag):.4g}" if tag is not None else None
    except ValueError:
        return tag


def cmd_ui(args: argparse.Namespace) -> int:
    """MLflow's server on this project's store (see wavesweep.mlflow_ui for why not plain ``mlflow ui``):
    prints the URL once it answers; runs until Ctrl-C. Exit 1 when the server stops before answering."""
    from wavesweep import mlflow_ui, store
    from wavesweep.redact import redact

    if not 1 <= args.port <= MAX_PORT:  # else the server's own OverflowError traceback, then exit 1
        raise ValueError(f"--port={args.port} is not a TCP port: give an integer in 1..{MAX_PORT}")
    if mlflow_ui.port_taken(args.host, args.port):
        raise ValueError(f"port {args.port} on {args.host} is in use (another MLflow UI?): give another --port")
    if not store.store_exists():  # a new store: its schema and the wavesweep experiment (imports MLflow)
        from wavesweep import tracking

        tracking.init_tracking()
    print(f"starting the MLflow UI on {redact(store.tracking_uri())} ({mlflow_ui.WORKERS} worker, no job executor) ...", flush=True)
    with mlflow_ui.started(args.host, args.port, store.tracking_uri()) as (proc, url):
        if not mlflow_ui.wait_until_answers(proc, url):
            print(f"wavesweep: error: the MLflow UI server stopped (exit code {proc.returncode}) before answering; "
                  "its messages are above", file=sys.stderr)  # fmt: skip
            return 1
        print(f"MLflow UI: {url}  (Ctrl-C stops it)", flush=True)
        return proc.wait()


def cmd_study(args: argparse.Namespace) -> int:
    """``wavesweep study SPEC``: run or resume; report; optionally register the best model.

    Exit codes: 0 the total reached (or the timeout), 1 the launch gave up or fell short (the
    message says how many trials are missing), 2 misuse, 130 Ctrl-C, 143 SIGTERM.
    """
    from wavesweep import study

    spec = study.load_spec(args.spec, overrides=study.parse_assignments(args.set, "--set"))
    if args.register_best:
        from wavesweep.names import check_model_name

        check_model_name(args.register_best)
    if args.n_trials is not None and args.n_trials < 0:
        raise ValueError(f"--n-trials={args.n_trials} must be >= 0 (0: the spec's n_trials)")
    if args.timeout is not None:
        study.check_timeout(args.timeout)
    study.check_workers(args.workers)
    if args.sampler_seed is not None:
        study.check_sampler_seed(args.sampler_seed, args.workers)
    _report_dir(args.report_dir, spec.name)
    enqueued = [study.enqueue_params(spec, item) for item in args.enqueue or []]
    url = args.storage or spec.storage or study.DEFAULT_STORAGE
    study.check_storage_url(url)
    _warn_secrets(args.launched_run_id, args.storage)  # after the checks: a bad URL is one line, not a warning too
    if args.dry_run:
        print(study.describe(spec, url=url, n_trials=args.n_trials or None, timeout=args.timeout, workers=args.workers,
                             enqueued=enqueued, stoppers=_study_machine_stoppers(spec)), end="")  # fmt: skip
        return 0
    _check_study_data(spec)
    outcome = study.run_study(
        spec, n_trials=args.n_trials or None, timeout=args.timeout, storage=args.storage, workers=args.workers,
        progress=not args.quiet, launched_run_id=args.launched_run_id, quiet=args.quiet, enqueue_configs=enqueued,
        requeue_running=args.requeue_running, sampler_seed=args.sampler_seed,
    )  # fmt: skip
    _print_summary(outcome.study, outcome.run_id, url, final=outcome.final)
    from wavesweep import tracking

    if note := tracking.default_experiment_note(args.launched_run_id):
        print(note, file=sys.stderr)
    if not outcome.final:
        print(f"{outcome.running} trial(s) still running in other launchers: this is a partial view; "
              f"the last launcher to finish reports the study", file=sys.stderr)  # fmt: skip
    elif study.best_trial(outcome.study) is not None:  # a complete trial exists
        _report(outcome.study, args.report_dir, args.register_best, outcome.run_id)
    if outcome.status != "FINISHED":
        print(f"study {spec.name} stopped: {outcome.reason}; fix the cause and run the same command to resume", file=sys.stderr)
        return 1
    if outcome.missing:
        print(f"study {spec.name}: timeout after {outcome.missing} of the requested trials were left; run the same command to resume",
              file=sys.stderr)  # fmt: skip
    return 0


def _check_study_data(spec: Any) -> None:
    """Read the study's dataset once before anything is created: a wrong ``data_root`` (or missing
    files), or evaluation examples its ``val_fraction`` cannot split (a class with one example),
    is one line here, as for ``wavesweep trial``, not every trial failing on it. So are a device
    this machine does not have (``cuda`` without CUDA, fixed or among the searched choices) and a
    fixed weights file that is not there."""
    _check_study_machine(spec)
    searched = {p.name for p in spec.space}
    cfg = TrialConfig.from_mapping(spec.fixed)
    if searched & {"dataset", "data_root"}:
        return  # which files a trial reads is up to the sampler
    from wavesweep.evalsplit import split_eval_set
    from wavesweep.trial import check_training_split, load_eval_set

    bundle, eval_all = load_eval_set(cfg)
    if not searched & {"eval_limit", "seed"}:  # else which examples are split is up to the sampler
        split_eval_set(eval_all, cfg.val_fraction, seed=cfg.seed)
    recovery = next((p for p in spec.space if p.name == "recovery"), None)
    for rec in (recovery.choices if recovery is not None else (cfg.recovery,)):  # every trial with it would fail
        check_training_split(str(rec), bundle)


def _check_study_machine(spec: Any) -> None:
    """A device this machine does not have (``cuda`` without CUDA, fixed or among the searched
    choices), a fixed weights file that is not there, and the published weights of a pretrained
    base (resnet18 on imagenet) missing from the torch hub cache: one line, the first of them."""
    for check in _study_machine_checks(spec):
        check()  # the first one that fails is the line


def _study_machine_stoppers(spec: Any) -> list[str]:
    """What :func:`_check_study_machine` would stop on, every one of them (``--dry-run`` lists them)."""
    found = []
    for check in _study_machine_checks(spec):
        try:
            check()
        except (ValueError, FileNotFoundError) as exc:
            found.append(str(exc))
    return found


def _study_machine_checks(spec: Any) -> list[Callable[[], Any]]:
    from wavesweep.models import pretrained_resnet18_file, weights_file
    from wavesweep.tracked_trial import URI_SCHEMES

    searched = {p.name for p in spec.space}
    cfg = TrialConfig.from_mapping(spec.fixed)
    device = next((p for p in spec.space if p.name == "device"), None)
    checks = [functools.partial(_check_device, str(d)) for d in (device.choices if device is not None else (cfg.device,))]
    if "weights" not in searched and cfg.weights and not cfg.weights.startswith(URI_SCHEMES):
        checks.append(functools.partial(weights_file, cfg.weights))
    if "weights" not in searched and not cfg.weights:
        listed = {p.name: tuple(p.choices) for p in spec.space if p.kind == "categorical"}
        pairs = {(m, d) for m in listed.get("model", (cfg.model,)) for d in listed.get("dataset", (cfg.dataset,))}
        if pairs & set(PRETRAINED_BASES):  # resnet18 on imagenet: torchvision's weights, never downloaded
            checks.append(pretrained_resnet18_file)
    return checks


def _warn_secrets(launched_run_id: str | None, storage: str | None) -> None:
    """A password in ``-P storage=...`` has already been logged by ``mlflow run`` itself (as the
    param ``storage``) before wavesweep starts; wavesweep redacts everything it logs, but cannot
    take that back, so it says so."""
    from wavesweep import tracking

    if storage and tracking.redact(storage) != storage:
        where = " and `mlflow run` stored it as the run's 'storage' param" if launched_run_id else ""
        logging.getLogger("wavesweep").warning(
            "the storage URL carries a password%s; put credentials in ~/.pgpass or PGPASSWORD (see README) "
            "instead of the command line", where)  # fmt: skip


def cmd_report(args: argparse.Namespace) -> int:
    """``wavesweep report STUDY``: STUDY is a spec file or a study name in ``--storage``."""
    from wavesweep import study

    if args.register_best:
        from wavesweep.names import check_model_name

        check_model_name(args.register_best)
    target = Path(args.study)
    if target.suffix in (".yaml", ".yml") or target.is_file():
        spec = study.load_spec(target)
        name, url = spec.name, args.storage or spec.storage or study.DEFAULT_STORAGE
    else:
        name, url = args.study, args.storage or study.DEFAULT_STORAGE
    found = study.load_named_study(name, url)
    _report_dir(args.report_dir, found.study_name)
    parent = found.user_attrs.get("mlflow_run_id")
    _print_summary(found, parent or "-", url)
    if study.best_trial(found) is None:
        raise ValueError(f"study {name!r} has no complete trial yet: nothing to report")
    _report(found, args.report_dir, args.register_best, parent)
    return 0


def _print_summary(found: Any, parent: str, url: str, final: bool = True) -> None:
    from wavesweep import study, tracking

    m = study.study_metrics(found)
    print(f"study {found.study_name}{'' if final else ' so far (not final)'}: {int(m['n_complete'])} complete, {int(m['n_pruned'])} pruned, {int(m['n_fail'])} failed "
          f"(storage {located(url)}, MLflow run {parent} at {located(tracking.tracking_uri())})")  # fmt: skip
    if m["n_repeated"]:
        n = int(m["n_repeated"])
        print(f"{n} of the complete trials repeated an earlier trial's configuration: not run again, the earlier trial's "
              "numbers counted once (Optuna user attribute repeat_of)")  # fmt: skip
    best = study.best_trial(found)
    if best is not None:
        objectives = [m for m, _d in study.study_objectives(found)]
        names = list(found.metric_names or objectives)
        vals = ", ".join(f"{n}={v:.4f}" for n, v in zip(names, best.values))
        test = [f"{o}={best.user_attrs[o]:.4f}" for o, n in zip(objectives, names)
                if n != o and isinstance(best.user_attrs.get(o), (int, float))]  # fmt: skip
        vals += f" (selected on validation; test part: {', '.join(test)})" if test else ""
        print(f"best trial {best.number}: {vals} params {best.params} (MLflow run {best.user_attrs.get('mlflow_run_id')})")


def _waiting(folder: Path, page: str) -> bool:
    """Whether a live `wavesweep results` waits for ``page`` in ``folder`` (its ``.PAGE.waiting.PID``
    file); those of processes that are gone are removed."""
    found = False
    for f in folder.glob(f".{page}.waiting.*"):
        pid = f.name.rsplit(".", 1)[1]
        try:
            os.kill(int(pid), 0)
            found = True
        except ProcessLookupError:
            f.unlink(missing_ok=True)
        except (ValueError, OSError):  # not a pid; another user's process
            found = found or pid.isdigit()
    return found


def _report_dir(report_dir: str | None, study_name: str) -> Path:
    """Where a study's report goes (``--report-dir``, default ``reports/STUDY``); a one-line
    ``ValueError`` naming a file in the way, checked before the study runs (its report comes last)."""
    from wavesweep.fileio import file_in_the_way
    from wavesweep.names import check_name

    out = Path(report_dir) if report_dir else Path("reports") / check_name("study name", study_name)
    if (blocker := file_in_the_way(out)) is not None:
        raise ValueError(f"report folder {out}: {blocker} is a file, not a folder (--report-dir)")
    return out


def _report(found: Any, report_dir: str | None, register: str | None, parent: str | None) -> None:
    """Write (and log on the study run) the study's report; optionally register its best model."""
    from wavesweep import study, tracking
    from wavesweep.fileio import file_lock
    from wavesweep.tracked_trial import register_trial_model

    out = _report_dir(report_dir, found.study_name)
    # Launchers that finish together write the same folder: one at a time, each uploading its own files.
    with file_lock(out.parent / f".{out.name}.lock"):
        files = study.build_report(found, out)
        print(f"report: {out.resolve()} ({', '.join(sorted(p.name for p in files.values()))})")
        client = tracking.client()
        if parent and tracking.run_status(client, parent) is not None:
            tracking.log_study_report(client, parent, files.values())
            print(f"report logged on study run {parent} under report/")
    if register:
        best = study.best_trial(found)
        if best is None or not best.user_attrs.get("mlflow_run_id"):
            raise ValueError(f"study {found.study_name!r} has no complete trial to register")
        mv = register_trial_model(best.user_attrs["mlflow_run_id"], name=register, alias="champion")
        print(f"registered best trial {best.number} as {mv.name} version {mv.version} alias champion "
              f"(load: mlflow.pyfunc.load_model('models:/{mv.name}@champion').get_raw_model())")  # fmt: skip
        if parent:
            tracking.log_batch(client, parent, tags={"registered_model": f"{mv.name}/{mv.version}"})


def cmd_results(args: argparse.Namespace) -> int:
    from pathlib import Path

    from wavesweep import results

    if args.seeds is not None and args.seed is not None:  # which would the page be of?
        raise ValueError(f"--seed {args.seed} with --seeds {args.seeds}: give one or the other (--seeds runs the "
                         "whole grid once per seed listed, e.g. --seeds 0,1,2)")
    seeds = results.parse_seeds(args.seeds) if args.seeds is not None else None
    fractions = results.check_fractions(results.parse_list(args.fractions, int, "--fractions"), args.fractions)
    grid = results.Grid(
        model=args.model, dataset=args.dataset, level=args.level, fractions=fractions,
        recoveries=results.parse_list(args.recoveries, option="--recoveries"), configs=results.parse_configs(args.configs),
        eval_limit=args.eval_limit, seed=seeds[0] if seeds else args.seed or 0, device=args.device,
        data_root=args.data_root, recovery_batches=args.recovery_batches, finetune_steps=args.finetune_steps,
    )  # fmt: skip
    grid.trials()  # validate every trial before any work
    _check_device(args.device)
    results.check_page_path(args.out)
    where = [""]  # "seed S: " while a --seeds run is on seed S

    def on_seed(seed: int) -> None:
        where[0] = f"seed {seed}: "
        print(f"seed {seed} ({seeds.index(seed) + 1} of {len(seeds)})", flush=True)

    def on_trial(i: int, n: int, cfg: TrialConfig) -> None:
        print(f"{where[0]}[{i + 1}/{n}] {cfg.wavelet} {cfg.layout} p{cfg.percentile:g} recovery={cfg.recovery}", flush=True)

    def on_resume(reused: int, total: int) -> None:
        print(f"{where[0]}resuming: {reused} of {total} trials were done by an earlier run ({progress}; --fresh reruns them)")

    def on_base(base, seconds: float) -> None:
        info = base.train_info
        trained = (f"its training took {info['seconds']:.0f} s, test top-1 {info['test_top1']:.4f}"
                   if info.get("seconds") is not None and info.get("test_top1") is not None else "")
        print(f"base model {args.model} on {args.dataset} ready after {seconds:.0f} s ({trained or 'no training record'}; "
              f"sha256 {base.checksum[:16]})", flush=True)

    from wavesweep.fileio import file_lock

    progress = results.progress_path(Path(args.out))
    # a command waiting for the page, by pid: the one writing it keeps its progress file for it
    waiter = progress.parent / f".{Path(args.out).name}.waiting.{os.getpid()}"

    def on_wait() -> None:
        waiter.touch()
        print(f"another wavesweep results is writing {args.out}: waiting for it (its trials are then reused)", flush=True)

    # One command per page at a time: two would each run every trial, and each rewrite the progress
    # file with its own rows only. The second waits, then resumes from the first's progress.
    with file_lock(progress.parent / f".{Path(args.out).name}.lock", on_wait=on_wait):
        waiter.unlink(missing_ok=True)
        if args.fresh:
            progress.unlink(missing_ok=True)
        callbacks = {"on_trial": on_trial, "progress": progress, "on_resume": on_resume, "on_base": on_base}
        argv = [a for a in (sys.argv[sys.argv.index("results") + 1 :] if "results" in sys.argv else []) if a != "--fresh"]
        if seeds is None:
            frame, facts = results.run_grid(grid, **callbacks)
            text, seconds = results.render(frame, facts, grid, results.default_command(argv)), facts["seconds"]
        else:
            frame, every = results.run_seeds(grid, seeds, on_seed=on_seed, **callbacks)
            text, seconds = results.render_seeds(frame, every, grid, results.default_command(argv)), sum(
                f["seconds"] for f in every)
        path = results.write_page(text, Path(args.out), frame)
        if not _waiting(progress.parent, Path(args.out).name):  # else the next one resumes from it, not from nothing
            progress.unlink(missing_ok=True)
    print(f"wrote {path} ({len(frame)} trials{f' of {len(seeds)} seeds' if seeds else ''}, {seconds / 60:.1f} min)")
    return 0


def _int_or_blank(text: str) -> int | None:
    """An integer, or None for '' (an MLproject parameter left at its empty default)."""
    if text.strip() == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or '', got {text!r}") from None


DESCRIPTION = ("Prune a trained network three ways at the same budget (dwt: wavelet coefficients; magnitude; random), "
               "recover each the same way, and compare them on the same examples; MLflow records every run. "
               "Commands: train, trial, study, results, report, register, download, models, ui.")


def build_parser() -> argparse.ArgumentParser:
    from wavesweep import __version__

    p = Parser(prog="wavesweep", description=DESCRIPTION)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"wavesweep {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("trial", help="run one tracked trial (dwt vs matched magnitude vs random)")
    add_trial_options(t)
    t.add_argument("--experiment", default=None, help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, $MLFLOW_EXPERIMENT_ID or 'wavesweep')")
    t.add_argument("--replicates", default=None, metavar="INT",
                   help="run the configuration with seeds seed, seed+1, ..., seed+N-1: N trial runs below one configuration "
                        "run holding their mean, std and 95 %% t-interval (default: 1, a single trial run)")  # fmt: skip
    t.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_trial)

    tr = sub.add_parser("train", help="train (or load) and cache a base model")
    tr.add_argument("--model", default="resnet18", help=FIELD_HELP["model"] + " (default: resnet18)")
    tr.add_argument("--dataset", default="digits", help=FIELD_HELP["dataset"] + " (default: digits)")
    tr.add_argument("--seed", type=int, default=0, help="seed for the data split, weight init and data order (default: 0)")
    tr.add_argument("--data-root", default=None, help=FIELD_HELP["data_root"])
    tr.add_argument("--device", default="auto", help=FIELD_HELP["device"] + " (default: auto)")
    tr.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    tr.set_defaults(func=cmd_train)

    r = sub.add_parser("register", help="register a trial's pruned model in the MLflow Model Registry")
    r.add_argument("run_id", help="trial run id (or one of its method runs)")
    r.add_argument("--name", required=True, help="registered model name")
    r.add_argument("--alias", default="champion", help="alias to point at the new version ('' for none; default: %(default)s)")
    r.add_argument("--method", default=None, choices=("dwt", "magnitude", "random"),
                   help="which model of the trial (baselines need save_baselines=true; default: dwt, "
                        "or the method of a method run's id)")  # fmt: skip
    r.set_defaults(func=cmd_register)

    d = sub.add_parser("download", help="download a registered model (e.g. models:/NAME@champion) as files")
    d.add_argument("uri", help="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN_ID/PATH")
    d.add_argument("--dst", required=True, help="folder to put the files in (created if absent)")
    d.add_argument("--force", action="store_true", help="overwrite files that already exist in --dst")
    d.set_defaults(func=cmd_download)

    m = sub.add_parser("models", help="list registered wavesweep models, versions and aliases")
    m.set_defaults(func=cmd_models)

    u = sub.add_parser("ui", help="start the MLflow UI on this project's store (answers in seconds; prints its URL)")
    u.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1, this machine only)")
    u.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    u.set_defaults(func=cmd_ui)

    s = sub.add_parser("study", help="run (or resume) an Optuna study from a sweeps/*.yaml spec")
    s.add_argument("spec", help="study spec, e.g. sweeps/digits-resnet18.yaml")
    s.add_argument("--n-trials", type=int, default=None, help="total trials wanted (overrides the spec)")
    s.add_argument("--timeout", type=float, default=None, help="seconds per launch, > 0 (overrides the spec)")
    s.add_argument("--storage", default=None, help="Optuna storage URL (overrides the spec)")
    s.add_argument("--workers", type=int, default=1, help="worker processes on this machine (default: %(default)s)")
    s.add_argument("--register-best", default=None, metavar="NAME", help="register the best trial's model as NAME@champion")
    s.add_argument("--report-dir", default=None, help="where to write plots and tables (default: reports/STUDY)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a spec key (n_trials=8, sampler.seed=3, base.eval_limit=100, or a trial parameter: eval_limit=100); repeatable")
    s.add_argument("--enqueue", action="append", metavar="NAME=VALUE,...",
                   help="run this configuration of the search space first (e.g. wavelet=haar,percentile=40); repeatable")
    s.add_argument("--sampler-seed", type=_int_or_blank, default=None, metavar="N",
                   help="seed this launch's sampler with N as is (worker i: N+i; default: the spec's seed mixed with a "
                        "random salt, so launchers on several machines differ); a study launched afresh with the same N "
                        "and one worker proposes the same configurations. Each trial records its sampler_seed; "
                        "'' = the default, as `mlflow run -e study` passes it")
    s.add_argument("--dry-run", action="store_true", help="print the resolved spec, its search space and what would stop a launch on this machine (a device, a weights file); run nothing, create nothing")
    s.add_argument("--requeue-running", action="store_true",
                   help="no launcher is running: fail the RUNNING trials (dead workers) and re-queue them with the same params "
                        "(for a journal-file storage, which has no heartbeats)")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar; Optuna logs errors only")
    s.set_defaults(func=cmd_study)

    rs = sub.add_parser("results", help="regenerate a results page: top-1 per method at fixed pruned fractions under each recovery")
    rs.add_argument("--model", default="resnet18", help="base model (trained and cached by wavesweep; default: %(default)s)")
    rs.add_argument("--dataset", default="fashion-mnist", help="dataset with a training split (recovery needs one; default: %(default)s)")
    rs.add_argument("--configs", default="bior4.4:filter,bior4.4:kernel,db4:filter", help="WAVELET:LAYOUT,... (default: %(default)s)")
    rs.add_argument("--fractions", default="50,70,80,90,95", help="pruned fractions in percent (the dwt percentile; default: %(default)s)")
    rs.add_argument("--recoveries", default="none,bn,finetune", help="recovery settings to compare (default: %(default)s)")
    rs.add_argument("--level", type=int, default=5, help=FIELD_HELP["level"] + " (default: 5)")
    rs.add_argument("--eval-limit", type=int, default=0, help="stratified evaluation subset (0 = the whole test split; default: %(default)s)")
    rs.add_argument("--recovery-batches", type=int, default=50, help=FIELD_HELP["recovery_batches"] + " (default: 50)")
    rs.add_argument("--finetune-steps", type=int, default=100, help=FIELD_HELP["finetune_steps"] + " (default: 100)")
    rs.add_argument("--seed", type=int, default=None, help=FIELD_HELP["seed"] + " (default: 0)")
    rs.add_argument("--seeds", default=None, metavar="S,S,...",
                    help="run the whole grid once per seed (at least 2; each with its own base model, as --seed S) and "
                         "compare the methods over seeds, with a Student-t interval over them (default: one seed, --seed)")
    rs.add_argument("--device", default="auto", help=FIELD_HELP["device"] + " (default: auto)")
    rs.add_argument("--data-root", default="", help=FIELD_HELP["data_root"] + " (default: %(default)r)")
    rs.add_argument("--out", default="docs/results-fashion-mnist.md",
                    help="the Markdown page to write (default: %(default)s, relative to the working directory: "
                         "run in a checkout, it overwrites the shipped ResNet-18 page)")
    rs.add_argument("--fresh", action="store_true",
                    help="rerun every trial (default: resume an interrupted run from OUT's .progress.csv)")
    rs.set_defaults(func=cmd_results)
    p.results_options = [o for a in rs._actions for o in a.option_strings]  # for _attached_list_values

    rp = sub.add_parser("report", help="plots and summary tables of a study")
    rp.add_argument("study", help="study spec path or study name")
    rp.add_argument("--storage", default=None, help="Optuna storage URL (default: the spec's, else sqlite:///optuna.db)")
    rp.add_argument("--report-dir", default=None, help="where to write plots and tables (default: reports/STUDY)")
    rp.add_argument("--register-best", default=None, metavar="NAME", help="register the best trial's model as NAME@champion")
    rp.set_defaults(func=cmd_report)
    return p


#: options of ``wavesweep results`` that take a comma-separated list of numbers
_LIST_OPTIONS = ("--seeds", "--fractions")


def _attached_list_values(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``results --seeds -1,2`` as ``--seeds=-1,2``: argparse takes a value that starts with a dash
    and is not one negative number for an option, and says only "expected one argument"; attached,
    the value reaches the option's own check, which names it and the valid values. The option may
    be abbreviated as argparse allows (``--fraction``); a value that is one of the command's own
    options (``-h``) or starts with ``--`` is left to argparse."""
    if "results" not in argv:
        return argv
    start = argv.index("results") + 1
    options = parser.results_options  # type: ignore[attr-defined]

    def resolved(tok: str) -> str | None:
        if tok in options:
            return tok
        match = [o for o in options if tok.startswith("--") and o.startswith(tok)]
        return match[0] if len(match) == 1 else None

    out = argv[:start]
    for tok in argv[start:]:
        prev = out[-1] if len(out) > start else ""
        if (resolved(prev) in _LIST_OPTIONS and tok.startswith("-") and not tok.startswith("--")
                and tok not in options):  # fmt: skip
            out[-1] = f"{prev}={tok}"
        else:
            out.append(tok)
    return out


def main(argv: list[str] | None = None, *, exiting: bool = False) -> int:
    """Run one command; returns its exit code. ``exiting``: the process exits with that code next
    (the console entry point, :func:`run`): after a stop, SIGINT and SIGTERM are then ignored until it
    has, so a second one cannot kill it by the signal halfway through its exit."""
    # The run `mlflow run` created for this process, read once here and passed down.
    launched_run_id = os.environ.get("MLFLOW_RUN_ID") or None
    from wavesweep.redact import remember_url_credentials

    remember_url_credentials(os.environ.get("MLFLOW_TRACKING_URI"))  # a password the URL pattern misses, hidden from here on
    try:
        parser = build_parser()
        args = parser.parse_args(_attached_list_values(sys.argv[1:] if argv is None else list(argv), parser))
    except UsageError as exc:
        msg = one_line(exc)
        print(f"wavesweep: error: {msg}", file=sys.stderr)
        with interrupt.ignored():
            tag_launched_run(launched_run_id, f"invalid command line: {msg}")
        return 2
    args.launched_run_id = launched_run_id
    # MLflow configures its own loggers when it is imported (later, by the command), which would
    # undo a setLevel here; its INFO lines ("Creating initial MLflow database tables...") would
    # then precede a one-line error on stderr. MLFLOW_LOGGING_LEVEL is read at that import.
    if not args.verbose:
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from wavesweep.redact import RedactingFilter

    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    for noisy in ("alembic", "mlflow", "urllib3", "matplotlib", "PIL", "torch"):  # torch: its exit hooks' INFO lines
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not args.verbose:  # MLflow retries a database it cannot reach for ~100 s, 4 lines a try: one line says so
        logging.getLogger("mlflow.store.db.utils").addFilter(_FirstRetryOnly())
    if args.func is not cmd_download:  # MLflow's download bars would break the one-line errors
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        with interrupt.stop_signals():  # SIGTERM (timeout, Slurm, docker stop) is handled like Ctrl-C
            try:
                # train, results: no MLflow needed (a GPU box may not have it); ui: none in this process
                if args.func not in (cmd_train, cmd_ui, cmd_results):
                    from wavesweep import tracking

                    tracking.set_tracking_uri()  # once per process, for MLflow's own functions
                return int(args.func(args) or 0)
            except KeyboardInterrupt as exc:  # handled inside the block: a second signal repeats the stop, dropped
                return _interrupted(exc, launched_run_id, exiting)
    except Exception as exc:
        environment = None if args.verbose else environment_error(exc)  # -v: the whole traceback
        if environment is not None:  # a full disk, an unreachable database: exit 1, one line
            print(f"wavesweep: error: {environment}", file=sys.stderr)
            with interrupt.ignored():  # outside the stop block: a stop waits for the record, as in _interrupted
                tag_launched_run(launched_run_id, environment)
            return 1
        if not (isinstance(exc, USAGE_ERRORS) or is_mlflow_error(exc)):
            with interrupt.ignored():
                tag_launched_run(launched_run_id, f"{type(exc).__name__}: {one_line(exc)}")
            raise
        msg = one_line(exc) + _relative_path_hint(exc, args, launched_run_id)
        print(f"wavesweep: error: {msg}", file=sys.stderr)
        with interrupt.ignored():
            tag_launched_run(launched_run_id, msg)
        return 2
    except KeyboardInterrupt as exc:  # a stop outside the block (as it was set up)
        return _interrupted(exc, launched_run_id, exiting)


class _FirstRetryOnly(logging.Filter):
    """MLflow's "SQLAlchemy engine could not be created ... retried in N seconds" (the exception's
    lines, a try every 0.1 * (2**k - 1) s, ten tries: about 100 s): the first try's, as one line;
    the others dropped. The error that ends it is the command's one line."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "could not be created" not in str(record.msg):
            return True
        if self.said:
            return False
        self.said = True
        tries = getattr(sys.modules.get("mlflow.store.db.utils"), "MAX_RETRY_COUNT", 10)
        wait = sum(0.1 * (2**k - 1) for k in range(1, tries))  # MLflow's sleeps between its tries
        record.msg, record.args = (f"the MLflow store does not answer; MLflow tries again for about {wait:.0f} s (Ctrl-C stops): %s",
                                   (one_line(record.args[0]) if record.args else "",))  # fmt: skip
        return True


def _relative_path_hint(exc: Exception, args: argparse.Namespace, launched_run_id: str | None) -> str:
    """Where a file was not found under ``mlflow run`` and a path given was relative: that
    ``mlflow run`` runs the command in the project directory, so ``-P data_root=data`` was taken
    from there, not from where it was launched (the same value works with ``wavesweep trial``)."""
    given = [f"{k}={v}" for k in ("data_root", "weights") if (v := getattr(args, k, None)) and not os.path.isabs(v)]
    if not (launched_run_id and given and isinstance(exc, FileNotFoundError) and os.path.isfile("MLproject")):
        return ""
    return (f" ({', '.join(given)}: under `mlflow run` a relative path is taken from the project directory "
            f"{os.getcwd()}; give an absolute path)")  # fmt: skip


def _interrupted(exc: KeyboardInterrupt, launched_run_id: str | None, exiting: bool) -> int:
    """A stop: one line, the launched run KILLED, exit 130 (SIGINT) or 143 (SIGTERM), no traceback."""
    reason = f"interrupted ({interrupt.caught(exc)})"
    if exiting:
        interrupt.ignore_until_exit()
    with interrupt.ignored():
        print(f"wavesweep: {reason}", file=sys.stderr)
        tag_launched_run(launched_run_id, reason, status="KILLED")
    return interrupt.exit_code(exc)


def run(argv: list[str] | None = None) -> None:
    """The console entry point (``wavesweep``, ``python -m wavesweep``, MLproject). Once the command
    has returned, its runs are closed and its line printed: a SIGINT or SIGTERM in the process's last
    moments (its exit handlers) is ignored, as after a stop, and the exit code is the command's (it
    ended the process by the signal, status -15, or printed a traceback from an exit handler)."""
    code = main(argv, exiting=True)
    interrupt.ignore_until_exit()
    raise SystemExit(code)


if __name__ == "__main__":
    run()
