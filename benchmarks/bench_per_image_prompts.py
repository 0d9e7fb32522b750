"""Per-image prompts through the text tower: one batched (B*K) pass against a Python loop over images (a script, not a test).

CoCoOp and BiMoRS give every image its own context, so B images and K classes need B*K prompts through the text tower.
The library sends them as one (B, K, L, D) pass (`insert_context` with a (B, n_ctx, D) context, then
`encode_text_embeddings`); the official CoCoOp / BiMoRS code loops over the images and encodes K prompts per image.
This script builds each method on the shipped `rs-tiny` backbone (`random:rs-tiny` if its weights are absent: same
architecture and speed) with K class names, computes the per-image context once (CoCoOp: ctx + meta_net(image
feature); BiMoRS: `learner.refine(visual tokens, caption)`), and times, batched and looped:

- text-fwd        the text tower only, forward, under `torch.no_grad` (inference);
- text-fwd+bwd    the text tower only, forward + backward of sum(features * fixed random tensor) to the per-image
                  context (a fresh leaf each repeat: the backward goes through the text tower and stops there);
- learner-fwd     the learner's whole `text_features` (context + text tower), `torch.no_grad`; the loop calls it on
                  one image at a time (`text_features(img[b:b+1], ...)`) and concatenates;
- learner-fwd+bwd the same with the backward to the learner's parameters (ctx, meta_net, ...), grads zeroed between repeats.

Before timing it checks, in this process, that the loop and the batched pass agree (features and gradients, max abs
difference < 1e-4) and prints the differences. Each (method, pass, path) is then timed in a fresh child process of
this script (`--one`) so that peak memories do not contaminate each other: 2 warm-up repeats, then the median of
`--repeats`. Peak memory: on CPU the process's peak RSS (VmHWM, reset through /proc/self/clear_refs after the setup;
the process's ru_maxrss where that is not possible), printed as the increase over the RSS just before timing; on CUDA
torch.cuda.max_memory_allocated over the memory allocated before timing.

    python benchmarks/bench_per_image_prompts.py                            # B = 32, K = 38, both methods, 4 passes, 1 thread
    python benchmarks/bench_per_image_prompts.py --passes text-fwd text-fwd+bwd --repeats 5
Timings on a shared machine are noisy; nothing but the loop/batched agreement is asserted.
"""
import argparse, json, os, platform, resource, statistics, subprocess, sys, time
from rs_prompt_lab.bench import BenchFigure, write_figures
os.environ.setdefault("HF_HUB_OFFLINE", "1"); os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
import torch

PASSES = {"text-fwd": ("text", False), "text-fwd+bwd": ("text", True),
          "learner-fwd": ("learner", False), "learner-fwd+bwd": ("learner", True)}
PATHS = ("batched", "loop")
TARGET, TOL, WARMUP = 3.0, 1e-4, 2


# ---------------------------------------------------------------- setup and the two paths
def setup(method: str, B: int, K: int, device: str) -> dict:
    "rs-tiny, the method's learner, its inputs (B random images, B random captions) and the per-image context, all seeded."
    from rs_prompt_lab.backbones import load_backbone, WeightsError
    from rs_prompt_lab.methods import create_method
    from rs_prompt_lab.inputs import ImageSpec
    torch.manual_seed(0)
    try: clip, note = load_backbone("rs-tiny")[0], "rs-tiny (pretrained weights)"
    except WeightsError: clip, note = load_backbone("random:rs-tiny")[0], "random:rs-tiny (weights absent: random init, same speed)"
    clip = clip.to(device).eval()
    m = create_method(method, clip, ImageSpec([f"class {i}" for i in range(K)], size=clip.image_size[0], caption_dim=clip.text_width))
    m = m.to(device).eval()
    l, last = m.learner, clip.n_vision_layers - 1
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        x = torch.randn(B, clip.in_channels, *clip.image_size, generator=g).to(device)
        r = clip.encode_image(x, return_tokens=last, normalize=True)
        img, tok = r["features"], r["tokens"][last]                          # (B, E), (B, T, D_v)
        cap = torch.randn(B, clip.text_width, generator=g).to(device)        # (B, D_c) caption embeddings
        ctx = l.ctx[None] + l.meta_net(img)[:, None] if method == "cocoop" else l.refine(tok, cap)[0]   # (B, n_ctx, D_t)
        emb, eot = clip.token_embedding(l.tokens), clip.eot_index(l.tokens)  # (K, L, D_t), (K,)
    w = torch.randn(B, K, clip.embed_dim, generator=g).to(device)            # fixed weights of the scalar loss
    args = (img,) if method == "cocoop" else (img, tok, cap)
    return dict(clip=clip, learner=l, args=args, ctx=ctx, emb=emb, eot=eot, w=w, B=B, note=note,
                params=[p for p in l.parameters() if p.requires_grad], L=l.tokens.shape[1])


def text_tower(S: dict, ctx: torch.Tensor, path: str) -> torch.Tensor:
    "Unit text features (B, K, E) of the per-image contexts ctx (B, n_ctx, D): one (B*K) pass, or one (K) pass per image."
    c, emb, eot = S["clip"], S["emb"], S["eot"]
    if path == "batched": return c.encode_text_embeddings(c.insert_context(emb, ctx), eot, normalize=True)
    return torch.stack([c.encode_text_embeddings(c.insert_context(emb, ctx[b]), eot, normalize=True) for b in range(ctx.shape[0])])


def learner_features(S: dict, path: str) -> torch.Tensor:
    "The learner's text_features (B, K, E): on the batch, or image by image and concatenated."
    l, a = S["learner"], S["args"]
    if path == "batched": return l.text_features(*a)
    return torch.cat([l.text_features(*(t[b:b + 1] for t in a)) for b in range(S["B"])])


def run_once(S: dict, kind: str, bwd: bool, path: str) -> tuple:
    "One repeat: features and, with bwd, the gradients (of the context leaf, or of the learner's parameters)."
    with torch.set_grad_enabled(bwd):
        if kind == "text":
            ctx = S["ctx"].detach().requires_grad_(bwd)
            f, wrt = text_tower(S, ctx, path), [ctx]
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
                base=base, peak=peak, reset=reset, threads=torch.get_num_threads(), note=S["note"], L=S["L"])


# ---------------------------------------------------------------- agreement check (this process)
def check(method: str, a, passes) -> str:
    "Max abs difference loop vs batched of features and gradients for the kinds timed; asserts < TOL."
    S = setup(method, a.batch, a.classes, a.device)
    out = []
    for kind in dict.fromkeys(PASSES[p][0] for p in passes):
        bwd = any(PASSES[p] == (kind, True) for p in passes)
        res = {}
        for path in PATHS:
            zero_grads(S)
            f, g = run_once(S, kind, bwd, path)
            res[path] = (f.detach(), [t.detach().clone() for t in g])
        fd = (res["batched"][0] - res["loop"][0]).abs().max().item()
        gd = max(((x - y).abs().max().item() for x, y in zip(res["batched"][1], res["loop"][1])), default=0.0)
        assert res["batched"][0].shape == res["loop"][0].shape == (a.batch, a.classes, S["clip"].embed_dim), res["batched"][0].shape
        assert fd < TOL and gd < TOL, f"{method} {kind}: loop and batched differ: features {fd:.2e}, gradients {gd:.2e} (tolerance {TOL})"
        out.append(f"{kind}: features {fd:.1e}" + (f", grads {gd:.1e}" if bwd else ""))
    return "; ".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32, help="images B (default 32)")
    ap.add_argument("--classes", type=int, default=38, help="classes K (default 38)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after 2 warm-ups, median reported (default 3: keeps "
                    "the default run near 3 min on 2 CPU cores; use 5+ on a quiet or bigger machine)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: on a shared 2-core machine 2 threads make every small op wait "
                    "and the figures swing 10x between repeats; 0 = torch's default)")
    ap.add_argument("--methods", nargs="+", default=["cocoop", "bimors"], choices=["cocoop", "bimors"])
    ap.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    ap.add_argument("--device", default="auto", help="cpu | cuda | auto (cuda when available; default)")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file (rs-lab bench reads it)")
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
        print(f"check {m}: loop vs batched max |diff|: {check(m, a, a.passes)}  (< {TOL:g}: OK; {time.perf_counter() - t:.1f} s)", flush=True)

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
                print(f"  {m:6s} {p:15s} {path:7s} {rows[m, p, path]['ms']:9.1f} ms  (repeats: "
                      f"{', '.join(f'{x:.0f}' for x in rows[m, p, path]['all_ms'])})", flush=True)

    r0 = next(iter(rows.values()))
    MiB = 2 ** 20
    what = "CUDA max_memory_allocated" if a.device.startswith("cuda") else "peak RSS (VmHWM)"
    print(f"\nbackbone {r0['note']}; text length L = {r0['L']}; child torch threads {r0['threads']}; "
          f"memory: {what} over the {r0['base'] / MiB:.0f} MiB in use before timing (model + inputs)")
    if not all(r["reset"] for r in rows.values()): print("note: the peak could not be reset after the setup: peaks include the setup")
    hdr = f"{'method':7s} | {'pass':15s} | {'batched ms':>10s} | {'loop ms':>9s} | {'loop/batched':>12s} | {'batched peak MiB':>16s} | {'loop peak MiB':>13s} | {'mem loop/batched':>16s}"
    print(hdr); print("-" * len(hdr))
    verdict, figures = [], []
    for m in a.methods:
        for p in a.passes:
            b, l = rows[m, p, "batched"], rows[m, p, "loop"]
            sp = l["ms"] / b["ms"]
            pb, pl = (b["peak"] - b["base"]) / MiB, (l["peak"] - l["base"]) / MiB
            print(f"{m:7s} | {p:15s} | {b['ms']:10.1f} | {l['ms']:9.1f} | {sp:11.2f}x | {pb:+16.1f} | {pl:+13.1f} | "
                  f"{(pl / pb if pb > 0 else float('nan')):15.2f}x")
            verdict.append(f"{m} {p} {sp:.2f}x {'MET' if sp >= TARGET else 'NOT met'}")
            prompts = a.batch * a.classes
            figures.append(BenchFigure(f"{m} {p}, batched", prompts / b["ms"] * 1e3, "prompts/s", prompts / l["ms"] * 1e3, "loop over images",
                                       f"target >= {TARGET:g}x; peak {pb:+.0f} MiB batched, {pl:+.0f} MiB loop"))
    print(f"target loop/batched >= {TARGET:g}x: " + "; ".join(verdict))
    print(f"total runtime {time.perf_counter() - T0:.0f} s")
    if a.json: write_figures(a.json, "per_image_prompts", figures, a.device, B=a.batch, K=a.classes, L=r0["L"])


if __name__ == "__main__":
    main()
