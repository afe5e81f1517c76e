"""Model lifecycle: which bundle version of each variant serves, and atomic swaps to newer ones.

`ROOT/<variant>/<version>/`: the newest version that loads and verifies serves. A reload (admin
endpoint or directory watch) loads what changed in a background thread, then replaces the whole
`ModelSet` with one reference assignment. A request reads `registry.current` once and keeps the
`ScoringModel` it picked to the end, so it never mixes two versions, and an old version's session
is released only when its last request is done. A bundle that fails to load is refused and logged,
remembered with a signature of its files (so a directory watch does not retry it every poll
until it changes), and the previous version keeps serving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from exporters.bundle import BundleError, check_name, list_versions, load_bundle
from service.core.ab import assign_variant, effective_weights
from service.core.pipeline import ScoringModel
from service.core.runtime import session_options
from service.errors import NoModelLoaded, UnknownVariant
from service.metrics import Metrics

logger = logging.getLogger("dare.service")

Signature = tuple[tuple[str, int, int], ...]


@dataclass(frozen=True, slots=True)
class ModelSet:
    """An immutable snapshot: the serving model of each variant and the hash-split weights."""

    models: Mapping[str, ScoringModel]
    weights: Mapping[str, float]
    generation: int

    def choose(self, user_id: str, experiment: str | None, salt: str) -> ScoringModel:
        """The model for a request: the `X-Experiment` variant, else the user's hash arm."""
        if experiment is not None:
            model = self.models.get(experiment)
            if model is None:
                valid = sorted(self.models)
                raise UnknownVariant(
                    f"no variant {experiment[:64]!r}; valid variants: {', '.join(valid) or 'none'}",
                    extensions={"valid_variants": valid},
                )
            return model
        if not self.weights or not any(w > 0 for w in self.weights.values()):
            raise NoModelLoaded("no model variant is loaded and weighted for traffic")
        return self.models[assign_variant(user_id, salt, self.weights)]


@dataclass(frozen=True, slots=True)
class Refusal:
    """A bundle version that was refused, and why."""

    variant: str
    version: str
    reason: str


@dataclass(frozen=True, slots=True)
class ReloadReport:
    """What one reload did."""

    loaded: list[tuple[str, str]] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    serving: dict[str, str] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.loaded)


def _signature(path: Path) -> Signature:
    """Names, sizes and mtimes of a bundle's files: changes when anything in it is rewritten."""
    try:
        return tuple(
            sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in path.iterdir() if p.is_file())
        )
    except OSError:
        return ()


class ModelRegistry:
    """Holds the current ModelSet; reloads it from the bundle root."""

    def __init__(
        self,
        root: Path,
        *,
        providers: list[str],
        ort_threads: int,
        configured_weights: Mapping[str, float] | None,
        metrics: Metrics,
        loader: Callable[[Path, str], ScoringModel] | None = None,
        warm_shape: tuple[int, int] = (2, 1),
    ) -> None:
        self.root = Path(root)
        # (requests, candidates) of the largest batch: every loaded model runs it once before serving
        self.warm_shape = warm_shape
        self.providers = list(providers)
        self.ort_threads = ort_threads
        self.configured_weights = dict(configured_weights) if configured_weights else None
        self._metrics = metrics
        self._load = loader or self._load_model
        self._current = ModelSet(MappingProxyType({}), MappingProxyType({}), 0)
        self._refused: dict[Path, tuple[Signature, str]] = {}
        self._lock = asyncio.Lock()

    @property
    def current(self) -> ModelSet:
        """The snapshot requests use; read it once per request."""
        return self._current

    def missing_variants(self) -> list[str]:
        """Weighted variants (or, unweighted, any variant at all) that are not loaded."""
        loaded = self._current.models
        if self.configured_weights is None:
            return [] if loaded else ["<any>"]
        return sorted(v for v, w in self.configured_weights.items() if w > 0 and v not in loaded)

    def _load_model(self, path: Path, variant: str) -> ScoringModel:
        """Verify and open one bundle (runs in a worker thread)."""
        bundle = load_bundle(
            path, providers=self.providers, session_options=session_options(self.ort_threads)
        )
        m = bundle.manifest
        if m.model not in ("dare", "coupled"):
            raise BundleError(f"{path}: a {m.model} bundle is not a ranker")
        if m.variant != variant or m.version != path.name:
            raise BundleError(
                f"{path}: manifest says {m.variant}/{m.version}, the folder is {variant}/{path.name}"
            )
        return ScoringModel.from_bundle(bundle, *self.warm_shape)

    def _load_inside_root(self, path: Path, variant: str) -> ScoringModel:
        """Load a version folder unless it (or its variant folder) is a link to outside the root."""
        real, root = path.resolve(), self.root.resolve()
        if not real.is_relative_to(root):
            # Whoever can drop a symlink into the root must not make the service read arbitrary paths.
            raise BundleError(f"{path}: resolves to {real}, outside the bundle root {root}")
        return self._load(path, variant)

    def _variant_dirs(self) -> list[Path]:
        if not self.root.is_dir():
            raise BundleError(f"bundle root {self.root} is not a directory")
        found = []
        for p in sorted(self.root.iterdir()):
            if not p.is_dir() or p.name.startswith("."):
                continue
            try:
                check_name("variant", p.name)
            except BundleError as e:
                logger.warning("skipping %s: %s", p, e)
                continue
            found.append(p)
        return found

    async def reload(self) -> ReloadReport:
        """Load the newest valid version of every variant that changed; swap atomically."""
        async with self._lock:
            current = self._current
            models = dict(current.models)
            report = ReloadReport()
            for variant_dir in await asyncio.to_thread(self._variant_dirs):
                variant = variant_dir.name
                serving = current.models.get(variant)
                # listing a folder is file-system I/O: off the event loop, like the loads
                for path in reversed(await asyncio.to_thread(list_versions, variant_dir)):
                    if serving is not None and path.name == serving.version:
                        break  # the newest valid version already serves
                    sig = await asyncio.to_thread(_signature, path)
                    known = self._refused.get(path)
                    if known is not None and known[0] == sig:
                        report.refused.append(Refusal(variant, path.name, known[1]))
                        continue
                    started = time.perf_counter()
                    try:
                        model = await asyncio.to_thread(self._load_inside_root, path, variant)
                    except Exception as e:  # any failure to load refuses the bundle, never the service
                        reason = str(e) if isinstance(e, BundleError) else f"{type(e).__name__}: {e}"
                        self._refused[path] = (sig, reason)
                        report.refused.append(Refusal(variant, path.name, reason))
                        self._metrics.reloads.labels(variant, "refused").inc()
                        logger.error("refused bundle %s/%s: %s", variant, path.name, reason)
                        continue
                    self._refused.pop(path, None)
                    models[variant] = model
                    report.loaded.append((variant, model.version))
                    self._metrics.reloads.labels(variant, "loaded").inc()
                    logger.info(
                        "loaded %s/%s (%s, top_k=%d, fm=%d) on %s in %.2fs%s",
                        variant, model.version, model.bundle.manifest.model, model.top_k, model.fm_dim,
                        ",".join(model.providers), time.perf_counter() - started,
                        f", replacing version {serving.version}" if serving else "",
                    )  # fmt: skip
                    break
            for variant, model in models.items():
                report.serving[variant] = model.version
            if report.loaded:
                weights = effective_weights(self.configured_weights, list(models))
                self._current = ModelSet(
                    MappingProxyType(models), MappingProxyType(weights), current.generation + 1
                )
                self._export(current, self._current)
            return report

    def _export(self, old: ModelSet, new: ModelSet) -> None:
        for variant, model in old.models.items():
            if new.models.get(variant) is not model:
                self._metrics.model_info.remove(variant, model.version, model.bundle.manifest.model)
        for variant, model in new.models.items():
            self._metrics.model_info.labels(variant, model.version, model.bundle.manifest.model).set(1)
            self._metrics.variant_weight.labels(variant).set(new.weights.get(variant, 0.0))

    async def watch(self, interval_s: float) -> None:
        """Poll the bundle root forever (cancel to stop); a failed poll is logged, never fatal."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reload()
            except BundleError as e:  # e.g. the root is gone: say so each poll, without a traceback
                logger.warning("bundle watch: %s", e)
            except Exception:
                logger.exception("bundle watch: reload failed")


def require_models(registry: ModelRegistry) -> None:
    """Refuse to start when configured variants are missing entirely from the bundle root."""
    missing = registry.missing_variants()
    if missing and registry.configured_weights is not None:
        raise BundleError(
            f"DARE_VARIANT_WEIGHTS names {missing}, but {registry.root} holds no valid bundle for them"
        )
