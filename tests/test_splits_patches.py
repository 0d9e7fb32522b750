"""Splits (official and few-shot) on the real Houston2013 split maps; lazy patch sampling against np.pad; tiler coverage."""
import json, tracemalloc, warnings
import numpy as np
import pytest
from rs_prompt_lab.core import ConfigError, DataError
from rs_prompt_lab.data.scene import Scene
from rs_prompt_lab.data.splits import Split, official_split, few_shot_split
from rs_prompt_lab.data.patches import PatchSampler, SceneTiler, cut_patches

# Houston2013 official per-class counts, from the table in ../shared/data/README.md (id: (name, train, test)).
HOUSTON = {1: ("Healthy grass", 198, 1053), 2: ("Stressed grass", 190, 1064), 3: ("Synthetic grass", 192, 505),
           4: ("Trees", 188, 1056), 5: ("Soil", 186, 1056), 6: ("Water", 182, 143), 7: ("Residential", 196, 1072),
           8: ("Commercial", 191, 1053), 9: ("Road", 193, 1059), 10: ("Highway", 191, 1036), 11: ("Railway", 181, 1054),
           12: ("Parking Lot 1", 192, 1041), 13: ("Parking Lot 2", 184, 285), 14: ("Tennis Court", 181, 247),
           15: ("Running Track", 187, 473)}


@pytest.fixture(scope="module")
def houston(houston_maps):
    "Scene from the real Houston2013 TR/VA maps (labels = TR + VA, a dummy 1-band modality)."
    tr, va = houston_maps
    assert tr.shape == va.shape == (349, 1905)
    assert not ((tr > 0) & (va > 0)).any()
    return Scene({"dummy": np.zeros(tr.shape + (1,), np.float32)}, tr + va, {i: v[0] for i, v in HOUSTON.items()},
                 splits={"train": tr > 0, "test": va > 0}, name="houston2013")


def _keys(rc): return set(map(tuple, rc.tolist()))


@pytest.mark.realdata
def test_houston_official_split_counts(houston):
    sp = official_split(houston)
    assert sp.counts["train"] == {i: v[1] for i, v in HOUSTON.items()}
    assert sp.counts["test"] == {i: v[2] for i, v in HOUSTON.items()}
    total = sp.counts_table()[-1]
    assert (total["train"], total["val"], total["test"]) == (2832, 0, 12197)
    assert "Running Track" in sp.counts_str()


@pytest.mark.realdata
def test_houston_few_shot_40_10(houston, tmp_path):
    sp = few_shot_split(houston, k=40, seed=0, val_per_class=10, pool="train", cache_dir=tmp_path)
    assert sp.counts["train"] == {i: 40 for i in HOUSTON} and sp.counts["val"] == {i: 10 for i in HOUSTON}
    tr, va, te = _keys(sp.train), _keys(sp.val), _keys(sp.test)
    assert len(tr) == 600 and len(va) == 150 and not (tr & va) and not (tr & te) and not (va & te)
    train_map = houston.splits["train"]
    assert train_map[sp.train[:, 0], sp.train[:, 1]].all() and train_map[sp.val[:, 0], sp.val[:, 1]].all()
    assert len(te) == 2832 + 12197 - 750                       # test='rest': every other labelled pixel
    official = few_shot_split(houston, k=40, seed=0, val_per_class=10, pool="train", test="test")
    assert official.counts["test"] == {i: v[2] for i, v in HOUSTON.items()}
    assert official.train.tolist() == sp.train.tolist()        # same seed, same draw whatever the test rule
    again = few_shot_split(houston, k=40, seed=0, val_per_class=10, pool="train", cache_dir=tmp_path)
    assert again.hash() == sp.hash() and len(list(tmp_path.iterdir())) == 1
    assert few_shot_split(houston, k=40, seed=1, val_per_class=10, pool="train").hash() != sp.hash()


def test_short_class_policies(tiny_scene):
    counts = tiny_scene.class_counts("train")
    cid, n = min(counts.items(), key=lambda kv: kv[1])
    with pytest.raises(ConfigError) as e:
        few_shot_split(tiny_scene, k=n + 1, pool="train")
    msg = str(e.value)
    assert f"class {cid}" in msg and tiny_scene.class_names[cid] in msg and f"has {n} pixels" in msg and f"k={n + 1}" in msg
    with pytest.warns(UserWarning, match="take_all"):
        sp = few_shot_split(tiny_scene, k=n + 1, pool="train", policy="take_all")
    assert sp.counts["train"][cid] == n
    for bad, match in [(dict(k=0), "k must be"), (dict(k=2.5), "k must be"), (dict(k=2, seed=-1), "seed must be"),
                       (dict(k=2, val_per_class=-1), "val_per_class"), (dict(k=2, pool="tran"), "Did you mean: train")]:
        with pytest.raises((ConfigError, DataError), match=match):
            few_shot_split(tiny_scene, **bad)


def test_split_roundtrip_and_cache_invalidation(tiny_scene, tmp_path):
    sp = few_shot_split(tiny_scene, k=2, seed=3, val_per_class=1, pool="train", test="test", cache_dir=tmp_path)
    p = sp.save(tmp_path / "out" / "split.json")
    back = Split.load(p)
    assert back.hash() == sp.hash() and back.counts == sp.counts and back.k == 2 and back.seed == 3
    d = json.loads(p.read_text()); d["test"] = d["test"][:-1]; p.write_text(json.dumps(d))
    with pytest.raises(DataError, match="stored hash"):
        Split.load(p)
    lab = tiny_scene.labels.copy(); r, c = np.argwhere(lab > 0)[0]; lab[r, c] = 0
    changed = Scene(tiny_scene.modalities, lab, tiny_scene.class_names, splits=tiny_scene.splits, name="tiny")
    sp2 = few_shot_split(changed, k=2, seed=3, val_per_class=1, pool="train", test="test", cache_dir=tmp_path)
    assert sp2.fingerprint != sp.fingerprint
    assert len(list(tmp_path.glob("shot_2-seed_3-*.json"))) == 2      # new file, stale cache not reused
    assert (r, c) not in _keys(sp2.train) | _keys(sp2.val) | _keys(sp2.test)


def _scene(H=11, W=13, seed=0):
    rng = np.random.default_rng(seed)
    lab = rng.integers(0, 4, (H, W))
    return Scene({"hsi": rng.random((H, W, 8), dtype=np.float32), "lidar": rng.random((H, W, 1), dtype=np.float32)},
                 lab, {1: "a", 2: "b", 3: "c"}, splits={"train": lab > 0})


@pytest.mark.parametrize("p", [1, 3, 5, 9, 21])
def test_windows_equal_np_pad(p):
    s = _scene()
    H, W = s.shape
    corners_edges = [(0, 0), (0, W - 1), (H - 1, 0), (H - 1, W - 1), (0, 6), (5, 0), (H - 1, 7), (4, W - 1), (5, 6)]
    rc = np.array(corners_edges + np.argwhere(np.ones((H, W), bool))[::7].tolist())
    h = p // 2
    for b in PatchSampler(s, rc, p, batch_size=4, labels=False):
        for m in ("hsi", "lidar"):
            padded = np.pad(s.modalities[m], ((h, h), (h, h), (0, 0)), mode="reflect")
            ref = np.stack([padded[r:r + p, c:c + p].transpose(2, 0, 1) for r, c in b["rc"]])
            assert b[m].shape == (len(b["rc"]), s.n_bands(m), p, p)
            np.testing.assert_array_equal(b[m], ref)


def test_shuffle_reproducible_and_labels(tiny_scene):
    get = lambda **kw: np.concatenate([b["rc"] for b in PatchSampler(tiny_scene, "train", 3, 5, shuffle=True, **kw)])
    a, b, c = get(seed=1), get(seed=1), get(seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sorted(map(tuple, a.tolist())) == sorted(map(tuple, tiny_scene.pixels("train").tolist()))
    batch = PatchSampler(tiny_scene, "train", 3, 5)[0]
    assert batch["label"].dtype == np.int64
    assert np.array_equal(batch["label"] + 1, tiny_scene.labels[batch["rc"][:, 0], batch["rc"][:, 1]])


def test_tiler_covers_every_pixel_once():
    s = _scene(9, 14)
    cover = np.zeros(s.shape, int)
    for b in SceneTiler(s, 5, batch_size=10):
        cover[b["rc"][:, 0], b["rc"][:, 1]] += 1
    assert (cover == 1).all()
    mask = s.labels == 1
    got = np.concatenate([b["rc"] for b in SceneTiler(s, 5, batch_size=3, mask=mask, modalities=["lidar"])])
    assert np.array_equal(got, np.argwhere(mask))


def test_patch_errors(tiny_scene):
    H, W = tiny_scene.shape
    cases = [(dict(patch_size=4), "odd integer"), (dict(patch_size=0), "odd integer"), (dict(patch_size=2 * H + 1), "too large"),
             (dict(batch_size=0), "batch_size"), (dict(modalities=["hs"]), "Did you mean: hsi"),
             (dict(pixels=[[0, 0], [0, W]]), "outside"), (dict(pixels=np.ones((H, W), bool)), "unlabelled")]
    for kw, match in cases:
        args = dict(pixels="train", patch_size=3, batch_size=2); args.update(kw)
        with pytest.raises((ConfigError, DataError), match=match):
            PatchSampler(tiny_scene, **args)


def test_memory_is_per_batch():
    "Iterating every pixel allocates about one batch at a time, not all patches (31 MB here)."
    rng = np.random.default_rng(0)
    s = Scene({"hsi": rng.random((100, 100, 16), dtype=np.float32)})
    t = SceneTiler(s, 7, batch_size=32)
    tracemalloc.start()
    n = sum(len(b["rc"]) for b in t)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert n == 100 * 100
    assert peak < 2_000_000, f"peak {peak / 1e6:.1f} MB while one batch is {32 * 16 * 49 * 4 / 1e6:.2f} MB"


def test_dataloader_workers(tiny_scene):
    import torch
    ps = PatchSampler(tiny_scene, "train", 3, 4, shuffle=True, seed=0)
    got = [b["rc"].numpy() for b in ps.dataloader(num_workers=2)]
    assert len(got) == len(ps)
    assert np.array_equal(np.concatenate(got), tiny_scene.pixels("train")[ps.order()])
    assert isinstance(next(iter(ps.dataloader()))["hsi"], torch.Tensor)


@pytest.mark.parametrize("contiguous", [True, False])
def test_chunked_cut_many_bands(contiguous):
    "144 bands at p = 11 is cut in several cache-sized chunks per batch; the result must still equal np.pad's windows."
    rng = np.random.default_rng(1)
    x = rng.random((12, 15, 144), dtype=np.float32)
    rc = np.argwhere(np.ones(x.shape[:2], bool))[::3]            # 60 centres, edges included
    out = cut_patches(x, rc, 11, contiguous=contiguous)
    padded = np.pad(x, ((5, 5), (5, 5), (0, 0)), mode="reflect")
    ref = np.stack([padded[r:r + 11, c:c + 11].transpose(2, 0, 1) for r, c in rc])
    np.testing.assert_array_equal(out, ref)
    assert out.flags["C_CONTIGUOUS"] == contiguous
