"""``lavit report``: the ablation table of a sweep, as the paper would print it.

    lavit report runs/sweeps/va_layers                      # a sweep run by `lavit sweep`
    lavit report runs/sweeps/va_layers --top1 final --out reports/va_layers
    lavit report --wandb-sweep my-team/lavit/abc123 --out reports/va_layers   # online only

One row per setting (the swept parameters except the seed): parameters, MACs, top-1 as
mean ± sample std over the seeds (the best epoch's ``val/top1`` of each run by default, or the
last epoch's with ``--top1 final``), the number of seeds that finished, and inference throughput.
Params and MACs come from each run's ``run_info.json`` (written by the training run). Throughput
comes from the run when it logged one, else it is measured with ``lavit.tools.timing`` on this
machine (batch ``--bench-batch``, CPU or the first GPU) unless ``--no-bench``; otherwise ``n/a``.

Writes ``ablation.md``, ``ablation.csv`` and ``ablation.png`` (bars with ± std error bars) in
``--out`` (default ``<sweep dir>/report``) and prints the Markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lavit.errors import EXIT_FAILURE
from lavit.models.factory import LAVIT_SWITCHES, create_model
from lavit.tables import markdown_table, write_csv
from lavit.tools._cli import fail, positive_int, say, tool_parser
from lavit.tools.sweep_engine import run_values
from lavit.tools.sweep_state import STATE_FILE, load_state, read_metric_history
from lavit.tools.timing import inference_task, synchronizer, time_interleaved
from lavit.training.wandb_runs import explicit_wandb_mode

__all__ = ["RunResult", "SettingRow", "collect_local", "collect_wandb", "main", "summarise_runs"]

DEFAULT_METRIC = "val/top1"
SEED_PARAMETERS = ("seed_everything", "seed")
THROUGHPUT_KEYS = ("throughput", "infer_img_s", "inference_img_per_s", "val/throughput")


@dataclass
class RunResult:
    """One run of a sweep: its swept values, state, top-1 and the model's size."""

    name: str
    values: dict[str, Any]
    state: str
    best: float | None = None
    final: float | None = None
    params: int | None = None
    macs: int | None = None
    throughput: float | None = None
    model_config: dict[str, Any] = field(default_factory=dict)  # the run's `model:` section


@dataclass
class SettingRow:
    """One row of the table: a setting and its runs over seeds."""

    values: dict[str, Any]
    runs: list[RunResult]
    top1: list[float]
    params: int | None
    macs: int | None
    throughput: float | None

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.top1) if self.top1 else None

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.top1) if len(self.top1) >= 2 else None


# ------------------------------------------------------------------------------------- collecting


def _percent(value: float | None) -> float | None:
    """torchmetrics accuracies are fractions; the table shows percent."""
    if value is None or not math.isfinite(value):
        return None
    return 100.0 * value if value <= 1.0 else value


def _run_info(run_dir: Path) -> dict[str, Any]:
    """The newest ``run_info.json`` of a run directory (one per attempt), or ``{}``."""
    paths = sorted(run_dir.rglob("run_info.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(paths):
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
    return {}


def _find_throughput(*sources: dict[str, Any]) -> float | None:
    for source in sources:
        for key in THROUGHPUT_KEYS:
            value = source.get(key)
            if isinstance(value, (int, float)) and value > 0:
                return float(value)
    return None


def collect_local(sweep_dir: Path, metric: str | None = None) -> tuple[list[RunResult], str]:
    """The runs of a sweep run by ``lavit sweep`` (its state file and run directories)."""
    if not (sweep_dir / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"{sweep_dir} has no {STATE_FILE}: pass the --sweep-dir of a `lavit sweep` run"
        )
    state = load_state(sweep_dir)
    metric = metric or state.metric_name or DEFAULT_METRIC
    results = []
    for record in state.runs:
        run_dir = sweep_dir / record.run_dir
        info = _run_info(run_dir) if run_dir.is_dir() else {}
        history = record.history or (read_metric_history(run_dir) if run_dir.is_dir() else [])
        series = [row[metric] for row in history if metric in row]
        final_metrics = (info.get("final") or {}).get("metrics") or {}
        if not series and metric in final_metrics:  # e.g. no CSV log (fast_dev_run)
            series = [final_metrics[metric]]
        results.append(
            RunResult(
                name=record.name,
                values=run_values(record.config),
                state=record.state,
                best=_percent(max(series)) if series else None,
                final=_percent(series[-1]) if series else None,
                params=info.get("params"),
                macs=info.get("macs"),
                throughput=_find_throughput(record.summary_metrics, info, final_metrics),
                model_config=(info.get("config") or {}).get("model") or {},
            )
        )
    return results, metric


def check_wandb_reachable(timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when the W&B API cannot be used from here."""
    mode = explicit_wandb_mode()
    if mode in ("offline", "disabled"):
        raise SystemExit(
            f"--wandb-sweep needs the W&B API, but WANDB_MODE={mode}: unset it, or "
            "report a local sweep instead (`lavit report <sweep dir>` of a `lavit sweep` run)"
        )
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as err:
        raise SystemExit(
            f"cannot reach W&B at {host}:{port} ({err}): --wandb-sweep needs the network; "
            "offline, run the sweep with `lavit sweep` and report its sweep dir"
        ) from None


def _swept_value(config: dict[str, Any], name: str) -> Any:
    """A swept value from a W&B run config: the agent's flat ``model.x`` key, else the CLI's
    logged ``config`` section (``config.model.x``)."""
    if name in config:
        return config[name]
    node: Any = config.get("config") or {}
    for part in name.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def collect_wandb(sweep_path: str, metric: str | None = None) -> tuple[list[RunResult], str]:
    """The runs of a W&B sweep ``entity/project/sweep_id`` through ``wandb.Api()`` (online)."""
    check_wandb_reachable()
    import wandb

    try:
        sweep = wandb.Api(timeout=30).sweep(sweep_path)
    except Exception as err:  # wandb raises CommError, ValueError, auth errors...
        raise SystemExit(f"cannot read W&B sweep {sweep_path!r}: {err}") from None
    metric = metric or (sweep.config.get("metric") or {}).get("name") or DEFAULT_METRIC
    swept = list((sweep.config.get("parameters") or {}).keys())
    results = []
    for run in sweep.runs:
        config = dict(run.config)
        summary = dict(run.summary)
        series = [
            row[metric]
            for row in run.scan_history(keys=[metric])
            if isinstance(row.get(metric), (int, float))
        ]
        meta = config.get("meta") or {}
        state = {"finished": "finished", "running": "running"}.get(run.state, "failed")
        results.append(
            RunResult(
                name=run.name,
                values={name: _swept_value(config, name) for name in swept},
                state=state,
                best=_percent(max(series)) if series else None,
                final=_percent(series[-1]) if series else _percent(summary.get(metric)),
                params=meta.get("params"),
                macs=meta.get("macs"),
                throughput=_find_throughput(summary),
                model_config=(config.get("config") or {}).get("model") or {},
            )
        )
    return results, metric


# ------------------------------------------------------------------------------------ summarising


def _key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, default=str)


def setting_parameters(results: Iterable[RunResult]) -> list[str]:
    """The swept parameters that define a setting: those that vary, except the seed."""
    results = list(results)
    names: list[str] = []
    for run in results:
        names += [n for n in run.values if n not in names]
    varying = [
        n
        for n in names
        if n not in SEED_PARAMETERS and len({_key({n: r.values.get(n)}) for r in results}) > 1
    ]
    return varying or [n for n in names if n not in SEED_PARAMETERS]


def summarise_runs(
    results: list[RunResult], top1: str = "best", bench: Any = None
) -> tuple[list[str], list[SettingRow]]:
    """Group runs by setting (first-seen order) and average top-1 over the finished ones.

    ``bench``: a callable ``(model configs) -> images/s each`` for the rows whose runs logged no
    throughput (``None``: leave them empty).
    """
    parameters = setting_parameters(results)
    groups: dict[str, list[RunResult]] = {}
    for run in results:
        groups.setdefault(_key({n: run.values.get(n) for n in parameters}), []).append(run)
    rows = []
    for runs in groups.values():
        finished = [r for r in runs if r.state == "finished"]
        scores = [getattr(r, top1) for r in finished if getattr(r, top1) is not None]
        sized = next((r for r in runs if r.params is not None), None)
        rows.append(
            SettingRow(
                values={n: runs[0].values.get(n) for n in parameters},
                runs=runs,
                top1=scores,
                params=sized.params if sized else None,
                macs=next((r.macs for r in runs if r.macs is not None), None),
                throughput=next((r.throughput for r in runs if r.throughput), None),
            )
        )
    missing = [row for row in rows if row.throughput is None and row.params is not None]
    if bench is not None and missing:
        configs = [
            next(r.model_config for r in row.runs if r.params is not None) for row in missing
        ]
        for row, value in zip(missing, bench(configs), strict=True):
            row.throughput = value
    return parameters, rows


# -------------------------------------------------------------------------------------- rendering


def _short(name: str) -> str:
    return name.removeprefix("model.")


def _format_value(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(map(str, value)) + "]"
    return str(value)


def table_rows(parameters: list[str], rows: list[SettingRow], top1: str) -> list[dict[str, str]]:
    """The table as strings, one dict per row (also the CSV's columns, with raw numbers)."""
    table = []
    for row in rows:
        failed = sum(r.state == "failed" for r in row.runs)
        stopped = sum(r.state == "stopped" for r in row.runs)  # by the sweep's early_terminate
        apart = [f"{failed} failed"] * bool(failed) + [f"{stopped} stopped early"] * bool(stopped)
        mean, std = row.mean, row.std
        entry = {_short(n): _format_value(row.values[n]) for n in parameters}
        entry |= {
            "params (M)": f"{row.params / 1e6:.3f}" if row.params is not None else "n/a",
            "MACs (M)": f"{row.macs / 1e6:.1f}" if row.macs is not None else "n/a",
            f"top-1 % ({top1})": (
                "n/a"
                if mean is None
                else f"{mean:.2f} ± {std:.2f}"
                if std is not None
                else f"{mean:.2f}"
            ),
            "seeds": str(len(row.top1)) + (f" ({', '.join(apart)})" if apart else ""),
            "throughput (img/s)": f"{row.throughput:.0f}" if row.throughput else "n/a",
        }
        table.append(entry)
    return table


def markdown(table: list[dict[str, str]]) -> str:
    """The table as Markdown (``(no runs)`` when empty)."""
    return (markdown_table(table) if table else "(no runs)") + "\n"


def csv_rows(parameters: list[str], rows: list[SettingRow], top1: str) -> list[dict[str, Any]]:
    """Raw numbers (top-1 in percent), one row per setting, for the CSV file."""
    return [
        {
            **{_short(n): _format_value(row.values[n]) for n in parameters},
            "params": row.params,
            "macs": row.macs,
            f"top1_{top1}_mean": row.mean,
            f"top1_{top1}_std": row.std,
            "seeds": len(row.top1),
            "failed": sum(r.state == "failed" for r in row.runs),
            "throughput_img_s": row.throughput,
            "top1_per_seed": " ".join(f"{v:.4f}" for v in row.top1),
        }
        for row in rows
    ]


def plot(path: Path, parameters: list[str], rows: list[SettingRow], top1: str, title: str) -> None:
    """Bar chart of mean top-1 per setting with ± std error bars (matplotlib, Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [
        "\n".join(f"{_short(n)}={_format_value(row.values[n])}" for n in parameters) for row in rows
    ]
    means = [row.mean if row.mean is not None else 0.0 for row in rows]
    errors = [row.std or 0.0 for row in rows]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) + 1.5), 4.2))
    bars = axes.bar(range(len(rows)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    for bar, row, error in zip(bars, rows, errors, strict=True):
        text = f"n={len(row.top1)}" + (f"\n{row.macs / 1e6:.1f} M MACs" if row.macs else "")
        top = bar.get_height() + error  # above the error bar
        axes.annotate(text, (bar.get_x() + bar.get_width() / 2, top), xytext=(0, 4),
                      textcoords="offset points", ha="center", fontsize=8)  # fmt: skip
    axes.set_xticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylabel(f"top-1 % ({top1} epoch, mean ± std over seeds)")
    finite = [m + e for m, e, row in zip(means, errors, rows, strict=True) if row.mean is not None]
    low = min((m - e for m, e, row in zip(means, errors, rows, strict=True) if row.mean is not None),
              default=0.0)  # fmt: skip
    if finite:  # zoom on the differences, as accuracies of an ablation sit close together
        span = max(finite) - low
        axes.set_ylim(max(0.0, low - max(span, 1.0)), max(finite) + 0.35 * max(span, 1.0))
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -------------------------------------------------------------------------------------- throughput


def bench_throughput(batch_size: int = 64, warmup: int = 2, iters: int = 10) -> Any:
    """A measurer ``(model configs) -> images/s each``, with ``lavit bench``'s harness.

    The models are timed round-robin (``time_interleaved``), so that load from other
    processes hits every row alike; inference, fp32, CPU or the first GPU.
    """
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def measure(model_configs: list[dict[str, Any]]) -> list[float | None]:
        tasks = {}
        for index, config in enumerate(model_configs):
            if not config.get("arch"):
                continue
            model = create_model(
                config["arch"],
                config.get("num_classes") or 1000,
                config.get("img_size"),
                drop_rate=0.0,
                drop_path_rate=0.0,
                switches={name: config.get(name) for name in LAVIT_SWITCHES},
                model_kwargs=config.get("model_kwargs"),
            ).to(device)
            model.eval()
            size = getattr(model, "img_size", None) or (224, 224)
            x = torch.randn(batch_size, 3, *size, device=device)
            tasks[index] = inference_task(model, x, device, "fp32")
        if not tasks:
            return [None] * len(model_configs)
        say(
            PROG,
            f"measuring the inference throughput of {len(tasks)} setting(s) on {device}: batch "
            f"{batch_size}, round-robin, {warmup} warm-up + {iters} timed round(s)",
        )
        times = time_interleaved(
            tasks,
            warmup,
            iters,
            synchronizer(device),
            lambda done, total: say(PROG, f"throughput: round {done}/{total}"),
        )
        return [
            batch_size / statistics.median(times[i]) if i in times else None
            for i in range(len(model_configs))
        ]

    return measure


# ------------------------------------------------------------------------------------------- main


PROG = "lavit report"


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(
        PROG, "The ablation table of a sweep: one row per setting, mean ± std over seeds."
    )
    parser.add_argument(
        "sweep_dir", nargs="?", type=Path, help="the --sweep-dir of a `lavit sweep` run"
    )
    parser.add_argument(
        "--wandb-sweep",
        metavar="ENTITY/PROJECT/ID",
        help="read the runs of a W&B sweep instead (needs the network)",
    )
    parser.add_argument(
        "--out", type=Path, help="output folder (default: <sweep dir>/report, or ./report)"
    )
    parser.add_argument(
        "--top1",
        choices=("best", "final"),
        default="best",
        help="per run, the best epoch's or the last epoch's top-1 (default: best)",
    )
    parser.add_argument("--metric", help="the metric (default: the sweep's, val/top1)")
    parser.add_argument(
        "--no-bench",
        action="store_true",
        help="do not measure inference throughput when the runs did not log it",
    )
    parser.add_argument(
        "--results",
        type=Path,
        metavar="DIR",
        help="instead of one sweep: write RESULTS.md from every ablation sweep under DIR (e.g. "
        "results/ablations; see lavit.tools.results)",
    )
    parser.add_argument(
        "--write", type=Path, default=Path("RESULTS.md"), help="with --results: the page to write"
    )
    parser.add_argument(
        "--measure-throughput",
        action="store_true",
        help="with --results: time every setting first and store it in each sweep's "
        "throughput.json (otherwise the stored figures are used)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="with --results: write nothing; exit 1 if the page differs from what the runs give",
    )
    parser.add_argument(
        "--bench-batch",
        type=positive_int,
        default=64,
        help="batch size of the throughput measurement",
    )
    return parser


def main(argv: list[str]) -> int:
    """``lavit report``: see the module docstring."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.results is not None:
        parser.error("--results is handled by `lavit report` (lavit.tools.results:main)")
    if (args.sweep_dir is None) == (args.wandb_sweep is None):
        parser.error("give a sweep dir or --wandb-sweep ENTITY/PROJECT/ID (one of them)")
    try:
        if args.wandb_sweep:
            results, metric = collect_wandb(args.wandb_sweep, args.metric)
            title = f"W&B sweep {args.wandb_sweep}"
            out = args.out or Path("report")
        else:
            results, metric = collect_local(args.sweep_dir, args.metric)
            title = load_state(args.sweep_dir).sweep_config.get("name") or args.sweep_dir.name
            out = args.out or args.sweep_dir / "report"
    except FileNotFoundError as err:
        return fail(PROG, str(err))
    if not results:
        return fail(PROG, "the sweep has no runs yet", EXIT_FAILURE)
    say(PROG, f"{len(results)} run(s) of {title}: {metric} of each, grouped by setting")
    bench = None if args.no_bench else bench_throughput(args.bench_batch)
    parameters, rows = summarise_runs(results, args.top1, bench)
    table = table_rows(parameters, rows, args.top1)
    text = markdown(table)
    out.mkdir(parents=True, exist_ok=True)
    note = (
        f"{metric}: the {args.top1} epoch of each run, mean ± sample std over the seeds that "
        f"finished; throughput: inference, "
        + ("from the runs' logs" if bench is None else "measured by `lavit report` on this machine")
        + "."
    )
    (out / "ablation.md").write_text(f"## {title}\n\n{text}\n{note}\n", encoding="utf-8")
    write_csv(out / "ablation.csv", csv_rows(parameters, rows, args.top1))
    plot(out / "ablation.png", parameters, rows, args.top1, f"{title}: {metric}")
    print(text + "\n" + note)
    print(f"\nwrote {out / 'ablation.md'}, {out / 'ablation.csv'}, {out / 'ablation.png'}")
    return 0
