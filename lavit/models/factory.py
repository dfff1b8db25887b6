"""The one model factory: a model by name, as training, ``lavit bench``, ``lavit analyze``, the
ablation report and the scripts build it.

A name is any timm model (``pvt_v2_b1``, ``resnet50``), a LaViT variant (``lavit_tiny``), or a
LaViT variant with every Less-Attention layer switched to Vanilla Attention
(``lavit_tiny/all-va``: ``num_va_layers`` = the variant's depths, the paper's all-attention
baseline). Every mistake is a ``ValueError`` that names the argument and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import timm
from torch import nn

from .lavit import LAVIT_CONFIGS
from .token_mixing import LA_MIXINGS

__all__ = [
    "ALL_VA",
    "LAVIT_SWITCHES",
    "ModelSpec",
    "create_model",
    "is_lavit_arch",
    "parse_model_name",
]

ALL_VA = "all-va"
# Arguments that only a LaViT model understands (dp_loss_weight too, when it is not 0).
LAVIT_SWITCHES = (
    "num_va_layers",
    "residual_attn_downsample",
    "la_init",
    "attn_state",
    "dp_loss_variant",
    "dp_loss_layers",
    "la_mixing",
)


def is_lavit_arch(arch: str) -> bool:
    """Whether ``arch`` names a LaViT variant (``lavit_tiny``, ``lavit_cifar.untrained``, ...)."""
    return arch.split(".")[0] in LAVIT_CONFIGS


@dataclass(frozen=True)
class ModelSpec:
    """A model by name: the name as given, the timm architecture and its extra switches."""

    label: str
    arch: str
    switches: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def is_lavit(self) -> bool:
        return is_lavit_arch(self.arch)


def parse_model_name(name: str) -> ModelSpec:
    """``lavit_tiny``, ``pvt_v2_b1`` (any timm model), ``lavit_tiny/all-va`` or a LaViT with
    another ``la_mixing`` form, ``lavit_tiny/separable`` / ``lavit_tiny/pooled`` → a spec."""
    arch, _, variant = name.partition("/")
    if variant in LA_MIXINGS and is_lavit_arch(arch):
        return ModelSpec(name, arch, {"la_mixing": variant})
    if arch.split(".")[0] not in timm.list_models():
        raise ValueError(
            f"unknown model {name!r}: arch={arch!r} is not a timm model (e.g. lavit_cifar, "
            f"lavit_tiny, pvt_v2_b1; a LaViT variant may end in '/{ALL_VA}')"
        )
    if not variant:
        return ModelSpec(name, arch)
    if variant != ALL_VA:
        raise ValueError(
            f"unknown model variant {variant!r} in {name!r}: only '/{ALL_VA}' exists besides "
            f"the la_mixing forms ({', '.join('/' + f for f in LA_MIXINGS)})"
        )
    if not is_lavit_arch(arch):
        raise ValueError(
            f"{name!r}: only LaViT variants ({', '.join(LAVIT_CONFIGS)}) have LA layers"
        )
    depths = tuple(LAVIT_CONFIGS[arch.split(".")[0]]["depths"])
    return ModelSpec(name, arch, {"num_va_layers": depths})


def create_model(
    name: str | ModelSpec,
    num_classes: int = 1000,
    img_size: int | None = None,
    drop_rate: float | None = None,
    drop_path_rate: float | None = None,
    switches: dict[str, Any] | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """``timm.create_model`` of a model name (see the module docstring).

    Args:
        name: a model name or a :class:`ModelSpec`.
        num_classes: classifier outputs.
        img_size: input side; ``None``: the model's default. Size-agnostic models (CNNs,
            PVTv2) take no ``img_size`` and get none.
        drop_rate: dropout before the classifier; ``None``: the model's default.
        drop_path_rate: stochastic depth rate; ``None``: the model's default.
        switches: LaViT switches (``LAVIT_SWITCHES`` and ``dp_loss_weight``; ``None`` values
            mean "the variant's default"); on top of the name's own (``/all-va``).
        model_kwargs: other constructor arguments, passed unchanged (widths, depths, ...).
    """
    spec = name if isinstance(name, ModelSpec) else parse_model_name(name)
    given = {k: v for k, v in (switches or {}).items() if v is not None}
    if not spec.is_lavit:
        lavit_only = [k for k, v in given.items() if k != "dp_loss_weight" or v != 0]
        if lavit_only:
            raise ValueError(
                f"{', '.join(lavit_only)}: LaViT-only switch{'es' if len(lavit_only) > 1 else ''}, "
                f"which arch={spec.arch!r} does not have (LaViT archs are named lavit_*)"
            )
        given = {}
    kwargs = {**(model_kwargs or {}), **spec.switches, **given, "num_classes": num_classes}
    optional = {"drop_rate": drop_rate, "drop_path_rate": drop_path_rate, "img_size": img_size}
    kwargs.update({k: v for k, v in optional.items() if v is not None})
    try:
        return timm.create_model(spec.arch, **kwargs)
    except TypeError as err:
        if spec.is_lavit or "img_size" not in kwargs or "img_size" not in str(err):
            raise ValueError(f"model_kwargs do not fit arch={spec.arch!r}: {err}") from None
    # A size-agnostic model takes no img_size: the data decides the size.
    kwargs.pop("img_size")
    try:
        return timm.create_model(spec.arch, **kwargs)
    except TypeError as err:
        raise ValueError(f"model_kwargs do not fit arch={spec.arch!r}: {err}") from None
