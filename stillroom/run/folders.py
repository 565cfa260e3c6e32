"""What stillroom may do to a folder: which folders are its own (a marker it writes), which ones
`--overwrite` may empty, one holder at a time (a lock for a command's whole life), and durable
renames (fsync before a rename publishes anything).

- `mark(folder, kind)` records that stillroom made `folder` as a `kind` ("run" or "cache").
- `check_replace` is asked before `--overwrite` empties a folder: only a folder stillroom made for
  the same kind, holding none of the command's inputs, may go.
- `claim(folder, ...)` holds an exclusive lock on the folder (POSIX `flock`, released by the OS
  when the process dies, so a killed run never leaves a lock that blocks the next one) and writes
  who holds it beside, so a second command is refused at once with the holder's pid, host and
  start time. Only the main process of a launch locks.
- `durable_replace(src, dst)` fsyncs `src` (every file under it) and the folders involved around
  `os.replace`, so a power loss leaves the previous or the new state, never a renamed folder
  whose files were still in the page cache.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import socket
import zlib
from pathlib import Path

from stillroom.errors import UserError

log = logging.getLogger("stillroom")

MARKER = ".stillroom.json"
LOCK = ".stillroom.lock"
HOLDER = ".stillroom.holder.json"
OWN = {MARKER, LOCK, HOLDER}
PROBE = ".stillroom-probe-"   # outputs.check_writable's passing folder

# What a run or a cache writes, for folders made before the marker existed: a folder that holds
# only these names is recognised as stillroom's own.
KNOWN = {
    "run": {"config.yaml", "inputs.json", "inputs.json.tmp", "metrics.jsonl", "checkpoints", "final", "final.tmp", "final.old", "report.html",
            "report.html.tmp", "error.log", "finetune", "stillroom", "trackio"},
    "cache": {"index.json", "index.json.tmp", "tokenizer", "teacher"},
}


def entries(folder: Path) -> list[Path]:
    """The folder's contents, leaving out stillroom's own bookkeeping (marker, locks)."""
    return [p for p in folder.iterdir() if p.name not in OWN and not _file_lock(p.name)] if folder.is_dir() else []


def _file_lock(name: str) -> bool:
    """A lock of one file, or the empty folder with which another process of a launch is checking
    that it can write here (outputs.check_writable): bookkeeping, never the folder's contents."""
    return name.startswith(".") and name.endswith((".lock", ".holder.json")) or name.startswith(PROBE)


def mark(folder: Path, kind: str):
    write_json(folder / MARKER, {"kind": kind, "created": _now()})


def kind_of(folder: Path) -> str | None:
    """"run", "cache", ... for a folder stillroom made; None for anything else."""
    try:
        return json.loads((folder / MARKER).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        pass
    names = {p.name for p in entries(folder)}
    for kind, known in KNOWN.items():
        own = {n for n in names if n in known or (kind == "cache" and n.startswith("shard-"))}
        if names and own == names and ("index.json" in names if kind == "cache" else "config.yaml" in names):
            return kind
    return None


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(path).resolve().relative_to(folder.resolve())
        return True
    except (ValueError, OSError):
        return False


def check_replace(folder: Path, kind: str, inputs=(), key: str = "train.output_dir"):
    """Before `--overwrite` empties `folder`: refuse (one line) unless stillroom made it as a
    `kind` and it holds none of the command's `inputs` (data, teacher, student, cache...)."""
    folder = Path(folder)
    if not entries(folder):
        return
    for p in inputs:
        if p and _inside(p, folder):
            raise UserError(f"{key} {folder} holds {p}, an input of this command; --overwrite would delete it: "
                            f"pick another {key}")
    found = kind_of(folder)
    if found is None:
        names = sorted(p.name for p in entries(folder))
        held = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise UserError(f"{key} {folder} was not made by stillroom (no {MARKER} in it; it holds {held}); "
                        f"--overwrite only replaces stillroom's own folders: pick another {key} or empty it yourself")
    legacy = found == "run" and kind == "codistill run" and not (folder / MARKER).is_file()   # made before kinds
    if found != kind and not legacy:
        raise UserError(f"{key} {folder} is a stillroom {found}, not a {kind}; --overwrite will not replace it: "
                        f"pick another {key}")


def clear(folder: Path, kind: str):
    """Empty a folder `check_replace` allowed (keeping the lock held on it) and mark it ours."""
    folder.mkdir(parents=True, exist_ok=True)
    for p in entries(folder):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    mark(folder, kind)


def process_rank() -> int:
    """This process's rank in a launch (torchrun / accelerate set RANK; 0 alone), read before any
    process group exists."""
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    return process_rank() == 0


_HELD: set = set()   # the lock fds this process holds (a forked worker closes its copies: forked_worker)


def forked_worker():
    """In a worker process forked by a lock's holder (the data store's tokenizing pool): close the
    inherited copies of the holder's lock fds, so that the lock ends with the holder and not with
    the last worker, and die with the holder (Linux: PR_SET_PDEATHSIG) instead of outliving a
    kill -9 of it."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
    with contextlib.suppress(OSError, AttributeError):
        import ctypes
        import signal
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
        if os.getppid() == 1:   # the holder died before the signal was asked for
            os._exit(1)


class Claim:
    """The exclusive lock on one folder (or, with `name`, on one file in it: `.NAME.lock`), held
    from `acquire` to `release`."""

    def __init__(self, folder: Path, key: str, name: str | None = None):
        self.folder, self.key, self.fd, self.created = Path(folder), key, None, False
        self.lock_name, self.holder_name = (LOCK, HOLDER) if name is None else (f".{name}.lock", f".{name}.holder.json")
        self.what = self.folder if name is None else self.folder / name

    def acquire(self, wait: bool = False) -> "Claim":
        """wait: block until the holder is done (saying so once) instead of refusing at once."""
        import fcntl

        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / self.lock_name
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if wait:
                    log.info("waiting for another stillroom command to finish with %s (%s)", self.what,
                             describe(self.holder()))
                    fcntl.flock(fd, fcntl.LOCK_EX)
                else:
                    os.close(fd)
                    raise UserError(f"{self.key} {self.what} is in use by another stillroom command "
                                    f"({describe(self.holder())}); wait for it to end or pick another "
                                    f"{self.key}") from None
            try:   # the holder that just released may have unlinked the file we opened: lock the live one
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd = fd
        _HELD.add(fd)
        stale = self.holder()
        if stale and stale.get("pid") != os.getpid():
            log.warning("%s %s: taking over the lock left by %s, which is no longer running",
                        self.key, self.what, describe(stale))
        write_json(self.folder / self.holder_name, {"pid": os.getpid(), "host": socket.gethostname(),
                                                     "started": _now()})
        return self

    def holder(self) -> dict | None:
        try:
            return json.loads((self.folder / self.holder_name).read_text())
        except (OSError, ValueError):
            return None

    def release(self, failed: bool = False):
        if self.fd is None:
            return
        for name in (self.holder_name, self.lock_name):
            with contextlib.suppress(OSError):
                (self.folder / name).unlink()
        _HELD.discard(self.fd)
        os.close(self.fd)   # releases the flock
        self.fd = None
        if failed and self.created and not any(self.folder.iterdir()):
            with contextlib.suppress(OSError):
                self.folder.rmdir()   # a command refused before writing anything leaves no folder behind


def describe(holder: dict | None) -> str:
    if not holder:
        return "holder unknown"
    return f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"


@contextlib.contextmanager
def claim(folder: Path, key: str = "train.output_dir", name: str | None = None, wait: bool = False,
          every_process: bool = False):
    """`with claim(folder):` the command's whole life; no-op on processes other than the main one
    (every_process: taken by every process, as for a data store any of them may build).
    name: lock one file of the folder instead (generate's output); wait: queue behind a holder."""
    if not every_process and not is_main_process():
        yield None
        return
    try:
        import fcntl  # noqa: F401
    except ImportError:   # not POSIX: no flock; say so once rather than pretend
        log.warning("no file locking on this platform: do not run two commands on %s at once", folder)
        yield None
        return
    c = Claim(folder, key, name).acquire(wait)
    try:
        yield c
    except BaseException:
        c.release(failed=True)
        raise
    c.release()


def fsync_tree(path: Path):
    """Flush a file, or every file and folder under a folder, to the disk."""
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for f in files:
                _fsync(Path(root) / f)
            fsync_dir(Path(root))
    elif path.exists():
        _fsync(path)


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


UMASK = _umask()


def usual_mode(path: Path):
    """Files as readable as any other the user writes (0666 less the umask): safetensors writes its
    files 0600, so a final model or cache shard was the one file others could not read."""
    path = Path(path)
    for f in ([path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and not p.is_symlink()]):
        if f.stat().st_mode & 0o777 == 0o600:
            f.chmod(0o666 & ~UMASK)


def durable_replace(src: Path, dst: Path):
    """`os.replace(src, dst)` after src is on the disk, and the rename itself made durable."""
    fsync_tree(src)
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def _fsync(path: Path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:   # some file systems refuse fsync on a folder; the rename is then as durable as they make it
        pass
    finally:
        os.close(fd)


def write_json(path: Path, obj, indent=None):
    """obj as JSON in path, atomically and durably: a temporary file, on the disk, renamed over it
    (a crash or a power loss leaves the old file or the new one). A missing folder is made (the
    commands checked before their work that it can be: outputs.check_writable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=indent))
        durable_replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def checksum(path: Path) -> list[int]:
    """[size, CRC-32] of a file, read in 16 MB pieces (CRC-32 runs at disk speed; it is there to
    catch a truncated, zeroed or torn file, not an adversary)."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            crc, size = zlib.crc32(piece, crc), size + len(piece)
    return [size, crc]


def checksums(folder: Path, skip=()) -> dict:
    """{relative path: [size, CRC-32]} of every file under a folder (but the names in `skip`)."""
    folder = Path(folder)
    return {str(f.relative_to(folder)): checksum(f) for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name not in skip}


def damage(folder: Path, recorded: dict) -> str | None:
    """What differs between a folder's files and their `recorded` checksums, in a few words
    (None: every file is as written). Sizes are compared first, so a truncated file costs no read."""
    folder = Path(folder)
    for name, (size, _) in recorded.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size:,} bytes, {size:,} were written"
    for name, (_, crc) in recorded.items():
        if checksum(folder / name)[1] != crc:
            return f"{name} does not match its checksum"
    return None


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")
