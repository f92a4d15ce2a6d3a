"""Checkpoints scored while training runs (`evaluate.score_every`), and the night's challenger
chosen by those scores.

Each chosen checkpoint is sampled and scored as the nightly scores its model (the sample and
evaluate stages, the same reference statistics), but small (`evaluate.score_images` images on
`evaluate.score_repeats` seed ranges) and on one sampling and one feature worker of its own, in a
thread of the train stage's driver, while the ranks go on training. Ray Train's ValidationConfig
(alpha in 2.60) scores the checkpoints Ray Train itself stores; this pipeline's checkpoints live
in its own store (exact resume from `latest.json` on any cluster), so the driver hands them to
the stages instead.

The best-scored checkpoint has won a contest among noisy scores: its score is biased low (the
winner's curse). The nightly therefore confirms it: it samples and scores the winner again at full
n on the evaluation's own seed ranges, which the selection never saw (the config refuses
overlapping ranges), and only that confirmed score meets the promotion gate.
"""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from tasks.config import PipelineConfig
from tasks.evaluate.stage import evaluate
from tasks.records import Checkpoint, CheckpointScore, DatasetManifest, MetricSample, TrainResult
from tasks.runtime import temp_prefix
from tasks.sample.stage import sample_images
from tasks.storage import open_store
from tasks.train.log import publish_scores
from tasks.train.loop import prune_checkpoints

log = logging.getLogger(__name__)


def scored(step: int, cfg: PipelineConfig, last: bool) -> bool:
    """Whether the checkpoint of `step` is scored: every `evaluate.score_every`-th checkpoint
    (checkpoints are `train.checkpoint_every` steps apart) and the stage's last."""
    every, interval = cfg.evaluate.score_every, cfg.train.checkpoint_every
    if not every:
        return False
    # A just-in-time checkpoint (a spot drain's) falls between the intervals: not scored.
    return last or (step % interval == 0 and (step // interval) % every == 0)


class CheckpointScorer:
    """Scores the checkpoints it is given, one at a time, in a thread of its own (a with-block)."""

    def __init__(self, cfg: PipelineConfig, dataset: DatasetManifest) -> None:
        e = cfg.evaluate
        self.cfg, self.dataset, self.store = cfg, dataset, open_store(cfg.storage)
        # Small sets on fresh seeds, one worker each: training keeps the rest of the cluster.
        self.sample_cfg = cfg.sample.model_copy(
            update={"num_images": e.score_images, "seed_start": e.score_seed_start, "workers": 1}
        )
        self.eval_cfg = e.model_copy(update={"repeats": e.score_repeats, "workers": 1})
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="score-checkpoints")
        self._scoring: dict[int, tuple[Checkpoint, Future[CheckpointScore]]] = {}

    def __enter__(self) -> CheckpointScorer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None
    ) -> None:
        for _, future in self._scoring.values():
            future.cancel()  # a failed stage does not wait for scores nobody reads
        self._pool.shutdown(wait=True)

    def submit(self, checkpoint: Checkpoint, last: bool) -> None:
        """Score `checkpoint` if it is one of those scored (`last`: the stage's final one, always
        scored), once per step: a worker group restarted after a failure saves the same steps
        again, with the same bytes."""
        if checkpoint.step in self._scoring or not scored(checkpoint.step, self.cfg, last):
            return
        self._scoring[checkpoint.step] = (checkpoint, self._pool.submit(self._score, checkpoint))

    def _score(self, checkpoint: Checkpoint) -> CheckpointScore:
        samples = sample_images(
            self.store, self.sample_cfg, self.cfg.ray, checkpoint, repeats=self.eval_cfg.repeats
        )
        m = evaluate(self.store, self.eval_cfg, self.cfg.ray, self.dataset, samples)
        metric = self.cfg.promote.metric
        s = MetricSample.of(m, metric)
        if s is None:
            raise ValueError(
                f"scoring during training needs {metric} (promote.metric) in evaluate.metrics, "
                f"which is {list(self.eval_cfg.metrics)}"
            )
        score = CheckpointScore(
            step=checkpoint.step,
            metric=metric,
            mean=s.mean,
            std=s.std,
            values=s.values,
            num_images=m.num_images,
            metrics_key=m.key,
        )
        log.info("scored while training: step %d  %s %s", score.step, metric, score.describe())
        return score

    def finish(self, trained: TrainResult) -> TrainResult:
        """Wait for the scores; record them (history.json, TensorBoard); prune the checkpoints
        kept for scoring, the best one kept; return `trained` with its scores and best."""
        if trained.trained_steps == 0:
            return trained
        results = [
            (checkpoint, future.result())  # a scoring failure fails the stage here
            for checkpoint, future in sorted(self._scoring.values(), key=lambda c: c[0].step)
            if checkpoint.step > (trained.resumed_from or 0)
        ]
        if not results:
            return trained
        scores = [score for _, score in results]
        best, best_score = min(results, key=lambda r: (r[1].mean, -r[0].step))
        publish_scores(self.store, trained.checkpoint.run_id, scores, temp_prefix())
        prune_checkpoints(self.store, self.cfg.train, keep=frozenset({best.key}))
        log.info(
            "best of %d checkpoint(s) scored while training: step %d, %s %s (the nightly "
            "confirms it on fresh seeds at full n)",
            len(scores),
            best.step,
            best_score.metric,
            best_score.describe(),
        )
        return trained.model_copy(update={"scores": scores, "best": best})
