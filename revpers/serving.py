"""The Triton BLS side: components that call the served models, and request handling.

``TritonComponents`` satisfies ``pipeline.Components`` by sending BLS requests to the `unet`,
`vae_encoder` and `vae_decoder` models (split to each model's max batch); the prompt encoders run
in the BLS process (prompts are cached). ``BlsService`` turns a Triton request into
``Anonymizer.anonymize_photo``/``anonymize_aligned`` and back, with INVALID_ARGUMENT for bad input.
"""

from __future__ import annotations

import json
import time
import traceback

import numpy as np
import torch

from .bundle import load_bundle
from .conditioning import TextEmbedding
from .schedule import NoiseSchedule

UNET_INPUTS = ("text", "pooled", "time_ids", "identity", "ip_scale")


class TextEncoders:
    """SDXL's two CLIP text encoders from the bundle, in process, cached per prompt."""

    def __init__(self, bundle, device: str = "cpu"):
        from diffusers import StableDiffusionXLPipeline

        from .models import TextEncoderCache

        pipe = StableDiffusionXLPipeline.from_pretrained(bundle.sdxl_dir, unet=None, vae=None, local_files_only=True,
                                                         add_watermarker=False)
        self.cache = TextEncoderCache(pipe, device)

    def __call__(self, prompt: str) -> TextEmbedding:
        return self.cache(prompt)


class TritonComponents:
    def __init__(self, bundle, pb_utils, max_batch: dict[str, int]):
        self.pb = pb_utils
        self.max_batch = max_batch
        cfg = json.loads((bundle.sdxl_dir / "scheduler" / "scheduler_config.json").read_text())
        self.schedule = NoiseSchedule.from_scheduler_config(cfg)
        self.text = TextEncoders(bundle)
        self.device = "triton"
        self.unet_dtype = "served"
        self.unet_calls = 0

    def _infer(self, model: str, inputs: dict[str, np.ndarray], output: str) -> np.ndarray:
        n = next(iter(inputs.values())).shape[0]
        step = self.max_batch.get(model, n) or n
        parts = []
        for start in range(0, n, step):
            tensors = [self.pb.Tensor(k, np.ascontiguousarray(v[start:start + step])) for k, v in inputs.items()]
            resp = self.pb.InferenceRequest(model_name=model, requested_output_names=[output],
                                            inputs=tensors).exec()
            if resp.has_error():
                raise RuntimeError(f"{model}: {resp.error().message()}")
            parts.append(self.pb.get_output_tensor_by_name(resp, output).as_numpy())
        return np.concatenate(parts, axis=0)

    def denoise(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.unet_calls += 1
        feeds = {"sample": x.float().numpy(), "timestep": t.to(torch.int64).numpy().reshape(-1, 1)}
        for k in UNET_INPUTS:
            v = cond[k].float().numpy()
            feeds[k] = v.reshape(-1, 1) if k == "ip_scale" else v
        return torch.from_numpy(self._infer("unet", feeds, "eps").copy())

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._infer("vae_encoder", {"image": images.float().numpy()}, "latent").copy())

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._infer("vae_decoder", {"latent": latents.float().numpy()}, "image").copy())


class BlsService:
    def __init__(self, bundle_path: str, inversion_batch: int, pb_utils, max_batch: dict[str, int] | None = None):
        from .anonymizer import Anonymizer

        self.pb = pb_utils
        bundle = load_bundle(bundle_path)
        if max_batch is None:
            from export.components import unet_spec

            max_batch = {"unet": unet_spec(1, 1, 1, 1, 1, inversion_batch).max_batch, "vae_encoder": 8,
                         "vae_decoder": 8}
        self.components = TritonComponents(bundle, pb_utils, max_batch)
        self.anonymizer = Anonymizer(bundle, inversion_batch=inversion_batch, models=self.components)

    def _error(self, message: str, invalid: bool = True):
        code = self.pb.TritonError.INVALID_ARG if invalid else self.pb.TritonError.INTERNAL
        return self.pb.InferenceResponse(output_tensors=[], error=self.pb.TritonError(message, code))

    def handle(self, request):
        from .images import ImageError, decode_image, encode_image
        from .audit import add_byte_hashes
        from .pipeline import ParameterError, Params
        from .verify import pop_verify_policy

        t0 = time.perf_counter()
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
            verify = pop_verify_policy(options)  # issue 7: verify, retries, retry_mode, guidance_step, fallback
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
            return self.pb.InferenceResponse(output_tensors=[
                self.pb.Tensor("IMAGE", np.array([out], dtype=np.object_)),
                self.pb.Tensor("REPORT", np.array([json.dumps(report).encode()], dtype=np.object_))])
        except (ImageError, ParameterError) as exc:
            return self._error(str(exc))
        except Exception as exc:  # one request's failure never takes down the model
            return self._error(f"internal error: {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}",
                               invalid=False)
