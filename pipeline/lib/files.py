"""Writing outputs so that a killed or failing step never leaves half of one behind."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.lib.errors import UserError

#: errno values that mean "the disk (or this process's share of it) is full".
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class NoSpaceError(UserError, OSError):
    """Writing an output ran out of disk space (or hit a quota or file-size limit)."""


def no_space_error(exc: OSError, target: str | os.PathLike[str], key: str) -> NoSpaceError | None:
    """A one-line `NoSpaceError` naming `target` (the config `key` that sets it) when `exc` is a
    full disk, quota or file-size limit; None for any other OSError."""
    if exc.errno not in NO_SPACE_ERRNOS:
        return None
    return NoSpaceError(
        f"No space left to write {target} ({exc.strerror or exc}"
        + (f": {exc.filename}" if exc.filename else "")
        + f"): free some space on that disk or set {key} to a folder on another one. The "
        "partly written output was removed."
    )


def _owner_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(target: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporaries that killed steps left beside `target`; return what was removed.

    `atomic_dir` and `atomic_file` name their temporaries `.<name>.tmp-<pid>-<random>` (and
    `.<name>.old-<pid>`); one is stale when its process `<pid>` no longer runs. Temporaries of
    live processes (a step running in parallel) and of this process are left alone.
    """
    target = Path(target)
    removed: list[Path] = []
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return removed
    for entry in entries:
        for kind in ("tmp", "old"):
            prefix = f".{target.name}.{kind}-"
            if not entry.name.startswith(prefix):
                continue
            pid_text = entry.name[len(prefix) :].split("-", 1)[0]
            if not pid_text.isdigit() or int(pid_text) == os.getpid():
                continue
            if _owner_alive(int(pid_text)):
                continue
            path = Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def current_umask() -> int:
    """The process's umask (read from /proc where it can be, so no thread sees it changed)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: str | os.PathLike[str]) -> None:
    """Give a temporary file or folder made by `tempfile` (0600 / 0700) the permissions a plain
    `open()` / `mkdir()` would have given it: 0666 / 0777 less the umask (0644 / 0755 under
    umask 022), so outputs renamed into place are readable as any other file."""
    full = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, full & ~current_umask())


@contextmanager
def atomic_dir(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target` whole
    (with the permissions of a folder made by `mkdir`: 0755 under umask 022).

    On an exception the temporary folder is removed and `target` is left as it was. Temporaries
    that killed runs left beside `target` are removed first (`remove_stale_temps`).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        honour_umask(tmp)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


@contextmanager
def atomic_file(target: str | os.PathLike[str], mode: str = "w") -> Iterator[Any]:
    """Open a temporary file beside `target`; it replaces `target` only if the block succeeds
    (with the permissions of a file made by `open`: 0644 under umask 022)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent)
    os.close(fd)
    try:
        honour_umask(tmp)
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as fh:
            yield fh
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as UTF-8 JSON (indent 2, keys in insertion order, trailing newline) to `path`,
    atomically: readers see the old file or the whole new one.
    """
    with atomic_file(path) as fh:
        json.dump(obj, fh, indent=2, sort_keys=False, ensure_ascii=False)
        fh.write("\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON value in the UTF-8 file `path`.

    Raises OSError when it cannot be read and ValueError (json.JSONDecodeError) when it is not
    JSON.
    """
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


#: md5_file's results in this process, keyed by (path, inode, size, mtime in ns): what DVC's own
#: state database keys on, so a file rewritten in place is hashed again (sweep jobs share one).
_MD5_MEMO: dict[tuple[str, int, int, int], str] = {}


def md5_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex MD5 of the file's bytes (the content hash DVC uses), read in `chunk`-byte blocks;
    remembered in this process while the file's inode, size and mtime stay the same."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _MD5_MEMO:
        return _MD5_MEMO[key]
    digest = hashlib.md5()  # noqa: S324 (content hash, as DVC uses it)
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    _MD5_MEMO[key] = digest.hexdigest()
    return _MD5_MEMO[key]


def dvc_md5(path: str | os.PathLike[str]) -> str:
    """The hash DVC 3 records in dvc.lock for a file or a folder (`<md5>.dir` for folders).

    A folder's hash is the md5 of its sorted JSON listing of (relpath, md5) entries; computing it
    here lets a step tag its MLflow run with exactly the hash `dvc.lock` holds for its input.
    """
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    entries = sorted(
        (p.relative_to(path).as_posix(), md5_file(p)) for p in path.rglob("*") if p.is_file()
    )
    listing = [{"md5": md5, "relpath": rel} for rel, md5 in entries]
    raw = json.dumps(listing, sort_keys=True).encode()
    return hashlib.md5(raw).hexdigest() + ".dir"  # noqa: S324
