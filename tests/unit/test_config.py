from __future__ import annotations

import pytest
import yaml

from tasks.config import ConfigError, PipelineConfig, load_config, resolve_config
from tests.support.cli import run_cli


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
        ("train.run_id=a..b", "train.run_id"),
        ("promote.model_name=../../outside", "promote.model_name"),
        ("promote.model_name=a/b", "promote.model_name"),
        ("storage.root=gs://bucket", "storage.root"),
        ("storage.root=''", "storage.root"),
        ("storage.root=s3://", "storage.root"),
        ("storage.root=s3:///prefix", "storage.root"),
        ("storage.root=file://relative/path", "storage.root"),
        ("train.nonsense=1", "train.nonsense"),
        ("train.steps='10'", "train.steps"),
        ("train.steps=1e3", "train.steps"),
        ("train.steps=10.5", "train.steps"),
        ("train.use_gpu=1", "train.use_gpu"),
        ("train.use_gpu=yes please", "train.use_gpu"),
        ("data.seed=[1]", "data.seed"),
        ("model.channel_mult=12", "model.channel_mult"),
        ("model.channel_mult=[1,'2']", "model.channel_mult"),
        ("sample.eta=zero", "sample.eta"),
        ("train.lr=.inf", "train.lr"),
        ("sample.eta=.nan", "sample.eta"),
        ("train.workers=0", "train.workers"),
        ("train.num_workers=0", "train.workers"),
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


def test_yaml_errors_name_the_file_line_or_override(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  steps: 10\n  lr: [1, 2\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml.*not valid YAML: line \d+"):
        load_config(broken)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("data:\n  dataset: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.yaml.*not UTF-8"):
        load_config(latin1)
    with pytest.raises(ConfigError, match=r"override 'train.steps=\[1, 2'.*not valid YAML"):
        load_config(None, ["train.steps=[1, 2"])


def test_config_is_resolved_once_at_load(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    local = load_config(None, ["storage.root=./my store"])
    assert local.storage.root == str(tmp_path / "my store")
    assert local.storage.endpoint_url is None and local.ray.address == "10.0.0.1:6379"
    s3 = load_config(None, ["storage.root=s3://bucket/prefix"])
    assert (s3.storage.endpoint_url, s3.storage.region) == ("http://127.0.0.1:9", "eu-west-3")
    explicit = load_config(None, ["storage.root=s3://b", "storage.endpoint_url=http://x:1"])
    assert explicit.storage.endpoint_url == "http://x:1"
    # resolving is idempotent, and a resolved config round-trips
    assert resolve_config(s3) == s3
    assert PipelineConfig.model_validate(s3.model_dump(mode="json")) == s3


def test_cli_dry_run_prints_resolved_config_and_errors_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    out = run_cli(
        ["nightly", "--dry-run", "train.steps=11", "storage.root=rel"],
        monkeypatch,
        capsys,
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["steps"] == 11 and resolved["data"]["dataset"] == "digits"
    assert resolved["storage"]["root"] == str(tmp_path / "rel")
    assert resolved["ray"]["address"] == "head:6379"
    monkeypatch.delenv("RAY_ADDRESS")
    bad = run_cli(["train", "train.lr=-1"], monkeypatch, capsys)
    assert bad.returncode == 2 and "train.lr" in bad.stderr
    for stage in ("shard", "train", "sample", "evaluate", "nightly", "serve"):
        h = run_cli([stage, "--help"], monkeypatch, capsys)
        assert h.returncode == 0 and "--dry-run" in h.stdout


def test_numbers_in_exponent_form_are_numbers(tmp_path):
    cfg = load_config(
        None, ["train.lr=1e-4", "train.weight_decay=5E-2", "evaluate.cpus_per_worker=2"]
    )
    assert cfg.train.lr == 1e-4 and cfg.train.weight_decay == 0.05
    assert cfg.evaluate.cpus_per_worker == 2.0
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  lr: 3e-4\n  run_id: 1e5x\n")
    cfg = load_config(path)
    assert cfg.train.lr == 3e-4 and cfg.train.run_id == "1e5x"
