"""The one table of benchmarks/device_check.sh, from the logs and JSON files its steps wrote.

    python benchmarks/device_report.py LOGS_DIR DISCOVER_OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.is_file() else ""


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def report(logs: Path, out: Path) -> str:
    lines = []
    gpu = _read(logs / "gpu.txt").strip() or "no GPU (nvidia-smi absent)"
    lines.append(f"device: {gpu}")
    lines.append(f"software: {_read(logs / 'env.txt').strip()}")
    feats = _json(logs / "features.json")
    if feats:
        lines.append(f"host CPU: {feats.get('cpu', '')}")
    tests = _read(logs / "tests.log")
    summary = [ln for ln in tests.splitlines() if re.search(r"passed|failed|skipped|error", ln)]
    lines.append(f"gpu tests: {summary[-2] if len(summary) > 1 else (summary or ['-'])[-1]}")
    lines.append("")
    lines.append(f"{'what':<44}{'value':>14}  note")
    if feats:
        provider = feats.get("provider", "?")
        for row in feats.get("rows", []):
            path = row["path"]
            if path.startswith(("ORT only", "ORT on GPU", "in-process fp", "in-process int",
                                "gRPC fp", "gRPC int", "gRPC served", "gRPC pixels", "no-compute",
                                "scale-out")):
                label = path if row.get("wire", "-") == "-" else f"{path} {row['wire']}"
                lines.append(f"{'features ' + label:<44}{row['img_s']:>10.1f} img/s  "
                             f"{provider}, {feats.get('images')} images")
        for prec, cpu in feats.get("served_cpu_ms_per_image", {}).items():
            for side in ("server", "client"):
                if cpu.get(side) is not None:
                    label = f"{side} CPU per image, {prec}"
                    lines.append(f"{label:<44}{cpu[side]:>11.2f} ms")
    elif (logs / "features.log").exists():  # the step ran (it is skipped with DFF_DEVICE_STEPS)
        lines.append(f"{'features':<44}{'-':>14}  benchmark failed (features.log)")
    scale_rows = [row for path in sorted(logs.glob("scale_out*.json"))
                  for row in _json(path).get("scale_out", [])]
    for row in scale_rows:
        cpu = "" if row.get("server_ms") is None else f", server CPU {row['server_ms']:.2f} ms/img"
        if row.get("mean_batch") is not None:
            cpu += f", mean batch {row['mean_batch']:.1f}"
        lines.append(f"{row['path']:<44}{row['img_s']:>10.1f} img/s  {row['images']} images"
                     f"{cpu}")
    ref = _json(logs / "torch_ref.json")
    for row in ref.get("rows", []):
        lines.append(f"{'torch fp16 conv5_4 batch ' + str(row['batch']):<44}"
                     f"{row['img_s']:>10.0f} img/s  network only, {ref.get('device', '')}")
    nmf = _json(logs / "nmf.json")
    for row in nmf.get("rows", []):
        lines.append(f"{'NMF ' + row['name'] + ' N=' + str(nmf['N']) + ' k=' + str(nmf['k']):<44}"
                     f"{row['ms_per_iter']:>11.1f} ms  per iteration ({row['n_iter']} it)")
    if nmf:
        lines.append(f"{'one dense read of V (host)':<44}{nmf['read_ms']:>11.1f} ms")
        if nmf.get("csr_init_s") is not None:
            lines.append(f"{'NNDSVDa start on CSR V':<44}{nmf['csr_init_s'] * 1e3:>11.1f} ms")
    ks = _json(logs / "ksweep.json")
    for row in ks.get("rows", []):
        gpu = (f", GPU {row['gpu_s']:.2f} s = {row['gpu_over_host']:.2f}x"
               f"{'' if row['gpu_k'] == row['host_k'] else ' (another k)'}"
               if "gpu_s" in row else "")
        lines.append(f"{'k sweep, ' + str(row['images']) + ' images':<44}"
                     f"{row['host_s']:>12.2f} s  host ({row['rows']} rows){gpu}")
    export = _json(logs / "export.json")
    for label, mode in export.get("modes", {}).items():
        st = mode["stages"]
        feats = st.get("features", 0.0)
        others = ", ".join(f"{k} {v:.1f}" for k, v in sorted(st.items())
                           if k not in ("features", "total") and v >= 0.05)
        lines.append(f"{'3-class export, ' + label:<44}{mode['wall']:>12.1f} s  wall; "
                     f"extraction {feats:.1f} s ({mode['wall'] / max(feats, 1e-9):.2f}x); "
                     f"{others}")
    if export:
        lines.append(f"{'3-class export, pipelined / extraction':<44}"
                     f"{export['pipelined_wall_over_extraction']:>13.2f}x  the sequential run's "
                     f"extraction (target <= 1.15); classes {export.get('classes')}")
    disc = _read(logs / "discover.log")
    walls = re.findall(r"discover (cold|gpu-engine|warm) rc=(\d+) wall_ms=(\d+)", disc)
    summaries = sorted(out.glob("*/summary.json")) if out.is_dir() else []
    for run, rc, ms in walls:
        note = {"cold": "first run: compiles CuPy/Numba kernels",
                "gpu-engine": "concept engine forced onto the GPU (DFF_GPU_MIN_ROWS=0)",
                }.get(run, "kernels cached on disk")
        lines.append(f"{'dff discover, ' + run + ' (rc ' + rc + ')':<44}"
                     f"{int(ms) / 1e3:>12.1f} s  wall, process start included; {note}")
    # each run logs its sessions (-v): what the warm run's feature stage spent making them
    runs = re.split(r"discover (?:cold|gpu-engine|warm) rc=\d+ wall_ms=\d+", disc)
    if len(runs) > 1:
        made = [float(v) for v in re.findall(r"session made in ([0-9.]+) s", runs[-2])]
        if made:
            lines.append(f"{'dff discover, warm: sessions made':<44}{sum(made):>12.2f} s  "
                         f"{len(made)} sessions (features, classifier)")
    times = re.findall(r"time: (.*)", disc)
    if times:
        lines.append(f"  stage seconds ({walls[-1][0] if walls else 'last'} run): {times[-1]}")
    for path in summaries:
        data = _json(path)
        stages = data.get("stage_seconds", {})
        total = sum(v for k, v in stages.items() if k != "total") or 1.0
        shares = ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stages.items()
                           if k != "total")
        lines.append(f"  {path.parent.name}: {data.get('n_images', '?')} images, k="
                     f"{data.get('k', '?')}; stages: {shares}")
    if not summaries and disc:
        tail = disc.strip().splitlines()[-3:]
        lines.append("  discover produced no summary: " + " | ".join(tail))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] in ("-h", "--help"):
        out = sys.stdout if args[:1] in (["-h"], ["--help"]) else sys.stderr
        out.write(f"usage: python benchmarks/device_report.py LOGS WORK\n{__doc__ or ''}")
        return 0 if out is sys.stdout else 2
    sys.stdout.write(report(Path(args[0]), Path(args[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
