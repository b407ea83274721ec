"""The three ways a photo request is run in the benchmarks.

* ``paper_way_request``: (a), the reference — the same models and the same math, run the way the
  paper's public code runs them: the SDXL + FaceID pipeline is loaded from disk for every image
  (``TorchModels.load``: ``from_pretrained`` + ``load_ip_adapter`` + LoRA fuse), the face models
  (dlib detector and landmarks, ArcFace) are loaded for every image — standing in for the
  insightface ``FaceAnalysis`` (detector + ArcFace) the paper's code loads to embed identities —
  faces go through the generator one at a time (batch 1 face, the two CFG branches batched at 2 as
  in the paper's code), the inversion makes one UNet call per step (``batch_steps=1``) and prompts
  are encoded on every use (prompt cache capacity 0).
* ``inprocess_request``: (b), our pipeline in process: models loaded once (``Anonymizer``), all faces
  of a photo in one generator batch, inversion batched ``inversion_batch`` steps per UNet call,
  prompt encodings cached.
* (c)/(d) go through ``client.RevpersClient`` to a running Triton server (see compare.py).

Each returns (encoded PNG bytes, report) with per-stage ``timings_ms``, ``request_total_ms`` and
``unet`` (the UNet calls the request made, ``common.count_unet_calls``); decode and encode are timed
the same way in all of them.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from revpers import faces as face_lib
from revpers.core.pipeline import Timings, count_unet_calls, run_faces
from revpers.faces import analysis
from revpers.models.bundle import load_bundle
from revpers.models.torch_models import TextEncoderCache, TorchModels
from revpers.service.anonymizer import _TimedAnalyzer
from revpers.service.images import decode_image, encode_image

# Timing here uses ``Timings.add`` directly: ``revpers.pipeline._Timer`` does the same as a context
# manager but is private to revpers (a public ``Timings.timer(stage)`` there would let these use it).


def _decode(raw: bytes, timings) -> np.ndarray:
    t0 = time.perf_counter()
    rgb = decode_image(raw, name="IMAGE")
    timings.add("decode", time.perf_counter() - t0)
    return rgb


def _encode(image: np.ndarray, timings) -> bytes:
    t0 = time.perf_counter()
    out = encode_image(image, "PNG")
    timings.add("encode", time.perf_counter() - t0)
    return out


def inprocess_request(anonymizer, raw: bytes, params, verify=None) -> tuple[bytes, dict]:
    """(b): decode -> ``Anonymizer.anonymize_photo`` -> PNG encode, models already loaded.
    ``verify``: the identity gate's policy (None: its default, on)."""
    timings = Timings()
    t0 = time.perf_counter()
    with count_unet_calls(anonymizer.models) as unet:
        rgb = _decode(raw, timings)
        result = anonymizer.anonymize_photo(rgb, params, verify=verify)
        out = _encode(result.image, timings)
    report = result.report.to_dict()
    report["timings_ms"] = {**report["timings_ms"], **timings.as_ms()}
    report["request_total_ms"] = round((time.perf_counter() - t0) * 1e3, 3)
    report["unet"] = unet.as_dict()
    return out, report


def paper_way_request(
    bundle_path: str | Path, raw: bytes, params, device: str = "cpu", unet_dtype=None
) -> tuple[bytes, dict]:
    """(a): everything loaded from disk for this image, faces one at a time, one UNet call per
    inversion step, no prompt cache. Same models, same math, same seeds as (b)."""

    timings = Timings()
    t0 = time.perf_counter()
    rgb = _decode(raw, timings)

    t1 = time.perf_counter()
    bundle = load_bundle(bundle_path)
    models = TorchModels.load(bundle, device, unet_dtype)
    # capacity 0: TextEncoderCache stores each encoding and at once evicts it (len 1 > 0), so every
    # prompt is encoded again on every use
    models = dataclasses.replace(models, text=TextEncoderCache(models.text.pipe, models.device, capacity=0))
    timings.add("load_pipeline", time.perf_counter() - t1)

    t2 = time.perf_counter()
    # stands in for the paper code's per-image insightface FaceAnalysis load (detector + ArcFace):
    # the dlib detector and landmark model are read from disk again, ArcFace gets a new session
    loaders = (analysis._shape_predictor, analysis._hog_prototype)
    for loader in (*loaders, analysis._hog_detector):
        loader.cache_clear()
    before = sum(loader.cache_info().misses for loader in loaders)
    analyzer = face_lib.load_face_analyzer(bundle.faces, bundle.root)
    face_models_read = sum(loader.cache_info().misses for loader in loaders) - before
    timings.add("load_face_models", time.perf_counter() - t2)

    n = bundle.native_size

    def generate(crops, identities):
        out = []
        for f, (crop, identity) in enumerate(zip(crops, identities)):  # one face per pipeline call
            out += run_faces(
                models, [crop], identity[None], params, n, inversion_batch=1, timings=timings, seeds=[params.seed + f]
            ).images
        return out

    t3 = time.perf_counter()
    with count_unet_calls(models) as unet:
        image, faces = face_lib.anonymize_photo(rgb, _TimedAnalyzer(analyzer, timings), generate, n)
    timings.add(
        "align_paste",
        time.perf_counter()
        - t3
        - sum(
            timings.stages.get(k, 0.0)
            for k in (
                "detect",
                "identity_embed",
                "prompt_encode",
                "vae_encode",
                "inversion",
                "generation",
                "vae_decode",
            )
        ),
    )
    out = _encode(image, timings)
    report = {
        "mode": "photo",
        "way": "paper",
        "faces": faces,
        "timings_ms": timings.as_ms(),
        "request_total_ms": round((time.perf_counter() - t0) * 1e3, 3),
        "unet": unet.as_dict(),
        "prompt_encodes": models.text.misses,
        "prompt_cache_hits": models.text.hits,
        "face_models_read_from_disk": face_models_read,
    }
    return out, report


def max_pixel_difference(png_a: bytes, png_b: bytes) -> int:
    a, b = decode_image(png_a), decode_image(png_b)
    if a.shape != b.shape:
        raise ValueError(f"outputs differ in shape: {a.shape} vs {b.shape}")
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
