"""Load time of the embedded rs-tiny backbone, offline (target: under 2 s once Python and torch are imported).

Prints: import time of torch + open_clip, then the wall time of load_backbone('rs-tiny') (cold, then warm).
Usage: .venv/bin/python benchmarks/bench_backbones.py
"""
import os, time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
t0 = time.perf_counter()
import torch, open_clip  # noqa: E401
t1 = time.perf_counter()
from rs_prompt_lab.backbones import load_backbone
times = []
for _ in range(3):
    s = time.perf_counter(); clip, info = load_backbone("rs-tiny"); times.append(time.perf_counter() - s)
print(f"import torch+open_clip: {t1 - t0:.2f} s")
print(f"load_backbone('rs-tiny'): first {times[0]:.2f} s, then {min(times[1:]):.2f} s  (target < 2 s)")
print(f"parameters: {sum(p.numel() for p in clip.parameters()):,}; input {info['size']}; threads {torch.get_num_threads()}")
