"""PyTorch models: the two-stage DARE ranker, its coupled (TWIN-style) control arm, and the FM.

Stage 1 of the ranker scores every history behavior against the target with an inner product of
*attention* vectors plus a per-behavior time bias, and keeps the top K. Stage 2 softmax-attends
over those K and aggregates target-aware *representations* (behavior repr * target repr).

The time term: each behavior carries an attention time vector tau(bucket) and the target carries
a learned constant vector tau_0 (its own time gap is always zero), so <tau_0, tau(bucket)> is a
per-behavior bias that does not depend on the target. It folds into the search as one extra
dimension: query [a_target, 1] against key [a_behavior, bias(bucket)], and stage 1 stays a pure
inner-product search over the FAISS index of item attention vectors.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from exporters.features import N_TIME_BUCKETS

ModelKind = Literal["dare", "coupled", "fm"]

# A finite "minus infinity": an all-padding row must give zero weights, not NaN.
_MASKED = -1e9
# Floats of one stage-1 chunk's [N, chunk, d] attention gather (16 MB): training over long
# histories searches L positions in pieces of this size instead of materialising [N, L, d].
SEARCH_CHUNK_ELEMENTS = 1 << 22


@dataclass
class RankerConfig:
    """Sizes of a two-stage ranker (`dare` or `coupled`)."""

    kind: Literal["dare", "coupled"]
    n_items: int
    n_categories: int
    attention_dim: int = 16
    representation_dim: int = 64
    top_k: int = 64
    fm_dim: int = 0
    mlp: tuple[int, ...] = (128, 64)
    n_time_buckets: int = N_TIME_BUCKETS
    item_dropout: float = 0.0
    # A per-bucket bias added to the folded <tau_0, tau(bucket)> term, initialised to
    # -recency_prior * (bucket / 2) / 25 (about -recency_prior for a behavior a year old). The
    # product term alone starts near zero with a gradient as small as its other factor, so it
    # barely moves; a direct bias learns at the rate of any dense weight. Off (None) in bundles
    # trained before it.
    recency_prior: float | None = None
    # A learned gain on stage 2's attention logits (exp of a scalar, starting at 1): stage 1's
    # ranking does not depend on it, so stage 2 can sharpen its softmax without moving the search.
    stage2_gain: bool = False
    # Where stage 2's learned gains start (the long-term one with stage2_gain, and the short-term
    # branch's). At 1 the logits are <a_t, a_b> / sqrt(d_a) of unit-norm vectors, a few tenths wide:
    # a near-uniform softmax that a gain learned at Adam's pace leaves flat within the few epochs
    # training runs.
    stage2_gain_init: float = 1.0
    # Stage 1 always keeps the newest `recent_k` behaviors of the history (the last positions of a
    # sequence ordered oldest first) and searches the other top_k - recent_k among the older ones.
    # The learned time bias alone did not pull recent behaviors up on real data (docs/retrieval.md).
    # 0 (pure search) in bundles trained before it.
    recent_k: int = 0
    # A short-term branch: a second target attention, with its own softmax and gain, over stage 1's
    # first `short_term` slots, which `recent_k` fills with the newest behaviors, newest first; its
    # pooled interest joins the head beside the long-term one (as SIM, TWIN and ETA keep the newest
    # behaviors in a branch of their own). Needs short_term <= recent_k. 0 (no branch) before it.
    short_term: int = 0
    # LoopFM's history channel: a target attention over up to `fm_history` FM-history entries of the
    # user (the FM's representations at past requests, compressed; `exporters.fm_history`), each
    # entry's first `fm_history_dim` dims projected into the representation space. 0 (none) before it.
    fm_history: int = 0
    fm_history_dim: int = 0

    def __post_init__(self) -> None:
        if self.kind == "coupled":
            # one shared table: the attention dimension is the representation dimension
            self.attention_dim = self.representation_dim
        if not 0 <= self.recent_k <= self.top_k:
            raise ValueError(f"recent_k must be in [0, top_k={self.top_k}], got {self.recent_k}")
        if not 0 <= self.short_term <= self.recent_k:
            raise ValueError(
                f"short_term must be in [0, recent_k={self.recent_k}] (the branch reads the slots "
                f"stage 1 keeps by recency), got {self.short_term}"
            )
        if (
            self.fm_history < 0
            or self.fm_history_dim < 0
            or (self.fm_history > 0) != (self.fm_history_dim > 0)
        ):
            raise ValueError(
                f"fm_history and fm_history_dim are both 0 (no FM history) or both positive, got "
                f"{self.fm_history} and {self.fm_history_dim}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FmConfig:
    """Sizes of the foundation model."""

    n_items: int
    n_categories: int
    dim: int = 64
    heads: int = 4
    fm_dim: int = 32
    mlp: tuple[int, ...] = (128, 64)
    n_time_buckets: int = N_TIME_BUCKETS
    kind: Literal["fm"] = field(default="fm")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-2], sizes[1:-1], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return nn.Sequential(*layers)


class ByteDropout(nn.Module):
    """Element-wise dropout whose mask is drawn from random bytes, on CPU.

    torch's CPU dropout draws one Bernoulli sample per element through a slow path: on the [N, K,
    d_r] behavior representations it was a quarter of a training step. One random byte per element
    from numpy's generator, mapped through a 256-entry table to 0 or 1/(1-p), is about a tenth of
    that; p is rounded to a multiple of 1/256 (0.5 is exact). On GPU it is torch's dropout. The
    generator is seeded from torch's at the first draw, so `torch.manual_seed` fixes the masks;
    `reseed` gives each training process its own.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = p
        self.dropped = round(p * 256)
        keep = np.arange(256) >= self.dropped
        self.table = np.where(keep, 256 / (256 - self.dropped), 0.0).astype(np.float32)
        # seeded at the first draw, not here: building a model must not move torch's generator
        self.rng: np.random.Generator | None = None

    def reseed(self, seed: int | list[int]) -> None:
        self.rng = np.random.default_rng(seed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropped == 0:
            return x
        if x.device.type != "cpu":
            return nn.functional.dropout(x, self.dropped / 256, True)
        if self.rng is None:
            self.rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,)).item()))
        draws = np.frombuffer(self.rng.bytes(x.numel()), dtype=np.uint8)
        return x * torch.from_numpy(self.table[draws].reshape(x.shape))


def attend(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax weights [..., K] of scaled logits over the slots where mask > 0, the log of their
    normaliser [..., 1] (0 without any slot) and whether there is a slot [..., 1].

    Softmax and logsumexp written out, sharing one max and one sum of exponentials: ORT's
    ReduceLogSumExp alone took about 3x its Softmax.
    """
    masked = logits.masked_fill(mask <= 0, _MASKED)
    top = masked.amax(-1, keepdim=True)
    exp = torch.exp(masked - top)
    total = exp.sum(-1, keepdim=True)
    weights = exp / total * mask
    # as in stage 2: the log of the normaliser keeps how much relevant history there is
    has_history = (mask.sum(-1, keepdim=True) > 0).to(logits.dtype)
    return weights, (top + torch.log(total)) * has_history, has_history


def attend_entries(
    queries: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target attention over FM-history entries: (pooled [..., C, d], present [..., C, 1]).

    `queries` [..., C, d] (the candidates' representations), `keys` [..., H, d] (the projected entries),
    `mask` [..., 1, H] (1 for an entry). Softmax over the valid entries by `attend`; a row without
    entries pools to zero and reports present 0.
    """
    weights, _, _ = attend((queries @ keys.transpose(-1, -2)) * scale, mask)
    # the weights of a row with entries sum to 1, of one without to 0: no shape to broadcast by hand
    present = (weights.sum(-1, keepdim=True) > 0).to(weights.dtype)
    return weights @ keys, present


def _embedding(n: int, dim: int, std: float) -> nn.Embedding:
    emb = nn.Embedding(n, dim)
    nn.init.normal_(emb.weight, std=std)
    return emb


class TwoStageRanker(nn.Module):
    """DARE (separate attention and representation tables) or coupled (one shared table)."""

    row_category: torch.Tensor  # buffer: category of each item row

    def __init__(self, cfg: RankerConfig, row_category: np.ndarray) -> None:
        super().__init__()
        if len(row_category) != cfg.n_items:
            raise ValueError(f"row_category has {len(row_category)} rows, expected n_items={cfg.n_items}")
        self.cfg = cfg
        self.register_buffer("row_category", torch.as_tensor(row_category, dtype=torch.long))
        d_r, d_a = cfg.representation_dim, cfg.attention_dim
        self.repr_item = _embedding(cfg.n_items, d_r, 0.05)
        self.repr_cat = _embedding(cfg.n_categories, d_r, 0.05)
        self.repr_time = _embedding(cfg.n_time_buckets, d_r, 0.05)
        if cfg.kind == "dare":
            self.attn_item = _embedding(cfg.n_items, d_a, 0.05)
            self.attn_cat = _embedding(cfg.n_categories, d_a, 0.05)
            self.attn_time = _embedding(cfg.n_time_buckets, d_a, 0.05)
        else:
            self.attn_item, self.attn_cat, self.attn_time = self.repr_item, self.repr_cat, self.repr_time
        # Dropout on the item-level part of the representations: the sparse item rows overfit
        # fast, the category rows generalize. Attention vectors get none, so that stage 1 in
        # training retrieves with the same vectors as the served FAISS index.
        self.item_dropout = ByteDropout(cfg.item_dropout)
        self.target_time = nn.Parameter(torch.randn(d_a) * 0.05)
        if cfg.recency_prior is not None:
            doublings = torch.arange(cfg.n_time_buckets, dtype=torch.float32) / 2.0
            self.bucket_bias = nn.Parameter(-cfg.recency_prior * doublings / 25.0)
        if cfg.stage2_gain_init <= 0:
            raise ValueError(f"stage2_gain_init must be > 0, got {cfg.stage2_gain_init}")
        if cfg.stage2_gain:
            self.log_stage2_gain = nn.Parameter(torch.tensor(math.log(cfg.stage2_gain_init)))
        if cfg.short_term:
            self.log_short_gain = nn.Parameter(torch.tensor(math.log(cfg.stage2_gain_init)))
        self.scale = 1.0 / math.sqrt(d_a)
        fm_in = 0
        if cfg.fm_dim:
            self.fm_proj = nn.Linear(cfg.fm_dim, d_r)
            fm_in = d_r + 1
        if cfg.fm_history:
            self.fm_history_proj = nn.Linear(cfg.fm_history_dim, d_r)
        self.head = _mlp([self.candidate_features() + fm_in, *cfg.mlp, 1])

    def candidate_features(self) -> int:
        """Width of the head's per-candidate input: the target, the long-term interest, its mass and
        history flag, with a short-term branch its interest and mass, and with an FM history its pooled
        entries, their product with the target and their presence flag."""
        d_r = self.cfg.representation_dim
        width = 2 * d_r + 2 + (d_r + 1 if self.cfg.short_term else 0)
        return width + (2 * d_r + 1 if self.cfg.fm_history else 0)

    def fm_history_features(
        self, r_t: torch.Tensor, fm_history: torch.Tensor, fm_history_mask: torch.Tensor
    ) -> list[torch.Tensor]:
        """[pooled, pooled * r_t, present] of candidates r_t [..., C, d_r] over a request's entries
        [..., H, d'] with mask [..., H]: the candidate is the query, each projected entry key and value."""
        keys = self.fm_history_proj(fm_history)
        pooled, present = attend_entries(r_t, keys, fm_history_mask.unsqueeze(-2), self.scale_r)
        return [pooled, pooled * r_t, present]

    @property
    def scale_r(self) -> float:
        """The FM-history attention scale, 1 / sqrt(d_r)."""
        return 1.0 / math.sqrt(self.cfg.representation_dim)

    # -- stage 1 -------------------------------------------------------------------------------
    def attention_vectors(self, rows: torch.Tensor) -> torch.Tensor:
        """Attention vector of item rows: item table + the item's category table."""
        return self.attn_item(rows) + self.attn_cat(self.row_category[rows])

    def time_bias(self) -> torch.Tensor:
        """Per-bucket bias <tau_0, tau(bucket)> (+ the direct bucket bias): the folded target-time
        term of the attention."""
        bias = self.attn_time.weight @ self.target_time
        if self.cfg.recency_prior is not None:
            bias = bias + self.bucket_bias
        return bias

    def stage2_scale(self) -> torch.Tensor | float:
        """What stage 2 multiplies the raw attention logits by: the attention scale, times the
        learned gain when the ranker has one."""
        if self.cfg.stage2_gain:
            return self.scale * torch.exp(self.log_stage2_gain)
        return self.scale

    def short_term_scale(self) -> torch.Tensor:
        """What the short-term branch multiplies the raw attention logits by."""
        return self.scale * torch.exp(self.log_short_gain)

    def attention_logits(
        self, target_rows: torch.Tensor, beh_rows: torch.Tensor, beh_buckets: torch.Tensor
    ) -> torch.Tensor:
        """Scaled attention logits [N, L] of behaviors [N, L] for targets [N]."""
        a_t = self.attention_vectors(target_rows)
        a_b = self.attention_vectors(beh_rows)
        raw = (a_b * a_t.unsqueeze(1)).sum(-1) + self.time_bias()[beh_buckets]
        return raw * self.scale

    def search(
        self,
        target_rows: torch.Tensor,
        hist_rows: torch.Tensor,
        hist_buckets: torch.Tensor,
        hist_mask: torch.Tensor,
        chunk: int | None = None,
    ) -> torch.Tensor:
        """Stage 1: positions [N, k] of the top-k behaviors (k = min(K, L)).

        With `recent_k` = 0, by attention logit, best first, equal logits in position order. With
        `recent_k` = R > 0, a row's newest min(R, n) valid behaviors (n = its valid count) come first,
        newest to oldest, then the best k - min(R, n) of the older ones by logit as above: R = K
        is the newest-first ranking. Positions past a row's valid behaviors fill its last columns,
        in position order, as without R.

        Only indices leave it, so it runs without autograd (gradients reach the attention table
        through stage 2's K behaviors). It walks the history in chunks of `chunk` positions (default:
        about SEARCH_CHUNK_ELEMENTS floats of gather per chunk), merging each chunk into a running
        top-k, so memory is bounded by the chunk and not by L; any chunk size gives the same result.
        """
        n, length = hist_rows.shape
        k = min(self.cfg.top_k, length)
        recent = self.cfg.recent_k
        if chunk is None:
            chunk = max(k, SEARCH_CHUNK_ELEMENTS // max(1, n * self.cfg.attention_dim))
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        device = hist_rows.device
        with torch.no_grad():
            n_valid = hist_mask.sum(1, dtype=torch.long)
            seen = torch.zeros(n, dtype=torch.long, device=device)  # valid positions before the chunk
            best = torch.empty((n, 0), dtype=self.target_time.dtype, device=device)
            best_pos = torch.empty((n, 0), dtype=torch.long, device=device)
            for start in range(0, length, chunk):
                cols = slice(start, min(start + chunk, length))
                mask = hist_mask[:, cols]
                logits = self.attention_logits(target_rows, hist_rows[:, cols], hist_buckets[:, cols])
                logits = logits.masked_fill(~mask, float("-inf"))
                if recent:
                    # +inf sorts a kept behavior above every searched one; kept ones tie among
                    # themselves and so stay in position order (reversed below)
                    counted = seen[:, None] + torch.cumsum(mask, dim=1)
                    kept = mask & (n_valid[:, None] - counted < recent)
                    logits = logits.masked_fill(kept, float("inf"))
                    seen = counted[:, -1]
                positions = torch.arange(cols.start, cols.stop, device=device).expand(n, -1)
                # The running top-k holds only earlier positions, each part in position order: a stable
                # sort of [running, chunk] keeps equal logits in position order, as one sort of all L does.
                values = torch.cat([best, logits], dim=1)
                order = torch.sort(values, dim=1, descending=True, stable=True).indices[:, :k]
                best = values.gather(1, order)
                best_pos = torch.cat([best_pos, positions], dim=1).gather(1, order)
            if recent:
                # the kept block, oldest first after the sort, reversed to newest first
                n_kept = torch.clamp(n_valid, max=recent)[:, None]
                col = torch.arange(k, device=device)[None, :]
                best_pos = best_pos.gather(1, torch.where(col < n_kept, n_kept - 1 - col, col))
        return best_pos

    # -- stage 2 -------------------------------------------------------------------------------
    def stage2(
        self,
        target_rows: torch.Tensor,
        beh_rows: torch.Tensor,
        beh_buckets: torch.Tensor,
        beh_mask: torch.Tensor,
        fm: torch.Tensor | None = None,
        fm_present: torch.Tensor | None = None,
        fm_history: torch.Tensor | None = None,
        fm_history_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit [N] and attention weights [N, K] from the retrieved behaviors (and with an FM history,
        entries [N, H, d'] with mask [N, H]; None: no entries)."""
        scaled = self.attention_logits(target_rows, beh_rows, beh_buckets)
        logits = scaled * torch.exp(self.log_stage2_gain) if self.cfg.stage2_gain else scaled
        mask = beh_mask.to(logits.dtype)
        masked = logits.masked_fill(beh_mask <= 0, _MASKED)
        weights = torch.softmax(masked, dim=1) * mask
        # Softmax forgets how much relevant history there is (5 matching behaviors or 50 give the
        # same weights); the log of the normaliser keeps that, as unnormalised DIN-style sums do.
        has_history = (mask.sum(1, keepdim=True) > 0).to(logits.dtype)
        mass = torch.logsumexp(masked, dim=1, keepdim=True) * has_history
        r_t = self.item_dropout(self.repr_item(target_rows)) + self.repr_cat(self.row_category[target_rows])
        r_b = (
            self.item_dropout(self.repr_item(beh_rows))
            + self.repr_cat(self.row_category[beh_rows])
            + self.repr_time(beh_buckets)
        )
        interest = (weights.unsqueeze(-1) * r_b).sum(1) * r_t
        parts = [r_t, interest, mass, has_history]
        if self.cfg.short_term:
            # the same logits under the branch's own gain, softmaxed over the first slots only: stage 1
            # puts the newest behaviors there (fewer with a shorter history: the rest is padding)
            n = self.cfg.short_term
            short_weights, short_mass, _ = attend(scaled[:, :n] * torch.exp(self.log_short_gain), mask[:, :n])
            parts += [(short_weights.unsqueeze(-1) * r_b[:, :n]).sum(1) * r_t, short_mass]
        if self.cfg.fm_history:
            if fm_history is None or fm_history_mask is None:
                n_rows = target_rows.shape[0]
                fm_history = torch.zeros(n_rows, 1, self.cfg.fm_history_dim, device=r_t.device)
                fm_history_mask = torch.zeros(n_rows, 1, device=r_t.device)
            # each impression is its own request of one candidate: [N, 1, d_r] against [N, H, d_r]
            feats = self.fm_history_features(r_t.unsqueeze(1), fm_history, fm_history_mask.to(r_t.dtype))
            parts += [f.squeeze(1) for f in feats]
        if self.cfg.fm_dim:
            if fm is None or fm_present is None:
                raise ValueError("this ranker takes an FM embedding and its presence flag")
            present = fm_present.to(logits.dtype).unsqueeze(-1)
            parts += [self.fm_proj(fm) * present, present]
        return self.head(torch.cat(parts, dim=-1)).squeeze(-1), weights

    def forward(
        self,
        target_rows: torch.Tensor,
        hist_rows: torch.Tensor,
        hist_buckets: torch.Tensor,
        hist_mask: torch.Tensor,
        fm: torch.Tensor | None = None,
        fm_present: torch.Tensor | None = None,
        fm_history: torch.Tensor | None = None,
        fm_history_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Both stages over padded histories [N, L]; returns logits [N] and top-k positions [N, k]."""
        top = self.search(target_rows, hist_rows, hist_buckets, hist_mask)
        beh_rows = torch.gather(hist_rows, 1, top)
        beh_buckets = torch.gather(hist_buckets, 1, top)
        beh_mask = torch.gather(hist_mask, 1, top)
        logit, _ = self.stage2(
            target_rows, beh_rows, beh_buckets, beh_mask, fm, fm_present, fm_history, fm_history_mask
        )
        return logit, top

    def item_attention_table(self) -> np.ndarray:
        """Attention vectors of every item row, the rows of the FAISS index."""
        with torch.no_grad():
            rows = torch.arange(self.cfg.n_items)
            return self.attention_vectors(rows).float().numpy().astype(np.float32)


class FoundationModel(nn.Module):
    """A larger CTR model over the full sequence; its user tower output is the cached FM embedding.

    The user tower is target-independent (learned-query attention pooling), so the embedding can be
    computed offline for every user and read at serving time without running the FM online.
    """

    row_category: torch.Tensor  # buffer: category of each item row

    def __init__(self, cfg: FmConfig, row_category: np.ndarray) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("row_category", torch.as_tensor(row_category, dtype=torch.long))
        d = cfg.dim
        self.item = _embedding(cfg.n_items, d, 0.05)
        self.cat = _embedding(cfg.n_categories, d, 0.05)
        self.time = _embedding(cfg.n_time_buckets, d, 0.05)
        self.keys = nn.Linear(d, d, bias=False)
        self.queries = nn.Parameter(torch.randn(cfg.heads, d) * 0.1)
        self.user_out = nn.Sequential(nn.Linear(cfg.heads * d, cfg.fm_dim), nn.Tanh())
        self.target_out = nn.Linear(d, cfg.fm_dim)
        self.head = _mlp([3 * cfg.fm_dim, *cfg.mlp, 1])

    def user_embedding(
        self, hist_rows: torch.Tensor, hist_buckets: torch.Tensor, hist_mask: torch.Tensor
    ) -> torch.Tensor:
        """FM user embedding [N, fm_dim] from padded histories [N, L]."""
        h = self.item(hist_rows) + self.cat(self.row_category[hist_rows]) + self.time(hist_buckets)
        logits = torch.einsum("nld,hd->nhl", self.keys(h), self.queries) / math.sqrt(self.cfg.dim)
        keep = hist_mask.unsqueeze(1)
        weights = torch.softmax(logits.masked_fill(~keep, _MASKED), dim=-1) * keep.to(h.dtype)
        pooled = torch.einsum("nhl,nld->nhd", weights, h).reshape(h.shape[0], -1)
        return self.user_out(pooled)

    def forward(
        self,
        target_rows: torch.Tensor,
        hist_rows: torch.Tensor,
        hist_buckets: torch.Tensor,
        hist_mask: torch.Tensor,
    ) -> torch.Tensor:
        """CTR logit [N]."""
        u = self.user_embedding(hist_rows, hist_buckets, hist_mask)
        t = self.target_out(self.item(target_rows) + self.cat(self.row_category[target_rows]))
        return self.head(torch.cat([u, t, u * t], dim=-1)).squeeze(-1)


class UserEncoderGraph(nn.Module):
    """The exported FM user tower: padded histories to user embeddings."""

    def __init__(self, fm: FoundationModel) -> None:
        super().__init__()
        self.fm = fm

    def forward(self, behaviors: torch.Tensor, buckets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.fm.user_embedding(behaviors, buckets, mask > 0)
