"""A toy `Trainer` run for tests/test_distributed.py, run under torchrun and in one process.

It takes the generic path of the distributed Trainer: a shuffling DataLoader of (x, y) tuples (rows sliced per rank,
the shuffle agreed through rank 0's random state), a last batch of one row (rank 1 runs a row at weight 0), a
trainable parameter the loss never uses (DDP needs find_unused_parameters), and an interrupted run resumed from
last.pt. `python ddp_worker.py OUT` writes OUT/result.json from rank 0.
"""
import json, sys
from pathlib import Path
import torch
from torch import nn


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.utils.data.TensorDataset(torch.eye(3, 5)[y] * 2 + torch.randn(n, 5, generator=g), y)


def _model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    m[0].requires_grad_(False)
    m.spare = nn.Parameter(torch.zeros(2))   # trainable but never used by the loss
    return m


def toy_run(out: Path) -> dict:
    "Train straight for 3 epochs, and again interrupted after 2 and resumed; histories and final head weights."
    from rs_prompt_lab.train import TrainCfg, Trainer, cross_entropy_loss
    DL = torch.utils.data.DataLoader
    def trainer(d):
        cfg = TrainCfg(epochs=3, lr=0.2, batch_size=4, warmup_epochs=1, out_dir=d, progress=False, device="cpu")
        return Trainer(_model(), cross_entropy_loss(), DL(_data(13, 1), batch_size=4, shuffle=True),   # batches 4, 4, 4, 1
                       DL(_data(11, 2), batch_size=5), cfg)                                             # 3 validation batches
    straight = trainer(out / "straight"); straight.fit()
    trainer(out / "resumed").fit(max_epochs=2)
    resumed = trainer(out / "resumed"); resumed.fit(resume=True)
    rows = lambda t: [{k: r[k] for k in ("train_loss", "val_loss", "val_oa")} for r in t.history]
    return {"history": rows(straight), "weight": straight.model[2].weight.tolist(), "resumed_history": rows(resumed),
            "resumed_weight": resumed.model[2].weight.tolist(), "best_epoch": straight.best_epoch}


if __name__ == "__main__":
    from rs_prompt_lab.distributed import cleanup, is_main
    res = toy_run(Path(sys.argv[1]))
    if is_main(): (Path(sys.argv[1]) / "result.json").write_text(json.dumps(res))
    cleanup()
