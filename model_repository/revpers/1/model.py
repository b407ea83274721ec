"""Triton BLS model `revpers`: thin over the shared pipeline (revpers.serving).

Request: IMAGE (bytes: JPEG/PNG/WebP), optional PARAMS (JSON bytes: guidance, ip_scale, id_scale,
steps, skip, seed, prompt, mode = "photo" | "aligned", format = "png" | "jpeg" | "webp").
Response: IMAGE (anonymized image bytes, no metadata) and REPORT (JSON bytes).
Bad input gives INVALID_ARGUMENT for that request only.
"""

import json

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from revpers.serving import BlsService

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.service = BlsService(params["bundle"], int(params.get("inversion_batch", "10")), pb_utils)

    def execute(self, requests):
        return [self.service.handle(request) for request in requests]

    def finalize(self):
        self.service = None
