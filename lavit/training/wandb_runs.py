"""Starting W&B without crashing or hanging a run: the mode rule, a bounded probe, the fallback.

Every command that logs to W&B (``lavit fit`` through :class:`FallbackWandbLogger`,
``lavit bench --wandb`` and ``lavit analyze --wandb`` through :func:`start_wandb_run`; ``lavit
sweep`` runs ``lavit fit``) follows one rule:

1. :func:`resolve_wandb_mode`: ``WANDB_MODE`` / ``WANDB_DISABLED`` when set, else online with an
   API key (``WANDB_API_KEY`` or ``wandb login``'s ``~/.netrc`` entry), else offline, at once.
2. Online: first one authenticated request to the server (``WANDB_BASE_URL``), bounded by the
   init timeout (:func:`wandb_unreachable`). A refused connection, a server that never answers
   or a key it rejects means offline, without ever starting an online run: ``wandb.init`` itself
   retries a dead server for longer than its ``init_timeout``, and after a failed online start
   its service keeps the run id, so an offline run with the same id fails ("run ID is in use").
3. If the online start fails anyway (tools only, :func:`start_wandb_run`), W&B's service is torn
   down and the run starts offline.

Falling back says so once, with the ``wandb sync`` command that uploads the run later.
"""

from __future__ import annotations

import base64
import json
import netrc
import os
import urllib.error
import urllib.request
from typing import Any, Literal
from urllib.parse import urlparse

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn

__all__ = [
    "FallbackWandbLogger",
    "explicit_wandb_mode",
    "has_wandb_credentials",
    "resolve_wandb_mode",
    "start_wandb_run",
    "wandb_unreachable",
]

WandbMode = Literal["auto", "online", "offline", "disabled"]
DEFAULT_BASE_URL = "https://api.wandb.ai"


def _base_url() -> str:
    return os.environ.get("WANDB_BASE_URL", DEFAULT_BASE_URL).rstrip("/")


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


def has_wandb_credentials() -> bool:
    """Whether an API key is available without asking: the environment or ``~/.netrc``."""
    return _api_key() is not None


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
    explicit = explicit_wandb_mode()
    if explicit is not None:
        return explicit
    return "online" if has_wandb_credentials() else "offline"


def wandb_unreachable(timeout: float) -> str | None:
    """Why an online W&B run cannot start from here, or ``None`` if the server accepts our key.

    One GraphQL ``viewer`` query with the API key, answered within ``timeout`` seconds or not.
    """
    url = f"{_base_url()}/graphql"
    key = _api_key() or ""
    request = urllib.request.Request(
        url,
        data=json.dumps({"query": "query Viewer { viewer { id } }"}).encode(),
        headers={
            "Content-Type": "application/json",
            "Authorization": "Basic " + base64.b64encode(f"api:{key}".encode()).decode(),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            return f"{url} rejected the API key (HTTP {err.code}); check WANDB_API_KEY or `wandb login`"
        return f"{url} answered HTTP {err.code}"
    except (OSError, ValueError) as err:  # refused, timed out, DNS, TLS, a malformed URL
        reason = getattr(err, "reason", err)
        return f"cannot reach {url} within {timeout:g} s ({reason})"
    return None


def _offline_message(reason: str, run: Any) -> str:
    sync_dir = (
        getattr(getattr(run, "settings", None), "sync_dir", None) or "<run dir>/wandb/offline-run-*"
    )
    return (
        f"W&B could not start online ({reason}); logging offline instead to {sync_dir}. "
        f"Upload the run later with: wandb sync {sync_dir}"
    )


def start_wandb_run(init_timeout: float = 30.0, mode: WandbMode = "auto", **init_kwargs: Any):
    """``wandb.init(**init_kwargs)`` by the rule of the module docstring; ``None`` when disabled.

    For the tools (``lavit bench --wandb``, ``lavit analyze --wandb``).
    """
    import wandb

    resolved = resolve_wandb_mode(mode)
    if resolved == "disabled":
        return None
    reason = wandb_unreachable(init_timeout) if resolved == "online" else None
    settings = wandb.Settings(init_timeout=init_timeout)
    if resolved == "online" and reason is None:
        try:
            return wandb.init(mode="online", settings=settings, **init_kwargs)
        except Exception as err:  # wandb raises several types (CommError, UsageError, timeouts)
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            wandb.teardown()  # its service keeps the failed run's id otherwise
    run = wandb.init(mode="offline", settings=settings, **init_kwargs)
    if reason is not None:
        rank_zero_warn(_offline_message(reason, run))
    return run


class FallbackWandbLogger(WandbLogger):
    """Lightning's ``WandbLogger`` that starts offline when the W&B server cannot be used.

    Without ``mode`` (an online run) the server is probed, within ``init_timeout`` seconds, when
    the run starts; failing that, ``WANDB_MODE=offline`` for this process before ``wandb.init``.
    """

    def __init__(self, *args: Any, init_timeout: float = 30.0, **kwargs: Any) -> None:
        import wandb

        kwargs.setdefault("settings", wandb.Settings(init_timeout=init_timeout))
        super().__init__(*args, **kwargs)
        self.init_timeout, self.probe = init_timeout, "mode" not in kwargs
        self.fallback_reason: str | None = None

    @property
    @rank_zero_experiment
    def experiment(self):  # noqa: D102 (documented by WandbLogger)
        if self.probe:
            self.probe = False
            self.fallback_reason = wandb_unreachable(self.init_timeout)
            if self.fallback_reason:
                os.environ["WANDB_MODE"] = "offline"
                rank_zero_warn(_offline_message(self.fallback_reason, super().experiment))
        return super().experiment
