"""Post-hoc EMA around the maths (`diffusion_core.phema`, tested in test_phema.py): the settings,
snapshots in a store and the rebuild from them, which must give what `reconstruct` gives on the
same snapshots held in memory, and the records that keep a rebuilt EMA's samples apart."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.phema import PowerEMA, Snapshot, reconstruct, sigma_rel_to_gamma
from diffusion_core.unet import UNet, UNetConfig
from tasks import layout
from tasks.config import (
    ConfigError,
    ModelConfig,
    SampleConfig,
    StorageConfig,
    TrainConfig,
    load_config,
)
from tasks.records import Checkpoint
from tasks.sample.stage import sample_set_name
from tasks.storage import Store
from tasks.train.phema import (
    list_snapshots,
    rebuild_ema,
    snapshot_bytes,
    snapshot_due,
    storage_cost,
    write_snapshots,
)

RUN = "r"
UNET = UNetConfig(image_size=8, base_channels=8, channel_mult=(1, 2), attention_resolutions=(4,))
CONFIG: dict[str, Any] = {
    "unet": UNET.to_dict(),
    "model": ModelConfig().model_dump(mode="json"),
    "dataset": {"fingerprint": "fp0123"},
}


def test_settings_are_checked_and_name_the_field() -> None:
    cfg = load_config(None, ["train.phema_sigma_rels=[0.05,0.1]", "train.checkpoint_every=7"])
    assert cfg.train.phema_sigma_rels == (0.05, 0.1) and cfg.train.phema_interval == 7
    assert load_config(None, ["train.phema_every=3"]).train.phema_interval == 3
    assert load_config().train.phema_sigma_rels == ()  # off by default
    for bad, why in [("[0.3]", "0.3 is not"), ("[0.0]", "0.0 is not"), ("[0.1,0.1]", "twice")]:
        with pytest.raises(ConfigError, match=rf"train\.phema_sigma_rels.*{why}"):
            load_config(None, [f"train.phema_sigma_rels={bad}"])
    with pytest.raises(ConfigError, match="phema_every"):
        load_config(None, ["train.phema_every=0"])


def test_snapshots_are_due_every_n_steps_and_at_the_end() -> None:
    assert [s for s in range(1, 13) if snapshot_due(s, 12, 5)] == [5, 10, 12]
    assert [s for s in range(1, 11) if snapshot_due(s, 10, 5)] == [5, 10]


def test_the_storage_cost_counts_the_snapshots_of_the_steps_to_train() -> None:
    per = sum(t.numel() * 4 for t in UNet(UNET).state_dict().values())  # all float32
    assert snapshot_bytes(UNET) == per
    tc = TrainConfig(phema_sigma_rels=(0.05, 0.1), phema_every=5)
    line = storage_cost(tc, UNET, 12, 20)  # a resumed run: snapshots at 15 and 20
    assert f"2 snapshot(s) (sigma_rel 0.05, 0.1) of {per / 1000:.3g} KB every 5 steps" in line
    assert "4 snapshots" in line and "steps 12..20" in line


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(StorageConfig(root=str(tmp_path)))


def _train_toy(store: Store, steps: int, every: int) -> list[Snapshot]:
    """Noisy drifting weights, their power EMAs snapshotted into the store every `every` steps;
    the same snapshots in memory, as `reconstruct` takes them."""
    gen = torch.Generator().manual_seed(0)
    theta = {"w": torch.zeros(64), "n": torch.tensor(0)}
    phema = PowerEMA(theta, sigma_rels=(0.05, 0.10))
    held: list[Snapshot] = []
    for t in range(1, steps + 1):
        theta["w"] += 0.01 * torch.randn(64, generator=gen) + 0.002
        theta["n"] = torch.tensor(t)
        phema.update(t, theta)
        if snapshot_due(t, steps, every):
            write_snapshots(store, RUN, phema, CONFIG)
            held += phema.snapshot()
    return held


def test_rebuild_from_the_store_equals_reconstruct(store: Store) -> None:
    held = _train_toy(store, steps=120, every=10)
    assert [(s.sigma_rel, s.step) for s in list_snapshots(store, RUN)][:3] == [
        (0.05, 10),
        (0.1, 10),
        (0.05, 20),
    ]
    rebuilt = rebuild_ema(store, RUN, [0.07, 0.10], step=95)  # between two snapshot steps
    assert rebuilt.step == 95 and rebuilt.snapshot_steps == list(range(10, 91, 10))
    for checkpoint in rebuilt.checkpoints:
        assert checkpoint.phema_sigma_rel is not None
        assert checkpoint.key == layout.phema_rebuilt(RUN, checkpoint.phema_sigma_rel, 95)
        assert Checkpoint.read(
            store, layout.phema_rebuilt_record(RUN, checkpoint.phema_sigma_rel, 95)
        ) == (checkpoint)
        state = load_checkpoint(checkpoint.read_bytes(store))  # sha256-checked
        expected = reconstruct(held, checkpoint.phema_sigma_rel, target_step=95)
        torch.testing.assert_close(state["ema"]["model"]["w"], expected["w"], rtol=0, atol=1e-7)
        assert torch.equal(state["model"]["w"], state["ema"]["model"]["w"])
        assert int(state["ema"]["model"]["n"]) == 90  # counters: the newest snapshot's used
        assert state["step"] == 95 and state["extra"]["phema"]["sigma_rel"] in (0.07, 0.10)
    # By default at the newest snapshot, where a kept width comes back as its own snapshot.
    newest = rebuild_ema(store, RUN, [0.10])
    own = [s for s in held if s[0] == 120 and s[1] == pytest.approx(sigma_rel_to_gamma(0.10))]
    got = load_checkpoint(newest.checkpoints[0].read_bytes(store))["ema"]["model"]["w"]
    assert newest.step == 120
    torch.testing.assert_close(got, own[0][2]["w"], rtol=0, atol=1e-6)


def test_rebuild_errors_name_the_run_and_the_fix(store: Store) -> None:
    with pytest.raises(FileNotFoundError, match=r"run 'r' has no power-EMA snapshots.*phema_sigma"):
        rebuild_ema(store, RUN, [0.07])
    _train_toy(store, steps=20, every=10)
    with pytest.raises(ValueError, match=r"no power-EMA snapshot at or before step 5"):
        rebuild_ema(store, RUN, [0.07], step=5)
    with pytest.raises(ValueError, match=r"snapshots up to step 20, not 21"):
        rebuild_ema(store, RUN, [0.07], step=21)
    with pytest.raises(ValueError, match=r"sigma_rel must be in"):
        rebuild_ema(store, RUN, [0.5])


def test_a_rebuilt_ema_has_its_own_sample_set_and_training_records_read_as_before() -> None:
    training = Checkpoint(
        run_id=RUN,
        step=20,
        key=layout.checkpoint(RUN, 20),
        sha256="0" * 64,
        unet=UNET,
        model=ModelConfig(),
        dataset_fingerprint="fp0123",
    )
    assert "phema_sigma_rel" not in training.model_dump(mode="json")
    rebuilt = [training.model_copy(update={"phema_sigma_rel": s}) for s in (0.07, 0.1)]
    names = {sample_set_name(c, SampleConfig()) for c in [training, *rebuilt]}
    assert len(names) == 3
    assert Checkpoint.parse(rebuilt[0].model_dump(mode="json"), "x") == rebuilt[0]
