"""The in-process service: load a bundle once, anonymize aligned faces or whole photos."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import __version__
from .bundle import Bundle, load_bundle
from .models import TorchModels
from .pipeline import Params, Timings, run_faces

SMOKE_WARNING = ("SMOKE WEIGHTS: this output was made with a smoke bundle (tiny random models); "
                 "it is noise, not an anonymized face")


def resize_rgb(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize (H,W,3) uint8 to (h, w) = size with Lanczos (no-op when already that size)."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.LANCZOS))


class _TimedAnalyzer:
    """Face analyzer proxy that adds its calls to the request's stage timings: ``detect`` (faces in
    the photo) and ``identity_embed`` (the face search in each aligned crop plus ArcFace)."""

    def __init__(self, analyzer, timings: Timings):
        self._analyzer, self._timings = analyzer, timings
        self.name = getattr(analyzer, "name", type(analyzer).__name__)
        if hasattr(analyzer, "detect_in_crop"):
            self.detect_in_crop = self._timed(analyzer.detect_in_crop, "identity_embed")

    def _timed(self, fn, stage: str):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._timings.add(stage, time.perf_counter() - t0)
        return call

    def detect(self, rgb):
        return self._timed(self._analyzer.detect, "detect")(rgb)

    def embed(self, rgb, faces):
        return self._timed(self._analyzer.embed, "identity_embed")(rgb, faces)

    def __getattr__(self, name):
        return getattr(self._analyzer, name)


@dataclass
class AnonymizeResult:
    image: np.ndarray
    report: dict


class Anonymizer:
    """Loads models once per process; every call reuses them (and the prompt cache)."""

    def __init__(self, bundle: Bundle | str | Path, device: str | None = None, inversion_batch: int = 10,
                 unet_dtype: torch.dtype | None = None, models=None, analyzer=None):
        """``models``: any ``pipeline.Components`` (default: the bundle's PyTorch modules in process;
        the Triton BLS model passes components that call the served models). ``analyzer``: a face
        analyzer (default: the bundle's, loaded on first use)."""
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        t0 = time.perf_counter()
        self.models = models if models is not None else TorchModels.load(self.bundle, device, unet_dtype)
        self.inversion_batch = inversion_batch
        self._analyzer = analyzer
        self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ face analysis
    @property
    def analyzer(self):
        if self._analyzer is None:
            from .faces import load_face_analyzer

            self._analyzer = load_face_analyzer(self.bundle.faces, self.bundle.root)
        return self._analyzer

    def identity_of_crops(self, crops: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """ArcFace embedding of each aligned crop (the paper takes it from the aligned crop)."""
        from .faces import identity_from_crop

        embs, sources = [], []
        for crop in crops:
            emb, source = identity_from_crop(self.analyzer, crop)
            embs.append(np.asarray(emb, dtype=np.float32).reshape(-1))
            sources.append(source)
        return np.stack(embs), sources

    # ------------------------------------------------------------------ reports
    def _base_report(self, params: Params, mode: str) -> dict:
        report = {"revpers_version": __version__, "mode": mode, "params": params.as_dict(),
                  "models": self.bundle.describe(), "smoke": self.bundle.smoke,
                  "device": getattr(self.models, "device", "triton"),
                  "unet_dtype": str(getattr(self.models, "unet_dtype", "served")).replace("torch.", ""),
                  "inversion_batch": self.inversion_batch}
        if self.bundle.smoke:
            report["warning"] = SMOKE_WARNING
        return report

    # ------------------------------------------------------------------ aligned faces
    def anonymize_aligned(self, rgb: np.ndarray, params: Params = Params(),
                          identity: np.ndarray | None = None) -> AnonymizeResult:
        """The whole image is one aligned face (CelebA-HQ/FFHQ style), as in the paper.

        The image is resized to the bundle's native face size (1024 for SDXL) for the generator and
        the result resized back to the input size (no resize when it already is native size).
        """
        return self.anonymize_aligned_batch([rgb], params, None if identity is None else identity[None])[0]

    def anonymize_aligned_batch(self, images: list[np.ndarray], params: Params = Params(),
                                identities: np.ndarray | None = None, reconstruct: bool = False,
                                ) -> list[AnonymizeResult]:
        timings = Timings()
        t0 = time.perf_counter()
        n = self.bundle.native_size
        crops = [resize_rgb(img, (n, n)) for img in images]
        timings.add("resize", time.perf_counter() - t0)
        if identities is None:
            t1 = time.perf_counter()
            identities, sources = self.identity_of_crops(crops)
            timings.add("identity_embed", time.perf_counter() - t1)
        else:
            sources = ["given"] * len(crops)
        out = run_faces(self.models, crops, identities, params, n, inversion_batch=self.inversion_batch,
                        timings=timings, reconstruct=reconstruct)
        results = []
        for i, (img, gen) in enumerate(zip(images, out.images)):
            t2 = time.perf_counter()
            final = resize_rgb(gen, img.shape[:2])
            timings.add("resize", time.perf_counter() - t2)
            report = self._base_report(params, "aligned")
            report.update({"input_size": [int(img.shape[1]), int(img.shape[0])], "generator_size": n,
                           "resized": tuple(img.shape[:2]) != (n, n), "faces_in_batch": len(images),
                           "seed_used": params.seed + i, "identity_source": sources[i],
                           "timings_ms": timings.as_ms(), "batch_total_ms": round(sum(timings.stages.values()) * 1e3, 3)})
            results.append(AnonymizeResult(final, report))
        return results

    # ------------------------------------------------------------------ ordinary photos
    def anonymize_photo(self, rgb: np.ndarray, params: Params = Params(), policy=None) -> AnonymizeResult:
        """Every face of an ordinary photo: detect, align, one generator batch, soft paste-back."""
        from .faces import FacePolicy, anonymize_photo

        policy = policy or FacePolicy()
        n = self.bundle.native_size
        timings = Timings()
        batches = []

        def generate(crops, identities):
            batches.append(len(crops))
            return run_faces(self.models, crops, identities, params, n, inversion_batch=self.inversion_batch,
                             timings=timings).images

        t0 = time.perf_counter()
        out, faces = anonymize_photo(rgb, _TimedAnalyzer(self.analyzer, timings), generate, n, policy)
        total = time.perf_counter() - t0
        timings.add("align_paste", total - sum(timings.stages.values()))
        report = self._base_report(params, "photo")
        for face in faces:
            if face["action"] == "anonymized":
                face["seed_used"] = params.seed + sum(1 for f in faces[: face["index"]] if f["action"] == "anonymized")
        report.update({"input_size": [int(rgb.shape[1]), int(rgb.shape[0])], "generator_size": n,
                       "faces": faces, "faces_found": len(faces), "generator_batches": batches,
                       "policy": policy.as_dict(), "timings_ms": timings.as_ms(),
                       "total_ms": round(total * 1e3, 3)})
        if not faces:
            report["note"] = "no face found; the image is returned unchanged"
        return AnonymizeResult(out, report)

    def reconstruction_error(self, rgb: np.ndarray, params: Params = Params()) -> dict:
        """Invert, then generate with the inversion's own conditioning: latent max abs error vs x0."""
        n = self.bundle.native_size
        crop = resize_rgb(rgb, (n, n))
        identities, _ = self.identity_of_crops([crop])
        timings = Timings()
        out = run_faces(self.models, [crop], identities, params, n, inversion_batch=self.inversion_batch,
                        timings=timings, reconstruct=True)
        err = (out.x_out - out.x0).abs()
        return {"latent_max_abs_error": float(err.max()), "latent_mean_abs_error": float(err.mean()),
                "latent_max_abs_value": float(out.x0.abs().max()), "steps": params.steps, "skip": params.skip,
                "guidance": params.guidance, "timings_ms": timings.as_ms(), "smoke": self.bundle.smoke}
