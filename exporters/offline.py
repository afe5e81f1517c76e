"""The PyTorch model of a bundle, rebuilt from its `weights.npz`: the offline oracle for serving parity."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from exporters.bundle import BundleError, item_rows, read_manifest, verify_files
from exporters.features import time_buckets
from exporters.models import FmConfig, FoundationModel, RankerConfig, TwoStageRanker


def load_torch_model(path: Path | str) -> TwoStageRanker | FoundationModel:
    """Rebuild the PyTorch model of a verified bundle (eval mode)."""
    path = Path(path)
    manifest = read_manifest(path)
    verify_files(path, manifest)
    if "weights.npz" not in manifest.files:
        raise BundleError(f"{path}: bundle has no weights.npz")
    cats = np.load(path / "item_categories.npy", allow_pickle=False)
    config = dict((manifest.model_extra or {}).get("config", {}))
    config["mlp"] = tuple(config.get("mlp", ()))
    model: TwoStageRanker | FoundationModel
    if manifest.model == "fm":
        config.pop("kind", None)
        model = FoundationModel(FmConfig(**config), cats)
    else:
        model = TwoStageRanker(RankerConfig(**config), cats)
    with np.load(path / "weights.npz", allow_pickle=False) as w:
        state = {k: torch.from_numpy(w[k]) for k in w.files}
    model.load_state_dict(state)
    return model.eval()


def score_offline(
    model: TwoStageRanker,
    item_ids: np.ndarray,
    history_items: np.ndarray,
    history_ts: np.ndarray,
    candidates: np.ndarray,
    now: int,
    fm: np.ndarray | None = None,
    fm_history: np.ndarray | None = None,
) -> np.ndarray:
    """Click probabilities of raw candidate ids for one user state, both stages in PyTorch.

    `history_*` are the user's behaviors oldest first (those the service reads: the newest stored, up
    to its search depth); `fm` is the FM embedding, or None when it is missing; `fm_history` the
    decoded FM-history entries [n, d'] the service feeds (None or n = 0: none).
    """
    c = len(candidates)
    hist_rows = item_rows(item_ids, history_items)
    length = len(hist_rows)
    width = max(length, 1)
    rows = np.zeros((c, width), np.int64)
    buckets = np.zeros((c, width), np.int64)
    mask = np.zeros((c, width), bool)
    rows[:, :length] = hist_rows
    buckets[:, :length] = time_buckets(now - np.asarray(history_ts, np.int64))
    mask[:, :length] = True
    fm_t = present = None
    if model.cfg.fm_dim:
        vec = np.zeros(model.cfg.fm_dim, np.float32) if fm is None else np.asarray(fm, np.float32)
        fm_t = torch.from_numpy(np.repeat(vec[None], c, 0))
        present = torch.full((c,), 0.0 if fm is None else 1.0)
    entries = entries_mask = None
    if model.cfg.fm_history and fm_history is not None and len(fm_history):
        vectors = torch.from_numpy(np.asarray(fm_history, np.float32))
        entries = vectors.expand(c, *vectors.shape)
        entries_mask = torch.ones(c, len(vectors))
    with torch.no_grad():
        logit, _ = model(
            torch.from_numpy(item_rows(item_ids, candidates)),
            torch.from_numpy(rows),
            torch.from_numpy(buckets),
            torch.from_numpy(mask),
            fm_t,
            present,
            entries,
            entries_mask,
        )
    return torch.sigmoid(logit).numpy()


def full_attention_logits(
    model: TwoStageRanker,
    cand_rows: torch.Tensor,
    beh_rows: torch.Tensor,
    beh_buckets: torch.Tensor,
    fm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Logits [C] of the ranker's stage 2 attending over all L behaviors of one user, not the top K.

    The same function as `model.stage2` with every behavior retrieved for every candidate: the
    baseline that stage-1 search replaces. Written as matrix products: the behaviors' vectors are
    computed once per user instead of once per candidate, and the aggregation is linear in the
    representations, so no [C, L, d] tensor is built. `cand_rows` [C], `beh_rows` and `beh_buckets`
    [L]; `fm` [fm_dim], or None when the FM embedding is missing. For evaluation: no item dropout.
    """
    a_t = model.attention_vectors(cand_rows)
    a_b = model.attention_vectors(beh_rows)
    logits = (a_t @ a_b.T + model.time_bias()[beh_buckets]) * model.scale  # [C, L]
    c, length = logits.shape
    r_t = model.repr_item(cand_rows) + model.repr_cat(model.row_category[cand_rows])
    r_b = (
        model.repr_item(beh_rows)
        + model.repr_cat(model.row_category[beh_rows])
        + model.repr_time(beh_buckets)
    )
    if length:
        weights = torch.softmax(logits, dim=1)
        mass = torch.logsumexp(logits, dim=1, keepdim=True)
    else:  # no history: zero weights and mass, as stage 2 gives an all-masked row
        weights, mass = logits, logits.new_zeros((c, 1))
    has_history = logits.new_full((c, 1), 1.0 if length else 0.0)
    parts = [r_t, (weights @ r_b) * r_t, mass, has_history]
    if model.cfg.fm_dim:
        present = logits.new_full((c, 1), 0.0 if fm is None else 1.0)
        vec = logits.new_zeros(model.cfg.fm_dim) if fm is None else fm
        parts += [model.fm_proj(vec).expand(c, -1) * present, present]
    return model.head(torch.cat(parts, dim=-1)).squeeze(-1)
