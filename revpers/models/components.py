"""The component registry: one description per served component.

A ``ComponentSpec`` gives inputs (in the module's argument order), outputs, shapes, dtypes, batch
axis and precision; it drives ``torch.onnx.export`` (names, dynamic axes), the TensorRT
optimisation profiles (min/opt/max batch) and the generated Triton ``config.pbtxt``. Shapes are
concrete for a given bundle (image size fixed at the bundle's native face size) except the batch
axis, which is dynamic everywhere. ``module_dtype`` says in which dtype a component's PyTorch module
runs on a device, and
``revpers.models.torch_models.build_module`` which module implements it: the in-process models,
the pytorch serving target and the export all take them from there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import torch

TRITON_DTYPES = {"FP32": "TYPE_FP32", "FP16": "TYPE_FP16", "INT64": "TYPE_INT64", "UINT8": "TYPE_UINT8"}
NUMPY_DTYPES = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "UINT8": np.uint8}
TORCH_DTYPES = {"FP32": torch.float32, "FP16": torch.float16, "INT64": torch.int64, "UINT8": torch.uint8}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # FP32 / INT64 / ...
    shape: tuple[int, ...]  # without the batch axis

    def example(self, batch: int) -> torch.Tensor:
        if self.dtype == "INT64":
            return torch.randint(1, 1000, (batch, *self.shape), dtype=torch.int64)
        return torch.randn((batch, *self.shape), dtype=TORCH_DTYPES[self.dtype])

    @classmethod
    def from_triton(cls, t: dict) -> "TensorSpec":
        """From a tensor of a Triton model config as Triton hands it to a Python model (JSON; int64
        dims may be strings); a per-sample scalar is declared dims [1] with an empty reshape."""
        dtype = next(k for k, v in TRITON_DTYPES.items() if v == t["data_type"])
        return cls(t["name"], dtype, () if "reshape" in t else tuple(int(d) for d in t["dims"]))


@dataclass(frozen=True)
class ComponentSpec:
    name: str  # Triton model name and file stem
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str  # TensorRT build precision: "fp16" (UNet) or "fp32" (SDXL VAE, ArcFace)
    max_batch: int  # Triton max_batch_size and TensorRT profile max
    opt_batch: int  # TensorRT profile optimum
    preferred_batches: tuple[int, ...] = field(default=())
    description: str = ""

    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        return {t.name: {0: "batch"} for t in self.inputs + self.outputs}

    def profile(self, name: str) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        spec = next(t for t in self.inputs if t.name == name)
        return (1, *spec.shape), (self.opt_batch, *spec.shape), (self.max_batch, *spec.shape)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "precision": self.precision,
            "max_batch": self.max_batch,
            "opt_batch": self.opt_batch,
            "preferred_batches": list(self.preferred_batches),
            "inputs": [vars(t) | {"shape": list(t.shape)} for t in self.inputs],
            "outputs": [vars(t) | {"shape": list(t.shape)} for t in self.outputs],
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "ComponentSpec":
        return cls(
            d["name"],
            tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["inputs"]),
            tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in d["outputs"]),
            d["precision"],
            d["max_batch"],
            d["opt_batch"],
            tuple(d.get("preferred_batches", ())),
            d.get("description", ""),
        )


def faces_per_call(native_size: int) -> dict[str, int]:
    """Most faces per UNet call and per VAE call, by face size (the BLS splits larger calls).

    Small crops batch several faces per call. At SDXL's 1024 px one face's inversion call
    (2 x inversion_batch samples of 128x128 latents) is already a large, compute-bound batch, and the
    TensorRT backend reserves activation memory for an engine profile's max batch when it loads
    the engine; so above 512 px a UNet call carries one face's inversion call (a generation call, 2
    samples per face, still carries up to inversion_batch faces) and a fp32 VAE call two faces.
    """
    return {"unet": 4, "vae": 8} if native_size <= 512 else {"unet": 1, "vae": 2}


def unet_spec(
    latent: int,
    text_len: int,
    text_dim: int,
    pooled_dim: int,
    embed_dim: int,
    inversion_batch: int = 10,
    max_faces: int = 4,
) -> ComponentSpec:
    """FaceID UNet: CFG batch 2 per face per step in generation, 2 x inversion_batch in inversion."""
    max_batch = 2 * max(inversion_batch, 1) * max_faces
    return ComponentSpec(
        "unet",
        inputs=(
            TensorSpec("sample", "FP32", (4, latent, latent)),
            TensorSpec("timestep", "INT64", ()),
            TensorSpec("text", "FP32", (text_len, text_dim)),
            TensorSpec("pooled", "FP32", (pooled_dim,)),
            TensorSpec("time_ids", "FP32", (6,)),
            TensorSpec("identity", "FP32", (embed_dim,)),
            TensorSpec("ip_scale", "FP32", ()),
        ),
        outputs=(TensorSpec("eps", "FP32", (4, latent, latent)),),
        precision="fp16",
        max_batch=max_batch,
        opt_batch=2 * max(inversion_batch, 1),
        preferred_batches=(2, 2 * max(inversion_batch, 1)),
        description="SDXL UNet + IP-Adapter FaceID (LoRA fused, projection in graph, per-sample timestep and IP scale)",
    )


def vae_encoder_spec(size: int, max_faces: int = 8) -> ComponentSpec:
    return ComponentSpec(
        "vae_encoder",
        (TensorSpec("image", "FP32", (3, size, size)),),
        (TensorSpec("latent", "FP32", (4, size // 8, size // 8)),),
        "fp32",
        max_faces,
        1,
        description="SDXL VAE encoder (latent mode x scaling factor), fp32",
    )


def vae_decoder_spec(size: int, max_faces: int = 8) -> ComponentSpec:
    return ComponentSpec(
        "vae_decoder",
        (TensorSpec("latent", "FP32", (4, size // 8, size // 8)),),
        (TensorSpec("image", "FP32", (3, size, size)),),
        "fp32",
        max_faces,
        1,
        description="SDXL VAE decoder (divides by the scaling factor), fp32",
    )


def arcface_spec(embed_dim: int, max_faces: int = 16) -> ComponentSpec:
    return ComponentSpec(
        "arcface",
        (TensorSpec("input.1", "FP32", (3, 112, 112)),),
        (TensorSpec("embedding", "FP32", (embed_dim,)),),
        "fp32",
        max_faces,
        1,
        description="ArcFace-contract recognizer (normalised 112x112 BGR -> embedding)",
    )


def specs_from_bundle(bundle, inversion_batch: int = 10) -> list[ComponentSpec]:
    """Every served component's description, read from the bundle's config files alone (no weights
    loaded): SDXL concatenates both text encoders' hidden states and pools the second one's
    projection. Export, the repository and the BLS all use these."""

    def config(sub: str) -> dict:
        return json.loads((bundle.sdxl_dir / sub).read_text())

    te1, te2 = config("text_encoder/config.json"), config("text_encoder_2/config.json")
    text_len = int(config("tokenizer/tokenizer_config.json").get("model_max_length", te1["max_position_embeddings"]))
    n = bundle.native_size
    per_call = faces_per_call(n)
    return [
        unet_spec(
            n // 8,
            text_len,
            te1["hidden_size"] + te2["hidden_size"],
            te2["projection_dim"],
            bundle.embedding_dim,
            inversion_batch,
            per_call["unet"],
        ),
        vae_encoder_spec(n, per_call["vae"]),
        vae_decoder_spec(n, per_call["vae"]),
        arcface_spec(bundle.embedding_dim),
    ]


COMPONENTS = ("unet", "vae_encoder", "vae_decoder", "arcface")
# dtype each component's PyTorch module runs in, by device type; SDXL's VAE overflows in fp16
# (its config has force_upcast), so it stays fp32 everywhere; ArcFace is served from its ONNX file.
MODULE_DTYPES = {
    "unet": {"cpu": torch.float32, "cuda": torch.float16},
    "vae_encoder": {"cpu": torch.float32, "cuda": torch.float32},
    "vae_decoder": {"cpu": torch.float32, "cuda": torch.float32},
}


def module_dtype(component: str, device: str | torch.device) -> torch.dtype:
    """The dtype ``component``'s PyTorch module runs in on ``device``."""
    if component not in MODULE_DTYPES:
        raise ValueError(f"no PyTorch module for component {component!r}")
    return MODULE_DTYPES[component][torch.device(device).type if str(device) != "meta" else "cpu"]


def input_names(spec: ComponentSpec) -> list[str]:
    """The component's inputs in its module's argument order (the served model's feed order)."""
    return [t.name for t in spec.inputs]
