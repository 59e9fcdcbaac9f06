"""Writing output files safely: atomically (a file that exists is complete), with the user's
umask, and one run at a time per output folder.

    atomic_open(path)        write to a temporary file beside `path`, fsync, rename
    folder_lock(dir)         flock on DIR/.fastdiff.lock: a second run into DIR waits for the first
    check_run_settings(...)  DIR/.fastdiff-run.json records the settings that made DIR's files;
                             a rerun with other settings is refused, naming the setting
"""
from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX, TMP_SUFFIX = ".fastdiff-", ".tmp"  # temporary files; stale ones are removed under the lock
LOCK_NAME = ".fastdiff.lock"
RUN_NAME = ".fastdiff-run.json"


class OutputError(RuntimeError):
    """An output file or folder that cannot be written; the message names it."""


def os_message(e: OSError) -> str:
    return f"[Errno {e.errno}] {e.strerror}" if e.errno is not None else str(e)


def _file_mode() -> int:
    """0666 less the umask: the mode open() would give (mkstemp's temporaries are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextmanager
def atomic_open(path: Path):
    """A binary file whose contents appear at `path` only when complete: written to a
    temporary file in the same directory, fsynced, renamed. Errors name the path."""
    path, tmp = Path(path), None
    try:
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + path.name + ".", suffix=TMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _file_mode())
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {os_message(e)}") from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def write_atomic(path: Path, data: bytes) -> None:
    with atomic_open(path) as f:
        f.write(data)


def fsync_dir(outdir: Path) -> None:
    """Make the renames durable (POSIX; not possible on Windows)."""
    try:
        fd = os.open(outdir, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(outdir: Path) -> int:
    """Delete temporary files left by a killed run; returns how many. Call only while holding
    folder_lock(outdir): a live run holds the lock while it writes its temporaries."""
    n = 0
    for name in os.listdir(outdir):
        if name.startswith(TMP_PREFIX) and name.endswith(TMP_SUFFIX):
            try:
                os.unlink(Path(outdir) / name)
                n += 1
            except FileNotFoundError:
                pass
    return n


@contextmanager
def folder_lock(outdir: Path, log=None):
    """Hold an exclusive flock on DIR/.fastdiff.lock for the block. A second run into DIR
    waits (saying so once) until the first finishes, then finds its files there. The kernel
    releases the lock when its holder exits, so a killed run never leaves DIR locked."""
    path = Path(outdir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, _file_mode())
    except OSError as e:
        raise OutputError(f"cannot create {path}: {os_message(e)}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            (log or (lambda m: print(m, file=sys.stderr)))(
                f"fastdiff: another run is writing into {outdir} (it holds {path}); waiting for it to finish")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def check_run_settings(outdir: Path, settings: dict, record: bool = True) -> None:
    """Refuse a run into DIR whose settings (what its files depend on) differ from those in
    DIR/.fastdiff-run.json, naming each; without a record, write one (record=True; call under
    folder_lock)."""
    path = Path(outdir) / RUN_NAME
    settings = json.loads(json.dumps(settings))  # as stored: tuples become lists
    if not path.exists():
        if record:
            write_atomic(path, (json.dumps(settings, indent=2, sort_keys=True) + "\n").encode())
        return
    try:
        before = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"cannot read {path}: {e}") from e
    differ = [f"{k} {settings.get(k)!r} (the files there have {before.get(k)!r})"
              for k in sorted(set(before) | set(settings)) if before.get(k) != settings.get(k)]
    if differ:
        raise ValueError(f"{outdir} holds samples made with other settings: {'; '.join(differ)}. "
                         "Use another output folder, or delete this one to resample")
