"""BiMoRS and the scene protocols: a real RSICD image with its real captions through BiMoRS, the `rs-lab train ... --protocol`
command, the budgets at ViT-B/16, convergence on a separable task, and one clear line for each bad input."""
import json
from pathlib import Path
import numpy as np
import pytest
import torch

from rs_prompt_lab.cli import main
from rs_prompt_lab.core import ConfigError, DataError, load_json, count_parameters
from rs_prompt_lab.data.datasets import ImageTextDataset
from rs_prompt_lab.inputs import ImageSpec
from rs_prompt_lab.methods import create_method
from rs_prompt_lab.scene.protocol import SceneExpCfg, run_scene_experiment, SceneBatches, loader

SMALL = ["--param", "n_per_class=12", "--shots", "4", "--val-shots", "2", "--seeds", "1", "--quick", "--no-progress"]


@pytest.fixture(scope="module")
def clip():
    from rs_prompt_lab.backbones import load_backbone
    return load_backbone("rs-tiny")[0].eval()


def _cfg(tmp_path, **kw):
    base = dict(dataset_params={"n_per_class": 12, "domain": "sentinel-like"}, shots=4, val_shots=2, seeds=[1], quick=True,
                out_dir=tmp_path / "runs", cache_dir=str(tmp_path / "cache"), progress=False)
    return SceneExpCfg.from_flat(**{**base, **kw})


# (a) real data ---------------------------------------------------------------------------------------------------------

@pytest.mark.realdata
def test_rsicd_stadium_through_bimors_with_its_real_captions(shared_data, clip, tmp_path):
    from rs_prompt_lab.scene.captions import FileCaptions, captions_for
    from rs_prompt_lab.scene.encoders import TextTowerEncoder
    img = shared_data / "rsicd" / "clip_rsicd_textaug" / "stadium_1.jpg"
    ds = ImageTextDataset([img], [0], ["stadium", "playground", "parking lot"], name="rsicd-stadium")
    caps = captions_for(ds, FileCaptions(shared_data / "rsicd" / "precomp"), tmp_path, progress=False)
    lines = (shared_data / "rsicd" / "precomp" / "train_caps.txt").read_text().splitlines()
    names = (shared_data / "rsicd" / "precomp" / "train_filename.txt").read_text().splitlines()
    k = len(lines) // len(names)
    assert caps == [lines[names.index("stadium_1.jpg") * k].strip()]       # its first real caption
    enc = TextTowerEncoder(clip)
    emb = enc.encode(caps)
    m = create_method("bimors", clip, ImageSpec(ds.class_names, size=64, caption_dim=enc.dim)).eval()
    batch = next(iter(loader(SceneBatches(ds, [0], {0: 0}, 64, 3, emb), 1, False, 0)))
    assert batch["image"].shape == (1, 3, 64, 64)                          # the 224 x 224 JPEG at rs-tiny's size
    with torch.no_grad(): out = m(batch)
    assert out.logits.shape == (1, 3) and torch.isfinite(out.logits).all()
    assert out["kv_attention"].shape == (1, 4, 2) and torch.allclose(out["kv_attention"].sum(-1), torch.ones(1, 4))


@pytest.mark.realdata
def test_captions_only_dataset_is_refused_as_a_source(shared_data, tmp_path):
    cfg = _cfg(tmp_path, dataset="rsicd-captions", root=str(shared_data / "rsicd"), dataset_params={})
    with pytest.raises(DataError, match="no class labels"):
        run_scene_experiment(cfg)


# (b) the command and the records ---------------------------------------------------------------------------------------

def test_cli_b2n_quick_writes_both_models_and_resumes(tmp_path, capsys):
    args = ["train", "bimors", "--protocol", "b2n", *SMALL, "--out", str(tmp_path / "runs"), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "base" in out and "h " in out and "val-selected" in out
    seed = next((tmp_path / "runs" / "scene" / "b2n").rglob("seed1"))
    m = load_json(seed / "metrics.json")
    assert set(m["sets"]) == {"base", "new"} and {"base", "new", "h"} <= set(m["last"])
    assert m["selected_on"].startswith("validation") and (seed / "train" / "curve.png").exists()
    c = load_json(seed / "config.json")
    assert c["captions"]["captioner"] == "synthetic" and len(c["train_classes"]) == 11     # ceil(22 / 2) base classes
    assert (seed.parent / "summary.json").exists()
    before = (seed / "metrics.json").stat().st_mtime_ns
    assert main(args) == 0                                                                   # finished seed: skipped
    assert (seed / "metrics.json").stat().st_mtime_ns == before
    capsys.readouterr()
    assert main(["results", str(tmp_path / "runs")]) == 0                                    # the scene table: its own columns
    table = capsys.readouterr().out
    assert "## b2n: synthetic-scenes" in table and "| Base | New | H |" in table


def test_linear_probe_b2n_skips_new_classes_and_dg_scores_shared_ones(tmp_path):
    s = run_scene_experiment(_cfg(tmp_path, method="linear-probe", protocol="b2n"))
    m = load_json(_cfg(tmp_path, method="linear-probe", protocol="b2n").run_dir(1) / "metrics.json")
    assert "skipped" in m["sets"]["new"] and m["new"] is None and "base" in s["metrics"] and "h" not in s["metrics"]
    cfg = _cfg(tmp_path, method="linear-probe", protocol="dg", dataset_params={"n_per_class": 12, "domain": "aerial-rgb"})
    m = run_scene_experiment(cfg)
    assert {"source", "target_mean"} <= set(m["metrics"])


def test_masked_captions_differ_from_plain_and_name_no_class(tmp_path):
    from rs_prompt_lab.scene.protocol import load_datasets, caption_embeddings
    from rs_prompt_lab.scene.encoders import make_encoder
    from rs_prompt_lab.backbones import load_backbone
    from rs_prompt_lab.scene.synthcap import class_words
    cfg = _cfg(tmp_path, captioner="synthetic-masked")
    src = load_datasets(cfg)["source"]
    enc = make_encoder("text-tower", load_backbone("rs-tiny")[0])
    _, masked = caption_embeddings(src, range(len(src)), cfg, enc)
    _, plain = caption_embeddings(src, range(len(src)), cfg.replace(captioner="synthetic"), enc)
    words = class_words(src.class_names)
    assert not any(w.strip(".,:").lower() in words for c in masked for w in c.split())
    assert sum(a != b for a, b in zip(masked, plain)) > len(src) // 4


# (c) budgets and convergence -------------------------------------------------------------------------------------------

def test_bimors_trainable_count_at_vit_b16_matches_the_paper():
    from rs_prompt_lab.backbones import load_backbone
    vit = load_backbone("random:ViT-B-16")[0]
    spec = ImageSpec([f"c{i}" for i in range(38)], size=224, caption_dim=768)
    frozen = count_parameters(create_method("bimors-frozen-proj", vit, spec))[0]
    trained = count_parameters(create_method("bimors", vit, spec))[0]
    assert frozen == 2048 + 62_000 + 2048 + 1_050_624                          # ctx + meta-net + 2 LayerNorms + MHA = 1.12 M
    assert trained - frozen == 768 * 512 + 512                                  # the caption projection, trained by default


def _separable(n=8):
    from rs_prompt_lab.synth.images import make_scene_images
    return make_scene_images(n_per_class=n, seed=5, domain="sentinel-like", classes=["forest", "runway", "harbor"])


@pytest.mark.parametrize("method,steps", [("bimors", 40), ("bimors-no-caption", 40)])
def test_scene_method_converges(method, steps, clip, one_thread):
    "Full-batch AdamW on 3 classes x 8 images: training accuracy >= 0.9 and the loss halves within the cap (fails at lr 1e-9)."
    from rs_prompt_lab.scene.encoders import TextTowerEncoder
    from rs_prompt_lab.scene.synthcap import SynthCaptioner
    from rs_prompt_lab.losses import method_loss
    ds = _separable()
    enc = TextTowerEncoder(clip)
    emb = enc.encode(SynthCaptioner().caption(ds, range(len(ds))))
    batch = next(iter(loader(SceneBatches(ds, range(len(ds)), {i: i for i in range(3)}, 64, 3, emb), len(ds), False, 0)))

    def fit(lr):
        torch.manual_seed(0)
        m = create_method(method, clip, ImageSpec(ds.class_names, size=64, caption_dim=enc.dim))
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=lr)
        m.train(); first = None
        for _ in range(steps):
            loss = method_loss(m(batch), batch, m); first = first if first is not None else loss.item()
            opt.zero_grad(); loss.backward(); opt.step()
        m.eval()
        with torch.no_grad(): acc = (m(batch).logits.argmax(1) == batch["label"]).float().mean().item()
        return acc, first, method_loss(m(batch), batch, m).item()
    acc, first, last = fit(5e-3)
    assert acc >= 0.9 and last <= first / 2, (acc, first, last)
    acc0, first0, last0 = fit(1e-9)
    assert not (acc0 >= 0.9 and last0 <= first0 / 2)


# (d) bad input: one clear line each -----------------------------------------------------------------------------------

def test_missing_captions_name_the_images(tmp_path):
    from rs_prompt_lab.synth.images import make_scene_images
    ds = make_scene_images(n_per_class=12, seed=1, domain="sentinel-like")
    f = tmp_path / "caps.jsonl"
    f.write_text("\n".join(json.dumps({"filename": it.image_id, "captions": ["a scene."]}) for it in ds.items[:30]))
    with pytest.raises(DataError) as e:
        run_scene_experiment(_cfg(tmp_path, captioner=f"file:{f}"))
    msg = str(e.value)
    assert "\n" not in msg and "78 of 88 image(s)" in msg and "_00" in msg and ", ..." in msg   # first ids and the count


def test_missing_captioner_weights_is_one_line(tmp_path, capsys):
    rc = main(["train", "bimors", "--protocol", "fewshot", *SMALL, "--out", str(tmp_path / "r"), "--captioner", f"blip2:{tmp_path}/nope"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error:") and len(err.splitlines()) == 1 and "blip2" in err.lower()
    assert not (tmp_path / "r").exists() or not any((tmp_path / "r").rglob("metrics.json"))


def test_dg_target_with_classes_outside_the_source_via_cfg(tmp_path):
    cfg = _cfg(tmp_path, protocol="dg", targets=["synthetic-scenes:preset=renamed,n_per_class=12"])
    with pytest.raises(ConfigError, match="outside the source"):
        run_scene_experiment(cfg)


def test_wrong_channel_count_for_the_backbone(tmp_path):
    with pytest.raises(DataError, match="13 channels but the backbone takes 3"):
        run_scene_experiment(_cfg(tmp_path, method="coop", dataset_params={"n_per_class": 12, "domain": "sentinel-like", "modality": "s2"}))


def test_bad_options_are_refused_before_any_work(tmp_path, capsys):
    for extra, words in [(["--protocol", "b2m"], "b2n"), (["--caption-encoder", "bart:/x"], "bert"), (["--targets", "synthetic-scenes"], "targets are for")]:
        rc = main(["train", "bimors", *SMALL, "--out", str(tmp_path / "r"), *extra])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and len(err.splitlines()) == 1 and words in err, (extra, err)
    assert not (tmp_path / "r").exists()


# (e) the papermill experiment notebook ---------------------------------------------------------------------------------

@pytest.mark.experiment
def test_scene_experiment_notebook_runs(tmp_path, repo_root, monkeypatch):
    import papermill as pm
    for v in ("JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR", "MPLCONFIGDIR"):   # hermetic: nothing under $HOME
        (tmp_path / "home" / v.lower()).mkdir(parents=True)
        monkeypatch.setenv(v, str(tmp_path / "home" / v.lower()))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1"); monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("RS_LAB_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "runs"
    nb = pm.execute_notebook(str(repo_root / "nbs/experiments/02_scene_protocols.ipynb"), str(tmp_path / "out.ipynb"),
                             parameters=dict(PROTOCOL="dg", METHODS=["zeroshot", "bimors"], REFERENCE="zeroshot", SHOTS=4,
                                             DATASET_PARAMS={"n_per_class": 14, "domain": "aerial-rgb"}, SEEDS=[1], DEVICE="cpu",
                                             OUT_DIR=str(out), QUICK=True),
                             kernel_name="python3", progress_bar=False, cwd=str(tmp_path))
    assert not [o for c in nb.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    m = load_json(next((out / "02_scene" / "dg").iterdir()) / "metrics.json")
    assert m["protocol"] == "dg" and m["quick"] is True and 0 <= m["bimors"]["source"] <= 1 and "target_mean" in m["zeroshot"]


# (f) review follow-ups: exact resume, the BERT encoder end to end, validated grids ---------------------------------------

def test_interrupted_seed_resumes_to_the_uninterrupted_result(tmp_path, interrupt_once):
    "Killed after its first epoch (last.pt written), the seed resumes: same history and metrics as a run that was never stopped."
    kw = dict(method="coop", protocol="fewshot", quick=False, budget="cfg", steps=12, batch_size=16, max_test=40)
    a = run_scene_experiment(_cfg(tmp_path / "a", **kw))
    cb = _cfg(tmp_path / "b", **kw)
    interrupt_once(lambda: run_scene_experiment(cb))
    assert (cb.run_dir(1) / "train" / "last.pt").exists() and not (cb.run_dir(1) / "metrics.json").exists()
    b = run_scene_experiment(cb)
    ha = load_json(_cfg(tmp_path / "a", **kw).run_dir(1) / "train" / "metrics.json")["history"]
    hb = load_json(cb.run_dir(1) / "train" / "metrics.json")["history"]
    assert len(ha) == len(hb) > 1 and [r["train_loss"] for r in ha] == pytest.approx([r["train_loss"] for r in hb], rel=1e-5)
    assert a["metrics"]["acc"]["mean"] == pytest.approx(b["metrics"]["acc"]["mean"], abs=1e-9)


def test_bert_caption_encoder_through_the_command(tmp_path, capsys):
    "--caption-encoder bert:PATH passes the checks and runs (a tiny random BERT saved like a download)."
    from transformers import BertConfig, BertModel, BertTokenizer
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted({w.strip(".,:").lower() for w in
             "an aerial view of a satellite image showing next to with in the middle upper lower left right part some many several "
             "grass roads houses trees water sand buildings field soil tanks cars boats runway railway tracks parking lot".split()}) + [f"w{i}" for i in range(120)]
    d = tmp_path / "tiny-bert"; d.mkdir(); (d / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)).save_pretrained(d)
    BertTokenizer(vocab={w: i for i, w in enumerate(words)}).save_pretrained(d)
    assert SceneExpCfg.from_flat(caption_encoder=f"bert:{d}").check().method.caption_encoder.startswith("bert:")
    rc = main(["train", "bimors", "--protocol", "fewshot", *SMALL, "--out", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
               "--caption-encoder", f"bert:{d}"])
    assert rc == 0, capsys.readouterr().err
    c = load_json(next((tmp_path / "r").rglob("seed1/config.json")))
    assert c["captions"]["encoder"].startswith("bert-")


def test_grids_and_specs_are_checked_before_work(tmp_path):
    for kw, words in [(dict(select={"steps": [0]}), "select steps"), (dict(select={"lr": [-1.0]}), "lr value"),
                      (dict(select={"lr": [1e-3]}, val_shots=0), "--val-shots"), (dict(caption_encoder="bert"), "bert needs the folder"),
                      (dict(captioner="file:"), "needs a path")]:
        with pytest.raises(ConfigError, match=words): _cfg(tmp_path, **kw).check()
    assert not (tmp_path / "runs").exists()


def test_dg_bad_target_and_synthetic_captions_on_files_leave_nothing(tmp_path):
    from rs_prompt_lab.scene.protocol import load_datasets, check_datasets
    cfg = _cfg(tmp_path, protocol="dg", targets=["synthetic-scenes:preset=renamed,n_per_class=12"])
    with pytest.raises(ConfigError, match="outside the source"): run_scene_experiment(cfg)
    assert not any((tmp_path / "runs").rglob("seed*"))
    files = ImageTextDataset([tmp_path / "a.jpg"], [0], ["forest"], name="files")
    with pytest.raises(ConfigError, match="file:CAPTIONS"): check_datasets(_cfg(tmp_path), {"source": files})
