"""Running a served repository and driving it with clients (always through ``RevpersClient``)."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from pathlib import Path

from .common import summary

BACKENDS = ("onnxruntime", "pytorch", "tensorrt")


@contextlib.contextmanager
def running_server(repository: Path):
    """A tritonserver on free loopback ports for the duration of the block; yields (server, seconds to ready)."""
    from revpers.triton_server import TritonServer, free_ports

    grpc, http, metrics = free_ports(3)
    server = TritonServer(repository, grpc_port=grpc, http_port=http, metrics_port=metrics)
    t0 = time.perf_counter()
    server.start()
    try:
        yield server, time.perf_counter() - t0
    finally:
        server.stop()


def timed_request(client, raw: bytes, params: dict) -> tuple[bytes, dict, float]:
    """One request; returns (image bytes, report, client-side wall ms)."""
    t0 = time.perf_counter()
    image, report = client.anonymize(raw, **params)
    return image, report, (time.perf_counter() - t0) * 1e3


def concurrency_level(url: str, jobs: list[tuple[str, bytes]], clients: int, params: dict) -> dict:
    """``clients`` threads, each with its own gRPC client, drain the same job queue; throughput is
    completed requests over the wall time from the first send to the last reply."""
    from client import RevpersClient

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
                faces += sum(f["action"] == "anonymized" for f in report.get("faces", []))

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
    out = {"clients": clients, "requests": len(latencies), "errors": errors, "wall_s": round(wall, 3),
           "throughput_rps": round(len(latencies) / wall, 4), "faces_per_s": round(faces / wall, 4)}
    if latencies:
        out["latency"] = summary(latencies)
    return out
