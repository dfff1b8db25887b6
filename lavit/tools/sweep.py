"""Offline sweep runner: a W&B sweep file run locally, with W&B's own engine choosing the runs.

``lavit sweep sweeps/va_layers.yaml [--count N] [--devices cpu|0,1,...] [--sweep-dir DIR]
[--override key=value ...]``

* The ``sweeps`` package (the engine behind W&B's sweep server) validates the file and proposes
  each run (grid, random or bayes; finished runs' metrics are fed back, which bayes uses).
* Each run is a subprocess of the sweep's own ``command``, expanded exactly as ``wandb agent``
  expands it (``${env}``, ``${interpreter}``, ``${program}``, ``${args}``...), with the
  ``--override`` values appended, and with its own run directory and log under the sweep dir.
* One run at a time per listed device; several devices run in parallel, each subprocess seeing only
  its device through ``CUDA_VISIBLE_DEVICES`` (``cpu`` hides every GPU).
* A run that fails is recorded as failed and the sweep goes on.
* ``--after-run COMMAND`` runs a shell command after each run (e.g. commit the sweep dir), so that
  a sweep longer than a session keeps its finished runs; a failing command does not stop it.
* A sweep file's ``early_terminate`` (hyperband, the only kind W&B has) is honoured with the
  engine's own ``stop_runs``: the running runs' metric histories are read from their CSV logs
  every few seconds, and a run the engine marks is stopped (SIGTERM: ``lavit fit`` saves
  ``last.ckpt``) and recorded as ``stopped``. Its iterations are the logged values of the sweep
  metric, one per validation (per epoch, by default).
* While runs train, a status block shows the sweep (runs done of the total, ETA) and one line per
  device slot (run k of N, its setting, epoch, latest ``val/top1``): redrawn in place on a
  terminal, printed as plain lines every ``--status-every`` seconds elsewhere (``sweep_status``).
* ``lavit sweep`` needs the ``sweeps`` package, an optional extra: ``pip install 'lavit[sweep]'``.
* The sweep's state lives in ``<sweep dir>/sweep_state.json`` (written atomically after every
  change): running the same command again resumes the sweep, skipping finished and failed runs and
  redoing those that an interruption cut short.

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
from typing import Any

from lavit.errors import EXIT_INTERRUPTED
from lavit.tools._cli import fail, positive_int, tool_parser
from lavit.tools.sweep_engine import (
    SweepEngineError,
    agent_command,
    import_sweeps,
    load_sweep_config,
    override_args,
    replace_configs,
    run_values,
)
from lavit.tools.sweep_state import (
    DONE_STATES,
    RUN_LOG,
    RUNS_DIR,
    STATE_FILE,
    STOPPED,
    RunRecord,
    SweepState,
    load_state,
    now,
    read_metric_history,
    save_state,
    summarise,
)
from lavit.tools.sweep_status import LiveStatus, run_progress, sweep_eta
from lavit.units import format_duration

__all__ = ["SweepRunner", "main", "parse_devices", "run_sweep"]

DEFAULT_SWEEP_ROOT = Path("runs") / "sweeps"
POLL_INTERVAL_S = 0.5
EARLY_TERMINATE_INTERVAL_S = 10.0  # how often running runs' metrics go to the engine's stop_runs
CHECKPOINT_DIR = "checkpoints"  # inside a run dir, as the CLI writes them
AFTER_RUN_TIMEOUT_S = 600  # an --after-run command (a git commit) that hangs longer is stopped


# ---------------------------------------------------------------------------------------- runner


@dataclass
class _ActiveRun:
    record: RunRecord
    process: subprocess.Popen
    log: Any
    started: float
    stop_requested: bool = False  # by early termination


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
        self.status = status or LiveStatus()
        self.after_run = after_run
        self.delete_checkpoints = delete_checkpoints
        self.sweep_file = sweep_file
        self.sweep_dir = sweep_dir
        self.devices = devices
        self.count = count
        self.retry_failed = retry_failed
        config = load_sweep_config(sweep_file)
        if "early_terminate" in config:
            try:  # its settings, checked now rather than hours into the sweep
                import_sweeps().stop_runs(config, [])
            except ValueError as err:
                raise ValueError(f"{sweep_file}: early_terminate: {err}") from None
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._lock = _lock_sweep_dir(sweep_dir)
        try:
            self.state = self._open_state(config, overrides, list(configs or []))
        except BaseException:
            self.close()
            raise
        self.extra_args = override_args(self.state.overrides)
        self.launched = 0
        self.exhausted = False
        self._last_stop_check = time.monotonic()

    def _open_state(
        self, config: dict[str, Any], overrides: list[str], configs: list[str]
    ) -> SweepState:
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
        for run in state.runs:
            # A run still marked running was cut short (the runner died): redo it.
            if run.state == "running" or (self.retry_failed and run.state == "failed"):
                run.state = "pending"
        done = sum(run.state in DONE_STATES for run in state.runs)
        self.status.log(f"[sweep] resuming {self.sweep_dir}: {done} run(s) done, skipping them")
        save_state(state, self.sweep_dir)
        return state

    # -- proposing -------------------------------------------------------------------------------
    def _run_cap_reached(self) -> bool:
        cap = self.state.sweep_config.get("run_cap")
        started = sum(run.state != "pending" for run in self.state.runs)
        return cap is not None and started >= cap

    def _next_record(self) -> RunRecord | None:
        """A pending run (cut short earlier), else the engine's next proposal, else ``None``."""
        for run in self.state.runs:
            if run.state == "pending":
                return run
        if self.exhausted or self._run_cap_reached():
            return None
        sweeps = import_sweeps()
        proposal = sweeps.next_run(
            self.state.sweep_config, [run.to_sweep_run() for run in self.state.runs]
        )
        if proposal is None:  # grid: every point has been proposed
            self.exhausted = True
            return None
        name = f"run-{len(self.state.runs):03d}"
        record = RunRecord(name=name, config=proposal.config, run_dir=f"{RUNS_DIR}/{name}")
        self.state.runs.append(record)
        return record

    # -- running ---------------------------------------------------------------------------------
    def _command(self, record: RunRecord, run_dir: Path) -> list[str]:
        config = self.state.sweep_config
        command = agent_command(
            config.get("command"), record.config, config.get("program"), sys.executable
        )
        if self.state.configs:
            command = replace_configs(command, self.state.configs)
        # The run's name in W&B (when it logs there) first, so that overrides may change it; the
        # run directory last, as the runner must know where each run's files are.
        label = f"{config.get('name') or self.sweep_file.stem}-{record.name}"
        return (
            command
            + [
                f"--wandb.group={config.get('name') or self.sweep_file.stem}",
                f"--wandb.name={label}",
            ]
            + self.extra_args
            + [f"--trainer.default_root_dir={run_dir}"]
        )

    def _launch(self, record: RunRecord, device: str) -> _ActiveRun:
        run_dir = self.sweep_dir / record.run_dir
        if run_dir.exists():  # a run cut short earlier starts again from scratch
            shutil.rmtree(run_dir)
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
        self.status.log(
            f"[sweep] {record.name} on {device}: {format_values(run_values(record.config))}"
        )
        # Its own session, so that stopping the sweep stops the run's whole process group.
        process = subprocess.Popen(
            record.command,
            cwd=Path.cwd(),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        save_state(self.state, self.sweep_dir)
        return _ActiveRun(record, process, log, time.monotonic())

    def _finish(self, active: _ActiveRun, exitcode: int) -> None:
        record = active.record
        active.log.close()
        record.exitcode = exitcode
        record.ended_at = now()
        record.duration_s = round(time.monotonic() - active.started, 1)
        history = read_metric_history(self.sweep_dir / record.run_dir)
        record.summary_metrics = summarise(history)
        metric = self.state.metric_name
        # The state keeps the sweep metric's history only (what bayes needs), not every log row.
        record.history = self._metric_rows(history)
        if active.stop_requested:
            record.state = STOPPED
        else:
            record.state = "finished" if exitcode == 0 else "failed"
        shown = record.summary_metrics.get(metric) if metric else None
        outcome = (
            f"{metric} = {shown:.4g}"
            if shown is not None
            else f"exit code {exitcode}, log: {self.sweep_dir / record.run_dir / RUN_LOG}"
        )
        shown_state = "stopped early" if record.state == STOPPED else record.state
        self.status.log(
            f"[sweep] {record.name} {shown_state} in {record.duration_s:.0f} s ({outcome})"
        )
        if self.delete_checkpoints and record.state == "finished":
            self._delete_checkpoints(record)
        save_state(self.state, self.sweep_dir)
        if self.after_run:
            self._run_after_run(record)

    def _delete_checkpoints(self, record: RunRecord) -> None:
        """``--delete-checkpoints``: a finished run's ``checkpoints/`` go (its logs stay); a
        failed or stopped run keeps them, to be looked at or resumed."""
        folder = self.sweep_dir / record.run_dir / CHECKPOINT_DIR
        if not folder.is_dir():
            return
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
        self.status.log(f"[sweep] {record.name}: deleted its checkpoints ({size / 2**20:.0f} MiB)")

    def _run_after_run(self, record: RunRecord) -> None:
        """The ``--after-run`` command (e.g. a ``git commit`` of the sweep dir), once the state
        file records the run. Its failure is logged, never fatal: the sweep goes on."""
        env = dict(os.environ)
        env.update(
            LAVIT_SWEEP_DIR=str(self.sweep_dir),
            LAVIT_SWEEP_RUN=record.name,
            LAVIT_SWEEP_RUN_DIR=str(self.sweep_dir / record.run_dir),
            LAVIT_SWEEP_RUN_STATE=record.state,
        )
        try:
            done = subprocess.run(
                self.after_run,
                shell=True,
                env=env,
                capture_output=True,
                text=True,
                timeout=AFTER_RUN_TIMEOUT_S,
            )
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

    def _metric_rows(self, history: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The rows of a run's history that hold the sweep metric (what the engine reads)."""
        metric = self.state.metric_name
        return [
            {k: row[k] for k in ("epoch", "step", metric) if k in row}
            for row in history
            if metric in row
        ]

    def _early_terminate(self, active: dict[int, _ActiveRun]) -> None:
        """Stop the running runs that the engine's hyperband marks (the file's early_terminate)."""
        config = self.state.sweep_config
        now = time.monotonic()
        if "early_terminate" not in config or now - self._last_stop_check < (
            EARLY_TERMINATE_INTERVAL_S
        ):
            return
        self._last_stop_check = now
        sweeps = import_sweeps()
        running = {run.record.name: run for run in active.values() if not run.stop_requested}
        engine_runs = []
        for record in self.state.runs:
            if record.name in running:
                history = read_metric_history(self.sweep_dir / record.run_dir)
                engine_runs.append(
                    sweeps.SweepRun(
                        name=record.name,
                        config=record.config,
                        state="running",
                        history=self._metric_rows(history),
                    )
                )
            elif record.state in DONE_STATES:
                engine_runs.append(record.to_sweep_run())
        for engine_run in sweeps.stop_runs(config, engine_runs):
            run = running.get(engine_run.name)
            if run is None:
                continue
            run.stop_requested = True
            lines = (engine_run.early_terminate_info or {}).get("lines") or []
            reason = next((line for line in lines if line.startswith("Run:")), "")
            self.status.log(f"[sweep] {run.record.name}: stopped early by hyperband ({reason})")
            with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
                os.killpg(run.process.pid, signal.SIGTERM)

    # -- status ----------------------------------------------------------------------------------
    def _total_runs(self) -> int | None:
        """Runs the sweep will have when this invocation ends (``None``: unknown)."""
        config = self.state.sweep_config
        total: float = math.inf
        if config.get("method") == "grid":
            total = 1
            for spec in (config.get("parameters") or {}).values():
                if "values" in spec:
                    total *= len(spec["values"])
                elif "value" not in spec:
                    return None  # nested parameters: the engine knows, not this count
        if config.get("run_cap") is not None:
            total = min(total, config["run_cap"])
        if self.count is not None:
            total = min(total, self._started_before + self.count)
        return None if math.isinf(total) else int(total)

    def _status_lines(self, active: dict[int, _ActiveRun]) -> list[str]:
        """The sweep's summary line, then one line per device slot."""
        now = time.monotonic()
        metric = self.state.metric_name
        total = self._total_runs()
        runs = self.state.runs
        counts = {s: sum(r.state == s for r in runs) for s in DONE_STATES}
        lines, running = [], []
        for slot, device in enumerate(self.devices):
            run = active.get(slot)
            if run is None:
                lines.append(f"[sweep]   {device}: idle")
                continue
            record, elapsed = run.record, now - run.started
            progress = run_progress(
                read_metric_history(self.sweep_dir / record.run_dir),
                self.sweep_dir / record.run_dir,
                metric,
            )
            fraction = progress.fraction_at(elapsed)
            running.append((elapsed, fraction))
            index = int(record.name.rsplit("-", 1)[-1]) + 1
            epoch = (
                "epoch ?"
                if progress.epoch is None
                else f"epoch {progress.epoch}/{progress.max_epochs or '?'}"
            )
            if progress.eta_s is not None and fraction is not None:
                epoch += f" ({fraction:.0%})"
            value = f"{progress.top1:.4f}" if progress.top1 is not None else "-"
            lines.append(
                f"[sweep]   {device}: run {index} of {total or '?'} "
                f"({format_values(run_values(record.config))}): {epoch}, {metric} {value}, "
                f"{format_duration(elapsed)}"
            )
        finished = [r.duration_s for r in runs if r.state == "finished" and r.duration_s]
        started = sum(r.state != "pending" for r in runs)
        eta = sweep_eta(total, started, finished, running, len(self.devices))
        done = sum(counts.values())
        apart = ", ".join(f"{n} {s}" for s, n in counts.items() if n and s != "finished")
        summary = (
            f"[sweep] {self.state.sweep_config.get('name') or self.sweep_file.stem}: "
            f"{done} of {total or '?'} runs done{f' ({apart})' if apart else ''}, "
            f"{len(active)} running, {format_duration(now - self._started_at)} elapsed, "
            f"ETA {format_duration(eta)}"
        )
        return [summary, *lines]

    def _stop_all(self, active: dict[int, _ActiveRun]) -> None:
        """Stop the running subprocesses; they stay ``running`` in the state, so resume redoes them."""
        for run in active.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
                os.killpg(run.process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for run in active.values():
            try:
                run.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
                    os.killpg(run.process.pid, signal.SIGKILL)
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
        changed = True  # a run started or ended: show the status now, not at the next interval
        try:
            while True:
                for slot, device in enumerate(self.devices):
                    if slot in active or (self.count is not None and self.launched >= self.count):
                        continue
                    record = self._next_record()
                    if record is None:
                        break
                    active[slot] = self._launch(record, device)
                    self.launched += 1
                    changed = True
                if not active:
                    break
                self.status.show(self._status_lines(active), force=changed)
                changed = False
                time.sleep(POLL_INTERVAL_S)
                for slot, run in list(active.items()):
                    exitcode = run.process.poll()
                    if exitcode is not None:
                        self._finish(run, exitcode)
                        del active[slot]
                        changed = True
                self._early_terminate(active)
        except BaseException:  # KeyboardInterrupt, SIGTERM (via _raise_on_sigterm), errors
            self._stop_all(active)
            raise
        return self.state


def _lock_sweep_dir(sweep_dir: Path) -> Any:
    """An exclusive lock on the sweep dir, held while this process lives: two runners on one
    state file would run the same grid points twice."""
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


def format_values(values: dict[str, Any]) -> str:
    """``a=1 b=[1, 2]`` for log lines."""
    return " ".join(f"{name}={value}" for name, value in values.items())


def run_sweep(
    sweep_file: str | Path,
    sweep_dir: str | Path | None = None,
    devices: list[str] | None = None,
    count: int | None = None,
    overrides: list[str] | None = None,
    retry_failed: bool = False,
    configs: list[str] | None = None,
    status_every: float = 60.0,
    after_run: str | None = None,
    delete_checkpoints: bool = False,
) -> SweepState:
    """Run (or resume) a sweep locally; see the module docstring. Returns the final state.

    ``status_every``: seconds between status blocks when the output is not a terminal.
    """
    sweep_file = Path(sweep_file)
    sweep_dir = Path(sweep_dir) if sweep_dir else DEFAULT_SWEEP_ROOT / sweep_file.stem
    runner = SweepRunner(
        sweep_file,
        sweep_dir,
        devices or ["cpu"],
        count,
        list(overrides or []),
        retry_failed,
        configs,
        LiveStatus(interval_s=status_every),
        after_run,
        delete_checkpoints,
    )
    method = runner.state.sweep_config.get("method")
    if (
        method in ("random", "bayes")
        and count is None
        and "run_cap" not in runner.state.sweep_config
    ):
        runner.close()
        raise ValueError(f"a {method} sweep never ends by itself: pass --count N (or set run_cap)")
    try:
        return runner.run()
    finally:
        runner.close()


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


def _raise_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


PROG = "lavit sweep"


def main(argv: list[str]) -> int:
    """``lavit sweep``: run a W&B sweep file offline (see the module docstring)."""
    parser = tool_parser(
        PROG, "Run a W&B sweep file locally, with W&B's sweep engine choosing the runs."
    )
    parser.add_argument("sweep_file", type=Path, help="a sweep file, e.g. sweeps/va_layers.yaml")
    parser.add_argument(
        "--count",
        type=positive_int,
        default=None,
        help="start at most N runs in this invocation (default: until a grid is done)",
    )
    parser.add_argument(
        "--devices",
        type=parse_devices,
        default=["cpu"],
        help="'cpu' or GPU indices '0,1,...': one run at a time per entry, in parallel "
        "(each run sees its GPU as CUDA_VISIBLE_DEVICES; '0+1+2+3' is one entry with four GPUs, "
        "for multi-GPU runs); default: cpu",
    )
    parser.add_argument(
        "--sweep-dir",
        type=Path,
        default=None,
        help=f"state, runs and logs (default: {DEFAULT_SWEEP_ROOT}/<sweep file name>); "
        "an existing one is resumed",
    )
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra CLI argument appended to every run, e.g. --override trainer.max_epochs=3 "
        "(repeatable)",
    )
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="replace the sweep command's --config file(s) by this one (repeatable), e.g. "
        "--config experiments/base.yaml for a quick sweep on the embedded CIFAR-10 subset",
    )
    parser.add_argument(
        "--retry-failed", action="store_true", help="on resume, run failed runs again"
    )
    parser.add_argument(
        "--status-every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="when the output is not a terminal: print the status lines this often (default "
        "60; on a terminal they are redrawn in place every second)",
    )
    parser.add_argument(
        "--after-run",
        metavar="COMMAND",
        help="shell command run after each run ends and the state file records it, with "
        "LAVIT_SWEEP_DIR, LAVIT_SWEEP_RUN, LAVIT_SWEEP_RUN_DIR and LAVIT_SWEEP_RUN_STATE set, "
        "e.g. a git commit of the sweep dir, so that a long sweep keeps its results as it goes "
        "(a failing command is logged; the sweep goes on)",
    )
    parser.add_argument(
        "--delete-checkpoints",
        action="store_true",
        help="delete a finished run's checkpoints/ when it ends (metrics, run_info.json and "
        "logs stay): an ablation of many small runs keeps ~70 MB a run otherwise",
    )
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        state = run_sweep(
            args.sweep_file,
            args.sweep_dir,
            args.devices,
            args.count,
            args.override,
            args.retry_failed,
            args.config,
            args.status_every,
            args.after_run,
            args.delete_checkpoints,
        )
    except KeyboardInterrupt:
        print("[sweep] interrupted: run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, OSError, SweepEngineError) as err:
        return fail(PROG, str(err))
    counts = {s: sum(r.state == s for r in state.runs) for s in ("finished", "failed", "pending")}
    stopped = sum(r.state == STOPPED for r in state.runs)
    sweep_dir = args.sweep_dir or DEFAULT_SWEEP_ROOT / args.sweep_file.stem
    print(
        f"[sweep] {counts['finished']} finished, {counts['failed']} failed"
        + (f", {stopped} stopped early" if stopped else "")
        + (f", {counts['pending']} pending" if counts["pending"] else "")
        + f"; table: lavit report {sweep_dir}",
        flush=True,
    )
    return 0
