"""Keeping a running tritonserver able to serve, and stopping it without failing requests.

:class:`Supervisor` watches the Python-backend stubs (children of tritonserver) and reloads the
model of any stub that dies; :meth:`Supervisor.drain` is the stop sequence. Both publish their
truth to :class:`Health`, which :class:`HealthEndpoint` serves as Kubernetes-style ``/livez`` and
``/readyz``. Why recovery reloads the model rather than restarting the server, and the measurements
behind the drain order: docs/serving.md, "Supervision" and "Drain".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterable

from revpers.serving.launcher.errors import TritonServerError
from revpers.serving.launcher.process import Stub, TritonServer, process_alive
from revpers_client.protocol import MODEL

LOG = logging.getLogger("revpers.serving.launcher")

# The drain contract with the BLS model: tritonserver (and so every stub) gets this variable, naming
# a file that does not exist while serving. Once it exists, the model answers every new request
# with UNAVAILABLE ("server is draining") and finishes the ones it already has.
DRAIN_FILE_ENV = "REVPERS_DRAIN_FILE"
# ... and, if the model exports this gauge (pb_utils.MetricFamily GAUGE: requests it is executing),
# the drain waits for it to reach 0 before unloading anything, so new requests meet UNAVAILABLE
# rather than NOT_FOUND for the whole drain. Without it, the drain unloads at once and waits for
# the unload (Triton unloads a model when its requests have finished).
IN_FLIGHT_METRIC = "revpers_requests_in_flight"


@dataclass
class Health:
    """What the supervisor knows, read by the health endpoint (thread-safe)."""

    live: bool = True
    ready: bool = False
    state: str = "starting"  # starting, serving, recovering, failed, draining, stopped, dead
    detail: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def set(
        self,
        *,
        live: bool | None = None,
        ready: bool | None = None,
        state: str | None = None,
        detail: str | None = None,
    ) -> None:
        with self._lock:
            if live is not None:
                self.live = live
            if ready is not None:
                self.ready = ready
            if state is not None:
                self.state = state
            if detail is not None:
                self.detail = detail

    def snapshot(self) -> dict:
        with self._lock:
            return {"live": self.live, "ready": self.ready, "state": self.state, "detail": self.detail}


@dataclass(frozen=True)
class Recovery:
    """One recovery from dead stubs: which, what was done, how long until serving again."""

    stubs: tuple[Stub, ...]
    models: tuple[str, ...]
    action: str
    seconds: float
    shm_removed: int
    requests_lost: int = 0  # inside the dead stubs: Triton never answers them (docs/serving.md)


def in_flight(metrics_text: str, name: str = IN_FLIGHT_METRIC, instance: str | None = None) -> float | None:
    """The sum of the ``name`` gauge's samples in a Prometheus text page (only those labelled
    ``instance="<instance>"`` when given), None when absent."""
    total, found = 0.0, False
    label = f'instance="{instance}"'
    for line in metrics_text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            if instance is not None and label not in line.split("}", 1)[0]:
                continue
            with contextlib.suppress(ValueError, IndexError):
                total += float(line.rsplit(None, 1)[1])
                found = True
    return total if found else None


def _touch_model(repository: Path, model: str) -> bool:
    """Change the mtime of a file of ``model`` so that Triton's load_model reloads it (it is a
    no-op when nothing in the model directory changed)."""
    d = repository / model
    for candidate in [d / "config.pbtxt", *sorted(d.glob("*/model.py"))]:
        if candidate.is_file():
            try:
                os.utime(candidate)
                return True
            except OSError as exc:
                LOG.debug("cannot touch %s: %s", candidate, exc)
    return False


class Supervisor(threading.Thread):
    """Watches ``server``'s Python-backend stubs every ``interval`` seconds.

    A stub that disappears (killed, crashed: a zombie counts as gone) while its model is READY makes
    the supervisor report not live and not ready, delete the stub's shared-memory file, touch the
    model's config and reload it through model control (the server must run with
    ``model_control_mode="explicit"``), then wait for the new stubs and Triton's readiness. A dead
    stub of an entry model restarts the server instead, at most once per ``restart_window_s``:
    Triton answers the requests it held only when the server ends. A
    failed reload or restart is retried every ``retry_s``; liveness stays false until one succeeds.
    Readiness is also false whenever Triton's ``/v2/health/ready`` is not 200.
    """

    def __init__(
        self,
        server: TritonServer,
        health: Health | None = None,
        *,
        interval: float = 0.5,
        retry_s: float = 5.0,
        entry_models: Iterable[str] = (MODEL,),
        drain_file: Path | None = None,
        start_timeout: float = 600.0,
        restart_window_s: float = 300.0,
    ):
        super().__init__(name="revpers-supervisor", daemon=True)
        self.server = server
        self.health = health or Health()
        self.interval, self.retry_s = interval, retry_s
        self.start_timeout = start_timeout
        self.restart_window_s = restart_window_s  # at most one restart per window (a crash loop reloads)
        self.restarting = threading.Event()  # set while the server is down for a restart
        self._last_restart: float | None = None
        self.entry_models = tuple(entry_models)
        self.drain_file = drain_file
        self.recoveries: list[Recovery] = []
        self.reloaded: set[str] = set()  # models reloaded after a stub death (an old version may hang)
        self._halt = threading.Event()
        self._draining = threading.Event()
        self._lock = threading.Lock()  # one of: a poll, a recovery, the drain
        self._known: dict[int, Stub] = {}
        self._pending: dict[int, Stub] = {}  # lost stubs whose model is not serving again yet
        self._lost_at: float | None = None
        self._lost_requests = 0  # inside the stubs of the recovery under way
        self._in_flight_seen: dict[str, int] = {}  # entry instances' gauges at the last poll
        self._next_try = 0.0

    # -- the watch

    def run(self) -> None:
        self._known = {s.pid: s for s in self.server.stubs()}
        self.health.set(live=True, ready=True, state="serving", detail="")
        while not self._halt.wait(self.interval):
            if self._draining.is_set():
                continue
            with self._lock:
                if self._draining.is_set():
                    continue
                try:
                    self.poll()
                except Exception as exc:  # the watch must not die; say what happened
                    LOG.exception("supervisor poll failed: %s", exc)

    def poll(self) -> None:
        """One look at the server and its stubs; recovers dead stubs' models."""
        if self.restarting.is_set():  # a restart failed: the server is down until one succeeds
            if time.monotonic() >= self._next_try:
                self._recover()
            return
        if not self.server.is_running():
            self.health.set(live=False, ready=False, state="dead", detail="tritonserver is not running")
            self._halt.set()
            return
        alive = {s.pid: s for s in self.server.stubs()}
        lost = [s for pid, s in self._known.items() if pid not in alive or not process_alive(pid)]
        # an instance is served by one stub: a lost one whose instance has another live stub was a
        # leftover of a reload (e.g. of a failed attempt), not a death
        serving_instances = {(s.model, s.instance) for s in alive.values()}
        lost = [s for s in lost if (s.model, s.instance) not in serving_instances]
        self._known = alive
        if lost:
            self._on_lost(lost)
        self._watch_in_flight(alive.values())
        if self._pending:
            if time.monotonic() >= self._next_try:
                self._recover()
            return
        try:
            triton_ready = self.server.is_ready()
        except OSError:
            triton_ready = False
        self.health.set(
            live=True,
            ready=triton_ready,
            state="serving" if triton_ready else "not ready",
            detail="" if triton_ready else "tritonserver /v2/health/ready is not 200",
        )

    def _on_lost(self, lost: list[Stub]) -> None:
        try:
            serving = {m["name"] for m in self.server.repository_index() if m.get("state") == "READY"}
        except (OSError, ValueError, TritonServerError):
            serving = {s.model for s in lost}
        for stub in lost:
            if stub.model in serving or stub.model in {s.model for s in self._pending.values()}:
                self._pending[stub.pid] = stub
            else:  # unloaded on purpose (an admin's model control): not ours to bring back
                LOG.info(
                    "stub %s (pid %d) of model '%s' exited; the model is not loaded, nothing to recover",
                    stub.instance,
                    stub.pid,
                    stub.model,
                )
        self._count_lost_requests([s for s in lost if s.pid in self._pending])
        if self._pending and self._lost_at is None:
            self._lost_at = time.monotonic()
            self._next_try = 0.0
            names = ", ".join(f"{s.instance} (pid {s.pid})" for s in self._pending.values())
            self.health.set(live=False, ready=False, state="recovering", detail=f"stub died: {names}")

    def _in_flight_of(self, stubs) -> dict[str, int]:
        """The in-flight gauge of each stub's instance ({} when the metrics page cannot be read)."""
        try:
            page = self.server.metrics_text(timeout=1.0)
        except OSError:
            return {}
        return {s.instance: int(in_flight(page, instance=s.instance) or 0) for s in stubs} if page else {}

    def _watch_in_flight(self, alive) -> None:
        """Remember the entry stubs' in-flight gauges (each poll), so that a death is counted even
        when the metrics page cannot be read at that moment."""
        entry = [s for s in alive if s.model in self.entry_models]
        self._in_flight_seen = self._in_flight_of(entry) if entry else {}

    def _count_lost_requests(self, dead: list[Stub]) -> None:
        """The requests that were inside each dead stub: its instance's in-flight gauge (the dead
        stub's last value, now or at the poll before). A model answering through response senders
        gets no error for them from Triton until the server process ends; say so."""
        if not dead:
            return
        now = self._in_flight_of(dead)
        for stub in dead:
            n = max(now.get(stub.instance, 0), self._in_flight_seen.get(stub.instance, 0))
            if n > 0:
                self._lost_requests += n
                LOG.warning(
                    "stub %s (pid %d) died with %d request%s inside: Triton answers %s only when the "
                    "server process ends",
                    stub.instance,
                    stub.pid,
                    n,
                    "" if n == 1 else "s",
                    "it" if n == 1 else "them",
                )

    def _should_restart(self, stubs: tuple[Stub, ...]) -> bool:
        """Restart the server (rather than reload the model) when an entry stub died: the requests
        it held (the count above is what the gauge showed, and may be short by one admitted just
        before the death) get an answer only from a server that ends (UNAVAILABLE, which clients
        retry), where a reload leaves them waiting for their deadline. Not twice within
        ``restart_window_s``: a request that kills its stub every time would otherwise restart the
        server in a loop."""
        if self.restarting.is_set():
            return True
        if not any(s.model in self.entry_models for s in stubs):
            return False
        recent = self._last_restart is not None and time.monotonic() - self._last_restart < self.restart_window_s
        if recent:
            LOG.warning(
                "not restarting tritonserver again within %.0f s of the last restart: reloading; the "
                "requests inside the dead stub get their answer at their deadline",
                self.restart_window_s,
            )
        return not recent

    def _restart(self, stubs: tuple[Stub, ...], models: tuple[str, ...]) -> None:
        """Stop tritonserver at once (every connection closes: the requests inside the dead stub
        and all others in flight end with UNAVAILABLE) and start it again on the same ports."""
        server = self.server
        removed = len(server.remove_shm(stubs))
        self.restarting.set()
        self._last_restart = time.monotonic()
        try:
            server.kill()
            server.stop(timeout=10.0)  # reaps it and its stubs, removes their shm files
            server.start(timeout=self.start_timeout, tie_to_thread=True)
        except (OSError, TritonServerError) as exc:
            self._next_try = time.monotonic() + self.retry_s
            self.health.set(live=False, ready=False, state="failed", detail=str(exc))
            LOG.error("restarting tritonserver failed (%s); retrying in %.0f s", exc, self.retry_s)
            return
        self.restarting.clear()
        self.reloaded.clear()  # a fresh server has no version stuck in UNLOADING
        self._finish_recovery(
            Recovery(stubs, models, "restart", 0.0, removed, self._lost_requests),
            f"restarted tritonserver (pid {server.pid})"
            + (" so that the requests inside got an answer" if self._lost_requests else ""),
        )

    def _recover(self) -> None:
        stubs = tuple(self._pending.values())
        models = tuple(sorted({s.model for s in stubs}))
        if self._should_restart(stubs):
            self._restart(stubs, models)
            return
        removed = len(self.server.remove_shm(stubs))
        assert self._lost_at is not None
        try:
            for model in models:  # unloaded first: new requests get NOT_FOUND at once, not INTERNAL after 1 s
                self.server.unload_model(model)
            for model in models:
                if not _touch_model(self.server.repository, model):
                    raise TritonServerError(
                        f"cannot change a file of model '{model}' in {self.server.repository}, "
                        "so Triton would not reload it"
                    )
                self.server.load_model(model)
                self.reloaded.add(model)
            fresh = {s.model for s in self.server.stubs()}
            missing = [m for m in models if m not in fresh]
            if missing:
                raise TritonServerError(f"no new stub for {', '.join(missing)} after the reload")
            if not self.server.is_ready():
                raise TritonServerError("tritonserver is not ready after the reload")
        except (OSError, TritonServerError) as exc:
            self._next_try = time.monotonic() + self.retry_s
            self.health.set(live=False, ready=False, state="failed", detail=str(exc))
            LOG.error(
                "stub %s died; reloading model %s failed (%s); retrying in %.0f s",
                ", ".join(f"{s.instance} (pid {s.pid})" for s in stubs),
                ", ".join(f"'{m}'" for m in models),
                exc,
                self.retry_s,
            )
            return
        self._finish_recovery(
            Recovery(stubs, models, "reload", 0.0, removed, self._lost_requests),
            f"reloaded model {', '.join(repr(m) for m in models)}",
        )

    def _finish_recovery(self, recovery: Recovery, done: str) -> None:
        assert self._lost_at is not None
        seconds = time.monotonic() - self._lost_at
        self._known = {s.pid: s for s in self.server.stubs()}
        self._pending.clear()
        self._lost_at = None
        self._lost_requests = 0
        self.recoveries.append(dataclasses.replace(recovery, seconds=seconds))
        self.health.set(live=True, ready=True, state="serving", detail="")
        removed = recovery.shm_removed
        LOG.warning(
            "stub %s died; %s; serving again %.2f s after the death was seen (%d shm file%s removed)",
            ", ".join(f"{s.instance} (pid {s.pid})" for s in recovery.stubs),
            done,
            seconds,
            removed,
            "" if removed == 1 else "s",
        )

    def unanswered(self) -> int:
        """Requests inside dead stubs that are still waiting for an answer: those of the reloads
        since the last restart (a server that ends answers every request it held)."""
        n = 0
        for r in self.recoveries:
            n = 0 if r.action == "restart" else n + r.requests_lost
        return n

    def stop(self) -> None:
        self._halt.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout=10)

    # -- the drain

    def drain(self, timeout: float) -> bool:
        """Stop taking requests and let the ones in flight finish, within ``timeout`` seconds.

        Readiness goes false; the drain file appears (the BLS refuses new requests with
        UNAVAILABLE); if the BLS exports :data:`IN_FLIGHT_METRIC`, wait for it to reach 0; then
        unload the entry models (the BLS) and wait until they are gone (Triton unloads a model once
        its requests finished), then every other model. True when everything unloaded in time.
        """
        t0 = time.monotonic()
        deadline = t0 + timeout
        self._draining.set()
        self.health.set(ready=False, state="draining", detail="stopping: finishing requests in flight")
        if self.drain_file is not None:
            self.drain_file.parent.mkdir(parents=True, exist_ok=True)
            self.drain_file.touch()
        with self._lock:  # no recovery runs from here on
            done = self._drain(deadline)
        LOG.info("drain %s in %.1f s", "finished" if done else "timed out", time.monotonic() - t0)
        return done

    def _drain(self, deadline: float) -> bool:
        server = self.server
        try:
            busy = in_flight(server.metrics_text())
            while busy and time.monotonic() < deadline and server.is_running():
                LOG.debug("drain: %g requests in flight", busy)
                time.sleep(0.1)
                busy = in_flight(server.metrics_text())
            index = server.repository_index()
        except (OSError, ValueError, TritonServerError) as exc:
            LOG.error("drain: cannot read the server's state (%s)", exc)
            return False
        loaded = sorted({m["name"] for m in index if m.get("state") in ("READY", "LOADING")})
        first = [m for m in loaded if m in self.entry_models]
        rest = [m for m in loaded if m not in self.entry_models]
        for group in (first, rest):
            if not group:
                continue
            try:
                for model in group:
                    server.unload_model(model)
            except (OSError, TritonServerError) as exc:
                LOG.error("drain: %s", exc)
                return False
            if not self._wait_unloaded(group, deadline):
                return False
        return True

    def _wait_unloaded(self, models: list[str], deadline: float) -> bool:
        """Until no stub of ``models`` is alive and none is READY/LOADING (a Python model is gone
        when its stubs are; a version whose stub died may stay UNLOADING for ever: that counts)."""
        python_models = {s.model for s in self.server.seen_stubs.values()}
        while True:
            try:
                states = {}
                for m in self.server.repository_index():
                    states.setdefault(m["name"], set()).add(m.get("state"))
                stubs = {s.model for s in self.server.stubs()}
            except (OSError, ValueError, TritonServerError):
                return False
            waiting = [
                m
                for m in models
                if m in stubs
                or states.get(m, set()) & {"READY", "LOADING"}
                or (m not in python_models and "UNLOADING" in states.get(m, set()))
            ]
            if not waiting:
                return True
            if time.monotonic() >= deadline or not self.server.is_running():
                LOG.error("drain: still unloading %s at the drain timeout", ", ".join(waiting))
                return False
            time.sleep(0.1)


class HealthEndpoint:
    """``GET /livez`` and ``GET /readyz`` on ``host:port``: 200 or 503, with the state as JSON."""

    def __init__(self, health: Health, host: str, port: int):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                snap = health.snapshot()
                path = self.path.split("?", 1)[0]
                if path not in ("/livez", "/readyz"):
                    self.send_error(404)
                    return
                ok = snap["live"] if path == "/livez" else snap["ready"] and snap["live"]
                body = json.dumps(snap).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # probes every few seconds: not worth a line each
                pass

        bind = host.strip("[]")
        server_cls = type(
            "_HealthHTTPServer",
            (ThreadingHTTPServer,),
            {"address_family": socket.AF_INET6 if ":" in bind else socket.AF_INET, "daemon_threads": True},
        )
        self.httpd = server_cls((bind, port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="revpers-health", daemon=True)

    def start(self) -> "HealthEndpoint":
        self.thread.start()
        return self

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
