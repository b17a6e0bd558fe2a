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


def test_dominant_view_colours_each_pixel_by_its_strongest_present_concept():
    from concept_engine.drawing import dominant_view, palette

    img = np.zeros((40, 80, 3), np.uint8)
    maps = np.zeros((2, 4, 8), np.float32)
    maps[0, :, :4] = 1.0  # concept 0 on the left half
    maps[1, :, 4:] = 0.5  # concept 1 on the right half, at half its training maximum
    out = dominant_view(img, maps, [1.0, 1.0], palette(2), max_alpha=1.0)
    c0, c1 = np.array(palette(2)[0]), np.array(palette(2)[1])
    assert np.abs(out[20, 5].astype(int) - c0).max() <= 2
    assert np.abs(out[20, 75].astype(int) - c1 * 0.5).max() <= 2  # opacity = strength
    gone = dominant_view(img, maps, [1.0, 1.0], palette(2), present=[True, False])
    assert gone[20, 75].max() == 0 and np.abs(gone[20, 5].astype(int) - c0 * 0.8).max() <= 2


def test_legend_is_readable_at_gallery_size():
    from concept_engine.drawing import draw_legend, palette

    img = np.zeros((600, 400, 3), np.uint8)
    out = draw_legend(img, ["thorax", "legs", "head", "background"], palette(4))
    strip = out[600:]
    dark = np.where((strip < 80).all(axis=2).any(axis=1))[0]
    # text rows scale with the width (1/16 of it): at 320 px wide still ~20 px tall lines
    assert strip.shape[0] >= 2 * 400 // 16 and dark.size >= 400 // 16


def test_grids_and_overlays_use_each_concepts_colour(tmp_path):
    results = [report.ImageResult(f"{i}.png", np.full((40, 60, 3), 90, np.uint8),
                                  [[_square(5, 5, 10)], [_square(30, 10, 12)]],
                                  np.array([0.8, 0.4]), heatmaps=np.ones((2, 4, 6), np.float32))
               for i in range(3)]
    data = report.ReportData(name="c", k=2, names=["thorax", ""])
    rendered = report.write_report(tmp_path, iter(results), data, top_n=2, total=3,
                                   concepts_file="")
    colors = report.concept_colors(2)
    for j in range(2):
        grid = cv2.imread(str(tmp_path / rendered.grid_all[j]))
        assert np.abs(grid[1, 1].astype(int) - np.array(colors[j])).max() <= 40  # border
        ov = cv2.imread(str(tmp_path / rendered.overlays[j]["0.png"]))
        x, y = (5, 15) if j == 0 else (30, 16)
        assert np.abs(ov[y, x].astype(int) - np.array(colors[j])).max() <= 60
    assert rendered.dominant and all((tmp_path / p).is_file() for p in rendered.dominant.values())
    assert all(rendered.crops)
    html = (tmp_path / "index.html").read_text()
    assert "thorax" in html and "concept 1" in html


def test_explain_report_marks_absent_concepts_and_ood(tmp_path):
    ok = report.ImageResult("ant.png", np.full((40, 60, 3), 90, np.uint8),
                            [[_square(5, 5, 10)], []], np.array([0.8, 0.01]),
                            heatmaps=np.ones((2, 4, 6), np.float32),
                            present=np.array([True, False]),
                            relative_score=np.array([0.6, 0.0]), reconstruction_error=0.7)
    odd = report.ImageResult("gymnast.png", np.full((40, 60, 3), 30, np.uint8), [[], []],
                             np.array([0.02, 0.01]), heatmaps=np.ones((2, 4, 6), np.float32),
                             present=np.array([False, False]),
                             relative_score=np.array([0.0, 0.0]), reconstruction_error=0.99,
                             out_of_distribution=True)
    (tmp_path / "ex").mkdir()
    cv2.imwrite(str(tmp_path / "ex" / "e.jpg"), np.zeros((10, 10, 3), np.uint8))
    data = report.ReportData(name="ant (explained)", k=2, explain=True, names=["thorax", ""],
                             exemplars=["ex/e.jpg", ""])
    report.write_report(tmp_path, iter([ok, odd]), data, top_n=2, total=2, concepts_file="")
    html = (tmp_path / "index.html").read_text()
    assert html.count("OUT OF DISTRIBUTION") == 1 and 'class="absent"' in html
    assert 'src="ex/e.jpg"' in html and "no training exemplars" in html
    assert "60%" in html  # the training percentile of thorax in ant.png


def test_hierarchy_tree_nests_children_under_parents():
    data = report.ReportData(name="c", k=3, names=["", "", "legs"], hierarchy={
        2: {"parents": [-1, -1], "cosines": [1, 1], "top_image": [0, 1]},
        3: {"parents": [1, 0, 1], "cosines": [0.9, 0.8, 0.7], "top_image": [0, 0, 1]}},
        training_ids=["a", "b"])
    tree = report._hierarchy_tree(data, report.Rendered(thumbs={0: "thumbs/0000.jpg"}))
    assert [n["j"] for n in tree] == [0, 1]
    assert [c["j"] for c in tree[1]["children"]] == [0, 2]
    assert tree[1]["children"][1]["label"] == "legs" and tree[0]["thumb"] == "thumbs/0000.jpg"


def test_all_images_grid_is_paged_for_large_classes(tmp_path, monkeypatch):
    """A 5000-image class once failed: its one "all images" grid was taller than JPEG allows
    (65500 px). Pages are written as they fill; every tile is on exactly one page; the top
    grid still ranks across all images."""
    monkeypatch.setattr(report, "ALL_GRID_PAGE", 4)
    n = 10
    results = [report.ImageResult(f"{i:02d}.png", np.full((40, 60, 3), 90, np.uint8),
                                  [[_square(5, 5, 10)]], np.array([i / 10.0]))
               for i in range(n)]
    data = report.ReportData(name="c", k=1)
    rendered = report.write_report(tmp_path, iter(results), data, top_n=3, total=n,
                                   concepts_file="")
    pages = rendered.grid_all_pages[0]
    assert pages == ["grids/concept_00_all.jpg", "grids/concept_00_all_002.jpg",
                     "grids/concept_00_all_003.jpg"]
    assert rendered.grid_all == [pages[0]]
    widths = [cv2.imread(str(tmp_path / p)).shape[1] for p in pages]
    assert widths[0] == widths[1] > widths[2]  # 4 + 4 + 2 tiles, one row each
    assert rendered.top_ids[0] == ["09.png", "08.png", "07.png"]
    html = (tmp_path / "index.html").read_text()
    assert all(p in html for p in pages) and "3 pages" in html


def test_render_threads_do_not_change_any_picture(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    results = [report.ImageResult(f"{i}.png", rng.integers(0, 255, (40, 60, 3), np.uint8),
                                  [[_square(5, 5, 10)], [_square(30, 10, 12)]],
                                  rng.random(2), heatmaps=rng.random((2, 4, 6)).astype(np.float32))
               for i in range(9)]
    data = report.ReportData(name="c", k=2)
    outs = {}
    for threads in (1, 3):
        monkeypatch.setattr(report, "RENDER_THREADS", threads)
        out = tmp_path / str(threads)
        rendered = report.render_images(iter(results), 2, out, top_n=3, total=9, data=data)
        outs[threads] = ({p.relative_to(out): p.read_bytes() for p in out.rglob("*.jpg")},
                         rendered.overlays, rendered.top_ids, rendered.grid_all_pages)
    assert len(outs[1][0]) == 9 * 2 + 9 + 9 + 2 * 3  # overlays, combined, dominant, grids
    assert outs[1] == outs[3]
    # grid pages written while images are still being drawn (in the pool): the same pages
    monkeypatch.setattr(report, "ALL_GRID_PAGE", 4)
    pages = {}
    for threads in (1, 3):
        monkeypatch.setattr(report, "RENDER_THREADS", threads)
        out = tmp_path / f"pages{threads}"
        rendered = report.render_images(iter(results), 2, out, top_n=3, total=9, data=data)
        pages[threads] = ({p.relative_to(out): p.read_bytes() for p in out.rglob("grids/*")},
                          rendered.grid_all_pages)
    assert pages[1][1][0] == ["grids/concept_00_all.jpg", "grids/concept_00_all_002.jpg",
                              "grids/concept_00_all_003.jpg"]
    assert pages[1] == pages[3]


def test_results_may_carry_encoded_images_decoded_on_the_render_threads(tmp_path,
                                                                        monkeypatch):
    # the same pictures whether a result holds the decoded image or the file's bytes
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 255, (40, 60, 3), np.uint8) for _ in range(5)]
    files = [cv2.imencode(".png", im)[1].tobytes() for im in images]

    def results(payloads):
        r = np.random.default_rng(5)
        return [report.ImageResult(f"{i}.png", p, [[_square(5, 5, 10)], [_square(30, 10, 12)]],
                                   r.random(2), heatmaps=r.random((2, 4, 6)).astype(np.float32))
                for i, p in enumerate(payloads)]

    data = report.ReportData(name="c", k=2)
    outs = []
    for payloads in (images, files):
        out = tmp_path / str(len(outs))
        monkeypatch.setattr(report, "RENDER_THREADS", 2)
        report.render_images(iter(results(payloads)), 2, out, top_n=3, total=5, data=data)
        outs.append({p.relative_to(out): p.read_bytes() for p in out.rglob("*.jpg")})
    assert len(outs[0]) == 5 * 2 + 5 + 5 + 2 * 3 and outs[0] == outs[1]


def test_report_decoding_takes_8_bit_pixels_as_they_are():
    from feature_server.images import ALL_FORMATS, DecodeLimits, decode_image

    rng = np.random.default_rng(6)
    cases = [rng.integers(0, 256, (9, 7, 3), np.uint8), rng.integers(0, 256, (9, 7), np.uint8),
             rng.integers(0, 256, (9, 7, 4), np.uint8),
             rng.integers(0, 65536, (9, 7, 3), np.uint16)]
    for img in cases:
        data = cv2.imencode(".png", img)[1].tobytes()
        slow = np.clip(np.rint(decode_image(data, DecodeLimits(formats=ALL_FORMATS))), 0, 255)
        got = report.decode_image(data)
        assert got.dtype == np.uint8 and got.shape == (9, 7, 3)
        np.testing.assert_array_equal(got, slow.astype(np.uint8))


def test_dominant_view_blend_kernel_is_the_numpy_blend_bit_for_bit():
    from concept_engine.drawing import _blend_kernel, _blend_numpy, palette

    rng = np.random.default_rng(7)
    for trial in range(20):
        h, w, k = int(rng.integers(1, 60)), int(rng.integers(1, 60)), int(rng.integers(1, 6))
        img = rng.integers(0, 256, (h, w, 3), np.uint8)
        for dtype in (np.uint8, np.int32):
            dom = rng.integers(0, k, (h, w)).astype(dtype)
            alpha = (rng.random((h, w)) * 0.8).astype(np.float32)
            alpha[rng.random((h, w)) < 0.2] = np.float32(0.8)
            table = np.asarray(palette(k), np.float32)
            out = np.empty_like(img)
            _blend_kernel(img, dom, alpha, table, out)
            np.testing.assert_array_equal(out, _blend_numpy(img, dom, alpha, table),
                                          err_msg=str(trial))


def test_write_image_makes_its_folder_again_when_it_was_removed(tmp_path):
    # write_image remembers the folders it made; a folder removed since is made again
    import shutil

    picture = np.full((8, 8, 3), 200, np.uint8)
    path = tmp_path / "out" / "overlays" / "a.jpg"
    report.write_image(path, picture)
    shutil.rmtree(tmp_path / "out")
    report.write_image(path, picture)
    assert cv2.imread(str(path)).shape == (8, 8, 3)
    report.write_image(tmp_path / "out" / "x.png", picture)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "out" / "x.png")), picture)
