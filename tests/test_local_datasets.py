"""``LAVIT_LOCAL_DATASETS``: a machine's local copy of a Hub dataset, for the configs as they are.

The sweeps and ``experiments/cifar10.yaml`` name CIFAR-10 by its Hub id; here its local copy is the
embedded subset (a parquet folder in the same layout as the full copy these machines keep), and
the network is refused, so a download attempt would fail the test.
"""

from __future__ import annotations

import socket
import sys

import pytest
from conftest import REPO

from lavit.training.data import ImageDataModule
from lavit.training.sources import LOCAL_DATASETS_ENV, embedded_dataset_dir, local_copies


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(sys, "argv", ["lavit"])


def test_cifar10_config_reads_the_local_copy_this_machine_names(monkeypatch, tmp_path):
    from lavit.cli import LaViTCLI

    monkeypatch.chdir(REPO)
    copy = embedded_dataset_dir()
    monkeypatch.setenv(LOCAL_DATASETS_ENV, f"someone/else=/nowhere, uoft-cs/cifar10={copy}")
    cli = LaViTCLI(
        args=[
            "--config",
            "experiments/cifar10.yaml",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--data.num_workers=0",
            f"--data.cache_dir={tmp_path / 'hf-cache'}",
        ],
        run=False,
    )
    assert cli.config.data.source == "uoft-cs/cifar10"  # the config keeps the Hub id
    data = cli.datamodule
    assert data.source == str(copy) and data.source_type == "parquet"
    data.setup("fit")
    assert (len(data.train_dataset), len(data.val_dataset)) == (4000, 1000)
    assert data.num_classes == 10 and cli.model.hparams.num_classes == 10


def test_without_the_variable_the_hub_id_is_used(monkeypatch):
    monkeypatch.delenv(LOCAL_DATASETS_ENV, raising=False)
    data = ImageDataModule(source="uoft-cs/cifar10", img_size=32, num_workers=0)
    assert (data.source, data.source_type) == ("uoft-cs/cifar10", "hub")


def test_a_missing_copy_or_a_malformed_entry_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv(LOCAL_DATASETS_ENV, f"uoft-cs/cifar10={tmp_path / 'absent'}")
    with pytest.raises(ValueError, match=r"names .*absent.* as the local copy of uoft-cs/cifar10"):
        ImageDataModule(source="uoft-cs/cifar10", img_size=32)
    ImageDataModule(source="embedded", img_size=32)  # other sources are not affected
    with pytest.raises(ValueError, match=r"'uoft-cs/cifar10' is not HUB_ID=PATH"):
        local_copies("uoft-cs/cifar10")
    assert local_copies(" a/b = x ,, c/d=y/z ") == {"a/b": "x", "c/d": "y/z"}
