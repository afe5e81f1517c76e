"""An A/B readout from attributed impressions: per-arm metrics, arm differences, SRM, CUPED and the
always-valid interval, over time. Pure pandas/numpy (no I/O); `service/ab_report.py` feeds and renders it.

Input rows are shown items (one per logged request and candidate) with the served `score`, its
`rank` in the request, and the attributed `outcome` (`service/core/attribution.py`). Only the top
`k` ranks of each request count as shown (what the client displays). Which rows enter a readout:
- hash-assigned only: an `X-Experiment` override is not randomised (counted, then left out);
- a user seen in more than one arm by the hash (the salt or the split changed mid-test) is left
  out whole (counted): no arm can claim their outcomes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from service.core import readout as rd
from service.core.ab import effective_weights

ROW_COLUMNS = (
    "log_id",
    "user_id",
    "variant",
    "assigned_by",
    "item_id",
    "ts",
    "score",
    "rank",
    "outcome",
    "outcome_ts",
)
PRIMARY = "user_rate"


@dataclass(frozen=True, slots=True)
class ReadoutConfig:
    """How a readout is computed."""

    k: int = 10  # ranks per request counted as shown
    control: str | None = None  # default: `coupled` when present, else the first arm by name
    alpha: float = 0.05  # intervals are (1 - alpha)
    n_boot: int = 1000  # bootstrap replicates (resampling users within each arm)
    seed: int = 0
    tau: float = 0.02  # mixing scale of the always-valid interval: the effect size it is tuned to
    srm_alpha: float = 0.001  # SRM fails below this p-value
    n_checkpoints: int = 20  # points of the cumulative series

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0 < self.alpha < 1 or not 0 < self.srm_alpha < 1:
            raise ValueError("alpha and srm_alpha must lie in (0, 1)")
        if self.n_boot < 10:
            raise ValueError(f"n_boot must be >= 10, got {self.n_boot}")
        if self.tau <= 0:
            raise ValueError(f"tau must be > 0, got {self.tau}")
        if self.n_checkpoints < 1:
            raise ValueError(f"n_checkpoints must be >= 1, got {self.n_checkpoints}")


@dataclass(frozen=True, slots=True)
class Estimate:
    """A value with its (1 - alpha) interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class ArmReadout:
    """One arm's outcomes: counts, and metrics with bootstrap intervals over users."""

    variant: str
    users: int
    requests: int
    shown: int  # items in the top k of its requests
    outcomes: int  # of those, items with an outcome
    user_rate: Estimate  # mean over users of each user's outcome rate at k (the primary metric)
    rate: Estimate  # outcomes / shown, pooled
    mrr: Estimate  # mean 1/rank of the best-ranked outcome, over requests with one
    auc: Estimate  # served scores against outcomes, shown items
    ne: Estimate  # log loss over the entropy of the arm's base rate
    calibration: Estimate  # mean predicted / observed rate


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    """The primary difference with the data known at time `ts`."""

    ts: int
    users: int
    diff: float
    low: float  # fixed-sample (Welch) interval: valid at one pre-planned look only
    high: float
    seq_low: float  # always-valid interval
    seq_high: float


@dataclass(frozen=True, slots=True)
class Comparison:
    """Treatment against control on the primary metric (and every metric by bootstrap)."""

    treatment: str
    control: str
    diff: float  # primary: user_rate(treatment) - user_rate(control)
    relative: float  # diff / user_rate(control)
    bootstrap: Estimate  # interval of the difference, users resampled within each arm
    welch: Estimate
    p_value: float  # Welch's two-sided test
    cuped: Estimate | None  # with each user's pre-period outcome rate as covariate
    cuped_p_value: float | None
    cuped_theta: float | None
    cuped_covered: float | None  # share of users with a pre-period rate
    variance_reduction: float | None  # 1 - var(adjusted) / var(plain)
    sequential: Estimate  # always-valid interval, at this look
    metrics: dict[str, Estimate]  # treatment - control for every arm metric, bootstrap intervals
    series: list[SeriesPoint]


@dataclass(frozen=True, slots=True)
class Exclusions:
    """Rows and users left out of the readout, and why."""

    header_requests: int
    header_users: int
    mixed_users: int  # hash-assigned to several arms
    mixed_requests: int


@dataclass(frozen=True, slots=True)
class Readout:
    """A whole readout (`dataclasses.asdict` gives the JSON report)."""

    config: ReadoutConfig
    start: int | None
    end: int | None
    arms: list[ArmReadout]
    comparisons: list[Comparison]
    srm: rd.Srm
    exclusions: Exclusions
    notes: list[str] = field(default_factory=list)


def check_rows(rows: pd.DataFrame) -> None:
    """Raise ValueError naming the columns a readout needs and `rows` lacks."""
    missing = [c for c in ROW_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"impression rows lack the column(s) {', '.join(missing)}")


def user_rates(rows: pd.DataFrame, k: int) -> pd.Series:
    """Each user's outcome rate over the items ranked within `k` (a CUPED covariate, for instance)."""
    top = rows[rows["rank"] <= k]
    grouped = top.groupby("user_id", sort=True)["outcome"]
    return (grouped.sum() / grouped.size()).astype(np.float64)


def eligible(rows: pd.DataFrame) -> tuple[pd.DataFrame, Exclusions]:
    """The hash-assigned rows of users seen in one arm only, and what was left out."""
    header = rows["assigned_by"] != "hash"
    hashed = rows[~header]
    arms_per_user = hashed.groupby("user_id")["variant"].nunique()
    mixed = arms_per_user.index[arms_per_user > 1]
    is_mixed = hashed["user_id"].isin(mixed)
    exclusions = Exclusions(
        header_requests=int(rows.loc[header, "log_id"].nunique()),
        header_users=int(rows.loc[header, "user_id"].nunique()),
        mixed_users=len(mixed),
        mixed_requests=int(hashed.loc[is_mixed, "log_id"].nunique()),
    )
    return hashed[~is_mixed], exclusions


@dataclass(frozen=True, slots=True, eq=False)
class _ArmData:
    """Per-user sums of one arm (aligned arrays) and its shown rows."""

    users: np.ndarray  # user ids
    shown: np.ndarray
    outcomes: np.ndarray
    pred: np.ndarray
    logloss: np.ndarray
    requests: np.ndarray
    clicked_requests: np.ndarray
    rr: np.ndarray
    row_user: np.ndarray  # index into `users` of each shown row
    row_score: np.ndarray
    row_outcome: np.ndarray


def _arm_data(top: pd.DataFrame) -> _ArmData:
    codes, users = pd.factorize(top["user_id"], sort=True)
    n = len(users)
    outcome = top["outcome"].to_numpy(np.float64)
    score = top["score"].to_numpy(np.float64)

    def per_user(values: np.ndarray, at: np.ndarray = codes) -> np.ndarray:
        return np.bincount(at, weights=values, minlength=n)

    req_codes, _ = pd.factorize(top["log_id"])
    n_req = int(req_codes.max()) + 1 if len(req_codes) else 0
    req_user = np.zeros(n_req, np.int64)
    req_user[req_codes] = codes
    best = np.full(n_req, np.inf)
    clicked = outcome > 0
    np.minimum.at(best, req_codes[clicked], top["rank"].to_numpy(np.float64)[clicked])
    has_click = np.isfinite(best)
    rr = np.where(has_click, 1.0 / np.where(has_click, best, 1.0), 0.0)
    return _ArmData(
        users=np.asarray(users, dtype=object),
        shown=per_user(np.ones(len(codes))),
        outcomes=per_user(outcome),
        pred=per_user(score),
        logloss=per_user(rd.logloss_terms(score, outcome)),
        requests=per_user(np.ones(n_req), req_user),
        clicked_requests=per_user(has_click.astype(np.float64), req_user),
        rr=per_user(rr, req_user),
        row_user=codes,
        row_score=score,
        row_outcome=outcome,
    )


_METRICS = ("user_rate", "rate", "mrr", "auc", "ne", "calibration")


def _replicates(d: _ArmData, counts: np.ndarray) -> dict[str, np.ndarray]:
    """Every arm metric for each row of user multiplicities `counts` [B, users]."""
    shown, outcomes = counts @ d.shown, counts @ d.outcomes
    return {
        "user_rate": rd.ratio(counts @ rd.ratio(d.outcomes, d.shown), counts.sum(axis=1)),
        "rate": rd.ratio(outcomes, shown),
        "mrr": rd.ratio(counts @ d.rr, counts @ d.clicked_requests),
        "auc": rd.auc_bootstrap(d.row_score, d.row_outcome, d.row_user, counts),
        "ne": rd.normalized_entropy(counts @ d.logloss, shown, outcomes),
        "calibration": rd.ratio(counts @ d.pred, outcomes),
    }


def _estimate(point: float, reps: np.ndarray, alpha: float) -> Estimate:
    low, high = rd.percentile_interval(reps, alpha)
    return Estimate(float(point), low, high)


def _choose_control(arms: list[str], control: str | None) -> str:
    if control is not None:
        if control not in arms:
            raise ValueError(
                f"control arm {control!r} has no eligible users; arms: {', '.join(arms) or 'none'}"
            )
        return control
    return "coupled" if "coupled" in arms else arms[0]


def analyse(
    rows: pd.DataFrame,
    *,
    weights: Mapping[str, float] | None = None,
    covariate: pd.Series | None = None,
    config: ReadoutConfig | None = None,
    start: int | None = None,
    end: int | None = None,
) -> Readout:
    """The readout of attributed impression rows (`ROW_COLUMNS`).

    `weights`: the configured split (None: equal over the arms seen), for the SRM check.
    `covariate`: each user's pre-period outcome rate (`user_rates` of the period before), for CUPED.
    """
    cfg = config or ReadoutConfig()
    check_rows(rows)
    kept, exclusions = eligible(rows)
    top = kept[kept["rank"] <= cfg.k]
    arms = sorted(top["variant"].unique().tolist())
    notes: list[str] = []
    if not arms:
        raise ValueError("no hash-assigned impressions in the period: nothing to read out")
    users_per_arm = {a: int(top.loc[top["variant"] == a, "user_id"].nunique()) for a in arms}
    split = dict(weights) if weights is not None else effective_weights(None, arms)
    srm = rd.srm_check(users_per_arm, split, cfg.srm_alpha)
    if not srm.passed:
        notes.append(
            "SRM failed: the users per arm do not match the configured split; distrust the differences"
        )
    rng = np.random.default_rng(cfg.seed)
    data = {a: _arm_data(top[top["variant"] == a]) for a in arms}
    reps = {a: _replicates(d, rd.bootstrap_counts(len(d.users), cfg.n_boot, rng)) for a, d in data.items()}
    points = {
        a: {m: float(v[0]) for m, v in _replicates(d, np.ones((1, len(d.users)))).items()}
        for a, d in data.items()
    }
    readouts = [
        ArmReadout(
            variant=a,
            users=len(d.users),
            requests=int(d.requests.sum()),
            shown=int(d.shown.sum()),
            outcomes=int(d.outcomes.sum()),
            **{m: _estimate(points[a][m], reps[a][m], cfg.alpha) for m in _METRICS},
        )
        for a, d in data.items()
    ]
    control = _choose_control(arms, cfg.control)
    comparisons = [
        _compare(t, control, data, points, reps, top, covariate, cfg) for t in arms if t != control
    ]
    if covariate is None:
        notes.append("no pre-period: CUPED not computed")
    return Readout(cfg, start, end, readouts, comparisons, srm, exclusions, notes)


def _user_values(d: _ArmData) -> np.ndarray:
    return rd.ratio(d.outcomes, d.shown)


def _compare(
    treatment: str,
    control: str,
    data: Mapping[str, _ArmData],
    points: Mapping[str, Mapping[str, float]],
    reps: Mapping[str, Mapping[str, np.ndarray]],
    top: pd.DataFrame,
    covariate: pd.Series | None,
    cfg: ReadoutConfig,
) -> Comparison:
    t, c = data[treatment], data[control]
    yt, yc = _user_values(t), _user_values(c)
    plain = rd.welch(yc, yt, cfg.alpha)
    metrics = {
        m: _estimate(
            points[treatment][m] - points[control][m], reps[treatment][m] - reps[control][m], cfg.alpha
        )
        for m in _METRICS
    }
    cuped_est = cuped_p = theta = covered = reduction = None
    if covariate is not None:
        users = np.concatenate([c.users, t.users])
        x = covariate.reindex(users)
        has_x = x.notna().to_numpy()
        y = np.concatenate([yc, yt])
        adj = rd.cuped(y, x.fillna(0.0).to_numpy(np.float64), has_x)
        adjusted = rd.welch(adj.adjusted[: len(yc)], adj.adjusted[len(yc) :], cfg.alpha)
        cuped_est = Estimate(adjusted.diff, adjusted.low, adjusted.high)
        cuped_p, theta, covered = adjusted.p_value, adj.theta, adj.covered
        # Within-arm variances: the adjustment removes covariate noise, not the treatment effect.
        plain_var = (
            yc.var(ddof=1) / len(yc) + yt.var(ddof=1) / len(yt) if min(len(yc), len(yt)) > 1 else np.nan
        )
        reduction = float(1 - adjusted.se**2 / plain_var) if plain_var > 0 else None
    half = rd.mixture_halfwidth(plain.se**2, cfg.alpha, cfg.tau)
    control_rate = points[control][PRIMARY]
    return Comparison(
        treatment=treatment,
        control=control,
        diff=plain.diff,
        relative=float(plain.diff / control_rate) if control_rate else float("nan"),
        bootstrap=metrics[PRIMARY],
        welch=Estimate(plain.diff, plain.low, plain.high),
        p_value=plain.p_value,
        cuped=cuped_est,
        cuped_p_value=cuped_p,
        cuped_theta=theta,
        cuped_covered=covered,
        variance_reduction=reduction,
        sequential=Estimate(plain.diff, plain.diff - half, plain.diff + half),
        metrics=metrics,
        series=_series(top, treatment, control, cfg),
    )


def _series(top: pd.DataFrame, treatment: str, control: str, cfg: ReadoutConfig) -> list[SeriesPoint]:
    """The primary difference at evenly spaced times, with what was known then (impressions logged
    and outcomes seen by that time)."""
    pair = top[top["variant"].isin([treatment, control])]
    ts = pair["ts"].to_numpy(np.int64)
    seen = pair["outcome_ts"].to_numpy(np.int64)
    outcome = pair["outcome"].to_numpy(np.float64)
    treated = (pair["variant"] == treatment).to_numpy()
    codes, _ = pd.factorize(pair["user_id"])
    out = []
    # Up to the last outcome too, so the last point is the readout itself.
    for t in rd.checkpoints(np.concatenate([ts, seen[seen >= 0]]), cfg.n_checkpoints):
        now = ts <= t
        known = outcome * (seen <= t)
        shown = np.bincount(codes[now], minlength=codes.max() + 1)
        hits = np.bincount(codes[now], weights=known[now], minlength=codes.max() + 1)
        arm = np.zeros(codes.max() + 1, bool)
        arm[codes[treated]] = True
        active = shown > 0
        rate = rd.ratio(hits, shown)
        test = rd.welch(rate[active & ~arm], rate[active & arm], cfg.alpha)
        half = rd.mixture_halfwidth(test.se**2, cfg.alpha, cfg.tau) if np.isfinite(test.se) else np.nan
        out.append(
            SeriesPoint(
                t, int(active.sum()), test.diff, test.low, test.high, test.diff - half, test.diff + half
            )
        )
    return out
