"""The report of ``bench_scale.py``: Markdown tables and plots from its results dict."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import markdown_table, results_dir  # noqa: E402

MB = 1e6
# The memory target: slack over "one copy of the tables + N x one worker without tables".
SLACK = 0.10


def report(results: dict) -> str:
    sections = [f"Machine: {results['machine']}. Load average at start {results['load_start']}, at end {results['load_end']}."]
    mem = results.get("memory")
    if mem:
        rows = []
        for label, m in mem["models"].items():
            for r in m["runs"]:
                ws = r["per_worker"]
                check = next((c for c in m["checks"] if c["workers"] == r["workers"]), None)
                rows.append([
                    label, r["workers"], f"{r['total_pss'] / MB:,.0f}",
                    f"{sum(w['table_pss'] for w in ws) / MB:,.0f}",
                    " / ".join(f"{w['anonymous'] / MB:.0f}" for w in ws),
                    " / ".join(f"{w['table_mapped'] / MB:,.0f}" for w in ws),
                    f"{np.mean([w['pss_without_tables'] for w in ws]) / MB:,.0f}",
                    f"{check['bound'] / MB:,.0f} ({'ok' if check['ok'] else 'OVER'})" if check else "n/a",
                ])
        sections.append(
            "## Memory: all workers of the Kaggle-size model\n\n"
            "Total PSS of the workers after each read every table page (`dlrm.touch_tables: true`), "
            "under TorchServe with a no-archive model. Bound: (one copy of the tables + N x one worker's PSS "
            f"without tables, measured with 1 worker) x {1 + SLACK:.1f}.\n\n"
            + markdown_table(
                ["model", "workers", "total PSS MB", "tables' PSS MB (all workers)", "anonymous MB per worker",
                 "tables file mapped MB per worker",
                 "PSS without tables MB per worker", "bound MB"],
                rows,
            )
            + "".join(
                f"\n{label}: tables {m['table_bytes'] / MB:,.0f} MB (file {m['file_bytes'] / MB:,.0f} MB); one worker "
                f"without tables {m['worker_without_tables'] / MB:,.0f} MB.\n"
                for label, m in mem["models"].items() if m["worker_without_tables"] is not None
            )
            + (f"\nThe Java frontend: {mem['frontend_pss'] / MB:,.0f} MB PSS (not counted above).\n" if "frontend_pss" in mem else "")
        )
    cold = results.get("cold")
    if cold:
        def sec(v, digits=1):
            return "n/a" if v is None else f"{v:.{digits}f}"

        rows = [
            [r["how"], r["page_cache"], sec(r["healthy_s"]), sec(r["first_prediction_s"]), sec(r.get("python_s")),
             sec(r.get("load_s"), 2), sec(r["first_batch_s"], 2)]
            for r in cold["runs"]
        ]
        sections.append(
            f"## Cold start: Kaggle-size model ({cold['file_bytes'] / 1e9:.2f} GB), no-archive, 1 worker\n\n"
            "Seconds from `torchserve --start` (or from the registration call) to the answer of a one-row "
            "prediction; then the latency of one request of random ids. `dropped`: the weights file was "
            "dropped from the page cache first (posix_fadvise DONTNEED on that file only). From TorchServe's "
            "logs: the worker's Python start (interpreter, torch, TorchServe imports) and the model load "
            "(LOAD command to handler ready).\n\n"
            + markdown_table(
                ["start", "page cache", "healthy / registered s", "first prediction s", "worker Python start s",
                 "model load s", f"then one {results.get('batch', 2048)}-row request s"],
                rows,
            )
        )
    tp = results.get("throughput")
    if tp:
        rows = []
        for label, m in tp["models"].items():
            rows.append([
                label, f"{m['table_rows']:,}", m["table_dtype"], f"{m['table_bytes'] / MB:,.0f}", f"{m['mflop_per_row']:.2f}",
                f"{m['in_process_rows_s']:,.0f}", f"{m['end_to_end_rows_s']:,.0f}" if "end_to_end_rows_s" in m else "n/a",
            ])
        ratio_lines = []
        for big, small in results.get("pairs", []):
            if big in tp["models"] and small in tp["models"]:
                a, b = tp["models"][big], tp["models"][small]
                line = f"- {big} / {small}: in-process {a['in_process_rows_s'] / b['in_process_rows_s']:.2f}"
                if "end_to_end_rows_s" in a and "end_to_end_rows_s" in b:
                    line += f", end to end {a['end_to_end_rows_s'] / b['end_to_end_rows_s']:.2f}"
                ratio_lines.append(line)
        sections.append(
            f"## Throughput at batch {tp['batch']}\n\n"
            f"Rows per second, median of interleaved rounds; ids are random hex strings hashed into the whole tables. "
            f"In-process: `backend.predict` with {tp['threads']} torch thread(s) ({tp['gflops']:.0f} GFLOP/s GEMM "
            f"with as many threads in this run). End to end: binary requests of {tp['batch']} rows to TorchServe, "
            f"{tp.get('concurrency', '-')} in flight, 1 worker per model with {tp['threads']} thread(s).\n\n"
            + markdown_table(["model", "table rows", "tables", "table MB", "MFLOP/row", "in-process rows/s", "end-to-end rows/s"], rows)
            + ("\nRatios (the two models of each pair have the same MLPs):\n\n" + "\n".join(ratio_lines) + "\n" if ratio_lines else "")
        )
    q = results.get("int8")
    if q:
        sections.append(
            "## int8 tables: accuracy on the synthetic test set\n\n"
            f"The demo model trained once ({q['train_rows']:,} rows), quantised row-wise, both scored on the same "
            f"{q['test_rows']:,} test rows.\n\n"
            + markdown_table(
                ["tables", "file MB", "test AUC", "log-loss"],
                [
                    ["float32", f"{q['file_bytes_float32'] / MB:.1f}", f"{q['auc_float32']:.5f}", f"{q['logloss_float32']:.5f}"],
                    ["int8", f"{q['file_bytes_int8'] / MB:.1f}", f"{q['auc_int8']:.5f}", f"{q['logloss_int8']:.5f}"],
                ],
            )
            + f"\nAUC loss (fp32 - int8) {q['auc_loss']:+.6f}; max |p_int8 - p_fp32| {q['max_abs_diff']:.2e}, "
            f"mean {q['mean_abs_diff']:.2e}.\n"
        )
    return sections

def plot(results: dict, name: str) -> Path | None:
    panels = [k for k in ("memory", "cold", "throughput", "int8") if results.get(k)]
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat, panels):
        if key == "memory":
            for label, m in results["memory"]["models"].items():
                ns = [r["workers"] for r in m["runs"]]
                line = ax.plot(ns, [r["total_pss"] / 1e9 for r in m["runs"]], "o-", label=f"{label}: total PSS")[0]
                ax.plot(ns, [sum(w["table_pss"] for w in r["per_worker"]) / 1e9 for r in m["runs"]], "s:", color=line.get_color(), label=f"{label}: tables' PSS")
                if m["checks"]:
                    ax.plot(ns, [c["bound"] / 1e9 for c in m["checks"]], "--", color=line.get_color(), alpha=0.5, label=f"{label}: bound")
            ax.set_xlabel("workers")
            ax.set_ylabel("GB")
            ax.set_xticks(results["memory"]["workers"])
            ax.set_ylim(0, ax.get_ylim()[1] * 1.45)  # room for the legend above the lines
            ax.set_title("PSS of all workers")
            ax.legend(fontsize=7, ncol=3, loc="upper left")
        elif key == "cold":
            runs = results["cold"]["runs"]
            labels = [f"{r['how'].split(' (')[0]}\n{r['page_cache']}" for r in runs]
            ax.barh(labels, [r["first_prediction_s"] for r in runs], color="tab:blue")
            ax.axvline(15, color="red", ls="--", label="15 s target")
            ax.set_xlabel("seconds to first prediction")
            ax.set_title("Cold start, Kaggle-size model")
            ax.tick_params(axis="y", labelsize=7)
            ax.legend(fontsize=7)
        elif key == "throughput":
            models = results["throughput"]["models"]
            labels = list(models)
            x = np.arange(len(labels))
            ax.bar(x - 0.2, [models[k]["in_process_rows_s"] / 1e3 for k in labels], 0.4, label="in-process")
            if any("end_to_end_rows_s" in models[k] for k in labels):
                e2e = [models[k].get("end_to_end_rows_s", np.nan) / 1e3 for k in labels]
                ax.bar(x + 0.2, e2e, 0.4, label="end to end")
            ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
            ax.set_ylabel("thousand rows/s")
            ax.set_title(f"Throughput, batch {results['throughput']['batch']}")
            ax.legend(fontsize=7)
        elif key == "int8":
            q = results["int8"]
            ax.bar(["float32", "int8"], [q["auc_float32"], q["auc_int8"]], color=["tab:blue", "tab:orange"])
            lo = min(q["auc_float32"], q["auc_int8"])
            ax.set_ylim(lo - 0.01, max(q["auc_float32"], q["auc_int8"]) + 0.005)
            ax.set_ylabel("test AUC")
            ax.set_title(f"int8 tables: test AUC {q['auc_float32']:.5f} -> {q['auc_int8']:.5f}")
    fig.tight_layout()
    path = results_dir() / f"{name}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
