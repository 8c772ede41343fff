"""The report's charts, drawn by matplotlib as inline SVG: no JavaScript, no network, no fonts to fetch.

Each function takes checked data from `history` and returns the ``<svg>`` element as text, or None
when there is nothing to draw (the page then says why). Figures are made with
``matplotlib.figure.Figure`` directly, not pyplot: no global state, no GUI backend, safe in a
trainer's process. Text stays text (``svg.fonttype = none``) so the page is small and searchable,
and is drawn as written (``text.parse_math = False``): a logged name holding ``$...$`` is never
handed to the mathtext parser, which a hostile name can send into unbounded recursion.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from ckptguard.report.history import DiskUse, History, Metric, Save, Session
from ckptguard.report.text import shown

OUTCOME_STYLE = {  # marker, colour, label
    "kept": ("o", "#2e7d32", "verified, kept"),
    "pruned": ("o", "#9e9e9e", "verified, pruned later"),
    "gone": ("o", "#6d4c41", "verified, gone or damaged since"),
    "failed": ("X", "#c62828", "save failed"),
    "quarantined": ("^", "#ef6c00", "failed verification, moved aside"),
}
SESSION_COLOURS = ["#1565c0", "#6a1b9a", "#00838f", "#ad1457", "#558b2f", "#4e342e"]
_RC = {"svg.fonttype": "none", "text.parse_math": False}
# A long run is drawn from a bounded sample: a 10-inch chart cannot show more, and every point drawn
# is bytes in the page and time in matplotlib (20,000 saves took minutes and 20 MB drawn one by one).
MAX_LINE_POINTS = 1000  # per line, keeping each stretch's lowest and highest value
MAX_MARKERS = 300  # per lane and outcome on the timeline
MAX_BARS = 100  # save costs: beyond this, one bar per group of consecutive saves
T = TypeVar("T")


def _plain_text(draw: Callable[..., str | None]) -> Callable[..., str | None]:
    """Draw under `_RC`: texts read ``text.parse_math`` when made, so it must hold while the chart is built."""

    @functools.wraps(draw)
    def drawn(*args: object) -> str | None:
        with matplotlib.rc_context(_RC):
            return draw(*args)

    return drawn


def _svg(fig: Figure) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: the element goes inline


def _colour(session: int) -> str:
    return SESSION_COLOURS[(session - 1) % len(SESSION_COLOURS)]


def envelope(items: Sequence[T], limit: int, value: Callable[[T], float]) -> list[tuple[int, T]]:
    """At most `limit` of `items` with their indices, in order: the lowest and highest of each stretch.

    A loss spike or the moment the disk ran low survives the thinning, as even sampling would not promise.
    """
    if len(items) <= limit:
        return list(enumerate(items))
    size = math.ceil(len(items) / (limit // 2))
    out: list[tuple[int, T]] = []
    for start in range(0, len(items), size):
        stretch = range(start, min(start + size, len(items)))
        low, high = min(stretch, key=lambda i: value(items[i])), max(stretch, key=lambda i: value(items[i]))
        out += [(i, items[i]) for i in sorted({low, high})]
    return out


def evenly(items: Sequence[T], limit: int) -> list[T]:
    """At most `limit` of `items`, evenly spaced, the first and the last among them."""
    if len(items) <= limit:
        return list(items)
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]


def _by_session(points: Iterable[Metric]) -> dict[int, list[Metric]]:
    """Each session's points, thinned to MAX_LINE_POINTS."""
    out: dict[int, list[Metric]] = {}
    for p in points:
        out.setdefault(p.session, []).append(p)
    return {k: [p for _, p in envelope(v, MAX_LINE_POINTS, lambda p: p.value)] for k, v in out.items()}


@_plain_text
def metrics_chart(h: History) -> str | None:
    """Train loss (a line per session, so a resumed stretch overlays the one it replaced), eval loss, lr."""
    if not (h.train_loss or h.eval_loss or h.lr):
        return None
    fig = Figure(figsize=(10, 5.2))
    loss_ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=[2, 1])
    for session, points in _by_session(h.train_loss).items():
        loss_ax.plot(
            [p.step for p in points],
            [p.value for p in points],
            color=_colour(session),
            lw=1.4,
            label=f"train loss (run {session})",
        )
    for session, points in _by_session(h.eval_loss).items():
        loss_ax.plot(
            [p.step for p in points],
            [p.value for p in points],
            "D--",
            color=_colour(session),
            ms=5,
            lw=0.8,
            alpha=0.8,
            label=f"eval loss (run {session})",
        )
    for session, points in _by_session(h.lr).items():
        lr_ax.plot([p.step for p in points], [p.value for p in points], color=_colour(session), lw=1.4)
    for s in h.sessions:
        if s.resumed_from:
            for ax in (loss_ax, lr_ax):
                ax.axvline(s.first_step, color=_colour(s.number), ls=":", lw=1)
            loss_ax.annotate(
                f"run {s.number} resumed here",
                (s.first_step, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -12),
                textcoords="offset points",
                fontsize=8,
                color=_colour(s.number),
            )
    loss_ax.set_ylabel("loss")
    loss_ax.grid(alpha=0.3)
    if loss_ax.has_data():
        loss_ax.legend(fontsize=8, loc="upper right")
    lr_ax.set_ylabel("learning rate")
    lr_ax.set_xlabel("step")
    lr_ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    lr_ax.grid(alpha=0.3)
    return _svg(fig)


def save_state(save: Save) -> str:
    """Which OUTCOME_STYLE a save is drawn with."""
    if save.outcome != "verified":
        return save.outcome
    return "kept" if save.kept else "pruned" if save.pruned else "gone"


@_plain_text
def timeline_chart(h: History) -> str | None:
    """One lane per process over steps: its saves, where it resumed from, and how it ended."""
    if not h.sessions and not h.saves:
        return None
    sessions = h.sessions or [Session(1)]
    lane = {s.number: len(sessions) - i for i, s in enumerate(sessions)}  # the first run on top
    fig = Figure(figsize=(10, 1.3 + 0.75 * len(sessions)))
    ax = fig.subplots()
    for s in sessions:
        y = lane[s.number]
        ax.plot(
            [s.first_step, max(s.last_step, s.first_step)],
            [y, y],
            color=_colour(s.number),
            lw=6,
            alpha=0.25,
            solid_capstyle="butt",
        )
        if s.resumed_from:
            ax.annotate(
                f"resumed from {shown(s.resumed_from)}",
                (s.first_step, y),
                xytext=(0, 9),
                textcoords="offset points",
                fontsize=8,
                color=_colour(s.number),
            )
        _end_marker(ax, s, y)
    groups: dict[tuple[str, int], list[int]] = {}  # (outcome, lane) -> steps: one line of markers each
    for save in h.saves:
        groups.setdefault((save_state(save), lane.get(save.session, 1)), []).append(save.step)
    drawn: set[str] = set()
    order = list(OUTCOME_STYLE)  # the legend's order
    for (state, y), steps in sorted(groups.items(), key=lambda g: (order.index(g[0][0]), g[0][1])):
        marker, colour, label = OUTCOME_STYLE[state]
        steps = evenly(steps, MAX_MARKERS)
        ax.plot(
            steps,
            [y] * len(steps),
            marker,
            ls="none",
            color=colour,
            ms=9,
            mec="black",
            mew=0.5,
            label=None if state in drawn else label,
            zorder=3,
        )
        drawn.add(state)
    ax.set_yticks(list(lane.values()), [_lane_label(s) for s in sessions], fontsize=8)
    ax.set_ylim(0.4, len(sessions) + 0.7)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, frameon=False)
    return _svg(fig)


def _end_marker(ax: Axes, s: Session, y: int) -> None:
    if s.preempted:
        marker, colour, text = "s", "#6a1b9a", f"preempted at step {s.last_step}"
    elif s.killed:  # its last logged step: it may have trained a little further before it died
        marker, colour, text = "X", "#c62828", f"killed after step {s.last_step}"
    elif not s.ended_cleanly:
        marker, colour, text = "X", "#c62828", f"no end logged after step {s.last_step}"
    else:
        return
    ax.plot(s.last_step, y, marker, color=colour, ms=13, mec="white", zorder=4)
    ax.annotate(
        text,
        (s.last_step, y),
        xytext=(8, -14),
        textcoords="offset points",
        fontsize=8,
        color=colour,
        fontweight="bold",
    )


def _lane_label(s: Session) -> str:
    started = s.started.strftime("%H:%M:%S") if s.started else "?"
    return f"run {s.number}\npid {s.pid if s.pid is not None else '?'}, {started}"


@_plain_text
def save_cost_chart(saves: list[Save]) -> str | None:
    """Per save: seconds from the save call to verified, and the part the training loop waited (stall)."""
    timed = [s for s in saves if s.seconds is not None]
    if not timed:
        return None
    fig = Figure(figsize=(10, 3.2))
    ax = fig.subplots()
    size = math.ceil(len(timed) / MAX_BARS)  # saves per bar: 1 up to MAX_BARS saves
    groups = [timed[i : i + size] for i in range(0, len(timed), size)]
    x = range(len(groups))
    each = "" if size == 1 else f", the longest of {size} saves"
    ax.bar(
        [i - 0.2 for i in x],
        [max(s.seconds or 0 for s in g) for g in groups],
        0.4,
        color="#1565c0",
        label="save to verified" + each,
    )
    ax.bar(
        [i + 0.2 for i in x],
        [max(s.stall_seconds or 0 for s in g) for g in groups],
        0.4,
        color="#ef6c00",
        label="stall" + each,
    )
    every = max(1, len(groups) // 30)  # at most ~30 labels, however many saves
    ax.set_xticks(list(x)[::every], [f"{g[0].step}\nrun {g[0].session}" for g in groups][::every], fontsize=7)
    ax.set_xlabel("save (step, run)" if size == 1 else f"saves, {size} a bar (first step, run)")
    ax.set_ylabel("seconds")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _svg(fig)


def _disk_label(disk: list[DiskUse], i: float) -> str:
    n = round(i)
    return f"{disk[n].step}\n{disk[n].time.strftime('%H:%M:%S')}" if 0 <= n < len(disk) and n == i else ""


def _unit(largest: float) -> tuple[float, str]:
    for scale, name in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if largest >= scale:
            return float(scale), name
    return 1.0, "B"


@_plain_text
def disk_chart(disk: list[DiskUse]) -> str | None:
    """After each save, in order: what the run's checkpoints hold, and the free space left on their filesystem.

    The x axis is the save's place in the run, labelled with its time: event times have one-second
    resolution, and saves close together would pile up on a time axis.
    """
    if not disk:
        return None
    fig = Figure(figsize=(10, 4.2))
    used_ax, free_ax = fig.subplots(2, 1, sharex=True)
    points = envelope(disk, MAX_LINE_POINTS, lambda d: d.free_bytes)  # (place in the run, facts)
    x, ms = [i for i, _ in points], 4 if len(disk) <= MAX_MARKERS else 0
    scale, unit = _unit(max(d.checkpoint_bytes for d in disk))
    used_ax.step(x, [d.checkpoint_bytes / scale for _, d in points], "o-", where="post", color="#1565c0", ms=ms)
    used_ax.set_ylabel(f"checkpoints\n({unit})")
    used_ax.set_ylim(bottom=0)
    scale, unit = _unit(max(d.total_bytes for d in disk))
    free_ax.plot(x, [d.free_bytes / scale for _, d in points], "o-", color="#2e7d32", ms=ms, label="free")
    free_ax.plot(x, [d.total_bytes / scale for _, d in points], "--", color="#9e9e9e", label="filesystem size")
    free_ax.set_ylabel(f"filesystem\n({unit})")
    free_ax.set_ylim(bottom=0)
    free_ax.legend(fontsize=8, loc="lower left")
    free_ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    free_ax.xaxis.set_major_formatter(FuncFormatter(lambda i, _: _disk_label(disk, i)))
    free_ax.set_xlabel(f"after the save of step (time, {disk[0].time.strftime('%Y-%m-%d UTC%z')})")
    for ax in (used_ax, free_ax):
        ax.grid(alpha=0.3)
    return _svg(fig)
