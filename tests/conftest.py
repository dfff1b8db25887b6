"""Shared fixtures of the training tests: a tiny LaViT, small embedded data, W&B kept offline."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAULTS_SCRIPT = REPO / "tests" / "helpers" / "faults.py"  # `lavit` with injected faults

# A lavit_cifar small enough for CPU tests (~50 K parameters); default num_va_layers (1, 2, 1, 1).
TINY_LAVIT = {
    "embed_dims": [16, 16, 32, 32],
    "depths": [1, 2, 2, 1],
    "num_heads": [1, 1, 2, 2],
    "mlp_ratios": [2, 2, 2, 2],
}
# The embedded CIFAR-10 subset at 32×32 with light, RNG-consuming augmentation (crop + flip).
SMALL_DATA = {
    "source": "embedded",
    "val_split": "test",
    "img_size": 32,
    "crop_pct": 1.0,
    "scale": (0.5, 1.0),
    "color_jitter": None,
    "auto_augment": None,
    "re_prob": 0.0,
    "batch_size": 16,
    "num_workers": 0,
}


@pytest.fixture(autouse=True)
def restore_environment():
    """Undo what a test (or the CLI it runs in-process: PL_GLOBAL_SEED, ...) set in os.environ."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def offline_wandb(monkeypatch, tmp_path):
    """W&B offline, writing under tmp, with no credentials from the user's environment.

    Also: the CLI's process-wide CPU tuning stays off, so a test calling ``main`` in-process
    leaves no global state to later tests (``test_runtime.py`` checks the tuning itself).
    """
    monkeypatch.setenv("LAVIT_CPU_TUNING", "0")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


@pytest.fixture
def small_data():
    from lavit.training.data import ImageDataModule

    return ImageDataModule(**SMALL_DATA)
