"""Per-image backbone features, content-addressed: one sqlite file per `store_key` (flatbuffer,
image size, resize policy, decoder), float32 blobs with a CRC keyed by the photo's sha256: new
photos are computed, relabelled, moved or removed ones are not. A damaged entry is recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import PIL

from pipeline.lib.data import images
from pipeline.lib.files import cache_root, md5_file

log = logging.getLogger(__name__)


class RowWriter:
    """A float32 (N, D) `.npy` file written row by row with positional writes (`os.pwrite`): the
    rows go to the page cache, not to this process's memory (a memmap's written pages count in its
    RSS), so featurizing N photos needs memory independent of N. Bytes as `np.save` writes."""

    def __init__(self, path: Path, n: int, dim: int) -> None:
        header = np.lib.format.open_memmap(path, "w+", np.float32, (n, dim))  # header, sparse rows
        self.offset, self.row_bytes, self.n = header.offset, 4 * dim, n
        del header
        self.fd = os.open(path, os.O_WRONLY)

    def __len__(self) -> int:
        return self.n

    def __setitem__(self, index: int, x: np.ndarray) -> None:
        os.pwrite(self.fd, np.asarray(x, "<f4").tobytes(), self.offset + index * self.row_bytes)

    def close(self) -> None:
        os.close(self.fd)


def store_key(flatbuffer: bytes, image_size: int, resize: str) -> str:
    """32 hex digits: what per-image features depend on besides the photo's bytes."""
    decoder = f"{PIL.__version__}:{md5_file(images.__file__)}"
    parts = f"{hashlib.sha256(flatbuffer).hexdigest()}|{int(image_size)}|{resize}|{decoder}"
    return hashlib.sha256(parts.encode()).hexdigest()[:32]


class FeatureStore:
    """float32 (D,) features by photo sha256, in `<cache_root>/features/<key>.sqlite` (or `path`);
    an unwritable cache falls back to memory, with a warning."""

    def __init__(self, key: str, dim: int, path: Path | None = None) -> None:
        self.dim, self.path = int(dim), path or cache_root() / "features" / f"{key}.sqlite"
        self._open()

    def _open(self) -> None:
        for where in (self.path, ":memory:"):
            try:
                Path(where).parent.mkdir(parents=True, exist_ok=True)
                self.db = sqlite3.connect(where, timeout=120)
                self.db.execute("CREATE TABLE IF NOT EXISTS f (sha TEXT PRIMARY KEY, crc, x BLOB)")
                break
            except (OSError, sqlite3.Error) as exc:
                log.warning("Feature store %s unusable (%s): kept in memory", self.path, exc)

    def get(self, shas: Iterable[str]) -> dict[str, np.ndarray]:
        """{sha256: float32 (D,)} of the valid entries among `shas` (invalid ones deleted); {} when
        the file is damaged beyond its entries (set aside as `<name>.damaged`, a fresh one started)."""
        found, bad = {}, []
        try:
            wanted = list(dict.fromkeys(shas))
            for q in range(0, len(wanted), 500):  # one query per 500 (SQLite's variable limit)
                part = wanted[q : q + 500]
                marks = ",".join("?" * len(part))  # placeholders only: the values are bound
                query = f"SELECT sha, crc, x FROM f WHERE sha IN ({marks})"  # noqa: S608
                for sha, crc, blob in self.db.execute(query, part):
                    x = np.frombuffer(blob, "f4") if len(blob) == 4 * self.dim else None
                    if x is not None and zlib.crc32(blob) == crc and np.isfinite(x).all():
                        found[sha] = x
                    else:
                        bad.append(sha)
            if bad:
                log.warning(
                    "Feature store %s: %d damaged entries, recomputing them", self.path, len(bad)
                )
                self.db.executemany("DELETE FROM f WHERE sha = ?", [(s,) for s in bad])
                self.db.commit()
        except sqlite3.DatabaseError as exc:
            self.db.close()
            aside = self.path.with_name(self.path.name + ".damaged")
            log.warning("Feature store %s damaged (%s): set aside as %s", self.path, exc, aside)
            with contextlib.suppress(OSError):
                os.replace(self.path, aside)
            self._open()
            return {}
        return found

    def put(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Store (sha256, float32 (D,)) pairs, in one transaction."""
        blobs = [(sha, np.ascontiguousarray(x, np.float32).tobytes()) for sha, x in items]
        try:
            rows = [(sha, zlib.crc32(blob), blob) for sha, blob in blobs]
            self.db.executemany("INSERT OR REPLACE INTO f VALUES (?, ?, ?)", rows)
            self.db.commit()
        except sqlite3.Error as exc:  # a full or read-only disk: the stage goes on, uncached
            log.warning("Feature store %s: not saved (%s)", self.path, exc)

    def close(self) -> None:
        self.db.close()
