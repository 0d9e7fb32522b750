"""Per-image prompts through the text tower: the shared-prefix pass, the full B x K pass and a loop over images (a script, not a test).

CoCoOp, BiMoRS and CF-IPT give every image its own prompt, so B images and K classes need B x K prompts through the
text tower. Three ways to run them, compared here on the shipped `rs-tiny` backbone (`random:rs-tiny` if its
weights are absent: same architecture and speed) with K class names (PatternNet's 38 for K <= 38):

- prefix  what the library does: the positions that depend on the image but not on the class (SOS, the per-image
          context, template words every class shares) run once per image, and only each class's remaining
          positions run B x K times, attending to their image's prefix (`PromptableCLIP.encode_text_prefixed`;
          CoCoOp/BiMoRS through `CoOpLearner.context_features`, CF-IPT through `CFIPT.text_features`);
- full    the previous batched path: the B x K full prompts as one (B, K, L, D) pass (`insert_context` +
          `encode_text_embeddings`; `learner.shared_prefix = False`; CF-IPT's deep prompts on the expanded prompts);
- loop    what the official CoCoOp / BiMoRS code does: a Python loop over the images, K full prompts per image.

The per-image prompt is computed once (CoCoOp: ctx + meta_net(image feature); BiMoRS: `learner.refine(visual tokens,
caption)`; CF-IPT: the V-TPI-coupled deep text prompts of every layer from per-image prompt matrices P_sp, P_sa), and
each path is timed for four passes:

- text-fwd        the text tower only, forward, under `torch.no_grad` (inference);
- text-fwd+bwd    the text tower only, forward + backward of sum(features * fixed random tensor) to the per-image
                  prompt (a fresh leaf each repeat: the backward goes through the text tower and stops there);
- learner-fwd     the method's whole text side (CoCoOp/BiMoRS: the learner's `text_features`; CF-IPT: `couple` +
                  `text_features` from P_sp, P_sa), `torch.no_grad`; the loop calls it on one image at a time;
- learner-fwd+bwd the same with the backward to the trainable parameters (ctx, meta_net, coupler, ...), grads
                  zeroed between repeats.

Before timing it checks, in this process, that the three paths agree (max abs difference < 1e-4 of the unit features,
and of the gradients divided by their largest magnitude) and prints the differences. Each (method, pass, path) is then timed in a fresh child process of this script
(`--one`) so that peak memories do not contaminate each other: 2 warm-up repeats, then the median of `--repeats`.
Peak memory: on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after the setup; the
process's ru_maxrss where that is not possible), printed as the increase over the RSS just before timing; on CUDA
torch.cuda.max_memory_allocated over the memory allocated before timing.

    python benchmarks/bench_per_image_prompts.py                            # B = 32, K = 38, three methods, 4 passes, 1 thread
    python benchmarks/bench_per_image_prompts.py --methods bimors --passes text-fwd learner-fwd+bwd --repeats 5
    python benchmarks/bench_per_image_prompts.py --methods cocoop bimors --train-steps 20 --no-timing   # 20 training steps, prefix vs full
Timings on a shared machine are noisy; nothing but the agreement of the three paths is asserted.
"""
import argparse, json, os, platform, resource, statistics, subprocess, sys, time
from rs_prompt_lab.bench import BenchFigure, write_figures
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch

PASSES = {"text-fwd": ("text", False), "text-fwd+bwd": ("text", True),
          "learner-fwd": ("learner", False), "learner-fwd+bwd": ("learner", True)}
PATHS = ("prefix", "full", "loop")
METHODS = ("cocoop", "bimors", "cfipt")
TARGET, TOL, WARMUP = 3.0, 1e-4, 2


# ---------------------------------------------------------------- setup and the three paths
def class_names(K: int) -> list:
    "PatternNet's class names (K = 38 is PatternNet), then 'class i' beyond them."
    from rs_prompt_lab.data.manifest import get_manifest, class_table
    t = class_table(get_manifest("patternnet"))
    names = list(t.values()) if isinstance(t, dict) else list(t)
    return (names + [f"class {i}" for i in range(len(names), K)])[:K]


def setup(method: str, B: int, K: int, device: str) -> dict:
    "rs-tiny, the method, its inputs (B random images and captions, or B random pixel patches) and the per-image prompt, all seeded."
    from rs_prompt_lab.backbones import load_backbone, WeightsError
    from rs_prompt_lab.methods import create_method
    from rs_prompt_lab.inputs import ImageSpec, PixelSpec
    torch.manual_seed(0)
    try: clip, note = load_backbone("rs-tiny")[0], "rs-tiny (pretrained weights)"
    except WeightsError: clip, note = load_backbone("random:rs-tiny")[0], "random:rs-tiny (weights absent: random init, same speed)"
    clip = clip.to(device).eval()
    names, g = class_names(K), torch.Generator().manual_seed(1)
    if method == "cfipt":
        bands, p = {"hsi": 144, "lidar": 1}, 5
        m = create_method(method, clip, PixelSpec(names, bands, patch_size=p)).to(device).eval()
        with torch.no_grad():
            r = m.mfpg(*(torch.randn(B, c, p, p, generator=g).to(device) for c in bands.values()))
            args = m._matrices(r)                                              # per-image P_sp (B, C, C), P_sa (B, p^2, p^2)
            ctx = m.couple(*args)[1]                                           # per layer (B, n_ctx, D_t)
        l, toks, params = m, m.tokens, [q for q in m.parameters() if q.requires_grad]
    else:
        m = create_method(method, clip, ImageSpec(names, size=clip.image_size[0], caption_dim=clip.text_width)).to(device).eval()
        l, last = m.learner, clip.n_vision_layers - 1
        with torch.no_grad():
            x = torch.randn(B, clip.in_channels, *clip.image_size, generator=g).to(device)
            r = clip.encode_image(x, return_tokens=last, normalize=True)
            img, tok = r["features"], r["tokens"][last]                      # (B, E), (B, T, D_v)
            cap = torch.randn(B, clip.text_width, generator=g).to(device)    # (B, D_c) caption embeddings
            ctx = l.ctx[None] + l.meta_net(img)[:, None] if method == "cocoop" else l.refine(tok, cap)[0]   # (B, n_ctx, D_t)
        args = (img,) if method == "cocoop" else (img, tok, cap)
        toks, params = l.tokens, [q for q in l.parameters() if q.requires_grad]
    w = torch.randn(B, K, clip.embed_dim, generator=g).to(device)            # fixed weights of the scalar loss
    Lp = l._prefix_len
    return dict(method=method, clip=clip, learner=l, args=args, ctx=ctx, w=w, B=B, note=note, params=params,
                L=toks.shape[1], Lp=Lp)


class _prefix_switch:
    "Within the block, a CoCoOp/BiMoRS learner takes the shared-prefix path or the full B x K path (`shared_prefix`)."
    def __init__(self, learner, on: bool): self.l, self.on = learner, on
    def __enter__(self): self.l.shared_prefix = self.on
    def __exit__(self, *exc): self.l.shared_prefix = True


def cfipt_full(m, pt: list) -> torch.Tensor:
    "CF-IPT's per-image text features the previous way: deep prompts (B, n_ctx, D) on the expanded (B, K, L, D) prompts."
    c = m.clip
    emb, eot = c.token_embedding(m.tokens), c.eot_index(m.tokens)              # (K, L, D), (K,)
    return c.encode_text_embeddings(emb.expand(pt[0].shape[0], *emb.shape), eot, deep_prompts=list(pt), normalize=True)


def text_tower(S: dict, ctx, path: str) -> torch.Tensor:
    "Unit text features (B, K, E) of the per-image prompts ctx (B, n_ctx, D), for CF-IPT a list of them per layer."
    l, B = S["learner"], S["B"]
    if S["method"] == "cfipt":
        if path == "prefix": return l.text_features(ctx)
        if path == "full": return cfipt_full(l, ctx)
        return torch.stack([l.text_features([p[b:b + 1] for p in ctx]) for b in range(B)])   # batch 1: K full prompts
    with _prefix_switch(l, path == "prefix"):
        if path == "loop": return torch.stack([l.context_features(ctx[b]) for b in range(B)])  # (n_ctx, D): K full prompts
        return l.context_features(ctx)


def learner_features(S: dict, path: str) -> torch.Tensor:
    "The method's text side (B, K, E) from its per-image inputs: on the batch, or image by image and stacked."
    l, a, B = S["learner"], S["args"], S["B"]
    if S["method"] == "cfipt":
        if path == "prefix": return l.text_features(l.couple(*a)[1])
        if path == "full": return cfipt_full(l, l.couple(*a)[1])
        return torch.stack([l.text_features(l.couple(*(t[b:b + 1] for t in a))[1]) for b in range(B)])
    with _prefix_switch(l, path == "prefix"):
        if path == "loop": return torch.cat([l.text_features(*(t[b:b + 1] for t in a)) for b in range(B)])
        return l.text_features(*a)


def run_once(S: dict, kind: str, bwd: bool, path: str) -> tuple:
    "One repeat: features and, with bwd, the gradients (of the per-image prompt leaves, or of the trainable parameters)."
    with torch.set_grad_enabled(bwd):
        if kind == "text":
            c = S["ctx"]
            leaves = [p.detach().requires_grad_(bwd) for p in c] if isinstance(c, list) else [c.detach().requires_grad_(bwd)]
            f, wrt = text_tower(S, leaves if isinstance(c, list) else leaves[0], path), leaves
        else: f, wrt = learner_features(S, path), S["params"]
        if bwd: (f * S["w"]).sum().backward()
    return f, [t.grad for t in wrt] if bwd else []


def zero_grads(S: dict):
    for p in S["params"]: p.grad = None


# ---------------------------------------------------------------- memory
def _status_kib(field: str):
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"): return int(line.split()[1])
    except OSError: pass
    return None


def mem_start(device: str) -> tuple:
    "(bytes in use now, whether the peak could be reset)."
    if device.startswith("cuda"):
        torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); return torch.cuda.memory_allocated(), True
    try:
        with open("/proc/self/clear_refs", "w") as fh: fh.write("5")   # resets VmHWM (peak RSS) to the current RSS
        reset = True
    except OSError: reset = False
    rss = _status_kib("VmRSS")
    return (rss * 1024 if rss is not None else 0), reset


def mem_peak(device: str) -> int:
    "Peak bytes since mem_start (CUDA: allocated; CPU: resident)."
    if device.startswith("cuda"): torch.cuda.synchronize(); return torch.cuda.max_memory_allocated()
    hwm = _status_kib("VmHWM")
    return (hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


# ---------------------------------------------------------------- one configuration (child process)
def one(a) -> dict:
    method, pname, path = a.one
    kind, bwd = PASSES[pname]
    S = setup(method, a.batch, a.classes, a.device)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)
    base, reset = mem_start(a.device)
    times = []
    for i in range(WARMUP + a.repeats):
        zero_grads(S)
        sync(); t0 = time.perf_counter()
        f, grads = run_once(S, kind, bwd, path)
        sync(); dt = time.perf_counter() - t0
        del f, grads
        if i >= WARMUP: times.append(dt)
    peak = mem_peak(a.device)
    return dict(method=method, pass_=pname, path=path, ms=statistics.median(times) * 1e3, all_ms=[t * 1e3 for t in times],
                base=base, peak=peak, reset=reset, threads=torch.get_num_threads(), note=S["note"], L=S["L"], Lp=S["Lp"])


# ---------------------------------------------------------------- agreement check (this process)
def _maxdiff(x, y, rel: bool = False) -> float:
    "max |x - y|, with rel divided by max |y| (gradients: their scale grows with B x K x E summed terms)."
    if (x is None) != (y is None): raise AssertionError("a gradient exists on one path only")
    if x is None: return 0.0
    return (x - y).abs().max().item() / (max(y.abs().max().item(), 1e-12) if rel else 1.0)


def check(method: str, a, passes) -> str:
    "Max abs difference of prefix and loop against full (features; gradients relative to their largest), for the kinds timed; asserts < TOL."
    S = setup(method, a.batch, a.classes, a.device)
    out = []
    for kind in dict.fromkeys(PASSES[p][0] for p in passes):
        bwd = any(PASSES[p] == (kind, True) for p in passes)
        res = {}
        for path in PATHS:
            zero_grads(S)
            f, g = run_once(S, kind, bwd, path)
            res[path] = (f.detach(), [None if t is None else t.detach().clone() for t in g])
            assert f.shape == (a.batch, a.classes, S["clip"].embed_dim), (path, f.shape)
        msg = []
        for path in ("prefix", "loop"):
            fd = _maxdiff(res[path][0], res["full"][0])
            gd = max((_maxdiff(x, y, rel=True) for x, y in zip(res[path][1], res["full"][1], strict=True)), default=0.0)
            assert fd < TOL and gd < TOL, f"{method} {kind}: {path} and full differ: features {fd:.2e}, gradients {gd:.2e} (tolerance {TOL})"
            msg.append(f"{path} {fd:.1e}" + (f" (grads, relative {gd:.1e})" if bwd else ""))
        out.append(f"{kind}: " + ", ".join(msg))
    return f"prefix length {S['Lp']} of L = {S['L']}; " + "; ".join(out)


# ---------------------------------------------------------------- a short training run (this process, --train-steps)
def train_compare(method: str, steps: int, B: int, device: str) -> dict:
    "`steps` AdamW steps of CoCoOp / BiMoRS on the embedded scene images, shared prefix vs full B x K: losses and step times."
    from rs_prompt_lab.backbones import load_backbone
    from rs_prompt_lab.methods import create_method
    from rs_prompt_lab.inputs import ImageSpec
    from rs_prompt_lab.synth.images import make_scene_images
    from rs_prompt_lab.scene.synthcap import SynthCaptioner
    from rs_prompt_lab.scene.encoders import TextTowerEncoder
    clip = load_backbone("rs-tiny")[0].to(device).eval()
    ds = make_scene_images(n_per_class=8, size=clip.image_size[0], seed=0)      # 22 scene classes x 8 images
    n = len(ds.items)
    x = torch.stack([torch.from_numpy(ds.image(i)).permute(2, 0, 1).float() / 255 for i in range(n)]).to(device)
    cap = TextTowerEncoder(clip).encode(SynthCaptioner().caption(ds, range(n))).to(device)
    y = torch.as_tensor(ds.labels).long().to(device)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    res = {}
    for path in ("prefix", "full"):
        torch.manual_seed(0)
        m = create_method(method, clip, ImageSpec(ds.class_names, size=clip.image_size[0], caption_dim=cap.shape[1])).to(device).train()
        m.learner.shared_prefix = path == "prefix"
        opt = torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=2e-3)
        losses, times = [], []
        for s in range(steps):
            idx = order[torch.arange(s * B, (s + 1) * B) % n].to(device)
            batch = {"image": x[idx], "caption_emb": cap[idx], "label": y[idx]}
            if device.startswith("cuda"): torch.cuda.synchronize()
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = m.loss(m(batch), batch)
            loss.backward(); opt.step()
            if device.startswith("cuda"): torch.cuda.synchronize()
            times.append(time.perf_counter() - t0); losses.append(loss.item())
        res[path] = dict(losses=losses, ms=statistics.median(times[2:] or times) * 1e3, total=sum(times))
    d = max(abs(p_ - f_) for p_, f_ in zip(res["prefix"]["losses"], res["full"]["losses"]))
    assert d < 1e-3, f"{method}: the losses of the shared-prefix and the full run differ by {d:.2e}"
    return dict(res, K=len(ds.class_names), diff=d)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="images B (default 32)")
    ap.add_argument("--classes", type=int, default=38, help="classes K (default 38, PatternNet's)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after 2 warm-ups, median reported (default 3: keeps "
                    "the default run near 5 min on 2 CPU cores; use 5+ on a quiet or bigger machine)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine 2 threads make every small op wait "
                    "and the figures swing 10x between repeats; 0 = torch's default)")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available; default)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file (rs-lab bench reads it)")
    ap.add_argument("--train-steps", type=int, default=0, help="also train CoCoOp / BiMoRS (of --methods) this many AdamW steps of "
                    "--batch images on the embedded scene images, shared prefix vs full, and compare losses and step times "
                    "(default 0: no training run)")
    ap.add_argument("--no-timing", action="store_true", help="skip the per-pass timings (the agreement check still runs)")
    ap.add_argument("--one", nargs=3, metavar=("METHOD", "PASS", "PATH"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.device == "auto": a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.threads: torch.set_num_threads(a.threads)
    if a.one:
        print("RESULT " + json.dumps(one(a)), flush=True)
        return

    T0 = time.perf_counter()
    dev = torch.cuda.get_device_name() if a.device.startswith("cuda") else (platform.processor() or platform.machine())
    print(f"machine: {dev}, {os.cpu_count()} CPUs visible; python {platform.python_version()}, torch {torch.__version__}; "
          f"device {a.device}, torch threads {torch.get_num_threads()}")
    print(f"B = {a.batch} images, K = {a.classes} classes -> {a.batch * a.classes} prompts; {WARMUP} warm-ups + median of {a.repeats} repeats")
    for m in a.methods:
        t = time.perf_counter()
        print(f"check {m}: max |diff| against full: {check(m, a, a.passes)}  (< {TOL:g}: OK; {time.perf_counter() - t:.1f} s)", flush=True)

    for m in a.methods if a.train_steps > 0 else []:
        if m == "cfipt": continue
        t = time.perf_counter()
        r = train_compare(m, a.train_steps, a.batch, a.device)
        p, f = r["prefix"], r["full"]
        print(f"train {m}: {a.train_steps} steps, B = {a.batch}, K = {r['K']} (embedded scene images, AdamW): median step "
              f"{p['ms']:.0f} ms shared prefix vs {f['ms']:.0f} ms full ({f['ms'] / p['ms']:.2f}x; all steps {p['total']:.1f} s vs "
              f"{f['total']:.1f} s); max |loss diff| {r['diff']:.1e} over the {a.train_steps} losses "
              f"(first {p['losses'][0]:.4f}, last {p['losses'][-1]:.4f} / {f['losses'][-1]:.4f}); {time.perf_counter() - t:.0f} s", flush=True)
    if a.no_timing: return

    rows = {}
    child = [sys.executable, os.path.abspath(__file__), "--batch", str(a.batch), "--classes", str(a.classes),
             "--repeats", str(a.repeats), "--device", a.device] + (["--threads", str(a.threads)] if a.threads else [])
    for m in a.methods:
        for p in a.passes:
            for path in PATHS:
                r = subprocess.run(child + ["--one", m, p, path], capture_output=True, text=True)
                line = [s for s in r.stdout.splitlines() if s.startswith("RESULT ")]
                if r.returncode or not line:
                    sys.exit(f"child {m} {p} {path} failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
                rows[m, p, path] = json.loads(line[-1][7:])
                print(f"  {m:6s} {p:15s} {path:6s} {rows[m, p, path]['ms']:9.1f} ms  (repeats: "
                      f"{', '.join(f'{x:.0f}' for x in rows[m, p, path]['all_ms'])})", flush=True)

    r0 = next(iter(rows.values()))
    MiB = 2 ** 20
    what = "CUDA max_memory_allocated" if a.device.startswith("cuda") else "peak RSS (VmHWM)"
    print(f"\nbackbone {r0['note']}; child torch threads {r0['threads']}; memory: {what} over the memory in use before timing "
          f"(model + inputs, {r0['base'] / MiB:.0f} MiB in the first child)")
    for m in a.methods:
        r = next(v for k, v in rows.items() if k[0] == m)
        print(f"  {m}: text length L = {r['L']}, shared prefix Lp = {r['Lp']} (SOS, context, shared words), suffix {r['L'] - r['Lp']}")
    if not all(r["reset"] for r in rows.values()): print("note: the peak could not be reset after the setup: peaks include the setup")
    hdr = (f"{'method':6s} | {'pass':15s} | {'prefix ms':>9s} | {'full ms':>8s} | {'loop ms':>8s} | {'full/prefix':>11s} | "
           f"{'loop/prefix':>11s} | {'loop/full':>9s} | {'peak MiB prefix / full / loop':>29s}")
    print(hdr); print("-" * len(hdr))
    verdict, figures, prompts = [], [], a.batch * a.classes
    for m in a.methods:
        for p in a.passes:
            x, f, l = (rows[m, p, k] for k in PATHS)
            pk = [(r["peak"] - r["base"]) / MiB for r in (x, f, l)]
            print(f"{m:6s} | {p:15s} | {x['ms']:9.1f} | {f['ms']:8.1f} | {l['ms']:8.1f} | {f['ms'] / x['ms']:10.2f}x | "
                  f"{l['ms'] / x['ms']:10.2f}x | {l['ms'] / f['ms']:8.2f}x | {pk[0]:+9.1f} / {pk[1]:+7.1f} / {pk[2]:+7.1f}")
            sp = l["ms"] / x["ms"]
            verdict.append(f"{m} {p} {sp:.2f}x {'MET' if sp >= TARGET else 'NOT met'}")
            note = f"peak {pk[0]:+.0f} MiB shared prefix, {pk[1]:+.0f} MiB full B x K, {pk[2]:+.0f} MiB loop"
            figures.append(BenchFigure(f"{m} {p}, shared prefix", prompts / x["ms"] * 1e3, "prompts/s", prompts / l["ms"] * 1e3,
                                       "loop over images", f"target >= {TARGET:g}x; {note}"))
            figures.append(BenchFigure(f"{m} {p}, shared prefix", prompts / x["ms"] * 1e3, "prompts/s", prompts / f["ms"] * 1e3,
                                       "full B x K prompts, batched", note))
    print(f"target loop/prefix >= {TARGET:g}x: " + "; ".join(verdict))
    print(f"total runtime {time.perf_counter() - T0:.0f} s")
    if a.json: write_figures(a.json, "per_image_prompts", figures, a.device, B=a.batch, K=a.classes, L=r0["L"])


if __name__ == "__main__":
    main()
