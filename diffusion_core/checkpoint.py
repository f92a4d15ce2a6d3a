"""Training checkpoints as bytes that load without executing code.

The payload is a `torch.save` archive of plain containers, tensors and numbers, read back with
`torch.load(weights_only=True)`, whose unpickler refuses anything else (no `__reduce__` calls).
JSON-able parts (the resolved config, `extra`) are stored as JSON strings so they survive that
restricted loader unchanged and can be read by tools that know nothing of torch.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from typing import Any

import torch
from torch import Tensor

FORMAT = "diffusion_core.checkpoint"
VERSION = 1
_REQUIRED = ("model", "step", "config")
_OPTIONAL_STATES = ("ema", "optimizer", "rng", "phema")


def strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop `_orig_mod.` (torch.compile) and leading `module.` (DDP) from state-dict keys."""
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        new_key = key
        while True:
            stripped = re.sub(r"(^|\.)_orig_mod\.", r"\1", new_key)
            stripped = re.sub(r"^module\.", "", stripped)
            if stripped == new_key:
                break
            new_key = stripped
        if new_key in out:
            raise ValueError(f"state dict keys collide after stripping wrapper prefixes: {key!r}")
        out[new_key] = value
    return out


def save_checkpoint(state: dict[str, Any]) -> bytes:
    """Serialize a training state to bytes.

    `state` keys: `model` (state_dict), `step` (int), `config` (JSON-able dict), and optionally
    `ema` (EMA.state_dict()), `phema` (PowerEMA.state_dict()), `optimizer` (state_dict), `rng`
    (tensors, e.g. `torch.get_rng_state()`, or a dict/list of them) and `extra` (JSON-able).
    Unknown keys raise.
    """
    missing = [k for k in _REQUIRED if k not in state]
    if missing:
        raise ValueError(f"checkpoint state is missing {missing}; it needs {list(_REQUIRED)}")
    unknown = sorted(set(state) - set(_REQUIRED) - set(_OPTIONAL_STATES) - {"extra"})
    if unknown:
        raise ValueError(
            f"checkpoint state has unknown keys {unknown}; put JSON-able extras under 'extra'"
        )
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool):
        raise ValueError(f"checkpoint step={step!r} is invalid: expected an int")
    payload: dict[str, Any] = {
        "format": FORMAT,
        "version": VERSION,
        "model": strip_wrapper_prefixes(state["model"]),
        "step": step,
        "config_json": _to_json("config", state["config"]),
        "extra_json": _to_json("extra", state.get("extra", {})),
    }
    for key in _OPTIONAL_STATES:
        if key in state and state[key] is not None:
            payload[key] = state[key]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def load_checkpoint(data: bytes, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Inverse of `save_checkpoint`: the same dict, with `config` and `extra` as Python objects.

    Raises ValueError("... not a safe checkpoint ...") for bytes the restricted loader refuses
    (e.g. a pickle that would run code) and ValueError for archives of another format.
    """
    try:
        payload = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError) as exc:
        raise ValueError(
            f"not a safe checkpoint ({len(data)} bytes): the weights-only loader refused it: "
            f"{_refusal(exc)}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(
            f"not a {FORMAT} archive: expected a dict with format={FORMAT!r}, "
            f"got {type(payload).__name__}"
        )
    if payload.get("version") != VERSION:
        raise ValueError(f"checkpoint version {payload.get('version')!r} unsupported ({VERSION})")
    state: dict[str, Any] = {
        "model": payload["model"],
        "step": payload["step"],
        "config": json.loads(payload["config_json"]),
        "extra": json.loads(payload["extra_json"]),
    }
    for key in _OPTIONAL_STATES:
        if key in payload:
            state[key] = payload[key]
    return state


def _to_json(name: str, value: Any) -> str:
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"checkpoint {name} must be JSON-able: {exc}") from exc


def _refusal(exc: BaseException) -> str:
    """What the weights-only loader objected to, without PyTorch's advice to load the file
    unsafely (`weights_only=False`), which must never reach a user."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    specific = [line for line in lines if "GLOBAL" in line or "Unsupported" in line]
    safe = [line for line in lines if "weights_only" not in line and "trusted source" not in line]
    return (specific or safe or [type(exc).__name__])[0]
