"""Backbone control for fine-tuning: unlocking image-tower groups, train/eval modes, gradient checkpointing in
PromptableCLIP's own block loop, and the Trainer's weight-decay parameter groups."""
import copy, logging

import pytest
import torch
import torch.nn as nn
import open_clip

import rs_prompt_lab.promptable as promptable_mod
from rs_prompt_lab.core import ConfigError
from rs_prompt_lab.promptable import PromptableCLIP
from rs_prompt_lab.train import NO_DECAY_KEYS, TrainCfg, Trainer, count_parameters, param_groups, split_decay, trainable_parameters

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 48, "heads": 2, "layers": 3}}
L = TINY["vision_cfg"]["layers"]


def _tiny(vision=None, text=None):
    cfg = copy.deepcopy(TINY)
    cfg["vision_cfg"].update(vision or {}); cfg["text_cfg"].update(text or {})
    torch.manual_seed(0)
    return open_clip.CLIP(**cfg)


def _group_names(n: int) -> set:
    "Names (as PromptableCLIP parameters) of the last n groups of open_clip's VisionTransformer.lock, written out by hand."
    v = _tiny().visual
    block = lambda i: {f"transformer.resblocks.{i}.{k}" for k, _ in v.transformer.resblocks[i].named_parameters()}
    groups = [{"conv1.weight", "class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias"},
              *[block(i) for i in range(L - 1)], block(L - 1) | {"ln_post.weight", "ln_post.bias"}, {"proj"}]
    assert len(groups) == L + 2
    return {f"model.visual.{k}" for g in (groups[-n:] if n else []) for k in g}


def _trainable(m: nn.Module) -> set:
    return {n for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("n", range(L + 3))
def test_unlock_last_n_groups_exactly(n):
    clip = PromptableCLIP(_tiny())
    assert clip.n_image_groups == L + 2 and count_parameters(clip)[0] == 0
    clip.unlock_image_tower(n)
    expected = _group_names(n)
    assert _trainable(clip) == expected
    numel = {k: p.numel() for k, p in clip.named_parameters()}
    assert count_parameters(clip)[0] == sum(numel[k] for k in expected)
    clip.lock_image_tower()
    assert _trainable(clip) == set() and count_parameters(clip)[0] == 0


def test_unlock_whole_tower_default_and_bad_values():
    clip = PromptableCLIP(_tiny()).unlock_image_tower()
    assert _trainable(clip) == {n for n, _ in clip.named_parameters() if n.startswith("model.visual.")} == _group_names(L + 2)
    for bad in (-1, L + 3, 1.5, True, "2"):
        with pytest.raises(ConfigError, match=f"has {L + 2} groups"):
            clip.unlock_image_tower(bad)


def test_unlocked_parameters_reach_the_trainer_with_prompts():
    class Method(nn.Module):
        def __init__(self):
            super().__init__()
            self.clip = PromptableCLIP(_tiny()).unlock_image_tower(1)
            self.prompts = nn.Parameter(torch.zeros(2, self.clip.vision_width))
        def forward(self, x): return self.clip.encode_image(x, prompts=self.prompts)
    m = Method()
    t = Trainer(m, lambda out, batch, model: out.square().mean(), [(torch.randn(2, 3, 32, 32),)], cfg=TrainCfg(device="cpu", progress=False))
    assert {n for n, _ in t.params} == {"clip.model.visual.proj", "prompts"}
    assert t.n_trainable == m.clip.model.visual.proj.numel() + m.prompts.numel()


def _modes(clip):
    return {n: mod.training for n, mod in clip.model.named_modules()}


def test_train_mode_follows_unlocked_parts_only():
    clip = PromptableCLIP(_tiny())
    clip.train()
    assert clip.training and not any(_modes(clip).values())  # frozen and nothing unlocked: all eval, as before
    clip.unlock_image_tower(2)  # last block + ln_post, proj
    clip.train()
    on = {n for n, t in _modes(clip).items() if t}
    assert on == {n for n, _ in clip.model.named_modules() if n.startswith(("visual.transformer.resblocks.2", "visual.ln_post"))}
    parent = nn.Sequential(clip)  # a method composing the wrapper
    parent.eval(); assert not any(_modes(clip).values())
    parent.train(); assert _modes(clip)["visual.transformer.resblocks.2"] and not _modes(clip)["visual.transformer.resblocks.1"]
    clip.unlock_image_tower(); clip.train()
    assert clip.model.visual.training and clip.model.visual.patch_dropout.training and not clip.model.transformer.training
    clip.lock_image_tower()  # while in train mode: the tower goes back to eval at once
    assert not any(_modes(clip).values())


def test_unfrozen_wrapper_trains_everything():
    clip = PromptableCLIP(_tiny(), freeze=False).train()
    assert all(_modes(clip).values()) and count_parameters(clip)[0] == count_parameters(clip)[1]


VARIANTS = {"default": {}, "custom_blocks_qk_norm": {"vision": {"qk_norm": True}, "text": {"qk_norm": True}}}


def _loss_and_grads(variant, ckpt):
    clip = PromptableCLIP(_tiny(**VARIANTS[variant]), freeze=False).set_grad_checkpointing(ckpt)
    torch.manual_seed(1)
    vp = nn.Parameter(torch.randn(2, clip.vision_width))
    deep_t = [None, nn.Parameter(torch.randn(4, clip.text_width))]
    img = clip.encode_image(torch.randn(3, 3, 32, 32), prompts=vp, deep_prompts=[None, torch.randn(2, clip.vision_width)], normalize=True)
    txt = clip.encode_text(["a forest.", "a harbor with boats."], deep_prompts=deep_t, normalize=True)
    loss = (clip.logit_scale * img @ txt.T).logsumexp(-1).mean()
    loss.backward()
    grads = {n: p.grad for n, p in clip.named_parameters()} | {"vp": vp.grad, "deep_t": deep_t[1].grad}
    return loss.detach(), grads


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_grad_checkpointing_same_outputs_and_gradients(variant, monkeypatch):
    calls = []
    real = promptable_mod.checkpoint
    monkeypatch.setattr(promptable_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    l0, g0 = _loss_and_grads(variant, False)
    assert calls == []
    l1, g1 = _loss_and_grads(variant, True)
    assert len(calls) == 2 * L  # every block of both towers ran under torch.utils.checkpoint
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:
        assert (g0[k] is None) == (g1[k] is None), k
        if g0[k] is not None: torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-5, msg=k)


def test_grad_checkpointing_flag_and_no_grad(monkeypatch):
    calls = []
    real = promptable_mod.checkpoint
    monkeypatch.setattr(promptable_mod, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    clip = PromptableCLIP(_tiny()).set_grad_checkpointing(True)
    assert clip.model.visual.transformer.grad_checkpointing and clip.model.transformer.grad_checkpointing
    with torch.no_grad(): clip.encode_image(torch.randn(1, 3, 32, 32))
    assert calls == []  # nothing to recompute without autograd
    clip.encode_image(torch.randn(1, 3, 32, 32), return_attn=0)
    assert len(calls) == L - 1  # the layer whose attention map is returned runs unchecked
    clip.set_grad_checkpointing(False)
    assert not clip.model.visual.transformer.grad_checkpointing


def test_no_weight_decay_names_are_parameters():
    clip = PromptableCLIP(_tiny())
    names = dict(clip.named_parameters())
    assert clip.no_weight_decay() == {"model.positional_embedding", "model.visual.positional_embedding", "model.visual.class_embedding"}
    assert clip.no_weight_decay() <= names.keys()


class CoOpLike(nn.Module):
    "A whole trainable CLIP plus CoOp context, MaPLe-style deep prompts and a projection, a head and a frozen layer."
    def __init__(self):
        super().__init__()
        self.clip = PromptableCLIP(_tiny(), freeze=False)
        self.ctx = nn.Parameter(torch.zeros(4, 48))
        self.compound_prompts = nn.ParameterList([nn.Parameter(torch.zeros(2, 48)) for _ in range(2)])
        self.prompt_proj = nn.Linear(48, 64)
        self.head = nn.Linear(32, 3)
        self.frozen = nn.Linear(3, 3).requires_grad_(False)


def test_param_groups_no_decay_for_norms_biases_embeddings_prompts():
    m = CoOpLike()
    decay, rest = (dict(g) for g in split_decay(m))
    assert decay.keys() | rest.keys() == {n for n, _ in trainable_parameters(m)} and not decay.keys() & rest.keys()
    for n in ["clip.model.token_embedding.weight", "clip.model.positional_embedding", "clip.model.visual.positional_embedding",
              "clip.model.visual.class_embedding", "clip.model.logit_scale", "clip.model.visual.ln_pre.weight",
              "clip.model.visual.transformer.resblocks.0.ln_1.weight", "clip.model.ln_final.bias",
              "clip.model.visual.transformer.resblocks.0.attn.in_proj_bias", "clip.model.transformer.resblocks.1.mlp.c_fc.bias",
              "ctx", "compound_prompts.0", "compound_prompts.1", "head.bias", "prompt_proj.bias"]:
        assert n in rest, n
    for n in ["clip.model.visual.conv1.weight", "clip.model.visual.proj", "clip.model.text_projection",
              "clip.model.visual.transformer.resblocks.0.attn.in_proj_weight", "clip.model.transformer.resblocks.2.mlp.c_proj.weight",
              "head.weight", "prompt_proj.weight"]:  # weight matrices decay, also a Linear that makes prompts
        assert n in decay, n
    assert all(p.ndim >= 2 for p in decay.values())
    assert not any(k in n.rsplit(".", 1)[-1] for n in decay for k in NO_DECAY_KEYS)
    assert "frozen.weight" not in decay and "frozen.weight" not in rest


def test_param_groups_custom_keys_and_mamba_attribute():
    m = CoOpLike()
    m.head.weight._no_weight_decay = True
    decay, rest = (dict(g) for g in split_decay(m, no_decay=("ctx",)))
    assert "head.weight" in rest and "compound_prompts.0" in decay and "ctx" in rest
    assert "clip.model.visual.positional_embedding" in rest  # from no_weight_decay(), whatever the keys


def test_trainer_groups_and_zero_decay_keeps_one_group_in_order(caplog):
    m = CoOpLike()
    loader = [(torch.randn(2, 3, 32, 32),)]
    loss = lambda out, batch, model: out.square().mean()
    cfg = TrainCfg(device="cpu", progress=False, weight_decay=0.1)
    logging.getLogger("rs_prompt_lab").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="rs_prompt_lab"):
            t = Trainer(m, loss, loader, cfg=cfg)
    finally: logging.getLogger("rs_prompt_lab").propagate = False
    decay, rest = split_decay(m)
    assert [g["weight_decay"] for g in t.optimizer.param_groups] == [0.1, 0.0]
    assert [[id(p) for p in g["params"]] for g in t.optimizer.param_groups] == [[id(p) for _, p in decay], [id(p) for _, p in rest]]
    assert f"weight decay 0.1 on {len(decay)} tensors" in caplog.text and f"none on {len(rest)} tensors" in caplog.text
    t0 = Trainer(CoOpLike(), loss, loader, cfg=cfg.replace(weight_decay=0.0))
    assert len(t0.optimizer.param_groups) == 1
    assert [id(p) for p in t0.optimizer.param_groups[0]["params"]] == [id(p) for _, p in t0.params]


def test_zero_decay_trajectory_identical_to_flat_adamw():
    "weight_decay=0: the grouped optimiser follows exactly the path of AdamW over the flat trainable list (old behaviour)."
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 3)); b = copy.deepcopy(a)
    oa = torch.optim.AdamW([p for _, p in trainable_parameters(a)], lr=1e-2, weight_decay=0.0)
    ob = torch.optim.AdamW(param_groups(b, 0.0), lr=1e-2, weight_decay=0.0)
    x = torch.randn(16, 5)
    for _ in range(5):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad(); m(x).square().mean().backward(); o.step()
    for pa, pb in zip(a.parameters(), b.parameters()): assert torch.equal(pa, pb)
    assert oa.state_dict()["param_groups"][0]["params"] == ob.state_dict()["param_groups"][0]["params"]
