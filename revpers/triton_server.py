"""Run NVIDIA Triton Inference Server as a child process, without a container.

Where the server comes from (:func:`find_tritonserver`), in this order:

1. ``REVPERS_TRITONSERVER=/path/to/tritonserver`` (or a name on ``PATH``): that binary wins.
2. The ``nvidia-pytriton`` wheel (``pip install 'revpers[server]'``): it ships a real
   ``tritonserver`` (2.51 in nvidia-pytriton 0.7.0) with the Python backend, its shared
   libraries in ``site-packages/nvidia_pytriton.libs`` and one Python-backend stub per Python
   version. No TensorRT or ONNX Runtime backend.
3. A ``tritonserver`` on ``PATH`` with a backends directory next to it (NVIDIA's NGC container:
   ``/opt/tritonserver/bin`` and ``/opt/tritonserver/backends``).

The wheel's Python backend needs a backend directory in which ``python/`` holds
``libtriton_python.so``, ``triton_python_backend_utils.py`` and the ``triton_python_backend_stub``
built for *this* Python; :func:`prepare_backend_dir` builds it once in a cache directory
(``$REVPERS_CACHE_DIR`` or ``~/.cache/revpers``, under ``triton-backends/``).

The stub runs each Python model in its own process, with an embedded interpreter in *isolated*
mode (``PYTHONPATH`` is ignored there). With the wheel, that interpreter is the one found as
``python3`` on ``PATH``, and it takes site-packages from that venv's ``pyvenv.cfg``; so
:class:`TritonServer` puts this venv's ``bin/`` first on ``PATH`` and passes the revpers checkout,
this interpreter's site-packages and any ``PYTHONPATH`` in ``$REVPERS_STUB_PYTHONPATH``, which our
copy of ``triton_python_backend_utils.py`` (imported by the stub before the model) puts on
``sys.path``: a ``model.py`` can ``import revpers`` and whatever the venv has. A system install
(NGC) keeps its own backends untouched: there revpers must be pip-installed into the Python the
container's stub uses (its own ``python3``), as a container image would do anyway.

:func:`serve` (``revpers serve``) is the foreground command: it starts the server, reports where
it listens and which models are READY, streams the server log to stderr and stops cleanly on
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import errno
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, NamedTuple, Sequence

LOG = logging.getLogger("revpers.triton_server")

ENV_BINARY = "REVPERS_TRITONSERVER"
ENV_BACKENDS = "REVPERS_TRITON_BACKENDS"
ENV_CACHE = "REVPERS_CACHE_DIR"
INSTALL_HINT = "pip install 'revpers[server]'"
_REPO_ROOT = Path(__file__).resolve().parent.parent
_STUB = "triton_python_backend_stub"
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


class TritonServerError(RuntimeError):
    """The server could not be found, prepared, started, or it died.

    ``summary`` is the short reason; ``log_tail`` the last lines of the server log, if any
    (``str()`` gives both).
    """

    def __init__(self, summary: str, log_tail: str = "", log_path: Path | None = None):
        self.summary, self.log_tail, self.log_path = summary, log_tail, log_path
        text = summary
        if log_tail:
            text += f"\n--- last lines of {log_path or 'the server log'} ---\n{log_tail}"
        super().__init__(text)


class ServerUsageError(TritonServerError):
    """A problem with what was asked (paths, ports), found before launching anything."""


class TritonNotFoundError(ServerUsageError):
    """No usable tritonserver installation."""


class PortInUseError(ServerUsageError):
    """A port the server should listen on is taken."""


# --------------------------------------------------------------------------- installation


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver installation.

    ``kind`` is ``"wheel"`` (nvidia-pytriton layout: ``lib_dir`` must go on ``LD_LIBRARY_PATH``
    and the Python stub is picked from ``stubs_dir``) or ``"system"`` (a full install such as
    NGC's ``/opt/tritonserver``: ``backends_dir`` is used as is).
    """

    binary: Path
    backends_dir: Path
    lib_dir: Path | None = None
    stubs_dir: Path | None = None
    version: str = "unknown"
    kind: str = "wheel"

    def stub_for(self, version_info: Sequence[int] | None = None) -> Path:
        """The Python-backend stub built for ``version_info`` (default: this interpreter)."""
        major, minor = tuple(version_info or sys.version_info)[:2]
        if self.stubs_dir is None:
            stub = self.backends_dir / "python" / _STUB
            if stub.is_file():
                return stub
            raise TritonServerError(f"no {_STUB} in {self.backends_dir / 'python'}")
        stub = self.stubs_dir / f"{major}.{minor}" / _STUB
        if not stub.is_file():
            have = sorted(
                (p.name for p in self.stubs_dir.iterdir() if (p / _STUB).is_file()) if self.stubs_dir.is_dir() else [],
                key=lambda v: [int(x) if x.isdigit() else 0 for x in v.split(".")],
            )
            raise TritonServerError(
                f"the Triton Python backend has no stub for Python {major}.{minor} "
                f"(stubs in {self.stubs_dir}: {', '.join(have) or 'none'}); "
                "run revpers under one of those Python versions"
            )
        return stub


def stub_python_version(stub: Path) -> tuple[int, int] | None:
    """The Python a stub binary embeds, read from the libpython3.X it links (None if unknown)."""
    try:
        data = stub.read_bytes()
    except OSError:
        return None
    m = re.search(rb"libpython(\d)\.(\d+)", data)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _wheel_layout(binary: Path, version: str) -> TritonInstall | None:
    """nvidia-pytriton's layout: <sp>/pytriton/tritonserver/{bin,backends,python_backend_stubs}."""
    root = binary.parent.parent
    if not (root / "python_backend_stubs").is_dir():
        return None
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        binary=binary,
        backends_dir=root / "backends",
        lib_dir=libs if libs.is_dir() else None,
        stubs_dir=root / "python_backend_stubs",
        version=version,
        kind="wheel",
    )


def _system_install(binary: Path) -> TritonInstall | None:
    candidates = [os.environ.get(ENV_BACKENDS), binary.parent.parent / "backends", "/opt/tritonserver/backends"]
    for cand in candidates:
        if cand and Path(cand).is_dir():
            backends = Path(cand)
            version = "unknown"
            vfile = backends.parent / "TRITON_VERSION"
            with contextlib.suppress(OSError):
                version = vfile.read_text().strip() or version
            return TritonInstall(binary=binary, backends_dir=backends, version=version, kind="system")
    return None


def _pytriton_version() -> str:
    try:
        return "pytriton" + importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver: ``$REVPERS_TRITONSERVER``, then the nvidia-pytriton wheel, then ``PATH``."""
    explicit = os.environ.get(ENV_BINARY)
    if explicit:
        found = shutil.which(explicit) if os.sep not in explicit else explicit
        path = Path(found) if found else None
        if path is None or not path.is_file() or not os.access(path, os.X_OK):
            raise TritonNotFoundError(f"{ENV_BINARY}={explicit!r} is not an executable tritonserver binary")
        path = path.absolute()
        install = _wheel_layout(path, _pytriton_version()) or _system_install(path)
        if install is None:
            raise TritonNotFoundError(
                f"{ENV_BINARY}={explicit!r}: no backends directory found next to it "
                f"({path.parent.parent / 'backends'}) nor in /opt/tritonserver/backends; set {ENV_BACKENDS}"
            )
        return install

    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            install = _wheel_layout(binary, _pytriton_version())
            if install is not None:
                return install

    on_path = shutil.which("tritonserver")
    if on_path:
        install = _system_install(Path(on_path).absolute())
        if install is not None:
            return install

    raise TritonNotFoundError(
        "tritonserver not found: install the server extra with "
        f"`{INSTALL_HINT}` (nvidia-pytriton ships tritonserver with the Python backend), "
        f"run inside NVIDIA's Triton container, or set {ENV_BINARY}=/path/to/tritonserver"
    )


def default_cache_dir() -> Path:
    base = os.environ.get(ENV_CACHE)
    if base:
        return Path(base) / "triton-backends"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "revpers" / "triton-backends"


# Appended to our copy of triton_python_backend_utils.py, which the stub imports before the
# model: the stub runs its interpreter in isolated mode (PYTHONPATH is ignored), so the paths a
# model.py needs (the revpers checkout, this venv's site-packages) are passed in an env var.
STUB_PATH_ENV = "REVPERS_STUB_PYTHONPATH"
_BOOTSTRAP = f"""

# --- added by revpers.triton_server: the stub ignores PYTHONPATH (isolated interpreter) ---
def _revpers_extend_sys_path():
    import os, sys
    entries = [p for p in os.environ.get("{STUB_PATH_ENV}", "").split(os.pathsep) if p]
    for p in reversed(entries):
        if p not in sys.path:
            sys.path.insert(1 if sys.path and sys.path[0] == "" else 0, p)


_revpers_extend_sys_path()
del _revpers_extend_sys_path
"""
_MANIFEST = "revpers-backend.json"


def _manifest(sources: Mapping[str, Path]) -> dict:
    out: dict = {"bootstrap": _BOOTSTRAP}
    for name, src in sources.items():
        st = src.stat()
        out[name] = [str(src), st.st_size, st.st_mtime_ns]
    return out


def prepare_backend_dir(install: TritonInstall, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory to pass as ``--backend-directory``.

    For a wheel install it is ``<cache_dir>/<version>-py3X/`` (``cache_dir`` defaults to
    :func:`default_cache_dir`) with ``python/`` holding libtriton_python.so, the stub for this
    Python and triton_python_backend_utils.py (plus a few lines that put ``$REVPERS_STUB_PYTHONPATH``
    on the model's ``sys.path``). It is built once, atomically (safe against concurrent
    builders), and rebuilt only if the wheel's files changed. A system install's own backends
    directory is returned as is.
    """
    if install.kind != "wheel":
        if not install.backends_dir.is_dir():
            raise TritonServerError(f"backends directory {install.backends_dir} does not exist")
        return install.backends_dir
    stub = install.stub_for(sys.version_info)
    sources = {name: install.backends_dir / "python" / name for name in _BACKEND_FILES}
    sources[_STUB] = stub
    for src in sources.values():
        if not src.is_file():
            raise TritonServerError(f"the tritonserver install lacks {src}; reinstall with `{INSTALL_HINT}`")
    expected = _manifest(sources)

    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = base / f"{install.version}-py{sys.version_info[0]}{sys.version_info[1]}"

    def up_to_date() -> bool:
        try:
            found = json.loads((target / _MANIFEST).read_text())
        except (OSError, ValueError):
            return False
        return found == expected and all((target / "python" / name).is_file() for name in sources)

    if up_to_date():
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
    try:
        (tmp / "python").mkdir()
        for name, src in sources.items():
            shutil.copy2(src, tmp / "python" / name)
        (tmp / "python" / _STUB).chmod(0o755)
        with open(tmp / "python" / "triton_python_backend_utils.py", "a") as fh:
            fh.write(_BOOTSTRAP)
        (tmp / _MANIFEST).write_text(json.dumps(expected, indent=1))
        tmp.chmod(0o755)
        try:
            os.rename(tmp, target)
        except OSError as exc:  # target exists: another builder won, or it is stale
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            if not up_to_date():
                stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=base))
                os.rename(target, stale / "old")
                os.rename(tmp, target)
                shutil.rmtree(stale, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not up_to_date():
        raise TritonServerError(f"could not prepare the Python backend in {target}")
    LOG.debug("prepared Triton Python backend in %s", target)
    return target


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


def _client_host(host: str) -> str:
    if host in ("", "0.0.0.0"):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


# --------------------------------------------------------------------------- HTTP helpers

_LOAD_FAILURE = re.compile(r"failed to load '([^']+)' version (\d+): ([^\"\n]*)")
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy


def _http(url: str, data: bytes | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _tail(path: Path, offset: int = 0, lines: int = 40, max_bytes: int = 64 * 1024) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            end = fh.tell()
            fh.seek(max(offset, end - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


# --------------------------------------------------------------------------- server


class ServerUrls(NamedTuple):
    grpc: str  # "127.0.0.1:8001", as tritonclient.grpc wants it
    http: str  # "http://127.0.0.1:8000"
    metrics: str  # "http://127.0.0.1:8002/metrics"


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
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def python_path_entries(include_site_packages: bool = True) -> list[str]:
    """PYTHONPATH for the Python-backend stubs: the repository root (``import revpers``), then
    this interpreter's non-stdlib sys.path entries (site-packages, editable installs)."""
    stdlib_roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    entries = [str(_REPO_ROOT)]
    if include_site_packages:
        for p in sys.path:
            if not p or not os.path.isdir(p):
                continue
            real = os.path.realpath(p)
            if any(real == r or real.startswith(r + os.sep) for r in stdlib_roots) and "site-packages" not in real:
                continue
            entries.append(os.path.abspath(p))
    seen: set[str] = set()
    return [e for e in entries if not (e in seen or seen.add(e))]


class TritonServer:
    """A tritonserver child process serving ``repository``.

    ``with TritonServer(repo, grpc_port=..., http_port=..., metrics_port=...) as server:``
    starts it and waits until ``/v2/health/ready`` answers 200 (strict readiness: every model in
    the repository loaded); any model that fails to load makes :meth:`start` raise with the tail
    of the server log. The server's stdout/stderr, and those of the Python model stubs, go to
    ``log_path`` (``log_file`` if given, appended to; else a temp file, deleted by a stop that
    ends with exit code 0 and kept otherwise).

    ``host`` is the bind address (default loopback only; ``"0.0.0.0"`` for all interfaces).
    The server runs in its own process group; when started from the main thread it is also
    SIGTERM-ed by the kernel if this process dies without stopping it.
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
        install: TritonInstall | None = None,
        cache_dir: str | os.PathLike | None = None,
        model_control_mode: str = "none",
        exit_timeout_s: int = 30,
    ):
        self.repository = Path(repository).absolute()
        self.grpc_port, self.http_port, self.metrics_port = int(grpc_port), int(http_port), int(metrics_port)
        self.host = host
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

    # -- info

    @property
    def urls(self) -> ServerUrls:
        h = _client_host(self.host)
        return ServerUrls(f"{h}:{self.grpc_port}", f"http://{h}:{self.http_port}", f"http://{h}:{self.metrics_port}/metrics")

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
        return _tail(self.log_path, self._log_offset, lines) if self.log_path else ""

    def command(self, backend_dir: Path) -> list[str]:
        install = self._install
        assert install is not None
        args = [
            str(install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={backend_dir}",
            f"--model-control-mode={self.model_control_mode}",
            "--strict-readiness=true",
            "--exit-on-error=true",  # a model that fails to load ends the server: start() reports it
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-metrics=true",
            f"--metrics-address={self.host}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
        ]
        return args + self.extra_args

    def environment(self) -> dict[str, str]:
        """The server's environment: ``os.environ``, then ``env`` given to the constructor, then
        LD_LIBRARY_PATH (wheel libs), PATH (this venv's bin/ first) and the model import path."""
        install = self._install
        assert install is not None
        env = {**os.environ, **self.env}
        if install.lib_dir is not None:
            env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(install.lib_dir), env.get("LD_LIBRARY_PATH")]))
        # The stub links libpython3.X.so by name; the system's copy may be an older patch release
        # than this interpreter, whose extension modules (e.g. _ssl) then fail to import. Put this
        # interpreter's own libpython first when it has a shared one.
        import sysconfig

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
        env[STUB_PATH_ENV] = path  # what the stub actually reads (see _BOOTSTRAP)
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
        ports = {"gRPC": self.grpc_port, "HTTP": self.http_port, "metrics": self.metrics_port}
        if len(set(ports.values())) != len(ports):
            raise PortInUseError(f"the gRPC, HTTP and metrics ports must differ, got {ports}")
        for name, port in ports.items():
            if port_in_use(port, self.host):
                raise PortInUseError(
                    f"{name} port {port} is already in use on {self.host or '0.0.0.0'} "
                    f"(another tritonserver?); choose another with --{name.lower()}-port"
                )

    def start(self, timeout: float = 120.0) -> "TritonServer":
        """Launch tritonserver and wait until it is ready (all models loaded)."""
        if self.is_running():
            raise TritonServerError(f"tritonserver already running (pid {self._proc.pid})")
        if not self.repository.is_dir():
            raise ServerUsageError(f"model repository {self.repository} is not a directory")
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
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            log.write(f"# revpers: {' '.join(cmd)}\n".encode())
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
                preexec_fn=_pdeathsig_preexec() if threading.current_thread() is threading.main_thread() else None,
            )
        _LIVE.add(self)
        LOG.debug("tritonserver pid %d, log %s", self._proc.pid, self.log_path)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self._terminate(grace=5.0)
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, timeout: float) -> None:
        assert self._proc is not None
        url = f"{self.urls.http}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while True:
            code = self._proc.poll()
            if code is not None:
                self._proc.wait()
                raise TritonServerError(*self._death_parts(code, "while starting"))
            try:
                status, _ = _http(url, timeout=1.0)
                if status == 200:
                    return
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise TritonServerError(
                    f"tritonserver not ready after {timeout:.0f} s (models still loading?)", self.log_tail(), self.log_path
                )
            time.sleep(0.1)

    def _death_parts(self, code: int, when: str) -> tuple[str, str, Path | None]:
        how = f"killed by signal {-code}" if code < 0 else f"exited with code {code}"
        summary = f"tritonserver {how} {when}" + "".join(f"\n  {ln}" for ln in self.load_failures())
        return summary, self.log_tail(), self.log_path

    def load_failures(self) -> list[str]:
        """"model 'x' v1 failed to load: <reason>" for each failure this run logged, and the
        server's own fatal ``error: ...`` line."""
        text = _tail(self.log_path, self._log_offset, lines=100_000, max_bytes=1 << 20) if self.log_path else ""
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
        _LIVE.discard(self)
        return proc.returncode

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, wait up to ``timeout`` (default: the server's exit timeout + 10 s), then SIGKILL.

        Returns the server's exit code (None if it was never started). Idempotent.
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

    # -- queries

    def repository_index(self, timeout: float = 5.0) -> list[dict]:
        """``POST /v2/repository/index``: [{name, version, state, reason}, ...]."""
        status, body = _http(f"{self.urls.http}/v2/repository/index", data=b"{}", timeout=timeout)
        if status != 200:
            raise TritonServerError(f"repository index answered {status}: {body[:200]!r}")
        return json.loads(body or b"[]")

    def ready_models(self) -> list[str]:
        return sorted({m["name"] for m in self.repository_index() if m.get("state") == "READY"})


# --------------------------------------------------------------------------- `revpers serve`



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


def serve(
    repository: str | os.PathLike,
    grpc_port: int = 8001,
    http_port: int = 8000,
    metrics_port: int = 8002,
    host: str = "0.0.0.0",
    *,
    log_verbose: int = 0,
    log_file: str | os.PathLike | None = None,
    stream_log: bool = True,
    startup_timeout: float = 600.0,
    extra_args: Sequence[str] = (),
) -> int:
    """Run tritonserver in the foreground until Ctrl-C or SIGTERM (``revpers serve``).

    Logs the gRPC/HTTP/metrics URLs, the repository and the READY models to stderr, and streams
    the server log there too (``stream_log``). Returns 0 after a clean stop on a signal, 1 if the
    server failed to start, died by itself or had to be killed, 2 on a usage problem (missing
    repository, port in use, no tritonserver). Signal handlers are installed only when called
    from the main thread, and restored on return.
    """
    if not LOG.handlers and not logging.getLogger().handlers:
        handler_ = logging.StreamHandler(sys.stderr)
        handler_.setFormatter(logging.Formatter("revpers serve: %(message)s"))
        LOG.addHandler(handler_)
        LOG.setLevel(logging.INFO)
        LOG.propagate = False
    own_log = log_file is None
    if own_log:  # made here (not by TritonServer) so it can be streamed from the start
        fd, name = tempfile.mkstemp(prefix="revpers-tritonserver-", suffix=".log")
        os.close(fd)
        log_file = name
    server = TritonServer(
        repository, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port, host=host,
        log_verbose=log_verbose, log_file=log_file, extra_args=extra_args,
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
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    follower: _LogFollower | None = None
    clean_stop = False
    try:
        try:
            if stream_log:
                Path(log_file).touch()
                follower = _LogFollower(Path(log_file), Path(log_file).stat().st_size, sys.stderr)
                follower.start()
            return _serve(server, startup_timeout, quiet_errors=stream_log)
        except _StopRequested as req:
            stopping.set()
            LOG.info("%s received: stopping tritonserver", signal.Signals(req.signum).name)
            code = server.stop()
            if code not in (0, None):
                LOG.error("tritonserver exited with code %s while stopping", code)
                return 1
            LOG.info("stopped")
            clean_stop = True
            return 0
        finally:
            stopping.set()
            server.stop()
            if follower is not None:
                follower.finish()
            for sig, old in previous.items():
                signal.signal(sig, old)
            if own_log and clean_stop:  # as TritonServer does with its own temp log
                Path(log_file).unlink(missing_ok=True)
    except _StopRequested:  # a signal landed in the cleanup above: it is done by now
        return 0


def _serve(server: TritonServer, startup_timeout: float, quiet_errors: bool) -> int:
    LOG.info("starting tritonserver on %s (log %s)", server.repository, server.log_path)
    try:
        server.start(timeout=startup_timeout)
    except ServerUsageError as exc:
        LOG.error("%s", exc)
        return 2
    except TritonServerError as exc:
        LOG.error("%s", exc.summary if quiet_errors else exc)
        return 1
    urls = server.urls
    try:
        models = server.repository_index()
    except (OSError, TritonServerError, ValueError) as exc:
        models = []
        LOG.warning("repository index unavailable: %s", exc)
    ready = [f"{m['name']} (v{m.get('version', '?')})" for m in models if m.get("state") == "READY"]
    not_ready = [f"{m['name']}: {m.get('state', '?')} {m.get('reason', '')}".strip() for m in models if m.get("state") != "READY"]
    LOG.info("tritonserver ready in %.1f s (pid %d)", server.startup_seconds or 0.0, server.pid)
    LOG.info("  gRPC     %s", urls.grpc)
    LOG.info("  HTTP     %s", urls.http)
    LOG.info("  metrics  %s", urls.metrics)
    LOG.info("  repository %s", server.repository)
    LOG.info("  models READY: %s", ", ".join(ready) or "none")
    if not_ready:
        LOG.warning("  models not ready: %s", "; ".join(not_ready))
    LOG.info("  log %s; Ctrl-C or SIGTERM stops", server.log_path)
    proc = server.process
    assert proc is not None
    while True:
        try:
            code = proc.wait(timeout=0.5)
            break
        except subprocess.TimeoutExpired:
            continue
    err = TritonServerError(*server._death_parts(code, "while serving"))
    LOG.error("%s", err.summary if quiet_errors else err)
    return 1


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of ``revpers serve``."""
    parser.add_argument("--repository", required=True, type=Path, help="Triton model repository directory")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port (default 8001)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port (default 8002)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0, all interfaces)")
    parser.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    parser.add_argument("--log-file", type=Path, default=None,
                        help="server log file, appended to (default: a temp file, deleted after a clean stop)")
    parser.add_argument("--quiet", action="store_true", help="do not stream the server log to stderr")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for all models to load")
    parser.add_argument(
        "--triton-arg", action="append", default=[], metavar="ARG",
        help="extra tritonserver argument, e.g. --triton-arg=--pinned-memory-pool-byte-size=0 (repeatable)",
    )
    return parser


def run_serve(args: argparse.Namespace) -> int:
    """Run ``revpers serve`` from parsed :func:`add_serve_arguments` options; returns the exit code."""
    return serve(
        args.repository, grpc_port=args.grpc_port, http_port=args.http_port, metrics_port=args.metrics_port,
        host=args.host, log_verbose=args.log_verbose, log_file=args.log_file, stream_log=not args.quiet,
        startup_timeout=args.startup_timeout, extra_args=args.triton_arg,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m revpers.triton_server", description="Serve a Triton model repository.")
    return run_serve(add_serve_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
