"""Post-hoc EMA (EDM2: Karras et al. 2024, Sec. 3): what training keeps of its power-function
EMAs, the rebuild of an EMA of any width from them after training, and the choice among widths.

Training (rank 0) tracks a `PowerEMA` of the widths `train.phema_sigma_rels` and every
`train.phema_every` steps writes each average as a snapshot (`layout.phema_snapshot`): a
weights-only checkpoint object whose `extra` names its width. `rebuild_ema` solves EDM2's least
squares for each target (`diffusion_core.phema.solve_coefficients`) and adds the snapshots up one
at a time, so it holds one snapshot and the targets' sums, never the run's whole history (60
snapshots of a 50M-parameter network would be 12 GB).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import torch

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from diffusion_core.phema import PowerEMA, sigma_rel_to_gamma, solve_coefficients
from diffusion_core.unet import UNet, UNetConfig
from tasks import layout
from tasks.compare import Candidate, choose
from tasks.config import ModelConfig, TrainConfig, check_sigma_rels
from tasks.records import (
    Checkpoint,
    EmaCandidate,
    EmaChoice,
    Metrics,
    RebuiltEma,
    RecordFormatError,
)
from tasks.storage import Store, sha256_bytes

log = logging.getLogger(__name__)


# -- during training -----------------------------------------------------------------------------
def snapshot_due(done: int, target: int, every: int) -> bool:
    """Whether the snapshots are written after step `done`: every `every` steps, and at the run's
    last step (so an EMA can be rebuilt exactly at the newest checkpoint)."""
    return done % every == 0 or done == target


def snapshot_bytes(unet: UNetConfig) -> int:
    """Bytes of one snapshot's tensors: the network's, floating ones kept in float32 or wider."""
    with torch.device("meta"):  # shapes and dtypes only: nothing is allocated
        net = UNet(unet)
    return sum(
        t.numel() * (max(t.element_size(), 4) if t.is_floating_point() else t.element_size())
        for t in net.state_dict().values()
    )


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


def storage_cost(tc: TrainConfig, unet: UNetConfig, start: int, target: int) -> str:
    """What the snapshots of steps start+1..target add to the store, as the driver logs it."""
    per, profiles, every = snapshot_bytes(unet), len(tc.phema_sigma_rels), tc.phema_interval
    count = sum(snapshot_due(s, target, every) for s in range(start + 1, target + 1))
    widths = ", ".join(f"{s:g}" for s in tc.phema_sigma_rels)
    return (
        f"post-hoc EMA: {profiles} snapshot(s) (sigma_rel {widths}) of {_size(per)} every {every} "
        f"steps = {_size(profiles * per)} per {every} steps; {count * profiles} snapshots = "
        f"{_size(count * profiles * per)} for steps {start}..{target} (never pruned)"
    )


def write_snapshots(store: Store, run_id: str, phema: PowerEMA, config: dict[str, Any]) -> None:
    """One snapshot per tracked width after step `phema.step`, each a weights-only checkpoint
    object (the run's `config` inside, its width in `extra`), written atomically."""
    for sigma_rel, (step, gamma, tensors) in zip(phema.sigma_rels, phema.snapshot(), strict=True):
        data = save_checkpoint(
            {
                "model": {name: t.cpu() for name, t in tensors.items()},
                "step": step,
                "config": config,
                "extra": {"phema": {"sigma_rel": sigma_rel, "gamma": gamma}},
            }
        )
        store.write_bytes(layout.phema_snapshot(run_id, sigma_rel, step), data)


# -- after training: rebuild -------------------------------------------------------------------
class Snapshot(NamedTuple):
    sigma_rel: float
    step: int
    key: str


def list_snapshots(store: Store, run_id: str) -> list[Snapshot]:
    """The run's snapshots, by step then width."""
    found = []
    for key in store.list(layout.phema_snapshots_prefix(run_id)):
        parsed = layout.phema_snapshot_of(run_id, key)
        if parsed is not None:
            found.append(Snapshot(parsed[0], parsed[1], key))
    return sorted(found, key=lambda s: (s.step, s.sigma_rel))


def require_snapshots(store: Store, run_id: str) -> list[Snapshot]:
    snapshots = list_snapshots(store, run_id)
    if not snapshots:
        raise FileNotFoundError(
            f"run {run_id!r} has no power-EMA snapshots under "
            f"{store.url(layout.phema_snapshots_prefix(run_id))}: train it with "
            "train.phema_sigma_rels=[0.05,0.1] (EDM2's two widths) to keep them"
        )
    return snapshots


def rebuild_ema(
    store: Store, run_id: str, sigma_rels: Sequence[float], step: int | None = None
) -> RebuiltEma:
    """The power-function EMA of each width in `sigma_rels` at `step` (default: the newest
    snapshot's), from the run's snapshots at or before it (EDM2 Algorithm 3).

    Each is written as a checkpoint (`layout.phema_rebuilt`) whose EMA slot holds it, so sampling
    with `sample.use_ema=true` samples it (its raw slot holds it too: no raw weights belong to
    it), with its `Checkpoint` record beside it."""
    targets = check_sigma_rels(sigma_rels, "sigma_rels")
    snapshots = require_snapshots(store, run_id)
    newest_step = snapshots[-1].step
    step = newest_step if step is None else step
    if step > newest_step:
        raise ValueError(
            f"run {run_id!r} has power-EMA snapshots up to step {newest_step}, not {step}: the "
            f"weights after step {newest_step} are in none of them; rebuild at step "
            f"{newest_step} or earlier"
        )
    # In the order `diffusion_core.phema.reconstruct` sums them: by step, then exponent.
    used = sorted(
        (s for s in snapshots if s.step <= step),
        key=lambda s: (s.step, sigma_rel_to_gamma(s.sigma_rel)),
    )
    if not used:
        raise ValueError(
            f"run {run_id!r} has no power-EMA snapshot at or before step {step}: its snapshots "
            f"are at steps {snapshots[0].step}..{snapshots[-1].step}"
        )
    steps, gammas = [s.step for s in used], [sigma_rel_to_gamma(s.sigma_rel) for s in used]
    coefficients = {
        t: solve_coefficients(steps, gammas, step, sigma_rel_to_gamma(t)) for t in targets
    }
    # 1. sum_i x_i * snapshot_i per target, in float64 (the x_i are large, of both signs).
    sums: dict[float, dict[str, torch.Tensor]] = {t: {} for t in targets}
    newest: dict[str, Any] = {}
    for i, snapshot in enumerate(used):
        newest = _read_snapshot(store, snapshot, newest)
        for t in targets:
            for name, w in newest["model"].items():
                if w.is_floating_point():
                    acc = sums[t].setdefault(name, torch.zeros(w.shape, dtype=torch.float64))
                    acc.add_(w.to(torch.float64), alpha=coefficients[t][i])
    # 2. each as a checkpoint: floats in the snapshots' precision, counters from the newest.
    config = newest["config"]
    checkpoints = []
    for t in targets:
        weights = {
            name: sums[t][name].to(torch.promote_types(w.dtype, torch.float32))
            if w.is_floating_point()
            else w.clone()
            for name, w in newest["model"].items()
        }
        data = save_checkpoint(
            {
                "model": weights,
                "ema": {"model": weights},
                "step": step,
                "config": config,
                "extra": {
                    "phema": {
                        "sigma_rel": t,
                        "snapshots": [s.key for s in used],
                        "coefficients": coefficients[t],
                    }
                },
            }
        )
        key = layout.phema_rebuilt(run_id, t, step)
        store.write_bytes(key, data)
        record = Checkpoint(
            run_id=run_id,
            step=step,
            key=key,
            sha256=sha256_bytes(data),
            unet=UNetConfig.from_dict(config["unet"]),
            model=ModelConfig.model_validate(config["model"]),
            dataset_fingerprint=config["dataset"]["fingerprint"],
            phema_sigma_rel=t,
        )
        record.write(store, layout.phema_rebuilt_record(run_id, t, step))
        checkpoints.append(record)
        log.info(
            "rebuilt the EMA of sigma_rel %g at step %d from %d snapshots -> %s",
            t,
            step,
            len(used),
            store.url(key),
        )
    return RebuiltEma(
        run_id=run_id,
        step=step,
        checkpoints=checkpoints,
        snapshot_sigma_rels=sorted({s.sigma_rel for s in used}),
        snapshot_steps=sorted({s.step for s in used}),
    )


def _read_snapshot(store: Store, snapshot: Snapshot, previous: dict[str, Any]) -> dict[str, Any]:
    """A snapshot's state, checked against its key and against the tensors of the one before."""
    state = load_checkpoint(store.read_bytes(snapshot.key))
    meta = state["extra"].get("phema", {})
    if state["step"] != snapshot.step or meta.get("sigma_rel") != snapshot.sigma_rel:
        raise RecordFormatError(
            f"{store.url(snapshot.key)} holds the power EMA of sigma_rel "
            f"{meta.get('sigma_rel')!r} at step {state['step']}, not what its key names; it was "
            "moved or damaged: delete it and rebuild without it"
        )
    if previous and set(previous["model"]) != set(state["model"]):
        raise RecordFormatError(
            f"{store.url(snapshot.key)} holds other tensors than the snapshots before it: was "
            "the run restarted with another network under the same train.run_id?"
        )
    return state


# -- after training: the choice ------------------------------------------------------------------
def choose_ema_length(
    rebuilt: RebuiltEma,
    evaluations: Sequence[Metrics],
    alpha: float,
    stamp: str,
    report_url: str,
) -> EmaChoice:
    """The width with the lowest mean FID over the shared seed ranges, and those a one-sided
    paired t-test at `alpha` cannot call worse than it (`tasks.compare.choose`; every width
    costs the same to sample). An evaluation whose scores are not trusted is left out.
    `report_url`: where the report of `stamp` will be (`layout.ema_choice_report_html`)."""
    pairs = list(zip(rebuilt.checkpoints, evaluations, strict=True))
    ranges = {tuple(tuple(r) for r in m.seed_ranges) for m in evaluations}
    if len(ranges) != 1:
        raise ValueError(f"the rebuilt EMAs were scored on different seed ranges: {ranges}")
    candidates, scored = [], []
    for checkpoint, m in pairs:
        assert checkpoint.phema_sigma_rel is not None
        values = m.values("fid")
        problems = list(m.problems)
        if not values or not all(math.isfinite(v) for v in values):
            problems.append(f"FID {values or 'missing'}")
        if not problems:
            candidates.append(Candidate(name=repr(checkpoint.phema_sigma_rel), values=values))
        scored.append((checkpoint.phema_sigma_rel, m, problems))
    if not candidates:
        raise ValueError(
            "no rebuilt EMA has a trustworthy FID: "
            + "; ".join(f"sigma_rel {s:g}: {', '.join(p)}" for s, _, p in scored)
        )
    choice = choose(candidates, alpha)
    within = {float(c.name) for c in choice.within_noise}
    first = evaluations[0]
    return EmaChoice(
        run_id=rebuilt.run_id,
        step=rebuilt.step,
        stamp=stamp,
        alpha=alpha,
        candidates=[
            EmaCandidate(
                sigma_rel=sigma_rel,
                checkpoint_key=m.checkpoint_key,
                metrics_key=m.key,
                fids=m.values("fid"),
                fid=m.fid,
                fid_std=m.fid_std,
                within_noise=sigma_rel in within,
                problems=problems,
            )
            for sigma_rel, m, problems in scored
        ],
        best=float(choice.best.name),
        chosen=float(choice.chosen.name),
        snapshot_sigma_rels=rebuilt.snapshot_sigma_rels,
        snapshot_steps=rebuilt.snapshot_steps,
        sampling=first.sampling,
        num_images=first.num_images,
        repeats=first.repeats,
        seed_ranges=first.seed_ranges,
        num_reference_images=first.num_reference_images,
        extractor=first.extractor,
        report_url=report_url,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )
