"""Manifest schema, user YAMLs through every reader, generator datasets, checksum cache, downloads and the CLI."""
import json, os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest, yaml, h5py, tifffile, scipy.io as sio

import rs_prompt_lab.data.manifest as M
from rs_prompt_lab.data.manifest import (load_dataset, get_manifest, list_datasets, verify_dataset, demo_summary,
                                         load_label_maps, read_manifest, parse_manifest)
from rs_prompt_lab.core import DataError, ConfigError, sha256sum
from rs_prompt_lab.data.scene import Scene
from rs_prompt_lab.data.datasets import ImageTextDataset, PairedModalityDataset

RS_LAB = str(Path(sys.executable).parent / "rs-lab")
REQUIRED = ["houston2013", "houston2013-pixelset", "trento", "muufl", "augsburg", "pavia-university", "indian-pines",
            "patternnet", "rsicd", "resisc45", "mlrsnet", "ucmerced", "eurosat-rgb", "eurosat-ms", "bigearthnet-mm",
            "sen12ms", "rsicd-captions", "ucm-captions", "rsitmd-captions", "sydney-captions"]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RS_LAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def write_yaml(path, d):
    path.write_text(yaml.safe_dump(d, sort_keys=False)); return path


def test_builtins_all_valid_and_complete():
    names = list_datasets()
    assert set(REQUIRED) <= set(names)
    for n in names:
        m = get_manifest(n)
        assert m.name == n and m.task in M.TASKS and (m.files or m.generator)
        for f in m.files.values():
            assert f["sha256"] is None or len(f["sha256"]) == 64


def test_manifests_found_from_any_cwd(tmp_path):
    r = subprocess.run([sys.executable, "-c", "from rs_prompt_lab.data.manifest import list_datasets as l; print(len(l()))"],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0 and int(r.stdout) >= 20


def _pixel_files(d, H=6, W=5):
    rng = np.random.default_rng(1)
    hsi, dsm = rng.random((H, W, 4)).astype(np.float32), rng.random((H, W)).astype(np.float32)
    gt = rng.integers(0, 3, (H, W)).astype(np.uint8)
    d.mkdir(parents=True, exist_ok=True)
    with h5py.File(d / "hsi73.mat", "w") as f: f["cube"] = hsi.T          # MATLAB -v7.3 layout
    sio.savemat(d / "dsm.mat", {"DSM": dsm})
    np.save(d / "sar.npy", rng.random((H, W, 2)))
    np.savez(d / "maps.npz", train=(gt * (np.arange(H)[:, None] < H // 2)).astype(np.uint8))
    tifffile.imwrite(d / "gt.tif", gt)
    return hsi, dsm, gt


def _pixel_yaml(d, **over):
    y = {"name": "mine", "task": "pixel-classification", "classes": {1: "grass", 2: "road"},
         "files": {"hsi": {"path": "hsi73.mat", "variable": "cube", "format": "mat-v73", "shape": [6, 5, 4]},
                   "dsm": {"path": "dsm.mat", "variable": "DSM"}, "sar": "sar.npy",
                   "train": {"path": "maps.npz", "variable": "train"}, "gt": "gt.tif"},
         "modalities": {"hsi": {"file": "hsi", "bands": 4, "wavelength_nm": [400, 700]},
                        "lidar": {"file": "dsm", "bands": ["dsm"], "units": "m"},
                        "sar": {"file": "sar", "bands": 2, "optional": True}},
         "labels": "gt", "splits": {"train": "train"}}
    y.update(over)
    return write_yaml(d / "mine.yaml", y)


def test_user_yaml_every_raster_format(tmp_path):
    hsi, dsm, gt = _pixel_files(tmp_path / "data")
    y = _pixel_yaml(tmp_path)
    s = load_dataset(y, tmp_path / "data")
    assert isinstance(s, Scene) and set(s.modalities) == {"hsi", "lidar", "sar"}
    np.testing.assert_array_equal(s.modalities["hsi"], hsi)       # v7.3 transposed back to MATLAB order
    np.testing.assert_array_equal(s.modalities["lidar"][..., 0], dsm)
    np.testing.assert_array_equal(s.labels, gt)
    np.testing.assert_array_equal(s.splits["train"], (gt > 0) & (np.arange(6)[:, None] < 3))
    assert s.bands["hsi"].wavelengths == [400.0, 500.0, 600.0, 700.0]
    (tmp_path / "data" / "sar.npy").unlink()                      # optional modality: skipped when absent
    assert set(load_dataset(y, tmp_path / "data").modalities) == {"hsi", "lidar"}
    assert set(load_dataset(y, tmp_path / "data", modalities=["lidar"]).modalities) == {"lidar"}


def test_root_may_be_parent_folder(tmp_path):
    _pixel_files(tmp_path / "mine")
    y = _pixel_yaml(tmp_path)
    assert load_dataset(y, tmp_path).shape == (6, 5)              # root/<name> is found


def test_generator_mechanism(tmp_path, monkeypatch):
    (tmp_path / "my_gen.py").write_text(
        "import numpy as np\nfrom rs_prompt_lab.data.scene import Scene\n"
        "def make(h=3, w=4, seed=0):\n    r = np.random.default_rng(seed)\n"
        "    return Scene({'hsi': r.random((h, w, 2))}, r.integers(0, 3, (h, w)), {1: 'a', 2: 'b'}, name='gen')\n"
        "def bad():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    y = write_yaml(tmp_path / "gen.yaml", {"name": "gen", "task": "pixel-classification",
                                           "generator": {"function": "my_gen:make", "params": {"h": 3, "w": 4, "seed": 1}}})
    a, b = load_dataset(y), load_dataset(y)
    assert a.shape == (3, 4) and np.array_equal(a.modalities["hsi"], b.modalities["hsi"])
    c = load_dataset(y, w=9, seed=2)
    assert c.shape == (3, 9) and not np.array_equal(c.modalities["hsi"][:, :4], a.modalities["hsi"])
    with pytest.raises(ConfigError, match="no parameter 'depth'"): load_dataset(y, depth=3)
    write_yaml(tmp_path / "bad.yaml", {"name": "bad", "task": "pixel-classification", "generator": {"function": "my_gen:bad"}})
    with pytest.raises(DataError, match="returned int"): load_dataset(tmp_path / "bad.yaml")
    write_yaml(tmp_path / "nomod.yaml", {"name": "x", "task": "pixel-classification", "generator": {"function": "no_such_mod:f"}})
    with pytest.raises(DataError, match="cannot import generator"): load_dataset(tmp_path / "nomod.yaml")


def test_checksum_cache_avoids_rehashing(tmp_path, monkeypatch):
    d = tmp_path / "d"; d.mkdir(); (d / "a.bin").write_bytes(b"x" * 100)
    y = write_yaml(tmp_path / "c.yaml", {"name": "c", "task": "captions",
                                         "files": {"a": {"path": "a.bin", "format": "txt", "size": 100, "sha256": sha256sum(d / "a.bin")}},
                                         "captions": {"splits": {"all": {"filenames": "a", "captions": "a"}}}})
    calls = []
    real = M.sha256sum
    monkeypatch.setattr(M, "sha256sum", lambda p, *a: calls.append(p) or real(p))
    assert verify_dataset(y, d)[0][2] == "ok" and len(calls) == 1
    assert verify_dataset(y, d)[0][2] == "ok" and len(calls) == 1          # from the JSON cache
    assert (Path(os.environ["RS_LAB_CACHE_DIR"]) / "checksums.json").exists()
    os.utime(d / "a.bin", ns=(1, 1))                                        # new mtime -> hashed again
    assert verify_dataset(y, d)[0][2] == "ok" and len(calls) == 2


def test_download_file_url(tmp_path):
    src = tmp_path / "server"; src.mkdir()
    tifffile.imwrite(src / "gt.tif", np.array([[0, 1], [2, 1]], np.uint8))
    np.save(src / "x.npy", np.ones((2, 2, 3), np.float32))
    spec = lambda n: {"path": n, "url": (src / n).as_uri(), "sha256": sha256sum(src / n), "size": (src / n).stat().st_size}
    y = write_yaml(tmp_path / "dl.yaml", {"name": "dl", "task": "pixel-classification", "classes": ["a", "b"],
                                          "files": {"x": spec("x.npy"), "gt": spec("gt.tif")},
                                          "modalities": {"x": {"file": "x", "bands": 3}}, "labels": "gt"})
    root = tmp_path / "root"
    with pytest.raises(DataError, match="missing file x.npy"): load_dataset(y, root)
    s = load_dataset(y, root, download=True)
    assert s.shape == (2, 2) and (root / "gt.tif").read_bytes() == (src / "gt.tif").read_bytes()
    assert [st for _, _, st in verify_dataset(y, root)] == ["ok", "ok"]


def test_scene_classification_folder_and_coop_split(tmp_path):
    im = tmp_path / "Images"
    for c in ["forest", "river"]:
        (im / c).mkdir(parents=True)
        for i in range(3): tifffile.imwrite(im / c / f"{c}{i:02d}.tif", np.full((8, 8, 3), i, np.uint8))
    y = write_yaml(tmp_path / "u.yaml", {"name": "u", "task": "scene-classification", "classes": ["forest", "river"],
                                         "files": {"images": {"path": "Images", "format": "folder"},
                                                   "split": {"path": "split.json", "optional": True}},
                                         "images": "images", "split_file": "split"})
    ds = load_dataset(y, tmp_path)
    assert isinstance(ds, ImageTextDataset) and len(ds) == 6 and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds[4]["image"].shape == (8, 8, 3) and ds[4]["image"][0, 0, 0] == 1
    (tmp_path / "split.json").write_text(json.dumps({"train": [["forest/forest00.tif", 0, "forest"], ["river/river02.tif", 1, "river"]],
                                                     "val": [], "test": [["river/river01.tif", 1, "river"]]}))
    ds = load_dataset(y, tmp_path)
    assert len(ds) == 3 and ds.subset("train").labels.tolist() == [0, 1] and ds.subset("test")[0]["image"][0, 0, 0] == 1


def test_captions_karpathy_and_jsonl(tmp_path):
    kj = {"images": [{"filename": "a_1.jpg", "split": "train", "sentences": [{"raw": "a plane"}, {"raw": "two planes"}]},
                     {"filename": "b_2.jpg", "split": "test", "sentences": [{"raw": "a beach"}]}]}
    (tmp_path / "dataset.json").write_text(json.dumps(kj))
    (tmp_path / "t.jsonl").write_text('{"filename": "x.jpg", "captions": ["c1", "c2"]}\n')
    y = write_yaml(tmp_path / "k.yaml", {"name": "k", "task": "captions", "label_from": "filename-prefix",
                                         "files": {"ds": "dataset.json", "imgs": {"path": "imgs", "format": "folder", "optional": True}},
                                         "images": "imgs", "captions": {"format": "karpathy", "file": "ds"}})
    ds = load_dataset(y, tmp_path)
    assert ds.captions == [["a plane", "two planes"], ["a beach"]] and ds.splits["test"].tolist() == [1]
    assert ds.class_names == ["a", "b"] and ds.items[0] == tmp_path / "imgs" / "a_1.jpg"
    y2 = write_yaml(tmp_path / "j.yaml", {"name": "j", "task": "captions", "files": {"t": "t.jsonl"},
                                          "captions": {"format": "jsonl", "splits": {"test": "t"}}})
    ds = load_dataset(y2, tmp_path)
    assert ds.captions == [["c1", "c2"]] and ds.labels.tolist() == [-1]


def test_sen12ms_layout(tmp_path):
    for s, n in (("s1", 2), ("s2", 13)):
        d = tmp_path / "ROIs1158_spring" / f"{s}_7"; d.mkdir(parents=True)
        tifffile.imwrite(d / f"ROIs1158_spring_{s}_7_p3.tif", np.ones((n, 16, 16), np.float32))
    ds = load_dataset("sen12ms", tmp_path)
    assert isinstance(ds, PairedModalityDataset) and len(ds) == 1
    assert ds[0]["s1"].shape == (16, 16, 2) and ds[0]["s2"].shape == (16, 16, 13)


def test_label_maps_without_rasters(tmp_path):
    _pixel_files(tmp_path)
    lab, splits, classes = load_label_maps(_pixel_yaml(tmp_path), tmp_path)
    assert lab.shape == (6, 5) and set(splits) == {"train"} and classes == {1: "grass", 2: "road"}


def test_cli_list_show_verify(tmp_path):
    r = subprocess.run([RS_LAB, "data", "list"], capture_output=True, text=True)
    assert r.returncode == 0 and "houston2013-pixelset" in r.stdout and "pixel-set" in r.stdout
    r = subprocess.run([RS_LAB, "data", "show", "muufl"], capture_output=True, text=True)
    assert r.returncode == 0 and "Cloth panels" in r.stdout and "scene/gt.mat" in r.stdout
    _pixel_files(tmp_path)
    y = _pixel_yaml(tmp_path)
    r = subprocess.run([RS_LAB, "data", "verify", str(y), "--root", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.count("\nok") + r.stdout.startswith("ok") == 5, r.stdout
    (tmp_path / "dsm.mat").unlink()
    r = subprocess.run([RS_LAB, "data", "verify", str(y), "--root", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "missing" in r.stdout and "dsm.mat" in r.stdout and "Traceback" not in r.stderr


def test_demo_summary_never_crashes(tmp_path):
    txt = demo_summary(tmp_path / "does-not-exist")
    assert "houston2013" in txt and "no dataset files found" in txt
    r = subprocess.run([RS_LAB, "demo", "--root", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0 and "built-in dataset manifests" in r.stdout


def _pixel_set(d, gt, order, name="ps"):
    "Files and manifest of a 2-modality pixel set over map `gt`, rows written in `order` of its nonzero pixels."
    rc = np.argwhere(gt > 0)
    idx = np.arange(len(rc)) if order == "C" else np.lexsort((rc[:, 0], rc[:, 1]))
    rng = np.random.default_rng(0)
    hsi_c, lidar_c = rng.random((len(rc), 4)), rng.random((len(rc), 1))
    d.mkdir(parents=True, exist_ok=True)
    sio.savemat(d / "X.mat", {"X": hsi_c[idx]}); np.save(d / "L.npy", lidar_c[idx, 0])
    sio.savemat(d / "y.mat", {"y": gt[tuple(rc[idx].T)][:, None]}); tifffile.imwrite(d / "map.tif", gt)
    y = {"name": name, "task": "pixel-set", "classes": ["a", "b", "c"],
         "files": {"x": {"path": "X.mat", "variable": "X"}, "l": "L.npy", "y": {"path": "y.mat", "variable": "y"}, "map": "map.tif"},
         "modalities": {"hsi": {"bands": 4}, "lidar": {"bands": 1}},
         "pixel_sets": {"train": {"rows": {"hsi": "x", "lidar": "l"}, "labels": "y", "positions": "map", "order": order}}}
    return write_yaml(d / f"{name}.yaml", y), hsi_c, lidar_c


def test_pixel_set_fortran_order(tmp_path):
    "MATLAB's X(find(map)) lists rows in column-major order: `order: F` loads them to the same Scene as C-order rows."
    gt = np.zeros((5, 6), np.uint8); gt[0, 4], gt[1, 1], gt[2, 0], gt[2, 5], gt[4, 1] = 1, 2, 3, 1, 3
    yc, hsi, lidar = _pixel_set(tmp_path / "c", gt, "C")
    yf, _, _ = _pixel_set(tmp_path / "f", gt, "F")
    assert not np.array_equal(sio.loadmat(tmp_path / "c" / "X.mat")["X"], sio.loadmat(tmp_path / "f" / "X.mat")["X"])
    sc, sf = load_dataset(yc, tmp_path / "c"), load_dataset(yf, tmp_path / "f")
    for s in (sc, sf):
        np.testing.assert_array_equal(s.modalities["hsi"][0], hsi.astype(np.float32))          # Scene keeps float32
        np.testing.assert_array_equal(s.modalities["lidar"][0], lidar.astype(np.float32))
        np.testing.assert_array_equal(s.meta["positions"], np.argwhere(gt > 0))
        np.testing.assert_array_equal(gt[tuple(s.meta["positions"].T)], s.labels[0])        # every row on its own pixel
    np.testing.assert_array_equal(sc.splits["train"], sf.splits["train"])
    assert sc.meta["row_order"] == {"train": "C"} and sf.meta["row_order"] == {"train": "F"}
    m = yaml.safe_load(yf.read_text()); m["pixel_sets"]["train"]["order"] = "C"; write_yaml(yf, m)   # F data declared C
    with pytest.raises(DataError, match=r"not in C \(row-major, numpy\) order of this map \(they are in F .*set `order: F` in pixel_sets.train of ps.yaml"):
        load_dataset(yf, tmp_path / "f")
    m = yaml.safe_load(yc.read_text()); m["pixel_sets"]["train"]["order"] = "F"; write_yaml(yc, m)   # and C data declared F
    with pytest.raises(DataError, match="set `order: C`"):
        load_dataset(yc, tmp_path / "c")


def test_pixel_set_labels_fit_no_order(tmp_path):
    gt = np.zeros((3, 3), np.uint8); gt[0, 1], gt[1, 0], gt[2, 2] = 1, 2, 3
    y, _, _ = _pixel_set(tmp_path, gt, "C")
    sio.savemat(tmp_path / "y.mat", {"y": np.array([[3], [2], [1]])})
    with pytest.raises(DataError, match="nor in the other order"):
        load_dataset(y, tmp_path)


@pytest.mark.realdata
def test_houston_pixelset_in_fortran_order(shared_data, tmp_path):
    "The real MDL-RS training set, re-exported the way MATLAB's find() would order it, loads to the same Scene."
    from rs_prompt_lab.data.manifest import _order_index
    ref = load_dataset("houston2013-pixelset", shared_data)
    src = shared_data / "houston2013"
    tr = tifffile.imread(src / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif")
    f = _order_index(np.argwhere(tr > 0), "F")
    for k, v in (("HSI_TrSet", "hsi"), ("LiDAR_TrSet", "lidar"), ("TrLabel", None)):
        a = sio.loadmat(src / "mdl_rs_pixel_sets" / f"{k}.mat")[k]
        np.save(tmp_path / f"{k}.npy", a[f])
    (tmp_path / "TR.tif").write_bytes((src / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif").read_bytes())
    m = yaml.safe_load((Path(M.manifest_dir()) / "houston2013-pixelset.yaml").read_text())
    m["name"] = "houston-f"
    m["files"] = {"hsi": "HSI_TrSet.npy", "lidar": "LiDAR_TrSet.npy", "y": "TrLabel.npy", "map": "TR.tif"}
    m["pixel_sets"] = {"train": {"rows": {"hsi": "hsi", "lidar": "lidar"}, "labels": "y", "positions": "map", "order": "F"}}
    s = load_dataset(write_yaml(tmp_path / "houston-f.yaml", m), tmp_path)
    for k in ("hsi", "lidar"): np.testing.assert_array_equal(s.modalities[k], ref.modalities[k])
    np.testing.assert_array_equal(s.labels, ref.labels); np.testing.assert_array_equal(s.meta["positions"], ref.meta["positions"])
    m["pixel_sets"]["train"]["order"] = "C"
    with pytest.raises(DataError, match="set `order: F`"):
        load_dataset(write_yaml(tmp_path / "houston-f.yaml", m), tmp_path)
