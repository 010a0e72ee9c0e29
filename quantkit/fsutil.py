"""Outputs and work areas: atomic output directories (work goes to a temporary sibling, renamed on success),
the checks an output must pass before any work, scratch and temporary folders, and what a failed run keeps."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from quantkit.errors import QuantkitError, expect_utf8, stopped_write


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """The output path as a Path: new (or overwrite is set), with names the file system holds."""
    check_names(path)
    expect_utf8(path, "output path")  # a folder of safetensors and tokenizer files
    out = Path(path)
    if out.exists() and not overwrite:
        raise QuantkitError(f"output path {out} already exists; pass --overwrite or choose another -o")
    return out


def umask() -> int:
    """The process umask: from /proc where Linux shows it, else by setting it and putting it back."""
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/self/status") as status:
        for line in status:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
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
    missing = [parent for parent in [path, *path.parents] if not parent.exists()]
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
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_created(created)
        raise stopped_write(err, out, tmp) or err  # noqa: B904 - one line naming out where the environment stopped a write


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
    # a fresh name: a fixed one (.OUT.old-PID) may be a crashed run's leftover, which os.replace cannot take
    if out.is_dir() and not out.is_symlink():  # rename(2) puts a folder onto an empty folder, a file onto a file
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    else:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.old-", dir=out.parent)
        os.close(fd)
        old = Path(name)
    try:
        os.replace(out, old)
    except BaseException:
        remove_path(old)  # the empty placeholder only: out was not moved
        raise
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
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        remove_created(created)
        raise stopped_write(err, out, tmp) or err  # noqa: B904 - one line naming out where the environment stopped a write


@contextlib.contextmanager
def scratch_dir(path: str | os.PathLike | None) -> Iterator[None]:
    """Remove, on every exit, what the block adds under `path` (the directory itself if it did not exist): for
    --offload-dir, which holds activations only while a command runs; a user's existing one keeps what it held."""
    if path is None:
        yield
        return
    root = Path(path)
    existed = root.is_dir()
    before = set(os.listdir(root)) if existed else set()
    created = [] if existed else [d for d in [root, *root.parents] if not d.exists()]
    try:
        yield
    except BaseException as err:
        raise stopped_write(err, root, root) or err  # noqa: B904 - one line naming the folder the environment filled
    finally:
        if existed:
            with contextlib.suppress(OSError):
                for name in set(os.listdir(root)) - before:
                    remove_path(root / name)
        elif created:
            remove_path(root)
            remove_created(created[1:])


def work_dir_for(output: str | os.PathLike) -> Path:
    """Where a low-memory run keeps its finished layers until the export: OUTPUT.partial beside it."""
    out = Path(output)
    return out.with_name(out.name + ".partial")


def file_sha256(path: str | os.PathLike, done: Callable[[int], object] | None = None) -> str:
    """The SHA-256 of a file's bytes (read in chunks: any size in little memory), or a one-line error; `done` is
    given each chunk's length as it is hashed (a progress bar over many gigabytes of weights)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
                if done is not None:
                    done(len(chunk))
        return digest.hexdigest()
    except OSError as err:
        raise QuantkitError(f"cannot read {path}: {err.strerror or err}") from None


# ---------------------------------------------------------------- what a failed run keeps

_KEPT: list[Callable[[], str | None]] = []


def note_kept(describe: Callable[[], str | None]) -> None:
    """Register a callable saying what a failed or interrupted run kept on purpose (for --resume)."""
    _KEPT.append(describe)


def kept_note() -> str | None:
    """What failed runs kept on purpose, or None when nothing was kept; clears the registry."""
    notes = [n for n in (describe() for describe in _KEPT) if n]
    _KEPT.clear()
    return "; ".join(notes) or None


def clear_kept() -> None:
    """Forget earlier runs' notes (one CLI invocation reports only its own)."""
    _KEPT.clear()


@contextlib.contextmanager
def kept_on_failure(work: str | os.PathLike, describe: Callable[[Path], str | None]) -> Iterator[None]:
    """A work area a failure keeps where `describe(work)` says what it holds worth resuming (noted for the
    error line), and removes otherwise, with the parent directories the run created."""
    root = Path(work)
    created = [d for d in [root.parent, *root.parent.parents] if not d.exists()]
    try:
        yield
    except BaseException:
        note = describe(root)
        if note:
            note_kept(lambda: note)
        else:
            shutil.rmtree(root, ignore_errors=True)
            remove_created(created)
        raise


@contextlib.contextmanager
def private_tempdir() -> Iterator[Path]:
    """Point tempfile (and child processes, via TMPDIR) at a fresh folder removed on every exit: libraries leave
    files in the temp folder when a run fails (torch's pytorch-errorfile-*.pickle), and they go with it."""
    root = Path(tempfile.mkdtemp(prefix="quantkit-"))
    saved_dir, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir = str(root)
    os.environ["TMPDIR"] = str(root)
    try:
        yield root
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------- checks before any work


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path("/")


def check_writable(directory: Path, what: str) -> None:
    """A file can be created in `directory` (read-only mounts, permissions and full disks show up here)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".quantkit-probe-", dir=directory)
    except OSError as err:
        raise QuantkitError(f"cannot write {what} in {directory}: {err.strerror or err}; choose another location") from None
    os.close(fd)
    os.unlink(probe)


# room a name needs beyond its own length for the run's siblings of it (".NAME.tmp-XXXXXXXX", "NAME.partial")
_NAME_ROOM = 16


def name_limit(path: str | os.PathLike) -> int:
    """The most bytes one file name may hold on the file system `path` is (or would be) on: its nearest existing
    folder's PC_NAME_MAX, or 255 (the common limit) where the system does not say."""
    out = Path(os.path.abspath(path))
    above = next(part for part in [out, *out.parents] if os.path.lexists(part))
    try:
        return os.pathconf(above if above.is_dir() else above.parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_names(output: str | os.PathLike, flag: str = "-o", room: int = _NAME_ROOM) -> None:
    """Every name `output` creates fits the file system's name limit, with `room` for the temporary names a run
    puts beside it (none for a folder made in place); the OS says only "File name too long" once the work is done.
    "-" is no name either (read by Unix tools as stdout, by quantkit as a file or folder named '-' in the working
    folder)."""
    if os.fspath(output) == "-":
        raise QuantkitError(f"{flag} - would write a file or folder named '-' here, not to stdout; give a path "
                            "(to print a command's results, use its --json)")
    if os.fspath(output) == "":  # abspath('') is the working folder: results would land among its files
        raise QuantkitError(f"{flag} '' is an empty name; give a path")
    out = Path(os.path.abspath(output))
    if os.path.islink(out) and os.path.islink(os.path.realpath(out)):  # realpath stops where the links loop
        raise QuantkitError(f"{flag} {output} is a symlink loop; remove the link or give another path")
    # mkdir -p stops at a link to nothing with "File exists", after the work; the output itself so linked would be
    # replaced by the results, the user's link gone without a word
    for part in [*reversed(out.parents), out]:
        if os.path.islink(part) and not os.path.exists(part):
            raise QuantkitError(f"{flag} {output}: {part} is a symbolic link to {os.readlink(part)}, which does not "
                                "exist; create it or choose another path")
    new = [part for part in [out, *out.parents] if not os.path.lexists(part)]  # lexists: False where the OS refuses
    limit = name_limit(out)
    for part in new:
        beside = room if part == out else 0  # folders above it are made in place (mkdir -p), with nothing beside
        if len(os.fsencode(part.name)) + beside > limit:
            held = f" ({beside} of them for the run's temporary names)" if beside else ""
            raise QuantkitError(f"{flag} {str(output)[:60]}...: the name {part.name[:40]}... is "
                                f"{len(os.fsencode(part.name))} bytes, and names here hold at most {limit}{held}; "
                                "choose a shorter name")


def check_output_folder(output: str | os.PathLike, flag: str = "-o") -> None:
    """A folder that results are written into (created if missing): not a file, and writable."""
    check_names(output, flag)
    out = Path(os.path.abspath(output))
    above = _nearest_existing(out)
    if not above.is_dir():
        raise QuantkitError(f"{flag} {output} lies at or under {above}, which is a file; give a directory")
    check_writable(above, f"{flag} {output}")


def check_output_file(output: str | os.PathLike, flag: str = "-o",
                      inputs: Iterable[str | os.PathLike | None] = ()) -> None:
    """A result file can be written at `output` (checked before the work it records): not a directory, no file
    where a folder above it must be, its folder writable, and neither one of the run's `inputs` (files or
    directories: a model, its data, a table or law read) nor inside an input directory."""
    check_names(output, flag)
    if str(os.fspath(output)).endswith((os.sep, "/")):  # abspath drops the slash that names a folder
        raise QuantkitError(f"{flag} {output} ends in '{os.sep}', which names a folder; give a file path without it")
    out = Path(os.path.abspath(output))
    if out.is_dir():
        raise QuantkitError(f"{flag} {output} is a directory; give a file path")
    if out.exists() and not out.is_file():  # a named pipe or device would be replaced by the results' file
        raise QuantkitError(f"{flag} {output} is no regular file (a named pipe, socket or device); give a file path")
    if out.is_file() and _frozen(out):  # the rename onto it would fail only after the work, naming a temp file
        raise QuantkitError(f"{flag} {output} exists and cannot be replaced: it is immutable or append-only (chattr "
                            "+i/+a); clear that (chattr -i/-a) or choose another file")
    real = out.resolve()
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        src = Path(source).expanduser().resolve()
        if real == src:
            raise QuantkitError(f"{flag} {output} is the input {source}; writing the results there would destroy "
                                "it: choose another file")
        if src.is_dir() and src in real.parents:
            raise QuantkitError(f"{flag} {output} is inside the input {source}; write the results outside it")
    if (real.parent / "config.json").is_file():  # a model or export directory, an input of other runs
        raise QuantkitError(f"{flag} {output} is inside {real.parent}, a model directory (it holds config.json); "
                            "write the results outside it")
    above = _nearest_existing(out.parent)
    if not above.is_dir():
        raise QuantkitError(f"{flag} {output} lies under {above}, which is a file; give a path in a directory")
    check_writable(above, f"{flag} {output}")


def _frozen(path: Path) -> bool:
    """Whether Linux's immutable or append-only flag (chattr +i/+a) is on `path`, which no one, root included, may
    then rename onto; False where the system or the file system does not say."""
    try:
        import fcntl

        with open(path, "rb") as file:  # FS_IOC_GETFLAGS: an int the kernel fills, whatever the request's size
            return bool(memoryview(fcntl.ioctl(file.fileno(), 0x80086601, bytes(8))).cast("i")[0] & 0x30)
    except (ImportError, OSError):
        return False


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def check_output(output: str | os.PathLike, *, overwrite: bool, sources: Iterable[str | os.PathLike | None] = (),
                 need_bytes: int = 0, flag: str = "-o") -> Path:
    """The output directory: new (or --overwrite), not a file, away from every source and the working directory,
    its location writable with room for `need_bytes`."""
    check_output_dir(output, overwrite)
    out = Path(os.path.abspath(output))
    if out.exists() and not out.is_dir():
        raise QuantkitError(f"output {output} is a file; {flag} takes a directory")
    real = out.resolve()
    cwd = Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise QuantkitError(f"output {output} is the current directory or holds it; choose a new directory for {flag}")
    for source in sources:
        if source is None or not Path(source).expanduser().exists():
            continue
        src = Path(source).expanduser().resolve()
        if real == src:
            raise QuantkitError(f"output {output} is the input {source}; choose another {flag} (the input must stay intact)")
        if src in real.parents:
            raise QuantkitError(f"output {output} is inside the input {source}; choose a directory outside it")
        if real in src.parents:
            raise QuantkitError(f"output {output} holds the input {source}; replacing it would delete the input, choose another {flag}")
    check_names(output, flag)
    where = _nearest_existing(out.parent)
    if not where.is_dir():
        raise QuantkitError(f"cannot create output {output}: {where} is a file")
    check_writable(where, f"output {output}")
    if out.is_dir():  # --overwrite: its files are replaced (an immutable or read-only folder refuses that)
        check_writable(out, f"output {output} (--overwrite replaces its files)")
    if need_bytes:
        free = shutil.disk_usage(where).free
        if free < need_bytes:
            raise QuantkitError(f"not enough space for output {output}: about {_size(need_bytes)} needed, {_size(free)} "
                                f"free in {where}; free some space or choose another location")
    return out


def check_offload_dir(path: str | os.PathLike | None, sources: Iterable[str | os.PathLike | None] = ()) -> None:
    """--offload-dir: a directory (created if missing) in a writable place, outside every source (the model, its
    data): scratch files must not land among them, nor stay there when a run is killed."""
    if path is None:
        return
    check_names(path, "--offload-dir", room=0)  # made in place, its files inside: no temporary name beside it
    expect_utf8(path, "--offload-dir")  # its scratch files are safetensors
    root = Path(path)
    real = Path(os.path.abspath(root)).resolve()
    for source in sources:
        if source is not None and Path(source).expanduser().is_dir():
            src = Path(source).expanduser().resolve()
            if real == src or src in real.parents:
                raise QuantkitError(f"--offload-dir {path} is inside {source}, an input of the run; give a scratch "
                                    "directory outside it")
    if root.exists() and not root.is_dir():
        raise QuantkitError(f"--offload-dir {path} is a file; give a directory (it is created if missing)")
    where = _nearest_existing(root)
    if not where.is_dir():
        raise QuantkitError(f"cannot create --offload-dir {path}: {where} is a file")
    check_writable(where, f"--offload-dir {path}")
