"""The modality-alignment protocol (rs_prompt_lab.align.protocol): `rs-lab train paint|align` end to end on the embedded
corpus, the table through `rs-lab results`, exact resume of an interrupted fine-tune, the real BigEarthNet-MM pairs
through the protocol's data path, the papermill experiment notebook, and one clear line per bad input."""
import json
import numpy as np
import pytest
import torch

from rs_prompt_lab.align.protocol import (AlignExpCfg, PairItems, alignment_table, head_score, load_pairs, pair_collate, paint_cfg,
                                          run_align_experiment, splits_of, tower_embed, pair_loader, alpha_key)
from rs_prompt_lab.align.student import PairCollate
from rs_prompt_lab.cli import main
from rs_prompt_lab.core import DataError, load_json

pytestmark = pytest.mark.usefixtures("one_thread")
SMALL = {"n_per_class": 5}


def _cfg(tmp_path, **kw):
    base = dict(dataset_params=SMALL, supported="synthetic-scenes:domain=aerial-rgb,n_per_class=5", seeds=[0], quick=True,
                out_dir=tmp_path / "runs", progress=False, device="cpu")
    return AlignExpCfg.from_flat(**{**base, **kw})


# (a) the CLI, both stages, and the table ---------------------------------------------------------------------------------

def test_train_paint_then_align_from_the_cli(tmp_path, capsys):
    common = ["--param", "n_per_class=5", "--supported", "synthetic-scenes:domain=aerial-rgb,n_per_class=5", "--seeds", "0",
              "--quick", "--device", "cpu", "--out", str(tmp_path / "runs"), "--no-progress"]
    assert main(["train", "paint", *common]) == 0
    out = capsys.readouterr().out
    assert "alpha chosen on validation" in out and "rs-lab results" in out
    assert main(["train", "align", "--student", "sar", *common]) == 0
    assert "sar" in capsys.readouterr().out
    assert main(["results", str(tmp_path / "runs")]) == 0
    table = capsys.readouterr().out
    assert "| CLIP (zero-shot) |" in table and "| patched α=0.5 |" in table and "sar student" in table
    c = _cfg(tmp_path, method="align", student="sar")
    m = load_json(c.run_dir(0) / "metrics.json")
    assert m["student"] == "sar" and 0 <= m["target"] <= 1 and 0 <= m["rgb_to_new_R@1"] <= 1
    assert 0 <= m["clip_new_target"] <= 1 and 0 <= m["clip_rgb_to_new_R@1"] <= 1          # the baseline on its own composite
    assert "| CLIP on the sar composite |" in table
    assert load_json(c.run_dir(0) / "config.json")["in_chans"] == 2          # VV/VH
    assert (paint_cfg(c).run_dir(0) / "theta_ft.pt").is_file()


@pytest.mark.parametrize("args, msg", [
    (["paint", "--alphas", "0", "1.5"], "alpha=1.5 is outside [0, 1]"),
    (["align", "--teacher-alpha", "2"], "outside [0, 1]"),
    (["align", "--student-init", "/nowhere/ssl4eo.pth"], "SSL4EO-S12"),
    (["align", "--student", "s1"], "use --student sar"),
    (["align", "--student", "lidar"], "student modality"),
])
def test_bad_input_is_one_line(tmp_path, capsys, args, msg):
    rc = main(["train", *args, "--param", "n_per_class=5", "--quick", "--device", "cpu", "--out", str(tmp_path / "runs"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and msg in err and "Traceback" not in err, err
    assert not (tmp_path / "runs" / "align").exists() or "s1" in args   # refused before any folder is written (s1: at load time, none either)


def test_supported_task_has_its_own_folder():
    from rs_prompt_lab.align.protocol import load_data
    with pytest.raises(DataError, match="/nowhere/patternnet/images"):   # 'NAME:root=DIR', not the paired dataset's root
        load_data(AlignExpCfg.from_flat(supported="patternnet:root=/nowhere/patternnet", quick=True))


# (b) an interrupted fine-tune resumes to the uninterrupted result -------------------------------------------------------

def test_interrupted_paint_resumes_exactly(tmp_path, interrupt_once):
    kw = dict(quick=False, paint_steps=6, paint_batch_size=16, alphas=[0.0, 1.0])
    run_align_experiment(_cfg(tmp_path / "a", **kw))
    cb = _cfg(tmp_path / "b", **kw)
    interrupt_once(lambda: run_align_experiment(cb))
    assert (cb.run_dir(0) / "train" / "last.pt").exists() and not (cb.run_dir(0) / "metrics.json").exists()
    run_align_experiment(cb)
    ma, mb = load_json(_cfg(tmp_path / "a", **kw).run_dir(0) / "metrics.json"), load_json(cb.run_dir(0) / "metrics.json")
    assert ma["training"]["epochs"] == mb["training"]["epochs"] == 2
    for k in (alpha_key(1.0, "target"), alpha_key(1.0, "supported"), alpha_key(1.0, "rgb_to_new_R@1")):
        assert ma[k] == pytest.approx(mb[k], abs=1e-6), k


def test_changed_settings_never_reuse_a_folder(tmp_path):
    c = _cfg(tmp_path)
    run_align_experiment(c)
    other = c.replace(paint_lr=1e-4)
    assert other.cfg_dir != c.cfg_dir
    with pytest.raises(Exception, match="different settings"):
        run_align_experiment(c.replace(name=c.cfg_name, paint_lr=1e-4))


# (c) real BigEarthNet-MM pairs through the protocol's data path --------------------------------------------------------

@pytest.mark.realdata
def test_bigearthnet_pairs_through_the_protocol(shared_data):
    from rs_prompt_lab.backbones import load_backbone
    from rs_prompt_lab.zeroshot import ZeroShotHead
    cfg = AlignExpCfg.from_flat(dataset="bigearthnet-mm", root=str(shared_data / "bigearthnet_mm"), student="s1", quick=True)
    ds = load_pairs(cfg)
    assert len(ds.class_names) == 19 and ds.class_names[0] == "Urban fabric" and ds.labels.shape == (len(ds), 19)
    assert ds.labels.sum(1).min() >= 1                                         # every real patch keeps a 19-class label
    assert len(load_pairs(cfg.replace(bigearthnet_classes=43)).class_names) < 43  # the CLC names found in the patches
    with pytest.raises(DataError, match="no 'val' split"): splits_of(ds)       # the fragment has none: refused, not guessed
    col = pair_collate(ds, "s1")
    items = PairItems(ds, range(len(ds)), col)
    assert items[0]["s1"].shape == (2, 120, 120) and items[0]["rgb"].shape == (3, 120, 120)
    assert pair_collate(ds, "s2")([ds[0]])["s2"].shape == (1, 13, 120, 120)
    ref = PairCollate.bigearthnet("s2")([ds[0], ds[1]])                       # the paper's BigEarthNet transforms, exactly
    got = pair_collate(ds, "s2")([ds[0], ds[1]])
    assert torch.equal(ref["s2"], got["s2"]) and torch.equal(ref["rgb"], got["rgb"])
    import dataclasses
    l1c = dataclasses.replace(ds, bands={**ds.bands, "s2": dataclasses.replace(ds.bands["s2"], sensor="Sentinel-2 L1C")})
    assert pair_collate(l1c, "s2").level == "L1C"                               # SEN12MS-style L1C: its own composite scaling
    nolevel = dataclasses.replace(ds, bands={**ds.bands, "s2": dataclasses.replace(ds.bands["s2"], sensor="Sentinel-2")})
    with pytest.raises(Exception, match="names no processing level"): pair_collate(nolevel, "s2")
    clip = load_backbone("rs-tiny")[0]
    e, y = tower_embed(clip, pair_loader(items, 4), "rgb")
    assert e.shape == (len(ds), clip.embed_dim) and y.shape == (len(ds), len(ds.class_names))
    assert 0 < head_score(ZeroShotHead(clip, ds.class_names), e, y) <= 1
    with pytest.raises(Exception, match="modalities s1, s2, not 'sar'"): load_pairs(cfg.replace(student="sar"))


# (d) the papermill experiment notebook -----------------------------------------------------------------------------------

@pytest.mark.experiment
def test_alignment_experiment_notebook_runs(tmp_path, repo_root, monkeypatch):
    import papermill as pm
    for v in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):   # hermetic: nothing under $HOME
        (tmp_path / "home" / v.lower()).mkdir(parents=True)
        monkeypatch.setenv(v, str(tmp_path / "home" / v.lower()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "runs"
    nb = pm.execute_notebook(str(repo_root / "nbs/experiments/03_alignment.ipynb"), str(tmp_path / "out.ipynb"),
                             parameters=dict(DATASET_PARAMS=SMALL, SUPPORTED="synthetic-scenes:domain=aerial-rgb,n_per_class=5",
                                             STUDENTS=["s2"], SEEDS=[0], DEVICE="cpu", OUT_DIR=str(out), QUICK=True,
                                             PAINT_STEPS=3, ALIGN_STEPS=3),   # stage-2 settings on the paint run: stage 1 still reused
                             kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    m = load_json(next((out / "03_align").iterdir()) / "metrics.json")
    assert m["quick"] is True and 0 <= m["align-s2"]["target"] <= 1 and 0 <= m["paint"][alpha_key(0.5, "supported")] <= 1


def test_composite_follows_the_processing_level():
    from rs_prompt_lab.align.protocol import composite
    from rs_prompt_lab.align.student import s2_rgb_composite
    x = torch.rand(2, 13, 8, 8) * 0.3                                            # reflectance, as the student reads it
    assert torch.equal(composite(x, "s2", "L1C"), s2_rgb_composite(x * 10000.0, "L1C"))
    assert not torch.equal(composite(x, "s2", "L1C"), composite(x, "s2", "L2A"))   # L1C: DN / 3558, L2A: DN / 2000
    assert composite(torch.rand(2, 2, 8, 8), "sar").shape == (2, 3, 8, 8)
