"""How fine-graining and the k criterion change the reliability of concept sets (issue 8).

    nice python benchmarks/bench_quality.py [--data ../shared/data] [--max-images N]

For every folder (ant, bee, and "ant+others": the ant photos mixed with the 89 photos of other
classes in imagenet_sample, to see whether a filter removes intruders) and every filter
configuration - no filter, prediction filter only (three rules: p >= 0.95, target in the top 5,
calibrated p >= 0.95), certainty filter only, both - one discovery runs on features extracted
ONCE (in memory, concept_engine.cached_source) with every k criterion's curve recorded; then
for each criterion (stability = split-half, instability = staNMF, certainty = the seed's, elbow)
the chosen k is read off its curve. Printed per row: images kept (of the decodable ones),
intruders kept (ant+others), chosen k, split-half stability at that k, and the mean
per-concept bootstrap stability at that k. Fits are shared through a FitCache across
configurations that keep the same images.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

CONFIGS = [  # label, prediction_filter, prediction_mode, certainty_filter
    ("none", "off", "probability", "off"),
    ("pred p>=.95", "on", "probability", "off"),
    ("pred top5", "on", "top_n", "off"),
    ("pred calib", "on", "calibrated", "off"),
    ("certainty", "off", "probability", "on"),
    ("both top5", "on", "top_n", "on"),
    ("both calib", "on", "calibrated", "on"),
]
CRITERIA = ("stability", "instability", "certainty", "elbow")


def _items(folder: Path, prefix: str = "") -> list[tuple[str, bytes]]:
    return [(prefix + p.name, p.read_bytes()) for p in sorted(folder.iterdir()) if p.is_file()]


def main() -> None:
    from concept_engine.cached_source import CachedSource
    from concept_engine.discovery import DiscoveryOptions, FitCache, discover
    from concept_engine.kselect import CRITERIA as KC
    from concept_engine.nmf import prepare_v
    from concept_engine.reliability import bootstrap_stability
    from feature_server.extractor import ExtractOptions, Extractor

    here = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=here.parent / "shared" / "data")
    ap.add_argument("--max-images", type=int, default=0, help="per folder (0 = all)")
    ap.add_argument("--folders", default="ant,bee,ant+others")
    ap.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    ants = _items(args.data / "imagenet_data" / "ant")
    bees = _items(args.data / "imagenet_data" / "bee")
    others = _items(args.data / "imagenet_sample", "other/")
    folders = {"ant": ("ant", ants), "bee": ("bee", bees), "ant+others": ("ant", ants + others)}
    source = CachedSource(Extractor.from_cache(os.environ.get("DFF_HOME"), batch_size=8))
    t0 = time.perf_counter()
    for name in args.folders.split(","):
        cls, items = folders[name]
        list(source.extract(items[:args.max_images or None], ExtractOptions()))
    print(f"features extracted once in {time.perf_counter() - t0:.0f}s")
    header = ("| folder | filters | criterion | kept / decodable | intruders kept | k | "
              "split-half | mean concept stability | s |")
    print(header)
    print("|" + "---|" * 9)
    for name in args.folders.split(","):
        cls, items = folders[name]
        items = items[:args.max_images or None]
        cache = FitCache()
        decodable = None
        for label, pmode, prule, cmode in CONFIGS:
            if label not in args.configs.split(","):
                continue
            opts = DiscoveryOptions(name=cls, prediction_filter=pmode, prediction_mode=prule,
                                    certainty_filter=cmode, k_criterion="instability",
                                    bootstrap=0)
            t = time.perf_counter()
            cs = discover(items, source, opts, cache=cache)
            secs = time.perf_counter() - t
            if decodable is None:
                decodable = len(items) - sum(d.stage == "error" for d in cs.decisions)
            intruders = sum(i.startswith("other/") for i in cs.image_ids)
            acts = [np.maximum(source.get(i, opts.extract_options()).activations[opts.layer], 0)
                    for i in cs.image_ids]
            sizes = [(int(a.shape[1]), int(a.shape[2])) for a in acts]
            V = prepare_v(np.concatenate([a.reshape(a.shape[0], -1).T for a in acts]))
            boot: dict[int, float] = {}
            for crit in CRITERIA:
                k, _ = KC[crit]().choose(cs.k_curves[crit])
                if k not in boot:
                    fit = cache.fit(V, cs.image_ids, k, replace(opts, k=k))
                    stab, _ = bootstrap_stability(V, sizes, fit.W, fit.H, seed=0)
                    boot[k] = float(np.mean(stab))
                split = cs.k_curves["stability"][k]
                print(f"| {name} | {label} | {crit} | {cs.n_images} / {decodable} | "
                      f"{intruders if name == 'ant+others' else '-'} | {k} | {split:.3f} | "
                      f"{boot[k]:.3f} | {secs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
