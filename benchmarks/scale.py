"""Scale benchmark of the data path (issue 23): N unique JPEGs (300-800 px) generated from the
flowers12 photos, a copy of this project on them, `dvc repro featurize` timed per stage, then
+1 % photos. Prints, beside the machine's load: images/s and CPU-ms/image per stage, peak RSS,
disk of data/ + .dvc/cache against the photos (hard links counted once), the feature store, and
the incremental run. `--draft` compares features with and without JPEG DCT scaling on flowers12;
`--pools` compares decoding in threads and in processes.

    python benchmarks/scale.py --n 2000 --work /tmp/scale [--draft] [--pools]
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
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
            side = int(rng.integers(300, 801))
            scale = side / max(cw, ch)
            im = im.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)))
            out = folder / src.parent.name / f"g{i:06d}.jpg"
            out.parent.mkdir(parents=True, exist_ok=True)
            im.save(out, quality=int(rng.integers(80, 93)))


def disk(*folders: Path) -> tuple[list[int], int]:
    """(bytes per folder, bytes of all together with each inode counted once)."""
    per, seen = [], {}
    for folder in folders:
        total = 0
        for p in folder.rglob("*"):
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                total += st.st_size
                seen[(st.st_dev, st.st_ino)] = st.st_size
        per.append(total)
    return per, sum(seen.values())


def stage(proj: Path, name: str, env: dict) -> tuple[float, float, float, str]:
    """`dvc repro <name>`: (wall s, CPU s of its processes, peak RSS MB of any child, output)."""
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
    return wall, cpu, after.ru_maxrss / 1024, proc.stdout + proc.stderr


def project(work: Path, photos: Path) -> tuple[Path, dict]:
    proj = work / "proj"
    shutil.rmtree(proj, ignore_errors=True)
    proj.mkdir(parents=True)
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()  # fmt: skip
    for f in files:
        if (ROOT / f).is_file():
            (proj / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, proj / f)
    cache = work / "cache"
    shutil.rmtree(cache / "features", ignore_errors=True)
    user_tflite = Path(os.path.expanduser("~/.cache/truck-pipeline/tflite"))
    if user_tflite.is_dir() and not (cache / "tflite").exists():
        shutil.copytree(user_tflite, cache / "tflite")  # no conversion in the timings
    env = {**os.environ, "TRUCK_CACHE_DIR": str(cache), "PATH": f"{BIN}:{os.environ['PATH']}"}
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "x"],
        [str(BIN / "python"), "-m", "pipeline.params", "--use-folder", str(photos)],
    ):
        subprocess.run(cmd, cwd=proj, env=env, check=True, capture_output=True)  # fmt: skip
    return proj, env


def computed(output: str) -> tuple[int, float]:
    found = re.findall(r"(\d+) computed \(([\d.]+) img/s\)", output)
    return (int(found[-1][0]), float(found[-1][1])) if found else (0, 0.0)


def scale(n: int, work: Path) -> None:
    photos = work / f"photos{n}"
    if not photos.is_dir():
        generate(photos, 0, n)
    photo_bytes = disk(photos)[1]
    proj, env = project(work, photos)
    print(f"N = {n} photos, {photo_bytes / n / 1024:.1f} KB each; {load()}")
    print(f"{'stage':<22}{'wall s':>8}{'img/s':>8}{'CPU ms/img':>11}{'peak RSS MB':>12}  load")
    for name in ("prepare", "featurize"):
        wall, cpu, rss, out = stage(proj, name, env)
        done, rate = computed(out)
        extra = f" ({done} computed at {rate:.0f} img/s)" if name == "featurize" else ""
        print(f"{name:<22}{wall:>8.1f}{n / wall:>8.0f}{1000 * cpu / n:>11.2f}{rss:>12.0f}  "
              f"{load()}{extra}")  # fmt: skip
    (data, cache), together = disk(proj / "data", proj / ".dvc/cache")
    store = sum(p.stat().st_size for p in (work / "cache/features").glob("*.sqlite"))
    print(f"disk: data/ {data / 2**20:.1f} MB + .dvc/cache {cache / 2**20:.1f} MB = "
          f"{together / 2**20:.1f} MB on disk (links once) = {together / photo_bytes:.3f}x the "
          f"photos ({photo_bytes / 2**20:.1f} MB); feature store {store / 2**20:.1f} MB "
          f"({store / n / 1024:.1f} KB/photo, {store / photo_bytes:.3f}x)")  # fmt: skip
    first_featurize = wall
    added = max(1, n // 100)
    generate(photos, n, added)
    subprocess.run([str(BIN / "dvc"), "repro", "prepare"], cwd=proj, env=env, check=True,
                   capture_output=True)  # fmt: skip
    wall, cpu, rss, out = stage(proj, "featurize", env)
    print(f"+1 % ({added} photos): featurize {wall:.1f} s = {wall / first_featurize:.0%} of the "
          f"first run, {computed(out)[0]} computed, peak RSS {rss:.0f} MB; {load()}")  # fmt: skip


def draft_tolerance(work: Path) -> None:
    """Features of flowers12 photos, upscaled, with DCT scaling (the decoder's default) and
    without."""
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
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.draft:
        draft_tolerance(args.work)
    if args.pools:
        pools(args.work)
    for n in args.n:
        scale(n, args.work)


if __name__ == "__main__":
    main()
