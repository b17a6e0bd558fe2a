"""The pure in-process core of the feature server (no grpc): ONNX Runtime sessions over the
built models, image preparation, batched inference and results.

The gRPC servicer (service.py) is a thin adapter over :class:`Extractor`; the concept engine
uses an Extractor directly when no feature-server address is given (the embedded default).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from dff_protos.errors import DataLoss, DFFError, ImageTooLarge, InvalidInput, NotFound

from feature_server.images import (
    DecodeLimits,
    decode_image,
    network_input_size,
    pixels_to_image,
    preprocess,
)
from feature_server.kernels import all_finite, float_to_half, half_to_float
from feature_server.models.precision import PRECISIONS, variant_name
from feature_server.models.registry import (
    DEFAULT_CLASSIFIER,
    DEFAULT_FEATURE_MODEL,
    ModelSpec,
    ensure_models,
    get_spec,
)
from feature_server.pinned import PinnedPool
from feature_server.pinned import pool as pinned_pool
from feature_server.sparse import SparseActivation, from_dense

log = logging.getLogger(__name__)

RESIZE_MODES = ("squash", "keep_aspect")
WIRE_DTYPES = ("float32", "float16")
MIN_SIZE, MAX_SIZE = 32, 2048
DEFAULT_LIMITS = DecodeLimits()
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
#: The precision ``--precision auto`` picks on a CPU when the int8 model is built. Decided by
#: benchmarks/bench_precision.py: on every folder of ../shared/data the int8 concept sets matched
#: the fp32 ones (bases' matched cosine >= 0.99; figures in README "Precision").
CPU_DEFAULT_PRECISION = "int8"
#: ... and on CUDA / TensorRT.
GPU_DEFAULT_PRECISION = "fp16"


def precision_model(model: str, precision: str) -> str:
    """The registry name of ``model`` at ``precision`` (``vgg19`` + int8 -> ``vgg19_int8``);
    ``model`` may itself be a variant. An unknown precision leaves ``model`` unchanged (the
    Extractor's validation reports it)."""
    if precision not in PRECISIONS:
        return model
    base = model
    for p in PRECISIONS[1:]:
        if base.endswith(f"_{p}"):
            base = base[: -len(p) - 1]
    return variant_name(base, precision)


def auto_precision(execution_provider: str, precisions: Iterable[str]) -> str:
    """The default precision of a source: fp16 on CUDA/TensorRT, int8 on CPU (when built)."""
    available = set(precisions)
    wanted = (GPU_DEFAULT_PRECISION if execution_provider in GPU_PROVIDERS
              else CPU_DEFAULT_PRECISION)
    return wanted if wanted in available else "fp32"


def choose_model(describe: dict, model: str, precision: str) -> str:
    """The feature model to request from a source for ``--precision`` (``auto`` = the source's
    ``default_precision``); raises NotFound when the source lacks that variant."""
    auto = precision == "auto"
    if auto:
        precision = describe.get("default_precision") or "fp32"
    name = precision_model(model, precision)
    names = [m.get("name") for m in describe.get("models", [])]
    if name not in names and auto:
        return model  # auto: a model without that variant (e.g. an imported one) runs as built
    if name not in names:
        raise NotFound(f"model {name!r} ({precision}) is not available from the feature source "
                       f"(models: {names}); run `dff models build`")
    return name


@dataclass(frozen=True)
class ExtractOptions:
    """What to compute for each image (mirrors dff.v1.ExtractOptions)."""

    model: str = DEFAULT_FEATURE_MODEL
    layers: tuple[str, ...] = ("conv5_4",)  # () = classifier outputs only (in-process)
    wire_dtype: str = "float32"     # 'float16' rounds activations through fp16
    resize_mode: str = "squash"     # 'squash' (seed: size x size) | 'keep_aspect' (max side)
    size: int = 224
    return_probabilities: bool = False
    top_k: int = 0
    classifier: str = DEFAULT_CLASSIFIER
    #: '' = ``model`` as named; 'fp32' | 'int8' | 'fp16' selects that variant of ``model``
    #: (``model`` is then rewritten to the variant's registry name, e.g. ``vgg19_int8``).
    precision: str = ""
    #: activations as :class:`~feature_server.sparse.SparseActivation` (CSR rows over the
    #: positions; lossless) instead of dense arrays: 10-15x fewer bytes on the wire after a ReLU
    sparse: bool = False

    def __post_init__(self) -> None:
        if self.precision:
            object.__setattr__(self, "model", precision_model(self.model, self.precision))

    @property
    def wants_classifier(self) -> bool:
        return self.return_probabilities or self.top_k > 0


#: one layer's activation in a result: dense (C, h, w) or sparse rows (ExtractOptions.sparse)
Activation = np.ndarray | SparseActivation


@dataclass
class ExtractResult:
    """One image's outcome. ``error`` set => the other fields are empty."""

    id: str
    #: layer -> (C, h, w) float32, or SparseActivation when the options asked for ``sparse``
    activations: dict[str, Activation] = field(default_factory=dict)
    probabilities: np.ndarray | None = None  # (num_classes,) float32
    top_k: list[tuple[int, str, float]] = field(default_factory=list)
    original_size: tuple[int, int] = (0, 0)  # (height, width) of the decoded image
    input_size: tuple[int, int] = (0, 0)     # (height, width) fed to the network
    error: DFFError | None = None


@dataclass
class Prepared:
    """A decoded, preprocessed image ready for the batcher."""

    id: str
    features_input: np.ndarray | None   # (3, h, w) float32 (float16 for a half-IO model);
    #                                     None when no layer is asked
    classifier_input: np.ndarray | None  # (3, 224, 224) float32 when the classifier is asked
    original_size: tuple[int, int]
    input_size: tuple[int, int]


#: One image as the sources take it: an encoded file (JPEG, PNG, ...), or pixels the caller
#: decoded itself - uint8 (height, width, 3), BGR order (see images.decode_pixels) - which skip
#: decoding and go on exactly as the decoded file would.
ImageData = bytes | np.ndarray


def _check_stride(spec: ModelSpec, options: ExtractOptions, original: tuple[int, int],
                  net_in: Sequence[int]) -> None:
    """InvalidInput when the network input (h, w) is thinner than the asked layers' stride."""
    need = max(spec.layers[layer][1] for layer in options.layers)
    if min(net_in) < need:
        raise InvalidInput(
            f"image {original[1]}x{original[0]} becomes {net_in[1]}x{net_in[0]} with "
            f"{options.resize_mode} {options.size}: too thin for {list(options.layers)} "
            f"(stride {need}); use squash or a larger size")


def _checked_input(x: np.ndarray | None, want: tuple[int, int], what: str) -> np.ndarray:
    """A client-made network input: float32 or float16, shape (3, *want), finite."""
    if x is None:
        raise InvalidInput(f"prepared image: {what} missing")
    if x.dtype not in (np.float32, np.float16):
        raise InvalidInput(f"prepared image: {what} must be float32 or float16, got {x.dtype}")
    if tuple(x.shape) != (3, *want):
        raise InvalidInput(f"prepared image: {what} has shape {tuple(x.shape)}, expected "
                           f"{(3, *want)} for these options and the original size")
    if not all_finite(x):
        raise InvalidInput(f"prepared image: {what} is not finite")
    return x


class FeatureSource(Protocol):
    """What the concept engine consumes: in-process Extractor or gRPC FeatureClient."""

    def extract(self, items: Iterable[tuple[str, ImageData]], options: ExtractOptions
                ) -> Iterator[ExtractResult]: ...

    def describe(self) -> dict: ...

    def class_names(self, classifier: str | None = None) -> list[str]: ...


def select_providers(requested: Sequence[str] | None = None) -> list[str]:
    """ONNX Runtime execution providers: CUDA when available (then CPU), else CPU.

    ``requested`` (e.g. ['CPUExecutionProvider']) narrows the choice to those available.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        chosen = [p for p in requested if p in available]
        if not chosen:
            raise InvalidInput(f"none of the providers {list(requested)} is available "
                               f"(available: {available})")
        return chosen
    preferred = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if os.environ.get("DFF_TENSORRT") == "1":
        # opt-in: TensorRT builds an engine per new input shape (minutes, cached in
        # $DFF_HOME/trt); CUDA then CPU take the nodes it does not support
        preferred.insert(0, "TensorrtExecutionProvider")
    return [p for p in preferred if p in available] or ["CPUExecutionProvider"]


def provider_options(providers: Sequence[str], home: str | os.PathLike[str] | None = None
                     ) -> list[tuple[str, dict[str, str]] | str]:
    """Providers with their options: TensorRT in fp16 with an engine cache (engines are built
    once per shape and reused across processes), CUDA with NHWC convolutions and cuDNN's
    heuristic algorithm choice."""
    from feature_server.models.registry import dff_home

    out: list[tuple[str, dict[str, str]] | str] = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            cache = dff_home(home) / "trt"
            out.append((p, {"trt_fp16_enable": "True", "trt_engine_cache_enable": "True",
                            "trt_engine_cache_path": str(cache)}))
        elif p == "CUDAExecutionProvider":
            # Measured on an H200 (fp16 VGG-19 cut at conv5_4, input on the device):
            # NHWC convolutions 6834 img/s at batch 128, 5390 without (builds without NHWC
            # kernels ignore the option). cuDNN's heuristic choice is as fast as the exhaustive
            # search at a fixed batch (6693 vs 6608 img/s at 64), and the exhaustive search
            # runs again for every new batch size, which micro-batching produces all the time:
            # 4 gRPC streams, fp16, 198 -> 401 img/s, in-process 675 -> 1021 img/s with it off
            out.append((p, {"cudnn_conv_algo_search": "HEURISTIC",
                            "do_copy_in_default_stream": "True", "prefer_nhwc": "1"}))
        else:
            out.append(p)
    return out


#: Images per network run in-process, by default: on the CPU a batch of 8 keeps both the
#: cores and the memory busy enough; a GPU wants more (on an H200, fp16 VGG-19 in-process with
#: decoding ran 1021 img/s at 64; the network alone with host copies 2740 img/s at 64).
CPU_BATCH = 8
GPU_BATCH = 64

#: Cut sessions (graph cut to a set of layers) kept per model; see ``Extractor._session``.
MAX_CUT_SESSIONS = 4


def round_wire(array: np.ndarray, wire_dtype: str, *, widen: bool = True) -> np.ndarray:
    """float32 array as it arrives after the wire: float16 rounds through half precision.
    With ``widen=False`` a float16 wire gives the float16 array itself (what the server puts
    on the wire: one conversion instead of three). A float16 array (a half-IO session's
    output) is what a float16 wire carries already: kept, or widened exactly."""
    array = np.asarray(array)
    if array.dtype == np.float16:
        return array if wire_dtype == "float16" and not widen else half_to_float(array)
    if wire_dtype == "float16":
        half = float_to_half(array)
        return half_to_float(half) if widen else half
    return np.asarray(array, dtype=np.float32)


class Extractor:
    """ONNX Runtime sessions for every built model, and the per-image pipeline.

    ``prepare`` (decode + preprocess), ``run`` (one batch through a model) and ``finish``
    (assemble a result) are separate so that the server can micro-batch across streams;
    ``extract`` chains them in-process.
    """

    def __init__(self, registry: dict[str, ModelSpec], *,
                 providers: Sequence[str] | None = None, batch_size: int = 0,
                 limits: DecodeLimits = DEFAULT_LIMITS, intra_op_threads: int = 0,
                 precisions: Sequence[str] | None = None, decode_workers: int = 0,
                 half_io: bool | None = None) -> None:
        """``precisions`` (e.g. ('int8', 'fp32')) keeps only those variants of the feature
        models; the sessions of the first precision (default: the provider's default precision)
        and the classifiers are created now, the others on first use. ``batch_size`` images
        go through the network at once (0 = :data:`CPU_BATCH` on the CPU, :data:`GPU_BATCH` on
        CUDA / TensorRT). ``decode_workers``
        threads decode the images of the next batch while the network runs (0 = min(16, cores):
        decoding scaled to 1963 img/s on 16 threads of a 16-core host, 899 on 4;
        1 = decode inline). ``half_io``: see :attr:`half_io` (None: ``$DFF_HALF_IO``, else
        on with a GPU provider)."""
        import onnxruntime as ort

        if not registry:
            raise NotFound("no models built; run `dff models build`")
        if precisions:
            unknown = [p for p in precisions if p not in PRECISIONS]
            if unknown:
                raise InvalidInput(f"unknown precision(s) {unknown}; one of {PRECISIONS}")
            registry = {n: s for n, s in registry.items()
                        if s.kind != "features" or s.precision in precisions}
            missing = [p for p in precisions
                       if not any(s.kind == "features" and s.precision == p
                                  for s in registry.values())]
            if missing:
                raise NotFound(f"no feature model built at precision(s) {missing}; "
                               "run `dff models build`")
        self.registry = dict(registry)
        self.decode_workers = decode_workers or min(16, os.cpu_count() or 1)
        self.limits = limits
        self.providers = select_providers(providers)
        if self.providers[0] in GPU_PROVIDERS:
            from feature_server.cuda import set_sync_mode

            set_sync_mode()  # wait for the GPU asleep, not spinning (before any context)
        self._sessions: dict[tuple[str, frozenset[str]], Any] = {}
        self._uncut: set[str] = set()  # models whose graph cannot be cut (see _session)
        # fp16 models on a GPU take and give float16 (models.build.with_half_io): the same
        # values, half the bytes copied to and from the device, no conversion of a float16
        # prepared input or for a float16 wire. DFF_HALF_IO=0 keeps float32 input and
        # outputs; =1 also on the CPU (whose fp16 model computes in float32: it then rounds
        # its input and activations to float16, as the GPU does).
        half_env = os.environ.get("DFF_HALF_IO", "") if half_io is None else str(int(half_io))
        self.half_io = half_env == "1" or (half_env != "0" and self.providers[0] in GPU_PROVIDERS)
        self._half_sessions: set[int] = set()  # id() of the sessions that take float16
        self._lock = threading.Lock()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        # ONNX Runtime's idle intra-op threads spin by default. Here they would take cores from
        # the decode threads and from the other session's threads (features, classifier):
        # measured on 2 cores, `dff discover`'s feature stage went from 3.8 to 3.2 s with
        # spinning off. DFF_ORT_SPIN=1 turns it back on.
        opts.add_session_config_entry("session.intra_op.allow_spinning",
                                      "1" if os.environ.get("DFF_ORT_SPIN") == "1" else "0")
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session_options = opts
        self.precisions = sorted({s.precision for s in self.registry.values()
                                  if s.kind == "features"}, key=PRECISIONS.index)
        # sessions now for the precision requests will use by default (others on first use)
        eager = (precisions[0] if precisions
                 else auto_precision(self.providers[0], self.precisions))
        for name, spec in self.registry.items():
            if spec.kind != "features" or spec.precision == eager:
                self._session(name, [layer for layer in ExtractOptions().layers
                                     if layer in spec.layers])
        if not self._sessions:
            self._session(next(iter(self.registry)))
        first = next(iter(self._sessions.values()))
        self.execution_provider: str = first.get_providers()[0]
        self.io_binding = self.execution_provider != "CPUExecutionProvider"
        # with IO binding, batches and activations in page-locked host memory (see
        # feature_server.pinned); the activations' shapes per session and input shape, learnt
        # on the first run of each, so later runs copy into pinned arrays made beforehand
        self.pinned = pinned_pool(self.execution_provider in GPU_PROVIDERS)
        self._output_shapes: dict[tuple, list[tuple[tuple[int, ...], np.dtype]]] = {}
        if self.half_io and half_env != "1" and self.execution_provider not in GPU_PROVIDERS:
            # the GPU provider did not load: float32 sessions, as on any CPU
            self.half_io = False
            for key, session in list(self._sessions.items()):
                if id(session) in self._half_sessions:
                    del self._sessions[key]
            self._half_sessions.clear()
        self.batch_size = batch_size or (GPU_BATCH if self.execution_provider in GPU_PROVIDERS
                                         else CPU_BATCH)
        self.default_precision = (precisions[0] if precisions
                                  else auto_precision(self.execution_provider, self.precisions))
        log.info("ONNX Runtime %s: execution provider %s (available: %s)", ort.__version__,
                 self.execution_provider, ort.get_available_providers())

    @classmethod
    def from_cache(cls, home: str | os.PathLike[str] | None = None,
                   providers: Sequence[str] | None = None, batch_size: int = 0, *,
                   build: bool = True, limits: DecodeLimits = DEFAULT_LIMITS,
                   precisions: Sequence[str] | None = None,
                   half_io: bool | None = None) -> Extractor:
        """An Extractor over the models in ``$DFF_HOME/models`` (built first when missing).

        ``precisions`` defaults to the comma-separated ``$DFF_PRECISIONS`` when set (how
        ``dff serve features --precision`` reaches the server), else every built variant."""
        if precisions is None and os.environ.get("DFF_PRECISIONS"):
            precisions = [p.strip() for p in os.environ["DFF_PRECISIONS"].split(",") if p]
        return cls(ensure_models(home, build=build), providers=providers,
                   batch_size=batch_size, limits=limits, precisions=precisions, half_io=half_io)

    def _session(self, name: str, outputs: Iterable[str] = ()) -> Any:
        """:meth:`_made_session`, with a model file that ONNX or ONNX Runtime cannot load
        (truncated, damaged, replaced since it was registered) as DataLoss naming the file and
        the fix, not the parser's own exception."""
        try:
            return self._made_session(name, outputs)
        except DFFError:
            raise
        except Exception as exc:  # noqa: BLE001 - protobuf, onnx and ONNX Runtime errors
            spec = self.registry.get(name)
            where = spec.onnx_path if spec is not None else name
            raise DataLoss(f"model {name}: {where} cannot be loaded ({type(exc).__name__}: "
                           f"{str(exc)[:200]}); check it with `dff models list --verify` and "
                           "rebuild it with `dff models build`") from exc

    def _made_session(self, name: str, outputs: Iterable[str] = ()) -> Any:
        """The session of model ``name`` computing ``outputs`` (default: all of its outputs).

        A feature model outputs every conv layer; a request for some of them gets a session
        over the graph cut to those (:func:`~feature_server.models.build.with_outputs`), made
        on first use and kept: the whole graph would compute, and hold, all sixteen.

        At most :data:`MAX_CUT_SESSIONS` cut sessions are made per model (each holds its own
        weights): further layer sets, which only a client trying every combination of layers
        would ask for, run on the whole graph instead of growing the server's memory."""
        import onnxruntime as ort

        spec = get_spec(self.registry, name)
        wanted = frozenset(outputs)
        if spec.kind != "features" or wanted >= set(spec.layers):
            wanted = frozenset()
        with self._lock:
            if wanted and (name, wanted) not in self._sessions and (name in self._uncut or sum(
                    1 for n, w in self._sessions if n == name and w) >= MAX_CUT_SESSIONS):
                wanted = frozenset()
            session = self._sessions.get((name, wanted))
            if session is not None:
                return session
            source: str | bytes = str(spec.onnx_path)
            half = self.half_io and spec.kind == "features" and spec.precision == "fp16"
            if wanted or half:
                import onnx

                from feature_server.models.build import with_half_io, with_outputs

                model = onnx.load(str(spec.onnx_path))
                try:
                    if wanted:
                        model = with_outputs(model, wanted)
                except Exception as exc:  # noqa: BLE001 - subgraphs, or above protobuf's 2 GiB
                    log.info("model %s runs on its whole graph: %s", name, exc)
                    self._uncut.add(name)
                    wanted = frozenset()
                    session = self._sessions.get((name, wanted))
                    if session is not None:
                        return session
                halved = with_half_io(model) if half else None
                if half and halved is None:
                    log.info("model %s keeps float32 input and outputs: its graph is not a "
                             "float16 one between Casts", name)
                try:
                    source = (halved or model).SerializeToString()
                except Exception as exc:  # noqa: BLE001 - above protobuf's 2 GiB
                    log.info("model %s runs on its whole graph: %s", name, exc)
                    self._uncut.add(name)
                    wanted, halved = frozenset(), None
            else:
                halved = None
            made = time.perf_counter()
            try:
                session = ort.InferenceSession(source, self._session_options,
                                               providers=provider_options(self.providers))
            except Exception as exc:
                if halved is None:
                    raise
                # a provider that refuses the float16 graph: the model as it was built
                log.warning("model %s: no half-IO session (%s); float32 input and outputs",
                            name, exc)
                halved = None
                session = ort.InferenceSession(model.SerializeToString(), self._session_options,
                                               providers=provider_options(self.providers))
            self._sessions[(name, wanted)] = session
            if halved is not None:
                self._half_sessions.add(id(session))
            log.info("model %s (%s%s): session made in %.2f s", name,
                     ",".join(sorted(wanted)) or "all outputs", ", half IO" if halved else "",
                     time.perf_counter() - made)
            return session

    def input_dtype(self, name: str, outputs: Iterable[str] = ()) -> type:
        """np.float16 when the session of model ``name`` for ``outputs`` takes float16 (a
        half-IO fp16 model, see :attr:`half_io`), else np.float32."""
        session = self._session(name, outputs)
        return np.float16 if id(session) in self._half_sessions else np.float32

    def _names(self, kind: str) -> list[str]:
        return sorted(n for n, s in self.registry.items() if s.kind == kind)

    # ------------------------------------------------------------------ the pipeline
    def validate(self, options: ExtractOptions) -> None:
        """Raise InvalidInput/NotFound for options no image could satisfy."""
        if options.precision and options.precision not in PRECISIONS:
            raise InvalidInput(f"unknown precision {options.precision!r}; one of {PRECISIONS}")
        spec = self.registry.get(options.model)
        if spec is None or spec.kind != "features":
            raise InvalidInput(f"unknown feature model {options.model!r}; available: "
                               f"{self._names('features')} (reduced-precision variants are "
                               "built by `dff models build`)")
        if not options.layers and not options.wants_classifier:
            raise InvalidInput("no layers requested (and no classifier output)")
        unknown = [layer for layer in options.layers if layer not in spec.layers]
        if unknown:
            raise InvalidInput(f"unknown layer(s) {unknown} for {spec.name}; available: "
                               f"{list(spec.layers)}")
        if options.wire_dtype not in WIRE_DTYPES:
            raise InvalidInput(f"unknown wire dtype {options.wire_dtype!r} {WIRE_DTYPES}")
        if options.resize_mode not in RESIZE_MODES:
            raise InvalidInput(f"unknown resize mode {options.resize_mode!r} {RESIZE_MODES}")
        if not MIN_SIZE <= options.size <= MAX_SIZE:
            raise InvalidInput(f"input size {options.size} outside [{MIN_SIZE}, {MAX_SIZE}]")
        if options.top_k < 0:
            raise InvalidInput("top_k must be >= 0")
        if options.wants_classifier:
            cls = self.registry.get(options.classifier)
            if cls is None or cls.kind != "classifier":
                raise InvalidInput(f"unknown classifier {options.classifier!r}; available: "
                                   f"{self._names('classifier')}")

    def prepare(self, item_id: str, data: ImageData, options: ExtractOptions) -> Prepared:
        """Decode (unless ``data`` is pixels already) and preprocess one image (options must
        be validated)."""
        img = (pixels_to_image(data, self.limits) if isinstance(data, np.ndarray)
               else decode_image(data, self.limits))
        spec = self.registry[options.model]
        x = cx = None
        if options.layers:
            x = preprocess(img, spec.preprocessing, options.resize_mode, options.size)
            _check_stride(spec, options, (img.shape[0], img.shape[1]), x.shape[1:])
            if self.input_dtype(options.model, options.layers) == np.float16:
                x = float_to_half(x)  # rounds as the model's own first Cast would
        if options.wants_classifier:
            cx = preprocess(img, self.registry[options.classifier].preprocessing)
        net_in = x if x is not None else cx
        assert net_in is not None  # validate() requires layers or the classifier
        return Prepared(item_id, x, cx, (img.shape[0], img.shape[1]),
                        (net_in.shape[1], net_in.shape[2]))

    def adopt(self, item_id: str, features_input: np.ndarray | None,
              classifier_input: np.ndarray | None, original_size: tuple[int, int],
              options: ExtractOptions) -> Prepared:
        """Network inputs a client made itself (a PreparedImage), checked against what
        :meth:`prepare` makes of an image of ``original_size`` under ``options`` (validated):
        each input present exactly when asked for, float32 (3, h, w) of the expected (h, w),
        finite. InvalidInput / ImageTooLarge otherwise."""
        h, w = (int(v) for v in original_size)
        if h < 1 or w < 1:
            raise InvalidInput(f"prepared image: original size {w}x{h} is not positive")
        if h * w > self.limits.max_pixels:
            raise ImageTooLarge(f"prepared image: original size {w}x{h} is above the limit of "
                                f"{self.limits.max_pixels} pixels")
        spec = self.registry[options.model]
        x = cx = None
        if options.layers:
            want = network_input_size((h, w), spec.preprocessing, options.resize_mode,
                                      options.size)
            x = _checked_input(features_input, want, "features_input")
            _check_stride(spec, options, (h, w), want)
            if self.input_dtype(options.model, options.layers) == np.float16:
                x = x if x.dtype == np.float16 else float_to_half(x)
            elif x.dtype == np.float16:
                x = half_to_float(x)
        elif features_input is not None:
            raise InvalidInput("prepared image: features_input given, but no layers asked for")
        if options.wants_classifier:
            pre = self.registry[options.classifier].preprocessing
            cx = _checked_input(classifier_input, network_input_size((h, w), pre),
                                "classifier_input")
            if cx.dtype == np.float16:
                cx = half_to_float(cx)
        elif classifier_input is not None:
            raise InvalidInput("prepared image: classifier_input given, but no class output "
                               "asked for")
        net_in = x if x is not None else cx
        assert net_in is not None  # validate() requires layers or the classifier
        return Prepared(item_id, x, cx, (h, w), (net_in.shape[1], net_in.shape[2]))

    def stack(self, model: str, outputs: list[str], arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Inputs (3, H, W) of one shape as one batch for :meth:`run`: in the dtype the session
        takes (float32 widened or float16 rounded as :meth:`run` would) and, with IO binding
        and a pinned pool, in page-locked memory, where the copy to the device starts from."""
        dtype = self.input_dtype(model, outputs)
        shape = (len(arrays), *arrays[0].shape)
        pool = self.pinned if self.io_binding else None
        batch = pool.empty(shape, dtype) if pool is not None else np.empty(shape, dtype)
        for i, array in enumerate(arrays):
            if dtype == np.float16 and array.dtype != np.float16:
                array = float_to_half(array)
            batch[i] = array  # float16 into float32: exact
        return batch

    def run(self, model: str, batch: np.ndarray, outputs: list[str]) -> list[np.ndarray]:
        """(N, 3, H, W) through ``model``; one (N, ...) array per output: float32, or float16
        from a half-IO session (which takes the batch as float16, rounded if need be)."""
        spec = self.registry[model]
        session = self._session(model, outputs)
        if id(session) in self._half_sessions:
            batch = batch if batch.dtype == np.float16 else float_to_half(batch)
        else:
            batch = np.ascontiguousarray(batch, dtype=np.float32)
        if not self.io_binding:
            return session.run(outputs, {spec.input_name: batch})
        # On a GPU (default there; settable for tests): IO binding copies the batch to the
        # device once and only the asked outputs back.
        pool = self.pinned
        if pool is not None:
            try:
                return self._run_pinned(session, spec.input_name, batch, outputs, pool)
            except Exception as exc:
                binding = session.io_binding()
                binding.bind_cpu_input(spec.input_name, batch)
                results = self._run_to_host(session, binding, outputs)
                # the plain binding ran where the pinned one failed: pageable from now on
                log.warning("IO binding of pinned arrays failed (%s); pageable memory from now "
                            "on in this process", exc)
                self.pinned = None
                return results
        binding = session.io_binding()
        binding.bind_cpu_input(spec.input_name, batch)
        return self._run_to_host(session, binding, outputs)

    @staticmethod
    def _run_to_host(session: Any, binding: Any, outputs: list[str]) -> list[np.ndarray]:
        """Run a binding whose input is bound, ONNX Runtime allocating the outputs on the host."""
        for name in outputs:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    def _run_pinned(self, session: Any, input_name: str, batch: np.ndarray, outputs: list[str],
                    pool: PinnedPool) -> list[np.ndarray]:
        """IO binding by pointer: the batch from, and the activations into, pinned arrays
        (ONNX Runtime copies the same bytes; only the memory differs). The activations'
        shapes are learnt from each session and input shape's first run."""
        if not pool.owns(batch):
            staged = pool.empty(batch.shape, batch.dtype)
            if pool.owns(staged):  # else the pool is spent: the batch as it is
                np.copyto(staged, batch)
                batch = staged

        def bound() -> Any:  # `batch` stays referenced while the binding runs
            binding = session.io_binding()
            binding.bind_input(input_name, "cpu", 0, batch.dtype, list(batch.shape),
                               batch.ctypes.data)
            return binding

        key = (id(session), batch.shape[1:], batch.dtype, tuple(outputs))
        known = self._output_shapes.get(key)
        if known is not None:
            binding = bound()
            results = [pool.empty((batch.shape[0], *shape), dtype) for shape, dtype in known]
            for name, out in zip(outputs, results, strict=True):
                binding.bind_output(name, "cpu", 0, out.dtype, list(out.shape),
                                    out.ctypes.data)
            try:
                session.run_with_iobinding(binding)
                return results
            except Exception as exc:  # noqa: BLE001 - learnt again below; a real error recurs
                # an output whose shape depends on more than the input's (a model of the
                # user's own): learn it again from this run
                log.info("model outputs %s: not the shapes %s (%s); learning them again",
                         outputs, [s for s, _ in known], exc)
                self._output_shapes.pop(key, None)
        results = self._run_to_host(session, bound(), outputs)
        self._output_shapes[key] = [(r.shape[1:], r.dtype) for r in results]
        return results

    def finish(self, prepared: Prepared, activations: dict[str, np.ndarray],
               probabilities: np.ndarray | None, options: ExtractOptions, *,
               widen: bool = True) -> ExtractResult:
        """Assemble a result; activations (C, h, w) are rounded through the wire dtype
        (float32 arrays; with ``widen=False`` a float16 wire leaves them float16, for the
        server to send as they are) and, when the options ask for ``sparse``, made sparse
        (then only the non-zero values are rounded)."""
        acts: dict[str, Activation] = {}
        for layer in options.layers:
            if options.sparse:
                rows = from_dense(activations[layer])
                acts[layer] = rows.with_values(
                    round_wire(rows.values, options.wire_dtype, widen=widen))
            else:
                acts[layer] = round_wire(activations[layer], options.wire_dtype, widen=widen)
        probs = None
        top: list[tuple[int, str, float]] = []
        if probabilities is not None:
            probs = np.asarray(probabilities, dtype=np.float32)
            if options.top_k > 0:
                names = self.class_names(options.classifier)
                order = np.argsort(-probs, kind="stable")[:options.top_k]
                top = [(int(i), names[i] if i < len(names) else str(i), float(probs[i]))
                       for i in order]
            if not options.return_probabilities:
                probs = None
        return ExtractResult(prepared.id, acts, probs, top, prepared.original_size,
                             prepared.input_size)

    def extract(self, items: Iterable[tuple[str, ImageData]], options: ExtractOptions
                ) -> Iterator[ExtractResult]:
        """One result per item (in input order), batching consecutive images by shape."""
        try:
            self.validate(options)
        except DFFError as exc:
            for item_id, _ in items:
                yield ExtractResult(item_id, error=exc)
            return
        chunks = self._chunks(items)
        if self.decode_workers <= 1:
            for chunk in chunks:
                yield from self._extract_chunk(chunk, options)
            return
        # Decoding runs one chunk ahead on a thread pool (OpenCV releases the GIL) while the
        # network runs on the current chunk; results still come in input order.
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="dff-decode") as pool:
            pending: deque[tuple[list[tuple[str, ImageData]], list[Any]]] = deque()
            for chunk in chunks:
                pending.append((chunk, [pool.submit(self._prepare_or_error, i, d, options)
                                        for i, d in chunk]))
                if len(pending) > 1:
                    done, futures = pending.popleft()
                    yield from self._run_chunk(done, [f.result() for f in futures], options)
            while pending:
                done, futures = pending.popleft()
                yield from self._run_chunk(done, [f.result() for f in futures], options)

    def _chunks(self, items: Iterable[tuple[str, ImageData]]
                ) -> Iterator[list[tuple[str, ImageData]]]:
        chunk: list[tuple[str, ImageData]] = []
        for item in items:
            chunk.append(item)
            if len(chunk) >= self.batch_size:
                yield chunk
                chunk = []
        if chunk:
            yield chunk

    def _prepare_or_error(self, item_id: str, data: ImageData, options: ExtractOptions
                          ) -> Prepared | DFFError:
        try:
            return self.prepare(item_id, data, options)
        except DFFError as exc:
            return exc

    def _extract_chunk(self, chunk: list[tuple[str, ImageData]], options: ExtractOptions
                       ) -> Iterator[ExtractResult]:
        prepared = [self._prepare_or_error(i, d, options) for i, d in chunk]
        yield from self._run_chunk(chunk, prepared, options)

    def _run_chunk(self, chunk: list[tuple[str, ImageData]], prepared: list[Prepared | DFFError],
                   options: ExtractOptions) -> Iterator[ExtractResult]:
        """Run the network over a decoded chunk (images batched by input shape)."""
        results: dict[int, ExtractResult] = {}
        groups: dict[tuple[int, ...], list[tuple[int, Prepared]]] = {}
        for i, ((item_id, _), p) in enumerate(zip(chunk, prepared, strict=True)):
            if isinstance(p, DFFError):
                results[i] = ExtractResult(item_id, error=p)
                continue
            net_in = p.features_input if p.features_input is not None else p.classifier_input
            assert net_in is not None
            groups.setdefault(net_in.shape, []).append((i, p))
        for members in groups.values():
            outs: list[np.ndarray] = []
            if options.layers:
                layers = list(options.layers)
                outs = self.run(options.model, self.stack(
                    options.model, layers, [p.features_input for _, p in members
                                            if p.features_input is not None]), layers)
            probs = None
            if options.wants_classifier:
                probs = self.run(options.classifier, self.stack(
                    options.classifier, ["probabilities"], [p.classifier_input for _, p in members
                                                            if p.classifier_input is not None]),
                                 ["probabilities"])[0]
            for j, (i, p) in enumerate(members):
                acts = {layer: outs[k][j] for k, layer in enumerate(options.layers)}
                results[i] = self.finish(p, acts, None if probs is None else probs[j], options)
        for i in range(len(chunk)):
            yield results[i]

    # ------------------------------------------------------------------ metadata
    def class_names(self, classifier: str | None = None) -> list[str]:
        spec = get_spec(self.registry, classifier or DEFAULT_CLASSIFIER)
        return list(spec.class_names)

    def describe(self) -> dict:
        """Models (layers, shapes at 224, preprocessing, sha256s, classes) and the provider."""
        import onnxruntime as ort

        models = []
        for spec in self.registry.values():
            pre = spec.preprocessing
            models.append({
                "name": spec.name, "kind": spec.kind, "source": spec.source,
                "precision": spec.precision if spec.kind == "features" else "",
                "base_model": spec.base_model,
                "weights_sha256": spec.weights_sha256, "onnx_sha256": spec.onnx_sha256,
                "layers": {name: {"channels": c, "stride": s,
                                  "shape_at_224": [c, 224 // s, 224 // s] if s else [c]}
                           for name, (c, s) in spec.layers.items()},
                "preprocessing": {"color_order": pre.color_order, "mean": list(pre.mean),
                                  "std": list(pre.std), "resize_mode": pre.resize_mode,
                                  "size": pre.size, "resize_shorter": pre.resize_shorter,
                                  "description": pre.description},
                "num_classes": len(spec.class_names),
                "class_names": list(spec.class_names),
                "class_wnids": list(spec.class_wnids),
            })
        return {"models": models, "execution_provider": self.execution_provider,
                "available_providers": ort.get_available_providers(),
                "precisions": list(self.precisions),
                "default_precision": self.default_precision,
                "accepts_decoded_images": True,  # (id, uint8 BGR array) items
                "accepts_prepared_images": True,  # network inputs made elsewhere: adopt()
                "accepts_prepared_float16": True,  # ... sent as float16
                "half_io": self.half_io}  # fp16 models take and give float16
