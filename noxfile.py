"""Test and check sessions. Every install goes through constraints.txt (the pinned torch pair)."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "constraints.txt")


@nox.session
def tests(session: nox.Session) -> None:
    """The default test run (CPU, offline, no ../shared needed)."""
    session.install(*CONSTRAINTS, "-e", ".[dev]")
    session.run("pytest", *(session.posargs or ["-q"]), env={"WANDB_MODE": "offline"})


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install(*CONSTRAINTS, "ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
