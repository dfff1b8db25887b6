"""Tests of the command line: the real entry point, every switch, bad values, tools, loggers."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from lightning.pytorch.loggers import CSVLogger

from lavit import cli
from lavit.cli import LaViTCLI, main
from lavit.training.logging import (
    FallbackWandbLogger,
    WandbOptions,
    default_loggers,
    resolve_wandb_mode,
)
from lavit.training.secrets import redact_secrets

FAST_DATA = ["--data.img_size=32", "--data.num_workers=0", "--data.batch_size=8"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models: one thread is as fast, and immune to other processes on a 2-core machine."""
    monkeypatch.setattr(sys, "argv", ["lavit"])  # the CLI gets its arguments from the tests
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parse(tmp_path, *args: str) -> LaViTCLI:
    """Build model, data and trainer from CLI arguments without running anything."""
    return LaViTCLI(
        args=[
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            *FAST_DATA,
            *args,
        ],
        run=False,
    )


@pytest.mark.slow
def test_fit_fast_dev_run_through_the_entry_point(tmp_path):
    env = {
        **os.environ,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "OMP_NUM_THREADS": "1",
        "LAVIT_CPU_TUNING": "1",  # the default outside the tests
    }
    env.pop("WANDB_API_KEY", None)
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable, "-m", "lavit", "fit",
            "--config", "experiments/base.yaml",
            "--trainer.fast_dev_run=true",
            f"--trainer.default_root_dir={run_dir}",
            "--data.num_workers=0",
        ],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["final"]["global_step"] == 1  # one optimizer step was taken
    assert info["arch"] == "lavit_cifar" and info["macs"] > 0 and info["params"] > 0
    assert info["config"]["model"]["arch"] == "lavit_cifar"
    assert info["cpu_tuning"]["flush_denormal"] is True  # lavit.runtime ran before the model
    # what a result table needs to state its cost: the CPU, the threads, wall and CPU seconds
    assert info["cpu"] and info["torch_threads"] == 1
    assert 0 < info["final"]["wall_s"] < 300 and info["final"]["cpu_s"] > 0
    assert not (run_dir / "checkpoints").exists()  # a dry run leaves no `last` to resume from


def count_la_blocks(model) -> list[int]:
    return [sum(b.kind == "la" for b in stage.blocks) for stage in model.stages]


def test_default_switches_reach_the_model(tmp_path):
    built = parse(tmp_path)
    model = built.model.model
    assert model.num_classes == 10 and model.img_size == (32, 32)  # linked from the data
    assert count_la_blocks(model) == [0, 0, 2, 1]  # lavit_cifar: depths 1,2,3,2, VA 1,2,1,1
    assert [s.attn_downsample is not None for s in model.stages] == [False, True, True, True]
    psi = model.stages[2].blocks[1].attn.token_mixing.psi
    torch.testing.assert_close(psi, torch.eye(len(psi)))
    assert model.stages[2].attn_state == "scores"
    assert (model.dp_loss_variant, model.dp_loss_layers, model.dp_loss_weight) == (
        "corrected",
        "la",
        0.0,
    )
    assert built.model.ema is None and built.model.mixup is None
    assert built.trainer.checkpoint_callback.dirpath == str(tmp_path / "checkpoints")


def test_every_switch_given_as_an_argument_reaches_the_model(tmp_path):
    built = parse(
        tmp_path,
        "--model.num_va_layers=[1, 1, 1, 1]",  # W&B agents render lists with spaces
        "--model.residual_attn_downsample=false",
        "--model.la_init=random",
        "--model.attn_state=probs",
        "--model.dp_loss_variant=paper",
        "--model.dp_loss_layers=all",
        "--model.dp_loss_weight=0.5",
        "--model.drop_path_rate=0.2",
        "--model.drop_rate=0.1",
        "--model.model_kwargs={mlp_ratios: [2, 2, 2, 2]}",
        "--model.ema_decay=0.99",
        "--model.mixup_alpha=0.8",
        "--model.lr=1e-3",
    )
    model = built.model.model
    assert count_la_blocks(model) == [0, 1, 2, 1]
    assert all(s.attn_downsample is None for s in model.stages)
    psi = model.stages[2].blocks[1].attn.token_mixing.psi
    assert not torch.allclose(psi, torch.eye(len(psi)))
    assert all(s.attn_state == "probs" for s in model.stages)
    assert (model.dp_loss_variant, model.dp_loss_layers, model.dp_loss_weight) == (
        "paper",
        "all",
        0.5,
    )
    assert model.stages[-1].blocks[-1].drop_path1.drop_prob == pytest.approx(0.2)
    assert model.head_drop.p == 0.1
    assert model.stages[0].blocks[0].mlp.fc1.out_features == 2 * 32
    assert built.model.ema is not None and built.model.mixup is not None
    assert built.model.hparams.lr == 1e-3


def test_a_timm_baseline_from_the_command_line(tmp_path):
    built = parse(tmp_path, "--model.arch=pvt_v2_b0", "--model.drop_path_rate=0.1")
    assert not built.model.is_lavit
    assert type(built.model.model).__name__ == "PyramidVisionTransformerV2"
    assert built.model.model.num_classes == 10


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("--model.la_init=foo", "--model.la_init: invalid value foo"),
        ("--model.num_va_layers=[9,9,9,9]", "num_va_layers[0] = 9 is not allowed"),
        ("--model.arch=pvt_v2_b0", "unexpected keyword argument 'la_init'"),  # with la_init below
    ],
)
def test_a_bad_value_exits_with_one_line(tmp_path, capsys, argument, expected):
    extra = ["--model.la_init=random"] if "pvt" in argument else []
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", f"--trainer.default_root_dir={tmp_path}", *FAST_DATA, argument, *extra])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and expected in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_a_checkpoint_files_hyperparameters_do_not_override_the_command_line(tmp_path):
    """LightningCLI rebuilds the model from a --ckpt_path file's stored hyper-parameters, over
    the command line; LaViTCLI holds the path back until the config is final (this fails if
    Lightning moves that step past ``parse_arguments``)."""
    ckpt = tmp_path / "other.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"lr": 0.5, "arch": "pvt_v2_b0"}}, ckpt)

    class Parsed(Exception):
        pass

    class Probe(LaViTCLI):
        def before_instantiate_classes(self) -> None:
            super().before_instantiate_classes()
            raise Parsed(self.config.fit)

    args = ["fit", f"--trainer.default_root_dir={tmp_path}", *FAST_DATA, "--model.lr=1e-3"]
    with pytest.raises(Parsed) as parsed:
        Probe(args=[*args, f"--ckpt_path={ckpt}"])
    config = parsed.value.args[0]
    assert (config.model.lr, config.model.arch, config.ckpt_path) == (
        1e-3,
        "lavit_cifar",
        str(ckpt),
    )


def test_tools_are_dispatched_with_their_arguments(tmp_path, monkeypatch):
    (tmp_path / "fake_tool.py").write_text("def main(argv):\n    return len(argv)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.TOOL_COMMANDS, "bench", "fake_tool:main")
    with pytest.raises(SystemExit) as exit_info:
        main(["bench", "--a", "1", "b"])
    assert exit_info.value.code == 3
    assert set(cli.TOOL_COMMANDS) == {"bench", "analyze", "sweep", "report", "export"}


def test_wandb_mode_follows_env_and_credentials(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_MODE")
    assert resolve_wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password abc\n")
    (tmp_path / ".netrc").chmod(0o600)
    assert resolve_wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode() == "disabled"
    assert resolve_wandb_mode("offline") == "offline"  # an explicit choice wins


def test_loggers_keep_the_wandb_run_id_of_a_run_dir(tmp_path):
    first = default_loggers(tmp_path, WandbOptions(tags=["t"]))
    assert isinstance(first[0], CSVLogger) and isinstance(first[1], FallbackWandbLogger)
    run_id = first[1].version
    assert (tmp_path / "wandb_run_id").read_text().strip() == run_id
    assert default_loggers(tmp_path, resume=True)[1].version == run_id
    assert default_loggers(tmp_path, resume=False)[1].version != run_id
    assert len(default_loggers(tmp_path, WandbOptions(enabled=False))) == 1


def test_secrets_are_redacted_from_logged_configs():
    config = {"data": {"hf_token": "hf_x", "source": "a"}, "wandb": {"api_key": "k"}}
    assert redact_secrets(config) == {
        "data": {"hf_token": "<redacted>", "source": "a"},
        "wandb": {"api_key": "<redacted>"},
    }
