"""A sweep's YAML and its trials (pure: no Ray, no store): the search space expanded and every
trial's config validated up front, with errors that name the field; the budget's ledger; the
winner, the spread over training seeds and the handoff to the nightly."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tasks.records import SegmentScore, SweepTrial, TrialOutcome
from tasks.sweep.budget import Budget, segment_cost
from tasks.sweep.result import budget_note, handoff_command, seed_spreads, winner
from tasks.sweep.spec import SweepSpecError, parse_spec, plan_trials, read_spec
from tests.support.config import tiny_config

SCORED = {"evaluate": {"score_images": 4, "metrics": ["fid"]}}  # small sets, FID only


def _spec(**fields: Any) -> dict[str, Any]:
    return {"name": "lr", "segment_steps": 2, **fields}


def _plans(**fields: Any):
    return plan_trials(parse_spec(_spec(**fields)), tiny_config("/tmp/unused-store", SCORED))


def test_grid_times_seeds_gives_one_ordinary_run_per_trial():
    plans = _plans(grid={"train.lr": [1e-4, 3e-4], "model.base_channels": [8, 16]}, seeds=2)
    assert [p.trial_id for p in plans] == [f"t{i:02d}" for i in range(8)]
    assert [p.run_id for p in plans] == [f"lr-t{i:02d}" for i in range(8)]
    assert [p.config.train.run_id for p in plans] == [p.run_id for p in plans]
    assert [p.seed for p in plans] == [0, 1] * 4
    assert plans[0].settings == {"train.lr": 1e-4, "model.base_channels": 8}
    assert plans[0].config.train.lr == 1e-4 and plans[7].config.model.base_channels == 16
    # training-seed repeats share their setting's id; other settings do not
    assert plans[0].config_id == plans[1].config_id != plans[2].config_id
    assert plans[0].segments == [2]  # the tiny config trains 2 steps


def test_random_search_is_seeded_and_log_uniform_within_its_range():
    space = {"train.lr": {"loguniform": [1e-5, 1e-3]}, "model.base_channels": {"choice": [8, 16]}}
    a = _plans(random={"n": 6, "seed": 3, "space": space})
    b = _plans(random={"n": 6, "seed": 3, "space": space})
    assert [p.settings for p in a] == [p.settings for p in b]
    assert len(a) == 6 and all(1e-5 <= p.config.train.lr <= 1e-3 for p in a)
    assert {p.config.model.base_channels for p in a} <= {8, 16}
    c = _plans(random={"n": 6, "seed": 4, "space": space})
    assert [p.settings for p in c] != [p.settings for p in a]


def test_segments_end_at_the_runs_last_step():
    plans = plan_trials(
        parse_spec(_spec(segment_steps=3)),
        tiny_config("/tmp/unused-store", SCORED, {"train": {"steps": 10}}),
    )
    assert plans[0].segments == [3, 6, 9, 10]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"grid": {"train.lrate": [1]}}, "'train.lrate' is not a config field: train has"),
        ({"grid": {"trian.lr": [1]}}, "'trian.lr' is not a config field"),
        ({"grid": {"train.run_id": ["a"]}}, "train.run_id cannot vary in a sweep"),
        ({"grid": {"train.seed": [1, 2]}}, "train.seed cannot vary in a sweep"),
        ({"grid": {"storage.root": ["/x"]}}, "storage.root cannot vary"),
        ({"grid": {"train.lr": []}}, "grid.train.lr is empty"),
        ({"grid": {"train.lr": [-1.0]}}, "train.lr: Input should be greater than 0 (got -1.0)"),
        (
            {"grid": {"model.base_channels": [12]}},
            "trial t00 (model.base_channels=12): model.base_channels=12, model.channel_mult=[1, 2] "
            "build no network",
        ),
        (
            {"grid": {"train.batch_size": ["8"]}},
            "train.batch_size: Input should be a valid integer",
        ),
        (
            {"random": {"n": 2, "space": {"train.lr": {"loguniform": [0, 1e-3]}}}},
            "loguniform: the low end 0 must be > 0",
        ),
        (
            {"random": {"n": 2, "space": {"train.lr": {"uniform": [1, 2], "choice": [1]}}}},
            "give exactly one of uniform, loguniform, randint, choice",
        ),
        ({"scheduler": {"kind": "hyperband"}}, "scheduler.kind: Input should be"),
        ({"budget_device_s": 0}, "budget_device_s: Input should be greater than 0"),
        ({"seeds": 0}, "seeds: Input should be greater than or equal to 1"),
        ({"segment_steps": 5}, "train.steps=2 is less than segment_steps=5"),
        ({"name": "a/b"}, "sweep name 'a/b' cannot be part of a storage key"),
        ({"colour": "blue"}, "colour: Extra inputs are not permitted"),
    ],
)
def test_a_bad_sweep_names_the_field_before_anything_runs(fields, message):
    with pytest.raises(SweepSpecError) as err:
        _plans(**fields)
    assert message in str(err.value)


def test_a_bad_value_names_its_trial():
    with pytest.raises(SweepSpecError, match=r"trial t01 \(train\.lr=-1\): train\.lr"):
        _plans(grid={"train.lr": [1e-3, -1.0]})


def test_the_yaml_file_reads_numbers_as_numbers_and_its_base_path_relative_to_it(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  steps: 4\n")
    (tmp_path / "s.yaml").write_text(
        "name: s\nbase: {config: base.yaml, overrides: {storage.root: /tmp/unused}}\n"
        "grid: {train.lr: [1e-4, 3e-4]}\nsegment_steps: 2\n"
    )
    spec = read_spec(tmp_path / "s.yaml")
    assert spec.base.config == str(tmp_path / "base.yaml")
    plans = plan_trials(spec)
    assert [p.config.train.lr for p in plans] == [1e-4, 3e-4]
    assert plans[0].segments == [2, 4]
    with pytest.raises(SweepSpecError, match="not found"):
        read_spec(Path(tmp_path / "missing.yaml"))


def test_the_budget_grants_no_segment_that_could_cross_it():
    b = Budget(limit=100.0)
    assert b.reserve("t0", 2, 2, 1.0, None) == "granted"  # the first segment measures
    assert b.reserve("t1", 2, 2, 1.0, None) == "wait"  # ... alone
    b.settle("t0", 30.0, 2, 1.0)  # 15 device-s per step and device
    assert b.reserve("t1", 2, 2, 1.0, None) == "granted"  # 30 + 30 <= 100
    assert b.reserve("t0", 4, 2, 1.0, 15.0) == "granted"  # 30 + 30 + 30 <= 100
    assert b.reserve("t2", 2, 2, 1.0, None) == "refused"  # 30 + 60 + 30 > 100
    assert b.refused == ("t2", 2, 30.0)
    b.release("t1")
    b.settle("t0", 30.0, 2, 1.0)
    assert b.state() == (60.0, ("t2", 2, 30.0))
    assert Budget(limit=None).reserve("t0", 2, 2, 1.0, None) == "granted"


def test_a_segment_costs_its_reserved_devices_times_its_wall_time():
    cfg = tiny_config("/tmp/unused", {"train": {"workers": 2, "cpus_per_worker": 1.5}})
    # training: 2 workers x 1.5 CPUs; scoring: one sampling and one feature worker of 1 CPU
    assert segment_cost(cfg, 10.0, 4.0) == pytest.approx(10 * 3.0 + 4 * 2.0)


def _trial(tid: str, config_id: str, seed: int, fids: list[float], target: int = 4) -> SweepTrial:
    segments = [
        SegmentScore(
            step=2 * (i + 1),
            fid=f,
            fid_std=0.5,
            values=[f - 0.5, f + 0.5],
            num_images=4,
            metrics_key="m",
            checkpoint_key="c",
            train_s=1.0,
            score_s=1.0,
            device_s=3.0,
        )
        for i, f in enumerate(fids)
    ]
    return SweepTrial(
        sweep="lr",
        trial_id=tid,
        run_id=f"lr-{tid}",
        settings={"train.lr": 0.001 if config_id == "a" else 0.003},
        seed=seed,
        config_id=config_id,
        target_step=target,
        segments=segments,
        starts=1,
    )


def test_the_winner_the_seed_spread_and_the_handoff():
    outcomes = [
        TrialOutcome(trial=_trial("t00", "a", 0, [6.0, 5.0]), status="finished"),
        TrialOutcome(trial=_trial("t01", "a", 1, [6.0, 5.4]), status="finished"),
        TrialOutcome(trial=_trial("t02", "b", 0, [4.0]), status="stopped"),  # lower, unfinished
        TrialOutcome(trial=_trial("t03", "b", 1, [7.0]), status="stopped"),
    ]
    best = winner(outcomes)
    assert best is not None and best.trial.trial_id == "t00"
    spreads = {s.config_id: s for s in seed_spreads(outcomes)}
    assert spreads["a"].step == 4 and spreads["a"].fids == [5.0, 5.4]
    assert spreads["a"].seed_std == pytest.approx(0.2828, abs=1e-3)
    assert spreads["a"].sampling_std == 0.5
    assert spreads["b"].step == 2 and spreads["b"].fids == [4.0, 7.0]
    spec = parse_spec(_spec(base={"config": "mnist.yaml", "overrides": {"train.steps": 4}}))
    plan = _plans(grid={"train.lr": [0.001]}, seeds=1)[0]
    assert handoff_command(spec, plan) == (
        "diffpipe nightly -c mnist.yaml train.steps=4 train.lr=0.001 train.run_id=lr-t00 "
        "train.seed=0"
    )
    assert winner([o for o in outcomes if o.status == "stopped"]) is None


def test_the_budget_note_says_where_the_sweep_stopped():
    outcomes = [
        TrialOutcome(trial=_trial("t00", "a", 0, [6.0]), status="budget"),
        TrialOutcome(trial=_trial("t01", "a", 1, []), status="not started"),
    ]
    note = budget_note(outcomes, 10.0, 3.0, ("t00", 4, 9.0), "CPU")
    assert note == (
        "budget 10 CPU-seconds: 3 spent; stopped t00 at step 2; not started: t01; the first "
        "segment refused was t00's to step 4 (estimated 9 CPU-s)"
    )
    assert budget_note(outcomes, None, 3.0, None, "CPU") is None


def test_the_cli_refuses_a_bad_sweep_and_lists_the_trials_of_a_good_one(tmp_path, capsys):
    from flows.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nsegment_steps: 2\ngrid: {train.lrate: [1e-3]}\n")
    assert main(["sweep", "-c", str(bad)]) == 2
    assert "'train.lrate' is not a config field" in capsys.readouterr().err
    good = tmp_path / "good.yaml"
    good.write_text(
        "name: s\nsegment_steps: 2\nseeds: 2\ngrid: {train.lr: [1e-3, 3e-3]}\n"
        "base: {overrides: {train.steps: 4, evaluate.score_images: 4, sample.num_images: 8}}\n"
    )
    assert main(["sweep", "-c", str(good), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "t00  run s-t00  seed 0  train.lr=0.001",
        "t01  run s-t01  seed 1  train.lr=0.001",
        "t02  run s-t02  seed 0  train.lr=0.003",
        "t03  run s-t03  seed 1  train.lr=0.003",
    ]
    assert main(["sweep", "-c", str(good), "train.steps=8"]) == 2
    assert "overrides go in the sweep YAML" in capsys.readouterr().err


def test_a_resumed_sweep_must_be_the_sweep_that_started(tmp_path):
    from tasks.config import StorageConfig
    from tasks.storage import Store
    from tasks.sweep.stage import _check_same_sweep

    store = Store(StorageConfig(root=str(tmp_path)))
    first = parse_spec(_spec(grid={"train.lr": [1e-3, 3e-3]}))
    _check_same_sweep(store, first)
    _check_same_sweep(store, first)  # the same sweep again: resumed
    with pytest.raises(ValueError, match=r"sweep 'lr' was started with another spec \(grid differ"):
        _check_same_sweep(store, parse_spec(_spec(grid={"train.lr": [1e-3]})))


def test_the_sweep_deployment_runs_sweep_flow_with_parameters_that_validate():
    """infra/prefect.yaml's `sweep/sweep` (a work pool's) and `diffpipe serve`'s: the flow they run
    is `sweep_flow`, and the parameters they carry pass its own validation and plan a sweep."""
    import yaml
    from prefect.exceptions import ParameterTypeError
    from prefect.flows import load_flow_from_entrypoint

    from flows.deploy import served_deployments
    from flows.sweep import sweep_flow
    from tests.support.paths import REPO

    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    (deployment,) = [d for d in spec["deployments"] if d["name"] == "sweep"]
    assert deployment["entrypoint"] == "flows/sweep.py:sweep_flow"
    path, func = deployment["entrypoint"].split(":")
    flow = load_flow_from_entrypoint(f"{REPO / path}:{func}")
    assert flow.name == sweep_flow.name == "sweep"
    params = flow.validate_parameters(deployment["parameters"])
    assert params == {"sweep_path": "configs/sweep-cluster.yaml", "confirm": True}
    plans = plan_trials(read_spec(REPO / params["sweep_path"]))  # relative to DIFFPIPE_HOME
    assert [p.run_id for p in plans] == ["lr-t00", "lr-t01", "lr-t02"]
    assert deployment["work_pool"]["name"] == spec["deployments"][0]["work_pool"]["name"]

    nightly, sweep = served_deployments("configs/nightly-cluster.yaml", [])
    assert (nightly.name, sweep.name) == ("nightly", "sweep")
    assert sweep.entrypoint == deployment["entrypoint"] and not sweep.schedules
    assert sweep.concurrency_limit == deployment["concurrency_limit"] == 1
    # sweep_path is given at each run (`--param sweep_path=...`), confirm defaults to True
    assert sweep.parameters == {}
    assert sweep_flow.validate_parameters({"sweep_path": "s.yaml"}) == {
        "sweep_path": "s.yaml",
        "confirm": True,
    }
    with pytest.raises(ParameterTypeError, match="sweep_path"):
        sweep_flow.validate_parameters({})
    # Under another name, both deployments take it (neither replaces infra/prefect.yaml's).
    assert [d.name for d in served_deployments(None, [], name="serve-check")] == ["serve-check"] * 2
