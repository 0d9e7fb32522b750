"""Shared pytest fixtures: CPU only, offline, real-data fragments from ../shared/data, tiny synthetic scenes."""
import os
# Offline and CPU-only before anything imports torch/transformers (the Makefile sets these too).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RS_LAB_SHARED_DATA", REPO.parent / "shared" / "data"))
REQUIRE_REAL = os.environ.get("RS_LAB_REQUIRE_REAL_DATA") == "1" or (os.environ.get("CI") == "true" and SHARED_DATA.exists())


@pytest.fixture(scope="session")
def shared_data() -> Path:
    "Root of the real benchmark fragments; fails (never skips) in CI when they are expected."
    if not SHARED_DATA.exists():
        if REQUIRE_REAL: pytest.fail(f"real-data fragments expected at {SHARED_DATA} but missing")
        pytest.skip(f"real-data fragments not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    "In CI, a skipped real-data test is a failure: real-data tests must run when the data is there."
    outcome = yield
    rep = outcome.get_result()
    if REQUIRE_REAL and rep.skipped and item.get_closest_marker("realdata") is not None:
        rep.outcome = "failed"
        rep.longrepr = f"real-data test {item.nodeid} was skipped but must run when {SHARED_DATA} exists"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def notebooks() -> dict:
    "Short name -> path of every notebook under nbs/ (experiments and tutorials included)."
    return {p.stem: p for p in (REPO / "nbs").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts}


@pytest.fixture(scope="session")
def tiny_scene():
    "A small random two-modality scene (12 x 10, 8-band HSI + 1-band LiDAR, 3 classes, train/test masks)."
    from rs_prompt_lab.data.scene import Scene, BandInfo
    rng = np.random.default_rng(0)
    H, W = 12, 10
    labels = rng.integers(0, 4, (H, W))
    train = np.zeros((H, W), bool); train[: H // 2] = True
    return Scene({"hsi": rng.random((H, W, 8)), "lidar": rng.random((H, W, 1))}, labels,
                 {1: "grass", 2: "road", 3: "water"},
                 bands={"hsi": BandInfo(wavelengths=list(np.linspace(400, 1000, 8)), units="reflectance"),
                        "lidar": BandInfo(names=["dsm"], units="m")},
                 splits={"train": train & (labels > 0), "test": ~train & (labels > 0)}, name="tiny")


@pytest.fixture(scope="session")
def houston_maps(shared_data):
    "The real Houston2013 official TR / VA label maps (349 x 1905 int32 each), read once per session."
    import tifffile
    d = shared_data / "houston2013"
    tr = tifffile.imread(d / "2013_IEEE_GRSS_DF_Contest_Samples_TR.tif").astype(np.int32)
    va = tifffile.imread(d / "2013_IEEE_GRSS_DF_Contest_Samples_VA.tif").astype(np.int32)
    return tr, va


@pytest.fixture(scope="module")
def one_thread():
    "Tiny tensors: with 2 OpenMP threads on a busy 2-core machine every op waits for the other thread (use per module)."
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def clip(one_thread):
    "A random-init rs-tiny backbone, the same for every test of a module."
    import torch
    from rs_prompt_lab.backbones import load_backbone
    torch.manual_seed(0)
    return load_backbone("random:rs-tiny")[0]


@pytest.fixture(scope="module")
def pixels():
    "Training HSI pixels for the baselines' PCA / fit step (correlated 8-band spectra)."
    rng = np.random.default_rng(0)
    return rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))


@pytest.fixture
def interrupt_once(monkeypatch):
    "interrupt_once(run): `run()` is killed (KeyboardInterrupt) right after its first training epoch, then Trainer.fit is restored."
    from rs_prompt_lab import train as T
    fit = T.Trainer.fit
    def killed(self, resume=False, max_epochs=None):
        fit(self, resume=resume, max_epochs=1); raise KeyboardInterrupt("killed")
    def go(run):
        monkeypatch.setattr(T.Trainer, "fit", killed)
        try:
            with pytest.raises(KeyboardInterrupt): run()
        finally: monkeypatch.setattr(T.Trainer, "fit", fit)
    return go
