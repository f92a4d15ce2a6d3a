"""The artifact layout has one owner, `tasks/layout.py`: no other module builds a store key, and the
README's "Artifact layout" section describes exactly the keys it builds."""

from __future__ import annotations

import ast
import inspect
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tasks import layout

REPO = Path(__file__).resolve().parents[2]

# What a store key looks like in source: a top-level folder of the layout or one of its file names.
KEY_LIKE = re.compile(
    r"(^|/)(datasets|runs|stats|extractors|models)/|/(checkpoints|samples|eval|nightly)(/|$)"
    r"|(manifest|latest|config|metrics|history|current|summary)\.json|report\.(md|html)"
    r"|(grid|loss|fid)\.png"
    r"|weights\.pt\b|(shard|step|train|holdout)-\{"
)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def key_literals(source: str) -> list[str]:
    """String literals (f-string parts rendered with `{}`) that look like store keys, docstrings aside."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            text = "".join(v.value if isinstance(v, ast.Constant) else "{" for v in node.values)
            if KEY_LIKE.search(text):
                found.append(text)
            for v in node.values:
                skip.add(id(v))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += [node.value] if id(node) not in skip and KEY_LIKE.search(node.value) else []
    return found


def test_the_scanner_finds_keys_built_by_hand() -> None:
    assert key_literals('k = f"runs/{run_id}/checkpoints/latest.json"')
    assert key_literals('k = prefix.replace("/samples/", "/eval/", 1)')
    assert key_literals('k = f"{prefix}/shard-{n:06d}.tar"')
    assert not key_literals('"""runs/<id>/config.json in a docstring"""\nx = "train.steps"')


@pytest.mark.parametrize(
    "path",
    sorted(p for d in ("tasks", "flows") for p in (REPO / d).glob("*.py") if p.name != "layout.py"),
    ids=lambda p: f"{p.parent.name}/{p.name}",
)
def test_no_store_key_is_built_outside_the_layout_module(path: Path) -> None:
    assert key_literals(path.read_text()) == []


def _layout_keys() -> tuple[list[str], set[str]]:
    """Every object key the layout builds, for example arguments, and which functions built them."""
    called: set[str] = set()

    def use(fn: Callable[..., str]) -> Callable[..., str]:
        def wrapper(*args: object) -> str:
            called.add(fn.__name__)
            return fn(*args)

        return wrapper

    L = {name: use(fn) for name, fn in inspect.getmembers(layout, inspect.isfunction)}
    ds = L["dataset_prefix"]("mnist", "0123456789abcdef")
    run, step, fp, sha = "nightly", 600, "0123456789abcdef", "f" * 64
    sset = L["sample_set_name"](step, "ddim", 50, "a1b2c3d4e5")
    samples, evals = L["sample_set_prefix"](run, sset), L["eval_prefix"](run, sset)
    nightly = L["nightly_prefix"](run, L["night_stamp"](datetime(2026, 11, 25, 2, tzinfo=UTC)))
    keys = [
        L["dataset_shard"](ds, "train", "0123456789abcdef0123"),
        L["dataset_shard"](ds, "holdout", "fedcba9876543210fedc"),
        L["dataset_manifest"](ds),
        L["run_config"](run),
        L["checkpoint"](run, step),
        L["latest_checkpoint"](run),
        L["sample_weights"](samples),
        L["sample_weights_record"](samples),
        L["sample_shard"](samples, 0),
        L["sample_receipt"](samples, 0),
        L["sample_manifest"](samples),
        L["sample_features"](samples, sha, 0),
        L["eval_metrics"](evals),
        L["eval_grid"](evals),
        L["eval_report"](evals),
        L["nightly_report"](nightly),
        L["nightly_report_html"](nightly),
        *(L["nightly_figure"](nightly, figure) for figure in ("grid", "loss", "fid")),
        L["nightly_summary"](nightly),
        L["nightly_train_target"](nightly),
        L["nightly_latest"](run),
        *(
            L[f"sampler_choice_{name}"](L["sampler_choice_prefix"](run, "20261125T020000Z"))
            for name in ("report", "report_html", "figure", "record")
        ),
        *(L["phema_snapshot"](run, sigma_rel, step) for sigma_rel in (0.05, 0.1)),
        L["phema_rebuilt"](run, 0.07, step),
        L["phema_rebuilt_record"](run, 0.07, step),
        *(
            L[f"ema_choice_{name}"](L["ema_choice_prefix"](run, "20261125T020000Z"))
            for name in ("report", "report_html", "record")
        ),
        *(
            L[f"sweep_{name}"](L["sweep_prefix"]("lr"), *arg)
            for name, arg in (
                ("trial", ("t00",)),
                ("record", ()),
                ("spec", ()),
                ("report", ()),
                ("report_html", ()),
                ("figure", ()),
            )
        ),
        L["reference_stats"](fp, sha, 180),
        L["training_features"](fp, sha, 1000),
        L["extractor"]("inception-v3-standin-seed0.pth"),
        L["model_current"]("default"),
        L["model_history"]("default"),
        L["model_checkpoint"]("default", step),
        L["model_champion"]("default", step),
        L["train_history"](run),
        L["tensorboard_file"](run, "events.out.tfevents.1764100000.host.123.0"),
        *(
            L[f"lease_{name}"](L[f"{owner}_lease_prefix"](of), *token)
            for owner, of in (("run", run), ("model", "default"))
            for name, token in (("object", ()), ("claim", ("0123456789abcdef",)))
        ),
    ]
    L["checkpoints_prefix"](run), L["reference_stats_prefix"](fp), L["extractors_prefix"]()
    L["model_prefix"]("default"), L["run_prefix"](run), L["part"]("x", "x")
    L["tensorboard_prefix"](run), L["phema_snapshots_prefix"](run)
    L["sweep_tune_prefix"](L["sweep_prefix"]("lr"))
    # The folders retention lists (tasks/retention/): each holds the keys its builders make.
    folders = {
        L["datasets_root"](): L["dataset_manifest"](ds),
        L["runs_root"](): L["run_config"](run),
        L["sample_sets_prefix"](run): L["sample_manifest"](samples),
        L["evals_prefix"](run): L["eval_metrics"](evals),
        L["nightlies_prefix"](run): L["nightly_latest"](run),
        L["stats_root"](): L["reference_stats"](fp, sha, 180),
        L["models_root"](): L["model_current"]("default"),
    }
    assert all(key.startswith(folder + "/") for folder, key in folders.items()), folders
    # A lease's claims are told from its lease object and from one another's folders.
    lease = L["run_lease_prefix"](run)
    assert L["is_lease_claim"](lease, layout.lease_claim(lease, "abc123"))
    assert not any(L["is_lease_claim"](lease, k) for k in keys if "/claim-" not in k)
    # A snapshot's key gives back its width and step, exactly; no other key does.
    for sigma_rel in (0.05, 0.1, 1 / 30, 1e-5):
        assert L["phema_snapshot_of"](run, layout.phema_snapshot(run, sigma_rel, step)) == (
            sigma_rel,
            step,
        )
    assert not any(L["phema_snapshot_of"](run, k) for k in keys if "/snapshots/" not in k)
    # The champion records are told from the other files of a model's folder.
    champion = L["model_champion"]("default", step)
    assert L["is_model_champion"]("default", champion)
    assert not any(L["is_model_champion"]("default", k) for k in keys if k != champion), (
        "is_model_champion matched another key"
    )
    return keys, called


def _readme_patterns() -> list[tuple[str, re.Pattern[str]]]:
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Artifact layout\n[^#]*?```\n(.*?)```", text, re.S)
    assert block, "README.md has no '## Artifact layout' code block"
    patterns = []
    for line in block.group(1).splitlines()[1:]:  # the first line is <storage.root>/
        directory = ""
        for token in line.split():
            if token == "...":
                continue
            if "/" in token:
                directory, name = token.rsplit("/", 1)
            else:
                name = token
            path = f"{directory}/{name}"
            regex = re.escape(path)
            regex = re.sub(r"\\<[^>]*\\>|<[^>]*>", "[^/]+", regex)
            regex = re.sub(
                r"\\\{([^}]*)\\\}", lambda m: "(" + m.group(1).replace(",", "|") + ")", regex
            )
            regex = re.sub(r"\d+", r"\\d+", regex)
            patterns.append((path, re.compile(regex + "$")))
    return patterns


def test_readme_layout_matches_the_layout_module() -> None:
    keys, called = _layout_keys()
    public = {n for n, _ in inspect.getmembers(layout, inspect.isfunction) if not n.startswith("_")}
    assert public <= called, f"layout functions the test does not exercise: {public - called}"
    patterns = _readme_patterns()
    assert len(patterns) >= 15
    undocumented = [k for k in keys if not any(p.match(k) for _, p in patterns)]
    assert undocumented == [], f"keys the README's layout does not show: {undocumented}"
    unbuilt = [text for text, p in patterns if not any(p.match(k) for k in keys)]
    assert unbuilt == [], f"README layout entries the layout module never builds: {unbuilt}"


@pytest.mark.parametrize("bad", ["..", "../x", "a/b", "", ".hidden", "a b", "x" * 129])
def test_key_parts_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="cannot be part of a storage key"):
        layout.model_current(bad)
