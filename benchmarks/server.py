"""Running a served repository and driving it with clients (always through ``RevpersClient``)."""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path

from benchmarks.common import anonymized_faces
from revpers.serving.launcher import TritonServer, free_ports
from revpers_client import RevpersClient
from revpers_client.cli import latency_stats


def triton_server(repository: Path):
    """A ``revpers.serving.launcher.TritonServer`` for ``repository`` on free loopback ports; use it as
    a context manager (started and ready inside the block, stopped after; ``startup_seconds`` is the
    time to ready)."""
    grpc, http, metrics = free_ports(3)
    return TritonServer(repository, grpc_port=grpc, http_port=http, metrics_port=metrics)


def timed_request(client, raw: bytes, params: dict) -> tuple[bytes, dict, float]:
    """One request; returns (image bytes, report, client-side wall ms)."""
    t0 = time.perf_counter()
    image, report = client.anonymize(raw, **params)
    return image, report, (time.perf_counter() - t0) * 1e3


def warm_up(url: str, jobs: list[tuple[str, bytes]], clients: int, params: dict, stagger_s: float = 0.05) -> dict:
    """Uncounted warm-up meant to reach every server instance: ``clients`` threads (one gRPC client
    each) each send *all* ``jobs`` in order, their starts ``stagger_s`` apart.

    Why this shape: the BLS model's dynamic batcher (queue delay 0.5 ms) would merge requests sent at
    the same instant into one execute on one instance, and requests sent one after another may all
    land on the same idle instance. Staggered, each client's request usually arrives while the others
    keep their instances busy, so with ``clients`` = the instance count each BLS instance gets the
    whole folder, and the overlapping component calls spread over the component instances. The
    stagger must exceed that queue delay and stay below one request's time (50 ms: a one-step
    smoke request takes about 100 ms on the CPU). Triton cannot route to a named instance, so this
    makes full coverage likely, not certain."""
    errors: list[str] = []
    lock = threading.Lock()

    def worker(delay: float):
        time.sleep(delay)
        conn = RevpersClient(url)
        try:
            for _name, raw in jobs:
                try:
                    timed_request(conn, raw, params)
                except Exception as exc:  # recorded, not hidden
                    with lock:
                        errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i * stagger_s,), daemon=True) for i in range(max(1, clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "clients": max(1, clients),
        "requests": max(1, clients) * len(jobs),
        "stagger_s": stagger_s,
        "wall_s": round(time.perf_counter() - t0, 3),
        "errors": errors,
    }


def concurrency_level(url: str, jobs: list[tuple[str, bytes]], clients: int, params: dict) -> dict:
    """``clients`` threads, each with its own gRPC client, drain the same job queue; throughput is
    completed requests over the wall time from the first send to the last reply. Latency figures are
    ``revpers_client.cli.latency_stats`` (n, p50, p95, max, mean), as ``revpers-client`` reports them."""

    work: queue.Queue = queue.Queue()
    for job in jobs:
        work.put(job)
    latencies: list[float] = []
    faces = 0
    errors: list[str] = []
    lock = threading.Lock()
    conns = [RevpersClient(url) for _ in range(clients)]
    start = threading.Barrier(clients + 1)

    def worker(conn):
        nonlocal faces
        start.wait()
        while True:
            try:
                _name, raw = work.get_nowait()
            except queue.Empty:
                return
            try:
                _img, report, ms = timed_request(conn, raw, params)
            except Exception as exc:  # recorded, not hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")
                continue
            with lock:
                latencies.append(ms)
                faces += anonymized_faces(report)

    threads = [threading.Thread(target=worker, args=(c,), daemon=True) for c in conns]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    for c in conns:
        c.close()
    out = {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 4),
        "faces_per_s": round(faces / wall, 4),
    }
    if latencies:
        out["latency"] = latency_stats(latencies)
    return out
