"""Draw docs/img/rank-layout.png: a TP=1 prefill node pushing KV into a TP=2 decode node and into a
TP=2 / DP=2 (DP attention) decode node, with what each rank holds and which route moves it.

    python scripts/plot_rank_layout.py
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

HEAD_COLORS = ["#4c72b0", "#55a868", "#c44e52"]


def rank_box(ax, x, y, title, heads, note):
    ax.add_patch(Rectangle((x, y), 3.2, 1.6, fill=False, lw=1.5))
    ax.text(x + 0.1, y + 1.35, title, fontsize=9, weight="bold", va="top")
    for i, h in enumerate(heads):
        ax.add_patch(Rectangle((x + 0.2 + i * 0.55, y + 0.35), 0.45, 0.5, color=HEAD_COLORS[h]))
        ax.text(x + 0.42 + i * 0.55, y + 0.6, f"h{h}", ha="center", va="center", fontsize=8, color="white")
    ax.text(x + 0.1, y + 0.12, note, fontsize=7, va="bottom")


def arrow(ax, a, b, label, style="-|>"):
    ax.add_patch(FancyArrowPatch(a, b, arrowstyle=style, mutation_scale=12, lw=1.2, color="0.3"))
    ax.text((a[0] + b[0]) / 2, (a[1] + b[1]) / 2 + 0.15, label, fontsize=7, ha="center")


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 5.2))
    ax.set_xlim(0, 17)
    ax.set_ylim(-0.2, 8.3)
    ax.axis("off")
    rank_box(ax, 0.5, 3.4, "prefill node, --tp 1: rank 0", [0, 1, 2], "one pool, 3 KV heads; sender + NIXL agent")
    ax.text(0.5, 2.7, "staging: each decode rank's heads\nlaid out as its pages (copy on P)", fontsize=7)
    rank_box(ax, 7, 5.6, "decode A --tp 2: rank 0", [0, 1], "MLP + attention heads h0,h1")
    rank_box(ax, 7, 3.6, "decode A: rank 1 (subprocess)", [2], "MLP + attention head h2")
    arrow(ax, (3.7, 4.7), (7, 6.4), "staged: page runs, 1 descriptor each")
    arrow(ax, (3.7, 4.3), (7, 4.5), "staged: page runs")
    rank_box(ax, 12.5, 3.8, "decode B --tp 2 --dp 2: rank 0", [0, 1, 2], "attention group 0 (its requests)")
    rank_box(ax, 12.5, 1.8, "decode B: rank 1", [0, 1, 2], "attention group 1 (its requests)")
    arrow(ax, (3.7, 3.6), (12.5, 2.5), "direct (KVDest.dp_group = 1): same heads, page runs")
    ax.text(12.5, 5.7, "MLP split over both ranks:\nall groups' tokens gathered, own rows back", fontsize=7)
    ax.text(0.5, 0.1, "Rank 0 of every node spawns ranks 1..N-1, allocates every rank's KV pool (shm on CPU,\n"
                      "each rank's GPU through CUDA IPC) and registers all of them with its one NIXL agent:\n"
                      "the handshake lists one region per rank (KV heads, DP group), tp_map plans the routes.",
            fontsize=8)
    ax.text(0.5, 7.9, "pdserve tensor parallelism and DP attention: who holds which KV heads, and how KV moves",
            fontsize=11, weight="bold")
    fig.savefig("docs/img/rank-layout.png", dpi=110, bbox_inches="tight")


if __name__ == "__main__":
    main()
