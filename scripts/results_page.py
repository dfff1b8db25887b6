"""The ablations page (docs/ablations.md) from the committed ablation runs: a maintainer script.

(One file of ~640 lines: a page generator whose sections, statistics and sentences are read
together when the page changes; it is not installed.)

    python scripts/results_page.py                        # rewrite docs/ablations.md
    python scripts/results_page.py --measure-throughput   # time the settings first
    python scripts/results_page.py --check                # exit 1 if the page is stale

The results folder (``--results``, default ``results/ablations``) holds one ``lavit sweep`` dir per
ablation (``va_layers/``, ``dp_loss/``, ...) and the protocol pilot (``pilot/<protocol>/``), each
with its state file and its runs' small files. Per ablation the page gives the question (from the
sweep file), the table of ``lavit report`` (:mod:`lavit.tools.report`) with each setting's
difference from a reference setting, the plot, and one sentence generated from the numbers: which
differences the seed spread resolves. The test is a two-sided pooled t-test per setting against the
reference (the pooled std of all settings of the sweep, ``df = Σ(n−1)``), with Holm's correction
over the settings of the sweep; the smallest resolvable difference is the 5 % critical difference
for the seeds at hand, and the one 80 % power detects is stated alongside. Then the attention
saturation of trained LaViT against its all-VA twin (the same runs of ``va_layers``), from each
run's ``saturation/saturation.json``.

Throughput is not measured while generating (the page must regenerate identically): it is
measured by ``--measure-throughput`` (interleaved, inference, batch 64, fp32, this machine) and
stored per sweep in ``throughput.json``, which the page then reads, with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats

from lavit.errors import EXIT_FAILURE
from lavit.tables import markdown_table, write_csv
from lavit.tools._cli import fail, positive_int, say
from lavit.tools.report import (
    SettingRow,
    bench_throughput,
    collect_local,
    csv_rows,
    format_value,
    plot,
    run_info,
    summarise_runs,
    table_rows,
)
from lavit.tools.sweep_engine import load_state

__all__ = ["ABLATIONS", "critical_difference", "holm", "main", "pooled_std", "render"]

PILOT_DIR = "pilot"
THROUGHPUT_FILE = "throughput.json"
PROG = "results_page"
DEFAULT_ROOT = Path("results/ablations")
DEFAULT_PAGE = Path("docs/ablations.md")


@dataclass(frozen=True)
class Ablation:
    """One sweep of the page: its folder, title and the setting the others are compared with."""

    folder: str
    title: str
    reference: dict[str, Any]  # swept parameter → value of the reference row
    reference_label: str


# Order of the page; references as the sweep files' questions pose them.
ABLATIONS = (
    Ablation(
        folder="va_layers",
        title="Where to use Less-Attention layers",
        reference={"model.num_va_layers": [1, 2, 3, 2]},
        reference_label="all-VA",
    ),
    Ablation(
        folder="residual_downsample",
        title="Residual attention downsampling",
        reference={"model.residual_attn_downsample": False},
        reference_label="off",
    ),
    Ablation(
        folder="la_init_state",
        title="Initialisation of Ψ/Θ and the state they transform",
        reference={"model.la_init": "identity", "model.attn_state": "scores"},
        reference_label="identity, scores (the default)",
    ),
    Ablation(
        folder="dp_loss",
        title="Diagonality-preserving loss",
        reference={"model.dp_loss_weight": 0.0},
        reference_label="DP off (λ = 0)",
    ),
)
# Centred cosine similarity from which two layers' maps count as "much alike" in the sentence.
SATURATED_CENTRED = 0.5
LAVIT_DEFAULT_SPLIT = [1, 2, 1, 1]  # lavit_cifar's num_va_layers: LA in stages 3–4
ALL_VA_SPLIT = [1, 2, 3, 2]


# ------------------------------------------------------------------------------------ statistics


def pooled_std(samples: list[list[float]]) -> tuple[float | None, int]:
    """The pooled sample std of groups and its degrees of freedom ``Σ(n−1)`` (None if 0)."""
    df = sum(len(s) - 1 for s in samples if len(s) >= 2)
    if df == 0:
        return None, 0
    squares = sum((len(s) - 1) * statistics.variance(s) for s in samples if len(s) >= 2)
    return math.sqrt(squares / df), df


def critical_difference(std: float, df: int, n_a: int, n_b: int, alpha: float = 0.05) -> float:
    """The smallest difference of two means a two-sided pooled t-test calls significant."""
    return stats.t.ppf(1 - alpha / 2, df) * std * math.sqrt(1 / n_a + 1 / n_b)


def detectable_difference(
    std: float, df: int, n: int, alpha: float = 0.05, power: float = 0.8
) -> float:
    """The true difference that the test finds with probability ``power`` (n seeds a side)."""
    return (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * std * math.sqrt(2 / n)


def t_test_p(diff: float, std: float, df: int, n_a: int, n_b: int) -> float:
    """Two-sided p-value of a difference of means under the pooled std."""
    t = diff / (std * math.sqrt(1 / n_a + 1 / n_b))
    return float(2 * stats.t.sf(abs(t), df))


def holm(p_values: list[float], alpha: float = 0.05) -> list[bool]:
    """Holm's step-down correction: which hypotheses are rejected at family-wise ``alpha``."""
    order = sorted(range(len(p_values)), key=lambda i: p_values[i])
    rejected = [False] * len(p_values)
    for rank, index in enumerate(order):
        if p_values[index] > alpha / (len(p_values) - rank):
            break
        rejected[index] = True
    return rejected


# -------------------------------------------------------------------------------------- sections


def _setting(values: dict[str, Any]) -> str:
    return ", ".join(
        f"{name.removeprefix('model.')}={format_value(v)}" for name, v in values.items()
    )


def _question(sweep_file: Path) -> str:
    """The ``# Question:`` paragraph of a generated sweep file, or ''."""
    if not sweep_file.is_file():
        return ""
    lines, inside = [], False
    for line in sweep_file.read_text(encoding="utf-8").splitlines():
        text = line.removeprefix("#").strip()
        if text.startswith("Question:"):
            inside, text = True, text.removeprefix("Question:").strip()
        elif inside and (not line.startswith("#") or not text):
            break
        if inside:
            lines.append(text)
    return " ".join(lines)


def _runs_info(sweep_dir: Path) -> list[dict[str, Any]]:
    """Each finished run's ``run_info.json`` (newest attempt)."""
    state = load_state(sweep_dir)
    infos = [run_info(sweep_dir / r.run_dir) for r in state.runs if r.state == "finished"]
    return [info for info in infos if info]


def _cost(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Median wall and CPU minutes per run, the CPU and threads they ran on."""
    walls = [i["final"]["wall_s"] for i in infos if (i.get("final") or {}).get("wall_s")]
    cpus = [i["final"]["cpu_s"] for i in infos if (i.get("final") or {}).get("cpu_s")]
    return {
        "wall_min": statistics.median(walls) / 60 if walls else None,
        "cpu_min": statistics.median(cpus) / 60 if cpus else None,
        "cpu": sorted({i.get("cpu") for i in infos if i.get("cpu")}),
        "threads": sorted({i.get("torch_threads") for i in infos if i.get("torch_threads")}),
    }


def _num(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _protocol_section(root: Path, used_configs: list[str]) -> list[str]:
    """The pilot: seed spread and cost of each candidate protocol, and which one ran."""
    pilot = root / PILOT_DIR
    candidates = (
        sorted(p for p in pilot.iterdir() if (p / "sweep_state.json").is_file())
        if pilot.is_dir()
        else []
    )
    if not candidates:
        return []
    table, scores = [], {}
    for folder in candidates:
        results, _ = collect_local(folder)
        top1 = [r.final for r in results if r.state == "finished" and r.final is not None]
        cost = _cost(_runs_info(folder))
        std = statistics.stdev(top1) if len(top1) >= 2 else None
        # The std of a mean bought with one CPU hour: std / √(runs per hour) = std·√(h per run).
        per_hour = (
            std * math.sqrt(cost["cpu_min"] / 60) if std is not None and cost["cpu_min"] else None
        )
        configs = load_state(folder).configs or ["(the sweep file's)"]
        scores[folder.name] = (per_hour, configs)
        table.append(
            {
                "protocol": folder.name,
                "configs": " + ".join(f"`{c}`" for c in configs),
                "top-1 % per seed": ", ".join(f"{v:.2f}" for v in top1),
                "mean ± std": f"{statistics.fmean(top1):.2f} ± {_num(std)}" if top1 else "n/a",
                "CPU min / run": _num(cost["cpu_min"], 1),
                "wall min / run": _num(cost["wall_min"], 1),
                "std × √(CPU h / run)": _num(per_hour, 3),
            }
        )
    ranked = sorted((v[0], k) for k, v in scores.items() if v[0] is not None)
    chosen = next((k for k, v in scores.items() if v[1] == used_configs), None)
    lines = [
        "## Protocol",
        "",
        "Chosen by a pilot: the default `lavit_cifar` at seeds 0, 1, 2 under each candidate "
        "protocol (`sweeps/pilot/protocol_pilot.yaml`), the runs of both protocols side by side "
        "on the same machine. Lower `std × √(CPU h / run)` is better: it is the seed std of a "
        "mean bought with one CPU hour of runs. Top-1 is the last validation's (for the one-pass "
        "protocol, the only one).",
        "",
        markdown_table(table),
        "",
    ]
    if ranked and chosen:
        best = ranked[0][1]
        lines.append(
            f"The ablations below ran on **{chosen}** ({' + '.join(f'`{c}`' for c in used_configs)})"
            + (
                ", the protocol with the smaller spread per CPU hour in this pilot."
                if chosen == best
                else f", although {best} had the smaller spread per CPU hour in this pilot."
            )
            + " Three seeds per protocol estimate a std only roughly (its 95 % interval spans "
            "about 0.5× to 6× the estimate), so this choice is a judgement on little data."
        )
        lines.append("")
    return lines


def _throughput(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / THROUGHPUT_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def measure_throughput(sweep_dir: Path, batch_size: int = 64) -> None:
    """Time every setting of a sweep (interleaved) and store it in ``throughput.json``."""
    import torch

    from lavit.runtime import cpu_model_name

    results, _ = collect_local(sweep_dir)
    _, rows = summarise_runs(results, "final")
    configs = [next((r.model_config for r in row.runs if r.model_config), {}) for row in rows]
    values = bench_throughput(batch_size)(configs)
    record = {
        "how": f"inference, fp32, batch {batch_size}, settings timed round-robin "
        "(lavit.tools.timing), by `scripts/results_page.py --measure-throughput`",
        "cpu": cpu_model_name(),
        "torch_threads": torch.get_num_threads(),
        "settings": [
            {"values": row.values, "img_s": value} for row, value in zip(rows, values, strict=True)
        ],
    }
    (sweep_dir / THROUGHPUT_FILE).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _apply_throughput(rows: list[SettingRow], record: dict[str, Any]) -> None:
    by_setting = {
        json.dumps(s["values"], sort_keys=True): s["img_s"] for s in record.get("settings", [])
    }
    for row in rows:
        row.throughput = by_setting.get(json.dumps(row.values, sort_keys=True))


def _ablation_section(
    root: Path, ablation: Ablation, number: int, page_dir: Path, write_files: bool
) -> tuple[list[str], dict]:
    """One sweep's section (question, runs, table with Δ and p, plot, answer) and its data."""
    sweep_dir = root / ablation.folder
    state = load_state(sweep_dir)
    results, metric = collect_local(sweep_dir)
    parameters, rows = summarise_runs(results, "final")
    throughput = _throughput(sweep_dir)
    _apply_throughput(rows, throughput)
    table = table_rows(parameters, rows, "final")
    reference = next(
        (r for r in rows if all(r.values.get(k) == v for k, v in ablation.reference.items())), None
    )
    std, df = pooled_std([row.top1 for row in rows])
    comparisons = []  # (row, diff, p)
    for entry, row in zip(table, rows, strict=True):
        if reference is None or row.mean is None or reference.mean is None:
            entry["Δ top-1 (pp)"] = "n/a"
        elif row is reference:
            entry["Δ top-1 (pp)"] = "reference"
        else:
            diff = row.mean - reference.mean
            entry["Δ top-1 (pp)"] = f"{diff:+.2f}"
            if std is not None and len(row.top1) and len(reference.top1):
                comparisons.append(
                    (row, diff, t_test_p(diff, std, df, len(row.top1), len(reference.top1)))
                )
    rejected = holm([p for _, _, p in comparisons])
    for (row, _, p), significant in zip(comparisons, rejected, strict=True):
        index = rows.index(row)
        table[index]["p"] = f"{p:.3f}" + (" *" if significant else "")
    for entry in table:
        entry.setdefault("p", "")
    report_dir = sweep_dir / "report"
    if write_files:
        write_csv(report_dir / "ablation.csv", csv_rows(parameters, rows, "final"))
        plot(report_dir / "ablation.png", parameters, rows, "final", f"{ablation.title}: {metric}")
        # mkdocs serves only what lies under docs/: the page gets its own copy of the plot
        (page_dir / "ablations").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(
            report_dir / "ablation.png", page_dir / "ablations" / f"{ablation.folder}.png"
        )
    title = f"{number}. {ablation.title}"
    seeds = sorted(
        {r.values.get("seed_everything") for r in results if r.state == "finished"}, key=str
    )
    n = min((len(r.top1) for r in rows if r.top1), default=0)
    lines = [f"## {title}", ""]
    question = _question(Path(state.sweep_file))
    if question:
        lines += [f"**Question** (`{state.sweep_file}`): {question}", ""]
    finished = sum(r.state == "finished" for r in results)
    total = len(results)
    lines += [
        f"Runs: {finished} finished of {total} started (seeds {', '.join(map(str, seeds))}); "
        f"top-1: `{metric}` of the last validation, mean ± sample std over seeds; Δ against "
        f"the reference **{ablation.reference_label}**; p: two-sided pooled t-test (pooled std "
        f"{_num(std)} pp, {df} df), `*` = significant at 5 % after Holm's correction over the "
        f"{len(comparisons)} comparison(s)."
        + (
            f" Throughput: {throughput['how']}, on {throughput['cpu']} "
            f"({throughput['torch_threads']} threads)."
            if throughput
            else " Throughput: not measured (`--measure-throughput`)."
        ),
        "",
        markdown_table(table),
        "",
        f"![{ablation.title}](ablations/{ablation.folder}.png)",
        "",
    ]
    lines += [_verdict(ablation, rows, reference, comparisons, rejected, std, df, n), ""]
    return lines, {"rows": rows, "results": results}


def _verdict(ablation, rows, reference, comparisons, rejected, std, df, n) -> str:
    """The one sentence: what the numbers resolve at this scale, and what they cannot."""
    if reference is None or std is None or not comparisons:
        return "**Answer at this scale:** not enough finished runs to compare settings yet."
    cd = critical_difference(std, df, n, n)
    mdd = detectable_difference(std, df, n)
    resolved = [(r, d) for (r, d, _), sig in zip(comparisons, rejected, strict=True) if sig]
    largest_row, largest = max(((r, d) for r, d, _ in comparisons), key=lambda x: abs(x[1]))
    noise = (
        f"with {n} seed{'s' * (n != 1)} a side, differences under {cd:.2f} pp cannot reach "
        "significance here, "
        f"and a true difference needs about {mdd:.2f} pp to be found 4 times in 5"
    )
    if not resolved:
        return (
            f"**Answer at this scale:** no setting differs from {ablation.reference_label} by more "
            f"than the seed noise (largest: {largest:+.2f} pp, {_setting(largest_row.values)}); "
            f"{noise}."
        )
    found = "; ".join(f"{_setting(r.values)} {d:+.2f} pp" for r, d in resolved)
    return (
        f"**Answer at this scale:** against {ablation.reference_label}, the seeds resolve "
        f"{found} (Holm-corrected 5 %); the other settings are within noise; {noise}."
    )


def _saturation(run_dirs: list[Path]) -> dict[tuple, list[tuple[float, float]]]:
    """(stage, layers) → [(similarity, centred) per run] of consecutive layer pairs."""
    out: dict[tuple, list[tuple[float, float]]] = {}
    for run_dir in run_dirs:
        paths = sorted(run_dir.glob("version_*/saturation/saturation.json"))
        if not paths:
            continue
        for row in json.loads(paths[-1].read_text(encoding="utf-8"))["summary"]:
            if row["comparison"] == "consecutive":
                key = (row["stage"], row["layers"], row["kinds"])
                out.setdefault(key, []).append((row["mean"], row["centred_mean"]))
    return out


def _saturation_section(root: Path, va_layers: dict) -> list[str]:
    """Trained LaViT (default split) against its all-VA twin, from the va_layers runs."""
    sweep_dir = root / "va_layers"
    run_dirs = {record.name: sweep_dir / record.run_dir for record in load_state(sweep_dir).runs}
    by_split: dict[str, list[Path]] = {}
    for run in va_layers["results"]:
        if run.state == "finished":
            split = json.dumps(run.values.get("model.num_va_layers"))
            by_split.setdefault(split, []).append(run_dirs[run.name])
    lavit = _saturation(by_split.get(json.dumps(LAVIT_DEFAULT_SPLIT), []))
    all_va = _saturation(by_split.get(json.dumps(ALL_VA_SPLIT), []))
    if not lavit or not all_va:
        return []

    def cell(values: list[tuple[float, float]], index: int) -> str:
        xs = [v[index] for v in values]
        return (
            f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f}"
            if len(xs) >= 2
            else f"{xs[0]:.3f}"
        )

    table = []
    va_by_pair = {(s, layers): v for (s, layers, _), v in all_va.items()}
    for (stage, layers, kinds), values in sorted(lavit.items()):
        twin = va_by_pair.get((stage, layers))
        if twin is None:
            continue
        table.append(
            {
                "stage": stage,
                "layers": layers,
                "LaViT kinds": kinds,
                "LaViT cos": cell(values, 0),
                "all-VA cos": cell(twin, 0),
                "LaViT centred": cell(values, 1),
                "all-VA centred": cell(twin, 1),
            }
        )
    la_pairs = [row for row in table if row["LaViT kinds"].endswith("la")]
    va_twin = [
        statistics.fmean(v[0] for v in va_by_pair[(r["stage"], r["layers"])]) for r in la_pairs
    ]
    va_centred = [
        statistics.fmean(v[1] for v in va_by_pair[(r["stage"], r["layers"])]) for r in la_pairs
    ]
    la_centred = [
        statistics.fmean(v[1] for v in lavit[(r["stage"], r["layers"], r["LaViT kinds"])])
        for r in la_pairs
    ]
    lines = [
        "## Attention saturation: trained LaViT against its all-VA twin",
        "",
        f"From the `va_layers` runs above: the default split {format_value(LAVIT_DEFAULT_SPLIT)} "
        f"(LaViT) and {format_value(ALL_VA_SPLIT)} (all-VA), each run measured at the end of training on "
        "32 validation images (`AttentionSaturation`). Per stage and consecutive layer pair: the "
        "cosine similarity of the two layers' attention maps (averaged over heads and images), "
        "and the same after subtracting uniform attention (`centred`, which is near 0 for maps "
        "that are merely near-uniform); mean ± std over seeds.",
        "",
        markdown_table(table),
        "",
    ]
    if la_pairs:
        if max(va_centred) < SATURATED_CENTRED:
            verdict = (
                f"below {SATURATED_CENTRED} centred, i.e. the all-VA layers there attend "
                "differently from one another: the saturation the paper reports (and that LA "
                "reuse presumes) is not seen here"
            )
        elif min(va_centred) >= SATURATED_CENTRED:
            verdict = (
                f"at least {SATURATED_CENTRED} centred, i.e. the all-VA layers there attend much "
                "alike: the saturation the paper reports is seen here"
            )
        else:
            verdict = f"on both sides of {SATURATED_CENTRED} centred: saturated in some pairs only"
        lines.append(
            f"**What it shows:** where LaViT uses LA layers, the all-VA twin's consecutive maps "
            f"have cosine similarity {min(va_twin):.2f}–{max(va_twin):.2f} (centred "
            f"{min(va_centred):.2f}–{max(va_centred):.2f}; LaViT's transformed maps, which start "
            f"as copies: centred {min(la_centred):.2f}–{max(la_centred):.2f}), {verdict}. This "
            "holds for the small model and short schedule of these runs, not at the paper's scale."
        )
        lines.append("")
    return lines


def _determinism_section(root: Path, used_configs: list[str]) -> list[str]:
    """Settings run in several sweeps (the default model recurs as a baseline): whether their
    runs with the same seeds gave the same top-1, to the last logged digit."""
    folders = [(a.folder, root / a.folder) for a in ABLATIONS]
    pilot = root / PILOT_DIR
    if pilot.is_dir():
        folders += [(f"{PILOT_DIR}/{p.name}", p) for p in sorted(pilot.iterdir())]
    groups: dict[tuple, list[str]] = {}
    for name, folder in folders:
        if not (folder / "sweep_state.json").is_file():
            continue
        if name.startswith(PILOT_DIR) and load_state(folder).configs != used_configs:
            continue  # another protocol: not the same runs
        results, _ = collect_local(folder)
        parameters, rows = summarise_runs(results, "final")
        for row in rows:
            finished = sorted(
                (str(r.values.get("seed_everything")), r.final)
                for r in row.runs
                if r.state == "finished" and r.final is not None
            )
            if len(finished) >= 2:
                label = f"{name} ({_setting(row.values)})" if row.values else name
                groups.setdefault(tuple(finished), []).append(label)
    repeated = [labels for labels in groups.values() if len(labels) > 1]
    if not repeated:
        return []
    lines = [
        "**Determinism.** Runs of the same model, data and seeds in different sweeps gave the "
        "same top-1 for every seed, to the last logged digit: "
        + "; ".join(" = ".join(labels) for labels in repeated)
        + ". On this CPU a rerun repeats a run exactly, so the ± std over seeds is the only "
        "noise in the tables.",
        "",
    ]
    return lines


# ------------------------------------------------------------------------------------------ page


def _model_phrase(info: dict[str, Any]) -> str:
    """``lavit_cifar`` (2.7 M parameters, input 3×32×32) from a run_info.json."""
    shape = "×".join(map(str, info.get("input_shape") or [])) or "?"
    params = info.get("params")
    size = f"{params / 1e6:.1f} M parameters, " if params else ""
    return f"`{info.get('arch', '?')}` ({size}input {shape})"


def render(root: Path, page_dir: Path = Path("."), write_files: bool = False) -> str:
    """The page's text from the results folder; ``write_files``: also each sweep's
    ``report/ablation.{csv,png}``. Image links are relative to ``page_dir``."""
    sections, used_configs, cpus, models = [], None, set(), set()
    va_layers = None
    present = [a for a in ABLATIONS if (root / a.folder / "sweep_state.json").is_file()]
    for number, ablation in enumerate(present, 1):
        lines, data = _ablation_section(root, ablation, number, page_dir, write_files)
        sections += lines
        state = load_state(root / ablation.folder)
        used_configs = used_configs or state.configs
        infos = _runs_info(root / ablation.folder)
        cpus.update(_cost(infos)["cpu"])
        models.update(_model_phrase(i) for i in infos)
        if ablation.folder == "va_layers":
            va_layers = data
    pilot = root / PILOT_DIR
    for folder in sorted(pilot.iterdir()) if pilot.is_dir() else []:
        if (folder / "sweep_state.json").is_file():
            infos = _runs_info(folder)
            cpus.update(_cost(infos)["cpu"])
            models.update(_model_phrase(i) for i in infos)
    model = " / ".join(sorted(models)) or "the models of the sweeps"
    head = [
        "# Ablation results",
        "",
        f"Generated by `python scripts/results_page.py --results {root.as_posix()}` from the runs "
        "committed "
        f"under `{root.as_posix()}/`; do not edit (tests/test_results.py fails while this page "
        "is stale). Each sweep's runs, state file and report files are in its folder there.",
        "",
        f"**Scale.** Every run here trains {model} on a 2-core CPU, far below the paper's "
        "scale (ImageNet-1K at 224², 300 epochs, 8 GPUs): each answer is evidence about this "
        "model and protocol, not a test of the paper's numbers.",
        "",
        f"CPU of the runs: {', '.join(sorted(cpus)) or 'n/a'}; two runs at a time, one thread each.",
        "",
    ]
    body = head + _protocol_section(root, used_configs or [])
    body += _determinism_section(root, used_configs or []) + sections
    if va_layers is not None:
        body += _saturation_section(root, va_layers)
    return "\n".join(body).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or ``--check``) the page; see the module docstring."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=DEFAULT_ROOT, help="the sweeps' folder")
    parser.add_argument("--write", type=Path, default=DEFAULT_PAGE, help="the page to write")
    parser.add_argument(
        "--measure-throughput",
        action="store_true",
        help="time every setting first, into each sweep's throughput.json",
    )
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the page is stale"
    )
    parser.add_argument("--bench-batch", type=positive_int, default=64)
    args = parser.parse_args(argv)
    root, out = args.results, args.write
    if not root.is_dir():
        return fail(PROG, f"--results {root}: no such folder (the ablation sweeps' parent dir)")
    if (
        not any((root / a.folder / "sweep_state.json").is_file() for a in ABLATIONS)
        and not (root / PILOT_DIR).is_dir()
    ):
        folders = ", ".join(a.folder for a in ABLATIONS)
        return fail(
            PROG,
            f"--results {root}: none of the ablation sweep dirs ({folders}) nor "
            f"{PILOT_DIR}/ is there",
        )
    if args.check:
        expected = render(root, out.parent)
        if not out.is_file() or out.read_text(encoding="utf-8") != expected:
            say(PROG, f"{out} is stale: run `python scripts/results_page.py` and commit it")
            return EXIT_FAILURE
        say(PROG, f"{out} is up to date")
        return 0
    if args.measure_throughput:
        for ablation in ABLATIONS:
            if (root / ablation.folder / "sweep_state.json").is_file():
                say(PROG, f"timing the settings of {ablation.folder}")
                measure_throughput(root / ablation.folder, args.bench_batch)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(root, out.parent, write_files=True), encoding="utf-8")
    say(PROG, f"wrote {out} and each sweep's report/ablation.{{csv,png}} under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
