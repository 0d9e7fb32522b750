"""The pixel-classification experiment runner: run folders, resume, summaries, SVM/RF on real Houston2013 pixels,
the papermill experiment notebook and the `rs-lab train` / `rs-lab classmap` commands."""
import importlib.util, os, sys
from pathlib import Path
import numpy as np
import pytest
import torch
from torch import nn

from rs_prompt_lab.core import ConfigError, DataError, load_json
from rs_prompt_lab.data.scene import Scene
from rs_prompt_lab.experiment import PixelExpCfg, run_pixel_experiment, classmap_from_run, load_split_rc, load_normalizers
from rs_prompt_lab.methods import MethodEntry, register_method

HERE = Path(__file__).resolve().parent


class StandIn(nn.Module):
    "A tiny method with the create_method interface: a linear layer on the centre pixel of every modality."
    def __init__(self, class_names, bands):
        super().__init__()
        self.mods = list(bands)
        self.fc = nn.Linear(sum(bands.values()), len(class_names))

    def forward(self, batch):
        p = batch[self.mods[0]].shape[-1]
        return self.fc(torch.cat([batch[m][:, :, p // 2, p // 2] for m in self.mods], 1))  # (B, K)

    def loss(self, logits, batch):
        return nn.functional.cross_entropy(logits, batch["label"])


def standin_method(backbone, spec, cfg):
    "A registry factory: factory(backbone, spec, cfg)."
    return StandIn(spec.class_names, spec.bands)


DEEP = "cfipt"


def two_d_scene(H=10, W=12, seed=0):
    "3 classes separable by their mean spectrum, HSI (6 bands) + LiDAR (1), official train (left) / test (right) maps."
    rng = np.random.default_rng(seed)
    lab = rng.integers(1, 4, (H, W)); lab[0, :2] = 0
    hsi = lab[..., None] * np.linspace(0.5, 1.5, 6) + rng.normal(0, 0.3, (H, W, 6))
    lidar = (lab == 2)[..., None] * 2.0 + rng.normal(0, 0.5, (H, W, 1))
    tr = np.zeros((H, W), bool); tr[:, : W // 2] = True
    return Scene({"hsi": hsi, "lidar": lidar}, lab, {1: "grass", 2: "road", 3: "water"},
                 splits={"train": tr & (lab > 0), "test": ~tr & (lab > 0)}, name="tiny2d")


@pytest.fixture(scope="module")
def scene_npz(tmp_path_factory):
    d = tmp_path_factory.mktemp("scenes")
    two_d_scene().save(d / "tiny2d.npz")          # 10 x 12: about 20 training-pool pixels per class
    lab = np.tile([1, 2, 3], 20)[None]
    Scene({"hsi": lab[..., None] + np.random.default_rng(1).normal(0, .3, (1, 60, 4))}, lab, {1: "a", 2: "b", 3: "c"},
          name="pix").save(d / "pixset.npz")
    return d


# (a) runner: files, metrics, summary from the per-seed files, resume ------------------------------------------------

def test_run_two_seeds_files_summary_and_resume(tmp_path):
    register_method(MethodEntry("standin", ("pixel",), standin_method), overwrite=True)
    scene = two_d_scene()
    cfg = PixelExpCfg.from_flat(dataset="tiny2d", method="standin", backbone="random:rs-tiny", shots=8, val_per_class=4, seeds=[0, 1],
                      patch_size=3, epochs=3, lr=0.05, batch_size=8, out_dir=tmp_path, quick=True, progress=False)
    s = run_pixel_experiment(cfg, scene)
    ms = []
    for seed in (0, 1):
        rd = tmp_path / "pixel" / "tiny2d" / "standin-random_rs-tiny-k8-p3-quick" / f"seed{seed}"
        assert rd == cfg.run_dir(seed)
        for f in ("config.json", "split.json", "normalizers.json", "metrics.json", "train/best.pt", "train/last.pt"):
            assert (rd / f).exists(), f
        m = load_json(rd / "metrics.json"); ms.append(m)
        c = load_json(rd / "config.json")
        assert c["seed"] == seed and c["split"]["hash"] == m["split_hash"] and c["provenance"]["packages"]["torch"]
        sp = load_split_rc(rd)
        assert len(sp["train"]) == 3 * 8 and len(sp["val"]) == 3 * 4
        assert scene.splits["train"][sp["val"][:, 0], sp["val"][:, 1]].all()       # validation from the training pool
        assert scene.splits["test"][sp["test"][:, 0], sp["test"][:, 1]].all()       # test = the official test map
        for k in ("oa", "aa", "kappa"): assert -1 <= m[k] <= 1
        assert 0 <= m["oa"] <= 1 and m["n"] == len(sp["test"])
        conf = np.array(m["confusion"])
        assert conf.sum() == m["n"] and np.isclose(np.trace(conf) / conf.sum(), m["oa"])
        # normaliser fitted on the training pixels only: z-scores of the training pixels have mean 0
        nz = load_normalizers(rd / "normalizers.json")["hsi"].transform(scene.modalities["hsi"][sp["train"][:, 0], sp["train"][:, 1]])
        assert np.allclose(nz.mean(0), 0, atol=1e-4)
    assert ms[0]["split_hash"] != ms[1]["split_hash"]
    oas = np.array([m["oa"] for m in ms])
    assert np.isclose(s["metrics"]["oa"]["mean"], oas.mean()) and np.isclose(s["metrics"]["oa"]["std"], oas.std(ddof=1))
    assert load_json(cfg.cfg_dir / "summary.json")["metrics"]["kappa"]["values"] == [m["kappa"] for m in ms]
    assert "OA" in s["table"] and "water" in s["table"]
    # a second run skips finished seeds
    mt = [(cfg.run_dir(k) / "metrics.json").stat().st_mtime_ns for k in (0, 1)]
    run_pixel_experiment(cfg, scene)
    assert mt == [(cfg.run_dir(k) / "metrics.json").stat().st_mtime_ns for k in (0, 1)]
    # an unfinished seed (no metrics.json) resumes from train/last.pt and gives the same result
    (cfg.run_dir(1) / "metrics.json").unlink()
    run_pixel_experiment(cfg, scene)
    assert load_json(cfg.run_dir(1) / "metrics.json")["oa"] == ms[1]["oa"]
    # the same folder with another setting is refused
    with pytest.raises(ConfigError, match="different settings"):
        run_pixel_experiment(cfg.replace(lr=0.01), scene)


def test_bad_configs_are_refused(tmp_path):
    scene = two_d_scene()
    with pytest.raises(ConfigError, match="patch_size must be odd"):
        run_pixel_experiment(PixelExpCfg.from_flat(method="svm", patch_size=4, out_dir=tmp_path), scene)
    with pytest.raises(ConfigError, match="too large"):
        run_pixel_experiment(PixelExpCfg.from_flat(method="svm", patch_size=41, out_dir=tmp_path), scene)
    with pytest.raises(ConfigError, match="fewer than k=40"):
        run_pixel_experiment(PixelExpCfg.from_flat(method="svm", shots=40, patch_size=1, out_dir=tmp_path), scene)
    with pytest.raises(ConfigError, match="cannot import"):
        run_pixel_experiment(PixelExpCfg.from_flat(method="no_such_mod:f", shots=4, patch_size=1, out_dir=tmp_path, progress=False), scene)


# (b) SVM / RF on the real Houston2013 pixels -------------------------------------------------------------------------

@pytest.mark.realdata
@pytest.mark.parametrize("method", ["svm", "rf"])
def test_classical_on_real_houston_pixels(shared_data, tmp_path, method):
    cfg = PixelExpCfg.from_flat(dataset="houston2013-pixelset", root=str(shared_data / "houston2013"), method=method, shots=40,
                      val_per_class=10, seeds=[0], patch_size=1, out_dir=tmp_path, progress=False,
                      method_kw={"trees": 100, "max_features": ["sqrt"]} if method == "rf" else {})
    s = run_pixel_experiment(cfg)
    m = load_json(cfg.run_dir(0) / "metrics.json")
    assert m["n"] == 2832 - 15 * (40 + 10)                 # tested on the rest of the 2,832 real pixels
    assert m["n_features"] == 144 + 21                     # centre-pixel spectra + LiDAR features
    assert m["selection"]["selected_on"] == "validation"
    assert m["oa"] > 5 / 15, m["oa"]                        # well above chance (1/15)
    assert s["n_seeds"] == 1 and s["metrics"]["oa"]["mean"] == m["oa"]
    sp = load_split_rc(cfg.run_dir(0))
    keys = [set(map(tuple, sp[p].tolist())) for p in ("train", "val", "test")]
    assert not (keys[0] & keys[1] or keys[0] & keys[2] or keys[1] & keys[2])


# (c) the papermill experiment notebook --------------------------------------------------------------------------------

@pytest.mark.experiment
def test_experiment_notebook_runs(tmp_path, scene_npz, repo_root, monkeypatch):
    import papermill as pm
    for v in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):   # hermetic: nothing under $HOME
        (tmp_path / "home" / v.lower()).mkdir(parents=True)
        monkeypatch.setenv(v, str(tmp_path / "home" / v.lower()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "runs"
    nb = pm.execute_notebook(str(repo_root / "nbs/experiments/01_cfipt_pixel.ipynb"), str(tmp_path / "out.ipynb"),
                             parameters=dict(DATASET=str(scene_npz / "tiny2d.npz"), BACKBONE="random:rs-tiny", METHOD=DEEP, SHOTS=6,
                                             VAL_PER_CLASS=3, SEEDS=[0], EPOCHS=1, PATCH_SIZE=3, DEVICE="cpu", OUT_DIR=str(out), QUICK=True, CLASS_MAP=True),
                             kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    cfg_dir = next((out / "01_cfipt_pixel" / "tiny2d").iterdir())
    m = load_json(cfg_dir / "metrics.json")
    assert 0 <= m["oa"] <= 1 and m["seeds"] == [0] and m["quick"] is True
    assert (cfg_dir / "seed0" / "metrics.json").exists() and (cfg_dir / "summary.json").exists()
    assert (cfg_dir / "seed0" / "classmap.png").read_bytes()[:4] == b"\x89PNG"


# (d) rs-lab train / rs-lab classmap ------------------------------------------------------------------------------------

def test_cli_train_and_classmap(tmp_path, scene_npz, capsys):
    from rs_prompt_lab.cli import main
    out = tmp_path / "runs"
    rc = main(["train", DEEP, "--data", str(scene_npz / "tiny2d.npz"), "--backbone", "random:rs-tiny", "--shots", "6",
               "--val-per-class", "3", "--seed", "0", "--epochs", "1", "--patch-size", "3", "--out", str(out), "--quick",
               "--device", "cpu", "--no-progress"])
    o = capsys.readouterr()
    assert rc == 0, o.err
    cfg_dir = next((out / "pixel" / "tiny2d").iterdir())
    assert str(cfg_dir) in o.out and "OA" in o.out
    rd = cfg_dir / "seed0"
    for f in ("config.json", "metrics.json", "normalizers.json", "train/best.pt"): assert (rd / f).exists(), f
    png = tmp_path / "map.png"
    assert main(["classmap", str(rd), "--out", str(png), "--device", "cpu", "--no-progress"]) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"
    pred = np.load(tmp_path / "map.npy")
    assert pred.shape == (10, 12) and set(np.unique(pred)) <= {1, 2, 3}
    # the map agrees with the run's own test metrics (same model, same normalisation, same pixels)
    sp, lab = load_split_rc(rd)["test"], two_d_scene().labels
    assert np.isclose((pred[sp[:, 0], sp[:, 1]] == lab[sp[:, 0], sp[:, 1]]).mean(), load_json(rd / "metrics.json")["oa"])


def test_cli_errors(tmp_path, scene_npz, capsys):
    from rs_prompt_lab.cli import main
    out = tmp_path / "runs"
    assert main(["train", "svm", "--data", str(scene_npz / "pixset.npz"), "--shots", "5", "--patch-size", "1", "--out", str(out),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["classmap", str(out / "pixel" / "pixset" / "svm-k5" / "seed0")]) == 2
    err = capsys.readouterr().err
    assert "is a pixel set" in err and "no class map" in err and len(err.strip().splitlines()) == 1
    assert main(["classmap", str(tmp_path / "nowhere")]) == 2
    assert "not a run folder" in capsys.readouterr().err
    assert main(["train", "svm", "--data", str(scene_npz / "pixset.npz"), "--patch-size", "3", "--out", str(out)]) == 2
    assert "use patch_size=1" in capsys.readouterr().err
    assert main(["train", "svm", "--data", "no-such-dataset", "--out", str(out)]) == 2


def test_cocoop_through_the_registry(tmp_path):
    "CoCoOp (new this wave) trains on the pixel task through the registry and the runner, with its PCA input fitted."
    cfg = PixelExpCfg.from_flat(dataset="tiny2d", method="cocoop", backbone="random:rs-tiny", shots=6, val_per_class=3, seeds=[0],
                      patch_size=3, epochs=2, batch_size=6, out_dir=tmp_path, quick=True, progress=False, method_kw={"n_ctx": 2})
    s = run_pixel_experiment(cfg, two_d_scene())
    m = load_json(cfg.run_dir(0) / "metrics.json")
    assert m["trainable_params"] > 0 and m["epochs_done"] == 1 and 0 <= m["oa"] <= 1
    assert s["method"] == "cocoop" and "n_ctx" in load_json(cfg.run_dir(0) / "config.json")["cfg"]["method"]["kw"]
    with pytest.raises(ConfigError, match="has no option 'n_cxt'"):
        run_pixel_experiment(cfg.replace(method_kw={"n_cxt": 2}), two_d_scene())
