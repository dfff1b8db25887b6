"""Pretrained weights for fine-tuning, checked before the model is built (a missing file fails at
once), then loaded by timm: the architecture's published weights (``pretrained=True``: the Hugging
Face cache, else the Hub; offline and not cached is a ``ValueError`` saying how to get them), or a
weights file (``pretrained_file``: a state dict, ``lavit export``'s ``model.safetensors``, or a
``lavit fit`` checkpoint). A classifier of another size starts afresh (timm's rule); position
embeddings and Ψ/Θ are resampled to the input size. With published weights, the data options left
at their defaults follow the weights' preprocessing (:func:`apply_pretrained_data_config`).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import timm
from timm.data import resolve_data_config
from timm.models import get_pretrained_cfg

__all__ = ["apply_pretrained_data_config", "model_state_dict", "pretrained_kwargs"]

HUB_PROBE_TIMEOUT_S = 5.0
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # what timm looks for, in order
SAMPLERS = ("bicubic", "bilinear", "nearest")  # the interpolations of ImageDataModule


def _cfg(arch: str):
    try:
        return get_pretrained_cfg(arch)
    except (RuntimeError, ValueError):
        return None


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The model's weights (timm's keys) from a ``lavit fit`` checkpoint, its ``state_dict``,
    or a plain state dict (returned as is): the EMA's when the run kept one."""
    state = checkpoint.get("state_dict", checkpoint)
    for prefix in ("ema.module.", "model."):  # a LaViTModule's EMA copy first: what it evaluated
        inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if inner:
            return inner
    return dict(state)


def _classifier_outputs(state: dict, arch: str) -> int | None:
    """The class count of the classifier in a state dict (``None``: no such tensor)."""
    cfg = _cfg(arch)
    classifiers = (cfg.classifier if cfg else None) or "head"
    classifiers = (classifiers,) if isinstance(classifiers, str) else tuple(classifiers)
    for name in classifiers:
        weight = state.get(f"{name}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _check_hub_weights(arch: str, hf_hub_id: str, filename: str | None) -> None:
    """Pass when the weights are cached or the Hub answers; else a ValueError saying what to do."""
    import huggingface_hub
    import huggingface_hub.constants as hub

    for name in (filename,) if filename else HUB_WEIGHT_FILES:
        if isinstance(huggingface_hub.try_to_load_from_cache(hf_hub_id, name), str):
            return  # cached: no network needed
    if hub.HF_HUB_OFFLINE:
        problem = "HF_HUB_OFFLINE is set"
    else:
        try:
            huggingface_hub.HfApi().model_info(hf_hub_id, timeout=HUB_PROBE_TIMEOUT_S)
            return
        except huggingface_hub.errors.HfHubHTTPError:
            return  # the Hub answered: the download reports what it says (gated, missing...)
        except Exception as err:  # the transport's error classes differ between versions
            problem = f"the Hub is unreachable ({type(err).__name__}: {err})"
    raise ValueError(
        f"pretrained=true: the weights of {arch} ({hf_hub_id}) are not in the Hugging Face cache "
        f"({hub.HF_HUB_CACHE}) and {problem}; download them once where the network is "
        f"(python -c \"import timm; timm.create_model('{arch}', pretrained=True)\", then copy the "
        "cache folder), or pass pretrained_file=PATH (a .safetensors or .pth state dict)"
    )


def pretrained_kwargs(
    arch: str, pretrained: bool, pretrained_file: str | None = None
) -> dict[str, Any]:
    """The ``timm.create_model`` arguments that load the weights, after checking they can be had.

    ``{}`` when neither is asked for. Raises ``ValueError`` naming the problem and the fix.
    """
    if pretrained_file is not None:
        path = Path(pretrained_file).expanduser()
        if not path.is_file():
            raise ValueError(f"pretrained_file={pretrained_file!r}: no such file")
        try:  # a state dict, or a `lavit fit` checkpoint (its model's weights, the EMA's if kept)
            state = model_state_dict(timm.models.load_state_dict(str(path), weights_only=True))
        except Exception as err:  # safetensors, torch and pickle errors differ
            raise ValueError(
                f"pretrained_file={str(path)!r}: not a readable state dict ({err})"
            ) from None
        # timm loads (and resizes, and drops a classifier of another size) from this state dict
        overlay: dict[str, Any] = {"state_dict": state}
        outputs = _classifier_outputs(state, arch)
        if outputs is not None:  # keep a classifier that fits; timm drops one that does not
            overlay["num_classes"] = outputs
        return {"pretrained": True, "pretrained_cfg_overlay": overlay}
    if not pretrained:
        return {}
    cfg = _cfg(arch)
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        hint = (
            "LaViT has no published weights: pass pretrained_file=PATH (e.g. the "
            "model.safetensors of `lavit export`)"
            if arch.split(".")[0] in timm.list_models("lavit_*")
            else "pass pretrained_file=PATH, or pick an arch from timm.list_models(pretrained=True)"
        )
        raise ValueError(f"pretrained=true: timm has no weights for arch={arch!r}; {hint}")
    if cfg.hf_hub_id:
        _check_hub_weights(arch, cfg.hf_hub_id, cfg.hf_hub_filename)
    return {"pretrained": True}


def pretrained_data_config(arch: str) -> dict[str, Any]:
    """Input size and preprocessing the weights of ``arch`` were trained with (no download)."""
    cfg = _cfg(arch)
    if cfg is None:
        return {}
    config = resolve_data_config(pretrained_cfg=cfg.to_dict())
    keys = ["mean", "std", "crop_pct"]
    if config["interpolation"] in SAMPLERS:
        keys.append("interpolation")
    return {"img_size": int(config["input_size"][-1]), **{k: config[k] for k in keys}}


def _same(value: Any, default: Any) -> bool:
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return as_list(value) == as_list(default)


def apply_pretrained_data_config(config: Any) -> list[str]:
    """In a parsed CLI config: the data options left at their defaults follow the weights'.

    Only when the model starts from pretrained weights; returns the ``key=value`` pairs set (and
    says so in one line). ``img_size`` is set on the model too (the CLI's link ran at parsing).
    """
    from lightning.pytorch.utilities import rank_zero_info

    from lavit.training.data import ImageDataModule

    model, data = config.get("model"), config.get("data")
    # Only timm's published weights have a preprocessing config (a pretrained_file has none).
    if model is None or data is None or not model.get("pretrained") or model.get("pretrained_file"):
        return []
    defaults = {k: p.default for k, p in inspect.signature(ImageDataModule).parameters.items()}
    changed = []
    for key, value in pretrained_data_config(model.arch).items():
        if key in defaults and _same(data.get(key), defaults[key]):
            setattr(data, key, value)
            if key == "img_size":
                model.img_size = value
            changed.append(f"{key}={value}")
    if changed:
        rank_zero_info(
            f"Data: {', '.join(changed)} from the pretrained config of {model.arch} "
            "(options left at their defaults; set --data.<key> to choose otherwise)"
        )
    return changed
