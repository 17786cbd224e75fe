"""Drive the PixCell app (`tools/app.py`) in headless Chromium through Selenium: shared by `tests/tools/test_app.py`
and the README screenshot, which shows the demo models' variants of a tile of the demo slide:

    make demo && python -m tests.helpers.app_browser --demo demo_output --screenshot asset/app.png

The browser is Debian's `chromium` with its `chromium-driver` (`apt-get install chromium chromium-driver`);
Selenium is pointed at both, so Selenium Manager never downloads a browser or a driver.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

from tests.helpers.paths import REPO

CHROMIUM = os.environ.get("PIXCELL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("PIXCELL_CHROMEDRIVER", "/usr/bin/chromedriver")


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        return f"{' and '.join(missing)} not installed (apt-get install chromium chromium-driver)"
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_app(args: Sequence[str], timeout: float = 240) -> Iterator[str]:
    """Start `python -m tools.app ARGS` on a free localhost port; yield its URL once it answers; stop it."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log = tempfile.NamedTemporaryFile(prefix="pixcell_app_", suffix=".log", delete=False)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tools.app", *args, "--port", str(port), "--host", "127.0.0.1"],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the app exited ({proc.returncode}): {Path(log.name).read_text()[-2000:]}"
                )
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the app did not answer on {url} within {timeout:.0f} s") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        Path(log.name).unlink(missing_ok=True)


def chromium(download_dir: Path, width: int = 1400, height: int = 1400):
    """Headless Chromium with a fresh profile, no background networking, downloads into `download_dir`."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="pixcell_chromium_")
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ):
        opts.add_argument(flag)
    opts.add_experimental_option(
        "prefs", {"download.default_directory": str(download_dir), "download.prompt_for_download": False}
    )
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.profile_dir = profile  # removed by close_browser
    return driver


def close_browser(driver) -> None:
    driver.quit()
    shutil.rmtree(driver.profile_dir, ignore_errors=True)


def wait_for(check: Callable[[], object], timeout: float, what: str, poll: float = 0.2):
    """Poll `check` until it returns something truthy; TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except Exception:  # elements re-rendered under our feet: try again
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(poll)


class AppPage:
    """The app's page, by the element ids tools/app.py gives its components."""

    def __init__(self, driver, url: str, timeout: float = 60):
        from selenium.webdriver.common.by import By

        self.by, self.driver = By, driver
        driver.get(url)
        wait_for(lambda: driver.find_element(By.ID, "variants-generate").is_displayed(), timeout, "the page")

    def find(self, css: str):
        return self.driver.find_element(self.by.CSS_SELECTOR, css)

    def status(self, prefix: str = "variants") -> str:
        """The status message itself (not Gradio's progress overlay on it)."""
        return self.find(f"#{prefix}-status [data-testid=markdown]").text

    def busy(self, *elem_ids: str) -> bool:
        """True while Gradio shows its queue/progress tracker on any of these components."""
        trackers = [
            t
            for e in elem_ids
            for t in self.driver.find_elements(self.by.CSS_SELECTOR, f"#{e} [data-testid=status-tracker]")
        ]
        return any("hide" not in (t.get_attribute("class") or "").split() for t in trackers)

    def wait_status(self, text: str, prefix: str = "variants", timeout: float = 60) -> str:
        return wait_for(
            lambda: text in self.status(prefix) and self.status(prefix), timeout, f"status {text!r}"
        )

    def upload(self, path: Path, prefix: str = "variants") -> None:
        """Choose a file in the upload box (clearing the previous one first, as a user has to)."""
        clear = self.driver.find_elements(self.by.CSS_SELECTOR, f"#{prefix}-upload button[aria-label=Clear]")
        if clear:
            clear[0].click()
        box = wait_for(lambda: self.find(f"#{prefix}-upload input[type=file]"), 10, "the upload box")
        box.send_keys(str(path))

    def set_number(self, elem_id: str, value: float) -> None:
        """Type into the number box of a slider or number field (what a user does), then leave it."""
        from selenium.webdriver.common.keys import Keys

        box = self.find(f"#{elem_id} input[type=number]")
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value), Keys.TAB)

    def gallery_images(self) -> list[str]:
        imgs = self.driver.find_elements(self.by.CSS_SELECTOR, "#variants-gallery img")
        return [i.get_attribute("src") for i in imgs if i.is_displayed()]

    def generate(self, n: int, timeout: float = 300) -> float:
        """Click Generate; wait until `n` variants show (and the status says so); seconds from click to them."""
        before = self.status()  # a new result changes it (its time and seeds)
        self.find("#variants-generate").click()
        start = time.perf_counter()

        def done() -> bool:
            status = self.status()
            return (
                status != before
                and f"{n} variant(s)" in status
                and not self.busy("variants-gallery", "variants-status", "variants-files")
                and len(self.gallery_images()) >= n
            )

        wait_for(done, timeout, f"{n} variants in the gallery")
        return time.perf_counter() - start

    def click_thumbnail(self, fx: float, fy: float, prefix: str = "variants") -> None:
        """Click the slide thumbnail at a fraction (fx, fy) of its width and height."""
        from selenium.webdriver.common.action_chains import ActionChains

        img = self.find(f"#{prefix}-thumbnail img")
        w, h = img.size["width"], img.size["height"]
        # Selenium 4 offsets are from the element's centre
        ActionChains(self.driver).move_to_element_with_offset(
            img, (fx - 0.5) * w, (fy - 0.5) * h
        ).click().perform()

    def download_links(self, prefix: str = "variants") -> list:
        return self.driver.find_elements(self.by.CSS_SELECTOR, f"#{prefix}-files a[download]")

    def screenshot(self, path: Path) -> Path:
        """The whole page (the window grown to the page's height first)."""
        height = self.driver.execute_script("return document.documentElement.scrollHeight")
        self.driver.set_window_size(self.driver.get_window_size()["width"], height + 40)
        time.sleep(0.5)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path


def wait_download(folder: Path, name: str, timeout: float = 30) -> Path:
    """The finished download `name` in `folder` (Chromium writes .crdownload until it is complete)."""
    return wait_for(lambda: (folder / name).is_file() and folder / name, timeout, f"download of {name}")


def tissue_tile(slide_path: Path, size: int) -> np.ndarray:
    """The slide's most tissue-filled `size` px tile at 20x, read through openslide/tiffslide."""
    from diffusion.data.slides import TilingParams, open_slide, plan_slide, read_rgb, slide_mpp

    slide, _ = open_slide(slide_path)
    grid = plan_slide(slide, TilingParams(patch_size=size), slide_mpp(slide, slide_path))
    row, col = np.unravel_index(np.argmax(grid.fractions), grid.fractions.shape)
    tile = read_rgb(
        slide, int(col) * grid.level0_step, int(row) * grid.level0_step, grid.read_level, grid.read_size
    )
    return np.asarray(tile.resize((size, size)) if tile.size != (size, size) else tile)


def main(argv: Sequence[str] | None = None) -> int:
    """README screenshot and timing: the demo app, a click on a tissue tile of its slide, N variants."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo", default="demo_output", help="`make demo`'s output folder")
    p.add_argument("--screenshot", type=Path, default=REPO / "asset" / "app.png")
    p.add_argument("--n", type=int, default=4, help="variants")
    p.add_argument("--repeat", type=int, default=2, help="timed generations (the first one warms up)")
    args = p.parse_args(argv)
    reason = browser_missing()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 2
    demo = Path(args.demo)  # as given: the page shows it
    slide = Path(json.loads((demo / ".done" / "slide.json").read_text())["info"]["slide"])
    from diffusion.data.slides import TilingParams, open_slide, plan_slide, slide_mpp

    handle, _ = open_slide(slide)
    grid = plan_slide(handle, TilingParams(patch_size=256), slide_mpp(handle, slide))
    rows, cols = grid.fractions.shape
    row, col = np.unravel_index(np.argmax(grid.fractions), grid.fractions.shape)
    width, height = handle.dimensions
    fx, fy = (col + 0.5) * grid.level0_step / width, (row + 0.5) * grid.level0_step / height
    downloads = Path(tempfile.mkdtemp(prefix="pixcell_dl_"))
    with serve_app(["--demo", str(demo), "--device", "cpu", "--dtype", "fp32"]) as url:
        driver = chromium(downloads)
        try:
            page = AppPage(driver, url)
            page.click_thumbnail(fx, fy)
            page.wait_status("tile row")
            times = []
            for seed in reversed(range(args.repeat)):  # the last one, on screen, is the default seed 0
                page.set_number("variants-seed", seed)
                times.append(page.generate(args.n))
                print(f"click -> {args.n} variants: {times[-1]:.1f} s ({page.status()})", flush=True)
            page.screenshot(args.screenshot)
        finally:
            close_browser(driver)
    print(
        f"screenshot: {args.screenshot}; click -> variants, N={args.n}: "
        + ", ".join(f"{t:.1f} s" for t in times)
    )
    with Image.open(args.screenshot) as im:
        print(f"{im.size[0]}x{im.size[1]} px")
    return 0


if __name__ == "__main__":
    sys.exit(main())
