"""`diffpipe`: one subcommand per stage, `nightly` for the whole chain, `serve` for the deployment.

diffpipe nightly [-c config.yaml] [section.field=value ...] [--dry-run]
diffpipe promote [--rollback] [--model NAME]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from collections.abc import Callable

from pydantic import BaseModel

from flows.watchdog import start_watchdog
from tasks import layout
from tasks.config import ConfigError, load_config, to_yaml
from tasks.errors import describe_failure
from tasks.records import (
    Champion,
    Checkpoint,
    Evaluation,
    Metrics,
    NightlySummary,
    PromotionHistory,
    SampleSet,
    ShardResult,
    TrainResult,
)
from tasks.runtime import setup_process
from tasks.shard.datasets import check_source
from tasks.storage import Store, open_store

STAGES = {
    "shard": "shard the dataset into WebDataset tars with a manifest (reused when unchanged)",
    "train": "train (or resume) the denoiser with Ray Train DDP",
    "sample": "sample images from the run's latest checkpoint with Ray tasks",
    "evaluate": "compute FID/KID/IS of the latest sample set against the held-out split",
    "nightly": "shard -> train (continue) -> sample -> evaluate -> promote if better -> report",
    "promote": "show the promoted model and its recent nights; --rollback restores the previous one",
    "serve": "register the nightly deployment (cron) with the Prefect API and run its flow runs",
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
        p.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="also show Ray's and Prefect's own logs and a failure's full cause chain",
        )
        if name == "promote":
            p.add_argument(
                "--rollback",
                action="store_true",
                help="put the previous champion back in place (recorded in the history)",
            )
            p.add_argument("--model", default=None, help="model name (default: promote.model_name)")
        if name == "serve":
            p.add_argument("--cron", default=None, help="schedule (default: 0 2 * * *, 02:00 UTC)")
            p.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
            p.add_argument("--limit", type=int, default=None, help="max concurrent runs")
    return parser


def _fid(m: Metrics) -> str:
    """'0.0903 ± 0.0021 (std over k=3 repeats of 256 samples' or '0.0903 (noise not measured, ...'
    (the caller closes the parenthesis)."""
    if m.fid is None:
        return "n/a ("
    if m.fid_std is None or m.repeats < 2:
        return (
            f"{m.fid:.4f} (noise not measured: k=1, set evaluate.repeats >= 2; "
            f"{m.num_images} samples"
        )
    return (
        f"{m.fid:.4f} ± {m.fid_std:.4f} (std over k={m.repeats} repeats of {m.num_images} samples"
    )


def _print_summary(result: NightlySummary, seconds: float | None) -> None:
    """What ran (and what was reused), where the report is, FID with its noise, the decision."""
    m, d = result.metrics, result.promotion
    took = "" if seconds is None else f" in {seconds:.0f} s"
    print(f"\nnightly run {result.run_id!r}, night {result.stamp}: done{took}")
    for s in result.stages:
        reused = "reused" if s.reused else ""
        print(f"  {s.name:<9}{s.seconds:7.1f} s  {reused:<7} {s.detail}")
    print(f"report: {result.report_url}")
    print(f"FID: {_fid(m)} vs {m.num_reference_images} held-out images; {m.extractor.label})")
    print(f"promotion: {'PROMOTED' if d.promoted else 'not promoted'}: {d.reason}")


def _print_result(result: BaseModel, seconds: float | None = None) -> None:
    if isinstance(result, NightlySummary):
        _print_summary(result, seconds)
    elif isinstance(result, Evaluation):
        m = result.metrics
        print(f"FID: {'n/a' if m.fid is None else f'{m.fid:.4f}'} ({m.extractor.label})")
        print(f"report: {m.report_key}")
    elif isinstance(result, ShardResult):
        print(f"manifest: {result.manifest.key} ({'reused' if result.reused else 'written'})")
    elif isinstance(result, TrainResult):
        print(f"checkpoint: {result.checkpoint.key} (step {result.checkpoint.step})")
    elif isinstance(result, SampleSet):
        print(f"samples: {result.key} ({result.num_images} images)")


def _promote(store: Store, model_name: str, rollback: bool) -> int:
    """`diffpipe promote`: the champion and the recent nights; `--rollback` restores the previous."""
    from tasks.promote.stage import rollback as roll_back

    layout.part(model_name, "model name")
    if rollback:
        event = roll_back(store, model_name)
        print(
            f"model {model_name!r}: rolled back from step {event.from_step} to step "
            f"{event.to_step} ({store.url(layout.model_current(model_name))}; recorded in "
            f"{store.url(layout.model_history(model_name))})"
        )
        return 0
    champion = Champion.read_or_none(store, layout.model_current(model_name))
    if champion is None:
        print(f"model {model_name!r}: nothing promoted yet")
        return 0
    m = champion.metrics
    print(
        f"model {model_name!r}: step {champion.step} of run {m.run_id!r}, promoted "
        f"{champion.promoted_at} (night {champion.night or '-'}), FID {_fid(m)})"
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


def main(argv: list[str] | None = None) -> int:
    setup_process()
    args = _parser().parse_args(argv)
    if args.verbose:  # Ray workers' own output too
        args.overrides = [*args.overrides, "ray.worker_logs=true"]
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"diffpipe: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    _configure_logging(args.verbose)
    # What can be checked without Ray or Prefect fails here, in seconds: the store (bucket,
    # endpoint, credentials) and the dataset source.
    try:
        store = open_store(cfg.storage)
        if args.command in ("shard", "train", "nightly", "evaluate"):
            check_source(cfg.data)
        if args.command in ("sample", "evaluate"):
            Checkpoint.require_latest(store, cfg.train.run_id)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"diffpipe {args.command}: {describe_failure(err)}", file=sys.stderr)
        return 2
    if args.command == "promote":  # the store only: no Ray, no Prefect
        try:
            return _promote(store, args.model or cfg.promote.model_name, args.rollback)
        except (OSError, ValueError) as err:
            print(f"diffpipe promote: {describe_failure(err)}", file=sys.stderr)
            return 2

    # From here on, services start: whatever they leave behind is ended when this process ends.
    start_watchdog()
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
    flows: dict[str, Callable[..., BaseModel]] = {
        "shard": flows_mod.shard_flow,
        "train": flows_mod.train_flow,
        "sample": flows_mod.sample_flow,
        "evaluate": flows_mod.evaluate_flow,
        "nightly": flows_mod.nightly,
    }
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
