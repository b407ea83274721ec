"""One-request client over tritonclient's gRPC API, and the error type every client call raises.

Only tritonclient, numpy and the standard library are needed here (no torch): the client runs on
machines that never load a model.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

MODEL = "revpers"


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of ``data``: the digest every report, manifest entry and resume check uses."""
    return hashlib.sha256(data).hexdigest()


def status_code(status: str | None) -> str | None:
    """``"StatusCode.UNAVAILABLE"`` (what tritonclient reports) -> ``"UNAVAILABLE"``."""
    if status is None:
        return None
    return str(status).rsplit(".", 1)[-1]


class ServiceError(RuntimeError):
    """The server refused or failed a request, or could not be reached.

    ``status`` is the gRPC status as tritonclient gives it (``"StatusCode.INVALID_ARGUMENT"``),
    ``code`` the bare name (``"INVALID_ARGUMENT"``); client-side failures (a file that cannot be
    read) have ``code`` ``"CLIENT"``. ``str()`` is the server's message.
    """

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status

    @property
    def code(self) -> str | None:
        return status_code(self.status)

    @property
    def message(self) -> str:
        return str(self)


def channel_args(max_reconnect_backoff_s: float = 2.0) -> list[tuple]:
    """tritonclient's default gRPC channel options plus a cap on gRPC's reconnect backoff.

    gRPC waits longer and longer (up to 120 s) between attempts to reconnect to a server that is
    down; a batch client retrying against a restarting replica would then fail fast for minutes
    after the server is back. Capping the wait keeps retries meaningful.
    """
    from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions

    ka = KeepAliveOptions()
    cap = max(100, int(max_reconnect_backoff_s * 1000))
    return [("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
            ("grpc.keepalive_time_ms", ka.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", min(1000, cap)),
            ("grpc.min_reconnect_backoff_ms", min(1000, cap)),
            ("grpc.max_reconnect_backoff_ms", cap)]


def encode_request(grpcclient, image: bytes, params: dict) -> list:
    """The two BYTES inputs of the `revpers` model, each a batch of one ([1, 1]: the BLS model's
    dynamic batcher merges requests); ``None`` parameters are left out."""
    img = grpcclient.InferInput("IMAGE", [1, 1], "BYTES")
    img.set_data_from_numpy(np.array([[bytes(image)]], dtype=np.object_))
    par = grpcclient.InferInput("PARAMS", [1, 1], "BYTES")
    par.set_data_from_numpy(np.array([[json.dumps({k: v for k, v in params.items() if v is not None}).encode()]],
                                     dtype=np.object_))
    return [img, par]


def infer_once(grpcclient, client, image: bytes, params: dict, timeout: float | None) -> tuple[bytes, dict]:
    """One `revpers` request on an ``InferenceServerClient``; tritonclient errors become ServiceError."""
    from tritonclient.utils import InferenceServerException

    try:
        result = client.infer(MODEL, encode_request(grpcclient, image, params),
                              outputs=[grpcclient.InferRequestedOutput("IMAGE"),
                                       grpcclient.InferRequestedOutput("REPORT")],
                              client_timeout=timeout)
    except InferenceServerException as exc:
        raise ServiceError(exc.message() or str(exc), exc.status()) from None
    return bytes(result.as_numpy("IMAGE").reshape(-1)[0]), json.loads(result.as_numpy("REPORT").reshape(-1)[0])


class RevpersClient:
    """One server, one request at a time, no retries (see :class:`revpers_client.BatchClient` for those)."""

    def __init__(self, url: str = "localhost:8001", timeout: float | None = 600.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url = url
        self.timeout = timeout
        self.client = grpcclient.InferenceServerClient(url)

    def ready(self) -> bool:
        return bool(self.client.is_server_ready() and self.client.is_model_ready(MODEL))

    def anonymize(self, image: bytes, **params) -> tuple[bytes, dict]:
        """Send encoded image bytes plus parameters; returns (anonymized image bytes, report).

        When the server's identity gate rejects the image (PARAMS ``fallback: "reject"`` and a face
        still matches), the call succeeds with ``b""`` as the image and ``report["verdict"] ==
        "rejected"`` (``report["rejected_reason"]`` says why): check before writing the bytes."""
        return infer_once(self._grpc, self.client, image, params, self.timeout)

    def close(self) -> None:
        self.client.close()
