"""The HTTP service: answers equal the engine's, concurrent requests equal sequential
ones, bad requests get the right 4xx and leave the server answering, limits hold."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from PIL import Image

from fastinf.config import CurvatureConfig
from fastinf.diffusion import NoiseSchedule
from fastinf.engine import InfluenceEngine
from fastinf.index import IndexConfig
from fastinf.models import DiffusersEpsModel
from fastinf.service import ServiceConfig, create_app
from fastinf.service.batcher import MicroBatcher, QueueFull

from tiny import SMALL_SCORE, random_dataset, tiny_unet

SHAPE = (1, 4, 4)


def _png(pixels: torch.Tensor) -> bytes:
    """A greyscale PNG of a [1, H, W] uint8 tensor."""
    buffer = io.BytesIO()
    Image.fromarray(pixels[0].numpy(), "L").save(buffer, "PNG")
    return buffer.getvalue()


def _pixels(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, SHAPE, generator=generator, dtype=torch.uint8)


def _model_range(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.float() / 127.5 - 1.0


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    engine = InfluenceEngine(
        DiffusersEpsModel(tiny_unet()),
        NoiseSchedule.linear(100, 1e-3, 0.2),
        random_dataset(12, SHAPE, seed=1),
        config=SMALL_SCORE,
    )
    engine.fit(CurvatureConfig(factor_draws=2, eigval_draws=2))
    index_dir = tmp_path_factory.mktemp("index")
    engine.build_index(index_dir, IndexConfig(compression="countsketch", dim=32), load=False)
    return engine, index_dir


@pytest.fixture(params=["exact", "index"])
def engine(request, setup):
    engine, index_dir = setup
    if request.param == "index":
        engine.load_index(index_dir)
    yield engine
    engine.unload_index()


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, ServiceConfig(default_k=3))) as client:
        yield client


def _lists(answer):
    return [(e["index"], e["score"]) for e in answer["proponents"] + answer["opponents"]]


def test_every_way_to_send_an_image_gives_the_engine_answer(engine, client):
    pixels = _pixels(0)
    png = _png(pixels)
    expected = engine.score(_model_range(pixels).double()[None], k=3)
    answers = [
        client.post("/v1/topk", files={"image": ("q.png", png, "image/png")}),
        client.post("/v1/topk?k=3", content=png, headers={"content-type": "image/png"}),
        client.post("/v1/topk", json={"image": base64.b64encode(png).decode(), "k": 3}),
        client.post("/v1/topk", json={"image": _model_range(pixels).tolist()}),
        client.post("/v1/topk", json={"image": _model_range(pixels)[0].tolist()}),  # [H, W]
    ]
    for response in answers:
        assert response.status_code == 200, response.text
        answer = response.json()
        assert [e["index"] for e in answer["proponents"]] == expected.proponents.indices[0].tolist()
        assert [e["index"] for e in answer["opponents"]] == expected.opponents.indices[0].tolist()
        scores = [e["score"] for e in answer["proponents"]]
        assert scores == pytest.approx(expected.proponents.scores[0].tolist(), rel=1e-9)
        assert answer["scorer"] == ("exact" if engine.index is None else "index")
        exact = expected.proponents.exact
        assert [e["exact"] for e in answer["proponents"]] == (
            [True] * 3 if exact is None else exact[0].tolist()
        )
        assert answer["proponents"][0]["image_url"].startswith("/v1/train/")
        assert set(answer["timings_ms"]) == {"decode", "queue", "score", "total"}
        assert answer["query_id"] == f"{int(expected.query_ids[0]) & (2**64 - 1):016x}"


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


def test_concurrent_http_requests_equal_sequential_engine_calls(engine):
    count = 8
    images = [_model_range(_pixels(seed)) for seed in range(count)]
    sequential = [engine.score(image.double()[None], k=3) for image in images]
    config = ServiceConfig(default_k=3, batch_window_ms=50)
    with _running(create_app(engine, config)) as url:
        barrier = threading.Barrier(count)

        def ask(image):
            with httpx.Client(base_url=url, timeout=60) as http:
                barrier.wait()
                return http.post("/v1/topk", json={"image": image.tolist()})

        with ThreadPoolExecutor(count) as pool:
            responses = list(pool.map(ask, images))
        with httpx.Client(base_url=url) as http:
            metrics = http.get("/metrics").text
    answers = [r.json() for r in responses]
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    for answer, expected in zip(answers, sequential, strict=True):
        for sign in ("proponents", "opponents"):
            top = getattr(expected, sign)
            assert [e["index"] for e in answer[sign]] == top.indices[0].tolist()
            got = [e["score"] for e in answer[sign]]
            assert got == pytest.approx(top.scores[0].tolist(), rel=1e-6, abs=1e-12)
    # They arrived together, so some were scored in one engine call.
    assert max(a["batch_size"] for a in answers) > 1
    assert 'fastinf_requests_total{route="/v1/topk",status="200"} 8.0' in metrics


@pytest.mark.parametrize(
    ("send", "status", "reason"),
    [
        (
            lambda c: c.post("/v1/topk", files={"image": ("q.png", b"GIF89a nope", "image/png")}),
            400,
            "not a readable PNG",
        ),
        (
            lambda c: c.post(
                "/v1/topk", files={"image": ("q.png", _png(_pixels(1))[:40], "image/png")}
            ),
            400,
            "not a readable PNG",
        ),
        (
            lambda c: c.post(
                "/v1/topk",
                files={
                    "image": ("q.png", _png(torch.zeros(1, 5, 4, dtype=torch.uint8)), "image/png")
                },
            ),
            422,
            "the model takes 4×4",
        ),
        (
            lambda c: c.post(
                "/v1/topk",
                content='{"image": [[NaN, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]}',
                headers={"content-type": "application/json"},
            ),
            422,
            "NaN",
        ),
        (lambda c: c.post("/v1/topk", json={"image": [[0, 1], [2]]}), 422, "ragged"),
        (
            lambda c: c.post(
                "/v1/topk", content=b"{" * (5 << 20), headers={"content-type": "application/json"}
            ),
            413,
            "larger than",
        ),
        (
            lambda c: c.post("/v1/topk", json={"image": [[0.0] * 4] * 4, "k": 0}),
            422,
            "k=0 must be an integer from 1",
        ),
        (
            lambda c: c.post(
                "/v1/topk?k=-2", files={"image": ("q.png", _png(_pixels(1)), "image/png")}
            ),
            422,
            "k='-2' must be an integer",
        ),
        (
            lambda c: c.post("/v1/topk", json={"image": [[0.0] * 4] * 4, "cond": 3}),
            422,
            "model is unconditional",
        ),
        (
            lambda c: c.post("/v1/topk", json={"image": [[0.0] * 4] * 4, "prompt": "a digit"}),
            422,
            "not text-conditional",
        ),
        (
            lambda c: c.post("/v1/topk", json={"image": [[0.0] * 4] * 4, "colour": 1}),
            422,
            "unknown fields",
        ),
        (
            lambda c: c.post(
                "/v1/topk", content=b"{not json", headers={"content-type": "application/json"}
            ),
            400,
            "not valid JSON",
        ),
        (
            lambda c: c.post("/v1/topk", content=b"x", headers={"content-type": "text/plain"}),
            415,
            "unsupported content type",
        ),
        (
            lambda c: c.post("/v1/topk", files={"other": ("q.png", b"x", "image/png")}),
            400,
            "no file field 'image'",
        ),
        (lambda c: c.get("/v1/nothing-here"), 404, "Not Found"),
        (lambda c: c.get("/v1/train/12.png"), 404, "pick 0..11"),
        (lambda c: c.get("/v1/train/-1.png"), 404, "pick 0..11"),
        (lambda c: c.get("/v1/train/3.png?scale=0"), 422, "scale=0"),
    ],
)
def test_bad_requests_get_the_reason_and_the_server_goes_on(client, send, status, reason):
    response = send(client)
    assert response.status_code == status, response.text
    assert reason in response.json()["error"]
    follow = client.post("/v1/topk", json={"image": _model_range(_pixels(2)).tolist()})
    assert follow.status_code == 200


def test_unscaled_pixels_are_answered_with_a_warning(client):
    response = client.post("/v1/topk", json={"image": (_pixels(3).float()).tolist()})
    assert response.status_code == 200
    assert any("unscaled pixels" in w for w in response.json()["warnings"])


def test_info_health_metrics_thumbnails(engine, client):
    info = client.get("/v1/info").json()
    assert info["train_examples"] == 12
    assert info["sample_shape"] == list(SHAPE)
    assert info["fingerprints"]["curvature"] == engine.curvature.fingerprint()
    assert info["score_config"]["train_draws"] == SMALL_SCORE.train_draws
    assert (info["index"] is None) == (engine.index is None)
    assert client.get("/healthz").json()["status"] == "ok"
    png = client.get("/v1/train/5.png?scale=3")
    assert png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(png.content)).size == (12, 12)
    text = client.get("/metrics").text
    for series in (
        "fastinf_requests_total",
        "fastinf_request_seconds_bucket",
        "fastinf_queue_depth",
    ):
        assert series in text
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def test_generate_gives_a_sample_the_service_can_score(client):
    sample = client.post("/v1/generate", json={"seed": 4}).json()
    assert torch.tensor(sample["image"]).shape == SHAPE
    assert sample["png"].startswith("data:image/png;base64,")
    again = client.post("/v1/generate", json={"seed": 4}).json()
    assert again["image"] == sample["image"]
    assert client.post("/v1/topk", json={"image": sample["image"]}).status_code == 200
    assert client.post("/v1/generate", json={"seed": -1}).status_code == 422


def _blocking(engine, monkeypatch):
    """Make engine.score wait until the returned event is set."""
    release = threading.Event()
    score = engine.score

    def slow(*args, **kwargs):
        release.wait(30)
        return score(*args, **kwargs)

    monkeypatch.setattr(engine, "score", slow)
    return release


@pytest.mark.parametrize("engine", ["exact"], indirect=True)
def test_full_queue_answers_503_with_retry_after(engine, monkeypatch):
    release = _blocking(engine, monkeypatch)
    app = create_app(engine, ServiceConfig(max_queue=1, max_batch=1, batch_window_ms=0))
    body = {"image": _model_range(_pixels(5)).tolist()}
    with _running(app) as url, ThreadPoolExecutor(2) as pool:
        first = pool.submit(httpx.post, f"{url}/v1/topk", json=body, timeout=60)
        time.sleep(0.5)  # the first is being scored (blocked); the next one waits in the queue
        second = pool.submit(httpx.post, f"{url}/v1/topk", json=body, timeout=60)
        time.sleep(0.5)
        busy = httpx.post(f"{url}/v1/topk", json=body, timeout=60)
        release.set()
        assert first.result().status_code == 200 and second.result().status_code == 200
    assert busy.status_code == 503
    assert busy.headers["retry-after"] == "1"


@pytest.mark.parametrize("engine", ["exact"], indirect=True)
def test_slow_requests_time_out_with_504(engine, monkeypatch):
    release = _blocking(engine, monkeypatch)
    app = create_app(engine, ServiceConfig(timeout_s=0.3))
    with TestClient(app) as client:
        response = client.post("/v1/topk", json={"image": _model_range(_pixels(6)).tolist()})
        release.set()
    assert response.status_code == 504
    assert "no answer within 0.3 s" in response.json()["error"]


@pytest.mark.parametrize("engine", ["exact"], indirect=True)
def test_a_bad_query_in_a_batch_fails_alone(engine):
    from fastinf.service.app import _Job
    from fastinf.service.inputs import BadRequest, Query

    app = create_app(engine)
    service = app.state.service
    good = [Query(_model_range(_pixels(s)), None, 2) for s in (7, 8)]
    bad = Query(torch.full(SHAPE, float("nan")), None, 2)  # bypasses the request checks
    answers = service._score_batch([_Job(q, time.perf_counter()) for q in (good[0], bad, good[1])])
    service.close()
    assert isinstance(answers[1], BadRequest) and "NaN" in str(answers[1])
    for answer, query in zip((answers[0], answers[2]), good, strict=True):
        expected = engine.score(query.image.double()[None], k=2)
        assert [e["index"] for e in answer["proponents"]] == expected.proponents.indices[0].tolist()


def test_batcher_groups_bounds_and_survives_a_failing_handler():
    release = threading.Event()
    seen = []

    def handle(items):
        release.wait(10)
        seen.append(list(items))
        if "boom" in items:
            raise RuntimeError("boom")
        return [item * 2 for item in items]

    batcher = MicroBatcher(handle, max_batch=3, window_s=0.05, max_queue=4)
    futures = [batcher.submit(i) for i in range(4)]
    time.sleep(0.2)  # the first batch is being handled: 1 of the 4 left to wait... (3 taken)
    futures += [batcher.submit(i) for i in (10, 11, 12)]
    with pytest.raises(QueueFull):
        for i in range(10):
            futures.append(batcher.submit(100 + i))
    release.set()
    assert [f.result(10) for f in futures[:7]] == [0, 2, 4, 6, 20, 22, 24]
    assert max(len(batch) for batch in seen) == 3
    failing = batcher.submit("boom")
    with pytest.raises(RuntimeError, match="boom"):
        failing.result(10)
    assert batcher.submit(21).result(10) == 42  # the worker lives on
    batcher.close()


def test_a_batcher_without_a_thread_scores_on_the_thread_that_runs_it():
    ran_on = []

    def handle(items):
        ran_on.append(threading.current_thread())
        return [item + 1 for item in items]

    batcher = MicroBatcher(handle, thread=False)
    assert batcher.alive and not batcher.owns_thread  # ready: its owner is about to run it
    queued = batcher.submit(1)  # waits until a thread runs the loop
    loop = threading.Thread(target=batcher.run, name="chosen")
    loop.start()
    assert queued.result(10) == 2 and batcher.alive
    with pytest.raises(RuntimeError, match="already running"):
        batcher.run()
    batcher.close(timeout=10)
    loop.join(10)
    assert not loop.is_alive() and not batcher.alive
    assert {thread.name for thread in ran_on} == {"chosen"}
