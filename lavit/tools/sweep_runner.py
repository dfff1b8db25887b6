"""The runner behind ``lavit sweep``: proposes runs with W&B's engine, runs them per device slot.

See :mod:`lavit.tools.sweep` for what it does; the state file and the engine are in
:mod:`lavit.tools.sweep_engine`, what it shows while runs train in :mod:`lavit.tools.sweep_status`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from filelock import FileLock, Timeout

from lavit.tools.sweep_engine import (
    DONE_STATES,
    RUN_LOG,
    RUNS_DIR,
    STATE_FILE,
    STOPPED,
    RunRecord,
    SweepState,
    agent_command,
    import_sweeps,
    load_state,
    load_sweep_config,
    now,
    read_metric_history,
    replace_configs,
    run_values,
    save_state,
)
from lavit.tools.sweep_status import LiveStatus, format_values, status_lines

POLL_INTERVAL_S = 0.5
EARLY_TERMINATE_INTERVAL_S = 10.0  # how often running runs' metrics go to the engine's stop_runs
AFTER_RUN_TIMEOUT_S = 600  # an --after-run command (a git commit) that hangs longer is stopped


@dataclass
class _ActiveRun:
    record: RunRecord
    process: subprocess.Popen
    log: IO[str]
    started: float
    stop_requested: bool = False  # by early termination


def _kill(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Signal the run's whole process group (it has its own session)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(process.pid, sig)


class SweepRunner:
    """Proposes runs with the ``sweeps`` engine and runs them, one per device slot at a time."""

    def __init__(
        self,
        sweep_file: Path,
        sweep_dir: Path,
        devices: list[str],
        count: int | None,
        overrides: list[str],
        retry_failed: bool = False,
        configs: list[str] | None = None,
        status: LiveStatus | None = None,
        after_run: str | None = None,
        delete_checkpoints: bool = False,
    ) -> None:
        self.sweep_file, self.sweep_dir = sweep_file, sweep_dir
        self.devices, self.count = devices, count
        self.status = status or LiveStatus()
        self.after_run, self.delete_checkpoints = after_run, delete_checkpoints
        config = load_sweep_config(sweep_file)
        if "early_terminate" in config:
            try:  # its settings, checked now rather than hours into the sweep
                import_sweeps().stop_runs(config, [])
            except ValueError as err:
                raise ValueError(f"{sweep_file}: early_terminate: {err}") from None
        self.name = config.get("name") or sweep_file.stem
        sweep_dir.mkdir(parents=True, exist_ok=True)
        # Two runners on one state file would run the same grid points twice.
        self._lock = FileLock(sweep_dir / ".lock")
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            raise ValueError(f"another `lavit sweep` is running in {sweep_dir}") from None
        try:
            self.state = self._open_state(config, overrides, list(configs or []), retry_failed)
        except BaseException:
            self.close()
            raise
        self.launched, self.exhausted = 0, False
        self._last_stop_check = time.monotonic()

    def _open_state(self, config, overrides, configs, retry_failed) -> SweepState:
        """A new state, or the stored one (resume) after checking it is the same sweep."""
        if not (self.sweep_dir / STATE_FILE).exists():
            state = SweepState(str(self.sweep_file), config, list(overrides), configs)
            save_state(state, self.sweep_dir)
            return state
        state = load_state(self.sweep_dir)
        if state.sweep_config != config or (configs and configs != state.configs):
            raise ValueError(
                f"{self.sweep_dir} holds another sweep (from {state.sweep_file}, configs "
                f"{state.configs or 'of the sweep file'}); pass another --sweep-dir to start a new one"
            )
        if overrides and overrides != state.overrides:
            self.status.log(
                f"[sweep] overrides changed from {state.overrides} to {overrides}: "
                "runs from now on use the new ones"
            )
            state.overrides = list(overrides)
        for run in state.runs:  # a run still marked running was cut short: redo it
            if run.state == "running" or (retry_failed and run.state == "failed"):
                run.state = "pending"
        done = sum(run.state in DONE_STATES for run in state.runs)
        self.status.log(f"[sweep] resuming {self.sweep_dir}: {done} run(s) done, skipping them")
        save_state(state, self.sweep_dir)
        return state

    def _next_record(self) -> RunRecord | None:
        """A pending run (cut short earlier), else the engine's next proposal, else ``None``."""
        runs = self.state.runs
        pending = next((run for run in runs if run.state == "pending"), None)
        cap = self.state.sweep_config.get("run_cap")
        if pending or self.exhausted or (cap is not None and len(runs) >= cap):
            return pending
        proposal = import_sweeps().next_run(
            self.state.sweep_config, [run.to_sweep_run() for run in runs]
        )
        if proposal is None:  # grid: every point has been proposed
            self.exhausted = True
            return None
        name = f"run-{len(runs):03d}"
        runs.append(RunRecord(name=name, config=proposal.config, run_dir=f"{RUNS_DIR}/{name}"))
        return runs[-1]

    def _command(self, record: RunRecord, run_dir: Path) -> list[str]:
        config = self.state.sweep_config
        command = agent_command(
            config.get("command"), record.config, config.get("program"), sys.executable
        )
        if self.state.configs:
            command = replace_configs(command, self.state.configs)
        # W&B names first, so that overrides may change them; the run directory last, as the
        # runner must know where each run's files are.
        command += [f"--wandb.group={self.name}", f"--wandb.name={self.name}-{record.name}"]
        command += [o if o.startswith("--") else f"--{o}" for o in self.state.overrides]
        return [*command, f"--trainer.default_root_dir={run_dir}"]

    def _launch(self, record: RunRecord, device: str) -> _ActiveRun:
        run_dir = self.sweep_dir / record.run_dir
        shutil.rmtree(run_dir, ignore_errors=True)  # a run cut short starts again from scratch
        run_dir.mkdir(parents=True)
        record.command = self._command(record, run_dir)
        record.state, record.device, record.started_at = "running", device, now()
        record.exitcode = record.ended_at = record.duration_s = None
        record.summary_metrics, record.history = {}, []
        env = dict(os.environ)
        env["CUDA_VISIBLE_DEVICES"] = "" if device == "cpu" else device.replace("+", ",")
        cpu_slots = self.devices.count("cpu")
        if device == "cpu" and cpu_slots > 1 and "OMP_NUM_THREADS" not in env:
            # Parallel CPU runs share the cores instead of each one claiming all of them.
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_slots))
        (run_dir / "sweep_run.json").write_text(
            json.dumps({"name": record.name, "config": record.config, "command": record.command})
        )
        log = open(run_dir / RUN_LOG, "w", encoding="utf-8")  # noqa: SIM115 (closed in _finish)
        log.write("$ " + " ".join(record.command) + "\n")
        log.flush()
        values = format_values(run_values(record.config))
        self.status.log(f"[sweep] {record.name} on {device}: {values}")
        process = subprocess.Popen(
            record.command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        save_state(self.state, self.sweep_dir)
        return _ActiveRun(record, process, log, time.monotonic())

    def _metric_rows(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows holding the sweep metric (all the engine reads, and all the state keeps)."""
        metric = self.state.metric_name
        keep = ("epoch", "step", metric)
        return [{k: row[k] for k in keep if k in row} for row in history if metric in row]

    def _finish(self, active: _ActiveRun, exitcode: int) -> None:
        record = active.record
        active.log.close()
        record.exitcode, record.ended_at = exitcode, now()
        record.duration_s = round(time.monotonic() - active.started, 1)
        history = read_metric_history(self.sweep_dir / record.run_dir)
        # W&B's summary: the last logged value of every metric
        record.summary_metrics = {k: v for row in history for k, v in row.items()}
        record.history = self._metric_rows(history)
        finished = "finished" if exitcode == 0 else "failed"
        record.state = STOPPED if active.stop_requested else finished
        metric = self.state.metric_name
        shown = record.summary_metrics.get(metric) if metric else None
        outcome = (
            f"{metric} = {shown:.4g}"
            if shown is not None
            else f"exit code {exitcode}, log: {self.sweep_dir / record.run_dir / RUN_LOG}"
        )
        said = "stopped early" if record.state == STOPPED else record.state
        self.status.log(f"[sweep] {record.name} {said} in {record.duration_s:.0f} s ({outcome})")
        folder = self.sweep_dir / record.run_dir / "checkpoints"
        if self.delete_checkpoints and record.state == "finished" and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)  # a failed or stopped run keeps them
            self.status.log(f"[sweep] {record.name}: deleted its checkpoints")
        save_state(self.state, self.sweep_dir)
        if self.after_run:
            self._run_after_run(record)

    def _run_after_run(self, record: RunRecord) -> None:
        """``--after-run``, once the state file records the run; its failure is logged only."""
        env = os.environ | {
            "LAVIT_SWEEP_DIR": str(self.sweep_dir),
            "LAVIT_SWEEP_RUN": record.name,
            "LAVIT_SWEEP_RUN_DIR": str(self.sweep_dir / record.run_dir),
            "LAVIT_SWEEP_RUN_STATE": record.state,
        }
        try:
            done = subprocess.run(
                self.after_run, shell=True, env=env, capture_output=True, text=True,
                timeout=AFTER_RUN_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            problem = f"did not finish in {AFTER_RUN_TIMEOUT_S} s (stopped it)"
        else:
            if done.returncode == 0:
                return
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            problem = f"exited with {done.returncode}" + "".join(f"\n  {line}" for line in tail)
        self.status.log(
            f"[sweep] warning: --after-run {problem} after {record.name}; the sweep goes on"
        )

    def _early_terminate(self, active: dict[int, _ActiveRun]) -> None:
        """Stop the running runs that the engine's hyperband marks (the file's early_terminate)."""
        config, now_s = self.state.sweep_config, time.monotonic()
        if "early_terminate" not in config or now_s - self._last_stop_check < (
            EARLY_TERMINATE_INTERVAL_S
        ):
            return
        self._last_stop_check = now_s
        running = {run.record.name: run for run in active.values() if not run.stop_requested}
        engine_runs = [
            record.to_sweep_run(
                state="running",
                history=self._metric_rows(read_metric_history(self.sweep_dir / record.run_dir)),
            )
            if record.name in running
            else record.to_sweep_run()
            for record in self.state.runs
            if record.name in running or record.state in DONE_STATES
        ]
        for engine_run in import_sweeps().stop_runs(config, engine_runs):
            run = running.get(engine_run.name)
            if run is not None:
                run.stop_requested = True
                lines = (engine_run.early_terminate_info or {}).get("lines") or []
                reason = next((line for line in lines if line.startswith("Run:")), "")
                self.status.log(f"[sweep] {run.record.name}: stopped early by hyperband ({reason})")
                _kill(run.process)

    def _stop_all(self, active: dict[int, _ActiveRun]) -> None:
        """Stop the running runs; they stay ``running`` in the state, so resume redoes them."""
        for run in active.values():
            _kill(run.process)
        deadline = time.monotonic() + 10
        for run in active.values():
            try:
                run.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill(run.process, signal.SIGKILL)
            run.log.close()
        save_state(self.state, self.sweep_dir)

    def close(self) -> None:
        """Release the sweep dir for another runner."""
        self._lock.release()

    def run(self) -> SweepState:
        """Run until the sweep is exhausted or ``count`` runs have been started."""
        active: dict[int, _ActiveRun] = {}  # device slot → its run
        self.started_at = time.monotonic()
        self.started_before = sum(run.state in DONE_STATES for run in self.state.runs)
        changed = True  # a run started or ended: show the status now
        try:
            while True:
                for slot, device in enumerate(self.devices):
                    if slot in active or (self.count is not None and self.launched >= self.count):
                        continue
                    record = self._next_record()
                    if record is None:
                        break
                    active[slot] = self._launch(record, device)
                    self.launched, changed = self.launched + 1, True
                if not active:
                    return self.state
                self.status.show(status_lines(self, active), force=changed)
                changed = False
                time.sleep(POLL_INTERVAL_S)
                for slot, run in list(active.items()):
                    if (exitcode := run.process.poll()) is not None:
                        self._finish(active.pop(slot), exitcode)
                        changed = True
                self._early_terminate(active)
        except BaseException:  # KeyboardInterrupt, SIGTERM (see main), errors
            self._stop_all(active)
            raise
