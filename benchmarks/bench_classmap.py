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

- the FLOPs per pixel (`torch.utils.flop_counter`) and the achieved FLOP rate of the tiled map against the matmul peak
  measured in the same process (1024^3 fp32; bf16 on CUDA), and the whole-scene time beside its FLOP-bound limit. With
  `--rows` the whole-scene time is extrapolated from the band at the band's speed, and the output says so.

`--json PATH` writes the figures (tiled vs the naive loops, peak RSS, whole-scene time, FLOP rate) for `rs-lab bench`;
`--device cuda` runs the map on the GPU (bf16 autocast unless `--amp off`); `--workers N` cuts the windows in N
DataLoader processes (their RSS is added to the peak); `--memory-gb GB` chooses the batch size from a memory budget.

    python benchmarks/bench_classmap.py                 # every pixel of the 349 x 1905 scene
    python benchmarks/bench_classmap.py --rows 16       # a band of 16 rows (same scene, same padding)
    python benchmarks/bench_classmap.py --rows 64 --device cuda --json figures.json
Timings on a shared machine are noisy; nothing here is asserted.
"""
import argparse, os, resource, statistics, threading, time
import numpy as np
import torch
from rs_prompt_lab.records import index_to_ids, logits_of

LIMIT_GB = 2.0
K_CLASSES = 15


def rss_gb() -> float:
    "RSS of this process and its children (DataLoader workers), GB."
    import psutil
    me = psutil.Process()
    total = me.memory_info().rss
    for c in me.children(recursive=True):
        try: total += c.memory_info().rss
        except psutil.Error: pass
    return total / 1e9


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


def naive_loop(model, scene, norms, rc, p: int, batch: int, device: str = "cpu", amp=None) -> tuple:
    "Pad once, then per pixel: slice, normalise, forward alone (batch 1) or stacked in batches. ((s_b1, s_batched), preds_b1, preds_batched)."
    h = p // 2
    padded = {k: np.pad(x, ((h, h), (h, h), (0, 0)), mode="reflect") for k, x in scene.modalities.items()}  # a second copy of the scene
    cut = lambda r, c: {k: norms[k].transform(x[r:r + p, c:c + p]).transpose(2, 0, 1) for k, x in padded.items()}  # {k: (C, p, p)}
    def fwd(d):
        with torch.autocast(device, dtype=amp, enabled=amp is not None):
            out = logits_of(model({k: torch.from_numpy(np.ascontiguousarray(v)).to(device) for k, v in d.items()}))
        return index_to_ids(out.float().argmax(1).cpu().numpy())
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


def flop_rate(model, scene, norms, p: int, device: str, amp) -> float:
    "FLOPs per pixel of the model's forward (counted on 8 pixels with torch.utils.flop_counter)."
    from rs_prompt_lab.bench import count_flops
    from rs_prompt_lab.data.patches import cut_patches
    rc = np.argwhere(np.ones(scene.shape, bool))[:8]
    x = {k: torch.from_numpy(cut_patches(v, rc, p, norms[k])).to(device) for k, v in scene.modalities.items()}
    with torch.autocast(device, dtype=amp, enabled=amp is not None):
        return count_flops(model, x) / len(rc)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=None, help="map only a band of this many rows in the middle of the scene (default: all)")
    ap.add_argument("--height", type=int, default=349); ap.add_argument("--width", type=int, default=1905)
    ap.add_argument("--patch", type=int, default=11, help="patch size p (default 11)")
    ap.add_argument("--batch", type=int, default=None, help="pixels per forward pass (default: classmap.default_map_batch, 64 on CPU; or from --memory-gb)")
    ap.add_argument("--memory-gb", type=float, default=None, help="choose the batch size from this memory budget (classmap.memory_batch_size)")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader processes cutting windows while the model runs (default 0)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the backbone's blocks (compile time included in the map's time)")
    ap.add_argument("--naive-pixels", type=int, default=1000, help="pixels for the naive loops (default 1000)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2: the 2-core target)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the model runs (default cpu)")
    ap.add_argument("--amp", default=None, choices=["off", "bf16", "fp16"], help="autocast of the map (default: bf16 on CUDA, off on CPU)")
    ap.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE", help="CF-IPT option, e.g. per_image=false (JSON values)")
    ap.add_argument("--json", default=None, help="write the figures here (rs-lab bench)")
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available(): raise SystemExit("--device cuda: CUDA is not available on this machine")
    if a.rows is not None and a.rows < 1: raise SystemExit(f"--rows must be >= 1, got {a.rows}")
    torch.set_num_threads(a.threads)
    if a.batch is not None and a.memory_gb is not None: raise SystemExit("give --batch or --memory-gb, not both")
    amp_mode = a.amp or ("bf16" if a.device == "cuda" else "off")
    amp = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp_mode]
    from rs_prompt_lab.classmap import predict_scene, default_map_batch
    from rs_prompt_lab.data.scene import BandNormalizer
    from rs_prompt_lab.bench import BenchFigure, matmul_peak, write_figures

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
    model.to(a.device).eval()
    print(f"method: CF-IPT, p = {a.patch}, backbone {method_note}; trainable {sum(q.numel() for q in model.parameters() if q.requires_grad):,} params; "
          f"torch threads {torch.get_num_threads()}, device {a.device}, amp {amp_mode}, DataLoader workers {a.workers}, compile {a.compile}")
    fpx = flop_rate(model, scene, norms, a.patch, a.device, amp)
    if a.memory_gb is not None:
        from rs_prompt_lab.classmap import memory_batch_size
        a.batch = memory_batch_size(model, scene, a.patch, a.memory_gb, a.device, normalizers=norms, amp=amp_mode, in_flight=1 + 2 * a.workers)
        print(f"batch size {a.batch} from a memory budget of {a.memory_gb:g} GB")
    elif a.batch is None: a.batch = default_map_batch(a.device)
    pdt = torch.bfloat16 if a.device == "cuda" else torch.float32

    mask, where = None, "whole scene"
    if a.rows is not None:
        r0 = max(0, (H - a.rows) // 2)
        mask = np.zeros(scene.shape, bool); mask[r0:r0 + a.rows] = True
        where = f"rows {r0}-{r0 + min(a.rows, H - r0) - 1}"
    n = int(mask.sum()) if mask is not None else H * W
    peaks = [matmul_peak(device=a.device, dtype=pdt)]
    before = rss_gb()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        pred = predict_scene(model, scene, a.patch, a.batch, a.device, normalizers=norms, mask=mask, progress=True, amp=amp_mode, workers=a.workers, compile=a.compile)
        dt = time.perf_counter() - t0
    peaks.append(matmul_peak(device=a.device, dtype=pdt))
    mpk = statistics.median(peaks)
    pps = n / dt
    flag = "OK" if peak.peak < LIMIT_GB else "OVER"
    print(f"tiled class map: {n:,} pixels ({where}) in {dt:.1f} s "
          f"= {pps:,.0f} pixels/s; RSS before {before:.2f} GB, peak during {peak.peak:.2f} GB ({flag}: limit {LIMIT_GB:.1f} GB)")
    whole_min, bound_min = H * W / pps / 60, H * W * fpx / mpk / 60
    how = f"extrapolated from {where} ({n:,} pixels) at their speed" if mask is not None else "measured on the whole scene"
    print(f"  whole scene ({H} x {W}): {whole_min:.1f} min ({how}); FLOP-bound limit {bound_min:.1f} min "
          f"({fpx / 1e9:.3f} GFLOP/pixel at the {mpk / 1e9:.0f} GFLOP/s matmul peak)")
    print(f"  achieved {pps * fpx / 1e9:.1f} GFLOP/s = {pps * fpx / mpk:.0%} of the matmul peak (measured before and after the map)")

    rc = np.argwhere(mask if mask is not None else np.ones(scene.shape, bool))[: a.naive_pixels]
    (s1, sb), p1, pb = naive_loop(model, scene, norms, rc, a.patch, a.batch, a.device, amp)
    ref = pred[rc[:, 0], rc[:, 1]]
    a1, ab = (p1 == ref).mean(), (pb == ref).mean()
    print(f"naive loop on {len(rc):,} pixels (np.pad once, one window sliced per pixel):")
    print(f"  (a) forward per pixel (batch 1): {len(rc) / s1:,.1f} pixels/s -> tiled is {pps / (len(rc) / s1):.1f}x faster; "
          f"agrees with the tiled map on {a1 * 100:.1f}% of the pixels")
    print(f"  (b) per-pixel cut, forward in batches of {a.batch}: {len(rc) / sb:,.1f} pixels/s -> tiled is {pps / (len(rc) / sb):.2f}x faster; "
          f"agrees on {ab * 100:.1f}%")
    total_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"process peak RSS (whole run, scene generation and padded copy included): {total_rss:.2f} GB")
    if a.json:
        figs = [BenchFigure("tiled class map vs naive loop, batch 1", pps, "pixels/s", len(rc) / s1, f"naive loop, batch 1, {len(rc)} pixels",
                            f"{where}; predictions agree on {a1:.1%}"),
                BenchFigure("tiled class map vs naive loop, batched", pps, "pixels/s", len(rc) / sb, f"per-pixel cut, batches of {a.batch}",
                            f"predictions agree on {ab:.1%}"),
                BenchFigure("peak RSS during the class map", peak.peak, "GB", before, "RSS before the map (the scene and the model)",
                            f"limit {LIMIT_GB:.1f} GB: {flag}; batch {a.batch}" + (f", {a.workers} workers included" if a.workers else "")),
                BenchFigure("whole-scene class map time", whole_min, "min", bound_min, "FLOP-bound limit at the matmul peak",
                            f"{H} x {W}, {how}; {a.threads} thread(s), batch {a.batch}, {a.workers} worker(s)" + (", compiled (compile time included)" if a.compile else "")),
                BenchFigure("class map FLOP rate", pps * fpx / 1e9, "GFLOP/s", mpk / 1e9, "matmul peak, same process" + (" (bf16)" if a.device == "cuda" else ""),
                            f"{fpx / 1e9:.3f} GFLOP/pixel, {a.threads} thread(s)")]
        write_figures(a.json, "classmap", figs, a.device, rows=a.rows, batch=a.batch, threads=a.threads, scene=scene_note,
                      method=method_note, process_peak_rss_gb=total_rss)
        print(f"figures written to {a.json}")


if __name__ == "__main__":
    main()
