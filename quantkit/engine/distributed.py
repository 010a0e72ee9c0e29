"""Several ranks for one calibration: local spawning (with failure monitoring) and torchrun.

`spawn_ranks` starts N local processes with torch.multiprocessing, watches them, and when one
raises or dies ends the others and raises a QuantkitError naming the rank and the layer it was
on. Local ranks meet through a file in a private temporary folder rather than a TCP port, so no
other process can take their rendezvous between choosing it and binding it. Under torchrun
(RANK/WORLD_SIZE/MASTER_ADDR set) `init_from_env` joins the group instead.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from quantkit.engine.comm import TorchComm
from quantkit.errors import QuantkitError

ENV_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR")


def check_device_ids(devices: Iterable[int] | None, nproc: int) -> None:
    """--devices gives one GPU id per rank: a rank without one would fail after the others started."""
    ids = list(devices or [])
    if under_torchrun():  # torchrun's ranks on this machine read --devices by their local rank
        ranks, flag = int(os.environ.get("LOCAL_WORLD_SIZE", len(ids))), "torchrun's local"
    else:
        ranks, flag = nproc, f"--nproc {nproc}"
    if ids and len(ids) != ranks:
        raise QuantkitError(f"--devices lists {len(ids)} GPU id(s) for {flag} rank(s) ({ranks}); give one id per rank")


def check_device(device: str, devices: Iterable[int] | None = None, nproc: int = 1) -> None:
    """Refuse a device string torch cannot parse, CUDA where there is none, and GPU ids that do not exist."""
    check_device_ids(devices, nproc)
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise QuantkitError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    ids = list(devices or [])
    if dev.type == "cpu":
        if ids:
            raise QuantkitError("--devices names GPUs but --device is cpu; pass --device cuda or drop --devices")
        return
    if dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise QuantkitError(f"--device {device}: MPS is not available on this machine; use --device cpu")
        return
    if dev.type != "cuda":
        raise QuantkitError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only torch build" if torch.version.cuda is None else "no GPU visible"
        raise QuantkitError(f"--device {device}: CUDA is not available ({build}); use --device cpu")
    count = torch.cuda.device_count()
    if dev.index is not None:
        ids.append(dev.index)
    elif not ids and nproc > count:
        raise QuantkitError(f"--nproc {nproc} needs {nproc} GPUs but this machine has {count}; lower --nproc")
    for index in ids:
        if not 0 <= index < count:
            raise QuantkitError(f"GPU {index} does not exist: this machine has {count} (ids 0..{count - 1})")



def under_torchrun() -> bool:
    """Whether this process was started by torchrun (or another env:// launcher)."""
    return all(key in os.environ for key in ENV_KEYS)


def rank_device(device: str, rank: int, devices: list[int] | None) -> str:
    """The compute device of `rank`: cpu stays cpu; cuda maps ranks onto `devices` (or 0..N-1)."""
    if not device.startswith("cuda"):
        return device
    if devices:
        if rank >= len(devices):
            raise QuantkitError(f"--devices lists {len(devices)} GPUs for more ranks; give one per rank")
        return f"cuda:{devices[rank]}"
    return f"cuda:{rank}"


def backend_for(device: str) -> str:
    """NCCL for GPU devices, gloo for CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def init_group(rank: int, world_size: int, device: str, timeout_s: float, on_layer=None,
               init_method: str = "env://") -> TorchComm:
    """Join the process group (env:// rendezvous unless `init_method` says otherwise) and return its communicator."""
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    with _held_native_stderr():
        dist.init_process_group(
            backend_for(device), init_method=init_method, rank=rank, world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    return TorchComm(device if device.startswith("cuda") else "cpu", on_layer=on_layer)


@contextlib.contextmanager
def _held_native_stderr():
    """torch's C++ store writes each failed connect to the rendezvous (with a 59-frame C++ stack) straight to file
    descriptor 2: held back while the group forms, written out after a join that succeeds, dropped after one that
    fails (its caller's one error line says why). Left as it is where there is no descriptor 2 to hold."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        joined = False
        try:
            yield
            joined = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if joined and held.seek(0) == 0 and (said := held.read()):
                os.write(2, said)


def init_from_env(device: str, devices: list[int] | None, timeout_s: float) -> tuple[TorchComm, str]:
    """Join a torchrun-started group; return the communicator and this rank's device."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    mine = rank_device(device, local, devices)
    try:
        return init_group(rank, world, mine, timeout_s), mine
    except (RuntimeError, ValueError) as err:  # DistStoreError / DistNetworkError: the other ranks never came
        said = ", ".join(f"{k}={os.environ[k]}" for k in (*ENV_KEYS, "MASTER_PORT") if k in os.environ)
        raise QuantkitError(f"the environment makes this rank {rank} of {world} ({said}), and the group did not form "
                            f"within --dist-timeout {timeout_s:g} s ({str(err).splitlines()[0]}); start every rank "
                            "with torchrun, or unset those variables for a one-process run") from None


def _rank_entry(rank: int, world: int, job: Callable, kwargs: dict, progress, error_dir: str,
                device: str, devices: list[int] | None, timeout_s: float, threads: int) -> None:
    """Body of one spawned rank: join the group, run `job`, record any failure for the parent."""
    import threading

    from tqdm import tqdm

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    # tqdm's default lock is a multiprocessing semaphore, which a killed rank leaves for the resource tracker to
    # report as leaked; only rank 0 draws a bar, so a thread lock is enough
    tqdm.set_lock(threading.RLock())

    def on_layer(index: int) -> None:
        progress[rank] = index

    try:
        mine = rank_device(device, rank, devices)
        rendezvous = "file://" + str(Path(error_dir, "rendezvous"))
        comm = init_group(rank, world, mine, timeout_s, on_layer=on_layer, init_method=rendezvous)
        job(comm=comm, device=mine, **kwargs)
        dist.destroy_process_group()
        return
    except KeyboardInterrupt:
        pass  # the parent's _stop: unwound (rank 0's progress bar closed its line)
    except BaseException as err:
        record = {"rank": rank, "layer": progress[rank], "time": time.time(),
                  "error": f"{type(err).__name__}: {err}".splitlines()[0],
                  "quantkit": isinstance(err, QuantkitError), "traceback": traceback.format_exc()}
        # written whole then renamed: the parent's SIGTERM can land mid-write when a peer died first
        partial = Path(error_dir, f"rank{rank}.json.partial")
        partial.write_text(json.dumps(record))
        os.replace(partial, Path(error_dir, f"rank{rank}.json"))
        raise
    # an interrupted rank leaves at once: its process group's teardown at exit waits on the other ranks (it hangs)
    os._exit(130)  # 128 + SIGINT, as a shell reports it


def spawn_ranks(nproc: int, job: Callable, kwargs: dict, device: str = "cpu", devices: list[int] | None = None,
                timeout_s: float = 600.0, threads: int = 1) -> None:
    """Run `job(comm=, device=, **kwargs)` on `nproc` local ranks; raise QuantkitError if one fails.

    When a rank raises or dies, the others are terminated at once (no waiting on collectives),
    and the error names the failing rank and the layer it was calibrating.
    """
    context = mp.get_context("spawn")
    progress = context.Array("i", [-1] * nproc, lock=False)
    with tempfile.TemporaryDirectory(prefix="quantkit-ranks-") as error_dir:
        args = (nproc, job, kwargs, progress, error_dir, device, devices, timeout_s, threads)
        procs = mp.start_processes(_rank_entry, args=args, nprocs=nproc, join=False, start_method="spawn")
        # torch logs each rank it ends after one fails ('Terminating process N via signal SIGTERM'), which the one
        # error line says already; and a rank that cannot take SIGTERM (stopped) is killed after 2 s, not 30
        spawn_log = logging.getLogger("torch.multiprocessing.spawn")
        level = spawn_log.level
        spawn_log.setLevel(logging.ERROR)
        try:
            while not procs.join(timeout=1.0, grace_period=2.0):
                pass
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            raise QuantkitError(_failure_message(err, error_dir, progress)) from None
        except BaseException:
            _stop(procs.processes)
            raise
        finally:
            spawn_log.setLevel(level)


def _stop(processes: list, grace_s: float = 5.0) -> None:
    """End the ranks of an interrupted run as a single process ends: SIGINT, so each unwinds (rank 0 ends its
    progress bar's line, each frees its semaphores: killed ranks leave them for the resource tracker to report
    as leaked), then SIGKILL what still runs after `grace_s` (a rank stuck in a collective)."""
    import signal

    alive = [proc for proc in processes if proc.is_alive()]
    for proc in alive:
        os.kill(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + grace_s
    for proc in alive:
        proc.join(max(0.0, deadline - time.monotonic()))
    stuck = [proc for proc in alive if proc.is_alive()]
    for proc in stuck:
        proc.kill()
        proc.join()
    if stuck:
        print(file=sys.stderr, flush=True)  # a killed rank 0 leaves its progress bar's line open


def _failure_message(err: Exception, error_dir: str, progress) -> str:
    """One line naming the rank that failed first, the layer it was on, and why."""
    records = [json.loads(p.read_text()) for p in Path(error_dir).glob("rank*.json")]
    if isinstance(err, mp.ProcessExitedException) and err.signal_name:
        rank = err.error_index
        if not any(r["rank"] == rank for r in records):
            layer = progress[rank]
            where = f"layer {layer}" if layer >= 0 else "start-up (before layer 0)"
            return f"calibration rank {rank} died ({err.signal_name}) at {where}; the other ranks were stopped, nothing was exported"
    if records:
        first = min(records, key=lambda r: r["time"])
        layer = first["layer"]
        where = f"layer {layer}" if layer >= 0 else "start-up (before layer 0)"
        return f"calibration rank {first['rank']} failed at {where}: {first['error']}; the other ranks were stopped, nothing was exported"
    rank = getattr(err, "error_index", "?")
    return f"calibration rank {rank} failed: {str(err).splitlines()[0] if str(err) else type(err).__name__}"

