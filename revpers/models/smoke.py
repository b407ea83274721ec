"""Smoke bundles: randomly initialised models of the real architectures.

They have the same folder layout as a real bundle and load through the same code
(``StableDiffusionXLPipeline.from_pretrained``, ``load_ip_adapter``, insightface's ArcFace runner).
Two sizes:

- tiny (default): small configs, so tests and the demo exercise every real code path on a 2-core CPU;
- full (``full_size=True``, ``revpers smoke-model DIR --full-size``): SDXL base's UNet, VAE and both
  CLIP text encoders at their real sizes (only the vocabulary is the small byte-level one) and a
  rank-128 FaceID LoRA, at 1024 px. Speed and memory do not depend on weight values, so every
  benchmark and deployment path (export, TensorRT engines, Triton) can be measured at full size
  with no weights to download. About 7.5 GB on disk (UNet and text encoders stored in fp16).

Their outputs are noise, not faces: every report made with one says ``"smoke": true``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from revpers.models.architecture import SDXL_UNET_CONFIG, SDXL_VAE_CONFIG, faceid_layout
from revpers.models.bundle import write_manifest

SMOKE_NATIVE_SIZE = 64  # face crop size in px -> 8x8 latents
SMOKE_EMBED_DIM = 512  # the ArcFace contract, kept at full size (the projection is tiny)
SMOKE_LORA_RANK = 4
# A default-initialised random UNet is chaotic under w = -10 guidance: float rounding of 1e-7 in
# its inputs grows to 0.6 in the latents over 100 steps (measured), whereas a trained epsilon model
# contracts such perturbations. Scaling the random output layer by 0.1 gives the smoke UNet a small
# Jacobian like a trained one (reconstruction error 2e-6 at the defaults, measured) while the
# identity still changes the output clearly.
SMOKE_EPS_GAIN = 0.1
# The FaceID projection gets non-zero biases (and a LayerNorm off its identity initialisation), as
# trained weights have: the null identity (a zero vector) then projects to non-zero tokens, so the
# IP-Adapter term and its scale act in the inversion too, as with the real adapter. With zero biases
# the null identity gave exactly zero tokens and the IP scale had no effect on the noise maps.
SMOKE_NORM_SPREAD = 0.1

SMOKE_UNET = dict(
    sample_size=SMOKE_NATIVE_SIZE // 8,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    use_linear_projection=True,
    cross_attention_dim=64,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80,
    norm_num_groups=32,
)
SMOKE_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    sample_size=SMOKE_NATIVE_SIZE,
    scaling_factor=0.13025,
    force_upcast=True,
)
FULL_NATIVE_SIZE = 1024  # SDXL's native resolution -> 128x128 latents
FULL_LORA_RANK = 128  # as in ip-adapter-faceid_sdxl.bin
SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    num_train_timesteps=1000,
    prediction_type="epsilon",
    steps_offset=1,
    timestep_spacing="leading",
    interpolation_type="linear",
    use_karras_sigmas=False,
)


def _byte_level_vocab() -> tuple[dict[str, int], str]:
    """A CLIP-format byte-level vocabulary with no merges (every character is a token)."""
    # GPT-2/CLIP byte-to-character table: printable bytes map to themselves, the rest to 256+
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    chars = [table[b] for b in range(256)]
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, "#version: 0.2\n"


def _write_tokenizer(folder: Path) -> int:
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = _byte_level_vocab()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text(merges)
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
            }
        )
    )
    tok = CLIPTokenizer.from_pretrained(folder)
    if len(tok) != len(vocab):
        raise RuntimeError(f"smoke tokenizer has {len(tok)} tokens, expected {len(vocab)}")
    tok.save_pretrained(folder)
    return len(vocab)


# SDXL base's text encoders: CLIP ViT-L/14 text (768-d, 12 layers) and OpenCLIP ViT-bigG/14 text
# (1280-d, 32 layers, projection 1280)
_FULL_TEXT = (
    dict(
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
        projection_dim=768,
        hidden_act="quick_gelu",
    ),
    dict(
        hidden_size=1280,
        intermediate_size=5120,
        num_hidden_layers=32,
        num_attention_heads=20,
        projection_dim=1280,
        hidden_act="gelu",
    ),
)
_TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=3,
    num_attention_heads=4,
    projection_dim=32,
    hidden_act="gelu",
)


def _text_config(vocab_size: int, projection: bool, full_size: bool = False):
    """Config of SDXL's first (``projection=False``) or second text encoder, tiny or full size."""
    from transformers import CLIPTextConfig

    shape = _FULL_TEXT[int(projection)] if full_size else _TINY_TEXT
    return CLIPTextConfig(
        vocab_size=vocab_size,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        **shape,
    )


def architecture(full_size: bool = False) -> dict:
    """UNet/VAE configs, face size and LoRA rank of a tiny or a full-size smoke bundle."""
    if full_size:
        return {
            "unet": dict(SDXL_UNET_CONFIG),
            "vae": dict(SDXL_VAE_CONFIG),
            "native_size": FULL_NATIVE_SIZE,
            "lora_rank": FULL_LORA_RANK,
        }
    return {
        "unet": dict(SMOKE_UNET),
        "vae": dict(SMOKE_VAE),
        "native_size": SMOKE_NATIVE_SIZE,
        "lora_rank": SMOKE_LORA_RANK,
    }


class _SmokeArcFace(torch.nn.Module):
    """ArcFace contract: (N, 3, 112, 112) normalised BGR -> (N, 512) embedding."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 5, stride=4, padding=2),
            torch.nn.PReLU(8),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1),
            torch.nn.PReLU(16),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
            torch.nn.PReLU(32),
            torch.nn.AvgPool2d(7),
            torch.nn.Flatten(),
            torch.nn.Linear(32, dim),
        )

    def forward(self, x):
        return self.net(x)


def _write_arcface(path: Path, dim: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    model = _SmokeArcFace(dim).eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 112, 112),),
        str(path),
        input_names=["input.1"],
        output_names=["embedding"],
        dynamic_axes={"input.1": {0: "N"}, "embedding": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )


def write_smoke_bundle(
    root: str | Path, seed: int = 0, overwrite: bool = False, full_size: bool = False, device: str = "cpu"
) -> Path:
    """Write a complete smoke bundle to ``root`` (deterministic for a given seed and device).

    ``full_size``: SDXL-size models (see the module docstring); ``device`` is where the random
    weights are drawn (a full-size bundle took 65 s and 13.6 GB of memory on 2 CPU cores).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    root = Path(root).expanduser().resolve()
    if root.exists() and any(root.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{root} exists and is not empty (use --force to replace it)")
        shutil.rmtree(root)
    root.mkdir(parents=True, exist_ok=True)
    arch = architecture(full_size)
    stored = torch.float16 if full_size else torch.float32  # UNet and text encoders on disk (SDXL's VAE: fp32)

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**arch["unet"])
        with torch.no_grad():
            unet.conv_out.weight.mul_(SMOKE_EPS_GAIN)
            unet.conv_out.bias.mul_(SMOKE_EPS_GAIN)
        vae = AutoencoderKL(**arch["vae"])
    tok_dir = root / "_tokenizer"
    vocab_size = _write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
    with torch.device(device):
        text_encoder = CLIPTextModel(_text_config(vocab_size, False, full_size))
        text_encoder_2 = CLIPTextModelWithProjection(_text_config(vocab_size, True, full_size))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder.to(stored),
        text_encoder_2=text_encoder_2.to(stored),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet.to(stored),
        scheduler=EulerDiscreteScheduler(**SCHEDULER),
    )
    pipe.save_pretrained(root / "sdxl", safe_serialization=True)  # before any adapter is attached
    shutil.rmtree(tok_dir)

    gen = torch.Generator(device).manual_seed(seed + 1)
    state: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    layout = faceid_layout(unet, embed_dim=SMOKE_EMBED_DIM, lora_rank=arch["lora_rank"])
    for key, shape in layout.items():
        group, name = key.split(".", 1)
        value = torch.randn(shape, generator=gen, device=device)
        if name == "norm.weight":  # the projection's LayerNorm: near its identity initialisation
            value = 1.0 + SMOKE_NORM_SPREAD * value
        elif name == "norm.bias":
            value = SMOKE_NORM_SPREAD * value
        else:  # Linear weights and biases at the scale of their layer's fan-in
            fan_in = layout[key[: -len("bias")] + "weight"][-1] if key.endswith(".bias") else shape[-1]
            value = value * fan_in**-0.5
        state[group][name] = value.to("cpu", stored).contiguous()
    del pipe, unet, vae, text_encoder, text_encoder_2
    ip_path = root / "ip_adapter" / "ip-adapter-faceid_sdxl.bin"
    ip_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, ip_path)

    torch.manual_seed(seed + 2)
    _write_arcface(root / "face_models" / "smoke_arcface.onnx", SMOKE_EMBED_DIM)

    if full_size:
        name, note = (
            f"smoke-fullsize-seed{seed}",
            "FULL-SIZE SMOKE BUNDLE: SDXL-size randomly initialised models; "
            "outputs are noise, not faces; for speed and memory measurements",
        )
    else:
        name, note = f"smoke-seed{seed}", "SMOKE BUNDLE: tiny randomly initialised models; outputs are noise, not faces"
    write_manifest(
        root,
        native_size=arch["native_size"],
        embedding_dim=SMOKE_EMBED_DIM,
        smoke=True,
        name=name,
        faces={"detector": "dlib", "recognizer": "face_models/smoke_arcface.onnx"},
        extra={"seed": seed, "full_size": full_size, "note": note},
    )
    return root
