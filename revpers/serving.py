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

import json
import os
import time
import traceback
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.dlpack import from_dlpack

from .bundle import load_bundle
from .component_models import synchronize, use_device
from .conditioning import TextEmbedding
from .faces.analysis import ArcFaceRecognizer
from .schedule import NoiseSchedule

UNET_INPUTS = ("text", "pooled", "time_ids", "identity", "ip_scale")


class TextEncoders:
    """SDXL's two CLIP text encoders from the bundle, in process, cached per prompt."""

    def __init__(self, bundle, device: str = "cpu"):
        from diffusers import StableDiffusionXLPipeline

        from .models import TextEncoderCache

        pipe = StableDiffusionXLPipeline.from_pretrained(bundle.sdxl_dir, unet=None, vae=None, local_files_only=True,
                                                         add_watermarker=False,
                                                         torch_dtype=torch.float16 if device != "cpu" else None)
        pipe.to(device)
        self.cache = TextEncoderCache(pipe, device)

    def __call__(self, prompt: str) -> TextEmbedding:
        return self.cache(prompt)


class TritonComponents:
    """``pipeline.Components`` over the served component models (BLS calls, DLPack tensors)."""

    def __init__(self, bundle, pb_utils, max_batch: dict[str, int], device: str = "cpu"):
        self.pb = pb_utils
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
        feeds = {"sample": x.float(), "timestep": t.to(torch.int64).reshape(-1, 1)}
        for k in UNET_INPUTS:
            v = cond[k].float()
            feeds[k] = v.reshape(-1, 1) if k == "ip_scale" else v
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
                 device: str = "cpu", threads: int = 8):
        """``max_batch``: each served component's max batch (from the repository config)."""
        from .anonymizer import Anonymizer
        from .faces import load_face_analyzer

        self.pb = pb_utils
        bundle = load_bundle(bundle_path)
        self.components = TritonComponents(bundle, pb_utils, max_batch, device)
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

    def _error(self, message: str, invalid: bool = True):
        code = self.pb.TritonError.INVALID_ARG if invalid else self.pb.TritonError.INTERNAL
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def handle(self, request):
        from .images import ImageError, decode_image, encode_image
        from .audit import add_byte_hashes
        from .pipeline import ParameterError, Params
        from .verify import pop_verify_policy

        t0, start_ns = time.perf_counter(), time.monotonic_ns()
        try:
            image_t = self.pb.get_input_tensor_by_name(request, "IMAGE")
            data = image_t.as_numpy().reshape(-1) if image_t is not None else np.array([])
            if data.size != 1:
                return self._error(f"IMAGE must hold exactly one encoded image, got {data.size} elements")
            raw = data[0]
            raw = raw if isinstance(raw, (bytes, bytearray)) else bytes(raw)
            params_t = self.pb.get_input_tensor_by_name(request, "PARAMS")
            options = {}
            if params_t is not None:
                values = params_t.as_numpy().reshape(-1)
                if values.size:
                    try:
                        options = json.loads(values[0] or b"{}")
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        return self._error(f"PARAMS is not valid JSON: {exc}")
                    if not isinstance(options, dict):
                        return self._error("PARAMS must be a JSON object")
            mode = options.pop("mode", "photo")
            fmt = str(options.pop("format", "png")).upper()
            if mode not in ("photo", "aligned"):
                return self._error(f"mode must be 'photo' or 'aligned', got {mode!r}")
            if fmt not in ("PNG", "JPEG", "JPG", "WEBP"):
                return self._error(f"format must be png, jpeg or webp, got {fmt.lower()!r}")
            verify = pop_verify_policy(options)  # the gate's keys: verify, retries, retry_mode, guidance_step, fallback
            params = Params.from_mapping(options)
            rgb = decode_image(raw, name="IMAGE")
            decode_ms = (time.perf_counter() - t0) * 1e3
            if mode == "aligned":
                result = self.anonymizer.anonymize_aligned(rgb, params, verify=verify)
            else:
                result = self.anonymizer.anonymize_photo(rgb, params, verify=verify)
            t1 = time.perf_counter()
            # a rejected image (report["verdict"] == "rejected") comes back as an empty IMAGE
            out = encode_image(result.image, fmt) if result.image is not None else b""
            report = add_byte_hashes(dict(result.report), raw, out)
            report.setdefault("timings_ms", {}).update({"decode": round(decode_ms, 3),
                                                        "encode": round((time.perf_counter() - t1) * 1e3, 3)})
            report["server_total_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
            # when this instance (process) worked on the request, on the host's CLOCK_MONOTONIC: two
            # requests of one instance whose intervals overlap were served at the same time
            report["server_interval"] = {"pid": os.getpid(), "start_ns": start_ns, "end_ns": time.monotonic_ns()}
            return self.pb.InferenceResponse(output_tensors=[
                self.pb.Tensor("IMAGE", np.array([[out]], dtype=np.object_)),
                self.pb.Tensor("REPORT", np.array([[json.dumps(report).encode()]], dtype=np.object_))])
        except (ImageError, ParameterError) as exc:
            return self._error(str(exc))
        except Exception as exc:  # one request's failure never takes down the model
            return self._error(f"internal error: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
                               invalid=False)
