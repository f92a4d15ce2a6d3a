"""Bad input and damaged bytes, as a hostile user meets them: refused clearly, never promoted,
never written or read outside the store. Each test reproduces one defect class and the variants a
user would try next."""

from __future__ import annotations

import hashlib
import io
import os

import pytest
import torch

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from tasks import layout
from tasks.config import DataConfig, SampleConfig, StorageConfig
from tasks.errors import describe_failure
from tasks.ray_runtime import ResourcesUnavailableError
from tasks.records import DatasetManifest, RecordFormatError
from tasks.sample.stage import sample_images
from tasks.shard.stage import shard_dataset
from tasks.storage import Store
from tasks.train.loop import TrainJob, run_training
from tasks.train.stage import NOT_RETRIED, train
from tasks.webdata import ShardReadError, iter_images, iter_raw_samples
from tests.support.config import tiny_config
from tests.support.shards import verify_manifest
from tests.support.training import shard_and_train


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    store = Store(StorageConfig(root=str(root)))
    cfg = tiny_config(root)
    manifest, checkpoint = shard_and_train(store, cfg)
    return store, cfg, manifest, checkpoint


def _flip_byte(store: Store, key: str, offset: int) -> None:
    data = bytearray(store.read_bytes(key))
    data[offset] ^= 0xFF
    store.write_bytes(key, bytes(data))


# 1. nothing non-finite is sampled from -------------------------------------------------------
def test_a_checkpoint_with_non_finite_weights_is_never_sampled(trained):
    store, cfg, _, good = trained
    state = load_checkpoint(good.read_bytes(store))
    name = next(iter(state["ema"]["model"]))
    state["ema"]["model"][name] = torch.full_like(state["ema"]["model"][name], float("nan"))
    data = save_checkpoint(state)
    key = layout.checkpoint("nan-run", 2)
    store.write_bytes(key, data)
    nan = good.model_copy(
        update={"run_id": "nan-run", "key": key, "sha256": hashlib.sha256(data).hexdigest()}
    )
    with pytest.raises(ValueError, match=f"non-finite weights \\({name}.*refusing to sample"):
        sample_images(store, cfg.sample, cfg.ray, nan)
    assert store.list(layout.run_prefix("nan-run") + "/samples") == []


# 2. reads and writes stay in the store --------------------------------------------------------
@pytest.mark.parametrize("key", ["../outside.pt", "runs/../../outside.pt", "/etc/passwd"])
def test_a_pointer_to_a_key_outside_the_store_is_refused(trained, tmp_path, key):
    store, cfg, manifest, good = trained
    outside = tmp_path / "outside.pt"
    outside.write_bytes(good.read_bytes(store))  # a perfectly valid checkpoint, in the wrong place
    bad = good.model_copy(update={"run_id": "escape", "key": key})
    bad.write(store, layout.latest_checkpoint("escape"))
    escape_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_id": "escape"})})
    job = TrainJob(config=escape_cfg, target_step=4, manifest=manifest)
    with pytest.raises(ValueError, match="not a plain path below the storage root") as err:
        run_training(job)
    assert isinstance(err.value, NOT_RETRIED)  # ends a Ray run after one attempt
    with pytest.raises(ValueError, match="not a plain path below the storage root"):
        sample_images(store, cfg.sample, cfg.ray, bad)


class _Exploit:
    def __reduce__(self):  # a payload that would run a command if unpickled
        return (os.system, ("touch exploited",))


def test_a_code_running_checkpoint_ends_training_at_once(trained, tmp_path, monkeypatch):
    """A checkpoint whose bytes would run code, recorded with its own (matching) sha256: the
    weights-only loader refuses it, and the error is one a restart would only meet again."""
    store, cfg, manifest, good = trained
    monkeypatch.chdir(tmp_path)
    buffer = io.BytesIO()
    torch.save({"model": _Exploit(), "step": 2}, buffer)
    data = buffer.getvalue()
    evil = good.model_copy(
        update={
            "run_id": "evil",
            "key": layout.checkpoint("evil", 2),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    )
    store.write_bytes(evil.key, data)
    evil.write(store, layout.latest_checkpoint("evil"))
    evil_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"run_id": "evil"})})
    with pytest.raises(RecordFormatError, match="cannot resume.*not a safe checkpoint") as err:
        run_training(TrainJob(config=evil_cfg, target_step=4, manifest=manifest))
    assert isinstance(err.value, NOT_RETRIED)
    assert "weights_only" not in describe_failure(err.value)
    assert not (tmp_path / "exploited").exists()


def test_a_checkpoint_changed_after_it_was_written_is_refused(trained):
    store, cfg, manifest, good = trained
    copy = good.model_copy(update={"run_id": "tampered", "key": layout.checkpoint("tampered", 2)})
    store.write_bytes(copy.key, good.read_bytes(store))
    copy.write(store, layout.latest_checkpoint("tampered"))
    _flip_byte(store, copy.key, 1000)
    tampered_cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"run_id": "tampered"})}
    )
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        run_training(TrainJob(config=tampered_cfg, target_step=4, manifest=manifest))
    with pytest.raises(ValueError, match="does not match its recorded sha256"):
        sample_images(store, SampleConfig(num_images=2, steps=2), cfg.ray, copy)


# 3. damaged shards are never reused; read errors name the shard --------------------------------
@pytest.mark.parametrize("where", ["header", "image data"])
def test_a_damaged_shard_is_rewritten_from_the_source(tmp_path, where):
    store = Store(StorageConfig(root=str(tmp_path)))
    cfg = DataConfig(max_images=100, samples_per_shard=50)
    first = shard_dataset(cfg, store).manifest
    victim = first.split("train").shards[0]
    original = store.read_bytes(victim.key)
    # same size, one byte changed: a size check cannot see it
    _flip_byte(store, victim.key, 100 if where == "header" else len(original) // 2)
    assert verify_manifest(store, first) == [victim.key]
    again = shard_dataset(cfg, store)
    assert not again.reused and again.manifest.fingerprint == first.fingerprint
    assert store.read_bytes(victim.key) == original  # rewritten, byte for byte
    assert verify_manifest(store, again.manifest) == []
    assert shard_dataset(cfg, store).reused  # and reused once whole again


def test_read_errors_name_the_shard_and_the_sample(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    manifest: DatasetManifest = shard_dataset(DataConfig(max_images=40), store).manifest
    key = manifest.split("holdout").shards[0].key
    data = store.read_bytes(key)
    store.write_bytes(key, data[: len(data) // 2])  # truncated mid-sample
    with pytest.raises(
        ShardReadError,
        match=f"sample '\\d+' of shard {store.url(key)}|cannot read shard {store.url(key)}",
    ):
        list(iter_images(store, [key], channels=1))
    store.write_bytes(key, data.replace(b"\x89PNG", b"\x89PNX", 1))  # one PNG broken
    with pytest.raises(ShardReadError, match=f"sample '\\d+' of shard {store.url(key)}"):
        list(iter_images(store, [key], channels=1))
    # A byte no reader looks at (the tar's trailing padding): only the shard's sha256 tells.
    store.write_bytes(key, data[:-1] + bytes([data[-1] ^ 1]))
    assert len(list(iter_raw_samples(store, [key]))) > 0  # read back without complaint
    info = manifest.split("holdout").shards[0]
    with pytest.raises(ShardReadError, match=f"shard {store.url(key)} does not match its recorded"):
        list(iter_raw_samples(store, [key], {key: info.sha256}))
    store.write_bytes(key, data)
    assert len(list(iter_raw_samples(store, [key], {key: info.sha256}))) == info.count


# 7. requests the cluster can never hold fail at once --------------------------------------------
@pytest.mark.parametrize(
    ("train_override", "message"),
    [
        ({"workers": 3}, r"3 x \{CPU: 1\}.*\{CPU: 2\}"),
        ({"workers": 1, "use_gpu": True}, r"1 x \{CPU: 1, GPU: 1\}.*GPU: 0"),
        ({"workers": 1, "cpus_per_worker": 4}, r"1 x \{CPU: 4\}.*\{CPU: 2\}"),
    ],
)
@pytest.mark.timeout(300, func_only=True)  # a guard against waiting forever, not a measure
def test_impossible_training_resources_fail_fast(trained, ray_cluster, train_override, message):
    store, cfg, manifest, _ = trained
    run = {"run_id": f"big-{len(message)}", "steps": 4}
    big = cfg.model_copy(update={"train": cfg.train.model_copy(update={**run, **train_override})})
    with pytest.raises(ResourcesUnavailableError, match=message) as err:
        train(big, store, manifest)  # at once: were it to wait for the resources, it would hang
    assert "ray.autoscaling=true" in str(err.value)


def test_impossible_sampling_resources_fail_fast(trained, ray_cluster):
    store, cfg, _, good = trained
    with pytest.raises(
        ResourcesUnavailableError, match=r"sampling task asks for 1 x \{CPU: 1, GPU: 1\}"
    ):
        sample_images(store, cfg.sample.model_copy(update={"use_gpu": True}), cfg.ray, good)
