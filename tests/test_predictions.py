"""``lavit predict`` writes predictions.csv: rows equal a direct forward of the checkpoint's EMA model."""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from test_reliability import fit_args

from lavit.cli import main
from lavit.training.trained import eval_transform, load_trained

EMA = "--model.ema_decay=0.5"


@pytest.fixture(autouse=True)
def in_process(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lavit"])
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory) -> Path:
    """One epoch (4 steps) of the tiny model with an EMA of its weights."""
    run_dir = tmp_path_factory.mktemp("ema_run")
    old_argv, sys.argv = sys.argv, ["lavit"]
    try:
        main(fit_args(run_dir, "--trainer.max_epochs=1", EMA))
    finally:
        sys.argv = old_argv
        os.environ.pop("PL_GLOBAL_SEED", None)
    return run_dir


def predict_args(run_dir: Path, *extra: str) -> list[str]:
    """The run's own configuration (EMA included), as a user passes its config.yaml."""
    return ["predict", *fit_args(run_dir, EMA, "--ckpt_path=last", *extra)[1:]]


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open() as file:
        return list(csv.DictReader(file))


def test_predicting_a_plain_folder_writes_the_ema_models_predictions(ema_run, tmp_path):
    folder = tmp_path / "unlabelled"
    (folder / "nested").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, name in enumerate(["b.png", "a.jpg", "nested/c.png", "d.png", "e.png"]):
        pixels = rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)
        PIL.Image.fromarray(pixels).save(folder / name)
    main(predict_args(ema_run, f"--data.predict_source={folder}"))

    rows = read_rows(ema_run / "version_1" / "predictions.csv")
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    assert [r["id"] for r in rows] == paths
    assert set(rows[0]) == {"id", "predicted", "probability", "top5", "top5_probabilities"}

    model, config, checkpoint = load_trained(ema_run / "checkpoints" / "last.ckpt")
    state = checkpoint["state_dict"]
    ema = {k.removeprefix("ema.module."): v for k, v in state.items() if k.startswith("ema.")}
    raw = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    assert not torch.equal(ema["head.weight"], raw["head.weight"])  # the EMA is another model
    torch.testing.assert_close(model.state_dict()["head.weight"], ema["head.weight"])
    transform = eval_transform(config)
    images = torch.stack([transform(PIL.Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        probs = model(images).softmax(-1)
    names = checkpoint["class_names"]
    top = probs.topk(5, dim=-1)
    for row, p, classes in zip(rows, top.values, top.indices, strict=True):
        assert row["predicted"] == names[classes[0]]
        assert float(row["probability"]) == pytest.approx(float(p[0]), abs=1e-5)
        assert row["top5"].split() == [names[c] for c in classes]
        got = [float(v) for v in row["top5_probabilities"].split()]
        assert got == pytest.approx(p.tolist(), abs=1e-5)


def test_predicting_a_labelled_split_adds_label_and_correctness(ema_run, tmp_path):
    output = tmp_path / "out" / "test_predictions.csv"
    main(predict_args(ema_run, f"--predict.output={output}", "--trainer.limit_predict_batches=2"))
    rows = read_rows(output)
    assert [r["id"] for r in rows] == [str(i) for i in range(32)]  # row indices of the test split
    for row in rows:
        assert row["correct"] == str(row["label"] == row["predicted"])
        assert row["label"] in row["top5"].split() or row["correct"] == "False"
