"""Identity removal: the re-identification rate of every available recognizer.

Recognizers (each at its documented operating point, docs/evaluation.md):

* ``dlib``: dlib's 128-d ResNet, Euclidean distance, still the same person when ``<= 0.6`` (or the
  bundle manifest's ``verify.dlib_threshold``); always available.
* ``arcface``: the bundle's ArcFace (``--models``), cosine similarity, a match when ``>= 0.28`` (or
  the manifest's); not used for a smoke bundle (a random network) or without a bundle.
* any ONNX recognizer the user names: ``--recognizer NAME=PATH.onnx[:threshold][:bgr]``
  (``OnnxRecognizer``, input contract below), cosine similarity, a match when ``>= threshold``.
  Without a threshold only the similarity distribution is reported (no re-ID rate: a rate needs an
  operating point, and we do not invent one for an unknown model).

The faces are read exactly as the verification gate reads them (``revpers.gate.recognizers.Verifier``: the
original face's whole-face alignment, re-detection near the expected points); the extra
recognizers take their chip from the same crop at the same 5 points.

Input contract of an extra ONNX recognizer (the ArcFace family's, e.g. insightface models, AdaFace
or SwinFace exported to ONNX): one input of shape (N, 3, S, S) float32 (S from the model's input
shape, 112 when it is not fixed), the face aligned with insightface's ``norm_crop`` to the standard
5-point ArcFace template at S px, channels RGB (``:bgr`` for models trained on BGR, such as
AdaFace's released checkpoints), values (pixel - 127.5) / 127.5, i.e. in [-1, 1]; first output
(N, D) (any extra singleton dimensions are flattened); embeddings are L2-normalised here and
compared by cosine similarity.
"""

from __future__ import annotations

import math
import pathlib
import warnings
from dataclasses import dataclass

import cv2
import numpy as np


class RecognizerSpecError(ValueError):
    """A --recognizer value that cannot be used (the message says why)."""


@dataclass
class OnnxRecognizer:
    name: str
    path: pathlib.Path
    threshold: float | None
    bgr: bool = False

    def __post_init__(self):
        import onnxruntime

        if not self.path.is_file():
            raise RecognizerSpecError(f"recognizer {self.name}: {self.path} does not exist")
        try:
            self.session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise RecognizerSpecError(
                f"recognizer {self.name}: {self.path} is not a usable ONNX model: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ) from None
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise RecognizerSpecError(
                f"recognizer {self.name}: expected one (N, 3, S, S) input, got {[(i.name, i.shape) for i in inputs]}"
            )
        shape = inputs[0].shape
        side = shape[2] if isinstance(shape[2], int) else 112
        if (isinstance(shape[3], int) and shape[3] != side) or (isinstance(shape[1], int) and shape[1] != 3):
            raise RecognizerSpecError(f"recognizer {self.name}: expected a square 3-channel input, got {shape}")
        self.input_name, self.size = inputs[0].name, int(side)

    def chip(self, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        """The aligned uint8 RGB chip this recognizer reads."""
        from insightface.utils import face_align

        with warnings.catch_warnings():  # insightface calls skimage's deprecated SimilarityTransform.estimate
            warnings.simplefilter("ignore", FutureWarning)
            return face_align.norm_crop(
                np.ascontiguousarray(rgb), landmark=np.asarray(kps, np.float32), image_size=self.size
            )

    def embed(self, rgb: np.ndarray, kps: np.ndarray) -> np.ndarray:
        chip = self.chip(rgb, kps)
        if self.bgr:
            chip = cv2.cvtColor(chip, cv2.COLOR_RGB2BGR)
        x = ((chip.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None]
        out = np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0], np.float64)
        emb = out.reshape(-1)
        norm = float(np.linalg.norm(emb))
        if not math.isfinite(norm) or norm == 0.0:
            raise RecognizerSpecError(f"recognizer {self.name} produced a zero or non-finite embedding")
        return emb / norm

    def describe(self) -> dict:
        return {
            "used": True,
            "metric": "cosine similarity",
            "match_when": ">= threshold",
            "threshold": self.threshold,
            "model": str(self.path),
            "input": f"{self.size}x{self.size} {'BGR' if self.bgr else 'RGB'} norm_crop, (x - 127.5) / 127.5",
            **(
                {}
                if self.threshold is not None
                else {"note": "no threshold given: similarity distribution only, no re-ID rate"}
            ),
        }


def parse_recognizer(spec: str) -> OnnxRecognizer:
    """``NAME=PATH.onnx[:threshold][:bgr]`` -> OnnxRecognizer."""
    name, sep, rest = spec.partition("=")
    name = name.strip()
    if not sep or not name or not rest:
        raise RecognizerSpecError(f"--recognizer {spec!r}: expected NAME=PATH.onnx[:threshold][:bgr]")
    if name in ("dlib", "arcface"):
        raise RecognizerSpecError(f"--recognizer {spec!r}: the name {name!r} is taken by a built-in recognizer")
    parts = rest.split(":")
    bgr = False
    if len(parts) > 1 and parts[-1].lower() in ("bgr", "rgb"):
        bgr = parts.pop().lower() == "bgr"
    threshold = None
    if len(parts) > 1 and not parts[-1].lower().endswith(".onnx"):
        raw = parts.pop()
        try:
            threshold = float(raw)
        except ValueError:
            raise RecognizerSpecError(f"--recognizer {spec!r}: threshold {raw!r} is not a number") from None
        if not -1.0 < threshold < 1.0:
            raise RecognizerSpecError(f"--recognizer {spec!r}: a cosine threshold must lie in (-1, 1)")
    return OnnxRecognizer(name, pathlib.Path(":".join(parts)).expanduser(), threshold, bgr)


def summarize(values: list[float], matches: list[bool] | None) -> dict:
    """Distribution of one recognizer's scores over the faces, and the re-ID rate (None without an
    operating point)."""
    arr = np.asarray(values, np.float64)
    out = {"count": int(arr.size)}
    if arr.size:
        q = np.quantile(arr, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
        out.update(
            {
                "mean": float(arr.mean()),
                "std": float(arr.std()),
                "quantiles": {k: float(v) for k, v in zip(("min", "p05", "p25", "median", "p75", "p95", "max"), q)},
            }
        )
    if matches is not None and arr.size:
        out["reidentified"] = int(sum(bool(m) for m in matches))
        out["reid_rate"] = out["reidentified"] / arr.size
    else:
        out["reid_rate"] = None
    return out


__all__ = ["OnnxRecognizer", "RecognizerSpecError", "parse_recognizer", "summarize"]
