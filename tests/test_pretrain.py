"""The rs-tiny recipe: a quick `rs-lab pretrain` beats random init on held-out zero-shot; the shipped weights load fast."""
import json, subprocess, sys
from pathlib import Path
import pytest

RS_LAB = str(Path(sys.executable).parent / "rs-lab")


def test_quick_pretrain_beats_random_init(tmp_path):
    out = tmp_path / "rs_tiny_quick"
    r = subprocess.run([RS_LAB, "pretrain", "--quick", "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    recipe = json.loads((out / "recipe.json").read_text())
    res = recipe["results"]
    assert res["zeroshot_trained"] > res["zeroshot_random_init"], res
    assert res["zeroshot_trained"] > res["chance"], res
    assert {"cfg", "provenance", "architecture"} <= set(recipe)
    assert recipe["trainer"]["cls"] == "rs_prompt_lab.train.Trainer" and recipe["loss"] == "open_clip.loss.ClipLoss"
    from rs_prompt_lab.backbones import load_backbone
    clip, info = load_backbone(f"local-dir:{out}")
    assert info["size"] == [64, 64] or tuple(info["size"]) == (64, 64)


def test_trainer_based_pretraining_lowers_clip_loss(monkeypatch):
    "pretrain_rs_tiny runs on the shared Trainer (whole CLIP trainable) and lowers open_clip's ClipLoss on a fixed batch."
    import numpy as np, open_clip, torch
    from rs_prompt_lab import pretrain as P
    from rs_prompt_lab.core import seed_everything
    from rs_prompt_lab.promptable import PromptableCLIP
    from rs_prompt_lab.train import Trainer
    seen, fit = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: seen.append(self) or fit(self, *a, **k))
    cfg = P.PretrainCfg(n_per_class=4, domains=("aerial-rgb",), steps=40, batch_size=32, warmup=5, eval_every=20, device="cpu")
    r = P.pretrain_rs_tiny(cfg, progress=False)
    (t,) = seen
    assert isinstance(t.model, P.ContrastiveCLIP) and t.n_trainable == t.n_total and t.step == 40 and len(t.history) == 2
    assert len(r["losses"]) == 40 and np.mean(r["losses"][-5:]) < np.mean(r["losses"][:5]) - 0.5, r["losses"]

    from rs_prompt_lab.backbones import RS_TINY_CONFIG, RS_TINY_PREPROCESS, register_model_config
    register_model_config("rs-tiny", RS_TINY_CONFIG)
    info = RS_TINY_PREPROCESS
    seed_everything(cfg.seed)  # the same random initialisation pretrain_rs_tiny started from
    init = open_clip.create_model("rs-tiny", pretrained=None)
    corpus = P.build_corpus(cfg, "train", open_clip.get_tokenizer("rs-tiny"), progress=False)
    batch = next(iter(P.PairBatches(corpus, info, 32, 1, cfg.template_prob, seed=123)))
    loss = P.ClipLossFn()
    with torch.no_grad():
        before, after = (loss(P.ContrastiveCLIP(PromptableCLIP(m.float(), freeze=False)).eval()(batch)).item() for m in (init, r["model"]))
    assert after < before - 0.5, (before, after)


def test_shipped_rs_tiny_loads_offline():
    from rs_prompt_lab.backbones import RS_TINY_DIR, load_backbone
    assert (RS_TINY_DIR / "recipe.json").exists(), "rs-tiny weights are shipped in the package (rs-lab pretrain builds them)"
    size = sum(p.stat().st_size for p in RS_TINY_DIR.iterdir())
    assert size <= 16 * 2**20, size
    clip, info = load_backbone("rs-tiny")  # load time is measured by benchmarks/bench_backbones.py, not asserted here
    assert not any(p.requires_grad for p in clip.parameters())


def test_shipped_rs_tiny_zero_shot_on_fresh_images():
    "Held-out check independent of the recipe: images from a seed never used in pretraining, all 22 classes."
    from rs_prompt_lab.backbones import load_backbone
    from rs_prompt_lab.synth.images import make_scene_images
    from rs_prompt_lab.zeroshot import evaluate_zeroshot
    ds = make_scene_images(n_per_class=5, size=64, seed=20261130, domain="aerial-rgb")
    chance = 1 / len(ds.class_names)
    trained = evaluate_zeroshot(load_backbone("rs-tiny")[0], ds, progress=False)["top1"]
    random_init = evaluate_zeroshot(load_backbone("random:rs-tiny")[0], ds, progress=False)["top1"]
    assert trained >= 3 * chance, (trained, chance)
    assert trained > random_init + 0.2, (trained, random_init)


def test_synthetic_scenes_manifest_is_disjoint_from_the_pretraining_corpus():
    "Image identity depends on (seed, class, index, domain): a different seed means no image of the manifest was pretrained on."
    from rs_prompt_lab.backbones import RS_TINY_DIR
    from rs_prompt_lab.data.manifest import get_manifest
    recipe = json.loads((RS_TINY_DIR / "recipe.json").read_text())
    params = get_manifest("synthetic-scenes").generator["params"]
    assert params["seed"] != recipe["cfg"]["seed"], (params, recipe["cfg"]["seed"])
