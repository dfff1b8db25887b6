"""``lavit report``: the ablation table of a sweep, as the paper would print it.

    lavit report runs/sweeps/va_layers                      # a sweep run by `lavit sweep`
    lavit report --wandb-sweep my-team/lavit/abc123 --out reports/va_layers   # online only

One row per setting (the swept parameters except the seed): params, MACs, top-1 as mean ± sample
std over the seeds, and inference throughput (the runs' own, else timed here as ``lavit bench``
times it). Writes ``ablation.md``, ``.csv`` and ``.png`` in ``--out`` (docs/sweeps.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lavit.errors import EXIT_FAILURE
from lavit.models.factory import LAVIT_SWITCHES, create_model
from lavit.tables import markdown_table, write_csv
from lavit.tools._cli import fail, positive_int, say, tool_parser
from lavit.tools.sweep_engine import STATE_FILE, load_state, read_metric_history, run_values
from lavit.tools.sweep_status import count_states
from lavit.tools.timing import inference_task, median, synchronizer, time_interleaved
from lavit.training.logging import explicit_wandb_mode, wandb_unreachable

PROG = "lavit report"
DEFAULT_METRIC = "val/top1"
SEED_PARAMETERS = ("seed_everything", "seed")
THROUGHPUT_KEYS = ("throughput", "infer_img_s", "inference_img_per_s", "val/throughput")


@dataclass
class RunResult:
    """One run of a sweep: its swept values, state, top-1 (best and final) and the model's size."""

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


def _percent(value: float | None) -> float | None:
    """torchmetrics accuracies are fractions; the table shows percent."""
    if value is None or not math.isfinite(value):
        return None
    return 100.0 * value if value <= 1.0 else value


def _throughput(*sources: dict[str, Any]) -> float | None:
    values = (source.get(key) for source in sources for key in THROUGHPUT_KEYS)
    return next((float(v) for v in values if isinstance(v, (int, float)) and v > 0), None)


def _result(name, values, state, series, meta, throughput) -> RunResult:
    """A run's best and last value of the metric (``series``), its size from ``meta``."""
    best, final = (_percent(max(series)), _percent(series[-1])) if series else (None, None)
    model_config = (meta.get("config") or {}).get("model") or {}
    return RunResult(name, values, state, best, final, meta.get("params"), meta.get("macs"),
                     throughput, model_config)  # fmt: skip


def run_info(run_dir: Path) -> dict[str, Any]:
    """The newest readable ``run_info.json`` of a run directory (one per attempt), or ``{}``."""
    for path in sorted(run_dir.rglob("run_info.json"), key=lambda p: -p.stat().st_mtime):
        with contextlib.suppress(OSError, json.JSONDecodeError):  # a run killed while writing
            return json.loads(path.read_text(encoding="utf-8"))
    return {}


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
        info = run_info(run_dir)
        history = record.history or read_metric_history(run_dir)
        series = [row[metric] for row in history if metric in row]
        final = (info.get("final") or {}).get("metrics") or {}
        if not series and metric in final:  # e.g. no CSV log (fast_dev_run)
            series = [final[metric]]
        throughput = _throughput(record.summary_metrics, info, final)
        results.append(
            _result(record.name, run_values(record.config), record.state, series, info, throughput)
        )
    return results, metric


def check_wandb_reachable(timeout: float = 5.0) -> None:
    """Fail fast, with a clear message, when the W&B API cannot be used from here."""
    mode = explicit_wandb_mode()
    if mode in ("offline", "disabled"):
        raise ValueError(
            f"--wandb-sweep needs the W&B API, but WANDB_MODE={mode}: unset it, or "
            "report a local sweep instead (`lavit report <sweep dir>` of a `lavit sweep` run)"
        )
    if reason := wandb_unreachable(timeout):
        raise ValueError(
            f"cannot reach W&B: {reason}; --wandb-sweep needs the network (offline, run the "
            "sweep with `lavit sweep` and report its sweep dir)"
        )


def _swept_value(config: dict[str, Any], name: str) -> Any:
    """The agent's flat ``model.x`` key, else the CLI's logged ``config`` section."""
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
        raise ValueError(f"cannot read W&B sweep {sweep_path!r}: {err}") from None
    metric = metric or (sweep.config.get("metric") or {}).get("name") or DEFAULT_METRIC
    swept = list(sweep.config.get("parameters") or {})
    results = []
    for run in sweep.runs:
        config, summary = dict(run.config), dict(run.summary)
        rows = run.scan_history(keys=[metric])
        series = [row[metric] for row in rows if isinstance(row.get(metric), (int, float))]
        state = run.state if run.state in ("finished", "running") else "failed"
        values = {name: _swept_value(config, name) for name in swept}
        meta = {**(config.get("meta") or {}), "config": config.get("config")}  # as run_info.json
        result = _result(run.name, values, state, series, meta, _throughput(summary))
        result.final = result.final if series else _percent(summary.get(metric))
        results.append(result)
    return results, metric


def _key(values: dict[str, Any]) -> str:
    return json.dumps(values, sort_keys=True, default=str)


def setting_parameters(results: list[RunResult]) -> list[str]:
    """The swept parameters that define a setting: those that vary, except the seed."""
    names = list(dict.fromkeys(n for run in results for n in run.values))
    names = [n for n in names if n not in SEED_PARAMETERS]
    varying = [n for n in names if len({_key({n: r.values.get(n)}) for r in results}) > 1]
    return varying or names


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
        scores = [getattr(r, top1) for r in runs if r.state == "finished"]
        first = {k: next((getattr(r, k) for r in runs if getattr(r, k)), None)
                 for k in ("params", "macs", "throughput")}  # fmt: skip
        values = {n: runs[0].values.get(n) for n in parameters}
        rows.append(SettingRow(values, runs, [s for s in scores if s is not None], **first))
    missing = [row for row in rows if row.throughput is None and row.params is not None]
    if bench is not None and missing:
        configs = [next(r.model_config for r in row.runs if r.params) for row in missing]
        for row, value in zip(missing, bench(configs), strict=True):
            row.throughput = value
    return parameters, rows


def format_value(value: Any) -> str:
    """A swept value as the table shows it: lists as ``[1, 2, 1, 1]``."""
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def _values(parameters: list[str], row: SettingRow) -> dict[str, str]:
    return {n.removeprefix("model."): format_value(row.values[n]) for n in parameters}


def table_rows(parameters: list[str], rows: list[SettingRow], top1: str) -> list[dict[str, str]]:
    """The table as strings, one dict per row."""
    table = []
    for row in rows:
        apart = count_states([r for r in row.runs if r.state != "finished"])
        mean = "n/a" if row.mean is None else f"{row.mean:.2f}"
        table.append(
            _values(parameters, row)
            | {
                "params (M)": "n/a" if row.params is None else f"{row.params / 1e6:.3f}",
                "MACs (M)": "n/a" if row.macs is None else f"{row.macs / 1e6:.1f}",
                f"top-1 % ({top1})": mean + ("" if row.std is None else f" ± {row.std:.2f}"),
                "seeds": str(len(row.top1)) + (f" ({apart})" if apart else ""),
                "throughput (img/s)": f"{row.throughput:.0f}" if row.throughput else "n/a",
            }
        )
    return table


def csv_rows(parameters: list[str], rows: list[SettingRow], top1: str) -> list[dict[str, Any]]:
    """Raw numbers (top-1 in percent), one row per setting, for the CSV file."""
    return [
        _values(parameters, row)
        | {
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

    labels = ["\n".join(f"{k}={v}" for k, v in _values(parameters, row).items()) for row in rows]
    means = [row.mean or 0.0 for row in rows]
    errors = [row.std or 0.0 for row in rows]
    figure, axes = plt.subplots(figsize=(max(4.0, 1.6 * len(rows) + 1.5), 4.2))
    bars = axes.bar(range(len(rows)), means, yerr=errors, capsize=4, color="tab:blue", alpha=0.8)
    for bar, row, error in zip(bars, rows, errors, strict=True):
        text = f"n={len(row.top1)}" + (f"\n{row.macs / 1e6:.1f} M MACs" if row.macs else "")
        axes.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height() + error),
                      xytext=(0, 4), textcoords="offset points", ha="center", fontsize=8)  # fmt: skip
    axes.set_xticks(range(len(rows)), labels, fontsize=8)
    axes.set_ylabel(f"top-1 % ({top1} epoch, mean ± std over seeds)")
    shown = [(m - e, m + e) for m, e, row in zip(means, errors, rows, strict=True) if row.mean]
    if shown:  # zoom on the differences: the accuracies of an ablation sit close together
        low, high = min(lo for lo, _ in shown), max(hi for _, hi in shown)
        span = max(high - low, 1.0)
        axes.set_ylim(max(0.0, low - span), high + 0.35 * span)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def bench_throughput(batch_size: int = 64, warmup: int = 2, iters: int = 10) -> Any:
    """A measurer ``(model configs) -> images/s each``: inference, fp32, CPU or the first GPU,
    the models timed round-robin as ``lavit bench`` times them."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def measure(model_configs: list[dict[str, Any]]) -> list[float | None]:
        tasks = {}
        for index, config in enumerate(model_configs):
            if not config.get("arch"):
                continue
            model = create_model(
                config["arch"], config.get("num_classes") or 1000, config.get("img_size"),
                drop_rate=0.0, drop_path_rate=0.0,
                switches={name: config.get(name) for name in LAVIT_SWITCHES},
                model_kwargs=config.get("model_kwargs"),
            ).to(device).eval()  # fmt: skip
            x = torch.randn(batch_size, 3, *(getattr(model, "img_size", None) or (224, 224)))
            tasks[index] = inference_task(model, x.to(device), device, "fp32")
        if not tasks:
            return [None] * len(model_configs)
        say(
            PROG,
            f"measuring the inference throughput of {len(tasks)} setting(s) on {device}: batch "
            f"{batch_size}, round-robin, {warmup} warm-up + {iters} timed round(s)",
        )
        times = time_interleaved(
            tasks, warmup, iters, synchronizer(device),
            lambda done, total: say(PROG, f"throughput: round {done}/{total}"),
        )  # fmt: skip
        return [
            batch_size / median(times[i]) if i in times else None for i in range(len(model_configs))
        ]

    return measure


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, "The ablation table of a sweep: one row per setting, mean ± std.")
    add = parser.add_argument
    add("sweep_dir", nargs="?", type=Path, help="the --sweep-dir of a `lavit sweep` run")
    add("--wandb-sweep", metavar="ENTITY/PROJECT/ID", help="a W&B sweep instead (online)")
    add("--out", type=Path, help="output folder (default: <sweep dir>/report, or ./report)")
    add("--top1", choices=("best", "final"), default="best",
        help="per run, the best epoch's or the last epoch's top-1")  # fmt: skip
    add("--metric", help="the metric (default: the sweep's, val/top1)")
    add("--no-bench", action="store_true", help="do not measure throughput the runs did not log")
    add("--bench-batch", type=positive_int, default=64, help="batch of the throughput timing")
    return parser


def main(argv: list[str]) -> int:
    """``lavit report``: see the module docstring."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.sweep_dir is None) == (args.wandb_sweep is None):
        parser.error("give a sweep dir or --wandb-sweep ENTITY/PROJECT/ID (one of them)")
    try:
        if args.wandb_sweep:
            results, metric = collect_wandb(args.wandb_sweep, args.metric)
            title, out = f"W&B sweep {args.wandb_sweep}", args.out or Path("report")
        else:
            results, metric = collect_local(args.sweep_dir, args.metric)
            title = load_state(args.sweep_dir).sweep_config.get("name") or args.sweep_dir.name
            out = args.out or args.sweep_dir / "report"
    except (FileNotFoundError, ValueError) as err:
        return fail(PROG, str(err))
    if not results:
        return fail(PROG, "the sweep has no runs yet", EXIT_FAILURE)
    say(PROG, f"{len(results)} run(s) of {title}: {metric} of each, grouped by setting")
    bench = None if args.no_bench else bench_throughput(args.bench_batch)
    parameters, rows = summarise_runs(results, args.top1, bench)
    text = markdown_table(table_rows(parameters, rows, args.top1)) + "\n"
    where = "from the runs' logs" if bench is None else "measured by `lavit report` on this machine"
    note = (
        f"{metric}: the {args.top1} epoch of each run, mean ± sample std over the seeds that "
        f"finished; throughput: inference, {where}."
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(f"## {title}\n\n{text}\n{note}\n", encoding="utf-8")
    write_csv(out / "ablation.csv", csv_rows(parameters, rows, args.top1))
    plot(out / "ablation.png", parameters, rows, args.top1, f"{title}: {metric}")
    print(text + "\n" + note)
    print(f"\nwrote {out / 'ablation.md'}, {out / 'ablation.csv'}, {out / 'ablation.png'}")
    return 0
