"""Multi-class `dff discover`: wall time against feature-extraction time, pipelined (class i's
fit/render/write overlapping class i+1's extraction) and strictly sequential, in one run.

    python benchmarks/bench_export.py --classes ant,bee,gymnast --images 40

Classes come from ../shared/data, or --data-root (imagenet_data/<name> or <name>); each gets
at most --images photos (sorted; symlinked into a temporary folder). Prints, per mode: wall, the
sum of the classes' feature-extraction seconds, wall / features, and the other stages; then the
pipelined wall against the sequential run's extraction (the extraction alone, not slowed by the
overlap: the target's ratio); and the CPU. ``--json`` also writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


def cpu() -> str:
    model, flags = "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "unknown":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags |= set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = sorted(flags & {"avx512_vnni", "avx512_bf16", "amx_tile", "avx512f", "avx2"})
    return f"{model}; {os.cpu_count()} CPUs; flags {' '.join(wanted) or '-'}"


def make_data(root: Path, classes: list[str], n: int, shared: Path = SHARED) -> Path:
    data = root / "data"
    for name in classes:
        src = next((p for p in (shared / "imagenet_data" / name, shared / name) if p.is_dir()),
                   None)
        if src is None:
            raise SystemExit(f"no class folder {name} under {shared}")
        photos = sorted(p for p in src.iterdir()
                        if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:n]
        (data / name).mkdir(parents=True)
        for p in photos:
            os.symlink(p, data / name / p.name)
    return data


def run(data: Path, out: Path, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "exporter.cli", "discover", str(data), "--out", str(out),
           "--no-progress", *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    if res.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    stages: dict[str, float] = {}
    for summary in sorted(out.glob("*/summary.json")):
        for k, v in json.loads(summary.read_text())["stage_seconds"].items():
            stages[k] = stages.get(k, 0.0) + float(v)
    return {"wall": wall, "stages": stages}


def _bases(class_dir: Path) -> bytes:
    import h5py
    import numpy as np

    with h5py.File(class_dir / "concepts.h5") as f:
        return np.asarray(f["bases"]).tobytes()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--classes", default="ant,bee,gymnast", help="(default: %(default)s)")
    ap.add_argument("--images", type=int, default=40, help="per class (default: %(default)s)")
    ap.add_argument("--args", default="", help="more `dff discover` arguments, e.g. '--k 3'")
    ap.add_argument("--data-root", type=Path, default=SHARED,
                    help="where the class folders are (default: ../shared/data)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    a = ap.parse_args()
    classes = a.classes.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
        data = make_data(Path(tmp), classes, a.images, a.data_root)
        counts = {c: len(list((data / c).iterdir())) for c in classes}
        # a first short run builds/loads the models and warms the file cache (not measured)
        run(data, Path(tmp) / "warm", ["--k", "2", "--no-certainty-filter",
                                       "--no-prediction-filter", "--shard", "0/3"])
        rows = []
        for label, extra in (("sequential", ["--no-pipeline"]), ("pipelined", ["--pipeline"])):
            r = run(data, Path(tmp) / label, [*extra, *a.args.split()])
            rows.append((label, r))
        same = all(_bases(Path(tmp) / "sequential" / c) == _bases(Path(tmp) / "pipelined" / c)
                   for c in classes)
    print(f"CPU: {cpu()}")
    print(f"classes: {counts}")
    print(f"{'mode':<11} {'wall s':>7} {'features s':>10} {'wall/feat':>9}  other stages (s)")
    for label, r in rows:
        st = r["stages"]
        feats = st.get("features", 0.0)
        other = ", ".join(f"{k} {v:.1f}" for k, v in sorted(st.items())
                          if k not in ("features", "total") and v >= 0.05)
        print(f"{label:<11} {r['wall']:7.1f} {feats:10.1f} {r['wall'] / feats:9.2f}  {other}")
    seq, pipe = rows[0][1]["wall"], rows[1][1]["wall"]
    seq_feats = rows[0][1]["stages"].get("features", 0.0)
    print(f"pipelined / sequential wall: {pipe / seq:.2f}; same concept bases in both modes: "
          f"{'yes' if same else 'NO'}")
    print(f"pipelined wall / the sequential run's extraction: {pipe / seq_feats:.2f}")
    if a.json:
        a.json.write_text(json.dumps({
            "cpu": cpu(), "classes": counts, "same_bases": same,
            "modes": {label: {"wall": r["wall"], "stages": r["stages"]} for label, r in rows},
            "pipelined_wall_over_extraction": pipe / seq_feats}, indent=1))


if __name__ == "__main__":
    main()
