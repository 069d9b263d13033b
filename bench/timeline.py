"""Timeline plots of the suite: IOPS and p99 latency across a migration, with its progress.

One PNG per media model; one row per fio profile. The left panel is the
saturated episode (IOPS), the right one the fixed-rate episode (p99 latency,
log scale). Both share the episode's time axis (seconds since its first fio
run), shade the three phases (source, target while migrating, target after
cutover), mark the migration's start and its cutover, and draw the copy
progress polled from the migration status API on a second axis.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display here; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter, LogLocator  # noqa: E402

PHASE_COLORS = {"source": "#d9e8f5", "migrating": "#fbe3c8", "after": "#dcefd9"}
PHASE_LABELS = {
    "source": "on source",
    "migrating": "on target, migrating",
    "after": "on target, after cutover",
}


def _us(v: float, _pos: object = None) -> str:
    return f"{v / 1000:g} ms" if v >= 1000 else f"{v:g} us"


def _shade(ax: Axes, ep: dict[str, Any], t0: float) -> None:
    for phase, ph in ep["phases"].items():
        ax.axvspan(ph["t0"] - t0, ph["t1"] - t0, color=PHASE_COLORS[phase], zorder=0, lw=0)
    for key, style in (("migration_start", ":"), ("cutover", "--")):
        t = ep["events"].get(key)
        if t is not None:
            ax.axvline(t - t0, color="0.3", ls=style, lw=1)


def _progress(ax: Axes, ep: dict[str, Any], t0: float) -> None:
    twin = ax.twinx()
    prog = ep.get("progress", [])
    if prog:
        t = np.array([p[0] for p in prog]) - t0
        clean = np.array([p[1] for p in prog]) * 100
        if prog[-1][2] == "completed":  # hold 100% through the phase after cutover
            t = np.append(t, ep["phases"]["after"]["t1"] - t0)
            clean = np.append(clean, 100.0)
        twin.plot(t, clean, color="tab:green", lw=1.2, label="copy progress")
    twin.set_ylim(0, 105)
    twin.set_ylabel("copied %", color="tab:green", fontsize=8)
    twin.tick_params(axis="y", labelsize=7, colors="tab:green")


def _series(ax: Axes, ep: dict[str, Any], t0: float, key: str, color: str) -> None:
    for phase, ph in ep["phases"].items():
        series = ph.get("timeline", {})
        t = np.array(series.get("t", [])) - t0
        y = np.array(series.get(key, []), dtype=float)
        if t.size:
            ax.plot(t, y, color=color, lw=1.3, marker=".", ms=3, label=None if phase != "source" else key)


def plot_media(media: str, episodes: dict[str, dict[str, Any]], titles: dict[str, str], out: Path) -> Path:
    """``episodes[profile]`` holds lists of ``"saturated"`` and ``"rate"`` episodes (see
    bench.suite); the first of each is drawn."""
    rows = list(episodes)
    fig, axes = plt.subplots(len(rows), 2, figsize=(13, 3.3 * len(rows) + 0.6), squeeze=False)
    for row, prof in enumerate(rows):
        for col, kind in enumerate(("saturated", "rate")):
            ax = axes[row][col]
            eps = episodes[prof].get(kind)
            if not eps:
                ax.set_visible(False)
                continue
            ep = eps[0]  # the first round
            t0 = ep["phases"]["source"]["t0"]
            _shade(ax, ep, t0)
            if kind == "saturated":
                _series(ax, ep, t0, "iops", "tab:blue")
                ax.set_ylabel("IOPS", fontsize=8)
                ax.set_ylim(bottom=0)
                title = f"{titles[prof]}: saturated IOPS"
            else:
                _series(ax, ep, t0, "p99_us", "tab:red")
                ax.set_yscale("log")
                ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                ax.yaxis.set_major_formatter(FuncFormatter(_us))
                ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, p: ""))
                ax.set_ylabel("p99 latency", fontsize=8)
                title = f"{titles[prof]}: p99 at {ep['rate_iops']:.0f} IOPS"
            _progress(ax, ep, t0)
            ax.set_title(title, fontsize=9)
            ax.tick_params(labelsize=7)
            ax.set_xlabel("seconds", fontsize=8)
    handles: list[Artist] = [Rectangle((0, 0), 1, 1, color=c) for c in PHASE_COLORS.values()]
    handles += [
        Line2D([], [], color="0.3", ls=":"),
        Line2D([], [], color="0.3", ls="--"),
        Line2D([], [], color="tab:green"),
    ]
    labels = [*PHASE_LABELS.values(), "migration start", "cutover", "copy progress (status API)"]
    fig.legend(handles, labels, loc="lower center", ncol=6, fontsize=8, frameon=False)
    fig.suptitle(f"blockmig read-through timeline, media {media}", fontsize=11)
    fig.tight_layout(rect=(0, 0.3 / fig.get_figheight(), 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
