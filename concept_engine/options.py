"""Every option enum of discovery, defined once.

The CLI (``choices=``), :meth:`concept_engine.discovery.DiscoveryOptions.validate` and the proto
mapping (:mod:`concept_engine.convert`) all import these tuples, so adding a value is one edit.
"""

from __future__ import annotations

from typing import Literal

from feature_server.models.precision import PRECISION_CHOICES as _PRECISION_CHOICES

Solver = Literal["hals", "mu"]
SOLVERS: tuple[str, ...] = ("hals", "mu")

Init = Literal["nndsvd", "nndsvda", "nndsvdar", "random", "seed"]
INITS: tuple[str, ...] = ("nndsvd", "nndsvda", "nndsvdar", "random", "seed")

KCriterionName = Literal["stability", "instability", "bcv", "certainty", "elbow"]
#: how k is chosen: split-half stability, staNMF instability over restarts (Wu et al. 2016),
#: bi-cross-validation (Owen & Perry 2009), the seed's mean certainty, the elbow of the
#: reconstruction error.
K_CRITERIA: tuple[str, ...] = ("stability", "instability", "bcv", "certainty", "elbow")

FilterMode = Literal["auto", "on", "off"]
FILTER_MODES: tuple[str, ...] = ("auto", "on", "off")

PredictionMode = Literal["probability", "top_n", "calibrated"]
#: prediction filter rule: p(target) >= min_probability; target class among the classifier's
#: top-n; temperature-calibrated p(target) >= min_probability.
PREDICTION_MODES: tuple[str, ...] = ("probability", "top_n", "calibrated")

#: feature-model precision (defined with the models): ``auto`` = the feature source's default
#: (int8 on CPU, fp16 on CUDA, when that variant is built); ``fp32`` / ``int8`` / ``fp16`` = that
#: variant or an error.
PRECISION_CHOICES = _PRECISION_CHOICES

ResizeMode = Literal["squash", "keep_aspect"]
RESIZE_MODES: tuple[str, ...] = ("squash", "keep_aspect")

#: Temperature of the ``calibrated`` prediction mode for EfficientNet-Lite0, fitted by
#: benchmarks/calibrate_temperature.py (maximum likelihood on the labelled photos of
#: shared/data/imagenet_sample); rerun it after changing the classifier.
CALIBRATION_TEMPERATURE = 0.637
