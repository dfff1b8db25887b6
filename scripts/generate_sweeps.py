"""Write the W&B sweep files of sweeps/ from one table, at both scales, so they cannot drift apart.

    python scripts/generate_sweeps.py           # rewrite sweeps/*.yaml and sweeps/imagenet/*.yaml
    python scripts/generate_sweeps.py --check   # exit 1 listing the files that are stale

Each ablation of docs/spec.md §4 is one entry of ``ABLATIONS``; each scale (``SCALES``) gives its files
their command and the text saying where they run. The swept values of ``num_va_layers`` follow from
each scale's variant (its depths and default split in ``LAVIT_CONFIGS``), so the paper-scale grid
asks the same question of lavit_tiny that the CIFAR-10 grid asks of lavit_cifar.
``tests/test_sweeps.py`` fails while a committed file differs from what this script writes.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing it

from lavit.models import LAVIT_CONFIGS  # noqa: E402

SEEDS = [0, 1, 2]


@dataclass(frozen=True)
class Scale:
    """Where a sweep file's runs go: its folder, configs, extra arguments and description."""

    folder: str  # under sweeps/
    arch: str  # the LaViT variant its configs train
    configs: tuple[str, ...]
    extra_args: tuple[str, ...]
    name_suffix: str
    runs_on: str  # "Runs on:" paragraph of the header
    other_scale: str  # where the same grid is at the other scale, "{file}" for the file name


CIFAR = Scale(
    folder="",
    arch="lavit_cifar",
    configs=("experiments/cifar10.yaml",),
    extra_args=(),
    name_suffix="",
    runs_on=(
        "experiments/cifar10.yaml — lavit_cifar on full CIFAR-10 (200 epochs), a few hours per run "
        "on one GPU. Data: the Hub copy uoft-cs/cifar10, downloaded on first use (or a local copy: "
        "LAVIT_LOCAL_DATASETS=uoft-cs/cifar10=/path/to/parquet, see README). Run from the "
        "repository root (the config paths are relative to it)."
    ),
    other_scale="Paper scale (ImageNet-1K, lavit_tiny, 300 epochs, 8 GPUs): "
    "sweeps/imagenet/{file}.",
)
IMAGENET = Scale(
    folder="imagenet",
    arch="lavit_tiny",
    configs=("experiments/base.yaml", "experiments/imagenet/lavit_tiny.yaml"),
    extra_args=("--trainer.devices=8", "--trainer.strategy=ddp"),
    name_suffix="-imagenet",
    runs_on=(
        "experiments/base.yaml + experiments/imagenet/lavit_tiny.yaml — LaViT-T on ImageNet-1K at "
        "224², the docs/spec.md §5 recipe (300 epochs), each run on the 8 GPUs of one machine with DDP "
        "(8 × 128 = global batch 1024; the lr follows the global batch, so another GPU count only "
        "changes `--trainer.devices=8` below, or `lavit sweep --override trainer.devices=N`). "
        "Data: ILSVRC/imagenet-1k (gated: accept its terms, then HF_TOKEN or `hf auth login`), or "
        "a local copy through LAVIT_LOCAL_DATASETS. One agent per machine; offline, one slot of "
        "8 GPUs: `lavit sweep ... --devices 0+1+2+3+4+5+6+7`. Run from the repository root."
    ),
    other_scale="CIFAR-10 scale (lavit_cifar, one GPU per run): sweeps/{file}.",
)
SCALES = (CIFAR, IMAGENET)


def va_layer_values(arch: str) -> list[tuple[list[int], str]]:
    """From the all-VA baseline to one VA layer per stage, for ``arch``'s depths."""
    config = LAVIT_CONFIGS[arch]
    depths, default = list(config["depths"]), list(config["num_va_layers"])
    return [
        (depths, "all VA: the attention-everywhere baseline"),
        (depths[:-1] + [1], "LA only in stage 4"),
        (default, "default split: LA in stages 3–4"),
        ([1] * len(depths), "one VA layer per stage, the rest LA"),
    ]


@dataclass(frozen=True)
class Ablation:
    """One question of docs/spec.md §4: its header text and swept parameters (``values`` or a function of
    the scale's arch giving ``(value, comment)`` pairs)."""

    file: str
    name: str
    title: str
    question: str
    description: str
    parameters: dict[str, Any]
    parameter_note: str = ""  # a comment above the parameters, "{arch}"/"{depths}" filled in
    args_note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


ABLATIONS = (
    Ablation(
        file="va_layers",
        name="lavit-va-layers",
        title=(
            "Ablation 1 (docs/spec.md §4, question 1): how many Vanilla Attention (VA) layers "
            "does each stage need?"
        ),
        question=(
            "replacing the later layers of a stage by Less-Attention (LA) layers saves MACs and "
            "time; how much top-1 does it cost compared with the all-VA baseline, from the default "
            "split (LA in stages 3–4) down to one VA layer per stage? (A value must satisfy "
            "1 ≤ VA layers ≤ stage depth; value = depth means no LA in that stage.)"
        ),
        description=(
            "VA layers per stage (all-VA baseline → default split → one VA per stage), 3 seeds each"
        ),
        parameters={"model.num_va_layers": va_layer_values},
        parameter_note="{arch} depths are {depths}.",
        args_note="a list is rendered `--model.num_va_layers=[1, 2, 1, 1]`, which the CLI parses",
    ),
    Ablation(
        file="dp_loss",
        name="lavit-dp-loss",
        title=(
            "Ablation 2 (docs/spec.md §4, question 2): does the Diagonality Preserving (DP) loss help, at which "
            "weight λ, and with which sign of its diagonal term?"
        ),
        question=(
            "top-1 of `CE + λ·DP` for λ = 0 (off) and λ over four decades, for the `corrected` "
            "variant (penalises off-diagonal mass exceeding the diagonal) and the `paper` variant "
            "(the printed sign, which lowers the diagonal). The two λ = 0 rows are the same model "
            "(DP off) with the same seeds: on a CPU they repeat each other exactly (a determinism "
            "check), so the seed noise the other rows must beat is the ± std over seeds."
        ),
        description=(
            "DP loss weight λ (0 = off, 1e-3 … 1) × variant (corrected / paper), 3 seeds each"
        ),
        parameters={
            "model.dp_loss_weight": [0.0, 0.001, 0.01, 0.1, 1.0],
            "model.dp_loss_variant": ["corrected", "paper"],
        },
    ),
    Ablation(
        file="residual_downsample",
        name="lavit-residual-downsample",
        title="Ablation 3 (docs/spec.md §4, question 3): does residual attention downsampling help?",
        question=(
            "with it on, the first attention of stages 2–4 adds the (downsampled) last attention "
            "of the previous stage; with it off, every stage starts its attention from scratch. "
            "What does it add to top-1, and what does it cost in parameters, MACs and throughput?"
        ),
        description="residual attention downsampling on / off, 3 seeds each",
        parameters={"model.residual_attn_downsample": [True, False]},
        args_note="booleans as `True`/`False`",
    ),
    Ablation(
        file="la_init_state",
        name="lavit-la-init-state",
        title=(
            "Ablation 4 (docs/spec.md §4, question 4): how should the Less-Attention transforms start, and what "
            "should they transform?"
        ),
        question=(
            "Ψ/Θ initialised to the identity (an LA layer starts as exact reuse of the previous "
            "attention) or at random, crossed with the state handed to the first LA layer: the "
            "pre-softmax scores (default) or the post-softmax attention (the paper's literal "
            "reading). Which combination trains best?"
        ),
        description=(
            "Ψ/Θ initialisation (identity / random) × state passed on (scores / probs), "
            "3 seeds each"
        ),
        parameters={
            "model.la_init": ["identity", "random"],
            "model.attn_state": ["scores", "probs"],
        },
    ),
)

HEADER_WIDTH = 100


def _comment(text: str, first: str = "") -> list[str]:
    """``text`` as ``# `` lines of at most HEADER_WIDTH characters, the first led by ``first``."""
    words, lines, line = (first + text).split(), [], "#"
    for word in words:
        if len(line) + 1 + len(word) > HEADER_WIDTH and line != "#":
            lines.append(line)
            line = "#"
        line += " " + word
    return [*lines, line]


def _flow(value: Any) -> str:
    """A value as YAML flow text (``[1, 2]``, ``true``, ``0.001``, ``corrected``)."""
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...")


def render(ablation: Ablation, scale: Scale) -> str:
    """The sweep file of ``ablation`` at ``scale``, as text."""
    path = f"sweeps/{scale.folder + '/' if scale.folder else ''}{ablation.file}.yaml"
    config = LAVIT_CONFIGS[scale.arch]
    lines = [
        "# Generated by scripts/generate_sweeps.py from its ABLATIONS table: change that and rerun",
        "# it (tests/test_sweeps.py fails while a file is stale).",
        "#",
        *_comment(ablation.title),
        *_comment(ablation.question, "Question: "),
        "#",
        *_comment(scale.runs_on, "Runs on: "),
        *_comment(scale.other_scale.format(file=f"{ablation.file}.yaml")),
        "#",
        *_comment(
            f"Launch: `wandb sweep {path}` then `wandb agent <id>`, or offline: `lavit sweep "
            f'{path}` (see README, "Ablation sweeps").'
        ),
        f"name: {ablation.name}{scale.name_suffix}",
        f"description: {ablation.description}",
        "project: lavit",
        "program: lavit/__main__.py  # informational: the command below runs `python -m lavit`",
        "method: grid",
        "metric:",
        "  name: val/top1",
        "  goal: maximize",
        "parameters:",
    ]
    if ablation.parameter_note:
        note = ablation.parameter_note.format(arch=scale.arch, depths=tuple(config["depths"]))
        lines += ["  " + line for line in _comment(note)]
    for name, values in ablation.parameters.items():
        lines += [f"  {name}:"]
        if callable(values):
            lines += ["    values:"]
            lines += [
                f"      - {_flow(value)}  # {comment}" for value, comment in values(scale.arch)
            ]
        else:
            lines += [f"    values: {_flow(values)}"]
    lines += ["  seed_everything:", f"    values: {_flow(SEEDS)}"]
    args_note = f"; {ablation.args_note}" if ablation.args_note else ""
    lines += _comment(
        f"The agent appends the swept values as `--key=value` arguments (W&B's `${{args}}`"
        f"{args_note}). `${{interpreter}}` is the `python` on PATH: activate the project's "
        "environment before `wandb agent`."
    )
    command = ["${env}", "${interpreter}", "-m", "lavit", "fit"]
    for config_file in scale.configs:
        command += ["--config", config_file]
    command += [*scale.extra_args, "${args}"]
    lines += ["command:", *(f"  - {token}" for token in command)]
    return "\n".join(lines) + "\n"


def sweep_files(root: Path = REPO) -> dict[Path, str]:
    """Every sweep file this script writes: path → text."""
    files = {}
    for scale in SCALES:
        folder = root / "sweeps" / scale.folder
        for ablation in ABLATIONS:
            files[folder / f"{ablation.file}.yaml"] = render(ablation, scale)
    return files


def stale_files(root: Path = REPO) -> list[str]:
    """Committed files that differ from what would be written, or that nothing writes."""
    expected = sweep_files(root)
    stale = [
        str(path.relative_to(root))
        for path, text in expected.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]
    written = set(expected)
    for scale in SCALES:
        for path in sorted((root / "sweeps" / scale.folder).glob("*.yaml")):
            if path not in written:
                stale.append(f"{path.relative_to(root)} (not generated: remove it)")
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only list stale files (exit 1)")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for path in stale:
            print(f"stale: {path}")
        return 1 if stale else 0
    for path, text in sweep_files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
