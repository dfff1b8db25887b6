"""Training throughput: images/s and FLOP/s (Lightning's ThroughputMonitor) and the run's ETA."""

from __future__ import annotations

import csv
import re

import lightning as L
import pytest
import timm
import torch
from conftest import SMALL_DATA, TINY_LAVIT
from lightning.pytorch.loggers import CSVLogger

from lavit.analysis.flops import count_model_macs
from lavit.models.factory import create_model
from lavit.training.data import ImageDataModule
from lavit.training.module import LaViTModule
from lavit.training.progress import Throughput, images_in_batch, training_macs_per_image
from lavit.units import format_duration, format_si


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fit_logs_images_flops_and_eta_and_shows_the_eta(tmp_path):
    module = LaViTModule(
        num_classes=10, img_size=32, model_kwargs=TINY_LAVIT, scale_lr_by_batch=False
    )
    throughput = Throughput(window_size=2)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=6, limit_val_batches=1,
        log_every_n_steps=1, logger=CSVLogger(tmp_path, name=""), enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=0, callbacks=[throughput],
    )  # fmt: skip
    trainer.fit(module, ImageDataModule(**SMALL_DATA))

    # The training FLOPs of one image are twice the project's MAC count (on the meta device).
    expected = count_model_macs(
        lambda: create_model("lavit_cifar", 10, 32, model_kwargs=TINY_LAVIT), 32
    )
    assert throughput.flops_per_image == 2 * expected.train_macs
    with open(tmp_path / "version_0" / "metrics.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    trained = [row for row in rows if row.get("train/device/samples_per_sec")]
    assert len(trained) == 2 * 6 - 1  # every batch once the window holds two
    for row in trained:
        images_per_s = float(row["train/device/samples_per_sec"])  # 16 images per batch
        assert images_per_s > 0
        flops_per_s = float(row["train/device/flops_per_sec"])
        assert flops_per_s == pytest.approx(images_per_s * 2 * expected.train_macs)
    etas = [float(row["train/eta_s"]) for row in rows if row.get("train/eta_s")]
    assert len(etas) == 2 * 6 and etas[0] > etas[-1] >= 0  # the whole run's, falling
    assert "train/eta_s" in trainer.progress_bar_callback.get_metrics(trainer, module)


def test_counting_training_macs_leaves_the_model_as_it_was():
    model = timm.create_model("test_resnet", num_classes=10)  # batch norm: running statistics
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs = training_macs_per_image(model, (3, 32, 32))
    assert macs > 0 and model.training
    assert all(p.grad is None for p in model.parameters())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_human_readable_units():
    assert [format_si(v) for v in (950.0, 4.04e9, 1.234e12, None)] == ["950", "4.04G", "1.23T", "?"]
    assert format_duration(3725) == "1:02:05"
    with pytest.raises(ValueError, match=r"window_size: invalid value 1 \(must be >= 2\)"):
        Throughput(window_size=1)


def test_bench_and_report_say_what_they_are_doing(tmp_path, capsys):
    """Progress lines on stderr, in order; stdout keeps the tables."""
    from lavit.tools import bench, report

    tiny = "--img-size 32 --batch-size 2 --iters 2 --warmup 0 --layer-iters 1 --gemm-size 64"
    assert bench.main(["--models", "lavit_cifar", *tiny.split(), "--out", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "[bench]" not in out and "| lavit_cifar |" in out
    lines = [re.sub(r" \(\d+ s\)$", " (N s)", line) for line in err.splitlines()]
    assert lines[:7] == [
        "[bench] counting params and MACs of 1 model(s) (meta device, batch 1)",
        "[bench] timing inference: 1 model(s) and gemm_fp32_64 round-robin on cpu, batch 2, "
        "0 warm-up + 2 timed round(s)",
        *(f"[bench] inference: round {i}/2 (N s)" for i in (1, 2)),
        "[bench] timing training steps: 1 model(s) and gemm_fp32_64 round-robin on cpu, batch 2, "
        "0 warm-up + 2 timed round(s)",
        "[bench] training steps: round 1/2 (N s)",
        "[bench] training steps: round 2/2 (N s)",
    ]
    assert (
        "[bench] timing each LA layer against the VA layer that would replace it: lavit_cifar"
        in err
    )

    measure = report.bench_throughput(batch_size=2, warmup=0, iters=1)
    (throughput,) = measure([{"arch": "lavit_cifar", "num_classes": 10, "img_size": 32}])
    assert throughput > 0
    assert capsys.readouterr().err.splitlines() == [
        "[report] measuring the inference throughput of 1 setting(s) on cpu: batch 2, "
        "round-robin, 0 warm-up + 1 timed round(s)",
        "[report] throughput: round 1/1",
    ]


def test_batches_of_image_lists_count_their_images():
    """Detection batches hold a list of differently sized images."""
    images = [torch.zeros(3, 32, 48), torch.zeros(3, 40, 40)]
    assert images_in_batch((images, [{}, {}])) == 2
    assert images_in_batch((torch.zeros(5, 3, 8, 8), torch.zeros(5))) == 5
