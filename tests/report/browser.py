"""Open a bertflow run report in headless Chromium (Debian's ``chromium``), check it, screenshot it.

    python -m tests.report.browser reports/report.html docs/report.png   # the README's screenshots

No network: every request other than the file itself and its data: URIs is refused and counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SEEN = """() => ({
  sections: Array.from(document.querySelectorAll('main > section')).map(s => ({
    id: s.id, title: s.querySelector('h2')?.textContent, height: s.getBoundingClientRect().height,
    top: s.getBoundingClientRect().top + window.scrollY,
    text: s.innerText.length})),
  images: Array.from(document.images).map(i => ({
    alt: i.alt, complete: i.complete, width: i.naturalWidth, height: i.naturalHeight,
    shown: i.getBoundingClientRect().width})),
  title: document.title,
})"""


def inspect(page_path: Path, screenshot: Path, width: int = 1280) -> dict:
    """What Chromium rendered: sections, images (decoded sizes), refused requests; saves a full-page PNG."""
    from playwright.sync_api import sync_playwright

    if not CHROMIUM.is_file():
        raise RuntimeError(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium); "
                           ".ci/run does this")
    refused: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})

            def route(request_route):
                url = request_route.request.url
                if url.startswith(("file://", "data:")):
                    request_route.continue_()
                else:
                    refused.append(url)
                    request_route.abort()

            page.route("**/*", route)
            page.goto(page_path.resolve().as_uri(), wait_until="load")
            seen = page.evaluate(SEEN)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return {**seen, "refused": refused}


def crop_sections(screenshot: Path, sections: list[dict], first: str, last: str, target: Path) -> None:
    """The part of a full-page screenshot from section ``first`` to the end of section ``last``."""
    from PIL import Image

    where = {s["id"]: s for s in sections}
    top = 0 if first == sections[0]["id"] else max(0, int(where[first]["top"]) - 12)  # the first: with the header
    bottom = int(where[last]["top"] + where[last]["height"]) + 12
    with Image.open(screenshot) as full:
        full.crop((0, top, full.width, min(bottom, full.height))).save(target, optimize=True)


if __name__ == "__main__":
    page_path, shot = Path(sys.argv[1]), Path(sys.argv[2])
    full = shot.with_name(f"{shot.stem}-full.png")
    found = inspect(page_path, full)
    print(f"{len(found['sections'])} sections, {len(found['images'])} images, refused {found['refused']}")
    crop_sections(full, found["sections"], "summary", "data", shot)  # the README: the top of the page
    crop_sections(full, found["sections"], "language-models", "language-models", shot.with_name(f"{shot.stem}-lm.png"))
    full.unlink()
