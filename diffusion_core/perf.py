"""Speed helpers: memory format, torch.compile and autocast, applied the same way everywhere."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def configure_model_for_device(
    model: nn.Module, device: torch.device | str, *, channels_last: bool, compile: bool
) -> nn.Module:
    """Move `model` to `device`, optionally to channels_last and through `torch.compile`.

    Returns the module to call (the compiled wrapper when `compile=True`); its parameters are
    the original module's, so optimizers and EMA may use either. Inputs should then be made
    channels_last by the caller too (`x.contiguous(memory_format=torch.channels_last)`).
    """
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)  # type: ignore[assignment]
    return model


@contextlib.contextmanager
def autocast(
    device: torch.device | str, enabled: bool, dtype: torch.dtype = torch.bfloat16
) -> Iterator[None]:
    """Mixed precision on `device` when `enabled`; a no-op context otherwise (also on CPU)."""
    device_type = torch.device(device).type
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device_type, dtype=dtype):
        yield


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under torch.compile (`_orig_mod`) and (Distributed)DataParallel wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model
