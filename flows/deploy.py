"""The nightly deployment: `diffpipe serve` registers `nightly/nightly` with a cron schedule on the
Prefect API ($PREFECT_API_URL) and executes its runs, e.g. those started by
`prefect deployment run nightly/nightly`. For work pools and workers see infra/prefect.yaml."""

from __future__ import annotations

from flows.nightly import nightly

DEFAULT_CRON = "0 2 * * *"  # 02:00 UTC every night
DEPLOYMENT_NAME = "nightly"


def serve_nightly(
    config_path: str | None,
    overrides: list[str],
    *,
    cron: str | None = DEFAULT_CRON,
    name: str = DEPLOYMENT_NAME,
    limit: int | None = None,
) -> None:
    nightly.serve(
        name=name,
        cron=cron,
        parameters={"config_path": config_path, "overrides": overrides},
        description="Retrain (continue the run), sample, evaluate; promote the model only when better.",
        tags=["diffusion", "nightly"],
        limit=limit,
    )
