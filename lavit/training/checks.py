"""Checks of the command line before anything is built: credentials, linked options, value ranges.

* :func:`secret_in_arguments`: a token or API key given as an option, inside a config file or as
  the value of any argument is refused (it would end up in ``config.yaml``, checkpoints, W&B and
  logs); credentials come from the environment (``HF_TOKEN``, ``WANDB_API_KEY``) or the tools' own
  login files (``hf auth login``, ``wandb login``) only. The message never repeats the value.
* :func:`linked_option_in_arguments`: options the CLI derives from others (``--model.img_size``
  from ``--data.img_size``, ...) are named with the option to set instead.
* :func:`check_config`: ranges of the numeric model/data/run options, checked on the parsed
  config, so that a bad value stops the run before it starts with one line naming the option
  and what is allowed (the type checks are jsonargparse's; the model and data constructors
  check the rest: architecture, switches, sources, columns and splits).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "LINKED_OPTIONS",
    "RULES",
    "SECRET_ENV_VARS",
    "SECRET_KEYS",
    "check_config",
    "linked_option_in_arguments",
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
SECRET_HELP = (
    "credentials are not accepted as options or config values (they would be saved in "
    "config.yaml, checkpoints, W&B and logs): set HF_TOKEN (or run `hf auth login`) for the "
    "Hugging Face Hub and WANDB_API_KEY (or run `wandb login`) for W&B"
)
LINKED_OPTIONS = {
    "model.img_size": "it is set from --data.img_size; set that instead",
    "model.num_classes": "it is set from the data (its number of classes)",
    "checkpoint.dirpath": "it is <--trainer.default_root_dir>/checkpoints; set the run directory",
}


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


def _config_files(args: Sequence[str]) -> list[Path]:
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
    for path in _config_files(args):
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


def linked_option_in_arguments(args: Sequence[str]) -> str | None:
    """A one-line error if an option the CLI derives from another one is given."""
    for arg in args:
        option = arg.partition("=")[0]
        if option.startswith("--") and option[2:] in LINKED_OPTIONS:
            return f"{option}: cannot be given: {LINKED_OPTIONS[option[2:]]}"
    return None


# ------------------------------------------------------------------------------------- ranges
def _each(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda values: all(check(v) for v in values)


def _ordered_range(low: float, high: float | None) -> Callable[[Any], bool]:
    def check(values: Any) -> bool:
        lo, hi = values
        return low < lo <= hi and (high is None or hi <= high)

    return check


def _auto_augment_ok(policy: str) -> bool:
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except Exception:  # timm raises AssertionError, KeyError, ValueError for a bad policy
        return False
    return True


def _probability(v: float) -> bool:
    return 0.0 <= v <= 1.0


# option → (check, what is allowed); a None value (the option's "off" or "default") is not checked.
RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "model.dp_loss_weight": (lambda v: v >= 0, ">= 0 (0 turns the DP loss off)"),
    "model.drop_path_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.drop_rate": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.lr": (lambda v: v > 0, "> 0"),
    "model.weight_decay": (lambda v: v >= 0, ">= 0"),
    "model.betas": (_each(lambda b: 0 <= b < 1), "two values in [0, 1)"),
    "model.eps": (lambda v: v >= 0, ">= 0"),
    "model.warmup_epochs": (lambda v: v >= 0, ">= 0"),
    "model.warmup_lr": (lambda v: v >= 0, ">= 0"),
    "model.min_lr": (lambda v: v >= 0, ">= 0"),
    "model.label_smoothing": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.mixup_alpha": (lambda v: v >= 0, ">= 0 (0 disables Mixup)"),
    "model.cutmix_alpha": (lambda v: v >= 0, ">= 0 (0 disables CutMix)"),
    "model.mixup_prob": (_probability, "a probability in [0, 1]"),
    "model.mixup_switch_prob": (_probability, "a probability in [0, 1]"),
    "model.ema_decay": (lambda v: 0 < v < 1, "in (0, 1), or null to disable the EMA"),
    "data.val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "data.img_size": (lambda v: v >= 1, ">= 1"),
    "data.std": (_each(lambda v: v > 0), "three values > 0"),
    "data.crop_pct": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.scale": (_ordered_range(0, 1), "[low, high] with 0 < low <= high <= 1"),
    "data.ratio": (_ordered_range(0, None), "[low, high] with 0 < low <= high"),
    "data.hflip": (_probability, "a probability in [0, 1]"),
    "data.vflip": (_probability, "a probability in [0, 1]"),
    "data.color_jitter": (lambda v: v >= 0, ">= 0, or null to disable it"),
    "data.auto_augment": (
        _auto_augment_ok,
        "a timm policy such as 'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2' or 'original', or null",
    ),
    "data.re_prob": (_probability, "a probability in [0, 1]"),
    "data.re_count": (lambda v: v >= 1, ">= 1"),
    "data.batch_size": (lambda v: v >= 1, ">= 1"),
    "data.num_workers": (lambda v: v >= 0, ">= 0 (0: load in the main process)"),
    "data.cache_dir": (lambda v: not Path(v).exists() or Path(v).is_dir(), "a folder"),
    "ddp.timeout": (lambda v: v > 0, "> 0 seconds"),
    "nonfinite.max_consecutive_skips": (lambda v: v >= 1, ">= 1"),
}


def _get(config: Any, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value.get(part) if hasattr(value, "get") else None
        if value is None:
            return None
    return value


def check_config(config: Any) -> None:
    """Raise ``ValueError("--option: invalid value V (must be ...)")`` for the first bad value."""
    for option, (check, allowed) in RULES.items():
        value = _get(config, option)
        if value is not None and not check(value):
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"--{option}: invalid value {shown} (must be {allowed})")
    hub_config = _get(config, "data.hub_config")
    if hub_config is not None:
        from lavit.training.data import guess_source_type

        source_type = _get(config, "data.source_type") or "auto"
        if source_type == "auto":
            try:
                source_type = guess_source_type(str(_get(config, "data.source")))
            except OSError:
                return  # the data module names the missing source
        if source_type != "hub":
            raise ValueError(
                f"--data.hub_config: invalid value {hub_config} (a configuration name of a Hub "
                f"dataset; this source is {source_type!r}, which has none)"
            )
