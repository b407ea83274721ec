import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def smoke_bundle_dir(tmp_path_factory):
    from revpers.models.smoke import write_smoke_bundle

    return write_smoke_bundle(tmp_path_factory.mktemp("bundle") / "smoke", seed=0)


@pytest.fixture(scope="session")
def smoke_bundle(smoke_bundle_dir):
    from revpers.models.bundle import load_bundle

    return load_bundle(smoke_bundle_dir)


@pytest.fixture(scope="session")
def torch_models(smoke_bundle):
    from revpers.models.torch_models import TorchModels

    return TorchModels.load(smoke_bundle, device="cpu")


def real_photo(name: str = "Tom_Hanks_54745.png"):
    """A real photo that ships inside the insightface wheel, as RGB uint8."""
    from revpers.faces.samples import insightface_photo
    from revpers.service.images import read_image

    return read_image(insightface_photo(name))


@pytest.fixture(scope="session")
def onnx_artifacts(smoke_bundle, tmp_path_factory):
    """The smoke bundle exported to ONNX once per test session: (artifacts dir, export record)."""
    from revpers.export.onnx_export import export_bundle

    out = tmp_path_factory.mktemp("onnx") / "artifacts"
    record = export_bundle(smoke_bundle, out, log=lambda *a: None)
    return out, record


@pytest.fixture(scope="session")
def onnxruntime_repository(onnx_artifacts, smoke_bundle_dir, tmp_path_factory):
    """A Triton model repository (onnxruntime target) over the session's ONNX artifacts, with ONE BLS
    instance, so the server tests show that a single instance serves concurrent requests."""
    from revpers.serving.repository import build_repository

    return build_repository(
        onnx_artifacts[0],
        tmp_path_factory.mktemp("repo") / "repo",
        "onnxruntime",
        bundle=smoke_bundle_dir,
        bls_instances=1,
    )


def start_triton(repository, env=None):
    """Start a real tritonserver on free loopback ports (skips where none is installed); the caller
    stops it (``srv.stop()``). ``env``: extra environment variables for the server and its models."""
    import importlib.util

    from revpers.serving.launcher import TritonNotFoundError, TritonServer, find_tritonserver, free_ports

    try:
        find_tritonserver()
    except TritonNotFoundError as exc:  # pragma: no cover - depends on the machine
        if importlib.util.find_spec("pytriton") is not None:  # installed, so not finding it is a bug
            raise
        pytest.skip(f"tritonserver not available: {exc}")
    grpc_port, http_port, metrics_port = free_ports(3)
    srv = TritonServer(repository, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port, env=env)
    srv.start()
    print(f"tritonserver ready in {srv.startup_seconds:.1f} s")
    return srv


def thread_env() -> dict[str, str]:
    """The server's thread counts pinned to what this process computes with: torch's intra-op threads
    (OMP_NUM_THREADS, read by the BLS's torch) and ONNX Runtime's (REVPERS_ORT_THREADS, read by the
    served onnxruntime components; in-process references use ``ort_threads()``)."""
    import torch

    return {"OMP_NUM_THREADS": str(torch.get_num_threads()), "REVPERS_ORT_THREADS": str(ort_threads())}


def ort_threads() -> int:
    import torch

    return torch.get_num_threads()


@pytest.fixture(scope="session")
def triton_server(onnxruntime_repository):
    """One real tritonserver serving the smoke bundle, shared by every server test of the session."""
    srv = start_triton(onnxruntime_repository, env=thread_env())
    try:
        yield srv
    finally:
        srv.stop()
