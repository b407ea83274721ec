"""Many requests in flight against one or more Triton servers, with timeouts, retries and a circuit
breaker.

``BatchClient(urls, concurrency=N)`` keeps up to N requests in flight on a pool of worker threads
(tritonclient's gRPC client is thread-safe for unary calls; one client, so one channel, per URL).
Each request goes to the server with the fewest requests outstanding from this client (ties and
``balance="round-robin"`` rotate), so one client drives several replicas.

Retries (:class:`RetryPolicy`): a request that fails because a server is down, restarting, draining
or loading its models (UNAVAILABLE, NOT_FOUND, INTERNAL "... not ready": ``ServiceError.kind ==
"not_ready"``) is sent again after an exponential backoff with jitter, preferring another server,
for up to ``max_wait_s`` seconds after its first failure (long enough for a model load), and at most
``max_attempts`` attempts when that is set. A server that answered UNAVAILABLE is avoided for a
cool-down while others are up. Never retried: INVALID_ARGUMENT (the same request would fail again),
a missing or wrong API key (``kind == "auth"``), a TLS set-up the server refuses (``"tls"``), and
DEADLINE_EXCEEDED (the request carries its deadline and the server stops working on it when it
passes; ``retry_deadline=True`` sends it once more). INTERNAL is retried only when asked
(``retry_internal=True``).

Circuit breaker: when every server has been failing with ``not_ready`` errors for ``max_wait_s``
seconds with no success in between, the breaker opens and every later request fails at once with
:class:`ServersDown` (no attempt is sent) instead of each image spending its own retries.

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

from .core import PLAIN, Security, ServiceError, channel_args, infer_once, server_health, sha256_hex

RETRYABLE = frozenset({"UNAVAILABLE", "NOT_FOUND"})


class ServersDown(ServiceError):
    """Every server has been unreachable or not ready for longer than the retry policy waits (the
    circuit breaker is open); no request was sent for this one."""

    def __init__(self, message: str):
        super().__init__(message, "StatusCode.UNAVAILABLE")

    @property
    def kind(self) -> str:
        return "down"


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: before attempt k+1 (k >= 1) wait a uniform random time in
    ``[d/2, d]`` where ``d = min(max_backoff_s, backoff_s * 2**(k-1))``. Requests failing because
    servers are not ready are retried for ``max_wait_s`` seconds after their first failure (and at
    most ``max_attempts`` attempts in all when that is not None)."""

    max_attempts: int | None = None
    backoff_s: float = 1.0
    max_backoff_s: float = 10.0
    max_wait_s: float = 300.0
    retry_internal: bool = False
    retry_deadline: bool = False  # send a DEADLINE_EXCEEDED request once more

    def __post_init__(self):
        if self.max_attempts is not None and (int(self.max_attempts) != self.max_attempts or self.max_attempts < 1):
            raise ValueError(f"max_attempts must be an integer >= 1, got {self.max_attempts!r}")
        if not (self.backoff_s >= 0 and self.max_backoff_s >= 0 and self.max_wait_s >= 0):
            raise ValueError("backoff_s, max_backoff_s and max_wait_s must be >= 0")

    @property
    def retry_on(self) -> frozenset:
        """Status codes retried (whatever the message, except an API-key or TLS refusal)."""
        return RETRYABLE | ({"INTERNAL"} if self.retry_internal else frozenset())

    def retryable(self, error: ServiceError, attempts: int = 1, waited_s: float = 0.0) -> bool:
        """Whether to send the request again after ``attempts`` attempts, the first failure
        ``waited_s`` seconds ago."""
        if self.max_attempts is not None and attempts >= self.max_attempts:
            return False
        kind = error.kind
        if kind == "deadline":
            return self.retry_deadline and attempts < 2
        if kind in ("auth", "tls", "down"):
            return False
        if kind == "not_ready" or error.code in self.retry_on:
            return waited_s < self.max_wait_s
        return False

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
    latency_s: float = 0.0  # first send to final answer, backoff waits included
    url: str | None = None  # the server that gave the final answer
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


def choose_server(
    outstanding: Sequence[int],
    down_until: Sequence[float],
    now: float,
    turn: int,
    balance: str = "least-outstanding",
    avoid: int | None = None,
) -> int:
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


class _Workers:
    """Daemon threads running ``run(job)`` for the jobs put in ``todo``; results in ``done``."""

    def __init__(self, run: Callable[[Job], BatchResult], n: int):
        self.run = run
        self.todo: queue.Queue = queue.Queue()
        self.done: queue.Queue = queue.Queue()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._work, daemon=True, name=f"revpers-client-{i}") for i in range(n)]
        for t in self.threads:
            t.start()

    def _work(self) -> None:
        while not self.stop.is_set():
            job = self.todo.get()
            if job is None:
                return
            try:
                self.done.put(self.run(job))
            except BaseException as exc:  # noqa: BLE001 - report, never lose a job silently
                self.done.put(BatchResult(job.key, error=ServiceError(f"{type(exc).__name__}: {exc}", "CLIENT")))

    def next_result(self) -> BatchResult:
        while True:  # a timeout, so Ctrl-C reaches the caller's thread
            try:
                return self.done.get(timeout=0.5)
            except queue.Empty:
                continue

    def close(self) -> None:
        self.stop.set()
        while True:  # jobs not started yet are dropped
            try:
                self.todo.get_nowait()
            except queue.Empty:
                break
        for _ in self.threads:
            self.todo.put(None)


class BatchClient:
    """See the module docstring. Use as a context manager or call :meth:`close`."""

    def __init__(
        self,
        urls: str | Sequence[str],
        concurrency: int = 4,
        timeout: float | None = 600.0,
        retry: RetryPolicy | None = None,
        balance: str = "least-outstanding",
        on_retry: Callable[[Any, int, ServiceError, float, str], None] | None = None,
        rng: random.Random | None = None,
        security: Security = PLAIN,
    ):
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
        self.security = security
        self.headers = security.headers
        args = channel_args()
        self.endpoints = [_Endpoint(u, security.client(u, args)) for u in urls]
        self.concurrency = int(concurrency)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.balance = balance
        self.on_retry = on_retry
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._turn = 0
        self._closing = threading.Event()
        self._all_down_since: float | None = None  # the circuit breaker's clock
        self._open: ServersDown | None = None  # set when the breaker opens; stays open

    # ------------------------------------------------------------------ choosing a server
    def _acquire(self, avoid: _Endpoint | None = None) -> _Endpoint:
        with self._lock:
            eps = self.endpoints
            i = choose_server(
                [e.outstanding for e in eps],
                [e.down_until for e in eps],
                time.monotonic(),
                self._turn,
                self.balance,
                None if avoid is None else eps.index(avoid),
            )
            ep = eps[i]
            self._turn = (i + 1) % len(eps)
            ep.outstanding += 1
            ep.sent += 1
            return ep

    def _release(self, ep: _Endpoint, error: ServiceError | None) -> None:
        with self._lock:
            ep.outstanding -= 1
            now = time.monotonic()
            if error is not None and error.kind == "not_ready":
                if error.code == "UNAVAILABLE":
                    ep.down_streak += 1
                    ep.down_until = now + min(30.0, 0.5 * 2 ** (ep.down_streak - 1))
                else:
                    ep.down_streak = max(ep.down_streak, 1)
                if all(e.down_streak > 0 for e in self.endpoints):
                    if self._all_down_since is None:
                        self._all_down_since = now
                    elif self._open is None and now - self._all_down_since >= self.retry.max_wait_s:
                        self._open = ServersDown(
                            f"no server answered for {now - self._all_down_since:.0f} s "
                            f"(last: {ep.url}: {error.code}: {error.message.splitlines()[0][:200]})"
                        )
            elif error is None:
                ep.down_streak, ep.down_until = 0, 0.0
                self._all_down_since = None

    def open_breaker(self, error: ServersDown) -> None:
        """Open the circuit breaker from outside (e.g. a health check found every server down)."""
        with self._lock:
            if self._open is None:
                self._open = error

    @property
    def breaker_open(self) -> ServersDown | None:
        """The error every request now fails with, or None while the breaker is closed."""
        return self._open

    def sent_per_url(self) -> dict[str, int]:
        """Requests (attempts) sent to each server by this client."""
        with self._lock:
            return {e.url: e.sent for e in self.endpoints}

    # ------------------------------------------------------------------ health
    def check_servers(
        self,
        wait_s: float | None = None,
        poll_s: float = 1.0,
        call_timeout: float = 10.0,
        on_wait: Callable[[list], None] | None = None,
    ) -> list[dict]:
        """Before a run: each server's health (:func:`revpers_client.core.server_health`).

        Returns as soon as one server is healthy. When none answers at all, or one refuses the
        API key or the TLS set-up, returns at once (the caller decides; see ``kind`` in each
        entry's ``error_kind``). When some answer but none is ready yet (a model loading), polls
        every ``poll_s`` for up to ``wait_s`` seconds (the retry policy's ``max_wait_s`` by
        default), calling ``on_wait(health)`` once before waiting."""
        wait_s = self.retry.max_wait_s if wait_s is None else wait_s
        t0 = time.monotonic()
        told = False
        while True:
            health = [server_health(e.url, call_timeout, self.security) for e in self.endpoints]
            if any(h["healthy"] for h in health):
                return health
            if not any(h["live"] for h in health) or any(h.get("error_kind") in ("auth", "tls") for h in health):
                return health
            if time.monotonic() - t0 >= wait_s or self._closing.is_set():
                return health
            if on_wait is not None and not told:
                on_wait(health)
                told = True
            if self._closing.wait(poll_s):
                return health

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
        first_failure = None
        last = None
        while True:
            if self._open is not None:
                res.error = self._open
                break
            ep = self._acquire(avoid=last)
            res.attempts += 1
            error = None
            try:
                res.image, res.report = infer_once(ep.client, data, job.params, self.timeout, self.headers)
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
            now = time.monotonic()
            first_failure = now if first_failure is None else first_failure
            if not self.retry.retryable(error, res.attempts, now - first_failure):
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
        workers = _Workers(self.run, self.concurrency)
        it = iter(jobs)
        window = 2 * self.concurrency
        pending = 0
        try:
            while True:
                while pending < window:
                    job = next(it, None)
                    if job is None:
                        break
                    workers.todo.put(job)
                    pending += 1
                if pending == 0:
                    return
                res = workers.next_result()
                pending -= 1
                yield res
        finally:
            workers.close()

    def close(self) -> None:
        self._closing.set()
        for e in self.endpoints:
            e.client.close()

    def __enter__(self) -> "BatchClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
