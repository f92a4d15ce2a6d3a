"""Checkpoint bytes: exact round trip, config survives, code-carrying pickles are refused."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import pytest
import torch

from diffusion_core.checkpoint import load_checkpoint, save_checkpoint
from diffusion_core.ema import EMA
from diffusion_core.unet import UNet, UNetConfig
from tasks.errors import describe_failure

CFG = UNetConfig(base_channels=16, groups=4, num_classes=2)


def _trained_state() -> dict:
    torch.manual_seed(0)
    net = UNet(CFG)
    ema = EMA(net, decay=0.9, warmup_steps=10)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    for step in range(2):
        x = torch.randn(2, 1, 16, 16)
        net(x, torch.tensor([1, 2]), torch.tensor([0, 1])).square().mean().backward()
        opt.step()
        opt.zero_grad()
        ema.update(net, step)
    return {
        "model": net.state_dict(),
        "ema": ema.state_dict(),
        "optimizer": opt.state_dict(),
        "step": 2,
        "config": CFG.to_dict(),
        "rng": torch.get_rng_state(),
        "extra": {"seeds": [1, 2, 3], "note": "run 7"},
    }


def _assert_equal(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b)
        for key in a:
            _assert_equal(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)  # type: ignore[arg-type]
        for x, y in zip(a, b, strict=True):  # type: ignore[call-overload]
            _assert_equal(x, y)
    else:
        assert a == b


def test_round_trip_is_exact() -> None:
    state = _trained_state()
    loaded = load_checkpoint(save_checkpoint(state))
    for key in ("model", "ema", "optimizer", "step", "rng", "extra", "config"):
        _assert_equal(state[key], loaded[key])
    assert UNetConfig.from_dict(loaded["config"]) == CFG
    net = UNet(UNetConfig.from_dict(loaded["config"]))
    net.load_state_dict(loaded["model"])


def test_compile_and_ddp_prefixes_are_stripped() -> None:
    sd = UNet(CFG).state_dict()
    wrapped = {f"module._orig_mod.{k}": v for k, v in sd.items()}
    loaded = load_checkpoint(save_checkpoint({"model": wrapped, "step": 0, "config": {}}))
    assert list(loaded["model"]) == list(sd)


class _Exploit:
    def __reduce__(self):  # noqa: D105 - a payload that would create a file if unpickled
        return (os.system, (f"touch {self.marker}",))

    marker = ""


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_malicious_pickle_is_rejected_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    _Exploit.marker = str(marker)
    for data in (pickle.dumps(_Exploit()), _torch_saved({"model": _Exploit(), "step": 1})):
        with pytest.raises(ValueError, match="not a safe checkpoint") as err:
            load_checkpoint(data)
        # What the user reads (the CLI's one line) is ours, and names what was refused; never
        # PyTorch's advice to load the file unsafely.
        shown = describe_failure(err.value)
        assert shown.startswith("not a safe checkpoint") and "\n" not in shown
        assert "weights_only" not in shown and "trusted source" not in shown
    assert "GLOBAL" in shown and "system" in shown
    assert not marker.exists()


def _torch_saved(obj: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def test_other_bytes_and_bad_state_give_clear_errors() -> None:
    with pytest.raises(ValueError, match="not a safe checkpoint"):
        load_checkpoint(b"definitely not a checkpoint")
    with pytest.raises(ValueError, match="format"):
        load_checkpoint(_torch_saved({"weights": torch.zeros(1)}))
    with pytest.raises(ValueError, match="missing"):
        save_checkpoint({"model": {}})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint({"model": {}, "step": 0, "config": {"x": object()}})
