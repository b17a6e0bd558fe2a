"""A deterministic stand-in for a feature server (a FeatureSource test double).

Images are small synthetic PNGs (``make_image``): a blue background, a red disc and a green
rectangle placed by a seed. "Activations" are a fixed non-negative mixing of the colour channels
at stride 16 plus seeded noise, so a DFF with k=3 finds three colour concepts whose regions are
known. Class probabilities come from a per-id table (default: 0.99 for ``target``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator

import cv2
import numpy as np
from dff_protos.errors import InvalidInput

from feature_server.extractor import ExtractOptions, ExtractResult

CLASS_NAMES = ["ant", "bee", "tabby cat", "golden retriever"]
CLASS_WNIDS = ["n02219486", "n02206856", "n02123045", "n02099601"]
CHANNELS = 16
STRIDE = 16


def make_image(seed: int, size: tuple[int, int] = (96, 128)) -> bytes:
    """PNG bytes of a (height, width) image: blue background, red disc, green rectangle."""
    rng = np.random.default_rng(seed)
    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    img[:] = (200, 40, 40)  # BGR blue
    cy, cx = int(rng.integers(h // 4, 3 * h // 4 + 1)), int(rng.integers(w // 4, w // 2 + 1))
    cv2.circle(img, (cx, cy), max(3, min(h, w) // 5), (30, 30, 220), -1)
    x0, y0 = int(rng.integers(w // 2, max(w // 2 + 1, 3 * w // 4))), int(rng.integers(0, h // 2))
    cv2.rectangle(img, (x0, y0), (min(w - 1, x0 + w // 5), min(h - 1, y0 + h // 3)),
                  (40, 200, 40), -1)
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


class FakeSource:
    """FeatureSource over synthetic images; counts calls so tests can check 'extract once'."""

    def __init__(self, probabilities: dict[str, float] | None = None, target: str = "ant",
                 noise: float = 0.05):
        self.probabilities = dict(probabilities or {})
        self.target = CLASS_NAMES.index(target)
        self.noise = noise
        mix = np.random.default_rng(1234).random((CHANNELS, 3)).astype(np.float32)
        mix[:, :] *= (np.arange(CHANNELS)[:, None] % 3 == np.arange(3)[None, :]) * 4 + 0.2
        self.mix = mix
        self.calls = 0
        self.items_seen = 0

    def class_names(self, classifier: str | None = None) -> list[str]:
        return list(CLASS_NAMES)

    def describe(self) -> dict:
        return {"models": [
            {"name": "vgg19", "kind": "features", "weights_sha256": "f" * 64,
             "onnx_sha256": "e" * 64, "preprocessing": {"color_order": "BGR"}},
            {"name": "efficientnet_lite0", "kind": "classifier", "weights_sha256": "c" * 64,
             "class_names": list(CLASS_NAMES), "class_wnids": list(CLASS_WNIDS)}],
            "execution_provider": "FakeExecutionProvider"}

    def _input_size(self, h: int, w: int, options: ExtractOptions) -> tuple[int, int]:
        if options.resize_mode == "squash":
            return options.size, options.size
        scale = options.size / max(h, w)
        return max(STRIDE, round(h * scale)), max(STRIDE, round(w * scale))

    def extract(self, items: Iterable[tuple[str, bytes]], options: ExtractOptions
                ) -> Iterator[ExtractResult]:
        self.calls += 1
        for item_id, data in items:
            self.items_seen += 1
            img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
            if img is None:
                yield ExtractResult(item_id, error=InvalidInput(f"cannot decode {item_id}"))
                continue
            if options.layers != ("conv5_4",):
                yield ExtractResult(item_id, error=InvalidInput("unknown layer"))
                continue
            h, w = img.shape[:2]
            ih, iw = self._input_size(h, w, options)
            fh, fw = max(1, ih // STRIDE), max(1, iw // STRIDE)
            small = cv2.resize(img, (fw, fh), interpolation=cv2.INTER_AREA).astype(np.float32)
            act = np.einsum("cj,hwj->chw", self.mix, small / 255.0)
            rng = np.random.default_rng(zlib.crc32(item_id.encode()))
            act = np.maximum(act + self.noise * rng.random(act.shape), 0).astype(np.float32)
            probs = None
            if options.return_probabilities:
                p = self.probabilities.get(item_id, 0.99)
                probs = np.full(len(CLASS_NAMES), (1 - p) / (len(CLASS_NAMES) - 1), np.float32)
                probs[self.target] = p
            yield ExtractResult(item_id, {"conv5_4": act}, probs, [], (h, w), (ih, iw))


def make_items(n: int, prefix: str = "img", size: tuple[int, int] = (96, 128),
               start: int = 0) -> list[tuple[str, bytes]]:
    return [(f"{prefix}{i:03d}.png", make_image(i, size)) for i in range(start, start + n)]
