"""The in-process service: load a bundle once, anonymize aligned faces or whole photos."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from revpers import __version__
from revpers.core.params import Params
from revpers.core.pipeline import Timings, run_faces
from revpers.faces import FacePolicy, compose_photo, identities_of_crops, load_face_analyzer, plan_photo
from revpers.faces.blend import obscure_face
from revpers.faces.photo import DONE, check_generated
from revpers.gate.audit import build_audit
from revpers.gate.loop import GateSession, face_verdict, image_verdict, rejection_reason, run_gate
from revpers.gate.policy import LEFT, NOT_GENERATED, VERIFY_SIZE, VerifyPolicy
from revpers.gate.recognizers import SMOKE_ARCFACE_NOTE, aligned_matrix, verifier_for_bundle
from revpers.models.bundle import Bundle, load_bundle
from revpers.models.torch_models import TorchModels
from revpers.service.records import FaceReport, ImageReport
from revpers_client.protocol import ImageVerdict

SMOKE_WARNING = (
    "SMOKE WEIGHTS: this output was made with a smoke bundle (tiny random models); it is noise, not an anonymized face"
)


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
    image: np.ndarray | None  # None when the verification gate rejected the image (report.verdict)
    report: ImageReport


def _photo_face(face: dict, outcome, verify) -> FaceReport:
    """A photo's face report from its plan entry (``action`` still the decided one) and the gate's outcome."""
    face = dict(face)
    i, decided = face["index"], face["action"]
    if decided != "anonymize":
        return FaceReport.from_dict(
            {**face, "action": DONE[decided], "verdict": LEFT if decided == "leave" else NOT_GENERATED}
        )
    attempts = outcome.attempts[i]
    face["action"] = DONE[decided]
    if i in outcome.rejected:
        face["action"] = "rejected"
    elif i in outcome.fallback:
        face["action"] = DONE[outcome.fallback[i]]
        face["reason"] = f"still matched its input after {len(attempts)} attempt(s); fallback {outcome.fallback[i]}"
    face.update(
        verdict=face_verdict(i, outcome, verify),
        attempts=attempts,
        seed_used=attempts[-1]["seed"] if face["action"] == "anonymized" else None,
        verification=outcome.final[i].as_dict() if i in outcome.final else None,
        fallback_checks=outcome.escalation.get(i),
    )
    return FaceReport.from_dict(face)


class Anonymizer:
    """Loads models once per process; every call reuses them (and the prompt cache)."""

    def __init__(
        self,
        bundle: Bundle | str | Path,
        device: str | None = None,
        inversion_batch: int = 10,
        unet_dtype: torch.dtype | None = None,
        models=None,
        analyzer=None,
    ):
        """``models``: any ``pipeline.Components`` (default: the bundle's PyTorch modules in process;
        the Triton BLS model passes components that call the served models). ``analyzer``: a face
        analyzer (default: the bundle's, loaded on first use)."""
        self.bundle = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
        t0 = time.perf_counter()
        self.models = models if models is not None else TorchModels.load(self.bundle, device, unet_dtype)
        self.inversion_batch = inversion_batch
        self._analyzer = analyzer
        self._verifier = None
        self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ face analysis
    @property
    def analyzer(self):
        if self._analyzer is None:
            self._analyzer = load_face_analyzer(self.bundle.faces, self.bundle.root)
        return self._analyzer

    @property
    def verifier(self):
        """The identity verification gate's recognizers (verify.py), loaded once per process.
        Thresholds can be overridden per bundle: manifest ``"verify": {"arcface_threshold": ...,
        "dlib_threshold": ...}`` (e.g. after calibrating on your own data)."""
        if self._verifier is None:
            self._verifier = verifier_for_bundle(self.bundle, self.analyzer)
        return self._verifier

    def _verification_block(self, verify, session) -> dict:
        block = {"enabled": verify.verify, "policy": verify.as_dict()}
        if verify.verify:
            block["recognizers"] = self.verifier.describe()
            if self.bundle.smoke:
                block["note"] = SMOKE_ARCFACE_NOTE
        if session is not None:
            block["embeddings_computed"] = session.embeddings
        return block

    def identity_of_crops(self, crops: list[np.ndarray]) -> tuple[np.ndarray, list[str]]:
        """ArcFace embedding of each aligned crop (the paper takes it from the aligned crop)."""
        return identities_of_crops(self.analyzer, crops)

    # ------------------------------------------------------------------ reports
    def _base_report(self, params: Params, mode: str) -> dict:
        """The fields every ImageReport of this anonymizer shares."""
        return {
            "revpers_version": __version__,
            "mode": mode,
            "params": params.as_dict(),
            "models": self.bundle.describe(),
            "smoke": self.bundle.smoke,
            "device": str(getattr(self.models, "device", "triton")),
            "unet_dtype": str(getattr(self.models, "unet_dtype", "served")).replace("torch.", ""),
            "inversion_batch": self.inversion_batch,
            "warning": SMOKE_WARNING if self.bundle.smoke else None,
        }

    # ------------------------------------------------------------------ aligned faces
    def anonymize_aligned(
        self,
        rgb: np.ndarray,
        params: Params = Params(),
        identity: np.ndarray | None = None,
        verify=None,
        cancelled=None,
    ) -> AnonymizeResult:
        """The whole image is one aligned face (CelebA-HQ/FFHQ style), as in the paper.

        The image is resized to the bundle's native face size (1024 for SDXL) for the generator and
        the result resized back to the input size (no resize when it already is native size).
        """
        return self.anonymize_aligned_batch(
            [rgb], params, None if identity is None else identity[None], verify=verify, cancelled=cancelled
        )[0]

    def anonymize_aligned_batch(
        self,
        images: list[np.ndarray],
        params: Params = Params(),
        identities: np.ndarray | None = None,
        reconstruct: bool = False,
        verify=None,
        cancelled=None,
    ) -> list[AnonymizeResult]:
        """Each image is one aligned face. ``verify`` (verify.VerifyPolicy, default: on, 2 retries,
        then blur) gates every output face; retries of all failing faces run as one batch."""

        verify = verify if verify is not None else VerifyPolicy()
        if reconstruct:  # the fidelity check regenerates the input on purpose: nothing to gate
            verify = VerifyPolicy(verify=False)
        timings = Timings()
        n = self.bundle.native_size
        crops, identities, sources = self._aligned_inputs(images, identities, timings)
        generated: dict[int, np.ndarray] = {}

        def generate(ids, attempt):
            p = verify.params_for(params, attempt)
            seeds = [verify.seed_for(params.seed + i, attempt) for i in ids]
            out = run_faces(
                self.models,
                [crops[i] for i in ids],
                identities[ids],
                p,
                n,
                inversion_batch=self.inversion_batch,
                timings=timings,
                seeds=seeds,
                reconstruct=reconstruct,
                cancelled=cancelled,
            )
            t2 = time.perf_counter()
            for i, gen in zip(ids, out.images):
                generated[i] = resize_rgb(gen, images[i].shape[:2])
            timings.add("resize", time.perf_counter() - t2)
            return {i: {"seed": s, "guidance": p.guidance} for i, s in zip(ids, seeds)}

        def render(override):
            outs = {}
            for i, img in enumerate(images):
                if i in override:
                    outs[i] = np.array(img, copy=True)
                    obscure_face(outs[i], aligned_matrix(img.shape, n), n, override[i])
                else:
                    outs[i] = generated[i]
            return outs

        ids = list(range(len(images)))
        session = None
        if verify.verify:
            session = GateSession(
                self.verifier, {i: (img, aligned_matrix(img.shape, VERIFY_SIZE)) for i, img in enumerate(images)}
            )
        outcome = run_gate(ids, generate, render, session, verify, outputs=lambda out, i: out[i])
        if session is not None:
            timings.add("verify", session.seconds)
        results = []
        for i, img in enumerate(images):
            attempts = outcome.attempts[i]
            verdict = face_verdict(i, outcome, verify)
            action = "rejected" if i in outcome.rejected else DONE.get(outcome.fallback.get(i), "anonymized")
            face = FaceReport(
                index=0,
                box=[0.0, 0.0, float(img.shape[1]), float(img.shape[0])],
                action=action,
                identity_source=sources[i],
                verdict=verdict,
                seed_used=attempts[-1]["seed"] if action == "anonymized" else None,
                attempts=attempts,
                verification=outcome.final[i].as_dict() if i in outcome.final else None,
                fallback_checks=outcome.escalation.get(i),
            )
            image_v = image_verdict([verdict], verify.verify)
            final = None if image_v == ImageVerdict.REJECTED else outcome.image[i]  # withheld per image
            audit = build_audit(
                mode="aligned",
                bundle=self.bundle,
                params=params.as_dict(),
                face_policy=None,
                verify_policy=verify.as_dict(),
                verification=self._audit_recognizers(verify),
                faces=[face],
                verdict=image_v,
                input_rgb=img,
                output_rgb=final,
                runtime=self._runtime(),
            )
            report = ImageReport(
                **self._base_report(params, "aligned"),
                input_size=[int(img.shape[1]), int(img.shape[0])],
                generator_size=n,
                resized=tuple(img.shape[:2]) != (n, n),
                faces_in_batch=len(images),
                seed_used=face.seed_used,
                identity_source=sources[i],
                faces=[face],
                verdict=image_v,
                generator_batches=outcome.generator_batches,
                verification=self._verification_block(verify, session),
                timings_ms=timings.as_ms(),
                batch_total_ms=round(sum(timings.stages.values()) * 1e3, 3),
                rejected_reason=rejection_reason([face]) if image_v == ImageVerdict.REJECTED else None,
                audit=audit,
            )
            results.append(AnonymizeResult(final, report))
        return results

    def _aligned_inputs(self, images: list[np.ndarray], identities, timings: Timings):
        """Crops at the generator's size, their identities (computed unless given) and each one's source."""
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
        return crops, np.asarray(identities, dtype=np.float32).reshape(len(crops), -1), sources

    # ------------------------------------------------------------------ ordinary photos
    def anonymize_photo(
        self,
        rgb: np.ndarray,
        params: Params = Params(),
        policy=None,
        verify=None,
        max_faces: int | None = None,
        cancelled=None,
    ) -> AnonymizeResult:
        """Every face of an ordinary photo: detect, align, one generator batch, soft paste-back, then
        the verification gate (``verify``: verify.VerifyPolicy, default on, 2 retries, then blur):
        failing faces are regenerated together in one batch per retry, then fall back."""

        policy = policy or FacePolicy()
        verify = verify if verify is not None else VerifyPolicy()
        n = self.bundle.native_size
        timings = Timings()
        t0 = time.perf_counter()
        plan = plan_photo(rgb, _TimedAnalyzer(self.analyzer, timings), n, policy, max_faces=max_faces)
        rank = {i: r for r, i in enumerate(plan.to_generate)}
        generated: dict[int, np.ndarray] = {}

        def generate(ids, attempt):
            p = verify.params_for(params, attempt)
            seeds = [verify.seed_for(params.seed + rank[i], attempt) for i in ids]
            idx = [rank[i] for i in ids]
            out = run_faces(
                self.models,
                [plan.crops[r] for r in idx],
                plan.identities[idx],
                p,
                n,
                inversion_batch=self.inversion_batch,
                timings=timings,
                seeds=seeds,
                cancelled=cancelled,
            ).images
            generated.update(check_generated(plan, out, ids))
            return {i: {"seed": s, "guidance": p.guidance} for i, s in zip(ids, seeds)}

        session = None
        if verify.verify and plan.to_generate:
            session = GateSession(
                self.verifier, {i: (plan.rgb, self.verifier.matrix_for(plan.faces[i].kps)) for i in plan.to_generate}
            )
        outcome = run_gate(
            plan.to_generate, generate, lambda override: compose_photo(plan, generated, override), session, verify
        )
        total = time.perf_counter() - t0
        if session is not None:
            timings.add("verify", session.seconds)
        timings.add("align_paste", total - sum(timings.stages.values()))

        faces = [_photo_face(face, outcome, verify) for face in plan.reports]
        verdict = image_verdict([f["verdict"] for f in faces], verify.verify)
        image = None if verdict == ImageVerdict.REJECTED else outcome.image
        audit = build_audit(
            mode="photo",
            bundle=self.bundle,
            params=params.as_dict(),
            face_policy=policy.as_dict(),
            verify_policy=verify.as_dict(),
            verification=self._audit_recognizers(verify),
            faces=faces,
            verdict=verdict,
            input_rgb=np.asarray(rgb),
            output_rgb=image,
            runtime=self._runtime(),
        )
        report = ImageReport(
            **self._base_report(params, "photo"),
            input_size=[int(rgb.shape[1]), int(rgb.shape[0])],
            generator_size=n,
            faces=faces,
            faces_found=len(faces),
            generator_batches=outcome.generator_batches,
            policy=policy.as_dict(),
            verdict=verdict,
            verification=self._verification_block(verify, session),
            timings_ms=timings.as_ms(),
            total_ms=round(total * 1e3, 3),
            note="no face found" if not faces else None,
            rejected_reason=rejection_reason(faces) if verdict == ImageVerdict.REJECTED else None,
            audit=audit,
        )
        return AnonymizeResult(image, report)

    def _audit_recognizers(self, verify) -> dict | None:
        return self.verifier.describe() if verify.verify else None

    def _runtime(self) -> dict:
        return {
            "device": str(getattr(self.models, "device", "triton")),
            "unet_dtype": str(getattr(self.models, "unet_dtype", "served")).replace("torch.", ""),
            "inversion_batch": self.inversion_batch,
        }

    def reconstruction_error(self, rgb: np.ndarray, params: Params = Params()) -> dict:
        """Invert, then generate with the inversion's own conditioning: latent max abs error vs x0."""
        n = self.bundle.native_size
        crop = resize_rgb(rgb, (n, n))
        identities, _ = self.identity_of_crops([crop])
        timings = Timings()
        out = run_faces(
            self.models,
            [crop],
            identities,
            params,
            n,
            inversion_batch=self.inversion_batch,
            timings=timings,
            reconstruct=True,
        )
        err = (out.x_out - out.x0).abs()
        return {
            "latent_max_abs_error": float(err.max()),
            "latent_mean_abs_error": float(err.mean()),
            "latent_max_abs_value": float(out.x0.abs().max()),
            "steps": params.steps,
            "skip": params.skip,
            "guidance": params.guidance,
            "timings_ms": timings.as_ms(),
            "smoke": self.bundle.smoke,
        }
