"""Atomic output directories: work goes to a temporary sibling and is renamed on success."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quantkit.errors import QuantkitError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output path unless overwrite is set; return it as a Path."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise QuantkitError(f"output path {out} already exists; pass --overwrite or choose another -o")
    return out


def umask() -> int:
    """The process umask: from /proc where Linux shows it, else by setting it and putting it back."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # another thread creating a file this instant would see 022
    os.umask(mask)
    return mask


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree; a missing path is fine."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def make_parents(path: Path) -> list[Path]:
    """mkdir -p of `path`; return the directories it created, deepest first, so a failure can undo them."""
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing.append(parent)
    path.mkdir(parents=True, exist_ok=True)
    return missing


def remove_created(dirs: list[Path]) -> None:
    """Undo make_parents: remove the directories it created that are still empty, deepest first."""
    for d in dirs:
        try:
            d.rmdir()
        except OSError:
            break  # not empty (someone else wrote there) or already gone


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that replaces `path` only if the block succeeds."""
    check_output_dir(path, overwrite)
    # abspath: `-o .` has no name of its own to put a sibling beside
    out = Path(os.path.abspath(path))
    created = make_parents(out.parent)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    except BaseException:
        remove_created(created)
        raise
    try:
        yield tmp
        _share(tmp)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise


def _share(path: Path) -> None:
    """Give an output the modes the umask allows: mkdtemp and mkstemp make 0700/0600, and so do
    safetensors' writes, but an output is meant to be read by whoever the user lets read files."""
    mask = umask()
    if path.is_dir():
        path.chmod(0o777 & ~mask)
        for sub in path.rglob("*"):
            if not sub.is_symlink():
                sub.chmod((0o777 if sub.is_dir() else 0o666) & ~mask)
    elif path.is_file():
        path.chmod(0o666 & ~mask)


def _publish(tmp: Path, out: Path) -> None:
    """Rename tmp onto out; an existing out is set aside first and put back if the rename fails."""
    if not os.path.lexists(out):
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    remove_path(old)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path that is renamed onto `path` only if the block succeeds."""
    out = Path(os.path.abspath(path))
    created = make_parents(out.parent)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    except BaseException:
        remove_created(created)
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        _share(tmp)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_created(created)
        raise


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike | None) -> Iterator[None]:
    """Remove, on every exit, what the block adds under `path` (the directory itself if it did not exist).

    For --offload-dir: it holds activations only while a command runs, and a user's existing
    directory keeps exactly what it held before.
    """
    if path is None:
        yield
        return
    root = Path(path)
    existed = root.is_dir()
    before = set(os.listdir(root)) if existed else set()
    created = [] if existed else [d for d in [root, *root.parents] if not d.exists()]
    try:
        yield
    finally:
        if existed:
            with contextlib.suppress(OSError):
                for name in set(os.listdir(root)) - before:
                    remove_path(root / name)
        elif created:
            remove_path(root)
            remove_created(created[1:])
