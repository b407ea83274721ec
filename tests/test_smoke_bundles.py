"""Full-size smoke bundles have SDXL's architecture (checked on the meta device: no memory, no weights).

Writing one takes 7.5 GB of disk, 13.6 GB of memory and a minute on the 2-core CPU (measured once by
hand, then loaded through TorchModels.load and run), so CI writes only tiny bundles (same function,
other configs); what a full-size bundle contains is pinned here against public figures.
"""

import math

import torch

from revpers.models.architecture import faceid_layout
from revpers.models.smoke import _byte_level_vocab, _text_config, architecture


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_full_size_smoke_models_are_sdxl_sized():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    arch = architecture(full_size=True)
    vocab = len(_byte_level_vocab()[0])
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"])
        vae = AutoencoderKL(**arch["vae"])
        te1 = CLIPTextModel(_text_config(vocab, False, full_size=True))
        te2 = CLIPTextModelWithProjection(_text_config(vocab, True, full_size=True))
    assert _params(unet) == 2_567_463_684  # SDXL base 1.0 UNet
    assert _params(vae) == 83_653_863  # SDXL VAE
    # CLIP ViT-L/14 text (123,060,480) and OpenCLIP bigG/14 text + projection (694,659,840) with
    # SDXL's 49,408-token vocabulary; the smoke tokenizer has `vocab` byte-level tokens instead
    assert _params(te1) == 123_060_480 - (49_408 - vocab) * 768
    assert _params(te2) == 694_659_840 - (49_408 - vocab) * 1280
    assert arch["native_size"] == 1024 and arch["unet"]["sample_size"] == 128
    # FaceID file: 535.5 M values = the published ip-adapter-faceid_sdxl.bin's 1.07 GB in fp16
    layout = faceid_layout(unet, lora_rank=arch["lora_rank"])
    assert sum(math.prod(s) for s in layout.values()) == 535_507_968


def test_tiny_smoke_models_stay_tiny():
    from diffusers import UNet2DConditionModel

    arch = architecture(full_size=False)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**arch["unet"])
    assert _params(unet) < 5_000_000 and arch["native_size"] == 64
