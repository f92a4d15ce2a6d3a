"""The nightly deployment, and the sweep's.

`diffpipe serve` registers `nightly/nightly` with a cron schedule and `sweep/sweep` (on demand:
`prefect deployment run sweep/sweep --param sweep_path=...`) on the Prefect API ($PREFECT_API_URL)
and executes their runs itself. With a work pool and workers instead, the deployments are
infra/prefect.yaml, and `python -m flows.deploy automation` prepares the automation
that notifies on a failed nightly (infra/prefect-automation.yaml) for `prefect automation create`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

DEFAULT_CRON = "0 2 * * *"  # 02:00 UTC every night
DEPLOYMENT_NAME = "nightly"
SWEEP_DEPLOYMENT_NAME = "sweep"  # sweep_path given at each run
DEPLOYMENT_CONCURRENCY = 1  # the deployment's concurrency limit (infra/prefect.yaml's too)
AUTOMATION_FILE = Path(__file__).resolve().parents[1] / "infra" / "prefect-automation.yaml"
NOTIFY_PLACEHOLDER = "NOTIFY_BLOCK_ID"


def serve_nightly(
    config_path: str | None,
    overrides: list[str],
    *,
    cron: str | None = DEFAULT_CRON,
    name: str = DEPLOYMENT_NAME,
    limit: int | None = None,
) -> None:
    """Serve the nightly and the sweep deployments (`served_deployments`) until interrupted."""
    from prefect import serve

    serve(*served_deployments(config_path, overrides, cron=cron, name=name), limit=limit)


def served_deployments(
    config_path: str | None,
    overrides: list[str],
    *,
    cron: str | None = DEFAULT_CRON,
    name: str = DEPLOYMENT_NAME,
) -> list[Any]:  # RunnerDeployments (`to_deployment` is typed as maybe a coroutine)
    """`nightly/<name>` on `cron`, and the sweep's, run on demand: `sweep/sweep` beside the default
    name, else `sweep/<name>`, so that a pair served under another name replaces neither of
    infra/prefect.yaml's deployments."""
    # The flows' imports (torch, Ray) only where they are served.
    from flows.nightly import nightly
    from flows.sweep import sweep_flow

    return [
        nightly.to_deployment(
            name=name,
            cron=cron,
            parameters={"config_path": config_path, "overrides": overrides},
            description="Retrain (continue the run), sample, evaluate; promote the model only when better.",
            tags=["diffusion", "nightly"],
            # One run of the deployment at a time; a second waits its turn (Prefect's default
            # collision strategy, ENQUEUE). The run's lease (tasks.lease) guards runs from elsewhere.
            concurrency_limit=DEPLOYMENT_CONCURRENCY,
        ),
        sweep_flow.to_deployment(
            name=SWEEP_DEPLOYMENT_NAME if name == DEPLOYMENT_NAME else name,
            description="Train trials of a sweep in segments under Ray Tune; confirm and report "
            "the winner.",
            tags=["diffusion", "sweep"],
            # One sweep at a time: two would fight over the cluster's devices.
            concurrency_limit=1,
        ),
    ]


def _notification_block_id(notify: str) -> str:
    """The id of the notification block `notify` ("<block type slug>/<block name>", e.g.
    "slack-webhook/nightly-alerts") on the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    from prefect.settings import PREFECT_API_URL

    block_type, sep, block_name = notify.partition("/")
    if not sep or not block_type or not block_name:
        raise ValueError(
            f"--notify {notify!r}: give the notification block as <block type slug>/<block name>, "
            "e.g. slack-webhook/nightly-alerts (`prefect block ls` lists them)"
        )
    with get_client(sync_client=True) as client:
        try:
            block = client.read_block_document_by_name(
                block_name, block_type, include_secrets=False
            )
        except ObjectNotFound:
            raise ValueError(
                f"no notification block {notify!r} on the Prefect API at "
                f"{PREFECT_API_URL.value() or '(ephemeral)'}: create it first (Prefect's UI: "
                "Blocks, or e.g. `SlackWebhook(url=...).save('nightly-alerts')`), or check "
                "`prefect block ls`"
            ) from None
    return str(block.id)


def automation_spec(notify: str, path: Path = AUTOMATION_FILE) -> dict[str, Any]:
    """The automation in `path` with its notification actions sent through the block `notify`,
    checked against Prefect's automation schema."""
    from prefect.events.schemas.automations import AutomationCore

    spec: dict[str, Any] = yaml.safe_load(path.read_text())
    block_id = _notification_block_id(notify)
    for action in spec.get("actions", []):
        if action.get("block_document_id") == NOTIFY_PLACEHOLDER:
            action["block_document_id"] = block_id
    AutomationCore.model_validate(spec)
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m flows.deploy",
        description="Prepare the Prefect objects of the nightly deployment.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    auto = sub.add_parser(
        "automation",
        help="print the failed-nightly automation, ready for `prefect automation create --from-file`",
    )
    auto.add_argument(
        "--notify",
        required=True,
        metavar="TYPE/NAME",
        help="the notification block to send through, e.g. slack-webhook/nightly-alerts",
    )
    auto.add_argument("--file", type=Path, default=AUTOMATION_FILE, help="the automation YAML")
    args = parser.parse_args(argv)
    try:
        spec = automation_spec(args.notify, args.file)
    except (OSError, ValueError) as err:
        print(f"python -m flows.deploy automation: {err}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(spec, sort_keys=False), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
