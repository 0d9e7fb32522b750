"""Load time of the embedded rs-tiny backbone, offline (target: under 2 s once Python and torch are imported).

Prints: import time of torch + open_clip, then the wall time of load_backbone('rs-tiny') (cold, then warm).
Usage: .venv/bin/python benchmarks/bench_backbones.py [--json FIGURES.json]
"""
import argparse, os, sys, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
t0 = time.perf_counter()
import torch, open_clip  # noqa: E401
t1 = time.perf_counter()

TARGET_S = 2.0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file (rs-lab bench reads it)")
    a = ap.parse_args(argv)
    from rs_prompt_lab.backbones import load_backbone
    from rs_prompt_lab.bench import BenchFigure, write_figures
    times = []
    for _ in range(3):
        s = time.perf_counter(); clip, info = load_backbone("rs-tiny"); times.append(time.perf_counter() - s)
    n = sum(p.numel() for p in clip.parameters())
    print(f"import torch+open_clip: {t1 - t0:.2f} s")
    print(f"load_backbone('rs-tiny'): first {times[0]:.2f} s, then {min(times[1:]):.2f} s  (target < {TARGET_S:g} s)")
    print(f"parameters: {n:,}; input {info['size']}; threads {torch.get_num_threads()}")
    if a.json:
        write_figures(a.json, "backbones", [
            BenchFigure("load_backbone('rs-tiny'), first", times[0], "s", None, "",
                        f"target < {TARGET_S:g} s: {'OK' if times[0] < TARGET_S else 'OVER'}; importing torch + open_clip took {t1 - t0:.1f} s"),
            BenchFigure("load_backbone('rs-tiny'), warm", min(times[1:]), "s", times[0], "first load")], parameters=n)
    return 0 if times[0] < TARGET_S else 1


if __name__ == "__main__":
    sys.exit(main())
