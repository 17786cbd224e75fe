"""The slide-viewer page in headless Chromium: it loads, shows Deep Zoom tiles of the pyramid, and zooms to
deeper levels; tools.view_slide writes it."""

from __future__ import annotations

import functools
import http.server
import threading

import numpy as np
import pytest

from diffusion.command import run_cli
from diffusion.sampling.disk import DiskArray
from diffusion.sampling.pyramid import write_pyramid
from tests.helpers.app_browser import browser_missing, chromium, close_browser, wait_for
from tools.view_slide import main


@pytest.fixture(scope="module")
def viewer_folder(tmp_path_factory):
    """A 2,048^2 px pyramid of coloured quadrants with a fine checkerboard (so zoom levels look different)."""
    y, x = np.mgrid[0:2048, 0:2048]
    image = np.zeros((2048, 2048, 3), np.uint8)
    image[..., 0] = np.where(x < 1024, 220, 40)
    image[..., 2] = np.where(y < 1024, 40, 220)
    image[..., 1] = ((x // 16 + y // 16) % 2) * 120
    tmp_path = tmp_path_factory.mktemp("viewer")
    level0 = DiskArray(tmp_path / "level0.npy", image.shape, "uint8")
    level0.write(0, image)
    write_pyramid(level0, tmp_path / "slide.tif", compression="jpeg")
    assert run_cli(main, [str(tmp_path / "slide.tif"), "--out", str(tmp_path / "viewer")]) == 0
    return tmp_path / "viewer"


def test_viewer_page_files(viewer_folder):
    assert (viewer_folder / "index.html").is_file() and (viewer_folder / "openseadragon.min.js").is_file()
    assert 'Width="2048" Height="2048"' in (viewer_folder / "slide.dzi").read_text()
    deepest = max(int(p.name) for p in (viewer_folder / "slide_files").iterdir())
    assert deepest == 11 and len(list((viewer_folder / "slide_files" / "11").glob("*.jpeg"))) == 9 * 9


def test_viewer_loads_zooms_and_shows_tiles_in_chromium(viewer_folder, tmp_path):
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(viewer_folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    driver = chromium(tmp_path, width=800, height=600)
    try:
        driver.get(f"http://127.0.0.1:{server.server_port}/index.html")
        tiles = "return window.pixcellTiles"
        first = wait_for(
            lambda: (t := driver.execute_script(tiles)) and t["loaded"] > 0 and t, 60, "first tiles"
        )
        driver.execute_script("window.pixcellViewer.viewport.zoomBy(8).applyConstraints(true);")
        wait_for(lambda: driver.execute_script(tiles)["deepest"] > first["deepest"], 60, "deeper tiles")
        # The canvas shows the image: the red-left / blue-bottom quadrants, not an empty background.
        pixel = driver.execute_script(
            "const c = window.pixcellViewer.drawer.canvas; const d = c.getContext('2d')"
            ".getImageData(Math.floor(c.width / 4), Math.floor(c.height / 2), 1, 1).data; return Array.from(d);"
        )
        assert pixel[3] == 255 and max(pixel[:3]) > 60, pixel
        zoom = driver.find_element("id", "zoom").text
        assert zoom.endswith("x"), zoom
    finally:
        close_browser(driver)
        server.shutdown()
