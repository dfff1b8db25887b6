"""The model factory (``lavit.models.factory``): names, the all-VA twin, errors that name the argument."""

from __future__ import annotations

import pytest

from lavit.models.factory import create_model, parse_model_name


def test_all_va_counterpart_switches_every_la_layer_off():
    spec = parse_model_name("lavit_small/all-va")
    assert spec.arch == "lavit_small" and spec.switches == {"num_va_layers": (3, 4, 6, 3)}


def test_model_kwargs_errors_are_value_errors():
    with pytest.raises(ValueError, match="not a timm model"):
        create_model("no_such_model", 10)
    with pytest.raises(ValueError, match="model_kwargs"):
        create_model("lavit_cifar", 10, model_kwargs={"no_such_argument": 1})


def test_names_build_the_models_training_and_the_tools_share():
    from lavit.models import LessAttention

    twin = create_model("lavit_cifar/all-va", num_classes=3, img_size=32)
    assert not any(isinstance(m, LessAttention) for m in twin.modules())
    assert any(isinstance(m, LessAttention) for m in create_model("lavit_cifar").modules())
    # a size-agnostic timm model is built without the img_size it does not take
    assert create_model("pvt_v2_b0", num_classes=3, img_size=64).num_classes == 3
    with pytest.raises(ValueError, match="pvt_v2_b0.*unexpected keyword argument 'la_init'"):
        create_model("pvt_v2_b0", switches={"la_init": "random"})
    # None: the variant's default, even over model_kwargs
    built = create_model(
        "lavit_cifar", 3, switches={"mlp_ratios": None}, model_kwargs={"mlp_ratios": (2,) * 4}
    )
    assert built.stages[0].blocks[0].mlp.fc1.out_features == 2 * 32


def test_the_switches_are_lavits_own_arguments():
    import inspect

    from lavit.models import LaViT
    from lavit.models.factory import LAVIT_SWITCHES

    names = set(inspect.signature(LaViT).parameters)
    assert {"num_va_layers", "la_init", "attn_state", "dp_loss_weight", "la_mixing"} <= set(
        LAVIT_SWITCHES
    )
    assert set(LAVIT_SWITCHES) == names - {"img_size", "num_classes", "drop_rate", "drop_path_rate"}
    with pytest.raises(ValueError, match="only '/all-va' exists"):
        parse_model_name("lavit_tiny/all-la")
    with pytest.raises(ValueError, match="only LaViT variants"):
        parse_model_name("pvt_v2_b0/all-va")
    # the la_mixing forms by name (lavit bench --models backbone:lavit_tiny/pooled)
    assert parse_model_name("lavit_tiny/pooled").switches == {"la_mixing": "pooled"}
    assert create_model("lavit_cifar/separable", num_classes=3).la_mixing == "separable"
