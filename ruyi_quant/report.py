"""Tables and plots of reports: one column list, rendered as rich tables, markdown or PNG."""

from __future__ import annotations

from pathlib import Path

# (header, key, format) of the per-exit evaluation table
EVAL_COLUMNS = [
    ("exit", "exit", "{}"),
    ("ppl ref", "ppl_ref", "{:.4g}"),
    ("ppl quant", "ppl_quant", "{:.4g}"),
    ("Δppl %", "delta_ppl_pct", "{:+.2f}"),
    ("KL(ref‖q)", "kl", "{:.2e}"),
    ("top-1 %", "top1", "{:.2%}"),
    ("MB ref (stored)", "bytes_ref", "mb"),  # weights as the checkpoint stores them
    ("MB quant (stored)", "bytes_quant", "mb"),  # and as an exit runs on them
]


def fmt(value, style: str) -> str:
    if style == "mb":
        return f"{value / 1e6:.2f}"
    if style == "{:.2%}":
        return f"{100 * value:.2f}"
    return style.format(value)


def eval_cells(report: dict) -> tuple[list[str], list[list[str]]]:
    headers = [h for h, _, _ in EVAL_COLUMNS]
    rows = [[fmt(r[k], f) for _, k, f in EVAL_COLUMNS] for r in report["rows"]]
    fam = report["family"]
    rows.append(["family", "", "", "", "", "", fmt(fam["bytes_ref"], "mb"), fmt(fam["bytes_quant"], "mb")])
    return headers, rows


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def eval_markdown(report: dict) -> str:
    title = (
        f"Method `{report['method']}`, text `{report.get('source', '?')}`, "
        f"{report['windows'][0]} x {report['windows'][1]} tokens\n\n"
    )
    return title + markdown_table(*eval_cells(report))


def rich_table(title: str, headers: list[str], rows: list[list[str]]):
    from rich.table import Table

    table = Table(title=title)
    for i, h in enumerate(headers):
        table.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*r)
    return table


def _pyplot():
    """matplotlib.pyplot on the file-only backend, or None when matplotlib is absent."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def eval_plot(report: dict, path: Path) -> bool:
    """Perplexity per exit, reference vs quantized. False when matplotlib is absent."""
    plt = _pyplot()
    if plt is None:
        return False
    exits = [r["exit"] for r in report["rows"]]
    x = range(len(exits))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(x, [r["ppl_ref"] for r in report["rows"]], "o-", label="reference")
    a.plot(x, [r["ppl_quant"] for r in report["rows"]], "s--", label=report["method"])
    a.set_yscale("log")
    a.set_ylabel("perplexity")
    b.bar(x, [r["kl"] for r in report["rows"]], color="tab:orange")
    b.set_ylabel("mean KL(ref || quant)")
    for ax in (a, b):
        ax.set_xticks(list(x), [f"exit {e}" for e in exits])
    a.legend()
    fig.suptitle(f"Quality per exit: {report['method']} vs reference")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def runtime_cells(report: dict) -> tuple[list[str], list[list[str]]]:
    """The `eval --runtime int4` table: both sides of every exit (float in the report's dtype)."""
    f = report["dtype"].replace("bfloat16", "bf16").replace("float16", "fp16").replace("float32", "fp32")
    mem = "peak_device_gb" if report["rows"] and "peak_device_gb_int4" in report["rows"][0] else "peak_rss_gb"
    m = "GPU GB" if mem == "peak_device_gb" else "RSS GB"
    cols = [
        ("exit", "exit", "{}"),
        (f"ppl {f}", "ppl_float", "{:.4g}"),
        ("ppl int4", "ppl_int4", "{:.4g}"),
        ("Δppl %", "delta_ppl_pct", "{:+.2f}"),
        ("KL", "kl", "{:.2e}"),
        ("top-1 %", "top1", "{:.2%}"),
        (f"prefill/s {f}", "prefill_tok_s_float", "{:.0f}"),
        ("prefill/s int4", "prefill_tok_s_int4", "{:.0f}"),
        (f"decode/s {f}", "decode_tok_s_float", "{:.1f}"),
        ("decode/s int4", "decode_tok_s_int4", "{:.1f}"),
        ("decode ×", "decode_speedup", "{:.2f}"),
        (f"{m} {f}", f"{mem}_float", "{:.2f}"),
        (f"{m} int4", f"{mem}_int4", "{:.2f}"),
    ]
    return [h for h, _, _ in cols], [[fmt(r[k], s) for _, k, s in cols] for r in report["rows"]]


def runtime_markdown(report: dict) -> str:
    where = report["gpu"] or f"CPU, {report['threads']} threads"
    title = (
        f"Int4 runtime vs {report['dtype']} on {where}: method `{report['method']}`, accuracy on "
        f"{report['windows'][0]} x {report['windows'][1]} tokens, speed at batch {report['prompt'][0]}, "
        f"prompt {report['prompt'][1]} tokens, {report['new_tokens']} decoded "
        f"({'static cache + torch.compile' if report.get('compiled') else 'eager'}; median of "
        f"{report['repeats']}); peak memory per side (load + timing; weights in memory: "
        f"{report['weights_gb']['float']:.3f} GB {report['dtype']}, {report['weights_gb']['int4']:.3f} GB int4); "
        "KL(float ‖ int4), tokens/s\n\n"
    )
    return title + markdown_table(*runtime_cells(report))


def runtime_plot(report: dict, path: Path) -> bool:
    """Perplexity and decode tokens/s per exit, float vs int4. False when matplotlib is absent."""
    plt = _pyplot()
    if plt is None:
        return False
    rows = report["rows"]
    x = list(range(len(rows)))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.6))
    a.plot(x, [r["ppl_float"] for r in rows], "o-", label=report["dtype"])
    a.plot(x, [r["ppl_int4"] for r in rows], "s--", label="int4")
    a.set_ylabel("perplexity")
    w = 0.4
    b.bar([i - w / 2 for i in x], [r["decode_tok_s_float"] for r in rows], w, label=report["dtype"])
    b.bar([i + w / 2 for i in x], [r["decode_tok_s_int4"] for r in rows], w, label="int4")
    b.set_ylabel("decode tokens/s")
    for ax in (a, b):
        ax.set_xticks(x, [f"exit {r['exit']}" for r in rows])
        ax.legend()
    fig.suptitle(f"Int4 runtime vs {report['dtype']} per exit ({report['gpu'] or 'CPU'})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
