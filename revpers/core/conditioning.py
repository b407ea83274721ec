"""The guidance branch table of algorithm.md, as plain tensors.

A conditioning is a dict with per-face batch tensors:
``text`` (F, 77, D) prompt embeddings, ``pooled`` (F, P) pooled text embeddings,
``time_ids`` (F, 6) SDXL size conditioning, ``identity`` (F, E) identity embedding (fed through
the IP-Adapter's projection inside the UNet; a zero vector is the null identity) and
``ip_scale`` (F,) the IP-Adapter scale.

| pass       | uncond branch                                   | cond branch                   |
| inversion  | text zeros, identity zero                       | text CLIP(""), identity zero  |
| generation | text zeros or CLIP(prompt), identity zero       | text CLIP(""), identity ArcFace |
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TextEmbedding:
    """SDXL prompt encoding of one prompt: (1, 77, D) hidden states and (1, P) pooled."""

    text: torch.Tensor
    pooled: torch.Tensor

    def to(self, device) -> "TextEmbedding":
        return TextEmbedding(self.text.to(device), self.pooled.to(device))

    def zeros(self) -> "TextEmbedding":
        """SDXL's ``force_zeros_for_empty_prompt`` negative: all-zero embeddings of the same shape."""
        return TextEmbedding(torch.zeros_like(self.text), torch.zeros_like(self.pooled))


def time_ids(height: int, width: int) -> list[float]:
    """SDXL add_time_ids: (original H, W, crop top, crop left, target H, W)."""
    return [float(height), float(width), 0.0, 0.0, float(height), float(width)]


def _branch(text: TextEmbedding, identity: torch.Tensor, tids: torch.Tensor, ip_scale: torch.Tensor) -> dict:
    faces = identity.shape[0]
    return {
        "text": text.text.expand(faces, -1, -1).to(identity.dtype),
        "pooled": text.pooled.expand(faces, -1).to(identity.dtype),
        "time_ids": tids,
        "identity": identity,
        "ip_scale": ip_scale,
    }


def inversion_branches(
    empty: TextEmbedding,
    faces: int,
    identity_dim: int,
    size: tuple[int, int],
    ip_scale: float,
    dtype=torch.float32,
    device="cpu",
) -> tuple[dict, dict]:
    """Inversion: uncond = (zero text, null identity), cond = (CLIP(""), null identity)."""
    null_id = torch.zeros(faces, identity_dim, dtype=dtype, device=device)
    tids = torch.tensor([time_ids(*size)], dtype=dtype, device=device).expand(faces, 6)
    scale = torch.full((faces,), float(ip_scale), dtype=dtype, device=device)
    return _branch(empty.zeros(), null_id, tids, scale), _branch(empty, null_id, tids, scale)


def generation_branches(
    empty: TextEmbedding,
    identity: torch.Tensor,
    size: tuple[int, int],
    ip_scale: float,
    prompt: TextEmbedding | None = None,
) -> tuple[dict, dict]:
    """Generation: uncond = (zero text or CLIP(prompt), null identity), cond = (CLIP(""), identity)."""
    faces, dtype, device = identity.shape[0], identity.dtype, identity.device
    null_id = torch.zeros_like(identity)
    tids = torch.tensor([time_ids(*size)], dtype=dtype, device=device).expand(faces, 6)
    scale = torch.full((faces,), float(ip_scale), dtype=dtype, device=device)
    negative = prompt if prompt is not None else empty.zeros()
    return _branch(negative, null_id, tids, scale), _branch(empty, identity, tids, scale)
