"""Input controls of the prompt baselines (issue 9 item 5): the default `input='pca'` is bit-identical to the
baselines as they were (logits, parameter names and order, RNG stream); `input='projection'` adds a learned 1x1
projection of every band of every modality (C_total * 3 + 3 parameters) that starts at the PCA image, trains
through the frozen image tower, and lets the LiDAR into the image."""
import numpy as np
import pytest
import torch

from rs_prompt_lab.core import ConfigError
from rs_prompt_lab.backbones import load_backbone
from rs_prompt_lab.methods import create_method, method_config
from rs_prompt_lab.inputs import PixelSpec, ImageSpec, PCAInput, ProjectionInput, fit_inputs
from rs_prompt_lab.prompts.learners import TemplateText, CoOpLearner, CoCoOpLearner, MaPLeLearner
from rs_prompt_lab.compose import PromptedCLIP, LinearProbeCLIP
from rs_prompt_lab.train import split_decay, trainable_state, load_trainable_state

CLASSES = ["grass", "road", "water"]
BANDS = {"hsi": 8, "lidar": 1}
C_TOTAL = sum(BANDS.values())
BASELINES = ["zeroshot", "linear-probe", "coop", "cocoop", "maple"]
TRAINED = ["linear-probe", "coop", "cocoop", "maple"]

pytestmark = pytest.mark.usefixtures("one_thread")











def _batch(p=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = {m: torch.randn(2, c, p, p, generator=g) for m, c in BANDS.items()}
    b["label"] = torch.tensor([0, 2])
    return b


def _spec(p=5):
    return PixelSpec(CLASSES, BANDS, p)


def _make(name, clip, pixels, seed=1, spec=None, **kw):
    "A registry method built right after seeding, its input fitted on the HSI training pixels (as the runner does)."
    torch.manual_seed(seed)
    m = create_method(name, clip, spec or _spec(), **kw)
    rng_after = torch.get_rng_state()
    fit_inputs(m, pixels)
    return m, rng_after


def _before(name, clip, spec):
    "The baselines as the factories built them before the input option existed."
    S = clip.image_size[0]
    if isinstance(spec, ImageSpec):
        from rs_prompt_lab.inputs import ImageInput
        inp = lambda: ImageInput.for_backbone(clip)
    else:
        inp = lambda: PCAInput(spec, S, None)
    if name == "zeroshot":
        from rs_prompt_lab.zeroshot import RS_TEMPLATES
        return PromptedCLIP(clip, inp(), TemplateText(clip, spec.class_names, list(RS_TEMPLATES)))
    if name == "linear-probe": return LinearProbeCLIP(clip, inp(), spec.class_names, "random")
    if name == "coop": return PromptedCLIP(clip, inp(), CoOpLearner(clip, spec.class_names, 4, None, "{}"))
    if name == "cocoop": return PromptedCLIP(clip, inp(), CoCoOpLearner(clip, spec.class_names, 4, None, "{}", 16))
    return PromptedCLIP(clip, inp(), MaPLeLearner(clip, spec.class_names, 2, 9, "{}"))


def _own_params(m):
    return [(n, q) for n, q in m.named_parameters() if not n.startswith("clip.")]


# ---------------------------------------------------------------- the default is today's PCA-3 input, bit for bit
@pytest.mark.parametrize("task", ["pixel", "scene"])
@pytest.mark.parametrize("name", BASELINES)
def test_default_is_bit_identical(name, task, clip, pixels):
    spec = _spec() if task == "pixel" else ImageSpec(["forest", "river"], size=64)
    batch = _batch() if task == "pixel" else {"image": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))}
    built = {}
    for how in ("default", "explicit", "before"):
        torch.manual_seed(1)
        if how == "before": m = _before(name, clip, spec)
        else: m = create_method(name, clip, spec, **({"input": "pca"} if how == "explicit" else {}))
        rng = torch.get_rng_state()
        if task == "pixel": fit_inputs(m, pixels)
        with torch.no_grad(): logits = m(batch).logits
        built[how] = (type(m), [n for n, _ in m.named_parameters()], [n for n, q in m.named_parameters() if q.requires_grad],
                      {k: v for k, v in m.state_dict().items() if not k.startswith("clip.")}, rng, logits)
    assert method_config(name).input == "pca"
    ref = built["before"]
    for how in ("default", "explicit"):
        got = built[how]
        assert got[0] is ref[0] and got[1] == ref[1] and got[2] == ref[2], how      # class, parameter names and order, trainable set
        assert list(got[3]) == list(ref[3]) and all(torch.equal(got[3][k], ref[3][k]) for k in ref[3]), how
        assert torch.equal(got[4], ref[4]), f"{how}: building drew a different RNG stream"
        assert torch.equal(got[5], ref[5]), f"{how}: logits differ"


def test_positional_config_fields_unchanged():
    "`input` is keyword-only: positional construction of the configs means what it meant."
    from rs_prompt_lab.baselines import CoCoOpCfg, MaPLeCfg
    assert CoCoOpCfg(8, None, "{}", 4).meta_ratio == 4 and CoCoOpCfg(8, None, "{}", 4).input == "pca"
    assert MaPLeCfg(2, 6, "a photo of {}").input == "pca"


# ---------------------------------------------------------------- input='projection'
@pytest.mark.parametrize("name", TRAINED)
def test_projection_adds_exactly_the_projection(name, clip, pixels):
    ref, rng_ref = _make(name, clip, pixels)
    m, rng_m = _make(name, clip, pixels, input="projection")
    assert isinstance(m.input, ProjectionInput)
    assert isinstance(m, LinearProbeCLIP if name == "linear-probe" else PromptedCLIP)
    tr = lambda mod: [(n, q) for n, q in _own_params(mod) if q.requires_grad]
    added = sorted(set(n for n, _ in tr(m)) - set(n for n, _ in tr(ref)))
    assert added == ["input.proj.bias", "input.proj.weight"]
    assert sum(q.numel() for _, q in tr(m)) - sum(q.numel() for _, q in tr(ref)) == C_TOTAL * 3 + 3
    # the rest of the method is the PCA method's: same names in the same order, same initial values, same RNG stream
    rest = [(n, q) for n, q in _own_params(m) if not n.startswith("input.")]
    assert [n for n, _ in rest] == [n for n, _ in _own_params(ref)]
    assert all(torch.equal(q, dict(_own_params(ref))[n]) for n, q in rest)
    assert torch.equal(rng_m, rng_ref)


@pytest.mark.parametrize("name", TRAINED)
def test_projection_starts_at_the_pca_image(name, clip, pixels):
    ref, _ = _make(name, clip, pixels)
    m, _ = _make(name, clip, pixels, input="projection")
    b = _batch()
    w = m.input.proj.weight
    assert w.shape == (3, C_TOTAL, 1, 1) and torch.count_nonzero(w[:, BANDS["hsi"]:]) == 0   # the LiDAR column starts at zero
    with torch.no_grad():
        torch.testing.assert_close(m.input(b), ref.input(b), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m(b).logits, ref(b).logits, atol=1e-4, rtol=1e-4)
        lid = {**b, "lidar": b["lidar"] * 5 + 3}
        assert torch.equal(m(lid).logits, m(b).logits)                              # at step 0 the LiDAR has no weight


@pytest.mark.parametrize("name", TRAINED)
def test_projection_gets_gradients_through_the_frozen_tower(name, clip, pixels):
    m, _ = _make(name, clip, pixels, input="projection")
    b = _batch()
    before = {n: t.detach().clone() for n, t in clip.model.named_parameters()}
    loss = m.loss(m(b), b)
    loss.backward()
    g = m.input.proj.weight.grad
    assert g is not None and g[:, BANDS["hsi"]:].abs().sum() > 0 and g[:, : BANDS["hsi"]].abs().sum() > 0
    assert m.input.proj.bias.grad.abs().sum() > 0
    assert all(q.grad is None for q in m.clip.parameters()), "a frozen CLIP weight received a gradient"
    dead = [n for n, q in m.named_parameters() if q.requires_grad and (q.grad is None or not q.grad.abs().sum() > 0)]
    assert dead == []
    torch.optim.SGD([q for q in m.parameters() if q.requires_grad], lr=0.5).step()
    assert all(torch.equal(before[n], t) for n, t in clip.model.named_parameters()), "the frozen backbone changed"
    # after one step the LiDAR reaches the logits: changing only the LiDAR band changes the output
    with torch.no_grad():
        lid = {**b, "lidar": b["lidar"] * 5 + 3}
        assert not torch.allclose(m(lid).logits, m(b).logits, atol=1e-6)


@pytest.mark.parametrize("name", ["coop", "maple"])
def test_random_projection_sees_the_lidar_at_once(name, clip):
    "init='random': every band is in the image from the start (no fit step)."
    torch.manual_seed(0)
    m = create_method(name, clip, _spec())
    m.input = ProjectionInput(_spec(), clip.image_size[0], clip.in_channels, init="random")
    assert fit_inputs(m, np.zeros((10, 8))) == []
    b = _batch()
    with torch.no_grad():
        assert not torch.allclose(m(b).logits, m({**b, "lidar": b["lidar"] + 1}).logits, atol=1e-6)


def test_projection_with_the_trainer_helpers(clip, pixels):
    "Out of weight decay (like prompts), saved in the trainable state with its fitted flag, and never re-fitted after loading."
    m, _ = _make("coop", clip, pixels, input="projection")
    decay, rest = split_decay(m)
    assert "input.proj.weight" in [n for n, _ in rest] and "input.proj.weight" not in [n for n, _ in decay]
    with torch.no_grad(): m.input.proj.weight.add_(0.1)
    state = trainable_state(m)
    assert {"input.proj.weight", "input.proj.bias", "input.fitted_"} <= set(state)
    fresh, _ = _make("coop", clip, pixels, input="projection")
    load_trainable_state(fresh, state)
    assert torch.equal(fresh.input.proj.weight, m.input.proj.weight)
    assert fit_inputs(fresh, pixels) == []                                             # a loaded projection is left alone


def test_projection_runner_protocol(clip, pixels, tiny_scene):
    "experiment.build_method fits the projection on the scene's (normalised) HSI training pixels."
    from rs_prompt_lab.experiment import PixelExpCfg, build_method
    cfg = PixelExpCfg.from_flat(dataset="tiny", method="coop", method_kw={"input": "projection"}, backbone="random:rs-tiny", patch_size=3)
    rc = np.argwhere(tiny_scene.splits["train"])
    m = build_method(cfg, tiny_scene, 0, rc)
    assert isinstance(m.input, ProjectionInput) and m.input.fitted
    assert torch.count_nonzero(m.input.proj.weight[:, 8:]) == 0 and torch.count_nonzero(m.input.proj.weight[:, :8]) > 0
    unfitted = create_method("coop", clip, _spec(), input="projection")
    assert unfitted.input.needs_fit and not unfitted.input.fitted
    with pytest.raises(ConfigError, match="not fitted"):
        unfitted(_batch())


def test_input_option_errors(clip):
    with pytest.raises(ConfigError, match="zero-shot trains nothing"):
        create_method("zeroshot", clip, _spec(), input="projection")
    with pytest.raises(ConfigError, match="Allowed: pca, projection"):
        method_config("coop", input="full")                      # fails when the config is built, before any data is read
    with pytest.raises(ConfigError, match="scene images take the backbone's own preprocessing"):
        create_method("maple", clip, ImageSpec(["a", "b"], size=64), input="projection")


@pytest.mark.realdata
def test_projection_on_real_houston(shared_data, clip):
    "144 CASI bands + 21 LiDAR features: the projection starts at the whitened PCA image of the real spectra."
    from rs_prompt_lab.data.manifest import load_dataset
    scene = load_dataset("houston2013-pixelset", root=shared_data / "houston2013")
    hsi, lidar = scene.modalities["hsi"][0], scene.modalities["lidar"][0]
    bands = {"hsi": hsi.shape[1], "lidar": lidar.shape[1]}
    spec = PixelSpec(scene.class_names, bands, 1)
    torch.manual_seed(0)
    m = create_method("coop", clip, spec, input="projection")
    fit_inputs(m, hsi)
    ref = PCAInput(spec, clip.image_size[0], pca=hsi)
    n_tr = sum(q.numel() for q in m.input.parameters() if q.requires_grad)
    assert n_tr == (144 + 21) * 3 + 3
    idx = np.random.default_rng(0).choice(len(hsi), 32, replace=False)
    batch = {"hsi": torch.from_numpy(hsi[idx]).float()[:, :, None, None], "lidar": torch.from_numpy(lidar[idx]).float()[:, :, None, None]}
    with torch.no_grad():
        torch.testing.assert_close(m.input(batch), ref(batch), atol=2e-3, rtol=1e-3)
