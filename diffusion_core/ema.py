"""Exponential moving average of model weights (Polyak averaging), as used to sample from DDPMs."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from diffusion_core.perf import unwrap_model


def ema_decay(step: int, decay: float, warmup_steps: int) -> float:
    """Effective decay at optimizer step `step` (0-based): a linear warmup.

        decay_t = decay * min(1, step / warmup_steps)     (decay_t = decay if warmup_steps == 0)

    At step 0 the average becomes a copy of the weights, so it forgets the random initialisation
    at once; from `warmup_steps` on it averages over about `1 / (1 - decay)` steps.
    """
    if warmup_steps > 0:
        return decay * min(1.0, step / warmup_steps)
    return decay


class EMA:
    """Holds `self.model`, a frozen eval-mode copy of a model whose weights track an EMA.

    `update(model, step)` does `ema = d * ema + (1 - d) * param` for every parameter with
    `d = ema_decay(step, decay, warmup_steps)`, and copies buffers (e.g. norm statistics) as-is.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup_steps: int = 0) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay!r} is invalid: expected 0 <= decay < 1")
        if warmup_steps < 0:
            raise ValueError(f"EMA warmup_steps={warmup_steps!r} is invalid: expected >= 0")
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.num_updates = 0
        self.model = copy.deepcopy(unwrap_model(model)).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> float:
        """Move the average towards `model`'s weights; returns the decay used."""
        d = ema_decay(step, self.decay, self.warmup_steps)
        src = unwrap_model(model)
        ema_params: list[torch.Tensor] = list(self.model.parameters())
        params = [p.detach() for p in src.parameters()]
        if len(ema_params) != len(params):
            raise ValueError(
                f"EMA.update got a model with {len(params)} parameters; "
                f"the average holds {len(ema_params)}"
            )
        if ema_params:
            if ema_params[0].dtype != params[0].dtype:
                params = [p.to(e.dtype) for p, e in zip(params, ema_params, strict=True)]
            # ema <- ema + (1 - d) * (param - ema), one fused kernel per dtype/device group.
            torch._foreach_lerp_(ema_params, params, 1.0 - d)
        for ema_buf, buf in zip(self.model.buffers(), src.buffers(), strict=True):
            ema_buf.copy_(buf)
        self.num_updates += 1
        return d

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume exactly: the averaged weights and the schedule state."""
        return {
            "model": self.model.state_dict(),
            "decay": self.decay,
            "warmup_steps": self.warmup_steps,
            "num_updates": self.num_updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"model", "decay", "warmup_steps", "num_updates"} - set(state)
        if missing:
            raise ValueError(f"EMA state is missing keys {sorted(missing)}")
        self.model.load_state_dict(state["model"])
        self.decay = float(state["decay"])
        self.warmup_steps = int(state["warmup_steps"])
        self.num_updates = int(state["num_updates"])
