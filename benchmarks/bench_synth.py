"""Timing and realism of the embedded synthetic world (issue 3).

Prints: the time to build a 349 x 1905 x 144 houston-like scene, the accuracy of a classifier trained on its
synthetic CASI-144 spectra and tested on the real Houston2013 training-pixel spectra (../shared/data, when present),
value ranges, and the time to build + render ~1,000 64 x 64 scene images.
Run: .venv/bin/python benchmarks/bench_synth.py [--data ../shared/data]
"""
import argparse, os, time
from pathlib import Path
import numpy as np

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.environ.get("RS_LAB_SHARED_DATA", str(Path(__file__).resolve().parents[2] / "shared" / "data")))
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    from rs_prompt_lab.synth.scene import make_scene, sample_pixels, transfer_accuracy
    from rs_prompt_lab.synth.images import make_scene_images
    from rs_prompt_lab.synth.spectra import spectral_library
    spectral_library()   # library load (once per process) is not part of the scene timing
    t = time.perf_counter(); sc = make_scene("houston-like", a.seed); dt = time.perf_counter() - t
    hsi = sc.modalities["hsi"]; dsm = sc.modalities["lidar"][..., 0]; lab = sc.labels
    print(f"houston-like {sc.shape[0]} x {sc.shape[1]} x {hsi.shape[2]}: {dt:.1f} s ({sc.meta['n_objects']} objects, {os.cpu_count()} CPUs)")
    print(f"  reflectance range [{hsi.min():.3f}, {hsi.max():.3f}]")
    g = np.median(dsm[lab == 1])
    for k in (7, 8, 4):
        h = dsm[lab == k] - g
        print(f"  {sc.class_names[k]:<12} height above lawns: median {np.median(h):.1f} m, 5-95% [{np.percentile(h, 5):.1f}, {np.percentile(h, 95):.1f}] m")
    f = Path(a.data) / "houston2013" / "mdl_rs_pixel_sets"
    if (f / "HSI_TrSet.mat").exists():
        import scipy.io as sio
        Xr = sio.loadmat(f / "HSI_TrSet.mat")["HSI_TrSet"]; yr = sio.loadmat(f / "TrLabel.mat")["TrLabel"].ravel().astype(int)
        Xs, ys = sample_pixels(sc, 300, seed=a.seed)
        r = transfer_accuracy(Xs, ys, Xr, yr, seed=a.seed)
        print(f"realism: train on synthetic houston-like (300 px/class), test on the {len(yr)} real Houston2013 training pixels, "
              f"{r['n_classes']} shared classes, per-band z-score within each domain, random forest:")
        print(f"  accuracy {r['accuracy']:.3f} vs chance {r['chance']:.3f} (majority {r['majority']:.3f})")
        print("  per class: " + ", ".join(f"{sc.class_names[k]} {v:.2f}" for k, v in r["per_class"].items()))
    else:
        print(f"realism: real Houston2013 pixel set not found under {f}; skipped")
    t = time.perf_counter(); ds = make_scene_images(n_per_class=46, size=64, seed=a.seed); t1 = time.perf_counter() - t
    for i in range(len(ds)): ds.image(i)
    print(f"scene images: {len(ds)} x 64 x 64 RGB with 5 captions each: built in {t1:.1f} s, built + rendered in {time.perf_counter() - t:.1f} s")

if __name__ == "__main__":
    main()
