"""Generic Python-backend model running one exported ONNX component with ONNX Runtime.

Used by the `onnxruntime` repository target (the pip-installed tritonserver has no ONNX Runtime
backend). Requests merged by the dynamic batcher are concatenated along the batch axis and run in
one session call, then split back.
"""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        import onnxruntime as ort

        config = json.loads(args["model_config"])
        self.inputs = [(t["name"], [int(d) for d in t["dims"]], "reshape" in t) for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(os.environ.get("REVPERS_ORT_THREADS", "0"))
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        feeds, sizes = {}, []
        for name, dims, scalar in self.inputs:
            arrays = [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            arrays = [a.reshape(a.shape[0]) if scalar else a for a in arrays]
            feeds[name] = np.ascontiguousarray(np.concatenate(arrays, axis=0))
            sizes = [a.shape[0] for a in arrays]
        results = self.session.run(self.outputs, feeds)
        responses, start = [], 0
        for n in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start:start + n]))
                       for name, out in zip(self.outputs, results)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += n
        return responses
