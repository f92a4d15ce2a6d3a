"""Prefect flows composing the stages in `tasks/`: one flow per stage, `nightly` chaining them, the CLI.

No tensor maths here, and no side effects on import: process-wide settings are made by
`tasks.runtime.setup_process()`, which the CLI calls first.
"""
