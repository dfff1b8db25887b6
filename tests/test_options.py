"""Value ranges declared once (``lavit.training.options``): parsed, checked from Python, described.

The CLI's one-line messages for each option are checked end to end by
``tests/test_reliability.py::test_a_bad_argument_exits_with_one_line_naming_it``.
"""

from __future__ import annotations

import pickle

import pytest
import torch

from lavit.training.data import ImageDataModule
from lavit.training.module import LaViTModule
from lavit.training.options import (
    CropScale,
    PositiveFloat,
    Probability,
    check_arguments,
    describe_parse_error,
    plain,
)


def test_parse_errors_are_summarised():
    message = (
        'Parser key "model.attn_state":\n  Does not validate against any of the Union subtypes\n'
        "  Errors:\n    - Expected a typing.Literal['scores', 'probs']\n"
        "    - Expected a <class 'NoneType'>\n  Given value type: <class 'str'>\n  Given value: x"
    )
    assert describe_parse_error(message) == (
        "--model.attn_state: invalid value x (expected one of 'scores', 'probs')"
    )


def test_a_constrained_value_is_described_with_what_its_type_allows():
    message = 'Parser key "model.lr":\n  Not of type PositiveFloat: -1 does not conform to v>0'
    assert describe_parse_error(message) == "--model.lr: invalid value -1.0 (must be > 0)"
    # the whole list from the command line, not only the element the message names
    message = 'Parser key "data.std":\n  Not of type PositiveFloat: 0 does not conform to v>0'
    assert describe_parse_error(message, ["fit", "--data.std=[0,1,1]"]) == (
        "--data.std: invalid value [0.0, 1.0, 1.0] (must be three values > 0)"
    )


def test_the_same_annotations_check_arguments_given_from_python():
    with pytest.raises(ValueError, match=r"ema_decay: invalid value 1.0 \(must be in \(0, 1\)\)"):
        LaViTModule(ema_decay=1.0)
    with pytest.raises(ValueError, match=r"betas: invalid value \[0.9, 1.5\] \(must be two values"):
        LaViTModule(betas=(0.9, 1.5))
    with pytest.raises(
        ValueError, match=r"scale: invalid value \[0.5, 0.1\] \(must be \[low, high\]"
    ):
        ImageDataModule(scale=(0.5, 0.1))

    def f(p: Probability, lr: PositiveFloat | None = None, scale: CropScale = (0.1, 1.0)) -> None:
        check_arguments(f, locals())

    f(0.5)
    f(1.0, None, (1.0, 1.0))
    with pytest.raises(ValueError, match="p: invalid value 1.5 .must be a probability in"):
        f(1.5)


def test_parsed_values_become_builtins_that_load_weights_only(tmp_path):
    value = plain({"lr": PositiveFloat(0.5), "scale": CropScale([0.1, 1]), "n": [Probability(1)]})
    assert value == {"lr": 0.5, "scale": (0.1, 1.0), "n": [1.0]}
    assert type(value["lr"]) is float and type(value["scale"]) is tuple
    torch.save(value, tmp_path / "plain.pt")
    assert torch.load(tmp_path / "plain.pt", weights_only=True) == value
    torch.save({"lr": PositiveFloat(0.5)}, tmp_path / "typed.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "typed.pt", weights_only=True)
