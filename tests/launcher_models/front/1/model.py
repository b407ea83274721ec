"""Test entry (BLS) model: waits INPUT0[0, 0] seconds (a negative value: until the file named by
$FRONT_GATE_FILE exists), then calls `work` and answers OUTPUT0 = (INPUT0 + 1) * 2. It keeps revpers serve's drain
contract (revpers.serving.launcher.supervise):

- while the file named by $REVPERS_DRAIN_FILE exists, a new request is answered UNAVAILABLE;
- the gauge revpers_requests_in_flight counts the requests being executed.

Each request runs in its own thread and is answered through its response sender, so requests that
arrive together are served together. A child call that meets a dead, unloaded or reloading
`work` is answered UNAVAILABLE (the server is recovering it), other child errors INTERNAL.
"""

import os
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.drain_file = os.environ.get("REVPERS_DRAIN_FILE")
        self.family = pb_utils.MetricFamily(
            name="revpers_requests_in_flight", description="requests executing", kind=pb_utils.MetricFamily.GAUGE
        )
        self.in_flight = self.family.Metric(labels={"instance": args.get("model_instance_name", "front")})
        self.in_flight.set(0)  # a reload gets the dead stub's series back, with its last value
        self.lock = threading.Lock()
        self.count = 0

    def _answer(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            if self.drain_file and os.path.exists(self.drain_file):
                error = pb_utils.TritonError("server is draining", pb_utils.TritonError.UNAVAILABLE)
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
                return
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            if x.flat[0] < 0:  # wait for the test to create $FRONT_GATE_FILE (at most 60 s)
                gate, deadline = os.environ.get("FRONT_GATE_FILE", ""), time.monotonic() + 60
                while gate and not os.path.exists(gate) and time.monotonic() < deadline:
                    time.sleep(0.01)
            else:
                time.sleep(float(x.flat[0]))
            sub = pb_utils.InferenceRequest(
                model_name="work", requested_output_names=["OUTPUT0"], inputs=[pb_utils.Tensor("INPUT0", x)]
            ).exec()
            if sub.has_error():
                message = sub.error().message()
                recovering = any(
                    s in message for s in ("not healthy", "not ready", "unknown model", "no available versions")
                )
                code = pb_utils.TritonError.UNAVAILABLE if recovering else pb_utils.TritonError.INTERNAL
                response = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"work: {message}", code))
            else:
                y = pb_utils.get_output_tensor_by_name(sub, "OUTPUT0").as_numpy()
                response = pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor("OUTPUT0", (y * 2).astype(np.float32))]
                )
            sender.send(response, flags=final)
        finally:
            self._count(-1)

    def _count(self, step):
        with self.lock:
            self.count += step
            self.in_flight.set(self.count)

    def execute(self, requests):
        for request in requests:  # counted before execute returns, as the revpers BLS counts them
            self._count(+1)
            threading.Thread(target=self._answer, args=(request,), daemon=True).start()
        return None
