"""revpers's own metrics, served by Triton on its metrics port (``/metrics``) next to its nv_* ones.

The BLS model creates them in ``initialize`` (``pb_utils.MetricFamily`` exists only inside a running
stub, not when model.py is imported) and keeps every family alive as long as its metrics are used.
Each BLS instance is its own process, so every metric carries the instance's name as a label; sum
over ``instance`` for the model's totals.

Families (all counters end in ``_total``):

revpers_requests_total{outcome}       ok: an image came back; rejected: the request succeeded but its
                                      image was withheld (gate rejection, or no face with
                                      on_no_face=fail); invalid: INVALID_ARGUMENT (bad input, bad
                                      PARAMS, over a limit); cancelled: the client cancelled or its
                                      deadline passed; unavailable: refused while draining;
                                      error: INTERNAL (a bug or a failed component call)
revpers_faces_total{verdict}          faces by their final verdict (revpers_client.protocol.FaceVerdict)
revpers_gate_retries_total            extra generator attempts the verification gate asked for
revpers_gate_fallbacks_total          faces the gate obscured after their last failed attempt
revpers_no_face_images_total          images in which the detector found no face
revpers_unet_calls_total              BLS calls to the `unet` model
revpers_unet_batch_size               samples per BLS `unet` call (histogram)
revpers_stage_duration_seconds{stage} the report's stage timings (histogram per stage)
revpers_request_duration_seconds      server time per request, every outcome (histogram)
revpers_requests_in_flight            requests admitted and not yet answered (gauge)
"""

from __future__ import annotations

import threading

from revpers.serving.launcher.supervise import IN_FLIGHT_METRIC  # the drain waits for it to reach 0
from revpers_client.protocol import FaceVerdict, ImageVerdict

# Metric updates and response sends are messages from the stub to the server that tritonserver 2.51's
# python backend does not take from several threads at once: concurrent ones crashed the server
# (SIGSEGV, boost::interprocess::lock_exception) with 4 requests in flight. Every one holds this lock.
STUB_MESSAGE_LOCK = threading.RLock()

OUTCOMES = ("ok", "rejected", "invalid", "cancelled", "unavailable", "error")
# the outcome of a failed request, by its error kind (revpers.core.errors.KINDS)
OUTCOME_OF_KIND = {
    "input": "invalid",
    "parameter": "invalid",
    "limit": "invalid",
    "cancelled": "cancelled",
    "unavailable": "unavailable",
}
SECONDS_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
FALLBACK_VERDICTS = frozenset(
    {FaceVerdict.FALLBACK_BLURRED, FaceVerdict.FALLBACK_PIXELATED, FaceVerdict.FALLBACK_FILLED}
)


def outcome_of(kind: str) -> str:
    return OUTCOME_OF_KIND.get(kind, "error")


class BlsMetrics:
    """The families above for one BLS instance (``labels``: e.g. ``{"instance": "revpers_0_0"}``)."""

    def __init__(self, pb_utils, labels: dict[str, str]):
        mf = pb_utils.MetricFamily
        self.labels = dict(labels)
        self._families = []  # a Metric fails once its family is garbage collected: keep them all here
        self._lock = STUB_MESSAGE_LOCK

        def family(name: str, description: str, kind):
            f = mf(name=name, description=description, kind=kind)
            self._families.append(f)
            return f

        def one(f, buckets=None, **extra):
            kwargs = {"buckets": buckets} if buckets is not None else {}
            return f.Metric(labels={**self.labels, **extra}, **kwargs)

        f = family("revpers_requests_total", "revpers requests by outcome", mf.COUNTER)
        self.requests = {o: one(f, outcome=o) for o in OUTCOMES}
        f = family("revpers_faces_total", "faces by final verdict", mf.COUNTER)
        self.faces = {v.value: one(f, verdict=v.value) for v in FaceVerdict}
        self.gate_retries = one(
            family(
                "revpers_gate_retries_total", "extra generator attempts asked for by the verification gate", mf.COUNTER
            )
        )
        self.gate_fallbacks = one(
            family("revpers_gate_fallbacks_total", "faces obscured by the gate's fallback", mf.COUNTER)
        )
        self.no_face_images = one(family("revpers_no_face_images_total", "images with no face detected", mf.COUNTER))
        self.unet_calls = one(family("revpers_unet_calls_total", "BLS calls to the unet model", mf.COUNTER))
        self.unet_batch = one(
            family("revpers_unet_batch_size", "samples per BLS call to the unet model", mf.HISTOGRAM),
            buckets=BATCH_BUCKETS,
        )
        self._stage_family = family(
            "revpers_stage_duration_seconds", "request stage durations (report timings_ms)", mf.HISTOGRAM
        )
        self._stages: dict = {}
        self.duration = one(
            family("revpers_request_duration_seconds", "server time per request", mf.HISTOGRAM), buckets=SECONDS_BUCKETS
        )
        self.in_flight = one(family(IN_FLIGHT_METRIC, "requests admitted and not yet answered", mf.GAUGE))
        # a reloaded model (after its stub died) gets the dead stub's series back, with its last
        # value: start at 0, or the drain would wait for requests no stub holds
        self.in_flight.set(0)

    def stage(self, name: str):
        """The histogram of one stage, made on its first use (stages differ by mode)."""
        with self._lock:
            metric = self._stages.get(name)
            if metric is None:
                metric = self._stages[name] = self._stage_family.Metric(
                    labels={**self.labels, "stage": name}, buckets=SECONDS_BUCKETS
                )
            return metric

    def component_call(self, model: str, batch: int) -> None:
        if model == "unet":
            with self._lock:
                self.unet_calls.increment(1)
                self.unet_batch.observe(batch)

    def set_in_flight(self, n: int) -> None:
        with self._lock:
            self.in_flight.set(n)

    def request(self, outcome: str, seconds: float, report=None) -> None:
        """One finished request; ``report`` (an ImageReport) when it produced one."""
        with self._lock:
            self._request(outcome, seconds, report)

    def _request(self, outcome: str, seconds: float, report) -> None:
        self.requests[outcome].increment(1)
        self.duration.observe(seconds)
        if report is None:
            return
        retries = fallbacks = 0
        for face in report.faces:
            verdict = FaceVerdict(face.verdict)
            self.faces[verdict.value].increment(1)
            retries += max(0, len(face.attempts) - 1)
            fallbacks += verdict in FALLBACK_VERDICTS
        if retries:
            self.gate_retries.increment(retries)
        if fallbacks:
            self.gate_fallbacks.increment(fallbacks)
        if ImageVerdict(report.verdict) == ImageVerdict.NO_FACES:
            self.no_face_images.increment(1)
        for name, ms in report.timings_ms.items():
            self.stage(name).observe(ms / 1e3)
