"""`pip install <checkout>` into a fresh virtual environment, used from outside the checkout: the
wheel carries the Triton model templates and the protocol module, installs no generic top-level
package, and its `revpers` command builds a smoke bundle, a pytorch repository and serves a request.

The fresh venv gets this environment's third-party packages through a .pth line (so the test does
not download torch again); revpers itself is installed there from the checkout, not linked to it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from revpers.faces.samples import insightface_photo
from revpers_client import RevpersClient
from tests.schema import validate_report

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.server, pytest.mark.slow]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fresh")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    site = next((venv / "lib").glob("python3*/site-packages"))
    deps = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
    (site / "revpers-test-deps.pth").write_text(f"{deps}\n")
    # the wheel is built by this environment's setuptools (the fresh venv's bundled one is older);
    # the fresh venv's own pip installs it
    wheels = tmp / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            str(next(wheels.glob("revpers-*.whl"))),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return tmp, venv, site


def test_the_wheel_installs_only_specific_names_and_carries_the_templates(fresh_venv):
    tmp, venv, site = fresh_venv
    top = sorted(p.name for p in site.iterdir() if p.is_dir() and not p.name.endswith((".dist-info", "__pycache__")))
    assert "revpers" in top and "revpers_client" in top
    assert not {"client", "export", "model_repository", "benchmarks", "tests", "tools"} & set(top), top
    templates = sorted(p.relative_to(site).as_posix() for p in (site / "revpers").rglob("model.py"))
    assert templates == [
        "revpers/serving/model_repository/_python_component/model.py",
        "revpers/serving/model_repository/revpers/model.py",
    ]
    code = "import revpers, revpers_client.protocol; print(revpers.__file__)"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, cwd=tmp, check=True
    )
    assert out.stdout.strip().startswith(str(site)), out.stdout


def test_installed_revpers_builds_a_repository_and_serves_a_request(fresh_venv):
    tmp, venv, _ = fresh_venv
    revpers = str(venv / "bin" / "revpers")
    env = {**os.environ, "PYTHONPATH": ""}
    bundle, repo = tmp / "bundle", tmp / "repo"
    for args in (
        ["smoke-model", str(bundle)],
        ["repository", "--models", str(bundle), "--backend", "pytorch", "--out", str(repo), "--bls-instances", "1"],
    ):
        proc = subprocess.run([revpers, *args], capture_output=True, text=True, cwd=tmp, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not any(str(ROOT) in p.read_text() for p in repo.rglob("config.pbtxt"))  # nothing points at the checkout
    grpc, http, metrics, health = _free_port(), _free_port(), _free_port(), _free_port()
    server = subprocess.Popen(
        [
            revpers,
            "serve",
            "--repository",
            str(repo),
            "--grpc-port",
            str(grpc),
            "--http-port",
            str(http),
            "--metrics-port",
            str(metrics),
            "--health-port",
            str(health),
        ],
        cwd=tmp,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = RevpersClient(f"127.0.0.1:{grpc}", timeout=300)
        deadline = time.monotonic() + 300
        while True:
            try:
                if client.ready():
                    break
            except Exception:  # not listening yet
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "server not ready in 300 s"
            time.sleep(1)
        image, report = client.anonymize(insightface_photo("Tom_Hanks_54745.png").read_bytes(), steps=2)
        validate_report(report)
        assert image and report["faces"] and report["smoke"] is True
        assert str(tmp) not in json.dumps(report)  # reports name the bundle by hash, not by path
        client.close()
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
