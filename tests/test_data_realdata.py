"""Real benchmark fragments from ../shared/data through the built-in manifests (facts: ../shared/data/README.md)."""
import subprocess, sys
from pathlib import Path
import numpy as np
import pytest
import scipy.io as sio, tifffile

from rs_prompt_lab.data.manifest import load_dataset, load_label_maps, verify_dataset, list_datasets, get_manifest
from rs_prompt_lab.core import DataError

pytestmark = pytest.mark.realdata
RS_LAB = str(Path(sys.executable).parent / "rs-lab")

# Houston2013 official train / test counts per class, copied from the table in ../shared/data/README.md
HOUSTON = {1: (198, 1053), 2: (190, 1064), 3: (192, 505), 4: (188, 1056), 5: (186, 1056), 6: (182, 143), 7: (196, 1072),
           8: (191, 1053), 9: (193, 1059), 10: (191, 1036), 11: (181, 1054), 12: (192, 1041), 13: (184, 285),
           14: (181, 247), 15: (187, 473)}
AUGSBURG = {1: (146, 13361), 2: (264, 30065), 3: (21, 3830), 4: (248, 26609), 5: (52, 523), 6: (7, 1638), 7: (23, 1507)}
TRENTO = {1: 4034, 2: 2903, 3: 479, 4: 9123, 5: 10501, 6: 3174}
MUUFL = {1: 23246, 2: 4270, 3: 6882, 4: 1826, 5: 6687, 6: 466, 7: 2233, 8: 6240, 9: 1385, 10: 183, 11: 269}
PAVIA_3921 = [548, 540, 392, 524, 265, 532, 375, 514, 231]


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RS_LAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def counts(lab, mask):
    ids, n = np.unique(lab[mask], return_counts=True)
    return dict(zip(ids.tolist(), n.tolist()))


def test_present_files_match_manifest_checksums(shared_data):
    "Every file of every manifest that exists under shared data has the manifest's size and sha256."
    checked = 0
    for name in list_datasets():
        m = get_manifest(name)
        if not m.files: continue
        for key, path, status in verify_dataset(m, shared_data):
            assert status in ("ok", "missing"), (name, key, path, status)
            checked += status == "ok" and m.files[key]["sha256"] is not None
    assert checked >= 40


def test_houston_split_maps_counts(shared_data):
    lab, splits, classes = load_label_maps("houston2013", shared_data / "houston2013")
    assert lab.shape == (349, 1905) and len(classes) == 15
    assert counts(lab, splits["train"]) == {k: v[0] for k, v in HOUSTON.items()}
    assert counts(lab, splits["test"]) == {k: v[1] for k, v in HOUSTON.items()}
    assert splits["train"].sum() == 2832 and splits["test"].sum() == 12197 and not (splits["train"] & splits["test"]).any()
    # the .mat copies listed in the same manifest are the same maps
    assert np.array_equal(sio.loadmat(shared_data / "houston2013" / "TRLabel.mat")["TRLabel"] > 0, splits["train"])


def test_houston_pixelset_at_image_positions(shared_data):
    from rs_prompt_lab.data.scene import Scene
    s = load_dataset("houston2013-pixelset", shared_data)
    assert isinstance(s, Scene) and s.shape == (1, 2832)
    assert s.modalities["hsi"].shape == (1, 2832, 144) and s.modalities["lidar"].shape == (1, 2832, 21)
    pos = s.meta["positions"]
    assert pos.shape == (2832, 2) and s.meta["grid_shape"] == (349, 1905) and s.meta["skipped_sets"] == ["test"]
    tr_map = tifffile.imread(shared_data / "houston2013" / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif")
    tr_label = sio.loadmat(shared_data / "houston2013" / "mdl_rs_pixel_sets" / "TrLabel.mat")["TrLabel"].ravel()
    np.testing.assert_array_equal(s.labels[0], tr_label)                       # labels are TrLabel ...
    np.testing.assert_array_equal(tr_map[pos[:, 0], pos[:, 1]], tr_label)      # ... and the TR map at those positions
    assert len({tuple(p) for p in pos}) == 2832
    hsi = sio.loadmat(shared_data / "houston2013" / "mdl_rs_pixel_sets" / "HSI_TrSet.mat")["HSI_TrSet"]
    np.testing.assert_allclose(s.modalities["hsi"][0], hsi.astype(np.float32))
    assert s.class_counts("train") == {k: v[0] for k, v in HOUSTON.items()}
    # patch size 1: the window of each pixel is its own row, for both modalities
    rows = s.pixels("train")
    assert rows.shape == (2832, 2) and (rows[:, 0] == 0).all()
    win = {k: x[rows[:, 0], rows[:, 1]][:, :, None, None] for k, x in s.modalities.items()}    # (N, C, 1, 1)
    assert win["hsi"].shape == (2832, 144, 1, 1) and win["lidar"].shape == (2832, 21, 1, 1)


def test_houston_pixelset_lidar_train_and_test(shared_data):
    s = load_dataset("houston2013-pixelset", shared_data / "houston2013", modalities=["lidar"])
    assert s.shape == (1, 2832 + 12197) and list(s.modalities) == ["lidar"]
    va = tifffile.imread(shared_data / "houston2013" / "2013_IEEE_GRSS_DF_Contest_Samples_VA.tif")
    te = s.splits["test"][0]
    pos = s.meta["positions"][te]
    np.testing.assert_array_equal(va[pos[:, 0], pos[:, 1]], s.labels[0, te])
    assert s.class_counts("test") == {k: v[1] for k, v in HOUSTON.items()}


def test_trento_lidar_and_gt(shared_data):
    s = load_dataset("trento", shared_data, modalities=["lidar"])
    assert s.shape == (166, 600) and s.modalities["lidar"].shape == (166, 600, 2)
    assert int((s.labels > 0).sum()) == 30214 and s.n_classes == 6 and s.class_counts() == TRENTO
    assert 0 <= s.modalities["lidar"][..., 0].min() and s.modalities["lidar"][..., 0].max() == pytest.approx(20.15, abs=0.01)
    with pytest.raises(DataError, match=r"missing file Italy_hsi.mat.*modalities=\['lidar'\]"):
        load_dataset("trento", shared_data)


def test_muufl_lidar_and_gt(shared_data):
    s = load_dataset("muufl", shared_data / "muufl", modalities=["lidar"])
    assert s.shape == (325, 220) and s.n_bands("lidar") == 2 and s.n_classes == 11
    assert int((s.labels > 0).sum()) == 53687 and s.class_counts() == MUUFL


def test_augsburg_maps(shared_data):
    lab, splits, classes = load_label_maps("augsburg", shared_data)
    raw = sio.loadmat(shared_data / "augsburg" / "TestImage.mat")["TestImage"]
    assert raw.dtype == np.float32 and lab.dtype == np.int32                  # float32 test map cast to ids
    assert counts(lab, splits["train"]) == {k: v[0] for k, v in AUGSBURG.items()}
    assert counts(lab, splits["test"]) == {k: v[1] for k, v in AUGSBURG.items()}
    assert splits["train"].sum() == 761 and splits["test"].sum() == 77533


def test_pavia_split_maps(shared_data):
    lab, splits, classes = load_label_maps("pavia-university", shared_data)
    assert lab.shape == (610, 340) and int((lab > 0).sum()) == 42776 and len(classes) == 9
    assert splits["train"].sum() == 2774 and splits["test"].sum() == 40002 and not (splits["train"] & splits["test"]).any()
    m3921 = sio.loadmat(shared_data / "pavia_university" / "TRpaviaU_3921.mat")["TRpaviaU"].astype(int)
    assert [int((m3921 == c).sum()) for c in range(1, 10)] == PAVIA_3921 and splits["train_3921"].sum() == 3921
    assert (splits["train_3921"] & (lab == 0)).sum() == 1147                   # README: outside the 42776-px GT


def test_bigearthnet_pairs(shared_data):
    ds = load_dataset("bigearthnet-mm", shared_data)
    assert len(ds) == 6 and ds.modality_names == ("s1", "s2")
    for i in range(len(ds)):
        p = ds[i]
        assert p["s2"].shape == (120, 120, 13) and p["s1"].shape == (120, 120, 2)
        assert (p["s2"][..., 10] == 0).all() and (p["s2"][..., [0, 1, 9, 12]] > 0).any(axis=(0, 1)).all()
        assert p["label"].sum() >= 1
    pid = "S2A_MSIL2A_20170617T113321_4_55"
    i = ds.ids.index(pid)
    assert [ds.class_names[j] for j in np.flatnonzero(ds.labels[i])] == ["Pastures"]   # SOURCE.md pair 3
    folder = shared_data / "bigearthnet_mm" / "S2" / pid
    b05 = tifffile.imread(folder / f"{pid}_B05.tif"); b01 = tifffile.imread(folder / f"{pid}_B01.tif")
    s2 = ds[i]["s2"]
    assert b05.shape == (60, 60) and b01.shape == (20, 20)
    np.testing.assert_array_equal(s2[::2, ::2, 4], b05); np.testing.assert_array_equal(s2[1::2, 1::2, 4], b05)
    np.testing.assert_array_equal(s2[::6, ::6, 0], b01)
    np.testing.assert_array_equal(s2[..., 1], tifffile.imread(folder / f"{pid}_B02.tif"))
    vv = tifffile.imread(next((shared_data / "bigearthnet_mm" / "S1").glob("*_4_55")) / (next((shared_data / "bigearthnet_mm" / "S1").glob("*_4_55")).name + "_VV.tif"))
    np.testing.assert_array_equal(ds[i]["s1"][..., 0], vv)


def test_rsicd_captions_by_filename(shared_data):
    ds = load_dataset("rsicd-captions", shared_data)
    assert len(ds) == 10921 and len(ds.splits["train"]) == 9828 and len(ds.splits["test"]) == 1093
    names = [Path(p).name for p in ds.items]
    caps = ds.captions[names.index("airport_1.jpg")]
    assert len(caps) == 5 and caps[0] == (shared_data / "rsicd" / "precomp" / "train_caps.txt").read_text().splitlines()[0]
    test_caps = ds.captions[names.index("airport_348.jpg")]                      # repeated-name layout of the test file
    assert len(test_caps) == 5 and names.index("airport_348.jpg") in ds.splits["test"]
    assert all(len(c) == 5 for c in ds.captions)


def test_other_caption_sets(shared_data):
    assert {k: len(v) for k, v in load_dataset("sydney-captions", shared_data).splits.items()} == {"train": 497, "val": 58, "test": 28}
    assert {k: len(v) for k, v in load_dataset("rsitmd-captions", shared_data).splits.items()} == {"train": 4291, "test": 452}
    ucm = load_dataset("ucm-captions", shared_data)
    assert len(ucm) == 2100 and {Path(p).name for p in ucm.items} == {f"{i}.tif" for i in range(1, 2101)}


def test_cli_verify_houston_acceptance(shared_data):
    r = subprocess.run([RS_LAB, "data", "verify", "houston2013", "--root", str(shared_data / "houston2013")], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    lines = {l.split()[1]: l.split()[0] for l in r.stdout.splitlines() if l and l.split()[0] in ("ok", "missing")}
    assert lines["tr_map"] == "ok" and lines["va_map"] == "ok" and lines["hsi"] == "missing" and lines["lidar"] == "missing"


def test_demo_on_shared_data(shared_data):
    r = subprocess.run([RS_LAB, "demo", "--root", str(shared_data)], capture_output=True, text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert "houston2013-pixelset" in r.stdout and "files in" in r.stdout
