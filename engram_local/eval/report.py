"""Outputs of the head-to-head evaluation: JSON, a markdown table, and an accuracy vs context
tokens plot (the paper's Pareto figure, user-as-engram-method.md §7.8)."""

from __future__ import annotations

import json
from pathlib import Path

COLUMNS = (   # (header, metric key, formatter)
    ("direct top-1", "direct_top1", "pct"),
    ("direct full", "direct_full", "pct"),
    ("chat recall", "chat_recall", "pct"),
    ("indirect_any", "indirect_any", "pct"),
    ("indirect_top1", "indirect_top1", "pct"),
    ("Δbpb", "delta_bpb", "delta"),
    ("users worse than A", "users_worse_than_A", "worse"),
    ("context tokens/query", "context_tokens", "float1"),
    ("ms/query", "ms_per_query", "float0"),
    ("bytes/user", "bytes_stored", "bytes"),
    ("prep s/user", "prep_s", "float1"),
)

NOTES = """\
- **direct top-1**: the first greedy token after the fact's completion prompt (the paper's rule:
  first paraphrase ending with the answer, minus the answer) is the first token of " " + the
  answer's first word. **direct full**: the greedy continuation (answer tokens + 4) contains the
  answer (case-insensitive).
- **chat recall**: each direct_qa question as one chat user turn, 24 greedy tokens, answer
  contained (case-insensitive).
- **indirect_any / indirect_top1**: first 20 indirect_qa items, prompt "Q: <q>\\nA:", 16 greedy
  tokens; lower-cased gold contained / first token = first token of " " + gold's first word.
- **Δbpb**: bits per byte on the unrelated text minus condition A's (G and H do not change the
  model: 0). **users worse than A**: users whose indirect_any is below A's.
- **context tokens/query, ms/query**: over the indirect probes (ms: retrieval, prompt and 16
  generated tokens, llama.cpp, KV cache cleared before each query).
- **bytes/user**: B the LoRA adapter GGUF, C/F the .eov file, D both, G/H the facts' UTF-8
  text; A and E store nothing per user. **prep s/user**: LoRA training (B, D) and row fitting
  (C, D, F) per user in this run (near 0 when reused from the work directory).
"""


def _fmt(value, kind: str, n_users: int = 0) -> str:
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "delta":
        return f"{value:+.5f}" if abs(value) < 0.01 else f"{value:+.3f}"
    if kind == "worse":
        return f"{value}/{n_users}"
    if kind == "bytes":
        for unit, size in (("MB", 1 << 20), ("KB", 1 << 10)):
            if value >= size:
                return f"{value / size:.1f} {unit}"
        return f"{value:.0f} B"
    if kind == "float0":
        return f"{value:.0f}"
    return f"{value:.1f}"


def markdown(results: dict) -> str:
    """The results as a markdown report: one table row per condition, the command, notes."""
    users = results.get("users", [])
    lines = ["# Head-to-head: per-user memory against the alternatives", ""]
    lines.append(f"Model: `{results['model']['model_dir']}`; skill adapter: "
                 f"`{results.get('skill_adapter') or 'none'}`; users ({len(users)}): "
                 f"{', '.join(u['uid'] for u in users)}; unrelated text: `{results['text']['path']}` "
                 f"({results['text']['bytes']} bytes); wall time {results.get('seconds', 0):.0f} s.")
    if results.get("command"):
        lines += ["", "Command:", "", "```", results["command"], "```"]
    lines += ["", "| condition | " + " | ".join(h for h, _, _ in COLUMNS) + " |",
              "|---|" + "---:|" * len(COLUMNS)]
    for letter, agg in results["conditions"].items():
        cells = [_fmt(agg.get(key), kind, agg.get("n_users", 0)) for _, key, kind in COLUMNS]
        lines.append(f"| {letter} {agg['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Metrics are means over users.", "", NOTES]
    return "\n".join(lines)


def plot(results: dict, path: str | Path) -> Path:
    """PNG: indirect_any and chat recall against context tokens per query, one point per condition."""
    try:
        import matplotlib
    except ImportError:
        raise RuntimeError("--plot needs matplotlib, an evaluation extra: pip install 'engram-local[eval]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.8), dpi=120)
    for key, marker, label in (("indirect_any", "o", "indirect_any"), ("chat_recall", "s", "chat recall")):
        points: dict[tuple, list[str]] = {}         # conditions at the same spot share one label
        for letter, agg in results["conditions"].items():
            if agg.get(key) is not None:
                points.setdefault((agg.get("context_tokens") or 0.0, 100 * agg[key]), []).append(letter)
        if not points:
            continue
        xs, ys = zip(*points)
        pts = ax.scatter(xs, ys, marker=marker, label=label, s=50, alpha=0.8)
        for (x, y), names in points.items():
            ax.annotate(",".join(names), (x, y), textcoords="offset points", xytext=(6, 4), fontsize=9,
                        color=pts.get_facecolor()[0])
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlabel("context tokens added per query")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-2, 102)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    n = len(results.get("users", []))
    ax.set_title(f"Head-to-head, {n} user{'s' if n != 1 else ''}: accuracy against context cost "
                 "(means over users)")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(results: dict, json_out: str | Path | None = None, report_out: str | Path | None = None,
          plot_out: str | Path | None = None) -> dict:
    """Write the requested outputs; the plot goes next to the report (or the JSON) unless given.
    Returns {"json": path, "report": path, "plot": path} of what was written."""
    written = {}
    if plot_out is None and (report_out or json_out):
        plot_out = Path(report_out or json_out).with_suffix(".png")
    if plot_out is not None:
        written["plot"] = str(plot(results, plot_out))
        results = dict(results, plot=written["plot"])
    if json_out is not None:
        Path(json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(json_out).write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        written["json"] = str(json_out)
    if report_out is not None:
        Path(report_out).parent.mkdir(parents=True, exist_ok=True)
        text = markdown(results)
        if written.get("plot"):
            import os
            rel = os.path.relpath(written["plot"], Path(report_out).resolve().parent)
            text += f"\n![accuracy vs context tokens]({rel})\n"
        Path(report_out).write_text(text, encoding="utf-8")
        written["report"] = str(report_out)
    return written
