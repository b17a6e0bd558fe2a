"""index.html in a real browser: every image loads from file:// and the page is not blank."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest
from exporter_fakes import fake_module, make_class_folder

from exporter import export
from exporter.export import ExportSettings, LocalDiscoverer

CHROMIUM = Path("/usr/bin/chromium")

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian chromium (/usr/bin/chromium)"),
]

_PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = Array.from(document.images);
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0))
                     .map(i => i.getAttribute('src'));
  document.body.setAttribute('data-images', String(imgs.length));
  document.body.setAttribute('data-broken', JSON.stringify(broken));
});
</script>"""


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    profile.mkdir(exist_ok=True)
    cmd = [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def class_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    folder = make_class_folder(root / "data", "ant", 8)
    from concept_engine.discovery import DiscoveryOptions

    settings = ExportSettings(out=root / "out", show_progress=False,
                              discovery=DiscoveryOptions(k=0, k_min=2, k_max=3,
                                                         certainty_filter="off", max_iter=100))
    report = export.export_class("ant", folder, settings,
                                 LocalDiscoverer(fake_module().FakeSource()))
    assert report.status == "done", report.error
    return root / "out" / "ant"


def test_every_image_loads(class_dir, tmp_path):
    html = (class_dir / "index.html").read_text()
    # a copy next to the original (same relative links) with a probe; images load eagerly
    probe = class_dir / "_probe.html"
    probe.write_text(html.replace('loading="lazy"', "").replace("</body>", _PROBE + "</body>"))
    try:
        images, broken = _probe(tmp_path, probe)
    finally:
        probe.unlink()
    # top + all grids per concept (k >= 2), the k plot and one combined overlay per image
    assert images >= 2 * 2 + 1 + 8
    assert broken == []


def _probe(tmp_path: Path, page: Path) -> tuple[int, list[str]]:
    res = _chromium(tmp_path, "--virtual-time-budget=15000", "--dump-dom", page.as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    n = re.search(r'data-images="(\d+)"', res.stdout)
    broken = re.search(r'data-broken="([^"]*)"', res.stdout)
    assert n and broken, res.stdout[-2000:]
    return int(n.group(1)), json.loads(broken.group(1).replace("&quot;", '"'))


def test_probe_sees_a_broken_image(tmp_path):
    page = tmp_path / "page.html"
    page.write_text(f'<html><body><img src="missing.png">{_PROBE}</body></html>')
    assert _probe(tmp_path, page) == (1, ["missing.png"])


def test_screenshot_is_not_blank(class_dir, tmp_path):
    shot = tmp_path / "shot.png"
    res = _chromium(tmp_path, "--window-size=1280,1600", "--virtual-time-budget=15000",
                    f"--screenshot={shot}", (class_dir / "index.html").as_uri())
    assert shot.is_file(), res.stderr[-2000:]
    img = cv2.imread(str(shot))
    assert img is not None and img.shape[0] > 100
    assert float(np.var(img.astype(np.float32))) > 100.0  # text, plots and photos, not blank
    # a colourful page: the plot's blue and the contour colours are there
    assert len(np.unique(img.reshape(-1, 3) // 32, axis=0)) > 20

