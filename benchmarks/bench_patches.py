"""Speed and peak memory of lazy patch cutting over a whole Houston2013-sized scene (a script, not a test).

Iterates every pixel of a random 349 x 1905 scene with a 144-band HSI and a 1-band LiDAR at p = 11, batch 256,
through `SceneTiler` (contiguous (B, C, p, p) windows, then channels-last views), and prints pixels/s and the process's peak RSS (must stay under 1.5 GB). Then times a naive
loop (pad the scene, slice one patch per pixel, stack) on a slice of pixels and prints the speed ratio. The data is
random float32: speed does not depend on the values. Timings on a shared machine are noisy.

    python benchmarks/bench_patches.py            # full 349 x 1905 scene
    python benchmarks/bench_patches.py --rows 40  # quick run on the first 40 rows
"""
import argparse, sys, time
from rs_prompt_lab.bench import BenchFigure, peak_rss_gb, write_figures
import numpy as np
from rs_prompt_lab.data.scene import Scene
from rs_prompt_lab.data.patches import SceneTiler

LIMIT_GB = 1.5


def naive(scene: Scene, rc: np.ndarray, p: int, batch: int) -> tuple:
    "Pad each modality once (reflect), then cut one patch per pixel in a Python loop and stack batches."
    h = p // 2
    padded = {k: np.pad(x, ((h, h), (h, h), (0, 0)), mode="reflect") for k, x in scene.modalities.items()}
    t0, last = time.perf_counter(), None
    for s in range(0, len(rc), batch):
        last = {k: np.stack([x[r:r + p, c:c + p].transpose(2, 0, 1) for r, c in rc[s:s + batch]]) for k, x in padded.items()}
    return time.perf_counter() - t0, last


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=349, help="scene height (default 349, Houston2013)")
    ap.add_argument("--cols", type=int, default=1905, help="scene width (default 1905)")
    ap.add_argument("--bands", type=int, default=144, help="HSI bands (default 144); plus a 1-band LiDAR")
    ap.add_argument("--patch", type=int, default=11, help="patch size p (default 11)")
    ap.add_argument("--batch", type=int, default=256, help="batch size (default 256)")
    ap.add_argument("--naive-pixels", type=int, default=2000, help="pixels for the naive loop (default 2000)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file (rs-lab bench reads it)")
    a = ap.parse_args(argv)

    rng = np.random.default_rng(0)
    H, W, p = a.rows, a.cols, a.patch
    scene = Scene({"hsi": rng.random((H, W, a.bands), dtype=np.float32),
                   "lidar": rng.random((H, W, 1), dtype=np.float32)}, name="bench")
    scene_gb = sum(x.nbytes for x in scene.modalities.values()) / 1e9
    all_patches_gb = H * W * (a.bands + 1) * p * p * 4 / 1e9
    print(f"scene {H} x {W}, {a.bands} + 1 bands, p = {p}, batch {a.batch}: scene arrays {scene_gb:.2f} GB "
          f"(all patches at once would be {all_patches_gb:.1f} GB); peak RSS after building {peak_rss_gb():.2f} GB")

    tiler = SceneTiler(scene, p, a.batch)
    t0, n, chk = time.perf_counter(), 0, 0.0
    for b in tiler:
        n += len(b["rc"]); chk += float(b["hsi"][0, 0, 0, 0])
    dt = time.perf_counter() - t0
    lazy_pps = n / dt
    print(f"SceneTiler: {n:,} pixels in {dt:.1f} s = {lazy_pps:,.0f} pixels/s ({len(tiler)} batches)")

    tiler = SceneTiler(scene, p, a.batch, contiguous=False)
    t0, n2 = time.perf_counter(), 0
    for b in tiler:
        n2 += len(b["rc"]); chk += float(b["hsi"][0, 0, 0, 0])
    dt2 = time.perf_counter() - t0
    print(f"SceneTiler(contiguous=False, channels-last views): {n2:,} pixels in {dt2:.1f} s = {n2 / dt2:,.0f} pixels/s")

    rss = peak_rss_gb()
    print(f"peak RSS: {rss:.2f} GB (limit {LIMIT_GB} GB) -> {'OK' if rss < LIMIT_GB else 'OVER LIMIT'}")

    # naive baseline on the first rows of the scene (padding only that slice keeps its memory small)
    m = min(a.naive_pixels, H * W)
    rows_needed = min(H, -(-m // W) + p)
    sub = Scene({k: x[:rows_needed] for k, x in scene.modalities.items()}, name="slice")
    rc = np.argwhere(np.ones(sub.shape, bool))[:m]
    dt_naive, last = naive(sub, rc, p, a.batch)
    naive_pps = m / dt_naive
    lazy = SceneTiler(sub, p, a.batch)
    t0, k = time.perf_counter(), 0
    for i in range(-(-m // a.batch)):
        b = lazy[i]; k += len(b["rc"])
    lazy_slice_pps = k / (time.perf_counter() - t0)
    same = all(np.array_equal(b[key][: len(last[key])], last[key]) for key in last)  # last batch of both ways
    print(f"lazy windows equal the padded ones on the last naive batch: {same}")
    print(f"naive pad-and-slice loop: {m:,} pixels in {dt_naive:.2f} s = {naive_pps:,.0f} pixels/s; "
          f"lazy on the same slice: {lazy_slice_pps:,.0f} pixels/s")
    print(f"speed ratio lazy / naive: {lazy_pps / naive_pps:.1f}x (whole-scene lazy rate), "
          f"{lazy_slice_pps / naive_pps:.1f}x (same slice)")
    print("note: timings are from a shared machine and are noisy")
    if a.json:
        write_figures(a.json, "patches", [
            BenchFigure("SceneTiler windows, same slice", lazy_slice_pps, "pixels/s", naive_pps, "pad once + slice per pixel",
                        "windows equal" if same else "WINDOWS DIFFER"),
            BenchFigure(f"SceneTiler, {H} x {W} scene", lazy_pps, "pixels/s", naive_pps, "pad once + slice per pixel"),
            BenchFigure("peak RSS", rss, "GB", None, "", f"limit {LIMIT_GB} GB: {'OK' if rss < LIMIT_GB else 'OVER'}; scene arrays {scene_gb:.2f} GB")],
            rows=H, cols=W, bands=a.bands, patch=p, batch=a.batch)
    return 0 if rss < LIMIT_GB else 1


if __name__ == "__main__":
    sys.exit(main())
