"""Training: `dare-serve train` for the `dare`, `coupled` and `fm` models, with time-split evaluation.

Every impression is scored from the user's events strictly before it (see `exporters.samples`).
Early stopping watches validation AUC; the best epoch's weights are exported. One JSON line of
results goes to stdout: test AUC / GAUC / logloss, a popularity baseline on the same split, the
stage-1 retrieval quality (when the dataset carries the generator's related-behavior truth), the
training time and the bundle path.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from exporters.bundle import Bundle, item_rows, load_bundle
from exporters.dataset import Dataset, read_dataset
from exporters.export import export_fm, export_ranker
from exporters.features import time_buckets
from exporters.metrics import auc, gauc, logloss
from exporters.models import FmConfig, FoundationModel, RankerConfig, TwoStageRanker
from exporters.samples import ItemVocab, Samples, build_samples, gather_histories, related_positions

TRAIN, VALID, TEST = 0, 1, 2


@dataclass
class TrainConfig:
    """Everything `dare-serve train` needs; defaults train the default synthetic data in minutes."""

    data: Path
    model: Literal["dare", "coupled", "fm"]
    out: Path
    variant: str | None = None
    fm_bundle: Path | None = None
    seed: int = 0
    epochs: int = 6
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-6
    attention_dim: int = 16
    representation_dim: int = 64
    top_k: int = 64
    max_seq_len: int = 2000
    fm_dim: int = 32
    fm_hidden: int = 64
    fm_dropout: float = 0.3
    item_dropout: float = 0.5
    patience: int = 2
    max_train_samples: int | None = None
    progress: bool = True


@dataclass
class Batch:
    """Padded histories of a set of impressions, as tensors."""

    target: torch.Tensor
    hist_rows: torch.Tensor
    hist_buckets: torch.Tensor
    hist_mask: torch.Tensor
    label: torch.Tensor
    fm: torch.Tensor | None = None
    fm_present: torch.Tensor | None = None


def history_arrays(
    s: Samples, idx: np.ndarray, max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Padded histories of impressions idx (at least one column): rows, buckets, mask, start positions."""
    rows, ts, lengths = gather_histories(s, idx, max_len)
    if rows.shape[1] == 0:
        rows, ts = np.zeros((len(idx), 1), np.int64), np.zeros((len(idx), 1), np.int64)
    mask = np.arange(rows.shape[1])[None, :] < lengths[:, None]
    buckets = np.where(mask, time_buckets(s.target_ts[idx][:, None] - ts), 0)
    return rows, buckets, mask, s.hist_end[idx] - lengths


def make_batch(
    s: Samples, idx: np.ndarray, fm: np.ndarray | None = None, fm_present: np.ndarray | None = None
) -> Batch:
    rows, buckets, mask, _ = history_arrays(s, idx)
    batch = Batch(
        torch.from_numpy(s.target_row[idx]),
        torch.from_numpy(rows),
        torch.from_numpy(buckets),
        torch.from_numpy(mask),
        torch.from_numpy(s.label[idx].astype(np.float32)),
    )
    if fm is not None and fm_present is not None:
        batch.fm = torch.from_numpy(fm[idx])
        batch.fm_present = torch.from_numpy(fm_present[idx])
    return batch


def length_batches(
    s: Samples, idx: np.ndarray, batch_size: int, rng: np.random.Generator | None
) -> list[np.ndarray]:
    """Batches of similar history length (less padding); shuffled when rng is given."""
    idx = rng.permutation(idx) if rng is not None else idx
    lengths = s.hist_end[idx] - s.hist_start[idx]
    chunk = batch_size * 32
    batches: list[np.ndarray] = []
    for a in range(0, len(idx), chunk):
        part = idx[a : a + chunk]
        part = part[np.argsort(lengths[a : a + chunk], kind="stable")]
        batches += [part[b : b + batch_size] for b in range(0, len(part), batch_size)]
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def fm_embeddings(
    fm_bundle: Bundle, s: Samples, raw_event_items: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """FM user embedding of every impression from its history (strictly before it), via ONNX Runtime."""
    fm_rows = item_rows(fm_bundle.item_ids, raw_event_items)
    view = dataclasses.replace(s, event_rows=fm_rows)
    out = np.zeros((len(s.label), fm_bundle.manifest.dims.fm), dtype=np.float32)
    max_len = fm_bundle.manifest.max_seq_len
    for idx in length_batches(s, np.arange(len(s.label)), batch_size, None):
        rows, buckets, mask, _ = history_arrays(view, idx, max_len)
        out[idx] = fm_bundle.session.run(
            None, {"behaviors": rows, "buckets": buckets, "mask": mask.astype(np.float32)}
        )[0]
    return out


def popularity_scores(ds: Dataset, s: Samples) -> np.ndarray:
    """Log count of each target's events strictly before the impression, over all users."""
    ev_items = ds.events["item_id"].to_numpy(np.int64)
    imp_items = ds.impressions["item_id"].to_numpy(np.int64)[s.impression_id]
    _, ranks = np.unique(np.r_[ev_items, imp_items], return_inverse=True)
    # one sortable key per (item, time): item rank in the high bits, seconds in the low 32
    ev_key = (ranks[: len(ev_items)].astype(np.int64) << 32) | np.clip(
        ds.events["timestamp"].to_numpy(np.int64), 0, 2**32 - 1
    )
    imp_rank = ranks[len(ev_items) :].astype(np.int64) << 32
    imp_key = imp_rank | np.clip(s.target_ts, 0, 2**32 - 1)
    ev_key.sort()
    counts = np.searchsorted(ev_key, imp_key, side="left") - np.searchsorted(ev_key, imp_rank, side="left")
    return np.log1p(counts).astype(np.float64)


def _fit_logistic(x: np.ndarray, y: np.ndarray, steps: int = 50) -> tuple[float, float]:
    """One-feature logistic regression by Newton's method (for calibrated baseline logloss)."""
    w = np.zeros(2)
    xb = np.stack([np.ones_like(x), x], axis=1)
    for _ in range(steps):
        p = 1 / (1 + np.exp(-xb @ w))
        grad = xb.T @ (p - y)
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + 1e-6 * np.eye(2)
        w -= np.linalg.solve(hess, grad)
    return float(w[0]), float(w[1])


def evaluate(labels: np.ndarray, probs: np.ndarray, users: np.ndarray) -> dict[str, float]:
    return {"auc": auc(labels, probs), "gauc": gauc(users, labels, probs), "logloss": logloss(labels, probs)}


def retrieval_quality(
    ranker: TwoStageRanker,
    s: Samples,
    idx: np.ndarray,
    related: tuple[np.ndarray, np.ndarray],
    batch_size: int,
) -> dict[str, float]:
    """Share of stage-1 top-K behaviors that are truly related, against the share in the history."""
    indptr, rel_pos = related
    k = ranker.cfg.top_k
    prec, base, recall, prec_long, base_long = [], [], [], [], []
    ranker.eval()
    with torch.no_grad():
        for bidx in length_batches(s, idx, batch_size, None):
            rows, buckets, mask, start = history_arrays(s, bidx)
            top = ranker.search(
                torch.from_numpy(s.target_row[bidx]),
                torch.from_numpy(rows),
                torch.from_numpy(buckets),
                torch.from_numpy(mask),
            ).numpy()
            for j, i in enumerate(bidx):
                n_hist = int(s.hist_end[i] - s.hist_start[i])
                if n_hist == 0:
                    continue
                rel = rel_pos[indptr[i] : indptr[i + 1]]
                rel = rel[(rel >= s.hist_start[i]) & (rel < s.hist_end[i])]
                chosen = start[j] + top[j][: min(k, n_hist)]
                hits = np.isin(chosen, rel).sum()
                p, b = hits / len(chosen), len(rel) / n_hist
                prec.append(p)
                base.append(b)
                if len(rel):
                    recall.append(hits / min(len(rel), len(chosen)))
                if n_hist > k:
                    prec_long.append(p)
                    base_long.append(b)
    mean = lambda v: float(np.mean(v)) if v else float("nan")  # noqa: E731
    return {
        "precision_at_k": mean(prec),
        "base_rate": mean(base),
        "recall_at_k": mean(recall),
        "precision_at_k_long": mean(prec_long),
        "base_rate_long": mean(base_long),
        "lift_long": mean(prec_long) / mean(base_long) if base_long and mean(base_long) > 0 else float("nan"),
        "n_long": len(prec_long),
        "k": k,
    }


def _predict(
    model: torch.nn.Module,
    s: Samples,
    idx: np.ndarray,
    batch_size: int,
    fm: np.ndarray | None,
    fm_present: np.ndarray | None,
) -> np.ndarray:
    out = np.zeros(len(idx), dtype=np.float64)
    where = {int(v): j for j, v in enumerate(idx)}
    model.eval()
    with torch.no_grad():
        for bidx in length_batches(s, idx, batch_size, None):
            logits = _forward(model, make_batch(s, bidx, fm, fm_present))
            out[[where[int(v)] for v in bidx]] = torch.sigmoid(logits).numpy()
    return out


def _forward(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    if isinstance(model, FoundationModel):
        return model(b.target, b.hist_rows, b.hist_buckets, b.hist_mask)
    logit, _ = model(b.target, b.hist_rows, b.hist_buckets, b.hist_mask, b.fm, b.fm_present)
    return logit


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate on the test split, export a bundle; returns the results line as a dict."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    ds = read_dataset(cfg.data)
    vocab = ItemVocab.from_dataset(ds)
    s = build_samples(ds, vocab, cfg.max_seq_len)
    train_idx = np.flatnonzero(s.split == TRAIN)
    if cfg.max_train_samples is not None and len(train_idx) > cfg.max_train_samples:
        train_idx = np.sort(rng.choice(train_idx, cfg.max_train_samples, replace=False))
    valid_idx, test_idx = np.flatnonzero(s.split == VALID), np.flatnonzero(s.split == TEST)
    if min(len(train_idx), len(valid_idx), len(test_idx)) == 0:
        raise ValueError(
            f"{cfg.data}: split left an empty part (train {len(train_idx)}, "
            f"valid {len(valid_idx)}, test {len(test_idx)})"
        )
    log = _logger(cfg.progress)
    log(
        f"{cfg.model}: {len(train_idx)} train / {len(valid_idx)} valid / {len(test_idx)} test impressions, "
        f"{vocab.n_rows} item rows, {vocab.n_categories} categories"
    )

    fm_arr = fm_present = None
    fm_version = None
    model: torch.nn.Module
    if cfg.model == "fm":
        model = FoundationModel(
            FmConfig(vocab.n_rows, vocab.n_categories, dim=cfg.fm_hidden, fm_dim=cfg.fm_dim),
            vocab.row_category,
        )
    else:
        fm_dim = 0
        if cfg.fm_bundle is not None:
            fm_bundle = load_bundle(cfg.fm_bundle)
            if fm_bundle.manifest.model != "fm":
                raise ValueError(f"{cfg.fm_bundle} is a {fm_bundle.manifest.model} bundle, not fm")
            fm_version = fm_bundle.manifest.tag
            fm_dim = fm_bundle.manifest.dims.fm
            raw_items = vocab.item_ids[s.event_rows]
            fm_arr = fm_embeddings(fm_bundle, s, raw_items)
            fm_present = np.ones(len(s.label), dtype=np.float32)
            log(f"FM embeddings from {fm_version} for {len(s.label)} impressions")
        rcfg = RankerConfig(
            cfg.model,
            vocab.n_rows,
            vocab.n_categories,
            cfg.attention_dim,
            cfg.representation_dim,
            cfg.top_k,
            fm_dim,
            item_dropout=cfg.item_dropout,
        )
        model = TwoStageRanker(rcfg, vocab.row_category)

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    best_auc, best_state, best_epoch, stale = -1.0, None, 0, 0
    history = []
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        batches = length_batches(s, train_idx, cfg.batch_size, rng)
        bar = tqdm(
            batches,
            desc=f"{cfg.model} epoch {epoch}",
            file=sys.stderr,
            disable=not cfg.progress,
            leave=False,
            dynamic_ncols=True,
            mininterval=2.0,
        )
        total = 0.0
        for bidx in bar:
            present = None
            if fm_present is not None:
                # FM dropout: the ranker must still score well when the cached embedding is missing
                present = fm_present.copy()
                present[bidx] = (rng.random(len(bidx)) >= cfg.fm_dropout).astype(np.float32)
            batch = make_batch(s, bidx, fm_arr, present)
            loss = loss_fn(_forward(model, batch), batch.label)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(bidx)
            bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        probs = _predict(model, s, valid_idx, cfg.batch_size * 2, fm_arr, fm_present)
        val = auc(s.label[valid_idx], probs)
        history.append({"epoch": epoch, "train_loss": total / len(train_idx), "valid_auc": val})
        log(f"epoch {epoch}: train loss {total / len(train_idx):.4f}, valid AUC {val:.4f}")
        if val > best_auc + 1e-5:
            best_auc, best_epoch, stale = val, epoch, 0
            best_state = copy.deepcopy(model.state_dict())
        else:
            stale += 1
            if stale >= cfg.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    train_seconds = time.time() - t0

    probs = _predict(model, s, test_idx, cfg.batch_size * 2, fm_arr, fm_present)
    users = s.user_index[test_idx]
    metrics: dict[str, Any] = evaluate(s.label[test_idx], probs, users)
    metrics["valid_auc"] = best_auc
    metrics["n_test"] = int(len(test_idx))
    if fm_arr is not None:
        # the same test split scored as if every FM embedding were missing (cold FM cache)
        no_fm = _predict(model, s, test_idx, cfg.batch_size * 2, fm_arr, np.zeros_like(fm_present))
        metrics["fm_missing"] = evaluate(s.label[test_idx], no_fm, users)
    pop = popularity_scores(ds, s)
    a, b = _fit_logistic(pop[train_idx], s.label[train_idx].astype(np.float64))
    pop_probs = 1 / (1 + np.exp(-(a + b * pop[test_idx])))
    metrics["popularity"] = evaluate(s.label[test_idx], pop_probs, users)
    related = related_positions(ds, s, vocab)
    if related is not None and isinstance(model, TwoStageRanker):
        metrics["retrieval"] = retrieval_quality(model, s, test_idx, related, cfg.batch_size * 2)

    metrics = nan_to_none(metrics)
    variant = cfg.variant or cfg.model
    extra = {
        "training": {
            "seed": cfg.seed,
            "best_epoch": best_epoch,
            "epochs_run": len(history),
            "seconds": round(train_seconds, 1),
            "history": history,
            "data": str(cfg.data),
            "n_train": int(len(train_idx)),
            "config": _jsonable(asdict(cfg)),
        }
    }
    if isinstance(model, FoundationModel):
        path = export_fm(model, cfg.out, variant, vocab.item_ids, cfg.max_seq_len, metrics, extra)
    else:
        path = export_ranker(
            model, cfg.out, variant, vocab.item_ids, cfg.max_seq_len, metrics, fm_version, extra
        )
    size = sum(f.stat().st_size for f in path.iterdir())
    return {
        "model": cfg.model,
        "variant": variant,
        "version": path.name,
        "bundle": str(path),
        "auc": metrics["auc"],
        "gauc": metrics["gauc"],
        "logloss": metrics["logloss"],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "best_epoch": best_epoch,
        "bundle_bytes": size,
        "fm_version": fm_version,
        "metrics": metrics,
    }


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _logger(enabled: bool):
    def log(msg: str) -> None:
        if enabled:
            tqdm.write(msg, file=sys.stderr)

    return log


def nan_to_none(obj: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, float NaN to null, recursively."""
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [nan_to_none(v) for v in obj]
    return obj
