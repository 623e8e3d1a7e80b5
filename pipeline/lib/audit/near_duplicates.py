"""Near-duplicates: pairs of photos whose L2-normalised backbone features have a cosine
similarity above `audit.near_duplicate_similarity` (a re-saved, resized or slightly cropped copy).

Exact and fast at 100k photos: each feature x = p + r, p its projection on the top `PROJECTED`
principal directions (uncentred) and r the rest, so a.b = pa.pb + ra.rb <= pa.pb + |ra||rb|.
Blockwise float32 products of [p, |r|] rows bound every pair's similarity from above; only the
pairs whose bound passes the threshold are computed exactly on the full features."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

#: Dimensions of the prefilter's projection; rows per block of the pairwise products.
PROJECTED = 128
BLOCK = 4096
#: Rows whose second moment chooses the projection.
SAMPLE = 20_000
#: The bound's allowance for float32 rounding.
SLACK = 1e-3


@dataclass(frozen=True)
class NearDuplicate:
    """Two photos (a before b in the input order) and their features' cosine similarity."""

    path_a: str
    split_a: str
    path_b: str
    split_b: str
    similarity: float
    cross_split: bool


def _bounding_rows(x: np.ndarray, seed: int = 0) -> np.ndarray:
    """float32 (N, k + 1): [p, |r|] of each unit row (module docstring); k <= PROJECTED."""
    rng = np.random.default_rng(seed)
    sample = x[rng.choice(len(x), min(len(x), SAMPLE), replace=False)].astype(np.float64)
    _, vectors = np.linalg.eigh(sample.T @ sample)
    basis = vectors[:, ::-1][:, : min(PROJECTED, x.shape[1])].astype(np.float32)
    p = x @ basis
    rest = np.sqrt(np.maximum(0.0, 1.0 - (p * p).sum(axis=1, keepdims=True)))
    return np.hstack([p, rest]).astype(np.float32)


def similar_pairs(
    features: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, similarity): every pair i < j of rows of `features` (N, D) whose cosine similarity
    is above `threshold`, int64, int64, float32, sorted by (i, j)."""
    x = np.asarray(features, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if len(x) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    with threadpool_limits(1):  # OpenBLAS' threads spin on a loaded machine (see training.head)
        return _similar_pairs(x, threshold)


def _similar_pairs(x: np.ndarray, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = _bounding_rows(x)
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for a in range(0, len(x), BLOCK):
        for b in range(a, len(x), BLOCK):
            i, j = np.nonzero(rows[a : a + BLOCK] @ rows[b : b + BLOCK].T > threshold - SLACK)
            keep = b + j > a + i
            i, j = a + i[keep], b + j[keep]
            if len(i) > BLOCK:  # alike photos: the exact block product costs less than gathers
                exact = (x[a : a + BLOCK] @ x[b : b + BLOCK].T)[i - a, j - b]
            else:
                exact = np.einsum("nd,nd->n", x[i], x[j])
            found.append((i[exact > threshold], j[exact > threshold], exact[exact > threshold]))
    i, j, sim = (np.concatenate(parts) for parts in zip(*found, strict=True))
    order = np.lexsort((j, i))
    return i[order], j[order], sim[order]


def near_duplicates(
    features: np.ndarray, paths: list[str], splits: list[str], threshold: float
) -> list[NearDuplicate]:
    """The `similar_pairs` of photos `paths` / `splits`, most similar first."""
    i, j, sim = similar_pairs(features, threshold)
    pairs = [
        NearDuplicate(
            paths[a], splits[a], paths[b], splits[b], round(float(s), 6), splits[a] != splits[b]
        )
        for a, b, s in zip(i.tolist(), j.tolist(), sim.tolist(), strict=True)
    ]
    return sorted(pairs, key=lambda p: (-p.similarity, p.path_a, p.path_b))
