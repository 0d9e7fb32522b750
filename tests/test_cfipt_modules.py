"""CF-IPT building blocks (MFPG, IAE, S2GPT / V-TPI): shapes for every patch and image size, gradients,
ablation switches, the selective scan against its reference loop, dtype/device, bad input, the parameter budget."""
import numpy as np
import pytest
import torch
from torch import nn

from rs_prompt_lab.core import ConfigError, DataError
from rs_prompt_lab.cfipt.mfpg import AMFF, MFPG, IS2PG
from rs_prompt_lab.cfipt.iae import IAE, BilinearAdapter, plan_iae, convt_out
from rs_prompt_lab.cfipt.s2gpt import (S2GPT, SelectiveSSM, TransformerExchange, VTPICoupler, cfipt_budget,
                                       count_params, selective_scan, selective_scan_ref, s2pt_trans)

ODD_P = list(range(1, 14, 2))
VITB16 = dict(vision_width=768, text_width=512, n_layers=12)   # ViT-B/16 numbers, passed in as arguments
VITB16_PARAMS = 149_620_737                                      # open_clip ViT-B-16, counted with random init


def _x(B=2, C=8, D=1, p=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, p, p, generator=g), torch.randn(B, D, p, p, generator=g)


def _dead_params(module):
    "Names of parameters that got no (or an all-zero) gradient."
    return [n for n, p in module.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]


# ---------------------------------------------------------------- shapes
@pytest.mark.parametrize("p", ODD_P)
def test_mfpg_shapes_every_patch_size(p):
    xh, xl = _x(C=8, D=1, p=p)
    o = MFPG(8, 1, p, width=16)(xh, xl)
    assert o["fused"].shape == (2, 16, p, p)
    assert o["p_sp"].shape == (2, 8, 8) and o["p_sa"].shape == (2, p * p, p * p)
    assert ((o["p_sp"] > 0) & (o["p_sp"] < 1)).all() and torch.isfinite(o["fused"]).all()


@pytest.mark.parametrize("S", [32, 64, 224])
@pytest.mark.parametrize("p", ODD_P)
def test_iae_lands_exactly_on_image_size(p, S):
    plan = plan_iae(p, S)
    assert len(plan) == 4 and plan[0].n_in == p and plan[-1].n_out == S
    for a, b in zip(plan[:-1], plan[1:]): assert a.n_out == b.n_in
    iae = IAE(8, p, S, channels=[8, 8, 8])            # small widths: the shapes are what is tested here
    convs = [m for m in iae.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert len(convs) == 4
    x = torch.randn(2, 8, p, p)
    for conv, st in zip(convs, plan):                # each real layer produces the planned side
        x = conv(x); assert x.shape[-1] == st.n_out == convt_out(st.n_in, *conv.kernel_size[:1], conv.stride[0],
                                                                   conv.padding[0], conv.output_padding[0])
    assert iae(torch.randn(2, 8, p, p)).shape == (2, 3, S, S)
    assert BilinearAdapter(8, p, S)(torch.randn(2, 8, p, p)).shape == (2, 3, S, S)


def test_mfpg_then_iae_pipeline_and_gradients():
    xh, xl = _x()
    mfpg, iae = MFPG(8, 1, 9, width=16), IAE(16, 9, 64)
    o = mfpg(xh, xl)
    img = iae(o["fused"])
    assert img.shape == (2, 3, 64, 64)
    img.square().mean().backward()
    assert _dead_params(mfpg) == [] and _dead_params(iae) == []


@pytest.mark.parametrize("interaction", ["s2gpt", "transformer"])
def test_coupler_shapes_and_gradients(interaction):
    torch.manual_seed(0)
    n_layers, Lv, Lt, Dv, Dt = 3, 4, 2, 32, 24          # different widths and prompt counts on purpose
    _, o = None, MFPG(8, 1, 9, width=16)(*_x())
    cp = VTPICoupler(Dv, Dt, n_layers, width=16, interaction=interaction)
    PV = [nn.Parameter(torch.randn(1, Lv, Dv) * .02) for _ in range(n_layers)]
    PT = [nn.Parameter(torch.randn(1, Lt, Dt) * .02) for _ in range(n_layers)]
    vs, ts = cp.couple_all(PV, PT, o["p_sp"], o["p_sa"])
    B = 2 if interaction == "s2gpt" else 1               # S2PtTrans makes the prompts per sample
    assert [v.shape for v in vs] == [(B, Lv, Dv)] * n_layers and [t.shape for t in ts] == [(B, Lt, Dt)] * n_layers
    (sum(v.square().sum() for v in vs) + sum(t.square().sum() for t in ts)).backward()
    assert _dead_params(cp) == []
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in PV + PT)


def test_s2gpt_per_layer_blocks_and_unshared_projections():
    cp = VTPICoupler(32, 24, 4, width=16, share_proj=False)
    assert len(cp.blocks) == 4 and len(cp.down_v) == 4
    assert count_params(cp) > count_params(VTPICoupler(32, 24, 4, width=16, share_proj=True))


# ---------------------------------------------------------------- ablation switches
def test_fusion_switch_changes_output():
    torch.manual_seed(0)
    xh, xl = _x()
    amff, cat = MFPG(8, 1, 9, width=16), MFPG(8, 1, 9, width=16, fusion="concat")
    missing = cat.load_state_dict(amff.state_dict(), strict=False)
    assert missing.missing_keys == [] and all(k.startswith("amff.") for k in missing.unexpected_keys)
    assert not torch.allclose(amff(xh, xl)["fused"], cat(xh, xl)["fused"])
    assert count_params(cat) < count_params(amff)


def test_prompts_ones_switch():
    torch.manual_seed(0)
    xh, xl = _x()
    s2, ones = MFPG(8, 1, 9, width=16), MFPG(8, 1, 9, width=16, prompts="ones")
    ones.load_state_dict(s2.state_dict(), strict=False)
    o1, o2 = s2(xh, xl), ones(xh, xl)
    assert torch.equal(o2["p_sp"], torch.ones(2, 8, 8)) and torch.equal(o2["p_sa"], torch.ones(2, 81, 81))
    assert not torch.allclose(o1["fused"], o2["fused"])
    # the learned matrices depend on the *other* modality; the ones do not
    assert not torch.allclose(s2(xh, xl + 1)["p_sp"], o1["p_sp"])
    assert not hasattr(ones.is2pg, "q_sp") and count_params(ones) < count_params(s2)


def test_adapter_switch_changes_image():
    f = torch.randn(2, 16, 9, 9)
    a, b = IAE(16, 9, 64).eval()(f), BilinearAdapter(16, 9, 64)(f)
    assert a.shape == b.shape and not torch.allclose(a, b)
    # bilinear keeps a smooth image: neighbouring pixels differ much less than in the random-init IAE output
    assert (b.diff(dim=-1).abs().mean() / b.abs().mean()) < (a.diff(dim=-1).abs().mean() / a.abs().mean())


def test_interaction_switch():
    torch.manual_seed(0)
    PV, PT = torch.randn(1, 4, 32), torch.randn(1, 4, 24)
    outs = {k: VTPICoupler(32, 24, 2, width=16, interaction=k)(PV, PT, 1) for k in ("s2gpt", "transformer", "none")}
    assert torch.equal(outs["none"][0], PV) and torch.equal(outs["none"][1], PT)
    for k in ("s2gpt", "transformer"):
        assert not torch.allclose(outs[k][1], PT)                 # text prompts changed ...
    cp = VTPICoupler(32, 24, 2, width=16)
    assert not torch.allclose(cp(PV + 1, PT, 0)[1], cp(PV, PT, 0)[1])   # ... by the vision prompts
    assert not torch.allclose(cp(PV, PT + 1, 0)[0], cp(PV, PT, 0)[0])   # and vice versa


def test_s2gpt_uses_the_prompt_matrices():
    torch.manual_seed(0)
    blk, P = S2GPT(16, d_state=4), torch.randn(1, 6, 16)
    o = MFPG(8, 1, 9, width=16)(*_x())
    a = blk(P, o["p_sp"], o["p_sa"])
    assert a.shape == (2, 6, 16)
    assert not torch.allclose(a, blk(P, torch.ones_like(o["p_sp"]), torch.ones_like(o["p_sa"])))
    assert not torch.allclose(a[0], a[1])                          # per-sample matrices give per-sample prompts
    assert torch.equal(s2pt_trans(P), P)


# ---------------------------------------------------------------- interpretive switches (defaults unchanged)
def _shared_weights(src, dst):
    own = dst.state_dict()
    dst.load_state_dict({k: v for k, v in src.state_dict().items() if k in own and own[k].shape == v.shape}, strict=False)
    return dst


def test_mfpg_switch_defaults_are_the_previous_behaviour():
    xh, xl = _x()
    torch.manual_seed(0); a = MFPG(8, 1, 9, width=16)
    torch.manual_seed(0); b = MFPG(8, 1, 9, width=16, normalize=True, attention="mlp", amff_input="projected")
    oa, ob = a(xh, xl), b(xh, xl)
    assert all(torch.equal(oa[k], ob[k]) for k in oa)
    assert [n for n, _ in a.named_parameters()] == [n for n, _ in b.named_parameters()]


@pytest.mark.parametrize("kw", [dict(normalize=False), dict(attention="pooled"), dict(amff_input="full")])
def test_mfpg_switches_change_output(kw):
    torch.manual_seed(0)
    xh, xl = _x()
    ref = MFPG(8, 1, 9, width=16)
    alt = _shared_weights(ref, MFPG(8, 1, 9, width=16, **kw))
    fr, fa = ref(xh, xl)["fused"], alt(xh, xl)["fused"]
    assert not torch.allclose(fr[:, :fa.shape[1]], fa[:, :fr.shape[1]])
    fa.square().mean().backward()
    assert _dead_params(alt) == []


def test_pooled_attention_and_full_amff_input():
    am, pooled = AMFF(16), AMFF(16, attention="pooled")
    assert count_params(pooled) == count_params(am) - count_params(am.mlp)
    fm = torch.randn(2, 16, 5, 5)
    gate = torch.sigmoid(fm.mean((2, 3), keepdim=True) + fm.amax((2, 3), keepdim=True))
    _shared_weights(am, pooled)
    assert torch.allclose(pooled(fm), sum(c(fm * gate) for c in am.convs) + fm, atol=1e-5)
    full = MFPG(8, 1, 9, width=16, amff_input="full")
    assert full.width == 9 and isinstance(full.proj, nn.Identity) and full(*_x())["fused"].shape == (2, 9, 9, 9)
    with pytest.raises(ConfigError, match="Allowed: mlp, pooled"): AMFF(16, attention="eca")
    with pytest.raises(ConfigError, match="Allowed: projected, full"): MFPG(8, 1, 9, amff_input="half")


def test_budget_follows_block_options_and_fused_width():
    base = cfipt_budget(144, 1, 11, 224, **VITB16)
    mamba = cfipt_budget(144, 1, 11, 224, **VITB16, block=dict(expand=2, d_state=16, d_conv=4, dt_rank=4))
    assert mamba["coupler"] == count_params(VTPICoupler(768, 512, 12, 64, expand=2, d_state=16, d_conv=4, dt_rank=4)) > base["coupler"]
    full = cfipt_budget(144, 1, 11, 224, **VITB16, amff_input="full")
    assert full["adapter"] == count_params(IAE(145, 11, 224)) and full["mfpg"] > base["mfpg"]


@pytest.fixture(scope="module")
def tiny_clip():
    from rs_prompt_lab.backbones import load_backbone
    torch.manual_seed(0)
    return load_backbone("random:rs-tiny")[0]


def _cfipt_pair(clip, **kw):
    from rs_prompt_lab.cfipt.model import CFIPT
    torch.manual_seed(1)
    ref = CFIPT(clip, ["grass", "road", "water"], {"hsi": 8, "lidar": 1}, 5, mfpg_width=16, coupler_width=16).eval()
    alt = _shared_weights(ref, CFIPT(clip, ["grass", "road", "water"], {"hsi": 8, "lidar": 1}, 5, mfpg_width=16, coupler_width=16, **kw).eval())
    g = torch.Generator().manual_seed(3)
    b = {"hsi": torch.randn(2, 8, 5, 5, generator=g), "lidar": torch.randn(2, 1, 5, 5, generator=g)}
    with torch.no_grad(): return ref(b).logits, alt(b).logits


def test_cfipt_switch_defaults_are_bit_identical(tiny_clip):
    a, b = _cfipt_pair(tiny_clip, row_normalize=True, channel_attention="mlp", amff_input="projected",
                       iae_last_act=False, scan_direction="bidirectional")
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw", [dict(row_normalize=False), dict(channel_attention="pooled"), dict(amff_input="full"),
                                dict(iae_last_act=True), dict(scan_direction="forward")])
def test_cfipt_switches_change_output(tiny_clip, kw):
    a, b = _cfipt_pair(tiny_clip, **kw)
    assert a.shape == b.shape and not torch.allclose(a, b, atol=1e-6)


def test_forward_scan_equals_unidirectional_block(tiny_clip):
    from rs_prompt_lab.cfipt.model import CFIPT
    mk = lambda **kw: CFIPT(tiny_clip, ["grass", "road"], {"hsi": 8, "lidar": 1}, 3, mfpg_width=16, coupler_width=16, **kw)
    fwd, blk = mk(scan_direction="forward"), mk(bidirectional=False)
    assert all(not b.bidirectional for b in fwd.coupler.blocks) and all(not b.bidirectional for b in blk.coupler.blocks)
    assert all(b.bidirectional for b in mk().coupler.blocks)
    with pytest.raises(ConfigError, match="contradicts"): mk(scan_direction="forward", bidirectional=True)
    with pytest.raises(ConfigError, match="S2GPT block"): mk(scan_direction="forward", interaction="none")
    with pytest.raises(ConfigError, match="needs adapter='iae'"): mk(adapter="bilinear", iae_last_act=True)


# ---------------------------------------------------------------- the selective scan
@pytest.mark.parametrize("L", [1, 5, 16])
def test_parallel_scan_matches_reference_loop(L):
    g = torch.Generator().manual_seed(L)
    B, E, N = 3, 6, 4
    u = torch.randn(B, L, E, generator=g, dtype=torch.float64)
    delta = torch.nn.functional.softplus(torch.randn(B, L, E, generator=g, dtype=torch.float64))
    A = -torch.exp(torch.randn(E, N, generator=g, dtype=torch.float64))
    Bm, Cm = torch.randn(B, L, N, generator=g, dtype=torch.float64), torch.randn(B, L, N, generator=g, dtype=torch.float64)
    D = torch.randn(E, generator=g, dtype=torch.float64)
    ref = selective_scan_ref(u, delta, A, Bm, Cm, D)
    assert torch.allclose(selective_scan(u, delta, A, Bm, Cm, D), ref, atol=1e-10)
    # hand-written first two steps of the recurrence
    h1 = delta[:, 0, :, None] * Bm[:, 0, None] * u[:, 0, :, None]
    assert torch.allclose(ref[:, 0], (h1 * Cm[:, 0, None]).sum(-1) + D * u[:, 0])
    if L > 1:
        h2 = torch.exp(delta[:, 1, :, None] * A) * h1 + delta[:, 1, :, None] * Bm[:, 1, None] * u[:, 1, :, None]
        assert torch.allclose(ref[:, 1], (h2 * Cm[:, 1, None]).sum(-1) + D * u[:, 1])


@pytest.mark.parametrize("scan", ["parallel", "sequential"])
def test_ssm_is_causal_and_selective(scan):
    torch.manual_seed(0)
    ssm = SelectiveSSM(16, d_state=4, scan=scan)
    x = torch.randn(2, 10, 16)
    y = ssm(x)
    x2 = x.clone(); x2[:, 6:] = torch.randn(2, 4, 16)
    y2 = ssm(x2)
    assert torch.allclose(y2[:, :6], y[:, :6], atol=1e-6) and not torch.allclose(y2[:, 6:], y[:, 6:])
    # selective: Δ, B, C depend on the input (scaling the input does not scale the output linearly)
    assert not torch.allclose(ssm(2 * x), 2 * y, atol=1e-4)
    # A is negative (a decaying state)
    assert (-torch.exp(ssm.A_log) < 0).all()


def test_unidirectional_block_is_causal_without_matrices():
    torch.manual_seed(0)
    blk = S2GPT(16, d_state=4, bidirectional=False)
    P = torch.randn(2, 8, 16); P2 = P.clone(); P2[:, -1] += 3
    assert torch.allclose(blk(P2)[:, :-1], blk(P)[:, :-1], atol=1e-6)


# ---------------------------------------------------------------- dtype / device follow the inputs
def test_modules_follow_input_dtype():
    xh, xl = (t.double() for t in _x())
    mfpg, iae = MFPG(8, 1, 9, width=16).double(), IAE(16, 9, 32).double()
    o = mfpg(xh, xl)
    assert o["fused"].dtype == o["p_sp"].dtype == o["p_sa"].dtype == torch.float64
    assert iae(o["fused"]).dtype == torch.float64
    ones = MFPG(8, 1, 9, width=16, prompts="ones").double()(xh, xl)
    assert ones["p_sa"].dtype == torch.float64
    cp = VTPICoupler(32, 24, 2, width=16).double()
    pv, pt = cp(torch.randn(1, 4, 32, dtype=torch.float64), torch.randn(1, 2, 24, dtype=torch.float64), 0, o["p_sp"], o["p_sa"])
    assert pv.dtype == pt.dtype == torch.float64


# ---------------------------------------------------------------- bad input
def test_bad_input_gives_clear_errors():
    m = MFPG(8, 1, 9)
    with pytest.raises(DataError, match="expects \\(B, 8, 9, 9\\)"): m(torch.randn(2, 7, 9, 9), torch.randn(2, 1, 9, 9))
    with pytest.raises(DataError, match="x_aux"): m(torch.randn(2, 8, 9, 9), torch.randn(2, 2, 9, 9))
    with pytest.raises(ConfigError, match="odd"): MFPG(8, 1, 10)
    with pytest.raises(ConfigError, match="Allowed: amff, concat"): MFPG(8, 1, 9, fusion="add")
    with pytest.raises(ConfigError, match="Allowed: s2, ones"): IS2PG(8, 1, prompts="eye")
    with pytest.raises(DataError, match="built for p=9"): IAE(16, 9, 64)(torch.randn(2, 16, 11, 11))
    with pytest.raises(ConfigError, match="Allowed: s2gpt, transformer, none"): VTPICoupler(32, 24, 2, interaction="mamba")
    with pytest.raises(ConfigError, match="6 layers"): VTPICoupler(32, 24, 6).couple_all([torch.randn(1, 2, 32)], [torch.randn(1, 2, 24)])


# ---------------------------------------------------------------- budget
def test_cfipt_budget_vitb16_within_paper_budget():
    b = cfipt_budget(144, 1, 11, 224, backbone_params=VITB16_PARAMS, **VITB16)
    assert b["total"] <= 1_140_000 and b["percent"] <= 0.76
    # every part is counted from a real module / the prompt shapes, and they add up
    assert b["total"] == b["mfpg"] + b["adapter"] + b["coupler"] + b["prompts"]
    assert b["mfpg"] == count_params(MFPG(144, 1, 11, 64)) and b["adapter"] == count_params(IAE(64, 11, 224))
    assert b["coupler"] == count_params(VTPICoupler(768, 512, 12, 64))
    assert b["prompts"] == 12 * (4 * 768 + 4 * 512)
    # every ablation stays in budget too
    for kw in (dict(interaction="transformer"), dict(adapter="bilinear"), dict(fusion="concat"), dict(prompts="ones")):
        assert cfipt_budget(144, 1, 11, 224, backbone_params=VITB16_PARAMS, **VITB16, **kw)["total"] <= 1_140_000


def test_budget_reads_widths_from_arguments():
    small = cfipt_budget(144, 1, 11, 224, vision_width=768, text_width=512, n_layers=12)
    wider = cfipt_budget(144, 1, 11, 224, vision_width=1024, text_width=768, n_layers=24)
    assert wider["coupler"] > small["coupler"] and wider["prompts"] == 24 * (4 * 1024 + 4 * 768)
    assert cfipt_budget(144, 1, 11, 224, **VITB16, interaction="none")["coupler"] == 0


# ---------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_houston_pixels_through_mfpg_and_iae(shared_data):
    "Real 144-band CASI spectra + 21 LiDAR features of Houston2013 training pixels (patch size 1)."
    import scipy.io as sio
    d = shared_data / "houston2013" / "mdl_rs_pixel_sets"
    hsi = sio.loadmat(d / "HSI_TrSet.mat")["HSI_TrSet"].astype(np.float32)
    lid = sio.loadmat(d / "LiDAR_TrSet.mat")["LiDAR_TrSet"].astype(np.float32)
    y = sio.loadmat(d / "TrLabel.mat")["TrLabel"].ravel()
    assert hsi.shape == (2832, 144) and lid.shape == (2832, 21)
    idx = np.concatenate([np.flatnonzero(y == c)[:4] for c in (1, 9)])    # healthy grass, road
    xh = torch.from_numpy(hsi[idx])[:, :, None, None]                     # (8, 144, 1, 1)
    xl = torch.from_numpy(lid[idx])[:, :, None, None]                     # (8, 21, 1, 1)
    torch.manual_seed(0)
    mfpg, iae = MFPG(144, 21, 1, width=32), IAE(32, 1, 64)
    o = mfpg(xh, xl)
    assert o["fused"].shape == (8, 32, 1, 1) and o["p_sp"].shape == (8, 144, 144) and o["p_sa"].shape == (8, 1, 1)
    img = iae(o["fused"])
    assert img.shape == (8, 3, 64, 64) and torch.isfinite(img).all()
    # the spectral prompt matrix separates the classes: grass pixels are closer to each other than to road pixels
    f = o["p_sp"].flatten(1)
    dist = torch.cdist(f, f)
    within = (dist[:4, :4].sum() + dist[4:, 4:].sum()) / 24
    between = dist[:4, 4:].mean()
    assert between > within
    img.mean().backward()
    assert _dead_params(mfpg) == []
    b = cfipt_budget(144, 21, 1, 224, backbone_params=VITB16_PARAMS, **VITB16)
    assert b["percent"] <= 0.76
