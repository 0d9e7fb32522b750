"""rs-lab reproduce / run / report: resume after a kill, shards merged = unsharded, one-line refusals, shipped grids' dry runs."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest
import yaml
from rs_prompt_lab.core import load_json, save_json
from rs_prompt_lab.reproduce import (build_report, cell_status, collect, expand_grid, load_grid, make_test_notebook, report_blocks,
                                     reproduce)

REPO = Path(__file__).resolve().parents[1]
RS_LAB = str(Path(sys.executable).parent / "rs-lab")  # the console script installed in this venv
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), "HF_HUB_OFFLINE": "1"}


def rs_lab(*args, cwd=None):
    "The installed console script in a fresh process (what a user runs)."
    return subprocess.run([RS_LAB, *map(str, args)], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


def cli(capsys, *args):
    "rs-lab in this process (faster): (exit code, stdout, stderr)."
    from rs_prompt_lab.cli import main
    rc = main([str(a) for a in args])
    o = capsys.readouterr()
    return rc, o.out, o.err


def write_grid(path, nb, **kw):
    d = {"seeds": [0, 1], "reference": "coop", "experiments": [{"name": "toy", "notebook": str(nb), "grid": {"METHOD": ["coop", "cfipt"]}}]}
    d.update(kw)
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    "A toy grid (2 methods x 2 seeds) run once, unsharded, with 2 workers."
    d = tmp_path_factory.mktemp("repro")
    nb = make_test_notebook(d / "toy.ipynb")
    grid = write_grid(d / "grid.yaml", nb)
    out = d / "full"
    assert reproduce(grid, out, workers=2, progress=False) == 0
    return {"dir": d, "nb": nb, "grid": grid, "out": out}


def test_run_records(toy):
    cells = sorted(p for p in toy["out"].iterdir() if p.is_dir() and p.name.startswith("toy-"))
    assert len(cells) == 4 and all(cell_status(c) == "finished" for c in cells)
    cfg, run = load_json(cells[0] / "config.json"), load_json(cells[0] / "run.json")
    assert cfg["hash"] in cells[0].name and cfg["seed"] in (0, 1) and cfg["inject"]["SEEDS"] == [cfg["seed"]]
    assert {"commit", "dirty", "start", "end", "duration_s", "status", "python"} <= set(run) and run["status"] == "finished"
    assert "papermill==" in (cells[0] / "env.txt").read_text() and (cells[0] / "cell.ipynb").exists()
    for f in ("results.csv", "report.md", "report.html"): assert (toy["out"] / f).exists()


def test_results_table_csv_and_parquet(toy, tmp_path):
    from rs_prompt_lab.reproduce import RESULT_COLUMNS, write_results
    rows = collect(toy["out"])["rows"]
    assert len(rows) == 8 and {r["metric"] for r in rows} == {"acc", "loss"}   # 2 methods x 2 seeds x 2 metrics
    notes = write_results(rows, tmp_path)
    import csv
    back = list(csv.DictReader((tmp_path / "results.csv").open()))
    assert [float(r["value"]) for r in back] == [r["value"] for r in rows] and list(back[0]) == list(RESULT_COLUMNS)
    try: import pyarrow.parquet as pq
    except ImportError:
        assert "pyarrow is not installed" in notes[0] and not (tmp_path / "results.parquet").exists(); return
    t = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert [r["value"] for r in t] == [r["value"] for r in rows] and [r["method"] for r in t] == [r["method"] for r in rows]


def test_resume_skips_finished_and_reruns_killed(toy, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(toy["out"], out)
    cells = sorted(p for p in out.iterdir() if p.is_dir() and p.name.startswith("toy-"))
    killed = cells[1]
    before = {c: (c / "result.json").stat().st_mtime_ns for c in cells}
    (killed / "result.json").unlink()                   # a cell killed mid-run: started, no finished marker
    save_json({**load_json(killed / "run.json"), "status": "running", "end": None}, killed / "run.json")
    assert cell_status(killed) == "interrupted"
    assert reproduce(toy["grid"], out, resume=True, progress=False) == 0
    assert cell_status(killed) == "finished"
    assert all((c / "result.json").stat().st_mtime_ns == before[c] for c in cells if c != killed)   # finished cells untouched
    assert sorted(map(json.dumps, collect(out)["rows"]), key=str) == sorted(map(json.dumps, collect(toy["out"])["rows"]), key=str)


def test_sigkill_then_resume_equals_uninterrupted(toy, tmp_path):
    "SIGKILL a cell's process tree mid-run: recorded as failed (no result); --resume finishes it with the uninterrupted metrics."
    import threading, time, psutil
    grid = write_grid(tmp_path / "g.yaml", toy["nb"], seeds=[0],
                      experiments=[{"name": "toy", "notebook": str(toy["nb"]), "params": {"METHOD": "cfipt", "SLEEP": 60}}])
    out, rc = tmp_path / "runs", []
    t = threading.Thread(target=lambda: rc.append(reproduce(grid, out, progress=False, report=False))); t.start()
    t0 = time.time()
    while not list(out.glob("toy-*/out/toy/seed0/ckpt")):   # the notebook is running (its first 'checkpoint' is written)
        assert time.time() - t0 < 60 and t.is_alive(), "the cell never started"
        time.sleep(0.2)
    cd = next(out.glob("toy-*"))
    p = psutil.Process(load_json(cd / "run.json")["pid"])
    for q in [p, *p.children(recursive=True)]: q.kill()         # SIGKILL: the cell's process and its kernel
    t.join(60)
    assert rc == [1] and cell_status(cd) == "failed" and "exit code -9" in (cd / "error.txt").read_text()
    assert not (cd / "result.json").exists()
    t1 = time.time()
    assert reproduce(grid, out, resume=True, progress=False, report=False) == 0 and time.time() - t1 < 40   # resumed: no 60 s sleep
    grid2 = write_grid(tmp_path / "g2.yaml", toy["nb"], seeds=[0], experiments=[{"name": "toy", "notebook": str(toy["nb"]), "params": {"METHOD": "cfipt"}}])
    assert reproduce(grid2, tmp_path / "fresh", progress=False, report=False) == 0          # the same cell, never interrupted (no wait)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "cell"} for r in rows]
    assert strip(collect(out)["rows"]) == strip(collect(tmp_path / "fresh")["rows"]) and collect(out)["rows"][0]["value"] == pytest.approx(0.65)


def test_two_shards_merged_equal_unsharded(toy, tmp_path):
    for i in (1, 2): assert reproduce(toy["grid"], tmp_path / f"machine{i}" / "runs", workers=2, shard=f"{i}/2", progress=False) == 0
    n = [len([p for p in (tmp_path / f"machine{i}" / "runs").iterdir() if p.name.startswith("toy-")]) for i in (1, 2)]
    assert n == [2, 2]
    merged = tmp_path / "merged"
    for i in (1, 2): shutil.copytree(tmp_path / f"machine{i}" / "runs", merged / f"shard{i}")
    key = lambda r: (r["cell"], r["metric"])
    assert sorted(collect(merged)["rows"], key=key) == sorted(collect(toy["out"])["rows"], key=key)
    tables = lambda f: [b for b in report_blocks(f) if b[0] == "table"]
    assert tables(merged) == tables(toy["out"])
    r = rs_lab("report", merged, "--reference", "cfipt")
    assert r.returncode == 0 and "report:" in r.stdout and "vs cfipt" in (merged / "report.md").read_text(), r.stderr


def test_failing_cell_cli_exit_code_and_report(toy, tmp_path, capsys):
    bad = make_test_notebook(tmp_path / "boom.ipynb", fail=True)
    grid = write_grid(tmp_path / "g.yaml", toy["nb"], seeds=[0],
                      experiments=[{"name": "toy", "notebook": str(toy["nb"])}, {"name": "boom", "notebook": str(bad)}])
    rc, out, err = cli(capsys, "reproduce", grid, "--out", tmp_path / "runs", "--workers", "2", "--no-progress")
    assert rc == 1, out + err
    assert "FAILED boom-seed0-" in out and "ValueError: bad value 1 (as asked)" in out and "Cells that did not finish" in out
    html = (tmp_path / "runs" / "report.html").read_text()
    assert "Cells that did not finish" in html and "bad value 1" in html and "http" not in html.split("<body>")[1]
    assert "Traceback" not in err


@pytest.mark.parametrize("change, msg", [
    ({"seed": [0]}, "unknown key 'seed'. Did you mean: seeds?"),
    ({"experiments": [{"name": "toy", "notebook": "NB", "params": {"METHOD": "cfipz"}}]}, "experiment 'toy', key METHOD: unknown method 'cfipz'"),
    ({"experiments": [{"name": "toy", "notebook": "NB", "params": {"EPOHCS": 3}}]}, "experiment 'toy', key EPOHCS: not a parameter of toy.ipynb"),
    ({"experiments": [{"name": "toy", "notebook": "NB", "parms": {}}]}, "unknown key 'parms'. Did you mean: params?"),
])
def test_bad_grid_refused_before_anything_runs(toy, tmp_path, change, msg, capsys):
    d = {"seeds": [0], "experiments": [{"name": "toy", "notebook": str(toy["nb"])}]}
    d.update(json.loads(json.dumps(change).replace('"NB"', json.dumps(str(toy["nb"])))))
    (tmp_path / "g.yaml").write_text(yaml.safe_dump(d))
    rc, out, err = cli(capsys, "reproduce", tmp_path / "g.yaml", "--out", tmp_path / "runs")
    assert rc == 2 and msg in err and str(tmp_path / "g.yaml") in err, err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "runs").exists()


def test_bad_grid_console_script_one_line(tmp_path):
    (tmp_path / "g.yaml").write_text("experiments: [{notebook: 01_cfipt_pixel.ipynb, params: {EPOHCS: 3}}]\n")
    r = rs_lab("reproduce", tmp_path / "g.yaml", "--out", tmp_path / "runs")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "key EPOHCS: not a parameter of 01_cfipt_pixel.ipynb. Did you mean: EPOCHS?" in r.stderr, r.stderr


def test_run_one_cell(toy, tmp_path, capsys):
    rc, out, err = cli(capsys, "run", toy["nb"], "-p", "X", "2", "-p", "METHOD", "cfipt", "--seed", "3", "--out", tmp_path / "one")
    assert rc == 0, out + err
    cell = next((tmp_path / "one").iterdir())
    assert load_json(cell / "config.json")["params"] == {"X": 2, "METHOD": "cfipt"} and load_json(cell / "config.json")["seed"] == 3
    assert "cfipt acc = 0.7800" in out


def test_submitit_executor(toy, tmp_path, capsys):
    try: import submitit  # noqa: F401
    except ImportError:
        rc, out, err = cli(capsys, "reproduce", toy["grid"], "--out", tmp_path / "runs", "--executor", "local")
        assert rc == 2 and "needs submitit, which is not installed here" in err and len(err.strip().splitlines()) == 1
        assert not (tmp_path / "runs").exists()
        return
    assert reproduce(toy["grid"], tmp_path / "runs", executor="local", progress=False) == 0
    assert sorted(map(json.dumps, collect(tmp_path / "runs")["rows"])) == sorted(map(json.dumps, collect(toy["out"])["rows"]))


def test_shipped_grids_dry_run(capsys):
    quick = REPO / "nbs" / "experiments" / "grids" / "quick.yaml"
    cells = expand_grid(load_grid(quick))
    assert {c.experiment for c in cells} >= {"pixel", "scene", "align"} and {c.seed for c in cells} == {0, 1, 2}
    rc, out, err = cli(capsys, "reproduce", REPO / "nbs" / "experiments" / "grids" / "paper.yaml", "--dry-run", "--out", "/nonexistent/paper")
    assert rc in (0, 1) and "Traceback" not in err, err
    assert "156 cell(s) ->" in out and "estimate:" in out
    if rc == 1: assert "missing on this machine:" in out and "weights not found" in out
