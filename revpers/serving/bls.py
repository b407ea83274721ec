"""The Triton BLS side: components that call the served models, and request handling.

``TritonComponents`` satisfies ``pipeline.Components`` by sending BLS requests to the `unet`,
`vae_encoder` and `vae_decoder` models (split to each model's max batch). Tensors cross the BLS
boundary by DLPack in both directions, so on a GPU instance the latents stay on the device for the
whole inversion and generation (the sampling math runs there too); on the CPU it is zero-copy.
The ArcFace embedding of each face crop is computed by the served `arcface` model
(``ServedArcFace``); detection and landmarks run in this process. The prompt encoders run here
too (prompts are cached).

``BlsService`` turns Triton requests into ``Anonymizer.anonymize_photo``/``anonymize_aligned``
and back, INVALID_ARGUMENT for bad input. It serves the requests of one ``execute`` call
concurrently from a thread pool: their UNet calls reach the `unet` model's dynamic batcher together
and are merged into larger batches there (the BLS model has its own dynamic batcher, so Triton
hands it every request that is waiting).
"""

from __future__ import annotations

import logging
import os
import time
import traceback
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack

from revpers.core.conditioning import TextEmbedding
from revpers.core.errors import InputError, RevpersError
from revpers.core.schedule import NoiseSchedule
from revpers.faces import load_face_analyzer
from revpers.faces.analysis import ArcFaceRecognizer
from revpers.models.bundle import load_bundle
from revpers.models.components import input_names, specs_from_bundle
from revpers.models.torch_models import TextEncoderCache
from revpers.service.anonymizer import Anonymizer
from revpers.service.request import Limits, RequestOptions, anonymize_bytes, parse_params
from revpers.serving.components import synchronize, use_device
from revpers_client.protocol import INPUT_IMAGE, INPUT_PARAMS, OUTPUT_IMAGE, OUTPUT_REPORT

LOG = logging.getLogger("revpers.serving")

# gRPC status of a failed request, by the kind of its RevpersError (revpers.core.errors)
GRPC_STATUS = {"input": "INVALID_ARG", "parameter": "INVALID_ARG", "limit": "INVALID_ARG",
               "cancelled": "CANCELLED", "dependency": "INTERNAL", "bundle": "INTERNAL", "face_model": "INTERNAL", "internal": "INTERNAL"}


class TextEncoders:
    """SDXL's two CLIP text encoders from the bundle, in process, cached per prompt."""

    def __init__(self, bundle, device: str = "cpu"):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(bundle.sdxl_dir, unet=None, vae=None, local_files_only=True,
                                                         add_watermarker=False, variant=bundle.sdxl_variant,
                                                         torch_dtype=torch.float16 if device != "cpu" else None)
        pipe.to(device)
        self.cache = TextEncoderCache(pipe, device)

    def __call__(self, prompt: str) -> TextEmbedding:
        return self.cache(prompt)


class TritonComponents:
    """``pipeline.Components`` over the served component models (BLS calls, DLPack tensors)."""

    def __init__(self, bundle, pb_utils, max_batch: dict[str, int], device: str = "cpu", inversion_batch: int = 10):
        self.pb = pb_utils
        unet = next(s for s in specs_from_bundle(bundle, inversion_batch) if s.name == "unet")
        self.unet_inputs = input_names(unet)  # the served UNet's feed order, from the registry
        self.max_batch = max_batch
        self.math_device = device
        self.text = TextEncoders(bundle, device)
        self.schedule = NoiseSchedule.from_scheduler_config(dict(self.text.cache.pipe.scheduler.config))
        self.device = f"triton ({device} BLS)"
        self._request_kwargs = {}
        if device.startswith("cuda") and hasattr(pb_utils, "PreferredMemory"):
            index = torch.device(device).index or 0
            self._request_kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU,
                                                                                index)

    def infer(self, model: str, inputs: dict[str, torch.Tensor], output: str) -> torch.Tensor:
        """One BLS call per slice of at most the model's max batch; returns the output on the math device."""
        n = next(iter(inputs.values())).shape[0]
        step = self.max_batch.get(model, n) or n
        parts = []
        for start in range(0, n, step):
            values = {k: v[start:start + step].contiguous() for k, v in inputs.items()}
            synchronize(list(values.values()))  # the component reads them from another process
            tensors = [self.pb.Tensor.from_dlpack(k, v) for k, v in values.items()]
            resp = self.pb.InferenceRequest(model_name=model, requested_output_names=[output], inputs=tensors,
                                            **self._request_kwargs).exec()
            if resp.has_error():
                raise RuntimeError(f"{model}: {resp.error().message()}")
            # the capsule keeps the response's buffer alive; cat copies it into memory we own
            parts.append(from_dlpack(self.pb.get_output_tensor_by_name(resp, output).to_dlpack()))
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


class ServedArcFace(ArcFaceRecognizer):
    """The bundle's ArcFace, run by the served `arcface` model: faces are aligned and normalised
    here (insightface's norm_crop, exactly as in process), the network runs on Triton."""

    def __init__(self, local: ArcFaceRecognizer, components: TritonComponents):
        self.__dict__.update(local.__dict__)
        self.components = components

    def features(self, blob: np.ndarray) -> np.ndarray:
        out = self.components.infer("arcface", {"input.1": torch.from_numpy(blob)}, "embedding")
        return out.cpu().numpy()


class BlsService:
    def __init__(self, bundle_path: str, inversion_batch: int, pb_utils, max_batch: dict[str, int],
                 device: str = "cpu", threads: int = 8, limits: Limits = Limits()):
        """``max_batch``: each served component's max batch (from the repository config)."""

        self.pb = pb_utils
        self.limits = limits
        bundle = load_bundle(bundle_path)
        self.components = TritonComponents(bundle, pb_utils, max_batch, device, inversion_batch)
        analyzer = load_face_analyzer(bundle.faces, bundle.root)
        analyzer.recognizer = ServedArcFace(analyzer.recognizer, self.components)
        self.anonymizer = Anonymizer(bundle, inversion_batch=inversion_batch, models=self.components,
                                     analyzer=analyzer)
        self.anonymizer.verifier  # load the gate's recognizers now, not in a request thread
        self.pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="revpers-request",
                                       initializer=use_device, initargs=(device,))

    def execute(self, requests) -> list:
        """All requests of one execute call, concurrently; responses in request order."""
        if len(requests) == 1:
            return [self.handle(requests[0])]
        return list(self.pool.map(self.handle, requests))

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _error(self, exc: BaseException, request_id: str):
        """The client's answer to a failed request: its status from the error's kind (one table,
        ``GRPC_STATUS``) and a message without server internals; anything that is not a
        RevpersError is logged here with its traceback and reaches the client as INTERNAL with the
        request id only."""
        kind = exc.kind if isinstance(exc, RevpersError) else "internal"
        if kind == "internal":
            LOG.error("request %s failed: %s", request_id, "".join(traceback.format_exception(exc)).rstrip())
            message = f"internal error (request id {request_id}); the server log has the details"
        else:
            message = str(exc)
        code = getattr(self.pb.TritonError, GRPC_STATUS.get(kind, "INTERNAL"))
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def handle(self, request):
        t0, start_ns = time.perf_counter(), time.monotonic_ns()
        request_id = request_id_of(request)
        try:
            image_t = self.pb.get_input_tensor_by_name(request, INPUT_IMAGE)
            data = image_t.as_numpy().reshape(-1) if image_t is not None else np.array([])
            if data.size != 1:
                raise InputError(f"{INPUT_IMAGE} must hold exactly one encoded image, got {data.size} elements")
            raw = data[0]
            raw = raw if isinstance(raw, (bytes, bytearray)) else bytes(raw)
            params_t = self.pb.get_input_tensor_by_name(request, INPUT_PARAMS)
            values = params_t.as_numpy().reshape(-1) if params_t is not None else np.array([])
            options = RequestOptions.from_mapping(parse_params(values[0] if values.size else None))
            response = anonymize_bytes(self.anonymizer, raw, options, name=INPUT_IMAGE, limits=self.limits,
                                       cancelled=request.is_cancelled if hasattr(request, "is_cancelled") else None)
            report = response.report
            report.request_id = request_id
            report.server_total_ms = round((time.perf_counter() - t0) * 1e3, 3)
            # when and where it was served: tests prove concurrency by overlapping intervals, not by timing
            report.server_interval = {"pid": os.getpid(), "start_ns": start_ns, "end_ns": time.monotonic_ns()}
            # a withheld image (gate rejection, or no face with on_no_face=fail) comes back as an empty IMAGE
            return self.pb.InferenceResponse(output_tensors=[
                self.pb.Tensor(OUTPUT_IMAGE, np.array([[response.image]], dtype=np.object_)),
                self.pb.Tensor(OUTPUT_REPORT, np.array([[report.to_json().encode()]], dtype=np.object_))])
        except Exception as exc:  # one request's failure never takes down the model
            return self._error(exc, request_id)


def request_id_of(request) -> str:
    """The client's request id when it sent one (tritonclient ``request_id``), else a new one."""
    given = request.request_id() if hasattr(request, "request_id") else ""
    return given or uuid.uuid4().hex[:16]
