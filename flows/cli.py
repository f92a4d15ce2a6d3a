"""`diffpipe`: one subcommand per stage, `nightly` for the whole chain, `serve` for the deployment.

diffpipe nightly [-c config.yaml] [section.field=value ...] [--dry-run]
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from pydantic import BaseModel

from tasks.config import ConfigError, load_config, to_yaml
from tasks.records import Evaluation, NightlySummary, SampleSet, ShardResult, TrainResult
from tasks.runtime import setup_process

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


def main(argv: list[str] | None = None) -> int:
    setup_process()
    args = _parser().parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"diffpipe: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)

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
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"diffpipe {args.command}: {err}", file=sys.stderr)
        return 1
    _print_result(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
