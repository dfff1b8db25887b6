"""Value ranges of the options, declared once: as the types of the constructor arguments.

``lr: PositiveFloat``: jsonargparse checks the type when the command line is parsed,
:func:`check_arguments` when a class is built from Python; both say it the same way:
``lr: invalid value -1.0 (must be > 0)`` (the CLI's line names ``--model.lr``).
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse.typing import (
    ClosedUnitInterval,
    NonNegativeFloat,
    NonNegativeInt,
    OpenUnitInterval,
    PositiveFloat,
    PositiveInt,
    register_type,
    restricted_number_type,
)

from lavit.errors import one_line

__all__ = [  # noqa: RUF022 (grouped: the types, then the functions)
    "AspectRatioRange", "AtLeastTwoInt", "AutoAugmentPolicy", "CropScale", "Folder",
    "NonNegativeFloat", "NonNegativeInt", "OpenUnitInterval", "PositiveFloat", "PositiveInt",
    "PositiveSeconds", "Probability", "UnitIntervalLeftOpen", "UnitIntervalRightOpen",
    "check_arguments", "describe_parse_error", "plain",
]  # fmt: skip

# jsonargparse registers one type per restriction: [0, 1] is its ClosedUnitInterval.
Probability = ClosedUnitInterval
UnitIntervalRightOpen = restricted_number_type(
    "UnitIntervalRightOpen", float, [(">=", 0), ("<", 1)], join="and"
)
UnitIntervalLeftOpen = restricted_number_type(
    "UnitIntervalLeftOpen", float, [(">", 0), ("<=", 1)], join="and"
)
AtLeastTwoInt = restricted_number_type("AtLeastTwoInt", int, [(">=", 2)])  # e.g. classes of a mask


def _checked_type(name: str, base: type, description: str, convert: Callable, valid: Callable):
    """A ``base`` subclass whose constructor converts and checks, registered with jsonargparse
    (which has restricted numbers only)."""

    def new(cls, value):
        value = convert(value)
        if not valid(value):
            raise ValueError(f"{value!r} is not {description}")
        return base.__new__(cls, value)

    kind = type(name, (base,), {"__new__": new})
    register_type(kind, serializer=list if base is tuple else base, deserializer=kind)
    ALLOWED[kind] = description
    return kind


def _pair(value: Sequence[float]) -> tuple[float, float]:
    low, high = (float(v) for v in value)  # exactly two
    return low, high


def _timm_policy(policy: str) -> bool:
    from timm.data import create_transform

    try:
        create_transform(32, is_training=True, auto_augment=policy)
    except Exception:  # timm raises AssertionError, KeyError, ValueError for a bad policy
        return False
    return True


# What each constrained type allows, as the error line says it.
ALLOWED: dict[type, str] = {
    PositiveInt: ">= 1",
    NonNegativeInt: ">= 0",
    PositiveFloat: "> 0",
    NonNegativeFloat: ">= 0",
    OpenUnitInterval: "in (0, 1)",
    ClosedUnitInterval: "a probability in [0, 1]",
    UnitIntervalRightOpen: "in [0, 1)",
    UnitIntervalLeftOpen: "in (0, 1]",
    AtLeastTwoInt: ">= 2",
}
PositiveSeconds = _checked_type("PositiveSeconds", float, "> 0 seconds", float, lambda v: v > 0)
CropScale = _checked_type(
    "CropScale",
    tuple,
    "[low, high] with 0 < low <= high <= 1",
    _pair,
    lambda v: 0 < v[0] <= v[1] <= 1,
)
AspectRatioRange = _checked_type(
    "AspectRatioRange", tuple, "[low, high] with 0 < low <= high", _pair, lambda v: 0 < v[0] <= v[1]
)
Folder = _checked_type(
    "Folder", str, "a folder", str, lambda v: not Path(v).exists() or Path(v).is_dir()
)
AutoAugmentPolicy = _checked_type(
    "AutoAugmentPolicy",
    str,
    "a timm policy such as 'rand-m9-mstd0.5-inc1', 'augmix-m5-w4-d2' or 'original', or null",
    str,
    _timm_policy,
)
BY_NAME = {kind.__name__: kind for kind in ALLOWED}
_COUNTS = {2: "two", 3: "three", 4: "four"}


# ------------------------------------------------------------------------------ from Python
def _constrained(annotation: Any) -> list[tuple[type, bool]]:
    """The constrained types in ``annotation``: ``(type, applies to each element)``."""
    if annotation in ALLOWED:
        return [(annotation, False)]
    found = []
    for arg in typing.get_args(annotation):
        if typing.get_origin(annotation) is tuple:
            found += [(t, True) for t, _ in _constrained(arg)]
        else:
            found += _constrained(arg)
    return found[:1]


def check_arguments(function: Callable, arguments: dict[str, Any]) -> None:
    """Raise ``ValueError("<name>: invalid value V (must be ...)")`` for the first argument of
    ``function`` (from its ``locals()``) outside the range its annotation declares."""
    hints = typing.get_type_hints(function)
    for name in inspect.signature(function).parameters:
        value = arguments.get(name)
        for kind, each in _constrained(hints.get(name)) if value is not None else []:
            try:
                for item in value if each else [value]:
                    kind(item)
            except (TypeError, ValueError):
                shown = list(value) if isinstance(value, tuple) else value
                raise ValueError(
                    f"{name}: invalid value {shown} (must be {_allowed(kind, value)})"
                ) from None


def _allowed(kind: type, value: Any) -> str:
    """What ``kind`` allows; for a list of values of a scalar kind, how many of them."""
    if isinstance(value, (list, tuple)) and not issubclass(kind, tuple):
        return f"{_COUNTS.get(len(value), len(value))} values {ALLOWED[kind]}"
    return ALLOWED[kind]


def plain(value: Any) -> Any:
    """``value`` with the constrained types (``PositiveFloat(0.5)``, ``CropScale``) as builtins.

    What jsonargparse parsed must reach the modules as plain values: their hyper-parameters go
    into checkpoints, which are read weights-only (no classes but builtins).
    """
    if isinstance(value, bool) or value is None:
        return value
    for base in (int, float, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, (list, tuple)):
        items = [plain(v) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------- from the CLI
def describe_parse_error(message: str, args: Sequence[str] = ()) -> str:
    """jsonargparse's multi-line error as one line: option, given value, what is allowed.

    ``args``: the command line, where the value of a constrained option is looked up (the
    message names only the failing element of a list).
    """
    match = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
    if match is None:
        return one_line(message)
    key, detail = match.groups()
    constrained = re.search(r"Not of type (\w+): (.*)$", detail, re.M)
    if constrained and constrained.group(1) in BY_NAME:
        kind = BY_NAME[constrained.group(1)]
        value = _given_value(key, args, kind)
        if value is None:  # not on the command line: the value the message names
            given = re.search(r"Given value: (.*)$", detail, re.M)
            text = given.group(1) if given else constrained.group(2).split(" does not conform")[0]
            value = _cast(text.strip(), kind)
        return f"--{key}: invalid value {value} (must be {_allowed(kind, value)})"
    expected = [
        _readable_type(t)
        for t in re.findall(r"Expected a (.+?)(?:\. Got value: .*)?$", detail, re.M)
        if "NoneType" not in t
    ]
    given = re.search(r"(?:Given|Got) value: (.*)$", detail, re.M)
    if not expected or given is None:
        return f"--{key}: {one_line(detail)}"
    return f"--{key}: invalid value {given.group(1)} (expected {' or '.join(expected)})"


def _cast(value: Any, kind: type) -> Any:
    """``value`` as the base type of ``kind`` (float, int, str; a list of them), as parsed."""
    base = next(b for b in (int, float, str, tuple) if issubclass(kind, b))
    try:
        if base is tuple:
            return [float(v) for v in value]
        return [base(v) for v in value] if isinstance(value, list) else base(value)
    except (TypeError, ValueError):
        return value


def _given_value(key: str, args: Sequence[str], kind: type) -> Any:
    """The last value of ``--key`` on the command line, parsed as YAML and cast, or ``None``."""
    raw = None
    for i, arg in enumerate(args):
        if arg.startswith(f"--{key}="):
            raw = arg.split("=", 1)[1]
        elif arg == f"--{key}" and i + 1 < len(args):
            raw = args[i + 1]
    if raw is None:
        return None
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return _cast(value, kind)


def _readable_type(text: str) -> str:
    text = re.sub(r"<class '([\w.]+)'>", r"\1", text).replace("typing.", "")
    literal = re.fullmatch(r"Literal\[(.*)\]", text)
    return f"one of {literal.group(1)}" if literal else text
