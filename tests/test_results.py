"""docs/ablations.md (``scripts/results_page.py``): its statistics, its sentences, and that it is
current."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from lavit.tools import sweep


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


results = _load_script("results_page")
critical_difference, detectable_difference = (
    results.critical_difference,
    results.detectable_difference,
)
holm, pooled_std = results.holm, results.pooled_std

# Stands in for `lavit fit` as the ablation runs call it: top-1 by setting and seed (given below),
# run_info.json with the cost fields, and a saturation.json like the callback's.
FAKE_TRAIN = textwrap.dedent(
    """
    import csv, json, os, sys
    args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
    split, seed = args["model.num_va_layers"], int(args["seed_everything"])
    top1 = json.loads(os.environ["FAKE_TOP1"])[split][seed]
    run_dir = args["trainer.default_root_dir"] + "/version_0"
    os.makedirs(run_dir + "/saturation")
    with open(run_dir + "/metrics.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", "step", "val/top1"])
        w.writerow([0, 10, top1 - 0.2])
        w.writerow([1, 20, top1])
    info = {"params": 1000, "macs": 2_000_000, "cpu": "Fake CPU", "torch_threads": 1,
            "final": {"wall_s": 120.0, "cpu_s": 60.0 * (2 + seed)},
            "config": {"model": {"arch": "fake"}}}
    json.dump(info, open(run_dir + "/run_info.json", "w"))
    la = split == "[1, 2, 1, 1]"
    summary = [{"stage": 3, "layers": "0→1", "kinds": "va→la" if la else "va→va",
                "comparison": "consecutive", "mean": 0.9 if la else 0.6 + 0.01 * seed,
                "centred_mean": 0.5 if la else 0.2, "per_head": ""}]
    json.dump({"rows": [], "summary": summary}, open(run_dir + "/saturation/saturation.json", "w"))
    """
)
SPLITS = {"[1, 2, 3, 2]": [0.500, 0.510, 0.505], "[1, 2, 1, 1]": [0.502, 0.508, 0.497],
          "[1, 1, 1, 1]": [0.400, 0.410, 0.395]}  # fmt: skip


def test_pooled_std_critical_difference_and_holm_on_hand_computed_numbers():
    std, df = pooled_std([[1.0, 2.0, 3.0], [2.0, 4.0], [5.0]])  # variances 1 and 2; n = 1 adds 0
    assert df == 3 and std == pytest.approx(math.sqrt((2 * 1 + 1 * 2) / 3))
    # t(0.975, 3) = 3.182446; two means of 3 seeds each
    assert critical_difference(1.0, 3, 3, 3) == pytest.approx(3.182446 * math.sqrt(2 / 3), 1e-6)
    # + t(0.8, 3) = 0.978472 for 80 % power
    assert detectable_difference(1.0, 3, 3) == pytest.approx(4.160918 * math.sqrt(2 / 3), 1e-6)
    # sorted: 0.01 ≤ 0.05/3 rejected; 0.03 > 0.05/2 stops, so 0.04 is kept too
    assert holm([0.01, 0.04, 0.03]) == [True, False, False]
    assert holm([0.001, 0.02, 0.04]) == [True, True, True]  # 0.02 ≤ 0.025, 0.04 ≤ 0.05
    assert holm([]) == []


def make_results(tmp_path: Path, monkeypatch, splits: dict = SPLITS) -> Path:
    program = tmp_path / "fake_train.py"
    program.write_text(FAKE_TRAIN)
    sweep_file = tmp_path / "va_layers.yaml"
    config = {
        "name": "fake-va-layers",
        "program": str(program),
        "method": "grid",
        "metric": {"name": "val/top1", "goal": "maximize"},
        "parameters": {
            "model.num_va_layers": {"values": [json.loads(s) for s in splits]},
            "seed_everything": {"values": [0, 1, 2]},
        },
        "command": ["${env}", "${interpreter}", "${program}", "${args}"],
    }
    sweep_file.write_text(
        "# Question: how much top-1 do LA layers cost?\n#\n" + yaml.safe_dump(config)
    )
    monkeypatch.setenv("FAKE_TOP1", json.dumps(splits))
    root = tmp_path / "results"
    assert sweep.main([str(sweep_file), "--sweep-dir", str(root / "va_layers")]) == 0
    pilot = tmp_path / "pilot.yaml"
    pilot_config = {**config, "parameters": {**config["parameters"]}}
    pilot_config["parameters"]["model.num_va_layers"] = {"values": [[1, 2, 3, 2]]}
    pilot.write_text(yaml.safe_dump(pilot_config))
    assert sweep.main([str(pilot), "--sweep-dir", str(root / "pilot" / "candidate")]) == 0
    return root


def test_the_page_states_what_the_seeds_resolve_and_what_they_cannot(tmp_path, monkeypatch):
    root = make_results(tmp_path, monkeypatch)
    page = tmp_path / "ablations.md"
    argv = ["--results", str(root), "--write", str(page)]
    assert results.main(argv) == 0
    text = page.read_text()
    assert "**Question** (" in text and "how much top-1 do LA layers cost?" in text
    # [1, 1, 1, 1] is ~10.3 pp below all-VA; the default split is within noise (−0.27 pp)
    assert "| [1, 2, 1, 1] |" in text and "| -0.27 |" in text and "| -10.33 |" in text
    assert "the seeds resolve num_va_layers=[1, 1, 1, 1] -10.33 pp" in text
    pooled = pooled_std([[100 * v for v in s] for s in SPLITS.values()])
    cd = critical_difference(*pooled, 3, 3)
    assert f"differences under {cd:.2f} pp cannot reach significance" in text
    # the pilot: per-seed top-1 (final), CPU minutes (median of 2, 3, 4) and std·√(CPU h)
    assert "| candidate |" in text and "50.00, 51.00, 50.50" in text and "| 3.0 |" in text
    assert f"| {0.5 * math.sqrt(3 / 60):.3f} |" in text
    # the pilot's runs are the all-VA row's (same model, seeds and numbers): said so
    assert (
        "**Determinism.** Runs of the same model, data and seeds in different sweeps gave the same"
        " top-1 for every seed, to the last logged digit: va_layers (num_va_layers=[1, 2, 3, 2]) "
        "= pilot/candidate (num_va_layers=[1, 2, 3, 2])." in text
    )
    # saturation: the all-VA twin's consecutive maps against LaViT's LA layer
    assert "| 3 | 0→1 | va→la | 0.900 ± 0.000 | 0.610 ± 0.010 |" in text
    assert "cosine similarity 0.61–0.61 (centred 0.20–0.20; LaViT's transformed maps" in text
    assert "the saturation the paper reports (and that LA reuse presumes) is not seen here" in text
    # the plot of the sweep, and the page's own copy under its folder (mkdocs serves only that)
    assert (root / "va_layers" / "report" / "ablation.png").stat().st_size > 1000
    assert "](ablations/va_layers.png)" in text and (tmp_path / "ablations/va_layers.png").is_file()

    assert results.main([*argv, "--check"]) == 0
    page.write_text(text.replace("-10.33", "-9.99"))
    assert results.main([*argv, "--check"]) == 1  # stale


@pytest.mark.slow
def test_no_resolved_difference_is_said_so(tmp_path, monkeypatch):
    noisy = {"[1, 2, 3, 2]": [0.50, 0.52, 0.49], "[1, 2, 1, 1]": [0.51, 0.49, 0.50],
             "[1, 1, 1, 1]": [0.48, 0.50, 0.51]}  # fmt: skip
    root = make_results(tmp_path, monkeypatch, noisy)
    text = results.render(root, tmp_path)
    assert "no setting differs from all-VA by more than the seed noise" in text


def test_bad_results_folder_is_one_clear_error(tmp_path, capsys):
    assert results.main(["--results", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert results.main(["--results", str(tmp_path)]) == 2
    assert "none of the ablation sweep dirs" in capsys.readouterr().err  # nor pilot/


def test_the_ablations_page_is_current(monkeypatch):
    """docs/ablations.md is what the script gives for the committed runs of results/ablations."""
    monkeypatch.chdir(REPO)  # the page's links and the command it names are relative to it
    assert (REPO / "results" / "ablations").is_dir(), "results/ablations is part of the repository"
    assert results.main(["--check"]) == 0, (
        "docs/ablations.md is stale: run `python scripts/results_page.py` and commit it"
    )


def test_the_references_are_rows_of_their_sweeps_and_the_default_split_is_the_models():
    from lavit.models.factory import create_model
    from lavit.tools.sweep_engine import load_sweep_config

    for ablation in results.ABLATIONS:
        grid = load_sweep_config(REPO / "sweeps" / f"{ablation.folder}.yaml")["parameters"]
        for name, value in ablation.reference.items():
            assert value in grid[name]["values"], (ablation.folder, name)
    model = create_model("lavit_cifar", 10, 32)
    assert model.num_va_layers == results.LAVIT_DEFAULT_SPLIT
    assert [len(stage.blocks) for stage in model.stages] == results.ALL_VA_SPLIT
