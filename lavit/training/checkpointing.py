"""Which checkpoints a run writes, and which one ``--ckpt_path`` means.

* :class:`LastCheckpoint`: ``last.ckpt``, kept current at every epoch's end and saved on SIGTERM
  (the CLI then exits with :data:`lavit.errors.EXIT_PREEMPTED`); the best checkpoints are a plain
  ``ModelCheckpoint`` (``--checkpoint.*``).
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
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lavit.errors import CheckpointError, ConfigError
from lavit.training.checkpoint_io import load_checkpoint_file, state_dict_mismatch

__all__ = [
    "LastCheckpoint",
    "check_checkpoint",
    "checkpoint_file",
    "last_good_checkpoint",
    "resolve_best_checkpoint",
]


class LastCheckpoint(ModelCheckpoint):
    """``last.ckpt``: rewritten at every checkpointing epoch's end, and on SIGTERM during fit.

    Lightning's ``save_last`` rewrites it only when a top-k checkpoint is saved (a run that stops
    improving would resume from its best epoch), its ``save_on_exception`` saves on any exception
    (a crash's half-done step; a NaN stop), and ``OnExceptionCheckpoint`` deletes its file when fit
    ends and makes every later fit resume from it. Hence one unmonitored file, saved on SIGTERM
    only: Lightning lets the batch finish, then raises ``SIGTERMException`` (the CLI exits 75).
    """

    def __init__(self, dirpath: str, **when: Any) -> None:
        """``when``: ``every_n_epochs``, ``every_n_train_steps``, ... as for ``ModelCheckpoint``."""
        super().__init__(
            dirpath, self.CHECKPOINT_NAME_LAST, save_top_k=1, enable_version_counter=False,
            save_on_exception=True, **when,
        )  # fmt: skip

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == TrainerFn.FITTING:
            super().on_exception(trainer, pl_module, exception)  # unless saved at this step
            if trainer.is_global_zero:
                print(
                    f"SIGTERM: saved {self.format_checkpoint_name({})} at global step "
                    f"{trainer.global_step} (epoch {trainer.current_epoch}); resume with "
                    "--ckpt_path last",
                    file=sys.stderr,
                    flush=True,
                )


def last_good_checkpoint(trainer: L.Trainer) -> str:
    """``"<path> (global step N)"`` of the newest checkpoint this run saved, or a sentence saying none."""
    callbacks = trainer.checkpoint_callbacks
    paths = [
        getattr(c, name, "") for c in callbacks for name in ("last_model_path", "best_model_path")
    ]
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
