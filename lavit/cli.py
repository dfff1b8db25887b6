"""``lavit`` / ``python -m lavit``: LightningCLI (fit/validate/test/predict) plus the project's tools.

    lavit fit --config experiments/base.yaml                  # train (runs/base/)
    lavit fit --config experiments/base.yaml --ckpt_path last # resume the same run
    lavit test --config experiments/base.yaml --ckpt_path best
    lavit bench ... | analyze ... | sweep ... | report ...   # non-Lightning tools (TOOL_COMMANDS)

The run directory is ``--trainer.default_root_dir``: ``checkpoints/`` (``last.ckpt``, the best by
``val/top1``), one ``version_N/`` per attempt (config.yaml, metrics.csv, hparams.yaml,
run_info.json, attention/), ``wandb/`` and ``wandb_run_id``. Exit codes: :mod:`lavit.errors`.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from collections.abc import Sequence

import torch
import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lavit.errors import (
    EXIT_CONFIG_ERROR,
    EXIT_FAILURE,
    EXIT_PREEMPTED,
    CheckpointError,
    ConfigError,
    DataError,
    DiskFullError,
    NonFiniteLossError,
    OptionError,
    one_line,
)
from lavit.runtime import tune_cpu_runtime
from lavit.training.callbacks import AttentionMaps, RunMetadata
from lavit.training.checkpoint_io import AtomicCheckpointIO
from lavit.training.checkpointing import (
    LastCheckpoint,
    check_checkpoint,
    checkpoint_file,
    resolve_best_checkpoint,
)
from lavit.training.data import ImageDataModule, too_few_batches
from lavit.training.distributed import DDPOptions, StopOtherRanks, ddp_strategy, distributed_failure
from lavit.training.guards import NonFiniteGuard
from lavit.training.logging import WandbOptions, default_loggers, sweep_run_dir
from lavit.training.module import LaViTModule, add_model_arguments
from lavit.training.options import PositiveInt, describe_parse_error, plain
from lavit.training.predictions import PredictionWriter
from lavit.training.pretrained import apply_pretrained_data_config
from lavit.training.progress import Throughput
from lavit.training.saturation_callback import AttentionSaturation
from lavit.training.secrets import config_files, secret_in_arguments

__all__ = ["TOOL_COMMANDS", "DenseCLI", "LaViTCLI", "main", "names_task_classes"]

# `lavit <tool> ...` → module:function(argv_after_the_tool_name), imported only when asked for.
TOOL_COMMANDS = {
    "bench": "lavit.tools.bench:main",
    "analyze": "lavit.tools.analyze:main",
    "sweep": "lavit.tools.sweep:main",
    "report": "lavit.tools.report:main",
    "export": "lavit.tools.export:main",
}
DEFAULT_RUN_DIR = "runs/default"
# Options the CLI derives from others (the links below): naming them is an error.
LINKED_OPTIONS = {
    "model.img_size": "it is set from --data.img_size; set that instead",
    "model.num_classes": "it is set from the data (its number of classes)",
    "checkpoint.dirpath": "it is <--trainer.default_root_dir>/checkpoints; set the run directory",
}


class LaViTCLI(LightningCLI):
    """LightningCLI with the project's defaults: callbacks, run directory, CSV + W&B loggers."""

    def __init__(
        self,
        args: Sequence[str] | None = None,
        run: bool = True,
        model_class=LaViTModule,
        datamodule_class=ImageDataModule,
        **kwargs,
    ) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)  # the module owns its optimizer
        kwargs.setdefault("parser_kwargs", {"exit_on_error": False})  # main() prints one line
        # Always on: stop the other DDP ranks when this one fails.
        kwargs.setdefault("trainer_defaults", {"callbacks": [StopOtherRanks()]})
        super().__init__(model_class, datamodule_class, args=args, run=run, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_class_arguments(WandbOptions, "wandb")
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")  # the best; LastCheckpoint
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.add_lightning_class_args(RunMetadata, "run_metadata")
        parser.add_lightning_class_args(AttentionMaps, "attention_maps")
        parser.add_lightning_class_args(AttentionSaturation, "saturation")
        parser.add_lightning_class_args(NonFiniteGuard, "nonfinite")
        parser.add_lightning_class_args(Throughput, "throughput")  # img/s, FLOP/s, ETA
        # Plain options, not a class group: `predict` is the name of the subcommand's own group.
        parser.add_argument(
            "--predict.output",
            type=str | None,
            default=None,
            help="lavit predict: the CSV file to write (default: predictions.csv in the run's "
            "version folder)",
        )
        parser.add_argument(
            "--predict.top_k",
            type=PositiveInt,
            default=5,
            help="lavit predict: how many of the most probable classes each row lists",
        )
        parser.add_class_arguments(DDPOptions, "ddp")
        parser.set_defaults(
            {
                "trainer.default_root_dir": DEFAULT_RUN_DIR,
                "checkpoint.monitor": "val/top1",
                "checkpoint.mode": "max",
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
        self._add_task_arguments(parser)

    def _add_task_arguments(self, parser: LightningArgumentParser) -> None:
        add_model_arguments(parser)  # h2-module: --model.num_va_layers, ... from LaViT's signature
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.img_size", "model.img_size")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        """The config decides the model: a ``--ckpt_path`` file must fit it (checked before running).

        LightningCLI rebuilds the model from the hyper-parameters stored in a ``--ckpt_path`` file
        right after parsing, over the command line (a lower ``--model.lr`` to resume a diverged run
        would be ignored): the path is held back until :meth:`before_instantiate_classes`.
        """
        super().parse_arguments(parser, args)
        config = self.config.get(str(self.config.get("subcommand")))
        self.held_ckpt_path = config.get("ckpt_path") if config is not None else None
        if self.held_ckpt_path is not None:
            config.ckpt_path = None

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        if self.held_ckpt_path is not None:
            config.ckpt_path = self.held_ckpt_path
        run_dir = config.trainer.default_root_dir or DEFAULT_RUN_DIR
        if sweep_run_dir(run_dir) != run_dir:  # under `wandb agent`: one directory per run
            config.trainer.default_root_dir = sweep_run_dir(run_dir)
            config.checkpoint.dirpath = os.path.join(config.trainer.default_root_dir, "checkpoints")
        # The range-checked values as builtins: they end up in checkpoints (read weights-only).
        for group in ("model", "data", "nonfinite", "saturation", "ddp"):
            section = config.get(group)
            section = section.get("init_args", section) if section is not None else None
            for key, value in vars(section or Namespace()).items():
                section[key] = plain(value)
        apply_pretrained_data_config(config)  # data defaults follow pretrained weights' config

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except OptionError as err:  # the constructor names the argument, not its group
            raise ConfigError(f"--{self._option_group(err.option, err.value)}{err}") from None
        except (ValueError, TypeError, OSError) as err:  # a bad value found by a constructor
            raise ConfigError(str(err)) from err
        for callback in self.trainer.callbacks:
            if isinstance(callback, RunMetadata):
                callback.config = _as_plain(self._subcommand_config())

    def instantiate_trainer(self, **kwargs):
        config = self._init("trainer")
        # Atomic, NaN-refusing, weights-only checkpoint files, unless a CheckpointIO is given or
        # the strategy writes sharded checkpoints its own way.
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        strategy = config.get("strategy")
        sharded = isinstance(strategy, str) and any(
            name in strategy for name in ("fsdp", "deepspeed", "xla")
        )
        if not sharded and not any(isinstance(p, CheckpointIO) for p in plugins):
            kwargs["plugins"] = [*plugins, AtomicCheckpointIO()]
        ddp = ddp_strategy(strategy, self._init("ddp").timeout)
        if ddp is not None:  # a DDP strategy by name: with the --ddp.timeout on collectives
            kwargs["strategy"] = ddp
        if config.get("logger") in (None, True):  # not chosen in the config: CSV + W&B
            # Evaluating a run, or resuming its fit, continues the run's W&B run.
            resume = self.subcommand in ("validate", "test", "predict") or bool(
                self._subcommand_config().get("ckpt_path")
            )
            kwargs["logger"] = default_loggers(
                config.get("default_root_dir") or DEFAULT_RUN_DIR,
                self._init("wandb"),
                resume=resume,
            )
        trainer = super().instantiate_trainer(**kwargs)
        if trainer.checkpoint_callback is not None:  # last.ckpt beside the best, as often
            when = ("every_n_epochs", "every_n_train_steps", "train_time_interval")
            options = self._subcommand_config().checkpoint
            when = {name: options.get(name) for name in (*when, "save_on_train_epoch_end")}
            trainer.callbacks.append(LastCheckpoint(trainer.checkpoint_callback.dirpath, **when))
        if isinstance(self.model, LaViTModule):  # classification: predictions.csv
            options = self._init("predict")
            trainer.callbacks.append(PredictionWriter(options.output, int(options.top_k)))
        return trainer

    def before_fit(self) -> None:
        """Data and checkpoint problems: one line and exit code 2 before Lightning starts.

        The data is loaded now (what Lightning's ``prepare_data`` would do, on local rank 0 only).
        """
        if self.subcommand != "fit":
            resolve_best_checkpoint(
                self.config_init[self.subcommand], self.trainer.checkpoint_callback
            )
        if self.datamodule is not None and self.trainer.local_rank == 0:
            try:
                self.datamodule.prepare_data()
                problem = (
                    too_few_batches(self.datamodule, self.trainer, str(self.subcommand))
                    if isinstance(self.datamodule, ImageDataModule)
                    else None
                )
            except (ValueError, OSError) as err:
                raise DataError(str(err)) from None
            if problem:
                raise ConfigError(problem)
        ckpt_path = self.config_init[self.subcommand].get("ckpt_path")
        path = checkpoint_file(ckpt_path, self.trainer.checkpoint_callback)
        check_checkpoint(path, self.model, fitting=self.subcommand == "fit")

    before_validate = before_test = before_predict = before_fit

    def _subcommand_config(self):
        return self.config.get(str(self.subcommand), self.config)

    def _init(self, group: str):
        """The instantiated config's ``group`` (of the subcommand, if any)."""
        return self.config_init.get(str(self.subcommand), self.config_init).get(group)

    def _option_group(self, option: str, value: object) -> str:
        """``"data."`` if the data group holds ``option`` with ``value`` (likewise the others)."""
        config = self._subcommand_config()
        for group in ("model", "data", *vars(config)):
            section = config.get(group)
            if isinstance(section, Namespace) and option in section and section[option] == value:
                return f"{group}."
        return ""


class DenseCLI(LaViTCLI):
    """The same CLI for the dense tasks: model and data classes named by ``class_path``.

    ``model: {class_path: lavit.dense.RetinaNetModule, init_args: {...}}`` with a
    ``lavit.dense.DetectionDataModule`` (or ``SemanticFPNModule`` with a
    ``SegmentationDataModule``); the data's classes and input size are linked to the model, and
    the best checkpoint follows the model's ``MONITOR`` metric unless the config names another.
    """

    def __init__(self, args: Sequence[str] | None = None, run: bool = True, **kwargs) -> None:
        from lavit.dense.data import DenseDataModule
        from lavit.dense.task import DenseTaskModule

        kwargs.update(subclass_mode_model=True, subclass_mode_data=True)
        super().__init__(args, run, DenseTaskModule, DenseDataModule, **kwargs)

    def _add_task_arguments(self, parser: LightningArgumentParser) -> None:
        # No attention figures or saturation table: they read classification models.
        parser.set_defaults({"attention_maps.num_images": 0, "saturation.num_images": 0})
        parser.link_arguments(
            "data.num_classes", "model.init_args.num_classes", apply_on="instantiate"
        )
        parser.link_arguments("data.input_size", "model.init_args.img_size", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self._subcommand_config()
        model_class = _import_class(config.model.class_path)
        monitor = getattr(model_class, "MONITOR", None)
        if monitor and config.checkpoint.monitor == "val/top1":  # the classification default
            name = monitor.split("/")[-1]
            config.checkpoint.monitor = monitor
            config.checkpoint.filename = f"best-epoch{{epoch:03d}}-{name}{{{monitor}:.4f}}"
        super().before_instantiate_classes()

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ConfigError as err:  # jsonargparse wraps a subclass constructor's error
            causes = [c for c in re.findall(r"^\s+- (.+)$", str(err), re.M) if "NoneType" not in c]
            raise ConfigError(causes[0] if causes else str(err)) from err


def _import_class(path: str):
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def names_task_classes(args: Sequence[str]) -> bool:
    """Whether the command line (or a ``--config`` file) names the model class by ``class_path``.

    Such a run is a dense task (:class:`DenseCLI`); classification configs give the
    ``LaViTModule`` arguments directly.
    """
    if any(a == "--model" or a.startswith(("--model=", "--model.class_path")) for a in args):
        return True
    for path in config_files(args):
        try:
            model = (yaml.safe_load(path.read_text()) or {}).get("model")
        except (OSError, yaml.YAMLError, AttributeError):
            continue  # jsonargparse reports it
        if isinstance(model, str) or (isinstance(model, dict) and "class_path" in model):
            return True
    return False


def _as_plain(namespace) -> dict:
    """A jsonargparse Namespace as plain dicts/lists (for loggers and JSON)."""
    config = namespace.clone().as_dict()
    config.pop("config", None)  # the config file paths themselves
    return config


def linked_option_in_arguments(args: Sequence[str]) -> str | None:
    """A one-line error if an option the CLI derives from another one is given."""
    for arg in args:
        option = arg.partition("=")[0]
        if option.startswith("--") and option[2:] in LINKED_OPTIONS:
            return f"{option}: cannot be given: {LINKED_OPTIONS[option[2:]]}"
    return None


def _call_tool(name: str, argv: list[str]) -> int | None:
    module_name, function = TOOL_COMMANDS[name].split(":")
    return getattr(importlib.import_module(module_name), function)(argv)


def _fail(message: str, code: int) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``lavit`` and ``python -m lavit``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in TOOL_COMMANDS:
        sys.exit(_call_tool(args[0], args[1:]))
    # Before parsing: jsonargparse would echo a token back in its error message.
    problem = secret_in_arguments(args) or linked_option_in_arguments(args)
    if problem:
        _fail(problem, EXIT_CONFIG_ERROR)
    # TF32 matmuls on Ampere+ GPUs (no effect on CPU): ~free speed for fp32 parts under AMP.
    torch.set_float32_matmul_precision("high")
    tune_cpu_runtime()  # reuse freed memory, flush denormals (LAVIT_CPU_TUNING=0: off)
    try:
        cli_class = DenseCLI if names_task_classes(args) else LaViTCLI
        cli_class(args=None if argv is None else args)  # None: LightningCLI reads sys.argv
    except SIGTERMException:  # pre-empted: LastCheckpoint saved last.ckpt
        sys.exit(EXIT_PREEMPTED)
    except ArgumentError as err:
        _fail(describe_parse_error(str(err), args), EXIT_CONFIG_ERROR)
    except (ConfigError, CheckpointError, DiskFullError, NonFiniteLossError) as err:
        # a DataError may list bad files, one per line
        message = str(err).strip() if isinstance(err, DataError) else one_line(str(err))
        _fail(message, err.exit_code)
    except RuntimeError as err:
        failure = distributed_failure(err)  # a traceback into the collective would tell nothing
        if failure is None:
            raise
        _fail(failure, EXIT_FAILURE)
