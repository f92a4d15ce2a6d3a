"""What a config file or override may say: no key twice, no aliases, no infinite or NaN numbers,
text taken literally, old field names for one release, and data + model that build a network."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, get_args, get_origin

import pytest
import yaml

from tasks.config import (
    RENAMED,
    ConfigError,
    DeprecatedConfigWarning,
    PipelineConfig,
    SampleConfig,
    check_network,
    load_config,
    parse_override,
)
from tests.support.cli import CliRun, run_cli
from tests.support.paths import REPO

BOMB = "\n".join(
    [
        'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]',
        *(
            f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]"
            for p, n in zip("abcdefgh", "bcdefghi", strict=True)
        ),
    ]
)


def test_a_section_given_twice_names_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  steps: 5\nsample:\n  steps: 3\ntrain:\n  lr: 1e-3\n")
    with pytest.raises(
        ConfigError, match=r"twice\.yaml.*'train' is given twice, on line 1 and on line 5"
    ):
        load_config(path)


def test_a_key_given_twice_in_a_section_names_both_lines(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 1e-3\n  steps: 5\n  lr: 2e-3\n")
    with pytest.raises(ConfigError, match=r"'lr' is given twice, on line 2 and on line 4"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"override.*'fid' is given twice"):
        load_config(None, ["evaluate.metrics={fid: 1, fid: 2}"])


@pytest.mark.timeout(60)  # without the refusal it expands 9**9 nodes and never ends
def test_aliases_are_refused_at_the_first_one(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB + "\n")
    with pytest.raises(
        ConfigError, match=r"bomb\.yaml.*line 2, column \d+: the alias \*a is not allowed"
    ):
        load_config(bomb)
    small = tmp_path / "alias.yaml"
    small.write_text("train:\n  steps: &n 10\nsample:\n  steps: *n\n")
    with pytest.raises(ConfigError, match=r"line 4.*alias \*n"):
        load_config(small)


# -- numbers: finite only --------------------------------------------------------------------------
def _section_model(section: str) -> Any:
    """A section's model class; an optional section (`prices: PricesConfig | None`) its class."""
    annotation = PipelineConfig.model_fields[section].annotation
    return next((a for a in get_args(annotation) if a is not type(None)), annotation)


def _float_fields() -> list[str]:
    fields = []
    for section in PipelineConfig.model_fields:
        for name, field in _section_model(section).model_fields.items():
            if float in (field.annotation, *get_args(field.annotation)):
                fields.append(f"{section}.{name}")
    return fields


def _container(field: str) -> type | None:
    section, name = field.split(".")
    return get_origin(_section_model(section).model_fields[name].annotation)


def _given(field: str, value: str) -> tuple[str, str]:
    """Where the error names the value, and the override's value: in a tuple of floats its
    first element, in a mapping to floats one entry's value."""
    if _container(field) is tuple:
        return f"{field}.0", f"[{value}]"
    if _container(field) is dict:
        return f"{field}.put", f"{{put: {value}}}"
    return field, value


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_every_float_field_refuses_infinity_and_nan(value):
    fields = _float_fields()
    assert {"train.lr", "storage.retry_budget_s", "sample.eta", "promote.alpha"} <= set(fields)
    assert "train.phema_sigma_rels" in fields  # a tuple of floats: each element is checked
    for field in fields:
        where, given = _given(field, value)
        with pytest.raises(ConfigError, match=rf"{where}: Input should be a finite number"):
            load_config(None, [f"{field}={given}"])


def test_infinity_in_a_file_names_the_field(tmp_path):
    path = tmp_path / "inf.yaml"
    path.write_text("train:\n  lr: .inf\n  grad_clip: .NaN\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "train.lr" in str(err.value) and "train.grad_clip" in str(err.value)


# -- overrides: text fields are taken literally -----------------------------------------------------
def test_an_override_of_a_text_field_is_taken_literally(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        None,
        [
            "storage.root=./my store #2",
            "train.run_id=123",
            "data.dataset=imagefolder:./a: b",
        ],
    )
    assert cfg.storage.root == str(tmp_path / "my store #2")
    assert cfg.train.run_id == "123" and cfg.data.dataset == "imagefolder:./a: b"
    s3 = load_config(None, ["storage.root=s3://b/p #1", "storage.endpoint_url=http://h:9000/#x"])
    assert (s3.storage.root, s3.storage.endpoint_url) == ("s3://b/p #1", "http://h:9000/#x")
    # Quoted as a whole, it is YAML; null is None where the field may be None.
    assert parse_override("storage.root='./x #1'") == ("storage.root", "./x #1")
    assert parse_override("data.root=null") == ("data.root", None)
    assert parse_override("data.root='null'") == ("data.root", "null")
    assert parse_override("storage.root=null") == ("storage.root", "null")  # may not be None
    # Other fields are still YAML.
    assert parse_override("train.steps=10 # ten") == ("train.steps", 10)
    assert parse_override("model.channel_mult=[1, 2]") == ("model.channel_mult", [1, 2])
    assert parse_override("sample.workers=null") == ("sample.workers", None)


# -- renamed fields --------------------------------------------------------------------------------
def test_the_renamed_fields_exist_under_their_new_names_only():
    for section, renames in RENAMED.items():
        fields = PipelineConfig.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
        for old, new in renames.items():
            assert new in fields and old not in fields, (section, old, new)


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [
        ("train.num_workers", "train.workers", 3),
        ("train.data_workers", "train.loader_processes", 0),
        ("sample.num_workers", "sample.workers", 2),
        ("sample.cpus_per_task", "sample.cpus_per_worker", 2.0),
        ("evaluate.num_workers", "evaluate.workers", 4),
        ("evaluate.cpus", "evaluate.cpus_per_worker", 3.0),
    ],
)
def test_an_old_name_still_works_with_a_warning_naming_the_new(tmp_path, old, new, value):
    section, field = new.split(".")
    with pytest.warns(
        DeprecatedConfigWarning, match=rf"override '{old}=.*{old} is deprecated, use {new}"
    ):
        cfg = load_config(None, [f"{old}={value}"])
    assert getattr(getattr(cfg, section), field) == value
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({section: {old.split(".")[1]: value}}))
    with pytest.warns(DeprecatedConfigWarning, match=rf"old\.yaml.*{old} is deprecated, use {new}"):
        assert load_config(path) == cfg
    assert old.split(".")[1] not in cfg.model_dump(mode="json")[section]


def test_an_old_and_a_new_name_together_are_an_error_naming_both(tmp_path):
    both = "train.num_workers and train.workers are both set"
    with pytest.raises(ConfigError, match=both):
        load_config(None, ["train.num_workers=2", "train.workers=3"])
    with pytest.raises(ConfigError, match=both):
        load_config(None, ["train.workers=3", "train.num_workers=2"])
    path = tmp_path / "both.yaml"
    path.write_text("train:\n  num_workers: 2\n  workers: 3\n")
    with pytest.raises(ConfigError, match=rf"both\.yaml.*{both}"):
        load_config(path)
    # A file's value and an override's are not "both": the override wins, as always.
    path.write_text("train:\n  workers: 3\n")
    with pytest.warns(DeprecatedConfigWarning):
        assert load_config(path, ["train.num_workers=5"]).train.workers == 5
    with pytest.raises(ValueError, match=both):
        PipelineConfig.model_validate({"train": {"num_workers": 2, "workers": 3}})


def test_a_saved_config_and_records_with_old_names_still_load_quietly():
    """runs/<id>/config.json and the sample settings inside stored records, as older versions
    wrote them: read as they were meant, without warnings (nobody can act on them)."""
    old = PipelineConfig().model_dump(mode="json")
    for section, renames in RENAMED.items():
        for old_name, new in renames.items():
            old[section][old_name] = old[section].pop(new)
    old["train"]["num_workers"] = 4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = PipelineConfig.model_validate(old)
        sampling = SampleConfig.model_validate(old["sample"] | {"cpus_per_task": 2.0})
    assert cfg.train.workers == 4 and cfg == PipelineConfig(
        train=PipelineConfig().train.model_copy(update={"workers": 4})
    )
    assert sampling.cpus_per_worker == 2.0


# -- data + model build a network ------------------------------------------------------------------
def test_settings_that_build_no_network_are_named():
    check_network(load_config(None))
    check_network(load_config(REPO / "configs" / "nightly-cluster.yaml"))
    check_network(load_config(None, ["data.image_size=16", "model.attention_resolutions=[8]"]))
    check_network(load_config(None, ["data.dataset=imagefolder:/nowhere"]))  # size not known yet
    cases = {
        "data.image_size=16": ("model.attention_resolutions=[4]", "data.image_size=16"),
        "data.dataset=mnist": (
            "model.attention_resolutions=[4]",
            "data.image_size=None (mnist: 28x28)",
        ),
        "data.image_size=10": ("data.image_size=10", "model.channel_mult=[1, 2, 2]"),
        "model.base_channels=12": ("model.base_channels=12", "model.channel_mult=[1, 2]"),
    }
    extra = {"data.image_size=10": ["model.channel_mult=[1,2,2]", "model.attention_resolutions=[]"]}
    for override, named in cases.items():
        cfg = load_config(None, [override, *extra.get(override, [])])
        with pytest.raises(ConfigError) as err:
            check_network(cfg)
        assert all(n in str(err.value) for n in named), str(err.value)
        assert "UNetConfig" not in str(err.value)


# -- the CLI: exit code 2 before anything starts ---------------------------------------------------
@pytest.mark.timeout(60)  # in this process: the bomb must be refused, not expanded
def test_the_cli_refuses_bad_configs_with_exit_2_and_warns_about_old_names(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def _cli(*args: str, cwd: Path) -> CliRun:
        return run_cli(list(args), monkeypatch, capsys, cwd)

    twice = tmp_path / "twice.yaml"
    twice.write_text("train:\n  steps: 5\ntrain:\n  steps: 6\n")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB + "\n")
    for args, said in [
        (["nightly", "--dry-run", "-c", str(twice)], "on line 1 and on line 3"),
        (["nightly", "--dry-run", "-c", str(bomb)], "alias"),
        (["nightly", "--dry-run", "train.lr=.inf"], "train.lr"),
        (["train", "--dry-run", "data.image_size=16"], "model.attention_resolutions"),
    ]:
        out = _cli(*args, cwd=tmp_path)
        assert out.returncode == 2 and said in out.stderr, (args, out.stderr)
    assert _cli("shard", "--dry-run", "data.image_size=16", cwd=tmp_path).returncode == 0

    old = _cli("nightly", "--dry-run", "train.num_workers=3", "evaluate.cpus=2", cwd=tmp_path)
    assert old.returncode == 0, old.stderr
    assert "train.num_workers is deprecated, use train.workers" in old.stderr
    assert "evaluate.cpus is deprecated, use evaluate.cpus_per_worker" in old.stderr
    printed = yaml.safe_load(old.stdout)
    assert printed["train"]["workers"] == 3 and printed["evaluate"]["cpus_per_worker"] == 2
    names = {f"{s}.{k}" for s, fields in printed.items() for k in fields or {}}  # prices: null
    assert not names & {f"{s}.{o}" for s, r in RENAMED.items() for o in r}
