"""The Lightning training loop's step time against a bare PyTorch loop: a maintainer measurement.

What Lightning costs per step, on the same model and batches: the loop of a minimal
``LightningModule`` and of the project's ``LaViTModule``, each paired step by step with a bare
loop (forward, loss, backward, AdamW, zero_grad, one ``.item()``) on a copy of the model; or,
with ``--config``, ``lavit fit`` itself (its data module, callbacks and loggers)::

    python scripts/loop_overhead.py --models lavit_tiny --steps 8
    python scripts/loop_overhead.py --config experiments/base.yaml --steps 40

Writes a Markdown table on stdout and ``loop_overhead_<device>_<dtype>.{csv,json}`` in ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lavit.models.factory import ModelSpec, create_model, parse_model_name
from lavit.tables import markdown_table, write_csv
from lavit.tools.timing import DTYPES, autocast, median
from lavit.training.module import LaViTModule

SCRIPTS = Path(__file__).resolve().parent


def loop_overhead(
    spec: ModelSpec,
    img_size: int,
    batch_size: int,
    device: torch.device,
    dtype: str,
    steps: int,
    warmup: int,
) -> list[dict[str, Any]]:
    """Step time of a Lightning training loop against a bare PyTorch loop, paired step by step.

    Lightning trains the model (a minimal ``LightningModule``, then the project's
    ``LaViTModule``) on in-memory batches (a ``TensorDataset``); after each of its steps a
    callback runs one bare step (forward, loss, backward, AdamW, zero_grad, one ``.item()``) of
    a copy of the model on the same batch, alternately at the start and at the end of the
    batch. A Lightning step is the time between the starts of consecutive batches minus the
    bare step run in between, so data fetching, hooks and logging count. ``overhead_pct`` is the
    median over steps of Lightning ÷ bare, minus one; the first ``warmup`` pairs are dropped.
    """
    torch.manual_seed(0)
    num_classes = 1000
    images = torch.randn(batch_size * steps, 3, img_size, img_size)
    labels = torch.randint(0, num_classes, (batch_size * steps,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=batch_size, drop_last=True)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[dtype]

    class MinimalModule(L.LightningModule):
        """The least a LightningModule needs: forward, loss, optimizer (and a logged loss)."""

        def __init__(self, model: nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.model(x), y)
            self.log("train/loss", loss)
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def minimal_module() -> L.LightningModule:
        return MinimalModule(create_model(spec, num_classes, img_size))

    def project_module() -> L.LightningModule:
        return LaViTModule(
            arch=spec.label,
            num_classes=num_classes,
            img_size=img_size if spec.is_lavit else None,
            drop_path_rate=0.0,
            label_smoothing=0.0,
            warmup_epochs=0.0,
            scale_lr_by_batch=False,
        )

    rows = []
    for name, make in (
        ("minimal LightningModule", minimal_module),
        ("LaViTModule", project_module),
    ):
        module = make()
        timer = PairedBareSteps(dtype=dtype)
        trainer = L.Trainer(
            accelerator=device.type,
            devices=1,
            max_steps=steps,
            precision=precision,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[timer],
        )
        trainer.fit(module, train_dataloaders=loader)
        rows.append({"model": spec.label, "loop": name, **timer.summary(warmup)})
    return rows


class PairedBareSteps(L.Callback):
    """Times Lightning's training steps and, inside each, a bare step of a copy of the model.

    The bare step (forward, cross-entropy, backward, AdamW, zero_grad, one ``.item()``) runs on
    the batch Lightning just received (after transfer and ``on_after_batch_transfer``), right
    after the batch starts on even batches and right before it ends on odd ones: whichever
    position is favoured (caches, the other model's gradients still in memory) favours both
    loops alike over the median. A Lightning step is the interval between the starts of
    consecutive batches minus the bare step run inside it, so data loading, hooks, logging and
    callbacks count.

    Attach it to a real run to measure ``lavit fit`` itself::

        PYTHONPATH=scripts lavit fit --config experiments/base.yaml --trainer.max_steps=40 \
            --trainer.callbacks+=loop_overhead.PairedBareSteps \
            --trainer.callbacks.output=overhead.json

    Args:
        dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast for the bare step; default: from
            the trainer's precision.
        warmup: first step pairs left out of the summary.
        output: a JSON file for :meth:`summary` at the end of training.
    """

    def __init__(self, dtype: str | None = None, warmup: int = 2, output: str | None = None):
        self.dtype, self.warmup, self.output = dtype, warmup, output
        self.lightning: list[float] = []
        self.bare: list[float] = []
        self.start: float | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self.device = pl_module.device
        if self.dtype is None:
            precision = str(trainer.precision)
            self.dtype = "bf16" if "bf16" in precision else "fp16" if "16" in precision else "fp32"
        self.model = copy.deepcopy(pl_module.model).to(self.device).train()
        self.model_name = str(pl_module.hparams.get("arch", type(self.model).__name__))
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = time.perf_counter()
        if self.start is not None:  # the interval held one bare step: take it out
            self.lightning.append(now - self.start - self.bare[-1])
        self.start = now
        if batch_idx % 2 == 0:
            self.bare_step(batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx % 2 == 1:
            self.bare_step(batch)

    def bare_step(self, batch) -> None:
        start = time.perf_counter()
        x, y = (t.to(self.device) for t in batch[:2])
        with autocast(self.device, self.dtype):
            loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        loss.item()  # what logging a loss costs: one sync
        self.bare.append(time.perf_counter() - start)

    def summary(self, warmup: int | None = None) -> dict[str, Any]:
        """Median Lightning and bare step times (ms) and the overhead in percent."""
        warmup = self.warmup if warmup is None else warmup
        lightning, bare = self.lightning[warmup:], self.bare[warmup : len(self.lightning)]
        if not lightning:
            raise ValueError(f"no step pairs after {warmup} warm-up pairs: train more steps")
        ratios = [a / b for a, b in zip(lightning, bare, strict=True)]
        return {
            "steps": len(lightning),
            "lightning_step_ms": median(lightning) * 1e3,
            "bare_step_ms": median(bare) * 1e3,
            "overhead_pct": (median(ratios) - 1) * 100,
        }

    def on_train_end(self, trainer, pl_module) -> None:
        if self.output and trainer.is_global_zero:
            summary = {"model": self.model_name, "dtype": self.dtype, **self.summary()}
            Path(self.output).write_text(json.dumps(summary, indent=2))


def fit_overhead(config: str, steps: int, warmup: int) -> dict[str, Any]:
    """``lavit fit --config <config>`` itself, ``steps`` steps, with :class:`PairedBareSteps`.

    The run is the real command in a child process (its data module, callbacks and loggers as
    configured), in a temporary run directory, stopped after ``steps`` training steps; keep
    ``steps`` within one epoch so that no validation falls inside a timed step.
    """
    with tempfile.TemporaryDirectory(prefix="lavit-loop-") as run_dir:
        output = Path(run_dir) / "overhead.json"
        command = [
            sys.executable,
            "-m",
            "lavit",
            "fit",
            "--config",
            config,
            f"--trainer.max_steps={steps}",
            f"--trainer.default_root_dir={run_dir}",
            "--trainer.enable_progress_bar=false",  # a child's bar would garble the bench output
            "--saturation.num_images=0",
            "--trainer.callbacks+=loop_overhead.PairedBareSteps",
            f"--trainer.callbacks.warmup={warmup}",
            f"--trainer.callbacks.output={output}",
        ]
        path = os.pathsep.join(filter(None, [str(SCRIPTS), os.environ.get("PYTHONPATH")]))
        env = {**os.environ, "PYTHONPATH": path}  # this file, for the callback's class_path
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0 or not output.exists():
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise RuntimeError(
                f"lavit fit --config {config} failed (exit {done.returncode}):\n{tail}"
            )
        summary = json.loads(output.read_text())
    return {"model": summary.pop("model"), "loop": f"lavit fit --config {config}", **summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["lavit_tiny"], help="timm model names")
    parser.add_argument("--config", help="time `lavit fit --config YAML` itself instead")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--steps", type=int, default=8, help="batches per loop run (≥ 2)")
    parser.add_argument("--warmup", type=int, default=2, help="first step pairs left out")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be ≥ 2 (a step is the interval between two batches)")
    if args.config and not Path(args.config).is_file():
        parser.error(f"--config: no such file {args.config!r}")
    warmup = min(args.warmup, args.steps - 2)
    if args.config:
        rows = [fit_overhead(args.config, args.steps, warmup)]
    else:
        device = torch.device(args.device)
        rows = [
            row
            for name in args.models
            for row in loop_overhead(
                parse_model_name(name), args.img_size, args.batch_size, device, args.dtype,
                args.steps, warmup,
            )
        ]  # fmt: skip
    print(markdown_table(rows))
    stem = args.out / f"loop_overhead_{args.device}_{args.dtype}"
    write_csv(stem.with_suffix(".csv"), rows)
    stem.with_suffix(".json").write_text(
        json.dumps({"argv": argv or sys.argv[1:], "rows": rows}, indent=2)
    )
    print(f"wrote {stem}.csv and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
