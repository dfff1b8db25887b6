"""Pretrained baselines: ``--model.pretrained=true`` (the Hugging Face cache, else the Hub) and
``--model.pretrained_file``, and the data's preprocessing taken from the weights' config.

The weights are timm's tiny ``test_vit`` (0.37 M parameters, ``timm/test_vit.r160_in1k``; input
160², mean/std 0.5, crop 0.95). The Hub is never reached: a cache is laid out here as
``hf_hub_download`` writes it, and the offline cases run with an empty cache.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import huggingface_hub.constants as hub
import pytest
import safetensors.torch
import timm
import torch
from conftest import REPO

from lavit.training.module import LaViTModule

ARCH = "test_vit"
HUB_ID = "timm/test_vit.r160_in1k"


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lavit"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch) -> dict[str, torch.Tensor]:
    """``test_vit``'s weights in a Hugging Face cache (offline); returns the cached tensors."""
    torch.manual_seed(0)
    weights = timm.create_model(ARCH).state_dict()
    revision = "0" * 40
    repo = tmp_path / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    (repo / "snapshots" / revision).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    safetensors.torch.save_file(weights, repo / "snapshots" / revision / "model.safetensors")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    return weights


def test_pretrained_weights_come_from_the_cache_offline(hf_cache):
    same = LaViTModule(arch=ARCH, pretrained=True, num_classes=1000, img_size=160)
    for key, value in same.model.state_dict().items():
        torch.testing.assert_close(value, hf_cache[key], rtol=0, atol=0)
    tuned = LaViTModule(arch=ARCH, pretrained=True, num_classes=10, img_size=160)
    state = tuned.model.state_dict()
    assert state["head.weight"].shape == (10, hf_cache["head.weight"].shape[1])  # a new head
    for key in (k for k in hf_cache if not k.startswith("head.")):
        torch.testing.assert_close(state[key], hf_cache[key], rtol=0, atol=0)
    # Without pretrained: timm's random initialisation, not the cached weights.
    scratch = LaViTModule(arch=ARCH, num_classes=1000, img_size=160).model.state_dict()
    assert not torch.equal(
        scratch["blocks.0.attn.qkv.weight"], hf_cache["blocks.0.attn.qkv.weight"]
    )


def test_not_cached_and_offline_is_one_line_before_training(tmp_path):
    """The real condition: HF_HUB_OFFLINE=1 and an empty Hugging Face cache, through the CLI."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "empty-hf-home"),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    }
    env.pop("HF_HUB_CACHE", None)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "lavit", "fit", f"--model.arch={ARCH}", "--model.pretrained=true",
         f"--trainer.default_root_dir={tmp_path / 'run'}", "--data.num_workers=0"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: pretrained=true: the weights of test_vit")
    assert "not in the Hugging Face cache" in error and "HF_HUB_OFFLINE is set" in error
    assert "pretrained_file=PATH" in error
    assert not (tmp_path / "run" / "checkpoints").exists()
    assert time.monotonic() - started < 120  # imports only: nothing waited for the network


def test_not_cached_and_the_hub_unreachable_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with pytest.raises(ValueError, match="not in the Hugging Face cache .* the Hub is unreachable"):
        LaViTModule(arch=ARCH, pretrained=True, num_classes=10, img_size=160)
    assert time.monotonic() - started < 10


def test_a_local_weights_file_keeps_a_head_that_fits(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)  # a file needs no Hub
    torch.manual_seed(1)
    weights = timm.create_model(ARCH, num_classes=10).state_dict()
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file(weights, path)
    module = LaViTModule(arch=ARCH, pretrained_file=str(path), num_classes=10, img_size=160)
    for key, value in module.model.state_dict().items():
        torch.testing.assert_close(value, weights[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pretrained_file='nowhere.pth': no such file"):
        LaViTModule(arch=ARCH, pretrained_file="nowhere.pth")
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable state dict"):
        LaViTModule(arch=ARCH, pretrained_file=str(tmp_path / "junk.pth"))
    with pytest.raises(ValueError, match="LaViT has no published weights: pass pretrained_file"):
        LaViTModule(arch="lavit_cifar", pretrained=True)


def test_the_data_follows_the_weights_config_unless_set(hf_cache, tmp_path):
    from lavit.cli import LaViTCLI

    def parse(*args: str) -> LaViTCLI:
        return LaViTCLI(
            args=[f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false",
                  "--data.num_workers=0", f"--model.arch={ARCH}", *args],
            run=False,
        )  # fmt: skip

    data = parse("--model.pretrained=true").config.data
    assert (data.img_size, tuple(data.mean), tuple(data.std)) == (160, (0.5,) * 3, (0.5,) * 3)
    assert (data.crop_pct, data.interpolation) == (0.95, "bicubic")
    cli = parse("--model.pretrained=true", "--data.mean=[0.1, 0.2, 0.3]", "--data.img_size=64")
    assert (
        tuple(cli.config.data.mean) == (0.1, 0.2, 0.3) and tuple(cli.config.data.std) == (0.5,) * 3
    )
    assert cli.config.data.img_size == 64 and cli.model.model.patch_embed.img_size == (64, 64)
    # From scratch, the defaults stay.
    assert tuple(parse().config.data.mean) == pytest.approx((0.485, 0.456, 0.406))


def test_a_lavit_fit_checkpoint_fine_tunes_at_another_size_and_class_count(tmp_path, small_data):
    import lightning as L
    from conftest import TINY_LAVIT

    torch.manual_seed(0)
    trained = LaViTModule(model_kwargs=TINY_LAVIT, img_size=32, ema_decay=0.5, lr=1e-2)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(trained, small_data)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    tuned = LaViTModule(
        model_kwargs=TINY_LAVIT,
        pretrained_file=str(tmp_path / "last.ckpt"),
        img_size=64,
        num_classes=2,
    )
    ema = trained.ema.module.state_dict()  # the weights the checkpoint evaluates with
    for key, value in tuned.model.state_dict().items():
        if key.startswith("head."):
            assert value.shape[0] == 2, key  # a new classifier for the new classes
        elif value.shape == ema[key].shape:
            torch.testing.assert_close(value, ema[key], rtol=0, atol=0, msg=key)
        else:  # position embeddings and Ψ/Θ, resampled to 64²
            assert "pos_embed" in key or "psi" in key or "theta" in key, key
    assert tuned.model.stages[0].pos_embed.shape[1] == 4 * ema["stages.0.pos_embed"].shape[1]
