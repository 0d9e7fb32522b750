"""Trainer (learning, frozen params, resume, atomic checkpoints), metrics against scikit-learn, seed aggregation,
whole-scene class maps; plus a real-data run on the Houston2013 pixel set."""
import json
import numpy as np
import pytest
import torch
from torch import nn
from sklearn.metrics import accuracy_score, balanced_accuracy_score, cohen_kappa_score, confusion_matrix, average_precision_score

from rs_prompt_lab.core import RSLabError, ConfigError, DataError, load_json
from rs_prompt_lab.train import (TrainCfg, Trainer, Hook, cross_entropy_loss, predict, load_checkpoint, save_checkpoint,
                                 trainable_state)
from rs_prompt_lab import train as train_mod
from rs_prompt_lab.metrics import (classification_report_dict, overall_accuracy, average_accuracy, kappa, per_class_accuracy,
                                   aggregate_seeds, format_mean_std, harmonic_mean, multilabel_map, recall_at_k,
                                   retrieval_metrics)
from rs_prompt_lab.data.scene import Scene
from rs_prompt_lab.classmap import predict_scene, render_classmap, save_classmap, class_palette

DL = torch.utils.data.DataLoader


def blobs(n, seed, d=6, k=3):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, k, (n,), generator=g)
    return torch.utils.data.TensorDataset(torch.eye(k, d)[y] * 4 + torch.randn(n, d, generator=g), y)


class Net(nn.Module):
    "Frozen random projection + trainable head, dict batches, dropout (so the RNG matters for resume)."
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.proj, self.drop, self.head = nn.Linear(6, 8), nn.Dropout(0.2), nn.Linear(8, 3)
        self.proj.requires_grad_(False)
    def forward(self, batch): return self.head(self.drop(torch.relu(self.proj(batch["x"]))))


def dict_loader(ds, bs, shuffle):
    return DL(ds, batch_size=bs, shuffle=shuffle, collate_fn=lambda items: {"x": torch.stack([a for a, _ in items]),
                                                                            "label": torch.stack([b for _, b in items])})


@pytest.fixture(scope="module")
def loaders():
    return dict_loader(blobs(96, 1), 16, True), dict_loader(blobs(60, 2), 32, False)


def cfg(tmp_path=None, **kw):
    base = dict(epochs=3, lr=5e-2, warmup_epochs=1, device="cpu", progress=False, out_dir=tmp_path)
    return TrainCfg(**{**base, **kw})


def test_learns_and_only_trainable_params_change(loaders, tmp_path):
    tr_dl, va_dl = loaders
    m = Net()
    frozen = {k: v.clone() for k, v in m.proj.state_dict().items()}
    head0 = m.head.weight.detach().clone()
    t = Trainer(m, cross_entropy_loss(), tr_dl, va_dl, cfg(tmp_path))
    assert t.n_trainable == 8 * 3 + 3 and t.n_total == 6 * 8 + 8 + 27
    assert [n for n, _ in t.params] == ["head.weight", "head.bias"]
    assert {id(p) for g in t.optimizer.param_groups for p in g["params"]} == {id(m.head.weight), id(m.head.bias)}
    before = t.evaluate()["val_oa"]
    hist = t.fit()
    assert before < 0.6 and hist[-1]["val_oa"] > 0.85, (before, hist)
    for k, v in m.proj.state_dict().items(): assert torch.equal(v, frozen[k]), k   # bit-identical frozen layer
    assert not torch.equal(m.head.weight, head0)
    mj, cj = load_json(tmp_path / "metrics.json"), load_json(tmp_path / "config.json")
    assert len(mj["history"]) == 3 and mj["select_metric"] == "val_oa"
    assert mj["best_score"] == max(r["val_oa"] for r in hist)
    assert cj["cfg"]["lr"] == 5e-2 and "packages" in cj["provenance"] and cj["trainable_params"] == 27


def test_logs_trainable_count(loaders, caplog):
    import logging
    logging.getLogger("rs_prompt_lab").propagate = True
    try:
        with caplog.at_level(logging.INFO, logger="rs_prompt_lab"):
            Trainer(Net(), cross_entropy_loss(), loaders[0], cfg=cfg())
    finally: logging.getLogger("rs_prompt_lab").propagate = False
    assert any("trainable parameters: 27 of 83" in r.getMessage() for r in caplog.records)


def test_no_trainable_params_is_an_error(loaders):
    m = Net().requires_grad_(False)
    with pytest.raises(ConfigError, match="nothing to train"):
        Trainer(m, cross_entropy_loss(), loaders[0], cfg=cfg())


def test_best_state_is_restored(loaders, tmp_path):
    "With restore_best the model ends with the trainable state of the best validation epoch (= best.pt)."
    t = Trainer(Net(), cross_entropy_loss(), loaders[0], loaders[1], cfg(tmp_path, epochs=4, lr=0.5))
    t.fit()
    best = load_checkpoint(tmp_path / "best.pt")
    assert best["trainable"].keys() == trainable_state(t.model).keys()
    for k, v in best["trainable"].items(): assert torch.equal(v, t.model.state_dict()[k]), k
    assert t.best_epoch == max(t.history, key=lambda r: r["val_oa"])["epoch"]   # first maximum wins


def _run(out, loaders, interrupt_after=None, resume=False, **kw):
    class Crash(Hook):
        def after_epoch(self, t):
            if t.epoch == interrupt_after: raise KeyboardInterrupt("simulated kill")
    m = Net(seed=3)
    t = Trainer(m, cross_entropy_loss(), loaders[0], loaders[1], cfg(out, epochs=2, restore_best=False, **kw),
                hooks=[Crash()] if interrupt_after else [])
    try: t.fit(resume=resume)
    except KeyboardInterrupt: pass
    return m, t


@pytest.mark.parametrize("opt", ["adamw", "sgd"])
def test_resume_equals_straight_run(loaders, tmp_path, opt):
    straight, ts = _run(tmp_path / "a", loaders, optimizer=opt, grad_clip=1.0)
    _, tb = _run(tmp_path / "b", loaders, interrupt_after=1, optimizer=opt, grad_clip=1.0)
    assert load_checkpoint(tmp_path / "b" / "last.pt")["epoch"] == 1
    resumed, tr = _run(tmp_path / "b", loaders, resume=True, optimizer=opt, grad_clip=1.0)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert tr.step == ts.step == 2 * len(loaders[0])
    assert tr.optimizer.param_groups[0]["lr"] == ts.optimizer.param_groups[0]["lr"]
    assert [r["val_oa"] for r in tr.history] == [r["val_oa"] for r in ts.history]


def test_resume_without_checkpoint_is_an_error(loaders, tmp_path):
    t = Trainer(Net(), cross_entropy_loss(), loaders[0], cfg=cfg(tmp_path / "empty"))
    with pytest.raises(DataError, match="nothing to resume from"):
        t.fit(resume=True)


def test_checkpoint_atomic(loaders, tmp_path, monkeypatch):
    t = Trainer(Net(), cross_entropy_loss(), loaders[0], loaders[1], cfg(tmp_path, epochs=1))
    t.fit()
    good = (tmp_path / "last.pt").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.json"]

    real_save = torch.save
    def crashing_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        with open(f, "r+b") as fh: fh.truncate(100)          # half-written file...
        raise OSError("disk full")                            # ...then the crash
    monkeypatch.setattr(train_mod.torch, "save", crashing_save)
    with pytest.raises(RSLabError, match=r"last.pt: could not write \(disk full; .* MiB free .*the previous last.pt is intact"):
        save_checkpoint(t.state_dict(), tmp_path / "last.pt")       # one line naming the file and the free space, no raw OSError
    monkeypatch.undo()
    assert (tmp_path / "last.pt").read_bytes() == good                       # previous checkpoint intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "config.json", "last.pt", "metrics.json"]  # no temp
    ck = load_checkpoint(tmp_path / "last.pt")                                # loads with weights_only=True
    assert ck["epoch"] == 1 and set(ck) >= {"trainable", "optimizer", "scheduler", "scaler", "rng", "cfg"}
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="bad.pt: not a readable checkpoint"):
        load_checkpoint(tmp_path / "bad.pt")


def test_schedule_warmup_and_cosine(loaders):
    tr_dl = loaders[0]
    t = Trainer(Net(), cross_entropy_loss(), tr_dl, cfg=cfg(epochs=2, warmup_steps=3, lr=1.0, min_lr_ratio=0.0))
    lrs = []
    for _ in range(2 * len(tr_dl)):
        lrs.append(t.optimizer.param_groups[0]["lr"]); t.optimizer.step(); t.scheduler.step()
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12) and all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_tuple_batches_bf16_and_predict():
    ds = blobs(64, 5)
    m = nn.Linear(6, 3)
    t = Trainer(m, cross_entropy_loss(), DL(ds, batch_size=16), DL(blobs(32, 6), batch_size=16), cfg(amp="bf16", epochs=2))
    assert t.amp_dtype == torch.bfloat16
    t.fit()
    logits, y = predict(m, DL(ds, batch_size=16), "cpu")
    assert logits.shape == (64, 3) and logits.dtype == torch.float32 and torch.equal(y, ds.tensors[1])
    preds, _ = predict(m, DL(ds, batch_size=16), "cpu", return_preds=True)
    assert torch.equal(preds, logits.argmax(1))
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        Trainer(m, cross_entropy_loss(), DL(ds, batch_size=16), cfg=cfg(amp="fp16"))


def test_nonfinite_loss_is_reported():
    ds = blobs(32, 5)
    m = nn.Linear(6, 3)
    bad = lambda out, batch, model: out.sum() * float("nan")
    with pytest.raises(Exception, match="loss is nan at epoch 1, step 1"):
        Trainer(m, bad, DL(ds, batch_size=16), cfg=cfg(epochs=1)).fit()



@pytest.mark.parametrize("clip", [None, 1e-3])
def test_grad_clip_bounds_the_step(loaders, clip):
    "One plain SGD step (lr 1, no momentum) moves the trainable weights by the clipped gradient norm; frozen ones stay."
    m = Net()
    ps = [p for p in m.parameters() if p.requires_grad]
    before, frozen = [p.detach().clone() for p in ps], m.proj.weight.detach().clone()
    Trainer(m, cross_entropy_loss(), loaders[0], cfg=cfg(epochs=1, steps_per_epoch=1, lr=1.0, warmup_epochs=0, optimizer="sgd",
                                                        momentum=0.0, grad_clip=clip)).fit()
    step = torch.cat([(p - b).flatten() for p, b in zip(ps, before)]).norm().item()
    if clip is None: assert step > 10 * 1e-3, step
    else: assert step == pytest.approx(clip, rel=1e-4)
    assert torch.equal(m.proj.weight, frozen)


def test_weight_decay_groups_with_sgd(loaders):
    "SGD gets the same groups as AdamW: the head's weight decays, its bias does not."
    m = Net()
    t = Trainer(m, cross_entropy_loss(), loaders[0], cfg=cfg(optimizer="sgd", weight_decay=0.5))
    assert [(g["weight_decay"], [id(p) for p in g["params"]]) for g in t.optimizer.param_groups] == \
        [(0.5, [id(m.head.weight)]), (0.0, [id(m.head.bias)])]


# ---------------------------------------------------------------- metrics
def test_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    for trial in range(5):
        yt = rng.integers(0, 7, 300); yp = np.where(rng.random(300) < 0.6, yt, rng.integers(0, 8, 300))  # class 7 only predicted
        r = classification_report_dict(yt, yp)
        assert r["oa"] == pytest.approx(accuracy_score(yt, yp))
        assert r["aa"] == pytest.approx(balanced_accuracy_score(yt, yp))
        assert r["kappa"] == pytest.approx(cohen_kappa_score(yt, yp))
        assert np.array_equal(r["confusion"], confusion_matrix(yt, yp, labels=r["labels"]))
        cm = confusion_matrix(yt, yp, labels=np.arange(8))
        for c, acc in per_class_accuracy(yt, yp).items(): assert acc == pytest.approx(cm[c, c] / cm[c].sum())
        assert 7 not in per_class_accuracy(yt, yp)


def test_metrics_hand_example():
    yt, yp = [1, 1, 1, 2, 2, 3, 3, 3], [1, 1, 3, 2, 3, 3, 3, 2]
    assert overall_accuracy(yt, yp) == pytest.approx(5 / 8)
    assert average_accuracy(yt, yp) == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert kappa(yt, yp) == pytest.approx((5 / 8 - 22 / 64) / (1 - 22 / 64))
    r = classification_report_dict(yt, yp, {1: "a", 2: "b", 3: "c"})
    assert r["per_class"] == pytest.approx({"a": 2 / 3, "b": 0.5, "c": 2 / 3})
    with pytest.raises(DataError, match="y_true has 3 labels but y_pred has 2"):
        overall_accuracy([1, 2, 3], [1, 2])


def test_aggregate_seeds_and_format():
    runs = [{"oa": 0.8, "aa": 0.7, "per_class": {"a": 1.0}}, {"oa": 0.9, "aa": 0.6, "per_class": {"a": 0.0}}]
    agg = aggregate_seeds(runs)
    assert agg["oa"]["mean"] == pytest.approx(0.85) and agg["oa"]["std"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert agg["per_class.a"]["values"] == [1.0, 0.0] and agg["aa"]["n"] == 2
    assert aggregate_seeds(runs, ddof=0)["oa"]["std"] == pytest.approx(0.05)
    assert format_mean_std(agg["oa"]) == f"85.00 ± {100 * np.std([0.8, 0.9], ddof=1):.2f}"
    assert format_mean_std({"mean": 1.23456, "std": 0.1}, scale=1, digits=3) == "1.235 ± 0.100"


def test_harmonic_map_recall():
    assert harmonic_mean(0.5, 1.0) == pytest.approx(2 / 3)
    rng = np.random.default_rng(1)
    y = (rng.random((40, 5)) < 0.3).astype(int); y[:, 4] = 0
    s = rng.random((40, 5)) + y * 0.3
    expect = np.mean([average_precision_score(y[:, k], s[:, k]) for k in range(4)])
    assert multilabel_map(y, s) == pytest.approx(expect)
    # retrieval: brute force over a random problem, 2 positives per query
    q, g = rng.normal(size=(20, 8)), rng.normal(size=(40, 8))
    pos = [[2 * i, 2 * i + 1] for i in range(20)]
    sim = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (g / np.linalg.norm(g, axis=1, keepdims=True)).T
    rank = np.argsort(-sim, 1)
    for k in (1, 5, 10):
        expect = np.mean([len(set(rank[i, :k]) & set(pos[i])) > 0 for i in range(20)])
        assert recall_at_k(q, g, (k,), pos, chunk=7)[f"R@{k}"] == pytest.approx(expect)
    rm = retrieval_metrics(q, g, (1, 5), pos)
    rank_t = np.argsort(-sim.T, 1)
    owner = np.arange(40) // 2
    assert rm["b2a_R@1"] == pytest.approx(np.mean(rank_t[:, 0] == owner))


# ---------------------------------------------------------------- class maps
class CentreModel(nn.Module):
    "Class = 1 + argmax of the centre pixel's HSI bands + lidar (a deterministic function of the centre pixel)."
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.ones(())); self.calls = 0; self.prepared = 0
    def prepare_inference(self): self.prepared += 1
    def forward(self, batch):
        self.calls += 1
        p = batch["hsi"].shape[-1]
        return self.w * (batch["hsi"][:, :, p // 2, p // 2] + batch["lidar"][:, :, p // 2, p // 2])


def test_classmap_tiny_scene(tmp_path):
    rng = np.random.default_rng(0)
    H, W = 9, 8
    hsi, lidar = rng.random((H, W, 4)), rng.random((H, W, 1))
    lab = rng.integers(0, 5, (H, W))
    s = Scene({"hsi": hsi, "lidar": lidar}, lab, {1: "a", 2: "b", 3: "c", 4: "d"}, name="t")
    m = CentreModel()
    pred = predict_scene(m, s, patch_size=5, batch_size=10, device="cpu", progress=False)
    assert pred.dtype == np.int16 and np.array_equal(pred, (hsi + lidar).argmax(-1) + 1)
    assert m.prepared == 1 and m.calls == int(np.ceil(H * W / 10))
    mask = lab > 0
    pm = predict_scene(m, s, 3, 7, "cpu", mask=mask, progress=False)
    assert np.array_equal(pm[mask], pred[mask]) and (pm[~mask] == 0).all()
    fig = render_classmap(pred, s.class_names, gt=lab, path=tmp_path / "map.png")
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG" and len(fig.axes) == 2
    save_classmap(pred, tmp_path / "map.npy")
    assert np.array_equal(np.load(tmp_path / "map.npy"), pred)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.npy", "map.png"]
    assert np.array_equal(class_palette(4)[1:], class_palette(20)[1:5])
    with pytest.raises(DataError, match="does not fit|has no modality"):
        predict_scene(m, s, 3, 7, "cpu", modalities=["sar"], progress=False)


# ---------------------------------------------------------------- real data
@pytest.mark.realdata
def test_real_houston_pixelset_trainer_and_metrics(shared_data, tmp_path):
    "Real Houston2013 training pixels (144-band CASI + 21 LiDAR features): a linear head learns, metrics agree with sklearn."
    import scipy.io as sio
    d = shared_data / "houston2013" / "mdl_rs_pixel_sets"
    x = np.concatenate([sio.loadmat(d / "HSI_TrSet.mat")["HSI_TrSet"], sio.loadmat(d / "LiDAR_TrSet.mat")["LiDAR_TrSet"]], 1)
    y = sio.loadmat(d / "TrLabel.mat")["TrLabel"].ravel().astype(np.int64)
    assert x.shape == (2832, 165) and set(np.unique(y)) == set(range(1, 16))
    rng = np.random.default_rng(0)
    va = np.zeros(len(y), bool)
    for c in range(1, 16): va[rng.choice(np.flatnonzero(y == c), 40, replace=False)] = True
    mu, sd = x[~va].mean(0), x[~va].std(0) + 1e-6
    X = torch.tensor((x - mu) / sd, dtype=torch.float32); Y = torch.tensor(y - 1)
    mk = lambda idx, sh: DL(torch.utils.data.TensorDataset(X[idx], Y[idx]), batch_size=256, shuffle=sh)
    torch.manual_seed(0)
    model = nn.Linear(165, 15)
    t = Trainer(model, cross_entropy_loss(), mk(~va, True), mk(va, False), cfg(tmp_path, epochs=8, lr=3e-2, weight_decay=1e-4))
    t.fit()
    logits, yv = predict(model, mk(va, False), "cpu")
    r = classification_report_dict(yv.numpy() + 1, logits.argmax(1).numpy() + 1, {i: f"c{i}" for i in range(1, 16)})
    assert r["oa"] > 0.8, r["oa"]   # chance is 1/15
    assert r["oa"] == pytest.approx(accuracy_score(yv, logits.argmax(1)))
    assert r["aa"] == pytest.approx(balanced_accuracy_score(yv, logits.argmax(1)))
    assert r["kappa"] == pytest.approx(cohen_kappa_score(yv, logits.argmax(1)))
    assert r["oa"] == pytest.approx(t.best_score)   # the restored best state scores what selection recorded


@pytest.mark.realdata
def test_real_houston_grid_classmap(shared_data, tmp_path):
    "Tiled prediction over the full 349 x 1905 Houston2013 grid reproduces a map computed from the centre pixels."
    import tifffile
    d = shared_data / "houston2013"
    tr = tifffile.imread(d / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif").astype(np.int64)
    va = tifffile.imread(d / "2013_IEEE_GRSS_DF_Contest_Samples_VA.tif").astype(np.int64)
    gt = tr + va
    onehot = np.eye(16, dtype=np.float32)[gt][..., 1:]          # (H, W, 15): class k -> band k-1; unlabelled -> zeros
    s = Scene({"hsi": onehot, "lidar": np.zeros(gt.shape, np.float32)}, gt, {i: f"c{i}" for i in range(1, 16)}, name="houston2013")
    m = CentreModel()
    labelled = gt > 0
    pred = predict_scene(m, s, patch_size=3, batch_size=8192, device="cpu", mask=labelled, progress=False)
    assert pred.shape == (349, 1905) and np.array_equal(pred, gt)
    render_classmap(pred, s.class_names, gt=gt, path=tmp_path / "houston.png")
    assert (tmp_path / "houston.png").stat().st_size > 10_000


def test_set_epoch_and_patch_sampler(tiny_scene, tmp_path):
    "The trainer calls set_epoch on a PatchSampler, so its shuffle changes per epoch; a resumed run matches a straight one."
    from rs_prompt_lab.data.patches import PatchSampler

    class PixelNet(nn.Module):
        def __init__(self):
            super().__init__(); torch.manual_seed(0); self.f = nn.Linear(9, 3)
        def forward(self, b): return self.f(torch.cat([b["hsi"][:, :, 1, 1], b["lidar"][:, :, 1, 1]], 1))

    def run(out, stop=None, resume=False):
        ps = PatchSampler(tiny_scene, "train", 3, batch_size=8, shuffle=True, seed=1, to_torch=True)
        seen = []
        class Spy(Hook):
            def after_epoch(self, t):
                seen.append(ps.order().copy())
                if t.epoch == stop: raise KeyboardInterrupt
        m = PixelNet()
        t = Trainer(m, cross_entropy_loss(), ps, None, cfg(out, epochs=3, restore_best=False), hooks=[Spy()])
        try: t.fit(resume=resume)
        except KeyboardInterrupt: pass
        return m, seen

    m1, seen = run(tmp_path / "a")
    assert len(seen) == 3 and not np.array_equal(seen[0], seen[1])   # a new permutation each epoch
    run(tmp_path / "b", stop=2)
    m2, seen2 = run(tmp_path / "b", resume=True)
    assert np.array_equal(seen2[0], seen[2])
    assert torch.equal(m1.f.weight, m2.f.weight) and torch.equal(m1.f.bias, m2.f.bias)
