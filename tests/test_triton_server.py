"""revpers.serving.launcher: finding tritonserver, the Python-backend directory, and running a real
server (Python backend, BLS, gRPC, health, metrics, clean stop, failed loads, `revpers serve`)."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import real_photo

from revpers.service.images import encode_image
from revpers.serving.launcher import (
    PortInUseError,
    Security,
    ServerUsageError,
    TritonInstall,
    TritonNotFoundError,
    TritonServer,
    TritonServerError,
    find_tritonserver,
    free_ports,
    port_in_use,
    prepare_backend_dir,
)
from revpers.serving.launcher import install as launcher_install
from revpers.serving.launcher.serve import add_serve_arguments, run_serve
from revpers.serving.launcher.supervise import in_flight
from revpers_client.protocol import (
    ADMIN_KEY_HEADER,
    API_KEY_HEADER,
    GRPC_HEADER_PREFIX,
    MODEL,
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
        import revpers.serving.launcher.process  # noqa: F401  (fails the load if the path is wrong)
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
    assert (install.binary, install.kind, install.backends_dir, install.version) == (
        binary,
        "system",
        root / "backends",
        "2.99.0",
    )
    assert install.lib_dir is None
    assert prepare_backend_dir(install, tmp_path / "cache") == root / "backends"  # used as is

    monkeypatch.setenv("REVPERS_TRITONSERVER", str(tmp_path / "nope" / "tritonserver"))
    with pytest.raises(TritonNotFoundError, match="REVPERS_TRITONSERVER"):
        find_tritonserver()


def test_find_tritonserver_missing_names_the_server_extra(monkeypatch, tmp_path):
    monkeypatch.delenv("REVPERS_TRITONSERVER", raising=False)
    real_find_spec = launcher_install.importlib.util.find_spec
    monkeypatch.setattr(
        launcher_install.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "pytriton" else real_find_spec(name, *a),
    )
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
        server = TritonServer(
            tmp_path / "models", grpc_port=grpc, http_port=busy, metrics_port=metrics, install=install
        )
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


def _crashing_first(install, tmp_path, how: str):
    """``install`` with its binary behind a wrapper that, on its first run only, ends as ``how``
    says (fault injection around the real tritonserver: the crash seen once in CI cannot be
    provoked), counting its runs in a file."""
    tmp_path.mkdir()
    runs, mark = tmp_path / "runs", tmp_path / "crashed"
    wrapper = tmp_path / "tritonserver"
    wrapper.write_text(
        f'#!/bin/sh\necho run >> {runs}\nif [ ! -e {mark} ]; then touch {mark}; {how}; fi\nexec {install.binary} "$@"\n'
    )
    wrapper.chmod(0o755)
    return dataclasses.replace(install, binary=wrapper), runs


@pytest.mark.server
def test_start_retries_once_after_a_crash_while_starting(install, cache_dir, good_repo, probe_dir, tmp_path, caplog):
    """A server killed by SIGABRT while starting (gRPC aborted once at start in CI) is started once
    more and serves; one that exits with an error code is reported at once, not started again."""
    crashing, runs = _crashing_first(install, tmp_path / "abrt", "kill -ABRT $$")
    env = {"PYTHONPATH": str(probe_dir)}
    server = TritonServer(good_repo, *free_ports(3), install=crashing, cache_dir=cache_dir, env=env)
    with caplog.at_level(logging.WARNING, logger="revpers.serving.launcher"):
        server.start(timeout=120)
    try:
        assert server.is_ready() and runs.read_text().count("run") == 2
        assert "killed by signal 6 while starting; starting it once more" in caplog.text
    finally:
        assert server.stop() == 0

    failing, runs = _crashing_first(install, tmp_path / "exit", "exit 3")
    server = TritonServer(good_repo, *free_ports(3), install=failing, cache_dir=cache_dir, env=env)
    with pytest.raises(TritonServerError, match="exited with code 3 while starting"):
        server.start(timeout=60)
    assert runs.read_text().count("run") == 1


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


def _launch_serve(
    repo: Path, ports, cache_dir: Path, log: Path, probe_dir: Path | None = None, extra=(), env=None
) -> subprocess.Popen:
    """`revpers serve` on ``ports`` (gRPC, HTTP, metrics, health) with no bind option (the default)."""
    pythonpath = os.pathsep.join(str(p) for p in (REPO_ROOT, probe_dir) if p)
    env = dict(os.environ, REVPERS_CACHE_DIR=str(cache_dir), PYTHONPATH=pythonpath, **(env or {}))
    cmd = [
        sys.executable,
        "-m",
        "revpers.serving.launcher.serve",
        "--repository",
        str(repo),
        "--grpc-port",
        str(ports[0]),
        "--http-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--health-port",
        str(ports[3]),
        *extra,
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
        from revpers.serving.launcher import TritonServer, free_ports
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


# --------------------------------------------------------------------------- production serving (issue 14)
# `revpers serve` on the tiny models of tests/launcher_models: `front` (the entry, a BLS that keeps the
# drain contract) calls `work`. Server-side facts these tests rely on: /work/shared/reference/triton-ops.md.

LAUNCHER_MODELS = Path(__file__).resolve().parent / "launcher_models"


def test_security_arguments_use_the_colon_form_and_split_inference_from_admin():
    sec = Security(
        api_key="k1", admin_key="k2", tls_cert=Path("/c.pem"), tls_key=Path("/k.pem"), tls_ca=Path("/ca.pem")
    )
    args = sec.arguments()
    assert "--grpc-restricted-protocol=inference:x-api-key=k1" in args
    assert "--http-restricted-api=inference:x-api-key=k1" in args
    admin = "shared-memory,model-config,model-repository,statistics,trace,logging:x-admin-key=k2"
    assert f"--grpc-restricted-protocol={admin}" in args and f"--http-restricted-api={admin}" in args
    assert {
        "--grpc-use-ssl=true",
        "--grpc-server-cert=/c.pem",
        "--grpc-server-key=/k.pem",
        "--grpc-use-ssl-mutual=true",
        "--grpc-root-cert=/ca.pem",
    } <= set(args)
    assert Security().arguments() == []
    assert sec.redact("a k1 b k2") == "a *** b ***"


@pytest.mark.parametrize(
    "sec, message",
    [
        (Security(tls_cert=Path("/c.pem")), "--tls-cert and --tls-key go together"),
        (Security(tls_ca=Path("/ca.pem")), "needs --tls-cert"),
        (Security(api_key="a:b"), "API key must be"),
        (Security(admin_key=""), "admin key must be"),
    ],
)
def test_security_check_refuses_unusable_settings(sec, message):
    with pytest.raises(ServerUsageError, match=message):
        sec.check()


def test_serve_usage_errors_are_one_line_and_exit_2(tmp_path, capsys):
    parser = add_serve_arguments(argparse.ArgumentParser())
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    for argv, message in [
        (
            ["--repository", str(tmp_path), "--api-key-file", str(tmp_path / "missing.key")],
            "cannot read the API key file",
        ),
        (["--repository", str(tmp_path), "--admin-key-file", str(empty)], "admin key file .* is empty"),
        (
            ["--repository", str(tmp_path), "--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(empty)],
            "no such file",
        ),
    ]:
        assert run_serve(parser.parse_args(argv)) == 2
        err = capsys.readouterr().err
        assert re.search(message, err) and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_in_flight_sums_the_gauge_and_tells_absence():
    page = (
        '# HELP revpers_requests_in_flight x\nrevpers_requests_in_flight{model="a"} 2\n'
        'revpers_requests_in_flight{model="b"} 1\nrevpers_requests_in_flight_other 7\n'
    )
    assert in_flight(page) == 3
    assert in_flight('nv_inference_count{model="a"} 4\n') is None
    page = 'revpers_requests_in_flight{instance="front_0_0"} 2\nrevpers_requests_in_flight{instance="front_0_1"} 1\n'
    assert in_flight(page, instance="front_0_1") == 1
    assert in_flight(page, instance="front_0") is None  # a label value, not a prefix


@pytest.fixture()
def front_repo(tmp_path):
    repo = tmp_path / "models"
    shutil.copytree(LAUNCHER_MODELS, repo, ignore=shutil.ignore_patterns("__pycache__"))
    return repo


def _stub(repo: Path, model: str) -> tuple[int, str]:
    """(pid, shm region) of the live stub of ``model`` (its argv: stub, model.py, shm region, ...)."""
    for pid in _processes_mentioning(str(repo / model / "1" / "model.py")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if argv[0].endswith(b"triton_python_backend_stub") and state != "Z":
            return pid, argv[2].decode()
    raise AssertionError(f"no live stub of {model}")


def _shm_left(regions) -> list[str]:
    return [r for r in regions if (Path("/dev/shm") / r).exists()]


def _status(url: str) -> int:
    try:
        return _get(url, timeout=2)[0]
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return -1


class _HealthWatch(threading.Thread):
    """Polls serve's /readyz and /livez every 20 ms: [(t, ready status, live status)]."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.base, self.seen, self.done = f"http://127.0.0.1:{port}", [], threading.Event()

    def run(self):
        while not self.done.is_set():
            self.seen.append((time.monotonic(), _status(f"{self.base}/readyz"), _status(f"{self.base}/livez")))
            time.sleep(0.02)

    def between(self, t0: float, t1: float) -> list[tuple]:
        return [s for s in self.seen if t0 <= s[0] <= t1]


def _retryable(exc) -> bool:
    """What a client retries while a server recovers: UNAVAILABLE, NOT_FOUND, the INTERNAL
    "Stub process ... is not healthy" that Triton gives a request already in the dead stub, and
    DEADLINE_EXCEEDED (a request that was inside a dead stub answering through its response sender
    gets no answer at all)."""
    return (
        exc.status() in ("StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "StatusCode.DEADLINE_EXCEEDED")
        or "is not healthy" in exc.message()
    )


def _front(client, value: float, headers=None, timeout: float | None = None):
    grpc = pytest.importorskip("tritonclient.grpc")
    inp = grpc.InferInput("INPUT0", [1, 1], "FP32")
    inp.set_data_from_numpy(np.array([[value]], dtype=np.float32))
    return float(client.infer("front", [inp], headers=headers, client_timeout=timeout).as_numpy("OUTPUT0")[0, 0])


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = predicate()
        if got:
            return got
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}")


def _stop_serve(proc: subprocess.Popen, log: Path, timeout: float = 60) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"serve did not stop:\n{log.read_text(errors='replace')[-3000:]}")


_RELOADED = r"stub {instance} \(pid {pid}\) died; reloaded model '{model}'; serving again ([\d.]+) s"
_RESTARTED = r"stub {instance} \(pid {pid}\) died; restarted tritonserver \(pid \d+\)[^;]*; serving again ([\d.]+) s"
# an entry stub that held a request is recovered by a restart, any other by a reload
_RECOVERED = (
    r"stub {instance} \(pid {pid}\) died; (?:reloaded model '{model}'|restarted tritonserver \(pid \d+\)[^;]*); "
    r"serving again ([\d.]+) s"
)


@pytest.mark.server
def test_serve_recovers_a_killed_stub_of_any_model(install, cache_dir, front_repo, tmp_path):
    """kill -9 of the component stub, then of the entry (BLS) stub, under a steady stream of requests
    from a client that retries: readiness and liveness go false while recovering, the model is
    reloaded, no request fails, the dead stubs' shm files are gone and SIGTERM still exits 0."""
    from tritonclient.grpc import InferenceServerClient
    from tritonclient.utils import InferenceServerException

    ATTEMPT_S = 10.0  # noqa: N806 (per-attempt deadline; a request served takes milliseconds)
    ports = free_ports(4)
    log = tmp_path / "serve.log"
    proc = _launch_serve(front_repo, ports, cache_dir, log, extra=["--entry-model", "front", "--quiet"])
    client = InferenceServerClient(f"127.0.0.1:{ports[0]}")
    watch = _HealthWatch(ports[3])
    done, failures, retried, ok_at = threading.Event(), [], [], []

    def steady():
        while not done.is_set():
            sent = time.monotonic()
            for _ in range(600):  # one request, retried every 50 ms for up to 30 s
                try:
                    assert _front(client, 0.0, timeout=ATTEMPT_S) == 2.0
                    ok_at.append((sent, time.monotonic()))
                    break
                except InferenceServerException as exc:
                    if not _retryable(exc):
                        failures.append(f"{exc.status()}: {exc.message()}")
                        break
                    retried.append(exc.status())
                    time.sleep(0.05)
            time.sleep(0.02)

    load = threading.Thread(target=steady, daemon=True)
    try:
        _wait_serving(proc, log)
        watch.start()
        load.start()
        _wait_for(lambda: len(ok_at) >= 3, 30, "requests before the kill")
        assert failures == []
        figures = []
        for model in ("work", "front"):
            pid, region = _stub(front_repo, model)
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            line = _wait_for(
                lambda: re.search(
                    _RECOVERED.format(instance=f"{model}_0_0", pid=pid, model=model), log.read_text(errors="replace")
                ),
                60,
                f"the recovery of {model}",
            )
            t_line = time.monotonic()
            _wait_for(  # the request in flight may have been inside the dead stub: one deadline more
                lambda: any(sent > t_line for sent, _ in ok_at),
                30 + ATTEMPT_S,
                f"a request sent after {model} recovered served (failures {failures}, last retries {retried[-5:]})",
            )
            first_ok = min(t for sent, t in ok_at if sent > t_kill)  # of the requests sent after the kill
            during = watch.between(t_kill, t_line)
            assert any(r == 503 for _, r, _ in during), f"/readyz never 503 while {model} was recovering"
            assert any(lv == 503 for _, _, lv in during), f"/livez never 503 while {model}'s stub was dead"
            assert _status(f"http://127.0.0.1:{ports[3]}/readyz") == 200
            assert _status(f"http://127.0.0.1:{ports[3]}/livez") == 200
            assert _shm_left([region]) == []  # the dead stub's region was removed
            assert _stub(front_repo, model)[0] != pid  # a new stub serves
            how = "restarted the server" if "restarted tritonserver" in line.group(0) else "reloaded"
            figures.append(
                f"{model}: {how}, serving {float(line.group(1)):.2f} s after the death was seen; "
                f"kill -> first request sent after it served {first_ok - t_kill:.2f} s"
            )
        done.set()
        load.join(timeout=60)
        print("\n" + "\n".join(figures) + f"\nretried {len(retried)} times: {sorted(set(retried))}; ok {len(ok_at)}")
        assert failures == []
        regions = [_stub(front_repo, m)[1] for m in ("work", "front")]
        assert _stop_serve(proc, log) == 0, log.read_text()[-3000:]
        assert _shm_left(regions) == []
    finally:
        done.set()
        watch.done.set()
        client.close()
        if proc.poll() is None:
            proc.kill()


@pytest.mark.server
def test_a_request_inside_a_killed_entry_stub_gets_its_answer_from_a_restart(install, cache_dir, front_repo, tmp_path):
    """kill -9 of the entry stub while a request is inside it (answered through its response sender,
    as the revpers BLS answers; Triton gives such a request no answer until the server ends): the
    supervisor counts it and restarts tritonserver (as for any entry stub's death), so it ends at
    once with UNAVAILABLE, which clients retry. A second such death within the restart window is
    reloaded instead (no restart loop): its request waits, the reloaded gauge starts at 0 (the dead
    stub's 1 used to hold the drain for its whole timeout), and SIGTERM still stops well within the
    drain timeout, exit 0."""
    from tritonclient.grpc import InferenceServerClient
    from tritonclient.utils import InferenceServerException

    ports = free_ports(4)
    log = tmp_path / "serve.log"
    drain_timeout = 240
    proc = _launch_serve(
        front_repo, ports, cache_dir, log, extra=["--entry-model", "front", "--drain-timeout", str(drain_timeout)]
    )
    client = InferenceServerClient(f"127.0.0.1:{ports[0]}")

    def slow(outcome: list):  # 60 s inside front: it is there when the stub is killed
        t0 = time.monotonic()
        try:
            outcome.append(("ok", _front(client, 60.0), time.monotonic() - t0))
        except InferenceServerException as exc:
            outcome.append(("error", exc, time.monotonic() - t0))

    def kill_with_one_inside(outcome: list) -> tuple[int, str, threading.Thread]:
        caller = threading.Thread(target=slow, args=(outcome,), daemon=True)
        caller.start()
        _wait_for(lambda: _gauge(ports[2]) == 1, 30, "the request inside front")
        time.sleep(1.5)  # the supervisor reads the gauge every 0.5 s: it has seen the request
        pid, _ = _stub(front_repo, "front")
        os.kill(pid, signal.SIGKILL)
        pattern = _RECOVERED.format(instance="front_0_0", pid=pid, model="front")
        text = _wait_for(
            lambda: (t := log.read_text(errors="replace")) and re.search(pattern, t) and t, 120, "the recovery"
        )
        assert re.search(rf"stub front_0_0 \(pid {pid}\) died with 1 request inside", text), text[-2000:]
        return pid, text, caller

    try:
        _wait_serving(proc, log)
        first: list = []
        pid, text, caller = kill_with_one_inside(first)
        line = re.search(_RESTARTED.format(instance="front_0_0", pid=pid), text)
        assert line, text[-2000:]
        caller.join(timeout=30)
        kind, value, seconds = first[0]
        assert kind == "error" and _retryable(value), first
        assert value.status() == "StatusCode.UNAVAILABLE" and seconds < 60, first
        assert _front(client, 0.0, timeout=30) == 2.0  # the restarted server serves

        second: list = []
        pid, text, caller = kill_with_one_inside(second)
        assert re.search(_RELOADED.format(instance="front_0_0", pid=pid, model="front"), text), text[-2000:]
        assert "not restarting tritonserver again within" in text
        assert caller.is_alive() and second == []  # reloaded: that request has no answer yet
        assert _gauge(ports[2]) == 0  # no request was sent after the reload: the count restarted
        t_stop = time.monotonic()
        assert _stop_serve(proc, log, timeout=drain_timeout) == 0, log.read_text()[-3000:]
        stop_s = time.monotonic() - t_stop
        caller.join(timeout=30)
        assert second and second[0][0] == "error" and _retryable(second[0][1]), second
        print(
            f"\nrestart: the request inside got {value.status()} {seconds:.1f} s after it was sent, "
            f"serving again {float(line.group(1)):.2f} s after the death was seen; after the reload "
            f"stop took {stop_s:.1f} s (drain timeout {drain_timeout} s)"
        )
        # the drain must not have waited for the dead stub's request (it held it for the full timeout)
        assert stop_s < drain_timeout / 2, log.read_text()[-3000:]
        final = log.read_text(errors="replace")
        if "did not exit by itself" in final:  # the dead stub's version stays UNLOADING: serve names the loss
            assert "1 request(s) inside the dead stubs got no answer" in final, final[-2000:]
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()


def _gauge(metrics_port: int) -> float | None:
    try:
        return in_flight(_get(f"http://127.0.0.1:{metrics_port}/metrics")[1].decode())
    except OSError:
        return None


@pytest.mark.server
def test_sigterm_drains_four_requests_in_flight(install, cache_dir, front_repo, tmp_path):
    """SIGTERM with 4 requests running in the entry model (each still has its child call to make):
    readiness goes false, a new request gets UNAVAILABLE, the 4 complete, serve exits 0 and the
    stubs' shm files are gone."""
    from tritonclient.grpc import InferenceServerClient
    from tritonclient.utils import InferenceServerException

    gate = tmp_path / "release-front"
    ports = free_ports(4)
    log = tmp_path / "serve.log"
    proc = _launch_serve(
        front_repo,
        ports,
        cache_dir,
        log,
        extra=["--entry-model", "front", "--drain-timeout", "120"],
        env={"FRONT_GATE_FILE": str(gate)},
    )
    client = InferenceServerClient(f"127.0.0.1:{ports[0]}")
    results: list = []
    try:
        server_pid = _wait_serving(proc, log)
        regions = [_stub(front_repo, m)[1] for m in ("front", "work")]

        def one():
            try:
                results.append(_front(client, -1.0))
            except InferenceServerException as exc:
                results.append(f"{exc.status()}: {exc.message()}")

        threads = [threading.Thread(target=one) for _ in range(4)]
        for t in threads:
            t.start()
        _wait_for(lambda: _gauge(ports[2]) == 4, 30, "4 requests executing in front")
        proc.send_signal(signal.SIGTERM)
        _wait_for(lambda: _status(f"http://127.0.0.1:{ports[3]}/readyz") == 503, 10, "/readyz 503 after SIGTERM")
        with pytest.raises(InferenceServerException) as refused:
            _front(client, 0.0)
        assert refused.value.status() == "StatusCode.UNAVAILABLE" and "draining" in refused.value.message()
        assert proc.poll() is None and results == []  # still waiting for the 4
        gate.touch()
        for t in threads:
            t.join(timeout=60)
        assert results == [0.0] * 4, results  # (-1 + 1) * 2 each
        assert proc.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()
    assert "SIGTERM received: draining" in text and "drain finished" in text and "stopped" in text
    assert _group_gone(server_pid)
    assert _shm_left(regions) == []


def _listeners(port: int) -> list[str]:
    """Local addresses listening on ``port``, from /proc/net/tcp and tcp6."""
    out = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state = fields[1], fields[3]
                addr_hex, port_hex = local.split(":")
                if state != "0A" or int(port_hex, 16) != port:
                    continue
                raw = bytes.fromhex(addr_hex)
                if len(raw) == 4:
                    out.append(str(ipaddress.IPv4Address(raw[::-1])))
                else:  # four little-endian 32-bit words
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                    a6 = ipaddress.IPv6Address(words)
                    out.append(str(a6.ipv4_mapped or a6))
    return out


def _outward_address() -> str | None:
    """A non-loopback address of this machine (the one it would route out from), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 9))  # UDP connect: no packet is sent
            addr = s.getsockname()[0]
        except OSError:
            return None
    return None if ipaddress.ip_address(addr).is_loopback else addr


@pytest.mark.server
def test_serve_binds_loopback_by_default_prints_its_ready_line_quietly_and_closes_admin_apis(
    install, cache_dir, front_repo, tmp_path
):
    """`revpers serve --quiet` through the CLI (whose root logger is at WARNING): its ready line still
    prints; every port listens on 127.0.0.1 only; with no admin key given the admin APIs are shut."""
    from tritonclient.grpc import InferenceServerClient
    from tritonclient.utils import InferenceServerException

    ports = free_ports(4)
    log = tmp_path / "serve.log"
    env = dict(os.environ, REVPERS_CACHE_DIR=str(cache_dir), PYTHONPATH=str(REPO_ROOT))
    env.pop("REVPERS_ADMIN_KEY", None)
    env.pop("REVPERS_API_KEY", None)
    cmd = [
        sys.executable,
        "-m",
        "revpers.cli",
        "serve",
        "--repository",
        str(front_repo),
        "--quiet",
        "--entry-model",
        "front",
        "--grpc-port",
        str(ports[0]),
        "--http-port",
        str(ports[1]),
        "--metrics-port",
        str(ports[2]),
        "--health-port",
        str(ports[3]),
    ]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    client = InferenceServerClient(f"127.0.0.1:{ports[0]}")
    try:
        _wait_serving(proc, log)
        text = log.read_text()
        assert re.search(
            rf"ready: grpc 127\.0\.0\.1:{ports[0]}, http http://127\.0\.0\.1:{ports[1]}, "
            rf"metrics http://127\.0\.0\.1:{ports[2]}/metrics, health http://127\.0\.0\.1:{ports[3]}/readyz",
            text,
        ), text
        assert "successfully loaded" not in text  # --quiet: the server log is not streamed
        for port in ports:
            found = _listeners(port)
            assert found and all(ipaddress.ip_address(a).is_loopback for a in found), (port, found)
        outward = _outward_address()
        if outward is not None:
            for port in ports:
                with socket.socket() as s, pytest.raises(OSError):
                    s.settimeout(2)
                    s.connect((outward, port))
        else:
            print("no non-loopback address on this machine: connect check skipped")
        assert _front(client, 0.0) == 2.0  # inference is open (no API key given)
        status, _ = _post_status(f"http://127.0.0.1:{ports[1]}/v2/repository/index")
        assert status == 403  # model-repository needs the (random) admin key
        with pytest.raises(InferenceServerException, match="restricted"):
            client.get_model_config("front")
        assert _stop_serve(proc, log) == 0, log.read_text()[-3000:]
    finally:
        client.close()
        if proc.poll() is None:
            proc.kill()


def _post_status(url: str, headers=None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=b"{}", method="POST", headers=dict(headers or {}))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _openssl(*args, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_certs(d: Path) -> None:
    """ca.pem (+ server.pem/key signed by it, for 127.0.0.1 and localhost; client.pem/key) and an
    unrelated other-ca.pem."""
    d.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        _openssl(
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN=revpers test {ca}",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            cwd=d,
        )
    (d / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for who in ("server", "client"):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN=revpers test {who}",
            "-keyout",
            f"{who}.key",
            "-out",
            f"{who}.csr",
            cwd=d,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{who}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{who}.ext",
            "-out",
            f"{who}.pem",
            cwd=d,
        )


@pytest.mark.server
def test_grpc_mutual_tls_and_api_keys(install, cache_dir, front_repo, tmp_path):
    """gRPC with mutual TLS, an API key for inference (from the environment) and an admin key (from
    a file): no key -> refused, the key -> served, no CA / wrong CA / no client certificate ->
    refused; admin APIs need the admin key on gRPC and HTTP; neither key is in tritonserver's argv
    or in anything serve prints."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    from tritonclient.grpc import InferenceServerClient
    from tritonclient.utils import InferenceServerException

    certs = tmp_path / "certs"
    _make_certs(certs)
    api_key, admin_key = "api-" + os.urandom(12).hex(), "adm-" + os.urandom(12).hex()
    (tmp_path / "admin.key").write_text(admin_key + "\n")
    ports = free_ports(4)
    log = tmp_path / "serve.log"
    proc = _launch_serve(
        front_repo,
        ports,
        cache_dir,
        log,
        env={"REVPERS_API_KEY": api_key},
        extra=[
            "--entry-model",
            "front",
            "--admin-key-file",
            str(tmp_path / "admin.key"),
            "--tls-cert",
            str(certs / "server.pem"),
            "--tls-key",
            str(certs / "server.key"),
            "--tls-ca",
            str(certs / "ca.pem"),
        ],
    )
    url = f"127.0.0.1:{ports[0]}"

    def tls_client(ca="ca.pem", cert=True):
        return InferenceServerClient(
            url,
            ssl=True,
            root_certificates=str(certs / ca) if ca else None,
            private_key=str(certs / "client.key") if cert else None,
            certificate_chain=str(certs / "client.pem") if cert else None,
        )

    key = {GRPC_HEADER_PREFIX + API_KEY_HEADER: api_key}
    admin = {GRPC_HEADER_PREFIX + ADMIN_KEY_HEADER: admin_key}
    try:
        server_pid = _wait_serving(proc, log)
        good = tls_client()
        assert _front(good, 1.0, headers=key) == 4.0
        with pytest.raises(InferenceServerException, match="restricted"):
            _front(good, 1.0)
        with pytest.raises(InferenceServerException, match="restricted"):
            _front(good, 1.0, headers={GRPC_HEADER_PREFIX + API_KEY_HEADER: "wrong"})
        for name, bad in [
            ("no CA", tls_client(ca=None)),
            ("wrong CA", tls_client(ca="other-ca.pem")),
            ("no client certificate", tls_client(cert=False)),
            ("plaintext", InferenceServerClient(url)),
        ]:
            with pytest.raises(InferenceServerException) as info:
                _front(bad, 1.0, headers=key)
            assert info.value.status() == "StatusCode.UNAVAILABLE", (name, info.value)
            bad.close()
        with pytest.raises(InferenceServerException, match="restricted"):
            good.get_model_config("front", headers=key)
        assert good.get_model_config("front", headers=admin, as_json=True)["config"]["name"] == "front"
        http = f"http://127.0.0.1:{ports[1]}"
        assert _post_status(f"{http}/v2/repository/index")[0] == 403
        assert _post_status(f"{http}/v2/repository/index", {API_KEY_HEADER: api_key})[0] == 403
        assert _post_status(f"{http}/v2/repository/index", {ADMIN_KEY_HEADER: admin_key})[0] == 200
        infer_body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 1], "datatype": "FP32", "data": [1.0]}]})
        req = f"{http}/v2/models/front/infer"
        assert _post_status(req)[0] == 403
        r = urllib.request.Request(req, data=infer_body.encode(), method="POST", headers={API_KEY_HEADER: api_key})
        with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(r, timeout=10) as resp:
            assert json.loads(resp.read())["outputs"][0]["data"] == [4.0]
        cmdline = Path(f"/proc/{server_pid}/cmdline").read_bytes()
        assert b"--grpc-restricted-protocol=inference:x-api-key=" in cmdline  # the option is there ...
        assert api_key.encode() not in cmdline and admin_key.encode() not in cmdline  # ... its key is not
        good.close()
        assert _stop_serve(proc, log) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    text = log.read_text()  # serve's lines and the streamed server log
    assert api_key not in text and admin_key not in text
    assert "mutual TLS; inference needs the API key" in text


@pytest.mark.server
def test_real_repository_client_run_survives_killed_revpers_and_unet_stubs(install, onnxruntime_repository, tmp_path):
    """As a user would see it: `revpers-client anonymize` with default retry options, 20 photos against
    the smoke bundle's real repository while the `revpers` BLS stub, then the `unet` stub, are killed
    (kill -9) mid-run: every image gets its output and report and none fails (the requests inside the
    dead BLS stub are answered by the server's restart, UNAVAILABLE, and resent); the dead stubs'
    shm files are gone and serve exits 0 on SIGTERM."""
    n = 20
    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    data = encode_image(real_photo(), "PNG")
    for k in range(n):
        (src / f"photo{k:02d}.png").write_bytes(data)
    # a private copy: stubs are found by their model.py path, and the session's shared server serves
    # the shared repository (its stubs must be neither found nor killed here)
    repo = tmp_path / "repo"
    shutil.copytree(onnxruntime_repository, repo, symlinks=True)
    ports = free_ports(4)
    log = tmp_path / "serve.log"
    proc = _launch_serve(repo, ports, tmp_path / "cache", log, extra=["--quiet"])
    cmd = [sys.executable, "-m", "revpers_client.cli", "anonymize", str(src), "-o", str(out)]
    cmd += ["--url", f"127.0.0.1:{ports[0]}", "--mode", "aligned", "--steps", "3", "--seed", "1"]
    cmd += ["--concurrency", "2"]  # timeouts and retries: the defaults
    cmd += ["--progress", "none", "-v"]
    client_log = tmp_path / "client.log"
    run = None

    def reports() -> int:
        return len(list(out.glob("*.png.json")))

    try:
        _wait_serving(proc, log, timeout=300)
        with open(client_log, "wb") as sink:
            run = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=sink, stderr=subprocess.STDOUT)
        figures, lost = [], 0
        for model, after in ((MODEL, 3), ("unet", 3)):
            start = reports()
            _wait_for(lambda: reports() >= start + after or run.poll() is not None, 300, f"{after} images")
            assert run.poll() is None, f"the run ended before {model} was killed:\n{client_log.read_text()}"
            pid, region = _stub(repo, model)
            t_kill = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            line = _wait_for(
                lambda: re.search(
                    _RECOVERED.format(instance=rf"{model}_\d+_\d+", pid=pid, model=model),
                    log.read_text(errors="replace"),
                ),
                300,  # a reload of the BLS takes 7 s on a quiet 2-core machine, over a minute on a loaded one
                f"the recovery of {model}",
            )
            assert _shm_left([region]) == []
            inside = re.search(rf"\(pid {pid}\) died with (\d+) request", log.read_text(errors="replace"))
            lost += int(inside.group(1)) if inside else 0
            how = "restarted" if "restarted tritonserver" in line.group(0) else "reloaded"
            figures.append(
                f"{model}: killed with {reports()} of {n} done; {how}, serving {float(line.group(1)):.2f} s after "
                f"the death was seen, {time.monotonic() - t_kill:.1f} s after the kill"
            )
        assert run.wait(timeout=300) in (0, 1), client_log.read_text()
        summary = json.loads((out / "run-summary.json").read_text())
        counts = summary["counts"]
        text = client_log.read_text()
        print(
            "\n" + "\n".join(figures) + f"\nrequests inside a dead stub: {lost}; counts {counts}; "
            f"retries {summary['retries']}; wall {summary['wall_s']:.1f} s"
        )
        assert counts["failed"] == 0 and counts["not_done"] == 0, text
        assert counts["ok"] + counts["review"] == n and reports() == n
        assert len(list(out.glob("*.png"))) == n  # every image was released (ok or listed for review)
        assert run.returncode == (1 if counts["review"] else 0)
        assert "Traceback" not in text
        assert _stop_serve(proc, log, timeout=120) == 0, log.read_text()[-3000:]
    finally:
        if run is not None and run.poll() is None:
            run.kill()
        if proc.poll() is None:
            proc.kill()
