"""Credentials never reach a file: refused on the command line, redacted from logged configs.

* :func:`secret_in_arguments`: a token or API key given as an option, inside a config file or as
  the value of any argument is refused (it would end up in ``config.yaml``, checkpoints, W&B and
  logs); credentials come from the environment (``HF_TOKEN``, ``WANDB_API_KEY``) or the tools' own
  login files (``hf auth login``, ``wandb login``) only. The message never repeats the value.
* :func:`redact_secrets`: a config about to be logged, with every credential-like entry replaced.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "SECRET_ENV_VARS",
    "SECRET_KEYS",
    "config_files",
    "redact_secrets",
    "secret_in_arguments",
]

SECRET_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "WANDB_API_KEY")
# Option or config keys that hold a credential (exact names: `class_token` etc. are model options).
SECRET_KEYS = frozenset(
    {
        "token", "hf_token", "hub_token", "auth_token", "use_auth_token", "access_token",
        "api_token", "api_key", "apikey", "wandb_api_key", "wandb_key", "key", "password",
        "passwd", "secret", "secret_key",
    }
)  # fmt: skip
# Substrings of a logged config key that mark its value as a credential.
SECRET_MARKERS = ("token", "api_key", "apikey", "password", "secret")
SECRET_HELP = (
    "credentials are not accepted as options or config values (they would be saved in "
    "config.yaml, checkpoints, W&B and logs): set HF_TOKEN (or run `hf auth login`) for the "
    "Hugging Face Hub and WANDB_API_KEY (or run `wandb login`) for W&B"
)


def _walk_keys(value: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield f"{prefix}{key}"
            yield from _walk_keys(item, f"{prefix}{key}.")
    elif isinstance(value, list):
        for item in value:
            yield from _walk_keys(item, prefix)


def _secret_key(dotted: str) -> bool:
    return dotted.rsplit(".", 1)[-1].lower().replace("-", "_") in SECRET_KEYS


def config_files(args: Sequence[str]) -> list[Path]:
    """The existing files given as ``--config``/``-c`` in ``args``."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith(("--config=", "-c=")):
            files.append(Path(arg.split("=", 1)[1]))
    return [f for f in files if f.is_file()]


def secret_in_arguments(args: Sequence[str]) -> str | None:
    """A one-line error if the arguments or their config files carry a credential, else ``None``."""
    env_secrets = {n: os.environ[n] for n in SECRET_ENV_VARS if len(os.environ.get(n, "")) >= 8}
    for arg in args:
        option, _, value = arg.partition("=")
        if option.startswith("--") and _secret_key(option[2:]):
            return f"{option}: {SECRET_HELP}"
        try:  # a group given as one value: --data='{source: x, token: y}'
            parsed = yaml.safe_load(value or arg) if ("{" in arg or ":" in arg) else None
        except yaml.YAMLError:
            parsed = None
        for key in _walk_keys(parsed):
            if _secret_key(key):
                return f"{option} sets {key}: {SECRET_HELP}"
    for arg in args:
        for name, value in env_secrets.items():
            if value in arg:
                return f"the value of {name} appears in the command line: {SECRET_HELP}"
    for path in config_files(args):
        text = path.read_text(errors="replace")
        try:
            content = yaml.safe_load(text)
        except yaml.YAMLError:
            content = None  # jsonargparse reports the syntax error
        for key in _walk_keys(content):
            if _secret_key(key):
                return f"{path}: key {key}: {SECRET_HELP}"
        for name, value in env_secrets.items():
            if value in text:
                return f"{path}: holds the value of {name}: {SECRET_HELP}"
    return None


def redact_secrets(value: Any) -> Any:
    """A copy of a nested config with every token/key/password-like entry replaced."""
    if isinstance(value, dict):
        return {
            k: "<redacted>"
            if any(m in str(k).lower() for m in SECRET_MARKERS) and v is not None
            else redact_secrets(v)
            for k, v in value.items()
        }
    if isinstance(value, (list, tuple)):
        return [redact_secrets(v) for v in value]
    return value
