"""Triton BLS model `revpers`: thin over the shared pipeline (revpers.serving.bls).

Request (one image, shape [1, 1]): IMAGE (bytes: JPEG/PNG/WebP), optional PARAMS (JSON bytes:
guidance, ip_scale, id_scale, steps, skip, seed, prompt, mode = "photo" | "aligned",
format = "png" | "jpeg" | "webp", and the verification gate's verify, retries, retry_mode,
guidance_step, fallback). Response: IMAGE (anonymized image bytes, no metadata; empty when the gate
rejected the image) and REPORT (JSON bytes, with verdict and audit). Bad input gives
INVALID_ARGUMENT for that request only. The requests of one execute
call are served concurrently (config parameter "threads").
"""

import json

import triton_python_backend_utils as pb_utils

from revpers.serving.bls import BlsService
from revpers.serving.components import instance_device


class TritonPythonModel:
    def initialize(self, args):

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.service = BlsService(params["bundle"], int(params["inversion_batch"]), pb_utils,
                                  max_batch=json.loads(params["max_batch"]), device=instance_device(args),
                                  threads=int(params.get("threads", "8")))

    def execute(self, requests):
        return self.service.execute(requests)

    def finalize(self):
        self.service.close()
        self.service = None
