"""Test, lint and docs sessions. Every install goes through constraints.txt (the pinned torch pair)."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = True

CONSTRAINTS = ("-c", "constraints.txt")


def _pytest(session: nox.Session, *marks: str) -> None:
    session.install(*CONSTRAINTS, "-e", ".[dev]")
    args = session.posargs or ["-q"]
    session.run("pytest", *marks, *args, env={"WANDB_MODE": "offline"})


@nox.session
def tests(session: nox.Session) -> None:
    """The fast tests, for development: the `slow` end-to-end runs are skipped."""
    _pytest(session, "-m", "not slow")


@nox.session
def tests_full(session: nox.Session) -> None:
    """Every test (CPU, offline, no ../shared needed): what CI runs."""
    _pytest(session)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    session.install(*CONSTRAINTS, "ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the mkdocs site; --strict turns every warning (a broken link, say) into a failure."""
    extras = nox.project.load_toml("pyproject.toml")["project"]["optional-dependencies"]
    session.install(*CONSTRAINTS, *extras["docs"])  # the site needs mkdocs, not lavit itself
    session.run("mkdocs", "build", "--strict", *session.posargs)
