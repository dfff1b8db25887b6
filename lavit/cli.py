"""``lavit`` / ``python -m lavit``: LightningCLI (fit/validate/test/predict) plus the project's tools.

    lavit fit --config experiments/base.yaml                  # train (runs/base/)
    lavit fit --config experiments/base.yaml --ckpt_path last # resume the same run
    lavit test --config experiments/base.yaml --ckpt_path best
    lavit bench ... | analyze ... | sweep ... | report ...   # non-Lightning tools (TOOL_COMMANDS)

The run directory is ``--trainer.default_root_dir``; inside it: ``checkpoints/`` (``last.ckpt``
and the best by ``val/top1``), one ``version_N/`` per attempt (config.yaml, metrics.csv,
hparams.yaml, run_info.json, attention/), ``wandb/`` and ``wandb_run_id``; under ``wandb agent``
it is ``<default_root_dir>/<sweep id>/<run id>``.

Exit codes: 0 done; 2 a bad option, data or checkpoint (one ``error:`` line, before training);
3 a non-finite loss stopped training; 75 pre-empted by SIGTERM (``last.ckpt`` saved, resume with
``--ckpt_path last``); 1 anything else. See RELIABILITY.md.
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
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lavit.runtime import tune_cpu_runtime
from lavit.training.callbacks import AttentionMaps, RunCheckpoint, RunMetadata
from lavit.training.checkpoint_io import (
    AtomicCheckpointIO,
    CheckpointError,
    load_checkpoint_file,
    state_dict_mismatch,
)
from lavit.training.checks import check_config, linked_option_in_arguments, secret_in_arguments
from lavit.training.data import ImageDataModule
from lavit.training.faults import (
    EXIT_CONFIG_ERROR,
    EXIT_DIVERGED,
    EXIT_PREEMPTED,
    DDPOptions,
    NonFiniteGuard,
    NonFiniteLossError,
    PreemptionCheckpoint,
    StopOtherRanks,
    ddp_strategy,
    distributed_failure,
    fault_injection_callbacks,
)
from lavit.training.logging import WandbOptions, default_loggers
from lavit.training.module import LaViTModule
from lavit.training.pretrained import apply_pretrained_data_config
from lavit.training.saturation_callback import AttentionSaturation

__all__ = ["TOOL_COMMANDS", "ConfigError", "DataError", "LaViTCLI", "main", "sweep_run_dir"]

# `lavit <tool> ...` → module:function(argv_after_the_tool_name), imported only when asked for.
TOOL_COMMANDS = {
    "bench": "lavit.tools.bench:main",
    "analyze": "lavit.tools.saturation:main",
    "sweep": "lavit.tools.sweep:main",
    "report": "lavit.tools.report:main",
    "export": "lavit.tools.export:main",
}
DEFAULT_RUN_DIR = "runs/default"


class ConfigError(Exception):
    """A configuration value rejected when the model, data or trainer is built."""


class DataError(ConfigError):
    """The data cannot be loaded as configured (the message may list files, one per line)."""


def sweep_run_dir(run_dir: str) -> str:
    """``<run_dir>/<sweep id>/<run id>`` under a ``wandb agent`` (both ids in the environment).

    Every run of a sweep gets the same ``--trainer.default_root_dir``; without this they would
    overwrite each other's ``last.ckpt`` and logs.
    """
    sweep_id, run_id = os.environ.get("WANDB_SWEEP_ID"), os.environ.get("WANDB_RUN_ID")
    if not (sweep_id and run_id):
        return run_dir
    parts = [re.sub(r"[^\w.-]", "_", part).strip(".") or "_" for part in (sweep_id, run_id)]
    if list(Path(run_dir).parts[-2:]) == parts:  # already this run's directory
        return run_dir
    return os.path.join(run_dir, *parts)


class LaViTCLI(LightningCLI):
    """LightningCLI with the project's defaults: callbacks, run directory, CSV + W&B loggers."""

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module owns its optimizer
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})  # main() prints one line
        # Always on: save last.ckpt on SIGTERM, stop the other DDP ranks when this one fails;
        # test-only faults when LAVIT_FAULT_INJECT is set.
        defaults = dict(kwargs.pop("trainer_defaults", None) or {})
        callbacks = defaults.get("callbacks") or []
        callbacks = list(callbacks) if isinstance(callbacks, (list, tuple)) else [callbacks]
        defaults["callbacks"] = [
            *callbacks,
            PreemptionCheckpoint(),
            StopOtherRanks(),
            *fault_injection_callbacks(),
        ]
        kwargs["trainer_defaults"] = defaults
        super().__init__(LaViTModule, ImageDataModule, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(WandbOptions, "wandb")
        parser.add_lightning_class_args(RunCheckpoint, "checkpoint")
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(RunMetadata, "run_metadata")
        parser.add_lightning_class_args(AttentionMaps, "attention_maps")
        parser.add_lightning_class_args(AttentionSaturation, "saturation")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_class_arguments(DDPOptions, "ddp")
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

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config)
        run_dir = config.trainer.default_root_dir or DEFAULT_RUN_DIR
        if sweep_run_dir(run_dir) != run_dir:  # under `wandb agent`: one directory per run
            config.trainer.default_root_dir = sweep_run_dir(run_dir)
            config.checkpoint.dirpath = os.path.join(config.trainer.default_root_dir, "checkpoints")
        try:
            check_config(config)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        apply_pretrained_data_config(config)  # data defaults follow pretrained weights' config

    def _parse_ckpt_path(self) -> None:
        """Leave the model to the config: the checkpoint must fit it (checked before running).

        LightningCLI 2.6 instead rebuilds the model from the hyper-parameters stored in a
        ``--ckpt_path`` *file* (not ``last``/``best``), silently overriding the command line (a
        lower ``--model.lr`` to resume a diverged run would be ignored), and loads the whole file
        before any check. Here a checkpoint that does not fit the configured model is an error.
        """

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
        # Atomic, NaN-refusing, weights-only checkpoint files, unless a CheckpointIO is given or
        # the strategy writes sharded checkpoints its own way.
        plugins = config.get("plugins")
        plugins = (
            [] if plugins is None else list(plugins) if isinstance(plugins, list) else [plugins]
        )
        strategy = config.get("strategy")
        sharded = isinstance(strategy, str) and any(
            name in strategy for name in ("fsdp", "deepspeed", "xla")
        )
        if not sharded and not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        ddp = ddp_strategy(strategy, self._get(self.config_init, "ddp").timeout)
        if ddp is not None:  # a DDP strategy by name: with the --ddp.timeout on collectives
            kwargs["strategy"] = ddp
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

    # Data and checkpoint problems are reported before Lightning starts (one line, exit code 2).
    def before_fit(self) -> None:
        self._check_data()
        self._check_checkpoint()

    # `--ckpt_path best` in a new process: Lightning only knows the best checkpoint of a fit
    # that ran in the same process, so look it up in the run's checkpoint folder.
    def _before_evaluation(self) -> None:
        self._resolve_best_checkpoint()
        self._check_data()
        self._check_checkpoint()

    before_validate = before_test = before_predict = _before_evaluation

    def _check_data(self) -> None:
        """Load the data now (what Lightning's prepare_data would do), to report errors cleanly.

        Local rank 0 only, as Lightning's ``prepare_data``: the other ranks load in ``setup``.
        """
        if self.datamodule is None or self.trainer.local_rank != 0:
            return
        try:
            self.datamodule.prepare_data()
        except (ValueError, OSError) as err:
            raise DataError(str(err)) from None

    def _checkpoint_file(self) -> str | None:
        """The file ``--ckpt_path`` designates (``last`` resolved as Lightning does), or ``None``."""
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        callback = self.trainer.checkpoint_callback
        if ckpt_path is None or ckpt_path in ("hpc",) or "://" in str(ckpt_path):
            return None
        if ckpt_path == "best":  # not resolved by _resolve_best_checkpoint: there is none
            folder = getattr(callback, "dirpath", None)
            raise ConfigError(f"--ckpt_path best: no best-*.ckpt checkpoint in {folder}")
        if ckpt_path == "last":
            folder = Path(getattr(callback, "dirpath", None) or "")
            last = [p for p in folder.glob("last*.ckpt") if re.match(r"last(-v\d+)?$", p.stem)]
            return str(max(last, key=os.path.getmtime)) if last else None  # none: a fresh start
        return str(ckpt_path)

    def _check_checkpoint(self) -> None:
        """A one-line error for a checkpoint that cannot be loaded or does not fit the model."""
        path = self._checkpoint_file()
        if path is None:
            return
        try:
            checkpoint = load_checkpoint_file(path, mmap=True)  # weights-only; cheap to inspect
        except CheckpointError as err:
            raise ConfigError(f"--ckpt_path: {err}") from None
        if self.subcommand == "fit" and "optimizer_states" not in checkpoint:
            raise ConfigError(
                f"--ckpt_path: {path}: holds weights only (no optimizer or loop state), so it "
                "cannot resume a fit"
            )
        problem = state_dict_mismatch(self.model.state_dict(), checkpoint["state_dict"])
        if problem:
            trained = (checkpoint.get("hyper_parameters") or {}).get("arch")
            arch = getattr(self.model.hparams, "arch", None)
            origin = f" (trained as arch={trained!r}, this run builds arch={arch!r})"
            raise ConfigError(
                f"--ckpt_path: {path} does not fit this run's model{origin if trained else ''}: "
                f"{problem}; pass the config it was trained with (--config <run dir>/"
                "version_0/config.yaml)"
            )

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
    # Before parsing: jsonargparse would echo a token back in its error message.
    problem = secret_in_arguments(args) or linked_option_in_arguments(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    # TF32 matmuls on Ampere+ GPUs (no effect on CPU): ~free speed for fp32 parts under AMP.
    torch.set_float32_matmul_precision("high")
    tune_cpu_runtime()  # reuse freed memory, flush denormals (LAVIT_CPU_TUNING=0: off)
    try:
        LaViTCLI(args=None if argv is None else args)  # None: LightningCLI reads sys.argv
    except SIGTERMException:  # pre-empted: PreemptionCheckpoint saved last.ckpt
        sys.exit(EXIT_PREEMPTED)
    except ArgumentError as err:
        print(f"error: {describe_parse_error(str(err))}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except DataError as err:  # may list bad files, one per line
        print(f"error: {str(err).strip()}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except (ConfigError, CheckpointError) as err:
        print(f"error: {_one_line(str(err))}", file=sys.stderr)
        sys.exit(EXIT_CONFIG_ERROR)
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_DIVERGED)
    except RuntimeError as err:
        failure = distributed_failure(err)  # a traceback into the collective would tell nothing
        if failure is None:
            raise
        print(f"error: {failure}", file=sys.stderr)
        sys.exit(1)


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
