"""Full-size (or tiny) model builders with random weights, for FLOP counts and GPU timings.

Speed does not depend on weight values, so the SDXL-architecture UNet (``SDXL_UNET_CONFIG``) with
the IP-Adapter FaceID attached as in production (identity projection 512 -> 4 tokens, IP K/V
projections on every cross-attention layer, the tensor-scale processor of ``revpers.models.torch_models``; the
FaceID LoRA is fused into the base weights in production, so it adds nothing here) and the SDXL VAE
(``SDXL_VAE_CONFIG``) are built from their configs: on the ``meta`` device (no memory, shapes only:
FLOP counting) or on CUDA (random weights: timing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from revpers.models.architecture import (
    FACEID_EMBED_DIM,
    FACEID_TOKENS,
    SDXL_UNET_CONFIG,
    SDXL_VAE_CONFIG,
    attention_layers,
)
from revpers.models.smoke import architecture
from revpers.models.torch_models import FaceIDUNet, install_tensor_scale


@dataclass(frozen=True)
class Shapes:
    """Conditioning shapes a UNet config implies."""

    text_len: int
    text_dim: int
    pooled_dim: int
    time_ids: int
    embed_dim: int
    latent_channels: int

    @classmethod
    def of(cls, config: dict, embed_dim: int = FACEID_EMBED_DIM) -> "Shapes":
        time_ids = 6
        pooled = config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
        return cls(77, config["cross_attention_dim"], pooled, time_ids, embed_dim, config["in_channels"])


def tiny_configs() -> tuple[dict, dict, int]:
    """The smoke bundle's UNet/VAE configs and native size (the ``--tiny`` dry mode)."""
    arch = architecture(full_size=False)
    return arch["unet"], arch["vae"], arch["native_size"]


def faceid_unet(
    config: dict | None = None,
    device: str | torch.device = "meta",
    dtype: torch.dtype = torch.float16,
    embed_dim: int = FACEID_EMBED_DIM,
    num_tokens: int = FACEID_TOKENS,
):
    """``revpers.models.FaceIDUNet`` around a random-weight UNet of ``config`` (default SDXL)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0, IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import IPAdapterFaceIDImageProjection, MultiIPAdapterImageProjection

    config = dict(config or SDXL_UNET_CONFIG)
    ctx = config["cross_attention_dim"]
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
        procs = {}
        for _idx, name, attn in attention_layers(unet):
            if name.endswith("attn2.processor"):
                procs[name] = IPAdapterAttnProcessor2_0(
                    hidden_size=attn.to_k.out_features, cross_attention_dim=ctx, num_tokens=(num_tokens,), scale=1.0
                )
            else:
                procs[name] = AttnProcessor2_0()
        unet.set_attn_processor(procs)
        unet.encoder_hid_proj = MultiIPAdapterImageProjection(
            [
                IPAdapterFaceIDImageProjection(
                    image_embed_dim=embed_dim, cross_attention_dim=ctx, mult=2, num_tokens=num_tokens
                )
            ]
        )
    unet.config.encoder_hid_dim_type = "ip_image_proj"  # what diffusers' load_ip_adapter sets
    slot = install_tensor_scale(unet)
    return FaceIDUNet(unet.to(dtype=dtype), slot).eval()


def vae(config: dict | None = None, device: str | torch.device = "meta", dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    with torch.device(device):
        model = AutoencoderKL(**dict(config or SDXL_VAE_CONFIG))
    return model.to(dtype=dtype).eval()


def unet_inputs(
    config: dict, batch: int, latent: int, device="meta", dtype=torch.float16, embed_dim: int = FACEID_EMBED_DIM
) -> tuple:
    """(sample, timestep, text, pooled, time_ids, identity, ip_scale) for ``FaceIDUNet.forward``."""
    s = Shapes.of(config, embed_dim)
    kw = {"device": device, "dtype": dtype}
    return (
        torch.randn(batch, s.latent_channels, latent, latent, **kw),
        torch.full((batch,), 299, dtype=torch.int64, device=device),
        torch.randn(batch, s.text_len, s.text_dim, **kw),
        torch.randn(batch, s.pooled_dim, **kw),
        torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch, **kw),
        torch.randn(batch, embed_dim, **kw),
        torch.ones(batch, **kw),
    )
