"""The W&B sweep files in sweeps/ (CIFAR-10) and sweeps/imagenet/ (paper scale), checked without a
W&B server.

Both scales are written by ``scripts/generate_sweeps.py`` from one table; a committed file that
differs from what it writes fails here. For every sweep file: W&B's own schema (the ``sweeps``
package) accepts it; the engine proposes its runs locally; each proposed run's command is expanded
as ``wandb agent`` expands it and used as it is, with the Hub datasets it names read from a local
copy through ``LAVIT_LOCAL_DATASETS`` (the embedded CIFAR-10 subset stands in for CIFAR-10 and
ImageNet), and

* every proposal is parsed in-process by the CLI (``run=False``), asserting that each swept value
  reached the built model (a parameter that does not reach it fails the test);
* one proposal per CIFAR-10 file (the last grid point, the furthest from the defaults), and one of
  the paper-scale va_layers file, runs for real through ``python -m lavit`` with
  ``--trainer.fast_dev_run=true`` (the subprocesses run together).
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import REPO

from lavit.models import LAVIT_CONFIGS
from lavit.models.attention import AttentionDownsample
from lavit.models.lavit import LaViTBlock
from lavit.models.token_mixing import DenseTokenMixing
from lavit.tools.sweep_engine import agent_command, load_sweep_config, replace_configs, run_values
from lavit.training.sources import LOCAL_DATASETS_ENV, embedded_dataset_dir

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # sweeps' pydantic-v1-style config warns on import
    import sweeps

CIFAR_FILES = sorted((REPO / "sweeps").glob("*.yaml"))
PAPER_FILES = sorted((REPO / "sweeps" / "imagenet").glob("*.yaml"))
SWEEP_FILES = CIFAR_FILES + PAPER_FILES
EXPECTED_SWEEPS = {"va_layers", "dp_loss", "residual_downsample", "la_init_state"}
CIFAR_CONFIGS = ["--config", "experiments/cifar10.yaml"]
PAPER_CONFIGS = [
    "--config",
    "experiments/base.yaml",
    "--config",
    "experiments/imagenet/lavit_tiny.yaml",
    "--trainer.devices=8",
    "--trainer.strategy=ddp",
]
# The embedded subset stands in for the full datasets, as a machine's local copy of them.
LOCAL_COPIES = (
    f"uoft-cs/cifar10={embedded_dataset_dir()},ILSVRC/imagenet-1k={embedded_dataset_dir()}"
)
GENERATOR = REPO / "scripts" / "generate_sweeps.py"
SEED = "seed_everything"
RANDOM_PROPOSALS = 4  # proposals checked for a random/bayes sweep (a grid: all of them)


def ids(paths: list[Path]) -> list[str]:
    return [str(p.relative_to(REPO / "sweeps").with_suffix("")) for p in paths]


def is_paper_scale(path: Path) -> bool:
    return path.parent.name == "imagenet"


def proposals(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The runs W&B's engine proposes: the whole grid, or a few random/bayes draws."""
    runs: list = []
    limit = None if config["method"] == "grid" else RANDOM_PROPOSALS
    while limit is None or len(runs) < limit:
        run = sweeps.next_run(config, runs)
        if run is None:
            break
        runs.append(run)
    return [run.config for run in runs]


def offline_command(config: dict[str, Any], run_config: dict[str, Any]) -> list[str]:
    """What ``wandb agent`` would run, as it is (``LAVIT_LOCAL_DATASETS`` supplies the data)."""
    return agent_command(config.get("command"), run_config, config.get("program"), "python")


def cli_args(command: list[str]) -> list[str]:
    """The arguments after ``python -m lavit fit`` (what the CLI's parser receives)."""
    assert command[:5] == ["/usr/bin/env", "python", "-m", "lavit", "fit"], command
    return command[5:]


# --- what "reached the model" means, per switch -------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return float(value)


def _check_num_va_layers(net: torch.nn.Module, value: list[int]) -> None:
    for stage, va in zip(net.stages, value, strict=True):
        blocks = list(stage.blocks)
        kinds = [b.kind for b in blocks]
        assert kinds == ["va"] * va + ["la"] * (len(blocks) - va), (kinds, value)
        assert all(isinstance(b, LaViTBlock) for b in blocks)


def _check_residual(net: torch.nn.Module, value: bool) -> None:
    has_downsample = any(isinstance(m, AttentionDownsample) for m in net.modules())
    assert has_downsample == value


def _check_la_init(net: torch.nn.Module, value: str) -> None:
    transforms = [m for m in net.modules() if isinstance(m, DenseTokenMixing)]
    assert transforms, "no LA layer: la_init cannot be seen in this model"
    for m in transforms:
        identity = torch.equal(m.psi, torch.eye(len(m.psi))) and torch.equal(
            m.theta, torch.eye(len(m.theta))
        )
        assert identity == (value == "identity")


def _check_attn_state(net: torch.nn.Module, value: str) -> None:
    assert all(stage.attn_state == value for stage in net.stages)


STRUCTURE_CHECKS = {
    "num_va_layers": _check_num_va_layers,
    "residual_attn_downsample": _check_residual,
    "la_init": _check_la_init,
    "attn_state": _check_attn_state,
}


def assert_values_reached(built: Any, values: dict[str, Any]) -> None:
    """Every swept value is in the built model (or, for the seed, in the RNG); else AssertionError."""
    net = built.model.model
    for name, value in values.items():
        if name == SEED:
            assert built.config.seed_everything == value and torch.initial_seed() == value
            continue
        switch = name.removeprefix("model.")
        assert name.startswith("model.") and hasattr(net, switch), (
            f"swept parameter {name!r} does not reach the model (the built {type(net).__name__} "
            f"has no attribute {switch!r})"
        )
        assert _plain(getattr(net, switch)) == _plain(value), (name, getattr(net, switch), value)
        if switch in STRUCTURE_CHECKS:
            STRUCTURE_CHECKS[switch](net, value)


@pytest.fixture(autouse=True)
def quiet_single_thread(monkeypatch):
    """The CLI gets its arguments from the tests, not pytest's argv; tiny models run on one
    thread, immune to the parallel subprocesses of other tests; the datasets are local copies."""
    monkeypatch.setattr(sys, "argv", ["lavit"])
    monkeypatch.setenv(LOCAL_DATASETS_ENV, LOCAL_COPIES)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build_in_process(args: list[str], run_dir: Path):
    from lavit.cli import LaViTCLI

    return LaViTCLI(
        args=[*args, f"--trainer.default_root_dir={run_dir}", "--trainer.logger=false"], run=False
    )


# --- the files ----------------------------------------------------------------------------------


def test_one_sweep_file_per_ablation_at_each_scale():
    assert {p.stem for p in CIFAR_FILES} == EXPECTED_SWEEPS
    assert {p.stem for p in PAPER_FILES} == EXPECTED_SWEEPS


def test_the_committed_files_are_what_the_generator_writes(monkeypatch):
    spec = importlib.util.spec_from_file_location("generate_sweeps", GENERATOR)
    generator = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, generator)  # its dataclasses look it up there
    spec.loader.exec_module(generator)
    assert generator.stale_files(REPO) == [], "run: python scripts/generate_sweeps.py"
    assert set(generator.sweep_files(REPO)) == set(SWEEP_FILES)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=ids(SWEEP_FILES))
def test_sweep_file_is_valid_for_wandb_and_documented(path: Path):
    config = load_sweep_config(path)  # raises on any schema violation
    sweeps.SweepConfig(config)  # what `wandb sweep` itself builds
    assert config["metric"] == {"name": "val/top1", "goal": "maximize"}
    seeds = config["parameters"][SEED]["values"]
    assert len(seeds) >= 3 and len(set(seeds)) == len(seeds)
    assert [name for name in config["parameters"] if name != SEED], "nothing is swept"
    command = config["command"]
    configs = PAPER_CONFIGS if is_paper_scale(path) else CIFAR_CONFIGS
    assert command[:5] == ["${env}", "${interpreter}", "-m", "lavit", "fit"]
    assert command[5:-1] == configs and command[-1] == "${args}"
    for name in configs[1::2][: 2 if is_paper_scale(path) else 1]:
        assert (REPO / name).is_file()
    text = path.read_text(encoding="utf-8")
    header = text.split("\nname:")[0]
    other = f"sweeps/{path.name}" if is_paper_scale(path) else f"sweeps/imagenet/{path.name}"
    runs_on = "Runs on: " + " + ".join(configs[1::2][: 2 if is_paper_scale(path) else 1])
    for marker in ("Question:", runs_on, other):
        assert marker in header, f"{path.name}: the header comment lacks {marker!r}"


@pytest.mark.parametrize("path", PAPER_FILES, ids=ids(PAPER_FILES))
def test_paper_scale_is_the_same_grid_on_lavit_tiny_with_the_spec_recipe(path: Path):
    cifar, paper = load_sweep_config(REPO / "sweeps" / path.name), load_sweep_config(path)
    assert {k: v for k, v in paper.items() if k not in ("name", "command", "parameters")} == {
        k: v for k, v in cifar.items() if k not in ("name", "command", "parameters")
    }
    assert paper["name"] == cifar["name"] + "-imagenet"
    assert paper["parameters"].keys() == cifar["parameters"].keys()
    for name, spec in paper["parameters"].items():
        if name != "model.num_va_layers":
            assert spec == cifar["parameters"][name]
            continue
        # The same four cases, for each variant's depths: all VA, LA in stage 4 only, the
        # default split, one VA per stage.
        for values, arch in (
            (spec["values"], "lavit_tiny"),
            (cifar["parameters"][name]["values"], "lavit_cifar"),
        ):
            depths = list(LAVIT_CONFIGS[arch]["depths"])
            default = list(LAVIT_CONFIGS[arch]["num_va_layers"])
            assert values == [depths, depths[:-1] + [1], default, [1, 1, 1, 1]]

    def layered(*names: str) -> dict:
        merged: dict = {}
        for name in names:
            merged = deep_merge(merged, yaml.safe_load((REPO / "experiments" / name).read_text()))
        merged.pop(SEED, None)
        return merged

    # cifar10.yaml with lavit_tiny.yaml layered on is the same recipe (every setting overridden).
    recipe = layered("base.yaml", "imagenet/lavit_tiny.yaml")
    assert layered("cifar10.yaml", "imagenet/lavit_tiny.yaml") == recipe
    assert recipe["model"]["arch"] == "lavit_tiny" and recipe["data"]["img_size"] == 224
    # SPEC §5: AdamW lr 5e-4 × batch/512, wd 0.05, 5 warm-up epochs, 300 epochs, RandAugment,
    # Mixup 0.8, CutMix 1.0, label smoothing 0.1, random erasing 0.25, stochastic depth 0.1
    # (T), evaluation crop 0.875; ImageNet-1K.
    model, data = recipe["model"], recipe["data"]
    assert recipe["trainer"]["max_epochs"] == 300 and data["source"] == "ILSVRC/imagenet-1k"
    assert (model["lr"], model["scale_lr_by_batch"], model["weight_decay"]) == (5e-4, True, 0.05)
    assert (model["warmup_epochs"], model["label_smoothing"], model["drop_path_rate"]) == (
        5,
        0.1,
        0.1,
    )
    assert (model["mixup_alpha"], model["cutmix_alpha"]) == (0.8, 1.0)
    assert data["auto_augment"] == "rand-m9-mstd0.5-inc1" and data["re_prob"] == 0.25
    assert data["crop_pct"] == 0.875


def deep_merge(base: dict, update: dict) -> dict:
    """Config layering as jsonargparse does it: mappings merge, everything else is replaced."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def test_agent_command_expands_like_wandb_agent():
    run_config = {
        "model.num_va_layers": {"value": [1, 2, 1, 1]},
        "model.residual_attn_downsample": {"value": False},
        "model.dp_loss_weight": {"value": 0.001},
    }
    template = ["${env}", "${interpreter}", "${program}", "--config", "c.yaml", "${args}"]
    assert agent_command(template, run_config, "train.py", "python") == [
        "/usr/bin/env",
        "python",
        "train.py",
        "--config",
        "c.yaml",
        "--model.num_va_layers=[1, 2, 1, 1]",  # W&B renders lists with spaces
        "--model.residual_attn_downsample=False",
        "--model.dp_loss_weight=0.001",
    ]
    assert agent_command(None, run_config, "train.py")[:3] == ["/usr/bin/env", "python", "train.py"]
    assert (
        agent_command(["x", "${args_no_hyphens}"], run_config)[1]
        == "model.num_va_layers=[1, 2, 1, 1]"
    )
    assert replace_configs(["a", "--config", "x.yaml", "--config=y.yaml", "--k=1"], ["b.yaml"]) == [
        "a",
        "--config",
        "b.yaml",
        "--k=1",
    ]


@pytest.mark.parametrize(
    "path",
    [*CIFAR_FILES, *(pytest.param(p, marks=pytest.mark.slow) for p in PAPER_FILES)],  # 224²: slow
    ids=ids(SWEEP_FILES),
)
def test_every_proposed_run_reaches_the_model(path: Path, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_sweep_config(path)
    runs = proposals(config)
    if config["method"] == "grid":
        expected = 1
        for spec in config["parameters"].values():
            expected *= len(spec.get("values", [spec.get("value")]))
        assert len(runs) == expected
    for run_config in runs:
        built = build_in_process(cli_args(offline_command(config, run_config)), tmp_path)
        assert_values_reached(built, run_values(run_config))


def test_a_parameter_that_does_not_reach_the_model_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_sweep_config(REPO / "sweeps" / "residual_downsample.yaml")
    config["parameters"] = {"model.lr": {"values": [1e-3]}}  # the optimiser's, not the model's
    (run_config,) = proposals(config)
    built = build_in_process(cli_args(offline_command(config, run_config)), tmp_path)
    with pytest.raises(AssertionError, match="does not reach the model"):
        assert_values_reached(built, run_values(run_config))


# --- one real run per sweep file ----------------------------------------------------------------

REAL_RUN_FILES = CIFAR_FILES + [REPO / "sweeps" / "imagenet" / "va_layers.yaml"]
# A paper-scale run on one CPU process, with small images and batches: the command is the file's.
PAPER_SCALE_ON_A_CPU = [
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--data.img_size=64",
    "--data.batch_size=4",
    "--data.val_split=test",  # the embedded stand-in has train and test splits only
    "--data.test_split=test",
]


@pytest.fixture(scope="module")
def real_runs(tmp_path_factory) -> dict[str, dict[str, Any]]:
    """The last proposal of each file through ``python -m lavit`` (fast_dev_run), as the file's
    command runs it, all started together: each costs ~10 s of imports, which then overlap."""
    root = tmp_path_factory.mktemp("sweep_runs")
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(root / "wandb"),
        "WANDB_CACHE_DIR": str(root / "wandb_cache"),
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        LOCAL_DATASETS_ENV: LOCAL_COPIES,
    }
    env.pop("WANDB_API_KEY", None)
    env.pop("WANDB_RUN_ID", None)
    started = {}
    for path, name in zip(REAL_RUN_FILES, ids(REAL_RUN_FILES), strict=True):
        config = load_sweep_config(path)
        run_config = proposals(config)[-1]
        command = agent_command(
            config["command"], run_config, config.get("program"), sys.executable
        )
        run_dir = root / name
        command += [
            *(PAPER_SCALE_ON_A_CPU if is_paper_scale(path) else []),
            "--trainer.fast_dev_run=true",
            "--data.num_workers=0",
            "--attention_maps.num_images=0",
            f"--trainer.default_root_dir={run_dir}",
        ]
        log_path = root / f"{name.replace('/', '-')}.log"
        log = open(log_path, "w")  # noqa: SIM115 (closed below)
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        started[name] = (process, log, log_path, run_dir, run_values(run_config))
    results = {}
    for name, (process, log, log_path, run_dir, values) in started.items():
        returncode = process.wait(timeout=300)
        log.close()
        results[name] = {
            "returncode": returncode,
            "log": log_path.read_text(errors="replace"),
            "run_dir": run_dir,
            "values": values,
        }
    return results


@pytest.mark.slow
@pytest.mark.parametrize("path", REAL_RUN_FILES, ids=ids(REAL_RUN_FILES))
def test_a_proposed_run_trains_through_the_real_command(path: Path, real_runs):
    result = real_runs[ids([path])[0]]
    assert result["returncode"] == 0, result["log"][-3000:]
    info = json.loads((result["run_dir"] / "run_info.json").read_text())
    assert "val/top1" in info["final"]["metrics"]
    for name, value in result["values"].items():
        section, _, key = name.rpartition(".")
        logged = info["config"][section][key] if section else info["config"][key]
        assert _plain(logged) == _plain(value), (name, logged, value)
