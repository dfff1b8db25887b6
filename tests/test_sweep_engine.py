"""``lavit sweep`` and W&B's packages: the optional engine, the private W&B import, and the sweep
file's ``early_terminate`` (hyperband) carried out by the engine's own ``stop_runs``."""

from __future__ import annotations

import argparse
import io
import sys
import textwrap
import types
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from lavit.tools import report, sweep, sweep_engine, sweep_runner
from lavit.tools.sweep_engine import load_state
from lavit.tools.sweep_status import LiveStatus, run_progress, sweep_eta
from lavit.units import format_duration

# Stands in for `python -m lavit fit`: one val/top1 row per epoch, flushed as it goes, 0.2 s per
# epoch; the run's level is 0.8 - (x - 0.3)^2, reached from below.
PROGRESSIVE_TRAIN = textwrap.dedent(
    """
    import csv, os, sys, time
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    x, epochs = float(args["model.x"]), int(args.get("epochs", 8))
    run_dir = args["trainer.default_root_dir"]
    os.makedirs(run_dir + "/version_0")
    open(run_dir + "/gpus.txt", "w").write(os.environ["CUDA_VISIBLE_DEVICES"])
    open(run_dir + "/version_0/config.yaml", "w").write(f"trainer:\\n  max_epochs: {epochs}\\n")
    level = 0.8 - (x - 0.3) ** 2
    with open(run_dir + "/version_0/metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "val/top1"])
        for epoch in range(epochs):
            time.sleep(0.2)
            w.writerow([epoch, 10 * (epoch + 1), level - 0.05 / (epoch + 1)])
            f.flush()
    """
)


def write_sweep(tmp_path: Path, values: list[float], **extra) -> Path:
    program = tmp_path / "train.py"
    program.write_text(PROGRESSIVE_TRAIN)
    config = {
        "name": "hyperband-sweep",
        "program": str(program),
        "method": "grid",
        "metric": {"name": "val/top1", "goal": "maximize"},
        "parameters": {"model.x": {"values": values}},
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
        **extra,
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.slow
def test_hyperband_early_terminate_stops_the_run_below_the_band(tmp_path, monkeypatch, capsys):
    """min_iter 2, eta 2: at 2, 4, ... validations a running run whose best so far is below the
    median of every run's value there is stopped. The third setting is the worst."""
    monkeypatch.setattr(sweep_runner, "EARLY_TERMINATE_INTERVAL_S", 0.1)
    hyperband = {"type": "hyperband", "min_iter": 2, "eta": 2}
    sweep_file = write_sweep(tmp_path, [0.3, 0.2, 0.0], early_terminate=hyperband)
    sweep_dir = tmp_path / "sweep"
    assert sweep.main([str(sweep_file), "--sweep-dir", str(sweep_dir)]) == 0
    runs = load_state(sweep_dir).runs
    assert [run.state for run in runs] == ["finished", "finished", "stopped"]
    assert [len(run.history) for run in runs[:2]] == [8, 8]
    assert 2 <= len(runs[2].history) < 8  # stopped once past the first band, before the end
    out = capsys.readouterr().out
    assert "run-002: stopped early by hyperband (Run: run-002" in out
    assert "run-002 stopped early in" in out and "1 stopped early" in out
    # A stopped run is done: resuming starts nothing, and the engine sees it as killed.
    assert sweep.main([str(sweep_file), "--sweep-dir", str(sweep_dir)]) == 0
    assert [run.state for run in load_state(sweep_dir).runs] == ["finished", "finished", "stopped"]
    assert runs[2].to_sweep_run().state == "killed"
    # The table leaves it out of the mean and says so.
    results, _ = report.collect_local(sweep_dir)
    _, rows = report.summarise_runs(results, "best")
    assert [len(row.top1) for row in rows] == [1, 1, 0]
    assert report.table_rows(["model.x"], rows, "best")[2]["seeds"] == "0 (1 stopped early)"


def test_a_bad_early_terminate_is_refused_before_any_run(tmp_path, capsys):
    """Valid for W&B's schema, but max_iter / eta leaves hyperband no band: said at once."""
    hyperband = {"type": "hyperband", "max_iter": 2, "eta": 3, "s": 1}
    sweep_file = write_sweep(tmp_path, [0.3], early_terminate=hyperband)
    assert sweep.main([str(sweep_file), "--sweep-dir", str(tmp_path / "sweep")]) == 2
    err = capsys.readouterr().err
    assert "sweep.yaml: early_terminate: Bands must be an array of length at least 1" in err
    assert not (tmp_path / "sweep").exists()


def test_without_the_sweep_extra_lavit_sweep_names_it(tmp_path, monkeypatch, capsys):
    sweep_file = write_sweep(
        tmp_path,
        [0.3],
    )
    sweep_dir = tmp_path / "sweep"
    assert sweep.main([str(sweep_file), "--sweep-dir", str(sweep_dir)]) == 0
    monkeypatch.setitem(sys.modules, "sweeps", None)  # `import sweeps` fails: not installed
    with pytest.raises(ImportError):
        import sweeps  # noqa: F401
    assert sweep.main([str(sweep_file), "--sweep-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "lavit[sweep]" in err and "pip install 'lavit[sweep]'" in err
    # Not installed, from the repository root: `import sweeps` finds the folder of sweep files.
    folder = types.ModuleType("sweeps")
    folder.__path__ = [str(REPO / "sweeps")]  # what a namespace package is
    monkeypatch.setitem(sys.modules, "sweeps", folder)
    assert sweep.main([str(sweep_file), "--sweep-dir", str(tmp_path / "other")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'lavit[sweep]'" in err and "found only the folder" in err
    # The report of a finished sweep does not need the engine.
    assert report.main([str(sweep_dir), "--out", str(tmp_path / "report"), "--no-bench"]) == 0
    assert "[report] 1 run(s) of hyperband-sweep: val/top1 of each" in capsys.readouterr().err


def test_a_wandb_without_its_private_sweep_helpers_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb.sdk.launch.sweeps.utils", None)
    with pytest.raises(
        sweep_engine.SweepEngineError, match=r"wandb\.sdk\.launch\.sweeps\.utils.*wandb=="
    ):
        sweep_engine.agent_command(["${args}"], {"model.x": {"value": 1}})


def test_a_device_slot_can_hold_several_gpus(tmp_path):
    """``--devices 0+1,2+3``: two slots, each run seeing its two GPUs (a multi-GPU run's DDP)."""
    assert sweep.parse_devices("0+1+2+3, cpu,5") == ["0+1+2+3", "cpu", "5"]
    with pytest.raises(argparse.ArgumentTypeError, match="GPU groups like 0"):
        sweep.parse_devices("0+x")
    sweep_file = write_sweep(tmp_path, [0.3, 0.2])
    sweep_dir = tmp_path / "sweep"
    args = [str(sweep_file), "--sweep-dir", str(sweep_dir), "--devices", "0+1,2+3"]
    assert sweep.main([*args, "--override", "epochs=1"]) == 0
    runs = load_state(sweep_dir).runs
    assert [run.device for run in runs] == ["0+1", "2+3"]
    assert [(sweep_dir / run.run_dir / "gpus.txt").read_text() for run in runs] == ["0,1", "2,3"]


def test_status_lines_off_a_terminal(tmp_path, capsys):
    """Not a terminal (pytest captures stdout): plain status lines every --status-every seconds,
    a summary (runs done of the total, ETA) and one line per slot (run k of N, its setting,
    epoch of max_epochs, the latest val/top1, its time); no escape codes."""
    sweep_file = write_sweep(tmp_path, [0.3, 0.2, 0.0])
    sweep_dir = tmp_path / "sweep"
    args = [str(sweep_file), "--sweep-dir", str(sweep_dir), "--devices", "cpu,cpu"]
    assert sweep.main([*args, "--status-every", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    summaries = [line for line in out.splitlines() if line.startswith("[sweep] hyperband-sweep:")]
    slots = [line for line in out.splitlines() if line.startswith("[sweep]   cpu: run ")]
    assert summaries[0].startswith("[sweep] hyperband-sweep: 0 of 3 runs done, 2 running, ")
    assert any("runs done, 1 running" in line and "ETA ?" not in line for line in summaries)
    assert any(line.startswith("[sweep]   cpu: run 3 of 3 (model.x=0.0): epoch ") for line in slots)
    # Mid-run: the epoch reached of the run's max_epochs and its latest val/top1 (level 0.8
    # - (x - 0.3)^2, approached from below).
    mid = [line for line in slots if "run 1 of 3 (model.x=0.3): epoch " in line and "/8" in line]
    assert mid and all(", val/top1 " in line for line in mid)
    values = [float(line.split("val/top1 ")[1].split(",")[0]) for line in mid if "- ," not in line]
    assert values and all(0.75 <= v < 0.8 for v in values)
    assert len(slots) >= 6  # every 0.3 s for two slots over ~2 s of runs


def test_status_block_is_redrawn_in_place_on_a_terminal():
    stream = io.StringIO()
    status = LiveStatus(stream, tty=True)
    status.show(["[sweep] a", "[sweep]   cpu: run 1"])
    status.log("[sweep] run-000 finished")  # above the block, which is drawn again
    status.show(["[sweep] b"], force=True)
    # up over the 2-line block and erase it, then the event line and the block again; then the
    # 2-line block is replaced by the new 1-line one
    assert stream.getvalue() == (
        "[sweep] a\n[sweep]   cpu: run 1\n"
        "\x1b[2F\x1b[J[sweep] run-000 finished\n[sweep] a\n[sweep]   cpu: run 1\n"
        "\x1b[2F\x1b[J[sweep] b\n"
    )


def test_a_run_inside_a_long_epoch_reports_progress_from_its_own_eta(tmp_path):
    # a one-epoch run (the CPU ablations): no validated epoch until it ends
    history = [{"epoch": 0, "step": 9, "train/eta_s": 180.0}, {"epoch": 0, "step": 19, "train/eta_s": 150.0}]  # fmt: skip
    progress = run_progress(history, tmp_path, "val/top1")
    assert progress.epochs_done == 0 and progress.eta_s == 150.0
    assert progress.fraction_at(50.0) == pytest.approx(0.25)  # 50 s done, 150 s to go
    # ... which the sweep's ETA uses: 150 s left of this run, then one more run of 200 s
    assert sweep_eta(3, 2, [200.0], [(50.0, progress.fraction_at(50.0))], 1) == pytest.approx(350.0)
    # without train/eta_s: validated epochs, as before
    assert (
        run_progress([{"epoch": 0, "val/top1": 0.5}], tmp_path, "val/top1").fraction_at(9.0) is None
    )


def test_sweep_eta_and_durations():
    # One finished run of 100 s; one half done after 50 s, one just started: 2 slots, 4 runs.
    assert sweep_eta(4, 3, [100.0], [(50.0, 0.5), (10.0, None)], 2) == pytest.approx(120.0)
    assert (
        sweep_eta(None, 1, [100.0], [], 1) is None and sweep_eta(3, 1, [], [(5, None)], 1) is None
    )
    assert sweep_eta(2, 1, [], [(30.0, 0.25)], 1) == pytest.approx(90.0 + 120.0)
    assert [format_duration(s) for s in (5, 125, 3725, None)] == ["0:05", "2:05", "1:02:05", "?"]
