"""Triton BLS model `revpers`: thin over the shared pipeline (revpers.serving.bls).

Request (one image, shape [1, 1]): IMAGE (bytes: JPEG/PNG/WebP), optional PARAMS (JSON bytes:
guidance, ip_scale, id_scale, steps, skip, seed, prompt, mode = "photo" | "aligned",
format = "png" | "jpeg" | "webp", and the verification gate's verify, retries, retry_mode,
guidance_step, fallback). Response: IMAGE (anonymized image bytes, no metadata; empty when the image
was withheld) and REPORT (JSON bytes, with verdict and audit). Bad input gives INVALID_ARGUMENT for
that request only. Up to "threads" requests run at once per instance, each answered through its
response sender as soon as it is done (execute returns None). Config parameters max_bytes,
max_pixels, max_faces, max_steps and max_retries bound what one request may cost (Limits).
"""

import json

import triton_python_backend_utils as pb_utils

from revpers.service.request import Limits
from revpers.serving.bls import BlsService, configure_logging
from revpers.serving.components import instance_device
from revpers.serving.metrics import BlsMetrics


class TritonPythonModel:
    def initialize(self, args):
        configure_logging()
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        # the metric families exist only inside the running stub, so they are made here, not at import
        self.metrics = BlsMetrics(pb_utils, {"instance": args.get("model_instance_name", config["name"])})
        self.service = BlsService(params["bundle"], int(params["inversion_batch"]), pb_utils,
                                  max_batch=json.loads(params["max_batch"]), device=instance_device(args),
                                  threads=int(params.get("threads", "8")), limits=Limits.from_parameters(params),
                                  metrics=self.metrics)

    def execute(self, requests):
        return self.service.execute(requests)  # None: each request is answered by its response sender

    def finalize(self):
        self.service.close()  # waits for the requests in flight, which are answered before it returns
        self.service = None
