"""Manifest schema (issue 10): every malformed manifest is one `error:` line naming the YAML and the key path,
exit code non-zero, no traceback, and nothing of the data is read before the manifest is valid."""
import subprocess, sys
from pathlib import Path
import numpy as np
import pytest, yaml

import rs_prompt_lab.data.manifest as M
from rs_prompt_lab.cli import main
from rs_prompt_lab.core import DataError
from rs_prompt_lab.data.manifest import ManifestSchema, get_manifest, list_datasets, load_dataset, parse_manifest

RS_LAB = str(Path(sys.executable).parent / "rs-lab")


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RS_LAB_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))


def pixel():
    "A valid pixel-classification manifest (as a dict) to break one key at a time."
    return {"name": "mydata", "task": "pixel-classification", "classes": {1: "grass", 2: "road"},
            "files": {"hsi": {"path": "hsi.mat", "variable": "HSI", "shape": [6, 5, 3]}, "gt": {"path": "gt.tif"}},
            "modalities": {"hsi": {"file": "hsi", "bands": 3}}, "labels": "gt"}


def pixel_set():
    return {"name": "mydata", "task": "pixel-set", "classes": ["a", "b"],
            "files": {"x": {"path": "X.mat", "variable": "X"}, "y": {"path": "y.mat", "variable": "y"}, "map": "map.tif"},
            "modalities": {"hsi": {"bands": 4}},
            "pixel_sets": {"train": {"rows": {"hsi": "x"}, "labels": "y", "positions": "map"}}}


def edit(d, path, value=KeyError):
    "Set (or delete, when value is KeyError) the dotted key `path` of the nested dict `d`."
    *parents, last = path.split(".")
    node = d
    for p in parents: node = node[int(p) if isinstance(node, list) else p]
    if value is KeyError: del node[last]
    else: node[last] = value
    return d


CASES = [  # (id, manifest, dotted key -> new value (KeyError: delete), what the line must contain)
    ("pixel set without positions", pixel_set, "pixel_sets.train.positions", KeyError,
     ["pixel_sets.train.positions: field required", "a pixel set needs 'positions'"]),
    ("pixel set without labels", pixel_set, "pixel_sets.train.labels", KeyError, ["pixel_sets.train.labels: field required"]),
    ("pixel set order", pixel_set, "pixel_sets.train.order", "fortran", ["pixel_sets.train.order 'fortran' is not known", "Allowed: C, F"]),
    ("rows of an unknown modality", pixel_set, "pixel_sets.train.rows.sar", "x", ["pixel_sets.train.rows names modality 'sar'"]),
    ("file without path", pixel, "files.gt", {"format": "tif"}, ["files.gt.path: field required"]),
    ("size as a string", pixel, "files.gt.size", "100", ["files.gt.size: expected an integer, got '100'"]),
    ("shape with a string", pixel, "files.hsi.shape", [6, 5, "x"], ["files.hsi.shape.2: expected an integer, got 'x'"]),
    ("bad sha256", pixel, "files.gt.sha256", "abc", ["files.gt.sha256: must be 64 lower-case hex digits"]),
    ("optional not a bool", pixel, "files.gt.optional", "yes please", ["files.gt.optional: expected true or false"]),
    ("typo in a file entry", pixel, "files.hsi.varible", "HSI", ["unknown key 'varible' in files.hsi. Did you mean: variable"]),
    ("typo at the top", pixel, "clases", {1: "a"}, ["unknown key 'clases' in the manifest. Did you mean: classes"]),
    ("unknown format", pixel, "files.gt.format", "geotiff", ["files.gt.format 'geotiff' is not known", "Allowed: mat,"]),
    ("mat without variable", pixel, "files.hsi.variable", KeyError, ["files.hsi: is a .mat file but has no 'variable'"]),
    ("unknown task", pixel, "task", "pixel", ["task 'pixel' is not known. Did you mean: pixel-set"]),
    ("missing name", pixel, "name", KeyError, ["name: field required"]),
    ("modality without file", pixel, "modalities.hsi.file", KeyError, ["modalities.hsi.file: field required"]),
    ("bands not a count", pixel, "modalities.hsi.bands", "many", ["modalities.hsi.bands: expected an integer or a list, got 'many'"]),
    ("wavelength range of 3", pixel, "modalities.hsi.wavelength_nm", [1, 2, 3], ["modalities.hsi.wavelength_nm: list should have at most 2 items"]),
    ("labels refer to a missing key", pixel, "labels", "gtt", ["labels.file refers to file key 'gtt', which is not in files. Did you mean: gt"]),
    ("label map as JSON", pixel, "files.gt", "gt.json", ["labels.file needs a file of format mat or mat-v5", "files.gt (gt.json) has format 'json'"]),
    ("from_splits names no split", pixel, "labels", {"from_splits": ["train"]}, ["labels.from_splits names split 'train', not in splits"]),
    ("classes of the wrong type", pixel, "classes", "grass, road", ["classes: expected a mapping or a list, got 'grass, road'"]),
    ("a class name that is a list", pixel, "classes.2", ["road"], ["classes.2: expected a string, got ['road']"]),
    ("no files, no generator", pixel, "files", KeyError, ["files: field required", "a manifest needs 'files' (real data) or a 'generator'"]),
    ("label_from", lambda: {"name": "u", "task": "scene-classification", "files": {"i": {"path": "Images", "format": "folder"}}, "images": "i"},
     "label_from", "dirs", ["label_from 'dirs' is not known", "Allowed: folder, filename-prefix, none"]),
    ("captions split without captions", lambda: {"name": "c", "task": "captions", "files": {"f": "f.txt", "c": "c.txt"},
                                                 "captions": {"splits": {"train": {"filenames": "f", "captions": "c"}}}},
     "captions.splits.train.captions", KeyError, ["captions: splits.train needs 'filenames' and 'captions' file keys (format precomp)"]),
    ("pairs of an unknown modality", lambda: {"name": "p", "task": "paired-modality", "files": {"s1": {"path": "S1", "format": "folder"}},
                                              "modalities": {"s1": {"file": "s1", "bands": ["VV"]}}, "pairs": {"a": "s1", "b": "s2"}},
     "pairs.layout", "bigearthnet", ["pairs names modality 's2', not in modalities"]),
    ("generator function", lambda: {"name": "g", "task": "pixel-classification", "generator": {"function": "my_gen.make"}},
     "generator.params", {}, ["generator.function: must look like 'package.module:function', got 'my_gen.make'"]),
]


def run_main(capsys, argv):
    rc = main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("name,make,key,value,expect", CASES, ids=[c[0] for c in CASES])
def test_bad_manifest_is_one_line_naming_file_and_key(tmp_path, capsys, monkeypatch, name, make, key, value, expect):
    y = tmp_path / "mydata.yaml"
    y.write_text(yaml.safe_dump(edit(make(), key, value), sort_keys=False))
    def no_reading(*a, **k): raise AssertionError("a data file was read before the manifest was validated")
    monkeypatch.setattr(M, "read_file", no_reading); monkeypatch.setattr(M, "scan_array", no_reading)
    for cmd in (["data", "verify", str(y), "--root", str(tmp_path)], ["data", "show", str(y)]):
        rc, out, err = run_main(capsys, cmd)
        assert rc != 0 and out == "", (rc, out)
        assert err.count("\n") == 1 and err.startswith(f"error: {y}: ") and "Traceback" not in err, err
        for e in expect: assert e in err, (e, err)
    with pytest.raises(DataError) as e: load_dataset(y, tmp_path)      # the Python API: the same one line, never a KeyError
    assert str(e.value) == err.removeprefix("error: ").rstrip("\n")


def test_every_problem_reported_at_once(tmp_path, capsys):
    m = pixel_set()
    edit(m, "pixel_sets.train.positions"); edit(m, "files.y.size", "100"); edit(m, "files.map", {"format": "tif"}); m["fles"] = {}
    y = tmp_path / "mydata.yaml"; y.write_text(yaml.safe_dump(m))
    rc, out, err = run_main(capsys, ["data", "verify", str(y), "--root", str(tmp_path)])
    assert rc == 2 and err.count("\n") == 1
    parts = err.removeprefix(f"error: {y}: ").rstrip().split("; ")
    assert parts[0].startswith("unknown key 'fles' in the manifest") and len(parts) == 4, parts
    assert {p.split(":")[0] for p in parts[1:]} == {"files.y.size", "files.map.path", "pixel_sets.train.positions"}, parts


def test_pixel_set_without_positions_through_the_console_script(tmp_path):
    "The issue's reproduction: this used to end in `KeyError: 'positions'` with a traceback."
    y = tmp_path / "mydata.yaml"; y.write_text(yaml.safe_dump(edit(pixel_set(), "pixel_sets.train.positions")))
    for args in (["data", "verify", str(y), "--root", str(tmp_path)], ["data", "show", str(y)]):
        r = subprocess.run([RS_LAB, *args], capture_output=True, text=True)
        assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr and r.stderr.count("\n") == 1
        assert r.stderr.startswith(f"error: {y}: pixel_sets.train.positions: field required"), r.stderr


@pytest.mark.parametrize("text,expect", [("name: [unclosed\n", "not valid YAML (line "), ("- a\n- b\n", "the manifest: expected a mapping"),
                                         ("", "the manifest: expected a mapping, got None")])
def test_not_a_manifest(tmp_path, capsys, text, expect):
    y = tmp_path / "m.yaml"; y.write_text(text)
    rc, out, err = run_main(capsys, ["data", "show", str(y)])
    assert rc == 2 and err.count("\n") == 1 and f"{y}: " in err and expect in err, err


@pytest.mark.parametrize("name", list_datasets())
def test_builtin_manifests_validate(name):
    m = get_manifest(name)
    assert m.name == name and (m.files or m.generator)
    assert all(ps["order"] in ("C", "F") for ps in m.pixel_sets.values())


def test_schema_keys_and_json_schema():
    assert M.TOP_KEYS == tuple(ManifestSchema.model_fields)
    assert M.SECTION_KEYS["pixel_set"] == ("rows", "labels", "positions", "order", "optional")
    js = ManifestSchema.model_json_schema()
    assert "pixel_sets" in js["properties"] and js["additionalProperties"] is False


def test_valid_manifest_unchanged_by_the_schema():
    "The loaders see the same plain dicts as before: every file key filled, bare strings expanded, defaults set."
    m = parse_manifest(pixel_set(), "x.yaml")
    assert m.files["map"] == {"path": "map.tif", "format": "tif", "variable": None, "url": None, "sha256": None, "size": None,
                              "shape": None, "optional": False, "source": None}
    assert m.pixel_sets["train"] == {"rows": {"hsi": "x"}, "labels": "y", "positions": "map", "order": "C", "optional": False}
    assert m.modalities["hsi"]["bands"] == 4 and m.modalities["hsi"]["optional"] is False and m.label_from == "folder"
    assert m.classes == ["a", "b"] and m.description == "" and m.source == "x.yaml"
