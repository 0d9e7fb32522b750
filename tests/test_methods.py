"""Composed methods (CF-IPT, its ablations, zero-shot / linear probe / CoOp / CoCoOp / MaPLe) on a frozen backbone:
shapes, finite losses, gradients only to trainable parameters, a frozen CLIP that never changes, one optimiser
step that changes the loss, ablations that change the output, text-feature caching, bad input, the ViT-B/16
budget through `rs-lab params`, and real Houston2013 pixels."""
import argparse
import contextlib
import io

import numpy as np
import pytest
import torch

from rs_prompt_lab.core import ConfigError, DataError
from rs_prompt_lab.backbones import load_backbone, find_weights
from rs_prompt_lab.methods import METHODS, list_methods, create_method, configure_cli, parse_bands
from rs_prompt_lab.inputs import PixelSpec, ImageSpec, fit_inputs
from rs_prompt_lab.records import MethodOutput

CLASSES = ["grass", "road", "water"]
BANDS = {"hsi": 8, "lidar": 1}
PAPER_BUDGET, PAPER_PCT = 1_140_000, 0.76

pytestmark = pytest.mark.usefixtures("one_thread")











def _batch(p, B=2, bands=BANDS, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = {m: torch.randn(B, c, p, p, generator=g) for m, c in bands.items()}
    b["label"] = torch.tensor([0, 2, 1, 0][:B])
    return b


def mk(name, clip, classes, bands, p, pca=None, **kw):
    "A registry method for this pixel geometry, its input PCA fitted on `pca` when given."
    m = create_method(name, clip, PixelSpec(classes, bands, p), **kw)
    if pca is not None: fit_inputs(m, pca)
    return m


def _build(name, clip, pixels, p, bands=BANDS, **kw):
    return mk(name, clip, CLASSES, bands, p, pca=None if name.startswith("cfipt") else pixels[:, : bands["hsi"]], **kw)


NEURAL = [n for n in list_methods(task="pixel") if METHODS[n].backbone]


def _frozen_snapshot(clip):
    return {n: t.detach().clone() for n, t in clip.model.named_parameters()}


# ---------------------------------------------------------------- every method, p = 5 and p = 1
@pytest.mark.parametrize("p", [5, 1])
@pytest.mark.parametrize("name", NEURAL)
def test_method_train_step(name, p, clip, pixels):
    torch.manual_seed(0)
    m = _build(name, clip, pixels, p)
    batch = _batch(p)
    out = m(batch)
    assert isinstance(out, MethodOutput)
    logits = out.logits
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()
    loss = m.loss(out, batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    trainable = [(n, q) for n, q in m.named_parameters() if q.requires_grad]
    # the CLIP weights are frozen: no requires_grad anywhere under clip.
    assert all(not q.requires_grad for q in m.clip.parameters())
    if not METHODS[name].trains:
        assert trainable == [] and not loss.requires_grad
        return
    before = _frozen_snapshot(clip)
    loss.backward()
    assert all(q.grad is None for q in m.clip.parameters()), "a frozen CLIP weight received a gradient"
    dead = [n for n, q in trainable if q.grad is None or not q.grad.abs().sum() > 0]
    assert dead == [], f"trainable parameters without gradient: {dead}"
    opt = torch.optim.SGD([q for _, q in trainable], lr=0.5)
    opt.step()
    loss2 = m.loss(m(batch), batch)
    assert torch.isfinite(loss2) and abs(loss2.item() - loss.item()) > 1e-6
    after = _frozen_snapshot(clip)
    assert all(torch.equal(before[n], after[n]) for n in before), "the frozen backbone changed"


def test_loss_is_ce_plus_text_diversity(clip):
    torch.manual_seed(0)
    m = mk("cfipt", clip, CLASSES, BANDS, 3)
    b = _batch(3)
    out = m(b)
    t = out["text_features"].detach()
    assert t.shape == (2, 3, clip.embed_dim)          # per-image text features by default
    S = t @ t.transpose(-1, -2)
    want = torch.nn.functional.cross_entropy(out.logits, b["label"]) + 0.02 * (S - torch.eye(3)).abs().mean()
    assert m.loss(out, b).item() == pytest.approx(want.item(), rel=1e-5)


# ---------------------------------------------------------------- ablations
ABLATIONS = list_methods("cfipt-*")


@pytest.mark.parametrize("name", ABLATIONS)
def test_ablation_changes_output(name, clip):
    "Same weights where the two models share them, so the difference comes from the switch."
    torch.manual_seed(0)
    full = mk("cfipt", clip, CLASSES, BANDS, 5).eval()
    abl = mk(name, clip, CLASSES, BANDS, 5).eval()
    sd, own = full.state_dict(), abl.state_dict()
    abl.load_state_dict({k: v for k, v in sd.items() if k in own and own[k].shape == v.shape}, strict=False)
    b = _batch(5)
    with torch.no_grad():
        a, f = abl(b).logits, full(b).logits
    assert a.shape == f.shape and not torch.allclose(a, f, atol=1e-6)
    for k, v in METHODS[name].fixed.items(): assert getattr(abl, {"adapter": "adapter_kind"}.get(k, k)) == v


def test_ablation_parameter_sets(clip):
    n = lambda name: sum(q.numel() for q in mk(name, clip, CLASSES, BANDS, 5).parameters() if q.requires_grad)
    full = n("cfipt")
    assert n("cfipt-no-interaction") < full and n("cfipt-concat") < full and n("cfipt-ones") < full
    assert n("cfipt-bilinear") < full and n("cfipt-vision-only") < full


@pytest.mark.parametrize("name", ["cfipt-transformer", "cfipt-no-interaction", "cfipt-ones", "coop", "maple"])
def test_cached_text_features_match(name, clip, pixels):
    torch.manual_seed(0)
    m = _build(name, clip, pixels, 5).eval()
    b = _batch(5)
    with torch.no_grad():
        ref = m(b).logits
        got = m.prepare_inference()(b).logits
    assert m._text_cache is not None
    assert torch.allclose(ref, got, atol=1e-5)
    m.train()
    assert m._text_cache is None


def test_per_image_vs_batch_averaged(clip):
    torch.manual_seed(0)
    m = mk("cfipt", clip, CLASSES, BANDS, 5, per_image=False)
    assert m(_batch(5))["text_features"].shape == (len(CLASSES), clip.embed_dim)


# ---------------------------------------------------------------- generality
def test_hsi_only_variants(clip, pixels):
    for mode, aux in (("self", 8), ("zeros", 1)):
        m = mk("cfipt", clip, CLASSES, {"hsi": 8}, 3, single_source=mode)
        assert m.mfpg.aux_bands == aux
        b = _batch(3, bands={"hsi": 8})
        out = m(b)
        assert out.logits.shape == (2, 3)
        m.loss(out, b).backward()
        assert all(q.grad is not None for q in m.mfpg.parameters() if q.requires_grad)
    coop = mk("coop", clip, CLASSES, {"hsi": 8}, 1, pca=pixels)
    assert coop(_batch(1, bands={"hsi": 8})).logits.shape == (2, 3)


@pytest.mark.parametrize("p", [1, 7, 13])
def test_hsi_plus_sar_any_patch(p, clip):
    bands = {"hsi": 12, "sar": 4}
    m = mk("cfipt", clip, CLASSES, bands, p).eval()
    with torch.no_grad():
        assert m(_batch(p, bands=bands)).logits.shape == (2, 3)


# ---------------------------------------------------------------- bad input
def test_bad_input_errors(clip, pixels):
    m = mk("cfipt", clip, CLASSES, BANDS, 5)
    with pytest.raises(DataError, match=r"built for \(B, 8, p, p\)"):
        m({"hsi": torch.randn(2, 144, 5, 5), "lidar": torch.randn(2, 1, 5, 5)})
    with pytest.raises(DataError, match="no 'lidar' tensor"):
        m({"hsi": torch.randn(2, 8, 5, 5)})
    with pytest.raises(DataError, match="patch_size=5"):
        m(_batch(7))
    with pytest.raises(DataError, match=r"outside 0\.\.2"):
        m.loss(MethodOutput(torch.zeros(2, 3)), {"label": torch.tensor([0, 3])})
    for name in ("cfipt", "coop"):
        with pytest.raises(ConfigError, match="odd integer"):
            mk(name, clip, CLASSES, BANDS, 4)
        with pytest.raises(ConfigError, match="larger than the 13 allowed"):
            mk(name, clip, CLASSES, BANDS, 15)
        with pytest.raises(ConfigError, match="more than once"):
            mk(name, clip, ["road", "road"], BANDS, 5)
        with pytest.raises(ConfigError, match="no class names"):
            mk(name, clip, [], BANDS, 5)
    with pytest.raises(ConfigError, match="Did you mean: cfipt"):
        mk("cfpt", clip, CLASSES, BANDS, 5)
    with pytest.raises(ConfigError, match="fixes interaction='none'"):
        mk("cfipt-no-interaction", clip, CLASSES, BANDS, 5, interaction="s2gpt")
    with pytest.raises(ConfigError, match="not fitted"):
        mk("zeroshot", clip, CLASSES, BANDS, 5)(_batch(5))
    with pytest.raises(DataError, match=r"must be \(N >= 3, 8\)"):
        mk("coop", clip, CLASSES, BANDS, 5, pca=np.zeros((10, 144)))


def test_scene_class_dict_order(clip):
    m = mk("cfipt", clip, {2: "road", 1: "grass", 3: "water"}, BANDS, 1)
    assert m.class_names == ["grass", "road", "water"]


# ---------------------------------------------------------------- rs-lab params and the ViT-B/16 budget
def _params_cli(*argv):
    p = argparse.ArgumentParser()
    configure_cli(p, "params")
    args = p.parse_args(list(argv))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = args.func(args)
    return rc, buf.getvalue().strip().splitlines()


def test_params_cli_vit_b16_budget():
    "rs-lab params cfipt --backbone ViT-B-16: built with random init (~1.5 s), within the paper's 1.14 M / 0.76 %."
    rc, out = _params_cli("cfipt", "--backbone", "ViT-B-16")
    assert rc == 0
    assert "weights not loaded" in out[1] and "only the architecture matters" in out[1]
    last = out[-1]
    assert last.startswith("trainable: ") and last.endswith("% of backbone)")
    n, pct = int(last.split()[1]), float(last.split("(")[1].split("%")[0])
    assert 100_000 < n <= PAPER_BUDGET and pct <= PAPER_PCT
    assert pct == pytest.approx(100 * n / 149_620_737, abs=1e-3)      # open_clip ViT-B-16 has 149,620,737 parameters
    rows = {l.split()[0]: l for l in out if l and l.split()[0] in ("mfpg", "adapter", "coupler", "vision_prompts", "text_prompts")}
    assert set(rows) == {"mfpg", "adapter", "coupler", "vision_prompts", "text_prompts"}


def test_params_cli_rs_tiny_and_options():
    rc, out = _params_cli("coop", "--backbone", "rs-tiny", "--bands", "hsi=8,lidar=1", "--patch-size", "5", "--option", "n_ctx=8")
    assert rc == 0
    if find_weights("rs-tiny") is None: assert "were not loaded" in out[1]
    assert out[-1].startswith(f"trainable: {8 * 128} (")           # 8 context vectors of rs-tiny's text width 128
    assert parse_bands("hsi=144, sar=4") == {"hsi": 144, "sar": 4}
    with pytest.raises(ConfigError, match="NAME=COUNT"):
        parse_bands("hsi")


# ---------------------------------------------------------------- real Houston2013 pixels
@pytest.mark.realdata
def test_real_houston_pixels(shared_data, clip):
    "The real 144-band CASI spectra + 21 LiDAR features of Houston2013 (patch size 1) through CF-IPT and CoOp."
    from rs_prompt_lab.data.manifest import load_dataset
    scene = load_dataset("houston2013-pixelset", root=shared_data / "houston2013")
    hsi, lidar = scene.modalities["hsi"][0], scene.modalities["lidar"][0]          # (2832, 144), (2832, 21)
    labels = scene.labels[0] - 1
    bands = {"hsi": hsi.shape[1], "lidar": lidar.shape[1]}
    assert bands == {"hsi": 144, "lidar": 21}
    idx = np.random.default_rng(0).choice(len(labels), 16, replace=False)
    batch = {"hsi": torch.from_numpy(hsi[idx]).float()[:, :, None, None],
             "lidar": torch.from_numpy(lidar[idx]).float()[:, :, None, None],
             "label": torch.from_numpy(labels[idx]).long()}
    torch.manual_seed(0)
    cf = mk("cfipt", clip, scene.class_names, bands, 1)
    out = cf(batch)
    assert out.logits.shape == (16, 15)
    loss = cf.loss(out, batch)
    assert torch.isfinite(loss) and loss.item() > 0
    coop = mk("coop", clip, scene.class_names, bands, 1, pca=hsi)       # PCA on the real spectra
    assert coop(batch).logits.shape == (16, 15)
    img = coop.input(batch)
    assert img.shape == (16, 3, 64, 64)
    # whitened PCA: over all training pixels the components have unit variance
    z = coop.input(torch.from_numpy(hsi).float()[:, :, None, None])[:, :, 0, 0]
    assert torch.allclose(z.std(0), torch.ones(3), atol=0.05)
    with pytest.raises(DataError, match=r"built for \(B, 144, p, p\)"):
        cf({"hsi": batch["hsi"][:, :100], "lidar": batch["lidar"]})


def test_late_pca_for_runners(clip, pixels):
    "A runner that builds baselines by name fits the input PCA afterwards (inputs.fit_inputs on needs_fit modules)."
    for name in ("zeroshot", "linear-probe", "coop", "cocoop", "maple"):
        m = mk(name, clip, CLASSES, BANDS, 5)
        assert m.input.needs_fit and not m.input.fitted
        with pytest.raises(ConfigError, match="not fitted"):
            m(_batch(5))
        assert fit_inputs(m, pixels) == ["input"]
        assert m.input.fitted and m(_batch(5)).logits.shape == (2, 3)
        assert m.state_dict()["input.fitted_"].item() is True     # checkpoints carry the PCA
    assert fit_inputs(mk("cfipt", clip, CLASSES, BANDS, 5), pixels) == []


# ---------------------------------------------------------------- shared learners on two inputs, new class names
@pytest.mark.parametrize("name", ["coop", "cocoop", "maple"])
def test_learners_on_two_inputs_and_new_class_names(name, clip, pixels):
    "The same registry method on a pixel patch (PCA image) and on scene images; set_class_names leaves the parameters alone."
    torch.manual_seed(0)
    pix = mk(name, clip, CLASSES, BANDS, 5, pca=pixels)
    img = create_method(name, clip, ImageSpec(CLASSES, size=48))
    assert type(pix.learner) is type(img.learner)
    for m, batch in ((pix, _batch(5)), (img, {"image": torch.rand(2, 3, 48, 48), "label": torch.tensor([0, 2])})):
        opt = torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=0.5)
        for _ in range(3):                                          # a "trained" learner
            opt.zero_grad(); m.loss(m(batch), batch).backward(); opt.step()
        m.eval()
        before = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("clip.")}
        with torch.no_grad():
            old = m(batch).logits
            m.set_class_names(["water", "forest", "grass", "harbour"])
            new = m(batch).logits
        assert new.shape == (2, 4) and m.class_names == ["water", "forest", "grass", "harbour"]
        torch.testing.assert_close(new[:, 0], old[:, 2], atol=1e-5, rtol=1e-5)   # 'water' keeps its score
        torch.testing.assert_close(new[:, 2], old[:, 0], atol=1e-5, rtol=1e-5)   # and 'grass'
        after = {k: v for k, v in m.state_dict().items() if not k.startswith("clip.")}
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_linear_probe_refuses_new_classes(clip, pixels):
    m = mk("linear-probe", clip, CLASSES, BANDS, 5, pca=pixels)
    with pytest.raises(ConfigError, match="cannot score other classes"):
        m.set_class_names(["a", "b"])


def test_cocoop_text_features_per_image(clip, pixels):
    "CoCoOp's class features depend on the image: one (K, E) set per image, from one batched text pass."
    torch.manual_seed(0)
    m = mk("cocoop", clip, CLASSES, BANDS, 5, pca=pixels).eval()
    b = _batch(5, B=3)
    with torch.no_grad():
        t = m(b)["text_features"]
        one = m({k: v[1:2] for k, v in b.items()})["text_features"]
    assert t.shape == (3, 3, clip.embed_dim)
    torch.testing.assert_close(t[1], one[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(t[0], t[1])


def test_train_help_lists_cocoop(capsys):
    from rs_prompt_lab.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "cocoop" in capsys.readouterr().out
