"""Local copies of Hub datasets, named by the machine instead of the config::

    export LAVIT_LOCAL_DATASETS=uoft-cs/cifar10=../shared/data/cifar10,ILSVRC/imagenet-1k=/data/in1k

Every data module built there (``lavit fit``, each sweep run, which inherit the environment)
reads the copy (any local ``source``; relative paths from the working directory) instead of
downloading; the config, ``run_info.json`` and W&B keep the Hub id.
"""

from __future__ import annotations

import os
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

LOCAL_DATASETS_ENV = "LAVIT_LOCAL_DATASETS"


def local_copies(text: str | None = None) -> dict[str, str]:
    """``{hub id: path}`` from ``text`` (default: ``$LAVIT_LOCAL_DATASETS``), ``id=path,...``."""
    text = os.environ.get(LOCAL_DATASETS_ENV, "") if text is None else text
    copies: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in text.split(","))):
        hub_id, sep, path = (part.strip() for part in entry.partition("="))
        if not (sep and hub_id and path):
            raise ValueError(
                f"{LOCAL_DATASETS_ENV}: {entry!r} is not HUB_ID=PATH (e.g. "
                "uoft-cs/cifar10=../shared/data/cifar10; entries separated by commas)"
            )
        copies[hub_id] = path
    return copies


def local_copy(source: str) -> str | None:
    """The local copy of the Hub dataset ``source`` that this machine names, if any.

    Raises ``ValueError`` when the named copy does not exist (rather than silently downloading).
    """
    path = local_copies().get(source)
    if path is None:
        return None
    if not Path(path).expanduser().exists():
        raise ValueError(
            f"{LOCAL_DATASETS_ENV} names {path!r} as the local copy of {source}, but it does not "
            f"exist (relative to {os.getcwd()}); fix the path or remove the entry to download it"
        )
    rank_zero_info(f"Data: {source} read from its local copy {path} ({LOCAL_DATASETS_ENV})")
    return path
