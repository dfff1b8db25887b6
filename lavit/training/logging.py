"""Loggers: CSV always, plus Weights & Biases online with credentials and offline without.

W&B must never block a run: with no API key (``WANDB_API_KEY`` or an ``api.wandb.ai`` entry in
``~/.netrc``) it logs offline straight away (sync later with ``wandb sync <run_dir>/wandb/...``),
an online start that fails or times out falls back to offline, and ``WANDB_MODE`` wins when set.

A run directory keeps its W&B run id in ``<run_dir>/wandb_run_id``; a resumed run (``--ckpt_path``)
continues that W&B run instead of starting a new one. Under ``wandb agent`` each run gets its own
run directory (:func:`sweep_run_dir`).

:func:`resolve_wandb_mode` is the one rule for every command that logs to W&B (``lavit fit``,
``lavit bench --wandb``); :func:`explicit_wandb_mode` is its part that the environment decides.
"""

from __future__ import annotations

import netrc
import os
import re
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

__all__ = [
    "FallbackWandbLogger",
    "WandbOptions",
    "default_loggers",
    "explicit_wandb_mode",
    "has_wandb_credentials",
    "resolve_wandb_mode",
    "sweep_run_dir",
]

WandbMode = Literal["auto", "online", "offline", "disabled"]
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
        init_timeout: seconds to wait for W&B to start before falling back to offline.
    """

    enabled: bool = True
    mode: WandbMode = "auto"
    project: str = "lavit"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 30.0


def has_wandb_credentials() -> bool:
    """Whether an API key is available without asking: the environment or ``~/.netrc``."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return bool(host and netrc.netrc().authenticators(host))
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one we cannot read
        return False


def explicit_wandb_mode() -> Literal["online", "offline", "disabled"] | None:
    """The mode the environment asks for (``WANDB_DISABLED``, ``WANDB_MODE``), or ``None``."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode:
        return {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)  # type: ignore[return-value]
    return None


def resolve_wandb_mode(mode: WandbMode = "auto") -> Literal["online", "offline", "disabled"]:
    """The mode W&B will actually run in (see :class:`WandbOptions`)."""
    if mode != "auto":
        return mode
    explicit = explicit_wandb_mode()
    if explicit is not None:
        return explicit
    return "online" if has_wandb_credentials() else "offline"


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


class FallbackWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that falls back to offline mode when an online start fails.

    Takes the same arguments as ``WandbLogger``; ``mode`` and ``settings`` go to ``wandb.init``.
    (Lightning's own ``offline=True`` sets ``WANDB_MODE`` for the whole process, hence ``mode``.)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:  # wandb warns about the unused setting
            self._wandb_init.pop("anonymous", None)

    @property
    @rank_zero_experiment
    def experiment(self):  # noqa: D102 (documented by WandbLogger)
        if self._experiment is not None or self._wandb_init.get("mode") != "online":
            return super().experiment
        try:
            return super().experiment
        except Exception as err:  # wandb raises several types (CommError, UsageError, timeouts)
            rank_zero_warn(f"W&B could not start online ({err}); logging offline instead.")
            self._experiment = None
            self._wandb_init["mode"] = "offline"
            return super().experiment


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
    import wandb as wandb_lib

    options = wandb or WandbOptions()
    run_dir = Path(run_dir)
    # One CSV version per attempt: Lightning's CSV writer would delete an existing metrics.csv.
    loggers: list[Logger] = [CSVLogger(save_dir=run_dir, name="")]
    mode = resolve_wandb_mode(options.mode)
    if options.enabled and mode != "disabled":
        save_dir = os.environ.get("WANDB_DIR") or str(run_dir)
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = dict(
            project=options.project,
            name=options.name or run_dir.resolve().name,
            save_dir=save_dir,
            id=_run_id(run_dir, resume),
            mode=mode,
            settings=wandb_lib.Settings(init_timeout=options.init_timeout),
            tags=list(options.tags) or None,
        )
        if options.entity:
            kwargs["entity"] = options.entity
        if options.group:
            kwargs["group"] = options.group
        loggers.append(FallbackWandbLogger(**kwargs))
    return loggers
