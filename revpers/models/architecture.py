"""Architecture-level facts shared by loading, smoke models, export and benchmarks.

``SDXL_UNET_CONFIG`` is SDXL base 1.0's UNet configuration (public), used to build the full-size
architecture on the meta device (no weights) for shape checks, FLOP counts and GPU timings with
random weights. ``faceid_layout`` gives the key layout and shapes of an IP-Adapter FaceID file for
a given UNet, in the original file's naming, so a smoke file can be written and a real file checked.
"""

from __future__ import annotations

from revpers.core.errors import BundleError

SDXL_UNET_CONFIG = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

SDXL_VAE_CONFIG = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

FACEID_EMBED_DIM = 512  # ArcFace R50 (buffalo_l w600k_r50) embedding size
FACEID_TOKENS = 4  # identity tokens produced by the FaceID projection
FACEID_LORA_RANK = 128  # rank of the LoRA shipped in ip-adapter-faceid_sdxl.bin


def attention_layers(unet) -> list[tuple[int, str, object]]:
    """(processor index, processor name, Attention module) in ``unet.attn_processors`` order."""
    out = []
    for idx, name in enumerate(unet.attn_processors.keys()):
        out.append((idx, name, unet.get_submodule(name[: -len(".processor")])))
    return out


def cross_attention_layers(unet) -> list[tuple[int, str, object]]:
    return [row for row in attention_layers(unet) if row[1].endswith("attn2.processor")]


def faceid_layout(
    unet,
    embed_dim: int = FACEID_EMBED_DIM,
    num_tokens: int = FACEID_TOKENS,
    lora_rank: int = FACEID_LORA_RANK,
    hidden_mult: int = 2,
) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an IP-Adapter FaceID (SDXL) file for ``unet``, in the original layout.

    image_proj: MLP Linear(E -> mult*E) -> GELU -> Linear(mult*E -> tokens*ctx) -> LayerNorm(ctx).
    ip_adapter.{i}: for every attention processor i (self- and cross-attention alternate, so
    cross-attention layers have odd i) LoRA down/up for q, k, v, out; cross-attention layers also
    carry to_k_ip / to_v_ip (ctx -> hidden).
    """
    ctx = unet.config.cross_attention_dim
    if isinstance(ctx, (list, tuple)):
        raise BundleError("per-block cross_attention_dim is not supported by IP-Adapter FaceID")
    hidden = hidden_mult * embed_dim
    layout: dict[str, tuple[int, ...]] = {
        "image_proj.proj.0.weight": (hidden, embed_dim),
        "image_proj.proj.0.bias": (hidden,),
        "image_proj.proj.2.weight": (num_tokens * ctx, hidden),
        "image_proj.proj.2.bias": (num_tokens * ctx,),
        "image_proj.norm.weight": (ctx,),
        "image_proj.norm.bias": (ctx,),
    }
    for idx, name, attn in attention_layers(unet):
        cross = name.endswith("attn2.processor")
        if cross != (idx % 2 == 1):
            raise BundleError(
                f"attention processors do not alternate self/cross at {name}: "
                "the FaceID key layout cannot be mapped onto this UNet"
            )
        q_in, q_out = attn.to_q.in_features, attn.to_q.out_features
        k_in = attn.to_k.in_features
        o_in, o_out = attn.to_out[0].in_features, attn.to_out[0].out_features
        for proj, (fan_in, fan_out) in {
            "to_q": (q_in, q_out),
            "to_k": (k_in, attn.to_k.out_features),
            "to_v": (attn.to_v.in_features, attn.to_v.out_features),
            "to_out": (o_in, o_out),
        }.items():
            layout[f"ip_adapter.{idx}.{proj}_lora.down.weight"] = (lora_rank, fan_in)
            layout[f"ip_adapter.{idx}.{proj}_lora.up.weight"] = (fan_out, lora_rank)
        if cross:
            layout[f"ip_adapter.{idx}.to_k_ip.weight"] = (attn.to_k.out_features, ctx)
            layout[f"ip_adapter.{idx}.to_v_ip.weight"] = (attn.to_v.out_features, ctx)
    return layout


def faceid_layout_for(shapes: dict[str, tuple[int, ...]], unet) -> dict[str, tuple[int, ...]]:
    """The layout ``faceid_layout`` gives for ``unet`` with the embedding size, projection width,
    token count and LoRA rank read from a file's own shapes (flat ``group.key`` -> shape)."""
    ctx = unet.config.cross_attention_dim
    embed_dim = shapes.get("image_proj.proj.0.weight", (0, FACEID_EMBED_DIM))[1]
    hidden = shapes.get("image_proj.proj.0.weight", (2 * embed_dim,))[0]
    rank = next((s[0] for k, s in shapes.items() if k.endswith("to_q_lora.down.weight")), FACEID_LORA_RANK)
    return faceid_layout(
        unet,
        embed_dim=embed_dim,
        lora_rank=rank,
        hidden_mult=max(1, hidden // max(embed_dim, 1)),
        num_tokens=shapes.get("image_proj.proj.2.weight", (FACEID_TOKENS * ctx,))[0] // ctx,
    )


def check_faceid_file(state: dict, unet) -> None:
    """Raise ValueError naming the first mismatches between a loaded FaceID file and the UNet."""
    flat = {
        f"{group}.{k}": tuple(v.shape)
        for group in ("image_proj", "ip_adapter")
        for k, v in state.get(group, {}).items()
    }
    want = faceid_layout_for(flat, unet)
    bad = [f"{k}: file {flat.get(k)} vs UNet {s}" for k, s in want.items() if flat.get(k) != s]
    extra = [k for k in flat if k not in want]
    if bad or extra:
        raise BundleError(
            "IP-Adapter FaceID file does not match the UNet: "
            + "; ".join((bad + [f"unexpected {k}" for k in extra])[:5])
            + (f" (and {len(bad) + len(extra) - 5} more)" if len(bad) + len(extra) > 5 else "")
        )
