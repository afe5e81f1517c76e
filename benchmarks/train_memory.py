"""Training over long histories: peak memory and time of one epoch, by training window and stage-1 search.

Each configuration runs in a fresh process (peak RSS is per process): the samples and the ranker of
one dataset are built at a training window (`--max-seq-len`), then one training epoch runs exactly
as `dare-serve train` runs it (length-sorted batches, stage 1 + stage 2, the co-occurrence loss,
Adam), then one prediction pass over the validation split. Stage 1 is either the chunked search
(`TwoStageRanker.search`: no autograd, running top-K over history chunks) or the previous one-shot
search (the [N, L] logits of the whole history built at once, with autograd), side by side.

    .venv/bin/python -m benchmarks.train_memory --data DIR [--windows 2000,10000] [--models dare]

Make DIR with `dare-serve data synth --out DIR --users 300 --max-seq-len 10000`. Not a test.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast

from benchmarks._common import ROOT, machine_line, md_table, print_lines

if TYPE_CHECKING:
    import torch

    from exporters.models import TwoStageRanker


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def one_shot_search(
    self: TwoStageRanker,
    target_rows: torch.Tensor,
    hist_rows: torch.Tensor,
    hist_buckets: torch.Tensor,
    hist_mask: torch.Tensor,
    chunk: int | None = None,
) -> torch.Tensor:
    """The search before chunking: all L logits at once, under autograd in training."""
    import torch

    logits = self.attention_logits(target_rows, hist_rows, hist_buckets)
    logits = logits.masked_fill(~hist_mask, float("-inf"))
    return torch.topk(logits, min(self.cfg.top_k, hist_rows.shape[1]), dim=1).indices


def measure(
    data: Path, model_kind: Literal["dare", "coupled"], window: int, search: str, seed: int
) -> dict[str, float]:
    """One epoch and one validation pass in this process; peak RSS before and after."""
    import numpy as np
    import torch

    from exporters import train as tr
    from exporters.dataset import read_dataset
    from exporters.models import RankerConfig, TwoStageRanker
    from exporters.samples import ItemVocab, build_samples

    torch.set_num_threads(1)  # comparable across runs on a shared machine
    torch.manual_seed(seed)
    if search == "one-shot":
        TwoStageRanker.search = one_shot_search  # type: ignore[method-assign]
    cfg = tr.TrainConfig(data=data, model=model_kind, out=Path("/nonexistent"), max_seq_len=window)
    rng = np.random.default_rng(seed)
    ds = read_dataset(data)
    vocab = ItemVocab.from_dataset(ds)
    s = build_samples(ds, vocab, window)
    train_idx, valid_idx = s.indices(tr.TRAIN), s.indices(tr.VALID)
    rcfg = RankerConfig(
        model_kind,
        vocab.n_rows,
        vocab.n_categories,
        cfg.attention_dim,
        cfg.representation_dim,
        cfg.top_k,
        item_dropout=cfg.item_dropout,
    )
    model = TwoStageRanker(rcfg, vocab.row_category)
    opts = tr.optimizers(model, cfg)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    before = _rss_mib()
    model.train()
    t0 = time.perf_counter()
    padded = 0
    for bidx in tr.length_batches(s, train_idx, cfg.batch_size, rng):
        batch = tr.make_batch(s, bidx)
        padded += batch.hist_rows.numel()
        loss = loss_fn(tr._forward(model, batch), batch.label)
        loss = loss + cfg.aux_weight * tr.cooccurrence_loss(
            model, batch, cfg.aux_window, cfg.aux_anchors, rng
        )
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in opts:
            opt.step()
    epoch_s = time.perf_counter() - t0
    after_epoch = _rss_mib()
    t0 = time.perf_counter()
    tr._predict(model, s, valid_idx, cfg.batch_size * 2, None, None)
    predict_s = time.perf_counter() - t0
    return {
        "train_impressions": len(train_idx),
        "mean_history": float(s.hist_len[train_idx].mean()),
        "max_history": int(s.hist_len[train_idx].max()),
        "padded_positions": padded,
        "rss_before_mib": before,
        "peak_epoch_mib": after_epoch,
        "peak_predict_mib": _rss_mib(),
        "epoch_s": epoch_s,
        "predict_s": predict_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--windows", default="2000,10000")
    parser.add_argument("--models", default="dare")
    parser.add_argument("--searches", default="chunked,one-shot")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: model,window,search in this process
    args = parser.parse_args()
    if args.one:
        kind, window, search = args.one.split(",")
        model_kind = cast(Literal["dare", "coupled"], kind)
        print(json.dumps(measure(args.data, model_kind, int(window), search, args.seed)))
        return
    rows = []
    for kind in args.models.split(","):
        for window in args.windows.split(","):
            for search in args.searches.split(","):
                cmd = [sys.executable, "-m", "benchmarks.train_memory", "--data", str(args.data)]
                out = subprocess.run(
                    [*cmd, "--seed", str(args.seed), "--one", f"{kind},{window},{search}"],
                    cwd=ROOT,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout.strip().splitlines()[-1])
                print(kind, window, search, r, file=sys.stderr)
                rows.append(
                    [
                        kind,
                        f"{int(window):,}",
                        search,
                        f"{r['mean_history']:,.0f} / {r['max_history']:,}",
                        f"{r['rss_before_mib']:,.0f}",
                        f"{r['peak_epoch_mib']:,.0f}",
                        f"{r['peak_epoch_mib'] - r['rss_before_mib']:,.0f}",
                        f"{r['epoch_s']:.1f}",
                        f"{r['predict_s']:.1f}",
                    ]
                )
    header = [
        "model", "window", "stage 1", "history mean / max", "RSS before epoch MiB", "peak RSS epoch MiB",
        "epoch peak - before MiB", "epoch s", "valid predict s",
    ]  # fmt: skip
    print_lines([machine_line() + "; torch 1 thread; one process per row", "", *md_table(header, rows)])


if __name__ == "__main__":
    main()
