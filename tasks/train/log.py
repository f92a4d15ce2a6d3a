"""Rank 0's record of a run's logging windows: `runs/<id>/logs/history.json` (a TrainHistory, which
the nightly report draws its loss curve from) and TensorBoard event files under
`runs/<id>/tensorboard/` (`tensorboard --logdir <storage.root>/runs/<id>/tensorboard`).

Both are published at every checkpoint and at the end, so they never run ahead of the checkpoint
a resume starts from. A resumed attempt drops the windows after its start step (those of the lost
attempt are replaced), and its event file purges them in TensorBoard's view (`purge_step`).
Event files are written locally by TensorBoard's own writer and uploaded whole, atomically.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from tasks import layout
from tasks.records import CheckpointScore, LogWindow, TrainHistory
from tasks.storage import Store

# TensorBoard tags of a window's fields.
SCALARS = {
    "loss": "train/loss",
    "lr": "train/lr",
    "images_per_s": "train/images_per_s",
    "data_wait": "train/data_wait_fraction",
    "grad_norm": "train/grad_norm",
}


class RunLog:
    """The windows of run `run_id`, kept by rank 0 from `start_step` on."""

    def __init__(self, store: Store, run_id: str, start_step: int, temp_prefix: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports TensorBoard: rank 0 only

        self.store, self.run_id = store, run_id
        prior = TrainHistory.read_or_none(store, layout.train_history(run_id))
        self.windows = [w for w in prior.windows if w.step <= start_step] if prior else []
        self.scores = [c for c in prior.scores if c.step <= start_step] if prior else []
        self._dir = Path(tempfile.mkdtemp(prefix=temp_prefix + "tb-"))
        # purge_step: TensorBoard hides the lost attempt's events after start_step.
        self._writer = SummaryWriter(
            str(self._dir), purge_step=start_step + 1 if start_step else None
        )

    def add(self, window: LogWindow) -> None:
        self.windows.append(window)
        for field, tag in SCALARS.items():
            value = getattr(window, field)
            if value is not None:
                self._writer.add_scalar(tag, value, window.step)

    def publish(self) -> None:
        """Upload the history and the event files as they are now (each object whole)."""
        self._writer.flush()
        for path in sorted(self._dir.iterdir()):
            self.store.write_bytes(
                layout.tensorboard_file(self.run_id, path.name), path.read_bytes()
            )
        TrainHistory(run_id=self.run_id, windows=self.windows, scores=self.scores).write(
            self.store, layout.train_history(self.run_id)
        )

    def close(self) -> None:
        self._writer.close()
        shutil.rmtree(self._dir, ignore_errors=True)


def publish_scores(
    store: Store, run_id: str, scores: list[CheckpointScore], temp_prefix: str
) -> None:
    """Add checkpoints scored while training ran to the run's history.json (replacing earlier
    scores of the same steps) and to TensorBoard (`eval/<metric>` and `eval/<metric>_std`, in an
    event file of their own). Called by the driver once training has ended: rank 0 no longer
    writes history.json then."""
    from torch.utils.tensorboard import SummaryWriter

    if not scores:
        return
    key = layout.train_history(run_id)
    prior = TrainHistory.read_or_none(store, key) or TrainHistory(run_id=run_id, windows=[])
    steps = {c.step for c in scores}
    merged = sorted([c for c in prior.scores if c.step not in steps] + scores, key=lambda c: c.step)
    prior.model_copy(update={"scores": merged}).write(store, key)
    folder = Path(tempfile.mkdtemp(prefix=temp_prefix + "tb-"))
    try:
        name = f".scores-{scores[0].step:08d}-{scores[-1].step:08d}"  # the steps it covers
        with SummaryWriter(str(folder), filename_suffix=name) as writer:
            for c in scores:
                writer.add_scalar(f"eval/{c.metric}", c.mean, c.step)
                if c.std is not None:
                    writer.add_scalar(f"eval/{c.metric}_std", c.std, c.step)
        for path in sorted(folder.iterdir()):
            store.write_bytes(layout.tensorboard_file(run_id, path.name), path.read_bytes())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
