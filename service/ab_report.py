"""`dare-serve ab-report`: the log's impressions joined with the events that followed, read out per
arm, rendered as a table for people, JSON for machines and a PNG of the difference over time.

The statistics are in `service/core/experiment.py` and `service/core/readout.py`; the join in
`service/core/attribution.py`. This module selects the period, derives the CUPED covariate from
the period before, and renders.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pandas as pd

from service.core.attribution import AttributionSummary, attribute_frames
from service.core.experiment import Estimate, Readout, ReadoutConfig, analyse, user_rates


@dataclass(frozen=True, slots=True)
class ReportPlan:
    """What to read out: the period, the outcome and the attribution window, and the readout settings."""

    start: int | None = None  # seconds; impressions at or after (None: from the first)
    end: int | None = None  # seconds; impressions before (None: to the last)
    pre_period_s: int = 14 * 86_400  # the CUPED covariate: each user's outcome rate in [start - this, start)
    window_s: int = 3600
    outcome_type: str | None = "click"
    weights: dict[str, float] | None = None
    config: ReadoutConfig = dataclasses.field(default_factory=ReadoutConfig)

    def __post_init__(self) -> None:
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise ValueError(f"the period ends ({self.end}) before it starts ({self.start})")
        if self.window_s < 0 or self.pre_period_s < 0:
            raise ValueError("the window and the pre-period must be >= 0 seconds")


@dataclass(frozen=True, slots=True)
class Report:
    """A readout and what it was computed from."""

    plan: ReportPlan
    readout: Readout
    attribution: AttributionSummary
    pre_period_users: int  # users with a pre-period outcome rate (the CUPED covariate)


def covariate_file_rates(frame: pd.DataFrame) -> pd.Series:
    """Per-user pre-period rates from a table with `user_id` and `label` (a dataset's
    impressions.parquet) or `user_id` and `rate`."""
    column = "rate" if "rate" in frame.columns else "label" if "label" in frame.columns else None
    if "user_id" not in frame.columns or column is None:
        raise ValueError("a covariate table needs `user_id` and `label` (or `rate`) columns")
    return frame.groupby(frame["user_id"].astype(str))[column].mean().astype(np.float64)


def build_report(
    impressions: pd.DataFrame, events: pd.DataFrame, plan: ReportPlan, covariate: pd.Series | None = None
) -> Report:
    """Attribute the events, select the period and read it out (`covariate` overrides the pre-period)."""
    rows, summary = attribute_frames(
        impressions, events, window_s=plan.window_s, outcome_type=plan.outcome_type
    )
    ts = rows["ts"].to_numpy(np.int64)
    in_period = np.ones(len(rows), bool)
    if plan.start is not None:
        in_period &= ts >= plan.start
    if plan.end is not None:
        in_period &= ts < plan.end
    if covariate is None and plan.start is not None:
        before = rows[(ts < plan.start) & (ts >= plan.start - plan.pre_period_s)]
        covariate = user_rates(before, plan.config.k) if len(before) else None
    readout = analyse(
        rows[in_period],
        weights=plan.weights,
        covariate=covariate,
        config=plan.config,
        start=plan.start,
        end=plan.end,
    )
    return Report(plan, readout, summary, 0 if covariate is None else len(covariate))


def report_dict(report: Report) -> dict[str, Any]:
    """The report as plain data (the JSON output)."""
    return {
        "plan": dataclasses.asdict(report.plan),
        "attribution": dataclasses.asdict(report.attribution),
        "pre_period_users": report.pre_period_users,
        **dataclasses.asdict(report.readout),
    }


def report_json(report: Report) -> bytes:
    """The JSON report; NaN and infinities (a metric with no data) are null."""
    return orjson.dumps(report_dict(report), option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY)


def _num(x: float | None, digits: int = 4) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def _est(e: Estimate | None, digits: int = 4) -> str:
    if e is None:
        return "-"
    return f"{_num(e.value, digits)} [{_num(e.low, digits)}, {_num(e.high, digits)}]"


def _percent(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.0f}%"


def _when(ts: int | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_tables(report: Report) -> list[Any]:
    """rich renderables: the arms, the comparisons and the checks."""
    from rich.table import Table
    from rich.text import Text

    r, cfg = report.readout, report.readout.config
    level = f"{1 - cfg.alpha:.0%}"
    arms = Table(
        title=f"arms ({_when(r.start)} to {_when(r.end)}; top {cfg.k} per request; {level} intervals)"
    )
    for name in ("variant", "users", "requests", "shown", "outcomes", f"user rate@{cfg.k}", f"rate@{cfg.k}",
                 "MRR", "AUC", "NE", "calibration"):  # fmt: skip
        arms.add_column(name, justify="left" if name == "variant" else "right")
    for a in r.arms:
        arms.add_row(
            a.variant, str(a.users), str(a.requests), str(a.shown), str(a.outcomes),
            _est(a.user_rate), _est(a.rate), _est(a.mrr, 3), _est(a.auc, 3), _est(a.ne, 3),
            _est(a.calibration, 3),
        )  # fmt: skip
    comps = Table(title=f"treatment - control, user outcome rate@{cfg.k}")
    for name in ("treatment", "control", "diff", "relative", "bootstrap", "p", "CUPED", "CUPED p",
                 "var. reduction", "always-valid"):  # fmt: skip
        comps.add_column(name, justify="left" if name in ("treatment", "control") else "right")
    for c in r.comparisons:
        comps.add_row(
            c.treatment, c.control, _num(c.diff), f"{_num(100 * c.relative, 1)}%",
            f"[{_num(c.bootstrap.low)}, {_num(c.bootstrap.high)}]", _num(c.p_value, 4), _est(c.cuped),
            _num(c.cuped_p_value, 4), _percent(c.variance_reduction),
            f"[{_num(c.sequential.low)}, {_num(c.sequential.high)}]",
        )  # fmt: skip
    srm, ex = r.srm, r.exclusions
    expected = {k: round(v, 1) for k, v in srm.expected.items()}
    lines = [
        f"SRM {'passed' if srm.passed else 'FAILED'}: users {srm.observed} against expected {expected} "
        f"(chi2 {_num(srm.chi2, 2)}, p {_num(srm.p_value, 4)})",
        f"left out: {ex.header_requests} header-forced requests ({ex.header_users} users), "
        f"{ex.mixed_users} users seen in several arms ({ex.mixed_requests} requests)",
        f"events: {report.attribution.events} of type {report.plan.outcome_type or 'any'} "
        f"({report.attribution.attributed} attributed within {report.plan.window_s}s, "
        f"{report.attribution.unattributed} with no impression, {report.attribution.duplicates} duplicates); "
        f"{report.pre_period_users} users with a pre-period rate",
        *r.notes,
    ]
    return [arms, comps, Text("\n".join(lines), style="" if srm.passed else "bold red")]


def plot_series(report: Report, path: Path) -> Path:
    """A PNG of each comparison's cumulative difference over time with both intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, cfg = report.readout, report.readout.config
    comps = r.comparisons or []
    fig, axes = plt.subplots(max(1, len(comps)), 1, figsize=(8, 3.6 * max(1, len(comps))), squeeze=False)
    for ax, c in zip(axes[:, 0], comps, strict=False):
        times = [datetime.fromtimestamp(p.ts, UTC) for p in c.series]
        diff = np.array([p.diff for p in c.series], dtype=np.float64)
        ax.fill_between(times, [p.low for p in c.series], [p.high for p in c.series], alpha=0.3,
                        label=f"{1 - cfg.alpha:.0%} fixed-sample (one look)")  # fmt: skip
        ax.plot(times, [p.seq_low for p in c.series], "--", color="tab:red", linewidth=1,
                label=f"{1 - cfg.alpha:.0%} always-valid")  # fmt: skip
        ax.plot(times, [p.seq_high for p in c.series], "--", color="tab:red", linewidth=1)
        ax.plot(times, diff, marker="o", markersize=3, color="tab:blue", label="difference")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_title(f"{c.treatment} - {c.control}: user outcome rate@{cfg.k}, cumulative")
        ax.set_ylabel("difference")
        ax.legend(loc="best", fontsize=8)
        fig.autofmt_xdate()
    if not comps:
        axes[0, 0].text(0.5, 0.5, "one arm only: nothing to compare", ha="center", va="center")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
