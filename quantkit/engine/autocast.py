"""The caller's torch.autocast is no part of a calibration: autocast is thread-local state that reaches every
forward run under it, so quantize() called inside `torch.autocast("cpu", dtype=torch.bfloat16)` captured bfloat16
activations and Hessians and exported another model than the same call outside it, without a word."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch


def autocast_off(devices: Iterable[object] = ()) -> contextlib.ExitStack:
    """A context with autocast off on the CPU and on each device type of `devices` (device strings such as
    "cuda:1", torch.devices, GPU ids as ints) where the caller turned it on; elsewhere it changes nothing."""
    kinds = ["cpu"]
    for device in devices:
        if isinstance(device, torch.device):
            kinds.append(device.type)
        elif isinstance(device, int) and not isinstance(device, bool):
            kinds.append("cuda")
        elif isinstance(device, str):
            kinds.append(device.split(":")[0])
    stack = contextlib.ExitStack()
    for kind in dict.fromkeys(kinds):
        try:
            on = torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
        except RuntimeError:  # not a device type torch knows ("auto"): the run's own checks name it
            on = False
        if on:
            stack.enter_context(torch.autocast(kind, enabled=False))
    return stack


def model_devices(model: object) -> list[torch.device]:
    """The devices a loaded model's parameters sit on (none for anything else)."""
    params = getattr(model, "parameters", None)
    return list({p.device for p in params()}) if callable(params) else []
