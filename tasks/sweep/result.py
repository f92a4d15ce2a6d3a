"""What a sweep's trials add up to (pure: no store, no Ray): the winner, the spread of FID over
training seeds beside the sampling noise, where the budget stopped the sweep, and the command
that hands the winning run to the nightly."""

from __future__ import annotations

import shlex
import statistics
from collections.abc import Sequence

from tasks.records import SeedSpread, TrialOutcome
from tasks.sweep.spec import SweepSpec, TrialPlan, as_override_text


def winner(outcomes: Sequence[TrialOutcome]) -> TrialOutcome | None:
    """The finished trial with the lowest final FID (ties: the cheaper one); None when no trial
    finished. Its FID won a contest among noisy scores: the flow confirms it on fresh seeds."""
    finished = [o for o in outcomes if o.status == "finished" and o.trial.segments]
    if not finished:
        return None
    return min(finished, key=lambda o: (o.trial.segments[-1].fid, o.trial.device_s))


def seed_spreads(outcomes: Sequence[TrialOutcome]) -> list[SeedSpread]:
    """For each setting, its training-seed repeats' FIDs at the last step all of them reached."""
    groups: dict[str, list[TrialOutcome]] = {}
    for o in outcomes:
        if o.trial.segments:
            groups.setdefault(o.trial.config_id, []).append(o)
    spreads = []
    for config_id, group in groups.items():
        step = min(o.trial.step for o in group)
        at = [s for o in group for s in o.trial.segments if s.step == step]
        fids = [s.fid for s in at]
        stds = [s.fid_std for s in at if s.fid_std is not None]
        spreads.append(
            SeedSpread(
                config_id=config_id,
                step=step,
                fids=fids,
                seed_std=statistics.stdev(fids) if len(fids) >= 2 else None,
                sampling_std=statistics.fmean(stds) if stds else None,
            )
        )
    return spreads


def budget_note(
    outcomes: Sequence[TrialOutcome],
    budget: float | None,
    spent: float,
    refused: tuple[str, int, float] | None,
    unit: str,
) -> str | None:
    """Where the budget stopped the sweep, in a sentence; None when it stopped nothing."""
    ended = [o for o in outcomes if o.status in ("budget", "not started")]
    if budget is None or not ended:
        return None
    stopped = [f"{o.trial.trial_id} at step {o.trial.step}" for o in ended if o.trial.segments]
    unstarted = [o.trial.trial_id for o in ended if not o.trial.segments]
    where = "; ".join(
        [f"stopped {', '.join(stopped)}"] * bool(stopped)
        + [f"not started: {', '.join(unstarted)}"] * bool(unstarted)
    )
    first = ""
    if refused is not None:
        trial, step, estimate = refused
        first = (
            f"; the first segment refused was {trial}'s to step {step} (estimated "
            f"{estimate:.0f} {unit}-s)"
        )
    over = (
        f" ({spent - budget:.0f} over: the first segment, measured alone)" if spent > budget else ""
    )
    return f"budget {budget:.0f} {unit}-seconds: {spent:.0f} spent{over}; {where}{first}"


def handoff_command(spec: SweepSpec, plan: TrialPlan) -> str:
    """`diffpipe nightly` continuing the winning run (its id, seed and settings): the nightly
    resumes it from its last checkpoint and trains on from there each night."""
    config = ["-c", spec.base.config] if spec.base.config else []
    overrides = {**spec.base.overrides, **plan.settings}
    words = [f"{k}={as_override_text(v)}" for k, v in overrides.items()]
    words += [f"train.run_id={plan.run_id}", f"train.seed={plan.seed}"]
    return shlex.join(["diffpipe", "nightly", *config, *words])
