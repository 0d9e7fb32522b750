"""Where CF-IPT's time goes: per component FLOPs and time share, eval pixels/s against the matmul peak, training steps (a script, not a test).

CF-IPT on a frozen backbone, HSI 144 + LiDAR 1 bands, p = 11, the 15 Houston2013 class names, random input patches
(speed does not depend on the values). Sizes:

- rs-tiny   the shipped rs-tiny backbone (`random:rs-tiny` when its weights are absent: same architecture and speed),
            eval batch 64, training batch 64;
- vit-b16   `random:ViT-B-16` (random init: the ViT-B/16 architecture at its speed), eval batch 8, training batch 4.

For each size it prints

1. a profile per component -- MFPG, IAE, image tower, coupler (V-TPI with S2GPT), text tower, loss -- forward and
   forward + backward: FLOPs (`torch.utils.flop_counter`) and time share. Each component is timed alone on its real
   inputs (the outputs of the components before it, detached; the ones training sends gradients to are leaves that
   require grad), forward under `torch.no_grad`, forward + backward of sum(output * fixed random tensor); the share is of
   the sum of the components (the whole forward and the whole training step are printed beside it);
2. eval: the whole forward as a class map runs it (`prepare_inference`, `torch.inference_mode`), pixels/s and the
   achieved FLOP rate as % of the matmul peak (1024^3 fp32 matmul; bf16 on CUDA) measured in the same process at the
   same thread count, interleaved with the timed batches (one peak measurement after each batch, medians of both), on
   each of `--threads`;
3. training: forward + loss + backward + AdamW step, pixels/s;
4. with `--compile`, eval again with the transformer blocks through `torch.compile` (`PromptableCLIP.compile_blocks`),
   against the eager figure of the same process, predictions checked.

`--baseline REV` also builds the package as it was at git revision REV (`git archive` into a scratch folder) and runs
eval and training there and here, each in a fresh child process of this script, alternating `--rounds` times
(medians): the ratios new/old, whether the predictions agree (argmax of the logits of the same batch, and the
largest logit difference), and whether the first `--train-steps` losses from the same seed agree (largest relative
difference). The agreement is asserted: a mismatch exits with an error.

    python benchmarks/bench_profile.py                                  # rs-tiny and ViT-B/16, threads 1 and 2
    python benchmarks/bench_profile.py --sizes rs-tiny --batches 2      # the quick slice (rs-lab bench)
    python benchmarks/bench_profile.py --sizes rs-tiny --baseline 4d495bb --json figures.json
Timings on a shared machine are noisy: read the ratios measured in the same run.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch

HSI, AUX, P = 144, 1, 11
SIZES = {"rs-tiny": dict(backbone="rs-tiny", eval_batch=64, train_batch=64),
         "vit-b16": dict(backbone="random:ViT-B-16", eval_batch=8, train_batch=4)}
COMPONENTS = ("MFPG", "IAE", "image tower", "coupler (S2GPT)", "text tower", "loss")
EVAL_TARGETS = {1: 0.60, 2: 0.50}          # issue 12: share of the matmul peak at rs-tiny size


# ---------------------------------------------------------------- building blocks
def class_names() -> list:
    try:
        from rs_prompt_lab.synth.scene import PRESETS
        return list(PRESETS["houston-like"].classes)
    except (ImportError, KeyError, AttributeError):
        return [f"class {i}" for i in range(15)]


def build(size: str, device: str, seed: int = 0) -> tuple:
    "CF-IPT on the size's backbone (seeded), on `device`; and a note saying which backbone."
    from rs_prompt_lab.backbones import load_backbone, WeightsError
    from rs_prompt_lab.methods import create_method
    from rs_prompt_lab.inputs import PixelSpec
    name = SIZES[size]["backbone"]
    torch.manual_seed(seed)
    try: clip, note = load_backbone(name)[0], name
    except WeightsError: clip, note = load_backbone("random:" + name)[0], f"random:{name} (weights absent: random init, same speed)"
    torch.manual_seed(seed)
    m = create_method("cfipt", clip, PixelSpec(class_names(), {"hsi": HSI, "lidar": AUX}, P))
    return m.to(device), note


def make_batch(B: int, seed: int, device: str) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"hsi": torch.randn(B, HSI, P, P, generator=g).to(device), "lidar": torch.randn(B, AUX, P, P, generator=g).to(device),
            "label": torch.randint(0, 15, (B,), generator=g).to(device)}


def sync(device: str):
    if device == "cuda": torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device); t = time.perf_counter(); fn(); sync(device)
    return time.perf_counter() - t


def median_time(fn, repeats: int, device: str) -> float:
    "Median seconds of `repeats` calls after one warm-up call."
    fn()
    return statistics.median(timed(fn, device) for _ in range(repeats))


def flops(fn) -> int:
    "FLOPs of one call of `fn` (forward, and backward when `fn` runs it) (bench.count_flops turns grad mode on itself)."
    from rs_prompt_lab.bench import count_flops
    return count_flops(fn)


def amp(device: str):
    "bf16 autocast on CUDA, nothing on CPU."
    return torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu", enabled=False)


# ---------------------------------------------------------------- 1. the profile per component
def component_fns(m, batch: dict) -> dict:
    "{component: (forward, forward under no_grad, forward + backward)} on the real intermediate inputs of `batch` (detached leaves)."
    from rs_prompt_lab.cfipt.model import _shared
    from rs_prompt_lab.prompts.text import cosine_logits
    from rs_prompt_lab.records import MethodOutput
    clip, xh, xa = m.clip, batch["hsi"], batch["lidar"]
    leaf = lambda t: t.detach().clone().requires_grad_(True)
    with torch.no_grad():
        mo = m.mfpg(xh, xa); img = m.adapter(mo["fused"]); psp, psa = m._matrices(mo)
        pv, pt = m.couple(psp, psa)
        ifeat = clip.encode_image(img, deep_prompts=[_shared(p) for p in pv], normalize=True); tfeat = m.text_features(pt)
    fused, img, psp, psa = leaf(mo["fused"]), leaf(img), leaf(psp), leaf(psa)
    pv, pt, ifeat, tfeat = [leaf(p) for p in pv], [leaf(p) for p in pt], leaf(ifeat), leaf(tfeat)
    fwd = {"MFPG": lambda: m.mfpg(xh, xa), "IAE": lambda: m.adapter(fused), "coupler (S2GPT)": lambda: m.couple(psp, psa),
           "image tower": lambda: clip.encode_image(img, deep_prompts=[_shared(p) for p in pv], normalize=True),
           "text tower": lambda: m.text_features(pt),
           "loss": lambda: m.loss(MethodOutput(cosine_logits(ifeat, tfeat, clip.logit_scale),
                                               {"text_features": tfeat, "image_features": ifeat}), batch)}
    g = torch.Generator().manual_seed(2)
    def tensors(o):
        if torch.is_tensor(o): return [o]
        if isinstance(o, dict): return [t for v in o.values() for t in tensors(v)]
        if isinstance(o, (list, tuple)): return [t for v in o for t in tensors(v)]
        return []
    def fb(f):
        def run():
            outs = [t for t in tensors(f()) if t.requires_grad]
            torch.autograd.backward(outs, [torch.randn(t.shape, generator=g).to(t) for t in outs])
        return run
    def nograd(f):
        def run():
            with torch.no_grad(): f()
        return run
    return {k: (f, nograd(f), fb(f)) for k, f in fwd.items()}


def profile_components(m, batch: dict, repeats: int, device: str) -> list:
    "Rows {component, fwd_flops, fwd_s, fb_flops, fb_s}; the model in training mode, as a training step runs it."
    m.train()
    fns = component_fns(m, batch)
    rows = []
    with amp(device):
        for k in COMPONENTS:
            f, f_nograd, fb = fns[k]
            rows.append(dict(component=k, fwd_flops=flops(f), fwd_s=median_time(f_nograd, repeats, device),
                             fb_flops=flops(fb), fb_s=median_time(fb, repeats, device)))
        def whole_fwd():
            with torch.no_grad(): m(batch)
        def step():
            m.loss(m(batch), batch).backward()
        whole = dict(fwd_s=median_time(whole_fwd, repeats, device), fb_s=median_time(step, repeats, device))
    m.zero_grad(set_to_none=True)
    return rows, whole


def print_profile(size: str, rows: list, whole: dict, B: int):
    sf, sb = sum(r["fwd_s"] for r in rows), sum(r["fb_s"] for r in rows)
    print(f"\n{size}: per component, batch {B} (each timed alone; share of the sum of the components)")
    print(f"  {'component':17s} {'fwd GFLOP':>10s} {'fwd ms':>9s} {'share':>6s} {'GFLOP/s':>8s}   {'f+b GFLOP':>10s} {'f+b ms':>9s} {'share':>6s} {'GFLOP/s':>8s}")
    for r in rows:
        print(f"  {r['component']:17s} {r['fwd_flops'] / 1e9:10.2f} {r['fwd_s'] * 1e3:9.1f} {r['fwd_s'] / sf:6.1%} {r['fwd_flops'] / r['fwd_s'] / 1e9:8.1f}"
              f"   {r['fb_flops'] / 1e9:10.2f} {r['fb_s'] * 1e3:9.1f} {r['fb_s'] / sb:6.1%} {r['fb_flops'] / r['fb_s'] / 1e9:8.1f}")
    print(f"  {'sum':17s} {sum(r['fwd_flops'] for r in rows) / 1e9:10.2f} {sf * 1e3:9.1f} {'':6s} {'':8s}   "
          f"{sum(r['fb_flops'] for r in rows) / 1e9:10.2f} {sb * 1e3:9.1f}")
    print(f"  whole forward {whole['fwd_s'] * 1e3:.1f} ms (no_grad, training mode); whole training step (forward + loss + backward) {whole['fb_s'] * 1e3:.1f} ms")


# ---------------------------------------------------------------- 2. eval rate against the matmul peak
def eval_rate(m, batch: dict, batches: int, device: str) -> dict:
    "px/s, FLOPs/px and the matmul peak, timed batches interleaved with peak measurements (medians)."
    from rs_prompt_lab.bench import matmul_peak
    x = {k: v for k, v in batch.items() if k != "label"}
    B = len(batch["label"])
    m.eval()
    with amp(device): n = flops(lambda: m(x))
    ts, peaks = [], []
    dt = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.inference_mode(), amp(device):
        if hasattr(m, "prepare_inference"): m.prepare_inference()
        m(x)
        for _ in range(batches):
            ts.append(timed(lambda: m(x), device))
            peaks.append(matmul_peak(device=device, dtype=dt, repeats=3))
        logits = m(x).logits.float().cpu()
    t, pk = statistics.median(ts), statistics.median(peaks)
    return dict(px_s=B / t, flops_px=n / B, achieved=n / t, peak=pk, logits=logits.tolist())


def compiled_vs_eager(m, batch: dict, batches: int, device: str) -> dict:
    "Eval batches alternating compiled and eager blocks (the model's towers switched with compile_blocks), and the peak between them."
    from rs_prompt_lab.bench import matmul_peak
    x = {k: v for k, v in batch.items() if k != "label"}
    towers = (m.clip.model.visual.transformer, m.clip.model.transformer)
    def mode(on):
        for t in towers: t._rs_compiled = on
    ts, te, peaks = [], [], []
    with torch.inference_mode(), amp(device):
        mode(True); m(x); mode(False); m(x)                                      # compile (and warm up) both
        for _ in range(max(batches, 3)):
            mode(True); ts.append(timed(lambda: m(x), device))
            mode(False); te.append(timed(lambda: m(x), device))
            peaks.append(matmul_peak(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32, repeats=3))
        mode(True); logits = m(x).logits.float().cpu()
    B = len(batch["label"])
    return dict(px_s=B / statistics.median(ts), eager_px_s=B / statistics.median(te), peak=statistics.median(peaks), logits=logits.tolist())


# ---------------------------------------------------------------- 3. training steps
def train_run(m, B: int, steps: int, device: str, seed: int = 0) -> dict:
    "`steps` AdamW steps (lr 2e-3) on seeded random batches: the losses and the median step time (first step excluded)."
    m.train()
    opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=2e-3)
    losses, ts = [], []
    for s in range(steps):
        batch = make_batch(B, 1000 + s, device)
        sync(device); t = time.perf_counter()
        with amp(device): loss = m.loss(m(batch), batch)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        sync(device); ts.append(time.perf_counter() - t)
        losses.append(loss.item())
    return dict(losses=losses, px_s=B / statistics.median(ts[1:] or ts))


# ---------------------------------------------------------------- the child: one tree, one size, one thread count
def child(a) -> None:
    torch.set_num_threads(a.threads)
    cfg = SIZES[a.size]
    m, note = build(a.size, a.device)
    out = dict(note=note, eval=eval_rate(m, make_batch(cfg["eval_batch"], 7, a.device), a.batches, a.device))
    if a.train_steps:
        m, _ = build(a.size, a.device)
        out["train"] = train_run(m, cfg["train_batch"], a.train_steps, a.device)
    Path(a.child).write_text(json.dumps(out))


def old_tree(rev: str, root: Path, into: Path) -> Path:
    "The rs_prompt_lab package at git revision `rev`, extracted under `into`."
    try:
        arc = subprocess.run(["git", "-C", str(root), "archive", rev, "rs_prompt_lab"], capture_output=True, check=True).stdout
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        raise SystemExit(f"--baseline {rev}: cannot read that revision with git in {root} ({getattr(e, 'stderr', b'').decode().strip() or e}); "
                         "give a commit of this clone")
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=arc, check=True)
    return into


def run_child(pythonpath: Path, size: str, threads: int, a, out: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", str(out), "--size", size, "--threads", str(threads), "--batches", str(a.batches),
           "--train-steps", str(a.train_steps), "--device", a.device]
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode: raise SystemExit(f"child run failed ({pythonpath}):\n{p.stderr[-3000:]}")
    return json.loads(out.read_text())


def compare(size: str, a, root: Path, figs: list) -> None:
    "Baseline tree vs this tree in alternating child processes: eval and training ratios, agreement asserted."
    from rs_prompt_lab.bench import BenchFigure
    with tempfile.TemporaryDirectory() as td:
        td = Path(td); old = old_tree(a.baseline, root, td / "old")
        for th in a.threads:
            runs = {"old": [], "new": []}
            for r in range(a.rounds):
                for tag, pp in (("old", old), ("new", root)):
                    runs[tag].append(run_child(pp, size, th, a, td / f"{tag}{r}.json"))
                    print(f"  {size}, {th} thread(s), round {r + 1}: {tag} eval {runs[tag][-1]['eval']['px_s']:.1f} px/s"
                          + (f", train {runs[tag][-1]['train']['px_s']:.2f} px/s" if a.train_steps else ""), flush=True)
            med = lambda tag, k: statistics.median(x[k]["px_s"] for x in runs[tag])
            lo, ln = torch.tensor(runs["old"][0]["eval"]["logits"]), torch.tensor(runs["new"][0]["eval"]["logits"])
            agree, dmax = float((lo.argmax(1) == ln.argmax(1)).float().mean()), float((lo - ln).abs().max())
            print(f"  {size}, {th} thread(s): eval {med('new', 'eval'):.1f} px/s vs {med('old', 'eval'):.1f} at {a.baseline} "
                  f"({med('new', 'eval') / med('old', 'eval'):.2f}x); predictions agree on {agree:.1%} of {len(lo)} pixels, max |logit diff| {dmax:.2e}")
            if agree < 1.0: raise SystemExit(f"predictions differ from {a.baseline}: {agree:.1%} agree")
            fo, fn = runs["old"][0]["eval"]["flops_px"], runs["new"][0]["eval"]["flops_px"]
            pk = statistics.median(x["eval"]["peak"] for x in runs["new"])
            print(f"  {size}, {th} thread(s): FLOPs per pixel {fn / 1e9:.3f} G here vs {fo / 1e9:.3f} G at {a.baseline}; "
                  f"executed FLOP rate {fn * med('new', 'eval') / pk:.0%} of the matmul peak here, {fo * med('old', 'eval') / statistics.median(x['eval']['peak'] for x in runs['old']):.0%} at {a.baseline}; "
                  f"the baseline's work per pixel at this speed: {fo * med('new', 'eval') / pk:.0%} of the peak")
            figs.append(BenchFigure(f"{size} eval, baseline's FLOPs per pixel at this speed, {th} thread(s)", fo * med("new", "eval") / 1e9, "GFLOP/s",
                                    pk / 1e9, "matmul peak, same runs", f"{fo / 1e9:.3f} GFLOP/px at {a.baseline} x {med('new', 'eval'):.1f} px/s; "
                                    f"executed here: {fn / 1e9:.3f} GFLOP/px = {fn * med('new', 'eval') / pk:.0%} of the peak"))
            figs.append(BenchFigure(f"{size} eval, {th} thread(s)", med("new", "eval"), "pixels/s", med("old", "eval"), f"revision {a.baseline}",
                                    f"{a.rounds} rounds in child processes; predictions agree {agree:.0%}, max |logit diff| {dmax:.1e}"))
            if a.train_steps:
                lo_, ln_ = torch.tensor(runs["old"][0]["train"]["losses"]), torch.tensor(runs["new"][0]["train"]["losses"])
                rel = float(((lo_ - ln_).abs() / lo_.abs().clamp_min(1e-8)).max())
                print(f"  {size}, {th} thread(s): training {med('new', 'train'):.2f} px/s vs {med('old', 'train'):.2f} "
                      f"({med('new', 'train') / med('old', 'train'):.2f}x); first {len(lo_)} losses from seed 0: max relative difference {rel:.1e}")
                if rel > a.loss_rtol: raise SystemExit(f"training losses differ from {a.baseline}: max relative difference {rel:.1e} > {a.loss_rtol}")
                figs.append(BenchFigure(f"{size} training step, {th} thread(s)", med("new", "train"), "pixels/s", med("old", "train"),
                                        f"revision {a.baseline}", f"target >= 2x; first {len(lo_)} losses within {rel:.1e} (relative)"))


# ---------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES), help="backbone sizes (default: both)")
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="torch CPU thread counts for eval (default 1 2)")
    ap.add_argument("--batches", type=int, default=3, help="timed batches per measurement (default 3)")
    ap.add_argument("--no-profile", action="store_true", help="skip the per-component profile")
    ap.add_argument("--compile", action="store_true", help="also time eval with the blocks through torch.compile (PromptableCLIP.compile_blocks)")
    ap.add_argument("--train-steps", type=int, default=20, help="training steps timed (and compared with --baseline; default 20; 0: none)")
    ap.add_argument("--baseline", default=None, metavar="REV", help="also run the package at git revision REV and print new/old ratios")
    ap.add_argument("--rounds", type=int, default=2, help="alternating old/new child runs with --baseline (default 2)")
    ap.add_argument("--loss-rtol", type=float, default=1e-4, help="largest relative loss difference accepted with --baseline")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cpu, or cuda (bf16 autocast; peak = bf16 matmul)")
    ap.add_argument("--json", default=None, help="write the figures here (rs-lab bench)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--size", default="rs-tiny", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device == "cuda" and not torch.cuda.is_available(): raise SystemExit("--device cuda: CUDA is not available on this machine")
    if min(a.threads) < 1 or a.batches < 1 or a.rounds < 1 or a.train_steps < 0:
        raise SystemExit("--threads, --batches and --rounds must be >= 1, --train-steps >= 0")
    if a.child: return child(argparse.Namespace(**{**vars(a), "threads": a.threads[0]}))
    from rs_prompt_lab.bench import BenchFigure, peak_rss_gb, write_figures
    root = Path(__file__).resolve().parents[1]
    figs = []
    for size in a.sizes:
        cfg = SIZES[size]
        torch.set_num_threads(a.threads[0])
        m, note = build(size, a.device)
        print(f"{size}: CF-IPT on {note}; HSI {HSI} + LiDAR {AUX} bands, p = {P}, {len(m.class_names)} classes, "
              f"{sum(q.numel() for q in m.parameters() if q.requires_grad):,} trainable parameters; device {a.device}", flush=True)
        if not a.no_profile:
            rows, whole = profile_components(m, make_batch(cfg["train_batch"], 3, a.device), a.batches, a.device)
            print_profile(size, rows, whole, cfg["train_batch"])
            sf, sb = sum(r["fwd_s"] for r in rows), sum(r["fb_s"] for r in rows)
            for r in rows:
                figs.append(BenchFigure(f"{size} {r['component']}, forward", r["fwd_s"] * 1e3, "ms", sf * 1e3, "all components, forward",
                                        f"{r['fwd_flops'] / 1e9:.2f} GFLOP, batch {cfg['train_batch']}, {a.threads[0]} thread(s); ratio = time share"))
                figs.append(BenchFigure(f"{size} {r['component']}, forward + backward", r["fb_s"] * 1e3, "ms", sb * 1e3, "all components, fwd + bwd",
                                        f"{r['fb_flops'] / 1e9:.2f} GFLOP; ratio = time share"))
        for th in a.threads:
            torch.set_num_threads(th)
            e = eval_rate(m, make_batch(cfg["eval_batch"], 7, a.device), a.batches, a.device)
            tgt = EVAL_TARGETS.get(th) if size == "rs-tiny" and a.device == "cpu" else None
            print(f"{size} eval, batch {cfg['eval_batch']}, {th} thread(s): {e['px_s']:.1f} px/s, {e['flops_px'] / 1e9:.3f} GFLOP/px -> "
                  f"{e['achieved'] / 1e9:.1f} GFLOP/s = {e['achieved'] / e['peak']:.0%} of the {e['peak'] / 1e9:.0f} GFLOP/s matmul peak"
                  + (f" (target {tgt:.0%})" if tgt else ""), flush=True)
            figs.append(BenchFigure(f"{size} eval FLOP rate, {th} thread(s)", e["achieved"] / 1e9, "GFLOP/s", e["peak"] / 1e9,
                                    "matmul peak, same process" + (" (bf16)" if a.device == "cuda" else ""),
                                    f"{e['px_s']:.1f} px/s, {e['flops_px'] / 1e9:.3f} GFLOP/px" + (f"; target >= {tgt:.0%}" if tgt else "")))
            if a.compile and hasattr(m.clip, "compile_blocks"):
                if not m.clip.compile_blocks(True): print("  --compile: no compiler for torch.compile here; skipped")
                else:
                    t0 = time.perf_counter(); c = compiled_vs_eager(m, make_batch(cfg["eval_batch"], 7, a.device), a.batches, a.device)
                    m.clip.compile_blocks(False)
                    lc, le = torch.tensor(c["logits"]), torch.tensor(e["logits"])
                    agree = float((lc.argmax(1) == le.argmax(1)).float().mean())
                    print(f"{size} eval with torch.compile, {th} thread(s): {c['px_s']:.1f} px/s vs {c['eager_px_s']:.1f} eager, batches alternated "
                          f"({c['px_s'] / c['eager_px_s']:.2f}x) = {e['flops_px'] * c['px_s'] / c['peak']:.0%} of the matmul peak (eager "
                          f"{e['flops_px'] * c['eager_px_s'] / c['peak']:.0%}); predictions agree with eager on {agree:.0%}, "
                          f"max |logit diff| {float((lc - le).abs().max()):.1e}; compile + timing {time.perf_counter() - t0:.0f} s", flush=True)
                    if agree < 1.0: raise SystemExit("torch.compile changed predictions")
                    figs.append(BenchFigure(f"{size} eval with torch.compile, {th} thread(s)", c["px_s"], "pixels/s", c["eager_px_s"],
                                            "eager, batches alternated in the same process",
                                            f"{e['flops_px'] * c['px_s'] / c['peak']:.0%} of the matmul peak (eager {e['flops_px'] * c['eager_px_s'] / c['peak']:.0%}); "
                                            f"predictions agree {agree:.0%}"))
        if a.train_steps and not a.baseline:
            torch.set_num_threads(a.threads[0])
            m, _ = build(size, a.device)
            t = train_run(m, cfg["train_batch"], min(a.train_steps, a.batches + 1), a.device)
            print(f"{size} training, batch {cfg['train_batch']}, {a.threads[0]} thread(s): {t['px_s']:.2f} px/s", flush=True)
            figs.append(BenchFigure(f"{size} training, {a.threads[0]} thread(s)", t["px_s"], "pixels/s", note=f"batch {cfg['train_batch']}, AdamW steps"))
        if a.baseline: compare(size, a, root, figs)
    rss = peak_rss_gb()
    print(f"process peak RSS {rss:.2f} GB")
    figs.append(BenchFigure("peak RSS", rss, "GB", note="this process (children not included)"))
    if a.json: write_figures(a.json, "profile", figs, a.device, sizes=a.sizes, threads=a.threads, baseline=a.baseline)


if __name__ == "__main__":
    main()
