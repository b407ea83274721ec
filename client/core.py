"""One-request client over tritonclient's gRPC API."""

from __future__ import annotations

import json

import numpy as np

MODEL = "revpers"


class ServiceError(RuntimeError):
    """The server refused or failed a request; ``status`` is the gRPC status name."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


class RevpersClient:
    def __init__(self, url: str = "localhost:8001", timeout: float | None = 600.0):
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.url = url
        self.timeout = timeout
        self.client = grpcclient.InferenceServerClient(url)

    def ready(self) -> bool:
        return bool(self.client.is_server_ready() and self.client.is_model_ready(MODEL))

    def anonymize(self, image: bytes, **params) -> tuple[bytes, dict]:
        """Send encoded image bytes plus parameters; returns (anonymized image bytes, report)."""
        from tritonclient.utils import InferenceServerException

        g = self._grpc
        img = g.InferInput("IMAGE", [1, 1], "BYTES")  # a batch of one image (the BLS model batches requests)
        img.set_data_from_numpy(np.array([[bytes(image)]], dtype=np.object_))
        par = g.InferInput("PARAMS", [1, 1], "BYTES")
        par.set_data_from_numpy(np.array([[json.dumps({k: v for k, v in params.items() if v is not None}).encode()]],
                                         dtype=np.object_))
        try:
            result = self.client.infer(MODEL, [img, par], outputs=[g.InferRequestedOutput("IMAGE"),
                                                                   g.InferRequestedOutput("REPORT")],
                                       client_timeout=self.timeout)
        except InferenceServerException as exc:
            raise ServiceError(exc.message(), exc.status()) from None
        return bytes(result.as_numpy("IMAGE")[0, 0]), json.loads(result.as_numpy("REPORT")[0, 0])

    def close(self) -> None:
        self.client.close()
