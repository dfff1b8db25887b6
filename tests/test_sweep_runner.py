"""``lavit sweep`` (the offline runner) and ``lavit report`` (the ablation table).

The runner's mechanics (crash, resume, interruption, bayes feedback, parallel slots) are tested
with a stand-in training program that takes the same arguments and writes the same files as
``python -m lavit fit`` in a fraction of a second; then a tiny grid goes through the real CLI.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from lavit.tools import report, sweep
from lavit.tools.sweep_engine import STATE_FILE, load_state

# Stands in for `python -m lavit fit`: `--key=value` arguments in, a CSV log in
# <default_root_dir>/version_0/metrics.csv and a run_info.json out. val/top1 peaks at x = 0.3
# and drops at the last epoch; x = 0.9 crashes; FAKE_SLEEP_AT=x makes that run hang.
FAKE_TRAIN = textwrap.dedent(
    """
    import csv, json, os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    x, seed = float(args["model.x"]), int(args.get("seed_everything", 0))
    if os.environ.get("FAKE_SLEEP_AT") == args["model.x"]:
        time.sleep(60)
    if x == 0.9:
        sys.exit("x = 0.9 diverges")
    run_dir = args["trainer.default_root_dir"]
    os.makedirs(run_dir + "/version_0")
    os.makedirs(run_dir + "/checkpoints")
    open(run_dir + "/checkpoints/last.ckpt", "wb").write(b"0" * 4096)
    top1 = 0.8 - (x - 0.3) ** 2 + 0.01 * seed
    with open(run_dir + "/version_0/metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "train/loss", "val/top1"])
        w.writerow([0, 10, 1.0, ""])
        w.writerow([0, 10, "", top1 - 0.1])
        w.writerow([1, 20, "", top1])
        w.writerow([2, 30, "", top1 - 0.02])
    info = {"params": 1000 + int(100 * x), "macs": 2_000_000, "throughput": 500.0,
            "config": {"model": {"arch": "fake"}}, "argv": sys.argv[1:]}
    json.dump(info, open(run_dir + "/version_0/run_info.json", "w"))
    """
)


@pytest.fixture
def fake_program(tmp_path) -> Path:
    path = tmp_path / "fake_train.py"
    path.write_text(FAKE_TRAIN)
    return path


def write_sweep(path: Path, program: Path, method: str, parameters: dict) -> Path:
    config = {
        "name": "fake-sweep",
        "program": str(program),
        "method": method,
        "metric": {"name": "val/top1", "goal": "maximize"},
        "parameters": parameters,
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def states(sweep_dir: Path) -> dict[str, str]:
    return {run.name: run.state for run in load_state(sweep_dir).runs}


def test_grid_with_a_crash_resumes_without_redoing_runs(tmp_path, fake_program, capsys):
    sweep_file = write_sweep(
        tmp_path / "grid.yaml",
        fake_program,
        "grid",
        # model.* sorts before the seed: the grid runs the seeds of a setting in a row
        {"model.x": {"values": [0.1, 0.3, 0.9]}, "seed_everything": {"values": [0, 1]}},
    )
    sweep_dir = tmp_path / "sweep"
    args = [str(sweep_file), "--sweep-dir", str(sweep_dir), "--override", "extra=1"]
    assert sweep.main([*args, "--count", "4", "--devices", "cpu,cpu"]) == 0
    assert states(sweep_dir) == {f"run-00{i}": "finished" for i in range(4)}
    first = {run.name: run.started_at for run in load_state(sweep_dir).runs}

    assert sweep.main(args) == 0  # resume: only the two runs left, both crash (x = 0.9)
    state = load_state(sweep_dir)
    assert {run.name: run.started_at for run in state.runs[:4]} == first  # not redone
    assert [run.state for run in state.runs[4:]] == ["failed", "failed"]
    assert state.runs[4].exitcode == 1
    assert "diverges" in (sweep_dir / state.runs[4].run_dir / "run.log").read_text()
    assert "resuming" in capsys.readouterr().out

    assert sweep.main(args) == 0  # all done: nothing starts
    assert len(load_state(sweep_dir).runs) == 6

    # Every run got its own directory, the expanded command and the overrides, run dir last.
    run = state.runs[0]
    assert run.command[:3] == ["/usr/bin/env", sys.executable, str(fake_program)]
    assert "--extra=1" in run.command and run.command[-1].startswith("--trainer.default_root_dir=")
    assert len({r.run_dir for r in state.runs}) == 6
    assert run.history and run.summary_metrics["val/top1"] == pytest.approx(0.76 - 0.02)

    # The table: one row per x, seeds averaged, the crashed setting counted as failed.
    results, metric = report.collect_local(sweep_dir)
    parameters, rows = report.summarise_runs(results, "best")
    assert metric == "val/top1" and parameters == ["model.x"]
    assert [row.values["model.x"] for row in rows] == [0.1, 0.3, 0.9]
    best_03 = [80.0, 81.0]  # the best epoch of seeds 0 and 1, in percent
    assert rows[1].top1 == pytest.approx(best_03) and rows[1].mean == pytest.approx(80.5)
    assert rows[1].std == pytest.approx(0.7071, abs=1e-3)
    assert rows[2].top1 == [] and rows[2].mean is None
    assert rows[0].params == 1010 and rows[0].throughput == 500.0
    _, final_rows = report.summarise_runs(results, "final")
    assert final_rows[1].mean == pytest.approx(78.5)

    out = tmp_path / "report"
    assert report.main([str(sweep_dir), "--out", str(out), "--no-bench"]) == 0
    markdown = (out / "ablation.md").read_text()
    assert "| x | params (M) | MACs (M) | top-1 % (best) | seeds | throughput (img/s) |" in markdown
    assert "| 0.3 | 0.001 | 2.0 | 80.50 ± 0.71 | 2 | 500 |" in markdown
    assert "| 0.9 | n/a | n/a | n/a | 0 (2 failed) | n/a |" in markdown
    with open(out / "ablation.csv", newline="") as stream:
        table = list(csv.DictReader(stream))
    assert [row["x"] for row in table] == ["0.1", "0.3", "0.9"]
    assert float(table[1]["top1_best_mean"]) == pytest.approx(80.5)
    assert (out / "ablation.png").stat().st_size > 1000


@pytest.mark.slow
def test_an_interrupted_sweep_redoes_the_cut_run(tmp_path, fake_program):
    sweep_file = write_sweep(
        tmp_path / "grid.yaml", fake_program, "grid", {"model.x": {"values": [0.1, 0.2, 0.3]}}
    )
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable,
        "-m",
        "lavit",
        "sweep",
        str(sweep_file),
        "--sweep-dir",
        str(sweep_dir),
    ]
    env = {**os.environ, "FAKE_SLEEP_AT": "0.2"}
    runner = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (sweep_dir / STATE_FILE).exists() or states(sweep_dir).get("run-001") != "running":
        assert time.monotonic() < deadline, "the second run never started"
        time.sleep(0.2)
    runner.send_signal(signal.SIGTERM)  # as a scheduler or Ctrl-C would stop it
    assert runner.wait(timeout=30) == 130
    assert states(sweep_dir) == {"run-000": "finished", "run-001": "running"}

    assert sweep.main([str(sweep_file), "--sweep-dir", str(sweep_dir)]) == 0
    state = load_state(sweep_dir)
    assert [(r.name, r.state) for r in state.runs] == [
        ("run-000", "finished"),
        ("run-001", "finished"),  # redone, same name and directory
        ("run-002", "finished"),
    ]
    assert [r.config["model.x"]["value"] for r in state.runs] == [0.1, 0.2, 0.3]


def test_after_run_commits_each_finished_run_and_a_failing_hook_does_not_stop_the_sweep(
    tmp_path, fake_program, capsys
):
    sweep_file = write_sweep(
        tmp_path / "grid.yaml", fake_program, "grid", {"model.x": {"values": [0.1, 0.9, 0.3]}}
    )
    repo = tmp_path / "results"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    sweep_dir = repo / "sweep"
    # What the ablation script does: commit the sweep dir after each run (state file included).
    commit = (
        f'{" ".join(git)} add -- "$LAVIT_SWEEP_DIR" && {" ".join(git)} commit -q '
        '-m "$LAVIT_SWEEP_RUN $LAVIT_SWEEP_RUN_STATE" -- "$LAVIT_SWEEP_DIR"'
    )
    args = [str(sweep_file), "--sweep-dir", str(sweep_dir)]
    assert sweep.main([*args, "--count", "2", "--after-run", commit]) == 0  # a session ends
    log = subprocess.run([*git, "log", "--format=%s"], capture_output=True, text=True, check=True)
    assert log.stdout.split("\n")[:2] == ["run-001 failed", "run-000 finished"]
    # Each commit holds the state as it was when its run ended.
    first = subprocess.run(
        [*git, "show", f"HEAD~1:sweep/{STATE_FILE}"], capture_output=True, text=True, check=True
    )
    assert [r["state"] for r in json.loads(first.stdout)["runs"]] == ["finished"]
    tracked = subprocess.run([*git, "ls-files"], capture_output=True, text=True, check=True)
    assert "sweep/runs/run-000/version_0/metrics.csv" in tracked.stdout.split()

    # The next session starts from a fresh clone: the same command resumes where the last ended.
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    capsys.readouterr()
    in_clone = commit.replace(str(repo), str(clone))
    assert sweep.main([str(sweep_file), "--sweep-dir", str(clone / "sweep"), "--after-run", in_clone]) == 0  # fmt: skip
    assert "2 run(s) done, skipping them" in capsys.readouterr().out
    resumed = load_state(clone / "sweep")
    assert [r.state for r in resumed.runs] == ["finished", "failed", "finished"]
    assert resumed.runs[0].started_at == load_state(sweep_dir).runs[0].started_at  # not redone
    log = subprocess.run(["git", "-C", str(clone), "log", "-1", "--format=%s"], capture_output=True, text=True, check=True)  # fmt: skip
    assert log.stdout.strip() == "run-002 finished"

    # A hook that fails (here: every time) is reported, and every run still happens.
    other = tmp_path / "other"
    argv = [str(sweep_file), "--sweep-dir", str(other), "--after-run", "exit 3"]
    assert sweep.main([*argv, "--delete-checkpoints"]) == 0
    state = load_state(other)
    assert [r.state for r in state.runs] == ["finished", "failed", "finished"]
    assert capsys.readouterr().out.count("--after-run exited with 3") == 3
    # --delete-checkpoints: the finished runs' checkpoints are gone, their logs stay
    assert not (other / state.runs[0].run_dir / "checkpoints").exists()
    assert (other / state.runs[0].run_dir / "version_0" / "metrics.csv").is_file()
    assert (sweep_dir / state.runs[0].run_dir / "checkpoints" / "last.ckpt").is_file()  # kept


def test_bayes_sweep_feeds_metrics_back(tmp_path, fake_program):
    sweep_file = write_sweep(
        tmp_path / "bayes.yaml",
        fake_program,
        "bayes",
        {"model.x": {"distribution": "uniform", "min": 0.0, "max": 0.8}},
    )
    sweep_dir = tmp_path / "sweep"
    assert sweep.main([str(sweep_file), "--sweep-dir", str(sweep_dir)]) == 2  # needs --count
    assert sweep.main([str(sweep_file), "--sweep-dir", str(sweep_dir), "--count", "4"]) == 0
    state = load_state(sweep_dir)
    assert [run.state for run in state.runs] == ["finished"] * 4
    for run in state.runs:  # what the engine sees of each run: its best val/top1
        x = run.config["model.x"]["value"]
        best = run.to_sweep_run().metric_extremum("val/top1", "maximum")
        assert best == pytest.approx(0.8 - (x - 0.3) ** 2)


def test_runner_refuses_another_sweep_or_runner_in_the_same_dir(tmp_path, fake_program):
    sweep_dir = tmp_path / "sweep"
    first = write_sweep(tmp_path / "a.yaml", fake_program, "grid", {"model.x": {"values": [0.1]}})
    second = write_sweep(tmp_path / "b.yaml", fake_program, "grid", {"model.x": {"values": [0.2]}})
    assert sweep.main([str(first), "--sweep-dir", str(sweep_dir)]) == 0
    assert sweep.main([str(second), "--sweep-dir", str(sweep_dir)]) == 2
    json.loads((sweep_dir / STATE_FILE).read_text())  # still intact
    running = sweep.SweepRunner(first, sweep_dir, ["cpu"], None, [])  # holds the sweep dir
    try:
        assert sweep.main([str(first), "--sweep-dir", str(sweep_dir)]) == 2
    finally:
        running.close()
    assert sweep.main([str(first), "--sweep-dir", str(sweep_dir)]) == 0


def test_report_without_the_network_fails_fast(monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    started = time.monotonic()
    assert report.main(["--wandb-sweep", "entity/project/abc123"]) == 2
    assert "lavit report: error: --wandb-sweep needs the W&B API" in capsys.readouterr().err
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there
    assert report.main(["--wandb-sweep", "entity/project/abc123"]) == 2
    assert "lavit report: error: cannot reach W&B: " in capsys.readouterr().err
    assert time.monotonic() - started < 10


# --- a tiny grid through the real CLI -----------------------------------------------------------


@pytest.mark.slow
def test_real_sweep_with_a_crash_resume_and_report(tmp_path, monkeypatch):
    """Three settings of `python -m lavit fit` on the embedded data, fast_dev_run; the third
    (0 VA layers in stage 1) is rejected by the model and exits non-zero."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb_cache"))
    sweep_file = tmp_path / "tiny.yaml"
    config = yaml.safe_load((REPO / "sweeps" / "va_layers.yaml").read_text())
    config["parameters"] = {
        "model.num_va_layers": {"values": [[1, 1, 1, 1], [1, 2, 3, 2], [0, 2, 1, 1]]},
        "seed_everything": {"value": 0},
    }
    sweep_file.write_text(yaml.safe_dump(config))
    sweep_dir = tmp_path / "sweep"
    args = [
        str(sweep_file),
        "--sweep-dir", str(sweep_dir),
        "--config", "experiments/base.yaml",  # instead of the sweep's full CIFAR-10 config
        "--override", "trainer.fast_dev_run=true",
        "--override", "data.num_workers=0",
        "--override", "attention_maps.num_images=0",
    ]  # fmt: skip
    assert sweep.main([*args, "--count", "2", "--devices", "cpu,cpu"]) == 0
    assert states(sweep_dir) == {"run-000": "finished", "run-001": "finished"}
    assert sweep.main(args) == 0  # resume: only the third setting runs, and fails
    state = load_state(sweep_dir)
    assert [run.state for run in state.runs] == ["finished", "finished", "failed"]
    log = (sweep_dir / state.runs[2].run_dir / "run.log").read_text()
    assert "num_va_layers[0] = 0 is not allowed" in log

    out = tmp_path / "report"
    assert report.main([str(sweep_dir), "--out", str(out), "--bench-batch", "4"]) == 0
    lines = (out / "ablation.md").read_text().splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| [")]
    assert [row[0] for row in rows] == ["| [1, 1, 1, 1]", "| [1, 2, 3, 2]", "| [0, 2, 1, 1]"]
    for row in rows[:2]:  # params, MACs, top-1 of the one seed, n = 1, a measured throughput
        assert float(row[1]) > 0 and float(row[2]) > 0
        assert 0.0 <= float(row[3]) <= 100.0 and row[4] == "1" and float(row[5].strip(" |")) > 0
    assert float(rows[0][2]) < float(rows[1][2])  # LA layers save MACs against all-VA
    assert rows[2][3:5] == ["n/a", "0 (1 failed)"]


def test_report_reads_a_wandb_sweep_through_the_api(monkeypatch):
    """The online path, with wandb.Api replaced by a stand-in holding two runs of one setting."""
    import wandb

    class Run:
        def __init__(self, name, seed, series, state="finished"):
            self.name, self.state, self.summary = name, state, {"val/top1": (series or [None])[-1]}
            self.config = {
                "seed_everything": seed,
                "config": {"model": {"residual_attn_downsample": False, "arch": "lavit_cifar"}},
                "meta": {"params": 2_000_000, "macs": 30_000_000},
            }
            self.series = series

        def scan_history(self, keys):
            return [{"val/top1": v} for v in self.series]

    class Sweep:
        config = {
            "metric": {"name": "val/top1", "goal": "maximize"},
            "parameters": {
                "model.residual_attn_downsample": {"values": [False]},
                "seed_everything": {"values": [0, 1]},
            },
        }
        runs = [Run("a", 0, [0.5, 0.6, 0.55]), Run("b", 1, [0.5, 0.7]), Run("c", 2, [], "crashed")]

    class Api:
        def __init__(self, timeout=None):
            pass

        def sweep(self, path):
            assert path == "team/lavit/abc123"
            return Sweep()

    monkeypatch.setattr(report, "check_wandb_reachable", lambda: None)
    monkeypatch.setattr(wandb, "Api", Api)
    results, metric = report.collect_wandb("team/lavit/abc123")
    parameters, rows = report.summarise_runs(results, "best")
    assert metric == "val/top1" and parameters == ["model.residual_attn_downsample"]
    (row,) = rows
    assert row.values == {"model.residual_attn_downsample": False}
    assert row.top1 == pytest.approx([60.0, 70.0]) and row.params == 2_000_000
    assert [r.state for r in row.runs] == ["finished", "finished", "failed"]
