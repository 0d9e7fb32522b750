"""Core behaviour through the installed console script and the public API."""
import json, subprocess, sys
import numpy as np
import pytest
from rs_prompt_lab.core import record, load_json, RSLabError, atomic_path
from rs_prompt_lab.data.scene import Scene


from pathlib import Path
RS_LAB = str(Path(sys.executable).parent / "rs-lab")  # the console script installed in this venv


def test_console_script_help():
    r = subprocess.run([RS_LAB, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "data" in r.stdout and "synth" in r.stdout


def test_unknown_group_suggests():
    r = subprocess.run([RS_LAB, "dat"], capture_output=True, text=True)
    assert r.returncode == 2 and "Did you mean: data" in r.stderr and "Traceback" not in r.stderr


def test_record_is_atomic_and_merges(tmp_path):
    record({"oa": 0.9}, tmp_path)
    with pytest.raises(RSLabError):
        record({"aa": float("inf")}, tmp_path)
    assert load_json(tmp_path / "metrics.json") == {"oa": 0.9}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_scene_roundtrip(tiny_scene, tmp_path):
    p = tiny_scene.save(tmp_path / "s.npz")
    s2 = Scene.load(p)
    assert np.array_equal(s2.modalities["hsi"], tiny_scene.modalities["hsi"])
    assert s2.class_counts("train") == tiny_scene.class_counts("train")
