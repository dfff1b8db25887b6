"""Run timm's own model test suite (its ``tests/test_models.py``) against the ``lavit_*`` models.

    python scripts/timm_model_tests.py --timm-repo ~/src/pytorch-image-models [-- -x -q ...]

timm ships its tests only in its repository, so pass a checkout of it (``git clone
https://github.com/huggingface/pytorch-image-models``). The script copies ``tests/test_models.py``
into a temporary directory, with a ``conftest.py`` that imports ``lavit`` (registering the
models), and makes the two edits a new model family needs in that file:

* ``'lavit'`` joins ``FEAT_INTER_FILTERS``, the modules whose models implement
  ``forward_intermediates`` (so the intermediates tests cover them);
* ``'lavit_*'`` joins ``EXCLUDE_JIT_FILTERS``, timm's list of models that do not support
  TorchScript (LaViT's size logic is Python that torch.fx and torch.export handle; README).

Then it runs ``pytest -k lavit`` there, with this repository first on the import path (extra
arguments after ``--`` go to pytest), and exits with pytest's code.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADDITIONS = {"FEAT_INTER_FILTERS": "'lavit'", "EXCLUDE_JIT_FILTERS": "'lavit_*'"}


def patched_test_file(source: str) -> str:
    """timm's test_models.py with lavit added to the two lists (a clear error if one moved)."""
    for name, entry in ADDITIONS.items():
        pattern = re.compile(rf"^{name} = \[", re.MULTILINE)
        if not pattern.search(source):
            raise SystemExit(
                f"error: timm's tests/test_models.py has no `{name} = [` line any more; "
                f"add {entry} to that list by hand"
            )
        source = pattern.sub(f"{name} = [{entry}, ", source, count=1)
    return source


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--timm-repo", type=Path, required=True, help="pytorch-image-models checkout"
    )
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args(argv)
    test_file = args.timm_repo / "tests" / "test_models.py"
    if not test_file.is_file():
        parser.error(f"{test_file} does not exist: give a pytorch-image-models checkout")
    with tempfile.TemporaryDirectory(prefix="lavit-timm-tests-") as tmp:
        folder = Path(tmp)
        (folder / "test_models.py").write_text(patched_test_file(test_file.read_text()))
        (folder / "conftest.py").write_text("import lavit  # noqa: F401  (registers lavit_*)\n")
        command = [
            sys.executable, "-m", "pytest", "test_models.py", "-k", "lavit", "-p", "no:cacheprovider",
            "-W", "ignore::pytest.PytestUnknownMarkWarning", *args.pytest_args,
        ]  # fmt: skip
        path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        return subprocess.call(command, cwd=folder, env={**os.environ, "PYTHONPATH": path})


if __name__ == "__main__":
    sys.exit(main())
