#!/usr/bin/env python
"""The pipeline's cost against what it replaces, as ratios measured in one run (`make benchmark`).

    python benchmarks/bench.py            # full run (~10 min on 2 cores)
    python benchmarks/bench.py --quick    # smoke run: 1 repeat, a 2-job sweep, heap at 1x/2x

Rows (repeats interleaved, min and median printed, with the load average around each section):
  featurize   img/s of the TFLite featurizer vs Keras `predict` on the same 360 images and vs the
              CPU's limit (0.6 GFLOP/image at the single-core sgemm GFLOP/s numpy measures, times
              the usable cores); max |difference|; the same bytes run to run.
  predict     img/s of `python -m pipeline.predict <folder>` (the trained models/ folder) vs
              `python -m pipeline.prepare data=folder` + `python -m pipeline.featurize` on the same
              folder of the 360 default PNGs (the same work: decode, resize, backbone; processes,
              start-up included); target >= 0.8x (issue 22).
  sweep       a 10-job `python -m pipeline.train -m ...` over head settings vs one featurize pass
              (`python -m pipeline.featurize`, both processes, on the default data).
  repro       `dvc repro` from clean in a fresh copy of the project vs benchmarks/study_script.py
              (the plain Keras script) on the same generated images; test accuracy of both.
  cold        (information) one `dvc repro` from clean with an empty TFLite conversion cache.
  heap        featurize at 1x/4x/16x the default data: peak traced heap (tracemalloc) and VmHWM.
Everything runs in a temporary folder; the TFLite conversion cache is the user's (its content
never changes the features). Exit status 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import numpy as np  # noqa: E402

PROJECT_FILES = ["conf", "pipeline", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore"]
GFLOP_PER_IMAGE = 0.6  # MobileNetV2 1.0 / 224 (about 0.3 G multiply-adds)
STAGE = ["--config-path", "..", "--config-name", "params"]
SWEEP = ["train.C=0.01,0.1,1.0,10.0,100.0", "train.label_smoothing=0.0,0.1"]
QUICK_SWEEP = ["train.C=0.1,10.0"]
ROWS: list[dict] = []


def env(**extra: str) -> dict[str, str]:
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, **extra}  # DVC's stage commands call `python`


def decoded(prepared: Path) -> np.ndarray:
    """uint8 (N, 224, 224, 3): every photo of a prepared folder, decoded (prepare keeps none)."""
    from pipeline.lib.data.prepared import PreparedDataset

    dataset = PreparedDataset(prepared)
    return np.concatenate([np.asarray(dataset.images(s)) for s in ("train", "val", "test")])


def empty_store(tmp: Path) -> dict[str, str]:
    """TRUCK_CACHE_DIR for a featurize pass that computes every photo: the user's converted
    backbones, an empty per-photo feature store."""
    from pipeline.lib.files import cache_root

    cache = tmp / "bench-cache"
    shutil.rmtree(cache / "features", ignore_errors=True)
    if (cache_root() / "tflite").is_dir():
        shutil.copytree(cache_root() / "tflite", cache / "tflite", dirs_exist_ok=True)
    return {"TRUCK_CACHE_DIR": str(cache)}


def timed(cmd: list[str], cwd: Path, **extra_env: str) -> float:
    """Seconds `cmd` ran (it must succeed); `extra_env`: variables set for it."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(**extra_env), capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def copy_project(dest: Path) -> Path:
    """The project's files in `dest`, a fresh git repository (what a clone looks like)."""
    for name in PROJECT_FILES:
        src, dst = ROOT / name, dest / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dst)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@example.com"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "project"]):
        timed([*git, *args], dest)
    return dest


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def row(name: str, values: list[float], unit: str, ratio: float | None = None, target: str = "",
        ok: bool | None = None, note: str = "") -> None:  # fmt: skip
    ROWS.append(
        {"name": name, "min": min(values), "median": statistics.median(values), "unit": unit,
         "ratio": ratio, "target": target, "ok": ok, "note": note, "load": load()}
    )  # fmt: skip


def sgemm_gflops() -> float:
    """Single-core float32 matrix-multiply GFLOP/s (best of 5, 1024^3)."""
    from threadpoolctl import threadpool_limits

    a, b = (np.random.default_rng(i).random((1024, 1024), dtype=np.float32) for i in (0, 1))
    with threadpool_limits(1):
        best = min(timeit.timeit(lambda: a @ b, number=1) for _ in range(5))
    return 2 * 1024**3 / best / 1e9


def bench_featurize(project: Path, repeats: int) -> None:
    from pipeline.lib.model.build import build_feature_extractor
    from pipeline.lib.model.features import (
        ShardedTFLite,
        backbone_flatbuffer,
        featurize_array,
        usable_cores,
    )

    folder = project / "data" / "prepared"
    images = decoded(folder)
    extractor = build_feature_extractor(1.0, "imagenet", 224, 0)
    featurizer = ShardedTFLite(backbone_flatbuffer(1.0, "imagenet", 224, 0))
    floats = images.astype(np.float32)
    extractor.predict(floats[:32], batch_size=32, verbose=0)  # trace once, outside the timing
    keras_rates, tflite_rates, outputs = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        reference = extractor.predict(floats, batch_size=32, verbose=0)
        keras_rates.append(len(images) / (time.perf_counter() - start))
        start = time.perf_counter()
        outputs.append(featurize_array(featurizer, images, 32, reference.shape[1]))
        tflite_rates.append(len(images) / (time.perf_counter() - start))
    diff = float(np.abs(outputs[0] - reference).max())
    same = all(o.tobytes() == outputs[0].tobytes() for o in outputs)
    limit = usable_cores() * sgemm_gflops() / GFLOP_PER_IMAGE
    speedup = statistics.median(tflite_rates) / statistics.median(keras_rates)
    row("featurize Keras predict", keras_rates, "img/s")
    row("featurize TFLite (pipeline)", tflite_rates, "img/s", speedup, ">= 4x Keras",
        speedup >= 4, f"{statistics.median(tflite_rates) / limit:.2f} of the limit")  # fmt: skip
    row("featurize CPU limit", [limit], "img/s", note=f"{usable_cores()} cores x sgemm")
    row("featurize max |diff| vs Keras", [diff], "", None, "<= 1e-3", diff <= 1e-3)
    row("featurize run-to-run bytes", [float(same)], "same", None, "identical", same)


def bench_predict(project: Path, tmp: Path, repeats: int) -> None:
    """`pipeline.predict` on a folder vs `prepare` (data=folder) + `featurize` on that folder:
    decode, resize and the backbone in both (predict adds the head; prepare checks and hashes the
    files, featurize decodes them again, with an empty feature store). Processes, start-up included, the model trained once."""
    photos = tmp / "photos"  # the default data's PNGs, one sub-folder per class
    for file in sorted((project / "data" / "raw" / "synthetic").rglob("*.png")):
        (photos / file.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(file, photos / file.parent.name / f"{file.parent.parent.name}_{file.name}")
    n = len(list(photos.rglob("*.png")))
    if not (project / "models" / "model.json").is_file():
        timed([sys.executable, "-m", "pipeline.train", *STAGE, "hydra.run.dir=outputs/t"], project)
    folder = ["data=folder", f"data.path={photos}", f"paths.prepared={tmp / 'prepared'}",
              f"paths.features={tmp / 'features'}"]  # fmt: skip
    staged, predicted = [], []
    for i in range(repeats):
        seconds = timed([sys.executable, "-m", "pipeline.prepare", *folder,
                         f"hydra.run.dir={tmp}/hydra/p{i}"], project)  # fmt: skip
        seconds += timed([sys.executable, "-m", "pipeline.featurize", *folder,
                          f"hydra.run.dir={tmp}/hydra/f{i}"], project, **empty_store(tmp))  # fmt: skip
        staged.append(n / seconds)
        predicted.append(n / timed([sys.executable, "-m", "pipeline.predict", str(photos),
                                    "--model", "models", "--output", str(tmp / "p.csv")],
                                   project))  # fmt: skip
        rows = len((tmp / "p.csv").read_text().splitlines()) - 1
        if rows != n:
            sys.exit(f"pipeline.predict wrote {rows} rows for {n} images")
    ratio = statistics.median(predicted) / statistics.median(staged)
    row("prepare + featurize (processes)", staged, "img/s", note=f"{n} PNGs, data=folder")
    row("predict on a folder (process)", predicted, "img/s", ratio, ">= 0.8x prep+featurize",
        ratio >= 0.8, "python -m pipeline.predict <folder>")  # fmt: skip


def bench_sweep(project: Path, repeats: int, sweep: list[str]) -> None:
    featurize, jobs = [], []
    for i in range(repeats):
        featurize.append(timed([sys.executable, "-m", "pipeline.featurize", *STAGE,
                                "hydra.run.dir=outputs/bench/featurize"], project,
                               **empty_store(project / "outputs")))  # fmt: skip
        jobs.append(timed([sys.executable, "-m", "pipeline.train", "-m", *STAGE, *sweep,
                           f"hydra.sweep.dir=outputs/bench/sweep{i}"], project))  # fmt: skip
    n = int(np.prod([len(s.split("=")[1].split(",")) for s in sweep]))
    ratio = statistics.median(jobs) / statistics.median(featurize)
    row("featurize pass (process)", featurize, "s", note="warm conversion cache: no TensorFlow")
    row(f"sweep, {n} jobs (process)", jobs, "s", ratio, "<= 1.0x featurize", ratio <= 1.0,
        f"{statistics.median(jobs) / n:.1f} s/job")  # fmt: skip


def bench_repro(tmp: Path, raw: Path, repeats: int) -> None:
    repro, study, accuracy = [], [], {"repro": [], "study": []}
    for i in range(repeats):
        project = copy_project(tmp / f"repro{i}")
        repro.append(timed([sys.executable, "-m", "dvc", "repro", "-q"], project))
        metrics = json.loads((project / "reports" / "metrics.json").read_text())
        accuracy["repro"].append(metrics["test"]["accuracy"])
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "study_script.py"),
                               str(raw)], env=env(), capture_output=True, text=True, check=True)  # fmt: skip
        study.append(time.perf_counter() - start)
        accuracy["study"].append(json.loads(proc.stdout.strip().splitlines()[-1])["test_accuracy"])
        shutil.rmtree(project, ignore_errors=True)
    ratio = statistics.median(repro) / statistics.median(study)
    better = min(accuracy["repro"]) >= max(accuracy["study"]) - 1e-9
    row("study-style Keras script", study, "s", note=f"test accuracy {accuracy['study']}")
    row("dvc repro from clean", repro, "s", ratio, "<= 0.35x study, acc >=", ratio <= 0.35 and better,
        f"test accuracy {accuracy['repro']}")  # fmt: skip


def bench_repro_cold(tmp: Path) -> None:
    """Information: `dvc repro` from clean with an empty TFLite conversion cache (a machine's
    first run: the backbone is converted once, about 10 s)."""
    project = copy_project(tmp / "repro-cold")
    seconds = timed([sys.executable, "-m", "dvc", "repro", "-q"], project,
                    TRUCK_CACHE_DIR=str(tmp / "cold-cache"))  # fmt: skip
    row("dvc repro, cold conversion cache", [seconds], "s", note="first run on a machine")
    shutil.rmtree(project, ignore_errors=True)


def heap_child(prepared: Path, factor: int, tmp: Path) -> None:
    """One size, in its own process: featurize `factor` x the default images (a uint8 .npy
    memmap) into a float32 .npy memmap; print {"peak_heap", "vm_hwm"} in bytes."""
    import tracemalloc

    from pipeline.lib.model.features import ShardedTFLite, backbone_flatbuffer, featurize_array

    base = decoded(prepared)
    images = np.lib.format.open_memmap(tmp / "in.npy", "w+", np.uint8, (factor * len(base), *base.shape[1:]))  # fmt: skip
    for i in range(factor):
        images[i * len(base) : (i + 1) * len(base)] = base
    del base
    featurizer = ShardedTFLite(backbone_flatbuffer(1.0, "imagenet", 224, 0))
    dim = featurizer.feature_dim
    out = np.lib.format.open_memmap(tmp / "out.npy", "w+", np.float32, (len(images), dim))
    tracemalloc.start()
    featurize_array(featurizer, images, 32, dim, out)
    peak = tracemalloc.get_traced_memory()[1]
    status = Path("/proc/self/status").read_text()
    hwm = next((int(x.split()[1]) * 1024 for x in status.splitlines() if x.startswith("VmHWM")), 0)
    print(json.dumps({"peak_heap": peak, "vm_hwm": hwm}))


def bench_heap(project: Path, tmp: Path, factors: list[int]) -> None:
    peaks = {}
    for f in factors:
        folder = tmp / f"heap{f}"
        folder.mkdir()
        proc = subprocess.run([sys.executable, __file__, "--heap-child", str(f), str(project / "data" / "prepared"), str(folder)],
                              env=env(), capture_output=True, text=True, check=True)  # fmt: skip
        peaks[f] = json.loads(proc.stdout.strip().splitlines()[-1])
        shutil.rmtree(folder)
        row(f"featurize heap {f}x ({f * 360} img)", [peaks[f]["peak_heap"] / 2**20], "MiB",
            note=f"VmHWM {peaks[f]['vm_hwm'] / 2**20:.0f} MiB")  # fmt: skip
    heaps = [p["peak_heap"] for p in peaks.values()]
    spread = max(heaps) / min(heaps) - 1
    row("featurize heap spread", [spread * 100], "%", None, "<= 20 %", spread <= 0.2)


def report() -> int:
    print(f"\n{'row':36} {'min':>9} {'median':>9} {'unit':6} {'ratio':>6}  {'target':22} "
          f"{'result':6} {'load 1/5/15':13} note")  # fmt: skip
    for r in ROWS:
        ratio = f"{r['ratio']:.2f}" if r["ratio"] is not None else ""
        result = {True: "PASS", False: "FAIL", None: ""}[r["ok"]]
        print(f"{r['name']:36} {r['min']:9.3g} {r['median']:9.3g} {r['unit']:6} {ratio:>6}  "
              f"{r['target']:22} {result:6} {r['load']:13} {r['note']}")  # fmt: skip
    return 1 if any(r["ok"] is False for r in ROWS) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 2-job sweep, heap 1x/2x")
    parser.add_argument("--repeats", type=int, default=None, help="default 3 (quick: 1)")
    parser.add_argument("--skip", default="", help="sections to leave out: featurize,sweep,...")
    parser.add_argument("--heap-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.heap_child:
        heap_child(Path(args.heap_child[1]), int(args.heap_child[0]), Path(args.heap_child[2]))
        return 0
    repeats = args.repeats or (1 if args.quick else 3)
    skip = set(args.skip.split(",")) | ({"cold"} if args.quick else set())
    print(f"bench: {os.cpu_count()} cores, load {load()}, repeats {repeats}", flush=True)
    with tempfile.TemporaryDirectory(prefix="truck-bench-") as tmp_name:
        tmp = Path(tmp_name)
        base = copy_project(tmp / "base")  # prepared data and features for the sections
        timed([sys.executable, "-m", "pipeline.prepare", *STAGE, "hydra.run.dir=outputs/p"], base)
        timed([sys.executable, "-m", "pipeline.featurize", *STAGE, "hydra.run.dir=outputs/f"], base)
        sections = {
            "featurize": lambda: bench_featurize(base, max(repeats, 5)),  # Keras varies most
            "predict": lambda: bench_predict(base, tmp, repeats),
            "sweep": lambda: bench_sweep(base, repeats, QUICK_SWEEP if args.quick else SWEEP),
            "repro": lambda: bench_repro(tmp, base / "data/raw/synthetic", min(repeats, 2)),
            "cold": lambda: bench_repro_cold(tmp),
            "heap": lambda: bench_heap(base, tmp, [1, 2] if args.quick else [1, 4, 16]),
        }
        for name, section in sections.items():
            if name not in skip:
                print(f"{name} ... (load {load()})", flush=True)
                section()
    return report()


if __name__ == "__main__":
    sys.exit(main())
