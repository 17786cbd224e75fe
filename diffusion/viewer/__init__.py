"""A static slide-viewer page for a generated pyramid: Deep Zoom tiles shown with OpenSeadragon.

    python -m tools.view_slide runs/wsi/slide.tif --out runs/wsi/viewer     # then open viewer/index.html
    (tools.sample_wsi --view writes the same page beside the slide)

The Deep Zoom tiles (`slide.dzi` + `slide_files/<level>/<col>_<row>.jpeg`) come from OpenSlide's own
`openslide.deepzoom.DeepZoomGenerator` over the pyramid, so the page shows what OpenSlide reads. The page is
static: open index.html from disk or serve the folder with any web server.

OpenSeadragon 6.1.1 (`static/openseadragon.min.js`, BSD-3-Clause, licence in `static/openseadragon-LICENSE.txt`)
is the build file of the npm package `openseadragon@6.1.1`, shipped unchanged as a package asset so the page
works offline; the page hides OpenSeadragon's navigation buttons, which would need its image folder.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from diffusion.atomic import atomic_path

STATIC = Path(__file__).resolve().parent / "static"
OSD_FILES = ("openseadragon.min.js", "openseadragon-LICENSE.txt")
TILE, OVERLAP = 254, 1  # Deep Zoom's usual tiles: 254 px + 1 px overlap on each side (256 px files)

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
  html, body {{ margin: 0; height: 100%; background: #222; color: #ddd; font: 14px sans-serif; }}
  #viewer {{ position: absolute; top: 32px; bottom: 0; left: 0; right: 0; }}
  #bar {{ height: 32px; line-height: 32px; padding: 0 10px; }}
</style>
</head>
<body>
<div id="bar">{title} &middot; {width} x {height} px &middot; {mpp} um/px &middot; <span id="zoom"></span></div>
<div id="viewer"></div>
<script src="openseadragon.min.js"></script>
<script>
  const info = {info};
  const viewer = OpenSeadragon({{
    id: "viewer",
    tileSources: "slide.dzi",
    showNavigationControl: false,
    showNavigator: true,
    maxZoomPixelRatio: 2,
    crossOriginPolicy: false,
    drawer: "canvas",
  }});
  // For scripted checks (tests): how many tiles have loaded, and the deepest Deep Zoom level shown.
  window.pixcellViewer = viewer;
  window.pixcellTiles = {{ loaded: 0, deepest: 0 }};
  viewer.addHandler("tile-loaded", (e) => {{
    window.pixcellTiles.loaded += 1;
    window.pixcellTiles.deepest = Math.max(window.pixcellTiles.deepest, e.tile.level);
  }});
  viewer.addHandler("zoom", (e) => {{
    const px = viewer.viewport.viewportToImageZoom(e.zoom);
    document.getElementById("zoom").textContent = (px * info.magnification).toFixed(1) + "x";
  }});
</script>
</body>
</html>
"""


def write_viewer(slide_path: str | Path, out_dir: str | Path, quality: int = 90) -> Path:
    """Write OUT/index.html, OUT/slide.dzi and OUT/slide_files/ for `slide_path` -> the index.html path."""
    import openslide
    from openslide.deepzoom import DeepZoomGenerator

    slide_path, out_dir = Path(slide_path), Path(out_dir)
    if not slide_path.is_file():
        raise FileNotFoundError(f"{slide_path}: no such slide")
    slide = openslide.OpenSlide(str(slide_path))
    dz = DeepZoomGenerator(slide, tile_size=TILE, overlap=OVERLAP, limit_bounds=False)
    width, height = slide.dimensions
    mpp = float(slide.properties.get("openslide.mpp-x", "nan"))
    magnification = float(slide.properties.get("openslide.objective-power", "20"))
    with atomic_path(out_dir) as tmp:
        tiles = tmp / "slide_files"
        for level in range(dz.level_count):
            cols, rows = dz.level_tiles[level]
            (tiles / str(level)).mkdir(parents=True)
            for col in range(cols):
                for row in range(rows):
                    tile = dz.get_tile(level, (col, row)).convert("RGB")
                    tile.save(tiles / str(level) / f"{col}_{row}.jpeg", quality=quality)
        (tmp / "slide.dzi").write_text(dz.get_dzi("jpeg"))
        for name in OSD_FILES:
            shutil.copy(STATIC / name, tmp / name)
        info = {"width": width, "height": height, "mpp": mpp, "magnification": magnification}
        page = PAGE.format(
            title=html.escape(slide_path.name),
            width=width,
            height=height,
            mpp=f"{mpp:g}",
            info=json.dumps(info),
        )
        (tmp / "index.html").write_text(page)
    return out_dir / "index.html"
