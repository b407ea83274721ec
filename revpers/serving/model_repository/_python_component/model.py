"""Generic Python-backend model serving one component (`unet`, `vae_encoder`, `vae_decoder`,
`arcface`) for the `onnxruntime` and `pytorch` repository targets; see revpers.component_models.

Config parameters: "runtime" = "onnxruntime" (runs model.onnx next to this file) or "pytorch"
(runs the bundle's module; "bundle" = its path, "torch_compile" = "yes"/"no"). Requests merged by
the dynamic batcher run in one call.
"""

import json
import os
from pathlib import Path

import triton_python_backend_utils as pb_utils

from revpers.serving.components import OnnxRuntimeRunner, TorchRunner, execute, instance_device


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.inputs = [(t["name"], "reshape" in t) for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        self.device = device = instance_device(args)
        if params.get("runtime", "onnxruntime") == "pytorch":
            self.run = TorchRunner(params["bundle"], config["name"], device,
                                   compile=params.get("torch_compile", "no") == "yes")
            self.run.warm_up(config)  # compile / allocate now: READY means ready
        else:
            path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
            self.run = OnnxRuntimeRunner(path, [n for n, _ in self.inputs], self.outputs, device,
                                         threads=int(os.environ.get("REVPERS_ORT_THREADS", "0")))

    def execute(self, requests):
        return execute(pb_utils, requests, self.inputs, self.outputs, self.run, self.device)
