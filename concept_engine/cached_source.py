"""A FeatureSource that remembers answers: extract a folder once, run discovery many times.

Used by benchmarks/bench_quality.py (every fine-graining configuration on the same features)
and by tests that discover and explain on the same photos. Results are keyed by (image id,
extraction options without the probability flag); an answer computed WITH probabilities also
serves a request without them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import replace

from feature_server.extractor import ExtractOptions, ExtractResult, FeatureSource

__all__ = ["CachedSource"]


class CachedSource:
    """Wraps ``inner``; ``extract`` asks it only for images not seen with these options.
    Probabilities are always requested from ``inner`` so one pass serves every filter."""

    def __init__(self, inner: FeatureSource) -> None:
        self.inner = inner
        self._results: dict[tuple, ExtractResult] = {}
        self._describe: dict | None = None
        self._names: dict[str | None, list[str]] = {}

    @staticmethod
    def _key(item_id: str, options: ExtractOptions) -> tuple:
        return (item_id, replace(options, return_probabilities=True, top_k=0))

    def extract(self, items: Iterable[tuple[str, bytes]], options: ExtractOptions
                ) -> Iterator[ExtractResult]:
        items = list(items)
        missing = [(i, b) for i, b in items if self._key(i, options) not in self._results]
        if missing:
            full = replace(options, return_probabilities=True)
            for fresh in self.inner.extract(missing, full):
                self._results[self._key(fresh.id, options)] = fresh
        for i, _ in items:
            res = self._results.get(self._key(i, options))
            if res is not None:
                yield res if options.return_probabilities else replace(res, probabilities=None)

    def get(self, item_id: str, options: ExtractOptions) -> ExtractResult | None:
        """The remembered answer for one image (None when it was never extracted)."""
        return self._results.get(self._key(item_id, options))

    def describe(self) -> dict:
        if self._describe is None:
            self._describe = self.inner.describe()
        return self._describe

    def class_names(self, classifier: str | None = None) -> list[str]:
        if classifier not in self._names:
            self._names[classifier] = self.inner.class_names(classifier)
        return self._names[classifier]
