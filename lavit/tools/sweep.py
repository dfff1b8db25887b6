"""``lavit sweep``: a W&B sweep file run offline, with W&B's own engine choosing the runs.

    lavit sweep sweeps/va_layers.yaml [--count N] [--devices cpu|0,1,...] [--sweep-dir DIR]

Each run is a subprocess of the sweep's ``command`` as ``wandb agent`` expands it
(:mod:`~lavit.tools.sweep_engine`), one at a time per ``--devices`` slot, slots in parallel
(:mod:`~lavit.tools.sweep_runner`); ``<sweep dir>/sweep_state.json`` lets the same command resume
the sweep. ``lavit report <sweep dir>`` turns the runs into the ablation table. docs/sweeps.md
tells the whole story: early_terminate, --after-run, the status lines.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from lavit.errors import EXIT_INTERRUPTED
from lavit.tools._cli import fail, positive_int, tool_parser
from lavit.tools.sweep_engine import SweepEngineError
from lavit.tools.sweep_runner import SweepRunner
from lavit.tools.sweep_status import LiveStatus, count_states

PROG = "lavit sweep"
DEFAULT_SWEEP_ROOT = Path("runs") / "sweeps"


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
    print(f"[sweep] {count_states(state.runs) or 'no runs'}; table: lavit report {sweep_dir}")
    return 0
