"""Low-memory calibration: the StreamedLayers store of the outer loop (quantkit.engine.driver).

The model is a meta-device skeleton (quantkit.models.streamed); each decoder layer is read from the
safetensors files when it is calibrated and written to a work area when done (and freed), and an
interrupted run resumes from the last finished layer. With several ranks every rank streams the
current layer and holds only its shard of the activations; rank 0 writes the layer files.

Work area (`work_dir`, beside the output as OUT.partial): state.json (settings, ranks and the number
of finished layers), layer_NNNNN.safetensors (that layer's quantized codes and its FP tensors) and
hidden_NNNNN_rankR.safetensors (rank R's inputs of layer NNNNN, both streams). A run killed at any
point resumes from the last finished layer and produces byte-identical tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quantkit.engine.capture import LayerInputs
from quantkit.engine.checks import check_layer
from quantkit.engine.comm import Comm
from quantkit.engine.driver import Calibration, run_layers
from quantkit.engine.plan import LinearPlan
from quantkit.engine.weights import TokenWeights
from quantkit.errors import QuantkitError, first_line
from quantkit.fsutil import atomic_file, remove_created
from quantkit.memory import fix_mmap_threshold, trim_heap
from quantkit.models.base import Adapter
from quantkit.models.streamed import (
    WeightSource,
    load_layer,
    read_safetensors,
    safetensors_keys,
)
from quantkit.quant.spec import QuantResult

STATE = "state.json"


def release_layer(model: nn.Module, adapter: Adapter, index: int) -> None:
    """Put decoder layer `index` back on the meta device, freeing its memory."""
    layers = adapter.decoder_layers(model)
    layers[index] = layers[index].to("meta")
    trim_heap()


class DiskHidden:
    """A list of per-sample hidden states kept as files in a directory (--offload-dir)."""

    def __init__(self, directory: str | os.PathLike, items: Sequence[torch.Tensor]) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.count = len(items)
        for i, item in enumerate(items):
            self[i] = item

    def _path(self, index: int) -> Path:
        return self.dir / f"hidden_{index:06d}.pt"

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.load(self._path(index), weights_only=True)

    def __setitem__(self, index: int, value: torch.Tensor) -> None:
        torch.save(value.contiguous(), self._path(index))


def _layer_file(work: Path, index: int) -> Path:
    return work / f"layer_{index:05d}.safetensors"


def _save_layer(work: Path, layer: nn.Module, index: int, adapter: Adapter, results: dict[str, QuantResult]) -> None:
    tensors = {}
    for name, r in results.items():
        tensors.update(r.to_tensors(f"q.{name}"))
    quantized = {f"{name}.weight" for name in results}
    prefix = adapter.layer_prefix(index)
    for key, value in layer.state_dict().items():
        if f"{prefix}.{key}" not in quantized:
            tensors[f"fp.{prefix}.{key}"] = value.detach().contiguous()
    with atomic_file(_layer_file(work, index)) as tmp:
        save_file(tensors, str(tmp))


def _load_layer_file(path: Path, plan: LinearPlan) -> tuple[dict[str, QuantResult], dict[str, torch.Tensor]]:
    try:
        tensors = read_safetensors(path)
    except Exception as err:  # noqa: BLE001 - a file cut short or deleted fails inside safetensors
        raise QuantkitError(f"{path} cannot be read ({first_line(err)}); the work area is damaged: rerun without "
                            "--resume") from None
    fp = {k[3:]: v for k, v in tensors.items() if k.startswith("fp.")}
    names = sorted({k[2:].rsplit(".", 1)[0] for k in tensors if k.startswith("q.")})
    return {name: QuantResult.from_tensors(tensors, f"q.{name}", plan.spec_for(name)) for name in names}, fp


def _write_state(work: Path, state: dict) -> None:
    with atomic_file(work / STATE) as tmp:
        tmp.write_text(json.dumps(state, indent=1))


def read_state(work: str | os.PathLike) -> dict | None:
    """The work area's state (settings and finished layers), or None if there is none."""
    path = Path(work) / STATE
    return json.loads(path.read_text()) if path.is_file() else None


def _files(fingerprint: object, role: str) -> dict[str, list]:
    """A fingerprint's files of one role ("files": {role: [[path, size, digest], ...]}) by path ({} if unreadable)."""
    files = fingerprint.get("files") if isinstance(fingerprint, dict) else None
    entries = files.get(role) if isinstance(files, dict) else None
    return {e[0]: e[1:] for e in entries if isinstance(e, list) and e and isinstance(e[0], str)} \
        if isinstance(entries, list) else {}


def _difference(old: object, new: dict) -> str:
    """Why an interrupted run's fingerprint `old` is not this run's `new`, and what to do: the input file that
    changed where the settings are the same (a changed file is not a change of settings)."""
    same_settings = isinstance(old, dict) and isinstance(old.get("files"), dict) \
        and all(old.get(k) == new.get(k) for k in old.keys() | new.keys() if k != "files")
    for role in sorted(new.get("files", {})) if same_settings else ():
        before, after = _files(old, role), _files(new, role)
        for path in sorted(before.keys() | after.keys()):
            if before.get(path) != after.get(path):
                how = "is gone" if path not in after else "is new" if path not in before else "holds other bytes"
                return (f"its {role} file {path} {how} since the interrupted run; drop --resume to start over "
                        f"(the work area is replaced), or restore the {role} files the run began with")
    return "it was made with other settings; drop --resume or remove it"


def resume_note(work: str | os.PathLike) -> str | None:
    """What an interrupted run's work area holds for --resume (its finished layers), or None where nothing."""
    try:
        state = read_state(work) or {}
        done, total = int(state.get("layers_done", 0)), int(state.get("n_layers", 0))
    except (OSError, ValueError, TypeError, AttributeError):
        return None
    return f"{work} keeps {done} of {total} finished layers; rerun with --resume to continue" if done else None


# the lock file a low-memory run holds in its work area: a second run (a retry script started twice) would read and
# replace the layers the first one is writing
WORK_LOCK = ".lock"


@contextlib.contextmanager
def locked_work_area(work: str | os.PathLike) -> Iterator[Path]:
    """Hold `work` (made if missing) for this run: an flock on its lock file, or one QuantkitError naming the
    process that holds it. The kernel drops the lock with the process, so a killed run leaves no stale lock; a run
    that ends removes the lock file (a kept work area holds the run's layers only). Where the work area is gone at
    the end (a failure kept nothing), the folders above it this run made go too."""
    root = Path(work)
    if root.exists() and not root.is_dir():
        raise QuantkitError(f"{root} is a file where this run keeps its work area (beside the output); move it away")
    created = [d for d in [root.parent, *root.parent.parents] if not d.exists()]
    root.mkdir(parents=True, exist_ok=True)
    fd = _lock(root / WORK_LOCK)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield root
    finally:
        # removed while still held: a run waiting on this file finds it unlinked once it gets the lock (_lock)
        with contextlib.suppress(FileNotFoundError):
            (root / WORK_LOCK).unlink()
        os.close(fd)
        if not root.exists():
            remove_created(created)


def _lock(path: Path) -> int:
    """An fd holding the flock on the file at `path` now (made if missing), or one QuantkitError naming the holder."""
    import fcntl

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 20, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise QuantkitError(f"{path.parent} is in use by another quantkit run (pid {holder}); wait for it to end, "
                                "or write to another output") from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            return fd
        os.close(fd)  # the file its holder removed as it ended: a third run may already hold the new one


class StreamedLayers:
    """Decoder layers read from the safetensors files one at a time; finished ones go to `work_dir`.

    Rank 0 writes each finished layer; every rank writes its shard of the next layer's inputs (both
    streams in one file, named by layer, so a resumed run never pairs one layer's quantized stream
    with another's FP one), and state.json counts a layer finished only once every rank's file is
    there. `offload_dir` keeps the activations on disk (a folder per rank with several).
    """

    low_memory = True

    def __init__(self, model: nn.Module, adapter: Adapter, source: WeightSource, work_dir: str | os.PathLike,
                 plan: LinearPlan, comm: Comm, *, resume: bool = False, fingerprint: dict | None = None,
                 offload_dir: str | os.PathLike | None = None, dtype: str = "auto") -> None:
        self.model, self.adapter, self.source, self.plan, self.comm = model, adapter, source, plan, comm
        self.work = Path(work_dir)
        self.resume, self.fingerprint, self.dtype = resume, fingerprint or {}, dtype
        self.n_layers = len(adapter.decoder_layers(model))
        self.offload = None
        if offload_dir is not None:
            self.offload = Path(offload_dir) / f"rank{comm.rank}" if comm.distributed else Path(offload_dir)
        self.fp_dir = None if self.offload is None else self.offload / "fp_linear"
        self.state: dict = {}

    def _hidden_file(self, index: int) -> Path:
        return self.work / f"hidden_{index:05d}_rank{self.comm.rank}.safetensors"

    def open(self) -> int:
        """A fresh work area (rank 0 makes it), or with `resume` the one left by a run with the same settings."""
        state = {"fingerprint": self.fingerprint, "world_size": self.comm.world_size, "layers_done": 0,
                 "n_layers": self.n_layers, "layer_reports": []}
        if self.work.exists() and not self.work.is_dir():
            raise QuantkitError(f"{self.work} is a file where this run keeps its work area (beside the output); "
                                "move it away")
        previous = self.check_resume()
        if previous is not None:
            state = previous
        elif self.comm.rank == 0:
            self._empty()
            _write_state(self.work, state)
        self.comm.barrier()
        self.state = state
        return state["layers_done"]

    def check_resume(self) -> dict | None:
        """With `resume`, the interrupted run's state if this run may continue it (else one QuantkitError: other
        settings or ranks, a damaged work area); called by open, and before work that comes ahead of the layers
        (TLQ's gradient pass) so that a refused --resume costs nothing."""
        previous = self._previous_state() if self.resume else None
        if previous is not None:
            if previous["fingerprint"] != self.fingerprint:
                raise QuantkitError(f"cannot resume from {self.work}: "
                                    f"{_difference(previous['fingerprint'], self.fingerprint)}")
            ranks = previous.get("world_size", 1)
            if ranks != self.comm.world_size:
                raise QuantkitError(
                    f"cannot resume from {self.work}: it was made with {ranks} rank(s); rerun with --nproc {ranks}"
                )
        return previous

    def _empty(self) -> None:
        """An empty work area, keeping the lock file the exporting process holds in it (locked_work_area)."""
        if self.work.is_symlink() or not self.work.is_dir():
            self.work.unlink(missing_ok=True)
            self.work.mkdir(parents=True)
            return
        for child in self.work.iterdir():
            if child.name != WORK_LOCK:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

    def _damaged(self, what: str) -> QuantkitError:
        return QuantkitError(f"cannot resume from {self.work}: {what}; the work area is damaged: drop --resume to "
                             "start over (it is replaced)")

    def _previous_state(self) -> dict | None:
        """The interrupted run's state, checked against the files it counts as written (else a one-line error)."""
        try:
            previous = read_state(self.work)
        except (OSError, ValueError) as err:
            raise self._damaged(f"{STATE} cannot be read ({first_line(err)})") from None
        if previous is None and not (self.work / STATE).is_file():
            return None
        if not isinstance(previous, dict) or "fingerprint" not in previous:  # JSON null too: no quiet start over
            raise self._damaged(f"{STATE} holds no run's state")
        done, reports = previous.get("layers_done"), previous.get("layer_reports")
        if not isinstance(done, int) or isinstance(done, bool) or not 0 <= done <= self.n_layers \
                or not isinstance(reports, list) or len(reports) != done:
            raise self._damaged(f"{STATE} counts {done!r} finished layers of {self.n_layers}")
        from quantkit.models.files import read_header

        names = [_layer_file(self.work, i) for i in range(done)] + ([self._hidden_file(done)] if done else [])
        for index, path in enumerate(names):
            try:
                keys = read_header(path)
            except QuantkitError:
                raise self._damaged(f"{path.name} is missing or unreadable") from None
            if path.is_symlink():
                raise self._damaged(f"{path.name} is a link, not a file this run wrote")
            if index < done:  # a finished layer holds that layer's codes (q.) and FP tensors (fp.) only
                own = tuple(f"{kind}.{self.adapter.layer_prefix(index)}." for kind in ("q", "fp"))
                stray = next((key for key in keys if not key.startswith(own)), None)
                if stray is not None:
                    raise self._damaged(f"{path.name} holds {stray}, which is not layer {index}'s")
        return previous

    def restore(self, inputs: LayerInputs, fp_inputs: LayerInputs | None) -> None:
        """On a resume, this rank's streams as they entered the first layer left; then to disk with offload_dir."""
        start = self.state["layers_done"]
        if start > 0:
            path = self._hidden_file(start)
            try:
                saved = read_safetensors(path)
            except Exception as err:  # noqa: BLE001 - a file cut short fails inside safetensors
                raise self._damaged(f"{path.name} cannot be read ({first_line(err)})") from None
            streams = [("h", inputs.hidden)] + ([("f", fp_inputs.hidden)] if fp_inputs is not None else [])
            for prefix, hidden in streams:
                for i, h in enumerate(hidden):
                    got = saved.get(f"{prefix}{i}")
                    if got is None or got.shape != h.shape or got.dtype != h.dtype:
                        found = "nothing" if got is None else f"{got.dtype} {list(got.shape)}"
                        raise self._damaged(f"{path.name} holds {found} for stream {prefix}{i}, where this run "
                                            f"makes {h.dtype} {list(h.shape)}")
            inputs.hidden = [saved[f"h{i}"].to(h.device) for i, h in enumerate(inputs.hidden)]
            if fp_inputs is not None:
                fp_inputs.hidden = [saved[f"f{i}"].to(h.device) for i, h in enumerate(fp_inputs.hidden)]
            del saved
        if self.offload is not None:
            inputs.hidden = DiskHidden(self.offload, inputs.hidden)
            if fp_inputs is not None:
                fp_inputs.hidden = DiskHidden(self.offload / "fp", fp_inputs.hidden)

    def load(self, index: int) -> nn.Module:
        """Decoder layer `index` read from the files, its weights checked."""
        layer = load_layer(self.model, self.adapter, self.source, index, self.dtype)
        check_layer(layer, index, self.adapter, self.plan)
        return layer

    def finish(self, index: int, layer: nn.Module, results: dict[str, QuantResult], report: dict,
               inputs: LayerInputs, fp_inputs: LayerInputs | None) -> None:
        """Write the layer (rank 0) and each rank's streams, free the layer, then count it finished."""
        if self.comm.rank == 0:
            _save_layer(self.work, layer.to("cpu"), index, self.adapter, results)
        tensors = {f"h{i}": inputs.hidden[i].contiguous() for i in range(len(inputs))}
        if fp_inputs is not None:
            tensors.update({f"f{i}": fp_inputs.hidden[i].contiguous() for i in range(len(fp_inputs))})
        with atomic_file(self._hidden_file(index + 1)) as tmp:
            save_file(tensors, str(tmp))
        del tensors
        release_layer(self.model, self.adapter, index)
        self.state["layers_done"] = index + 1
        self.state["layer_reports"].append(report)
        self.comm.barrier()  # every rank's files are written before the state counts the layer
        if self.comm.rank == 0:
            _write_state(self.work, self.state)
        self.comm.barrier()  # and the state is written before the previous inputs go
        self._hidden_file(index).unlink(missing_ok=True)

    def layer_reports(self) -> list[dict]:
        """Every finished layer's report, those of an interrupted run included."""
        return self.state["layer_reports"]

    def results(self, outside: dict[str, QuantResult]) -> StreamedResults:
        """The layers' results left in the work area, and `outside`'s in memory."""
        return StreamedResults(self.work, self.plan, self.n_layers, outside)

    def close(self) -> None:
        """The skeleton stays where it is (its layers on meta)."""


@torch.no_grad()
def calibrate_streaming(
    store: StreamedLayers,
    samples: Sequence[dict],
    device: str = "cpu",
    token_weights: TokenWeights | None = None,
    progress: bool = True,
    *,
    fp_target: bool | None = None,
    lm_head: bool = False,
    vision: bool = False,
) -> tuple[nn.Module, Calibration]:
    """Calibrate layer by layer with only one decoder layer in memory, the layers held by `store` (a StreamedLayers
    over quantkit.models.streamed.build_skeleton's model); return (skeleton, results).

    Finished layers go to the store's work area as they complete; the returned Calibration's results are a
    StreamedResults that reads them back from there (a layer at a time, on access). With the store's `resume`,
    a work area from an interrupted run with the same fingerprint (settings) and ranks is continued from its last
    finished layer. The rest is calibrate_model's (quantkit.engine.driver); the vision side and the head stay in
    memory (they are recomputed on a resume).
    """
    fix_mmap_threshold()
    calibration = run_layers(store.model, store, samples, store.plan, device, token_weights, progress,
                             comm=store.comm, fp_target=fp_target, lm_head=lm_head, vision=vision)
    return store.model, calibration


class StreamedResults(Mapping):
    """The QuantResults of a low-memory run, left in the work area's layer files: a mapping that
    reads a layer's results on access instead of holding every layer's in memory. `outside` holds
    results of linears outside the decoder layers (a quantized lm_head, the vision side), in memory."""

    def __init__(self, work_dir: str | os.PathLike, plan: LinearPlan, n_layers: int,
                 outside: dict[str, QuantResult] | None = None) -> None:
        self.work = Path(work_dir)
        self.plan = plan
        self.n_layers = n_layers
        self.outside = dict(outside or {})
        self._where: dict[str, int] | None = None

    @property
    def _layer_of(self) -> dict[str, int]:
        if self._where is None:  # read on first use: ranks other than 0 never look
            self._where = {}
            for index in range(self.n_layers):
                for key in safetensors_keys(_layer_file(self.work, index)):
                    if key.startswith("q.") and key.endswith(".qweight"):
                        self._where[key[2 : -len(".qweight")]] = index
        return self._where

    def layer(self, index: int) -> tuple[dict[str, QuantResult], dict[str, torch.Tensor]]:
        """Decoder layer `index`'s results and FP tensors, read from its file."""
        return _load_layer_file(_layer_file(self.work, index), self.plan)

    def __getitem__(self, name: str) -> QuantResult:
        if name in self.outside:
            return self.outside[name]
        return self.layer(self._layer_of[name])[0][name]

    def __iter__(self) -> Iterator[str]:
        return iter([*self._layer_of, *self.outside])

    def __len__(self) -> int:
        return len(self._layer_of) + len(self.outside)

    def __contains__(self, name: object) -> bool:
        return name in self._layer_of or name in self.outside
