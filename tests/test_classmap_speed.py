"""Whole-scene class maps with CF-IPT on rs-tiny (issue 12 item 3): an interrupted map resumes to the identical map, the
memory-budget batch size is monotone, bounded and really fits its budget, DataLoader workers change nothing, and a bad
--memory-gb is a one-line error."""
import contextlib, io
import numpy as np
import pytest
import torch

from rs_prompt_lab.backbones import load_backbone, WeightsError
from rs_prompt_lab.classmap import predict_scene, memory_batch_size, activation_bytes, _batch_to_torch
from rs_prompt_lab.core import ConfigError
from rs_prompt_lab.data.patches import SceneTiler
from rs_prompt_lab.experiment import scene_spec
from rs_prompt_lab.methods import create_method
from rs_prompt_lab.synth.scene import make_scene


@pytest.fixture(scope="module")
def setup():
    scene = make_scene("houston-like", seed=0, size=(64, 96))
    try: clip = load_backbone("rs-tiny")[0]
    except WeightsError: clip = load_backbone("random:rs-tiny")[0]
    torch.manual_seed(0)
    model = create_method("cfipt", clip, scene_spec(scene, 5))
    mask = np.zeros(scene.shape, bool); mask[20:23] = True             # a band of 3 rows: 288 pixels
    return scene, model, mask


class Interrupted(Exception): pass


def test_resume_after_interruption_gives_the_identical_map(setup, tmp_path):
    scene, model, mask = setup
    full = predict_scene(model, scene, 5, 32, "cpu", mask=mask, progress=False)
    part, fwd, calls = tmp_path/"map.partial.npz", model.forward, []
    def failing(batch):
        calls.append(len(batch["hsi"]))
        if len(calls) == 5: raise Interrupted()
        return fwd(batch)
    model.forward = failing
    try:
        with pytest.raises(Interrupted): predict_scene(model, scene, 5, 32, "cpu", mask=mask, progress=False, resume=part, save_every=2)
    finally: del model.forward
    with np.load(part) as z: done = z["done"]
    assert 0 < done[20:23].sum() < 3                                    # one or two of the three rows were kept
    calls.clear(); model.forward = lambda b: calls.append(len(b["hsi"])) or fwd(b)
    try: again = predict_scene(model, scene, 5, 32, "cpu", mask=mask, progress=False, resume=part, save_every=2)
    finally: del model.forward
    assert np.array_equal(again, full)
    assert sum(calls) == int((mask & ~done[:, None]).sum()) < mask.sum()  # only the unfinished rows ran again
    assert not part.exists()


def test_memory_budget_batch_size_is_monotone_bounded_and_fits(setup):
    scene, model, _ = setup
    budgets = [0.02, 0.05, 0.2, 1.0, 100.0]
    sizes = [memory_batch_size(model, scene, 5, gb, "cpu", max_batch=2048) for gb in budgets]
    assert all(a <= b for a, b in zip(sizes, sizes[1:])) and 1 <= sizes[0] and sizes[-1] == 2048, sizes
    assert sizes[0] < sizes[2], sizes
    n = sizes[1]                                                        # the chosen batch really fits 0.05 GB
    b = SceneTiler(scene, 5, n, list(scene.modalities))[0]
    model.eval()
    with torch.inference_mode(): used = activation_bytes(model, _batch_to_torch(b, list(scene.modalities), torch.device("cpu")))
    windows = sum(v.nbytes for k, v in b.items() if k != "rc")
    assert used + windows <= 0.05e9, (n, used, windows)
    with pytest.raises(ConfigError, match="raise --memory-gb"): memory_batch_size(model, scene, 5, 1e-6, "cpu")


def test_workers_and_budget_give_the_same_map(setup):
    scene, model, mask = setup
    ref = predict_scene(model, scene, 5, 64, "cpu", mask=mask, progress=False)
    assert np.array_equal(predict_scene(model, scene, 5, 64, "cpu", mask=mask, progress=False, workers=1), ref)
    assert np.array_equal(predict_scene(model, scene, 5, device="cpu", mask=mask, progress=False, memory_gb=0.1), ref)


@pytest.mark.parametrize("bad", ["0", "-2", "nan", "inf"])
def test_bad_memory_gb_is_a_clear_error(bad, tmp_path):
    from rs_prompt_lab.cli import main
    e = io.StringIO()
    with contextlib.redirect_stderr(e): rc = main(["classmap", str(tmp_path), "--memory-gb", bad])
    assert rc == 2 and "--memory-gb must be a positive number of GB" in e.getvalue(), e.getvalue()
    assert len(e.getvalue().strip().splitlines()) == 1
