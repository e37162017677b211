"""Writing files: atomically (a reader sees the old file or the new one, never half of one),
with the permissions an ordinary ``open()`` would give, and output paths checked before work."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from safetensors import SafetensorError

from difflab.errors import DifflabError, brief

#: What a failed write raises: OSError, safetensors' own error, torch.save's RuntimeError.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def disk_full(error: Exception) -> bool:
    """Whether a failed write ran out of space (safetensors says so only in its text)."""
    text = str(error)
    return (
        getattr(error, "errno", None) == errno.ENOSPC
        or "os error 28" in text
        or "No space left" in text
    )


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def delete_path(path: Path) -> None:
    """Remove a file or a folder tree, quietly (cleaning up is never the error to report)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def publish_folder(tmp: Path, final: Path) -> None:
    """Rename the complete folder ``tmp`` into place, replacing an earlier ``final``: the old
    one is moved aside first and restored if the rename fails. Everything in ``tmp`` gets the
    mode an ordinary ``open()`` or ``mkdir`` would have given it (mkdtemp makes 0700,
    safetensors writes 0600) and is on disk before the rename."""
    for path in sorted(tmp.rglob("*"), reverse=True):  # files before the folders holding them
        if path.is_dir():
            path.chmod(0o777 & ~umask())
            fsync_dir(path)
        else:
            path.chmod(new_file_mode())
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    tmp.chmod(0o777 & ~umask())
    fsync_dir(tmp)
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}")
        final.rename(old)
        try:
            tmp.rename(final)
        except OSError:
            old.rename(final)
            raise
        delete_path(old)
    else:
        tmp.rename(final)
    fsync_dir(final.parent)


def umask() -> int:
    """The process's umask, read without changing it where the kernel says (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        status = Path("/proc/self/status").read_text()
        found = re.search(r"^Umask:\s*([0-7]+)", status, re.M)
        if found:
            return int(found.group(1), 8)
    mask = os.umask(0o022)  # elsewhere: set and restore
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


def file_mode(path: Path) -> int:
    """The mode ``open(path, "w")`` leaves: the existing file's, else a new file's."""
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        return new_file_mode()


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file next to ``path``, fsync it, rename it over ``path``.

    The temporary file (0600, like every ``mkstemp`` file, and so are files some libraries
    write themselves) gets the mode an ordinary ``open()`` would have given ``path``.
    """
    path = Path(path)
    make_folder(path.parent)
    tmp = None
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        write(tmp)
        os.chmod(tmp, file_mode(path))
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except WRITE_ERRORS as error:  # safetensors and torch.save do not raise OSError
        if disk_full(error):
            raise DifflabError(f"disk full while writing {path}; free some space") from None
        raise DifflabError(f"could not write {path} ({brief(error, 200)})") from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def make_folder(folder: Path, what: str = "folder") -> Path:
    """``mkdir -p`` with a one-line error that names the part of the path in the way."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise DifflabError(f"{what} {folder} exists and is not a folder") from None
    except NotADirectoryError:
        blocker = next((p for p in [folder, *folder.parents] if p.is_file()), folder)
        raise DifflabError(
            f"cannot create {what} {folder}: {blocker} is a file, not a folder"
        ) from None
    except OSError as error:
        raise DifflabError(f"cannot create {what} {folder} ({error.strerror or error})") from None
    return folder


#: What difflab reads back from a run folder: no command's output goes there.
RUN_FILES = frozenset({"config.json", "log.jsonl", "invocations.jsonl", "checkpoints"})


def check_output_folder(folder: Path, flag: str) -> Path:
    """Before any work: ``folder`` is (or can become) a writable folder, none of a run's own."""
    if folder.exists() and not folder.is_dir():
        raise DifflabError(f"{flag} {folder} exists and is not a folder; choose another {flag}")
    _check_not_a_run_file(folder, flag)
    _check_parents_writable(folder, flag)
    return folder


def check_output_file(
    path: Path, flag: str, suffixes: tuple[str, ...] = (), what: str = ""
) -> Path:
    """Before any work: ``path`` can be written as a file, ends in one of ``suffixes`` (any case;
    ``what`` names the file in the error) and is none of a run's own files."""
    if suffixes and path.suffix.lower() not in suffixes:
        raise DifflabError(f"{flag} {path}: {what} must end in {' or '.join(suffixes)}")
    if path.is_dir():
        raise DifflabError(f"{flag} {path} is a folder; give a file name")
    _check_not_a_run_file(path, flag)
    _check_parents_writable(path.parent, flag)
    return path


def is_run(folder: Path) -> bool:
    """A difflab run folder: its config.json is difflab's (a version and a method), beside a
    log or checkpoints."""
    config = folder / "config.json"
    if not config.is_file() or not any((folder / n).exists() for n in RUN_FILES - {config.name}):
        return False
    try:
        values = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(values, dict) and {"version", "method", "train"} <= values.keys()


def _check_not_a_run_file(path: Path, flag: str) -> None:
    """Refuse ``path`` when it is (or is inside) the config, a log or the checkpoints of the
    innermost run folder above it (links and ``..`` followed)."""
    path = path.resolve()
    run = next((p for p in path.parents if is_run(p)), None)
    own = run is not None and path.relative_to(run).parts[0]
    if own in RUN_FILES:
        raise DifflabError(f"{flag} {path} is in {run}'s own {own}; choose another {flag}")


def _check_parents_writable(folder: Path, flag: str) -> None:
    existing = next((p for p in [folder, *folder.parents] if p.exists()), None)
    if existing is None:
        return
    if not existing.is_dir():
        raise DifflabError(f"{flag}: {existing} is a file, not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise DifflabError(f"{flag}: cannot write in {existing} (permission denied)")
    try:  # some file systems refuse what the permission bits allow (/sys, read-only mounts)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise DifflabError(f"{flag}: cannot write in {existing} ({error.strerror})") from None
