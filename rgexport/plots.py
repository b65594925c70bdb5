"""Charts of the reports (matplotlib, file-only Agg backend): speed and memory against length, the accuracy matrix.

Each returns the PNG's path, or None where matplotlib is not installed (tables and JSON are still written).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None where matplotlib is not installed (charts
    are then skipped; tables and JSON are still written)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt

def plot_speed(data: dict[str, Any], path: Path) -> Path | None:
    """Decode latency against position, one line per artifact."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in data["results"]:
        pos, ms = zip(*r["decode_ms_by_position"])
        ax.plot(pos, ms, marker="o", label=r["name"])
    ax.set_xlabel("position (tokens)")
    ax.set_ylabel("decode latency, median ms")
    ax.set_yscale("log")
    ax.set_title("Decode latency does not grow with length")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the lines, not on them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

def plot_memory(profiles: list[dict[str, Any]], path: Path) -> Path | None:
    """Peak RSS against tokens decoded per artifact, with a transformer's and Gemma-2B's KV cache added."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    markers = "osD^v<>Xph*"
    for i, p in enumerate(profiles):
        ns = [r["n"] for r in p["rows"]]
        ax.plot(ns, [r["peak_rss_bytes"] / 2**20 for r in p["rows"]], marker=markers[i % len(markers)],
                label=f"{p['backend']} / {p['recipe']}")
    if profiles:
        rows = profiles[0]["rows"]
        base = rows[0]["peak_rss_bytes"] / 2**20
        ns = [r["n"] for r in rows]
        ax.plot(ns, [base + r["transformer_kv_bytes"] / 2**20 for r in rows], "--",
                label=f"{profiles[0]['backend']} / {profiles[0]['recipe']}\n+ a same-width transformer's KV cache")
        ax.plot(ns, [base + r["gemma_2b_kv_bytes"] / 2**20 for r in rows], ":",
                label=f"{profiles[0]['backend']} / {profiles[0]['recipe']}\n+ Gemma-2B's KV cache (fp32)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens decoded")
    ax.set_ylabel("peak RSS while decoding, MiB")
    ax.set_title("Memory stays flat as the sequence grows")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_matrix(result: dict[str, Any], path: Path) -> Path | None:
    """Size against perplexity change per backend and recipe, with the quality budget."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    rows = [r for r in result["rows"] if r["status"] != "error"]
    for b in sorted({r["backend"] for r in rows}):
        pts = [r for r in rows if r["backend"] == b]
        ax.scatter([r["main_file_bytes"] / 1e6 for r in pts], [r["ppl_change_pct"] for r in pts], label=b)
        for r in pts:
            ax.annotate(r["recipe"], (r["main_file_bytes"] / 1e6, r["ppl_change_pct"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")
    budget = result["quality_budget"]["max_ppl_ratio"]
    ax.axhline(100 * (budget - 1), ls="--", c="grey", lw=1, label="quality budget")
    ax.set_xlabel("artifact size (MB)")
    ax.set_ylabel("perplexity change vs fp32 (%)")
    ax.set_title("Size vs quality on held-out text")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
