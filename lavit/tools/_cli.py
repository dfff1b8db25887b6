"""What every ``lavit <tool>`` shares on its command line: the parser, value types, messages.

Each tool is ``main(argv) -> exit code`` (``lavit.cli`` dispatches to it). A usage error is
argparse's (``lavit bench: error: ...``, exit 2); a problem found while working is reported the
same way by :func:`fail`: one ``<prog>: error: ...`` line and ``EXIT_CONFIG_ERROR``.
"""

from __future__ import annotations

import argparse
import sys

from lavit.errors import EXIT_CONFIG_ERROR


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: ...)`` in an option's help, unless it has none or says it already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if "default" in (action.help or "") or action.default in (None, False, argparse.SUPPRESS):
            return action.help or ""
        return super()._get_help_string(action)


def tool_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=_DefaultsFormatter
    )


def positive_int(text: str) -> int:
    """An argparse type: an integer ≥ 1."""
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return int(text)


def add_wandb_options(parser: argparse.ArgumentParser, project: str, what: str) -> None:
    """``--wandb`` (log ``what`` to W&B, by ``lavit fit``'s rule), its project and init timeout."""
    parser.add_argument("--wandb", action="store_true", help=f"also log {what} to W&B")
    parser.add_argument("--wandb-project", default=project)
    parser.add_argument(
        "--wandb-init-timeout", type=float, default=30.0,
        help="seconds to wait for the W&B server before logging offline",
    )  # fmt: skip


def log_to_wandb(
    args: argparse.Namespace, job_type: str, config: dict, tables: dict, images: dict | None = None
) -> None:
    """Tables (rows of dicts) and images (``key: (path, caption)``) as one W&B run, by ``lavit
    fit``'s rule (``start_wandb_run``: offline when the server does not answer)."""
    import wandb

    from lavit.training.logging import start_wandb_run

    run = start_wandb_run(
        args.wandb_init_timeout, project=args.wandb_project, job_type=job_type,
        dir=str(args.out), config=config,
    )  # fmt: skip
    if run is None:  # WANDB_MODE=disabled
        return
    for key, rows in tables.items():
        if rows:
            run.log(
                {key: wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])}
            )
    for key, (path, caption) in (images or {}).items():
        run.log({key: wandb.Image(str(path), caption=caption)})
    run.finish()


def fail(prog: str, message: str, code: int = EXIT_CONFIG_ERROR) -> int:
    """Print ``<prog>: error: <message>`` on stderr; returns ``code`` for ``main`` to return."""
    print(f"{prog}: error: {message}", file=sys.stderr)
    return code


def say(prog: str, message: str) -> None:
    """What a tool is doing now, as ``[<prog>] <message>`` on stderr (stdout keeps its results)."""
    print(f"[{prog.removeprefix('lavit ')}] {message}", file=sys.stderr, flush=True)
