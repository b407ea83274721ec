"""Inputs -> work items: files, folders (recursive, the tree mirrored under the output folder) and
glob patterns, with one allow-list of input formats (``protocol.INPUT_SUFFIXES``) and every file not
taken listed with its reason; and the check that no output would be written over an input.

Rules:

- A folder's files are mirrored relative to that folder; a file goes to ``OUTDIR/<its name>``; a
  glob's matches relative to the glob's leading folder (``photos/**/*.jpg`` -> relative to ``photos``).
- Hidden files and folders (name starting with ".") are not walked and not listed (a hidden folder
  named explicitly is walked).
- A file is taken when its suffix (any case) is in ``protocol.INPUT_SUFFIXES``; every other file
  found is *not taken*, with the reason (``unsupported format .txt``), whether found in a folder or
  named explicitly.
- The output folder, when it lies inside an input folder, is not walked: a second run does not
  anonymize its own outputs. The files a run writes (reports ``<image>.json`` beside their image,
  the run files) are not listed as not taken.
- Two inputs that would write the same output are refused.
- Never destroy inputs: :func:`check_outputs` refuses an output folder equal to an input folder, and
  any output path (image, report, run files) that is an input file (symlinks resolved), unless the
  caller allows writing in place.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from . import protocol

# The files a run writes into its output folder (beside the images and their reports).
SUMMARY = "run-summary.json"
MANIFEST = "audit-manifest.json"
REVIEW_CSV = "review.csv"
REVIEW_JSON = "review.json"
RUN_FILES = (SUMMARY, MANIFEST, REVIEW_CSV, REVIEW_JSON)

FORMAT_CHOICES = ("keep",) + tuple(protocol.OUTPUT_FORMATS)
# Output formats a "keep" run keeps (by input suffix); other inputs (TIFF, BMP, GIF) become PNG.
KEEP_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
KEEP_FALLBACK = "png"


class UsageError(Exception):
    """Bad command line or inputs, found before any request is sent (exit code 2)."""


@dataclass(frozen=True)
class Item:
    """One image to anonymize."""

    src: Path  # the input file
    rel: str  # its path relative to the input root it came from (posix), mirrored under OUTDIR
    out_rel: str  # the output image path relative to OUTDIR
    fmt: str  # output format: jpeg | png | webp


@dataclass(frozen=True)
class NotTaken:
    """A file found among the inputs but not anonymized, and why."""

    src: Path  # the file
    path: str  # as found (relative to the input root when found in a folder or by a glob)
    reason: str  # e.g. "unsupported format .txt"


@dataclass(frozen=True)
class Collection:
    items: list[Item]
    not_taken: list[NotTaken]
    input_dirs: list[Path]  # the folders given (resolved), for the output check


def supported(path: Path) -> bool:
    return path.suffix.lower() in protocol.INPUT_SUFFIXES


def _has_magic(arg: str) -> bool:
    return any(c in arg for c in "*?[")


def _own_output(path: Path) -> bool:
    """A report a run wrote beside its image (``x.jpg.json`` next to ``x.jpg``)."""
    return path.suffix == ".json" and supported(Path(path.stem)) and path.with_suffix("").exists()


def _walk(root: Path, exclude: Path | None) -> Iterator[Path]:
    """Files under ``root`` (recursive, sorted; hidden entries, ``exclude`` and run files skipped)."""
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
        )
        for name in sorted(filenames):
            if name.startswith(".") or (here / name).is_dir():
                continue
            if name in RUN_FILES or _own_output(here / name):
                continue
            yield here / name


def out_name(rel: str, fmt_choice: str) -> tuple[str, str]:
    """(output path relative to OUTDIR, output format) for an input at ``rel``."""
    p = Path(rel)
    known = KEEP_FORMATS.get(p.suffix.lower())
    if fmt_choice == "keep":
        return (
            (rel, known) if known else (p.with_suffix(protocol.OUTPUT_FORMATS[KEEP_FALLBACK]).as_posix(), KEEP_FALLBACK)
        )
    if known == fmt_choice:
        return rel, fmt_choice
    return p.with_suffix(protocol.OUTPUT_FORMATS[fmt_choice]).as_posix(), fmt_choice


def _glob(arg: str, exclude: Path | None, dirs: list[Path]) -> list[tuple[Path, str]]:
    """The files a glob pattern names (folders among its matches walked), relative to its leading folder."""
    parts = Path(arg).parts
    k = next(i for i, part in enumerate(parts) if _has_magic(part))
    base = Path(*parts[:k]) if k else Path(".")
    matches = sorted(glob.glob(arg, recursive=True))
    if not matches:
        raise UsageError(f"{arg}: the pattern matches nothing")
    found: list[tuple[Path, str]] = []
    for m in map(Path, matches):
        if any(part.startswith(".") for part in m.relative_to(base).parts):
            continue
        real = m.resolve()
        if exclude is not None and (real == exclude or exclude in real.parents):
            continue
        if m.is_dir():
            dirs.append(real)
            found += [(f, f.relative_to(base).as_posix()) for f in _walk(m, exclude)]
        elif m.is_file() and m.name not in RUN_FILES and not _own_output(m):
            found.append((m, m.relative_to(base).as_posix()))
    return found


def _found(inputs: Sequence[str], exclude: Path | None) -> tuple[list[tuple[Path, str]], list[Path]]:
    found: list[tuple[Path, str]] = []
    dirs: list[Path] = []
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            dirs.append(path.resolve())
            found += [(f, f.relative_to(path).as_posix()) for f in _walk(path, exclude)]
        elif path.is_file():
            found.append((path, path.name))
        elif _has_magic(arg):
            found += _glob(arg, exclude, dirs)
        else:
            raise UsageError(f"{arg}: no such file or folder")
    return found, dirs


def collect(inputs: Sequence[str], outdir: Path, fmt_choice: str = "keep", in_place: bool = False) -> Collection:
    """Inputs -> a :class:`Collection` (items sorted by output path; see the module docstring).

    ``in_place``: the output folder may be an input folder (it is then walked)."""
    if fmt_choice not in FORMAT_CHOICES:
        raise UsageError(f"format must be one of {', '.join(FORMAT_CHOICES)}, got {fmt_choice!r}")
    exclude = None if in_place else outdir.resolve()
    found, dirs = _found(inputs, exclude)
    items: dict[str, Item] = {}
    not_taken: dict[str, NotTaken] = {}
    for src, rel in found:
        if not supported(src):
            suffix = src.suffix.lower() or "(no suffix)"
            not_taken.setdefault(rel, NotTaken(src, rel, f"unsupported format {suffix}"))
            continue
        out_rel, fmt = out_name(rel, fmt_choice)
        prev = items.get(out_rel)
        if prev is not None:
            if prev.src.resolve() == src.resolve():
                continue  # the same file named twice
            raise UsageError(
                f"{prev.src} and {src} would both be written to {outdir / out_rel}; "
                "anonymize them in separate runs or to separate output folders"
            )
        items[out_rel] = Item(src, rel, out_rel, fmt)
    if exclude is not None and outdir.is_dir() and any(d in exclude.parents for d in dirs):
        # the output folder lies in an input folder and is not walked: photos there that this tool
        # did not write are not anonymized; say so
        for f in _walk(outdir, None):
            if supported(f) and not f.with_name(f.name + ".json").exists():
                rel = f.relative_to(outdir).as_posix()
                not_taken.setdefault(
                    f"{outdir.as_posix()}/{rel}",
                    NotTaken(f, f"{outdir.as_posix()}/{rel}", "inside the output folder, which is not searched"),
                )
    if not items:
        raise UsageError(
            "no input images found (taken: "
            + ", ".join(sorted(protocol.INPUT_SUFFIXES))
            + (f"; not taken: {len(not_taken)} file(s), e.g. {next(iter(not_taken))}" if not_taken else "")
            + ")"
        )
    return Collection([items[k] for k in sorted(items)], [not_taken[k] for k in sorted(not_taken)], dirs)


# --------------------------------------------------------------------------- never destroy inputs


def output_paths(item: Item, outdir: Path) -> list[Path]:
    """Every file a run may write for ``item``: its image and its report."""
    out = outdir / item.out_rel
    return [out, out.with_name(out.name + ".json")]


def check_outputs(collection: Collection, outdir: Path, in_place: bool = False) -> None:
    """Refuse (UsageError) an output folder equal to an input folder, or any output file that is an
    input file, taken or not (paths resolved, so symlinks count), unless ``in_place``."""
    if in_place:
        return
    out_real = outdir.resolve()
    for d in collection.input_dirs:
        if d == out_real:
            raise UsageError(
                f"the output folder {outdir} is an input folder: its photos would be "
                "overwritten; choose another -o, or give --in-place to replace them"
            )
    inputs = {Path(os.path.realpath(i.src)): i for i in collection.items}
    protected = set(inputs) | {Path(os.path.realpath(n.src)) for n in collection.not_taken}
    # an output folder inside an input folder is not walked; a file already there that this tool
    # did not write (no report beside it) belongs to the inputs all the same
    inside = any(d in out_real.parents for d in collection.input_dirs)
    targets = [(p, i) for i in collection.items for p in output_paths(i, outdir)]
    targets += [(outdir / name, None) for name in RUN_FILES]
    for path, item in targets:
        real = Path(os.path.realpath(path))
        if real in protected:
            victim = inputs.get(real)
            what = f"input {victim.src}" if victim is not None else f"input file {real}"
            raise UsageError(
                f"{path} would overwrite the {what}; choose an output folder outside the "
                "inputs, or give --in-place to replace them"
            )
        if (
            inside
            and item is not None
            and path == outdir / item.out_rel
            and path.exists()
            and not path.with_name(path.name + ".json").exists()
        ):
            raise UsageError(
                f"{path} would overwrite a file of the input folder that {outdir} lies in; "
                "choose an output folder outside the inputs, or give --in-place"
            )


def existing_outputs(collection: Collection, outdir: Path) -> list[Path]:
    """Output images that exist already."""
    return [outdir / i.out_rel for i in collection.items if (outdir / i.out_rel).exists()]
