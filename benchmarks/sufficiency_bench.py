#!/usr/bin/env python
"""Benchmark: the data-sufficiency curve (pipeline.lib.audit.sufficiency) on flowers12 in <= 60 s.

    python benchmarks/sufficiency_bench.py                   # features in a fresh temporary folder
    python benchmarks/sufficiency_bench.py --work /tmp/acc   # keep / reuse (accuracy_bench's layout)

flowers12 (../shared/data/flowers12) is prepared and featurized once by the pipeline's steps
(accuracy_bench.features); C is what `train.C=auto` chooses on the training split (not timed: the
train stage has chosen and cached it). Timed: `sufficiency_curve` of the training split scored on
the test split, default sizes and 5 seeds, wall and CPU seconds, with the load average before and
after (2 cores shared: the wall time follows the load). Printed: the mean accuracy per size, the
sentences, PASS/FAIL of <= 60 s wall; exit status 1 on a FAIL.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from accuracy_bench import features  # benchmarks/ is sys.path[0] when run as a script
from threadpoolctl import threadpool_limits

from pipeline.lib.audit.sufficiency import sentence, sufficiency_curve
from pipeline.lib.training.head import choose_c

TARGET_S = 60.0


def load() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} / {five:.2f} (1 / 5 min)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="work folder to keep / reuse (default: temp)")
    args = parser.parse_args()
    base = (args.work or Path(tempfile.mkdtemp(prefix="sufficiency-bench-"))).resolve()
    f = features(base / "flowers12", "flowers12")
    with threadpool_limits(1):
        c, _ = choose_c(f.x["train"], f.y["train"], f.num_classes, f.cfg.train.seed)
    names = [str(i) for i in range(f.num_classes)]
    print(load())
    wall, cpu = time.perf_counter(), time.process_time()
    curve = sufficiency_curve(
        f.x["train"], f.y["train"], f.x["test"], f.y["test"], f.num_classes, c, names
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    print(load())
    print(f"flowers12: {len(f.y['train'])} training, {len(f.y['test'])} test photos, C = {c:g}")
    print("images per class  mean accuracy (5 seeds)")
    for n, row in zip(curve.sizes, curve.scores[:, :, 0], strict=True):
        print(f"{n:>16}  {row.mean():.4f}  (seeds {' '.join(f'{v:.3f}' for v in row)})")
    print(sentence("all", curve.fits["all"]))
    ok = wall <= TARGET_S
    print(
        f"{'PASS' if ok else 'FAIL'}  curve in {wall:.1f} s wall ({cpu:.1f} s CPU) <= {TARGET_S:g} s"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
