"""The plan as text (a table per rank) and the limits a run is checked against (this machine's or given)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.errors import QuantkitError
from quantkit.planner import Plan, check_plan, human


def available_host_bytes() -> int | None:
    """Memory a new run may still take on this machine: MemAvailable, or less under this process's memory cgroup
    (v2 memory.max, v1 memory.limit_in_bytes, less what the cgroup already uses)."""
    available = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    except OSError:
        return None
    room = _cgroup_room()
    return room if available is None else available if room is None else min(available, room)


def _cgroup_room() -> int | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hid, controllers, rel = line.split(":", 2)
        if hid == "0" and controllers == "":
            where, files = Path("/sys/fs/cgroup") / rel.lstrip("/"), ("memory.max", "memory.current")
        elif "memory" in controllers.split(","):
            where, files = Path("/sys/fs/cgroup/memory") / rel.lstrip("/"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        try:
            limit, usage = (where / files[0]).read_text().strip(), int((where / files[1]).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            return max(0, int(limit) - usage)
    return None


def device_bytes(device: str) -> int | None:
    """Total memory of a CUDA device (None for the CPU or where CUDA is absent)."""
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(torch.device(device)).total_memory


def render(plan: Plan, device_limit: int | None, host_limit: int | None) -> str:
    """The plan as lines of text: the run, each rank's peaks and their terms, disk, time."""
    s = plan.settings
    lines = [f"plan for {plan.shape.name}: {plan.shape.describe()}",
             f"run: {s.method}{' + FP target' if s.uses_fp_target else ''} w{s.bits} g{s.group_size}, "
             f"{s.nsamples} x {s.seqlen} tokens, {s.nproc} rank(s) on {s.device}"
             + (", --low-memory" if s.low_memory else "") + (", --offload-dir" if s.offload_dir else "")]
    shown = plan.ranks if len(plan.ranks) <= 2 else [plan.ranks[0], max(plan.ranks[1:], key=lambda r: r.peak_host_bytes)]
    for rank in shown:
        lines.append(f"rank {rank.rank} ({rank.samples} samples):")
        if s.on_gpu:
            limit = f" of {human(device_limit)}" if device_limit else ""
            lines.append(f"  device peak {human(rank.peak_device_bytes)}{limit} at {rank.device_phase.name}:")
            lines += _terms(rank.device_phase.device)
        lines.append(f"  host peak {human(rank.peak_host_bytes)} at {rank.host_phase.name}:")
        lines += _terms(rank.host_phase.host)
    if len(plan.ranks) > 1:
        limit = f" of {human(host_limit)} available" if host_limit else ""
        lines.append(f"host, all ranks: {human(plan.peak_host_bytes)}{limit}")
    disk = ", ".join(f"{k.replace('_', ' ')} {human(v)}" for k, v in plan.disk.items() if k != "total")
    lines.append(f"disk: {disk} (total {human(plan.disk['total'])})")
    t = plan.seconds
    if t.get("total") is None:
        lines.append(f"time: {t['note']}")
    else:
        lines.append(f"time: about {_duration(t['total'])} ({t['note']}; rates: {t['rates']})")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def _terms(terms) -> list[str]:
    return [f"    {t.name:<26} {human(t.bytes):>10}  {t.detail}" for t in sorted(terms, key=lambda t: -t.bytes) if t.bytes]


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def emit(plan: Plan, device_limit: int | None, host_limit: int | None, as_json: bool) -> None:
    """Print the plan (text, or one JSON object), then refuse with one line (QuantkitError: exit 2) if it does
    not fit in `device_limit` per GPU and `host_limit` on the host."""
    problem = None
    try:
        check_plan(plan, device_limit, host_limit)
    except QuantkitError as err:
        problem = str(err)
    if as_json:
        click.echo(json.dumps(plan.to_dict() | {"device_limit_bytes": device_limit, "host_limit_bytes": host_limit,
                                                "fits": problem is None, "problem": problem}))
    else:
        click.echo(render(plan, device_limit, host_limit))
    if problem is not None:
        raise QuantkitError(problem)
