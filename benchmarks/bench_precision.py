"""int8 and fp16 VGG-19 against fp32: throughput and the fidelity of the concept sets, one run.

For every folder of ../shared/data (ant, bee, gymnast, imagenet_sample) the conv5_4 features of
all photos are extracted in-process at each precision (timed: images/s, decode included), then
NMF concept sets are fitted on each (HALS, NNDSVDa, k = 2..5, the discover defaults) and every
reduced-precision set is compared with the fp32 set of the same folder and k:

* bases: Hungarian matching of the k bases (concept_engine.matching), cosine of each pair;
  the table shows the smallest (worst concept);
* heatmaps: Pearson correlation of the matched heatmap columns of W over every position of
  every photo; the table shows the smallest;
* activations: relative L2 error of conv5_4 per photo (mean).

The last lines say whether int8 may be the CPU default (every folder, every k: bases cosine
>= 0.99) and print the CPU model and flags (int8 speed depends on VNNI / AMX).

    .venv/bin/python benchmarks/bench_precision.py [--folders ant,bee] [--k 2-5] [--limit 0]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.sysinfo import cpu_description  # noqa: E402
from concept_engine.matching import match_bases  # noqa: E402
from concept_engine.nmf import nmf_fit, prepare_v  # noqa: E402
from feature_server.extractor import ExtractOptions, Extractor  # noqa: E402
from feature_server.images import read_items  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FOLDERS = {"ant": DATA / "imagenet_data" / "ant", "bee": DATA / "imagenet_data" / "bee",
           "gymnast": DATA / "gymnast", "imagenet_sample": DATA / "imagenet_sample"}
COSINE_GATE = 0.99


def features(extractor: Extractor, items: list[tuple[str, bytes]], model: str
             ) -> tuple[dict[str, np.ndarray], float]:
    """id -> conv5_4 (C, h, w) of the photos that decode, and the seconds it took."""
    options = ExtractOptions(model=model, layers=("conv5_4",))
    t0 = time.perf_counter()
    out = {r.id: r.activations["conv5_4"] for r in extractor.extract(items, options)
           if r.error is None}
    return out, time.perf_counter() - t0


def rows(acts: dict[str, np.ndarray], ids: list[str]) -> np.ndarray:
    return np.concatenate([acts[i].reshape(acts[i].shape[0], -1).T for i in ids])


def compare(V_ref, V_test, k: int) -> tuple[float, float]:
    """(smallest matched bases cosine, smallest matched heatmap correlation) of the fits."""
    ref = nmf_fit(V_ref, k, solver="hals", init="nndsvda", max_iter=200, tol=1e-4)
    test = nmf_fit(V_test, k, solver="hals", init="nndsvda", max_iter=200, tol=1e-4)
    perm, cosines = match_bases(ref.H, test.H)
    corr = [float(np.corrcoef(ref.W[:, a], test.W[:, b])[0, 1]) for a, b in enumerate(perm)]
    return float(cosines.min()), float(np.nan_to_num(min(corr), nan=0.0))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folders", default=",".join(FOLDERS))
    parser.add_argument("--k", default="2-5", help="k range A-B")
    parser.add_argument("--limit", type=int, default=0, help="photos per folder (0 = all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precisions", default="int8,fp16")
    parser.add_argument("--home", default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    k_lo, k_hi = (int(v) for v in args.k.split("-"))
    precisions = [p for p in args.precisions.split(",") if p]
    extractor = Extractor.from_cache(args.home, batch_size=args.batch_size)
    models = {"fp32": "vgg19", **{p: f"vgg19_{p}" for p in precisions}}
    out = sys.stdout
    out.write(f"{cpu_description()}; ONNX Runtime provider {extractor.execution_provider}, "
              f"batch {args.batch_size}\n")
    seconds = dict.fromkeys(models, 0.0)
    n_total = 0
    verdict: dict[str, float] = dict.fromkeys(precisions, 1.0)
    table = []
    for folder in [f for f in args.folders.split(",") if f]:
        paths = read_items(FOLDERS[folder])
        if args.limit:
            paths = paths[:args.limit]
        items = [(i, p.read_bytes()) for i, p in paths]
        list(extractor.extract(items[:2], ExtractOptions(model=models["fp32"])))  # warm-up
        acts = {}
        for prec, model in models.items():
            list(extractor.extract(items[:1], ExtractOptions(model=model)))  # session warm-up
            acts[prec], dt = features(extractor, items, model)
            seconds[prec] += dt
        ids = [i for i, _ in items if i in acts["fp32"]]
        n_total += len(ids)
        V = {p: prepare_v(rows(a, ids)) for p, a in acts.items()}
        for prec in precisions:
            rel = np.mean([np.linalg.norm(acts[prec][i] - acts["fp32"][i])
                           / max(np.linalg.norm(acts["fp32"][i]), 1e-12) for i in ids])
            for k in range(k_lo, k_hi + 1):
                cos, corr = compare(V["fp32"], V[prec], k)
                verdict[prec] = min(verdict[prec], cos)
                table.append((folder, len(ids), prec, k, rel, cos, corr))
    out.write(f"\n{'folder':<16}{'photos':>7}{'prec':>6}{'k':>3}{'act rel L2':>12}"
              f"{'min bases cos':>15}{'min heatmap r':>15}\n")
    for folder, n, prec, k, rel, cos, corr in table:
        out.write(f"{folder:<16}{n:>7}{prec:>6}{k:>3}{rel:>12.4f}{cos:>15.4f}{corr:>15.4f}\n")
    out.write(f"\nthroughput in-process (decode + network), {n_total} photos:\n")
    for prec in models:
        ips = n_total / seconds[prec]
        ratio = seconds["fp32"] / seconds[prec]
        out.write(f"  {prec:<5} {ips:7.2f} img/s  {ratio:5.2f}x fp32\n")
    for prec in precisions:
        ok = verdict[prec] >= COSINE_GATE
        out.write(f"{prec}: smallest matched bases cosine over every folder and k = "
                  f"{verdict[prec]:.4f} -> {'meets' if ok else 'FAILS'} the {COSINE_GATE} "
                  "gate for a default\n")
    out.write(f"{cpu_description()}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
