"""The lean CF-IPT hot path (issue 12) against the reference computations it replaced, on rs-tiny with the 15 Houston
class names: lean transformer blocks vs open_clip's own blocks, the shared-prefix per-image text pass vs the full
(B, K, L, D) pass, the coupler's all-layers pass vs layer by layer, the associative scan vs the loop. Predictions
must be identical and logits, losses and gradients equal to float rounding, in eval and in training."""
import pytest
import torch

import rs_prompt_lab.promptable as pm
from rs_prompt_lab.backbones import load_backbone, WeightsError
from rs_prompt_lab.cfipt.s2gpt import VTPICoupler
from rs_prompt_lab.inputs import PixelSpec
from rs_prompt_lab.methods import create_method
from rs_prompt_lab.synth.scene import PRESETS


def _model(**kw):
    try: clip = load_backbone("rs-tiny")[0]
    except WeightsError: clip = load_backbone("random:rs-tiny")[0]
    torch.manual_seed(0)
    return create_method("cfipt", clip, PixelSpec(list(PRESETS["houston-like"].classes), {"hsi": 144, "lidar": 1}, 11), **kw)


def _batch(B=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"hsi": torch.randn(B, 144, 11, 11, generator=g), "lidar": torch.randn(B, 1, 11, 11, generator=g),
            "label": torch.randint(0, 15, (B,), generator=g)}


@pytest.fixture
def reference(monkeypatch):
    "Switch to the reference computations: open_clip's blocks (so the full text pass), the coupler layer by layer, the scan loop."
    def use():
        monkeypatch.setattr(pm, "_lean_ok", lambda blk: False)
        monkeypatch.setattr(VTPICoupler, "couple_all", lambda self, v, t, p_sp=None, p_sa=None: tuple(
            map(list, zip(*[self(v[i][None], t[i][None], i, p_sp, p_sa) for i in range(self.n_layers)]))))
    return use


def _run(m, batch, train: bool):
    m.train(train); m.zero_grad(set_to_none=True)
    if not train:
        with torch.inference_mode(): return m(batch).logits, None, None
    out = m(batch); loss = m.loss(out, batch); loss.backward()
    return out.logits.detach(), loss.item(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("train", [False, True])
def test_lean_path_matches_reference(reference, train):
    m, batch = _model(), _batch()
    assert 0 < m._prefix_len < m.tokens.shape[1]                       # the class-name part is really split off
    lean = _run(m, batch, train)
    ref_seq = _model(block={"scan": "sequential"})                      # same weights (same seed), the scan loop
    reference()
    ref = _run(ref_seq, batch, train)
    assert torch.equal(lean[0].argmax(1), ref[0].argmax(1))            # identical predictions
    torch.testing.assert_close(lean[0], ref[0], rtol=1e-4, atol=1e-4)
    if train:
        assert abs(lean[1] - ref[1]) <= 1e-5 * abs(ref[1])
        top = max(g.abs().max().item() for g in ref[2].values())
        for n, g in ref[2].items():                                     # relative to the largest gradient: the conv biases
            torch.testing.assert_close(lean[2][n], g, rtol=0, atol=1e-4 * top, msg=n)   # before BatchNorm get ~0 gradients


def test_training_losses_follow_the_reference(reference):
    "Ten AdamW steps from the same seed: the losses of the lean path and of the reference path agree to float rounding."
    def losses():
        m = _model(block={"scan": "sequential"}).train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=2e-3)
        out = []
        for s in range(10):
            b = _batch(16, 100 + s); loss = m.loss(m(b), b)
            opt.zero_grad(); loss.backward(); opt.step(); out.append(loss.item())
        return torch.tensor(out)
    lean = losses(); reference(); ref = losses()
    torch.testing.assert_close(lean, ref, rtol=1e-4, atol=0)


def test_prefix_split_falls_back_for_one_class():
    m = _model()
    m.set_class_names(["only class"])
    assert m._prefix_len == 0
    with torch.inference_mode(): assert m.eval()(_batch(4)).logits.shape == (4, 1)
