"""The server runner's ``process`` for the run engine: each image through a :class:`BatchClient`
(concurrent, retried, load-balanced), with a health check before the run and the circuit breaker
and API-key/TLS refusals turned into a stopped run."""

from __future__ import annotations

from .batch import BatchClient, Job, ServersDown
from .collection import Item
from .core import ServiceError
from .engine import Outcome, StopRun
from .ledger import EXIT_FAILED, EXIT_USAGE
from .report import Progress


def refusal_message(error: ServiceError, url: str | None = None) -> str:
    """One line for an error that stops a run."""
    where = f"{url}: " if url else ""
    if error.kind == "auth":
        return (
            f"{where}the server refused the request: it requires an API key and none or a wrong one was "
            "sent (give --api-key-file FILE or set REVPERS_API_KEY)"
        )
    if error.kind == "tls":
        return f"{where}TLS was refused ({error.message.splitlines()[0][:200]}); check --tls/--ca/--cert/--key"
    return f"{where}{error.code}: {error.message.splitlines()[0][:300] if error.message else ''}"


def stop_for(error: ServiceError, url: str | None = None) -> StopRun | None:
    """The StopRun for an error that no later image can get past, or None."""
    if error.kind in ("auth", "tls"):
        return StopRun(refusal_message(error, url), EXIT_USAGE)
    if isinstance(error, ServersDown):
        return StopRun(
            f"every server is down or not ready: {error.message}; run again with --resume when one is back", EXIT_FAILED
        )
    return None


class RemoteProcess:
    """``process(item, data, params)`` over a BatchClient. ``health(progress)`` is the engine's
    ``before`` hook: it checks the servers and opens the breaker when none can serve."""

    def __init__(self, client: BatchClient, verbose: int = 0):
        self.client = client
        self.verbose = verbose
        self.retries = 0
        self.progress: Progress | None = None
        client.on_retry = self._on_retry

    def _on_retry(self, key, attempt, error, wait, url):
        self.retries += 1
        if self.progress is not None and (self.verbose or attempt == 1):
            first = error.message.splitlines()[0][:200] if error.message else ""
            self.progress.log(
                f"retry {key}: attempt {attempt} on {url} failed with {error.code} ({first}); again in {wait:.1f} s",
                always=self.verbose > 0,
            )

    def health(self, progress: Progress) -> None:
        self.progress = progress

        def waiting(health):
            progress.log(
                "waiting up to %.0f s for a server to be ready: %s"
                % (
                    self.client.retry.max_wait_s,
                    "; ".join(
                        f"{h['url']} live {h['live']}, ready {h['ready']}, model ready {h['model_ready']}"
                        for h in health
                    ),
                ),
                always=True,
            )

        health = self.client.check_servers(on_wait=waiting)
        if any(h["healthy"] for h in health):
            return
        for h in health:
            if h.get("error_kind") in ("auth", "tls"):
                code, _, message = h["error"].partition(": ")
                stop = stop_for(ServiceError(message, code), h["url"])
                self.client.open_breaker(ServersDown(stop.args[0]))
                self._stop = stop
                return
        reasons = "; ".join(
            f"{h['url']}: "
            + (
                h.get("error", "").splitlines()[0][:200]
                if h.get("error")
                else f"live {h['live']}, ready {h['ready']}, model {h['model']} ready {h['model_ready']}"
            )
            for h in health
        )
        hint = (
            " (if the server uses TLS, add --tls)" if any("Socket closed" in h.get("error", "") for h in health) else ""
        )
        self.client.open_breaker(ServersDown(f"no server can serve: {reasons}{hint}"))
        self._stop = StopRun(f"no server can serve: {reasons}{hint}", EXIT_FAILED)

    _stop: StopRun | None = None

    def __call__(self, item: Item, data: bytes, params: dict) -> Outcome:
        if self._stop is not None:
            raise self._stop
        res = self.client.run(Job(item.rel, data, params))
        if res.error is not None:
            stop = stop_for(res.error, res.url)
            if stop is not None:
                self._stop = stop  # later images are not sent: they would be refused the same way
                raise stop
            res.error.attempts, res.error.errors = res.attempts, res.errors
            raise res.error
        return Outcome(res.image, res.report, res.attempts, res.url)

    def runner_info(self) -> dict:
        return {"retries": self.retries, "requests_sent_per_url": self.client.sent_per_url()}
