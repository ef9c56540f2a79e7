"""`fastinf serve`: `topk_influencers` over HTTP, with a page at `/`.

    app = create_app(engine)                  # a FastAPI app; `serve(app)` runs it
    POST /v1/topk            image → proponents and opponents (JSON)
    POST /v1/generate        a sample from the model, to attribute
    GET  /v1/train/{i}.png   training example i as a thumbnail
    GET  /v1/info            model, dataset, fingerprints, configs
    GET  /healthz, /metrics  liveness; Prometheus text
    GET  /                   the web page

Every query is checked (`fastinf.service.inputs`) in the request's own task, then queued;
one worker scores whatever arrived within `batch_window_ms` in one engine call
(`fastinf.service.batcher`), so concurrent requests share the query-gradient passes and the
search. A full queue answers 503 with Retry-After, a slow one 504, a large body 413, a bad
image 400/422 with the reason; the engine itself is safe to share between threads.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import signal
import threading
import time
import warnings
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources

import torch
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine import InfluenceEngine
from ..imaging import png_bytes
from .batcher import BatchStats, MicroBatcher, QueueFull
from .config import ServiceConfig
from .inputs import (
    BadRequest,
    Query,
    decode_array,
    decode_base64,
    decode_image_bytes,
    parse_cond,
    parse_k,
)

__all__ = ["Service", "create_app", "serve"]

log = logging.getLogger(__name__)

# What a request may say besides its image (JSON fields, form fields or query parameters).
QUERY_FIELDS = ("k", "cond", "prompt", "exact_rerank")
MAX_RERANK = 1024
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60)


@dataclass
class _Job:
    query: Query
    submitted: float


class _Metrics:
    """Prometheus series of one service (its own registry: two apps never mix)."""

    def __init__(self, depth):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fastinf_requests",
            "HTTP requests answered, by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fastinf_request_seconds",
            "HTTP request latency, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch = Histogram(
            "fastinf_batch_size",
            "queries scored per engine call",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "fastinf_batch_seconds",
            "engine time per batch",
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "fastinf_queue_depth", "queries waiting to be batched", registry=self.registry
        )
        self.queue_depth.set_function(depth)

    def on_batch(self, stats: BatchStats) -> None:
        self.batch.observe(stats.size)
        self.batch_seconds.observe(stats.run_s)


class Service:
    """The engine behind the HTTP routes: checks queries, batches and scores them.

    Args:
        engine: a loaded `InfluenceEngine` (curvature fitted or loaded, index optional).
        config: `ServiceConfig`.
        batch_thread: score on a worker thread of the batcher's own; False: whoever
            calls `self.batcher.run()` scores (`serve` does, on the main thread).
    """

    def __init__(
        self,
        engine: InfluenceEngine,
        config: ServiceConfig | None = None,
        *,
        batch_thread: bool = True,
    ):
        if engine.curvature is None:
            raise ValueError("the engine has no curvature; fit or load one before serving.")
        self.engine = engine
        self.config = config or ServiceConfig()
        model = engine.model
        self.num_classes = getattr(model, "num_classes", None)
        self.conditional = bool(getattr(model, "is_conditional", False))
        self.batcher = MicroBatcher(
            self._score_batch,
            max_batch=self.config.max_batch,
            window_s=self.config.batch_window_ms / 1000,
            max_queue=self.config.max_queue,
            on_batch=lambda stats: self.metrics.on_batch(stats),
            thread=batch_thread,
        )
        self.metrics = _Metrics(lambda: self.batcher.depth)
        self._generate_lock = threading.Lock()

    def close(self) -> None:
        self.batcher.close()

    # -- queries ---------------------------------------------------------------------------
    def query_from_json(self, payload) -> Query:
        """A `Query` from a JSON body: image (base64 PNG/JPEG or nested list), k, cond."""
        if not isinstance(payload, dict):
            raise BadRequest("the JSON body must be an object with an 'image' field.", 400)
        unknown = set(payload) - {"image", *QUERY_FIELDS, "resize"}
        if unknown:
            raise BadRequest(
                f"unknown fields {sorted(unknown)}; send 'image', and optionally "
                f"{', '.join(repr(name) for name in (*QUERY_FIELDS, 'resize'))}."
            )
        if "image" not in payload:
            raise BadRequest("the JSON body has no 'image'; send base64 PNG or a nested list.")
        image = payload["image"]
        resize = payload.get("resize", False) is True
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if isinstance(image, str):
                tensor = decode_base64(image, self.engine.sample_shape, resize=resize)
            else:
                tensor = decode_array(image, self.engine.sample_shape)
        return self._query(tensor, payload, caught)

    def query_from_image(self, data: bytes, params) -> Query:
        """A `Query` from uploaded PNG/JPEG bytes and form/query parameters."""
        resize = str(params.get("resize", "false")).lower() in ("1", "true", "yes")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tensor = decode_image_bytes(data, self.engine.sample_shape, resize=resize)
        return self._query(tensor, params, caught)

    def _query(self, image, fields, caught) -> Query:
        """The checked `Query` of an image and the request's fields (`QUERY_FIELDS`)."""
        k, cond, rerank = fields.get("k"), fields.get("cond"), fields.get("exact_rerank")
        if fields.get("prompt") is not None:
            raise BadRequest(
                "'prompt' was given but this model is not text-conditional; drop it (or serve a "
                "text-to-image pipeline)."
            )
        k = self.config.default_k if k is None else parse_k(k, self.config.k_max)
        label = parse_cond(cond, self.num_classes if self.conditional else None)
        if self.conditional and label is None:
            raise BadRequest(
                f"the model is class-conditional; send 'cond', a label from 0 to "
                f"{self.num_classes - 1}."
            )
        if rerank is not None:
            if self.engine.index is None:
                raise BadRequest("'exact_rerank' needs an index; this service scores exactly.")
            rerank = parse_k(rerank, MAX_RERANK, name="exact_rerank", low=0)
        return Query(image, label, k, [str(w.message) for w in caught], rerank)

    def submit(self, query: Query):
        """Queue a checked query; its future resolves to the answer dict."""
        return self.batcher.submit(_Job(query, time.perf_counter()))

    def _score_batch(self, jobs: list[_Job]) -> list:
        """The batcher's handler: one engine call per group of queries that ask the same
        (k, re-rank budget, with or without a label)."""
        answers: list = [None] * len(jobs)
        groups: dict[tuple, list[int]] = {}
        for position, job in enumerate(jobs):
            query = job.query
            groups.setdefault((query.k, query.rerank, query.cond is None), []).append(position)
        for positions in groups.values():
            group = [jobs[p] for p in positions]
            try:
                results = self._score_group(group)
            except ValueError as error:
                # One bad query must not fail the others: score them one by one.
                alone = [BadRequest(str(error))] if len(group) == 1 else None
                results = alone or [self._score_alone(job) for job in group]
            for position, result in zip(positions, results, strict=True):
                answers[position] = result
        return answers

    def _score_alone(self, job: _Job):
        try:
            return self._score_group([job])[0]
        except ValueError as error:
            return BadRequest(str(error))

    def _score_group(self, jobs: list[_Job]) -> list[dict]:
        started = time.perf_counter()
        k, rerank = jobs[0].query.k, jobs[0].query.rerank
        images = torch.stack([job.query.image for job in jobs])
        cond = None
        if jobs[0].query.cond is not None:
            cond = torch.tensor([job.query.cond for job in jobs], dtype=torch.int64)
        engine = self.engine
        scorer = "index" if engine.index is not None else "exact"
        rerank = self.config.exact_rerank if rerank is None else rerank
        kwargs = {"exact_rerank": rerank} if scorer == "index" else {}
        result = engine.score(images.to(engine.dtype), k, cond=cond, **kwargs)
        score_ms = (time.perf_counter() - started) * 1000
        answers = []
        for row, job in enumerate(jobs):
            answers.append(
                {
                    "query_id": f"{int(result.query_ids[row]) & (2**64 - 1):016x}",
                    "k": k,
                    "scorer": scorer,
                    "proponents": _entries(result.proponents, row),
                    "opponents": _entries(result.opponents, row),
                    "search_recall": result.search_recall,
                    "warnings": job.query.warnings,
                    "batch_size": len(jobs),
                    "timings_ms": {
                        "queue": round((started - job.submitted) * 1000, 3),
                        "score": round(score_ms, 3),
                    },
                }
            )
        return answers

    # -- the rest --------------------------------------------------------------------------
    def thumbnail(self, index: int, scale: int) -> bytes:
        """Training example `index` as a PNG, upscaled `scale` times."""
        size = len(self.engine.train_set)
        if not 0 <= index < size:
            raise BadRequest(f"training example {index} does not exist; pick 0..{size - 1}.", 404)
        item = self.engine.train_set[index]
        image = item[0] if isinstance(item, (tuple, list)) else item
        if image.shape[0] not in (1, 3):
            raise BadRequest(
                f"training examples have {image.shape[0]} channels (latents?), not a picture.",
                404,
            )
        return png_bytes(image.float().cpu(), scale)

    def generate(self, seed: int, cond: int | None) -> dict:
        """One sample from the model (`generate_steps` DDPM steps), to use as a query."""
        from ..sampling import sample_ddpm

        with self._generate_lock:  # one sampling run at a time; scoring goes on meanwhile
            sample = sample_ddpm(
                self.engine.model,
                self.engine.schedule,
                1,
                seed=seed,
                num_inference_steps=self.config.generate_steps,
                cond=cond,
                sample_shape=self.engine.sample_shape,
            )[0]
        png = png_bytes(sample, self.config.thumbnail_scale) if sample.shape[0] in (1, 3) else None
        return {
            "seed": seed,
            "cond": cond,
            "image": sample.tolist(),
            "png": None
            if png is None
            else "data:image/png;base64," + base64.b64encode(png).decode(),
        }

    def info(self) -> dict:
        engine = self.engine
        curvature = engine.curvature
        index = engine.index
        return {
            "model": type(getattr(engine.model, "unet", engine.model)).__name__,
            "sample_shape": list(engine.sample_shape),
            "conditional": self.conditional,
            "num_classes": self.num_classes if self.conditional else None,
            "train_examples": len(engine.train_set),
            "fingerprints": {
                "model": engine.provenance["model"],
                "dataset": engine.provenance["dataset"],
                "schedule": engine.provenance["schedule"],
                "curvature": curvature.fingerprint(),
            },
            "layers": len(engine.layers),
            "score_config": dataclasses.asdict(engine.config),
            "curvature": {"strategy": curvature.config.strategy} | _plain(curvature.config),
            "index": None
            if index is None
            else {
                "build_id": index.manifest.get("build_id"),
                "config": dataclasses.asdict(index.config),
                "examples": index.num_examples,
                "bytes_per_example": index.bytes_per_example,
                "search_recall": index.manifest.get("first_stage_recall"),
            },
            "service": dataclasses.asdict(self.config),
        }


def _plain(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def _entries(top, row: int) -> list[dict]:
    out = []
    for column, index in enumerate(top.indices[row].tolist()):
        if index < 0:
            continue
        exact = True if top.exact is None else bool(top.exact[row, column])
        out.append(
            {
                "index": index,
                "score": float(top.scores[row, column]),
                "exact": exact,
                "image_url": f"/v1/train/{index}.png",
            }
        )
    return out


# -- HTTP --------------------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "status": status}, status_code=status, headers=headers)


async def _read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it exceeds `limit` bytes."""
    declared = request.headers.get("content-length")
    too_large = BadRequest(
        f"the request body is larger than {limit:,} bytes; send a smaller image.", 413
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def _form(request: Request, body: bytes):
    """Parse a multipart body that was already read (with its size bounded)."""
    sent = False

    async def receive():
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return await Request(request.scope, receive).form(max_files=1, max_fields=16)


def _route_name(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", "unmatched")  # unknown paths share one label


def create_app(
    engine: InfluenceEngine, config: ServiceConfig | None = None, *, batch_thread: bool = True
) -> FastAPI:
    """The FastAPI app serving `engine` (see the module docstring for the routes).

    batch_thread=False leaves the scoring loop to the caller (`serve` runs it on the main
    thread); with True (tests, embedding the app elsewhere) a worker thread scores."""
    service = Service(engine, config, batch_thread=batch_thread)

    @asynccontextmanager
    async def lifespan(app):
        yield
        service.close()

    app = FastAPI(title="fastinf", summary="training-data attribution", lifespan=lifespan)
    app.state.service = service
    config = service.config

    @app.middleware("http")
    async def count(request: Request, call_next):
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception:
            log.exception("unhandled error on %s", request.url.path)
            response = _error(500, "internal error; the server logged it and goes on.")
        route = _route_name(request)
        service.metrics.requests.labels(route, str(response.status_code)).inc()
        service.metrics.latency.labels(route).observe(time.perf_counter() - started)
        return response

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest):
        return _error(error.status, str(error))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        return _error(error.status_code, str(error.detail), getattr(error, "headers", None))

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(resources.files(__package__).joinpath("static/index.html").read_text())

    @app.get("/healthz")
    async def healthz():
        alive = service.batcher.alive
        return JSONResponse(
            {"status": "ok" if alive else "worker stopped", "queue_depth": service.batcher.depth},
            status_code=200 if alive else 503,
        )

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST
        )

    @app.get("/v1/info")
    async def info():
        return service.info()

    @app.get("/v1/train/{index}.png")
    async def thumbnail(index: int, scale: int | None = None):
        scale = config.thumbnail_scale if scale is None else scale
        if not 1 <= scale <= 64:
            raise BadRequest(f"scale={scale} must be from 1 to 64.")
        png = await asyncio.to_thread(service.thumbnail, index, scale)
        return Response(png, media_type="image/png", headers={"Cache-Control": "max-age=3600"})

    @app.post("/v1/generate")
    async def generate(request: Request):
        body = await _read_body(request, config.max_body_bytes)
        payload = {}
        if body.strip():
            try:
                payload = json.loads(body)
            except ValueError:
                raise BadRequest("the body is not JSON; send {'seed': 0}.", 400) from None
        if not isinstance(payload, dict):
            raise BadRequest("the JSON body must be an object such as {'seed': 0}.", 400)
        seed = payload.get("seed", request.query_params.get("seed", 0))
        seed = int(seed) if str(seed).isdigit() else -1
        if seed < 0:
            raise BadRequest("seed must be a non-negative integer.")
        cond = parse_cond(
            payload.get("cond", request.query_params.get("cond")),
            service.num_classes if service.conditional else None,
        )
        if service.conditional and cond is None:
            cond = seed % service.num_classes
        return await asyncio.to_thread(service.generate, seed, cond)

    @app.post("/v1/topk")
    async def topk(request: Request):
        received = time.perf_counter()
        body = await _read_body(request, config.max_body_bytes)
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        params = dict(request.query_params)
        if kind == "multipart/form-data":
            form = await _form(request, body)
            upload = form.get("image")
            if upload is None or isinstance(upload, str):
                raise BadRequest("the form has no file field 'image'; attach a PNG or JPEG.", 400)
            params |= {key: value for key, value in form.items() if isinstance(value, str)}
            query = service.query_from_image(await upload.read(), params)
        elif kind == "application/json":
            try:
                payload = json.loads(body)
            except ValueError as error:
                raise BadRequest(f"the body is not valid JSON ({error}).", 400) from None
            if isinstance(payload, dict):
                payload = {key: payload[key] for key in payload} | {
                    key: value for key, value in params.items() if key not in payload
                }
            query = service.query_from_json(payload)
        elif kind in ("image/png", "image/jpeg"):
            query = service.query_from_image(body, params)
        else:
            raise BadRequest(
                f"unsupported content type {kind or 'none'!r}; send multipart/form-data (field "
                "'image'), application/json or image/png.",
                415,
            )
        decoded = time.perf_counter()
        try:
            future = service.submit(query)
        except QueueFull as error:
            return _error(503, f"busy: {error} Retry shortly.", {"Retry-After": "1"})
        try:
            answer = await asyncio.wait_for(asyncio.wrap_future(future), config.timeout_s)
        except asyncio.TimeoutError:
            future.cancel()
            return _error(
                504, f"no answer within {config.timeout_s:g} s; retry later.", {"Retry-After": "5"}
            )
        answer = dict(answer)
        answer["timings_ms"] = {
            "decode": round((decoded - received) * 1000, 3),
            **answer["timings_ms"],
            "total": round((time.perf_counter() - received) * 1000, 3),
        }
        return answer

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run `app` with uvicorn until interrupted (one process: the engine is shared).

    An app made with `batch_thread=False` scores on this (the main) thread while uvicorn
    answers HTTP on another; Ctrl-C or SIGTERM stops both, after the batch in progress."""
    import uvicorn

    batcher = app.state.service.batcher
    if batcher.owns_thread:
        uvicorn.run(app, host=host, port=port, log_level="info", access_log=False)
        return
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="info", access_log=False)
    )
    http = threading.Thread(target=server.run, name="fastinf-http", daemon=True)
    signalled = threading.Event()

    def on_signal(signum, frame):
        signalled.set()
        # Closed from another thread: this handler may run while the main thread holds the
        # queue's lock. The batch in progress finishes, then the scoring loop returns.
        threading.Thread(target=batcher.close, kwargs={"timeout": 0}, daemon=True).start()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        http.start()
        # The loop returns when a signal closes the batcher, or when the server stops on its
        # own (a port in use): the watcher closes the batcher then.
        threading.Thread(
            target=lambda: (http.join(), batcher.close(timeout=0)), daemon=True
        ).start()
        batcher.run()
    finally:
        server.should_exit = True
        http.join(timeout=30)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not signalled.is_set() and not server.started:
        raise RuntimeError(
            f"the HTTP server could not listen on http://{host}:{port} (see its log above: "
            "is the port in use?); pick another with --port."
        )
