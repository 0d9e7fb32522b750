"""PromptableCLIP exactness and prompt behaviour, the backbone registry, parameter tables and zero-shot."""
import copy, os, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import open_clip

from rs_prompt_lab.promptable import PromptableCLIP, UnsupportedBackbone
from rs_prompt_lab.backbones import (BACKBONES, RS_TINY_CONFIG, RS_TINY_PREPROCESS, WeightsError, find_weights, list_backbones,
                                     load_backbone, param_table, preprocess_images, register_model_config, save_backbone_dir)
from rs_prompt_lab.zeroshot import accuracy, evaluate_zeroshot, zeroshot_head
from rs_prompt_lab.core import ConfigError

RS_LAB = str(Path(sys.executable).parent / "rs-lab")
TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 3}}
TEXTS = ["a satellite photo of a forest.", "an aerial image of a harbor with boats.", "river"]


def _tiny(vision=None, text=None, **kw):
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"].update(vision or {}); cfg["text_cfg"].update(text or {}); cfg.update(kw)
    torch.manual_seed(0)
    m = open_clip.CLIP(**cfg).eval()
    # random init leaves LayerNorms at identity and the text projection small; perturb so every part matters
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "ln" in n or "proj" in n: p.add_(0.1 * torch.randn_like(p))
    return m


def _not_batch_first(m):
    "The same model with both transformers in (L, N, D) layout."
    for t in (m.visual.transformer, m.transformer):
        t.batch_first = False
        for b in t.resblocks: b.attn.batch_first = False
    return m


VARIANTS = {
    "default": lambda: _tiny(),
    "no_ln_pre+avg+final_ln_after_pool": lambda: _tiny(vision={"no_ln_pre": True, "pool_type": "avg", "final_ln_after_pool": True}),
    "quick_gelu+layer_scale": lambda: _tiny(vision={"ls_init_value": 0.5}, text={"ls_init_value": 0.5}, quick_gelu=True),
    "eos_pool+no_causal_mask": lambda: _tiny(text={"pool_type": "eos", "eos_id": 49407, "no_causal_mask": True}),
    "text_first_pool+proj_bias": lambda: _tiny(text={"pool_type": "first", "proj_bias": True}),
    "custom_blocks_qk_norm": lambda: _tiny(vision={"qk_norm": True}, text={"qk_norm": True}),
    "not_batch_first": lambda: _not_batch_first(_tiny()),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_exactness(variant):
    m = VARIANTS[variant]()
    clip = PromptableCLIP(m)
    imgs = torch.randn(3, 3, 32, 32)
    toks = open_clip.tokenize(TEXTS, context_length=16)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(imgs), m.encode_image(imgs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clip.encode_text(toks), m.encode_text(toks), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clip.encode_text(TEXTS), m.encode_text(toks), atol=1e-5, rtol=1e-5)
        # zero-length shallow prompts are the baseline
        torch.testing.assert_close(clip.encode_image(imgs, prompts=torch.zeros(0, clip.vision_width)), m.encode_image(imgs), atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def vitb16():
    torch.manual_seed(0)
    return open_clip.create_model("ViT-B-16", pretrained=None).eval()


def test_vitb16_exact_and_149_6M(vitb16):
    clip = PromptableCLIP(vitb16, name="random:ViT-B-16")
    assert (clip.vision_width, clip.text_width, clip.embed_dim, clip.n_vision_layers, clip.n_text_layers) == (768, 512, 512, 12, 12)
    assert (clip.context_length, clip.image_size, clip.patch_size, clip.vision_heads, clip.text_heads) == (77, (224, 224), (16, 16), 12, 8)
    imgs = torch.randn(2, 3, 224, 224)
    toks = open_clip.tokenize(TEXTS)
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(imgs), vitb16.encode_image(imgs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(clip.encode_text(toks), vitb16.encode_text(toks), atol=1e-5, rtol=1e-5)
        deep = clip.encode_image(imgs[:1], deep_prompts=[torch.randn(1, 4, 768) for _ in range(9)], return_tokens=-1, return_attn=0)
    assert deep["features"].shape == (1, 512) and deep["tokens"][11].shape == (1, 1 + 4 + 196, 768)
    assert deep["attn"][0].shape == (1, 12, 201, 201)
    tab = param_table(clip)
    assert tab.backbone_total == tab.total == 149_620_737 and tab.trainable == 0
    assert "total 149.6 M" in str(tab)


@pytest.fixture(scope="module")
def tiny_clip():
    return PromptableCLIP(_tiny())


def test_deep_and_per_image_visual_prompts(tiny_clip):
    clip, D = tiny_clip, tiny_clip.vision_width
    imgs = torch.randn(2, 3, 32, 32)
    deep = [torch.randn(2, 3, D) for _ in range(clip.n_vision_layers)]
    with torch.no_grad():
        base = clip.encode_image(imgs)
        both = clip.encode_image(imgs, deep_prompts=deep)
        assert (both - base).abs().max() > 1e-3
        # per-image deep prompts equal running each image alone with its own prompts
        single = torch.cat([clip.encode_image(imgs[b:b + 1], deep_prompts=[d[b] for d in deep]) for b in range(2)])
        torch.testing.assert_close(both, single, atol=1e-5, rtol=1e-5)
        # deep prompts replace the slots: changing layer-0 prompts matters, a None entry keeps what block i-1 wrote
        shallow = clip.encode_image(imgs, prompts=deep[0])
        assert (shallow - both).abs().max() > 1e-4
        out = clip.encode_image(imgs, prompts=deep[0], return_tokens=[0, -1], return_attn=[1])
    assert out["n_prompts"] == 3 and out["tokens"][0].shape == (2, 1 + 3 + 16, D)
    torch.testing.assert_close(out["features"], shallow)
    v = clip.model.visual  # the last tokens give the features back through ln_post + CLS + proj
    torch.testing.assert_close(v.ln_post(out["tokens"][2])[:, 0] @ v.proj, shallow, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["attn"][1].sum(-1), torch.ones(2, clip.vision_heads, 20), atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="3 prompt slots"):
        clip.encode_image(imgs, prompts=deep[0], deep_prompts=[None, torch.randn(4, D)])


def test_text_prompts_coop_per_image_and_deep(tiny_clip):
    clip, D = tiny_clip, tiny_clip.text_width
    toks = clip.prompt_tokens(["forest", "harbor", "dense_residential"], n_ctx=4)
    emb, eot = clip.token_embedding(toks), clip.eot_index(toks)
    ctx_b = torch.randn(2, 4, D)
    deep = [None, torch.randn(2, 4, D), torch.randn(4, D)]
    with torch.no_grad():
        per_img = clip.encode_text_embeddings(clip.insert_context(emb, ctx_b), eot, deep_prompts=deep)
        assert per_img.shape == (2, 3, clip.embed_dim)
        for b in range(2):  # one batched pass == one pass per image
            one = clip.encode_text_embeddings(clip.insert_context(emb, ctx_b[b]), eot, deep_prompts=[None, deep[1][b], deep[2]])
            torch.testing.assert_close(per_img[b], one, atol=1e-5, rtol=1e-5)
        no_deep = clip.encode_text_embeddings(clip.insert_context(emb, ctx_b), eot)
        assert (per_img - no_deep).abs().max() > 1e-3
        out = clip.encode_text_embeddings(clip.insert_context(emb, ctx_b), eot, return_tokens=-1, return_attn=0)
    assert out["tokens"][2].shape == (2, 3, 16, D) and out["attn"][0].shape == (2, 3, clip.text_heads, 16, 16)


def test_only_prompts_get_gradients(tiny_clip):
    ctx = nn.Parameter(torch.randn(4, tiny_clip.text_width))
    vp = nn.Parameter(torch.randn(2, tiny_clip.vision_width))
    toks = tiny_clip.prompt_tokens(["forest", "harbor"], 4)
    txt = tiny_clip.encode_text_embeddings(tiny_clip.insert_context(tiny_clip.token_embedding(toks), ctx), tiny_clip.eot_index(toks), normalize=True)
    img = tiny_clip.encode_image(torch.randn(2, 3, 32, 32), prompts=vp, normalize=True)
    (tiny_clip.logit_scale * img @ txt.T).logsumexp(-1).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0 and vp.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_clip.parameters())


def test_unsupported_models_fail_clearly():
    with pytest.raises(UnsupportedBackbone, match="not a ViT"):
        PromptableCLIP(open_clip.CLIP(32, {"layers": [1, 1, 1, 1], "width": 16, "image_size": 32}, TINY["text_cfg"]))
    m = _tiny(vision={"qk_norm": True})
    with pytest.raises(UnsupportedBackbone, match="attention maps need nn.MultiheadAttention"):
        PromptableCLIP(m).encode_image(torch.randn(1, 3, 32, 32), return_attn=0)


def test_registry_entries_are_open_clip_architectures():
    assert set(list_backbones()) >= {"openai-vit-b-32", "openai-vit-b-16", "openai-vit-l-14", "laion2b-vit-b-32",
                                     "remoteclip-vit-b-32", "georsclip-vit-b-32", "skyclip-vit-l-14", "rs-tiny"}
    register_model_config("rs-tiny", RS_TINY_CONFIG)  # load_backbone does this; registering needs open_clip, so it is lazy
    for e in BACKBONES.values():
        assert open_clip.get_model_config(e.arch) is not None, e.name
        if e.kind == "openclip":
            pc = open_clip.get_pretrained_cfg(e.arch, e.tag)
            assert (pc["hf_hub"], pc["url"], bool(pc.get("quick_gelu"))) == (e.hf_hub, e.url, e.quick_gelu), e.name
        if e.kind == "file": assert e.source.startswith("https://") and e.filename


def _clean_env(tmp_path):
    env = dict(os.environ, HOME=str(tmp_path), HF_HOME=str(tmp_path / "hf"), RS_LAB_WEIGHTS=str(tmp_path / "w"), HF_HUB_OFFLINE="1")
    env.pop("HF_HUB_CACHE", None)
    return env


def test_backbones_list_cli_is_quick_and_offline(tmp_path):
    env = _clean_env(tmp_path)
    r = subprocess.run([RS_LAB, "backbones", "list"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for n in list_backbones(): assert n in r.stdout
    assert "local-dir:" in r.stdout and "random:" in r.stdout and "missing" in r.stdout
    code = "import sys; from rs_prompt_lab.cli import main; main(['backbones', 'list']); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.strip().endswith("False")  # the availability check never imports torch


def test_missing_weights_fail_fast_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("RS_LAB_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(WeightsError, match="chendelong/RemoteCLIP"):
        load_backbone("remoteclip-vit-b-32")
    env = _clean_env(tmp_path)  # empty HF cache, empty weights folder, offline
    code = "import sys; from rs_prompt_lab.cli import main; rc = main(['backbones', 'show', 'openai-vit-b-32']); print(rc, 'torch' in sys.modules)"
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.stdout.split() == ["2", "False"], r.stdout + r.stderr  # refused before torch/open_clip are even imported
    assert time.time() - t0 < 120  # no download retries (hub retries take minutes); a loose bound, not a speed target
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "--weights PATH" in r.stderr and "local-dir:" in r.stderr and "HF_HUB_OFFLINE" in r.stderr


def test_rs_tiny_missing_or_loads():
    if find_weights("rs-tiny") is None:
        with pytest.raises(WeightsError, match="rs-lab pretrain"):
            load_backbone("rs-tiny")
    else:
        clip, info = load_backbone("rs-tiny")  # load time: benchmarks/bench_backbones.py
        assert clip.image_size == (64, 64)


def test_rs_tiny_folder_roundtrip_fp16_size_and_preprocess(tmp_path):
    torch.manual_seed(0)
    clip, info = load_backbone("random:rs-tiny")
    n = sum(p.numel() for p in clip.parameters())
    assert n == 7_981_057
    pp = dict(RS_TINY_PREPROCESS, mean=[0.5] * 3, std=[0.5] * 3)
    save_backbone_dir(clip, tmp_path / "rs_tiny", RS_TINY_CONFIG, pp, recipe={"seed": 0}, half=True)
    size = (tmp_path / "rs_tiny" / "open_clip_model.safetensors").stat().st_size
    assert size < 16e6, size  # shippable inside the package
    clip2, info2 = load_backbone("rs-tiny", weights_path=tmp_path / "rs_tiny")  # the layout rs-lab pretrain ships
    assert info2["mean"] == (0.5, 0.5, 0.5) and info2["backbone"] == "rs-tiny" and clip2.preprocess_info["resize_mode"] == "squash"
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clip2.encode_image(x), clip.encode_image(x), atol=2e-2, rtol=2e-2)
    _, info3 = load_backbone("random:rs-tiny")
    assert info3["mean"] == tuple(open_clip.OPENAI_DATASET_MEAN)  # open_clip#1068: nothing left over


def test_param_table_method_share(tiny_clip):
    class M(nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.clip, self.prompts = clip, nn.Parameter(torch.zeros(5, clip.vision_width))
            self.head = nn.Linear(clip.embed_dim, 3)
    tab = param_table(M(tiny_clip))
    bb = sum(p.numel() for p in tiny_clip.model.parameters())
    assert tab.backbone_total == bb and tab.trainable == 5 * tiny_clip.vision_width + tiny_clip.embed_dim * 3 + 3
    assert tab.trainable_pct == pytest.approx(100 * tab.trainable / bb)
    assert {"prompts", "head", "clip.visual", "clip.transformer"} <= {r["module"] for r in tab.rows}
    deeper = param_table(M(tiny_clip), depth=2)
    assert "clip.visual.transformer" in {r["module"] for r in deeper.rows} and deeper.total == tab.total


def test_zeroshot_on_tiny_dataset_and_cli(monkeypatch, capsys):
    from rs_prompt_lab.data.datasets import ImageTextDataset
    from rs_prompt_lab.cli import main
    import rs_prompt_lab.data.manifest as man
    torch.manual_seed(0)
    clip, info = load_backbone("random:rs-tiny")
    rng = np.random.default_rng(1)
    classes = ["forest", "river", "dense_residential", "farmland"]
    ds = ImageTextDataset([rng.integers(0, 255, (48, 56, 3), dtype=np.uint8) for _ in range(12)], rng.integers(0, 4, 12), classes,
                          splits={"test": np.arange(4, 12)})
    r = evaluate_zeroshot(clip, ds.subset("test"), info, batch_size=3, progress=False)
    head = zeroshot_head(clip, classes)
    with torch.no_grad():
        x = preprocess_images([ds.image(i) for i in range(4, 12)], info)
        manual = accuracy(clip.encode_image(x, normalize=True) @ head.T, ds.labels[4:12])
    assert r["n"] == 8 and r["chance"] == 0.25 and r["top1"] == pytest.approx(manual)
    monkeypatch.setattr(man, "load_dataset", lambda name, root=None: ds)
    assert main(["zeroshot", "--backbone", "random:rs-tiny", "--data", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "zero-shot top-1 accuracy:" in out and "n=8" in out and "chance 0.2500" in out
    assert main(["zeroshot", "--backbone", "rs-tiny-typo", "--data", "tiny"]) == 2
