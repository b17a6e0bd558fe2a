"""Fit the temperature of the ``calibrated`` prediction filter mode.

    python benchmarks/calibrate_temperature.py [--data ../shared/data/imagenet_sample]

Runs the classifier (EfficientNet-Lite0, classifier outputs only) over labelled ImageNet photos
(file names ``<wnid>_<name>.JPEG``), and fits the temperature T of softmax(log p / T) by
maximum likelihood of the true classes (a 1-D search over log T). Prints T, the negative log
likelihood and the expected calibration error (15 bins) before and after, and the mean
probability of the true class. The number goes into
``concept_engine/options.py:CALIBRATION_TEMPERATURE``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np


def _ece(conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.mean() * abs(conf[m].mean() - correct[m].mean())
    return float(total)


def main() -> None:
    from concept_engine.finegrain import calibrate
    from feature_server.extractor import ExtractOptions, Extractor

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parents[1]
    ap.add_argument("--data", type=Path, default=here.parent / "shared/data/imagenet_sample")
    args = ap.parse_args()
    ex = Extractor.from_cache(os.environ.get("DFF_HOME"))
    info = next(m for m in ex.describe()["models"] if m.get("name") == "efficientnet_lite0")
    wnids = list(info["class_wnids"])
    paths = sorted(p for p in args.data.iterdir() if p.is_file())
    items = [(p.name, p.read_bytes()) for p in paths]
    label = {p.name: wnids.index(p.name.split("_")[0]) for p in paths
             if p.name.split("_")[0] in wnids}
    probs, y = [], []
    for res in ex.extract(items, ExtractOptions(layers=(), return_probabilities=True)):
        if res.error is None and res.id in label:
            probs.append(np.asarray(res.probabilities, np.float64))
            y.append(label[res.id])
    P, y = np.stack(probs), np.asarray(y)

    def nll(t: float) -> float:
        q = calibrate(P, t)[np.arange(len(y)), y]
        return float(-np.mean(np.log(np.clip(q, 1e-12, None))))

    grid = np.exp(np.linspace(np.log(0.2), np.log(5.0), 401))
    best = float(grid[int(np.argmin([nll(t) for t in grid]))])
    for name, t in (("uncalibrated", 1.0), ("calibrated", best)):
        q = calibrate(P, t)
        conf, pred = q.max(axis=1), q.argmax(axis=1)
        print(f"{name:13s} T={t:.3f}  NLL={nll(t):.4f}  ECE={_ece(conf, pred == y):.4f}  "
              f"top-1={np.mean(pred == y):.3f}  mean p(true)={q[np.arange(len(y)), y].mean():.3f}"
              f"  p(true)>=0.95: {np.mean(q[np.arange(len(y)), y] >= 0.95):.2f}")
    print(f"images: {len(y)}; CALIBRATION_TEMPERATURE = {best:.3f}")


if __name__ == "__main__":
    main()
