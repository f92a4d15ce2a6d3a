from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tasks.config import ConfigError, PipelineConfig, load_config


def test_defaults_round_trip_through_json_and_yaml(tmp_path):
    cfg = load_config(
        None, ["train.steps=7", "model.channel_mult=[1,2,2]", "evaluate.metrics=[fid]"]
    )
    assert PipelineConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_config(path) == cfg
    assert cfg.model.channel_mult == (1, 2, 2) and cfg.train.steps == 7


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("train.steps=-3", "train.steps"),
        ("sample.sampler=euler_a", "sample.sampler"),
        ("data.dataset=cifar", "data.dataset"),
        ("train.run_id=../escape", "train.run_id"),
        ("storage.root=gs://bucket", "storage.root"),
        ("train.nonsense=1", "train.nonsense"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)


def test_cross_field_validation():
    with pytest.raises(ConfigError, match="sample.steps"):
        load_config(None, ["model.num_timesteps=10", "sample.steps=50"])
    with pytest.raises(ConfigError, match="class_conditional"):
        load_config(None, ["sample.guidance_scale=3"])


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="section.field=value"):
        load_config(None, ["train.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_cli_dry_run_prints_resolved_config_and_errors_exit_2():
    run = [sys.executable, "-m", "flows.cli"]
    out = subprocess.run(
        [*run, "nightly", "--dry-run", "train.steps=11"], capture_output=True, text=True, check=True
    )
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["steps"] == 11 and resolved["data"]["dataset"] == "digits"
    bad = subprocess.run([*run, "train", "train.lr=-1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "train.lr" in bad.stderr
    for stage in ("shard", "train", "sample", "evaluate", "nightly", "serve"):
        h = subprocess.run([*run, stage, "--help"], capture_output=True, text=True, check=True)
        assert "--dry-run" in h.stdout
