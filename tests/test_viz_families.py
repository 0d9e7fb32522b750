"""viz builders of the later families against real objects: BiMoRS (viz.scene) on rs-tiny with synthetic captions, and
modality alignment (viz.align) on a real AlignModel and a PAINT run folder written by `rs-lab train paint`. Each
checks the data the figures draw (shapes, sums, which points a line joins, retrieval hits) and one clear error per
bad input; the figures themselves are built once to catch a broken drawing path."""
import numpy as np
import pytest
import torch

from rs_prompt_lab.core import ConfigError, DataError, load_json
from rs_prompt_lab.inputs import ImageSpec
from rs_prompt_lab.methods import create_method
from rs_prompt_lab.viz.scene import (attention_heat, caption_share, caption_share_figure, caption_share_hv, inspect_scene, patch_map,
                                     patch_shares, scene_dashboard, scene_figure, shares, top_k)
from rs_prompt_lab.viz.align import (align_dashboard, alpha_curve, alpha_curve_figure, class_index, pair_embedding, pair_embedding_figure,
                                     pair_embedding_hv, retrieval, retrieval_figure)

pytestmark = pytest.mark.usefixtures("one_thread")


# (a) BiMoRS ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bimors(clip):
    "A BiMoRS on rs-tiny, 3 classes x 3 synthetic images with layout captions embedded by the text tower, inspected once."
    from rs_prompt_lab.synth.images import make_scene_images
    from rs_prompt_lab.scene.synthcap import SynthCaptioner
    from rs_prompt_lab.scene.encoders import TextTowerEncoder
    from rs_prompt_lab.scene.protocol import SceneBatches, loader
    ds = make_scene_images(n_per_class=3, size=64, seed=1, classes=["forest", "river", "runway"])
    idx = list(range(len(ds)))
    caps = SynthCaptioner().caption(ds, idx)
    enc = TextTowerEncoder(clip)
    torch.manual_seed(0)
    model = create_method("bimors", clip, ImageSpec(ds.class_names, size=64, caption_dim=enc.dim), n_ctx=3, ctx_init=None)
    batch = next(iter(loader(SceneBatches(ds, idx, {i: i for i in range(3)}, 64, 3, enc.encode(caps)), len(idx), False, 0)))
    return model, batch, caps, inspect_scene(model, batch, caps)


def test_bimors_attention_data_matches_the_model(bimors):
    model, batch, caps, d = bimors
    with torch.no_grad(): out = model(batch)
    assert d["kv_names"] == ["visual", "caption"] and d["attention"].shape == (9, 3, 2)
    assert np.allclose(d["attention"], out["kv_attention"].numpy()) and np.allclose(d["attention"].sum(-1), 1, atol=1e-5)
    assert np.allclose(d["probs"], out.logits.softmax(-1).numpy(), atol=1e-6)
    assert np.allclose(d["context"], out["context"].numpy()) and d["context_init"].shape == (3, model.learner.ctx.shape[1])
    assert d["images"].shape == (9, 64, 64, 3) and np.allclose(d["images"][4], batch["image"][4].permute(1, 2, 0).numpy())
    assert d["captions"] == caps and list(d["labels"]) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # the patch map splits the visual weight exactly: per context vector, patches + caption = 1
    assert d["patch_attention"].shape == (9, 3, 8, 8)
    assert np.allclose(d["patch_attention"].sum((-2, -1)), d["attention"][..., 0], atol=1e-6)
    assert np.isclose(patch_map(d, 2, ctx=1).sum() + shares(d, 2, ctx=1)["caption"], 1, atol=1e-5)
    assert np.allclose(patch_map(d, 2), d["patch_attention"][2].mean(0))
    h = attention_heat(d, 5)
    assert h.shape == (3, 2) and h.ticks == ["visual", "caption"] and np.allclose(h.values, d["attention"][5])
    tk = top_k(d, 7, 3)
    assert [p for _, p in tk] == sorted((p for _, p in tk), reverse=True) and np.isclose(sum(p for _, p in tk), 1, atol=1e-5)
    assert len(scene_figure(d, 1, ctx=0).axes) >= 4


def test_patch_shares_follow_the_patch_keys(bimors, clip):
    "A patch that matches what a query seeks gets more of the visual weight: make one patch's token dominate the scores."
    model, batch, _, _ = bimors
    L = model.learner
    with torch.no_grad():
        tok = clip.encode_image(model.input(batch), return_tokens=3, normalize=True)["tokens"][3][:1, 1:]    # (1, 64, D)
        s = patch_shares(L, tok)
        assert s.shape == (1, 3, 64) and torch.allclose(s.sum(-1), torch.ones(1, 3), atol=1e-5)
        best = int(s[0, 0].argmax())
        same = tok.clone(); same[:, :] = tok[:, best:best + 1]                    # every patch is the best one: equal shares
        assert torch.allclose(patch_shares(L, same), torch.full((1, 3, 64), 1 / 64), atol=1e-6)


def test_caption_share_per_class(bimors):
    _, _, _, d = bimors
    t = caption_share(d)
    assert t["classes"] == ["forest", "river", "runway"] and list(t["n"]) == [3, 3, 3]
    for k in range(3):   # the mean over exactly that class's images and every context vector
        assert np.isclose(t["caption"][k], d["attention"][3 * k:3 * k + 3, :, 1].mean(), atol=1e-6)
    assert np.allclose(t["caption"] + t["visual"], 1, atol=1e-5)
    assert len(caption_share_hv(t).data) == 6 and caption_share_figure(t).axes
    only = {**d, "labels": np.array([0, 0, 0, 0, 0, 0, 2, 2, 2])}                # a class without images is left out
    assert caption_share(only)["classes"] == ["forest", "runway"]


def test_scene_dashboard_redraws_on_a_new_image(bimors):
    box = scene_dashboard(bimors[3])
    before = box.figure
    box.controls["image"].value = 6
    assert box.figure is not before and box.figure.axes[0].get_title().startswith("image 6: runway")
    box.controls["ctx"].value = 2
    assert box.figure.axes[1].get_title().startswith("context vector 2")


def test_scene_views_refuse_bad_input(bimors, clip):
    model, batch, caps, d = bimors
    with pytest.raises(DataError, match="image 9 is out of range; pick 0..8"): scene_figure(d, 9)
    with pytest.raises(DataError, match="context vector 3 is out of range; pick 0..2"): shares(d, 0, ctx=3)
    with pytest.raises(ConfigError, match="k must be an integer >= 1, got 0"): top_k(d, 0, 0)
    with pytest.raises(DataError, match="2 captions for a batch of 9 images"): inspect_scene(model, batch, caps[:2])
    with pytest.raises(DataError, match="needs a batch dict with 'image'"): inspect_scene(model, batch["image"])
    with pytest.raises(ConfigError, match="PromptedCLIP is not a BiMoRS model"):
        inspect_scene(create_method("coop", clip, ImageSpec(["forest", "river", "runway"], size=64)), batch)
    with pytest.raises(DataError, match="no 'label'"): caption_share({**d, "labels": None})
    vis = create_method("bimors", clip, ImageSpec(["forest", "river", "runway"], size=64), keys="visual")
    with pytest.raises(DataError, match=r"needs both keys, this model has \['visual'\]"): caption_share(inspect_scene(vis, batch))


# (b) modality alignment ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def aligned(clip):
    "Teacher / student embeddings of 22 synthetic RGB / S2 pairs from a real (untrained) AlignModel."
    from rs_prompt_lab.align.student import AlignModel, PairCollate, SensorStudent, embed_pairs
    from rs_prompt_lab.synth.images import make_paired_images
    pairs = make_paired_images(n_per_class=1, size=64, seed=0)
    torch.manual_seed(0)
    model = AlignModel(clip, SensorStudent.for_backbone(clip, 13, arch=dict(patch_size=8, embed_dim=64, depth=2, num_heads=2)), pairs.class_names)
    batch = PairCollate("s2")([pairs[i] for i in range(len(pairs))])
    t, s, y = embed_pairs(model, [batch])
    return t, s, y, list(pairs.class_names), batch


def test_pair_embedding_joins_each_sample_to_itself(aligned):
    from rs_prompt_lab.align.gap import gap_stats, project_pair
    t, s, y, names, _ = aligned
    d = pair_embedding(t, s, y, names)
    ta, sa = project_pair(t, s)
    assert d["segments"].shape == (22, 2, 2)
    assert np.allclose(d["segments"][:, 0], ta) and np.allclose(d["segments"][:, 1], sa)      # line i: teacher i -> student i
    assert not np.allclose(d["segments"][:, 1], sa[::-1])
    assert list(d["labels"]) == list(y.numpy()) and d["stats"] == pytest.approx(gap_stats(t, s))
    pts = pair_embedding_hv(d).values()
    assert np.allclose(pts[0].data[["x0", "y0"]].values, ta) and np.allclose(pts[2].data[["x", "y"]].values, sa)
    assert pair_embedding_figure(d, highlight=3).axes
    ml = np.zeros((22, 4)); ml[:, 2] = 1; ml[0] = 0; ml[1, 1] = 1                            # multi-hot: first positive label
    assert list(class_index(ml, 22)[:3]) == [-1, 1, 2]
    with pytest.raises(DataError, match=r"same shape, got teacher \(22, 128\) and student \(21, 128\)"): pair_embedding(t, s[:21])
    with pytest.raises(DataError, match="21 labels for 22 samples"): pair_embedding(t, s, y[:21])
    with pytest.raises(DataError, match="must be \\(N, E\\) with N >= 2"): pair_embedding(t[0], s[0])
    with pytest.raises(DataError, match="NaN or inf"): pair_embedding(t * float("nan"), s)


def test_retrieval_hits_against_a_hand_checked_case(aligned):
    q = np.array([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0]])
    c = np.array([[0, 1, 0], [1, 0, 0], [0, 0.2, 1], [1, 0.9, 0]])    # 0 and 1 swapped; 2 and 3 their own partners
    ex = retrieval(q, c, labels=[0, 0, 1, 1], which=[0, 2, 3], k=2)
    # query 0 = x: cosines 0, 1, 0, 0.74 -> top-2 = [1 (miss, same class), 3 (miss, other class)]; partner 0 not in the top 2
    assert [(t["index"], t["hit"], t["same_class"]) for t in ex[0]["top"]] == [(1, False, True), (3, False, False)] and ex[0]["hit_rank"] is None
    assert ex[1]["top"][0]["index"] == 2 and ex[1]["top"][0]["hit"] and ex[1]["hit_rank"] == 1
    assert ex[2]["top"][0]["index"] == 3 and ex[2]["hit_rank"] == 1 and np.isclose(ex[2]["top"][0]["cosine"], 1.9 / np.sqrt(2 * 1.81))
    # on the real embeddings: hit_rank agrees with the rank of the partner in the full similarity order, and R@1 with gap_stats
    from rs_prompt_lab.align.gap import gap_stats
    t, s, y, names, batch = aligned
    full = retrieval(t, s, y, which=range(22), k=22)
    tu, su = torch.nn.functional.normalize(t, dim=-1), torch.nn.functional.normalize(s, dim=-1)
    sim = (tu @ su.T).numpy()
    ranks = [int((sim[i] > sim[i, i]).sum()) + 1 for i in range(22)]
    assert [e["hit_rank"] for e in full] == ranks
    assert np.isclose(np.mean([r == 1 for r in ranks]), gap_stats(t, s)["a_to_b_R@1"])
    imgs = batch["rgb"].permute(0, 2, 3, 1).numpy()
    assert len(retrieval_figure(full[:2], imgs, imgs, class_names=names, labels=y).axes) == 2 * 23
    with pytest.raises(DataError, match="query 22 is out of range; pick 0..21"): retrieval(t, s, which=[22])
    with pytest.raises(ConfigError, match="k must be an integer >= 1, got -1"): retrieval(t, s, k=-1)
    with pytest.raises(DataError, match="no retrieval examples"): retrieval_figure([], imgs, imgs)


def test_align_dashboard_switches_query_and_direction(aligned):
    t, s, y, names, batch = aligned
    d = pair_embedding(t, s, y, names)
    imgs = batch["rgb"].permute(0, 2, 3, 1).numpy()
    box = align_dashboard(d, t, s, imgs, imgs, y, k=4)
    assert box.examples[0]["query"] == 0
    box.controls["query"].value = 7
    assert box.examples == retrieval(t, s, y, [7], 4)
    box.controls["direction"].value = "s2t"
    assert box.examples == retrieval(s, t, y, [7], 4)


def test_alpha_curve_from_a_paint_run_folder(tmp_path):
    "rs-lab train paint --quick writes a seed folder; alpha_curve reads every alpha of it (and refuses a student run)."
    from rs_prompt_lab.cli import main
    assert main(["train", "paint", "--seeds", "0", "--quick", "--no-progress", "--out", str(tmp_path / "runs")]) == 0
    rd = next((tmp_path / "runs").rglob("seed0"))
    m = load_json(rd / "metrics.json")
    c = alpha_curve(rd)
    assert c["alphas"] == [0.0, 0.25, 0.5, 0.75, 1.0] and c["selected_alpha"] == m["selected_alpha"] and c["metric"] == m["metric"]
    assert set(c["series"]) == {"target", "supported", "target_new", "mR"}
    assert c["series"]["supported"] == [m[f"a{a:03d}:supported"] for a in (0, 25, 50, 75, 100)]
    assert alpha_curve(rd, series=["target_val"])["series"]["target_val"][-1] == m["a100:target_val"]
    assert alpha_curve_figure(c).axes
    with pytest.raises(DataError, match="stage 'align' is not a PAINT run"): alpha_curve({"method": "align", "target": 0.4})
    with pytest.raises(DataError, match="not a finished PAINT seed folder"): alpha_curve(tmp_path / "runs")
