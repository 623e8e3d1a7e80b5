"""Outputs written atomically (a killed or failing step never leaves half of one), DVC's hashes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from pipeline.lib.errors import UserError

PathLike = str | os.PathLike[str]


class NoSpaceError(UserError, OSError):
    """Writing an output ran out of disk space (or hit a quota or file-size limit)."""


def no_space_error(exc: BaseException, target: PathLike, key: str | None) -> NoSpaceError | None:
    """A one-line NoSpaceError naming `target` and the config `key` (or option) that sets it (None:
    nothing does) when `exc` is a full disk, quota or file-size limit; None for any other."""
    if isinstance(exc, NoSpaceError):  # a file inside the folder `target`: name the folder
        exc = exc.__context__  # type: ignore[assignment]  (the OSError it was raised for)
    if not isinstance(exc, OSError) or exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return None
    why = os.strerror(exc.errno)  # h5py's strerror spans lines
    where = f"{why}: {exc.filename}" if exc.filename else why
    elsewhere = f" or set {key} to a folder on another one" if key else ""
    return NoSpaceError(
        f"No space left to write {target} ({where}): free some space on that disk{elsewhere}. "
        "The partly written output was removed."
    )


def process_alive(pid: int) -> bool:
    """Whether process `pid` (> 0) exists (another user's included)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's
        pass
    return True


def remove_stale_temps(target: PathLike) -> list[Path]:
    """Remove the temporaries (`.<name>.tmp-<pid>-*`, `.<name>.old-<pid>`) that killed steps left
    beside `target`; those of live processes and of this one stay. Returns what was removed."""
    target = Path(target)
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)(?:-.*)?")
    try:
        names = sorted(os.listdir(target.parent))
    except OSError:
        return []
    removed = []
    for name in names:
        match = pattern.fullmatch(name)
        if not match or int(match[1]) == os.getpid() or process_alive(int(match[1])):
            continue
        removed.append(target.parent / name)
        _remove(removed[-1])
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _temp_beside(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(target)
    return target.with_name(f".{target.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


@contextmanager
def atomic_dir(target: PathLike, key: str = "its paths.* key") -> Iterator[Path]:
    """A fresh temporary folder beside `target` that replaces `target` whole if the block succeeds
    (removed, `target` untouched, if it raises; a full disk as `no_space_error` naming `key`)."""
    target = Path(target)
    tmp = _temp_beside(target)
    tmp.mkdir()  # 0777 less the umask, as `mkdir` gives
    try:
        yield tmp
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if error := no_space_error(exc, target, key):
            raise error from None
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    _remove(old)


@contextmanager
def atomic_file(
    target: PathLike, mode: str = "w", key: str | None = "its paths.* key"
) -> Iterator[IO[Any]]:
    """A temporary file beside `target`, open in `mode` (`w` or `wb`; UTF-8 for text), that
    replaces `target` only if the block succeeds (a full disk: `no_space_error`)."""
    target = Path(target)
    tmp = _temp_beside(target)
    try:
        with open(tmp, mode.replace("w", "x"), encoding=None if "b" in mode else "utf-8") as fh:
            yield fh  # created exclusively, 0666 less the umask, as `open` gives
        os.replace(tmp, target)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if error := no_space_error(exc, target, key):
            raise error from None
        raise


def write_json(path: PathLike, obj: Any, key: str | None = "its paths.* key") -> None:
    """`obj` as UTF-8 JSON (indent 2, trailing newline), written atomically (`key`: `atomic_file`)."""
    with atomic_file(path, key=key) as fh:
        json.dump(obj, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


#: Absolute: how closely another machine reproduces every metric. Other CPUs (XNNPACK, OpenBLAS
#: kernels) change the features' low bits, so dvc.lock's hashes differ there; features x (1 +
#: U(-e, e)), e = 1e-6 .. 1e-4, moved the default's metrics by <= 1.5e-5 (tests/test_dvc_lock.py).
REPRODUCED_WITHIN = 1e-4


def metric_values(value: Any) -> Any:
    """JSON-like `value` with its floats rounded to 6 decimals (REPRODUCED_WITHIN / 100), as
    metrics files hold them: another CPU's drift changes them only across a rounding boundary."""
    if isinstance(value, float):
        return round(value, 6)
    if isinstance(value, dict):
        return {key: metric_values(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [metric_values(item) for item in value]
    return value


def read_json(path: PathLike) -> Any:
    """The JSON value in `path`; OSError if unreadable, ValueError if not JSON."""
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


#: md5_file's results keyed by (path, inode, size, mtime ns), as DVC's state database keys them.
_MD5_MEMO: dict[tuple[str, int, int, int], str] = {}


def md5_file(path: PathLike, chunk: int = 1 << 20) -> str:
    """Hex MD5 of the file's bytes (DVC's content hash), remembered while the file is unchanged."""
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key not in _MD5_MEMO:
        digest = hashlib.md5()  # noqa: S324 (content hash, as DVC uses it)
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
        _MD5_MEMO[key] = digest.hexdigest()
    return _MD5_MEMO[key]


def dvc_md5(path: PathLike) -> str:
    """The hash DVC 3 records in dvc.lock: a file's md5, or for a folder `<md5>.dir`, the md5 of
    its sorted JSON listing of {"md5", "relpath"} entries."""
    path = Path(path)
    if path.is_file():
        return md5_file(path)
    files = [p for p in path.rglob("*") if p.is_file()]
    listing = [{"md5": md5_file(p), "relpath": p.relative_to(path).as_posix()} for p in files]
    listing.sort(key=lambda entry: entry["relpath"])
    raw = json.dumps(listing, sort_keys=True).encode()
    return hashlib.md5(raw).hexdigest() + ".dir"  # noqa: S324


def cache_root() -> Path:
    """The product's cache folder (conversions, C choices): $TRUCK_CACHE_DIR, else
    $XDG_CACHE_HOME/truck-pipeline, else ~/.cache/truck-pipeline."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(os.environ.get("TRUCK_CACHE_DIR") or os.path.join(xdg, "truck-pipeline"))
