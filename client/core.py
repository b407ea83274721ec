"""One-request client over tritonclient's gRPC API, the error type every client call raises, and how
a connection is secured (TLS, API key).

Only tritonclient, numpy and the standard library are needed here (no torch): the client runs on
machines that never load a model.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import MAX_GRPC_MESSAGE_SIZE, KeepAliveOptions
from tritonclient.utils import InferenceServerException

from . import protocol

MODEL = protocol.MODEL

# Messages of a server that is restarting, draining or recovering a model: worth waiting for.
NOT_READY_MARKERS = ("not ready", "is not healthy", "not found", "unavailable")
# Messages that no retry can fix: a TLS set-up the server refuses or a missing/wrong API key.
TLS_MARKERS = ("tls handshake failed", "certificate_verify_failed", "ssl handshake", "wrong version number")


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
    read) have ``code`` ``"CLIENT"``. ``str()`` is the server's message. ``attempts`` and ``errors``
    are filled in by :class:`revpers_client.BatchClient` (every failed attempt, ``"url: CODE: message"``).
    """

    def __init__(self, message: str, status: str | None = None, attempts: int = 0, errors: list | None = None):
        super().__init__(message)
        self.status = status
        self.attempts = attempts
        self.errors = list(errors or [])

    @property
    def code(self) -> str | None:
        return status_code(self.status)

    @property
    def message(self) -> str:
        return str(self)

    @property
    def kind(self) -> str:
        """``auth`` (the server wants an API key: never retried), ``tls`` (TLS refused: never
        retried), ``not_ready`` (server down, restarting or loading: worth waiting for),
        ``deadline`` (DEADLINE_EXCEEDED: the server has stopped working on it), or ``final``."""
        text = self.message.lower()
        if self.code == "UNAVAILABLE" and protocol.RESTRICTED_MESSAGE.lower() in text:
            return "auth"
        if self.code == "UNAVAILABLE" and any(m in text for m in TLS_MARKERS):
            return "tls"
        if self.code in ("UNAVAILABLE", "NOT_FOUND"):
            return "not_ready"
        if self.code == "INTERNAL" and any(m in text for m in NOT_READY_MARKERS):
            return "not_ready"  # e.g. "unet: Server not ready" while a server drains
        if self.code == "DEADLINE_EXCEEDED":
            return "deadline"
        return "final"


class ConfigError(ValueError):
    """A TLS or API-key setting that cannot be used (missing file, empty key): a usage error."""


@dataclass(frozen=True)
class Security:
    """How to reach a server: TLS (``tls``; ``ca``: the CA file that checks the server, the system
    roots when None; ``cert``/``key``: the client's certificate and key for mutual TLS) and an API
    key, sent as the gRPC metadata header ``protocol.GRPC_HEADER_PREFIX + protocol.API_KEY_HEADER``."""

    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    api_key: str | None = None

    @classmethod
    def from_options(
        cls, tls: bool = False, ca=None, cert=None, key=None, api_key_file=None, environ=None
    ) -> "Security":
        """Checked settings: files must exist; the API key is read from ``api_key_file`` or else
        the environment variable ``protocol.API_KEY_ENV``. Raises ConfigError with one line."""
        environ = os.environ if environ is None else environ
        if (ca or cert or key) and not tls:
            raise ConfigError("--ca, --cert and --key need --tls")
        if bool(cert) != bool(key):
            raise ConfigError("--cert and --key go together (mutual TLS)")
        for flag, path in (("--ca", ca), ("--cert", cert), ("--key", key)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(f"{flag} {path}: no such file")
        api_key = None
        if api_key_file is not None:
            try:
                api_key = Path(api_key_file).read_text().strip()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"--api-key-file {api_key_file}: cannot read it ({exc})") from None
            if not api_key:
                raise ConfigError(f"--api-key-file {api_key_file} is empty")
        elif environ.get(protocol.API_KEY_ENV, "").strip():
            api_key = environ[protocol.API_KEY_ENV].strip()
        if api_key is not None and not all(33 <= ord(c) < 127 for c in api_key):
            raise ConfigError("the API key must be printable ASCII without spaces")
        return cls(bool(tls), ca and str(ca), cert and str(cert), key and str(key), api_key)

    @property
    def headers(self) -> dict | None:
        if self.api_key is None:
            return None
        return {protocol.GRPC_HEADER_PREFIX + protocol.API_KEY_HEADER: self.api_key}

    def client(self, url: str, channel_args: list | None = None):
        """An ``InferenceServerClient`` for ``url`` with these TLS settings."""
        kwargs = {}
        if self.tls:
            kwargs = {
                "ssl": True,
                "root_certificates": self.ca,
                "private_key": self.key,
                "certificate_chain": self.cert,
            }
        return grpcclient.InferenceServerClient(url, channel_args=channel_args, **kwargs)


PLAIN = Security()


def channel_args(max_reconnect_backoff_s: float = 2.0) -> list[tuple]:
    """tritonclient's default gRPC channel options plus a cap on gRPC's reconnect backoff.

    gRPC waits longer and longer (up to 120 s) between attempts to reconnect to a server that is
    down; a batch client retrying against a restarting replica would then fail fast for minutes
    after the server is back. Capping the wait keeps retries meaningful.
    """
    ka = KeepAliveOptions()
    cap = max(100, int(max_reconnect_backoff_s * 1000))
    return [
        ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
        ("grpc.keepalive_time_ms", ka.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", ka.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", ka.keepalive_permit_without_calls),
        ("grpc.http2.max_pings_without_data", ka.http2_max_pings_without_data),
        ("grpc.initial_reconnect_backoff_ms", min(1000, cap)),
        ("grpc.min_reconnect_backoff_ms", min(1000, cap)),
        ("grpc.max_reconnect_backoff_ms", cap),
    ]


def encode_request(image: bytes, params: dict) -> list:
    """The two BYTES inputs of the `revpers` model, each a batch of one ([1, 1]: the BLS model's
    dynamic batcher merges requests); ``None`` parameters are left out."""
    img = grpcclient.InferInput(protocol.INPUT_IMAGE, [1, 1], "BYTES")
    img.set_data_from_numpy(np.array([[bytes(image)]], dtype=np.object_))
    par = grpcclient.InferInput(protocol.INPUT_PARAMS, [1, 1], "BYTES")
    par.set_data_from_numpy(
        np.array([[json.dumps({k: v for k, v in params.items() if v is not None}).encode()]], dtype=np.object_)
    )
    return [img, par]


def infer_once(
    client, image: bytes, params: dict, timeout: float | None, headers: dict | None = None
) -> tuple[bytes, dict]:
    """One `revpers` request on an ``InferenceServerClient``; tritonclient errors become ServiceError.

    ``timeout`` is the request's gRPC deadline: the server sees it and stops working on a request
    whose deadline has passed (it is cancelled), so a DEADLINE_EXCEEDED request is not still running."""
    try:
        result = client.infer(
            MODEL,
            encode_request(image, params),
            outputs=[
                grpcclient.InferRequestedOutput(protocol.OUTPUT_IMAGE),
                grpcclient.InferRequestedOutput(protocol.OUTPUT_REPORT),
            ],
            client_timeout=timeout,
            headers=headers,
        )
    except InferenceServerException as exc:
        raise ServiceError(exc.message() or str(exc), exc.status()) from None
    return (
        bytes(result.as_numpy(protocol.OUTPUT_IMAGE).reshape(-1)[0]),
        json.loads(result.as_numpy(protocol.OUTPUT_REPORT).reshape(-1)[0]),
    )


class RevpersClient:
    """One server, one request at a time, no retries (see :class:`revpers_client.BatchClient` for those)."""

    def __init__(self, url: str = "localhost:8001", timeout: float | None = 600.0, security: Security = PLAIN):
        self.url = url
        self.timeout = timeout
        self.security = security
        self.client = security.client(url)

    def ready(self) -> bool:
        h = self.security.headers
        return bool(self.client.is_server_ready(headers=h) and self.client.is_model_ready(MODEL, headers=h))

    def anonymize(self, image: bytes, **params) -> tuple[bytes, dict]:
        """Send encoded image bytes plus parameters; returns (anonymized image bytes, report).

        When the server's identity gate rejects the image (PARAMS ``fallback: "reject"`` and a face
        still matches), the call succeeds with ``b""`` as the image and ``report["verdict"] ==
        "rejected"`` (``report["rejected_reason"]`` says why): check before writing the bytes."""
        return infer_once(self.client, image, params, self.timeout, self.security.headers)

    def close(self) -> None:
        self.client.close()


def server_health(url: str, timeout: float, security: Security = PLAIN, model: str = MODEL) -> dict:
    """Live/ready, server metadata, repository index and the model's versions of one server.
    ``error`` holds the first failed call's ``CODE: message``; ``reachable`` whether it answered at all."""
    info = {"url": url, "live": False, "ready": False, "model": model, "model_ready": False}
    client = security.client(url)
    h = security.headers
    try:
        info["live"] = bool(client.is_server_live(headers=h, client_timeout=timeout))
        info["ready"] = bool(client.is_server_ready(headers=h, client_timeout=timeout))
        md = client.get_server_metadata(headers=h, as_json=True, client_timeout=timeout)
        info["server"] = {"name": md.get("name"), "version": md.get("version"), "extensions": md.get("extensions", [])}
        info["model_ready"] = bool(client.is_model_ready(model, headers=h, client_timeout=timeout))
        try:  # the repository index is an admin API a secured server restricts: optional
            index = client.get_model_repository_index(headers=h, as_json=True, client_timeout=timeout)
            info["models"] = [
                {
                    "name": m.get("name"),
                    "version": m.get("version"),
                    "state": m.get("state"),
                    "reason": m.get("reason", ""),
                }
                for m in index.get("models", [])
            ]
        except InferenceServerException as exc:
            info["models_error"] = f"{status_code(exc.status())}: {exc.message()}"
        if info["model_ready"]:
            mm = client.get_model_metadata(model, headers=h, as_json=True, client_timeout=timeout)
            info["model_versions"] = mm.get("versions", [])
            info["model_platform"] = mm.get("platform")
    except InferenceServerException as exc:
        err = ServiceError(exc.message() or str(exc), exc.status())
        info["error"] = f"{err.code}: {err.message}"
        info["error_kind"] = err.kind
    finally:
        client.close()
    info["healthy"] = bool(info["live"] and info["ready"] and info["model_ready"])
    return info
