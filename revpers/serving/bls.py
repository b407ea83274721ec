"""The Triton BLS side: components that call the served models, and request handling.

``TritonComponents`` satisfies ``pipeline.Components`` by sending BLS requests to the `unet`,
`vae_encoder` and `vae_decoder` models (split to each model's max batch). Tensors cross the BLS
boundary by DLPack in both directions, so on a GPU instance the latents stay on the device for the
whole inversion and generation (the sampling math runs there too); on the CPU it is zero-copy.
The ArcFace embedding of each face crop is computed by the served `arcface` model
(``ServedArcFace``); detection and landmarks run in this process. The prompt encoders run here
too (prompts are cached).

``BlsService`` turns Triton requests into ``revpers.service.request.anonymize_bytes`` calls and
back: INVALID_ARGUMENT for bad input or a request over the configured ``Limits``, CANCELLED when
its client went away (polled before every UNet call), UNAVAILABLE while draining, INTERNAL with a
request id for anything else. Requests run concurrently on a thread pool (``ResponsePool``, at most
``threads`` per instance) and each is answered through its response sender the moment it is done;
their UNet calls reach the `unet` model's dynamic batcher together and are merged there. Every
request is counted in revpers's metrics (``revpers.serving.metrics``) and logged as one JSON line
(logger ``revpers.serving.requests``).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack

from revpers.core.conditioning import TextEmbedding
from revpers.core.errors import InputError, RevpersError, Unavailable
from revpers.core.schedule import NoiseSchedule
from revpers.faces import load_face_analyzer
from revpers.faces.analysis import ArcFaceRecognizer
from revpers.models.bundle import load_bundle
from revpers.models.components import input_names, specs_from_bundle
from revpers.models.torch_models import TextEncoderCache
from revpers.service.anonymizer import Anonymizer
from revpers.service.request import Limits, RequestOptions, anonymize_bytes, parse_params
from revpers.serving.components import synchronize, use_device
from revpers.serving.launcher.supervise import DRAIN_FILE_ENV  # while that file exists: UNAVAILABLE
from revpers.serving.metrics import STUB_MESSAGE_LOCK, BlsMetrics, outcome_of
from revpers_client.protocol import INPUT_IMAGE, INPUT_PARAMS, OUTPUT_IMAGE, OUTPUT_REPORT

LOG = logging.getLogger("revpers.serving")
# what a component model's error says while its stub is dead, reloading or the server is stopping:
# the request is answered UNAVAILABLE (retryable), not INTERNAL
CHILD_UNAVAILABLE = ("is not healthy", "is not ready", "not ready", "unknown model", "no available versions")
REQUEST_LOG = logging.getLogger("revpers.serving.requests")  # one JSON line per request

# gRPC status of a failed request, by the kind of its RevpersError (revpers.core.errors)
GRPC_STATUS = {
    "input": "INVALID_ARG",
    "parameter": "INVALID_ARG",
    "limit": "INVALID_ARG",
    "cancelled": "CANCELLED",
    "unavailable": "UNAVAILABLE",
    "dependency": "INTERNAL",
    "bundle": "INTERNAL",
    "face_model": "INTERNAL",
    "internal": "INTERNAL",
}


class TextEncoders:
    """SDXL's two CLIP text encoders from the bundle, in process, cached per prompt."""

    def __init__(self, bundle, device: str = "cpu"):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(
            bundle.sdxl_dir,
            unet=None,
            vae=None,
            local_files_only=True,
            add_watermarker=False,
            variant=bundle.sdxl_variant,
            torch_dtype=torch.float16 if device != "cpu" else None,
        )
        pipe.to(device)
        self.cache = TextEncoderCache(pipe, device)

    def __call__(self, prompt: str) -> TextEmbedding:
        return self.cache(prompt)


class SlicedComponents:
    """``pipeline.Components`` over component models called by name, one call per slice of at most
    the model's max batch, the UNet fed in the served input order with its per-sample scalars as
    ``[batch, 1]``: everything the BLS does around a served call. Subclasses say how one call is
    made (``call``): a BLS request (``TritonComponents``), or the same runner in this process
    (``revpers.serving.local.OnnxRuntimeComponents``)."""

    def __init__(self, bundle, max_batch: dict[str, int], device: str = "cpu", inversion_batch: int = 10):
        unet = next(s for s in specs_from_bundle(bundle, inversion_batch) if s.name == "unet")
        self.unet_inputs = input_names(unet)  # the served UNet's feed order, from the registry
        self.max_batch = max_batch
        self.math_device = device
        self.text = TextEncoders(bundle, device)
        self.schedule = NoiseSchedule.from_scheduler_config(dict(self.text.cache.pipe.scheduler.config))

    def call(self, model: str, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        """One call of ``model`` on at most its max batch; returns ``output`` (any device)."""
        raise NotImplementedError

    def infer(self, model: str, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        """One call per slice of at most the model's max batch; returns the output on the math device."""
        n = next(iter(inputs.values())).shape[0]
        step = self.max_batch.get(model, n) or n
        parts = []
        for start in range(0, n, step):
            values = {k: v[start : start + step].contiguous() for k, v in inputs.items()}
            parts.append(self.call(model, values, output))
        out = torch.cat(parts, dim=0).to(self.math_device)
        synchronize(parts)  # the copy is done before the responses' buffers (held by parts) are released
        return out

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        given = {**cond, "sample": x, "timestep": t.to(torch.int64)}
        feeds = {k: given[k].float() if k != "timestep" else given[k] for k in self.unet_inputs}
        feeds["timestep"] = feeds["timestep"].reshape(-1, 1)  # per-sample scalars travel as [batch, 1]
        feeds["ip_scale"] = feeds["ip_scale"].reshape(-1, 1)
        return self.infer("unet", feeds, "eps")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.infer("vae_encoder", {"image": images.float()}, "latent")

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.infer("vae_decoder", {"latent": latents.float()}, "image")


class TritonComponents(SlicedComponents):
    """``pipeline.Components`` over the served component models (BLS calls, DLPack tensors)."""

    def __init__(self, bundle, pb_utils, max_batch: dict[str, int], device: str = "cpu", inversion_batch: int = 10):
        super().__init__(bundle, max_batch, device, inversion_batch)
        self.pb = pb_utils
        self.device = f"triton ({device} BLS)"
        self.on_call = None  # on_call(model, batch) after each BLS call (metrics)
        self._request_kwargs = {}
        if device.startswith("cuda") and hasattr(pb_utils, "PreferredMemory"):
            index = torch.device(device).index or 0
            self._request_kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, index)

    def call(self, model: str, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        synchronize(list(inputs.values()))  # the component reads them from another process
        tensors = [self.pb.Tensor.from_dlpack(k, v) for k, v in inputs.items()]
        resp = self.pb.InferenceRequest(
            model_name=model, requested_output_names=[output], inputs=tensors, **self._request_kwargs
        ).exec()
        if self.on_call is not None:
            self.on_call(model, int(next(iter(inputs.values())).shape[0]))
        if resp.has_error():
            message = resp.error().message()
            if any(sign in message for sign in CHILD_UNAVAILABLE):  # restarting or reloading: try again
                raise Unavailable(f"{model} is not available right now ({message.splitlines()[0][:200]})")
            raise RuntimeError(f"{model}: {message}")
        # the capsule keeps the response's buffer alive; infer's cat copies it into memory we own
        return from_dlpack(self.pb.get_output_tensor_by_name(resp, output).to_dlpack())


class ServedArcFace(ArcFaceRecognizer):
    """The bundle's ArcFace, run by the served `arcface` model: faces are aligned and normalised
    here (insightface's norm_crop, exactly as in process), the network runs on Triton."""

    def __init__(self, local: ArcFaceRecognizer, components: SlicedComponents):
        self.__dict__.update(local.__dict__)
        self.components = components

    def features(self, blob: np.ndarray) -> np.ndarray:
        out = self.components.infer("arcface", {"input.1": torch.from_numpy(blob)}, "embedding")
        return out.cpu().numpy()


class ResponsePool:
    """Serves requests from a thread pool and answers each one with its own final response as soon
    as it is done, so a fast image never waits for a slow one handed over in the same execute call.

    ``submit`` returns once every request has a thread; Triton then calls execute again at once
    (a non-decoupled model that returns None), so at most ``threads`` requests run per instance: the
    next one waits in ``submit`` (and the rest in Triton's queue) until a slot is free. Every
    request gets exactly one FINAL response, whatever happens: a request left unanswered would hang
    its client and keep the model from unloading.
    """

    def __init__(self, handle, failure, final_flag, threads: int, device: str = "cpu", on_count=None):
        """``handle(request)`` -> response (must not raise); ``failure(exc, request)`` -> the response
        when it does anyway; ``on_count(n)``: the number of requests in flight, after each change."""
        self.handle, self.failure, self.final = handle, failure, final_flag
        self.threads = max(1, int(threads))
        self.slots = threading.BoundedSemaphore(self.threads)
        self.pool = ThreadPoolExecutor(
            self.threads, thread_name_prefix="revpers-request", initializer=use_device, initargs=(device,)
        )
        self.on_count = on_count
        self._lock = threading.Lock()
        self.in_flight = 0

    def _count(self, delta: int) -> None:
        with self._lock:
            self.in_flight += delta
            n = self.in_flight
        if self.on_count is not None:
            self.on_count(n)

    def submit(self, requests) -> None:
        for request in requests:
            self.slots.acquire()
            self._count(+1)
            try:
                self.pool.submit(self._serve, request)
            except RuntimeError:  # the pool is shut down (model unloading): answer it here, still once
                self._serve(request)

    def _serve(self, request) -> None:
        response = None
        try:
            response = self.handle(request)
        except BaseException as exc:  # handle answers its own errors; this is the last line
            response = self.failure(exc, request)
        finally:
            try:
                with STUB_MESSAGE_LOCK:  # see revpers.serving.metrics: one stub message at a time
                    request.get_response_sender().send(response, flags=self.final)
            except Exception:  # nothing else can be sent for it now; say so where someone can see it
                LOG.exception("could not send the response of request %s", request_id_of(request))
            finally:
                self._count(-1)
                self.slots.release()

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def anonymizer_over(bundle, components: SlicedComponents, inversion_batch: int) -> Anonymizer:
    """The Anonymizer the BLS serves: generator and ArcFace embeddings from ``components``,
    detection, landmarks and the gate in this process."""
    analyzer = load_face_analyzer(bundle.faces, bundle.root)
    analyzer.recognizer = ServedArcFace(analyzer.recognizer, components)
    return Anonymizer(bundle, inversion_batch=inversion_batch, models=components, analyzer=analyzer)


class BlsService:
    def __init__(
        self,
        bundle_path: str,
        inversion_batch: int,
        pb_utils,
        max_batch: dict[str, int],
        device: str = "cpu",
        threads: int = 8,
        limits: Limits = Limits(),
        metrics: BlsMetrics | None = None,
        drain_file: str | None = None,
    ):
        """``max_batch``: each served component's max batch (from the repository config). ``limits``:
        what one request may cost. ``metrics``: where requests are counted (None: nowhere).
        ``drain_file``: while this file exists new requests are refused with UNAVAILABLE (the
        launcher creates it to drain before a stop); default: the environment's REVPERS_DRAIN_FILE."""

        self.pb = pb_utils
        self.limits = limits
        self.metrics = metrics
        self.drain_file = drain_file if drain_file is not None else os.environ.get(DRAIN_FILE_ENV) or None
        bundle = load_bundle(bundle_path)
        self.components = TritonComponents(bundle, pb_utils, max_batch, device, inversion_batch)
        if metrics is not None:
            self.components.on_call = metrics.component_call
        self.anonymizer = anonymizer_over(bundle, self.components, inversion_batch)
        self.anonymizer.verifier  # load the gate's recognizers now, not in a request thread
        self.responses = ResponsePool(
            self.handle,
            self._failure,
            pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
            threads,
            device,
            on_count=metrics.set_in_flight if metrics is not None else None,
        )

    def execute(self, requests) -> None:
        """Hands the requests to the response pool (each is answered through its response sender
        when done) and returns None, as a non-decoupled model that sends its own responses must."""
        self.responses.submit(requests)

    def close(self) -> None:
        self.responses.close()

    def draining(self) -> bool:
        return self.drain_file is not None and os.path.exists(self.drain_file)

    def _error(self, exc: BaseException, request_id: str):
        """The client's answer to a failed request: its status from the error's kind (one table,
        ``GRPC_STATUS``) and a message without server internals; anything that is not a
        RevpersError is logged here with its traceback and reaches the client as INTERNAL with the
        request id only."""
        kind = error_kind(exc)
        if kind == "internal":
            LOG.error("request %s failed: %s", request_id, "".join(traceback.format_exception(exc)).rstrip())
            message = f"internal error (request id {request_id}); the server log has the details"
        else:
            message = str(exc)
        code = getattr(self.pb.TritonError, GRPC_STATUS.get(kind, "INTERNAL"))
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def _failure(self, exc: BaseException, request):
        return self._error(exc, request_id_of(request))

    def handle(self, request):
        """One request -> its response (never raises); counted in the metrics and logged as one JSON line."""
        t0, start_ns = time.perf_counter(), time.monotonic_ns()
        request_id = request_id_of(request)
        size = report = None
        try:
            if self.draining():
                raise Unavailable("server is draining: it takes no new requests (retry on another server or later)")
            image_t = self.pb.get_input_tensor_by_name(request, INPUT_IMAGE)
            data = image_t.as_numpy().reshape(-1) if image_t is not None else np.array([])
            if data.size != 1:
                raise InputError(f"{INPUT_IMAGE} must hold exactly one encoded image, got {data.size} elements")
            raw = data[0]
            raw = raw if isinstance(raw, (bytes, bytearray)) else bytes(raw)
            size = len(raw)
            params_t = self.pb.get_input_tensor_by_name(request, INPUT_PARAMS)
            values = params_t.as_numpy().reshape(-1) if params_t is not None else np.array([])
            options = RequestOptions.from_mapping(parse_params(values[0] if values.size else None))
            response = anonymize_bytes(
                self.anonymizer, raw, options, name=INPUT_IMAGE, limits=self.limits, cancelled=cancelled_of(request)
            )
            report = response.report
            report.request_id = request_id
            report.server_total_ms = round((time.perf_counter() - t0) * 1e3, 3)
            # when and where it was served: tests prove concurrency by overlapping intervals, not by timing
            report.server_interval = {"pid": os.getpid(), "start_ns": start_ns, "end_ns": time.monotonic_ns()}
            # a withheld image (gate rejection, or no face with on_no_face=fail) comes back as an empty IMAGE
            result = self.pb.InferenceResponse(
                output_tensors=[
                    self.pb.Tensor(OUTPUT_IMAGE, np.array([[response.image]], dtype=np.object_)),
                    self.pb.Tensor(OUTPUT_REPORT, np.array([[report.to_json().encode()]], dtype=np.object_)),
                ]
            )
            outcome, kind = ("rejected" if response.withheld else "ok"), None
        except Exception as exc:  # one request's failure never takes down the model
            kind = error_kind(exc)
            outcome, report = outcome_of(kind), None
            result = self._error(exc, request_id)
        self._account(request_id, outcome, kind, size, report, time.perf_counter() - t0)
        return result

    def _account(self, request_id, outcome, kind, size, report, seconds) -> None:
        """The request's metrics and its log line; a failure here is logged, never the client's problem."""
        try:
            if self.metrics is not None:
                self.metrics.request(outcome, seconds, report)
            REQUEST_LOG.info(request_log_line(request_id, outcome, kind, size, report, seconds))
        except Exception:
            LOG.exception("request %s: could not record its metrics", request_id)


def cancelled_of(request):
    """The request's ``is_cancelled`` (a message to the server), one thread at a time; None without one."""
    if not hasattr(request, "is_cancelled"):
        return None

    def cancelled() -> bool:
        with STUB_MESSAGE_LOCK:
            return request.is_cancelled()

    return cancelled


def error_kind(exc: BaseException) -> str:
    return exc.kind if isinstance(exc, RevpersError) else "internal"


def request_log_line(request_id: str, outcome: str, kind: str | None, size: int | None, report, seconds: float) -> str:
    """The one structured (JSON) log line of a request."""
    line = {
        "event": "request",
        "request_id": request_id,
        "outcome": outcome,
        "bytes": size,
        "faces": len(report.faces) if report is not None else None,
        "verdict": report.verdict.value if report is not None else None,
        "ms": round(seconds * 1e3, 1),
    }
    if kind is not None:
        line["error"] = kind
    return json.dumps(line, separators=(",", ":"))


def configure_logging() -> None:
    """Send revpers.serving's records (the per-request lines, errors with tracebacks) to stderr,
    which reaches the server log; the stub's Python logging has no handler of its own."""
    logger = logging.getLogger("revpers.serving")
    if not any(getattr(h, "revpers", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.revpers = True
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def request_id_of(request) -> str:
    """The client's request id when it sent one (tritonclient ``request_id``), else a new one."""
    given = request.request_id() if hasattr(request, "request_id") else ""
    return given or uuid.uuid4().hex[:16]
