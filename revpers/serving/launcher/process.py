"""One tritonserver child process: its command line (binding, TLS, API keys), start, health,
model control, its Python-backend stubs, stop.

Why it is started the way it is (process group, parent-death signal, keys hidden from argv):
docs/serving.md, "The launcher".
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple

from revpers.serving.launcher.errors import PortInUseError, ServerUsageError, TritonServerError
from revpers.serving.launcher.install import (
    STUB,
    STUB_PATH_ENV,
    TritonInstall,
    find_tritonserver,
    prepare_backend_dir,
    python_path_entries,
    stub_python_version,
)
from revpers_client.protocol import (
    ADMIN_KEY_ENV,
    ADMIN_KEY_HEADER,
    API_KEY_ENV,
    API_KEY_HEADER,
)

LOG = logging.getLogger("revpers.serving.launcher")

# Triton's restricted-protocol groups: what the API key opens, and what only the admin key opens.
INFERENCE_GROUPS = ("inference",)
ADMIN_GROUPS = ("shared-memory", "model-config", "model-repository", "statistics", "trace", "logging")

# --------------------------------------------------------------------------- ports


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on ``host`` (for tests; racy by nature)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free TCP ports (all held open until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def port_in_use(port: int, host: str = "0.0.0.0") -> bool:
    """Whether a listener already holds ``port`` on ``host``.

    SO_REUSEADDR makes TIME_WAIT leftovers of a previous server not count, as they would not stop
    tritonserver either; a listening socket still does (gRPC's SO_REUSEPORT would otherwise let a
    second tritonserver share the gRPC port silently).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def client_host(host: str) -> str:
    """The address a client on this machine uses to reach a server bound to ``host``."""
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# --------------------------------------------------------------------------- HTTP and log helpers

_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version (\d+): ([^\"\n]*)")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def http_request(
    url: str, data: bytes | None = None, timeout: float = 2.0, headers: Mapping[str, str] | None = None
) -> tuple[int, bytes]:
    """(status, body) of a GET (``data`` None) or JSON POST; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _brief(body: bytes) -> str:
    return body[:300].decode("utf-8", "replace")


def tail(path: Path, offset: int = 0, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            fh.seek(max(offset, end - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- processes


_LIVE: "set[TritonServer]" = set()  # started and not yet stopped: stopped at interpreter exit


@atexit.register
def _stop_all() -> None:  # a server left running when the interpreter exits is stopped
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop(timeout=10)


def _pdeathsig_preexec():
    """A preexec_fn asking the kernel to SIGTERM the child when the thread that forked it ends
    (Linux only; None elsewhere). prctl is looked up here, before fork, not in the child."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _proc_stat(pid: int) -> list[str] | None:
    """Fields 3.. of /proc/<pid>/stat (state first), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_alive(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie (a dead child its parent has not reaped)."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children(pid: int) -> list[int]:
    """The child processes of ``pid`` (of any of its threads)."""
    out: set[int] = set()
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return []
    found_file = False
    for task in tasks:
        try:
            out.update(int(c) for c in (task / "children").read_text().split())
            found_file = True
        except OSError:
            continue
    if not found_file:  # kernel without CONFIG_PROC_CHILDREN: scan every process's parent
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _proc_stat(int(entry.name))
                if stat is not None and int(stat[1]) == pid:
                    out.add(int(entry.name))
    return sorted(out)


def hide_in_argv(pid: int, secrets: Iterable[str]) -> bool:
    """Overwrite every occurrence of ``secrets`` in the command line of ``pid`` (its own memory,
    what ``ps`` and /proc/<pid>/cmdline show) with ``*``. Needs ptrace access to the process (a
    parent has it to its child unless a security module forbids it). True when nothing is left."""
    needles = [s.encode() for s in secrets if s]
    if not needles:
        return True
    stat = _proc_stat(pid)
    if stat is None:
        return False
    arg_start, arg_end = int(stat[45]), int(stat[46])  # fields 48 and 49 of /proc/<pid>/stat
    try:
        with open(f"/proc/{pid}/mem", "r+b", buffering=0) as mem:
            mem.seek(arg_start)
            data = mem.read(arg_end - arg_start)
            new = data
            for n in needles:
                new = new.replace(n, b"*" * len(n))
            if new != data:
                mem.seek(arg_start)
                mem.write(new)
    except OSError as exc:
        LOG.debug("cannot rewrite the command line of pid %d: %s", pid, exc)
        return False
    try:
        shown = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return not any(n in shown for n in needles)


@dataclass(frozen=True)
class Stub:
    """A Python-backend stub process: one model instance, with its shared-memory region."""

    pid: int
    model: str  # the model directory name: <repository>/<model>/<version>/model.py
    instance: str  # Triton's instance name, e.g. "unet_0_0"
    shm_region: str  # its /dev/shm file name

    @classmethod
    def from_cmdline(cls, pid: int, argv: list[str]) -> "Stub | None":
        # triton_python_backend_stub <model.py> <shm region> <shm size> <growth> <parent pid>
        #   <backend dir> <ipc handle> <instance name> <runtime modeldir> ...
        if not argv or not argv[0].endswith(STUB) or len(argv) < 3:
            return None
        model_py = Path(argv[1])
        model = model_py.parent.parent.name if model_py.parent.name.isdigit() else model_py.parent.name
        instance = argv[8] if len(argv) > 8 else model
        return cls(pid, model, instance, argv[2])


def shm_path(region: str) -> Path:
    return Path("/dev/shm") / region.lstrip("/")


# --------------------------------------------------------------------------- the server


class ServerUrls(NamedTuple):
    grpc: str  # "127.0.0.1:8001", as tritonclient.grpc wants it
    http: str  # "http://127.0.0.1:8000"
    metrics: str  # "http://127.0.0.1:8002/metrics"


@dataclass(frozen=True)
class Security:
    """TLS for gRPC and API keys (tritonserver's restricted protocols).

    ``api_key`` opens inference, ``admin_key`` the admin groups (:data:`ADMIN_GROUPS`), both on
    gRPC (metadata ``triton-grpc-protocol-<header>``) and HTTP (plain header). ``tls_ca`` makes
    gRPC TLS mutual: clients need a certificate signed by that CA.
    """

    api_key: str | None = None
    admin_key: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None

    def check(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ServerUsageError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and self.tls_cert is None:
            raise ServerUsageError("--tls-ca (mutual TLS) needs --tls-cert and --tls-key")
        for what, path in (("--tls-cert", self.tls_cert), ("--tls-key", self.tls_key), ("--tls-ca", self.tls_ca)):
            if path is not None and not Path(path).is_file():
                raise ServerUsageError(f"{what} {path}: no such file")
        for what, key in (("API key", self.api_key), ("admin key", self.admin_key)):
            if key is not None and (not key or any(c in key for c in ",:= \t\r\n\0")):
                raise ServerUsageError(f"the {what} must be non-empty, without spaces, ',', ':' or '='")

    def arguments(self) -> list[str]:
        args: list[str] = []
        if self.tls_cert is not None:
            args += [
                "--grpc-use-ssl=true",
                f"--grpc-server-cert={Path(self.tls_cert).absolute()}",
                f"--grpc-server-key={Path(self.tls_key).absolute()}",
            ]
            if self.tls_ca is not None:
                args += ["--grpc-use-ssl-mutual=true", f"--grpc-root-cert={Path(self.tls_ca).absolute()}"]
        for groups, header, key in (
            (INFERENCE_GROUPS, API_KEY_HEADER, self.api_key),
            (ADMIN_GROUPS, ADMIN_KEY_HEADER, self.admin_key),
        ):
            if key is not None:
                setting = f"{','.join(groups)}:{header}={key}"
                args += [f"--grpc-restricted-protocol={setting}", f"--http-restricted-api={setting}"]
        return args

    def secrets(self) -> list[str]:
        return [k for k in (self.api_key, self.admin_key) if k]

    def admin_headers(self) -> dict[str, str]:
        return {ADMIN_KEY_HEADER: self.admin_key} if self.admin_key else {}

    def redact(self, text: str) -> str:
        for s in self.secrets():
            text = text.replace(s, "***")
        return text


class TritonServer:
    """A tritonserver child process serving ``repository``.

    ``with TritonServer(repo, grpc_port=..., http_port=..., metrics_port=...) as server:``
    starts it and waits until ``/v2/health/ready`` answers 200 (strict readiness: every model in
    the repository loaded); any model that fails to load makes :meth:`start` raise with the tail
    of the server log. The server's stdout/stderr, and those of the Python model stubs, go to
    ``log_path`` (``log_file`` if given, appended to; else a temp file, deleted by a stop that
    ends with exit code 0 and kept otherwise).

    ``host`` is the gRPC bind address, ``http_host`` that of HTTP and metrics (default: ``host``);
    both default to loopback. ``security`` adds gRPC TLS and API keys. With
    ``model_control_mode="explicit"`` every model is loaded at start and :meth:`load_model` /
    :meth:`unload_model` work. The server runs in its own process group; when started from the
    main thread it is also SIGTERM-ed by the kernel if this process dies without stopping it.
    """

    def __init__(
        self,
        repository: str | os.PathLike,
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        log_verbose: int = 0,
        extra_args: Iterable[str] = (),
        env: Mapping[str, str] | None = None,
        log_file: str | os.PathLike | None = None,
        *,
        host: str = "127.0.0.1",
        http_host: str | None = None,
        security: Security | None = None,
        install: TritonInstall | None = None,
        cache_dir: str | os.PathLike | None = None,
        model_control_mode: str = "none",
        exit_timeout_s: int = 30,
    ):
        self.repository = Path(repository).absolute()
        self.grpc_port, self.http_port, self.metrics_port = int(grpc_port), int(http_port), int(metrics_port)
        self.host = host
        self.http_host = http_host if http_host is not None else host
        self.security = security or Security()
        self.log_verbose = int(log_verbose)
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.model_control_mode = model_control_mode
        self.exit_timeout_s = int(exit_timeout_s)
        self._install = install
        self._cache_dir = cache_dir
        self._log_file = Path(log_file).absolute() if log_file is not None else None
        self.log_path: Path | None = self._log_file
        self._temp_log = False
        self._log_offset = 0
        self._proc: subprocess.Popen | None = None
        self.startup_seconds: float | None = None
        self.argv_hidden: bool | None = None  # whether the keys could be wiped from the server's argv
        self.seen_stubs: dict[int, Stub] = {}  # every stub seen, by pid (their shm is cleaned at stop)

    # -- info

    @property
    def urls(self) -> ServerUrls:
        g, h = client_host(self.host), client_host(self.http_host)
        return ServerUrls(
            f"{g}:{self.grpc_port}", f"http://{h}:{self.http_port}", f"http://{h}:{self.metrics_port}/metrics"
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def process(self) -> subprocess.Popen | None:
        return self._proc

    def poll(self) -> int | None:
        """The exit code if the server process has ended, else None (also None if never started)."""
        return self._proc.poll() if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 40) -> str:
        """The last lines this run wrote to the log."""
        return tail(self.log_path, self._log_offset, lines) if self.log_path else ""

    def command(self, backend_dir: Path) -> list[str]:
        install = self._install
        assert install is not None
        args = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--model-control-mode={self.model_control_mode}",
            *(["--load-model=*"] if self.model_control_mode == "explicit" else []),
            "--strict-readiness=true",
            "--exit-on-error=true",  # a model that fails to load ends the server: start() reports it
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--http-address={self.http_host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={self.http_host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
        ]
        return args + self.security.arguments() + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: ``os.environ`` less the API-key variables, then ``env`` given
        to the constructor, then LD_LIBRARY_PATH (wheel libs), PATH (this venv's bin/ first) and
        the model import path."""
        install = self._install
        assert install is not None
        env = {k: v for k, v in os.environ.items() if k not in (API_KEY_ENV, ADMIN_KEY_ENV)}
        env.update(self.env)
        if install.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.lib_dir), env.get("LD_LIBRARY_PATH")]))
        # The stub links libpython3.X.so by name; the system's copy may be an older patch release
        # than this interpreter, whose extension modules (e.g. _ssl) then fail to import. Put this
        # interpreter's own libpython first when it has a shared one.
        libdir = sysconfig.get_config_var("LIBDIR")
        ldlib = sysconfig.get_config_var("LDLIBRARY") or ""
        if libdir and ldlib.endswith(".so") and (Path(libdir) / ldlib).exists():
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, env.get("LD_LIBRARY_PATH")]))
        # The stub embeds the interpreter it finds as `python3` on PATH (its venv's pyvenv.cfg gives
        # it site-packages): make that this venv's, when the stub is built for this Python version.
        same_python = install.kind == "wheel" or self._stub_version() == tuple(sys.version_info[:2])
        if same_python:
            env["PATH"] = os.pathsep.join(filter(None, [str(Path(sys.executable).parent), env.get("PATH")]))
        # the revpers checkout always; this interpreter's site-packages only for a matching stub
        entries = python_path_entries(include_site_packages=same_python)
        path = os.pathsep.join(filter(None, [*entries, env.get("PYTHONPATH")]))
        env["PYTHONPATH"] = path
        env[STUB_PATH_ENV] = path  # what the stub actually reads (see install._BOOTSTRAP)
        return env

    def _stub_version(self) -> tuple[int, int] | None:
        install = self._install
        if install is None:
            return None
        try:
            return stub_python_version(install.stub_for())
        except TritonServerError:
            return None

    # -- lifecycle

    def _check_ports(self) -> None:
        ports = {
            "gRPC": (self.grpc_port, self.host),
            "HTTP": (self.http_port, self.http_host),
            "metrics": (self.metrics_port, self.http_host),
        }
        if len({p for p, _ in ports.values()}) != len(ports):
            given = {k: p for k, (p, _) in ports.items()}
            raise PortInUseError(f"the gRPC, HTTP and metrics ports must differ, got {given}")
        for name, (port, host) in ports.items():
            if port_in_use(port, host):
                raise PortInUseError(
                    f"{name} port {port} is already in use on {host or '0.0.0.0'} "
                    f"(another tritonserver?); choose another with --{name.lower()}-port"
                )

    def start(self, timeout: float = 120.0, tie_to_thread: bool = False) -> "TritonServer":
        """Launch tritonserver and wait until it is ready (all models loaded). The kernel stops it
        when the starting thread ends: always from the main thread; from another thread only with
        ``tie_to_thread`` (a thread that lives as long as the server should, e.g. a supervisor).

        A server that crashes while starting (killed by SIGABRT or SIGSEGV: seen once in about 60
        starts here, gRPC's "epoll_wait error: Bad file descriptor" before any other line) is
        started once more; any other failure is raised at once."""
        try:
            return self._start(timeout, tie_to_thread)
        except TritonServerError as exc:
            code = self._proc.returncode if self._proc is not None else None
            if code not in (-signal.SIGABRT, -signal.SIGSEGV):
                raise
            LOG.warning("%s; starting it once more", str(exc).splitlines()[0])
        return self._start(timeout, tie_to_thread)

    def _start(self, timeout: float, tie_to_thread: bool) -> "TritonServer":
        if self.is_running():
            raise TritonServerError(f"tritonserver already running (pid {self._proc.pid})")
        if not self.repository.is_dir():
            raise ServerUsageError(f"model repository {self.repository} is not a directory")
        self.security.check()
        if self._install is None:
            self._install = find_tritonserver()
        self._check_ports()
        backend_dir = prepare_backend_dir(self._install, self._cache_dir)

        if self._log_file is None:
            fd, name = tempfile.mkstemp(prefix="revpers-tritonserver-", suffix=".log")
            os.close(fd)
            self.log_path, self._temp_log = Path(name), True
        else:
            self._log_file.parent.mkdir(parents=True, exist_ok=True)
            self.log_path = self._log_file
        cmd = self.command(backend_dir)
        t0 = time.monotonic()
        self.seen_stubs = {}
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"# revpers: {self.security.redact(' '.join(cmd))}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=str(self.repository),
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not the server
                # the kernel stops the server if this process dies; only from the main thread, as
                # the signal fires when the forking *thread* ends
                preexec_fn=_pdeathsig_preexec()
                if tie_to_thread or threading.current_thread() is threading.main_thread()
                else None,
            )
        _LIVE.add(self)
        LOG.debug("tritonserver pid %d, log %s", self._proc.pid, self.log_path)
        try:
            if self.security.secrets():
                self._hide_keys(after_output=True)
            self._wait_ready(timeout)
            if self.security.secrets():
                self._hide_keys(after_output=False)
        except BaseException:
            self._terminate(grace=5.0)
            raise
        self.startup_seconds = time.monotonic() - t0
        self.stubs()  # remember the stubs' shm regions from the start
        return self

    def _hide_keys(self, after_output: bool) -> None:
        """Wipe the keys from the server's argv once it has parsed its options: it writes its
        first log line after that (or after 5 s, whichever comes first)."""
        assert self._proc is not None and self.log_path is not None
        if after_output:
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and self._proc.poll() is None and not self._log_grew():
                time.sleep(0.01)
        if self._proc.poll() is None:
            self.argv_hidden = hide_in_argv(self._proc.pid, self.security.secrets())
            if not self.argv_hidden and not after_output:
                LOG.warning(
                    "could not wipe the API keys from tritonserver's command line: local users can read them with ps"
                )

    def _log_grew(self) -> bool:
        """Whether the server wrote anything after our own header line."""
        assert self.log_path is not None
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_offset)
            fh.readline()  # our "# revpers: ..." header
            return bool(fh.read(1))

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc.wait()
                raise TritonServerError(*self.death_parts(code, "while starting"))
            try:
                if self.is_ready():
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout:.0f} s (models still loading?)",
                    self.log_tail(),
                    self.log_path,
                )
            time.sleep(0.1)

    def death_parts(self, code: int, when: str) -> tuple[str, str, Path | None]:
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        summary = f"tritonserver {how} {when}" + "".join(f"\n  {ln}" for ln in self.load_failures())
        return summary, self.log_tail(), self.log_path

    def load_failures(self) -> list[str]:
        """ "model 'x' v1 failed to load: <reason>" for each failure this run logged, and the
        server's own fatal ``error: ...`` line."""
        text = tail(self.log_path, self._log_offset, lines=100_000, max_bytes=1 << 20) if self.log_path else ""
        out: list[str] = []
        for m in _LOAD_FAILURE.finditer(text):
            reason = m.group(3).split("\\n")[0].strip()
            line = f"model '{m.group(1)}' v{m.group(2)} failed to load: {reason[:300]}"
            if line not in out:
                out.append(line)
        out += [ln.strip() for ln in text.splitlines() if ln.startswith("error:")][-1:]
        return out

    def _group_alive(self, pgid: int) -> bool:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def _terminate(self, grace: float) -> int | None:
        proc = self._proc
        if proc is None:
            return None
        pgid = proc.pid  # start_new_session: the server leads its own process group
        if proc.poll() is None:
            self.stubs()  # the last look at the stubs, for their shm regions
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                LOG.warning("tritonserver pid %d did not stop within %.0f s; killing it", proc.pid, grace)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
                proc.wait()
        # Python-backend stubs left behind (they normally exit with the server)
        deadline = time.monotonic() + 2.0
        while self._group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._group_alive(pgid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL)
        self.remove_shm(self.seen_stubs.values())
        _LIVE.discard(self)
        return proc.returncode

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` (default: the server's exit timeout + 10 s), then SIGKILL.

        Returns the server's exit code (None if it was never started). Idempotent. The shared-memory
        files of every stub seen are removed if the server left them behind.
        """
        code = self._terminate(grace=timeout if timeout is not None else self.exit_timeout_s + 10.0)
        if code == 0 and self._temp_log and self.log_path is not None:
            with contextlib.suppress(OSError):  # a clean run's temp log is not kept; failures keep theirs
                self.log_path.unlink()
        return code

    def kill(self) -> None:
        """SIGKILL the server and its model stubs now."""
        if self._proc is not None and self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    def __enter__(self) -> "TritonServer":
        return self.start() if not self.is_running() else self

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- stubs

    def stubs(self) -> list[Stub]:
        """The live Python-backend stubs (children of the server); each is remembered in
        :attr:`seen_stubs`."""
        if not self.is_running():
            return []
        out = []
        for pid in children(self._proc.pid):
            if not process_alive(pid):
                continue
            stub = self.seen_stubs.get(pid)
            if stub is None:
                try:
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace").split("\0")
                except OSError:
                    continue
                stub = Stub.from_cmdline(pid, argv)
                if stub is None:
                    continue
                self.seen_stubs[pid] = stub
            out.append(stub)
        return out

    @staticmethod
    def remove_shm(stubs: Iterable[Stub]) -> list[Path]:
        """Delete the /dev/shm regions of ``stubs`` that still exist; returns those deleted."""
        gone = []
        for stub in stubs:
            path = shm_path(stub.shm_region)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                gone.append(path)
        return gone

    # -- queries and model control (the admin key, when set, is sent)

    def _admin(self, path: str, data: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
        return http_request(
            f"{self.urls.http}{path}", data=data, timeout=timeout, headers=self.security.admin_headers()
        )

    def is_ready(self, timeout: float = 1.0) -> bool:
        """``GET /v2/health/ready`` answered 200 (strict readiness: every loaded model READY)."""
        return http_request(f"{self.urls.http}/v2/health/ready", timeout=timeout)[0] == 200

    def repository_index(self, timeout: float = 5.0) -> list[dict]:
        """``POST /v2/repository/index``: [{name, version, state, reason}, ...]."""
        status, body = self._admin("/v2/repository/index", data=b"{}", timeout=timeout)
        if status != 200:
            raise TritonServerError(f"repository index answered {status}: {body[:200]!r}")
        return json.loads(body or b"[]")

    def ready_models(self) -> list[str]:
        return sorted({m["name"] for m in self.repository_index() if m.get("state") == "READY"})

    def load_model(self, name: str, timeout: float = 600.0) -> None:
        """(Re)load ``name`` (explicit model control); returns once it is loaded, raises if it failed."""
        status, body = self._admin(f"/v2/repository/models/{urllib.parse.quote(name)}/load", b"{}", timeout)
        if status != 200:
            raise TritonServerError(f"loading model '{name}' failed ({status}): {_brief(body)}")

    def unload_model(self, name: str, timeout: float = 10.0) -> None:
        """Ask for ``name`` to be unloaded; Triton returns at once and unloads once its requests finish."""
        status, body = self._admin(f"/v2/repository/models/{urllib.parse.quote(name)}/unload", b"{}", timeout)
        if status != 200:
            raise TritonServerError(f"unloading model '{name}' failed ({status}): {_brief(body)}")

    def metrics_text(self, timeout: float = 2.0) -> str:
        status, body = http_request(self.urls.metrics, timeout=timeout)
        return body.decode("utf-8", "replace") if status == 200 else ""
