"""Paired synthetic corpus for modality alignment (issue 14, item 6): multi-label targets from the layout, ids, SAR pairs."""
import numpy as np
import pytest
from rs_prompt_lab.core import ConfigError
from rs_prompt_lab.synth.images import (make_paired_images, layout_labels, render_scene_image, LABEL_PARTS, LABEL_MODES,
                                        SCENE_CLASSES, PARTS, SynthImage)

NAMES = list(LABEL_PARTS)


@pytest.fixture(scope="module")
def ml():
    return make_paired_images(n_per_class=6, size=32, seed=0, modalities=("rgb", "sar"), labels="multilabel")


def _rows(ds, cls):
    return [i for i, k in enumerate(ds.ids) if k.rsplit("_", 1)[0] == cls.replace(" ", "_")]


def test_multilabel_shapes_ids_meta(ml):
    assert ml.labels.shape == (6 * 22, len(LABEL_PARTS)) and ml.labels.dtype == np.uint8
    assert set(np.unique(ml.labels)) <= {0, 1} and ml.labels.sum(1).min() >= 1      # every image shows something
    assert ml.class_names == NAMES and ml.meta["multilabel"] is True
    assert ml.modality_names == ("rgb", "sar") and ml.name == "synthetic-pairs-rgb-sar"
    assert len(set(ml.ids)) == len(ml) and ml.ids[6] == "sparse_residential_0000" and ml.ids[-1] == "commercial_area_0005"
    assert all(isinstance(x, SynthImage) for x in ml.a + ml.b)                          # images stay lazy
    assert sorted(np.concatenate(list(ml.splits.values())).tolist()) == list(range(len(ml)))
    s = ml[7]
    assert s["rgb"].shape == (32, 32, 3) and s["sar"].shape == (32, 32, 2) and s["label"].shape == (len(NAMES),)
    assert s["id"] == ml.ids[7] and s["rgb"].dtype == np.uint8 and s["sar"].dtype == np.float32


def test_label_frequencies_informative(ml):
    freq = ml.labels.mean(0)
    bad = {k: round(float(f), 3) for k, f in zip(NAMES, freq) if not 0.05 < f < 0.95}
    assert not bad, bad


def test_deterministic_and_independent_of_modalities(ml):
    again = make_paired_images(n_per_class=6, size=32, seed=0, modalities=("rgb", "sar"), labels="multilabel")
    assert np.array_equal(again.labels, ml.labels) and again.ids == ml.ids
    s2 = make_paired_images(n_per_class=6, size=32, seed=0, labels="multilabel")      # rgb / s2: same layouts, same labels
    assert np.array_equal(s2.labels, ml.labels)
    other = make_paired_images(n_per_class=6, size=32, seed=1, labels="multilabel")
    assert not np.array_equal(other.labels, ml.labels)


def test_labels_follow_what_is_visible(ml):
    col = {k: i for i, k in enumerate(NAMES)}
    assert ml.labels[_rows(ml, "lake"), col["water"]].all()
    assert ml.labels[_rows(ml, "river"), col["water"]].all()
    assert ml.labels[_rows(ml, "parking lot"), col["car or boat"]].mean() >= 0.8
    assert ml.labels[_rows(ml, "parking lot"), col["parking lot"]].all()
    assert ml.labels[_rows(ml, "forest"), col["tree"]].all() and not ml.labels[_rows(ml, "forest"), col["house"]].any()
    assert ml.labels[_rows(ml, "dense residential"), col["house"]].all()
    assert not ml.labels[_rows(ml, "desert"), col["water"]].any()
    # the labels are exactly layout_labels of each image's facts, and the rendered SAR is the same scene
    i = _rows(ml, "harbor")[0]; img = ml.a[i]
    _, facts = render_scene_image(img.name, img.size, img.seed, img.domain, ())
    assert np.array_equal(layout_labels(facts), ml.labels[i])
    imgs, facts2 = render_scene_image(img.name, img.size, img.seed, img.domain, ("sar",))
    assert facts2.keys() == facts.keys() and np.array_equal(imgs["sar"], np.asarray(ml.b[i]))
    water = layout_labels(facts, ["water"])[0]
    assert water == 1 and imgs["sar"][..., 0].min() < -20                               # dark open water in VV


def test_class_mode_unchanged():
    a = make_paired_images(n_per_class=2, size=32, classes=["lake", "harbor"])
    b = make_paired_images(n_per_class=2, size=32, classes=["lake", "harbor"], labels="class")
    for ds in (a, b):
        assert np.array_equal(ds.labels, [0, 0, 1, 1]) and ds.labels.ndim == 1 and ds.class_names == ["lake", "harbor"]
        assert ds.ids == ["lake_0000", "lake_0001", "harbor_0000", "harbor_0001"] and "multilabel" not in ds.meta
        assert ds.meta == dict(n_per_class=2, size=32, seed=0, domain="aerial-rgb")
    assert np.asarray(a.b[3]).tobytes() == np.asarray(b.b[3]).tobytes()
    full = make_paired_images(n_per_class=1, size=32)
    assert np.array_equal(full.labels, np.arange(22)) and full.class_names == SCENE_CLASSES
    assert full[0]["s2"].shape == (32, 32, 13)


@pytest.mark.parametrize("mods", [("rgb", "sar"), ("s2", "sar"), ("sar", "rgb")])
def test_sar_pairs(mods):
    ds = make_paired_images(n_per_class=1, size=32, classes=["lake"], modalities=mods, labels="multilabel")
    s = ds[0]; ch = {"rgb": 3, "s2": 13, "sar": 2}
    assert tuple(s[m].shape[-1] for m in mods) == tuple(ch[m] for m in mods)


def test_layout_labels_api():
    _, f = render_scene_image("storage tanks", 64, 0, "aerial-rgb", ())
    y = layout_labels(f)
    assert y.shape == (len(LABEL_PARTS),) and y[NAMES.index("building")] == 1 and y[NAMES.index("water")] == 0
    assert layout_labels(f, ["tank", "water"]).tolist() == [1, 0]
    assert layout_labels(f, min_area=0.99).sum() == 0
    assert layout_labels({}, min_area=0.0).sum() == 0                                    # absent parts are never on
    assert all(p in PARTS for ps in LABEL_PARTS.values() for p in ps)


def test_bad_input():
    with pytest.raises(ConfigError, match="Allowed: class, multilabel"): make_paired_images(n_per_class=1, labels="multi")
    with pytest.raises(ConfigError, match="Allowed: class, multilabel"): make_paired_images(n_per_class=1, labels=None)
    assert LABEL_MODES == ("class", "multilabel")
    with pytest.raises(ConfigError, match="layout part"): layout_labels({}, ["lava"])
    with pytest.raises(ConfigError, match="min_area must be a fraction"): layout_labels({}, min_area=1.0)
    with pytest.raises(ConfigError, match="at least one part"): layout_labels({}, {"empty": ()})
    with pytest.raises(ConfigError, match="modalities must name two"): make_paired_images(n_per_class=1, modalities=("sar",))
