"""The embedded synthetic world (issue 3): determinism, ranges, bad parameters, manifests, CLI, realism on real data."""
import json
import numpy as np
import pytest
from rs_prompt_lab.core import ConfigError
from rs_prompt_lab.synth.spectra import get_sensor, SENSORS, S2_BANDS, spectral_library, water_reflectance, LIB_GRID
from rs_prompt_lab.synth.scene import make_scene, PRESETS, sample_pixels, transfer_accuracy
from rs_prompt_lab.synth.images import make_scene_images, make_paired_images, SCENE_CLASSES, DOMAINS

SMALL = {"houston-like": (64, 96), "trento-like": (64, 96), "muufl-like": (96, 96), "augsburg-like": (64, 96)}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_scene_deterministic_and_seed_dependent(preset):
    a, b = make_scene(preset, 3, SMALL[preset]), make_scene(preset, 3, SMALL[preset])
    c = make_scene(preset, 4, SMALL[preset])
    for k in a.modalities:
        assert a.modalities[k].tobytes() == b.modalities[k].tobytes()
        assert a.modalities[k].tobytes() != c.modalities[k].tobytes()
    assert a.labels.tobytes() == b.labels.tobytes() and a.splits["train"].tobytes() == b.splits["train"].tobytes()
    assert list(a.class_names.values()) == list(PRESETS[preset].classes)
    assert all(n > 0 for n in a.class_counts("train").values()) and all(n > 0 for n in a.class_counts("test").values())
    assert not (a.splits["train"] & a.splits["test"]).any()
    assert a.splits["train"].sum() < 0.2 * (a.labels > 0).sum()          # sparse training pixels
    hsi = a.modalities["hsi"]
    assert hsi.min() >= 0 and hsi.max() <= 1
    assert len(a.bands["hsi"].wavelengths) == hsi.shape[2] == get_sensor(PRESETS[preset].sensor).n_bands


def test_houston_names_order_and_bands():
    sc = make_scene("houston-like", 0, (64, 96))
    assert [sc.class_names[i] for i in range(1, 16)] == ["Healthy grass", "Stressed grass", "Synthetic grass", "Trees", "Soil", "Water",
        "Residential", "Commercial", "Road", "Highway", "Railway", "Parking Lot 1", "Parking Lot 2", "Tennis Court", "Running Track"]
    wl = sc.bands["hsi"].wavelengths
    assert len(wl) == 144 and wl[0] == pytest.approx(380) and wl[-1] == pytest.approx(1050)
    assert sc.bands["lidar"].names == ["dsm", "intensity"]


def test_plausible_heights_and_spectra():
    sc = make_scene("houston-like", 2, (128, 256))
    dsm, lab, hsi = sc.modalities["lidar"][..., 0], sc.labels, sc.modalities["hsi"]
    g = np.median(dsm[lab == 1])
    res, com, tre = (np.median(dsm[lab == k]) - g for k in (7, 8, 4))
    assert 3 < res < 12 and 5 < com < 32 and 4 < tre < 25
    assert np.percentile(dsm[lab == 8] - g, 95) < 35
    wl = np.array(sc.bands["hsi"].wavelengths); nir, red = np.argmin(abs(wl - 850)), np.argmin(abs(wl - 670))
    grass, water = hsi[lab == 1].mean(0), hsi[lab == 6].mean(0)
    assert grass[nir] > 2.5 * grass[red] and water[nir] < 0.05 and water.max() < 0.2


def test_sar_modality():
    sc = make_scene("augsburg-like", 0, (64, 96))
    sar = sc.modalities["sar"]
    assert sc.bands["sar"].names == ["VV", "VH"] and sc.bands["sar"].units == "dB"
    assert sar[..., 0].mean() > sar[..., 1].mean()
    assert np.median(sar[sc.labels == 7, 0]) < np.median(sar[sc.labels == 2, 0])   # water darker than residential
    assert sar[sc.labels == 4, 0].std() > 1.5                                       # speckle


def test_sensors():
    counts = {"casi-144": 144, "aisa-eagle-63": 63, "casi-72": 72, "muufl-64": 64, "rosis-103": 103, "aviris-224": 224,
              "sentinel2-msi": 13, "landsat8-oli": 8, "rgb": 3}
    for k, n in counts.items(): assert get_sensor(k).n_bands == n
    s2 = get_sensor("sentinel2-msi")
    assert s2.band_names == tuple(S2_BANDS) and s2.centers[1] == pytest.approx(492.4) and s2.centers[12] == pytest.approx(2202.4)
    m = get_sensor("muufl-64")
    assert m.centers[0] == pytest.approx(405.8, abs=0.1) and m.centers[-1] == pytest.approx(1005.3, abs=0.1)
    lib = spectral_library()
    assert len(lib) == 7261 and lib.reflectance.min() >= 0 and lib.reflectance.max() <= 1
    w = water_reflectance(LIB_GRID)
    assert w.max() < 0.1 and w[np.argmin(abs(LIB_GRID - 900))] < 0.02


def test_bad_parameters():
    with pytest.raises(ConfigError, match="Allowed: houston-like, trento-like, muufl-like, augsburg-like"): make_scene("paris-like")
    with pytest.raises(ConfigError, match="Allowed: casi-144"): make_scene("houston-like", sensor="worldview")
    with pytest.raises(ConfigError, match="at least 64x96"): make_scene("houston-like", size=(30, 30))
    with pytest.raises(ConfigError, match="n_per_class must be an integer >= 1"): make_scene_images(n_per_class=0)
    with pytest.raises(ConfigError, match="Allowed: aerial-rgb"): make_scene_images(domain="mars")
    with pytest.raises(ConfigError, match="Allowed: default"): make_scene_images(preset="ucm")


def test_scene_images_and_domains():
    assert len(SCENE_CLASSES) >= 20 and len(DOMAINS) >= 2
    ds = make_scene_images(n_per_class=3, size=32, seed=0)
    assert len(ds) == 3 * len(SCENE_CLASSES) and ds.class_names == SCENE_CLASSES
    assert all(len(c) == 5 and len(set(c)) == 5 for c in ds.captions)
    assert set(ds.splits) == {"train", "val", "test"}
    assert sorted(np.concatenate(list(ds.splits.values())).tolist()) == list(range(len(ds)))
    x = ds.image(0); assert x.shape == (32, 32, 3) and x.dtype == np.uint8
    again = make_scene_images(n_per_class=3, size=32, seed=0)
    assert all(ds.image(i).tobytes() == again.image(i).tobytes() for i in range(0, len(ds), 7)) and ds.captions == again.captions
    other = make_scene_images(n_per_class=3, size=32, seed=1)
    assert ds.image(5).tobytes() != other.image(5).tobytes()
    sen = make_scene_images(n_per_class=3, size=32, seed=0, domain="sentinel-like")
    d = np.mean([np.abs(ds.image(i).astype(float) - sen.image(i).astype(float)).mean() for i in range(0, len(ds), 5)])
    assert d > 10   # the domains really differ
    allm = make_scene_images(n_per_class=1, size=32, modality="all", classes=["lake", "storage tanks"])
    assert allm["s2"].image(1).shape == (32, 32, 13) and allm["sar"].image(1).shape == (32, 32, 2)
    assert allm["rgb"].captions == allm["s2"].captions
    pairs = make_paired_images(n_per_class=1, size=32, classes=["harbor"])
    assert pairs[0]["rgb"].shape == (32, 32, 3) and pairs[0]["s2"].shape == (32, 32, 13)


def test_captions_follow_layout():
    ds = make_scene_images(n_per_class=2, size=64, seed=0, classes=["storage tanks", "tennis court", "river"])
    for i in range(len(ds)):
        name = ds.class_names[ds.labels[i]]
        key = {"storage tanks": "storage tank", "tennis court": "tennis court", "river": "water"}[name]
        assert any(key in c for c in ds.captions[i]), ds.captions[i]


def test_manifests_load(repo_root):
    from rs_prompt_lab.data.manifest import load_dataset
    for n in ["houston-like", "trento-like", "muufl-like", "augsburg-like"]:
        assert (repo_root / "data_manifests" / f"synthetic-{n}.yaml").exists()
    sc = load_dataset("synthetic-trento-like", size=[48, 96])
    assert sc.shape == (48, 96) and sc.n_classes == 6
    ds = load_dataset("synthetic-scenes", n_per_class=1, size=32)
    assert len(ds) == len(SCENE_CLASSES)


def test_cli(tmp_path):
    from rs_prompt_lab.cli import main
    from rs_prompt_lab.data.scene import Scene
    assert main(["synth", "scene", "muufl-like", "--seed", "2", "--size", "96x96", "--out", str(tmp_path / "m.npz")]) == 0
    assert Scene.load(tmp_path / "m.npz").modalities["hsi"].shape == (96, 96, 64)
    assert main(["synth", "images", "default", "--n-per-class", "1", "--size", "32", "--out", str(tmp_path / "im"), "--sar", "npy"]) == 0
    cj = json.loads((tmp_path / "im" / "captions.json").read_text())
    e = cj["images"][0]
    assert len(cj["images"]) == len(SCENE_CLASSES) and len(e["sentences"]) == 5 and e["split"] in ("train", "val", "test")
    assert (tmp_path / "im" / e["filename"]).exists() and np.load(tmp_path / "im" / e["sar"]).shape == (32, 32, 2)
    assert main(["synth", "scene", "houston-like", "--size", "8x8", "--out", str(tmp_path / "bad.npz")]) == 2
    assert not (tmp_path / "bad.npz").exists()


@pytest.mark.realdata
def test_realism_against_real_houston(shared_data):
    """Classifier trained on synthetic houston-like CASI-144 spectra, tested on the real Houston2013 training pixels.

    The real spectra are band-wise min-max normalised radiance; both domains are z-scored per band within
    themselves (removes any per-band gain/offset), see `transfer_accuracy`."""
    import scipy.io as sio
    f = shared_data / "houston2013" / "mdl_rs_pixel_sets"
    Xr = sio.loadmat(f / "HSI_TrSet.mat")["HSI_TrSet"]; yr = sio.loadmat(f / "TrLabel.mat")["TrLabel"].ravel().astype(int)
    assert Xr.shape == (2832, 144)
    sc = make_scene("houston-like", 0, (349, 640))
    Xs, ys = sample_pixels(sc, 300)
    r = transfer_accuracy(Xs, ys, Xr, yr)
    print(f"synthetic -> real Houston2013: accuracy {r['accuracy']:.3f}, chance {r['chance']:.3f}")
    assert r["n_classes"] == 15
    assert r["accuracy"] > r["chance"] + 0.1 and r["accuracy"] > 2 * r["majority"]


def test_captions_do_not_depend_on_the_hash_seed():
    "Same seed, same captions, whatever PYTHONHASHSEED a process draws (ties between colours/materials are broken by order)."
    import subprocess, sys, os
    code = ("from rs_prompt_lab.synth.images import make_scene_images; import hashlib, json; "
            "ds = make_scene_images(n_per_class=2, size=32, seed=0); "
            "print(hashlib.sha256(json.dumps([ds.captions[i] for i in range(len(ds))]).encode()).hexdigest())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env=dict(os.environ, PYTHONHASHSEED=h, HF_HUB_OFFLINE="1")).stdout.strip() for h in ("1", "2", "3")}
    assert len(outs) == 1, outs


def test_scene_bytes_do_not_depend_on_thread_count():
    "A seed gives the same scene under any OMP_NUM_THREADS (a multi-threaded BLAS sums in another order; runs were refused across machines)."
    import hashlib, os, subprocess, sys
    code = ("from rs_prompt_lab.synth.scene import make_scene; import hashlib; s = make_scene('houston-like', 0, size=(64, 96)); "
            "print(hashlib.sha256(b''.join(v.tobytes() for _, v in sorted(s.modalities.items()))).hexdigest())")
    out = {t: subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env=dict(os.environ, OMP_NUM_THREADS=str(t), OPENBLAS_NUM_THREADS=str(t))).stdout.strip() for t in (1, 2)}
    assert out[1] == out[2] and len(out[1]) == 64, out
