"""Loggers: CSV always, plus Weights & Biases online with credentials and offline without.

W&B must never block or crash a run: :mod:`lavit.training.wandb_runs` decides the mode (offline
at once without an API key, offline after a bounded probe when the server cannot be used) and
says how to upload an offline run later.

A run directory keeps its W&B run id in ``<run_dir>/wandb_run_id``; a resumed run (``--ckpt_path``)
continues that W&B run instead of starting a new one. Under ``wandb agent`` each run gets its own
run directory (:func:`sweep_run_dir`).

"""

from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only

from lavit.training.options import PositiveSeconds
from lavit.training.wandb_runs import FallbackWandbLogger, WandbMode, resolve_wandb_mode

__all__ = ["WandbOptions", "default_loggers", "sweep_run_dir"]

RUN_ID_FILE = "wandb_run_id"


@dataclass
class WandbOptions:
    """Weights & Biases settings of a run (the ``--wandb.*`` options of the CLI).

    Args:
        enabled: log to W&B at all (CSV logging happens regardless).
        mode: ``"auto"``: ``WANDB_MODE`` if set, else online with credentials and offline without.
        project: W&B project.
        entity: W&B team or user; default: the account's default entity.
        name: run name shown in W&B; default: the run directory's name.
        group: W&B run group (e.g. one per sweep or ablation).
        tags: W&B run tags.
        init_timeout: seconds to wait for the W&B server (and for W&B to start) before falling
            back to offline.
    """

    enabled: bool = True
    mode: WandbMode = "auto"
    project: str = "lavit"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: PositiveSeconds = 30.0


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


def _run_id(run_dir: Path, resume: bool) -> str:
    """The W&B run id of ``run_dir``: a sweep agent's, the stored one when resuming, or a new one."""
    path = run_dir / RUN_ID_FILE
    run_id = os.environ.get("WANDB_RUN_ID")  # set by `wandb agent`: the sweep owns the id
    if run_id is None and resume and path.is_file():
        run_id = path.read_text().strip() or None
    run_id = run_id or secrets.token_hex(4)  # W&B ids: short, [a-z0-9]
    _write_run_id(path, run_id)
    return run_id


@rank_zero_only
def _write_run_id(path: Path, run_id: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")


def default_loggers(
    run_dir: str | os.PathLike, wandb: WandbOptions | None = None, resume: bool = False
) -> list[Logger]:
    """CSV logging under ``run_dir/version_N/`` plus W&B (unless disabled) under ``run_dir/wandb``.

    Args:
        run_dir: the run directory (the Trainer's ``default_root_dir``).
        wandb: W&B settings; default :class:`WandbOptions()`.
        resume: continue the W&B run whose id is stored in ``run_dir`` (when resuming a fit, or
            evaluating a trained run), instead of starting a new one.
    """
    options = wandb or WandbOptions()
    run_dir = Path(run_dir)
    # One CSV version per attempt: Lightning's CSV writer would delete an existing metrics.csv.
    loggers: list[Logger] = [CSVLogger(save_dir=run_dir, name="")]
    mode = resolve_wandb_mode(options.mode)
    if options.enabled and mode != "disabled":
        save_dir = os.environ.get("WANDB_DIR") or str(run_dir)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        loggers.append(
            FallbackWandbLogger(
                project=options.project,
                name=options.name or run_dir.resolve().name,
                save_dir=save_dir,
                id=_run_id(run_dir, resume),
                init_timeout=options.init_timeout,
                tags=list(options.tags) or None,
                **{k: v for k, v in (("entity", options.entity), ("group", options.group)) if v},
                **({} if mode == "online" else {"mode": mode}),  # online: probed first
            )
        )
    return loggers
