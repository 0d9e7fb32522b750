"""`rs-lab bench`: the scripts write figures files, the runner isolates failures, BENCHMARKS.md is written atomically."""
import subprocess, sys, textwrap
from pathlib import Path
import pytest
from rs_prompt_lab.bench import BENCHES, BenchSpec, bench_markdown, run_bench, run_one, read_figures

ROOT = Path(__file__).resolve().parents[1]


def test_every_registered_script_takes_json():
    for name, spec in BENCHES.items():
        src = (ROOT/"benchmarks"/spec.script).read_text()
        assert '"--json"' in src and "write_figures" in src, f"{spec.script} does not write figures for rs-lab bench"


def test_rs_lab_bench_writes_and_merges_markdown(tmp_path):
    out = tmp_path/"BENCHMARKS.md"
    run = lambda *names: subprocess.run([str(Path(sys.executable).parent/"rs-lab"), "bench", *names, "--out", str(out)],
                                        capture_output=True, text=True, cwd=tmp_path, timeout=300)
    r = run("patches")
    assert r.returncode == 0, r.stderr[-2000:]
    row = next(l for l in out.read_text().splitlines() if l.startswith("| SceneTiler windows, same slice"))
    assert float(row.split("|")[4].strip().rstrip("x").replace(",", "")) > 0 and "windows equal" in row, row
    assert "--json" not in out.read_text(), "the command shown must be the one a reader reruns, without the scratch path"
    r = run("backbones")                                   # a second, partial run keeps the first one's section
    assert r.returncode == 0, r.stderr[-2000:]
    md = out.read_text()
    assert "### patches" in md and "### backbones" in md and "## GPU" in md and "1 kept from before" in r.stdout
    assert (tmp_path/"BENCHMARKS.json").exists()


def test_failing_script_is_isolated(tmp_path):
    bad = tmp_path/"bench_bad.py"
    bad.write_text("raise RuntimeError('deliberate failure')\n")
    silent = tmp_path/"bench_silent.py"
    silent.write_text("print('no figures')\n")
    r1 = run_one("bad", BenchSpec(str(bad), []), [], "cpu", tmp_path)
    r2 = run_one("silent", BenchSpec(str(silent), []), [], "cpu", tmp_path)
    assert not r1["ok"] and "deliberate failure" in r1["error"]
    assert not r2["ok"] and "wrote no figures" in r2["error"]
    md = bench_markdown([r1, r2])
    assert md.count("FAILED") == 2


def test_unknown_benchmark_and_missing_gpu_refused():
    from rs_prompt_lab.core import ConfigError
    with pytest.raises(ConfigError, match="unknown benchmark 'clasmap'"): run_bench(["clasmap"])
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"): run_bench(["backbones"], gpu=True)
