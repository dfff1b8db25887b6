"""``lavit sweep``: a W&B sweep file run offline, with W&B's own engine choosing the runs.

    lavit sweep sweeps/va_layers.yaml [--count N] [--devices cpu|0,1,...] [--sweep-dir DIR]

* The ``sweeps`` package (W&B's sweep engine, extra ``lavit[sweep]``) validates the file and
  proposes each run (grid, random or bayes; finished runs' metrics are fed back).
* Each run is a subprocess of the sweep's ``command``, expanded as ``wandb agent`` expands it,
  ``--override`` values appended, with its own run directory and log under the sweep dir.
* One run at a time per ``--devices`` slot, slots in parallel, each run seeing only its GPU(s)
  through ``CUDA_VISIBLE_DEVICES`` (``cpu`` hides every GPU). A failed run is recorded; the sweep
  goes on. ``--after-run COMMAND`` runs after each run (e.g. commit the sweep dir).
* ``early_terminate`` (hyperband) is the engine's own ``stop_runs``, fed the running runs' metric
  histories from their CSV logs; a marked run gets SIGTERM (``lavit fit`` saves ``last.ckpt``)
  and is recorded as ``stopped``.
* ``<sweep dir>/sweep_state.json`` keeps the sweep: the same command again resumes it, skipping
  finished and failed runs and redoing those an interruption cut short.

``lavit report <sweep dir>`` turns the runs into the ablation table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lavit.errors import EXIT_INTERRUPTED
from lavit.tools._cli import fail, positive_int, tool_parser
from lavit.tools.sweep_engine import (
    DONE_STATES,
    RUN_LOG,
    RUNS_DIR,
    STATE_FILE,
    STOPPED,
    RunRecord,
    SweepEngineError,
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
    summarise,
)
from lavit.tools.sweep_status import LiveStatus, run_progress, sweep_eta
from lavit.units import format_duration

PROG = "lavit sweep"
DEFAULT_SWEEP_ROOT = Path("runs") / "sweeps"
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


def format_values(values: dict[str, Any]) -> str:
    return " ".join(f"{name}={value}" for name, value in values.items())


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
        self._lock = _lock_sweep_dir(sweep_dir)
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
        record.summary_metrics, record.history = summarise(history), self._metric_rows(history)
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
            # a failed or stopped run keeps them, to be looked at or resumed
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            shutil.rmtree(folder, ignore_errors=True)
            self.status.log(
                f"[sweep] {record.name}: deleted its checkpoints ({size / 2**20:.0f} MiB)"
            )
        save_state(self.state, self.sweep_dir)
        if self.after_run:
            self._run_after_run(record)

    def _run_after_run(self, record: RunRecord) -> None:
        """``--after-run``, once the state file records the run; its failure is logged only."""
        env = dict(os.environ)
        env.update(
            LAVIT_SWEEP_DIR=str(self.sweep_dir),
            LAVIT_SWEEP_RUN=record.name,
            LAVIT_SWEEP_RUN_DIR=str(self.sweep_dir / record.run_dir),
            LAVIT_SWEEP_RUN_STATE=record.state,
        )
        try:
            done = subprocess.run(
                self.after_run, shell=True, env=env, capture_output=True, text=True,
                timeout=AFTER_RUN_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            self.status.log(
                f"[sweep] warning: --after-run did not finish in {AFTER_RUN_TIMEOUT_S} s after "
                f"{record.name}; stopped it, the sweep goes on"
            )
            return
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            self.status.log(
                f"[sweep] warning: --after-run exited with {done.returncode} after "
                f"{record.name}; the sweep goes on" + "".join(f"\n  {line}" for line in tail)
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

    def _total_runs(self) -> int | None:
        """Runs the sweep will have when this invocation ends (``None``: unknown)."""
        config, total = self.state.sweep_config, math.inf
        if config.get("method") == "grid":
            specs = (config.get("parameters") or {}).values()
            if any("values" not in s and "value" not in s for s in specs):
                return None  # nested parameters: the engine knows, not this count
            total = math.prod(len(s["values"]) for s in specs if "values" in s)
        if config.get("run_cap") is not None:
            total = min(total, config["run_cap"])
        if self.count is not None:
            total = min(total, self._started_before + self.count)
        return None if math.isinf(total) else int(total)

    def _status_lines(self, active: dict[int, _ActiveRun]) -> list[str]:
        """The sweep's summary line, then one line per device slot."""
        now_s, metric, runs = time.monotonic(), self.state.metric_name, self.state.runs
        total = self._total_runs()
        lines, running = [], []
        for slot, device in enumerate(self.devices):
            if slot not in active:
                lines.append(f"[sweep]   {device}: idle")
                continue
            record, elapsed = active[slot].record, now_s - active[slot].started
            run_dir = self.sweep_dir / record.run_dir
            progress = run_progress(read_metric_history(run_dir), run_dir, metric)
            fraction = progress.fraction_at(elapsed)
            running.append((elapsed, fraction))
            epoch = (
                "epoch ?"
                if progress.epoch is None
                else f"epoch {progress.epoch}/{progress.max_epochs or '?'}"
            )
            if progress.eta_s is not None and fraction is not None:
                epoch += f" ({fraction:.0%})"
            value = "-" if progress.top1 is None else f"{progress.top1:.4f}"
            index = int(record.name.rsplit("-", 1)[-1]) + 1
            lines.append(
                f"[sweep]   {device}: run {index} of {total or '?'} "
                f"({format_values(run_values(record.config))}): {epoch}, {metric} {value}, "
                f"{format_duration(elapsed)}"
            )
        counts = {s: sum(r.state == s for r in runs) for s in DONE_STATES}
        finished = [r.duration_s for r in runs if r.state == "finished" and r.duration_s]
        started = sum(r.state != "pending" for r in runs)
        eta = sweep_eta(total, started, finished, running, len(self.devices))
        apart = ", ".join(f"{n} {s}" for s, n in counts.items() if n and s != "finished")
        summary = (
            f"[sweep] {self.name}: {sum(counts.values())} of {total or '?'} runs done"
            f"{f' ({apart})' if apart else ''}, {len(active)} running, "
            f"{format_duration(now_s - self._started_at)} elapsed, ETA {format_duration(eta)}"
        )
        return [summary, *lines]

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
        self._lock.close()

    def run(self) -> SweepState:
        """Run until the sweep is exhausted or ``count`` runs have been started."""
        active: dict[int, _ActiveRun] = {}  # device slot → its run
        self._started_at = time.monotonic()
        self._started_before = sum(run.state in DONE_STATES for run in self.state.runs)
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
                self.status.show(self._status_lines(active), force=changed)
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


def _lock_sweep_dir(sweep_dir: Path) -> IO[str]:
    """An exclusive lock on the sweep dir while this process lives: two runners on one state
    file would run the same grid points twice."""
    handle = open(sweep_dir / ".lock", "w")  # noqa: SIM115 (held until the process exits)
    try:
        import fcntl

        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # no fcntl (Windows): no lock
        pass
    except BlockingIOError:
        handle.close()
        raise ValueError(f"another `lavit sweep` is running in {sweep_dir}") from None
    return handle


def parse_devices(text: str) -> list[str]:
    """``cpu`` or ``0,1,...``: one run slot per entry (repeat ``cpu`` for parallel CPU runs);
    ``0+1+2+3`` is one slot whose runs see four GPUs (for multi-GPU runs)."""
    devices = [part.strip() for part in text.split(",") if part.strip()]
    for device in devices:
        if device != "cpu" and not all(gpu.isdigit() for gpu in device.split("+")):
            raise argparse.ArgumentTypeError(
                f"devices are 'cpu', GPU indices or GPU groups like 0+1+2+3, got {device!r}"
            )
    if not devices:
        raise argparse.ArgumentTypeError("no device given")
    return devices


def key_value(text: str) -> str:
    if "=" not in text.lstrip("-"):
        raise argparse.ArgumentTypeError(f"expects key=value, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, "Run a W&B sweep file locally, with W&B's sweep engine.")
    add = parser.add_argument
    add("sweep_file", type=Path, help="a sweep file, e.g. sweeps/va_layers.yaml")
    add(
        "--count",
        type=positive_int,
        help="start at most N runs now (default: until a grid is done)",
    )
    add("--devices", type=parse_devices, default=["cpu"],
        help="'cpu' or GPU indices '0,1,...': one run at a time per entry, in parallel (each run "
        "sees its GPU as CUDA_VISIBLE_DEVICES; '0+1+2+3' is one entry with four GPUs)")  # fmt: skip
    add("--sweep-dir", type=Path,
        help=f"state, runs and logs (default: {DEFAULT_SWEEP_ROOT}/<sweep file name>); an "
        "existing one is resumed")  # fmt: skip
    add("--override", action="append", default=[], type=key_value, metavar="KEY=VALUE",
        help="CLI argument appended to every run, e.g. trainer.max_epochs=3 (repeatable)")  # fmt: skip
    add("--config", action="append", default=[], metavar="FILE",
        help="replace the sweep command's --config file(s) by this one (repeatable)")  # fmt: skip
    add("--retry-failed", action="store_true", help="on resume, run failed runs again")
    add("--status-every", type=float, default=60.0, metavar="SECONDS",
        help="off a terminal, print the status lines this often (a terminal redraws them)")  # fmt: skip
    add("--after-run", metavar="COMMAND",
        help="shell command run after each run, once the state file records it, with "
        "LAVIT_SWEEP_DIR, LAVIT_SWEEP_RUN, LAVIT_SWEEP_RUN_DIR and LAVIT_SWEEP_RUN_STATE set "
        "(e.g. a git commit of the sweep dir; a failing command is logged, the sweep goes on)")  # fmt: skip
    add("--delete-checkpoints", action="store_true",
        help="delete a finished run's checkpoints/ when it ends (its logs stay)")  # fmt: skip
    return parser


def _raise_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str]) -> int:
    """``lavit sweep``: run a W&B sweep file offline (see the module docstring)."""
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    sweep_dir = args.sweep_dir or DEFAULT_SWEEP_ROOT / args.sweep_file.stem
    try:
        runner = SweepRunner(
            args.sweep_file, sweep_dir, args.devices, args.count, args.override,
            args.retry_failed, args.config, LiveStatus(interval_s=args.status_every),
            args.after_run, args.delete_checkpoints,
        )  # fmt: skip
        try:
            config = runner.state.sweep_config
            method = config.get("method")
            if method in ("random", "bayes") and args.count is None and "run_cap" not in config:
                raise ValueError(
                    f"a {method} sweep never ends by itself: pass --count N (or set run_cap)"
                )
            state = runner.run()
        finally:
            runner.close()
    except KeyboardInterrupt:
        print("[sweep] interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, SweepEngineError) as err:
        return fail(PROG, str(err))
    counts = {s: sum(r.state == s for r in state.runs) for s in (*DONE_STATES, "pending")}
    print(
        f"[sweep] {counts['finished']} finished, {counts['failed']} failed"
        + (f", {counts[STOPPED]} stopped early" if counts[STOPPED] else "")
        + (f", {counts['pending']} pending" if counts["pending"] else "")
        + f"; table: lavit report {sweep_dir}",
        flush=True,
    )
    return 0
