"""Stage records: what is stored is what is handed over, and another format version is refused clearly."""

from __future__ import annotations

import json

import pytest

from diffusion_core.unet import UNetConfig
from tasks import layout
from tasks.config import ModelConfig, StorageConfig
from tasks.records import Checkpoint, RecordFormatError
from tasks.storage import Store
from tests.support.records import checkpoint_record


def _checkpoint() -> Checkpoint:
    return checkpoint_record(
        3,
        unet=UNetConfig(image_size=8, channel_mult=(1, 2), attention_resolutions=(4,)),
        model=ModelConfig(schedule="cosine"),
        dataset_fingerprint="abc",
    )


def test_a_record_round_trips_through_the_store(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    ckpt = _checkpoint()
    ckpt.write(store, layout.latest_checkpoint("r"))
    stored = json.loads((tmp_path / layout.latest_checkpoint("r")).read_text())
    assert stored["format"] == "diffusion-pipeline/checkpoint@1"
    assert stored["unet"]["channel_mult"] == [1, 2]
    assert Checkpoint.latest(store, "r") == ckpt
    assert Checkpoint.latest(store, "other") is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"format": "diffusion-pipeline/checkpoint@2"}, "checkpoint@2 record, but this version"),
        ({"step": 3, "key": "k"}, "format-less record"),
        ([1, 2], "format-less record"),
    ],
)
def test_another_format_version_is_refused_with_what_to_do(tmp_path, data, message):
    store = Store(StorageConfig(root=str(tmp_path)))
    store.write_json("runs/r/checkpoints/latest.json", data)
    with pytest.raises(RecordFormatError, match=message) as err:
        Checkpoint.latest(store, "r")
    assert "runs/r/checkpoints/latest.json" in str(err.value)
    assert "rerun the stage" in str(err.value)


def test_a_record_that_does_not_fit_names_the_fields(tmp_path):
    store = Store(StorageConfig(root=str(tmp_path)))
    bad = _checkpoint().model_dump(mode="json") | {"step": "three", "extra": 1}
    store.write_json("c.json", bad)
    with pytest.raises(RecordFormatError, match=r"step: .*extra: ") as err:
        Checkpoint.read(store, "c.json")
    assert "c.json" in str(err.value)
    store.write_bytes("d.json", b"{not json")
    with pytest.raises(RecordFormatError, match="d.json is not JSON"):
        Checkpoint.read(store, "d.json")
