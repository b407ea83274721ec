"""revpers.launcher: finding tritonserver, the Python-backend directory, and running a real
server (Python backend, BLS, gRPC, health, metrics, clean stop, failed loads, `revpers serve`)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from revpers.launcher import install as launcher_install
from revpers.launcher import (
    PortInUseError,
    TritonInstall,
    TritonNotFoundError,
    TritonServer,
    TritonServerError,
    find_tritonserver,
    free_ports,
    port_in_use,
    prepare_backend_dir,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

ECHO_CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
dynamic_batching { max_queue_delay_microseconds: 100 }
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

ECHO_MODEL = """
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""

BLS_CONFIG = """
backend: "python"
max_batch_size: 8
input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [
  { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] },
  { name: "HOP_US" data_type: TYPE_FP32 dims: [ 1 ] }
]
instance_group [ { kind: KIND_CPU count: 1 } ]
"""

# calls `echo` through BLS and doubles its answer: (x + 1) * 2; also reports the BLS hop time.
# Its initialize imports revpers and a module found only through PYTHONPATH: the stub runs an
# isolated interpreter, so both need TritonServer's path plumbing.
BLS_MODEL = """
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import revpers.launcher.process  # noqa: F401  (fails the load if the path is wrong)
        import revpers_stub_probe  # noqa: F401

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            t0 = time.perf_counter()
            sub = pb_utils.InferenceRequest(
                model_name="echo",
                requested_output_names=["OUTPUT0"],
                inputs=[pb_utils.Tensor("INPUT0", x)],
            ).exec()
            hop_us = (time.perf_counter() - t0) * 1e6
            if sub.has_error():
                raise pb_utils.TritonModelException(sub.error().message())
            y = pb_utils.get_output_tensor_by_name(sub, "OUTPUT0").as_numpy()
            hop = np.full((x.shape[0], 1), hop_us, dtype=np.float32)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("OUTPUT0", (y * 2).astype(np.float32)),
                pb_utils.Tensor("HOP_US", hop),
            ]))
        return responses
"""

BROKEN_MODEL = """
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("boom from initialize")

    def execute(self, requests):
        return []
"""


def _add_model(repo: Path, name: str, config: str, model: str) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.pbtxt").write_text(textwrap.dedent(config))
    (repo / name / "1" / "model.py").write_text(textwrap.dedent(model))


def _processes_mentioning(text: str) -> list[int]:
    """pids whose command line mentions ``text`` (stubs carry their model.py path)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry.name))
    return pids


def _group_gone(pgid: int, wait: float = 10.0) -> bool:
    """Whether the process group has no process left (polled for up to ``wait`` s: stubs that got
    SIGTERM may take a moment to exit on a loaded machine)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return resp.status, resp.read()


@pytest.fixture(scope="module")
def install():
    try:
        return find_tritonserver()
    except TritonNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("triton-backends")


@pytest.fixture()
def probe_dir(tmp_path):
    d = tmp_path / "extra-path"
    d.mkdir()
    (d / "revpers_stub_probe.py").write_text("VALUE = 1\n")
    return d


@pytest.fixture()
def good_repo(tmp_path):
    repo = tmp_path / "models"
    _add_model(repo, "echo", ECHO_CONFIG, ECHO_MODEL)
    _add_model(repo, "echo_bls", BLS_CONFIG, BLS_MODEL)
    return repo


# --------------------------------------------------------------------------- no server needed


def _fake_wheel(root: Path, stub_versions) -> TritonInstall:
    tri = root / "pytriton" / "tritonserver"
    (tri / "bin").mkdir(parents=True)
    (tri / "bin" / "tritonserver").write_text("#!/bin/sh\n")
    (tri / "bin" / "tritonserver").chmod(0o755)
    (tri / "backends" / "python").mkdir(parents=True)
    (tri / "backends" / "python" / "libtriton_python.so").write_bytes(b"so")
    (tri / "backends" / "python" / "triton_python_backend_utils.py").write_text("# utils\n")
    for v in stub_versions:
        (tri / "python_backend_stubs" / v).mkdir(parents=True)
        (tri / "python_backend_stubs" / v / "triton_python_backend_stub").write_bytes(f"stub {v}".encode())
    return TritonInstall(
        binary=tri / "bin" / "tritonserver",
        backends_dir=tri / "backends",
        stubs_dir=tri / "python_backend_stubs",
        version="fake1",
    )


def test_prepare_backend_dir_copies_this_pythons_stub_once(tmp_path):
    here = f"{sys.version_info[0]}.{sys.version_info[1]}"
    install = _fake_wheel(tmp_path / "sp", ["3.8", here])
    out = prepare_backend_dir(install, tmp_path / "cache")
    py = out / "python"
    assert out == tmp_path / "cache" / f"fake1-py{sys.version_info[0]}{sys.version_info[1]}"
    assert (py / "triton_python_backend_stub").read_bytes() == f"stub {here}".encode()
    assert os.access(py / "triton_python_backend_stub", os.X_OK)
    assert (py / "libtriton_python.so").read_bytes() == b"so"
    utils = (py / "triton_python_backend_utils.py").read_text()
    assert utils.startswith("# utils\n") and "REVPERS_STUB_PYTHONPATH" in utils  # the sys.path bootstrap
    inode = (py / "triton_python_backend_stub").stat().st_ino
    assert prepare_backend_dir(install, tmp_path / "cache") == out
    assert (py / "triton_python_backend_stub").stat().st_ino == inode  # not rebuilt
    # a changed wheel (reinstall) is noticed and the directory rebuilt
    src = install.stubs_dir / here / "triton_python_backend_stub"
    src.write_bytes(b"new stub build")
    prepare_backend_dir(install, tmp_path / "cache")
    assert (py / "triton_python_backend_stub").read_bytes() == b"new stub build"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [out.name]  # no build leftovers


def test_prepare_backend_dir_without_a_stub_for_this_python(tmp_path):
    install = _fake_wheel(tmp_path / "sp", ["3.8", "3.9"])
    with pytest.raises(TritonServerError, match=rf"Python {sys.version_info[0]}\.{sys.version_info[1]}.*3\.8, 3\.9"):
        prepare_backend_dir(install, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_find_tritonserver_prefers_REVPERS_TRITONSERVER(tmp_path, monkeypatch):
    # an NGC-like system install: <root>/bin/tritonserver and <root>/backends
    root = tmp_path / "opt" / "tritonserver"
    (root / "bin").mkdir(parents=True)
    (root / "backends" / "python").mkdir(parents=True)
    (root / "TRITON_VERSION").write_text("2.99.0\n")
    binary = root / "bin" / "tritonserver"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    monkeypatch.setenv("REVPERS_TRITONSERVER", str(binary))
    install = find_tritonserver()
    assert (install.binary, install.kind, install.backends_dir, install.version) == (binary, "system", root / "backends", "2.99.0")
    assert install.lib_dir is None
    assert prepare_backend_dir(install, tmp_path / "cache") == root / "backends"  # used as is

    monkeypatch.setenv("REVPERS_TRITONSERVER", str(tmp_path / "nope" / "tritonserver"))
    with pytest.raises(TritonNotFoundError, match="REVPERS_TRITONSERVER"):
        find_tritonserver()


def test_find_tritonserver_missing_names_the_server_extra(monkeypatch, tmp_path):
    monkeypatch.delenv("REVPERS_TRITONSERVER", raising=False)
    real_find_spec = launcher_install.importlib.util.find_spec
    monkeypatch.setattr(launcher_install.importlib.util, "find_spec", lambda name, *a: None if name == "pytriton" else real_find_spec(name, *a))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TritonNotFoundError, match=re.escape("pip install 'revpers[server]'")):
        find_tritonserver()


def test_port_in_use_is_reported_before_launching(tmp_path):
    (tmp_path / "models").mkdir()
    grpc, metrics = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert port_in_use(busy, "127.0.0.1")
        install = TritonInstall(binary=Path("/nonexistent/tritonserver"), backends_dir=tmp_path, kind="system")
        server = TritonServer(tmp_path / "models", grpc_port=grpc, http_port=busy, metrics_port=metrics, install=install)
        with pytest.raises(PortInUseError, match=rf"HTTP port {busy} is already in use"):
            server.start(timeout=5)
        assert server.pid is None  # nothing was launched
    assert not port_in_use(busy, "127.0.0.1")


def test_urls_use_loopback_for_wildcard_host(tmp_path):
    s = TritonServer(tmp_path, grpc_port=1, http_port=2, metrics_port=3, host="0.0.0.0")
    assert s.urls == ("127.0.0.1:1", "http://127.0.0.1:2", "http://127.0.0.1:3/metrics")


# --------------------------------------------------------------------------- real server


@pytest.mark.server
def test_python_models_and_bls_over_grpc_then_clean_stop(install, cache_dir, good_repo, probe_dir):
    grpcclient = pytest.importorskip("tritonclient.grpc")
    ports = free_ports(3)
    server = TritonServer(good_repo, *ports, install=install, cache_dir=cache_dir, env={"PYTHONPATH": str(probe_dir)})
    with server:
        pid = server.pid
        assert server.is_running()
        print(f"\nstart-to-ready {server.startup_seconds:.2f} s")
        assert server.ready_models() == ["echo", "echo_bls"]
        assert _get(f"{server.urls.http}/v2/health/live")[0] == 200
        assert _get(f"{server.urls.http}/v2/health/ready")[0] == 200
        status, metrics = _get(server.urls.metrics)
        assert status == 200 and b"nv_inference_request_success" in metrics

        client = grpcclient.InferenceServerClient(server.urls.grpc)
        try:
            assert client.is_server_ready()
            x = np.arange(6, dtype=np.float32).reshape(2, 3)

            def infer(model, outputs):
                inp = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
                inp.set_data_from_numpy(x)
                res = client.infer(model, [inp], outputs=[grpcclient.InferRequestedOutput(o) for o in outputs])
                return [res.as_numpy(o) for o in outputs]

            (echo,) = infer("echo", ["OUTPUT0"])
            np.testing.assert_array_equal(echo, x + 1)
            bls, hop = infer("echo_bls", ["OUTPUT0", "HOP_US"])
            np.testing.assert_array_equal(bls, (x + 1) * 2)
            assert hop.shape == (2, 1)

            t0 = time.perf_counter()
            n = 20
            hops = [float(infer("echo_bls", ["OUTPUT0", "HOP_US"])[1][0, 0]) for _ in range(n)]
            rtt_ms = (time.perf_counter() - t0) * 1e3 / n
            print(f"BLS hop median {np.median(hops) / 1e3:.2f} ms; gRPC round trip through BLS {rtt_ms:.2f} ms")
        finally:
            client.close()
    # stopped by __exit__: process, its group (the Python model stubs) and ports are all gone
    assert server.poll() is not None
    assert _group_gone(pid)
    assert _processes_mentioning(str(good_repo)) == []
    for port in ports:
        assert not port_in_use(port, "127.0.0.1"), port
    assert server.stop() == server.poll()  # idempotent


@pytest.mark.server
def test_model_failing_in_initialize_makes_start_raise(install, cache_dir, tmp_path):
    repo = tmp_path / "models"
    _add_model(repo, "echo", ECHO_CONFIG, ECHO_MODEL)
    _add_model(repo, "broken", ECHO_CONFIG, BROKEN_MODEL)
    server = TritonServer(repo, *free_ports(3), install=install, cache_dir=cache_dir)
    t0 = time.monotonic()
    with pytest.raises(TritonServerError) as info:
        server.start(timeout=20)
    assert time.monotonic() - t0 < 30  # reported when the server exits, not at the timeout
    message = str(info.value)
    assert "model 'broken' v1 failed to load" in info.value.summary  # the summary names the model
    assert "boom from initialize" in message  # the log tail carries the cause
    assert server.poll() is not None and _group_gone(server.pid)
    assert _processes_mentioning(str(repo)) == []


def _launch_serve(repo: Path, ports, cache_dir: Path, log: Path, probe_dir: Path | None = None,
                  extra=(), env=None) -> subprocess.Popen:
    """`revpers serve` on ``ports`` (gRPC, HTTP, metrics, health) with no bind option (the default)."""
    pythonpath = os.pathsep.join(str(p) for p in (REPO_ROOT, probe_dir) if p)
    env = dict(os.environ, REVPERS_CACHE_DIR=str(cache_dir), PYTHONPATH=pythonpath, **(env or {}))
    cmd = [
        sys.executable, "-m", "revpers.launcher.serve", "--repository", str(repo),
        "--grpc-port", str(ports[0]), "--http-port", str(ports[1]), "--metrics-port", str(ports[2]),
        "--health-port", str(ports[3]), *extra,
    ]
    with open(log, "wb") as err:
        return subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)


def _server_log(serve_stderr: Path) -> Path:
    """The tritonserver log file that `revpers serve` names on stderr."""
    m = re.search(r"starting tritonserver on .* \(log (.+)\)", serve_stderr.read_text(errors="replace"))
    assert m, serve_stderr.read_text(errors="replace")[-2000:]
    return Path(m.group(1))


def _wait_serving(proc: subprocess.Popen, log: Path, timeout: float = 60) -> int:
    """Waits for serve's 'ready' report; returns the tritonserver pid it names."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")
        m = re.search(r"tritonserver ready in [\d.]+ s \(pid (\d+)\)", text)
        if m and "models READY" in text:
            return int(m.group(1))
        assert proc.poll() is None, f"serve exited early ({proc.returncode}):\n{text[-3000:]}"
        time.sleep(0.1)
    proc.kill()
    pytest.fail(f"serve not ready in {timeout} s:\n{log.read_text(errors='replace')[-3000:]}")


@pytest.mark.server
def test_serve_stops_cleanly_on_sigterm(install, cache_dir, good_repo, probe_dir, tmp_path):
    ports = free_ports(4)
    log = tmp_path / "serve.log"
    proc = _launch_serve(good_repo, ports, cache_dir, log, probe_dir)
    try:
        server_pid = _wait_serving(proc, log)
        text = log.read_text()
        assert "models READY: echo (v1), echo_bls (v1)" in text
        assert f"gRPC     127.0.0.1:{ports[0]}" in text and f"http://127.0.0.1:{ports[2]}/metrics" in text
        deadline = time.monotonic() + 10  # the server log is streamed to stderr (a follower thread)
        while "successfully loaded 'echo'" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert "successfully loaded 'echo'" in log.read_text()
        assert _get(f"http://127.0.0.1:{ports[1]}/v2/health/ready")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _group_gone(server_pid)
    assert "stopped" in log.read_text()
    assert not _server_log(log).exists()  # serve's own temp log goes after a clean stop
    for port in ports:
        assert not port_in_use(port, "127.0.0.1"), port


@pytest.mark.server
def test_serve_exits_nonzero_when_the_server_dies(install, cache_dir, good_repo, probe_dir, tmp_path):
    ports = free_ports(4)
    log = tmp_path / "serve.log"
    proc = _launch_serve(good_repo, ports, cache_dir, log, probe_dir)
    try:
        server_pid = _wait_serving(proc, log)
        os.kill(server_pid, signal.SIGKILL)
        assert proc.wait(timeout=15) == 1
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "killed by signal 9 while serving" in log.read_text()
    assert _server_log(log).is_file()  # kept for the post-mortem
    assert _group_gone(server_pid)  # the orphaned model stubs were cleaned up too


@pytest.mark.server
def test_server_goes_away_when_its_python_process_is_killed(install, cache_dir, good_repo, probe_dir, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from revpers.launcher import TritonServer, free_ports
        server = TritonServer({str(good_repo)!r}, *free_ports(3), cache_dir={str(cache_dir)!r}).start()
        print(server.pid, flush=True)
        time.sleep(120)
    """)
    env = dict(os.environ, PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{probe_dir}")
    owner = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    server_pid = None
    try:
        line = owner.stdout.readline()
        assert line.strip().isdigit(), f"owner failed (rc {owner.poll()})"
        server_pid = int(line)
        assert not _group_gone(server_pid, wait=0)
        owner.kill()  # SIGKILL: no atexit, no stop(); the kernel's parent-death signal must do it
        owner.wait(timeout=5)
        deadline = time.monotonic() + 20
        while not _group_gone(server_pid, wait=0) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _group_gone(server_pid, wait=0), "tritonserver outlived the process that started it"
    finally:
        if owner.poll() is None:
            owner.kill()
        if server_pid is not None and not _group_gone(server_pid, wait=0):
            os.killpg(server_pid, signal.SIGKILL)
