"""Training: `dare-serve train` for the `dare`, `coupled` and `fm` models, with time-split evaluation.

Every impression is scored from the user's events strictly before it (see `exporters.samples`).
Early stopping watches validation AUC and logloss; the best-AUC epoch's weights are kept, and a
Platt scaling fitted on the validation split is folded into the head's last layer, so the exported
graph's outputs are calibrated probabilities with no extra node. One JSON line of results goes to
stdout: test AUC / GAUC / logloss / normalized entropy / calibration, a popularity baseline on the
same split, the stage-1 retrieval quality (when the dataset carries the generator's related-behavior
truth), the training time and the bundle path.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from scipy.special import expit
from tqdm import tqdm

from exporters.bundle import Bundle, item_rows, load_bundle
from exporters.dataset import Dataset, lookup, read_dataset
from exporters.distributed import World, average_gradients, close_world, gather_parts, init_world
from exporters.export import export_fm, export_ranker
from exporters.features import time_buckets
from exporters.fm_history import (
    ENCODER_FILE,
    HistoryEncoder,
    HistoryJoin,
    PcaEncoder,
    fit_rows,
    history_entries,
    join_history,
    load_encoder,
    served_vectors,
)
from exporters.item_vectors import ItemVectors, category_table, learn_item_vectors, visible_events
from exporters.metrics import auc, calibration_bins, calibration_ratio, gauc, logloss, normalized_entropy
from exporters.models import ByteDropout, FmConfig, FoundationModel, RankerConfig, TwoStageRanker
from exporters.retrieval import MiTable, csr_take, mi_ndcg, planted_metrics
from exporters.row_adam import RowAdam
from exporters.samples import ItemVocab, Samples, build_samples, gather_histories, related_positions

TRAIN, VALID, TEST = 0, 1, 2
# From this many item rows the tables get sparse gradients and the row-wise Adam (TrainConfig.
# sparse_tables). Measured on 2 cores (dare, batch 256): at 40 k rows both ran at ~9.2 k impressions/s;
# at 429 k rows the dense step fell to 1.9 k/s and the sparse one held 8.0 k/s.
SPARSE_TABLES_ROWS = 1 << 16


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
    # self-supervised item vectors from the event stream initialise the embedding tables
    pretrain: bool = True
    item_vectors: Path | None = None  # reuse a `dare-serve pretrain` file instead of learning one
    pretrain_dim: int = 64
    pretrain_window: int = 20
    attention_init_norm: float = 1.0
    representation_init_norm: float = 1.0
    # auxiliary in-batch contrastive loss that keeps the attention table arranged by co-occurrence
    aux_weight: float = 0.1
    aux_window: int = 20
    aux_anchors: int = 2
    # only to reproduce older trainings in ablations: L2 on the embedding tables too
    decay_embeddings: bool = False
    # Platt scaling on the validation split, folded into the exported head (no extra graph node)
    calibrate: bool = True
    # L2 on the item representation rows a batch touches (DIN's mini-batch-aware regularisation,
    # without its frequency weights): unlike weight decay it never shrinks the rows a batch does not
    # use. Off: at 1e-4 and 1e-3 it cost AUC without delaying the overfitting (docs/models.md)
    embedding_l2: float = 0.0
    # the ranker's direct time-bucket bias and its recency prior, and stage 2's learned attention gain
    # (models.RankerConfig); off by default until measured over seeds on every dataset
    recency_prior: float | None = None
    stage2_gain: bool = False
    stage2_gain_init: float = 1.0
    # stage 1 always keeps this many newest behaviors (models.RankerConfig.recent_k)
    recent_k: int = 0
    # a short-term branch over the newest of those (models.RankerConfig.short_term)
    short_term: int = 0
    # where training runs: auto (CUDA when present), cpu, cuda
    device: str = "auto"
    # item tables with sparse row gradients and a row-wise (lazy) Adam: a step then costs the same at
    # any catalogue size. None: on from SPARSE_TABLES_ROWS item rows, where the dense step dominates
    sparse_tables: bool | None = None
    # LoopFM's history channel (needs fm_bundle; exporters.fm_history): each impression's newest
    # `fm_history` entries written before it, a target attention in the ranker. 0: none
    fm_history: int = 0
    fm_history_dim: int | None = None  # the Matryoshka prefix d' read (None: all the encoder's dims)
    fm_history_encoding: Literal["fp32", "int8", "int4"] = "int4"  # how entries are stored
    fm_history_at: Literal["impressions", "events"] = "impressions"  # entries at past impressions, or events
    fm_history_stride: int = 1  # with "events": an entry after every stride-th event
    fm_history_lag_s: int = 0  # an entry is readable this many seconds after its time
    fm_history_dropout: float = 0.3  # share of training impressions seen without their entries
    fm_history_encoder: Path | None = None  # reuse an encoder (a file, or a bundle that has one)
    # with fm_bundle: the cached FM user embedding is an input too (off: the FM history alone)
    fm_vector: bool = True


@dataclass
class EarlyStopping:
    """Watches the validation AUC and logloss after each epoch.

    The kept weights are those of the best AUC (ranking is the ranker's job; the probabilities are
    calibrated afterwards). Training stops when either metric has gone `patience` epochs without
    improving: logloss usually turns first, as the free embedding rows start to memorise and the
    scores grow overconfident, and AUC follows an epoch or two later.
    """

    patience: int
    min_delta: float = 1e-5
    best_auc: float = -math.inf
    best_logloss: float = math.inf
    best_epoch: int = 0
    auc_stale: int = 0
    logloss_stale: int = 0
    stopped_by: str = "epochs"

    def update(self, epoch: int, valid_auc: float, valid_logloss: float) -> bool:
        """Records an epoch; True when its weights are the new best to keep."""
        improved = valid_auc > self.best_auc + self.min_delta
        if improved:
            self.best_auc, self.best_epoch, self.auc_stale = valid_auc, epoch, 0
        else:
            self.auc_stale += 1
        if valid_logloss < self.best_logloss - self.min_delta:
            self.best_logloss, self.logloss_stale = valid_logloss, 0
        else:
            self.logloss_stale += 1
        if self.auc_stale >= self.patience:
            self.stopped_by = "valid_auc"
        elif self.logloss_stale >= self.patience:
            self.stopped_by = "valid_logloss"
        return improved

    @property
    def stop(self) -> bool:
        return self.stopped_by != "epochs"


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
    fm_history: torch.Tensor | None = None
    fm_history_mask: torch.Tensor | None = None

    def to(self, device: torch.device) -> Batch:
        if device.type == "cpu":
            return self

        def move(t: torch.Tensor) -> torch.Tensor:
            # pinned host memory lets the copy overlap the previous step's kernels
            return t.pin_memory().to(device, non_blocking=True)

        return Batch(
            move(self.target),
            move(self.hist_rows),
            move(self.hist_buckets),
            move(self.hist_mask),
            move(self.label),
            None if self.fm is None else move(self.fm),
            None if self.fm_present is None else move(self.fm_present),
            None if self.fm_history is None else move(self.fm_history),
            None if self.fm_history_mask is None else move(self.fm_history_mask),
        )


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
    s: Samples,
    idx: np.ndarray,
    fm: np.ndarray | None = None,
    fm_present: np.ndarray | None = None,
    fm_history: HistoryJoin | None = None,
    history_keep: np.ndarray | None = None,
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
    if fm_history is not None:
        entries, mask = fm_history.batch(idx, history_keep)
        batch.fm_history, batch.fm_history_mask = torch.from_numpy(entries), torch.from_numpy(mask)
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
        p = expit(xb @ w)
        grad = xb.T @ (p - y)
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + 1e-6 * np.eye(2)
        w -= np.linalg.solve(hess, grad)
    return float(w[0]), float(w[1])


def evaluate(labels: np.ndarray, probs: np.ndarray, users: np.ndarray, bins: bool = False) -> dict[str, Any]:
    """Ranking (AUC, GAUC) and probability quality (logloss, NE, calibration ratio) of one scoring;
    with `bins`, the reliability table by decile of prediction too."""
    out: dict[str, Any] = {
        "auc": auc(labels, probs),
        "gauc": gauc(users, labels, probs),
        "logloss": logloss(labels, probs),
        "ne": normalized_entropy(labels, probs),
        "calibration": calibration_ratio(labels, probs),
    }
    if bins:
        out["calibration_deciles"] = calibration_bins(labels, probs)
    return out


def fold_platt(model: torch.nn.Module, a: float, c: float) -> None:
    """Makes the model's logit `a * logit + c` by rescaling the head's last linear layer, so the
    exported graph computes the calibrated probability with the same nodes as before."""
    head = model.get_submodule("head")
    last = head[-1] if isinstance(head, torch.nn.Sequential) else head
    if not isinstance(last, torch.nn.Linear):
        raise TypeError(f"the head must end with nn.Linear, found {type(last).__name__}")
    with torch.no_grad():
        last.weight.mul_(a)
        last.bias.mul_(a).add_(c)


def stage1_topk(ranker: TwoStageRanker, s: Samples, idx: np.ndarray, batch_size: int) -> np.ndarray:
    """[len(idx), K] stage-1 history indices (oldest behavior = 0) of impressions idx, best first;
    -1 where a history has fewer than K behaviors."""
    k = ranker.cfg.top_k
    out = np.full((len(idx), k), -1, dtype=np.int64)
    # each impression's place in idx, found for a whole batch at once
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
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
            # positions into the padded window -> history indices; padding stays out of range
            n_hist = s.hist_end[bidx] - s.hist_start[bidx]
            hist_index = top + (start - s.hist_start[bidx])[:, None]
            hist_index = np.where(top < (n_hist - (start - s.hist_start[bidx]))[:, None], hist_index, -1)
            out[lookup(sorted_idx, order, bidx), : top.shape[1]] = hist_index
    return out


def attention_report(
    ranker: TwoStageRanker,
    s: Samples,
    idx: np.ndarray,
    batch_size: int,
    related: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, float]:
    """How peaked stage 2's attention is on impressions idx: the effective number of behaviors
    attended, exp(entropy of the weights), against the number retrieved (equal: mean pooling).

    With the planted truth (`related`: CSR over impressions of related event positions), also where
    the attention goes: its mean mass on related behaviors against the related share of the
    retrieved set (equal: attention no better than pooling at telling them apart).
    """
    effective, retrieved, on_related, share_related = [], [], [], []
    ranker.eval()
    with torch.no_grad():
        for bidx in length_batches(s, idx, batch_size, None):
            rows, buckets, hmask, start = history_arrays(s, bidx)
            target = torch.from_numpy(s.target_row[bidx])
            hist_rows, hist_buckets = torch.from_numpy(rows), torch.from_numpy(buckets)
            hist_mask = torch.from_numpy(hmask)
            top = ranker.search(target, hist_rows, hist_buckets, hist_mask)
            mask = torch.gather(hist_mask, 1, top)
            fm = torch.zeros(len(bidx), ranker.cfg.fm_dim) if ranker.cfg.fm_dim else None
            present = torch.zeros(len(bidx)) if ranker.cfg.fm_dim else None
            _, w = ranker.stage2(
                target,
                torch.gather(hist_rows, 1, top),
                torch.gather(hist_buckets, 1, top),
                mask,
                fm,
                present,
            )
            ent = -(w * torch.log(w.clamp_min(1e-30))).sum(1)
            keep = (mask.sum(1) > 0).numpy()
            effective.append(torch.exp(ent).numpy()[keep])
            retrieved.append(mask.sum(1).double().numpy()[keep])
            if related is not None:
                is_related = slot_is_related(related, bidx, start[:, None] + top.numpy()) & mask.numpy()
                on_related.append((w.double().numpy() * is_related).sum(1)[keep])
                share_related.append(is_related.sum(1)[keep] / retrieved[-1])
    eff, n = np.concatenate(effective), np.concatenate(retrieved)
    report = {
        "effective_behaviors": float(eff.mean()) if len(eff) else float("nan"),
        "retrieved_behaviors": float(n.mean()) if len(n) else float("nan"),
        "effective_share": float((eff / n).mean()) if len(n) else float("nan"),
    }
    if related is not None:
        mass, share = np.concatenate(on_related), np.concatenate(share_related)
        report["related_attention"] = float(mass.mean()) if len(mass) else float("nan")
        report["related_retrieved"] = float(share.mean()) if len(share) else float("nan")
    return report


def slot_is_related(
    related: tuple[np.ndarray, np.ndarray], idx: np.ndarray, events: np.ndarray
) -> np.ndarray:
    """[N, k] bool: whether the event at each slot's position in `events` [N, k] (absolute positions in
    the samples' event arrays) is one of impression idx[i]'s related events."""
    indptr, positions = related
    counts = indptr[idx + 1] - indptr[idx]
    owner = np.repeat(np.arange(len(idx), dtype=np.int64), counts)
    wanted = csr_take(indptr, positions, idx)[1]
    stride = int(max(events.max(initial=0), wanted.max(initial=0))) + 1
    slots = np.arange(len(idx), dtype=np.int64)[:, None] * stride + events
    return np.isin(slots, owner * stride + wanted)


def retrieval_report(
    ranker: TwoStageRanker,
    s: Samples,
    vocab: ItemVocab,
    train_idx: np.ndarray,
    test_idx: np.ndarray,
    related: tuple[np.ndarray, np.ndarray] | None,
    batch_size: int,
) -> dict[str, Any]:
    """Stage-1 retrieval quality on the test split: against the planted truth when the dataset has it,
    and on any dataset the DARE paper's mutual-information ground truth (docs/retrieval.md)."""
    k = ranker.cfg.top_k
    top = stage1_topk(ranker, s, test_idx, batch_size)
    hist_len = s.hist_end[test_idx] - s.hist_start[test_idx]
    report: dict[str, Any] = {}
    if related is not None:
        ip, pos = csr_take(*related, test_idx, offsets=s.hist_start[test_idx])
        report["planted"] = planted_metrics(hist_len, top, ip, pos, k)
    ev_cat = vocab.row_category[s.event_rows]
    tgt_cat = vocab.row_category[s.target_row]
    table = MiTable.fit(
        tgt_cat[train_idx], s.label[train_idx], ev_cat, s.hist_start[train_idx], s.hist_end[train_idx]
    )
    report["mi_ndcg"] = {
        **mi_ndcg(table, tgt_cat[test_idx], ev_cat, s.hist_start[test_idx], s.hist_end[test_idx], top, k),
        **table.summary(),
    }
    return report


def samples_vectors(s: Samples, vocab: ItemVocab, dim: int, window: int, seed: int) -> ItemVectors:
    """Item vectors from the events a training run may see: per user, those before its first
    validation or test impression."""
    visible = visible_events(s.event_user, s.event_ts, s.user_index, s.target_ts, s.split != TRAIN)
    raw = vocab.item_ids[s.event_rows]
    return learn_item_vectors(s.event_user[visible], raw[visible], dim, window, seed)


def learn_dataset_vectors(data: Path, dim: int, window: int, seed: int) -> ItemVectors:
    """`dare-serve pretrain`: the item vectors `train` would learn for this dataset."""
    ds = read_dataset(data)
    vocab = ItemVocab.from_dataset(ds)
    return samples_vectors(build_samples(ds, vocab, 1), vocab, dim, window, seed)


def item_vectors_for(cfg: TrainConfig, s: Samples, vocab: ItemVocab) -> ItemVectors | None:
    """The self-supervised item vectors this run starts from: a given file, freshly learned, or none."""
    if cfg.item_vectors is not None:
        return ItemVectors.load(cfg.item_vectors)
    if not cfg.pretrain:
        return None
    dim = max(cfg.pretrain_dim, cfg.attention_dim, cfg.representation_dim, cfg.fm_hidden)
    return samples_vectors(s, vocab, dim, cfg.pretrain_window, cfg.seed)


def _copy_rows(emb: torch.nn.Embedding, table: np.ndarray) -> None:
    """Rows of `table` that hold a vector replace the random init; the others keep it."""
    has = np.flatnonzero(np.linalg.norm(table, axis=1) > 0)
    with torch.no_grad():
        emb.weight[torch.from_numpy(has)] = torch.from_numpy(table[has])


def init_embeddings(model: torch.nn.Module, vectors: ItemVectors, vocab: ItemVocab, cfg: TrainConfig) -> None:
    """Item and category tables from the self-supervised vectors (time tables keep their init)."""
    ids, cats, n_cat = vocab.item_ids, vocab.row_category, vocab.n_categories

    def fill(item: torch.nn.Embedding, cat: torch.nn.Embedding, norm: float) -> None:
        table = vectors.table(ids, item.embedding_dim, norm)
        _copy_rows(item, table)
        _copy_rows(cat, category_table(table, cats, n_cat))

    if isinstance(model, FoundationModel):
        fill(model.item, model.cat, cfg.representation_init_norm)
        return
    assert isinstance(model, TwoStageRanker)
    if model.cfg.kind == "dare":
        fill(model.attn_item, model.attn_cat, cfg.attention_init_norm)
        fill(model.repr_item, model.repr_cat, cfg.representation_init_norm)
    else:
        # one table searches and represents; the search decides what stage 2 ever sees
        fill(model.repr_item, model.repr_cat, cfg.attention_init_norm)


def item_tables(model: torch.nn.Module) -> list[torch.nn.Embedding]:
    """The embedding tables with a row per item (the ones that grow with the catalogue)."""
    names = ("item",) if isinstance(model, FoundationModel) else ("repr_item", "attn_item")
    tables: list[torch.nn.Embedding] = []
    for name in names:
        table = model.get_submodule(name)
        assert isinstance(table, torch.nn.Embedding)
        if all(table is not t for t in tables):  # coupled: one table under both names
            tables.append(table)
    return tables


def use_sparse_tables(model: torch.nn.Module, cfg: TrainConfig) -> bool:
    """Whether the item tables train with sparse row gradients (see TrainConfig.sparse_tables)."""
    if cfg.decay_embeddings:
        return False  # decay moves every row every step: nothing sparse about it
    if cfg.sparse_tables is not None:
        return cfg.sparse_tables
    return max(t.num_embeddings for t in item_tables(model)) >= SPARSE_TABLES_ROWS


def optimizers(model: torch.nn.Module, cfg: TrainConfig) -> list[torch.optim.Optimizer]:
    """Adam with L2 on dense weights only: decaying the embedding rows would shrink rarely updated
    items towards zero and leave stage 1 ranking by the time bias alone. The fused kernel: one pass
    over all tensors instead of a Python loop of small ops, a quarter of the step time.

    With sparse tables (`use_sparse_tables`) the item tables get sparse row gradients and their own
    row-wise Adam (`exporters.row_adam`).
    """
    fused = True if all(p.device.type in ("cpu", "cuda") for p in model.parameters()) else None
    if cfg.decay_embeddings:
        return [torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)]
    rows = item_tables(model) if use_sparse_tables(model, cfg) else []
    for table in rows:
        table.sparse = True
    row_ids = {id(t.weight) for t in rows}
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    params = list(model.parameters())
    tables = [p for p in params if id(p) in embedding_ids and id(p) not in row_ids]
    dense = [p for p in params if id(p) not in embedding_ids]
    out: list[torch.optim.Optimizer] = [
        torch.optim.Adam(
            [{"params": dense, "weight_decay": cfg.weight_decay}, {"params": tables, "weight_decay": 0.0}],
            lr=cfg.lr,
            fused=fused,
        )
    ]
    if rows:
        out.append(RowAdam([t.weight for t in rows], lr=cfg.lr))
    return out


def batch_rows_l2(model: torch.nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of squared norms of the item *representation* rows this batch reads (targets and
    histories), each row once, over the batch size. A `dare` ranker's attention table is left alone:
    shrinking it too cost stage 1 its retrieval lift (1.89 -> 1.54 at 1e-3 on a 3,000-user world)."""
    rows = torch.unique(torch.cat([batch.target, batch.hist_rows[batch.hist_mask]]))
    table = model.item if isinstance(model, FoundationModel) else model.get_submodule("repr_item")
    assert isinstance(table, torch.nn.Embedding)
    return (table(rows) ** 2).sum() / len(batch.target)


def cooccurrence_loss(
    model: TwoStageRanker, batch: Batch, window: int, anchors: int, rng: np.random.Generator
) -> torch.Tensor:
    """In-batch contrastive loss on the attention table: a sampled behavior must pick, among the
    batch's sampled neighbours, the one that came at most `window` positions before it in its own
    history.

    It is the self-supervised objective of the item vectors, kept up during ranker training, so that
    the attention table keeps arranging items by what goes together instead of drifting under the
    weak click gradient; scored exactly as stage 1 scores (scaled inner product).
    """
    device = batch.hist_rows.device
    lengths = batch.hist_mask.sum(1).cpu().numpy()
    keep = np.flatnonzero(lengths >= 2)
    if len(keep) < 2:
        return torch.zeros((), device=device)
    n = len(keep)
    anchor = 1 + (rng.random((len(keep), anchors)) * (lengths[keep, None] - 1)).astype(np.int64)
    near = np.maximum(anchor - 1 - (rng.random((len(keep), anchors)) * window).astype(np.int64), 0)
    rows = batch.hist_rows[torch.from_numpy(keep).to(device)]
    a_rows = rows.gather(1, torch.from_numpy(anchor).to(device)).reshape(-1)
    p_rows = rows.gather(1, torch.from_numpy(near).to(device)).reshape(-1)
    logits = (model.attention_vectors(a_rows) @ model.attention_vectors(p_rows).T) * model.scale
    # the same item elsewhere in the batch is not a negative
    same = (p_rows[None, :] == p_rows[:, None]) & ~torch.eye(n * anchors, dtype=torch.bool, device=device)
    logits = logits.masked_fill(same, float("-inf"))
    return torch.nn.functional.cross_entropy(logits, torch.arange(n * anchors, device=device))


def _predict(
    model: torch.nn.Module,
    s: Samples,
    idx: np.ndarray,
    batch_size: int,
    fm: np.ndarray | None,
    fm_present: np.ndarray | None,
    logits: bool = False,
    fm_history: HistoryJoin | None = None,
) -> np.ndarray:
    """Probabilities (or, with `logits`, the logits) of impressions idx, on the model's device."""
    out = np.zeros(len(idx), dtype=np.float64)
    # each impression's place in idx, found for a whole batch at once
    order = np.argsort(idx, kind="stable")
    sorted_idx = idx[order]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        for bidx in length_batches(s, idx, batch_size, None):
            logit = _forward(model, make_batch(s, bidx, fm, fm_present, fm_history).to(device))
            out[lookup(sorted_idx, order, bidx)] = logit.double().cpu().numpy()
    return out if logits else expit(out)


def predict_shared(
    model: torch.nn.Module,
    s: Samples,
    idx: np.ndarray,
    batch_size: int,
    fm: np.ndarray | None,
    fm_present: np.ndarray | None,
    world: World,
    fm_history: HistoryJoin | None = None,
) -> np.ndarray:
    """`_predict` with the impressions split across the training processes; every process gets all."""
    part = _predict(model, s, world.share(idx), batch_size, fm, fm_present, fm_history=fm_history)
    parts = gather_parts(part, world)
    out = np.empty(len(idx), dtype=np.float64)
    for rank, part in enumerate(parts):
        out[rank :: world.size] = part
    return out


def _forward(model: torch.nn.Module, b: Batch) -> torch.Tensor:
    if isinstance(model, FoundationModel):
        return model(b.target, b.hist_rows, b.hist_buckets, b.hist_mask)
    logit, _ = model(
        b.target,
        b.hist_rows,
        b.hist_buckets,
        b.hist_mask,
        b.fm,
        b.fm_present,
        b.fm_history,
        b.fm_history_mask,
    )
    return logit


def training_device(name: str) -> torch.device:
    """`auto`: CUDA when there is a GPU (under torchrun, the process's LOCAL_RANK one), else the CPU."""
    if name not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {name!r}")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device cuda asked for, but torch sees no CUDA device")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@dataclass
class Fitted:
    """What the epochs left: the stopping record, the per-epoch curve and the training speed."""

    watch: EarlyStopping
    history: list[dict[str, Any]]
    impressions_per_s: float


def fit(
    model: torch.nn.Module,
    s: Samples,
    train_idx: np.ndarray,
    valid_idx: np.ndarray,
    cfg: TrainConfig,
    fm_arr: np.ndarray | None,
    fm_present: np.ndarray | None,
    world: World,
    log: Callable[[str], None],
    fm_history: HistoryJoin | None = None,
) -> Fitted:
    """The training epochs with early stopping; leaves the best epoch's weights in the model.

    Every process walks the same shuffled batches (one order generator, the same seed everywhere)
    and takes its share of each (`World.share`); its own generator draws its dropout and auxiliary
    samples. The validation split is scored in shares too, so all processes stop together.
    """
    device = next(model.parameters()).device
    order_rng = np.random.default_rng(cfg.seed)
    rng = np.random.default_rng([cfg.seed, world.rank])
    for m in model.modules():
        if isinstance(m, ByteDropout):
            m.reseed([cfg.seed, world.rank, 1])
    opts = optimizers(model, cfg)
    aux = cfg.aux_weight > 0 and isinstance(model, TwoStageRanker)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    watch, best_state = EarlyStopping(cfg.patience), None
    history: list[dict[str, Any]] = []
    step_seconds, seen = 0.0, 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        # a batch smaller than the world would leave a process without impressions
        batches = [b for b in length_batches(s, train_idx, cfg.batch_size, order_rng) if len(b) >= world.size]
        bar = tqdm(
            batches,
            desc=f"{cfg.model} epoch {epoch}",
            file=sys.stderr,
            disable=not (cfg.progress and world.main),
            leave=False,
            dynamic_ncols=True,
            mininterval=2.0,
        )
        total = 0.0
        t_epoch = time.perf_counter()
        for whole in bar:
            bidx = world.share(whole)
            present = None
            if fm_present is not None:
                # FM dropout: the ranker must still score well when the cached embedding is missing
                present = fm_present.copy()
                present[bidx] = (rng.random(len(bidx)) >= cfg.fm_dropout).astype(np.float32)
            keep = None
            if fm_history is not None:
                # FM-history dropout: a user whose entries are missing or stale must still score well
                keep = rng.random(len(bidx)) >= cfg.fm_history_dropout
            batch = make_batch(s, bidx, fm_arr, present, fm_history, keep).to(device)
            loss = loss_fn(_forward(model, batch), batch.label)
            if aux:
                assert isinstance(model, TwoStageRanker)
                loss = loss + cfg.aux_weight * cooccurrence_loss(
                    model, batch, cfg.aux_window, cfg.aux_anchors, rng
                )
            if cfg.embedding_l2 > 0:
                loss = loss + cfg.embedding_l2 * batch_rows_l2(model, batch)
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            average_gradients(model, world)
            for opt in opts:
                opt.step()
            value = loss.item()
            total += value * len(whole)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        step_seconds += time.perf_counter() - t_epoch
        seen += sum(len(b) for b in batches)
        probs = predict_shared(model, s, valid_idx, cfg.batch_size * 2, fm_arr, fm_present, world, fm_history)
        val, val_ll = auc(s.label[valid_idx], probs), logloss(s.label[valid_idx], probs)
        history.append(
            {
                "epoch": epoch,
                "train_loss": total / len(train_idx),
                "valid_auc": val,
                "valid_logloss": val_ll,
                "valid_ne": normalized_entropy(s.label[valid_idx], probs),
            }
        )
        log(
            f"epoch {epoch}: train loss {total / len(train_idx):.4f}, valid AUC {val:.4f}, "
            f"valid logloss {val_ll:.4f}"
        )
        if watch.update(epoch, val, val_ll):
            best_state = copy.deepcopy(model.state_dict())
        if watch.stop:
            break
    assert best_state is not None
    model.load_state_dict(best_state)
    for table in item_tables(model):
        table.sparse = False  # exported graphs and offline scoring never need the sparse gradient
    return Fitted(watch, history, seen / step_seconds if step_seconds > 0 else float("nan"))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train, evaluate on the test split, export a bundle; returns the results line as a dict.

    Under torchrun each process trains its share (`exporters.distributed`); rank 0 alone evaluates
    and exports, and the other ranks return {"rank": r, ...}.
    """
    device = training_device(cfg.device)
    world = init_world(device)
    try:
        return _train(cfg, device, world)
    finally:
        close_world(world)


def _train(cfg: TrainConfig, device: torch.device, world: World) -> dict[str, Any]:
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
    log = _logger(cfg.progress and world.main)
    log(
        f"{cfg.model}: {len(train_idx)} train / {len(valid_idx)} valid / {len(test_idx)} test impressions, "
        f"{vocab.n_rows} item rows, {vocab.n_categories} categories"
    )

    fm_arr = fm_present = None
    fm_version = None
    fmh: FmHistory | None = None
    if cfg.fm_history and (cfg.model == "fm" or cfg.fm_bundle is None):
        raise ValueError("an FM history is an input of dare/coupled and needs the fm bundle it comes from")
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
            raw_items = vocab.item_ids[s.event_rows]
            if cfg.fm_vector:
                fm_dim = fm_bundle.manifest.dims.fm
                fm_arr = fm_embeddings(fm_bundle, s, raw_items)
                fm_present = np.ones(len(s.label), dtype=np.float32)
                log(f"FM embeddings from {fm_version} for {len(s.label)} impressions")
            if cfg.fm_history:
                fmh = build_fm_history(cfg, fm_bundle, s, raw_items)
                spec = fmh.spec
                log(
                    f"FM history from {fm_version}: {spec['entries']} entries, encoder "
                    f"{spec['encoder_version']} ({spec['encoding']}, d'={spec['dim']})"
                )
        rcfg = RankerConfig(
            cfg.model,
            vocab.n_rows,
            vocab.n_categories,
            cfg.attention_dim,
            cfg.representation_dim,
            cfg.top_k,
            fm_dim,
            item_dropout=cfg.item_dropout,
            recency_prior=cfg.recency_prior,
            stage2_gain=cfg.stage2_gain,
            stage2_gain_init=cfg.stage2_gain_init,
            recent_k=cfg.recent_k,
            short_term=cfg.short_term,
            fm_history=cfg.fm_history,
            fm_history_dim=fmh.join.dim if fmh is not None else 0,
        )
        model = TwoStageRanker(rcfg, vocab.row_category)

    vectors = item_vectors_for(cfg, s, vocab)
    if vectors is not None:
        init_embeddings(model, vectors, vocab, cfg)
        log(f"embedding tables initialised from {vectors.dim}-d item vectors of {vectors.n_events} events")
    model.to(device)
    join = fmh.join if fmh is not None else None
    fitted = fit(model, s, train_idx, valid_idx, cfg, fm_arr, fm_present, world, log, join)
    # the processes are done with each other: rank 0 evaluates and exports alone, and a process
    # waiting in the group would spin on a core that evaluation could use
    close_world(world)
    if not world.main:
        return {"rank": world.rank, "impressions_per_s": fitted.impressions_per_s}
    watch, history = fitted.watch, fitted.history
    # evaluation, calibration and export run in one process, on the CPU, as offline scoring does
    model.cpu()
    calibration: dict[str, Any] = {"fitted": False}
    if cfg.calibrate:
        valid_logits = _predict(
            model, s, valid_idx, cfg.batch_size * 2, fm_arr, fm_present, logits=True, fm_history=join
        )
        c, a = _fit_logistic(valid_logits, s.label[valid_idx].astype(np.float64))
        # a <= 0 would reverse the ranking: a validation split too small or too noisy to fit on
        if a > 0 and math.isfinite(a) and math.isfinite(c):
            calibration = {"fitted": True, "slope": a, "intercept": c, "on": "valid"}
    train_seconds = time.time() - t0

    users = s.user_index[test_idx]
    uncalibrated = None
    if calibration["fitted"]:
        raw = _predict(model, s, test_idx, cfg.batch_size * 2, fm_arr, fm_present, fm_history=join)
        uncalibrated = evaluate(s.label[test_idx], raw, users, bins=True)
        fold_platt(model, calibration["slope"], calibration["intercept"])

    probs = _predict(model, s, test_idx, cfg.batch_size * 2, fm_arr, fm_present, fm_history=join)
    metrics: dict[str, Any] = evaluate(s.label[test_idx], probs, users, bins=True)
    if uncalibrated is not None:
        # the same model's test scores before the validation-fitted scaling (same AUC: a monotone map)
        metrics["uncalibrated"] = uncalibrated
    metrics["valid_auc"] = watch.best_auc
    metrics["n_test"] = int(len(test_idx))
    if fm_arr is not None:
        # the same test split scored as if every FM embedding were missing (cold FM cache)
        no_fm = _predict(
            model, s, test_idx, cfg.batch_size * 2, fm_arr, np.zeros_like(fm_present), fm_history=join
        )
        metrics["fm_missing"] = evaluate(s.label[test_idx], no_fm, users)
    if join is not None:
        # the same test split scored as if no user had an FM history (a cold or stale history store)
        empty = dataclasses.replace(join, end=join.start)
        no_history = _predict(model, s, test_idx, cfg.batch_size * 2, fm_arr, fm_present, fm_history=empty)
        metrics["fm_history_missing"] = evaluate(s.label[test_idx], no_history, users)
    pop = popularity_scores(ds, s)
    a, b = _fit_logistic(pop[train_idx], s.label[train_idx].astype(np.float64))
    pop_probs = expit(a + b * pop[test_idx])
    metrics["popularity"] = evaluate(s.label[test_idx], pop_probs, users, bins=True)
    if isinstance(model, TwoStageRanker):
        related = related_positions(ds, s, vocab)
        metrics["retrieval"] = retrieval_report(
            model, s, vocab, train_idx, test_idx, related, cfg.batch_size * 2
        )
        metrics["attention"] = attention_report(model, s, test_idx, cfg.batch_size * 2, related)

    metrics = nan_to_none(metrics)
    variant = cfg.variant or cfg.model
    extra = {
        "training": {
            "seed": cfg.seed,
            "best_epoch": watch.best_epoch,
            "epochs_run": len(history),
            "impressions_per_s": round(fitted.impressions_per_s, 1),
            "device": str(device),
            "processes": world.size,
            "stopped_by": watch.stopped_by,
            "calibration": calibration,
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
            model,
            cfg.out,
            variant,
            vocab.item_ids,
            cfg.max_seq_len,
            metrics,
            fm_version,
            extra,
            fm_history=fmh.spec if fmh is not None else None,
            files=fmh.files() if fmh is not None else None,
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
        "ne": metrics["ne"],
        "calibration": metrics["calibration"],
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t0, 1),
        "impressions_per_s": round(fitted.impressions_per_s, 1),
        "processes": world.size,
        "best_epoch": watch.best_epoch,
        "stopped_by": watch.stopped_by,
        "bundle_bytes": size,
        "fm_version": fm_version,
        "fm_history": fmh.spec if fmh is not None else None,
        "metrics": metrics,
    }


@dataclass
class FmHistory:
    """A ranker's FM history: the joined entries, the encoder that made them, the manifest section."""

    join: HistoryJoin
    encoder: HistoryEncoder
    spec: dict[str, Any]

    def files(self) -> dict[str, Callable[[Path], None]]:
        """The bundle files it adds: the encoder, which `fm-embed` writes the store's entries with."""
        return {ENCODER_FILE: self.encoder.save}


def build_fm_history(
    cfg: TrainConfig, fm_bundle: Bundle, s: Samples, raw_event_items: np.ndarray
) -> FmHistory:
    """Every entry of the dataset from the FM, the encoder (given, or fitted on the training split), the
    entries as the service will decode them, and each impression's point-in-time slice of them."""
    fm_version = fm_bundle.manifest.tag
    at = cfg.fm_history_at
    if at not in ("impressions", "events"):
        raise ValueError(f"fm_history_at must be impressions or events, not {at!r}")
    entries = history_entries(fm_bundle, s, raw_event_items, at, cfg.fm_history_stride)
    if cfg.fm_history_encoder is not None:
        encoder = load_encoder(cfg.fm_history_encoder)
        if encoder.fm_version != fm_version:
            raise ValueError(
                f"{cfg.fm_history_encoder}: the encoder is for FM {encoder.fm_version}, "
                f"the fm bundle is {fm_version}"
            )
    else:
        if cfg.fm_history_encoding not in ("fp32", "int8", "int4"):
            raise ValueError(
                f"fm_history_encoding must be fp32, int8 or int4, not {cfg.fm_history_encoding!r}"
            )
        rows = fit_rows(entries, s, s.split != TRAIN)
        if rows.sum() < 2:
            raise ValueError(
                "too few FM-history entries before the evaluated impressions to fit the encoder on"
            )
        encoder = PcaEncoder.fit(
            entries.vectors[rows], fm_version=fm_version, encoding=cfg.fm_history_encoding, seed=cfg.seed
        )
    dim = encoder.dim if cfg.fm_history_dim is None else cfg.fm_history_dim
    join = join_history(
        entries, served_vectors(encoder, entries, dim), s, cfg.fm_history, cfg.fm_history_lag_s
    )
    spec = {
        "length": cfg.fm_history,
        "dim": dim,
        "fm_version": fm_version,
        "encoder_version": encoder.version,
        "encoding": encoder.encoding,
        "lag_s": cfg.fm_history_lag_s,
        "stored_dim": encoder.dim,
        "at": at,
        "stride": cfg.fm_history_stride,
        "encoder_file": ENCODER_FILE,
        "entries": len(entries),
        # share of impressions with at least one entry, and their mean count
        "coverage": float(np.mean(join.end > join.start)) if len(join.end) else 0.0,
        "mean_entries": float(np.mean(join.end - join.start)) if len(join.end) else 0.0,
    }
    return FmHistory(join, encoder, spec)


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def _logger(enabled: bool) -> Callable[[str], None]:
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
