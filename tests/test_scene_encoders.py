"""Caption encoders (CLIP text tower, local BERT) and the caption-embedding cache of `rs_prompt_lab.scene.encoders`."""
import pytest
import torch

from rs_prompt_lab.core import ConfigError, DataError, RSLabError
from rs_prompt_lab.backbones import WeightsError, load_backbone
from rs_prompt_lab.scene.encoders import (BertEncoder, CaptionEncoder, EmbeddingCache, TextTowerEncoder, embed_captions,
                                          make_encoder, weights_fingerprint)

CAPS = ["a dense residential area with small houses", "a river crossing farmland", "an airport with two runways",
        "green trees", "a harbor with many boats next to a road"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def clip():
    return load_backbone("rs-tiny")[0]


@pytest.fixture(scope="module")
def tower(clip):
    return TextTowerEncoder(clip)


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    "A tiny random-init BERT (2 layers, width 32) with a hand-written vocab.txt, saved like a downloaded checkpoint."
    from transformers import BertConfig, BertModel, BertTokenizer
    d = tmp_path_factory.mktemp("bert") / "tiny-bert"
    words = SPECIAL + sorted({w for c in CAPS for w in c.split()} | {f"word{i}" for i in range(300)})
    d.mkdir()
    (d / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    BertModel(cfg).save_pretrained(d)
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(d)  # vocab=, not vocab_file= (ignored)
    return d


class Counting(CaptionEncoder):
    "Wraps an encoder and counts the captions it encodes."
    def __init__(self, inner): self.inner, self.name, self.dim, self.calls = inner, inner.name, inner.dim, []
    def settings(self): return self.inner.settings()
    def _encode(self, caps):
        self.calls.append(list(caps)); return self.inner._encode(caps)
    @property
    def n(self): return sum(map(len, self.calls))


def test_text_tower_shape_determinism_batch_invariance(clip, tower):
    a = tower.encode(CAPS)
    assert a.shape == (len(CAPS), 128) and a.dtype == torch.float32 and a.device.type == "cpu" and not a.requires_grad
    assert tower.dim == clip.text_width == 128
    torch.testing.assert_close(tower.encode(CAPS), a, rtol=0, atol=0)
    torch.testing.assert_close(tower.encode(CAPS, batch_size=1), a, rtol=0, atol=1e-5)
    torch.testing.assert_close(tower.encode(CAPS[3:4]), a[3:4], rtol=0, atol=1e-5)
    assert torch.cdist(a, a)[~torch.eye(len(CAPS), dtype=bool)].min() > 1e-3   # different captions differ


def test_text_tower_is_mean_up_to_eot_and_truncates(clip, tower):
    ids = clip.tokenize(CAPS[:1])
    with torch.no_grad():
        h = clip.encode_text_embeddings(clip.token_embedding(ids), clip.eot_index(ids), return_tokens=-1)["tokens"][clip.n_text_layers - 1]
        h = clip.model.ln_final(h)
    e = int(clip.eot_index(ids)[0])
    torch.testing.assert_close(tower.encode(CAPS[:1])[0], h[0, :e + 1].mean(0), rtol=0, atol=1e-5)
    long = " ".join(["farmland"] * 200)
    assert int(clip.eot_index(clip.tokenize([long]))[0]) == clip.context_length - 1
    out = tower.encode([long, CAPS[0]])
    assert out.shape == (2, 128) and torch.isfinite(out).all()


def test_text_tower_key_and_no_submodule(clip, tower):
    assert tower.key.startswith("text-tower-") and len(tower.key) == len("text-tower-") + 8
    assert tower.settings()["backbone"] == "rs-tiny"
    assert not isinstance(tower, torch.nn.Module)
    model = torch.nn.Module(); model.enc = tower             # a plain attribute: the tower is not registered twice
    assert len(list(model.parameters())) == 0


def test_other_weights_change_the_key(clip):
    import copy
    k = TextTowerEncoder(clip).key
    other = copy.deepcopy(clip)
    with torch.no_grad(): other.model.ln_final.weight.mul_(1.5)
    k2 = TextTowerEncoder(other).key
    assert k2 != k
    with torch.no_grad(): other.model.visual.conv1.weight.mul_(2.0)   # the image tower does not enter the key
    assert TextTowerEncoder(other).key == k2
    lin = torch.nn.Linear(2, 2)
    assert weights_fingerprint(lin.state_dict().items()) == weights_fingerprint(lin.state_dict().items())


def test_blank_caption_names_position(tower):
    with pytest.raises(DataError, match="position 2"):
        tower.encode(["a road", "trees", "   "])
    assert tower.encode([]).shape == (0, 128)


def test_bert_loads_and_masked_mean_equals_unbatched(bert_dir):
    enc = BertEncoder(bert_dir)
    assert enc.dim == 32 and enc.key.startswith("bert-")
    a = enc.encode(CAPS)                                        # padded batch: lengths differ
    assert a.shape == (len(CAPS), 32) and a.dtype == torch.float32
    one = torch.cat([enc.encode([c]) for c in CAPS])
    torch.testing.assert_close(a, one, rtol=0, atol=1e-5)
    # the unbatched mean runs over every token, [CLS] and [SEP] included (the official code)
    b = enc.tokenizer(CAPS[:1], return_tensors="pt")
    with torch.no_grad(): ref = enc.model(**b).last_hidden_state[0].mean(0)
    torch.testing.assert_close(a[0], ref, rtol=0, atol=1e-5)
    assert make_encoder(f"bert:{bert_dir}").key == enc.key


@pytest.mark.parametrize("vocab", ["", "\n".join(SPECIAL) + "\n"])
def test_bert_tiny_vocab_is_one_line_error(bert_dir, tmp_path, vocab):
    import shutil
    d = tmp_path / "bad"
    d.mkdir()
    for f in ("config.json", "model.safetensors"): shutil.copy(bert_dir / f, d / f)
    (d / "vocab.txt").write_text(vocab)
    with pytest.raises(WeightsError) as e: BertEncoder(d)
    msg = str(e.value)
    assert "\n" not in msg and str(d) in msg and "bert-base-uncased" in msg and "--caption-encoder bert:" in msg


def test_bert_missing_folder_and_weights(bert_dir, tmp_path):
    with pytest.raises(WeightsError) as e: BertEncoder(tmp_path / "nope")
    assert "\n" not in str(e.value) and "does not exist" in str(e.value) and "--caption-encoder bert:" in str(e.value)
    import shutil
    d = tmp_path / "noweights"; d.mkdir()
    shutil.copy(bert_dir / "vocab.txt", d / "vocab.txt"); shutil.copy(bert_dir / "config.json", d / "config.json")
    with pytest.raises(WeightsError) as e: BertEncoder(d)
    assert "\n" not in str(e.value) and "cannot load the weights" in str(e.value)
    assert issubclass(WeightsError, RSLabError)


def test_cache_reuses_and_reencodes_only_changed(tower, tmp_path):
    cnt = Counting(tower)
    ids = [f"img{i}" for i in range(len(CAPS))]
    cache = EmbeddingCache(tmp_path, "UC Merced/v1", "blip2", cnt)
    assert cache.path == tmp_path / "UC_Merced_v1" / f"blip2__{tower.key}.pt"
    first = cache.embed(ids, CAPS)
    assert cnt.n == len(CAPS) and cache.path.exists()
    torch.testing.assert_close(first, tower.encode(CAPS), rtol=0, atol=1e-5)
    again = EmbeddingCache(tmp_path, "UC Merced/v1", "blip2", cnt).embed(ids, CAPS)   # a fresh object reads the file
    assert cnt.n == len(CAPS)
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    caps2 = list(CAPS); caps2[1] = "a river crossing a forest"
    out = cache.embed(ids, caps2)
    assert cnt.calls[-1] == [caps2[1]] and cache.n_encoded == 1
    torch.testing.assert_close(out[1], tower.encode([caps2[1]])[0], rtol=0, atol=1e-5)
    keep = [0, 2, 3, 4]
    torch.testing.assert_close(out[keep], first[keep], rtol=0, atol=0)
    sub = cache.embed(ids[:2], caps2[:2])                       # a subset: nothing new
    assert cache.n_encoded == 0 and sub.shape == (2, 128)


def test_cache_bad_inputs_and_corrupt_file(tower, tmp_path):
    cache = EmbeddingCache(tmp_path, "ds", "given", tower)
    with pytest.raises(DataError, match="2 image ids but 1 captions"): cache.embed(["a", "b"], ["x"])
    with pytest.raises(DataError, match="position 0"): cache.embed(["a"], [""])
    cache.embed(["a"], ["a road"])
    cache.path.write_bytes(b"\x00garbage")
    with pytest.raises(DataError) as e: cache.embed(["a"], ["a road"])
    assert str(cache.path) in str(e.value) and "delete" in str(e.value)


def test_embed_captions_with_and_without_cache(tower, tmp_path):
    ids = ["a", "b"]
    direct = embed_captions(ids, CAPS[:2], tower)
    cached = embed_captions(ids, CAPS[:2], tower, cache_dir=tmp_path, ds_key="ucm")
    torch.testing.assert_close(direct, cached, rtol=0, atol=1e-5)
    assert (tmp_path / "ucm" / f"given__{tower.key}.pt").exists()
    with pytest.raises(DataError): embed_captions(ids, CAPS[:1], tower)


def test_make_encoder(clip, tower):
    assert isinstance(make_encoder("text-tower", clip=clip), TextTowerEncoder)
    assert make_encoder("text-tower", clip=clip).key == tower.key
    with pytest.raises(ConfigError, match="Did you mean"): make_encoder("text_tower", clip=clip)
    with pytest.raises(ConfigError, match="unknown caption encoder"): make_encoder("roberta:/x")
    with pytest.raises(ConfigError, match="needs the backbone"): make_encoder("text-tower")
    with pytest.raises(ConfigError, match="local folder"): make_encoder("bert:")
