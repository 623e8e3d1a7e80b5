"""Scale benchmark (issue 23): N unique JPEGs (300-800 px) cropped from the flowers12 photos, a
copy of this project on them, `dvc repro <stage>` for every stage, then +1 % photos. Prints with
the load: per stage wall s, images/s, CPU-ms/image (DVC included), peak RSS of the stage's own
process (its dvc.yaml cmd under /usr/bin/time) and its ratio to the first N; disk of data/ +
.dvc/cache (links once) and the feature store against the photos; `dvc status` / no-op `dvc
repro` s; MLflow metric rows; the +1 % run. `--draft`: features with and without JPEG DCT
scaling; `--pools`: decoding in threads vs processes.

    python benchmarks/scale.py --n 1000 10000 --work /tmp/scale [--draft] [--pools]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import sqlite3
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
FLOWERS = Path(os.environ.get("FLOWERS", ROOT.parent / "shared/data/flowers12"))
BIN = Path(sys.executable).parent
STAGES = ("prepare", "featurize", "train", "evaluate", "export")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.1f} {five:.1f} {fifteen:.1f} on {os.cpu_count()} cores"


def generate(folder: Path, first: int, n: int) -> None:
    """JPEGs number first..first+n-1, each a distinct crop of a flowers12 photo, 300-800 px."""
    sources = sorted(FLOWERS.rglob("*.jpg"))
    for i in range(first, first + n):
        rng = np.random.default_rng(i)
        src = sources[i % len(sources)]
        with Image.open(src) as im:
            im = im.convert("RGB")
            w, h = im.size
            cw, ch = int(w * rng.uniform(0.7, 1)), int(h * rng.uniform(0.7, 1))
            x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            scale = int(rng.integers(300, 801)) / max(cw, ch)  # longer side 300-800 px
            im = im.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)))
            out = folder / src.parent.name / f"g{i:06d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            im.save(out, quality=int(rng.integers(80, 93)))


def disk(*folders: Path) -> tuple[list[int], int]:
    """(bytes per folder, bytes of all together with each inode counted once)."""
    per, seen = [], {}
    for folder in folders:
        files = [p.stat() for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
        per.append(sum(st.st_size for st in files))
        seen |= {(st.st_dev, st.st_ino): st.st_size for st in files}
    return per, sum(seen.values())


def stage(proj: Path, name: str, env: dict) -> tuple[float, float, float, str]:
    """`dvc repro <name>`: (wall s, CPU s of all its processes, peak RSS MB of the stage's own
    process (dvc.yaml's cmd under /usr/bin/time; DVC itself not counted), output)."""
    (proj.parent / f"{name}.rss").unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(
        [str(BIN / "dvc"), "repro", name], cwd=proj, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    rss = float((proj.parent / f"{name}.rss").read_text().split()[-1]) / 1024
    return wall, cpu, rss, proc.stdout + proc.stderr


def timed(proj: Path, env: dict, *args: str) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run([str(BIN / "dvc"), *args], cwd=proj, env=env, capture_output=True,
                          text=True, check=True)  # fmt: skip
    return time.perf_counter() - start, (proc.stdout + proc.stderr).strip().splitlines()[-1]


def metric_rows(db: Path) -> str:
    """MLflow's metrics table: rows, runs, keys, bytes (~), the key with the most rows."""
    with sqlite3.connect(db) as con:
        rows, runs, keys, size = con.execute(
            "SELECT count(*), count(DISTINCT run_uuid), count(DISTINCT key),"
            " sum(length(key) + length(run_uuid) + 33) FROM metrics"
        ).fetchone()
        top = con.execute(
            "SELECT key, count(*) n FROM metrics GROUP BY key ORDER BY n DESC"
        ).fetchone()
    return (f"{rows} rows in {runs} run(s), {keys} keys, ~{(size or 0) / 1024:.0f} KB (most: "
            f"{top}); mlflow.db {db.stat().st_size / 2**20:.1f} MB")  # fmt: skip


def project(work: Path, photos: Path, formats: str) -> tuple[Path, dict]:
    proj = work / "proj"
    shutil.rmtree(proj, ignore_errors=True)
    proj.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, proj / f)
    dvc_yaml = (proj / "dvc.yaml").read_text()
    for name in STAGES:  # each stage's own peak RSS (max resident KB) into work/<stage>.rss
        dvc_yaml = dvc_yaml.replace(f"cmd: python -m pipeline.{name} ",
                                    f"cmd: /usr/bin/time -f %M -o {work}/{name}.rss python -m pipeline.{name} ")  # fmt: skip
    (proj / "dvc.yaml").write_text(dvc_yaml)
    cache = work / "cache"
    for fresh in ("features", "head"):  # the feature store, train.C=auto's cached choices
        shutil.rmtree(cache / fresh, ignore_errors=True)
    user_tflite = Path(os.path.expanduser("~/.cache/truck-pipeline/tflite"))
    if user_tflite.is_dir():  # no conversion in the timings (the user's may be newer)
        shutil.copytree(user_tflite, cache / "tflite", dirs_exist_ok=True)
    env = {**os.environ, "TRUCK_CACHE_DIR": str(cache), "PATH": f"{BIN}:{os.environ['PATH']}"}
    params = [str(BIN / "python"), "-m", "pipeline.params"]
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "x"],
                [*params, "--use-folder", str(photos)]):  # fmt: skip
        subprocess.run(cmd, cwd=proj, env=env, check=True, capture_output=True)
    # crops of one flowers12 photo land in several splits: near-duplicates by construction
    with (proj / "conf/data/photos.yaml").open("a") as f:
        f.write("leakage: warn\n")
    export = proj / "conf/export/default.yaml"  # the default exports nothing: measure one format
    export.write_text(export.read_text().replace("formats: []", f"formats: [{formats}]"))
    subprocess.run(params, cwd=proj, env=env, check=True, capture_output=True)
    return proj, env


def computed(output: str) -> tuple[int, float]:
    found = re.findall(r"(\d+) computed \(([\d.]+) img/s\)", output)
    return (int(found[-1][0]), float(found[-1][1])) if found else (0, 0.0)


def scale(n: int, work: Path, first_rss: dict, formats: str) -> None:
    photos = work / f"photos{n}"
    if not photos.is_dir():
        generate(photos, 0, n)
    for extra in photos.rglob("g*.jpg"):  # the +1 % of an earlier run
        if int(extra.stem[1:]) >= n:
            extra.unlink()
    photo_bytes = disk(photos)[1]
    proj, env = project(work, photos, formats)
    print(f"N = {n} photos, {photo_bytes / n / 1024:.1f} KB each; {load()}")
    print(f"{'stage':<11}{'wall s':>8}{'img/s':>7}{'CPU ms/img':>11}{'peak RSS MB':>12}"
          f"{'x first N':>10}  load")  # fmt: skip
    for name in STAGES:
        wall, cpu, rss, out = stage(proj, name, env)
        if name == "featurize":
            featurize_wall, (done, rate) = wall, computed(out)
        ratio = f"{rss / first_rss[name]:.2f}" if name in first_rss else ""
        first_rss.setdefault(name, rss)
        print(f"{name:<11}{wall:>8.1f}{n / wall:>7.0f}{1000 * cpu / n:>11.2f}{rss:>12.0f}{ratio:>10}"
              f"  {load()}")  # fmt: skip
    print(f"featurize: {done} computed at {rate:.0f} img/s in the pass")
    (data, cache), together = disk(proj / "data", proj / ".dvc/cache")
    store = sum(p.stat().st_size for p in (work / "cache/features").glob("*.sqlite"))
    print(f"disk: data/ {data / 2**20:.1f} MB + .dvc/cache {cache / 2**20:.1f} MB = "
          f"{together / 2**20:.1f} MB on disk (links once) = {together / photo_bytes:.3f}x the "
          f"photos ({photo_bytes / 2**20:.1f} MB); feature store {store / 2**20:.1f} MB "
          f"({store / n / 1024:.1f} KB/photo, {store / photo_bytes:.3f}x)")  # fmt: skip
    timed(proj, env, "repro")  # the `config` stage (params.yaml's guard) has not run yet
    for args in (("status",), ("repro",)):
        seconds, last = timed(proj, env, *args)
        print(f"dvc {args[0]}: {seconds:.1f} s ({last!r}); {load()}")
    print(f"MLflow metrics: {metric_rows(proj / 'mlflow.db')}")
    added = max(1, n // 100)
    generate(photos, n, added)
    timed(proj, env, "repro", "prepare")
    wall, cpu, rss, out = stage(proj, "featurize", env)
    print(f"+1 % ({added} photos): featurize {wall:.1f} s = {wall / featurize_wall:.0%} of the "
          f"first run, {computed(out)[0]} computed, peak RSS {rss:.0f} MB; {load()}")  # fmt: skip


def draft_tolerance(work: Path) -> None:
    """Features of upscaled flowers12 photos with DCT scaling (the default) and without."""
    sys.path.insert(0, str(ROOT))
    from pipeline.lib.data import images
    from pipeline.lib.model.features import ShardedTFLite, backbone_flatbuffer, featurize_array

    os.environ.setdefault("TRUCK_CACHE_DIR", str(work / "cache"))
    paths = []  # flowers12 is 224-299 px: DCT scaling needs >= 448 px sides, so upscale them
    for i, src in enumerate(sorted(FLOWERS.rglob("*.jpg"))):
        paths.append(work / "big" / f"{i:04d}.jpg")
        if not paths[-1].exists():
            paths[-1].parent.mkdir(parents=True, exist_ok=True)
            with Image.open(src) as im:
                side = int(np.random.default_rng(i).integers(460, 1800))
                scale = side / min(im.size)
                im = im.convert("RGB").resize((round(im.width * scale), round(im.height * scale)))
                im.save(paths[-1], quality=90)
    net = ShardedTFLite(backbone_flatbuffer(1.0, "imagenet", 224), 0)
    feats = {}
    for factor in (images.DRAFT_FACTOR, 10**6):  # 10**6: no DCT scaling
        images.DRAFT_FACTOR = factor
        start = time.perf_counter()
        with ThreadPoolExecutor(4) as pool:
            pixels = np.stack(list(pool.map(lambda p: images.load_rgb(p, 224), paths)))
        decode = time.perf_counter() - start
        feats[factor] = featurize_array(net, pixels, 32, net.feature_dim)
        print(f"draft factor {factor}: decode {len(paths) / decode:.0f} img/s; {load()}")
    a, b = feats.values()
    from sklearn.linear_model import LogisticRegression

    sources = sorted(FLOWERS.rglob("*.jpg"))
    y = np.array([src.parent.name for src in sources])
    train = np.array([src.parts[-3] == "training" for src in sources])
    test = np.array([src.parts[-3] == "test" for src in sources])
    heads = [LogisticRegression(max_iter=2000).fit(f[train], y[train]) for f in (a, b)]
    pa, pb = (h.predict(f[test]) for h, f in zip(heads, (a, b), strict=True))
    print(f"a head per decode, test split ({test.sum()}): accuracy {np.mean(pa == y[test]):.4f} "
          f"with DCT scaling, {np.mean(pb == y[test]):.4f} without; agreement {np.mean(pa == pb):.4f}")  # fmt: skip
    diff = np.abs(a - b)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    rel = np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)
    print(f"{len(paths)} flowers12 photos upscaled to 460-1800 px (short side), DCT scaling vs full decode: max |diff| {diff.max():.4f}"
          f" (features up to {b.max():.2f}), mean |diff| {diff.mean():.5f}, relative L2 per image "
          f"median {np.median(rel):.4f} max {rel.max():.4f}, cosine min {cos.min():.5f}")  # fmt: skip


def _decode(path: Path) -> int:
    from pipeline.lib.data.images import load_rgb

    return int(load_rgb(path, 224)[0, 0, 0])


def pools(work: Path, n: int = 400) -> None:
    sys.path.insert(0, str(ROOT))
    paths = sorted((work / "photos1000").rglob("*.jpg"))[:n] or sorted(FLOWERS.rglob("*.jpg"))[:n]
    for kind in (ThreadPoolExecutor, ProcessPoolExecutor):
        for workers in (1, 2, 4):
            with kind(workers) as pool:
                list(pool.map(_decode, paths[:8]))  # started
                start = time.perf_counter()
                list(pool.map(_decode, paths, chunksize=1))
                rate = len(paths) / (time.perf_counter() - start)
            print(f"decode+resize, {kind.__name__} x{workers}: {rate:.0f} img/s; {load()}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, nargs="*", default=[1000, 10000])
    p.add_argument("--work", type=Path, default=Path("/tmp/scale"))
    p.add_argument("--draft", action="store_true", help="DCT-scaling tolerance on flowers12")
    p.add_argument("--pools", action="store_true", help="threads vs processes for decoding")
    p.add_argument("--formats", default="float32", help="export.formats of the export stage")
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.draft:
        draft_tolerance(args.work)
    if args.pools:
        pools(args.work)
    first_rss: dict[str, float] = {}
    for n in args.n:
        scale(n, args.work, first_rss, args.formats)


if __name__ == "__main__":
    main()
