"""Bad input gets one clear line naming the file or value, never a deep traceback, and nothing is written."""
import os, subprocess, sys
from pathlib import Path
import numpy as np
import pytest, yaml, tifffile, scipy.io as sio

from rs_prompt_lab.data.manifest import load_dataset, get_manifest, verify_dataset
from rs_prompt_lab.core import DataError, RSLabError, sha256sum

RS_LAB = str(Path(sys.executable).parent / "rs-lab")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    d = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("RS_LAB_CACHE_DIR", str(d))
    return d


def snapshot(*dirs):
    return {str(p): p.stat().st_mtime_ns for d in dirs for p in Path(d).rglob("*")}


def make(tmp_path, hsi=None, dsm=None, gt=None, classes=None, over=None):
    "A two-modality pixel dataset in tmp_path/data and its manifest; returns (yaml, data dir)."
    d = tmp_path / "data"; d.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    sio.savemat(d / "hsi.mat", {"HSI": rng.random((6, 5, 3)) if hsi is None else hsi})
    sio.savemat(d / "dsm.mat", {"DSM": rng.random((6, 5)) if dsm is None else dsm})
    tifffile.imwrite(d / "gt.tif", rng.integers(0, 3, (6, 5)).astype(np.uint8) if gt is None else gt)
    files = {"hsi": {"path": "hsi.mat", "variable": "HSI", "url": "https://example.org/toy/hsi.mat"},
             "dsm": {"path": "dsm.mat", "variable": "DSM"}, "gt": {"path": "gt.tif"}}
    for k, v in (over or {}).items(): files[k].update(v)
    y = tmp_path / "toy.yaml"
    y.write_text(yaml.safe_dump({"name": "toy", "task": "pixel-classification", "classes": classes or {1: "a", 2: "b"},
                                 "files": files, "labels": "gt",
                                 "modalities": {"hsi": {"file": "hsi", "bands": 3}, "lidar": {"file": "dsm", "bands": 1}}}))
    return y, d


def one_line_error(fn, *match):
    with pytest.raises(RSLabError) as e: fn()
    msg = str(e.value)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for m in match: assert m in msg, (m, msg)
    return msg


def test_missing_file_names_file_and_url(tmp_path, cache):
    y, d = make(tmp_path)
    (d / "hsi.mat").unlink()
    before = snapshot(tmp_path, cache)
    one_line_error(lambda: load_dataset(y, d), "missing file hsi.mat", str(d / "hsi.mat"), "https://example.org/toy/hsi.mat")
    assert snapshot(tmp_path, cache) == before


def test_checksum_mismatch(tmp_path, cache):
    y, d = make(tmp_path, over={"hsi": {"sha256": "0" * 64}})
    before = snapshot(tmp_path, cache)
    one_line_error(lambda: load_dataset(y, d), "hsi.mat", "wrong checksum")
    assert snapshot(tmp_path, cache) == before                                  # no cache entry, nothing else
    assert dict((k, s) for k, _, s in verify_dataset(y, d))["hsi"] == "wrong checksum"


def test_wrong_size(tmp_path):
    y, d = make(tmp_path, over={"gt": {"size": 3}})
    one_line_error(lambda: load_dataset(y, d), "gt.tif", "wrong size")


def test_wrong_variable_name_in_mat(tmp_path):
    y, d = make(tmp_path, over={"hsi": {"variable": "hsi_cube"}})
    one_line_error(lambda: load_dataset(y, d), "hsi.mat", "wrong variable name 'hsi_cube'", "it has: HSI")


def test_modalities_with_different_hw(tmp_path):
    y, d = make(tmp_path, dsm=np.zeros((6, 4)))
    one_line_error(lambda: load_dataset(y, d), "not on one grid", "dsm.mat", "(6, 4)")


def test_shape_disagrees_with_manifest(tmp_path):
    y, d = make(tmp_path, over={"hsi": {"shape": [6, 5, 144]}})
    one_line_error(lambda: load_dataset(y, d), "hsi.mat", "(6, 5, 3)", "(6, 5, 144)")


def test_nan_inf_pixels(tmp_path, cache):
    x = np.ones((6, 5, 3)); x[2, 1, 0] = np.nan; x[4, 4, 2] = np.inf
    y, d = make(tmp_path, hsi=x)
    before = snapshot(tmp_path, cache)
    one_line_error(lambda: load_dataset(y, d), "'hsi'", "2 pixels with NaN/inf", "nan_policy='mask'")
    assert snapshot(tmp_path, cache) == before
    with pytest.warns(UserWarning, match="2 pixels"):
        s = load_dataset(y, d, nan_policy="mask")
    assert s.labels[2, 1] == 0 and s.labels[4, 4] == 0 and np.isfinite(s.modalities["hsi"]).all()


def test_label_ids_outside_class_table(tmp_path):
    gt = np.zeros((6, 5), np.uint8); gt[0, 0], gt[1, 1] = 1, 7
    y, d = make(tmp_path, gt=gt)
    one_line_error(lambda: load_dataset(y, d), "gt.tif", "label ids [7]", "class table")


def test_unknown_dataset_suggests_closest():
    one_line_error(lambda: load_dataset("houston2031", "/tmp"), "unknown dataset 'houston2031'", "Did you mean: houston2013")
    one_line_error(lambda: get_manifest("pavia"), "Did you mean:", "pavia-university")


def test_truncated_mat(tmp_path, cache):
    y, d = make(tmp_path)
    data = (d / "hsi.mat").read_bytes(); (d / "hsi.mat").write_bytes(data[: len(data) // 3])
    before = snapshot(tmp_path, cache)
    one_line_error(lambda: load_dataset(y, d), "hsi.mat")
    (d / "hsi.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 10)
    one_line_error(lambda: load_dataset(y, d), "hsi.mat")
    (d / "hsi.mat").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)                 # a broken v7.3 (HDF5) file
    one_line_error(lambda: load_dataset(y, d), "hsi.mat")
    assert {k for k in snapshot(tmp_path, cache)} == set(before)


def test_corrupt_tif(tmp_path):
    y, d = make(tmp_path)
    data = (d / "gt.tif").read_bytes(); (d / "gt.tif").write_bytes(data[:40])
    one_line_error(lambda: load_dataset(y, d), "gt.tif", "not a readable TIFF")


def test_bad_manifest_yaml(tmp_path):
    (tmp_path / "m.yaml").write_text("name: m\ntask: captions\nfiles: {a: a.txt}\ncaptionz: {}\n")
    one_line_error(lambda: load_dataset(tmp_path / "m.yaml", tmp_path), "m.yaml", "unknown key 'captionz'", "Did you mean: captions")
    (tmp_path / "n.yaml").write_text("name: [unclosed\n")
    one_line_error(lambda: load_dataset(tmp_path / "n.yaml", tmp_path), "n.yaml", "not valid YAML")


@pytest.mark.parametrize("args", [["data", "verify", "houston2031", "--root", "."], ["data", "show", "trentoo"]])
def test_cli_errors_are_one_line(args):
    r = subprocess.run([RS_LAB, *args], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: unknown dataset") and "Did you mean" in r.stderr


def test_cli_verify_bad_files(tmp_path):
    y, d = make(tmp_path, over={"hsi": {"sha256": "0" * 64}})
    (d / "gt.tif").unlink()
    r = subprocess.run([RS_LAB, "data", "verify", str(y), "--root", str(d)], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr and r.stderr == ""
    st = {l.split("  ")[0].strip(): l for l in r.stdout.splitlines()[:-1]}
    assert "wrong checksum" in st and "missing" in st and "ok" in st


# ---- rs-lab data verify looks inside the files (issue 10) --------------------------------------------------------

def run_verify(y, d):
    "(exit code, {key: status}, {key: line}, stderr) of `rs-lab data verify`."
    r = subprocess.run([RS_LAB, "data", "verify", str(y), "--root", str(d)], capture_output=True, text=True)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stdout.splitlines()[:-1]
    return r.returncode, {l[16:].split()[0]: l[:16].strip() for l in lines}, {l[16:].split()[0]: l for l in lines}, r.stderr


def test_verify_ok_without_checksums(tmp_path):
    y, d = make(tmp_path)
    rc, st, _, _ = run_verify(y, d)
    assert rc == 0 and st == {"hsi": "ok", "dsm": "ok", "gt": "ok"}


@pytest.mark.parametrize("fmt", ["mat", "npy", "tif"])
def test_verify_truncated_file(tmp_path, fmt):
    "A cut-short file with no checksum in the manifest used to pass verify; now it is 'unreadable'."
    x = np.random.default_rng(0).random((6, 5, 3)).astype(np.float32)
    over = {"mat": None, "npy": {"path": "hsi.npy", "variable": None}, "tif": {"path": "hsi.tif", "variable": None}}[fmt]
    y, d = make(tmp_path, hsi=x, over={"hsi": over} if over else None)
    p = d / f"hsi.{fmt}"
    if fmt == "npy": np.save(p, x)
    if fmt == "tif": tifffile.imwrite(p, x, photometric="minisblack")
    data = p.read_bytes(); p.write_bytes(data[: len(data) // (5 if fmt == "tif" else 2)])   # TIFF pixel data sits near the start
    rc, st, line, _ = run_verify(y, d)
    assert rc == 1 and st["hsi"] == "unreadable" and st["dsm"] == "ok", line
    assert f"hsi.{fmt}" in line["hsi"] and ("truncated" in line["hsi"] or "corrupt" in line["hsi"]), line["hsi"]


def test_verify_nan_file(tmp_path):
    x = np.ones((6, 5, 3)); x[2, 1, 0] = np.nan; x[4, 4, 2] = np.inf
    y, d = make(tmp_path, hsi=x)
    rc, st, line, _ = run_verify(y, d)
    assert rc == 1 and st["hsi"] == "not finite" and "2 NaN/inf values" in line["hsi"] and "nan_policy='mask'" in line["hsi"]
    assert dict((k, s) for k, _, s in verify_dataset(y, d))["hsi"] == "not finite"


def test_verify_wrong_shape_and_bands(tmp_path):
    y, d = make(tmp_path, over={"hsi": {"shape": [6, 5, 144]}})
    rc, st, line, _ = run_verify(y, d)
    assert rc == 1 and st["hsi"] == "wrong shape" and "(6, 5, 3)" in line["hsi"] and "(6, 5, 144)" in line["hsi"]
    y, d = make(tmp_path, hsi=np.zeros((6, 5, 4)))                      # no shape in the manifest, but bands: 3
    rc, st, line, _ = run_verify(y, d)
    assert rc == 1 and st["hsi"] == "wrong structure" and "has 4 bands, the manifest says 3" in line["hsi"]
    y, d = make(tmp_path, dsm=np.zeros((6, 4)))                         # not on the grid of the label map
    rc, st, line, _ = run_verify(y, d)
    assert rc == 1 and st["dsm"] == "wrong structure" and "(6, 4) differs from (6, 5) of gt.tif" in line["dsm"]


def test_verify_label_ids(tmp_path):
    gt = np.zeros((6, 5), np.uint8); gt[0, 0] = 9
    y, d = make(tmp_path, gt=gt)
    rc, st, line, _ = run_verify(y, d)
    assert rc == 1 and st["gt"] == "wrong structure" and "label ids [9]" in line["gt"]


def test_verify_optional_missing_is_not_a_failure(tmp_path):
    y, d = make(tmp_path, over={"dsm": {"optional": True}})
    (d / "dsm.mat").unlink()
    rc, st, line, _ = run_verify(y, d)
    assert rc == 0 and st["dsm"] == "missing" and "optional, not needed to load" in line["dsm"]
    assert [c.optional and not c.failed for c in verify_dataset(y, d) if c.key == "dsm"] == [True]
    y, d = make(tmp_path)                                               # the same file, required
    (d / "dsm.mat").unlink()
    rc, st, line, _ = run_verify(y, d)
    assert rc == 1 and st["dsm"] == "missing" and "optional, not needed" not in line["dsm"]
    m = yaml.safe_load(y.read_text()); m["modalities"]["lidar"]["optional"] = True   # used only by an optional modality
    y.write_text(yaml.safe_dump(m))
    rc, st, _, _ = run_verify(y, d)
    assert rc == 0 and st["dsm"] == "missing"


def test_verify_pixel_set_order(tmp_path):
    "A pixel set exported from MATLAB (F order) but declared C fails verify with the fix; declared F it passes."
    gt = np.zeros((4, 5), np.uint8); gt[0, 3], gt[1, 1], gt[2, 0], gt[3, 3] = 1, 2, 3, 2
    rc_ = np.argwhere(gt > 0); f = np.lexsort((rc_[:, 0], rc_[:, 1]))
    d = tmp_path / "ps"; d.mkdir()
    np.save(d / "x.npy", np.arange(4 * 2, dtype=np.float32).reshape(4, 2)[f]); np.save(d / "y.npy", gt[gt > 0][f])
    tifffile.imwrite(d / "map.tif", gt)
    m = {"name": "ps", "task": "pixel-set", "classes": ["a", "b", "c"], "files": {"x": "x.npy", "y": "y.npy", "map": "map.tif"},
         "modalities": {"hsi": {"bands": 2}}, "pixel_sets": {"train": {"rows": {"hsi": "x"}, "labels": "y", "positions": "map"}}}
    y = tmp_path / "ps.yaml"; y.write_text(yaml.safe_dump(m))
    rc, st, line, _ = run_verify(y, d)
    assert rc == 1 and st["y"] == "wrong structure" and "set `order: F` in pixel_sets.train of ps.yaml" in line["y"], line
    m["pixel_sets"]["train"]["order"] = "F"; y.write_text(yaml.safe_dump(m))
    rc, st, _, _ = run_verify(y, d)
    assert rc == 0 and set(st.values()) == {"ok"}
