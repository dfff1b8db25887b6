"""DDP on CPU (gloo, 2 processes): same results as one process, and a failing rank ends the job.

Docstrings read ``<fault or setting> => <what must happen>`` (see docs/reliability.md).
"""

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import FAULTS_SCRIPT, REPO
from test_reliability import TINY_MODEL, run_env

from lavit.cli import main

# Full-batch training on 16 images: every step sees the same images whatever their order, so one
# process with batch 16 and two with batch 8 each must take the same steps. No randomness in
# the augmentation (whole-image crops, no flips) nor in the model (no drop path).
DETERMINISTIC = [
    "--data.img_size=32",
    "--data.num_workers=0",
    "--data.crop_pct=1.0",
    "--data.scale=[1,1]",
    "--data.ratio=[1,1]",
    "--data.hflip=0",
    "--data.color_jitter=null",
    "--data.auto_augment=null",
    "--data.re_prob=0",
    "--trainer.accelerator=cpu",
    "--trainer.max_epochs=3",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--model.drop_path_rate=0",
    "--model.lr=3e-3",
    "--model.warmup_epochs=0",
    "--model.scale_lr_by_batch=false",
    "--attention_maps.num_images=0",
    "--run_metadata.count_flops=false",
    "--wandb.enabled=false",
    "--seed_everything=0",
    TINY_MODEL,
]
TWO_PROCESSES = ["--trainer.strategy=ddp", "--trainer.devices=2", "--data.batch_size=8"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """train/ 2 × 8 and val/ 2 × 4 noisy 32×32 images of two overlapping classes."""
    root = tmp_path_factory.mktemp("ddp_data")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for label, mean in (("dark", 110), ("light", 145)):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(rng.normal(mean, 60, (32, 32, 3)), 0, 255).astype(np.uint8)
                PIL.Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def validation_metrics(run_dir: Path) -> list[tuple[int, float, float]]:
    with open(run_dir / "version_0" / "metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("val/loss")]
    return [(int(r["epoch"]), float(r["val/loss"]), float(r["val/top1"])) for r in rows]


@pytest.mark.slow
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(
    image_folder, tmp_path, monkeypatch
):
    """A 2-process DDP run on CPU (gloo, batch 8 per process) against a 1-process run (batch
    16), same seed and data, 3 epochs
    => the 2-process run exits 0 and its val/loss (rel. 1e-4) and val/top1 of every epoch equal
    the 1-process run's; its bad-image check decodes the 24 files once (one process), not per
    rank
    """
    monkeypatch.setattr(sys, "argv", ["lavit"])
    data = f"--data.source={image_folder}"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(
            [
                "fit",
                f"--trainer.default_root_dir={tmp_path / 'one'}",
                data,
                *DETERMINISTIC,
                "--data.batch_size=16",
            ]
        )
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("PL_GLOBAL_SEED", None)
    args = [
        "fit",
        f"--trainer.default_root_dir={tmp_path / 'two'}",
        data,
        *DETERMINISTIC,
        *TWO_PROCESSES,
        f"--data.cache_dir={tmp_path / 'cache'}",  # a new bad-image check cache
    ]
    result = subprocess.run(
        [sys.executable, "-m", "lavit", *args],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # The bad-image check decodes once per node (local rank 0), not once per rank.
    assert result.stderr.count("checked 24 image files: 24 decoded") == 1, result.stderr[-3000:]
    one, two = validation_metrics(tmp_path / "one"), validation_metrics(tmp_path / "two")
    assert [epoch for epoch, _, _ in one] == [0, 1, 2]
    assert [epoch for epoch, _, _ in two] == [0, 1, 2]
    assert len({loss for _, loss, _ in one}) == 3  # training moved the weights
    for (_, loss_one, top1_one), (_, loss_two, top1_two) in zip(one, two, strict=True):
        assert loss_two == pytest.approx(loss_one, rel=1e-4)
        assert top1_two == pytest.approx(top1_one, abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        ("crash:rank=1:step=2", "injected crash (LAVIT_FAULT_INJECT) on rank 1 at global step 2"),
        ("hang:rank=1:step=2", "error: rank 0: stopped because another rank failed or did not"),
    ],
    ids=["crash", "hang"],
)
def test_a_failing_rank_ends_the_whole_ddp_job_in_bounded_time(
    fault, expected, image_folder, tmp_path
):
    """Rank 1 of a 2-process DDP run raises (crash) or stops responding (hang) at global step 2,
    with --ddp.timeout=30
    => the whole job (both processes) ends with a non-zero exit code within 120 s, and the
    output says what happened (the crash's error; for the hang, rank 0's one-line error)
    """
    args = [
        "fit",
        f"--trainer.default_root_dir={tmp_path}",
        f"--data.source={image_folder}",
        *DETERMINISTIC,
        *TWO_PROCESSES,
        "--trainer.max_epochs=20",
        "--ddp.timeout=30",  # also bounds the rendezvous: a loaded machine starts a rank slowly
    ]
    started = time.monotonic()
    result = subprocess.run(  # capture_output: waits until every process holding the pipes ends
        [sys.executable, str(FAULTS_SCRIPT), *args],
        cwd=REPO,
        env=run_env(tmp_path, LAVIT_FAULT_INJECT=fault),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert time.monotonic() - started < 120
    assert expected in result.stderr, result.stderr[-3000:]


@pytest.mark.slow
def test_ddp_predict_writes_one_file_with_every_image_once(image_folder, tmp_path, monkeypatch):
    """`lavit predict` with 2 DDP processes on a folder of 5 unlabelled images (an odd count: the
    ranks get 3 and 2)
    => exit code 0; one predictions.csv with 5 rows, each image once, in path order, equal
    (class and probability) to the 1-process prediction of the same checkpoint
    """
    monkeypatch.setattr(sys, "argv", ["lavit"])
    folder = tmp_path / "unlabelled"
    folder.mkdir()
    for i, path in enumerate(sorted(image_folder.rglob("*.png"))[:5]):
        (folder / f"{i}.png").write_bytes(path.read_bytes())
    run = [f"--trainer.default_root_dir={tmp_path / 'run'}", f"--data.source={image_folder}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(["fit", *run, *DETERMINISTIC, "--data.batch_size=16", "--trainer.max_steps=1"])
        one = tmp_path / "one.csv"
        predict = ["predict", *run, *DETERMINISTIC, "--ckpt_path=last"]
        main([*predict, "--data.batch_size=2", f"--data.predict_source={folder}",
              f"--predict.output={one}"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("PL_GLOBAL_SEED", None)
    two = tmp_path / "two.csv"
    args = [*predict, *TWO_PROCESSES, "--data.batch_size=2", f"--data.predict_source={folder}"]
    result = subprocess.run(
        [sys.executable, "-m", "lavit", *args, f"--predict.output={two}"],
        cwd=REPO,
        env=run_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with open(one) as a, open(two) as b:
        rows_one, rows_two = list(csv.DictReader(a)), list(csv.DictReader(b))
    assert [r["id"] for r in rows_two] == sorted(str(p) for p in folder.iterdir())
    assert [r["predicted"] for r in rows_two] == [r["predicted"] for r in rows_one]
    for r1, r2 in zip(rows_one, rows_two, strict=True):
        assert float(r2["probability"]) == pytest.approx(float(r1["probability"]), abs=1e-5)
