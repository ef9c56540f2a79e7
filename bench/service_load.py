"""`fastinf serve` under load: closed-loop clients over loopback, three scoring setups.

Run from the repository root (not collected by pytest; ~20 min on a 2-core CPU, most of it
the exact setup and the 2,000-request memory run; `--quick` ~5 min):

    .venv/bin/python bench/service_load.py [--quick] [--configs search,rerank,exact]

For each setup it starts its own server (`python -m fastinf serve --port <free port>` on
127.0.0.1, the digits default), waits for `/healthz`, warms it up, then for 1, 4 and 16
clients sends a bounded number of `POST /v1/topk` requests, each client back-to-back
(closed loop, one keep-alive `httpx.Client` per thread), and stops the server it started
(by its PID). Setups: `search` (index, `--exact-rerank 0`), `search_worker` (the same,
scoring on a worker thread instead of the main one, `--score-thread worker`), `rerank`
(index, its default bounded re-rank), `exact` (`--no-index`: about a minute per batch, so
few requests).

Queries are 32 distinct DDPM samples of the model (`sample_ddpm`, seed 11, 50 steps; cached
in `.fastinf_cache/`), sent as JSON nested lists encoded once beforehand. Per (setup,
clients): requests, errors (a valid request not answered 200), throughput (answers per
second of wall time), client-side p50/p95/p99 latency, mean `batch_size` of the answers and
the server's VmRSS before and after. With `search` it also reruns 4 and 16 clients with
every tenth request malformed (non-image bytes, a truncated PNG, NaN in JSON, a 7×7 image,
k=0, in turn; each must get a 4xx, anything else is an error), and sends 2,000 requests
from 16 clients to see how much the server's memory grows (read after each quarter).

Targets are checked and recorded (PASS/MISS), never asserted. Rows are appended to
`bench/results/service_load.csv`; the summary goes to `service_load.md` (`--quick`:
`service_load_quick.md`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import torch
from index_common import REPO_ROOT, RESULTS_DIR, append_rows, environment, markdown_table
from PIL import Image

# name: (what the summary calls it, server flags)
CONFIGS = {
    "search": ("index, search only", ["--exact-rerank", "0"]),
    "search_worker": (
        "index, search only, scoring on a worker thread",
        ["--exact-rerank", "0", "--score-thread", "worker"],
    ),
    "rerank": ("index, default bounded re-rank", []),
    "exact": ("no index (exact scoring)", ["--no-index"]),
}
CLIENTS = (1, 4, 16)
# Requests per clients level: full run, --quick. Exact scoring costs about a minute per
# batch of up to 16, so each of its levels is about two batches.
REQUESTS = {
    "search": ({1: 32, 4: 64, 16: 128}, {1: 8, 4: 16, 16: 32}),
    "search_worker": ({1: 32, 4: 64, 16: 128}, {1: 8, 4: 16, 16: 32}),
    "rerank": ({1: 16, 4: 32, 16: 64}, {1: 4, 4: 8, 16: 16}),
    "exact": ({1: 2, 4: 8, 16: 32}, {1: 1, 4: 4, 16: 16}),
}
# Sequential warm-up requests, then one burst of 16.
WARMUP = {"search": 8, "search_worker": 8, "rerank": 4, "exact": 0}
MALFORMED_REQUESTS = ({4: 80, 16: 160}, {4: 20, 16: 40})
MEMORY_REQUESTS = (2000, 200)
MALFORMED_EVERY = 10  # every tenth request
POOL, POOL_SEED, POOL_STEPS, TOP_K = 32, 11, 50, 10
START_TIMEOUT_S = 300.0  # a missing index is built on first use (~1.5 min)
CLIENT_TIMEOUT_S = 900.0  # longer than the server's own 504 (300 s)
TARGET_P50_MS, TARGET_SCALING, TARGET_GROWTH_MB = 300.0, 2.0, 50.0


@dataclass(frozen=True)
class Request:
    """One prepared request body; `valid` ones must be answered 200, the others 4xx."""

    body: bytes
    content_type: str
    valid: bool
    kind: str = "valid"


@dataclass
class Answer:
    request: Request
    status: int | str  # the HTTP status, or the client error's name
    seconds: float
    batch_size: int | None


def query_pool() -> torch.Tensor:
    """`POOL` distinct samples of the digits model [POOL, 1, 8, 8], cached on disk."""
    cache = Path(os.environ.get("FASTINF_CACHE", REPO_ROOT / ".fastinf_cache"))
    path = cache / f"service_load_queries_{POOL}_seed{POOL_SEED}_{POOL_STEPS}steps.pt"
    if path.exists():
        return torch.load(path)
    from fastinf.models import default_schedule, load_digits_model
    from fastinf.sampling import sample_ddpm

    images = sample_ddpm(
        load_digits_model(),
        default_schedule(),
        POOL,
        seed=POOL_SEED,
        num_inference_steps=POOL_STEPS,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(images, path)
    return images


def valid_requests(images: torch.Tensor) -> list[Request]:
    return [
        Request(
            json.dumps({"image": image.tolist(), "k": TOP_K}).encode(), "application/json", True
        )
        for image in images
    ]


def malformed_requests(image: torch.Tensor) -> list[Request]:
    """The five kinds of bad request, in the order they are mixed in."""
    buffer = io.BytesIO()
    pixels = ((image[0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG")
    png = buffer.getvalue()
    nan = [[[float("nan")] * 8 for _ in range(8)]]
    small = [[[0.0] * 7 for _ in range(7)]]
    as_json = lambda payload: json.dumps(payload).encode()  # noqa: E731
    return [
        Request(b"this is not an image", "image/png", False, "non-image bytes"),
        Request(png[: len(png) // 2], "image/png", False, "truncated PNG"),
        Request(as_json({"image": nan, "k": TOP_K}), "application/json", False, "NaN JSON"),
        Request(as_json({"image": small, "k": TOP_K}), "application/json", False, "7x7 image"),
        Request(as_json({"image": image.tolist(), "k": 0}), "application/json", False, "k=0"),
    ]


def plan(valid: list[Request], count: int, malformed: list[Request] | None = None):
    """`count` requests cycling through the pool; with `malformed`, every tenth is one of
    them, the kinds in turn."""
    out = []
    for i in range(count):
        if malformed and i % MALFORMED_EVERY == MALFORMED_EVERY - 1:
            out.append(malformed[(i // MALFORMED_EVERY) % len(malformed)])
        else:
            out.append(valid[i % len(valid)])
    return out


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid` (VmRSS), MB."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS in /proc/{pid}/status")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """`python -m fastinf serve` in a subprocess on a free loopback port; stopped (by its
    own PID) when the `with` block ends, whatever happened inside."""

    def __init__(self, flags: list[str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "fastinf", "serve", "--host", "127.0.0.1"]
        self.command += ["--port", str(self.port), *flags]

    def __enter__(self) -> Server:
        started = time.perf_counter()
        self._files = contextlib.ExitStack()
        self.log = self._files.enter_context(
            tempfile.NamedTemporaryFile("w+", prefix="fastinf_serve_", suffix=".log")
        )
        self.process = subprocess.Popen(
            self.command, cwd=REPO_ROOT, stdout=self.log, stderr=subprocess.STDOUT
        )
        self.pid = self.process.pid
        try:
            self._wait_healthy()
        except BaseException:
            self.__exit__()
            raise
        self.start_seconds = time.perf_counter() - started
        return self

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.tail()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"no /healthz within {START_TIMEOUT_S:g} s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        self.log.seek(0)
        return "".join(self.log.readlines()[-lines:])

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down on SIGTERM
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._files.close()


def closed_loop(url: str, requests: list[Request], clients: int) -> tuple[list[Answer], float]:
    """Send `requests` from `clients` threads, each waiting for its answer before taking
    the next; (answers, wall seconds from the common start to the last answer)."""
    taken = iter(range(len(requests)))
    take_lock = threading.Lock()
    answers: list[Answer] = []
    start = threading.Barrier(clients + 1)

    def client() -> None:
        with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as session:
            session.get("/healthz")  # open the keep-alive connection before timing
            start.wait()
            while True:
                with take_lock:
                    position = next(taken, None)
                if position is None:
                    return
                request = requests[position]
                headers = {"content-type": request.content_type}
                tick = time.perf_counter()
                try:
                    response = session.post("/v1/topk", content=request.body, headers=headers)
                    status = response.status_code
                    batch = response.json().get("batch_size") if status == 200 else None
                except httpx.HTTPError as error:
                    status, batch = type(error).__name__, None
                answers.append(Answer(request, status, time.perf_counter() - tick, batch))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    start.wait()
    tick = time.perf_counter()
    for thread in threads:
        thread.join()
    return answers, time.perf_counter() - tick


def percentile(values: list[float], share: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    place = share * (len(ordered) - 1)
    low = int(place)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (place - low)


def summarise(answers: list[Answer], wall: float) -> dict:
    """The columns of one level (latency over valid requests only)."""
    valid = [a for a in answers if a.request.valid]
    bad = [a for a in answers if not a.request.valid]
    ok = [a for a in valid if a.status == 200]
    seconds = [a.seconds for a in valid] or [float("nan")]
    statuses = collections.Counter(str(a.status) for a in bad)
    refused_badly = [a for a in bad if not (isinstance(a.status, int) and 400 <= a.status < 500)]
    row = {
        "requests": len(answers),
        "errors": len(valid) - len(ok) + len(refused_badly),
        "throughput_rps": round(len(ok) / wall, 3),
        "p50_ms": round(1e3 * percentile(seconds, 0.50), 1),
        "p95_ms": round(1e3 * percentile(seconds, 0.95), 1),
        "p99_ms": round(1e3 * percentile(seconds, 0.99), 1),
        "mean_batch": round(sum(a.batch_size for a in ok) / len(ok), 2) if ok else "",
        "wall_s": round(wall, 2),
    }
    if bad:
        row["malformed"] = len(bad)
        row["malformed_status"] = " ".join(f"{k}:{v}" for k, v in sorted(statuses.items()))
        kinds = collections.Counter(a.request.kind for a in refused_badly)
        row["malformed_not_4xx"] = "; ".join(f"{k}: {v}" for k, v in kinds.items()) or 0
    return row


def measure(server: Server, requests: list[Request], clients: int, chunks: int = 1) -> dict:
    """One level; with `chunks` > 1 it is sent in that many parts, the server's RSS read
    after each (`rss_trace_mb`), to tell steady growth from a plateau."""
    before, load_before = rss_mb(server.pid), os.getloadavg()[0]
    answers, wall, trace = [], 0.0, [before]
    size = -(-len(requests) // chunks)
    for start in range(0, len(requests), size):
        part, seconds = closed_loop(server.url, requests[start : start + size], clients)
        answers, wall = answers + part, wall + seconds
        trace.append(rss_mb(server.pid))
    after = trace[-1]
    row = {"clients": clients, **summarise(answers, wall)}
    if chunks > 1:
        row["rss_trace_mb"] = " ".join(f"{value:.0f}" for value in trace)
    row |= {"rss_before_mb": round(before, 1), "rss_after_mb": round(after, 1)}
    row |= {"rss_growth_mb": round(after - before, 1), "load_level_before": round(load_before, 2)}
    row["load_level_after"] = round(os.getloadavg()[0], 2)
    print(
        f"  {clients:>2} clients {row['requests']:>5} requests: {row['errors']} errors, "
        f"{row['throughput_rps']:.2f} req/s, p50 {row['p50_ms']:.0f} ms, p95 "
        f"{row['p95_ms']:.0f} ms, batch {row['mean_batch']}, RSS {before:.0f} -> {after:.0f} MB"
        + (f", malformed {row['malformed_status']}" if "malformed" in row else ""),
        flush=True,
    )
    return row


def wait_for_idle(max_load: float, wait_s: float) -> None:
    deadline = time.monotonic() + wait_s
    while os.getloadavg()[0] > max_load and time.monotonic() < deadline:
        print(f"load average {os.getloadavg()[0]:.2f} > {max_load}: waiting ...", flush=True)
        time.sleep(15)
    if os.getloadavg()[0] > max_load:
        print(f"WARNING: load average {os.getloadavg()[0]:.2f} > {max_load}; re-run when idle.")


def run_config(name: str, valid: list[Request], malformed: list[Request], args) -> list[dict]:
    label, flags = CONFIGS[name]
    pick = 1 if args.quick else 0
    rows = []
    with Server(flags) as server:
        print(f"{label}: server PID {server.pid} up in {server.start_seconds:.1f} s", flush=True)
        base = {"config": name, "setup": label, "server_flags": " ".join(flags)}
        base["start_s"] = round(server.start_seconds, 1)
        if WARMUP[name]:
            closed_loop(server.url, plan(valid, WARMUP[name]), 1)
            closed_loop(server.url, plan(valid, 16), 16)
        for clients in CLIENTS:
            requests = plan(valid, REQUESTS[name][pick][clients])
            rows.append({**base, "kind": "load", **measure(server, requests, clients)})
        if name != "search":
            return rows
        for clients, count in MALFORMED_REQUESTS[pick].items():
            requests = plan(valid, count, malformed)
            rows.append({**base, "kind": "malformed", **measure(server, requests, clients)})
        requests = plan(valid, MEMORY_REQUESTS[pick])
        rows.append({**base, "kind": "memory", **measure(server, requests, 16, chunks=4)})
    return rows


def targets(rows: list[dict]) -> list[dict]:
    """The issue's targets against what was measured (PASS/MISS; nothing is asserted)."""
    out = []

    def check(target: str, measured, passed: bool) -> None:
        out.append({"target": target, "measured": measured, "result": "PASS" if passed else "MISS"})

    errors = sum(int(row["errors"]) for row in rows)
    check("0 errors (valid not 200, malformed not 4xx), all runs", errors, errors == 0)
    load = {(row["config"], row["clients"]): row for row in rows if row["kind"] == "load"}
    for name in ("search", "search_worker", "rerank"):
        if (name, 1) in load:
            p50 = load[name, 1]["p50_ms"]
            check(
                f"p50 ≤ {TARGET_P50_MS:g} ms at 1 client, {CONFIGS[name][0]}",
                f"{p50:.0f} ms",
                p50 <= TARGET_P50_MS,
            )
    for name in CONFIGS:
        if (name, 1) in load and (name, 16) in load:
            ratio = load[name, 16]["throughput_rps"] / load[name, 1]["throughput_rps"]
            check(
                f"throughput 16 clients ≥ {TARGET_SCALING:g} × 1 client, {CONFIGS[name][0]}",
                f"{ratio:.2f}×",
                ratio >= TARGET_SCALING,
            )
    for row in rows:
        if row["kind"] == "memory":
            growth = row["rss_growth_mb"]
            check(
                f"RSS growth ≤ {TARGET_GROWTH_MB:g} MB over {row['requests']} requests",
                f"{growth:+.1f} MB",
                growth <= TARGET_GROWTH_MB,
            )
    return out


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    with open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{model}, {os.cpu_count()} cores, {memory_gb:.0f} GB, Linux {platform.release()}"


def _shown(row: dict) -> dict:
    """`row` with its figures rounded for reading (whole ms and MB, req/s to 0.01)."""
    out = dict(row)
    for column in ("p50_ms", "p95_ms", "p99_ms", "rss_before_mb", "rss_after_mb"):
        out[column] = f"{row[column]:.0f}"
    out["throughput_rps"] = f"{row['throughput_rps']:.2f}"
    out["rss_growth_mb"] = f"{row['rss_growth_mb']:+.1f}"
    return out


def write_markdown(path: Path, env: dict, args, rows: list[dict], checks: list[dict]) -> None:
    command = f"`nice -n {env['nice']} " if env["nice"] else "`"
    command += ".venv/bin/python bench/service_load.py" + (" --quick" if args.quick else "")
    command += f" --configs {args.configs}`" if args.configs != ",".join(CONFIGS) else "`"
    columns = ["setup", "clients", "requests", "errors", "throughput_rps", "p50_ms", "p95_ms"]
    columns += ["p99_ms", "mean_batch", "rss_before_mb", "rss_after_mb"]
    shown = [_shown(row) for row in rows]
    load = [row for row in shown if row["kind"] == "load"]
    malformed = [row for row in shown if row["kind"] == "malformed"]
    memory = [row for row in shown if row["kind"] == "memory"]
    text = [
        "# `fastinf serve` under load (digits, 1,797 training images, loopback)",
        "",
        f"Command: {command}. Run {env['run']}, commit {env['git_commit']}, on {machine()}; "
        f"torch {env['torch']} with {env['threads']} threads; load average before "
        f"{env['load_before']}, benchmark and servers at niceness {env['nice']}. Each setup "
        "runs its own server (`python -m fastinf serve`, "
        "default `ServiceConfig`: max batch 16, 5 ms window) on 127.0.0.1; clients are "
        "closed-loop threads with one keep-alive `httpx.Client` each, in the benchmark's own "
        "process, sharing the machine's cores with the server. Latency is measured "
        "by the client over valid requests; throughput counts 200 answers per second of "
        "wall time; `mean_batch` is the mean `batch_size` of the answers (per request); RSS "
        "is the server's VmRSS just before and after the level.",
        "",
        markdown_table(load, columns),
    ]
    if malformed:
        text += [
            "",
            "## Malformed requests mixed in (every tenth: non-image bytes, truncated PNG, "
            "NaN in JSON, 7×7 image, k=0, in turn)",
            "",
            "`errors` counts valid requests not answered 200 and malformed ones not answered 4xx.",
            "",
            markdown_table(malformed, [*columns, "malformed", "malformed_status"]),
        ]
    if memory:
        text += [
            "",
            "## Memory",
            "",
            "`rss_trace_mb`: the server's VmRSS before the run and after each quarter of it "
            "(a steady climb is a leak; a step that levels off is the allocator's working set).",
            "",
            markdown_table(memory, [*columns, "rss_growth_mb", "rss_trace_mb"]),
        ]
    text += ["", "## Targets (reported, not asserted)", "", markdown_table(checks, list(checks[0]))]
    path.write_text("\n".join(text) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    parser.add_argument(
        "--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}"
    )
    parser.add_argument("--max-load", type=float, default=1.5)
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for --max-load")
    args = parser.parse_args(argv)
    names = [name.strip() for name in args.configs.split(",") if name.strip()]
    unknown = [name for name in names if name not in CONFIGS]
    if unknown or not names:
        parser.error(f"--configs {args.configs}: pick from {', '.join(CONFIGS)}.")
    images = query_pool()
    valid, malformed = valid_requests(images), malformed_requests(images[0])
    wait_for_idle(args.max_load, args.wait)
    env = environment() | {"nice": os.nice(0)}
    mode = "quick" if args.quick else "full"
    rows = []
    for name in names:  # rows are saved setup by setup: a run stopped midway keeps them
        measured = [
            {**env, "mode": mode, **row} for row in run_config(name, valid, malformed, args)
        ]
        append_rows(RESULTS_DIR / "service_load.csv", measured)
        rows += measured
    checks = targets(rows)
    for check in checks:
        print(f"{check['result']}: {check['target']} (measured {check['measured']})")
    target_rows = [{**env, "mode": mode, "kind": "target", **check} for check in checks]
    append_rows(RESULTS_DIR / "service_load.csv", target_rows)
    summary = RESULTS_DIR / ("service_load_quick.md" if args.quick else "service_load.md")
    write_markdown(summary, env, args, rows, checks)
    print(f"rows appended to {RESULTS_DIR / 'service_load.csv'}; summary {summary}")


if __name__ == "__main__":
    main()
