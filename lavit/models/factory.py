"""The one model factory: a model by name, for training, the tools and the scripts.

A name is any timm model (``pvt_v2_b1``), a LaViT variant (``lavit_tiny``), the variant with every
Less-Attention layer a Vanilla Attention one (``lavit_tiny/all-va``: the paper's all-attention
baseline) or with another Ψ/Θ form (``lavit_tiny/separable``). The model's own constructor checks
its arguments; every mistake is a ``ValueError`` that names the argument.
"""

from __future__ import annotations

import inspect
import typing
from dataclasses import dataclass, field
from typing import Any

import timm
from torch import nn

from .lavit import LAVIT_CONFIGS, LaViT
from .token_mixing import LA_MIXINGS

__all__ = ["ALL_VA", "LAVIT_SWITCHES", "ModelSpec", "create_model", "parse_model_name"]

ALL_VA = "all-va"
# LaViT's own constructor arguments (name → type), beyond what every timm classifier takes: read
# from its signature, so that each switch is declared (and checked, by LaViT) in one place.
LAVIT_SWITCHES: dict[str, Any] = {
    name: typing.get_type_hints(LaViT.__init__)[name]
    for name in inspect.signature(LaViT).parameters
    if name not in ("img_size", "num_classes", "drop_rate", "drop_path_rate")
}


@dataclass(frozen=True)
class ModelSpec:
    """A model by name: the name as given, the timm architecture and its extra switches."""

    label: str
    arch: str
    switches: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def is_lavit(self) -> bool:
        """Whether ``arch`` is a LaViT variant (``lavit_tiny``, ``lavit_cifar.untrained``)."""
        return self.arch.split(".")[0] in LAVIT_CONFIGS


def parse_model_name(name: str) -> ModelSpec:
    """``lavit_tiny``, ``pvt_v2_b1`` (any timm model), ``lavit_tiny/all-va`` or a LaViT with
    another ``la_mixing`` form, ``lavit_tiny/separable`` / ``lavit_tiny/pooled`` → a spec."""
    arch, _, variant = name.partition("/")
    base = arch.split(".")[0]
    if variant in LA_MIXINGS and base in LAVIT_CONFIGS:
        return ModelSpec(name, arch, {"la_mixing": variant})
    if base not in timm.list_models():
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
    if base not in LAVIT_CONFIGS:
        raise ValueError(
            f"{name!r}: only LaViT variants ({', '.join(LAVIT_CONFIGS)}) have LA layers"
        )
    return ModelSpec(name, arch, {"num_va_layers": tuple(LAVIT_CONFIGS[base]["depths"])})


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

    ``None`` (for ``img_size``, the drop rates and any switch) means the model's default.
    ``switches`` and ``model_kwargs`` are both constructor arguments (e.g. ``num_va_layers``,
    ``embed_dims``); the switches win. Size-agnostic models (CNNs, PVTv2) get no ``img_size``.
    """
    spec = name if isinstance(name, ModelSpec) else parse_model_name(name)
    given = {"img_size": img_size, "drop_rate": drop_rate, "drop_path_rate": drop_path_rate}
    kwargs = {**(model_kwargs or {}), **spec.switches}
    kwargs.update({k: v for k, v in {**given, **(switches or {})}.items() if v is not None})
    try:
        return _timm(spec.arch, num_classes=num_classes, **kwargs)
    except ValueError as err:
        if "img_size" not in kwargs or "argument 'img_size'" not in str(err):
            raise
    kwargs.pop("img_size")  # a size-agnostic model takes none: the data decides the size
    return _timm(spec.arch, num_classes=num_classes, **kwargs)


def _timm(arch: str, **kwargs: Any) -> nn.Module:
    try:
        return timm.create_model(arch, **kwargs)
    except TypeError as err:  # an argument the model does not take
        raise ValueError(f"model_kwargs do not fit arch={arch!r}: {err}") from None
