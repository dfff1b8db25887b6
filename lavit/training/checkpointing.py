"""Which checkpoints a run writes, and which one ``--ckpt_path`` means.

* :class:`RunCheckpoint`: Lightning's ``ModelCheckpoint`` with ``last.ckpt`` kept current (every
  checkpointing epoch and the end of training) and nothing saved by a ``fast_dev_run``.
* :class:`PreemptionCheckpoint`: on SIGTERM during ``fit``, saves ``last.ckpt`` (the CLI then
  exits with :data:`lavit.errors.EXIT_PREEMPTED`).
* :func:`resolve_best_checkpoint`, :func:`checkpoint_file` and :func:`check_checkpoint`: what
  ``--ckpt_path best`` / ``last`` / a file mean in a new process, and a one-line
  :class:`~lavit.errors.ConfigError` before anything runs if that file cannot be used (unreadable,
  weights only for a fit, or weights of another model).

The files themselves are written and read by :mod:`lavit.training.checkpoint_io`.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lavit.errors import CheckpointError, ConfigError
from lavit.training.checkpoint_io import load_checkpoint_file, state_dict_mismatch

__all__ = [
    "PreemptionCheckpoint",
    "RunCheckpoint",
    "check_checkpoint",
    "checkpoint_file",
    "last_good_checkpoint",
    "resolve_best_checkpoint",
]


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves nothing under ``fast_dev_run`` and keeps ``last`` current.

    Lightning 2.6 still writes ``last.ckpt`` at the end of a ``fast_dev_run``, which a later
    ``--ckpt_path last`` would then resume from. And with a monitored metric it refreshes
    ``last.ckpt`` only when a top-k checkpoint is saved (the metric improved): a run that stops
    improving would resume from its best epoch instead of its last one. Here ``last.ckpt``
    follows every checkpointing epoch, and the end of training.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.fast_dev_run:
            return
        super().on_train_end(trainer, pl_module)
        # Stopped between checkpoints (max_steps, early stopping): last.ckpt is the final state.
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def _refresh_last(self, trainer: L.Trainer) -> None:
        every = self._every_n_epochs
        if (
            self.save_last
            and every >= 1
            and (trainer.current_epoch + 1) % every == 0
            and not self._should_skip_saving_checkpoint(trainer)  # also: saved at this step
        ):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class PreemptionCheckpoint(Callback):
    """On SIGTERM during ``fit``, saves ``last.ckpt`` in the checkpoint folder (then the run stops).

    Lightning 2.6 catches SIGTERM itself (and forwards it to its DDP children): it lets the current
    batch finish, then raises ``SIGTERMException`` (a ``SystemExit``) from the loop, which reaches
    callbacks through ``on_exception`` while the loop state is consistent. Without this callback
    the process would exit with code 0 and nothing saved since the last checkpoint.
    """

    def __init__(self) -> None:
        self.saved_path: str | None = None

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        callback = trainer.checkpoint_callback
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            name = callback.CHECKPOINT_NAME_LAST + callback.FILE_EXTENSION
            previous = callback.last_model_path
            path = previous if previous else os.path.join(callback.dirpath, name)
            callback.last_model_path = path  # recorded in the checkpoint's callback state
        else:
            path = os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")
        trainer.save_checkpoint(path)
        self.saved_path = path
        if trainer.is_global_zero:
            print(
                f"SIGTERM: saved {path} at global step {trainer.global_step} "
                f"(epoch {trainer.current_epoch}); resume with --ckpt_path last",
                file=sys.stderr,
                flush=True,
            )


def last_good_checkpoint(trainer: L.Trainer) -> str:
    """``"<path> (global step N)"`` of the newest checkpoint this run saved, or a sentence saying none."""
    callback = trainer.checkpoint_callback
    paths = [getattr(callback, "last_model_path", ""), getattr(callback, "best_model_path", "")]
    existing = [p for p in paths if p and Path(p).is_file()]
    if not existing:
        return "none (no checkpoint was saved before this step)"
    path = max(existing, key=os.path.getmtime)
    try:
        step = int(load_checkpoint_file(path, mmap=True).get("global_step", -1))
    except CheckpointError:
        return path
    return f"{path} (global step {step})"


# ------------------------------------------------------------------------------- --ckpt_path
def resolve_best_checkpoint(config: Any, callback: ModelCheckpoint | None) -> None:
    """``ckpt_path: best`` in a new process → the newest ``best-*.ckpt`` of the run, in ``config``.

    Lightning only knows the best checkpoint of a fit that ran in the same process.
    """
    if config.get("ckpt_path") != "best" or callback is None or callback.best_model_path:
        return
    best = sorted(Path(callback.dirpath or "").glob("best-*.ckpt"), key=os.path.getmtime)
    if best:
        config["ckpt_path"] = str(best[-1])


def checkpoint_file(ckpt_path: Any, callback: ModelCheckpoint | None) -> str | None:
    """The local file ``--ckpt_path`` designates (``last`` resolved as Lightning does), or ``None``.

    ``None`` also for ``last`` when the run has none yet (a fresh start), ``hpc`` and remote URLs.
    """
    if ckpt_path is None or ckpt_path in ("hpc",) or "://" in str(ckpt_path):
        return None
    folder = getattr(callback, "dirpath", None)
    if ckpt_path == "best":  # not resolved by resolve_best_checkpoint: there is none
        raise ConfigError(f"--ckpt_path best: no best-*.ckpt checkpoint in {folder}")
    if ckpt_path == "last":
        last = [
            p for p in Path(folder or "").glob("last*.ckpt") if re.match(r"last(-v\d+)?$", p.stem)
        ]
        return str(max(last, key=os.path.getmtime)) if last else None
    return str(ckpt_path)


def check_checkpoint(path: str | None, model: L.LightningModule, fitting: bool) -> None:
    """A one-line :class:`ConfigError` if checkpoint ``path`` cannot be loaded into ``model``.

    Read weights-only and memory-mapped (cheap for large files). ``fitting``: it must also hold
    the optimizer and loop state a resumed fit needs.
    """
    if path is None:
        return
    try:
        checkpoint = load_checkpoint_file(path, mmap=True)
    except CheckpointError as err:
        raise ConfigError(f"--ckpt_path: {err}") from None
    if fitting and "optimizer_states" not in checkpoint:
        raise ConfigError(
            f"--ckpt_path: {path}: holds weights only (no optimizer or loop state), so it "
            "cannot resume a fit"
        )
    problem = state_dict_mismatch(model.state_dict(), checkpoint["state_dict"])
    if problem:
        trained = (checkpoint.get("hyper_parameters") or {}).get("arch")
        arch = getattr(model.hparams, "arch", None)
        origin = f" (trained as arch={trained!r}, this run builds arch={arch!r})"
        raise ConfigError(
            f"--ckpt_path: {path} does not fit this run's model{origin if trained else ''}: "
            f"{problem}; pass the config it was trained with (--config <run dir>/"
            "version_0/config.yaml)"
        )
