"""What a stage costs (`tasks.usage`): the local store counts each file operation as the request
it stands for, usages add up, prices turn into a cost line, and the report shows both."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import ConfigError, PipelineConfig, PricesConfig, StorageConfig, load_config
from tasks.records import StageTiming
from tasks.report.costs import night_usage, usage_blocks
from tasks.report.document import Table, Text
from tasks.storage import Store
from tasks.usage import StageMeter, Usage, cost, process_usage
from tests.support.records import write_two_nights


def test_a_local_store_counts_each_operation_and_its_bytes(tmp_path: Path) -> None:
    store = Store(StorageConfig(root=str(tmp_path)))
    meter = StageMeter()
    store.write_bytes("a/x.bin", b"x" * 1000)
    with store.open_atomic("a/y.bin") as f:
        f.write(b"y" * 500)
    assert store.read_bytes("a/x.bin") == b"x" * 1000
    with store.open_read("a/y.bin") as f:
        assert f.read() == b"y" * 500
    assert store.exists("a/x.bin") and store.size("a/y.bin") == 500
    assert store.list("a") == ["a/x.bin", "a/y.bin"]
    store.delete("a/x.bin")
    used = meter.stop()
    assert used.requests == {"put": 2, "get": 2, "head": 2, "list": 1, "delete": 1}
    assert (used.bytes_written, used.bytes_read) == (1500, 1500)
    assert used.cpu_s >= 0 and used.gpu_s == 0  # no GPU outside a Ray worker holding one


def test_usages_add_and_subtract_by_kind() -> None:
    a = Usage(cpu_s=2, gpu_s=1, bytes_read=10, bytes_written=5, requests={"get": 3, "put": 1})
    b = Usage(cpu_s=1, bytes_read=1, requests={"get": 1, "list": 2})
    assert (a + b).requests == {"get": 4, "put": 1, "list": 2}
    assert (a + b - b) == a
    assert "3 requests" not in (a + b).describe() and "7 requests" in (a + b).describe()
    before = process_usage()
    sum(i * i for i in range(200_000))  # some CPU
    assert (process_usage() - before).cpu_s > 0


def test_prices_turn_usage_into_a_cost() -> None:
    used = Usage(
        cpu_s=7200, gpu_s=1800, bytes_written=2_000_000_000, requests={"put": 2000, "get": 10_000}
    )
    prices = PricesConfig(
        gpu_hour=2.0, cpu_hour=0.05, per_1000_requests={"put": 0.005, "get": 0.0004}, gb_month=0.02
    )
    c = cost(used, prices)
    assert c.gpu == pytest.approx(1.0) and c.cpu == pytest.approx(0.1)
    assert c.requests == pytest.approx(0.01 + 0.004)
    assert c.total == pytest.approx(1.114) and c.storage_per_month == pytest.approx(0.04)
    assert c.describe().startswith("1.114 USD = GPU 1 (0.5 GPU-h x 2)")


def test_prices_are_a_typed_optional_section() -> None:
    assert PipelineConfig().prices is None
    cfg = load_config(
        None, ["prices.gpu_hour=2.5", "prices.per_1000_requests={put: 0.005, part: 0.005}"]
    )
    assert cfg.prices == PricesConfig(gpu_hour=2.5, per_1000_requests={"put": 0.005, "part": 0.005})
    assert PipelineConfig.model_validate(cfg.model_dump(mode="json")) == cfg
    with pytest.raises(ConfigError, match="per_1000_requests"):
        load_config(None, ["prices.per_1000_requests={posts: 1}"])
    with pytest.raises(ConfigError, match="gpu_hour"):
        load_config(None, ["prices.gpu_hour=-1"])


def test_the_report_shows_each_stages_usage_and_the_cost(tmp_path: Path) -> None:
    summary = write_two_nights(Store(StorageConfig(root=str(tmp_path))))
    assert usage_blocks(summary) == []  # nights recorded before usage was counted
    stages = [
        StageTiming(
            name="train",
            seconds=10,
            detail="",
            usage=Usage(cpu_s=30, gpu_s=20, bytes_written=3_000_000, requests={"put": 2}),
        ),
        StageTiming(name="sample", seconds=5, detail="", usage=Usage(requests={"get": 1})),
    ]
    total = night_usage(stages)
    priced = summary.model_copy(
        update={"stages": stages, "cost": cost(total, PricesConfig(gpu_hour=3.6))}
    )
    table, line = usage_blocks(priced)
    assert isinstance(table, Table) and isinstance(line, Text)
    assert table.rows[-1] == ["total", "30.0", "20.0", "0 B", "3.0 MB", "3 (get 1, put 2)"]
    assert line.text.startswith("Cost of the night: 0.02 USD = GPU 0.02")
