"""Reliability and security: every test injects a fault or a bad input and checks the outcome.

Each test's docstring reads ``<fault or input> => <what must happen>``; ``scripts/
reliability_table.py`` turns them (and :data:`BAD_ARGUMENTS`) into ``docs/reliability.md``, and the
last test checks that file is current. Runs are tiny (a ~50 K-parameter LaViT, 4 batches of 16
per epoch, W&B off unless a test needs it); subprocesses only where a real process must die.
"""

import contextlib
import csv
import http.server
import inspect
import json
import os
import queue
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import FAULTS_SCRIPT, REPO, TINY_LAVIT
from helpers.faults import InjectedFault
from helpers.faults import main as main_with_faults

from lavit.cli import LaViTCLI, main
from lavit.errors import (
    EXIT_DISK_FULL,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    CheckpointError,
    NonFiniteCheckpointError,
)
from lavit.training.checkpoint_io import AtomicCheckpointIO, load_checkpoint_file, partial_path
from lavit.training.data import ImageDataModule
from lavit.training.module import LaViTModule

TINY_MODEL = f"--model.model_kwargs={json.dumps(TINY_LAVIT)}"
FAST = [
    "--data.img_size=32",
    "--data.num_workers=0",
    "--data.batch_size=16",
    "--data.val_split=test",
    "--data.crop_pct=1.0",
    "--data.auto_augment=null",
    "--data.re_prob=0",
    "--trainer.accelerator=cpu",
    "--trainer.limit_train_batches=4",
    "--trainer.limit_val_batches=0.02",  # one batch of the 1,000 test images
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.num_sanity_val_steps=0",
    "--model.warmup_epochs=0",
    "--model.scale_lr_by_batch=false",
    "--attention_maps.num_images=0",
    "--run_metadata.count_flops=false",
]
NO_WANDB = "--wandb.enabled=false"
HF_SECRET = "hf_fakesecretTOKEN0123456789abcdef"
WANDB_SECRET = "fakewandbkey" + "0123456789abcdef" * 2 + "deadbeef"


def fit_args(run_dir: Path, *extra: str, wandb: bool = False) -> list[str]:
    return [
        "fit",
        f"--trainer.default_root_dir={run_dir}",
        *FAST,
        TINY_MODEL,
        *([] if wandb else [NO_WANDB]),
        *extra,
    ]


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    """One thread, the CLI's arguments from the tests, and no state leaking between tests."""
    monkeypatch.setattr(sys, "argv", ["lavit"])
    for name in ("PL_GLOBAL_SEED", "LAVIT_FAULT_INJECT", "HF_TOKEN", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(name, raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for name in (
        "WANDB_API_KEY",
        "HF_TOKEN",
        "LAVIT_FAULT_INJECT",
        "WANDB_RUN_ID",
        "PL_GLOBAL_SEED",
    ):
        env.pop(name, None)
    return {**env, **extra}


class LiveRun:
    """``python -m lavit ...`` (or ``tests/helpers/faults.py`` to inject faults) in a
    subprocess whose output is read line by line as it comes."""

    def __init__(self, args: list[str], env: dict[str, str], faults: bool = False) -> None:
        self.process = subprocess.Popen(
            [*lavit_command(faults), *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, count: int = 1, timeout: float = 180) -> None:
        deadline, seen = time.monotonic() + timeout, 0
        while seen < count:
            try:
                line = self._queue.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                self.process.kill()
                pytest.fail(f"no {pattern!r} within {timeout} s:\n{self.output[-3000:]}")
            if line is None:
                pytest.fail(f"exited before {pattern!r}:\n{self.output[-3000:]}")
            seen += bool(re.search(pattern, line))

    def wait_for_file(self, path: Path, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                pytest.fail(f"{path} never appeared:\n{self.output[-3000:]}")
            time.sleep(0.05)

    def finish(self, timeout: float = 120) -> int:
        try:
            return self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()

    @property
    def output(self) -> str:
        return "".join(self.lines)


def lavit_command(faults: bool = False) -> list[str]:
    return [sys.executable, str(FAULTS_SCRIPT)] if faults else [sys.executable, "-m", "lavit"]


def run_cli(args: list[str], env: dict[str, str], timeout: float = 300, faults: bool = False):
    return subprocess.run(
        [*lavit_command(faults), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def metric_rows(version_dir: Path) -> list[dict[str, str]]:
    """The rows of metrics.csv (ThroughputMonitor's validate/* rows count validation batches as
    their step, and hold no epoch)."""
    with open(version_dir / "metrics.csv") as file:
        return list(csv.DictReader(file))


def all_finite(checkpoint: dict) -> bool:
    return all(
        torch.isfinite(v).all() for v in checkpoint["state_dict"].values() if v.is_floating_point()
    )


def error_line(capsys, forbidden: tuple[str, ...] = ()) -> str:
    """The CLI's error output, checked to be a single ``error: ...`` line without a traceback
    (and without any of the ``forbidden`` strings anywhere in the output)."""
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, captured.err[-3000:]
    assert "Traceback" not in captured.err + captured.out
    for text in forbidden:
        assert text not in captured.err + captured.out
    return lines[0]


# ------------------------------------------------------------------------- kill and resume
@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_keeps_last_loadable_and_resume_continues(tmp_path):
    """SIGKILL while last.ckpt is being rewritten (a 2 s write injected with
    LAVIT_FAULT_INJECT=slow_checkpoint), then `fit --ckpt_path last`
    => the half-written file is only `.last.ckpt.partial`; last.ckpt and every other *.ckpt load
    weights-only (last: the previous epoch, step 4); the resumed run restores it, continues at
    global step 4 and ends at step 12 after 3 epochs; its CSV metrics start at step 4, epochs 1-2;
    last.ckpt is a real file and no partial file is left
    """
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    slow = run_env(tmp_path, LAVIT_FAULT_INJECT="slow_checkpoint:seconds=2")
    run = LiveRun(fit_args(run_dir, "--trainer.max_epochs=4"), slow, faults=True)
    run.wait_for(r"lavit-fault: writing .*last\.ckpt", count=2)  # epoch 1's last.ckpt
    time.sleep(0.4)  # a fifth of the way through the write
    run.process.send_signal(signal.SIGKILL)
    assert run.finish() == -signal.SIGKILL
    assert load_checkpoint_file(last)["global_step"] == 4  # epoch 0's, complete
    assert partial_path(last).exists(), "the kill did not land during the write"
    for path in sorted(last.parent.glob("*.ckpt")):
        assert all_finite(load_checkpoint_file(path)), path

    resumed = run_cli(
        fit_args(run_dir, "--trainer.max_epochs=3", "--ckpt_path=last"), run_env(tmp_path)
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Restored all states from the checkpoint at {last}" in resumed.stderr
    final = load_checkpoint_file(last)
    assert (final["global_step"], final["epoch"]) == (12, 2)
    assert not last.is_symlink() and not partial_path(last).exists()
    rows = metric_rows(run_dir / "version_1")
    assert min(int(r["step"]) for r in rows if r["epoch"]) == 4
    assert {int(r["epoch"]) for r in rows if r["epoch"]} == {1, 2}


@pytest.mark.slow
def test_sigterm_saves_last_checkpoint_exits_75_and_resumes(tmp_path):
    """SIGTERM (a scheduler's pre-emption notice) during training, then `fit --ckpt_path last`
    => the run saves last.ckpt at the global step it reached (its message names both) and exits
    with code 75, no traceback; the resumed run continues from that step (+2 steps) and its CSV
    metrics start there
    """
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.ckpt"
    run = LiveRun(fit_args(run_dir, "--trainer.max_epochs=1000"), run_env(tmp_path))
    run.wait_for_file(last)  # training is under way (epoch 0 done)
    time.sleep(0.5)
    run.process.send_signal(signal.SIGTERM)
    assert run.finish(timeout=60) == EXIT_PREEMPTED, run.output[-3000:]
    match = re.search(r"SIGTERM: saved (\S+) at global step (\d+)", run.output)
    assert match and match.group(1) == str(last), run.output[-3000:]
    assert "Traceback" not in run.output
    step = int(match.group(2))
    assert step >= 4 and load_checkpoint_file(last)["global_step"] == step

    main(
        fit_args(
            run_dir,
            "--trainer.max_epochs=1000",
            f"--trainer.max_steps={step + 2}",
            "--ckpt_path=last",
        )
    )
    assert load_checkpoint_file(last)["global_step"] == step + 2
    steps = [int(r["step"]) for r in metric_rows(run_dir / "version_1") if r["epoch"]]
    # Lightning numbers the first logged step one later when the SIGTERM came at an epoch's end.
    assert step <= min(steps) <= step + 1


@pytest.mark.slow
def test_sigterm_mid_epoch_then_resume_gives_bit_identical_weights(tmp_path):
    """SIGTERM in the middle of epoch 0 (sent at global step 2 of 4, LAVIT_FAULT_INJECT=sigterm)
    of a run with random crops and flips, Mixup/CutMix, drop path, the DP loss and an EMA
    (num_workers=0, CPU), then `fit --ckpt_path last`
    => the run exits 75 with last.ckpt saved mid-epoch (global step 3); the resumed run ends at
    step 8 (2 epochs) with every weight, EMA included, bit-identical to an uninterrupted run's,
    and without Lightning's warning that the loader cannot resume
    """
    recipe = [
        "--trainer.max_epochs=2", "--seed_everything=0", "--model.ema_decay=0.9",
        "--model.mixup_alpha=0.8", "--model.cutmix_alpha=1.0", "--model.dp_loss_weight=0.1",
    ]  # fmt: skip
    main(fit_args(tmp_path / "straight", *recipe))
    cut = run_cli(
        fit_args(tmp_path / "cut", *recipe),
        run_env(tmp_path, LAVIT_FAULT_INJECT="sigterm:step=2", LAVIT_CPU_TUNING="0"),
        faults=True,
    )
    assert cut.returncode == EXIT_PREEMPTED, cut.stderr[-3000:]
    last = tmp_path / "cut" / "checkpoints" / "last.ckpt"
    assert load_checkpoint_file(last)["global_step"] == 3
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(fit_args(tmp_path / "cut", *recipe, "--ckpt_path=last"))
    assert not [w for w in caught if "not resumable" in str(w.message)]
    expected = load_checkpoint_file(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    actual = load_checkpoint_file(last)
    assert actual["global_step"] == expected["global_step"] == 8
    assert any(key.startswith("ema.module.") for key in actual["state_dict"])
    for key, value in expected["state_dict"].items():
        torch.testing.assert_close(actual["state_dict"][key], value, rtol=0, atol=0, msg=key)


def test_a_crash_resumes_from_the_last_epoch_even_without_improvement(tmp_path, monkeypatch):
    """An exception at global step 9 (LAVIT_FAULT_INJECT=crash) in a run whose val/top1 never
    improves after epoch 0 (lr 1e-9)
    => the crash propagates; last.ckpt holds epoch 1's end (step 8), not the best epoch's
    (step 4): Lightning 2.6 alone refreshes last.ckpt only when the monitored metric improves
    """
    monkeypatch.setenv("LAVIT_FAULT_INJECT", "crash:step=9")
    with pytest.raises(InjectedFault, match="global step 9"):
        main_with_faults(fit_args(tmp_path, "--trainer.max_epochs=3", "--model.lr=1e-9"))
    assert load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")["global_step"] == 8
    best = list((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert [load_checkpoint_file(p)["global_step"] for p in best] == [4]


def test_an_interrupted_checkpoint_write_leaves_the_previous_file(tmp_path, monkeypatch):
    """A checkpoint write that fails half-way (torch.save raising after writing some bytes)
    => the previous checkpoint at that path is unchanged and no partial file is left
    """
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, path)
    before = path.read_bytes()

    def half_then_fail(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "global_step": 2}, path)
    assert path.read_bytes() == before and not partial_path(path).exists()


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_write_ends_in_one_line_and_keeps_the_checkpoints(
    tmp_path,
):
    """`lavit fit` with its run directory on a real 2 MiB file system (a tmpfs mounted in a user
    namespace), where epoch 0's two checkpoints (0.8 MB each) fit and epoch 1's do not
    => exit code 74 with one `error:` line naming the checkpoint file, the space it needed and
    free, and last.ckpt to resume from with --ckpt_path last, no traceback; last.ckpt (epoch 0,
    global step 4) and every other *.ckpt left load weights-only; no partial file is left
    """
    disk, kept = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    fit = shlex.join([*lavit_command(), *fit_args(disk / "run", "--trainer.max_epochs=3")])
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {disk} || exit 99; {fit}; code=$?; "
        f"cp -r {disk / 'run' / 'checkpoints'} {kept}; exit $code"
    )  # the tmpfs lives as long as the namespace: keep a copy of what the run left on it
    unshare = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c"]
    result = subprocess.run(
        [*unshare, script], cwd=REPO, env=run_env(tmp_path), capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    if result.returncode == 99 or "unshare: " in result.stderr:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here: {result.stderr[-300:]}")
    assert result.returncode == EXIT_DISK_FULL, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    last = disk / "run" / "checkpoints" / "last.ckpt"
    kept_size = (kept / "last.ckpt").stat().st_size  # what the next one needs, give or take
    match = re.search(
        rf"error: no space left to write checkpoint {disk}/run/checkpoints/\S+\.ckpt: it needs "
        rf"about (\S+) MiB and (\S+) MiB are free there; {last} is intact: make room, then "
        "resume from it with --ckpt_path last$",
        lines[0],
    )
    assert match and float(match[2]) < float(match[1]) == round(kept_size / 2**20, 1), lines[0]
    assert load_checkpoint_file(kept / "last.ckpt")["global_step"] == 4
    for path in kept.glob("*.ckpt"):
        assert all_finite(load_checkpoint_file(path)), path
    assert not list(kept.glob(".*.partial"))


def test_a_checkpoint_with_nan_weights_is_never_written(tmp_path):
    """Saving a checkpoint whose state_dict holds NaN (through the CLI's checkpoint IO)
    => NonFiniteCheckpointError naming the tensor; the good checkpoint on disk is kept
    """
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()
    with pytest.raises(NonFiniteCheckpointError, match="model.head.weight"):
        io.save_checkpoint({"state_dict": {"model.head.weight": torch.tensor([1.0, np.nan])}}, path)
    assert path.read_bytes() == before


# ------------------------------------------------------------------------------- divergence
def test_a_nan_loss_stops_training_naming_the_step_and_the_last_good_checkpoint(
    tmp_path, capsys, monkeypatch
):
    """A NaN loss at global step 6 (NaN input batch injected), default policy
    => exit code 3 with one line naming global step 6 and last.ckpt (global step 4); every
    checkpoint on disk is finite and last.ckpt is still step 4's
    """
    monkeypatch.setenv("LAVIT_FAULT_INJECT", "nan_loss:step=6")
    with pytest.raises(SystemExit) as exit_info:
        main_with_faults(fit_args(tmp_path, "--trainer.max_epochs=3"))
    assert exit_info.value.code == EXIT_DIVERGED
    last = tmp_path / "checkpoints" / "last.ckpt"
    line = error_line(capsys)
    assert "non-finite loss (nan)" in line and "global step 6 " in line
    assert f"Last good checkpoint: {last} (global step 4)" in line
    assert load_checkpoint_file(last)["global_step"] == 4
    for path in last.parent.glob("*.ckpt"):
        assert all_finite(load_checkpoint_file(path)), path


def test_the_skip_policy_drops_a_nan_batch_counts_and_logs_it(tmp_path, monkeypatch):
    """A NaN loss at global step 2 with --nonfinite.policy=skip
    => training completes (8 steps); train/nonfinite_skipped = 1 is logged at step 2; the count
    is in the checkpoint; every weight stays finite
    """
    monkeypatch.setenv("LAVIT_FAULT_INJECT", "nan_loss:step=2")
    main_with_faults(fit_args(tmp_path, "--trainer.max_epochs=2", "--nonfinite.policy=skip"))
    checkpoint = load_checkpoint_file(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 8 and all_finite(checkpoint)
    assert checkpoint["callbacks"]["NonFiniteGuard"] == {"skipped": 1}
    logged = [
        (int(r["step"]), float(r["train/nonfinite_skipped"]))
        for r in metric_rows(tmp_path / "version_0")
        if r.get("train/nonfinite_skipped")
    ]
    assert logged == [(2, 1.0)]


# --------------------------------------------------------------------------------- bad data
def make_bad_image_folder(root: Path) -> list[Path]:
    """Two classes of 8 good images (RGB, greyscale, RGBA) plus three unreadable files."""
    rng = np.random.default_rng(0)
    for class_name in ("cat", "dog"):
        (root / class_name).mkdir(parents=True)
        for i in range(8):
            mode = ("RGB", "L", "RGBA")[i % 3]
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).convert(mode).save(root / class_name / f"{i}.png")
    rgb = root / "cat" / "whole.jpg"
    PIL.Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(rgb)
    truncated = root / "cat" / "truncated.jpg"
    truncated.write_bytes(rgb.read_bytes()[: rgb.stat().st_size // 2])
    rgb.unlink()
    empty = root / "dog" / "empty.png"
    empty.write_bytes(b"")
    not_an_image = root / "dog" / "notes.jpg"
    not_an_image.write_text("text with an image extension")
    return [truncated, empty, not_an_image]


@pytest.mark.slow
def test_a_bad_image_folder_fails_before_training_listing_every_bad_file(tmp_path):
    """An image folder with a truncated JPEG, a zero-byte PNG and a text file named .jpg (and
    good greyscale and RGBA images), default --data.bad_images=error, through `python -m lavit`
    => exit code 2 before training, an `error:` naming the 3 bad files (not the good ones) and
    the skip option, no traceback, no checkpoint
    """
    bad = make_bad_image_folder(tmp_path / "pets")
    run_dir = tmp_path / "run"
    args = fit_args(run_dir, f"--data.source={tmp_path / 'pets'}", "--data.val_split=null")
    result = run_cli(args, run_env(tmp_path))
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "error: 3 unreadable image file(s)" in result.stderr
    listed = [line.strip().split(":")[0] for line in result.stderr.splitlines() if "  /" in line]
    assert sorted(listed) == sorted(str(p) for p in bad)
    assert "bad_images='skip'" in result.stderr
    assert not (run_dir / "checkpoints").exists()


def test_the_skip_policy_trains_on_the_good_images_and_logs_the_count(tmp_path):
    """The same folder with --data.bad_images=skip
    => training runs on the 16 good images; the run logs skipped_images = 3 (run_info.json and
    the loggers' hyper-parameters)
    """
    make_bad_image_folder(tmp_path / "pets")
    args = fit_args(
        tmp_path / "run",
        f"--data.source={tmp_path / 'pets'}",
        "--data.val_split=null",
        "--data.bad_images=skip",
        "--data.batch_size=4",
        "--trainer.limit_val_batches=1.0",
        "--trainer.max_epochs=1",
    )
    with pytest.warns(UserWarning, match="Skipped 3 unreadable image file"):
        main(args)
    info = json.loads((tmp_path / "run" / "version_0" / "run_info.json").read_text())
    assert info["skipped_images"] == 3 and info["final"]["global_step"] == 3  # 14 train / 4
    assert "skipped_images: 3" in (tmp_path / "run" / "version_0" / "hparams.yaml").read_text()


def test_the_lazy_policy_skips_the_check_and_counts_bad_images_met_in_training(tmp_path):
    """The same folder with --data.bad_images=lazy (no check before training), batch 1, one
    epoch over every training and validation image
    => training completes; no image is decoded before training; each of the 3 unreadable files
    is met, replaced by the next image with a warning naming it, and counted each time it is met:
    unreadable_images_met (≥ 3) in run_info.json, and the same count logged as
    data/unreadable_images at the epoch's end
    """
    bad = make_bad_image_folder(tmp_path / "pets")
    args = fit_args(
        tmp_path / "run",
        f"--data.source={tmp_path / 'pets'}",
        "--data.val_split=null",
        "--data.bad_images=lazy",
        "--data.batch_size=1",
        "--trainer.limit_train_batches=1.0",
        "--trainer.limit_val_batches=1.0",
        "--trainer.max_epochs=1",
        "--saturation.num_images=0",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(args)
    assert not any("checked" in str(w.message) for w in caught)
    replaced = {
        str(w.message).split("'")[1] for w in caught if "replaced by the next" in str(w.message)
    }
    info = json.loads((tmp_path / "run" / "version_0" / "run_info.json").read_text())
    met = info["final"]["unreadable_images_met"]
    # every image is read once in training or validation, and a replacement may be bad too
    assert replaced == {str(p) for p in bad} and met >= 3
    logged = [r["data/unreadable_images"] for r in metric_rows(tmp_path / "run" / "version_0")]
    assert [float(v) for v in logged if v] == [float(met)]


SMALL_SPLITS = {
    "train_smaller_than_a_batch": (
        ["--data.source=<42 images>", "--data.val_fraction=0.25", "--data.batch_size=64"],
        "the training split has 32 images, fewer than one batch of 64 (--data.batch_size), so "
        "no training batch would run: set --data.batch_size=32 or less",
    ),
    "val_fraction_rounds_to_zero": (
        ["--trainer.limit_val_batches=0.01"],
        "--trainer.limit_val_batches=0.01 of the 63 validation batches (1000 images, batch 16) "
        "rounds down to 0 batches: set it to at least 0.0159",
    ),
}


@pytest.mark.parametrize("case", list(SMALL_SPLITS))
def test_a_split_too_small_for_one_batch_is_an_error_before_training(case, tmp_path, capsys):
    """An image folder of 42 images with --data.val_fraction=0.25 and a batch of 64 (32
    training images), or --trainer.limit_val_batches=0.01 of 63 validation batches
    => exit code 2 before training with one `error:` line naming the split's size, the batch
    size and the fix; no checkpoint is written (Lightning alone trains nothing and exits 0,
    or fails with a traceback)
    """
    rng = np.random.default_rng(0)
    for class_name in ("cat", "dog"):
        (tmp_path / "images" / class_name).mkdir(parents=True)
        for i in range(21):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(tmp_path / "images" / class_name / f"{i}.png")
    args, expected = SMALL_SPLITS[case]
    args = [a.replace("<42 images>", str(tmp_path / "images")) for a in args]
    if case == "train_smaller_than_a_batch":
        args.append("--data.val_split=null")
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path / "run", *args))
    assert exit_info.value.code == 2
    assert expected in error_line(capsys)
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- bad checkpoints
class MakesMarker:
    """Unpickling this runs ``os.makedirs(marker)``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory with a real last.ckpt of the tiny model (one epoch of 4 steps)."""
    run_dir = tmp_path_factory.mktemp("trained")
    old_argv, sys.argv = sys.argv, ["lavit"]
    try:
        main(fit_args(run_dir, "--trainer.max_epochs=1"))
    finally:
        sys.argv = old_argv
        os.environ.pop("PL_GLOBAL_SEED", None)
    return run_dir


def write_bad_checkpoint(kind: str, good: Path, folder: Path) -> Path:
    path = folder / f"{kind}.ckpt"
    data = good.read_bytes()
    checkpoint = load_checkpoint_file(good)
    if kind == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "random_bytes":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    elif kind == "foreign_dict":
        torch.save({"model": {"weight": torch.ones(2)}, "step": 3}, path)
    elif kind == "other_arch":
        other = LaViTModule(arch="pvt_v2_b0", num_classes=10, img_size=32)
        hparams = {**checkpoint["hyper_parameters"], "arch": "pvt_v2_b0"}
        torch.save(
            {**checkpoint, "state_dict": other.state_dict(), "hyper_parameters": hparams}, path
        )
    elif kind == "weights_only":
        torch.save({k: checkpoint[k] for k in ("state_dict", "epoch", "global_step")}, path)
    elif kind == "malicious":
        torch.save({**checkpoint, "extra": MakesMarker(folder / "marker")}, path)
    elif kind == "malicious_pickle":
        import pickle

        path.write_bytes(pickle.dumps({"state_dict": MakesMarker(folder / "marker")}))
    return path


BAD_CHECKPOINTS = {
    "truncated": "truncated or corrupted checkpoint file",
    "empty": "empty file (0 bytes)",
    "random_bytes": "not a PyTorch checkpoint",
    "foreign_dict": "not a Lightning checkpoint",
    "other_arch": "does not fit this run's model (trained as arch='pvt_v2_b0'",
    "weights_only": "holds weights only (no optimizer or loop state)",
    "malicious": "refused, it holds pickled Python objects (os.makedirs)",
    "malicious_pickle": "or one holding pickled objects that weights-only loading refuses",
}


@pytest.mark.parametrize("kind", list(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_gives_a_one_line_error_and_runs_no_code(
    kind, trained_run, tmp_path, capsys
):
    """`fit --ckpt_path <file>` with a truncated, empty, random-bytes, foreign (plain
    torch.save dict), other-arch (pvt_v2_b0), weights-only, or malicious checkpoint (a pickle
    whose __reduce__ creates a marker folder, as a zip checkpoint and as a raw pickle)
    => exit code 2 with one `error: --ckpt_path: <file> ...` line saying what is wrong; the
    marker is never created (checkpoints are loaded weights-only)
    """
    path = write_bad_checkpoint(kind, trained_run / "checkpoints" / "last.ckpt", tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path / "run", f"--ckpt_path={path}"))
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert line.startswith("error: --ckpt_path: ") and str(path) in line
    assert BAD_CHECKPOINTS[kind] in line, line
    assert not (tmp_path / "marker").exists()


def test_the_checkpoint_io_itself_never_unpickles_code(trained_run, tmp_path):
    """AtomicCheckpointIO.load_checkpoint (what Lightning calls to restore) on the malicious
    checkpoint, even when asked for weights_only=False
    => CheckpointError; the marker is not created
    """
    path = write_bad_checkpoint("malicious", trained_run / "checkpoints" / "last.ckpt", tmp_path)
    with pytest.raises(CheckpointError, match="refused"):
        AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert not (tmp_path / "marker").exists()


def test_analyze_reads_checkpoints_weights_only_with_the_runs_data_settings(
    trained_run, tmp_path, capsys
):
    """`lavit analyze --model <checkpoint>` on the malicious checkpoint, then on a real one whose
    data settings are not the model's defaults (base.yaml-like CIFAR mean/std, 32², crop 1.0)
    => the malicious one: exit code 2 with one `lavit analyze: error:` line saying it was
    refused, the marker is never created; the real one: its images are preprocessed with the
    run's mean, std, size and crop (recorded in saturation.json) and analysed
    """
    from lavit.tools.analyze import main as analyze

    path = write_bad_checkpoint("malicious", trained_run / "checkpoints" / "last.ckpt", tmp_path)
    assert analyze(["--model", str(path), "--random", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lavit analyze: error: ") and "refused" in err
    assert not (tmp_path / "marker").exists()

    checkpoint = load_checkpoint_file(trained_run / "checkpoints" / "last.ckpt")
    run_data = {"mean": (0.49, 0.48, 0.45), "std": (0.25, 0.24, 0.26)}
    checkpoint["datamodule_hyper_parameters"].update(run_data)
    torch.save(checkpoint, tmp_path / "cifar.ckpt")
    out = tmp_path / "good"
    assert (
        analyze(["--model", str(tmp_path / "cifar.ckpt"), "--num-images", "4", "--out", str(out)])
        == 0
    )
    report = json.loads((out / "saturation.json").read_text())
    assert report["preprocessing"] == {
        "mean": list(run_data["mean"]), "std": list(run_data["std"]), "crop_pct": 1.0,
        "interpolation": "bicubic",
    }  # fmt: skip
    assert report["img_size"] == 32 and report["images"] == 4


def test_our_checkpoints_load_weights_only_with_plain_hyperparameters(trained_run):
    """A checkpoint written by `lavit fit`, read with torch.load(weights_only=True)
    => it loads; its hyper-parameters hold only plain types (str, numbers, bool, None, lists,
    dicts), so nothing in our checkpoints needs pickled code
    """
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (str, int, float, bool))

    for key in ("hyper_parameters", "datamodule_hyper_parameters"):
        assert checkpoint[key] and plain(checkpoint[key]), checkpoint[key]


# ---------------------------------------------------------------------------------- secrets
@pytest.mark.slow
def test_secrets_in_the_environment_appear_in_no_file_or_log(tmp_path):
    """A short run with fake HF_TOKEN and WANDB_API_KEY in the environment, W&B on (offline)
    => every file written (config.yaml, hparams.yaml, metrics.csv, run_info.json, the
    checkpoints, W&B's offline run files and logs under WANDB_DIR) and the console output are
    free of both values
    """
    env = run_env(tmp_path, HF_TOKEN=HF_SECRET, WANDB_API_KEY=WANDB_SECRET)
    run_dir = tmp_path / "run"
    result = run_cli(fit_args(run_dir, "--trainer.max_steps=2", wandb=True), env)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "hparams.yaml", "metrics.csv", "run_info.json", "last.ckpt"} <= names
    assert any(p.suffix == ".wandb" for p in files) and any("debug" in n for n in names)
    for secret in (HF_SECRET, WANDB_SECRET):
        assert secret not in result.stdout + result.stderr
        leaks = [p for p in files if secret.encode() in p.read_bytes()]
        assert not leaks, leaks


SECRET_ARGUMENTS = {
    "hf_token_option": ([f"--data.token={HF_SECRET}"], "--data.token: credentials are not"),
    "wandb_key_option": ([f"--wandb.api_key={WANDB_SECRET}"], "--wandb.api_key: credentials"),
    "token_in_config": (["--config=<secret.yaml>"], "key data.hf_token: credentials are not"),
    "env_value_elsewhere": (
        [f"--model.model_kwargs={{note: {HF_SECRET}}}"],
        "the value of HF_TOKEN appears in the command line",
    ),
}


@pytest.mark.parametrize("case", list(SECRET_ARGUMENTS))
def test_a_credential_given_as_an_argument_is_refused_without_echo(
    case, tmp_path, capsys, monkeypatch
):
    """A token as an option (--data.token, --wandb.api_key), as a key of a --config file, or the
    value of HF_TOKEN inside another argument
    => exit code 2 with one line telling to use HF_TOKEN / WANDB_API_KEY; the value appears
    nowhere in the output
    """
    monkeypatch.setenv("HF_TOKEN", HF_SECRET)
    config = tmp_path / "secret.yaml"
    config.write_text(f"data:\n  hf_token: {HF_SECRET}\n")
    args, expected = SECRET_ARGUMENTS[case]
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, *(a.replace("<secret.yaml>", str(config)) for a in args)))
    assert exit_info.value.code == 2
    line = error_line(capsys, forbidden=(HF_SECRET, WANDB_SECRET))
    assert expected in line and "HF_TOKEN" in line and "WANDB_API_KEY" in line


# ---------------------------------------------------------------------------- bad arguments
# (argument, what the one-line error must contain). `<a file>`: an existing file.
BAD_ARGUMENTS = [
    ("--model.arch=nope", "arch='nope' is not a timm model"),
    ("--model.num_va_layers=[9,9,9,9]", "num_va_layers[0] = 9 is not allowed"),
    ("--model.residual_attn_downsample=maybe", "--model.residual_attn_downsample: invalid value"),
    ("--model.la_init=zeros", "--model.la_init: invalid value zeros (expected one of"),
    ("--model.attn_state=x", "--model.attn_state: invalid value x (expected one of"),
    ("--model.dp_loss_variant=x", "--model.dp_loss_variant: invalid value x"),
    ("--model.dp_loss_layers=x", "--model.dp_loss_layers: invalid value x"),
    ("--model.dp_loss_weight=-1", "dp_loss_weight must be a finite number ≥ 0"),  # LaViT's check
    ("--model.drop_path_rate=1.5", "--model.drop_path_rate: invalid value 1.5 (must be in [0, 1)"),
    ("--model.drop_rate=-0.1", "--model.drop_rate: invalid value -0.1"),
    ("--model.model_kwargs={nope: 1}", "model_kwargs do not fit arch='lavit_cifar'"),
    ("--model.pretrained=maybe", "--model.pretrained: invalid value"),
    ("--model.pretrained=true", "LaViT has no published weights: pass pretrained_file"),
    ("--model.pretrained_file=nowhere.pth", "pretrained_file='nowhere.pth': no such file"),
    ("--model.freeze=nope", "freeze=['nope']: "),
    ("--model.opt=nope", "opt='nope': not a timm optimizer"),
    ("--model.momentum=1", "--model.momentum: invalid value 1.0 (must be in [0, 1)"),
    ("--model.layer_decay=0", "--model.layer_decay: invalid value 0.0 (must be in (0, 1]"),
    ("--model.sched=x", "--model.sched: invalid value x (expected one of"),
    ("--model.decay_epochs=0", "--model.decay_epochs: invalid value 0.0 (must be > 0)"),
    ("--model.decay_milestones=[-1]", "--model.decay_milestones: invalid value"),
    ("--model.decay_rate=0", "--model.decay_rate: invalid value 0.0 (must be > 0)"),
    ("--model.lr=-1", "--model.lr: invalid value -1.0 (must be > 0)"),
    ("--model.scale_lr_by_batch=maybe", "--model.scale_lr_by_batch: invalid value maybe"),
    ("--model.weight_decay=-1", "--model.weight_decay: invalid value -1.0 (must be >= 0)"),
    ("--model.betas=[0.9,1.5]", "--model.betas: invalid value [0.9, 1.5]"),
    ("--model.eps=-1", "--model.eps: invalid value -1.0"),
    ("--model.warmup_epochs=-1", "--model.warmup_epochs: invalid value -1.0"),
    ("--model.warmup_lr=-1", "--model.warmup_lr: invalid value -1.0"),
    ("--model.min_lr=-1", "--model.min_lr: invalid value -1.0"),
    ("--model.label_smoothing=1", "--model.label_smoothing: invalid value 1.0 (must be in [0, 1)"),
    ("--model.mixup_alpha=-1", "--model.mixup_alpha: invalid value -1.0"),
    ("--model.cutmix_alpha=-1", "--model.cutmix_alpha: invalid value -1.0"),
    ("--model.mixup_prob=2", "--model.mixup_prob: invalid value 2.0 (must be a probability"),
    ("--model.mixup_switch_prob=2", "--model.mixup_switch_prob: invalid value 2.0"),
    ("--model.mixup_mode=x", "--model.mixup_mode: invalid value x (expected one of"),
    ("--model.ema_decay=1", "--model.ema_decay: invalid value 1.0 (must be in (0, 1)"),
    ("--model.channels_last=maybe", "--model.channels_last: invalid value maybe"),
    ("--model.compile=maybe", "--model.compile: invalid value maybe"),
    ("--model.reseed_every_epoch=maybe", "--model.reseed_every_epoch: invalid value maybe"),
    ("--model.img_size=33", "--model.img_size: cannot be given: it is set from --data.img_size"),
    ("--model.num_classes=3", "--model.num_classes: cannot be given: it is set from the data"),
    ("--data.source=/no/such/dir", "Data source '/no/such/dir' is not an existing file"),
    ("--data.source_type=x", "--data.source_type: invalid value x (expected one of"),
    ("--data.hub_config=x", "--data.hub_config: invalid value x (a configuration name of a Hub"),
    ("--data.image_column=nope", "image_column='nope' is not a column of 'embedded'"),
    ("--data.label_column=nope", "label_column='nope' is not a column of 'embedded'"),
    ("--data.train_split=nope", "Split 'nope' not found in 'embedded'; available splits"),
    ("--data.val_split=nope", "Split 'nope' not found in 'embedded'"),
    ("--data.test_split=nope", "Split 'nope' not found in 'embedded'"),
    ("--data.val_fraction=2", "--data.val_fraction: invalid value 2.0 (must be in (0, 1))"),
    ("--data.seed=abc", "--data.seed: invalid value abc (expected int)"),
    ("--data.img_size=33", "img_size (33, 33) is not allowed: each side must be a positive"),
    ("--data.mean=[0.5,0.5]", "--data.mean: invalid value [0.5, 0.5] (expected tuple with 3"),
    ("--data.std=[0,1,1]", "--data.std: invalid value [0.0, 1.0, 1.0] (must be three values > 0)"),
    ("--data.crop_pct=0", "--data.crop_pct: invalid value 0.0 (must be in (0, 1])"),
    ("--data.interpolation=x", "--data.interpolation: invalid value x (expected one of"),
    ("--data.scale=[0.5,0.1]", "--data.scale: invalid value [0.5, 0.1] (must be [low, high]"),
    ("--data.ratio=[0,1]", "--data.ratio: invalid value [0.0, 1.0]"),
    ("--data.hflip=2", "--data.hflip: invalid value 2.0 (must be a probability"),
    ("--data.vflip=-1", "--data.vflip: invalid value -1.0"),
    ("--data.color_jitter=-1", "--data.color_jitter: invalid value -1.0 (must be >= 0"),
    ("--data.auto_augment=nope", "--data.auto_augment: invalid value nope (must be a timm policy"),
    ("--data.re_prob=2", "--data.re_prob: invalid value 2.0"),
    ("--data.re_mode=x", "--data.re_mode: invalid value x (expected one of"),
    ("--data.re_count=0", "--data.re_count: invalid value 0 (must be >= 1)"),
    ("--data.batch_size=0", "--data.batch_size: invalid value 0 (must be >= 1)"),
    ("--data.num_workers=-1", "--data.num_workers: invalid value -1 (must be >= 0"),
    ("--data.pin_memory=maybe", "--data.pin_memory: invalid value maybe"),
    (
        "--data.bad_images=x",
        "--data.bad_images: invalid value x (expected one of 'error', 'skip', 'lazy')",
    ),
    ("--data.cache_dir=<a file>", "pyproject.toml (must be a folder)"),
    ("--data.predict_source=/no/such/dir", "--data.predict_source: invalid value /no/such/dir"),
    ("--data.in_memory=maybe", "--data.in_memory: invalid value maybe"),
    (
        "--nonfinite.policy=x",
        "--nonfinite.policy: invalid value x (expected one of 'stop', 'skip')",
    ),
    ("--nonfinite.max_consecutive_skips=0", "--nonfinite.max_consecutive_skips: invalid value 0"),
    ("--ddp.timeout=0", "--ddp.timeout: invalid value 0.0 (must be > 0 seconds)"),
    ("--throughput.window_size=1", "--throughput.window_size: invalid value 1 (must be >= 2)"),
]


@pytest.mark.parametrize(("argument", "expected"), BAD_ARGUMENTS, ids=[a for a, _ in BAD_ARGUMENTS])
def test_a_bad_argument_exits_with_one_line_naming_it(argument, expected, tmp_path, capsys):
    """Each invalid model, data or run option value of BAD_ARGUMENTS, given to `lavit fit`
    => exit code 2 before training with exactly one `error: ...` line, naming the option and
    what is allowed (the expected text of the table below), no traceback
    """
    argument = argument.replace("<a file>", str(REPO / "pyproject.toml"))
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, argument))
    assert exit_info.value.code == 2
    line = error_line(capsys)
    assert expected in line, line
    assert not (tmp_path / "checkpoints").exists()


def test_every_model_and_data_switch_has_a_bad_argument_case():
    """The parameters of LaViTModule and ImageDataModule
    => each one has a case in BAD_ARGUMENTS (a new switch needs its invalid value tested)
    """
    tried = {a.split("=")[0].removeprefix("--") for a, _ in BAD_ARGUMENTS}
    for prefix, cls in (("model", LaViTModule), ("data", ImageDataModule)):
        signature = inspect.signature(cls.__init__).parameters.values()
        params = [p.name for p in list(signature)[1:] if p.kind is not p.VAR_KEYWORD]
        missing = [p for p in params if f"{prefix}.{p}" not in tried]
        assert not missing, f"no bad-value case for --{prefix}.{missing}"


@pytest.mark.slow
def test_a_bad_argument_through_the_real_entry_point(tmp_path):
    """`python -m lavit fit --model.attn_state=x` in a subprocess
    => exit code 2; stderr is exactly one line: the option, the value and the allowed ones
    """
    result = run_cli(["fit", "--model.attn_state=x"], run_env(tmp_path), timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: --model.attn_state: invalid value x (expected one of 'scores', 'probs')"
    ]


# -------------------------------------------------------------------------------- W&B network
FAKE_WANDB_KEY = "0123456789abcdef" * 2 + "deadbeef"  # 40 characters, like a real key


@contextlib.contextmanager
def fake_wandb_server(kind: str):
    """``http://127.0.0.1:<port>`` that refuses connections, accepts and never answers, answers
    every request with HTTP 401 (a rejected key), answers every request with garbage, or answers
    the first request (our probe) and then never again."""
    if kind == "refused":
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()  # nothing listens there any more
        yield f"http://127.0.0.1:{port}"
        return
    if kind == "silent":
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # connections complete in the backlog; nothing ever answers
        try:
            yield f"http://127.0.0.1:{server.getsockname()[1]}"
        finally:
            server.close()
        return
    done, answered = threading.Event(), []

    class Fake(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            answered.append(self.path)
            if kind == "stalls_after_probe" and len(answered) > 1:
                done.wait()  # the connection stays open, unanswered, until the test ends
                return
            self.send_response(401 if kind == "bad_key" else 200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            body = {
                "bad_key": b'{"errors": [{"message": "invalid api key"}]}',
                "garbage": b"<html>not the W&B API</html>",
                "stalls_after_probe": b'{"data": {"viewer": {"id": "u"}}}',
            }[kind]
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Fake)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        done.set()
        httpd.shutdown()


# kind of server => what the warning names (after a good probe: wandb.init's error, whatever
# it says), and the seconds the start may take with --wandb.init_timeout=3.
WANDB_DOWN = {
    "refused": ("cannot reach", 3 + 5),
    "silent": ("cannot reach", 3 + 5),
    "bad_key": ("rejected the API key (HTTP 401)", 3 + 5),
    "garbage": ("", 3 + 10),
    "stalls_after_probe": ("", 3 + 40),
}


@pytest.mark.parametrize(
    "kind, entry",
    [
        (
            "refused",
            "fit",
        ),  # the fast default run keeps one case; the others wait for real timeouts
        *(
            pytest.param(kind, "fit", marks=pytest.mark.slow)
            for kind in WANDB_DOWN
            if kind != "refused"
        ),
        pytest.param("garbage", "tools", marks=pytest.mark.slow),
    ],
)
def test_wandb_with_a_key_and_no_usable_server_starts_offline_in_bounded_time(
    kind, entry, tmp_path, monkeypatch, recwarn
):
    """A W&B API key in the environment and WANDB_BASE_URL at a local port that refuses
    connections, accepts and never answers, answers HTTP 401 (a rejected key), answers garbage,
    or answers the probe and then stalls; --wandb.init_timeout=3; `lavit fit`'s logger, or the
    tools' start_wandb_run (`lavit bench|analyze --wandb`)
    => an offline W&B run within init_timeout + 5 s (refused, silent, rejected: no online run is
    started, so no "run ID in use"), or once wandb.init gives up (garbage: 10 s, stalls: 40 s);
    it logs, and one warning names the reason and the `wandb sync` command for the offline run
    """
    from lavit.training.logging import WandbOptions, default_loggers, start_wandb_run

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_WANDB_KEY)
    reason, seconds = WANDB_DOWN[kind]
    with fake_wandb_server(kind) as url:
        monkeypatch.setenv("WANDB_BASE_URL", url)
        started = time.monotonic()
        if entry == "fit":
            logger = default_loggers(tmp_path, WandbOptions(init_timeout=3))[1]
            run = logger.experiment
            assert run.id == logger.version
        else:
            run = start_wandb_run(3, project="p", dir=str(tmp_path), config={"a": 1})
        elapsed = time.monotonic() - started
    try:
        run.log({"x": 1.0})
        assert run.settings.mode == "offline"
    finally:
        run.finish()
    assert elapsed < seconds, elapsed
    warned = [str(w.message) for w in recwarn if "W&B could not start online" in str(w.message)]
    assert len(warned) == 1 and reason in warned[0], warned
    assert f"wandb sync {run.settings.sync_dir}" in warned[0]


@pytest.mark.slow
def test_a_fit_with_a_key_and_an_unreachable_wandb_trains_offline_and_exits_0(tmp_path):
    """`python -m lavit fit` (W&B on, mode auto) with a W&B key and WANDB_BASE_URL at a port that
    accepts and never answers, --wandb.init_timeout=3
    => exit code 0, no traceback; the run trains (last.ckpt at step 2) and logs to an offline W&B
    run, and the output says once how to upload it (`wandb sync <offline run>`)
    """
    env = run_env(tmp_path, WANDB_API_KEY=FAKE_WANDB_KEY)
    env.pop("WANDB_MODE")
    with fake_wandb_server("silent") as url:
        env["WANDB_BASE_URL"] = url
        args = fit_args(
            tmp_path / "run", "--trainer.max_steps=2", "--wandb.init_timeout=3", wandb=True
        )
        result = run_cli(args, env, timeout=240)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "Traceback" not in output and "is in use" not in output
    assert load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert output.count("Upload the run later with: wandb sync ") == 1, output[-3000:]
    assert list((tmp_path / "wandb").rglob("offline-run-*"))


# ----------------------------------------------------------------------------------- sweeps
def test_each_sweep_agent_run_gets_its_own_run_directory(tmp_path, monkeypatch):
    """WANDB_SWEEP_ID and WANDB_RUN_ID set (as `wandb agent` does), same default_root_dir
    => the run directory is `<root>/<sweep id>/<run id>`, with the checkpoints and CSV logs in
    it and the agent's W&B run id; another run id gets another directory; without the ids the
    run directory is <root>
    """

    def built(run_id: str | None) -> LaViTCLI:
        if run_id is None:
            monkeypatch.delenv("WANDB_SWEEP_ID", raising=False)
            monkeypatch.delenv("WANDB_RUN_ID", raising=False)
        else:
            monkeypatch.setenv("WANDB_SWEEP_ID", "sw33p")
            monkeypatch.setenv("WANDB_RUN_ID", run_id)
        args = [f"--trainer.default_root_dir={tmp_path}", "--data.img_size=32", TINY_MODEL]
        return LaViTCLI(args=args, run=False)

    first, second, plain = built("run1"), built("run2"), built(None)
    run_dir = tmp_path / "sw33p" / "run1"
    assert Path(first.trainer.default_root_dir) == run_dir
    assert Path(first.trainer.checkpoint_callback.dirpath) == run_dir / "checkpoints"
    assert Path(first.trainer.loggers[0].root_dir) == run_dir
    assert first.trainer.loggers[1].version == "run1"
    assert Path(second.trainer.default_root_dir) == tmp_path / "sw33p" / "run2"
    assert Path(plain.trainer.default_root_dir) == tmp_path


# ------------------------------------------------------------------------------------ table
def test_reliability_md_is_generated_from_these_tests():
    """scripts/reliability_table.py run on the test files
    => docs/reliability.md is exactly its output (regenerate with `python scripts/reliability_table.py`)
    """
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import reliability_table
    finally:
        sys.path.remove(str(REPO / "scripts"))
    assert (REPO / "docs" / "reliability.md").read_text() == reliability_table.render()
