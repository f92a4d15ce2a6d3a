"""Prefect flows composing the stages in `tasks/`: one flow per stage, `nightly` chaining them, the CLI.

No tensor maths here. Our modules log through the standard `logging` package; Prefect forwards
those loggers to the run logs (PREFECT_LOGGING_EXTRA_LOGGERS), set before Prefect is imported.
"""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tasks,flows")
# The embedded default runs on Prefect's ephemeral API; on a busy 2-core machine its start can take
# longer than Prefect's 20 s default.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
# Under `uv run`, Ray would otherwise start every worker with `uv run` in a copy of the working
# directory (a fresh environment per job); our workers use this interpreter and its packages.
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
