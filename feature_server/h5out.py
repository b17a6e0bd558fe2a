"""HDF5 output of ``dff extract``: activations, probabilities, ids, sizes and errors.

Layout (schema version 1; names defined here only)::

    /                       attrs: schema_version, model, layers, wire_dtype, resize_mode, size,
                                   execution_provider, created
    ids                     (N,) utf-8 strings, input order
    errors                  (N,) utf-8 strings, "" when the image succeeded
    original_size           (N, 2) int32 (height, width); 0 for failed images
    input_size              (N, 2) int32
    activations/<layer>     (N, C, h, w) float16|float32 when every input size is the same;
                            otherwise a group with one (C, h, w) dataset per image index
    probabilities           (N, num_classes) float32, when asked
    top_k                   (N, k) int32 class indices, when asked

Written to a temporary file in the same folder, then renamed (atomic).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import h5py
import numpy as np

from feature_server.extractor import ExtractOptions, ExtractResult

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
IDS, ERRORS, ORIGINAL_SIZE, INPUT_SIZE = "ids", "errors", "original_size", "input_size"
ACTIVATIONS, PROBABILITIES, TOP_K = "activations", "probabilities", "top_k"


def write_results(path: str | os.PathLike[str], results: Sequence[ExtractResult],
                  options: ExtractOptions, provider: str = "") -> Path:
    """Write results (in the order given) to ``path`` atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    dtype = np.float16 if options.wire_dtype == "float16" else np.float32
    n = len(results)
    str_dt = h5py.string_dtype()
    try:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update({
                "schema_version": SCHEMA_VERSION, "model": options.model,
                "layers": list(options.layers), "wire_dtype": options.wire_dtype,
                "resize_mode": options.resize_mode, "size": options.size,
                "execution_provider": provider,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat()})
            h5.create_dataset(IDS, data=[r.id for r in results], dtype=str_dt)
            h5.create_dataset(ERRORS, data=[str(r.error) if r.error else "" for r in results],
                              dtype=str_dt)
            h5.create_dataset(ORIGINAL_SIZE, data=np.array(
                [r.original_size for r in results], dtype=np.int32).reshape(n, 2))
            h5.create_dataset(INPUT_SIZE, data=np.array(
                [r.input_size for r in results], dtype=np.int32).reshape(n, 2))
            group = h5.create_group(ACTIVATIONS)
            group.attrs["schema_version"] = SCHEMA_VERSION
            ok = [i for i, r in enumerate(results) if r.error is None]
            for layer in options.layers:
                shapes = {results[i].activations[layer].shape for i in ok}
                if len(shapes) == 1:
                    shape = shapes.pop()
                    ds = group.create_dataset(layer, shape=(n, *shape), dtype=dtype,
                                              chunks=(1, *shape), compression="gzip",
                                              compression_opts=1, shuffle=True)
                    for i in ok:
                        ds[i] = np.asarray(results[i].activations[layer], dtype)
                else:
                    sub = group.create_group(layer)
                    for i in ok:
                        sub.create_dataset(str(i), data=np.asarray(results[i].activations[layer])
                                           .astype(dtype), compression="gzip",
                                           compression_opts=1, shuffle=True)
            if options.return_probabilities:
                probs = [r.probabilities for r in results if r.probabilities is not None]
                k = probs[0].shape[0] if probs else 0
                arr = np.full((n, k), np.nan, dtype=np.float32)
                for i, r in enumerate(results):
                    if r.probabilities is not None:
                        arr[i] = r.probabilities
                h5.create_dataset(PROBABILITIES, data=arr)
            if options.top_k > 0:
                arr = np.full((n, options.top_k), -1, dtype=np.int32)
                for i, r in enumerate(results):
                    for j, (index, _, _) in enumerate(r.top_k):
                        arr[i, j] = index
                h5.create_dataset(TOP_K, data=arr)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    log.info("wrote %d results (%d errors) to %s", n,
             sum(r.error is not None for r in results), path)
    return path
