"""Rows of measurements, the targets they are held to, and the three outputs (markdown, JSON, PNG)."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One measured figure: every sample kept, summarised as median and min-max.

    status is "ok", "skipped" (cannot be measured on this machine) or "failed" (it raised).
    """

    section: str
    workload: str
    measure: str
    unit: str
    samples: list[float] = field(default_factory=list)
    baseline: str | None = None  # `measure` of the row in the same section/workload it is compared to
    higher_is_better: bool = True
    status: str = "ok"
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None


@dataclass
class Target:
    """A goal: `value` (a ratio or an absolute figure) must be <= or >= `limit`."""

    name: str
    workload: str
    value: float | None
    limit: float
    op: str  # "<=" or ">="
    unit: str
    detail: str

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.op == "<=" else self.value >= self.limit


@dataclass
class Results:
    """Everything one run measured, with the environment it ran in."""

    rows: list[Row] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    env: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def find(self, section: str, workload: str, measure: str) -> Row | None:
        for r in self.rows:
            if (r.section, r.workload, r.measure) == (section, workload, measure):
                return r
        return None

    def ratio(self, row: Row) -> float | None:
        """Median of the row over the median of its baseline (same run, same state)."""
        if row.baseline is None:
            return None
        base = self.find(row.section, row.workload, row.baseline)
        if base is None or row.median is None or not base.median:
            return None
        return row.median / base.median


def _fmt(x: float | None, unit: str = "") -> str:
    if x is None:
        return "–"
    digits = 3 if abs(x) < 10 else 1
    text = f"{x:.{digits}g}" if abs(x) < 0.01 and x != 0 else f"{x:.{digits}f}"
    return f"{text} {unit}".strip()


def _row_cells(res: Results, r: Row) -> list[str]:
    if r.status != "ok" or not r.samples:
        status = r.status.upper() + (f": {r.note}" if r.note else "")
        return [r.section, r.workload, r.measure, status, "", "", "", ""]
    ratio = res.ratio(r)
    vs = f"{ratio:.2f}x {r.baseline}" if ratio is not None else ""
    spread = f"{_fmt(min(r.samples))} – {_fmt(max(r.samples))}"
    return [r.section, r.workload, r.measure, _fmt(r.median), r.unit, spread, str(len(r.samples)), vs]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return lines


def markdown(res: Results) -> str:
    """The bench.md text: environment, targets (met / not met), then every measurement."""
    env = res.env
    lines = ["# ckptguard benchmark", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += ["", "## Targets", ""]
    trows = []
    for t in res.targets:
        met = {True: "met", False: "NOT met", None: "not measured"}[t.met]
        trows.append([t.name, t.workload, f"{_fmt(t.value)} {t.unit}".strip(), f"{t.op} {t.limit:g}", met, t.detail])
    lines += _table(["target", "state", "measured", "goal", "result", "how"], trows)
    lines += [
        "",
        "## Measurements",
        "",
        "Median of n runs; spread is min – max. "
        "Ratios compare medians with the baseline row of the same state, measured in the same run.",
        "",
    ]
    header = ["section", "state", "measure", "median", "unit", "spread", "n", "vs baseline"]
    lines += _table(header, [_row_cells(res, r) for r in res.rows])
    notes = [f"- {r.section} / {r.workload} / {r.measure}: {r.note}" for r in res.rows if r.note and r.status == "ok"]
    if notes:
        lines += ["", "## Notes", "", *notes]
    return "\n".join(lines) + "\n"


def to_json(res: Results) -> dict[str, Any]:
    """Machine-readable results: every sample, each ratio, each target."""
    rows = [asdict(r) | {"median": r.median, "ratio": res.ratio(r)} for r in res.rows]
    targets = [asdict(t) | {"met": t.met} for t in res.targets]
    return {"env": res.env, "rows": rows, "targets": targets}


_PANELS = [
    ("save throughput", "GB/s (higher is better)", False),
    ("training stall per save", "seconds (lower is better, log)", True),
    ("verification throughput", "GB/s (higher is better)", False),
    ("peak memory added", "MiB (lower is better, log)", True),
    ("resume discovery", "ms (lower is better, log)", True),
]


def chart(res: Results, path: Path) -> None:
    """One bar panel per section, bars per (state, measure), whiskers at min and max."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(_PANELS), 1, figsize=(11, 4.2 * len(_PANELS)))
    for ax, (section, ylabel, log) in zip(axes, _PANELS, strict=True):
        rows = [r for r in res.rows if r.section == section and r.samples]
        labels = [f"{r.workload}\n{r.measure}" for r in rows]
        med = [r.median or 0.0 for r in rows]
        err = [
            [m - min(r.samples) for m, r in zip(med, rows, strict=True)],
            [max(r.samples) - m for m, r in zip(med, rows, strict=True)],
        ]
        colors = ["tab:orange" if "ckptguard" in r.measure else "tab:gray" for r in rows]
        ax.bar(range(len(rows)), med, yerr=err, color=colors, capsize=3)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(section)
        ax.set_ylabel(ylabel)
        if log and any(m > 0 for m in med):
            ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write_outputs(res: Results, out: Path) -> None:
    """bench.md, bench.json and bench.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.md").write_text(markdown(res))
    (out / "bench.json").write_text(json.dumps(to_json(res), indent=1) + "\n")
    chart(res, out / "bench.png")
