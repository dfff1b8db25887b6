"""Attention saturation (``lavit.analysis.saturation``), ``lavit analyze`` and the training callback."""

from __future__ import annotations

import csv
import json
from types import SimpleNamespace
from unittest.mock import MagicMock

import lightning as L
import matplotlib.image
import pytest
import small_lavit
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from small_lavit import SMALL
from torch.utils.data import DataLoader, TensorDataset

from lavit.analysis.saturation import attention_maps, saturation_table
from lavit.models import LaViT
from lavit.models.token_mixing import DenseTokenMixing
from lavit.tools.analyze import main
from lavit.training.saturation_callback import AttentionSaturation


def small_model() -> LaViT:
    return small_lavit.small_model().eval()


def la_rows(rows):
    return [r for r in rows if r["kind_b"] == "la" and r["comparison"] == "consecutive"]


def test_identity_la_layers_repeat_their_predecessor_and_perturbed_ones_do_not():
    model = small_model()  # la_init="identity", attn_state="scores": LA layers reuse exactly
    images = torch.randn(3, 3, 32, 32)
    rows = saturation_table(model, images.split(2))  # two batches, averaged over 3 images
    assert {r["images"] for r in rows} == {3}
    identity = la_rows(rows)
    # every LA layer (depth − 1 per stage), every head
    la_layers = [d - v for d, v in zip(SMALL["depths"], SMALL["num_va_layers"], strict=True)]
    assert len(identity) == sum(n * h for n, h in zip(la_layers, SMALL["num_heads"], strict=True))
    for row in identity:
        assert row["similarity"] == pytest.approx(1.0, abs=1e-9)
        assert row["centred_similarity"] == pytest.approx(1.0, abs=1e-6)

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, DenseTokenMixing):
                module.psi.add_(0.3 * torch.randn_like(module.psi))
                module.theta.add_(0.3 * torch.randn_like(module.theta))
    for row in la_rows(saturation_table(model, [images])):
        assert row["similarity"] < 1 - 1e-6, row
        assert row["centred_similarity"] < 0.999, row


def test_timm_attention_is_captured_and_fused_attention_restored():
    import timm
    from timm.utils import AttentionExtract

    model = timm.create_model("pvt_v2_b0").eval()
    with pytest.raises(RuntimeError, match="No node names"):  # why we switch fused_attn off
        AttentionExtract(model)
    maps = attention_maps(model, torch.randn(2, 3, 64, 64))
    assert [(m.stage, m.layer) for m in maps] == [(s, i) for s in range(4) for i in range(2)]
    assert [m.probs.shape[1] for m in maps[::2]] == [1, 2, 5, 8]  # heads per stage
    torch.testing.assert_close(maps[0].probs.sum(-1), torch.ones_like(maps[0].probs[..., 0]))
    assert all(m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))


def test_analyze_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--model", "pvt_v2_b0", "--img-size", "64", "--random", "--num-images", "2",
                 "--out", str(out)]) == 0  # fmt: skip
    assert "| stage | layers |" in capsys.readouterr().out
    with (out / "saturation.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {"stage", "layer_a", "layer_b", "comparison", "head", "similarity"} <= set(rows[0])
    assert len(rows) == 2 * (1 + 2 + 5 + 8)  # consecutive + to-first, per head of each stage
    assert all(-1 <= float(r["similarity"]) <= 1 + 1e-9 for r in rows)
    result = json.loads((out / "saturation.json").read_text())
    assert result["images"] == 2 and len(result["rows"]) == len(rows)
    image = matplotlib.image.imread(out / "saturation.png")
    assert image.ndim == 3 and image.shape[0] > 100


def test_analyze_reads_embedded_images_by_default(tmp_path):
    assert main(["--model", "lavit_cifar", "--num-images", "4", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "saturation.json").read_text())
    assert result["image_source"] == "embedded CIFAR-10" and result["images"] == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no_such_model", "--random"], "unknown model"),
        (["--model", "missing.ckpt"], "does not exist"),
    ],
)
def test_analyze_errors(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_callback_logs_files_and_wandb_table_and_image(tmp_path):
    model = small_model()
    module = SimpleNamespace(model=model, device=torch.device("cpu"))
    wandb = MagicMock(spec=WandbLogger, save_dir=str(tmp_path))
    batches = DataLoader(TensorDataset(torch.randn(4, 3, 32, 32), torch.zeros(4)), batch_size=2)
    trainer = SimpleNamespace(
        loggers=[wandb], log_dir=str(tmp_path), default_root_dir=str(tmp_path), global_step=5,
    )  # fmt: skip
    callback = AttentionSaturation(num_images=3)
    for i, batch in enumerate(batches):  # what validation shows it
        callback.on_validation_batch_end(trainer, module, None, batch, i)
    callback.on_train_end(trainer, module)
    assert {p.name for p in (tmp_path / "saturation").iterdir()} == {
        "saturation.csv",
        "saturation.json",
        "saturation.png",
    }
    assert {r["images"] for r in callback.rows} == {3}
    assert [c.args[0] for c in wandb.log_table.call_args_list] == [
        "saturation/per_head",
        "saturation/summary",
    ]
    wandb.log_image.assert_called_once()
    assert model.training is False  # the model's mode is restored


@pytest.mark.slow
def test_the_cli_runs_the_callback_when_fit_ends_and_can_switch_it_off(tmp_path, monkeypatch):
    from conftest import TINY_LAVIT

    from lavit.cli import main as cli_main

    monkeypatch.setattr("sys.argv", ["lavit"])
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    common = [
        "fit", f"--model.model_kwargs={json.dumps(TINY_LAVIT)}", "--data.img_size=32",
        "--data.num_workers=0", "--data.batch_size=8", "--data.val_split=test",
        "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=0.01",
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false",
        "--trainer.num_sanity_val_steps=0", "--wandb.enabled=false",
        "--attention_maps.num_images=0", "--run_metadata.count_flops=false",
    ]  # fmt: skip
    cli_main(
        [*common, f"--trainer.default_root_dir={tmp_path / 'on'}", "--saturation.num_images=5"]
    )
    report = json.loads(
        (tmp_path / "on" / "version_0" / "saturation" / "saturation.json").read_text()
    )
    assert report["images"] == 5 and report["image_source"] == "validation images"
    # every stage with a layer pair (stages are numbered from 1)
    depths = TINY_LAVIT["depths"]
    assert {row["stage"] for row in report["rows"]} == {
        m + 1 for m, d in enumerate(depths) if d > 1
    }

    # In-memory data hands the loaders uint8 batches: the callback sees them normalised, as the
    # model does in validation (it crashed at the end of every in-memory run before).
    cli_main(
        [*common, f"--trainer.default_root_dir={tmp_path / 'mem'}", "--saturation.num_images=5",
         "--data.in_memory=true", "--data.auto_augment=null", "--data.color_jitter=null",
         "--data.re_prob=0"]
    )  # fmt: skip
    in_memory = json.loads(
        (tmp_path / "mem" / "version_0" / "saturation" / "saturation.json").read_text()
    )
    assert in_memory["images"] == 5 and in_memory["image_source"] == "validation images"
    # the same validation images and the same initial weights (same seed) as the first run
    assert [row["similarity"] for row in in_memory["rows"]] == pytest.approx(
        [row["similarity"] for row in report["rows"]], abs=1e-5
    )

    cli_main(
        [*common, f"--trainer.default_root_dir={tmp_path / 'off'}", "--saturation.num_images=0"]
    )
    assert (tmp_path / "off" / "version_0" / "metrics.csv").is_file()
    assert not (tmp_path / "off" / "version_0" / "saturation").exists()


def test_analyze_reads_a_lightning_checkpoint_written_by_a_run_with_the_callback(tmp_path):
    from lavit.training.module import LaViTModule

    torch.manual_seed(0)
    module = LaViTModule(arch="lavit_cifar", num_classes=10, scale_lr_by_batch=False)
    data = TensorDataset(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=1, logger=CSVLogger(tmp_path), enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[AttentionSaturation(num_images=2)],
    )  # fmt: skip
    trainer.fit(module, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    assert (tmp_path / "lightning_logs" / "version_0" / "saturation" / "saturation.png").is_file()

    ckpt = tmp_path / "model.ckpt"
    trainer.save_checkpoint(ckpt)
    out = tmp_path / "analysis"
    assert main(["--model", str(ckpt), "--random", "--num-images", "2", "--out", str(out)]) == 0
    assert "lavit_cifar" in json.loads((out / "saturation.json").read_text())["model"]


def test_analyze_logs_to_wandb_by_the_shared_rule(tmp_path):
    """WANDB_MODE=offline (the tests' environment): an offline W&B run with the tables and plot."""
    argv = ["--model", "lavit_cifar", "--random", "--num-images", "2", "--out", str(tmp_path)]
    assert main([*argv, "--wandb"]) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
