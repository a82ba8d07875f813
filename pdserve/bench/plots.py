"""Sweep plots (matplotlib, Agg): latency percentiles and goodput against load.

The x axis is the offered request rate when the sweep varies it (an ``inf`` point sits right of
the largest finite rate, ticked "inf"), else the max concurrency. Every server (``--compare``)
goes on the same axes, one colour each; line style is the percentile (median solid, p90 dashed,
p99 dotted). The goodput plot marks each server's DistServe knee: the highest rate whose SLO
attainment is >= 90%.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from pdserve.bench.metrics import SLO, Summary, distserve_goodput  # noqa: E402

_STYLES = (("median", "-"), ("p90", "--"), ("p99", ":"))
_SLO_METRICS = ("ttft_ms", "itl_ms", "tpot_ms")  # SLO has fields of the same names


def _axis(summaries: list[Summary]) -> str:
    rates = {s.rate for s in summaries}
    concs = {s.max_concurrency for s in summaries}
    return "concurrency" if len(rates) == 1 and len(concs) > 1 else "rate"


def _x_positions(summaries: list[Summary], axis: str) -> tuple[dict, list[float], list[str]]:
    """x value of each distinct load, plus ticks; inf rate -> 1.5x the largest finite rate."""
    if axis == "concurrency":
        values = sorted({s.max_concurrency or 0 for s in summaries})
        return {v: float(v) for v in values}, [float(v) for v in values], [str(v) for v in values]
    finite = sorted({s.rate for s in summaries if math.isfinite(s.rate)})
    pos = {r: r for r in finite}
    if any(math.isinf(s.rate) for s in summaries):
        pos[math.inf] = (finite[-1] * 1.5) if finite else 1.0
    ticks = sorted(pos.values())
    labels = ["inf" if x == pos.get(math.inf) and math.inf in pos else f"{x:g}" for x in ticks]
    return pos, ticks, labels


def _series(summaries: list[Summary], axis: str) -> dict[tuple, list[Summary]]:
    """Group points into lines: (label, the parameter that is not on the x axis)."""
    out: dict[tuple, list[Summary]] = {}
    for s in summaries:
        other = s.rate if axis == "concurrency" else s.max_concurrency
        out.setdefault((s.label, other), []).append(s)
    return out


def _x_of(s: Summary, axis: str, pos: dict) -> float:
    return pos[s.max_concurrency or 0] if axis == "concurrency" else pos[s.rate]


def _lines(summaries: list[Summary], axis: str, pos: dict) -> list[tuple[str, list[Summary], list[float]]]:
    """(legend name, points sorted by x, their x) per line."""
    series = _series(summaries, axis)
    per_label = {label: sum(1 for k in series if k[0] == label) for label, _ in series}
    out = []
    for (label, other), pts in series.items():
        pts = sorted(pts, key=lambda s: _x_of(s, axis, pos))
        name = label
        if per_label[label] > 1 and other is not None:
            name = f"{label} ({'rate' if axis == 'concurrency' else 'conc'}={other:g})"
        out.append((name, pts, [_x_of(s, axis, pos) for s in pts]))
    return out


def _setup(ax, axis: str, ticks: list[float], tick_labels: list[str], ylabel: str, title: str) -> None:
    ax.set_xlabel("request rate (req/s)" if axis == "rate" else "max concurrency")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_xticks(ticks, tick_labels)
    ax.grid(True, alpha=0.3)


def plot_latency(summaries: list[Summary], metric: str, path: Path, title: str,
                 slo: SLO | None = None) -> Path:
    """``metric`` in ttft_ms / itl_ms / tpot_ms / e2e_ms: its median, p90, p99 against load."""
    axis = _axis(summaries)
    pos, ticks, tick_labels = _x_positions(summaries, axis)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    all_ys: list[float] = []
    for i, (name, pts, xs) in enumerate(_lines(summaries, axis, pos)):
        for stat, style in _STYLES:
            ys = [getattr(getattr(s, metric), stat) for s in pts]
            all_ys += ys
            ax.plot(xs, ys, style, marker="o", color=f"C{i}", markersize=3, label=f"{name} {stat}")
    limit = getattr(slo, metric, None) if slo is not None and metric in _SLO_METRICS else None
    if limit:
        ax.axhline(limit, color="red", linewidth=1, alpha=0.6, label=f"SLO {limit:g} ms")
    _setup(ax, axis, ticks, tick_labels, metric.replace("_ms", "").upper() + " (ms)", title)
    if min(all_ys, default=0.0) > 0 and max(all_ys) / min(all_ys) > 50:
        ax.set_yscale("log")        # latencies explode past the knee; keep the low end readable
    ax.legend(fontsize=7, handlelength=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_goodput(summaries: list[Summary], path: Path) -> Path:
    """Goodput (or throughput without SLOs) against load, with each server's knee marked."""
    axis = _axis(summaries)
    pos, ticks, tick_labels = _x_positions(summaries, axis)
    has_slo = any(s.goodput is not None for s in summaries)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (name, pts, xs) in enumerate(_lines(summaries, axis, pos)):
        ax.plot(xs, [s.request_throughput for s in pts], ":", color=f"C{i}", label=f"{name} throughput")
        if has_slo:
            ax.plot(xs, [s.goodput or 0.0 for s in pts], "-", marker="o", color=f"C{i}",
                    label=f"{name} goodput")
            knee = distserve_goodput(pts) if axis == "rate" else None
            if knee is not None:
                x = _x_of(knee, axis, pos)
                ax.axvline(x, color=f"C{i}", linestyle="--", alpha=0.5)
                ax.plot([x], [knee.goodput], marker="*", markersize=14, color=f"C{i}",
                        label=f"{name} knee {knee.rate:g} req/s (>=90% in SLO)")
    title = "goodput (req/s within SLO)" if has_slo else "request throughput (no --slo given)"
    _setup(ax, axis, ticks, tick_labels, "req/s", title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(summaries: list[Summary], out_dir: str | Path, slo: SLO | None = None) -> list[Path]:
    """ttft_vs_load.png, itl_vs_load.png, tpot_vs_load.png, goodput_vs_load.png in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not summaries:
        return []
    return [
        plot_latency(summaries, "ttft_ms", out / "ttft_vs_load.png", "time to first token", slo),
        plot_latency(summaries, "itl_ms", out / "itl_vs_load.png", "inter-token latency (pooled)", slo),
        plot_latency(summaries, "tpot_ms", out / "tpot_vs_load.png", "time per output token", slo),
        plot_goodput(summaries, out / "goodput_vs_load.png"),
    ]
