"""Faults and bad input at the runner and the CLI (issue 10): each case asserts the exit code, one line naming the
file or value, no traceback, and nothing half-written or changed in an existing run folder."""
import os, shutil, signal, subprocess, sys, time
from pathlib import Path
import numpy as np
import pytest
import torch

from rs_prompt_lab.core import ConfigError, RSLabError, load_json
from rs_prompt_lab.data.scene import Scene

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def tiny2d(H=10, W=12, seed=0, shift=0.0, bands=6):
    "3 classes separable by their mean spectrum; official train (left) / test (right) maps."
    rng = np.random.default_rng(seed)
    lab = rng.integers(1, 4, (H, W))
    hsi = lab[..., None] * np.linspace(0.5, 1.5, bands) + rng.normal(0, 0.3, (H, W, bands)) + shift
    tr = np.zeros((H, W), bool); tr[:, : W // 2] = True
    return Scene({"hsi": hsi, "lidar": rng.normal(0, 1, (H, W, 1))}, lab, {1: "grass", 2: "road", 3: "water"},
                 splits={"train": tr, "test": ~tr}, name="tiny2d")


def rs_lab(*args, env_extra=None, timeout=300, cwd=None):
    "Run the CLI in a fresh process; (returncode, stdout, stderr)."
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]), **(env_extra or {}))
    p = subprocess.run([sys.executable, "-c", "import sys; from rs_prompt_lab.cli import main; sys.exit(main())", *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=timeout, cwd=cwd)
    return p.returncode, p.stdout, p.stderr


def one_line_error(rc, err, *needles):
    assert rc == 2, err
    assert "Traceback" not in err, err
    lines = [l for l in err.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1, err
    for n in needles: assert n in lines[0], lines[0]
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()} if folder.exists() else {}


@pytest.fixture()
def npz(tmp_path):
    p = tmp_path / "tiny2d.npz"; tiny2d().save(p); return p


TRAIN = ["--shots", "6", "--val-per-class", "3", "--seed", "0", "--patch-size", "3", "--device", "cpu", "--no-progress"]


# ---------------------------------------------------------------------------------------- silent wrong answers
def test_kill_regenerate_resume_is_refused(tmp_path, npz):
    "SIGKILL mid-run, regenerate the scene (same bands, other values), rerun the same command: refused, nothing changed."
    out = tmp_path / "runs"
    cmd = [sys.executable, "-c", "import sys; from rs_prompt_lab.cli import main; sys.exit(main())", "train", "test_experiment:standin_method",
           "--data", npz, "--out", out, "--epochs", "100000", "--batch-size", "2", *TRAIN]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(list(map(str, cmd)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rd = out / "pixel" / "tiny2d" / "standin_method-rs-tiny-k6-p3" / "seed0"
    t0 = time.time()
    while not (rd / "train" / "last.pt").exists():
        assert proc.poll() is None and time.time() - t0 < 120, "the run ended or never wrote last.pt"
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL); proc.wait()
    assert not (rd / "metrics.json").exists()
    before = snapshot(rd)
    tiny2d(shift=0.5).save(npz)                                   # the data changed, labels and bands did not
    rc, _, err = rs_lab("train", "test_experiment:standin_method", "--data", npz, "--out", out, "--epochs", "100000", "--batch-size", "2", *TRAIN)
    one_line_error(rc, err, str(rd), "the dataset changed since it started")
    after = snapshot(rd)
    assert after.keys() == before.keys() and after["config.json"] == before["config.json"]


def test_second_writer_of_a_seed_is_refused(tmp_path, npz):
    "Two runs with the same --name at once: the second is refused while the first holds the seed's lock."
    from rs_prompt_lab.runner import seed_lock
    rd = tmp_path / "runs" / "pixel" / "tiny2d" / "same" / "seed0"
    with seed_lock(rd):
        rc, _, err = rs_lab("train", "svm", "--data", npz, "--out", tmp_path / "runs", "--name", "same", *TRAIN)
    one_line_error(rc, err, "being written by another run")
    assert not rd.exists()
    rc, out, err = rs_lab("train", "svm", "--data", npz, "--out", tmp_path / "runs", "--name", "same", *TRAIN)
    assert rc == 0, err
    rc, _, err = rs_lab("train", "svm", "--data", npz, "--out", tmp_path / "runs", "--name", "same", *TRAIN[2:], "--shots", "5")
    one_line_error(rc, err, "different settings")


def test_vanished_classes_and_collapse_are_flagged(tmp_path):
    "A class without test pixels and a model that predicts one class are named in metrics.json and the summary."
    from rs_prompt_lab.experiment import PixelExpCfg, run_pixel_experiment
    from rs_prompt_lab.methods import MethodEntry, register_method

    class Constant(torch.nn.Module):
        def __init__(self, K): super().__init__(); self.b = torch.nn.Parameter(torch.zeros(K))
        def forward(self, batch): return self.b.expand(len(batch["label"]), -1) + torch.tensor([10.0] + [0.0] * (len(self.b) - 1))
    register_method(MethodEntry("constant", ("pixel",), lambda backbone, spec, cfg: Constant(len(spec.class_names))), overwrite=True)
    scene = tiny2d()
    test = scene.splits["test"] & (scene.labels != 3)             # the official test map holds no 'water' pixel
    scene = Scene(scene.modalities, scene.labels, scene.class_names, splits={"train": scene.splits["train"], "test": test}, name="tiny2d")
    cfg = PixelExpCfg.from_flat(dataset="tiny2d", method="constant", shots=6, val_per_class=3, seeds=[0], patch_size=3, epochs=1, lr=1e-6,
                      out_dir=tmp_path, progress=False, device="cpu")
    s = run_pixel_experiment(cfg, scene)
    m = load_json(cfg.run_dir(0) / "metrics.json")
    assert m["missing_test_classes"] == ["water"] and m["n_test"]["water"] == 0 and m["n_test"]["grass"] > 0
    assert m["degenerate"]["collapsed"] and m["degenerate"]["top_class"] == "grass"
    assert any("no test pixels for water" in w for w in s["warnings"]) and any("collapsed" in w for w in s["warnings"])
    assert "WARNING: collapsed predictions" in s["table"]


# ---------------------------------------------------------------------------------------- raw tracebacks become one line
def test_classmap_with_other_bands_is_refused_before_loading(tmp_path, npz):
    out = tmp_path / "runs"
    rc, _, err = rs_lab("train", "cfipt", "--data", npz, "--out", out, "--backbone", "random:rs-tiny", "--quick", *TRAIN)
    assert rc == 0, err
    rd = next((out / "pixel" / "tiny2d").iterdir()) / "seed0"
    before = snapshot(rd)
    tiny2d(bands=5).save(npz)
    rc, _, err = rs_lab("classmap", rd, "--device", "cpu", "--no-progress")
    one_line_error(rc, err, "trained on", "'hsi': 6")
    assert snapshot(rd) == before


def test_empty_checkpoint_names_the_file_and_the_way_out(tmp_path, npz):
    out = tmp_path / "runs"
    args = ["train", "test_experiment:standin_method", "--data", npz, "--out", out, "--epochs", "2", *TRAIN]
    assert rs_lab(*args)[0] == 0
    rd = out / "pixel" / "tiny2d" / "standin_method-rs-tiny-k6-p3" / "seed0"
    (rd / "metrics.json").unlink(); (rd / "train" / "last.pt").write_bytes(b"")   # what a full disk leaves
    rc, _, err = rs_lab(*args)
    one_line_error(rc, err, "last.pt", "empty (0 bytes", "rename best.pt to last.pt")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)")
def test_disk_full_keeps_the_previous_checkpoint(tmp_path):
    "A real full disk (a 1 MiB tmpfs): the failing write names the folder and free space; the last good last.pt loads."
    from rs_prompt_lab.train import Trainer, TrainCfg, load_checkpoint
    mnt = tmp_path / "small"; mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted in this container")
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)                            # ~33 KB of trainable state per checkpoint
        data = [(torch.randn(8, 64), torch.randint(0, 64, (8,)))] * 2
        tr = Trainer(model, lambda o, b, m: torch.nn.functional.cross_entropy(o, b[1]), data, None,
                     TrainCfg(epochs=3, out_dir=mnt / "run", progress=False, device="cpu"))
        tr.fit(max_epochs=1)
        good = load_checkpoint(mnt / "run" / "last.pt")["epoch"]
        filler = mnt / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)           # fill the disk up to the last few KB (unbuffered)
        try:
            while True: os.write(fd, b"\0" * 4096)
        except OSError: pass
        finally: os.close(fd)
        with pytest.raises(RSLabError, match=r"could not write .*MiB free in .*the previous .* is intact"):
            tr.fit(resume=True)
        assert load_checkpoint(mnt / "run" / "last.pt")["epoch"] == good == 1
        assert not [p for p in (mnt / "run").iterdir() if p.name.startswith(".")]   # no half-written temporary file
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------- validate before working
@pytest.mark.parametrize("args,needles", [
    (["--device", "gpu"], ["unknown device 'gpu'"]),
    (["--backbone", "no-such-backbone"], ["no-such-backbone"]),
    (["--method-kw", "depth"], ["--method-kw", "'depth'"]),
    (["--method-kw", "n_cxt=8"], ["n_cxt", "Did you mean: n_ctx"]),
    (["--lr", "nan"], ["lr must be a finite number"]),
    (["--guard", "wide"], ["guard"]),
    (["--select", "momentum=[0.9]"], ["select can search"]),
])
def test_bad_arguments_fail_before_anything_is_written(tmp_path, npz, args, needles, capsys):
    from rs_prompt_lab.cli import main                            # in-process: the same entry point, without a new interpreter
    out = tmp_path / "runs"
    rc = main(["train", "coop", "--data", str(npz), "--out", str(out), *TRAIN, *args])
    one_line_error(rc, capsys.readouterr().err, *needles)
    assert not out.exists()


def test_classmap_suffix_is_checked_first(tmp_path, npz, capsys):
    out = tmp_path / "runs"
    assert rs_lab("train", "cfipt", "--data", npz, "--out", out, "--backbone", "random:rs-tiny", "--quick", *TRAIN)[0] == 0
    rd = next((out / "pixel" / "tiny2d").iterdir()) / "seed0"
    from rs_prompt_lab.cli import main
    rc = main(["classmap", str(rd), "--out", str(tmp_path / "map.jpg"), "--device", "cpu"])
    one_line_error(rc, capsys.readouterr().err, "map.jpg", "PNG")
    assert not (tmp_path / "map.jpg").exists()


def test_relative_data_path_is_recorded_absolute(tmp_path, npz):
    "A relative --data stored verbatim made classmap work only from the training folder; now the record is absolute."
    other = tmp_path / "elsewhere"; other.mkdir()
    rc, _, err = rs_lab("train", "cfipt", "--data", npz.name, "--out", "runs", "--backbone", "random:rs-tiny", "--quick", *TRAIN, cwd=tmp_path)
    assert rc == 0, err
    rd = next((tmp_path / "runs" / "pixel" / "tiny2d").iterdir()) / "seed0"
    assert load_json(rd / "config.json")["cfg"]["data"]["dataset"] == str(npz.resolve())
    rc, out, err = rs_lab("classmap", rd, "--device", "cpu", "--no-progress", cwd=other)
    assert rc == 0, err
    moved = tmp_path / "moved"; moved.mkdir(); shutil.move(str(npz), moved / npz.name)
    rc, out, err = rs_lab("classmap", rd, "--device", "cpu", "--no-progress", "--root", moved, "--out", tmp_path / "m.png", cwd=other)
    assert rc == 0, err


def test_grid_run_maps_its_chosen_model(tmp_path, npz, capsys):
    "A --select run keeps its checkpoints under train/grid<i>/; classmap loads the chosen one and agrees with the test OA."
    from rs_prompt_lab.cli import main
    out = tmp_path / "runs"
    assert main(["train", "linear-probe", "--data", str(npz), "--out", str(out), "--backbone", "random:rs-tiny", "--epochs", "2",
                 "--select", "lr=[0.0001,0.01]", *TRAIN]) == 0, capsys.readouterr().err
    rd = next((out / "pixel" / "tiny2d").iterdir()) / "seed0"
    m = load_json(rd / "metrics.json")
    assert len(m["selection"]["grid"]) == 2 and (rd / "train" / f"grid{m['selection']['chosen']}" / "best.pt").exists()
    assert main(["classmap", str(rd), "--device", "cpu", "--no-progress"]) == 0, capsys.readouterr().err
    assert f"{100 * m['oa']:.2f}%" in capsys.readouterr().out
