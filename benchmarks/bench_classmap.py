"""Whole-scene class map speed and peak memory: CF-IPT on rs-tiny over a 349 x 1905 Houston-like scene, on CPU (a script, not a test).

Builds the synthetic `houston-like` scene (`synth.scene.make_scene`; random 144 + 1-band data if the generator is
missing), a CF-IPT method on `rs-tiny` (`random:rs-tiny` when the pretrained weights are absent: speed does not depend
on the weights, and the output says which was used), per-band normalisers fitted on the scene's training pixels, and
then prints:

- the tiled class map (`classmap.predict_scene`: `SceneTiler` windows, batches of `--batch` pixels): pixels/s and the
  peak RSS of the process while it runs (sampled every 20 ms with psutil; the target is < 2 GB), beside the RSS
  before it (the scene itself);
- a naive loop on a slice of `--naive-pixels` pixels: pad every modality once (`np.pad`, reflect), then per pixel
  slice its window, normalise it and (a) run the model on that single pixel (batch 1) or (b) stack `--batch` slices and
  run them together; the ratio of the tiled speed to each, and whether their predictions agree with the tiled map.

    python benchmarks/bench_classmap.py                 # every pixel of the 349 x 1905 scene
    python benchmarks/bench_classmap.py --rows 16       # a band of 16 rows (same scene, same padding)
Timings on a shared machine are noisy; nothing here is asserted.
"""
import argparse, os, resource, threading, time
import numpy as np
import torch
from rs_prompt_lab.records import index_to_ids, logits_of

LIMIT_GB = 2.0
K_CLASSES = 15


def rss_gb() -> float:
    import psutil
    return psutil.Process().memory_info().rss / 1e9


class PeakRSS:
    "Peak RSS (GB) of this process while the `with` block runs, sampled by a thread."
    def __init__(self, every: float = 0.02): self.every, self.peak, self._stop = every, 0.0, threading.Event()
    def _run(self):
        while not self._stop.is_set(): self.peak = max(self.peak, rss_gb()); self._stop.wait(self.every)
    def __enter__(self): self.peak = rss_gb(); self._t = threading.Thread(target=self._run, daemon=True); self._t.start(); return self
    def __exit__(self, *exc): self._stop.set(); self._t.join(); self.peak = max(self.peak, rss_gb())


def build_scene(H: int, W: int):
    "The houston-like scene (or random data with 144 + 1 bands if the generator is missing) and a note saying which."
    try:
        from rs_prompt_lab.synth.scene import make_scene
        return make_scene("houston-like", seed=0, size=(H, W)), "synthetic houston-like (synth.scene.make_scene, seed 0)"
    except ImportError:
        from rs_prompt_lab.data.scene import Scene
        rng = np.random.default_rng(0)
        lab = rng.integers(1, K_CLASSES + 1, (H, W))
        tr = rng.random((H, W)) < 0.01
        return (Scene({"hsi": rng.random((H, W, 144), dtype=np.float32), "lidar": rng.random((H, W, 1), dtype=np.float32)}, lab,
                      {i: f"class {i}" for i in range(1, K_CLASSES + 1)}, splits={"train": tr}, name="random"),
                "random data, 144 + 1 bands (rs_prompt_lab.synth.scene is not available)")


def build_method(scene, patch_size: int, kw: dict):
    "CF-IPT on rs-tiny (random:rs-tiny when the weights are absent) and a note saying which."
    from rs_prompt_lab.backbones import load_backbone, WeightsError
    torch.manual_seed(0)
    try: clip, _ = load_backbone("rs-tiny"); note = "rs-tiny (pretrained weights)"
    except WeightsError: clip, _ = load_backbone("random:rs-tiny"); note = "random:rs-tiny (rs-tiny weights absent: random init, same architecture and speed)"
    from rs_prompt_lab.methods import create_method
    from rs_prompt_lab.experiment import scene_spec
    return create_method("cfipt", clip, scene_spec(scene, patch_size), **kw), note + f", methods.create_method('cfipt', **{kw})"


def naive_loop(model, scene, norms, rc, p: int, batch: int) -> tuple:
    "Pad once, then per pixel: slice, normalise, forward alone (batch 1) or stacked in batches. ((s_b1, s_batched), preds_b1, preds_batched)."
    h = p // 2
    padded = {k: np.pad(x, ((h, h), (h, h), (0, 0)), mode="reflect") for k, x in scene.modalities.items()}  # a second copy of the scene
    cut = lambda r, c: {k: norms[k].transform(x[r:r + p, c:c + p]).transpose(2, 0, 1) for k, x in padded.items()}  # {k: (C, p, p)}
    fwd = lambda d: index_to_ids(logits_of(model({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in d.items()})).argmax(1).numpy())
    with torch.inference_mode():
        t0 = time.perf_counter()
        p1 = np.array([fwd({k: v[None] for k, v in cut(r, c).items()})[0] for r, c in rc])
        t1 = time.perf_counter()
        pb = []
        for s in range(0, len(rc), batch):
            ws = [cut(r, c) for r, c in rc[s:s + batch]]
            pb.append(fwd({k: np.stack([w[k] for w in ws]) for k in padded}))
        t2 = time.perf_counter()
    return (t1 - t0, t2 - t1), p1, np.concatenate(pb)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None, help="map only a band of this many rows in the middle of the scene (default: all)")
    ap.add_argument("--height", type=int, default=349); ap.add_argument("--width", type=int, default=1905)
    ap.add_argument("--patch", type=int, default=11, help="patch size p (default 11)")
    ap.add_argument("--batch", type=int, default=256, help="pixels per forward pass (default 256)")
    ap.add_argument("--naive-pixels", type=int, default=1000, help="pixels for the naive loops (default 1000)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2: the 2-core target)")
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE", help="CF-IPT option, e.g. per_image=false (JSON values)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    from rs_prompt_lab.classmap import predict_scene
    from rs_prompt_lab.data.scene import BandNormalizer

    t0 = time.perf_counter()
    scene, scene_note = build_scene(a.height, a.width)
    H, W = scene.shape
    print(f"scene: {scene_note}: {H} x {W}, bands {dict((k, scene.n_bands(k)) for k in scene.modalities)}, "
          f"{sum(x.nbytes for x in scene.modalities.values()) / 1e9:.2f} GB of arrays, built in {time.perf_counter() - t0:.1f} s "
          f"(process peak RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB)")
    train = scene.splits.get("train", np.ones(scene.shape, bool))
    norms = {k: BandNormalizer().fit(x, train) for k, x in scene.modalities.items()}
    import json
    kw = {k: json.loads(v) if v[:1] in "-0123456789[{tfn\"" else v for k, _, v in (s.partition("=") for s in a.kw)}
    model, method_note = build_method(scene, a.patch, kw)
    model.eval()
    print(f"method: CF-IPT, p = {a.patch}, backbone {method_note}; trainable {sum(q.numel() for q in model.parameters() if q.requires_grad):,} params; "
          f"torch threads {torch.get_num_threads()}, device cpu, batch {a.batch}")

    mask = None
    if a.rows is not None:
        r0 = max(0, (H - a.rows) // 2)
        mask = np.zeros(scene.shape, bool); mask[r0:r0 + a.rows] = True
    n = int(mask.sum()) if mask is not None else H * W
    before = rss_gb()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        pred = predict_scene(model, scene, a.patch, a.batch, "cpu", normalizers=norms, mask=mask, progress=True)
        dt = time.perf_counter() - t0
    pps = n / dt
    flag = "OK" if peak.peak < LIMIT_GB else "OVER"
    print(f"tiled class map: {n:,} pixels ({'rows %d-%d' % (r0, r0 + a.rows - 1) if mask is not None else 'whole scene'}) in {dt:.1f} s "
          f"= {pps:,.0f} pixels/s; RSS before {before:.2f} GB, peak during {peak.peak:.2f} GB ({flag}: limit {LIMIT_GB:.1f} GB)")
    if mask is not None: print(f"  whole scene at this speed: {H * W / pps / 60:.1f} min")

    rc = np.argwhere(mask if mask is not None else np.ones(scene.shape, bool))[: a.naive_pixels]
    (s1, sb), p1, pb = naive_loop(model, scene, norms, rc, a.patch, a.batch)
    ref = pred[rc[:, 0], rc[:, 1]]
    print(f"naive loop on {len(rc):,} pixels (np.pad once, one window sliced per pixel):")
    print(f"  (a) forward per pixel (batch 1): {len(rc) / s1:,.1f} pixels/s -> tiled is {pps / (len(rc) / s1):.1f}x faster; "
          f"agrees with the tiled map on {(p1 == ref).mean() * 100:.1f}% of the pixels")
    print(f"  (b) per-pixel cut, forward in batches of {a.batch}: {len(rc) / sb:,.1f} pixels/s -> tiled is {pps / (len(rc) / sb):.2f}x faster; "
          f"agrees on {(pb == ref).mean() * 100:.1f}%")
    print(f"process peak RSS (whole run, scene generation and padded copy included): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
