"""Times the near-duplicate candidate search (`similar_pairs` at CANDIDATE_SIMILARITY, each
photo's NEIGHBOURS nearest, as the audit stage runs it) on N random-ish 1280-d features:
clustered, non-negative like pooled ReLU6 features, with a few planted copies (all must be found).

    python benchmarks/near_duplicates_bench.py [N]     # default 100000
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np

from pipeline.lib.audit.near_duplicates import CANDIDATE_SIMILARITY, NEIGHBOURS, similar_pairs


def features(n: int, dim: int = 1280, seed: int = 0) -> tuple[np.ndarray, int]:
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.normal(size=(100, dim))).astype(np.float32)
    x = centres[rng.integers(0, 100, n)] + rng.gamma(1.0, 1.0, (n, dim)).astype(np.float32)
    copies = max(1, n // 1000)
    x[n - copies :] = x[:copies] * 1.01 + rng.normal(0, 0.01, (copies, dim)).astype(np.float32)
    return x, copies


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    x, copies = features(n)
    start, load = time.perf_counter(), os.getloadavg()[0]
    i, j, _ = similar_pairs(x, CANDIDATE_SIMILARITY, NEIGHBOURS)
    took = time.perf_counter() - start
    found = set(zip(i.tolist(), j.tolist(), strict=True))
    hits = sum((c, n - copies + c) in found for c in range(copies))
    print(f"{n} photos: {len(i)} candidate pairs, {hits} of {copies} planted copies found, in "
          f"{took:.1f} s; load {load:.1f} -> {os.getloadavg()[0]:.1f}")  # fmt: skip
