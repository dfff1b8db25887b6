"""``lavit export``: a trained run's checkpoint to a folder timm loads, checked by loading it back.

A tiny ``lavit fit`` (in-process, 2 steps, EMA on, a non-default switch) writes the checkpoint;
the export is loaded through ``timm.create_model("local-dir:...", pretrained=True)`` and through
the weights file (``pretrained_cfg_overlay``), and must give the checkpoint's EMA logits.
"""

from __future__ import annotations

import json
import sys
import time

import pytest
import timm
import torch
from conftest import TINY_LAVIT

from lavit.cli import main as lavit_main
from lavit.tools import export
from lavit.training.checkpoint_io import load_checkpoint_file
from lavit.training.data import ImageDataModule
from lavit.training.module import LaViTModule

CIFAR10_CLASSES = ImageDataModule(img_size=32).class_names  # the embedded subset's


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lavit"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    argv, sys.argv = sys.argv, ["lavit"]  # the CLI gets its arguments from here, not pytest's
    lavit_main(
        [
            "fit",
            "--config=experiments/base.yaml",
            f"--trainer.default_root_dir={run_dir}",
            f"--model.model_kwargs={json.dumps(TINY_LAVIT)}",
            "--model.num_va_layers=[1, 1, 1, 1]",  # not the default: must reach config.json
            "--model.ema_decay=0.5",
            "--data.batch_size=16",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.num_sanity_val_steps=0",
            "--attention_maps.num_images=0",
            "--saturation.num_images=0",
            "--run_metadata.count_flops=false",
            "--wandb.enabled=false",
        ]
    )
    sys.argv = argv
    return run_dir


def checkpoint_models(ckpt) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The checkpoint's EMA model and raw model, rebuilt as lavit fit built them."""
    checkpoint = load_checkpoint_file(ckpt)
    hparams = {k: v for k, v in checkpoint["hyper_parameters"].items() if not k.startswith("_")}
    module = LaViTModule(**hparams)
    module.load_state_dict(checkpoint["state_dict"])
    return module.ema.module.eval(), module.model.eval()


def test_export_loads_through_timm_with_the_ema_logits(trained_run, capsys):
    out = trained_run / "exported"
    assert export.main([str(trained_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert "EMA weights" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "lavit_cifar" and config["num_classes"] == 10
    assert config["label_names"] == CIFAR10_CLASSES
    assert config["model_args"]["num_va_layers"] == [1, 1, 1, 1]
    assert config["model_args"]["embed_dims"] == TINY_LAVIT["embed_dims"]
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 32, 32] and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == pytest.approx([0.4914, 0.4822, 0.4465])  # base.yaml's CIFAR statistics
    assert cfg["std"] == pytest.approx([0.2470, 0.2435, 0.2616])

    # The names came with the checkpoint (lavit fit stores them), not from re-reading the data.
    assert load_checkpoint_file(trained_run / "checkpoints" / "last.ckpt")["class_names"] == (
        CIFAR10_CLASSES
    )
    ema, raw = checkpoint_models(trained_run / "checkpoints" / "last.ckpt")
    images = torch.randn(3, 3, 32, 32)
    from_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    from_file = timm.create_model(
        "lavit_cifar",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"), num_classes=10),
        **config["model_args"],
    ).eval()
    with torch.no_grad():
        expected = ema(images)
        assert not torch.allclose(raw(images), expected)  # the EMA is not the raw weights
        torch.testing.assert_close(from_folder(images), expected)
        torch.testing.assert_close(from_file(images), expected)
    assert from_folder.pretrained_cfg["label_names"] == CIFAR10_CLASSES


def test_export_without_ema_and_from_a_checkpoint_file(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "raw"
    assert export.main([str(ckpt), "--out", str(out), "--no-ema"]) == 0
    _, raw = checkpoint_models(ckpt)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        reloaded = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        torch.testing.assert_close(reloaded(images), raw(images))
    # A run directory without --out exports next to its checkpoints.
    assert export.find_checkpoint(trained_run).parent == trained_run / "checkpoints"


def test_push_to_hub_fails_at_once_offline(trained_run, tmp_path, monkeypatch, capsys):
    """The Hub is unreachable from this machine: a push is refused before anything is written."""
    monkeypatch.setenv("HF_TOKEN", "hf_" + "x" * 34)  # a token is there; the network is not
    out = tmp_path / "pushed"
    started = time.monotonic()
    assert export.main([str(trained_run), "--out", str(out), "--push-to-hub", "me/lavit"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert "--push-to-hub me/lavit: the Hugging Face Hub is unreachable" in err and not out.exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert export.main([str(trained_run), "--out", str(out), "--push-to-hub", "me/lavit"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    assert export.main([str(trained_run), "--out", str(out), "--push-to-hub", "me/lavit"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert export.main([str(tmp_path / "nothing")]) == 2
    assert "no such checkpoint file or run directory" in capsys.readouterr().err
    (tmp_path / "checkpoints").mkdir()
    assert export.main([str(tmp_path)]) == 2
    assert "no best-*.ckpt or last.ckpt" in capsys.readouterr().err
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    assert export.main([str(tmp_path / "junk.ckpt"), "--out", str(tmp_path / "o")]) == 2
    assert "lavit export: error:" in capsys.readouterr().err


def test_load_checkpoint_resized_takes_a_lightning_checkpoint(trained_run):
    """The whole `lavit fit` checkpoint or its state_dict: the EMA weights, at any input size;
    and the same file as --model.pretrained_file of a new run."""
    from lavit.training.trained import load_checkpoint_resized

    last = trained_run / "checkpoints" / "last.ckpt"
    checkpoint = load_checkpoint_file(last)
    ema, _ = checkpoint_models(last)
    switches = {"num_va_layers": [1, 1, 1, 1], **TINY_LAVIT}
    images = torch.randn(2, 3, 32, 32)
    for given in (checkpoint, checkpoint["state_dict"]):
        model = timm.create_model("lavit_cifar", num_classes=10, img_size=32, **switches).eval()
        load_checkpoint_resized(model, given)  # strict
        with torch.no_grad():
            torch.testing.assert_close(model(images), ema(images))
    bigger = timm.create_model("lavit_cifar", num_classes=10, img_size=64, **switches).eval()
    load_checkpoint_resized(bigger, checkpoint)  # position embeddings and Ψ/Θ resampled
    assert bigger(torch.randn(1, 3, 64, 64)).shape == (1, 10)

    module = LaViTModule(
        num_classes=10, img_size=32, pretrained_file=str(last), num_va_layers=[1, 1, 1, 1],
        model_kwargs=TINY_LAVIT,
    )  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(module.model.eval()(images), ema(images))
