"""The web page at `/` in a real browser (headless Chromium against a real server): an
upload and a generated sample show exactly k proponents and k opponents, in the API's
order, with the API's exact/estimate marks and thumbnails that load; an API error is shown
and the page goes on working."""

from __future__ import annotations

import contextlib
import io
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
import uvicorn
from PIL import Image

from fastinf.config import CurvatureConfig
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.index import IndexConfig
from fastinf.models import DiffusersEpsModel
from fastinf.service import ServiceConfig, create_app

from tiny import SMALL_SCORE, random_dataset, tiny_unet

CHROMIUM = Path("/usr/bin/chromium")
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
SHAPE = (1, 4, 4)
PAGE_K = 6  # the page's default k

# What the page shows for each thumbnail of one list ("proponents" or "opponents").
READ_THUMBS = """sign => [...document.querySelectorAll(`#${sign} .thumb`)].map(thumb => ({
    index: thumb.querySelector('.index').textContent,
    score: thumb.querySelector('.score').textContent,
    mark: thumb.querySelector('.mark').textContent,
    exact: thumb.querySelector('.mark').classList.contains('exact'),
    estimate: thumb.querySelector('.mark').classList.contains('estimate'),
    loaded: thumb.querySelector('img').naturalWidth > 0,
}))"""
IMAGES_SETTLED = "() => [...document.querySelectorAll('.thumb img')].every(image => image.complete)"


def _png(seed: int, size: int = 4) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size, size), generator=generator, dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy(), "L").save(buffer, "PNG")
    return buffer.getvalue()


def _tiny_engine() -> InfluenceEngine:
    """A 4×4 UNet on 12 examples in float32, the dtype of the default model."""
    engine = InfluenceEngine(
        DiffusersEpsModel(tiny_unet().float()),
        NoiseSchedule.linear(100, 1e-3, 0.2),
        random_dataset(12, SHAPE, seed=1, dtype=torch.float32),
        config=SMALL_SCORE,
    )
    engine.fit(CurvatureConfig(factor_draws=2, eigval_draws=2))
    return engine


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """One engine that scores every example exactly, one that answers from an index."""
    indexed = _tiny_engine()
    config = IndexConfig(compression="countsketch", dim=32, calibration_examples=4)
    indexed.build_index(tmp_path_factory.mktemp("index"), config)
    return {"exact": _tiny_engine(), "index": indexed}


# The exact engine marks every entry exact; the index, asked to re-score none, marks every
# entry an estimate: between them a page that shows the wrong mark fails.
SERVICE_CONFIGS = {
    "exact": ServiceConfig(generate_steps=10),
    "index": ServiceConfig(generate_steps=10, exact_rerank=0),
}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests drive Debian's chromium package, which "
            ".ci/run installs (apt-get install -y chromium)."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _running(app):
    """A real uvicorn server on loopback in a thread, stopped on exit."""
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(params=["index", "exact"])
def page(request, engines, browser):
    """The page, loaded from a fresh server, with its model information shown."""
    scorer = request.param
    with _running(create_app(engines[scorer], SERVICE_CONFIGS[scorer])) as url:
        context = browser.new_context(base_url=url)
        context.set_default_timeout(20_000)
        page = context.new_page()
        page.scorer = scorer
        script_errors = []
        page.on("pageerror", lambda error: script_errors.append(error))
        page.goto("/")
        page.wait_for_function("() => !document.querySelector('#info').textContent.includes('…')")
        yield page
        context.close()
    assert not script_errors, f"the page's script failed: {script_errors}"


def _check_shows(page, answer: dict, k: int) -> None:
    """The page shows `answer` (the /v1/topk JSON it received): k thumbnails per sign in
    the API's order, each with its index, its score and the API's exact/estimate mark."""
    page.wait_for_selector("#status[data-state=done]")
    page.wait_for_function(IMAGES_SETTLED)
    assert answer["k"] == k
    assert f"scorer: {answer['scorer']}" in page.text_content("#timings")
    for sign in ("proponents", "opponents"):
        shown = page.evaluate(READ_THUMBS, sign)
        assert len(shown) == len(answer[sign]) == k
        for thumb, entry in zip(shown, answer[sign], strict=True):
            assert thumb["index"] == f"#{entry['index']}"
            assert float(thumb["score"]) == pytest.approx(entry["score"], rel=1e-2)
            assert (thumb["exact"], thumb["estimate"]) == (entry["exact"], not entry["exact"])
            assert thumb["mark"] == ("exact" if entry["exact"] else "≈ estimate")
            assert thumb["loaded"], f"the thumbnail of training example {entry['index']} failed"


def _marks(answer: dict) -> set[bool]:
    return {entry["exact"] for sign in ("proponents", "opponents") for entry in answer[sign]}


def test_an_upload_shows_k_proponents_and_opponents_as_the_api_answered(page, tmp_path):
    upload = tmp_path / "query.png"
    upload.write_bytes(_png(0))
    k = 4
    page.fill("#k", str(k))
    page.locator("#k").blur()  # no query yet: a change of k alone sends nothing
    with page.expect_response("**/v1/topk") as response:
        page.set_input_files("#file", str(upload))
    answer = response.value.json()
    _check_shows(page, answer, k)
    assert _marks(answer) == {page.scorer == "exact"}
    assert "query.png" in page.text_content("#query")
    assert page.evaluate("document.querySelector('#query-image').naturalWidth") == 4
    info = page.text_content("#info")
    assert "12 training examples" in info
    assert ("index:" in info) == (page.scorer == "index")
    assert page.is_hidden("#error")


@pytest.mark.parametrize("page", ["index"], indirect=True)
def test_an_api_error_is_shown_and_the_page_goes_on(page, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    with page.expect_response("**/v1/topk") as response:
        page.set_input_files("#file", str(notes))
    assert response.value.status == 400
    reason = response.value.json()["error"]
    page.wait_for_selector("#status[data-state=error]")
    assert page.is_visible("#error")
    assert reason in page.text_content("#error")
    assert page.locator(".thumb").count() == 0

    larger = tmp_path / "larger.png"  # 8×8: the page asks the service to resize it
    larger.write_bytes(_png(1, size=8))
    with page.expect_response("**/v1/topk") as response:
        page.set_input_files("#file", str(larger))
    _check_shows(page, response.value.json(), PAGE_K)
    assert page.is_hidden("#error")
    assert page.text_content("#error") == ""


def test_generate_a_sample_and_attribute_it(page):
    page.fill("#seed", "3")
    with (
        page.expect_response("**/v1/generate") as generated,
        page.expect_response("**/v1/topk") as scored,
    ):
        page.click("#generate")
    sample = generated.value.json()
    answer = scored.value.json()
    assert sample["seed"] == 3
    assert scored.value.request.post_data_json["image"] == sample["image"]
    _check_shows(page, answer, PAGE_K)
    assert _marks(answer) == {page.scorer == "exact"}
    assert page.get_attribute("#query-image", "src") == sample["png"]
    assert page.evaluate("document.querySelector('#query-image').naturalWidth") > 0
    assert "seed 3" in page.text_content("#query")

    # A new k re-scores the same sample, without sampling it again.
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.fill("#k", "2")
    with page.expect_response("**/v1/topk") as rescored:
        page.locator("#k").blur()
    assert rescored.value.request.post_data_json["image"] == sample["image"]
    _check_shows(page, rescored.value.json(), 2)
    assert not [url for url in requests if "/v1/generate" in url]
