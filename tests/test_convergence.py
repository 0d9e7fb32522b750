"""Convergence of every trainable pixel method (issue 9, item 2): on a small, separable synthetic pixel task each
method of the registry that has a backbone and trains reaches high TRAINING accuracy within a bounded number of
full-batch AdamW steps on the shipped pretrained `rs-tiny`, and its loss falls well below where it started.
A method that cannot fit 24 well-separated pixels (a dead gradient path, a prompt that never reaches the logits,
a broken input module) fails here even when its one-step tests pass.

The task: 3 classes x 8 pixels, a 12-band HSI + 1-band LiDAR patch of side 3. Each class has its own mean
spectrum (independent N(0, 2^2) per band) and LiDAR height; every element gets N(0, 0.3^2) noise; both
modalities are standardised on these pixels. With 3 classes the class means span a 2-D plane, so the baselines'
PCA-3 image keeps all the class information."""
import os
import time

import numpy as np
import pytest
import torch

from rs_prompt_lab.backbones import WeightsError, load_backbone
from rs_prompt_lab.inputs import PixelSpec, fit_inputs
from rs_prompt_lab.methods import METHODS, create_method, list_methods

CLASSES = ["grass", "road", "water"]
BANDS = {"hsi": 12, "lidar": 1}
PATCH, PER_CLASS = 3, 8
ACC_MIN = 0.9        # at most 2 of the 24 training pixels wrong (chance is 1/3)
LOSS_MAX = 0.35      # well below chance-level cross-entropy ln 3 = 1.10
LOSS_RATIO = 0.5     # and at most half the loss the method started from
CHECK = 5            # steps between eval-mode checks of the training batch

# Per-method budget: (AdamW lr, max full-batch steps). The training batch is checked in eval mode (as the model is
# used; CF-IPT's IAE has BatchNorm, whose running statistics lag the train-mode batch statistics by ~10-20 steps)
# every CHECK steps, and training stops once it passes. Steps needed here, data/init seeds 0, 1, 2 (the test runs
# seed 0): linear-probe 5/5/5, coop 20/20/40, cocoop 40/10/40, maple 5/5/20, cfipt 20/25/30, cfipt-vision-only
# 20/25/30; the '-full' inputs (learned 1x1 projection of every band, PCA-initialised) at the same budgets:
# linear-probe-full 5/5/5, coop-full 20/35/25, cocoop-full 15/10/20, maple-full 5/5/20. Each cap is >= 2x the worst
# of those, so a method that gets slower by a small factor still passes but one that stops learning fails. The other
# CF-IPT variants at cfipt's budget: 5-30 steps (cfipt-bilinear, the one without the IAE's BatchNorm, 5/5/5).
# - linear-probe: a 516-parameter linear head on frozen features, a convex problem: 3e-3 fits it in 5 steps.
# - coop / cocoop: a few context vectors that reach the logits only through the whole frozen text tower; prompt
#   learning is usually run at higher lr, and 5e-3 needed up to 2x fewer steps than 3e-3 (cocoop seed 0: 40 vs 55).
# - maple: deep prompts in both towers, fast already at 3e-3.
# - cfipt and its ablations: ~0.3 M trainable parameters (MFPG, IAE, S2GPT, deep prompts) at the protocol's default
#   lr 2e-3 (PixelFitCfg.lr); at 5e-3 the eval-mode loss oscillated (seed 0: 0.77 -> 4.9 -> 0.04, acc 0.96 at 40).
#   They cost ~0.5-0.8 s a step (per-image text prompts through S2GPT), the most of all.
BUDGET = {
    "linear-probe": (3e-3, 20),
    "coop": (5e-3, 80),
    "cocoop": (5e-3, 100),
    "maple": (3e-3, 50),
    "cfipt": (2e-3, 60),
}
CFIPT_DEFAULT = BUDGET["cfipt"]

TRAINABLE = [n for n in list_methods(task="pixel") if METHODS[n].trains and METHODS[n].backbone]
UNTRAINABLE = [n for n in list_methods(task="pixel") if not METHODS[n].trains and METHODS[n].backbone]
# The default run covers every baseline (PCA-3 and '-full' inputs), CF-IPT and its vision-only ablation (~45 s).
# The other CF-IPT variants share CF-IPT's code and cost 3-25 s each (~110 s together), over this file's runtime
# budget (~60 s on one core): RS_LAB_CONVERGENCE_ALL=1 runs them too.
RUN_ALL = os.environ.get("RS_LAB_CONVERGENCE_ALL") == "1"


def _runs_by_default(name: str) -> bool:
    "Every baseline, CF-IPT and its vision-only ablation; the other CF-IPT variants only with RS_LAB_CONVERGENCE_ALL=1."
    return RUN_ALL or not name.startswith("cfipt") or name in ("cfipt", "cfipt-vision-only")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip(one_thread):
    "The shipped pretrained rs-tiny: a random text tower would make prompt learning needlessly hard."
    try:
        return load_backbone("rs-tiny")[0]
    except WeightsError as e:
        pytest.fail(f"the shipped rs-tiny weights are missing or unreadable, so convergence cannot be tested: {e}")


def make_task(seed: int = 0, per_class: int = PER_CLASS, p: int = PATCH, bands: dict = BANDS) -> dict:
    "A separable pixel batch: class-specific mean spectra and heights plus noise, standardised per band."
    rng = np.random.default_rng(seed)
    K, C = len(CLASSES), bands["hsi"]
    spectra, heights = rng.normal(0, 2.0, (K, C)), rng.normal(0, 2.0, K)
    y = np.repeat(np.arange(K), per_class)
    hsi = spectra[y][:, :, None, None] + rng.normal(0, 0.3, (len(y), C, p, p))
    lidar = heights[y][:, None, None, None] + rng.normal(0, 0.3, (len(y), 1, p, p))
    z = lambda a: (a - a.mean((0, 2, 3), keepdims=True)) / a.std((0, 2, 3), keepdims=True)
    return {"hsi": torch.tensor(z(hsi), dtype=torch.float32), "lidar": torch.tensor(z(lidar), dtype=torch.float32),
            "label": torch.tensor(y)}


def budget(name: str) -> tuple:
    "A method's own budget; a '-full' baseline (learned projection input) and a CF-IPT variant share their base's."
    if name in BUDGET: return BUDGET[name]
    if name.startswith("cfipt"): return CFIPT_DEFAULT
    return BUDGET.get(name[: -len("-full")]) if name.endswith("-full") else None


def evaluate(m, batch) -> tuple:
    "(loss, accuracy) of `m` on `batch` in eval mode, as the trained model would be used (BatchNorm running stats)."
    m.eval()
    with torch.no_grad():
        out = m(batch)
        loss, acc = m.loss(out, batch).item(), (out.logits.argmax(1) == batch["label"]).float().mean().item()
    m.train()
    return loss, acc


def fit(name: str, clip, batch: dict, lr: float, max_steps: int, seed: int = 0, check: int = CHECK) -> dict:
    "Full-batch AdamW on `batch`, checked in eval mode every `check` steps; stops once it passes (or at max_steps)."
    torch.manual_seed(seed)
    m = create_method(name, clip, PixelSpec(CLASSES, BANDS, PATCH))
    centre = batch["hsi"][:, :, PATCH // 2, PATCH // 2].numpy()   # the training HSI pixels, standardised like the batch
    fit_inputs(m, centre)
    params = [q for q in m.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    curve, t0 = [], time.perf_counter()
    m.train()
    for step in range(max_steps + 1):
        if step % check == 0 or step == max_steps:
            loss, acc = evaluate(m, batch)
            curve.append((step, round(loss, 3), round(acc, 3)))
            if acc >= ACC_MIN and loss <= LOSS_MAX and loss <= LOSS_RATIO * curve[0][1]: break
        if step == max_steps: break
        loss = m.loss(m(batch), batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return dict(steps=curve[-1][0], max_steps=max_steps, lr=lr, loss0=curve[0][1], acc0=curve[0][2], loss=curve[-1][1],
                acc=curve[-1][2], n_params=sum(q.numel() for q in params), seconds=time.perf_counter() - t0, curve=curve)


def report(name: str, r: dict) -> str:
    return (f"{name}: {r['steps']}/{r['max_steps']} AdamW steps at lr={r['lr']:g} ({r['n_params']} trainable params, "
            f"{r['seconds']:.1f}s): loss {r['loss0']:.3f} -> {r['loss']:.3f}, train acc {r['acc0']:.3f} -> {r['acc']:.3f} "
            f"(need acc >= {ACC_MIN}, loss <= {LOSS_MAX} and <= {LOSS_RATIO} x start); eval-mode curve (step, loss, acc) {r['curve']}")


def test_every_trainable_method_has_a_budget():
    "A new trainable pixel method must get a (justified) budget here, or the cfipt default if it is an ablation."
    assert {"linear-probe", "coop", "cocoop", "maple", "cfipt", "cfipt-vision-only"} <= set(TRAINABLE)
    assert [n for n in TRAINABLE if budget(n) is None] == []
    assert "zeroshot" in UNTRAINABLE


@pytest.mark.parametrize("name", [n for n in TRAINABLE if _runs_by_default(n)])
def test_method_converges(name, clip):
    lr, max_steps = budget(name)
    r = fit(name, clip, make_task(0), lr, max_steps)
    msg = report(name, r)
    print(msg)
    assert r["acc"] >= ACC_MIN, f"did not fit the training pixels: {msg}"
    assert r["loss"] <= LOSS_MAX and r["loss"] <= LOSS_RATIO * r["loss0"], f"loss did not fall enough: {msg}"


@pytest.mark.parametrize("name", UNTRAINABLE)
def test_untrainable_method_has_no_trainable_parameters(name, clip):
    "zeroshot: nothing to optimise, so a convergence test would be meaningless; its loss carries no gradient."
    m = create_method(name, clip, PixelSpec(CLASSES, BANDS, PATCH))
    batch = make_task(0)
    fit_inputs(m, batch["hsi"][:, :, PATCH // 2, PATCH // 2].numpy())
    assert [n for n, q in m.named_parameters() if q.requires_grad] == []
    loss = m.loss(m(batch), batch)
    assert torch.isfinite(loss) and not loss.requires_grad
