"""Heatmaps and significant regions: from the NMF factor W to polygons in image coordinates.

Shapes used throughout::

    W          (sum_i h_i*w_i, k)   NMF factor, rows ordered image by image, row-major (y, x)
    maps       (N, k, h, w)         raw heatmaps at FEATURE resolution (one image per row)
    map_up     (k, H, W)            upsampled to the image's ORIGINAL size (bilinear)
    map_norm   (k, H, W)            divided by each map's max; an all-zero map stays all zero
    labels     (H, W) int32         connected components kept (0 = background)
    polygon    (n, 2) int32         x, y of a contour traced on the region mask

Pure functions: arrays in, arrays out. ``heatmaps``/``split_heatmaps``/``normalize_max`` work on
the array namespace of their input (NumPy or CuPy); upsampling, regions and contours use OpenCV
and therefore run on the host (they take and return NumPy arrays).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np
from dff_protos.errors import InvalidInput

from concept_engine.backend import get_namespace

DEFAULT_THRESHOLD = 0.75
DEFAULT_MIN_AREA = 0.01


def _xp(a):
    return get_namespace(a)


def heatmaps(W, n_images: int, h: int, w: int):
    """Reshape W (n_images*h*w, k) into raw heatmaps (n_images, k, h, w) (no copy of values)."""
    rows, k = W.shape
    if rows != n_images * h * w:
        raise InvalidInput(f"W has {rows} rows, expected n_images*h*w = {n_images}*{h}*{w}")
    xp = _xp(W)
    return xp.ascontiguousarray(W.reshape(n_images, h, w, k).transpose(0, 3, 1, 2))


def split_heatmaps(W, sizes: Sequence[tuple[int, int]]) -> list:
    """Split W (sum h_i*w_i, k) into one (k, h_i, w_i) map stack per image (sizes vary with
    the keep_aspect resize policy)."""
    xp = _xp(W)
    total = sum(h * w for h, w in sizes)
    if W.shape[0] != total:
        raise InvalidInput(f"W has {W.shape[0]} rows, the feature maps need {total}")
    out, start = [], 0
    for h, w in sizes:
        block = W[start:start + h * w]
        out.append(xp.ascontiguousarray(block.reshape(h, w, -1).transpose(2, 0, 1)))
        start += h * w
    return out


def upsample(maps: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear upsampling (pixel-centre aligned, like align_corners=False) of maps (k, h, w)
    to (k, H, W) where size = (H, W). Host arrays; float32 out."""
    maps = np.asarray(maps, dtype=np.float32)
    if maps.ndim != 3:
        raise InvalidInput(f"maps must be (k, h, w), got shape {maps.shape}")
    height, width = int(size[0]), int(size[1])
    if height < 1 or width < 1:
        raise InvalidInput(f"target size must be positive, got {size}")
    out = np.empty((maps.shape[0], height, width), dtype=np.float32)
    for j, m in enumerate(maps):
        out[j] = cv2.resize(m, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


def normalize_max(maps):
    """Divide each map by its own max over the last two axes. NaN-safe: a map whose max is
    not positive (empty concept) stays all zero; negative values (bilinear never creates them
    from W >= 0, but be safe) are clipped to 0. Shape (..., H, W) kept."""
    xp = _xp(maps)
    if xp is np and isinstance(maps, np.ndarray) and maps.dtype == np.float32 and maps.size:
        # the usual case (a bilinear map of W >= 0: finite, non-negative) in four passes
        # instead of eight; the same values, bit for bit (np.maximum turns -0.0 into 0.0)
        peak = maps.max(axis=(-2, -1), keepdims=True)
        if np.isfinite(peak).all() and maps.min() >= 0:
            out = np.maximum(maps, 0)
            np.divide(out, peak, out=out, where=np.broadcast_to(peak > 0, maps.shape))
            return out
    maps = xp.where(xp.isfinite(maps), maps, 0).astype(xp.float32)
    maps = xp.maximum(maps, 0)
    peak = maps.max(axis=(-2, -1), keepdims=True)
    safe = xp.where(peak > 0, peak, 1)
    return xp.where(peak > 0, maps / safe, 0).astype(xp.float32)


@dataclass(frozen=True)
class Component:
    """One connected region kept: its label in the mask, pixel area, bbox (x, y, w, h) and
    centroid (x, y) in image pixels."""

    label: int
    area: int
    bbox: tuple[int, int, int, int]
    centroid: tuple[float, float]


@dataclass
class Regions:
    """Significant regions of one normalised map: ``labels`` (H, W) int32 with 0 background and
    1..len(components) the kept components (relabelled densely)."""

    labels: np.ndarray
    components: list[Component] = field(default_factory=list)

    @property
    def mask(self) -> np.ndarray:
        """(H, W) uint8, 255 inside any kept region."""
        return np.where(self.labels > 0, 255, 0).astype(np.uint8)


def regions(map_norm: np.ndarray, threshold: float = DEFAULT_THRESHOLD,
            min_area: float = DEFAULT_MIN_AREA) -> Regions:
    """Threshold a normalised map (H, W), find 8-connected components and keep those whose
    area is at least ``min_area`` x H x W pixels (min_area is a fraction of the image, 0..1;
    a component always needs at least one pixel)."""
    map_norm = np.asarray(map_norm, dtype=np.float32)
    if map_norm.ndim != 2:
        raise InvalidInput(f"map must be (H, W), got shape {map_norm.shape}")
    if not 0.0 <= min_area <= 1.0:
        raise InvalidInput(f"min_area is a fraction of the image (0..1), got {min_area}")
    height, width = map_norm.shape
    binary = map_norm >= threshold  # a NaN counts as 0
    if threshold <= 0:
        binary |= np.isnan(map_norm)
        # threshold <= 0 would select the whole image, including an empty concept's zeros: an
        # all-zero map has no significant region by definition. (Above 0, a selected pixel is
        # itself > 0.)
        if not np.any(map_norm > 0):
            binary[:] = False
    if not binary.any():
        return Regions(np.zeros((height, width), dtype=np.int32), [])
    # OpenCV's labels, and the statistics from the selected pixels only (usually a few
    # percent of the image): connectedComponentsWithStats took 1.0 ms of CPU on a 500 x 375
    # map, the labels alone 0.1 ms; the same areas, boxes and centroids
    n, cc = cv2.connectedComponents(binary.view(np.uint8), connectivity=8, ltype=cv2.CV_32S)
    ys, xs = np.nonzero(cc)
    lab = np.asarray(cc[ys, xs], dtype=np.intp)
    area = np.bincount(lab, minlength=n)
    cx = np.bincount(lab, weights=xs, minlength=n) / np.maximum(area, 1)
    cy = np.bincount(lab, weights=ys, minlength=n) / np.maximum(area, 1)
    x0 = np.full(n, width, dtype=np.int64)
    y0 = np.full(n, height, dtype=np.int64)
    x1 = np.full(n, -1, dtype=np.int64)
    y1 = np.full(n, -1, dtype=np.int64)
    np.minimum.at(x0, lab, xs)
    np.minimum.at(y0, lab, ys)
    np.maximum.at(x1, lab, xs)
    np.maximum.at(y1, lab, ys)
    min_pixels = max(1, int(np.ceil(min_area * height * width)))
    kept: list[Component] = []
    relabel = np.zeros(n, dtype=np.int32)  # old label -> new (0: dropped)
    for label in range(1, n):
        if int(area[label]) < min_pixels:
            continue
        new = len(kept) + 1
        relabel[label] = new
        kept.append(Component(
            label=new, area=int(area[label]),
            bbox=(int(x0[label]), int(y0[label]), int(x1[label] - x0[label] + 1),
                  int(y1[label] - y0[label] + 1)),
            centroid=(float(cx[label]), float(cy[label]))))
    # every component kept: OpenCV's labels are already dense; else one lookup pass
    labels = cc if len(kept) == n - 1 else relabel[cc]
    return Regions(labels, kept)


def contours(mask: np.ndarray) -> list[np.ndarray]:
    """Outer contours traced on the region mask itself (H, W) (any nonzero = inside), one
    polygon (n, 2) int32 of x, y pixel coordinates per 8-connected blob. A one-pixel blob gives
    a one-point polygon. Holes are not traced (outer boundaries only)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise InvalidInput(f"mask must be (H, W), got shape {mask.shape}")
    binary = np.ascontiguousarray((mask > 0).astype(np.uint8))
    found, _ = cv2.findContours(binary, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    polys = [np.ascontiguousarray(c.reshape(-1, 2), dtype=np.int32) for c in found]
    # OpenCV's order depends on the scan; sort by (top, left) so results are reproducible.
    polys.sort(key=lambda p: (int(p[:, 1].min()), int(p[:, 0].min())))
    return polys


def concept_polygons(maps: np.ndarray, original_size: tuple[int, int],
                     threshold: float = DEFAULT_THRESHOLD,
                     min_area: float = DEFAULT_MIN_AREA) -> list[list[np.ndarray]]:
    """The whole chain for one image: raw maps (k, h, w) at feature resolution -> bilinear to
    ``original_size`` (H, W) -> max-normalised -> significant regions -> contours.

    Returns one list of polygons (n, 2) int32 (x, y in original pixels) per concept."""
    maps = np.asarray(maps, dtype=np.float32)
    out: list[list[np.ndarray]] = []
    for m in maps:  # one concept at a time: peak memory is one map at the original size
        up = normalize_max(upsample(m[None], original_size))[0]
        reg = regions(up, threshold, min_area)
        out.append(contours(reg.labels) if reg.components else [])
    return out
