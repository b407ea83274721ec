"""The gate loop: generate, measure, retry the failing faces together, fall back; and the verdicts
of faces and images that follow from its outcome."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from revpers.core.errors import InputError
from revpers.faces.blend import OBSCURE_MODES
from revpers.gate.policy import (
    FAILED,
    FALLBACK_VERDICT,
    LEFT,
    NOT_GENERATED,
    PASSED,
    REJECTED,
    UNVERIFIED,
    VerifyPolicy,
)
from revpers.gate.recognizers import Embedded, Verifier, aligned_matrix
from revpers_client.protocol import FaceVerdict, ImageVerdict


class GateSession:
    """Checks of one request: the input faces' reference embeddings are computed once, and an
    output face is re-measured only when its verification crop changed (so re-rendering the photo
    after a retry re-checks exactly the faces whose pixels moved, neighbours included)."""

    def __init__(self, verifier: Verifier, refs: dict):
        """refs: face id -> (input image, 2x3 matrix image -> verification crop)."""
        self.v = verifier
        self.refs = refs
        self._ref: dict = {}
        self._last: dict = {}
        self.embeddings = 0
        self.seconds = 0.0  # time spent re-detecting and embedding

    def reference(self, i) -> Embedded:
        if i not in self._ref:
            t0 = time.perf_counter()
            img, m = self.refs[i]
            self._ref[i] = self.v.embed(self.v.crop(img, m))
            self.embeddings += 1
            self.seconds += time.perf_counter() - t0
        return self._ref[i]

    def check(self, outputs: Callable[[object], np.ndarray], ids) -> dict:
        """outputs(id) -> the output image that holds face ``id``; returns {id: FaceCheck}."""
        result = {}
        for i in ids:
            ref = self.reference(i)
            t0 = time.perf_counter()
            crop = self.v.crop(outputs(i), self.refs[i][1])
            key = hashlib.sha256(crop.tobytes()).digest()
            last = self._last.get(i)
            if last is None or last[0] != key:
                out = self.v.embed(crop, fallback_face=ref.face)
                self.embeddings += 1
                last = (key, self.v.compare(ref, out))
                self._last[i] = last
            self.seconds += time.perf_counter() - t0
            result[i] = last[1]
        return result


# ---------------------------------------------------------------------------------------- the gate loop
@dataclass
class GateOutcome:
    image: object  # what render() returned last; the caller withholds every image that holds a rejected id
    attempts: dict  # id -> list of attempt records
    final: dict  # id -> FaceCheck of the released pixels (empty when verification is off)
    fallback: dict  # id -> "blur" | "pixelate" | "fill" for faces that fell back (the last rung tried)
    rejected: list  # ids that failed every attempt under fallback "reject"
    failed: list  # ids whose final pixels still match
    generator_batches: list  # faces per generator call
    escalation: dict = field(default_factory=dict)  # id -> the check after each fallback rung, in order


def run_gate(
    ids: list,
    generate: Callable,
    render: Callable,
    session: GateSession | None,
    policy: VerifyPolicy,
    outputs: Callable | None = None,
) -> GateOutcome:
    """Generate, check, retry the failing faces (one generator batch per attempt), fall back.

    generate(ids, attempt) -> {id: {"seed": s, "guidance": g}} (and stores the new crops);
    render(override) -> output (override: id -> "blur" | "pixelate" | "fill");
    a face that fails every attempt gets the policy's fallback; while it still matches, the next
    stronger one (blur, then pixelate, then a solid fill), each re-checked and kept in its attempts;
    outputs(output, id) -> the image holding face ``id`` in that output (default: output itself).
    ``outcome.image`` is always the last render: with several images per output (aligned batches)
    only the images holding a rejected or failed id are withheld, by the caller.
    """
    outputs = outputs or (lambda out, i: out)
    verify = policy.verify and session is not None
    image, attempts, batches, pending = _generate_and_check(ids, generate, render, session, policy, verify, outputs)
    fallback, rejected, escalation = {}, [], {}
    if pending:  # verification on, every attempt failed
        if policy.fallback == "reject":
            rejected = list(pending)
        else:
            image = _escalate(pending, render, session, policy.fallback, verify, outputs, fallback, escalation)
    final, failed = {}, []
    if verify and ids:  # the pixels to release; a rejected face's last attempt stands in its attempts
        final = session.check(lambda i: outputs(image, i), [i for i in ids if i not in rejected])
        failed = [i for i in ids if i in final and not final[i].passed]
    return GateOutcome(image, attempts, final, fallback, rejected, failed, batches, escalation)


def _generate_and_check(ids, generate, render, session, policy, verify, outputs):
    """Attempt 0 for every face, then one retry batch per attempt for the faces still matching.
    Returns the last render, each face's attempt records, the batch sizes, and the faces that
    failed every attempt."""
    attempts = {i: [] for i in ids}
    batches, pending, image = [], list(ids), None
    for a in range(policy.attempts if verify else 1):
        if not pending:
            break
        meta = generate(pending, a)
        batches.append(len(pending))
        image = render({})
        if not verify:
            for i in pending:
                attempts[i].append({"attempt": a, **meta[i]})
            return image, attempts, batches, []
        checks = session.check(lambda i: outputs(image, i), pending)
        for i in pending:
            attempts[i].append({"attempt": a, **meta[i], **checks[i].as_dict()})
        pending = [i for i in pending if not checks[i].passed]
    return (image if image is not None else render({})), attempts, batches, pending


def _escalate(pending, render, session, first: str, verify, outputs, fallback: dict, escalation: dict):
    """Obscure the failing faces with ``first``, then, while a face still matches, with the next
    stronger mode; each rung is re-checked and recorded. Fills ``fallback`` (id -> last mode) and
    ``escalation`` (id -> checks); returns the last render."""
    image = None
    for mode in OBSCURE_MODES[OBSCURE_MODES.index(first) :]:
        fallback.update({i: mode for i in pending})
        image = render(fallback)
        if not verify:
            break
        checks = session.check(lambda i: outputs(image, i), pending)
        for i in pending:
            escalation.setdefault(i, []).append({"fallback": mode, **checks[i].as_dict()})
        pending = [i for i in pending if not checks[i].passed]
        if not pending:
            break
    return image


def face_verdict(i, outcome: GateOutcome, policy: VerifyPolicy) -> FaceVerdict:
    if not policy.verify:
        return UNVERIFIED
    if i in outcome.rejected:
        return REJECTED
    if i in outcome.failed:
        return FAILED
    if i in outcome.fallback:
        return FALLBACK_VERDICT[outcome.fallback[i]]
    return PASSED


def image_verdict(verdicts: list[str], verify: bool) -> ImageVerdict:
    """The verdict of a whole image from those of its faces (docs/verification.md)."""
    if not verdicts:
        return ImageVerdict.NO_FACES
    if not verify:
        return ImageVerdict.UNVERIFIED
    if any(v in (REJECTED, FAILED) for v in verdicts):
        return ImageVerdict.REJECTED
    if any(v == LEFT for v in verdicts):
        return ImageVerdict.PARTIAL
    if all(v == NOT_GENERATED for v in verdicts):
        return ImageVerdict.NOT_GATED
    if any(v in FALLBACK_VERDICT.values() for v in verdicts):
        return ImageVerdict.FALLBACK
    return ImageVerdict.PASSED


def rejection_reason(faces: list[dict]) -> str:
    bad = [f for f in faces if f.get("verdict") in (REJECTED, FAILED)]
    parts = []
    for f in bad:
        if f["verdict"] == REJECTED:
            parts.append(
                f"face {f['index']} still matched its input after {len(f.get('attempts', []))} attempt(s) "
                "(fallback: reject)"
            )
        else:
            parts.append(
                f"face {f['index']} still matches its input in the final image (after action {f.get('action')!r})"
            )
    return "; ".join(parts) + "; no image is returned"


def verify_pair(verifier: Verifier, original: np.ndarray, anonymized: np.ndarray, aligned: bool = False) -> list[dict]:
    """Check every face of ``original`` against the same place in ``anonymized`` (same size).
    ``aligned``: the whole image is one aligned face (no detection in the original)."""
    original, anonymized = np.asarray(original), np.asarray(anonymized)
    if original.shape != anonymized.shape:
        raise InputError(
            f"the images differ in size: original {original.shape[1]}x{original.shape[0]}, "
            f"anonymized {anonymized.shape[1]}x{anonymized.shape[0]}; verify compares a photo "
            "with its own anonymized output"
        )
    if aligned:
        refs = {0: (original, aligned_matrix(original.shape, verifier.size))}
        boxes = {0: [0.0, 0.0, float(original.shape[1]), float(original.shape[0])]}
    else:
        faces = verifier.analyzer.detect(original)
        refs = {i: (original, verifier.matrix_for(f.kps)) for i, f in enumerate(faces)}
        boxes = {i: [round(float(v), 2) for v in f.box] for i, f in enumerate(faces)}
    session = GateSession(verifier, refs)
    checks = session.check(lambda i: anonymized, list(refs))
    return [{"index": i, "box": boxes[i], **checks[i].as_dict()} for i in refs]
