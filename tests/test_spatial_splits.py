"""Spatially honest splits for patch methods: guard bands, block mode, the leakage report, and the defaults left unchanged."""
import json, warnings
import numpy as np
import pytest
from rs_prompt_lab.core import ConfigError, DataError
from rs_prompt_lab.data.scene import Scene
from rs_prompt_lab.data.splits import Split, few_shot_split, official_split, leakage_report, guard_radius
from rs_prompt_lab.data.patches import window_index


def _dense(H=30, W=40, seed=0, n_cls=3):
    "Every pixel labelled (the worst case for leakage)."
    rng = np.random.default_rng(seed)
    lab = rng.integers(1, n_cls + 1, (H, W))
    tr = np.zeros((H, W), bool); tr[: H // 2] = True
    return Scene({"hsi": rng.random((H, W, 4), dtype=np.float32)}, lab, {i: f"c{i}" for i in range(1, n_cls + 1)},
                 splits={"train": tr, "test": ~tr}, name="dense")


def _keys(rc): return set(map(tuple, np.asarray(rc).tolist()))


def _window_pixels(rc, p, shape):
    "Every pixel a patch method actually reads for centres `rc` (PatchSampler's reflect-padded windows)."
    if len(rc) == 0: return set()
    flat = np.unique(window_index(np.asarray(rc), p, shape))
    return set(zip(*np.unravel_index(flat, shape)))


def _reference(split, p, shape):
    "Leakage counted from the real windows, independently of leakage_report's dilation."
    used = np.concatenate([split.train, split.val])
    seen = _window_pixels(used, p, shape)
    in_window = sum(t in seen for t in _keys(split.test))
    overlap = sum(bool(_window_pixels([t], p, shape) & seen) for t in _keys(split.test))
    return in_window, overlap


# Hashes and fingerprints written by the code before guard/blocks existed (git HEAD d7a5c24) on the tiny_scene
# fixture: the default split must stay byte-for-byte the same.
GOLDEN = [(dict(k=3, seed=0, val_per_class=1), "d5c1bb6ae1e4c0bb1ab80c255a3717c94fb740c10002f7e82dfcbe16779bcca8", "32f7e37a9ca96ec8"),
          (dict(k=2, seed=1, pool="train", test="test"), "8bba8b803f7a7a54b0a27ae80b21eade9918f143654f9c0e84fc2864f6767e0b", "ce18401510cdfc42")]


@pytest.mark.parametrize("kw,h,fp", GOLDEN)
def test_default_split_reproduces(tiny_scene, kw, h, fp):
    sp = few_shot_split(tiny_scene, **kw)
    assert (sp.hash(), sp.fingerprint, sp.mode, sp.guard) == (h, fp, "pixel", 0)
    assert not {"guard", "guard_removed", "mode", "block_size"} & set(sp.meta)
    o = official_split(tiny_scene, val_per_class=2, seed=3)
    assert (o.hash(), o.fingerprint) == ("47734c593e48e17c632f3f6b14d697e9c6199536876460d8fba98ceeaaf76a73", "5944b874dea937fe")


@pytest.mark.parametrize("p", [3, 5, 7])
def test_window_guard_removes_leakage(p):
    s = _dense()
    plain = few_shot_split(s, k=5, seed=2, val_per_class=2)                       # pool = all labelled pixels, test = rest
    guarded = few_shot_split(s, k=5, seed=2, val_per_class=2, guard="window", patch_size=p)
    rep0, rep = leakage_report(plain, p, s.shape), leakage_report(guarded, p, s.shape)
    assert rep0["test_in_window"] > 0 and rep0["test_in_window_frac"] > 0
    assert (rep0["test_in_window"], rep0["test_window_overlap"]) == _reference(plain, p, s.shape)
    assert rep["test_in_window"] == 0 and _reference(guarded, p, s.shape)[0] == 0
    assert np.array_equal(guarded.train, plain.train) and np.array_equal(guarded.val, plain.val)
    assert _keys(guarded.test) <= _keys(plain.test)
    assert guarded.meta["guard_removed"] == len(plain.test) - len(guarded.test) == rep0["test_in_window"]
    assert (guarded.guard, guarded.mode, guarded.meta["guard_spec"], guarded.meta["patch_size"]) == (p // 2, "pixel", "window", p)
    assert guarded.hash() != plain.hash() and guarded.fingerprint != plain.fingerprint
    assert sum(guarded.counts["test"].values()) == len(guarded.test)


def test_overlap_guard_and_int_guard():
    s, p = _dense(), 5
    ov = few_shot_split(s, k=4, seed=0, guard="overlap", patch_size=p)
    rep = leakage_report(ov, p, s.shape)
    assert ov.guard == p - 1 and rep["test_in_window"] == 0 and rep["test_window_overlap"] == 0
    assert _reference(ov, p, s.shape) == (0, 0)
    assert few_shot_split(s, k=4, seed=0, guard=p - 1).hash() == ov.hash()     # the int radius gives the same split
    assert guard_radius("window", 11) == 5 and guard_radius("overlap", 11) == 10


def test_guard_with_official_test_map():
    s, p = _dense(), 3
    plain = few_shot_split(s, k=4, seed=1, val_per_class=1, pool="train", test="test")
    g = few_shot_split(s, k=4, seed=1, val_per_class=1, pool="train", test="test", guard="window", patch_size=p)
    assert np.array_equal(g.train, plain.train) and leakage_report(g, p, s.shape)["test_in_window"] == 0
    assert s.splits["test"][g.test[:, 0], g.test[:, 1]].all()
    o, og = official_split(s), official_split(s, guard="window", patch_size=p)
    assert np.array_equal(og.train, o.train) and og.meta["guard_removed"] == s.shape[1]   # the first test row goes
    assert leakage_report(o, p, s.shape)["test_in_window"] == s.shape[1] and leakage_report(og, p, s.shape)["test_in_window"] == 0


def test_roundtrip_cache_and_tamper(tmp_path):
    s = _dense()
    sp = few_shot_split(s, k=3, seed=0, guard="window", patch_size=3, cache_dir=tmp_path / "c")
    back = Split.load(sp.save(tmp_path / "split.json"))
    assert (back.mode, back.guard, back.hash(), back.meta) == (sp.mode, sp.guard, sp.hash(), sp.meta)
    d = json.loads((tmp_path / "split.json").read_text())
    assert (d["mode"], d["guard"]) == ("pixel", 1)
    d["guard"] = 0; (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(DataError, match="stored hash"):                        # guard is part of the hash
        Split.load(tmp_path / "bad.json")
    plain = few_shot_split(s, k=3, seed=0, cache_dir=tmp_path / "c")
    assert len(list((tmp_path / "c").iterdir())) == 2                          # guarded and plain caches apart
    again = few_shot_split(s, k=3, seed=0, guard="window", patch_size=3, cache_dir=tmp_path / "c")
    assert again.hash() == sp.hash() and plain.guard == 0
    legacy = {k: v for k, v in d.items() if k not in ("mode", "guard", "hash")}  # a file written before the options
    assert (Split(**legacy).mode, Split(**legacy).guard) == ("pixel", 0)


def test_blocks_mode():
    s = _dense(40, 48)
    b = few_shot_split(s, k=5, seed=0, val_per_class=2, mode="blocks", block_size=8, block_test_frac=0.4)
    assert b.mode == "blocks" and b.meta["n_blocks"] == 30 and b.meta["n_test_blocks"] == 12
    blk = lambda rc: set(map(tuple, (np.asarray(rc) // 8).tolist()))
    assert not blk(b.test) & blk(np.concatenate([b.train, b.val]))              # whole blocks on one side
    assert len(blk(b.test)) == 12 and len(b.test) == 12 * 64                   # every pixel of the test blocks
    again = few_shot_split(s, k=5, seed=0, val_per_class=2, mode="blocks", block_size=8, block_test_frac=0.4)
    other = few_shot_split(s, k=5, seed=1, val_per_class=2, mode="blocks", block_size=8, block_test_frac=0.4)
    assert again.hash() == b.hash() and blk(other.test) != blk(b.test)
    bg = few_shot_split(s, k=5, seed=0, val_per_class=2, mode="blocks", block_size=8, block_test_frac=0.4, guard="window", patch_size=5)
    assert np.array_equal(bg.train, b.train) and leakage_report(bg, 5, s.shape)["test_in_window"] == 0
    assert len({b.hash(), bg.hash(), few_shot_split(s, k=5, seed=0, val_per_class=2).hash()}) == 3
    for bad, match in [(dict(mode="blocks"), "needs block_size"), (dict(mode="blocks", block_size=(8, 0)), "needs block_size"),
                       (dict(mode="blocks", block_size=8, block_test_frac=1.0), "block_test_frac"),
                       (dict(mode="blocks", block_size=100), "need at least 2"), (dict(block_size=8), "only used with mode='blocks'"),
                       (dict(mode="blocks", block_size=8, pool="train", test="test"), "use test='rest'"), (dict(mode="tiles"), "unknown split mode")]:
        with pytest.raises(ConfigError, match=match):
            few_shot_split(s, k=2, **bad)


def test_blocks_warns_when_a_class_has_no_test_pixel():
    s = _dense(16, 16)
    lab = s.labels.copy(); lab[lab == 3] = 1; lab[:4, :4] = 3                 # class 3 lives in one block
    s3 = Scene(s.modalities, lab, s.class_names, name="one-block")
    seen = set()
    for seed in range(12):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            sp = few_shot_split(s3, k=2, seed=seed, mode="blocks", block_size=4, policy="take_all")
        in_test = sp.counts["test"][3] > 0
        seen.add(in_test)
        if not in_test: assert any("class(es) 3 ('c3') have no test pixels" in str(x.message) for x in w)
    assert False in seen


def test_pixel_sets_have_no_neighbourhood():
    rng = np.random.default_rng(0)
    px = Scene({"hsi": rng.random((1, 60, 4))}, rng.integers(1, 4, (1, 60)), {1: "a", 2: "b", 3: "c"}, name="pixels")
    for kw in [dict(guard=1), dict(guard="window", patch_size=3), dict(mode="blocks", block_size=5)]:
        with pytest.raises(ConfigError, match="is a pixel set"):
            few_shot_split(px, k=2, **kw)
    sp = few_shot_split(px, k=2, guard="window", patch_size=1)                 # p = 1: a documented no-op
    assert sp.hash() == few_shot_split(px, k=2).hash() and sp.guard == 0
    rep = leakage_report(sp, 1, px.shape)
    assert rep["test_in_window"] == rep["test_window_overlap"] == 0 and rep["n_test"] == len(sp.test)
    with pytest.raises(ConfigError, match="pixel set"):
        leakage_report(sp, 3, px.shape)


def test_leakage_report_checks(tiny_scene):
    sp = few_shot_split(tiny_scene, k=2, seed=0, val_per_class=1)
    for p in (1, 3, 5):
        rep = leakage_report(sp, p, tiny_scene.shape)
        assert (rep["test_in_window"], rep["test_window_overlap"]) == _reference(sp, p, tiny_scene.shape)
        assert rep["test_in_window"] <= rep["test_in_train_window"] + rep["test_in_val_window"]
        json.dumps(rep, allow_nan=False)
    with pytest.raises(ConfigError, match="odd integer"):
        leakage_report(sp, 2, tiny_scene.shape)
    with pytest.raises(DataError, match="outside a 5 x 5 scene"):
        leakage_report(sp, 3, (5, 5))
    for bad, match in [(dict(guard=-1), "guard must be"), (dict(guard="window"), "pass patch_size"),
                       (dict(guard="windo", patch_size=3), "Did you mean: window"), (dict(guard="window", patch_size=4), "odd integer")]:
        with pytest.raises(ConfigError, match=match):
            few_shot_split(tiny_scene, k=2, **bad)
    with pytest.raises(ConfigError, match="split guard must be"):
        Split(sp.train, sp.val, sp.test, guard=-2)


@pytest.fixture(scope="module")
def houston(houston_maps):
    "Real Houston2013 TR/VA maps as a scene (labels = TR + VA)."
    tr, va = houston_maps
    return Scene({"dummy": np.zeros(tr.shape + (1,), np.float32)}, tr + va, {i: str(i) for i in range(1, 16)},
                 splits={"train": tr > 0, "test": va > 0}, name="houston2013")


@pytest.mark.realdata
def test_houston_guarded_few_shot(houston):
    p = 11
    plain = few_shot_split(houston, k=40, seed=0, val_per_class=10, pool="train", test="test")
    g = few_shot_split(houston, k=40, seed=0, val_per_class=10, pool="train", test="test", guard="window", patch_size=p)
    rep0 = leakage_report(plain, p, houston.shape)
    assert np.array_equal(g.train, plain.train) and np.array_equal(g.val, plain.val)
    assert leakage_report(g, p, houston.shape)["test_in_window"] == 0
    assert g.meta["guard_removed"] == rep0["test_in_window"] == len(plain.test) - len(g.test)
    sp = few_shot_split(houston, k=40, seed=0, val_per_class=10, pool="train")   # test='rest': the pool's leftovers are test
    assert leakage_report(sp, p, houston.shape)["test_in_window"] > 0
