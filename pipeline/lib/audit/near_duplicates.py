"""Near-duplicates: pairs of photos one of which is a re-saved, resized or slightly cropped copy
of the other. Candidates: pairs whose L2-normalised backbone features have a cosine similarity
above `CANDIDATE_SIMILARITY`, each photo's `NEIGHBOURS` most similar only (<= NEIGHBOURS * N
pairs, only their photos decoded), found exactly and fast at 100k photos: with x = p + r, p its
projection on the top `PROJECTED` principal directions (uncentred), a.b <= pa.pb + |ra||rb|, so
blockwise float32 products of [p, |r|] rows bound every pair's similarity from above; only pairs
whose bound passes the threshold are computed on the full features. Kept: those whose grayscale
thumbnails correlate above `audit.near_duplicate_similarity`, one cropped by <= 12 % (`_BOXES`)."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits

#: Dimensions of the prefilter's projection; rows per block of the pairwise products.
PROJECTED = 128
BLOCK = 1024
SAMPLE = 20_000  # rows whose second moment chooses the projection
SLACK = 1e-3  # the bound's allowance for float32 rounding
#: Candidates (module docstring): copies shrunk to half keep >= 0.75 on flowers12.
CANDIDATE_SIMILARITY, NEIGHBOURS = 0.7, 5
#: Thumbnails: THUMB px squares cut from BASE px grayscale photos, area-averaged; crop boxes of
#: side SCALES (fraction of the photo) at OFFSETS x OFFSETS positions, the whole photo first.
BASE, THUMB, SCALES, OFFSETS = 64, 32, np.linspace(0.98, 0.88, 6), 4


@dataclass(frozen=True)
class NearDuplicate:
    """Two photos (a before b in the input order), their thumbnails' best correlation
    (`similarity`, module docstring) and their features' cosine similarity."""

    path_a: str
    split_a: str
    path_b: str
    split_b: str
    similarity: float
    feature_similarity: float
    cross_split: bool


def _bounding_rows(unit, n: int, seed: int = 0) -> np.ndarray:
    """float32 (n, k + 1): [p, |r|] of the unit rows `unit(rows)` (module docstring), k <=
    PROJECTED, BLOCK rows at a time."""
    sample = np.random.default_rng(seed).choice(n, min(n, SAMPLE), replace=False)
    blocks = (unit(sample[q : q + BLOCK]).astype(np.float64) for q in range(0, len(sample), BLOCK))
    _, vectors = np.linalg.eigh(sum(block.T @ block for block in blocks))
    basis = vectors[:, ::-1][:, :PROJECTED].astype(np.float32)
    p = np.concatenate([unit(slice(q, q + BLOCK)) @ basis for q in range(0, n, BLOCK)])
    rest = np.sqrt(np.maximum(0.0, 1.0 - (p * p).sum(axis=1, keepdims=True)))
    return np.hstack([p, rest]).astype(np.float32)


def _nearest(i: np.ndarray, j: np.ndarray, sim: np.ndarray, k: int) -> np.ndarray:
    """bool mask of the pairs among the k most similar pairs of one of their photos."""
    ends, sims = np.concatenate([i, j]), np.concatenate([sim, sim])
    order = np.lexsort((-sims, ends))
    rank = np.empty(len(ends), np.int64)
    rank[order] = np.arange(len(ends)) - np.searchsorted(ends[order], ends[order])
    return (rank < k).reshape(2, -1).any(axis=0)


def _dense_block(
    s: np.ndarray, a: int, b: int, threshold: float, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, s[i - a, j - b]): the cells of block `s` (rows from a, columns from b) with i < j
    and s > threshold among the k largest of their row or of their column (a photo's k nearest
    of all blocks are among its k nearest of each block)."""
    n, m = s.shape
    s[(b + np.arange(m)) <= (a + np.arange(n))[:, None]] = -np.inf
    s[s <= threshold] = -np.inf
    if k < max(n, m):
        r, c = min(k, m), min(k, n)
        # 64 rows / columns at a time, copied: no (n, m) int64 array kept alive (128 MB at 4096)
        rows = np.vstack(
            [np.argpartition(-s[q : q + 64], r - 1)[:, :r].copy() for q in range(0, n, 64)]
        )
        cols = np.hstack(
            [np.argpartition(-s[:, q : q + 64], c - 1, 0)[:c].copy() for q in range(0, m, 64)]
        )
        i = np.concatenate([np.repeat(np.arange(n), r), cols.ravel()])
        cells = np.unique(i * m + np.concatenate([rows.ravel(), np.tile(np.arange(m), c)]))
        i, j = cells // m, cells % m
    else:
        i, j = np.nonzero(s > threshold)
    keep = np.isfinite(s[i, j])
    return a + i[keep], b + j[keep], s[i[keep], j[keep]]


@threadpool_limits.wrap(limits=1)  # OpenBLAS' threads spin on a loaded machine (training.head)
def similar_pairs(
    features: np.ndarray, threshold: float, neighbours: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity): every pair i < j of rows of `features` (N, D) whose cosine similarity
    is above `threshold` (and, if `neighbours`, among the `neighbours` most similar of i or of j:
    at most neighbours * N pairs), int64, int64, float32, sorted by (i, j)."""
    x = np.asarray(features, dtype=np.float32)
    if len(x) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    k = neighbours or len(x)
    norms = [np.linalg.norm(x[q : q + BLOCK], axis=1) for q in range(0, len(x), BLOCK)]
    norms = np.maximum(np.concatenate(norms), 1e-12)[:, None]

    def unit(rows: slice | np.ndarray) -> np.ndarray:  # rows of x / |x|, never all at once
        return x[rows] / norms[rows]

    rows = _bounding_rows(unit, len(x))
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for a in range(0, len(x), BLOCK):
        for b in range(a, len(x), BLOCK):
            bound = rows[a : a + BLOCK] @ rows[b : b + BLOCK].T > threshold - SLACK
            bound = np.triu(bound, 1) if a == b else bound  # pairs i < j
            if np.count_nonzero(bound) > BLOCK:  # alike photos: the dense block, k best per line
                left = unit(slice(a, a + BLOCK))  # a @ a.T when a == b: numpy's syrk, as before
                right = left if a == b else unit(slice(b, b + BLOCK))
                i, j, exact = _dense_block(left @ right.T, a, b, threshold, k)
            else:
                i, j = np.array(np.nonzero(bound)) + [[a], [b]]
                exact = np.einsum("nd,nd->n", unit(i), unit(j))
            i, j, exact = (v[exact > threshold] for v in (i, j, exact))
            keep = _nearest(i, j, exact, k)  # holds each photo's k nearest of all the blocks
            found.append((i[keep], j[keep], exact[keep]))
    i, j, sim = (np.concatenate(parts) for parts in zip(*found, strict=True))
    i, j, sim = (a[_nearest(i, j, sim, k)] for a in (i, j, sim))
    order = np.lexsort((j, i))
    return i[order], j[order], sim[order]


def _area_weights(offset: float, side: float) -> np.ndarray:
    """(THUMB, BASE): row t averages the base pixels in [offset + t * step, + step]."""
    lo, x, step = offset + side * np.arange(THUMB)[:, None] / THUMB, np.arange(BASE), side / THUMB
    return np.clip(np.minimum(lo + step, x + 1) - np.maximum(lo, x), 0, None) / step


#: Per box: (weights of its rows, of its columns); the whole photo first.
_BOXES = [(_area_weights(0, BASE),) * 2] + [
    (_area_weights(oy, BASE * s), _area_weights(ox, BASE * s))
    for s in SCALES
    for oy in np.linspace(0, BASE * (1 - s), OFFSETS)
    for ox in np.linspace(0, BASE * (1 - s), OFFSETS)
]


def _thumbnails(bases: np.ndarray, boxes: list) -> np.ndarray:
    """float32 (N, len(boxes), THUMB**2) zero-mean unit thumbnails of (N, BASE, BASE) photos."""
    wide = bases.astype(np.float64)  # cast once, not per box: faster, the same bits
    t = np.stack([(wy @ wide @ wx.T).reshape(len(bases), -1) for wy, wx in boxes], axis=1)
    t -= t.mean(axis=2, keepdims=True)
    t /= np.maximum(np.linalg.norm(t, axis=2, keepdims=True), 1e-6)
    return t.astype(np.float32)


@threadpool_limits.wrap(limits=1)
def thumbnail_similarity(images, i: np.ndarray, j: np.ndarray, batch: int = 64) -> np.ndarray:
    """float32: for each pair (i, j) of `images` (uint8 (N, H, W, 3), indexable by an index
    array; only the photos in pairs are read), the best correlation of one photo's thumbnail
    with the other's after cropping the other (`_BOXES`), in either direction."""
    photos, inverse = np.unique(np.concatenate([i, j]), return_inverse=True)
    ends = inverse[: len(i)], inverse[len(i) :]
    best = np.full(len(i), -1.0, np.float32)
    with tempfile.TemporaryFile() as store:  # the uint8 bases on disk: memory flat in N

        def bases(rows: range | np.ndarray) -> np.ndarray:
            read = [os.pread(store.fileno(), BASE * BASE, int(r) * BASE * BASE) for r in rows]
            return np.frombuffer(b"".join(read), np.uint8).reshape(-1, BASE, BASE)

        box = Image.Resampling.BOX
        for n in range(0, len(photos), batch):  # BASE x BASE grayscale, area-averaged (exact)
            gray = (Image.fromarray(im).convert("L") for im in images[photos[n : n + batch]])
            store.write(b"".join(g.resize((BASE, BASE), box).tobytes() for g in gray))
        store.flush()
        for n in range(0, len(photos), batch):  # crops of a batch of photos against their partners
            crops = _thumbnails(bases(range(n, min(n + batch, len(photos)))), _BOXES)
            for mine, other in (ends, ends[::-1]):
                pairs = np.nonzero((mine >= n) & (mine < n + batch))[0]
                for at in (pairs[q : q + 256] for q in range(0, len(pairs), 256)):
                    whole = _thumbnails(bases(other[at]), _BOXES[:1])[:, 0]
                    score = np.einsum("pbd,pd->pb", crops[mine[at] - n], whole).max(axis=1)
                    best[at] = np.maximum(best[at], score)
    return best


def near_duplicates(
    features: np.ndarray, images, paths: list[str], splits: list[str], threshold: float
) -> list[NearDuplicate]:
    """Pairs of photos `paths` / `splits` (features (N, D), `images` as `thumbnail_similarity`
    reads them) whose thumbnails match above `threshold` (module docstring), most similar first."""
    i, j, cosine = similar_pairs(features, CANDIDATE_SIMILARITY, NEIGHBOURS)
    match = thumbnail_similarity(images, i, j)
    thumbs, feats = match.round(6).tolist(), cosine.round(6).tolist()
    pairs = [
        NearDuplicate(paths[a], splits[a], paths[b], splits[b], m, c, splits[a] != splits[b])
        for a, b, m, c in zip(i.tolist(), j.tolist(), thumbs, feats, strict=True)
        if m > threshold
    ]
    return sorted(pairs, key=lambda p: (-p.similarity, p.path_a, p.path_b))
