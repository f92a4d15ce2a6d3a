"""The tiny pipeline the tests run: one config tree, in the form each test needs it (a resolved
`PipelineConfig`, or `section.field=value` overrides for the CLI and the flows).

A test states only where it departs from TINY, as layers of sections: `tiny_config(root,
LONGER_TRAINING, {"train": {"run_id": "r"}})` takes TINY, then each layer's fields over the same
section's. What a layer leaves out keeps TINY's value, so each test's config reads as its
differences.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tasks.config import PipelineConfig, StorageConfig

Settings = Mapping[str, Mapping[str, Any]]

# 80 digits (8x8) in shards of 40, a UNet of two levels and 8 base channels, two steps of batch 8,
# four images in one range: seconds on one CPU.
TINY: Settings = {
    "data": {"max_images": 80, "samples_per_shard": 40},
    "model": {"base_channels": 8, "channel_mult": [1, 2], "attention_resolutions": [4]},
    "train": {"batch_size": 8, "checkpoint_every": 2, "log_every": 2, "steps": 2},
    "sample": {"num_images": 4, "steps": 2, "images_per_task": 4, "batch_size": 4},
}
# Training past its warm-ups, logging and saving every 3 steps, on 120 digits in 4 shards: the
# resume and outage tests.
LONGER_TRAINING: Settings = {
    "data": {"max_images": 120, "samples_per_shard": 32},
    "train": {
        "checkpoint_every": 3,
        "log_every": 3,
        "warmup_steps": 2,
        "shuffle_buffer": 16,
        "ema_warmup_steps": 2,
    },
}
# The nightly flow as the e2e tests run it (20 steps, then 10 more a night), at a size whose
# evaluation still reports FID and KID.
NIGHTLY: Settings = {
    "data": {"max_images": 400, "samples_per_shard": 64},
    "model": {"base_channels": 16},
    "train": {
        "steps": 20,
        "steps_per_night": 10,
        "checkpoint_every": 10,
        "log_every": 10,
        "batch_size": 16,
        "workers": 2,
        "warmup_steps": 5,
    },
    "sample": {"num_images": 40, "steps": 10, "images_per_task": 20, "batch_size": 20},
    "evaluate": {"repeats": 1, "metrics": ["fid", "kid"], "kid_subset_size": 20, "grid_images": 16},
}
# The tiny pipeline as a nightly: its first night 2 steps long, one evaluation of FID only (the
# Jobs API and deployment tests, where the nightly's launch, not its size, is under test).
SHORT_NIGHT: Settings = {
    "train": {"steps_per_night": 2},
    "evaluate": {"repeats": 1, "metrics": ["fid"], "grid_images": 4},
}
# A class-conditional model: sampling draws labels, so the label path is exercised too.
CLASS_CONDITIONAL: Settings = {"model": {"class_conditional": True}}


def tiny_settings(*layers: Settings) -> dict[str, dict[str, Any]]:
    """TINY with each layer's fields over the same section's, in order."""
    tree: dict[str, dict[str, Any]] = {name: dict(fields) for name, fields in TINY.items()}
    for layer in layers:
        for name, fields in layer.items():
            tree.setdefault(name, {}).update(fields)
    return tree


def tiny_config(root: str | Path | StorageConfig | None, *layers: Settings) -> PipelineConfig:
    """The tiny pipeline's config with its store at `root` (a local folder, or a StorageConfig;
    None keeps the default store)."""
    tree = tiny_settings(*layers)
    if isinstance(root, StorageConfig):
        tree["storage"] = root.model_dump()
    elif root is not None:
        tree["storage"] = {**tree.get("storage", {}), "root": str(root)}
    return PipelineConfig.model_validate(tree)


def tiny_overrides(*layers: Settings) -> list[str]:
    """The same tree as `section.field=value` overrides (`diffpipe ... OVERRIDES`, the flows'
    `overrides` parameter); values are written as YAML reads them back."""
    return [
        f"{name}.{field}={_as_yaml(value)}"
        for name, fields in tiny_settings(*layers).items()
        for field, value in fields.items()
    ]


def _as_yaml(value: Any) -> str:
    """A plain string as it is, anything else as JSON (which YAML reads): 8, [1,2], true."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
