"""Report pieces on tiny hand-made inputs: overlays, grids, k plot, index.html (progress:
test_export_cli.py)."""

from __future__ import annotations

import cv2
import numpy as np

from exporter import report


def _square(x0: int, y0: int, s: int) -> np.ndarray:
    return np.array([[x0, y0], [x0 + s, y0], [x0 + s, y0 + s], [x0, y0 + s]], np.int32)


def test_concept_overlay_is_green_width_2_and_combined_has_legend():
    img = np.full((60, 80, 3), 128, np.uint8)
    ov = report.concept_overlay(img, [_square(10, 10, 20)])
    assert ov.shape == img.shape and np.all(img == 128)  # input untouched
    green = (ov[:, :, 1] > 200) & (ov[:, :, 0] < 100) & (ov[:, :, 2] < 100)
    assert green[10, 15] and green[11, 15] and not green[20, 20]
    both = report.combined_overlay(img, [[_square(5, 5, 10)], [_square(40, 30, 15)]],
                                   [1.5, 0.25])
    assert both.shape[0] > img.shape[0] and both.shape[1] == img.shape[1]  # legend band below
    colors = report.concept_colors(2)
    assert colors[0] != colors[1]


def test_grid_shapes_and_empty_grid():
    tiles = [(np.zeros((30, 50, 3), np.uint8), "a"), (np.zeros((50, 30, 3), np.uint8), "b"),
             (np.zeros((20, 20, 3), np.uint8), "c")]
    grid = report.make_grid(tiles, columns=2, title="t")
    th = report.TILE + report.CAPTION
    assert grid.shape[0] == 30 + 2 * (th + 4) + 4
    assert grid.shape[1] == 2 * (report.TILE + 4) + 4
    assert report.make_grid([]).shape[0] > 0


def test_safe_name():
    assert report.safe_name("sub/dir/a b.jpg") == "sub__dir__a_b.jpg"
    assert report.safe_name("") == "image"


def test_k_plot_and_index(tmp_path):
    report.plot_k_curves({"stability": {2: 0.9, 3: 0.7}, "certainty": {2: 1.4, 3: 1.2}}, 2,
                         tmp_path / "k.png", "k=2 is the most stable")
    img = cv2.imread(str(tmp_path / "k.png"))
    assert img is not None and img.std() > 5
    results = [report.ImageResult("x/one.png", np.full((40, 60, 3), 90, np.uint8),
                                  [[_square(5, 5, 10)], []], np.array([0.8, 0.1]))]
    data = report.ReportData(name="ant <&>", k=2, k_reason="fixed",
                             decisions=[{"id": "bad.gif", "kept": False, "stage": "error",
                                         "reason": "GIF", "score": float("nan")}],
                             summary={"images": 2}, notices=["a notice"])
    rendered = report.write_report(tmp_path, results, data, top_n=1, total=1)
    html = (tmp_path / "index.html").read_text()
    assert "ant &lt;&amp;&gt;" in html and "a notice" in html and "bad.gif" in html
    for rel in rendered.grid_all + rendered.grid_top + list(rendered.combined.values()):
        assert (tmp_path / rel).is_file() and f'src="{rel}"' in html
    assert rendered.overlays[0] == {"x/one.png": "overlays/concept_00/x__one.jpg"}
    assert rendered.top_ids == [["x/one.png"], ["x/one.png"]]
