"""``lavit`` / ``python -m lavit``: LightningCLI (fit/validate/test/predict) plus the project's tools.

    lavit fit --config experiments/base.yaml                  # train (runs/base/)
    lavit fit --config experiments/base.yaml --ckpt_path last # resume the same run
    lavit test --config experiments/base.yaml --ckpt_path best
    lavit bench ... | analyze ... | sweep ... | report ...   # non-Lightning tools (TOOL_COMMANDS)

The run directory is ``--trainer.default_root_dir``; inside it: ``checkpoints/`` (``last.ckpt``
and the best by ``val/top1``), one ``version_N/`` per attempt (config.yaml, metrics.csv,
hparams.yaml, run_info.json, attention/), ``wandb/`` and ``wandb_run_id``.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lavit.training.callbacks import AttentionMaps, RunCheckpoint, RunMetadata
from lavit.training.data import ImageDataModule
from lavit.training.logging import WandbOptions, default_loggers
from lavit.training.module import LaViTModule

__all__ = ["TOOL_COMMANDS", "ConfigError", "LaViTCLI", "main"]

# `lavit <tool> ...` → module:function(argv_after_the_tool_name), imported only when asked for.
TOOL_COMMANDS = {
    "bench": "lavit.tools.bench:main",
    "analyze": "lavit.tools.saturation:main",
    "sweep": "lavit.tools.sweep:main",
    "report": "lavit.tools.report:main",
}
DEFAULT_RUN_DIR = "runs/default"


class ConfigError(Exception):
    """A configuration value rejected when the model, data or trainer is built."""


class LaViTCLI(LightningCLI):
    """LightningCLI with the project's defaults: callbacks, run directory, CSV + W&B loggers."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module owns its optimizer
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})  # main() prints one line
        super().__init__(LaViTModule, ImageDataModule, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(WandbOptions, "wandb")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(RunMetadata, "run_metadata")
        parser.add_lightning_class_args(AttentionMaps, "attention_maps")
        parser.set_defaults(
            {
                "trainer.default_root_dir": DEFAULT_RUN_DIR,
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
                "checkpoint.save_last": True,
                # the metric name holds a "/": spell the file name out instead of auto-inserting it
                "checkpoint.filename": "best-epoch{epoch:03d}-top1{val/top1:.4f}",
                "checkpoint.auto_insert_metric_name": False,
                "lr_monitor.logging_interval": "step",
            }
        )
        # One place decides where checkpoints go, so `--ckpt_path last` finds this run's.
        parser.link_arguments(
            "trainer.default_root_dir",
            "checkpoint.dirpath",
            compute_fn=lambda run_dir: os.path.join(run_dir or DEFAULT_RUN_DIR, "checkpoints"),
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, OSError) as err:  # a bad value found by a constructor
            raise ConfigError(str(err)) from err
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunMetadata):
                callback.config = self._config_dict()

    def instantiate_trainer(self, **kwargs):
        config = self._get(self.config_init, "trainer", default={})
        if config.get("logger") in (None, True):  # not chosen in the config: CSV + W&B
            subcommand_config = self.config.get(str(self.subcommand), self.config)
            # Evaluating a run, or resuming its fit, continues the run's W&B run.
            resume = self.subcommand in ("validate", "test", "predict") or bool(
                subcommand_config.get("ckpt_path")
            )
            kwargs["logger"] = default_loggers(
                config.get("default_root_dir") or DEFAULT_RUN_DIR,
                self._get(self.config_init, "wandb"),
                resume=resume,
            )
        return super().instantiate_trainer(**kwargs)

    # `--ckpt_path best` in a new process: Lightning only knows the best checkpoint of a fit
    # that ran in the same process, so look it up in the run's checkpoint folder.
    def before_validate(self) -> None:
        self._resolve_best_checkpoint()

    def before_test(self) -> None:
        self._resolve_best_checkpoint()

    def before_predict(self) -> None:
        self._resolve_best_checkpoint()

    def _resolve_best_checkpoint(self) -> None:
        config = self.config_init[self.subcommand]
        callback = self.trainer.checkpoint_callback
        if config.get("ckpt_path") != "best" or callback is None or callback.best_model_path:
            return
        best = sorted(Path(callback.dirpath or "").glob("best-*.ckpt"), key=os.path.getmtime)
        if best:
            config["ckpt_path"] = str(best[-1])

    def _config_dict(self) -> dict:
        return _as_plain(self.config.get(str(self.subcommand), self.config))


def _as_plain(namespace) -> dict:
    """A jsonargparse Namespace as plain dicts/lists (for loggers and JSON)."""
    plain = namespace.clone().as_dict()
    plain.pop("config", None)  # the config file paths themselves
    return plain


def _call_tool(name: str, argv: list[str]) -> int | None:
    module_name, function = TOOL_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module_name), function)(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lavit`` and ``python -m lavit``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOL_COMMANDS:
        sys.exit(_call_tool(args[0], args[1:]))
    # TF32 matmuls on Ampere+ GPUs (no effect on CPU): ~free speed for fp32 parts under AMP.
    torch.set_float32_matmul_precision("high")
    try:
        LaViTCLI(args=None if argv is None else args)  # None: LightningCLI reads sys.argv
    except ArgumentError as err:
        print(f"error: {describe_parse_error(str(err))}", file=sys.stderr)
        sys.exit(2)
    except ConfigError as err:
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        sys.exit(2)


def describe_parse_error(message: str) -> str:
    """jsonargparse's multi-line type error as one line: option, given value, expected type."""
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if match is None:
        return _one_line(message)
    key, detail = match.groups()
    expected = [
        _readable_type(t)
        for t in re.findall(r"Expected a (.+?)(?:\. Got value: .*)?$", detail, re.M)
        if "NoneType" not in t
    ]
    given = re.search(r"(?:Given|Got) value: (.*)$", detail, re.M)
    if not expected or given is None:
        return f"--{key}: {_one_line(detail)}"
    return f"--{key}: invalid value {given.group(1)} (expected {' or '.join(expected)})"


def _readable_type(text: str) -> str:
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("typing.", "")
    literal = re.fullmatch(r"Literal\[(.*)\]", text)
    return f"one of {literal.group(1)}" if literal else text


def _one_line(message: str) -> str:
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else "invalid configuration"
