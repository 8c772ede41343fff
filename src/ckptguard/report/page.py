"""The report as one self-contained HTML page: inline CSS and SVG, no script, nothing fetched.

A Content-Security-Policy forbids every load, so a page that tried to fetch anything would show a
console error instead of silently depending on a network. Every string from the run directory is
escaped: a checkpoint name or an error message is data, never markup; and made showable
(`text.shown`): a directory name that is not UTF-8 appears as its bytes, escaped, and never stops
the page.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from html import escape

from ckptguard.catalog.listing import ASIDE_WHY, LS_HEADER, ls_rows
from ckptguard.report import charts
from ckptguard.report.collect import RunData
from ckptguard.report.history import Save
from ckptguard.report.text import shown
from ckptguard.units import format_bytes

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #212121; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #616161; } .note { color: #616161; font-style: italic; }
.damage { background: #ffebee; border-left: 4px solid #c62828; padding: 0.5em 1em; }
table { border-collapse: collapse; width: 100%; font-size: 12.5px; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #e0e0e0; padding: 3px 6px; text-align: left; vertical-align: top; }
td:not(:last-child) { white-space: nowrap; } th { background: #f5f5f5; }
tr.failed td, tr.quarantined td, tr.killed td, tr.failure td { background: #ffebee; }
tr.pruned td, tr.summary td { color: #757575; } tr.resume td, tr.end td { background: #e3f2fd; }
figure { margin: 0.5em 0; } figure svg { max-width: 100%; height: auto; }
pre { background: #f5f5f5; padding: 0.8em; overflow: auto; font-size: 12px; }
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'"
NEWEST_SAVES = 200  # listed in full however long the run; older saves that went as planned are summarised


def render(data: RunData) -> str:
    """The whole page for `data`."""
    sections = [
        _header(data),
        _damage(data),
        _section(
            "Training",
            "loss",
            data,
            lambda: charts.metrics_chart(data.history),
            "No training metrics in events.jsonl: a run saved from the library alone logs none.",
        ),
        _section(
            "Checkpoint timeline",
            "timeline",
            data,
            lambda: charts.timeline_chart(data.history),
            "No saves or process starts logged.",
        ),
        _saves_table(data.history.saves),
        _marks_table(data),
        _section(
            "Cost of each save",
            "save-cost",
            data,
            lambda: charts.save_cost_chart(data.history.saves),
            "No completed save logged.",
        ),
        _section(
            "Disk use",
            "disk",
            data,
            lambda: charts.disk_chart(data.history.disk),
            "No disk facts logged (saves record them from this version on).",
        ),
        _checkpoints(data),
        _config(data),
    ]
    title = f"ckptguard run report: {data.run_dir}"
    return shown(  # once, over the whole page: every path and logged string in it, wherever it appears
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        f"<title>{escape(title)}</title><style>{CSS}</style></head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body></html>\n"
    )


def _header(data: RunData) -> str:
    h = data.history
    verified = sum(s.outcome == "verified" for s in h.saves)
    failed = len(h.saves) - verified
    valid = sum(c.valid for c in data.checkpoints)
    runs = "".join(
        f"<li>run {s.number} (pid {s.pid}): {_resumed(s.resumed_from)}{escape(s.end)}</li>" for s in h.sessions
    )
    return (
        f"<h1>Run report: {escape(str(data.run_dir))}</h1>"
        f'<p class="sub">written {time.strftime("%Y-%m-%d %H:%M:%S %Z")} from the run directory alone '
        f"(events.jsonl, manifests, trainer state)</p>"
        f"<p>{len(h.sessions)} process(es) ran on this directory; {verified} save(s) verified, {failed} failed; "
        f"{valid} valid checkpoint(s) now, LATEST = {escape(str(data.latest))}.</p><ul>{runs}</ul>"
    )


def _resumed(name: str | None) -> str:
    return f"resumed from {escape(name)}; " if name else ""


def _damage(data: RunData) -> str:
    if not data.damage:
        return ""
    items = "".join(f"<li>{escape(d)}</li>" for d in data.damage)
    return f'<div class="damage" id="damage"><strong>Damaged or missing inputs</strong><ul>{items}</ul></div>'


def _section(title: str, ident: str, data: RunData, draw: Callable[[], str | None], empty: str) -> str:
    """A heading and its chart; a chart that cannot be drawn says so in place of the figure."""
    try:
        svg = draw()
    except (ValueError, TypeError, OverflowError) as exc:  # the page must still show everything else
        data.damage.append(f"the {title.lower()} chart could not be drawn: {exc}")
        svg, empty = None, f"The chart could not be drawn: {exc}"
    body = f'<figure class="chart" id="chart-{ident}">{svg}</figure>' if svg else f'<p class="note">{escape(empty)}</p>'
    return f"<h2>{escape(title)}</h2>{body}"


def _table(header: list[str], rows: list[tuple[str, list[str]]], ident: str) -> str:
    """Rows are (css class, cells); cells are escaped here."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(
        f'<tr class="{cls}">' + "".join(f"<td>{escape(c)}</td>" for c in cells) + "</tr>" for cls, cells in rows
    )
    return f'<table id="{ident}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def listed(saves: list[Save], newest: int = NEWEST_SAVES) -> list[Save | list[Save]]:
    """The saves table's rows: a save listed in full, or a run of consecutive saves summarised in one row.

    Listed in full: the `newest` saves, every save that failed and every checkpoint kept now; a long
    run's other saves (verified, then pruned) are what is summarised.
    """
    rows: list[Save | list[Save]] = []
    for i, s in enumerate(saves):
        if i >= len(saves) - newest or s.outcome != "verified" or s.kept:
            rows.append(s)
        elif rows and isinstance(rows[-1], list):
            rows[-1].append(s)
        else:
            rows.append([s])
    return rows


def _save_row(s: Save) -> tuple[str, list[str]]:
    what = s.fate if s.outcome == "verified" else s.message or ""
    cells = [
        s.name,
        str(s.session),
        s.time.strftime("%H:%M:%S") if s.time else "-",
        _num(s.stall_seconds),
        _num(s.seconds),
        format_bytes(s.bytes) if s.bytes is not None else "-",
        s.verify or "-",
        s.outcome,
        what,
    ]
    return charts.save_state(s), cells


def _summary_row(run: list[Save]) -> tuple[str, list[str]]:
    fates = Counter(charts.OUTCOME_STYLE[charts.save_state(s)][2] for s in run)
    what = "; ".join(f"{n:,} {fate}" for fate, n in fates.most_common())
    runs = sorted({str(s.session) for s in run}, key=int)
    steps = f"steps {run[0].step} to {run[-1].step}"
    return "summary", [f"{len(run):,} saves, {steps}", ", ".join(runs), "", "", "", "", "", "verified", what]


def _saves_table(saves: list[Save]) -> str:
    rows = [_summary_row(r) if isinstance(r, list) else _save_row(r) for r in listed(saves)]
    header = [
        "checkpoint",
        "run",
        "time",
        "stall s",
        "save to verified s",
        "size",
        "verify",
        "outcome",
        "kept or pruned, and why",
    ]
    return "<h3>Saves</h3>" + (_table(header, rows, "saves") if rows else '<p class="note">No saves logged.</p>')


def _marks_table(data: RunData) -> str:
    marks = data.history.marks
    rows = [
        (m.kind, [m.time.strftime("%H:%M:%S") if m.time else "-", str(m.session), _num(m.step, "{}"), m.kind, m.text])
        for m in marks
    ]
    header = ["time", "run", "step", "what", "detail"]
    return "<h3>Starts, resumes, preemptions, kills and failures</h3>" + _table(header, rows, "marks")


def _checkpoints(data: RunData) -> str:
    rows = [("", row) for row in ls_rows(data.checkpoints, data.keep, data.latest)]
    out = f"<h2>Checkpoints (as <code>ckptguard ls</code> shows them)</h2>{_table(LS_HEADER, rows, 'checkpoints')}"
    out += '<p class="note">* = LATEST</p>' if rows else '<p class="note">No checkpoint directories.</p>'
    if data.aside:
        items = "".join(f"<li><code>{escape(a.name)}</code>: {escape(ASIDE_WHY[a.kind])}</li>" for a in data.aside)
        out += f"<h3>Moved aside, kept for inspection (never resumed from)</h3><ul id='aside'>{items}</ul>"
    return out


def _config(data: RunData) -> str:
    if data.config is None:
        return f'<h2>Run config</h2><p class="note">{escape(data.config_source)}</p>'
    text = escape(json.dumps(data.config, indent=2, sort_keys=True))
    return f"<h2>Run config</h2><details><summary>{escape(data.config_source)}</summary><pre>{text}</pre></details>"
