from dff_protos.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FilterMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FILTER_MODE_UNSPECIFIED: _ClassVar[FilterMode]
    AUTO: _ClassVar[FilterMode]
    ON: _ClassVar[FilterMode]
    OFF: _ClassVar[FilterMode]
FILTER_MODE_UNSPECIFIED: FilterMode
AUTO: FilterMode
ON: FilterMode
OFF: FilterMode

class DiscoverOptions(_message.Message):
    __slots__ = ("name", "target_class", "k", "k_min", "k_max", "k_criterion", "prediction_filter", "min_probability", "certainty_filter", "certainty_quantile", "min_images", "solver", "max_iter", "tol", "seed", "data_dir", "resize", "layer", "init", "threshold", "min_area", "prediction_min_images", "certainty_min_images", "model", "classifier", "wire_dtype", "prediction_mode", "prediction_top_n", "temperature", "bootstrap", "bootstrap_iters", "precision")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TARGET_CLASS_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    K_MIN_FIELD_NUMBER: _ClassVar[int]
    K_MAX_FIELD_NUMBER: _ClassVar[int]
    K_CRITERION_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_FILTER_FIELD_NUMBER: _ClassVar[int]
    MIN_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    CERTAINTY_FILTER_FIELD_NUMBER: _ClassVar[int]
    CERTAINTY_QUANTILE_FIELD_NUMBER: _ClassVar[int]
    MIN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    SOLVER_FIELD_NUMBER: _ClassVar[int]
    MAX_ITER_FIELD_NUMBER: _ClassVar[int]
    TOL_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DATA_DIR_FIELD_NUMBER: _ClassVar[int]
    RESIZE_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    INIT_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_AREA_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_MIN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    CERTAINTY_MIN_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIER_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_MODE_FIELD_NUMBER: _ClassVar[int]
    PREDICTION_TOP_N_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_FIELD_NUMBER: _ClassVar[int]
    BOOTSTRAP_ITERS_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    name: str
    target_class: str
    k: int
    k_min: int
    k_max: int
    k_criterion: str
    prediction_filter: FilterMode
    min_probability: float
    certainty_filter: FilterMode
    certainty_quantile: float
    min_images: int
    solver: str
    max_iter: int
    tol: float
    seed: int
    data_dir: str
    resize: _common_pb2.ResizePolicy
    layer: str
    init: str
    threshold: float
    min_area: float
    prediction_min_images: int
    certainty_min_images: int
    model: str
    classifier: str
    wire_dtype: str
    prediction_mode: str
    prediction_top_n: int
    temperature: float
    bootstrap: int
    bootstrap_iters: int
    precision: str
    def __init__(self, name: _Optional[str] = ..., target_class: _Optional[str] = ..., k: _Optional[int] = ..., k_min: _Optional[int] = ..., k_max: _Optional[int] = ..., k_criterion: _Optional[str] = ..., prediction_filter: _Optional[_Union[FilterMode, str]] = ..., min_probability: _Optional[float] = ..., certainty_filter: _Optional[_Union[FilterMode, str]] = ..., certainty_quantile: _Optional[float] = ..., min_images: _Optional[int] = ..., solver: _Optional[str] = ..., max_iter: _Optional[int] = ..., tol: _Optional[float] = ..., seed: _Optional[int] = ..., data_dir: _Optional[str] = ..., resize: _Optional[_Union[_common_pb2.ResizePolicy, _Mapping]] = ..., layer: _Optional[str] = ..., init: _Optional[str] = ..., threshold: _Optional[float] = ..., min_area: _Optional[float] = ..., prediction_min_images: _Optional[int] = ..., certainty_min_images: _Optional[int] = ..., model: _Optional[str] = ..., classifier: _Optional[str] = ..., wire_dtype: _Optional[str] = ..., prediction_mode: _Optional[str] = ..., prediction_top_n: _Optional[int] = ..., temperature: _Optional[float] = ..., bootstrap: _Optional[int] = ..., bootstrap_iters: _Optional[int] = ..., precision: _Optional[str] = ...) -> None: ...

class DiscoverRequest(_message.Message):
    __slots__ = ("options", "image")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    options: DiscoverOptions
    image: _common_pb2.ImageInput
    def __init__(self, options: _Optional[_Union[DiscoverOptions, _Mapping]] = ..., image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("stage", "done", "total", "message")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    done: int
    total: int
    message: str
    def __init__(self, stage: _Optional[str] = ..., done: _Optional[int] = ..., total: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ImageDecision(_message.Message):
    __slots__ = ("id", "kept", "stage", "reason", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    KEPT_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: str
    kept: bool
    stage: str
    reason: str
    score: float
    def __init__(self, id: _Optional[str] = ..., kept: _Optional[bool] = ..., stage: _Optional[str] = ..., reason: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class KCurve(_message.Message):
    __slots__ = ("criterion", "k", "value")
    CRITERION_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    criterion: str
    k: _containers.RepeatedScalarFieldContainer[int]
    value: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, criterion: _Optional[str] = ..., k: _Optional[_Iterable[int]] = ..., value: _Optional[_Iterable[float]] = ...) -> None: ...

class DiscoverSummary(_message.Message):
    __slots__ = ("concept_set_id", "k", "k_reason", "n_images", "n_kept", "curves", "reconstruction_error", "n_iter", "stage_seconds", "notices", "concept_stability", "stability_low", "stability_high", "set_stability", "reliability_warning")
    class StageSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CONCEPT_SET_ID_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    K_REASON_FIELD_NUMBER: _ClassVar[int]
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    N_KEPT_FIELD_NUMBER: _ClassVar[int]
    CURVES_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_ERROR_FIELD_NUMBER: _ClassVar[int]
    N_ITER_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    NOTICES_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_STABILITY_FIELD_NUMBER: _ClassVar[int]
    STABILITY_LOW_FIELD_NUMBER: _ClassVar[int]
    STABILITY_HIGH_FIELD_NUMBER: _ClassVar[int]
    SET_STABILITY_FIELD_NUMBER: _ClassVar[int]
    RELIABILITY_WARNING_FIELD_NUMBER: _ClassVar[int]
    concept_set_id: str
    k: int
    k_reason: str
    n_images: int
    n_kept: int
    curves: _containers.RepeatedCompositeFieldContainer[KCurve]
    reconstruction_error: float
    n_iter: int
    stage_seconds: _containers.ScalarMap[str, float]
    notices: _containers.RepeatedScalarFieldContainer[str]
    concept_stability: _containers.RepeatedScalarFieldContainer[float]
    stability_low: _containers.RepeatedScalarFieldContainer[float]
    stability_high: _containers.RepeatedScalarFieldContainer[float]
    set_stability: float
    reliability_warning: str
    def __init__(self, concept_set_id: _Optional[str] = ..., k: _Optional[int] = ..., k_reason: _Optional[str] = ..., n_images: _Optional[int] = ..., n_kept: _Optional[int] = ..., curves: _Optional[_Iterable[_Union[KCurve, _Mapping]]] = ..., reconstruction_error: _Optional[float] = ..., n_iter: _Optional[int] = ..., stage_seconds: _Optional[_Mapping[str, float]] = ..., notices: _Optional[_Iterable[str]] = ..., concept_stability: _Optional[_Iterable[float]] = ..., stability_low: _Optional[_Iterable[float]] = ..., stability_high: _Optional[_Iterable[float]] = ..., set_stability: _Optional[float] = ..., reliability_warning: _Optional[str] = ...) -> None: ...

class DiscoverEvent(_message.Message):
    __slots__ = ("progress", "decision", "summary")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    progress: Progress
    decision: ImageDecision
    summary: DiscoverSummary
    def __init__(self, progress: _Optional[_Union[Progress, _Mapping]] = ..., decision: _Optional[_Union[ImageDecision, _Mapping]] = ..., summary: _Optional[_Union[DiscoverSummary, _Mapping]] = ...) -> None: ...

class ExplainOptions(_message.Message):
    __slots__ = ("concept_set_id", "render_overlay", "threshold", "min_area", "return_heatmaps")
    CONCEPT_SET_ID_FIELD_NUMBER: _ClassVar[int]
    RENDER_OVERLAY_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_AREA_FIELD_NUMBER: _ClassVar[int]
    RETURN_HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    concept_set_id: str
    render_overlay: bool
    threshold: float
    min_area: float
    return_heatmaps: bool
    def __init__(self, concept_set_id: _Optional[str] = ..., render_overlay: _Optional[bool] = ..., threshold: _Optional[float] = ..., min_area: _Optional[float] = ..., return_heatmaps: _Optional[bool] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("options", "image")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    options: ExplainOptions
    image: _common_pb2.ImageInput
    def __init__(self, options: _Optional[_Union[ExplainOptions, _Mapping]] = ..., image: _Optional[_Union[_common_pb2.ImageInput, _Mapping]] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("xy",)
    XY_FIELD_NUMBER: _ClassVar[int]
    xy: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, xy: _Optional[_Iterable[int]] = ...) -> None: ...

class ConceptRegions(_message.Message):
    __slots__ = ("concept", "certainty", "contours", "present", "relative_score", "name")
    CONCEPT_FIELD_NUMBER: _ClassVar[int]
    CERTAINTY_FIELD_NUMBER: _ClassVar[int]
    CONTOURS_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_SCORE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    concept: int
    certainty: float
    contours: _containers.RepeatedCompositeFieldContainer[Polygon]
    present: bool
    relative_score: float
    name: str
    def __init__(self, concept: _Optional[int] = ..., certainty: _Optional[float] = ..., contours: _Optional[_Iterable[_Union[Polygon, _Mapping]]] = ..., present: _Optional[bool] = ..., relative_score: _Optional[float] = ..., name: _Optional[str] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("id", "heatmaps", "certainties", "regions", "overlay_png", "info", "error", "present", "relative_score", "reconstruction_error", "out_of_distribution")
    ID_FIELD_NUMBER: _ClassVar[int]
    HEATMAPS_FIELD_NUMBER: _ClassVar[int]
    CERTAINTIES_FIELD_NUMBER: _ClassVar[int]
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    OVERLAY_PNG_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    RELATIVE_SCORE_FIELD_NUMBER: _ClassVar[int]
    RECONSTRUCTION_ERROR_FIELD_NUMBER: _ClassVar[int]
    OUT_OF_DISTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    id: str
    heatmaps: _common_pb2.Tensor
    certainties: _containers.RepeatedScalarFieldContainer[float]
    regions: _containers.RepeatedCompositeFieldContainer[ConceptRegions]
    overlay_png: bytes
    info: _common_pb2.ImageInfo
    error: _common_pb2.ItemError
    present: _containers.RepeatedScalarFieldContainer[bool]
    relative_score: _containers.RepeatedScalarFieldContainer[float]
    reconstruction_error: float
    out_of_distribution: bool
    def __init__(self, id: _Optional[str] = ..., heatmaps: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., certainties: _Optional[_Iterable[float]] = ..., regions: _Optional[_Iterable[_Union[ConceptRegions, _Mapping]]] = ..., overlay_png: _Optional[bytes] = ..., info: _Optional[_Union[_common_pb2.ImageInfo, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ItemError, _Mapping]] = ..., present: _Optional[_Iterable[bool]] = ..., relative_score: _Optional[_Iterable[float]] = ..., reconstruction_error: _Optional[float] = ..., out_of_distribution: _Optional[bool] = ...) -> None: ...

class ConceptSetInfo(_message.Message):
    __slots__ = ("id", "name", "k", "n_images", "model", "layer", "created", "k_reason", "set_stability", "concept_names")
    ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    N_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    K_REASON_FIELD_NUMBER: _ClassVar[int]
    SET_STABILITY_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_NAMES_FIELD_NUMBER: _ClassVar[int]
    id: str
    name: str
    k: int
    n_images: int
    model: str
    layer: str
    created: str
    k_reason: str
    set_stability: float
    concept_names: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., name: _Optional[str] = ..., k: _Optional[int] = ..., n_images: _Optional[int] = ..., model: _Optional[str] = ..., layer: _Optional[str] = ..., created: _Optional[str] = ..., k_reason: _Optional[str] = ..., set_stability: _Optional[float] = ..., concept_names: _Optional[_Iterable[str]] = ...) -> None: ...

class ListConceptSetsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListConceptSetsResponse(_message.Message):
    __slots__ = ("concept_sets",)
    CONCEPT_SETS_FIELD_NUMBER: _ClassVar[int]
    concept_sets: _containers.RepeatedCompositeFieldContainer[ConceptSetInfo]
    def __init__(self, concept_sets: _Optional[_Iterable[_Union[ConceptSetInfo, _Mapping]]] = ...) -> None: ...

class GetConceptSetRequest(_message.Message):
    __slots__ = ("id", "include_file")
    ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_FILE_FIELD_NUMBER: _ClassVar[int]
    id: str
    include_file: bool
    def __init__(self, id: _Optional[str] = ..., include_file: _Optional[bool] = ...) -> None: ...

class ConceptSet(_message.Message):
    __slots__ = ("info", "bases", "provenance_json", "hdf5")
    INFO_FIELD_NUMBER: _ClassVar[int]
    BASES_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_JSON_FIELD_NUMBER: _ClassVar[int]
    HDF5_FIELD_NUMBER: _ClassVar[int]
    info: ConceptSetInfo
    bases: _common_pb2.Tensor
    provenance_json: str
    hdf5: bytes
    def __init__(self, info: _Optional[_Union[ConceptSetInfo, _Mapping]] = ..., bases: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., provenance_json: _Optional[str] = ..., hdf5: _Optional[bytes] = ...) -> None: ...

class DeleteConceptSetRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class DeleteConceptSetResponse(_message.Message):
    __slots__ = ("deleted",)
    DELETED_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    def __init__(self, deleted: _Optional[bool] = ...) -> None: ...
