"""Pairing: which anonymized file belongs to which original, and which face to which face.

Files. ``collect_pairs(ORIGINALS, ANONYMIZED)`` accepts two image files, or two folders. In folders,
the ``IMAGE.json`` reports ``revpers anonymize`` writes next to its outputs are read first (their
``input`` and ``output`` name the pair; a report whose image was withheld, verdict ``rejected``,
counts as withheld, not as missing); the other originals are paired by file stem
(``photo.jpg`` with ``photo.png``). Originals without a partner are listed as unmatched.

Faces. Every face the evaluator's detector finds in the original is measured at the same place in
the anonymized image, with the verification gate's geometry (``revpers.gate.recognizers.Verifier``): both
images are warped with the original face's whole-face alignment to a 320 px crop, the face is
re-detected in each crop near the expected 5 points, and a face that is not re-detected in the
anonymized crop is measured at the original face's landmarks (``redetected`` False). With
``aligned`` each image is one aligned face (CelebA-HQ / FFHQ style) and nothing is detected in the
original.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from revpers.gate.recognizers import aligned_matrix
from revpers.service.images import FORMATS


class PairingError(ValueError):
    """The inputs cannot be paired (the message says why)."""


@dataclass
class ImagePair:
    name: str
    original: Path
    anonymized: Path | None  # None: withheld by the gate (rejected)
    report: dict | None = None  # the anonymize report, when there is one


@dataclass
class Pairing:
    pairs: list[ImagePair] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # originals with no anonymized file
    smoke: bool = False  # some anonymize report says the outputs were made with smoke weights

    @property
    def withheld(self) -> list[ImagePair]:
        return [p for p in self.pairs if p.anonymized is None]


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in FORMATS)


def _check_inputs(originals: Path, anonymized: Path) -> None:
    for p in (originals, anonymized):
        if not p.exists():
            raise PairingError(f"{p} does not exist")
    if originals.is_file() != anonymized.is_file():
        raise PairingError("ORIGINALS and ANONYMIZED must both be image files or both be folders")


def _read_report(rp: Path, anonymized: Path) -> tuple[dict, Path | None] | None:
    """One anonymize report and its output file in ``anonymized`` (None when missing); None if not a report."""
    try:
        rep = json.loads(rp.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(rep, dict) or "input" not in rep or "verdict" not in rep:
        return None
    out = rep.get("output")
    out_path = None
    if out:
        cand = anonymized / Path(out).name
        out_path = cand if cand.is_file() else None
    return rep, out_path


def _read_reports(anonymized: Path, result: Pairing) -> dict[str, tuple[dict, Path | None]]:
    """The anonymize reports in ``anonymized`` by input file name; marks ``result.smoke``."""
    reports: dict[str, tuple[dict, Path | None]] = {}
    for rp in sorted(anonymized.glob("*.json")):
        found = _read_report(rp, anonymized)
        if found is None:
            continue
        rep = found[0]
        reports[Path(rep["input"]).name] = found
        result.smoke |= bool(rep.get("smoke"))
    return reports


def _pair_original(
    orig: Path, reports: dict[str, tuple[dict, Path | None]], by_stem: dict[str, Path], result: Pairing
) -> None:
    if orig.name in reports:
        rep, out = reports[orig.name]
        if out is None and rep.get("verdict") != "rejected":
            result.unmatched.append(orig.name)
            return
        result.pairs.append(ImagePair(orig.stem, orig, out, rep))
    elif orig.stem in by_stem:
        result.pairs.append(ImagePair(orig.stem, orig, by_stem[orig.stem]))
    else:
        result.unmatched.append(orig.name)


def collect_pairs(originals: Path, anonymized: Path) -> Pairing:
    originals, anonymized = Path(originals), Path(anonymized)
    _check_inputs(originals, anonymized)
    if originals.is_file():
        return Pairing([ImagePair(originals.stem, originals, anonymized)])
    result = Pairing()
    by_stem = {p.stem: p for p in _images(anonymized)}
    originals_list = _images(originals)
    if not originals_list:
        raise PairingError(f"{originals} holds no image files ({', '.join(sorted(FORMATS))})")
    reports = _read_reports(anonymized, result)
    for orig in originals_list:
        _pair_original(orig, reports, by_stem, result)
    if not result.pairs:
        raise PairingError(
            f"no anonymized file in {anonymized} matches an original in {originals} "
            "(pairs are found by revpers anonymize reports or by file stem)"
        )
    return result


@dataclass
class FaceSite:
    """One original face: where it is and the 2x3 matrices photo -> verification crop."""

    index: int
    box: list
    matrix: np.ndarray


def face_sites(verifier, original: np.ndarray, aligned: bool) -> list[FaceSite]:
    if aligned:
        return [
            FaceSite(
                0,
                [0.0, 0.0, float(original.shape[1]), float(original.shape[0])],
                aligned_matrix(original.shape, verifier.size),
            )
        ]
    return [
        FaceSite(i, [round(float(v), 2) for v in f.box], verifier.matrix_for(f.kps))
        for i, f in enumerate(verifier.analyzer.detect(original))
    ]


__all__ = ["FaceSite", "ImagePair", "Pairing", "PairingError", "collect_pairs", "face_sites"]
