"""scene.captions: caption files on the real RSICD / RSITMD / UCM / Sydney captions, the batch-by-batch cache,
a tiny random BLIP-2 end to end, and captioner specs."""
import json, re
from pathlib import Path
import numpy as np
import pytest

from rs_prompt_lab.core import ConfigError, DataError, RSLabError
from rs_prompt_lab.backbones import WeightsError
from rs_prompt_lab.data.datasets import ImageTextDataset
from rs_prompt_lab.scene.captions import (Captioner, CaptionCache, FileCaptions, DatasetCaptions, Blip2Captioner, caption_groups,
                                          captions_for, dataset_key, image_ids, make_captioner, make_tiny_blip2, default_cache_dir)


def names_ds(names, name="names"):
    "A caption-less dataset of (absent) image files with these names."
    return ImageTextDataset([Path("/absent") / n for n in names], [-1] * len(names), [], name=name)


# ---------------------------------------------------------------- real caption files
PRECOMP = {  # folder: distinct images per split (shared/data/README.md)
    "rsicd/precomp": {"train": 9828, "test": 1093},
    "rsitmd/precomp": {"train": 4291, "test": 452},
    "ucm_captions/precomp_pe_rsitr": {"train": 1890, "test": 210},
    "sydney_captions/precomp": {"train": 497, "val": 58, "test": 28},
}


def lines(p): return p.read_text(encoding="utf-8").splitlines()


@pytest.mark.realdata
@pytest.mark.parametrize("folder", list(PRECOMP))
def test_precomp_counts_and_lookup(shared_data, folder):
    d = shared_data / folder
    groups = caption_groups(d)
    counts = {s: len({f for s2, f, _ in groups if s2 == s}) for s in PRECOMP[folder]}
    assert counts == PRECOMP[folder]
    assert {s for s, _, _ in groups} == set(PRECOMP[folder])
    fc, fc1 = FileCaptions(d), FileCaptions(d, index=1)
    assert len(fc) == sum(PRECOMP[folder].values())          # the splits are disjoint
    # the first image of every split: its captions are the first lines of that split's caps file (both layouts)
    firsts = [lines(d / f"{s}_filename.txt")[0] for s in PRECOMP[folder]]
    want0 = [lines(d / f"{s}_caps.txt")[0].strip() for s in PRECOMP[folder]]
    want1 = [lines(d / f"{s}_caps.txt")[1].strip() for s in PRECOMP[folder]]
    ds = names_ds(firsts + ["not_an_image.tif"])
    assert fc.caption(ds, range(len(firsts))) == want0
    assert fc1.caption(ds, range(len(firsts))) == want1
    assert want0 != want1
    assert fc.caption(ds, [len(firsts)]) == [None]
    assert FileCaptions(d, index=5).caption(ds, [0]) == [None]  # 5 captions per image: #5 is out of range


@pytest.mark.realdata
def test_rsicd_manifest_dataset_and_stadium(shared_data):
    from rs_prompt_lab.data.manifest import load_dataset
    ds = load_dataset("rsicd-captions", root=shared_data / "rsicd", verify=False)
    idx = [0, 5000, len(ds) - 1]
    fc = FileCaptions(shared_data / "rsicd" / "precomp", index=1)
    assert fc.caption(ds, idx) == DatasetCaptions(1).caption(ds, idx) == [ds.captions[i][1].strip() for i in idx]
    assert captions_for(ds, "dataset#1", indices=idx) == fc.caption(ds, idx)
    assert captions_for(ds.subset([5000]), fc) == [ds.captions[5000][1].strip()]
    # the one real RSICD image: its captions are train lines 7098 * 5 ... (listed once, blocks of 5)
    st = shared_data / "rsicd" / "clip_rsicd_textaug" / "stadium_1.jpg"
    k = lines(shared_data / "rsicd/precomp/train_filename.txt").index("stadium_1.jpg")
    caps = lines(shared_data / "rsicd/precomp/train_caps.txt")[5 * k: 5 * k + 5]
    one = ImageTextDataset([st], [-1], [], name="stadium")
    assert captions_for(one, f"file:{shared_data / 'rsicd/precomp'}") == [caps[0].strip()]
    assert captions_for(one, f"file:{shared_data / 'rsicd/precomp'}#4") == [caps[4].strip()]
    assert "stadium" in caps[0] or "playground" in caps[0] or "field" in caps[0]


@pytest.mark.realdata
def test_textaug_jsonl(shared_data):
    d = shared_data / "rsicd" / "clip_rsicd_textaug"
    test, valid = FileCaptions(d / "textaug_test_rsicd.jsonl"), FileCaptions(d / "textaug_valid_rsicd.jsonl", index=1)
    assert (len(test), len(valid)) == (1093, 1094)
    rec = json.loads(lines(d / "textaug_test_rsicd.jsonl")[0])
    rec_v = json.loads(lines(d / "textaug_valid_rsicd.jsonl")[-1])
    ds = names_ds([Path(rec["filename"]).name, Path(rec_v["filename"]).name])   # 'rsicd_images/x.jpg' -> 'x.jpg'
    assert test.caption(ds, [0]) == [rec["captions"][0].strip()]
    assert valid.caption(ds, [1]) == [rec_v["captions"][1].strip()]
    # the test images of the jsonl are the precomp test images
    assert set(test.table) == {f for s, f, _ in caption_groups(shared_data / "rsicd/precomp") if s == "test"}


def test_file_source_errors(tmp_path):
    with pytest.raises(DataError, match="caption source not found.*precomp folder") as e: FileCaptions(tmp_path / "nope")
    assert "\n" not in str(e.value) and str(tmp_path / "nope") in str(e.value)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"name": "a.jpg"}) + "\n")
    with pytest.raises(DataError, match="bad.jsonl"): FileCaptions(tmp_path / "bad.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no captions found"): FileCaptions(tmp_path / "empty")


# ---------------------------------------------------------------- ids and keys
def test_image_ids_and_dataset_key():
    arr = ImageTextDataset([np.zeros((2, 2, 3))] * 4, [-1] * 4, [], name="arr", meta={"v": 1})
    assert image_ids(arr) == ["000000", "000001", "000002", "000003"]
    sub = arr.subset([3, 1])
    assert image_ids(sub) == ["000003", "000001"] and dataset_key(sub) == dataset_key(arr)
    assert re.fullmatch(r"arr-[0-9a-f]{8}", dataset_key(arr))
    assert dataset_key(ImageTextDataset(arr.items, arr.labels, [], name="arr", meta={"v": 2})) != dataset_key(arr)
    assert image_ids(names_ds(["1.tif", "b.jpg"])) == ["1.tif", "b.jpg"]


# ---------------------------------------------------------------- the cache
class Counting(Captioner):
    "Counts its calls; raises at call `fail_at`; gives no caption for `empty` indices."
    name = "counting"
    def __init__(self, fail_at=None, empty=(), blank=""):
        self.calls, self.fail_at, self.empty, self.blank = [], fail_at, set(empty), blank
    def settings(self): return {"version": 1}
    def caption(self, ds, indices):
        self.calls.append(list(indices))
        if len(self.calls) == self.fail_at: raise KeyboardInterrupt
        return [self.blank if i in self.empty else f"caption of image {i}" for i in indices]


@pytest.fixture
def toy():
    return ImageTextDataset([np.zeros((2, 2, 3))] * 10, [-1] * 10, [], name="toy")


def test_key():
    assert re.fullmatch(r"counting-[0-9a-f]{8}", Counting().key)
    assert Counting().key == Counting(empty=[1]).key   # only settings() count


def test_cache_computes_once(tmp_path, toy):
    want = [f"caption of image {i}" for i in range(10)]
    c = Counting()
    assert captions_for(toy, c, cache_dir=tmp_path, batch_size=4, progress=False) == want
    assert c.calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    c2 = Counting()
    assert captions_for(toy, c2, cache_dir=tmp_path, batch_size=4, progress=False) == want
    assert captions_for(toy.subset([9, 2]), c2, cache_dir=tmp_path, progress=False) == [want[9], want[2]]
    assert c2.calls == []
    f = CaptionCache(tmp_path, dataset_key(toy), c).path
    assert f == tmp_path / dataset_key(toy) / f"{c.key}.json"
    d = json.loads(f.read_text())
    assert d["captioner"] == c.key and d["settings"] == {"version": 1} and len(d["captions"]) == 10
    # another captioner setting -> another file, computed again
    class V2(Counting):
        def settings(self): return {"version": 2}
    v2 = V2()
    captions_for(toy, v2, cache_dir=tmp_path, indices=[0], progress=False)
    assert v2.calls == [[0]]


def test_cache_interrupted_run_keeps_finished_batches(tmp_path, toy):
    cc = CaptionCache(tmp_path, dataset_key(toy), Counting(fail_at=2))
    with pytest.raises(KeyboardInterrupt): cc.captions(toy, batch_size=3, progress=False)
    d = json.loads(cc.path.read_text())
    assert sorted(d["captions"]) == ["000000", "000001", "000002"]
    assert [p.name for p in cc.path.parent.iterdir()] == [cc.path.name]    # no temp file left behind
    c = Counting()
    CaptionCache(tmp_path, dataset_key(toy), c).captions(toy, batch_size=3, progress=False)
    assert c.calls == [[3, 4, 5], [6, 7, 8], [9]]                          # resumes after batch 1


def test_cache_corrupt_file(tmp_path, toy):
    cc = CaptionCache(tmp_path, "toy", Counting())
    cc.path.parent.mkdir(parents=True)
    cc.path.write_text('{"captioner": "counting-')
    with pytest.raises(DataError, match="corrupt caption cache") as e: cc.captions(toy, progress=False)
    msg = str(e.value)
    assert str(cc.path) in msg and "delete" in msg and "\n" not in msg
    cc.path.write_text(json.dumps({"captioner": cc.captioner.key, "captions": ["a"]}))
    with pytest.raises(DataError, match="corrupt caption cache"): cc.captions(toy, progress=False)
    cc.path.write_text(json.dumps({"captioner": "other-12345678", "captions": {}}))
    with pytest.raises(DataError, match="other-12345678"): cc.captions(toy, progress=False)


@pytest.mark.parametrize("blank", [None, "", "   "])
def test_cache_missing_captions(tmp_path, toy, blank):
    c = Counting(empty=[1, 2, 4, 5, 7, 8, 9], blank=blank)
    with pytest.raises(DataError) as e: captions_for(toy, c, cache_dir=tmp_path, batch_size=4, progress=False)
    msg = str(e.value)
    assert "no caption for 7 of 10 image(s): 000001, 000002, 000004, 000005, 000007, ..." in msg
    assert c.key in msg and "000008" not in msg and "\n" not in msg
    caps = json.loads(CaptionCache(tmp_path, dataset_key(toy), c).path.read_text())["captions"]
    assert caps == {f"{i:06d}": f"caption of image {i}" for i in (0, 3, 6)}     # nothing empty written


def test_cache_bad_arguments(tmp_path, toy):
    with pytest.raises(ConfigError, match="batch_size"): captions_for(toy, Counting(), cache_dir=tmp_path, batch_size=0)
    with pytest.raises(DataError, match="index 10 outside"): captions_for(toy, Counting(), cache_dir=tmp_path, indices=[10])
    class Short(Counting):
        def caption(self, ds, indices): return ["x"]
    with pytest.raises(RSLabError, match="returned 1 captions for 2 images"):
        captions_for(toy, Short(), cache_dir=tmp_path, indices=[0, 1], progress=False)


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("RS_LAB_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "captions"


# ---------------------------------------------------------------- BLIP-2 (tiny, random)
@pytest.fixture(scope="module")
def tiny_blip2(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("blip2")
    return {t: make_tiny_blip2(root / f"tiny-{t}", text_model=t) for t in ("t5", "opt")}


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(0)
    return ImageTextDataset([rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(5)], [-1] * 5, [], name="rgb")


@pytest.mark.parametrize("text", ["t5", "opt"])
def test_blip2_batched_and_cached(tmp_path, tiny_blip2, rgb, text):
    cap = Blip2Captioner(tiny_blip2[text], image_size=32)
    calls = []
    orig = cap.caption
    cap.caption = lambda ds, idx: calls.append(list(idx)) or orig(ds, idx)
    out = captions_for(rgb, cap, cache_dir=tmp_path, batch_size=2, progress=False)
    assert calls == [[0, 1], [2, 3], [4]]
    assert len(out) == 5 and all(isinstance(c, str) and c.strip() == c and c for c in out)
    assert all(re.fullmatch(r"w\d+( w\d+)*", c) for c in out)             # words only: prompt and special tokens removed
    assert all(len(c.split()) <= 16 for c in out)
    assert len(set(out)) > 1                                               # the images differ, so do the captions
    assert orig(rgb, [4, 0]) == [out[4], out[0]]                          # batching does not change a caption
    # second call: a fresh captioner reads everything from the cache and never loads the weights
    again = Blip2Captioner(tiny_blip2[text], image_size=32)
    assert captions_for(rgb, again, cache_dir=tmp_path, batch_size=2, progress=False) == out
    assert again.model is None
    assert Blip2Captioner(tiny_blip2[text], image_size=32, num_beams=1).key != again.key


def test_blip2_prompt_ids(tiny_blip2):
    assert Blip2Captioner(tiny_blip2["t5"], image_size=32).prompt_ids() == [3] * 4 + [1]   # T5: no BOS, EOS after the image tokens
    assert Blip2Captioner(tiny_blip2["opt"], image_size=32).prompt_ids() == [3] * 4 + [1]  # OPT: BOS


@pytest.mark.realdata
def test_blip2_real_image(tiny_blip2, shared_data):
    st = shared_data / "rsicd" / "clip_rsicd_textaug" / "stadium_1.jpg"
    ds = ImageTextDataset([st, np.zeros((30, 30, 1), np.float32)], [-1, -1], [], name="mixed")
    out = Blip2Captioner(tiny_blip2["t5"], image_size=32).caption(ds, [0, 1])
    assert len(out) == 2 and all(out)


def test_blip2_missing_weights(tmp_path, tiny_blip2):
    for bad, why in [(tmp_path / "nope", "not found"), (tmp_path, "no config.json")]:
        with pytest.raises(WeightsError, match=why) as e: Blip2Captioner(bad)
        msg = str(e.value)
        assert "\n" not in msg and "Salesforce/blip2-flan-t5-xl" in msg and "blip2:" in msg
    half = tmp_path / "half"
    half.mkdir()
    (half / "config.json").write_text((tiny_blip2["t5"] / "config.json").read_text())
    with pytest.raises(WeightsError, match="no weights"): make_captioner(f"blip2:{half}")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_blip2["t5"].iterdir(): (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    cap = Blip2Captioner(broken)                                            # the folder looks complete ...
    with pytest.raises(WeightsError, match="cannot load BLIP-2") as e: cap.load()   # ... the weights do not load
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- specs
def test_make_captioner(tmp_path):
    (tmp_path / "t.jsonl").write_text(json.dumps({"filename": "a.jpg", "captions": ["one", "two"]}) + "\n")
    fc = make_captioner(f"file:{tmp_path / 't.jsonl'}#1")
    assert isinstance(fc, FileCaptions) and fc.index == 1 and fc.caption(names_ds(["a.jpg"]), [0]) == ["two"]
    assert make_captioner("dataset").index == 0 and make_captioner("dataset#3").index == 3
    with pytest.raises(ConfigError, match=r"unknown captioner 'blip'\. Did you mean: blip2") as e: make_captioner("blip")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="Did you mean: dataset"): make_captioner("datset#1")
    with pytest.raises(ConfigError, match="needs a path"): make_captioner("file")
    with pytest.raises(ConfigError, match="bad captioner"): make_captioner("file name with spaces")
    assert make_captioner(fc) is fc
