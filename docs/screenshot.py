"""The README's picture of the web page: `fastinf serve` on the digits default (EK-FAC and
index from .fastinf_cache, built there on first use), one generated sample attributed in
headless Chromium, saved as a PNG.

    .venv/bin/python docs/screenshot.py                 # → docs/service.png
    .venv/bin/python docs/screenshot.py --seed 11 --out /tmp/page.png
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
import time
from pathlib import Path

import uvicorn
from playwright.sync_api import sync_playwright

from fastinf.engine import default_engine, default_index
from fastinf.service import create_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WIDTH = 1200


@contextlib.contextmanager
def running(app):
    """`app` served by uvicorn on a free loopback port in a thread, stopped on exit."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated sample")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("service.png"))
    args = parser.parse_args()
    engine = default_engine()
    default_index(engine)
    with running(create_app(engine)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": WIDTH, "height": 600})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.wait_for_function("() => !document.querySelector('#info').textContent.includes('…')")
        page.fill("#seed", str(args.seed))
        page.click("#generate")
        page.wait_for_selector("#status[data-state=done]")
        page.wait_for_function(
            "() => [...document.querySelectorAll('img')].every(image => image.complete)"
        )
        page.screenshot(path=str(args.out), full_page=True)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
