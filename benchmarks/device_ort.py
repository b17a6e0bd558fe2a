"""ONNX Runtime's CUDA execution provider for benchmarks/device_check.sh, in one carry.

The device machine has no network and its image holds the CPU-only ``onnxruntime``; the
``onnxruntime-gpu`` wheel (255 MB, CUDA 13 build) is four times a carry (64 MiB). Most of it is
the CUDA provider's device code for seven GPU generations. ``--prepare`` (run HERE) downloads
the wheel, keeps only the Python package and the two libraries Python loads (the pybind module
and the CUDA provider; not the C API library, not TensorRT's provider, which needs TensorRT),
blanks the device code of every architecture but the one kept (sm_90 = H100/H200; headers stay,
so the library's layout and offsets are unchanged and the CUDA driver still finds its entry),
and packs the result as ``ort-gpu.tar.xz`` (~58 MiB).

``--install`` (on the device) unpacks it to a folder that goes first on PYTHONPATH, and prints
the folders of the CUDA 13 libraries the provider links against (the image's pip ``nvidia``
packages) for LD_LIBRARY_PATH. ``--check`` builds a one-convolution fp16 model and runs it on
the CUDA provider; it exits 0 only if the session really ran on CUDA.

    python benchmarks/device_ort.py --prepare .device-ort [--version 1.31.1] [--arch 90]
    python benchmarks/device_ort.py --install .device-ort/ort-gpu.tar.xz --target /tmp/dff-ort
    python benchmarks/device_ort.py --check
"""

from __future__ import annotations

import argparse
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
KEEP = ("onnxruntime/capi/onnxruntime_pybind11_state",
        "onnxruntime/capi/libonnxruntime_providers_cuda.so",
        "onnxruntime/capi/libonnxruntime_providers_shared.so")
LINKED = ("libcublas.so.13", "libcublasLt.so.13", "libcudart.so.13", "libcurand.so.10",
          "libcudnn.so.9", "libcufft.so.12", "libnvrtc.so.13")


def _section(path: Path, name: str) -> tuple[int, int]:
    """File offset and size of an ELF section (via readelf)."""
    out = subprocess.run(["readelf", "-S", "-W", str(path)], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        fields = line.replace("[ ", "[").split()
        if name in fields:
            i = fields.index(name)
            return int(fields[i + 3], 16), int(fields[i + 4], 16)
    raise ValueError(f"{path} has no section {name}")


def blank_other_archs(path: Path, keep_arch: int) -> tuple[int, int]:
    """Zero the device code of every architecture but ``keep_arch`` in a shared library's
    ``.nv_fatbin`` section, in place; bytes (kept, zeroed)."""
    data = bytearray(path.read_bytes())
    start, size = _section(path, ".nv_fatbin")
    kept, zeroed = blank_fatbin(data, start, size, keep_arch)
    if kept == 0:
        raise ValueError(f"{path}: no device code for sm_{keep_arch}")
    path.write_bytes(bytes(data))
    return kept, zeroed


def blank_fatbin(data: bytearray, start: int, size: int, keep_arch: int) -> tuple[int, int]:
    """Zero, in ``data[start:start + size]`` (a run of fatbin blobs), the payload of every entry
    not built for ``keep_arch``; bytes (kept, zeroed). Blob: magic, version (u16), header size
    (u16), size (u64); entry: kind (u16), version (u16), header size (u32), payload size (u64),
    ..., architecture (u32 at offset 28)."""
    kept = zeroed = 0
    i, end = start, start + size
    while i + 16 <= end:
        magic, _version, header, fat_size = struct.unpack_from("<IHHQ", data, i)
        if magic != FATBIN_MAGIC:  # blobs are 8-byte aligned with padding between them
            i += 8
            continue
        j, blob_end = i + header, i + header + fat_size
        while j < blob_end:
            _kind, _ev, entry_header, payload = struct.unpack_from("<HHIQ", data, j)
            arch = struct.unpack_from("<I", data, j + 28)[0]
            if arch == keep_arch:
                kept += payload
            else:
                data[j + entry_header:j + entry_header + payload] = bytes(payload)
                zeroed += payload
            j += entry_header + payload
        i = blob_end
    return kept, zeroed


def prepare(target: Path, version: str, arch: int) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps",
                        "--only-binary=:all:", "--python-version", "3.12", "--implementation",
                        "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                        "manylinux_2_17_x86_64", "-d", tmp, f"onnxruntime-gpu=={version}"],
                       check=True)
        wheel = next(Path(tmp).glob("onnxruntime_gpu-*.whl"))
        unpacked = Path(tmp) / "pkg"
        with zipfile.ZipFile(wheel) as zf:
            for member in zf.namelist():
                top = member.split("/")[0]
                if member.endswith(".so") or ".so." in member:
                    if not member.startswith(KEEP):
                        continue
                elif top == "onnxruntime" and member.split("/")[1] in ("transformers", "tools"):
                    continue
                zf.extract(member, unpacked)
        kept, zeroed = blank_other_archs(
            unpacked / "onnxruntime/capi/libonnxruntime_providers_cuda.so", arch)
        print(f"CUDA provider: kept {kept / 2**20:.1f} MiB of sm_{arch} code, blanked "
              f"{zeroed / 2**20:.1f} MiB of other architectures")
        out = target / "ort-gpu.tar.xz"
        with tarfile.open(out, "w:xz", preset=6) as tf:
            tf.add(unpacked, arcname=".")
    print(f"{out}: {out.stat().st_size / 2**20:.1f} MiB")
    return out


def install(pack: Path, target: Path) -> None:
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(pack) as tf:
        tf.extractall(target, filter="data")


def library_dirs() -> list[str]:
    """Folders holding the CUDA libraries the provider needs (pip ``nvidia`` packages)."""
    import site

    found: dict[str, str] = {}
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        root = Path(base) / "nvidia"
        if not root.is_dir():
            continue
        for lib in LINKED:
            for hit in root.rglob(lib):
                found.setdefault(lib, str(hit.parent))
    return sorted(set(found.values()))


def check() -> int:
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    print("onnxruntime", ort.__version__, ort.__file__, ort.get_available_providers())
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal(
        (64, 3, 3, 3)).astype(np.float16), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "smoke",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [8, 3, 224, 224])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(),
                                providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    x = np.ones((8, 3, 224, 224), np.float16)
    y = sess.run(None, {"x": x})[0]
    ref = np.asarray(onnx.numpy_helper.to_array(w), np.float32).sum(axis=(1, 2, 3))
    ok = sess.get_providers()[0] == "CUDAExecutionProvider" and np.allclose(
        y[0, :, 100, 100].astype(np.float32), ref, rtol=1e-2, atol=1e-2)
    print("session providers", sess.get_providers(), "result", "ok" if ok else "WRONG")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prepare", type=Path, metavar="DIR")
    mode.add_argument("--install", type=Path, metavar="PACK")
    mode.add_argument("--lib-dirs", action="store_true", help="print LD_LIBRARY_PATH folders")
    mode.add_argument("--check", action="store_true")
    parser.add_argument("--target", type=Path, default=Path("/tmp/dff-ort"))
    parser.add_argument("--version", default="1.31.1")
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args(argv)
    if args.prepare:
        prepare(args.prepare, args.version, args.arch)
    elif args.install:
        install(args.install, args.target)
    elif args.lib_dirs:
        print(":".join(library_dirs()))
    else:
        return check()
    return 0


if __name__ == "__main__":
    sys.exit(main())
