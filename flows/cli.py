"""`diffpipe`: one subcommand per stage, `nightly` for the whole chain, `serve` for the deployment.

diffpipe nightly [-c config.yaml] [section.field=value ...] [--dry-run] [--wait]
diffpipe promote [--rollback] [--model NAME] [--wait]
diffpipe samplers [-c config.yaml] [overrides] --samplers ddim,dpmpp_2m --steps 10,20,50
diffpipe ema [-c config.yaml] [overrides] --sigma-rels 0.03,0.05,0.07,0.10,0.15 [--step N]
diffpipe gc [-c config.yaml] [overrides] [--dry-run]
diffpipe sweep -c sweep.yaml [--dry-run] [--no-confirm]
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from flows.watchdog import start_watchdog
from tasks import layout
from tasks.config import (
    EMA_CHOICE_SIGMA_RELS,
    ConfigError,
    DeprecatedConfigWarning,
    PipelineConfig,
    check_network,
    check_sigma_rels,
    load_config,
    to_yaml,
)
from tasks.errors import describe_failure
from tasks.lease import model_lease, refuse_if_held
from tasks.promote.stage import read_champion, repair_champion
from tasks.promote.stage import rollback as roll_back
from tasks.records import (
    Champion,
    Checkpoint,
    EmaChoice,
    Evaluation,
    Metrics,
    MetricSample,
    NightlySummary,
    PromotionHistory,
    SamplerChoice,
    SampleSet,
    ShardResult,
    SweepResult,
    TrainResult,
    with_noise,
)
from tasks.retention.rule import Deletion, size
from tasks.retention.stage import apply_retention, plan_retention
from tasks.runtime import setup_process
from tasks.sample.grid import grid_configs, product_grid
from tasks.shard.datasets import check_source
from tasks.storage import Store, open_store
from tasks.train.phema import require_snapshots

STAGES = {
    "shard": "shard the dataset into WebDataset tars with a manifest (reused when unchanged)",
    "train": "train (or resume) the denoiser with Ray Train DDP",
    "sample": "sample images from the run's latest checkpoint with Ray tasks",
    "evaluate": "compute FID/KID/IS of the latest sample set against the held-out split",
    "nightly": "shard -> train (continue) -> sample -> evaluate -> promote if better -> report "
    "-> retention",
    "samplers": "score a grid of sampler settings of the latest checkpoint (FID against NFE) and "
    "choose the cheapest within the noise of the best",
    "ema": "rebuild EMAs of several widths from the run's post-hoc EMA snapshots, score each and "
    "choose one",
    "promote": "show the promoted model and its recent nights; --rollback restores the previous one",
    "gc": "apply the retention policy (retention.*): delete what it does not keep; --dry-run lists "
    "it with the bytes and deletes nothing",
    "sweep": "a sweep over training settings (-c sweep.yaml): trials trained in segments under Ray "
    "Tune, losers stopped early (ASHA/median), within a device-seconds budget; resumable",
    "serve": "register the nightly deployment (cron) and the sweep's (on demand) with the Prefect "
    "API and run their flow runs",
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffpipe", description="Train, sample and evaluate diffusion models."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text in STAGES.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument(
            "-c",
            "--config",
            help="YAML config file (sections: storage, data, model, train, sample, evaluate, promote, ray)",
        )
        p.add_argument(
            "overrides",
            nargs="*",
            metavar="section.field=value",
            help="config overrides, e.g. train.steps=200",
        )
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="list what would be deleted, with the bytes, and delete nothing"
            if name == "gc"
            else "print the resolved config and exit",
        )
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="also show Ray's and Prefect's own logs and a failure's full cause chain",
        )
        if name in ("nightly", "train", "promote"):
            p.add_argument(
                "--wait",
                action="store_true",
                help="when another process holds the run's (promote: the model's) lease, wait "
                "for it to end instead of failing",
            )
        if name == "promote":
            p.add_argument(
                "--rollback",
                action="store_true",
                help="put the previous champion back in place (recorded in the history)",
            )
            p.add_argument(
                "--repair",
                action="store_true",
                help="rebuild a damaged champion pointer from the champion records and the history",
            )
            p.add_argument("--model", default=None, help="model name (default: promote.model_name)")
        if name == "samplers":
            _sweep_arguments(p)
        if name == "ema":
            _ema_arguments(p)
        if name == "sweep":
            p.add_argument(
                "--no-confirm",
                action="store_true",
                help="skip the winner's confirmation at full n on the evaluation's seed ranges",
            )
        if name == "serve":
            p.add_argument("--cron", default=None, help="schedule (default: 0 2 * * *, 02:00 UTC)")
            p.add_argument(
                "--name",
                default="nightly",
                help="deployment name (default: nightly/nightly and sweep/sweep; another name "
                "names both)",
            )
            p.add_argument("--limit", type=int, default=None, help="max concurrent runs")
    return parser


def _listed(kind: Callable[[str], object], what: str) -> Callable[[str], list[object]]:
    """An argparse type: comma-separated values of `kind`, each bad one named."""

    def parse(text: str) -> list[object]:
        values = []
        for item in (v.strip() for v in text.split(",")):
            try:
                values.append(kind(item))
            except ValueError:
                raise argparse.ArgumentTypeError(f"{item!r} is not {what}") from None
        return values

    return parse


def _sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The grid of `diffpipe samplers`: every combination of the values given; a flag left out
    keeps the config's `sample.*` value."""
    p.add_argument(
        "--samplers",
        type=_listed(str, "a sampler"),
        default=[],
        help="comma-separated samplers: ddpm, ddim, dpmpp_2m, heun",
    )
    p.add_argument(
        "--steps",
        type=_listed(int, "a whole number of steps"),
        default=[],
        help="comma-separated step counts, e.g. 10,20,50",
    )
    p.add_argument(
        "--spacing",
        type=_listed(str, "a spacing"),
        default=[],
        help="comma-separated timestep spacings: leading, trailing, linspace, logsnr, karras",
    )
    p.add_argument(
        "--guidance",
        type=_listed(float, "a number"),
        default=[],
        help="comma-separated classifier-free guidance scales (1 = none; others need a "
        "class-conditional model)",
    )


def _sigma_rels(text: str) -> list[float]:
    """An argparse type: comma-separated power-EMA widths, each in (0, 0.2887)."""
    values = []
    for item in (v.strip() for v in text.split(",")):
        try:
            values.append(float(item))
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number") from None
    try:
        return list(check_sigma_rels(values, "--sigma-rels"))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _ema_arguments(p: argparse.ArgumentParser) -> None:
    """What `diffpipe ema` rebuilds: the widths, and the step (default: the newest snapshot's)."""
    default = ",".join(f"{s:g}" for s in EMA_CHOICE_SIGMA_RELS)
    p.add_argument(
        "--sigma-rels",
        type=_sigma_rels,
        default=list(EMA_CHOICE_SIGMA_RELS),
        help=f"comma-separated EMA widths (sigma_rel, EDM2) to rebuild and score (default: {default})",
    )
    p.add_argument(
        "--step",
        type=int,
        default=None,
        help="rebuild the EMAs at this step, from the snapshots at or before it (default: the "
        "newest snapshot's)",
    )


def _print_ema_choice(choice: EmaChoice) -> None:
    """Every width's FID, then the chosen one in one line."""
    k = choice.repeats
    print(
        f"\npost-hoc EMA of run {choice.run_id!r} at step {choice.step}: "
        f"{len(choice.candidates)} widths, each on the same {k} seed ranges of "
        f"{choice.num_images} images"
    )
    for c in sorted(choice.candidates, key=lambda c: c.sigma_rel):
        fid = "n/a" if c.fid is None else with_noise(c.fid, c.fid_std, k)
        within = "within noise" if c.within_noise else ""
        mark = "CHOSEN" if c.sigma_rel == choice.chosen else within
        problems = f"  not trusted: {'; '.join(c.problems)}" if c.problems else ""
        print(f"  sigma_rel {c.sigma_rel:<8g} FID {fid:<34} {mark}{problems}")
    chosen = next(c for c in choice.candidates if c.sigma_rel == choice.chosen)
    within = ", ".join(f"{c.sigma_rel:g}" for c in choice.candidates if c.within_noise)
    print(
        f"chosen: sigma_rel {choice.chosen:g} ({chosen.checkpoint_key}), the lowest mean FID; "
        f"within its noise: {within} (paired t-test, alpha {choice.alpha:g})"
    )
    print(f"report: {choice.report_url}")


def _print_choice(choice: SamplerChoice) -> None:
    """Every setting with its NFE and FID, the choice and the command line that uses it."""
    k = choice.repeats
    print(
        f"\nsampler sweep of run {choice.run_id!r}, step {choice.step}: {len(choice.settings)} "
        f"settings, each on the same {k} seed ranges of {choice.num_images} images"
    )
    for s in sorted(choice.settings, key=lambda s: (s.nfe, s.mean)):
        mark = "CHOSEN" if s.chosen else ("within noise" if s.within_noise else "")
        fid = with_noise(s.mean, s.std, k)
        print(f"  {s.name:<34}{s.nfe:5d} NFE  FID {fid:<32} {mark}")
    chosen, best = choice.chosen, choice.best
    print(
        f"chosen: {chosen.name} ({chosen.nfe} NFE), the cheapest within the noise of the best "
        f"({best.name}, {best.nfe} NFE; paired t-test, alpha {choice.alpha:g})"
    )
    print(f"use it: {chosen.command}")
    print(f"report: {choice.report_url}")


def _fid(m: Metrics) -> str:
    """'0.09030 ± 0.0021 (std over k=3; 256 samples per repeat vs 180 held-out images; <extractor>)',
    or '0.09030 (noise not measured: k=1; ...)'."""
    detail = (
        f"; {m.num_images} samples per repeat vs {m.num_reference_images} held-out images; "
        f"{m.extractor.label}"
    )
    fid = MetricSample.of(m, "fid")
    return f"n/a ({detail[2:]})" if fid is None else fid.describe(detail)


def _print_summary(result: NightlySummary, seconds: float | None) -> None:
    """What ran (and what was reused), where the report is, FID with its noise, the decision."""
    m, d = result.metrics, result.promotion
    took = "" if seconds is None else f" in {seconds:.0f} s"
    print(f"\nnightly run {result.run_id!r}, night {result.stamp}: done{took}")
    for s in result.stages:
        reused = "reused" if s.reused else ""
        print(f"  {s.name:<9}{s.seconds:7.1f} s  {reused:<7} {s.detail}")
        if s.usage is not None:  # README: Cost
            print(f"  {'':<9}{'':>9}  {'':<7} {s.usage.describe()}")
    if result.cost is not None:
        print(f"cost: {result.cost.describe()}")
    print(f"report: {result.report_url}")
    print(f"FID: {_fid(m)}")
    print(f"promotion: {'PROMOTED' if d.promoted else 'not promoted'}: {d.reason}")


def _print_result(result: BaseModel, seconds: float | None = None) -> None:
    if isinstance(result, NightlySummary):
        _print_summary(result, seconds)
    elif isinstance(result, Evaluation):
        m = result.metrics
        print(f"FID: {_fid(m)}")
        print(f"report: {m.report_key}")
    elif isinstance(result, ShardResult):
        print(f"manifest: {result.manifest.key} ({'reused' if result.reused else 'written'})")
    elif isinstance(result, TrainResult):
        print(f"checkpoint: {result.checkpoint.key} (step {result.checkpoint.step})")
    elif isinstance(result, SampleSet):
        print(f"samples: {result.key} ({result.num_images} images)")
    elif isinstance(result, SamplerChoice):
        _print_choice(result)
    elif isinstance(result, EmaChoice):
        _print_ema_choice(result)


def _promote(store: Store, model_name: str, rollback: bool, repair: bool = False) -> int:
    """`diffpipe promote`: the champion and the recent nights; `--rollback` restores the previous,
    `--repair` rebuilds a damaged pointer."""
    layout.part(model_name, "model name")
    if repair:
        restored = repair_champion(store, model_name)
        where = store.url(layout.model_current(model_name))
        if restored is None:
            print(
                f"model {model_name!r}: no champion records: nothing was promoted ({where} left as is)"
            )
        else:
            print(
                f"model {model_name!r}: {where} restored to step {restored.step} ({restored.key})"
            )
        return 0
    if rollback:
        event = roll_back(store, model_name)
        print(
            f"model {model_name!r}: rolled back from step {event.from_step} to step "
            f"{event.to_step} ({store.url(layout.model_current(model_name))}; recorded in "
            f"{store.url(layout.model_history(model_name))})"
        )
        return 0
    champion = read_champion(store, model_name)
    if champion is None:
        print(f"model {model_name!r}: nothing promoted yet")
        return 0
    m = champion.metrics
    print(
        f"model {model_name!r}: step {champion.step} of run {m.run_id!r}, promoted "
        f"{champion.promoted_at} (night {champion.night or '-'}), FID {_fid(m)}"
    )
    print(f"  checkpoint: {store.url(champion.checkpoint_key)}")
    if champion.previous_key is not None:
        previous = Champion.read(store, champion.previous_key)
        print(f"  previous: step {previous.step} (`diffpipe promote --rollback` restores it)")
    history = PromotionHistory.read_or_none(store, layout.model_history(model_name))
    for d in (history.decisions if history else [])[-5:]:
        print(f"  night {d.night}: {'PROMOTED' if d.promoted else 'kept'}: {d.reason}")
    for r in (history.rollbacks if history else [])[-3:]:
        print(f"  rollback {r.at}: step {r.from_step} -> step {r.to_step}")
    return 0


def _gc(store: Store, cfg: PipelineConfig, dry_run: bool) -> int:
    """`diffpipe gc`: every object the retention policy does not keep, by artifact, with its
    bytes; deleted unless `dry_run` (README: Retention)."""
    policy = cfg.retention
    planned = plan_retention(store, policy, cfg.train.keep_checkpoints)
    depth = "all" if policy.rollback_depth is None else policy.rollback_depth
    print(
        f"retention of {store.url('')}: keep_nights={policy.keep_nights}, grace_hours="
        f"{policy.grace_hours:g}, rollback_depth={depth}, train.keep_checkpoints="
        f"{cfg.train.keep_checkpoints}{' (dry run: nothing is deleted)' if dry_run else ''}"
    )
    by_artifact: dict[str, list[Deletion]] = {}
    for d in planned.deletions:
        by_artifact.setdefault(d.why, []).append(d)
    for why, deletions in by_artifact.items():
        print(f"{why}:")
        for d in deletions:
            print(f"  {size(d.bytes):>9}  {d.key}")
    for night in planned.pruned_reports:
        print(f"report text kept, saying its images were pruned: {night.report_key}")
    if not dry_run:
        apply_retention(store, planned, policy)
    verb = "would delete" if dry_run else "deleted"
    print(f"{verb} {len(planned.deletions)} objects: {planned.describe()}")
    return 0


def _prefect_chatter(record: logging.LogRecord) -> bool:
    """Prefect's own INFO lines that the nightly's stage lines already say: its temporary
    server starting and stopping, each task run's "Finished in state Completed()"."""
    if record.levelno != logging.INFO:
        return False
    return record.name == "prefect" or (
        record.name in ("prefect.task_runs", "prefect.flow_runs")
        and record.getMessage().startswith("Finished in state Completed")
    )


class _Quiet(logging.Filter):
    """Default console: our progress lines, warnings of every layer, no tracebacks (the CLI prints
    a failure once, at the end) and none of Prefect's own reports of that same failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _prefect_chatter(record):
            return False
        if record.name.startswith("prefect") and (
            record.levelno >= logging.ERROR
            or any(
                s in record.getMessage() for s in ("Failed(", "Crashed(", "failed with exception")
            )
        ):
            return False
        record.exc_info, record.exc_text = None, None
        return True


_RAY_SUBLOGGERS = ("_private", "exceptions", "train", "tune", "air", "data", "util", "runtime_env")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_Quiet())
        # Ray sets its own "ray" logger's level when imported, after this; its sub-loggers keep
        # theirs ("Started a local Ray instance", the token notice, the driver's exception notes).
        for name in ("ray", *(f"ray.{sub}" for sub in _RAY_SUBLOGGERS)):
            logging.getLogger(name).setLevel(logging.ERROR)


def _load(command: str, path: str | None, overrides: list[str]) -> PipelineConfig:
    """The config, its old field names' warnings said once (the flows load it again, quietly), and
    for the commands that train, the check that the data and model sections build a network."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DeprecatedConfigWarning)
        cfg = load_config(path, overrides)
    for w in caught:
        if issubclass(w.category, DeprecatedConfigWarning):
            print(f"diffpipe: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)
    warnings.filterwarnings("ignore", category=DeprecatedConfigWarning)
    if command in ("train", "nightly", "serve"):
        check_network(cfg)
    return cfg


def _sweep(args: argparse.Namespace) -> int:
    """`diffpipe sweep -c sweep.yaml`: every trial's config checked before anything starts
    (`--dry-run` lists the trials), then the sweep flow; the same command resumes a killed one."""
    from tasks.sweep.spec import SweepSpecError, describe, plan_trials, read_spec

    if not args.config:
        print("diffpipe sweep: give the sweep's YAML with -c sweep.yaml", file=sys.stderr)
        return 2
    if args.overrides:
        print(
            "diffpipe sweep: overrides go in the sweep YAML (base.overrides), not on the command "
            f"line: {args.overrides[0]!r}",
            file=sys.stderr,
        )
        return 2
    try:
        spec = read_spec(args.config)
        plans = plan_trials(spec)
    except SweepSpecError as err:
        print(f"diffpipe sweep: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        for plan in plans:
            print(
                f"{plan.trial_id}  run {plan.run_id}  seed {plan.seed}  {describe(plan.settings)}"
            )
        return 0
    _configure_logging(args.verbose)
    start_watchdog()
    from flows.sweep import sweep_flow

    try:
        result = sweep_flow(sweep_path=args.config, confirm=not args.no_confirm)
    except Exception as err:  # noqa: BLE001 - every failure ends as one message and exit code 1
        print(f"diffpipe sweep: {describe_failure(err)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(err)
        return 1
    _print_sweep(result)
    return 0


def _print_sweep(result: SweepResult) -> None:
    """Every trial in one line, where the budget stopped the sweep, the winner and its handoff."""
    print(f"\nsweep {result.name!r}: {len(result.trials)} trials, {result.scheduler}")
    for o in result.trials:
        t = o.trial
        last = t.segments[-1] if t.segments else None
        fid = "-" if last is None else with_noise(last.fid, last.fid_std, len(last.values))
        mark = "WINNER" if t.trial_id == result.winner else ""
        print(
            f"  {t.trial_id}  step {t.step:>6}/{t.target_step:<6} FID {fid:<34} "
            f"{t.device_s:8.0f} {result.device_unit}-s  {o.status:<11} {mark}"
        )
    budget = f" of {result.budget_device_s:.0f}" if result.budget_device_s else ""
    print(f"spent: {result.spent_device_s:.0f}{budget} {result.device_unit}-seconds")
    if result.budget_note:
        print(f"stopped by the budget: {result.budget_note}")
    if result.confirmation is not None:
        print(f"winner confirmed at full n: FID {_fid(result.confirmation)}")
    if result.handoff:
        print(f"hand it to the nightly: {result.handoff}")
    print(f"report: {result.report_url}")


def main(argv: list[str] | None = None) -> int:
    setup_process()
    args = _parser().parse_args(argv)
    if args.verbose:  # Ray workers' own output too
        args.overrides = [*args.overrides, "ray.worker_logs=true"]
    if args.command == "sweep":  # -c is the sweep's YAML, not a pipeline config
        return _sweep(args)
    try:
        cfg = _load(args.command, args.config, args.overrides)
    except ConfigError as err:
        print(f"diffpipe: {err}", file=sys.stderr)
        return 2
    grid: list[dict[str, Any]] = []
    if args.command == "samplers":  # the values themselves, before anything starts
        grid = product_grid(args.samplers, args.steps, args.spacing, args.guidance)
        try:
            grid_configs(cfg.sample, grid or [{}])
        except ValueError as err:
            print(f"diffpipe samplers: {err}", file=sys.stderr)
            return 2
    if args.dry_run and args.command != "gc":
        print(to_yaml(cfg), end="")
        return 0
    _configure_logging(args.verbose)
    # What can be checked without Ray or Prefect fails here, in seconds: the store (bucket,
    # endpoint, credentials) and the dataset source.
    try:
        store = open_store(cfg.storage)
        if args.command in ("shard", "train", "nightly", "evaluate", "samplers", "ema"):
            check_source(cfg.data)
        if args.command == "ema":
            require_snapshots(store, cfg.train.run_id)
        if args.command in ("sample", "evaluate", "samplers"):
            latest = Checkpoint.require_latest(store, cfg.train.run_id)
            if args.command == "samplers":  # the grid against the model it samples
                grid_configs(
                    cfg.sample,
                    grid or [{}],
                    num_timesteps=latest.model.num_timesteps,
                    conditional=latest.unet.num_classes is not None,
                )
        if args.command == "nightly":  # its last stage reads the champion: a damaged one stops here
            read_champion(store, cfg.promote.model_name)
        if args.command in ("nightly", "train") and not args.wait:  # another writer of the run
            run_id = cfg.train.run_id
            refuse_if_held(store, layout.run_lease_prefix(run_id), f"run {run_id!r}")
    except (OSError, ValueError, RuntimeError) as err:
        print(f"diffpipe {args.command}: {describe_failure(err)}", file=sys.stderr)
        return 2
    if args.command == "gc":  # the store only, as promote
        try:
            return _gc(store, cfg, args.dry_run)
        except (OSError, ValueError, RuntimeError) as err:
            print(f"diffpipe gc: {describe_failure(err)}", file=sys.stderr)
            return 2
    if args.command == "promote":  # the store only: no Ray, no Prefect
        try:
            model = args.model or cfg.promote.model_name
            if not (args.rollback or args.repair):  # shows, writes nothing
                return _promote(store, model, args.rollback, args.repair)
            with model_lease(store, model, cfg.lease, command="promote", wait=args.wait):
                return _promote(store, model, args.rollback, args.repair)
        except (OSError, ValueError, RuntimeError) as err:  # RuntimeError: the lease is held
            print(f"diffpipe promote: {describe_failure(err)}", file=sys.stderr)
            return 2

    # From here on, services start: whatever they leave behind is ended when this process ends.
    start_watchdog()
    from flows import choose
    from flows import nightly as flows_mod

    if args.command == "serve":
        from flows.deploy import DEFAULT_CRON, serve_nightly

        serve_nightly(
            args.config,
            args.overrides,
            cron=args.cron or DEFAULT_CRON,
            name=args.name,
            limit=args.limit,
        )
        return 0
    wait = args.command in ("train", "nightly") and args.wait  # the commands with --wait
    flows: dict[str, Callable[..., BaseModel]] = {
        "shard": flows_mod.shard_flow,
        "train": functools.partial(flows_mod.train_flow, wait_for_lease=wait),
        "sample": flows_mod.sample_flow,
        "evaluate": flows_mod.evaluate_flow,
        "nightly": functools.partial(flows_mod.nightly, wait_for_lease=wait),
        "samplers": functools.partial(choose.sampler_flow, grid=grid or None),
    }
    if args.command == "ema":
        flows["ema"] = functools.partial(
            choose.ema_flow, sigma_rels=args.sigma_rels, step=args.step
        )
    flow = flows[args.command]
    started = time.perf_counter()
    try:
        result = flow(config_path=args.config, overrides=args.overrides)
    except Exception as err:  # noqa: BLE001 - every failure ends as one message and exit code 1
        print(f"diffpipe {args.command}: {describe_failure(err)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(err)
        else:
            print("(run again with -v for the full cause chain)", file=sys.stderr)
        return 1
    _print_result(result, time.perf_counter() - started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
