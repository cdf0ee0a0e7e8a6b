"""The status page in a real headless browser (Debian's chromium), mid-download.

A throttled download is in flight while chromium loads ``/_status`` and takes a screenshot;
the test then finds the progress bar's colour in the picture, partly filled.  With
``STREAMSYNC_UPDATE_DOCS=1`` the screenshot is also saved as ``docs/status-page.png``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
import trio
from PIL import Image

from ..labs.fakes import FakeRegistry
from ..labs.httplab import MiB, fetch, running_proxy

DOCS = Path(__file__).resolve().parents[2] / "docs"
BAR_FILL = (0x1E, 0x88, 0xE5)  # .fill in the page's CSS
BAR_TRACK = (0xE0, 0xE0, 0xE0)  # .bar


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("STREAMSYNC_REQUIRE_E2E") == "1":
        pytest.fail("chromium is required (apt-get install chromium) but not installed")
    pytest.skip("chromium is not installed (apt-get install chromium)")


async def screenshot(url: str, out: Path, profile: Path) -> None:
    await trio.run_process(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--window-size=1100,360",
            f"--screenshot={out}",
            url,
        ],
        capture_stdout=True,
        capture_stderr=True,
    )


def count_pixels(image: Image.Image, colour: tuple[int, int, int]) -> int:
    rgb = image.convert("RGB")
    width, height = rgb.size
    count = 0
    for x in range(width):
        for y in range(height):
            pixel = rgb.getpixel((x, y))
            assert isinstance(pixel, tuple)
            if all(abs(int(a) - b) <= 8 for a, b in zip(pixel, colour, strict=True)):
                count += 1
    return count


async def test_status_page_shows_a_progress_bar_during_a_throttled_download(
    tmp_path: Path,
) -> None:
    chromium()  # skip (or fail in CI) before starting anything
    fake = FakeRegistry(chunk_delay=0.02)  # 32 MiB at 3.2 MB/s: ten seconds in flight
    digest = fake.add_blob(os.urandom(32 * MiB))
    shot = tmp_path / "status.png"
    async with (
        running_proxy(tmp_path, fake) as proxy,
        httpx.AsyncClient() as client,
        trio.open_nursery() as nursery,
    ):
        for _ in range(3):
            nursery.start_soon(fetch, client, proxy.blob_url(digest))
        await trio.sleep(1.0)
        await screenshot(f"{proxy.url}/_status", shot, tmp_path / "profile")
        assert len(proxy.state.downloads) == 1  # still in flight when the shot was taken
        page = await client.get(f"{proxy.url}/_status")
        nursery.cancel_scope.cancel()
    assert page.status_code == 200
    assert "library/app" in page.text
    image = Image.open(shot)
    filled = count_pixels(image, BAR_FILL)
    track = count_pixels(image, BAR_TRACK)
    assert filled > 50, "no progress bar fill in the screenshot"
    assert track > 50, "the progress bar is not partly empty"
    if os.environ.get("STREAMSYNC_UPDATE_DOCS") == "1":
        DOCS.mkdir(exist_ok=True)
        shutil.copy(shot, DOCS / "status-page.png")
