"""What ``lavit export`` and ``lavit analyze`` read from a ``lavit fit`` checkpoint (weights-only:
nothing is unpickled as code): the model the run validated (its EMA when kept), rebuilt from the
checkpoint's hyper-parameters, and the run's evaluation preprocessing.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from timm.data import create_transform
from torch import nn

from lavit.errors import CheckpointError
from lavit.models import checkpoint_filter_fn
from lavit.models.factory import LAVIT_SWITCHES
from lavit.training.checkpoint_io import load_checkpoint_file
from lavit.training.module import LaViTModule
from lavit.training.pretrained import model_state_dict

__all__ = [
    "data_config",
    "eval_transform",
    "load_checkpoint_resized",
    "load_eval_model",
    "load_trained",
]


def load_checkpoint_resized(model: nn.Module, checkpoint: dict[str, Any], strict: bool = True):
    """``model.load_state_dict`` of a ``lavit fit`` checkpoint (or state dict) at any input size:
    position embeddings and Ψ/Θ resampled by the model's ``checkpoint_filter_fn``."""
    state = checkpoint_filter_fn(model_state_dict(checkpoint), model)
    return model.load_state_dict(state, strict=strict)


def load_eval_model(checkpoint: dict[str, Any], ema: bool = True) -> tuple[nn.Module, bool]:
    """The checkpoint's model with its evaluation weights (the EMA when ``ema`` and present).

    Returns the model (in eval mode) and whether the weights are the EMA's.
    """
    accepted = {*inspect.signature(LaViTModule).parameters, *LAVIT_SWITCHES}
    # Only the module's own arguments: LightningCLI also stores `_instantiator` and the like.
    hparams = {k: v for k, v in (checkpoint.get("hyper_parameters") or {}).items() if k in accepted}
    if "arch" not in hparams:
        raise CheckpointError(
            "the checkpoint has no LaViTModule hyper-parameters (hyper_parameters.arch): "
            "only the checkpoints `lavit fit` writes can be read"
        )
    # Nothing is trained (no compiled forward); the checkpoint holds the weights.
    hparams.update(compile=False, pretrained=False, pretrained_file=None)
    try:
        module = LaViTModule(**hparams)
        module.load_state_dict(checkpoint["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"the checkpoint does not rebuild with this lavit ({type(err).__name__}: {err})"
        ) from None
    use_ema = ema and module.ema is not None
    model = module.ema.module if use_ema else module.model
    return model.eval(), use_ema


def data_config(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Input size and evaluation preprocessing of the run (its data module's settings)."""
    data = checkpoint.get("datamodule_hyper_parameters") or {}
    config: dict[str, Any] = {}
    img_size = data.get("img_size") or (checkpoint.get("hyper_parameters") or {}).get("img_size")
    if img_size:  # a side, or (H, W) for dense runs
        height, width = (img_size, img_size) if isinstance(img_size, int) else img_size[-2:]
        config["input_size"] = (3, int(height), int(width))
    for key in ("mean", "std", "crop_pct", "interpolation"):
        if data.get(key) is not None:
            config[key] = tuple(data[key]) if isinstance(data[key], (list, tuple)) else data[key]
    return config


def eval_transform(config: dict[str, Any]) -> Any:
    """The evaluation transform of a :func:`data_config` (as the run's data module built it)."""
    return create_transform(**config, is_training=False)


def load_trained(path: str | Path, ema: bool = True) -> tuple[nn.Module, dict[str, Any], dict]:
    """``(evaluation model, data config, checkpoint)`` of a ``lavit fit`` checkpoint file."""
    checkpoint = load_checkpoint_file(path, map_location="cpu")
    model, _ = load_eval_model(checkpoint, ema)
    return model, data_config(checkpoint), checkpoint
