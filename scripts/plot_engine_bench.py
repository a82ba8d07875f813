"""Plot an H200 engine_bench JSON: each case as a fraction of its physical floor, pdserve beside
transformers (decode: HBM floor / measured time; prefill: MFU).

    python scripts/plot_engine_bench.py docs/data/2026-11-28-h200-engine-bench-s3-final.json docs/img/h200-engine-s3.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

IMPLS = (("pdserve engine loop (overlap)", "pdserve, engine loop"), ("pdserve+graph", "pdserve, CUDA graph"),
         ("pdserve eager", "pdserve, eager"), ("transformers eager", "transformers eager"))


def fraction(row: dict) -> float:
    return row["floor_ms"] / row["ms"] if row["ms"] and row["floor_ms"] else 0.0


def panel(ax, rows: list[dict], model: str, kind: str) -> None:
    cases = sorted({r["case"] for r in rows if r["model"] == model and r["case"].startswith(kind)
                    and "after" not in r["case"]}, key=lambda c: int(c.split()[1].split("=")[-1].replace(",", "")))
    width = 0.8 / len(IMPLS)
    for i, (impl, label) in enumerate(IMPLS):
        values = [next((fraction(r) for r in rows if r["model"] == model and r["impl"] == impl and r["case"] == c), 0)
                  for c in cases]
        if not any(values) or (kind == "prefill" and impl.startswith("pdserve engine")):
            continue
        ax.bar([x + i * width for x in range(len(cases))], [100 * v for v in values], width, label=label,
               color=f"C{i}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(cases))], [c.split(" ctx")[0] for c in cases])
    ax.set_ylim(0, 125)
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("% of the floor" if kind == "decode" else "% MFU")
    ax.set_title(f"{model} {kind}")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", ncol=2)


def main(src: str, dst: str) -> int:
    data = json.loads(Path(src).read_text())
    rows, meta = data["rows"], data["meta"]
    models = sorted({r["model"] for r in rows}, reverse=True)
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4 * len(models)), squeeze=False)
    for m, model in enumerate(models):
        panel(axes[m][0], rows, model, "decode")
        panel(axes[m][1], rows, model, "prefill")
    fig.suptitle(f"{meta.get('gpu', '')}, {meta.get('dtype', '')}, decode context {meta.get('ctx')} "
                 f"(floor: {meta.get('hbm_tb_s')} TB/s, {meta.get('peak_tflops')} TFLOP/s)")
    fig.tight_layout()
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dst, dpi=110)
    print(dst)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
