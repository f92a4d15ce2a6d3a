"""`diffpipe`: one subcommand per stage, `nightly` for the whole chain, `serve` for the deployment.

diffpipe nightly [-c config.yaml] [section.field=value ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from pydantic import BaseModel

from flows.watchdog import start_watchdog
from tasks.config import ConfigError, load_config, to_yaml
from tasks.datasets import check_source
from tasks.errors import describe_failure
from tasks.records import (
    Checkpoint,
    Evaluation,
    NightlySummary,
    SampleSet,
    ShardResult,
    TrainResult,
)
from tasks.runtime import setup_process
from tasks.storage import open_store

STAGES = {
    "shard": "shard the dataset into WebDataset tars with a manifest (reused when unchanged)",
    "train": "train (or resume) the denoiser with Ray Train DDP",
    "sample": "sample images from the run's latest checkpoint with Ray tasks",
    "evaluate": "compute FID/KID/IS of the latest sample set against the held-out split",
    "nightly": "shard -> train (continue) -> sample -> evaluate -> promote if better -> report",
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
        if name == "serve":
            p.add_argument("--cron", default=None, help="schedule (default: 0 2 * * *, 02:00 UTC)")
            p.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
            p.add_argument("--limit", type=int, default=None, help="max concurrent runs")
    return parser


def _print_result(result: BaseModel) -> None:
    if isinstance(result, NightlySummary):
        m, d = result.metrics, result.promotion
        fid = "n/a" if m.fid is None else f"{m.fid:.4f}"
        print(f"report: {result.report_url}")
        print(
            f"FID: {fid} ({m.extractor.label}; {m.num_images} samples vs {m.num_reference_images} held-out images)"
        )
        print(f"promotion: {'PROMOTED' if d.promoted else 'not promoted'} ({d.reason})")
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


class _Quiet(logging.Filter):
    """Default console: our progress lines, warnings of every layer, no tracebacks (the CLI prints
    a failure once, at the end) and none of Prefect's own reports of that same failure."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("prefect") and (
            record.levelno >= logging.ERROR
            or any(
                s in record.getMessage() for s in ("Failed(", "Crashed(", "failed with exception")
            )
        ):
            return False
        record.exc_info, record.exc_text = None, None
        return True


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if not verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(_Quiet())
        logging.getLogger("ray").setLevel(logging.ERROR)


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
    try:
        result = flow(config_path=args.config, overrides=args.overrides)
    except Exception as err:  # noqa: BLE001 - every failure ends as one message and exit code 1
        print(f"diffpipe {args.command}: {describe_failure(err)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(err)
        else:
            print("(run again with -v for the full cause chain)", file=sys.stderr)
        return 1
    _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
