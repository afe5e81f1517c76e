"""The exported stage 2 of a ranker: per-request work done once, per-pair work kept to a gather.

`TwoStageRanker.stage2` takes, for every (candidate, retrieved behavior) pair, the behavior's rows
and recomputes its attention logit and representation. Served, most of that is repeated work:

- stage 1 already computed every pair's logit: its scores are the raw inner products
  <[a_t, 1], [a_b, bias(bucket)]>, exactly the unscaled logits of `attention_logits`, so the graph
  takes them as input (`scores`) and only applies the attention scale;
- a request's C x K retrieved slots hold far fewer distinct behaviors (at most the user's L, and a
  user's best matches recur across candidates), so the graph takes each distinct behavior once
  (`behaviors`, `buckets` [B, U]), computes its representation once, and reaches it from every slot
  through an index (`retrieved` [B, C, K]);
- the FM part of the head's first layer is the same for all candidates of a request: computed once
  per request and added to each candidate's pre-activation;
- a request's FM-history entries are projected once per request; each candidate attends over them.

The math is that of `TwoStageRanker.stage2`; only the order of float operations differs, which
moves probabilities by ~1e-7 (the parity tests hold the graph to 1e-5 of the PyTorch model).
"""

from __future__ import annotations

import torch
from torch import nn

from exporters.models import TwoStageRanker, attend

INPUTS = ("candidates", "behaviors", "buckets", "retrieved", "scores", "mask")
FM_INPUTS = ("fm", "fm_present")
FM_HISTORY_INPUTS = ("fm_history", "fm_history_mask")
OUTPUTS = ("probability", "attention")


def item_representations(ranker: TwoStageRanker) -> torch.Tensor:
    """[n_items, d_r]: every item row's representation without its time term, as stage 2 adds it up.

    Folding the item and category tables into one at export time saves two gathers per row served;
    the sum is the same float32 addition stage 2 does, so the values are bit for bit the same.
    """
    with torch.no_grad():
        rows = torch.arange(ranker.cfg.n_items)
        return ranker.repr_item(rows) + ranker.repr_cat(ranker.row_category[rows])


class Stage2Graph(nn.Module):
    """Stage 2 over a batch of requests; a snapshot of an eval-mode ranker's weights, for export.

    Inputs (B requests, C candidates, K slots per candidate, U distinct behaviors per request):

    - `candidates` int64 [B, C]: candidate item rows;
    - `behaviors`, `buckets` int64 [B, U]: each request's distinct retrieved behaviors (item row,
      time bucket), padded with row 0, bucket 0;
    - `retrieved` int64 [B, C, K]: index into the request's `behaviors` of each slot's behavior;
    - `scores` float [B, C, K]: each slot's stage-1 score (raw inner product with the time bias);
    - `mask` float [B, C, K]: 1 for a retrieved behavior, 0 for padding (zero weight);
    - with an FM input, `fm` float [B, d_fm] and `fm_present` float [B];
    - with an FM history, `fm_history` float [B, H, d'] (each request's entries, decoded) and
      `fm_history_mask` float [B, H] (1 for an entry, 0 for padding).

    Outputs: `probability` [B, C] and `attention` [B, C, K], the weights over each candidate's slots.
    """

    # buffers (the head_* ones only with an FM input)
    item_repr: torch.Tensor
    head_candidate: torch.Tensor
    head_request: torch.Tensor
    head_bias: torch.Tensor

    def __init__(self, ranker: TwoStageRanker) -> None:
        super().__init__()
        if ranker.training:
            raise ValueError("export a ranker in eval mode: its weights are folded without dropout")
        self.ranker = ranker
        self.register_buffer("item_repr", item_representations(ranker))
        if ranker.cfg.fm_dim:
            # head[0] sees [r_t, interest, mass, has_history | fm part, present]: split its weight at
            # the bar so the per-request columns are multiplied once per request, not per candidate.
            first = ranker.head[0]
            if not isinstance(first, nn.Linear):
                raise TypeError(f"the ranker head must start with nn.Linear, found {type(first).__name__}")
            per_candidate = ranker.candidate_features()
            with torch.no_grad():
                weight = first.weight.detach()
                self.register_buffer("head_candidate", weight[:, :per_candidate].T.contiguous())
                self.register_buffer("head_request", weight[:, per_candidate:].T.contiguous())
                self.register_buffer("head_bias", first.bias.detach().clone())
            self.head_rest = ranker.head[1:]

    def forward(
        self,
        candidates: torch.Tensor,
        behaviors: torch.Tensor,
        buckets: torch.Tensor,
        retrieved: torch.Tensor,
        scores: torch.Tensor,
        mask: torch.Tensor,
        *extra: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.ranker
        n_fm = 2 if r.cfg.fm_dim else 0
        if len(extra) != n_fm + (2 if r.cfg.fm_history else 0):
            raise ValueError(
                f"this ranker takes {', '.join(self.input_names()[len(INPUTS) :]) or 'no'} extra inputs"
            )
        fm_inputs, history_inputs = extra[:n_fm], extra[n_fm:]
        weights, mass, has_history = attend(scores * r.stage2_scale(), mask)

        # one representation per distinct behavior: [B, U, d]
        r_b = self.item_repr[behaviors] + r.repr_time(buckets)
        pooled = self.pool(weights, r_b, retrieved)
        r_t = self.item_repr[candidates]
        parts = [r_t, pooled * r_t, mass, has_history]
        if r.cfg.short_term:
            # the short-term branch: its own softmax over the first slots, where stage 1 put the newest
            n = r.cfg.short_term
            short_weights, short_mass, _ = attend(scores[..., :n] * r.short_term_scale(), mask[..., :n])
            parts += [self.pool(short_weights, r_b, retrieved[..., :n]) * r_t, short_mass]
        if r.cfg.fm_history:
            fm_history, fm_history_mask = history_inputs
            parts += r.fm_history_features(r_t, fm_history, fm_history_mask)
        features = torch.cat(parts, dim=-1)
        if r.cfg.fm_dim:
            fm, fm_present = fm_inputs
            present = fm_present.unsqueeze(-1)
            per_request = torch.cat([r.fm_proj(fm) * present, present], dim=-1) @ self.head_request
            hidden = features @ self.head_candidate + (per_request + self.head_bias).unsqueeze(1)
            logit = self.head_rest(hidden)
        else:
            logit = r.head(features)
        return torch.sigmoid(logit.squeeze(-1)), weights

    def input_names(self) -> list[str]:
        """The graph's inputs, in order."""
        cfg = self.ranker.cfg
        return [*INPUTS, *(FM_INPUTS if cfg.fm_dim else ()), *(FM_HISTORY_INPUTS if cfg.fm_history else ())]

    def pool(self, weights: torch.Tensor, r_b: torch.Tensor, retrieved: torch.Tensor) -> torch.Tensor:
        """[B, C, d]: each candidate's attention-weighted sum of its slots' representations.

        One gathered row per slot and a [1, K] x [K, d] product per candidate. Measured against a
        multiply-and-sum over K (slower) and a dense [C, U] weight matrix times [U, d] (slower at
        U in the thousands): `python -m benchmarks.stage2 --pooling`.
        """
        b, u, d = r_b.shape
        # per-request indices become rows of the batch's flattened [B * U, d] table
        offsets = (torch.arange(b) * u).reshape(b, 1, 1)
        r_slots = r_b.reshape(b * u, d)[retrieved + offsets]  # [B, C, K, d]
        return (weights.unsqueeze(-2) @ r_slots).squeeze(-2)
