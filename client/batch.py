"""Many requests in flight against one or more Triton servers, with timeouts and retries.

``BatchClient(urls, concurrency=N)`` keeps up to N requests in flight on a pool of worker threads
(tritonclient's gRPC client is thread-safe for unary calls; one client, so one channel, per URL).
Each request goes to the server with the fewest requests outstanding from this client (ties and
``balance="round-robin"`` rotate), so one client drives several replicas.

Retries: a request that fails with a status in ``RetryPolicy.retry_on`` (by default UNAVAILABLE and
DEADLINE_EXCEEDED: server down or restarting, or slower than ``timeout``) is sent again after an
exponential backoff with jitter, up to ``max_attempts`` attempts in all, preferring another server;
a server that answered UNAVAILABLE is avoided for a cool-down while others are up.
INVALID_ARGUMENT (bad image, bad parameters) is never retried: the same request would fail again.
INTERNAL is retried only when asked (``RetryPolicy(retry_internal=True)``).

The server's identity gate can refuse to release an image (``fallback: "reject"``): that request
succeeds (``result.ok``) with an empty ``image`` and a report whose ``verdict`` is ``"rejected"``;
``result.rejected`` says so. Check it before using ``result.image``.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from .core import ServiceError, channel_args, infer_once, sha256_hex

RETRYABLE = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED"})


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: before attempt k+1 (k >= 1) wait a uniform random time in
    ``[d/2, d]`` where ``d = min(max_backoff_s, backoff_s * 2**(k-1))``."""

    max_attempts: int = 4
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    retry_internal: bool = False

    def __post_init__(self):
        if int(self.max_attempts) != self.max_attempts or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if not (self.backoff_s >= 0 and self.max_backoff_s >= 0):
            raise ValueError("backoff_s and max_backoff_s must be >= 0")

    @property
    def retry_on(self) -> frozenset:
        return RETRYABLE | ({"INTERNAL"} if self.retry_internal else frozenset())

    def retryable(self, error: ServiceError) -> bool:
        return error.code in self.retry_on

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        d = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
        return d / 2 + (rng or random).uniform(0, d / 2)


@dataclass
class Job:
    """One request: ``image`` is encoded bytes or a zero-argument callable returning them (read in a
    worker thread, so file reading overlaps the requests; an OSError there fails this job only).
    ``input_sha256``: the SHA-256 of those bytes when the caller has already computed it (it is
    then recorded as given, not recomputed)."""

    key: Any
    image: bytes | Callable[[], bytes]
    params: dict = field(default_factory=dict)
    input_sha256: str | None = None


@dataclass
class BatchResult:
    """The outcome of one :class:`Job`. ``ok``: the server answered (``error`` is None). An ok result
    can still carry no image: see :attr:`rejected`."""

    key: Any
    image: bytes | None = None
    report: dict | None = None
    error: ServiceError | None = None
    attempts: int = 0
    latency_s: float = 0.0          # first send to final answer, backoff waits included
    url: str | None = None          # the server that gave the final answer
    input_sha256: str | None = None
    errors: list = field(default_factory=list)  # "url: CODE: message" of every failed attempt

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def rejected(self) -> bool:
        """The server answered but released no image: its identity gate rejected it (report
        ``verdict`` ``"rejected"``, with ``rejected_reason``; ``image`` is ``b""``)."""
        return self.ok and (not self.image or (self.report or {}).get("verdict") == "rejected")


def choose_server(outstanding: Sequence[int], down_until: Sequence[float], now: float, turn: int,
                  balance: str = "least-outstanding", avoid: int | None = None) -> int:
    """Index of the server for the next attempt (pure; :class:`BatchClient` calls it under its lock).

    Servers cooling down after an UNAVAILABLE (``down_until[i] > now``) are left out unless all
    are, then the one that comes back first is taken. ``avoid`` (the server a retry just failed
    on) is left out when another remains. Among the rest, ``least-outstanding`` takes the fewest
    requests in flight; ties, and every choice under ``round-robin``, go to the first at or after
    index ``turn`` in rotation.
    """
    n = len(outstanding)
    candidates = [i for i in range(n) if down_until[i] <= now]
    if not candidates:
        candidates = [min(range(n), key=lambda i: down_until[i])]
    if avoid is not None and len(candidates) > 1:
        candidates = [i for i in candidates if i != avoid]
    order = sorted(candidates, key=lambda i: (i - turn) % n)
    if balance == "least-outstanding":
        order.sort(key=lambda i: outstanding[i])  # stable: ties keep the rotation
    return order[0]


class _Endpoint:
    def __init__(self, url: str, client):
        self.url, self.client = url, client
        self.outstanding = 0
        self.sent = 0
        self.down_until = 0.0
        self.down_streak = 0


class BatchClient:
    """See the module docstring. Use as a context manager or call :meth:`close`."""

    def __init__(self, urls: str | Sequence[str], concurrency: int = 4, timeout: float | None = 600.0,
                 retry: RetryPolicy | None = None, balance: str = "least-outstanding",
                 on_retry: Callable[[Any, int, ServiceError, float, str], None] | None = None,
                 rng: random.Random | None = None):
        import tritonclient.grpc as grpcclient

        urls = [urls] if isinstance(urls, str) else list(urls)
        if not urls:
            raise ValueError("at least one server URL is needed")
        if len(set(urls)) != len(urls):
            raise ValueError(f"server URLs repeat: {urls}")
        if int(concurrency) != concurrency or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if balance not in ("least-outstanding", "round-robin"):
            raise ValueError(f"balance must be 'least-outstanding' or 'round-robin', got {balance!r}")
        if timeout is not None and not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout!r}")
        self._grpc = grpcclient
        args = channel_args()
        self.endpoints = [_Endpoint(u, grpcclient.InferenceServerClient(u, channel_args=args)) for u in urls]
        self.concurrency = int(concurrency)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.balance = balance
        self.on_retry = on_retry
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._turn = 0
        self._closing = threading.Event()

    # ------------------------------------------------------------------ choosing a server
    def _acquire(self, avoid: _Endpoint | None = None) -> _Endpoint:
        with self._lock:
            eps = self.endpoints
            i = choose_server([e.outstanding for e in eps], [e.down_until for e in eps], time.monotonic(),
                              self._turn, self.balance, None if avoid is None else eps.index(avoid))
            ep = eps[i]
            self._turn = (i + 1) % len(eps)
            ep.outstanding += 1
            ep.sent += 1
            return ep

    def _release(self, ep: _Endpoint, error: ServiceError | None) -> None:
        with self._lock:
            ep.outstanding -= 1
            if error is not None and error.code == "UNAVAILABLE":
                ep.down_streak += 1
                ep.down_until = time.monotonic() + min(30.0, 0.5 * 2 ** (ep.down_streak - 1))
            elif error is None:
                ep.down_streak, ep.down_until = 0, 0.0

    def sent_per_url(self) -> dict[str, int]:
        """Requests (attempts) sent to each server by this client."""
        with self._lock:
            return {e.url: e.sent for e in self.endpoints}

    # ------------------------------------------------------------------ one request
    def run(self, job: Job) -> BatchResult:
        """One job with retries; never raises for a failed request (see ``result.error``)."""
        res = BatchResult(job.key)
        try:
            data = job.image() if callable(job.image) else job.image
        except OSError as exc:
            res.error = ServiceError(f"cannot read input: {exc}", "CLIENT")
            return res
        res.input_sha256 = job.input_sha256 or sha256_hex(data)
        t0 = time.perf_counter()
        last = None
        while True:
            ep = self._acquire(avoid=last)
            res.attempts += 1
            error = None
            try:
                res.image, res.report = infer_once(self._grpc, ep.client, data, job.params, self.timeout)
            except ServiceError as exc:
                error = exc
            except Exception as exc:  # noqa: BLE001 - a malformed answer fails this job, not the run
                error = ServiceError(f"{type(exc).__name__}: {exc}", "CLIENT")
            finally:
                self._release(ep, error)
            res.url = ep.url
            if error is None:
                res.error = None
                break
            res.error = error
            res.errors.append(f"{ep.url}: {error.code}: {error.message}")
            if res.attempts >= self.retry.max_attempts or not self.retry.retryable(error):
                break
            wait = self.retry.delay(res.attempts, self._rng)
            if self.on_retry is not None:
                self.on_retry(job.key, res.attempts, error, wait, ep.url)
            if self._closing.wait(wait):
                break
            last = ep
        res.latency_s = time.perf_counter() - t0
        return res

    def anonymize(self, image: bytes, **params) -> tuple[bytes, dict]:
        """One image with retries and server choice; returns (image bytes, report) and raises
        ServiceError when it finally fails. A rejected image (the gate refused it) comes back as
        ``(b"", report)`` with ``report["verdict"] == "rejected"``."""
        res = self.run(Job(None, image, params))
        if res.error is not None:
            raise res.error
        return res.image, res.report

    # ------------------------------------------------------------------ many requests
    def map(self, jobs: Iterable[Job]) -> Iterator[BatchResult]:
        """Run ``jobs`` with ``concurrency`` requests in flight; yields results as they complete
        (not in input order). ``jobs`` is consumed lazily (at most 2 x concurrency ahead), so it
        can be a generator over a million files. Closing the iterator early stops the workers
        (daemon threads: requests still in flight are abandoned, not waited for)."""
        todo: queue.Queue = queue.Queue()
        done: queue.Queue = queue.Queue()
        stop = threading.Event()

        def worker():
            while not stop.is_set():
                job = todo.get()
                if job is None:
                    return
                try:
                    done.put(self.run(job))
                except BaseException as exc:  # noqa: BLE001 - report, never lose a job silently
                    done.put(BatchResult(job.key, error=ServiceError(f"{type(exc).__name__}: {exc}", "CLIENT")))

        threads = [threading.Thread(target=worker, daemon=True, name=f"revpers-client-{i}")
                   for i in range(self.concurrency)]
        for t in threads:
            t.start()
        it = iter(jobs)
        window = 2 * self.concurrency
        pending = 0
        exhausted = False
        try:
            while True:
                while not exhausted and pending < window:
                    try:
                        job = next(it)
                    except StopIteration:
                        exhausted = True
                        break
                    todo.put(job)
                    pending += 1
                if pending == 0:
                    return
                while True:
                    try:
                        res = done.get(timeout=0.5)
                        break
                    except queue.Empty:
                        continue
                pending -= 1
                yield res
        finally:
            stop.set()
            while True:  # jobs not started yet are dropped
                try:
                    todo.get_nowait()
                except queue.Empty:
                    break
            for _ in threads:
                todo.put(None)

    def close(self) -> None:
        self._closing.set()
        for e in self.endpoints:
            e.client.close()

    def __enter__(self) -> "BatchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
