"""Closed-loop A/B runs on the demo world: traffic -> impression log -> clicks -> `dare-serve ab-report`.

Builds (or reuses) the demo's synthetic data and `dare` / `coupled` bundles (`service/demo.py`), then
for each scenario starts `dare-serve serve` (in-memory store, impression log on), plays
`dare-serve closed-loop` against it (simulated users click by the generator's own click model and
their clicks go back as events) and reads the test out with `dare-serve ab-report --server`:

- `dare-vs-coupled`: the two models 50/50: does the offline AUC ordering survive online?
- `better`: `dare` against `weak`, a `coupled` ranker trained on 2,000 impressions for one epoch
  (a truly worse arm): the report must name `dare` with an interval that excludes zero;
- `aa`: two copies of the `dare` bundle 50/50: the interval must cover zero and SRM pass;
- `skewed`: served 35/65 but read out against the 50/50 the test was meant to have: SRM must fail.

CUPED uses each user's click rate in the dataset's own (pre-experiment) impressions. Reports and
PNGs go to docs/results/ab-<scenario>.{json,png}, the closed-loop summaries beside them.

    .venv/bin/python -m benchmarks.ab_closed_loop [--workdir .dare/demo] [--users 800] [--rounds 10]
        [--scenarios dare-vs-coupled,aa,skewed] [--out docs/results]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from service.demo import DemoBuild
from service.process import ServeProcess, dare_serve_command

ADMIN = "closed-loop-admin-token"
SCENARIOS = ("dare-vs-coupled", "better", "aa", "skewed")
# the worse arm of `better`: little data, one epoch, no pretraining, no FM input
WEAK_TRAIN = ["--model", "coupled", "--variant", "weak", "--epochs", "1", "--max-train-samples", "2000",
              "--no-pretrain", "--no-progress"]  # fmt: skip


def _copy_variant(src: Path, root: Path, variant: str) -> None:
    """`src` (a bundle folder) as ROOT/<variant>/<its version>, its manifest naming the variant."""
    dest = root / variant / src.name
    shutil.copytree(src, dest)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["variant"] = variant
    (dest / "manifest.json").write_text(json.dumps(manifest))


def _newest(root: Path, variant: str) -> Path:
    return max((root / variant).iterdir(), key=lambda p: int(p.name))


def _weak(built: DemoBuild) -> Path:
    """The `weak` bundle, trained once into the demo's work folder."""
    root = built.bundles.parent / "weak-bundles"
    if not (root / "weak").is_dir():
        cmd = [*dare_serve_command(), "train", "--data", str(built.data), "--out", str(root), *WEAK_TRAIN]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return _newest(root, "weak")


def _root(scenario: str, built: DemoBuild, tmp: Path) -> Path:
    root = tmp / scenario
    dare = _newest(built.bundles, "dare")
    _copy_variant(dare, root, "dare")
    if scenario == "aa":
        _copy_variant(dare, root, "dare-copy")
    elif scenario == "better":
        _copy_variant(_weak(built), root, "weak")
    else:
        _copy_variant(_newest(built.bundles, "coupled"), root, "coupled")
    return root


def run(scenario: str, built: DemoBuild, args: argparse.Namespace, tmp: Path) -> None:
    data, fm_file = built.data, built.fm_embeddings
    served = "dare=0.35,coupled=0.65" if scenario == "skewed" else None
    env = {"DARE_IMPRESSION_LOG": "true", "DARE_ADMIN_TOKEN": ADMIN}
    if served:
        env["DARE_VARIANT_WEIGHTS"] = served
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    server = ServeProcess(
        _root(scenario, built, tmp),
        env=env,
        args=["--data", str(data), "--fm-embeddings", str(fm_file)],
        log=tmp / f"{scenario}.log",
        ready_timeout=300,
    )
    cli = dare_serve_command()
    with server:
        loop = [*cli, "closed-loop", "--host", server.base, "--data", str(data), "--users", str(args.users),
                "--rounds", str(args.rounds), "--seed", str(args.seed),
                "--out", str(out / f"ab-{scenario}-loop.json")]  # fmt: skip
        try:
            subprocess.run(loop, check=True)
        except subprocess.CalledProcessError:
            print(server.log_text()[-3000:], file=sys.stderr)
            raise
        other = {"aa": "dare-copy", "better": "weak"}.get(scenario, "coupled")
        weights = f"dare=0.5,{other}=0.5"
        control = ["--control", "dare" if scenario == "aa" else other]
        report = [*cli, "ab-report", "--server", server.base, "--admin-token", ADMIN, "--k", "10",
                  "--window", "5m", "--weights", weights, "--covariates", str(data / "impressions.parquet"),
                  "--json", str(out / f"ab-{scenario}.json"), "--png", str(out / f"ab-{scenario}.png"),
                  *control]  # fmt: skip
        subprocess.run(report, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", type=Path, default=Path(".dare/demo"))
    parser.add_argument("--users", type=int, default=800)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS))
    parser.add_argument("--out", type=Path, default=Path("docs/results"))
    args = parser.parse_args()
    scenarios = [s for s in args.scenarios.split(",") if s]
    unknown = sorted(set(scenarios) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(SCENARIOS)}")
    from service.demo import build

    built = build(args.workdir)
    with tempfile.TemporaryDirectory(prefix="ab-closed-loop-") as tmp:
        for scenario in scenarios:
            print(f"== {scenario}", file=sys.stderr, flush=True)
            run(scenario, built, args, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
