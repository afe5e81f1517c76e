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
    config = dict(manifest.model_extra.get("config", {}))
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
) -> np.ndarray:
    """Click probabilities of raw candidate ids for one user state, both stages in PyTorch.

    `history_*` are the user's behaviors oldest first (only the most recent `max_seq_len` should be
    passed, as the service does); `fm` is the FM embedding, or None when it is missing.
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
    with torch.no_grad():
        logit, _ = model(
            torch.from_numpy(item_rows(item_ids, candidates)),
            torch.from_numpy(rows),
            torch.from_numpy(buckets),
            torch.from_numpy(mask),
            fm_t,
            present,
        )
    return torch.sigmoid(logit).numpy()
