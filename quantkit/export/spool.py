"""Where the writer keeps encoded tensors until the shards are laid out: in memory (a model that fits) or spooled to
disk a piece at a time (a low-memory run), and the one shard layout both write.

The disk spool writes each file exactly as safetensors' save_file lays it out, so the two give the same bytes.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save, save_file

from quantkit.errors import QuantkitError
from quantkit.export.common import INDEX, SINGLE, write_json

METADATA = {"format": "pt"}


class MemorySpool:
    """Encoded tensors kept in memory, written with safetensors' save_file."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    @property
    def keys(self) -> list[str]:
        """Every tensor's name."""
        return list(self.tensors)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Keep `tensors`."""
        for key, t in tensors.items():
            if key in self.tensors:
                raise QuantkitError(f"tensor {key} is written twice; this is a bug")
            self.tensors[key] = t.contiguous()

    def nbytes(self, key: str) -> int:
        """The size of tensor `key`'s data."""
        t = self.tensors[key]
        return t.numel() * t.element_size()

    def shape(self, key: str) -> list[int]:
        """Tensor `key`'s shape."""
        return list(self.tensors[key].shape)

    def write_file(self, keys: list[str], path: Path) -> None:
        """One safetensors file holding `keys`."""
        save_file({k: self.tensors[k] for k in keys}, str(path), metadata=METADATA)


@dataclass
class _SpoolEntry:
    path: Path
    begin: int  # byte range of the tensor's data in `path`
    end: int
    dtype: torch.dtype
    shape: list[int]


class DiskSpool:
    """Tensors saved once to numbered safetensors files, later copied a tensor at a time into the final files (so
    no more than one piece of the model is ever in memory)."""

    _CHUNK = 16 * 2**20

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.entries: dict[str, _SpoolEntry] = {}
        self._files = 0

    @property
    def keys(self) -> list[str]:
        """Every tensor's name."""
        return list(self.entries)

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Spool `tensors` (one file); the caller can drop them afterwards."""
        if not tensors:
            return
        for key in tensors:
            if key in self.entries:
                raise QuantkitError(f"tensor {key} is written twice; this is a bug")
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"{self._files:06d}.safetensors"
        self._files += 1
        save_file({k: t.contiguous() for k, t in tensors.items()}, str(path))
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
        base = 8 + size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            self.entries[key] = _SpoolEntry(path, base + begin, base + end, tensors[key].dtype, list(info["shape"]))

    def nbytes(self, key: str) -> int:
        """The size of tensor `key`'s data."""
        entry = self.entries[key]
        return entry.end - entry.begin

    def shape(self, key: str) -> list[int]:
        """Tensor `key`'s shape."""
        return list(self.entries[key].shape)

    def write_file(self, keys: list[str], path: Path) -> None:
        """One safetensors file holding `keys`, laid out exactly as safetensors' save_file lays it out."""
        # safetensors orders the data by dtype, then by name: ask it for that order on empty tensors.
        probe = save({k: torch.empty(0, dtype=self.entries[k].dtype) for k in keys}, metadata=METADATA)
        probe_header = json.loads(probe[8 : 8 + struct.unpack("<Q", probe[:8])[0]])
        header: dict = {"__metadata__": METADATA}
        order = [k for k in probe_header if k != "__metadata__"]
        offset = 0
        for key in order:
            n = self.nbytes(key)
            header[key] = {"dtype": probe_header[key]["dtype"], "shape": self.entries[key].shape,
                           "data_offsets": [offset, offset + n]}
            offset += n
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * ((8 - len(blob) % 8) % 8)
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)))
            out.write(blob)
            for key in order:
                self._copy(self.entries[key], out)

    def _copy(self, entry: _SpoolEntry, out) -> None:
        with open(entry.path, "rb") as src:
            src.seek(entry.begin)
            left = entry.end - entry.begin
            while left > 0:
                chunk = src.read(min(left, self._CHUNK))
                if not chunk:
                    raise QuantkitError(f"spool file {entry.path} is truncated; the disk may be full")
                out.write(chunk)
                left -= len(chunk)


Spool = MemorySpool | DiskSpool


def natural_key(key: str) -> list:
    """Sort key putting layer 2 before layer 10."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def write_sharded(spool: Spool, out: Path, limit: int) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus the index when over `limit` bytes."""
    keys = sorted(spool.keys, key=natural_key)
    shards: list[list[str]] = [[]]
    size = 0
    for k in keys:
        n = spool.nbytes(k)
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    if len(shards) == 1:
        spool.write_file(shards[0], out / SINGLE)
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        spool.write_file(shard, out / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    write_json(out / INDEX, {"metadata": {"total_size": sum(spool.nbytes(k) for k in keys)}, "weight_map": weight_map})


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like '5GB', '500MB', '2GiB', '100KB' (transformers' units)."""
    if isinstance(size, int):
        if size <= 0:
            raise QuantkitError(f"max shard size must be positive, got {size}")
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B?)\s*", str(size), flags=re.IGNORECASE)
    if not m:
        raise QuantkitError(f"cannot read shard size {size!r}; write it like 5GB, 500MB or 2000000")
    value, unit = float(m.group(1)), m.group(2).upper()
    base = {"": 1, "B": 1}
    for i, p in enumerate("KMGT", start=1):
        base[p] = base[p + "B"] = 10 ** (3 * i)
        base[p + "I"] = base[p + "IB"] = 2 ** (10 * i)
    if unit not in base or not 0 < value * base.get(unit, 1) < 2**80:
        raise QuantkitError(f"cannot read shard size {size!r}; write it like 5GB, 500MB or 2000000")
    return int(value * base[unit])
