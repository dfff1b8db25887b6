"""Loggers: CSV always, plus Weights & Biases, which never crashes or hangs a run.

Every W&B run (``lavit fit`` through :func:`default_loggers`, ``lavit bench|analyze --wandb``
through :func:`start_wandb_run`; ``lavit sweep`` runs ``lavit fit``) starts the same way, in
:class:`FallbackWandbLogger`:

1. :func:`resolve_wandb_mode`: ``WANDB_MODE`` / ``WANDB_DISABLED`` when set, else online with an
   API key (``WANDB_API_KEY`` or ``wandb login``'s ``~/.netrc`` entry), else offline, at once.
2. Online: one authenticated request to the server (``WANDB_BASE_URL``) within the init timeout
   (:func:`wandb_unreachable`); a refused connection, a silent server or a rejected key means
   offline without starting an online run (``wandb.init`` retries a dead server for longer than
   its ``init_timeout``, and a failed online start keeps the run id busy).
3. If ``wandb.init`` fails online anyway (a server that stalls or answers garbage), W&B's
   service is torn down and the run starts offline.

Falling back says so once, with the ``wandb sync`` command that uploads the run later.
A run directory keeps its W&B run id in ``<run_dir>/wandb_run_id``: a resumed run continues it.
"""

from __future__ import annotations

import base64
import json
import netrc
import os
import re
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from lavit.training.options import PositiveSeconds

__all__ = [
    "FallbackWandbLogger",
    "WandbOptions",
    "default_loggers",
    "explicit_wandb_mode",
    "resolve_wandb_mode",
    "start_wandb_run",
    "sweep_run_dir",
    "wandb_unreachable",
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


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")


def _api_key() -> str | None:
    """The API key W&B would use: ``WANDB_API_KEY``, else the ``~/.netrc`` entry of the server."""
    if os.environ.get("WANDB_API_KEY"):
        return os.environ["WANDB_API_KEY"]
    host = urlparse(_base_url()).hostname
    try:
        entry = netrc.netrc().authenticators(host) if host else None
    except (OSError, netrc.NetrcParseError):  # no ~/.netrc, or one we cannot read
        return None
    return entry[2] if entry else None


def explicit_wandb_mode() -> Literal["online", "offline", "disabled"] | None:
    """The mode the environment asks for (``WANDB_DISABLED``, ``WANDB_MODE``), or ``None``."""
    if os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled"
    env_mode = os.environ.get("WANDB_MODE", "").lower()
    if env_mode:
        return {"dryrun": "offline", "run": "online"}.get(env_mode, env_mode)  # type: ignore[return-value]
    return None


def resolve_wandb_mode(mode: WandbMode = "auto") -> Literal["online", "offline", "disabled"]:
    """The mode W&B starts in, before the server is asked (see the module docstring)."""
    if mode != "auto":
        return mode
    return explicit_wandb_mode() or ("online" if _api_key() else "offline")


def wandb_unreachable(timeout: float) -> str | None:
    """Why an online W&B run cannot start from here, or ``None`` if the server accepts our key.

    One GraphQL ``viewer`` query with the API key, answered within ``timeout`` seconds or not.
    """
    url = f"{_base_url()}/graphql"
    auth = base64.b64encode(f"api:{_api_key() or ''}".encode()).decode()
    request = urllib.request.Request(
        url,
        data=json.dumps({"query": "query Viewer { viewer { id } }"}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Basic {auth}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return f"{url} rejected the API key (HTTP {err.code}); check WANDB_API_KEY or `wandb login`"
        return f"{url} answered HTTP {err.code}"
    except (OSError, ValueError) as err:  # refused, timed out, DNS, TLS, a malformed URL
        return f"cannot reach {url} within {timeout:g} s ({getattr(err, 'reason', err)})"
    return None


class FallbackWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that starts offline when the W&B server cannot be used.

    Without ``mode`` (an online run) the run starts by steps 2 and 3 of the module docstring.
    """

    def __init__(self, *args: Any, init_timeout: float = 30.0, **kwargs: Any) -> None:
        import wandb

        self.probe = "mode" not in kwargs
        # Our own Settings object, so the mode can be set after the probe (WANDB_MODE is read
        # only once per process).
        self.wandb_settings = wandb.Settings(init_timeout=init_timeout)
        if self.probe:
            self.wandb_settings.mode = "online"
        super().__init__(*args, settings=self.wandb_settings, **kwargs)
        self.init_timeout = init_timeout

    @property
    @rank_zero_experiment
    def experiment(self):  # noqa: D102 (documented by WandbLogger)
        import wandb

        if not self.probe:
            return super().experiment
        self.probe = False
        reason = wandb_unreachable(self.init_timeout)
        if reason is None:
            try:
                return super().experiment
            except Exception as err:  # wandb raises several types (CommError, UsageError, ...)
                reason = str(err).splitlines()[0] if str(err) else type(err).__name__
                wandb.teardown()  # its service keeps the failed run's id otherwise
        self.wandb_settings.mode = "offline"
        run = super().experiment
        sync_dir = run.settings.sync_dir
        rank_zero_warn(
            f"W&B could not start online ({reason}); logging offline instead to {sync_dir}. "
            f"Upload the run later with: wandb sync {sync_dir}"
        )
        return run


def start_wandb_run(init_timeout: float = 30.0, mode: WandbMode = "auto", **init_kwargs: Any):
    """A W&B run started as ``lavit fit``'s is, or ``None`` when W&B is disabled.

    For the tools (``lavit bench --wandb``, ``lavit analyze --wandb``); ``init_kwargs`` go to
    ``wandb.init`` (``dir``: where its files go).
    """
    resolved = resolve_wandb_mode(mode)
    if resolved == "disabled":
        return None
    save_dir = init_kwargs.pop("dir", None) or "."
    chosen = {} if resolved == "online" else {"mode": resolved}  # online: probed first
    return FallbackWandbLogger(
        save_dir=save_dir, init_timeout=init_timeout, **chosen, **init_kwargs
    ).experiment


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
