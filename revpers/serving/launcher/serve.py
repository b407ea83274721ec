"""``revpers serve``: tritonserver in the foreground, supervised, drained on stop.

Options, signals, the ready line and the exit codes are described in docs/serving.md,
"revpers serve".
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Sequence

from revpers.serving.launcher.errors import ServerUsageError, TritonServerError
from revpers.serving.launcher.process import PortInUseError, Security, TritonServer, client_host
from revpers.serving.launcher.supervise import DRAIN_FILE_ENV, Health, HealthEndpoint, Supervisor
from revpers_client.protocol import ADMIN_KEY_ENV, API_KEY_ENV, MODEL

LOG = logging.getLogger("revpers.serving.launcher")

DEFAULT_HOST = "127.0.0.1"
DEFAULT_DRAIN_TIMEOUT = 300.0
# after a drain nothing is loaded, so tritonserver exits at once, except when a model version
# whose stub died stays UNLOADING (docs/serving.md, "Supervision"): then it is killed after this
STUCK_EXIT_GRACE_S = 5.0


class _StopRequested(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _LogFollower(threading.Thread):
    """Copies what the server appends to its log file onto a text stream."""

    def __init__(self, path: Path, offset: int, out):
        super().__init__(name="tritonserver-log", daemon=True)
        self.path, self.offset, self.out = path, offset, out
        self._done = threading.Event()

    def run(self) -> None:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            while True:
                finished = self._done.is_set()
                chunk = fh.read(65536)
                if chunk:
                    with contextlib.suppress(Exception):
                        self.out.write(chunk.decode("utf-8", "replace"))
                        self.out.flush()
                    continue
                if finished:
                    return
                self._done.wait(0.2)

    def finish(self) -> None:
        self._done.set()
        self.join(timeout=5)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def read_key(path: str | os.PathLike | None, env_name: str, what: str) -> str | None:
    """A key from ``path`` (its first line) or else the environment variable ``env_name``."""
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ServerUsageError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
        key = text.strip().splitlines()[0].strip() if text.strip() else ""
        if not key:
            raise ServerUsageError(f"the {what} file {path} is empty")
        return key
    return os.environ.get(env_name) or None


def _own_logging(verbose: bool) -> logging.Handler:
    """serve's lines go to stderr with their own handler, whatever the root logger's level (the
    CLI sets it to WARNING), so the ready line prints even with --quiet."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("revpers serve: %(message)s"))
    LOG.addHandler(handler)
    LOG.setLevel(logging.DEBUG if verbose else logging.INFO)
    LOG.propagate = False
    return handler


def serve(
    repository: str | os.PathLike,
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    host: str = DEFAULT_HOST,
    *,
    http_host: str = DEFAULT_HOST,
    health_port: int = 8003,
    security: Security | None = None,
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
    entry_models: Iterable[str] = (MODEL,),
    log_verbose: int = 0,
    log_file: str | os.PathLike | None = None,
    stream_log: bool = True,
    verbose: bool = False,
    startup_timeout: float = 600.0,
    extra_args: Sequence[str] = (),
) -> int:
    """Run tritonserver in the foreground until Ctrl-C or SIGTERM (``revpers serve``).

    Returns 0 after a clean stop (drained), 1 if the server failed to start, died, could not be
    drained in time or had to be killed, 2 on a usage problem (missing repository, port in use,
    no tritonserver, bad key or certificate). Signal handlers are installed only when called from
    the main thread, and restored on return.
    """
    handler = _own_logging(verbose)
    own_log = log_file is None
    if own_log:  # made here (not by TritonServer) so it can be streamed from the start
        fd, name = tempfile.mkstemp(prefix="revpers-tritonserver-", suffix=".log")
        os.close(fd)
        log_file = name
    drain_dir = Path(tempfile.mkdtemp(prefix="revpers-drain-"))
    server = TritonServer(
        repository,
        grpc_port=grpc_port,
        http_port=http_port,
        metrics_port=metrics_port,
        host=host,
        http_host=http_host,
        security=security or Security(),
        log_verbose=log_verbose,
        log_file=log_file,
        extra_args=extra_args,
        model_control_mode="explicit",
        env={DRAIN_FILE_ENV: str(drain_dir / "draining")},
    )
    supervisor = Supervisor(
        server, Health(), entry_models=entry_models, drain_file=drain_dir / "draining", start_timeout=startup_timeout
    )
    stopping = threading.Event()

    def on_signal(signum, _frame):
        if stopping.is_set():
            LOG.warning("second %s: killing tritonserver", signal.Signals(signum).name)
            server.kill()
            return
        stopping.set()
        raise _StopRequested(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    cleanup = contextlib.ExitStack()  # run in reverse: follower, endpoint, server, supervisor, stopping, ...
    cleanup.callback(LOG.removeHandler, handler)
    cleanup.callback(shutil.rmtree, drain_dir, ignore_errors=True)
    for sig, old in previous.items():
        cleanup.callback(signal.signal, sig, old)
    cleanup.callback(stopping.set)
    cleanup.callback(server.stop)
    cleanup.callback(supervisor.stop)
    cleanup.callback(stopping.set)
    code = 1
    try:
        try:
            code = _run(server, supervisor, cleanup, health_port, startup_timeout, stream_log, Path(log_file))
        except _StopRequested as req:
            stopping.set()
            code = _drain_and_stop(server, supervisor, req.signum, drain_timeout)
        finally:
            if own_log and code == 0:  # after a clean stop, as TritonServer does with its own temp log
                cleanup.callback(Path(log_file).unlink, missing_ok=True)
            cleanup.close()
    except _StopRequested:  # a signal landed in the cleanup above: it is done by now
        return 0
    return code


def _run(
    server: TritonServer,
    supervisor: Supervisor,
    cleanup: contextlib.ExitStack,
    health_port: int,
    startup_timeout: float,
    stream_log: bool,
    log_file: Path,
) -> int:
    """Health endpoint, log streaming, start, then serve until the server dies (a signal interrupts)."""
    try:
        endpoint = _start_health(
            supervisor.health, server.http_host, health_port, (server.grpc_port, server.http_port, server.metrics_port)
        )
    except ServerUsageError as exc:
        LOG.error("%s", exc)
        return 2
    cleanup.callback(endpoint.close)
    if stream_log:
        log_file.touch()
        follower = _LogFollower(log_file, log_file.stat().st_size, sys.stderr)
        follower.start()
        cleanup.callback(follower.finish)
    return _serve(server, supervisor, endpoint, startup_timeout, quiet_errors=stream_log)


def _start_health(health: Health, host: str, port: int, server_ports: Sequence[int]) -> HealthEndpoint:
    if port in server_ports:
        raise PortInUseError(f"the health port {port} must differ from the server's ports")
    try:
        return HealthEndpoint(health, host, port).start()
    except OSError as exc:
        raise PortInUseError(
            f"health port {port} on {host}: {exc.strerror or exc}; choose another with --health-port"
        ) from None


def _drain_and_stop(server: TritonServer, supervisor: Supervisor, signum: int, drain_timeout: float) -> int:
    """The stop sequence after SIGTERM/SIGINT (docs/serving.md, "Drain"); returns serve's exit code."""
    LOG.info(
        "%s received: draining (new requests refused, up to %.0f s for those in flight)",
        signal.Signals(signum).name,
        drain_timeout,
    )
    # before the server was up (no supervisor yet) there is nothing to drain
    drained = supervisor.drain(drain_timeout) if supervisor.ident is not None else True
    supervisor.stop()
    stuck = bool(supervisor.reloaded) and drained
    code = server.stop(timeout=STUCK_EXIT_GRACE_S if stuck else None)
    supervisor.health.set(live=False, ready=False, state="stopped")
    if drained and code != 0 and stuck:
        lost = supervisor.unanswered()
        LOG.warning(
            "tritonserver did not exit by itself after the drain (exit %s): a version of %s "
            "whose stub died stays UNLOADING in Triton; %s",
            code,
            ", ".join(f"'{m}'" for m in sorted(supervisor.reloaded)),
            f"{lost} request(s) inside the dead stubs got no answer" if lost else "every request had finished",
        )
    elif code not in (0, None):
        LOG.error("tritonserver exited with code %s while stopping", code)
        return 1
    if not drained:
        LOG.error("stopped without a complete drain")
        return 1
    LOG.info("stopped")
    return 0


def _serve(
    server: TritonServer,
    supervisor: Supervisor,
    endpoint: HealthEndpoint | None,
    startup_timeout: float,
    quiet_errors: bool,
) -> int:
    LOG.info("starting tritonserver on %s (log %s)", server.repository, server.log_path)
    try:
        server.start(timeout=startup_timeout)
    except ServerUsageError as exc:
        LOG.error("%s", exc)
        return 2
    except TritonServerError as exc:
        LOG.error("%s", exc.summary if quiet_errors else exc)
        return 1
    supervisor.start()
    _report_ready(server, endpoint)
    code = _wait_for_death(server, supervisor)
    supervisor.stop()
    supervisor.health.set(live=False, ready=False, state="dead")
    err = TritonServerError(*server.death_parts(code, "while serving"))
    LOG.error("%s", err.summary if quiet_errors else err)
    return 1


def _wait_for_death(server: TritonServer, supervisor: Supervisor) -> int:
    """Until tritonserver exits by itself; its exit code. A server the supervisor stopped to
    restart it does not count: the loop follows the new process."""
    while True:
        proc = server.process
        assert proc is not None
        try:
            code = proc.wait(timeout=0.5)
        except subprocess.TimeoutExpired:
            continue
        if supervisor.restarting.is_set() or server.process is not proc:
            time.sleep(0.2)
            continue
        return code


def _report_ready(server: TritonServer, endpoint: HealthEndpoint | None) -> None:
    """The start report: URLs, models, warnings; its last line holds every URL."""
    urls, sec = server.urls, server.security
    try:
        models = server.repository_index()
    except (OSError, TritonServerError, ValueError) as exc:
        models = []
        LOG.warning("repository index unavailable: %s", exc)
    ready = [f"{m['name']} (v{m.get('version', '?')})" for m in models if m.get("state") == "READY"]
    not_ready = [
        f"{m['name']}: {m.get('state', '?')} {m.get('reason', '')}".strip() for m in models if m.get("state") != "READY"
    ]
    tls = "mutual TLS" if sec.tls_ca else "TLS" if sec.tls_cert else "plaintext"
    health_url = f"http://{client_host(server.http_host)}:{endpoint.port}" if endpoint else None
    LOG.info("tritonserver ready in %.1f s (pid %d)", server.startup_seconds or 0.0, server.pid)
    LOG.info("  gRPC     %s (%s; inference %s)", urls.grpc, tls, "needs the API key" if sec.api_key else "open")
    LOG.info("  HTTP     %s (plaintext)", urls.http)
    LOG.info("  metrics  %s", urls.metrics)
    if health_url:
        LOG.info("  health   %s/livez %s/readyz", health_url, health_url)
    LOG.info("  repository %s", server.repository)
    LOG.info("  models READY: %s", ", ".join(ready) or "none")
    if not_ready:
        LOG.warning("  models not ready: %s", "; ".join(not_ready))
    if server.argv_hidden is False:
        LOG.warning("  the API keys could not be wiped from tritonserver's command line (ps shows them)")
    if not _is_loopback(server.host) and not (sec.tls_cert and sec.api_key):
        LOG.warning("  gRPC listens on %s, beyond this machine, without TLS and an API key", server.host)
    if not _is_loopback(server.http_host):
        LOG.warning(
            "  HTTP and metrics listen on %s, beyond this machine, in plaintext: put a TLS proxy in "
            "front instead (docs/serving.md)",
            server.http_host,
        )
    LOG.info(
        "  ready: grpc %s, http %s, metrics %s%s; Ctrl-C or SIGTERM drains and stops (log %s)",
        urls.grpc,
        urls.http,
        urls.metrics,
        f", health {health_url}/readyz" if health_url else "",
        server.log_path,
    )


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``revpers serve``."""
    parser.add_argument("--repository", required=True, type=Path, help="Triton model repository directory")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    parser.add_argument(
        "--health-port", type=int, default=8003, help="port of /livez and /readyz, on the HTTP address (default 8003)"
    )
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address gRPC listens on (default 127.0.0.1; 0.0.0.0 for all interfaces: then use "
        "--tls-cert/--tls-key and an API key)",
    )
    parser.add_argument(
        "--http-host",
        default=DEFAULT_HOST,
        help="address HTTP, metrics and health listen on (default 127.0.0.1: tritonserver's HTTP has "
        "no TLS; put a TLS-terminating proxy in front rather than opening it)",
    )
    tls = parser.add_argument_group("gRPC TLS")
    tls.add_argument("--tls-cert", type=Path, default=None, help="server certificate (PEM) for gRPC TLS")
    tls.add_argument("--tls-key", type=Path, default=None, help="its private key (PEM)")
    tls.add_argument(
        "--tls-ca",
        type=Path,
        default=None,
        help="CA (PEM) that signs client certificates: mutual TLS, clients need a certificate",
    )
    keys = parser.add_argument_group("API keys (tritonserver's restricted protocols, gRPC and HTTP)")
    keys.add_argument(
        "--api-key-file",
        type=Path,
        default=None,
        help=f"file holding the key inference requests must carry (default: ${API_KEY_ENV}; "
        "neither: inference is open)",
    )
    keys.add_argument(
        "--admin-key-file",
        type=Path,
        default=None,
        help=f"file holding the key for model config, repository control, statistics, trace, logging "
        f"and shared memory (default: ${ADMIN_KEY_ENV}; neither: a random key, so they are off)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=DEFAULT_DRAIN_TIMEOUT,
        help="on SIGTERM, seconds requests in flight may take to finish (default 300)",
    )
    parser.add_argument(
        "--entry-model",
        action="append",
        default=None,
        metavar="NAME",
        help=f"model clients call, unloaded first when draining (default {MODEL}; repeatable)",
    )
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument(
        "--log-file",
        type=Path,
        default=None,
        help="server log file, appended to (default: a temp file, deleted after a clean stop)",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        help="do not stream the server log to stderr (serve's own lines, the ready line, still print)",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="more of serve's own lines (supervision, drain progress)",
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for all models to load")
    parser.add_argument(
        "--triton-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra tritonserver argument, e.g. --triton-arg=--pinned-memory-pool-byte-size=0 (repeatable)",
    )
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Run ``revpers serve`` from parsed :func:`add_serve_arguments` options; returns the exit code."""
    try:
        api_key = read_key(args.api_key_file, API_KEY_ENV, "API key")
        admin_key = read_key(args.admin_key_file, ADMIN_KEY_ENV, "admin key") or secrets.token_urlsafe(32)
        security = Security(
            api_key=api_key, admin_key=admin_key, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_ca=args.tls_ca
        )
        security.check()
    except ServerUsageError as exc:
        print(f"revpers serve: {exc.summary}", file=sys.stderr)
        return 2
    return serve(
        args.repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        host=args.host,
        http_host=args.http_host,
        health_port=args.health_port,
        security=security,
        drain_timeout=args.drain_timeout,
        entry_models=args.entry_model or (MODEL,),
        log_verbose=args.log_verbose,
        log_file=args.log_file,
        stream_log=not args.quiet,
        verbose=getattr(args, "verbose", False),
        startup_timeout=args.startup_timeout,
        extra_args=args.triton_arg,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m revpers.serving.launcher.serve", description="Serve a Triton model repository."
    )
    return run_serve(add_serve_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
