"""The training loop one DDP rank runs: stream its shards, step, average, checkpoint.

No Ray here: `tasks/train/stage.py` runs this under Ray Train's TorchTrainer, and tests run it in-process
with world size 1. A run resumes exactly: the model, EMA, optimizer and step come from the latest
checkpoint, and the data position, the noise and the dropout masks of a step are functions of
(seed, rank, step) alone, so N steps + resume + M steps equals N + M steps in one go.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from diffusion_core.ema import EMA
from diffusion_core.objectives import PredictionType, training_loss
from diffusion_core.perf import autocast
from diffusion_core.phema import PowerEMA
from diffusion_core.schedules import alpha_bar_from_betas, make_betas
from diffusion_core.unet import UNet, UNetConfig
from tasks import layout
from tasks.config import ConfigError, ModelConfig, PipelineConfig, TrainConfig
from tasks.records import Checkpoint, DatasetManifest, LogWindow, RecordFormatError, TrainResult
from tasks.runtime import temp_prefix
from tasks.storage import Store, open_store, sha256_bytes
from tasks.train.data import RankBatches, load_batches, to_device
from tasks.train.log import RunLog
from tasks.train.phema import snapshot_due, write_snapshots

log = logging.getLogger(__name__)
FUSED_ADAMW = ("cpu", "cuda")


def unet_config_for(model: ModelConfig, manifest: DatasetManifest) -> UNetConfig:
    """The network's shape comes from the data (size, channels, classes) and the model section."""
    return UNetConfig(
        in_channels=manifest.channels,
        image_size=manifest.image_size,
        base_channels=model.base_channels,
        channel_mult=tuple(model.channel_mult),
        num_res_blocks=model.num_res_blocks,
        attention_resolutions=tuple(model.attention_resolutions),
        dropout=model.dropout,
        num_classes=manifest.num_classes if model.class_conditional else None,
    )


def check_resume_compatible(latest: Checkpoint, model: ModelConfig, unet: UNetConfig) -> None:
    """A run resumes only with the network and diffusion process it was started with."""
    ours = {**dataclasses.asdict(unet), **model.model_dump()}
    theirs = {**dataclasses.asdict(latest.unet), **latest.model.model_dump()}
    differ = [
        f"{k}: {theirs[k]!r} in the run, {ours[k]!r} now" for k in ours if ours[k] != theirs[k]
    ]
    if differ:
        raise ValueError(
            f"run {latest.run_id!r} (at step {latest.step}) was trained with another network or "
            f"diffusion process, so it cannot resume with this config: {'; '.join(differ)}. "
            "Restore those settings, or start a new run with another train.run_id."
        )


# -- the loop -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainJob:
    """Everything a rank needs, picklable for Ray: the resolved config and the dataset manifest."""

    config: PipelineConfig  # resolved; saved in every checkpoint, so the artifact carries it
    target_step: int
    manifest: DatasetManifest
    # Local temporary folders are named with the driver's prefix, so that its watchdog removes
    # them even when a worker on its machine is killed.
    temp_prefix: str = dataclasses.field(default_factory=temp_prefix)

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def train(self) -> TrainConfig:
        return self.config.train


@dataclass
class _Window:
    """What one rank measures over one logging window."""

    start: float = dataclasses.field(default_factory=time.perf_counter)
    data_wait_s: float = 0.0  # blocked on the next batch (and its copy to the device)
    losses: list[torch.Tensor] = dataclasses.field(default_factory=list)
    grad_norms: list[torch.Tensor] = dataclasses.field(default_factory=list)

    def close(self, step: int, lr: float, batch_size: int, world_size: int) -> LogWindow:
        """The window averaged over all ranks (a collective: every rank calls it at `step`)."""
        seconds = max(time.perf_counter() - self.start, 1e-9)
        means = torch.stack(
            [
                torch.stack(self.losses).float().mean(),
                torch.tensor(self.data_wait_s / seconds, device=self.losses[0].device),
            ]
        )
        if world_size > 1:  # gloo has no AVG: sum, then divide
            dist.all_reduce(means)
            means /= world_size
        loss, data_wait = (float(v) for v in means)
        return LogWindow(
            step=step,
            loss=loss,
            lr=lr,
            images_per_s=len(self.losses) * batch_size * world_size / seconds,
            data_wait=data_wait,
            # Equal on every rank: DDP averaged the gradients before they were measured.
            grad_norm=float(torch.stack(self.grad_norms).float().mean()),
            seconds=seconds,
        )


def _lr_factor(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup else 1.0


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 7_919 + step) % (2**63)


class DivergedError(RuntimeError):
    """Training produced a non-finite loss or weights; nothing was saved from that point on."""


def _check_finite(
    losses: list[torch.Tensor], done: int, run_id: str, net: torch.nn.Module | None
) -> None:
    """Raise DivergedError naming the first step whose loss is not finite (the losses are those of
    steps done - len(losses) + 1 .. done), or when `net` holds a non-finite weight."""
    finite = torch.isfinite(torch.stack(losses)) if losses else torch.ones(0, dtype=torch.bool)
    bad = (~finite).nonzero()
    if len(bad):
        i = int(bad[0])
        step = done - len(losses) + i + 1
        raise DivergedError(
            f"training of run {run_id!r} diverged: the loss at step {step} is "
            f"{float(losses[i])}; no checkpoint was written after it, and the run's latest checkpoint "
            "is still the last good one. Lower train.lr, set train.grad_clip, or check the data."
        )
    if net is not None:
        for name, p in net.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise DivergedError(
                    f"training of run {run_id!r} diverged: weight {name} is not finite after step "
                    f"{done}; no checkpoint was written. Lower train.lr or set train.grad_clip."
                )


@dataclass
class TrainState:
    """What the steps change and a checkpoint holds: the network, its EMA and AdamW, with the
    learning-rate schedule that drives AdamW; on rank 0 the power EMAs of post-hoc EMA."""

    net: UNet
    model: Callable[..., torch.Tensor]  # `net` as a step calls it: DDP-wrapped, maybe compiled
    ema: EMA
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    phema: PowerEMA | None = None  # train.phema_sigma_rels, tracked where snapshots are written


def init_state(
    job: TrainJob,
    unet_cfg: UNetConfig,
    device: torch.device,
    start: bytes | None,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None,
    *,
    track_phema: bool = False,
) -> tuple[TrainState, int]:
    """Fresh weights (the same on every rank), or those of the checkpoint bytes `start`, with its
    EMA and optimizer; and the step they are at. `track_phema`: also the power EMAs of
    `train.phema_sigma_rels` (rank 0, which writes their snapshots)."""
    tc = job.train
    torch.manual_seed(tc.seed)  # identical initial weights on every rank
    net = UNet(unet_cfg).to(device)
    if tc.channels_last:
        net = net.to(memory_format=torch.channels_last)
    ema = EMA(net, decay=tc.ema_decay, warmup_steps=tc.ema_warmup_steps)
    # One fused kernel for all parameters (CPU and CUDA): the per-parameter loop of the default
    # implementation is a visible share of a small model's step.
    opt = torch.optim.AdamW(
        net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay, fused=device.type in FUSED_ADAMW
    )
    step = 0
    saved: dict[str, Any] = {}
    if start is not None:
        try:
            saved = load_checkpoint(start, map_location=device)
        except ValueError as err:  # refused by the weights-only loader: a restart meets it again
            raise RecordFormatError(
                f"run {tc.run_id!r} cannot resume: its latest checkpoint is refused: {err}. "
                f"Point {layout.latest_checkpoint(tc.run_id)} at an intact checkpoint"
            ) from None
        net.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        for group in opt.param_groups:  # the config's settings, not the checkpoint's, drive on
            group.update(initial_lr=tc.lr, weight_decay=tc.weight_decay)
        step = int(saved["step"])
    phema = _init_phema(tc, net, saved.get("phema"), step) if track_phema else None
    model: Callable[..., torch.Tensor] = wrap_model(net) if wrap_model else net
    if tc.compile:
        model = torch.compile(model)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, tc.warmup_steps), last_epoch=step - 1
    )
    return TrainState(net=net, model=model, ema=ema, opt=opt, sched=sched, phema=phema), step


def _init_phema(tc: TrainConfig, net: UNet, saved: Any, step: int) -> PowerEMA | None:
    """The power EMAs of `train.phema_sigma_rels`, resumed from a checkpoint's `saved` state."""
    if not tc.phema_sigma_rels:
        if saved:
            log.info("train.phema_sigma_rels is empty: the run's power EMAs are no longer kept")
        return None
    phema = PowerEMA(net.state_dict(), tc.phema_sigma_rels)
    if saved:
        if [float(s) for s in saved["sigma_rels"]] != phema.sigma_rels:
            raise ConfigError(
                f"run {tc.run_id!r} keeps power EMAs of sigma_rel {saved['sigma_rels']}; "
                f"train.phema_sigma_rels={list(tc.phema_sigma_rels)} now. Restore the setting, "
                "or start a new run with another train.run_id"
            )
        phema.load_state_dict(saved)
        assert phema.step == step, (phema.step, step)
    elif step > 0:
        # The average of steps 1..step is unknown: the weights of step `step` stand in for it
        # (the next update folds them in as an average of that age), which at step t misplaces
        # the profile's mass (step / t)^(gamma + 1).
        phema.step = step
        log.warning(
            "run %s resumes at step %d from a checkpoint without power EMAs: they start here, "
            "the weights of step %d standing in for all before",
            tc.run_id,
            step,
            step,
        )
    return phema


def train_step(
    state: TrainState,
    x0: torch.Tensor,
    labels: torch.Tensor,
    *,
    step: int,
    seed: int,
    alpha_bar: torch.Tensor,
    prediction_type: PredictionType,
    num_classes: int | None,
    tc: TrainConfig,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step at `step` on a batch: x0 float32 [B, C, H, W] in [-1, 1], labels
    int64 [B] (ignored when `num_classes` is None). `seed` draws everything random in it, so a
    resumed run repeats the step exactly. Returns the loss and the gradient norm, detached on the
    device (reading them would wait for a GPU)."""
    # 1. the batch in the network's memory format; the step's randomness
    if tc.channels_last:
        x0 = x0.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(seed)  # dropout masks
    gen = torch.Generator(device=x0.device).manual_seed(seed)  # timesteps, noise, label dropout
    # 2. the loss (DDPM's simple loss, optionally Min-SNR weighted)
    with autocast(x0.device, enabled=tc.bf16):
        loss = training_loss(
            state.model,
            x0,
            labels if num_classes is not None else None,
            alpha_bar=alpha_bar,
            prediction_type=prediction_type,
            generator=gen,
            min_snr_gamma=tc.min_snr_gamma,
            label_dropout=tc.label_dropout if num_classes is not None else 0.0,
            null_label=num_classes,
        )
    # 3. gradients (averaged over the ranks by DDP), clipped or only measured
    state.opt.zero_grad(set_to_none=True)
    loss.backward()
    params = list(state.net.parameters())
    if tc.grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip)
    else:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # 4. AdamW, the learning-rate schedule, the EMA
    state.opt.step()
    state.sched.step()
    state.ema.update(state.net, step)
    if state.phema is not None:
        state.phema.update(step + 1, state.net.state_dict())  # counts steps from 1
    return loss.detach(), grad_norm.detach()


def run_training(
    job: TrainJob,
    *,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | None = None,
    wrap_model: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
    report: Callable[[dict[str, float]], None] | None = None,
    newest: Callable[[], Checkpoint | None] | None = None,
    saved: Callable[[Checkpoint], None] | None = None,
    draining: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train up to `job.target_step`, resuming from the run's newest checkpoint (rank 0 saves).

    `newest` gives that checkpoint (default: read `latest.json`); under Ray the driver keeps it,
    told of each checkpoint by `saved`, so the stage reads `latest.json` once and a restarted
    worker group resumes from the newest one. `report` gets each logging window's LogWindow.

    `draining` says whether a node of the run is being drained for preemption (a spot reclaim
    with notice). It is a collective (the ranks must agree on the step of the checkpoint), so
    every rank asks it at the same steps: the end of each logging window, where the window's
    all-reduce already waits for all ranks, rather than each step (under Ray it is a round trip to
    an actor, milliseconds: dear for a step, nothing for a window). From the first yes on, rank 0
    saves a just-in-time checkpoint at the end of each window until the node goes, so losing it
    costs at most one window of steps."""
    device = device or torch.device("cpu")
    tc, store = job.train, open_store(job.config.storage)
    newest = newest or (lambda: Checkpoint.latest(store, tc.run_id))
    unet_cfg = unet_config_for(job.model, job.manifest)
    alpha_bar = alpha_bar_from_betas(make_betas(job.model.schedule, job.model.num_timesteps)).to(
        device
    )
    start = last = newest()
    if start is not None:
        check_resume_compatible(start, job.model, unet_cfg)
    state, start_step = init_state(
        job,
        unet_cfg,
        device,
        start.read_bytes(store) if start else None,
        wrap_model,
        track_phema=rank == 0,
    )
    if start is not None and rank == 0:
        log.info("resuming run %s from step %d (%s)", tc.run_id, start_step, store.url(start.key))

    data = load_batches(
        RankBatches(
            storage=job.config.storage,
            shards=job.manifest.split("train").shards,
            rank=rank,
            world_size=world_size,
            seed=tc.seed,
            shuffle_buffer=tc.shuffle_buffer,
            batch_size=tc.batch_size,
            channels=job.manifest.channels,
            start_step=start_step,
            hflip=job.config.data.hflip,
        ),
        tc.loader_processes,
        device,
    )
    run_log = (
        RunLog(store, tc.run_id, start_step, job.temp_prefix)
        if rank == 0 and start_step < job.target_step
        else None
    )
    window = _Window()
    last_loss: float | None = None
    drained = False  # a drain notice came: save at each window's end
    try:
        for step in range(start_step, job.target_step):
            waited = time.perf_counter()
            x0, labels = to_device(next(data), device)
            window.data_wait_s += time.perf_counter() - waited
            loss, grad_norm = train_step(
                state,
                x0,
                labels,
                step=step,
                seed=_step_seed(tc.seed, rank, step),
                alpha_bar=alpha_bar,
                prediction_type=job.model.prediction_type,
                num_classes=unet_cfg.num_classes,
                tc=tc,
            )
            window.losses.append(loss)
            window.grad_norms.append(grad_norm)

            done = step + 1
            log_now = done % tc.log_every == 0 or done == job.target_step
            if log_now and draining is not None and not drained and done < job.target_step:
                drained = draining()
                if drained and rank == 0:
                    log.warning(
                        "a node of run %s is being drained for preemption: checkpoint at step %d "
                        "and at each logging window until it goes",
                        tc.run_id,
                        done,
                    )
            save_now = rank == 0 and (
                done % tc.checkpoint_every == 0 or done == job.target_step or (drained and log_now)
            )
            snap_now = state.phema is not None and snapshot_due(
                done, job.target_step, tc.phema_interval
            )
            if log_now or save_now or snap_now:
                # Checked before anything is logged or saved: a diverged run never writes a
                # checkpoint.
                write = save_now or snap_now
                _check_finite(window.losses, done, tc.run_id, state.net if write else None)
            if log_now:
                logged = window.close(
                    done, float(state.sched.get_last_lr()[0]), tc.batch_size, world_size
                )
                window, last_loss = _Window(), logged.loss
                if rank == 0:
                    _log_window(logged, job.target_step, run_log)
                if report:
                    report(logged.model_dump())  # LogWindow's fields
            if snap_now:
                # Before the step's checkpoint: a run resumed from it never misses them.
                assert state.phema is not None
                write_snapshots(store, tc.run_id, state.phema, checkpoint_config(job, unet_cfg))
            if save_now:
                last = save_run_checkpoint(store, job, unet_cfg, state, done)
                if saved:
                    saved(last)
                if not job.config.evaluate.score_every:
                    # After `saved`: nobody resumes from a pruned one. Scored while training, the
                    # checkpoints are pruned once scored, the best kept (the stage's driver).
                    prune_checkpoints(store, tc)
                if run_log is not None:
                    run_log.publish()
    finally:
        data.close()  # stops the data workers
        if run_log is not None:
            run_log.close()
    if world_size > 1:
        dist.barrier()  # no rank returns before rank 0's last checkpoint is committed
        if rank != 0:
            last = newest()
    if last is None or last.step != job.target_step:
        raise RuntimeError(
            f"training of run {tc.run_id} ended without a checkpoint at step {job.target_step} "
            f"(latest: {last.step if last else None})"
        )
    return TrainResult(
        checkpoint=last,
        resumed_from=start_step if start is not None else None,
        trained_steps=job.target_step - start_step,
        loss=last_loss,
    )


def _log_window(window: LogWindow, target: int, run_log: RunLog | None) -> None:
    """Rank 0's record of a logging window: a log line, the history and TensorBoard."""
    log.info(
        "step %d/%d loss %.4f (%.0f img/s, data wait %.0f%%)",
        window.step,
        target,
        window.loss,
        window.images_per_s,
        100 * window.data_wait,
    )
    if run_log is not None:
        run_log.add(window)


def checkpoint_config(job: TrainJob, unet_cfg: UNetConfig) -> dict[str, Any]:
    """What a checkpoint (and a power-EMA snapshot) says of itself: plain JSON-able values, as
    torch.load(weights_only=True) requires."""
    manifest = job.manifest
    return {
        "unet": unet_cfg.to_dict(),
        "model": job.model.model_dump(mode="json"),
        "dataset": {
            "dataset": manifest.dataset,
            "fingerprint": manifest.fingerprint,
            "image_size": manifest.image_size,
            "channels": manifest.channels,
            "num_classes": manifest.num_classes,
        },
        "pipeline": job.config.model_dump(mode="json"),
    }


def save_run_checkpoint(
    store: Store, job: TrainJob, unet_cfg: UNetConfig, state: TrainState, step: int
) -> Checkpoint:
    """Checkpoint bytes first, then `latest.json`: a reader following latest never sees a partial one."""
    tc, manifest = job.train, job.manifest
    data = save_checkpoint(
        {
            "model": state.net.state_dict(),
            "ema": state.ema.state_dict(),
            "phema": state.phema.state_dict() if state.phema is not None else None,
            "optimizer": state.opt.state_dict(),
            "step": step,
            "config": checkpoint_config(job, unet_cfg),
        }
    )
    key = layout.checkpoint(tc.run_id, step)
    store.write_bytes(key, data)
    record = Checkpoint(
        run_id=tc.run_id,
        step=step,
        key=key,
        sha256=sha256_bytes(data),
        unet=unet_cfg,
        model=job.model,
        dataset_fingerprint=manifest.fingerprint,
    )
    record.write(store, layout.latest_checkpoint(tc.run_id))
    log.info("checkpoint step %d -> %s", step, store.url(key))
    return record


def prune_checkpoints(store: Store, tc: TrainConfig, keep: frozenset[str] = frozenset()) -> None:
    """Keep the run's newest `train.keep_checkpoints` checkpoints, and those whose keys are in
    `keep`."""
    kept = sorted(k for k in store.list(layout.checkpoints_prefix(tc.run_id)) if k.endswith(".pt"))
    for old in kept[: -tc.keep_checkpoints]:
        if old not in keep:
            store.delete(old)
