"""Data-parallel training under torchrun (issue 15, "Scale"): the per-rank split of a global batch reassembles the
single-process batch; two gloo processes on CPU give the single-process results of `rs-lab train` and of a toy
Trainer run (generic DataLoader path, resume); rank 0 alone writes the run folders.

Tolerance: losses agree to a relative 1e-6 (DDP sums the two ranks' gradients in another order than one process
sums the batch: the measured gap is ~1e-8; leaving out the gradient weighting of uneven shards, or DDP's averaging
factor, moves them by ~1e-3); accuracies, selected epochs and test metrics are equal.
"""
import json, os, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch

from rs_prompt_lab.core import load_json
from rs_prompt_lab.data.scene import Scene
from rs_prompt_lab.data.patches import PatchSampler
from rs_prompt_lab.distributed import ShardedLoader, batch_rows, interleave, rank_batches, shard_batch, shard_rows

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RTOL = 1e-6


from test_experiment import two_d_scene as _scene   # the pixel protocol's tiny 10 x 12 scene (3 classes, HSI + LiDAR)


def _torchrun(args, tmp_path, timeout=240):
    "Run `torchrun --standalone --nproc_per_node 2 ARGS` on CPU with gloo; (completed process, seconds)."
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)
    return r, time.time() - t0


# the per-rank split -----------------------------------------------------------------------------------------------

def test_rank_shards_reassemble_the_global_batch():
    "Each rank's rows of every global batch, concatenated in rank order, are the single-process batch (all keys)."
    sc = _scene()
    ps = PatchSampler(sc, np.argwhere(sc.labels > 0), 3, 8, shuffle=True, seed=3, to_torch=True)   # 120 pixels: 15 x 8
    ps.set_epoch(2)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(11, 4), torch.arange(11)), batch_size=4)
    for loader in (ps, dl):
        whole = list(loader)
        for world in (2, 3, 4):
            parts = [list(ShardedLoader(loader, r, world)) for r in range(world)]
            assert all(len(p) == len(whole) for p in parts)
            for i, g in enumerate(whole):
                n = batch_rows(g)
                rows = [shard_rows(n, r, world) for r in range(world)]
                assert [p[i][1] for p in parts] == [(s.stop - s.start) / n for s in rows]   # each rank's share of the rows
                for k in (g.keys() if isinstance(g, dict) else range(len(g))):   # ranks with rows, in rank order: the batch
                    assert torch.equal(torch.cat([p[i][0][k] for p in parts if p[i][1] > 0]), g[k])
    # the last DataLoader batch has 3 rows: with 4 ranks, rank 3 runs one row at weight 0 (every rank takes every step)
    (x, y), share = list(ShardedLoader(dl, 3, 4))[-1]
    assert share == 0 and len(y) == 1
    # per-sample lists are cut with the tensors; values of another length reach every rank whole
    b = {"x": torch.arange(12).view(6, 2), "id": list("abcdef"), "classes": torch.zeros(3, 2)}
    cut = [shard_batch(b, shard_rows(6, r, 4), batch_rows(b)) for r in range(4)]
    assert sum((c["id"] for c in cut), []) == b["id"] and all(c["classes"] is b["classes"] for c in cut)
    # evaluation: whole batches round-robin, gathered back in order
    for world in (2, 3):
        outs = [[bt["rc"] for bt in rank_batches(ps, r, world)] for r in range(world)]
        assert torch.equal(torch.cat(interleave(outs)), torch.cat([bt["rc"] for bt in ps]))


def test_batch_size_must_split_over_the_processes(tmp_path, monkeypatch, capsys):
    "Under torchrun a batch size the process count does not divide is refused in one line, before any data is read."
    from rs_prompt_lab.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main(["train", "linear-probe", "--data", str(tmp_path / "absent.npz"), "--backbone", "random:rs-tiny",
               "--batch-size", "5", "--out", str(tmp_path / "runs"), "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert "batch_size 5 does not split over 2 processes: use a multiple of 2 (4 or 6)" in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("argv, option", [(["train", "paint", "--quick", "--paint-batch-size", "5"], "--paint-batch-size"),
                                          (["train", "align", "--quick", "--align-batch-size", "7"], "--align-batch-size"),
                                          (["train", "coop", "--protocol", "fewshot", "--quick", "--batch-size", "5"], "--batch-size")])
def test_scene_and_alignment_refuse_an_unsplittable_batch_first(argv, option, tmp_path, monkeypatch, capsys):
    "The scene and alignment protocols refuse too, naming the option the user typed, before any data or file."
    from rs_prompt_lab.cli import main
    monkeypatch.setenv("WORLD_SIZE", "2")
    rc = main([*argv, "--out", str(tmp_path / "runs"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith(f"error: {option} "), err
    assert not (tmp_path / "runs").exists()


# two gloo processes against one -------------------------------------------------------------------------------------

def _files(root: Path) -> list:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_torchrun_pixel_experiment_matches_one_process(tmp_path):
    "`torchrun --nproc_per_node 2 -m rs_prompt_lab.cli train linear-probe` (gloo) reproduces the single-process run."
    from rs_prompt_lab.cli import main
    _scene().save(tmp_path / "tiny2d.npz")
    # 15 training pixels in batches of 4 (4, 4, 4, 3: the last one splits 2 / 1); 9 validation pixels in batches of 4
    args = ["train", "linear-probe", "--data", str(tmp_path / "tiny2d.npz"), "--backbone", "random:rs-tiny", "--shots", "5",
            "--val-per-class", "3", "--seeds", "0", "1", "--epochs", "3", "--batch-size", "4", "--eval-batch-size", "4",
            "--lr", "0.01", "--patch-size", "3", "--device", "cpu", "--no-progress"]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(args + ["--out", str(one)]) == 0
    r, secs = _torchrun(["-m", "rs_prompt_lab.cli", *args, "--out", str(two)], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"torchrun, 2 processes: {secs:.1f}s")
    assert r.stdout.count("runs: ") == 1 and r.stdout.count("OA  ") == 1, r.stdout   # rank 0 alone prints
    # the same files, none twice, no temporary or lock files left by rank 1, every JSON readable
    assert _files(one) == _files(two)
    assert not [f for f in _files(two) if Path(f).name.startswith(".")]
    for p in two.rglob("*.json"): json.loads(p.read_text())
    cfg_dir = next((two / "pixel" / "tiny2d").iterdir())
    for seed in (0, 1):
        a, b = (load_json(d / "pixel" / "tiny2d" / cfg_dir.name / f"seed{seed}" / "metrics.json") for d in (one, two))
        for k in ("oa", "aa", "kappa", "per_class", "best_val_oa", "best_epoch", "epochs_done"): assert a[k] == b[k], k
        ta, tb = (load_json(d / "pixel" / "tiny2d" / cfg_dir.name / f"seed{seed}" / "train" / "metrics.json") for d in (one, two))
        for ra, rb in zip(ta["history"], tb["history"], strict=True):
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=RTOL)
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=RTOL)
            assert rb["val_oa"] == ra["val_oa"] and rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)
        assert load_json(cfg_dir / f"seed{seed}" / "train" / "config.json")["processes"] == 2
        assert "processes" not in load_json(one / "pixel" / "tiny2d" / cfg_dir.name / f"seed{seed}" / "train" / "config.json")
    sa, sb = (load_json(d / "pixel" / "tiny2d" / cfg_dir.name / "summary.json") for d in (one, two))
    assert sa["metrics"] == sb["metrics"] and sb["seeds"] == [0, 1]


def test_torchrun_trainer_matches_one_process(tmp_path):
    "The Trainer's generic path (shuffled DataLoader, a one-row last batch, an unused parameter, resume) under 2 gloo processes."
    sys.path.insert(0, str(HERE))
    from ddp_worker import toy_run
    a = toy_run(tmp_path / "one")
    r, secs = _torchrun([str(HERE / "ddp_worker.py"), str(tmp_path / "two")], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    print(f"torchrun, 2 processes: {secs:.1f}s")
    assert "take no part in the loss (spare): find_unused_parameters=True" in r.stderr   # the probe found the unused parameter
    b = json.loads((tmp_path / "two" / "result.json").read_text())
    for ha, hb in ((a["history"], b["history"]), (a["history"], b["resumed_history"])):
        for ra, rb in zip(ha, hb, strict=True):
            assert rb["train_loss"] == pytest.approx(ra["train_loss"], rel=RTOL)
            assert rb["val_loss"] == pytest.approx(ra["val_loss"], rel=RTOL) and rb["val_oa"] == ra["val_oa"]
    for w in ("weight", "resumed_weight"): np.testing.assert_allclose(b[w], a["weight"], rtol=RTOL, atol=1e-7)
    assert a["best_epoch"] == b["best_epoch"]
    assert _files(tmp_path / "one" / "straight") == _files(tmp_path / "two" / "straight")
    assert load_json(tmp_path / "two" / "straight" / "config.json")["processes"] == 2
