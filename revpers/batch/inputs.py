"""INPUT -> the files a batch run takes, on any filesystem pyarrow reads (local paths, ``file://``,
``s3://``, ``gs://``, ...), and where each one's output goes.

INPUT is one of:

- a folder: walked recursively; each file's path relative to the folder is mirrored under OUTPUT;
- a glob (``photos/**/*.jpg``, ``s3://bucket/set/*/*.png``): matches relative to the pattern's
  leading folder (``*`` and ``?`` stay within one path segment, ``**`` spans any number);
- a list file (``.txt``, ``.lst``, ``.list``): one path or URI per line, blank lines and ``#``
  comments skipped, relative entries resolved against the list file's folder; entries are mirrored
  relative to their common folder and must all be on one filesystem;
- one image file (mirrored as its name).

A file is taken when its suffix (any case) is in ``revpers_client.protocol.INPUT_SUFFIXES``; every
other file found is listed as not taken with the reason. Hidden files and folders (a name starting
with ".") are not walked, nor the output folder when it lies inside the input, nor the reports a run
writes beside its images (``x.jpg.json`` next to ``x.jpg``).

Outputs keep the input's format when it is JPEG, PNG or WebP and become PNG otherwise (or all take
``--format``); the output path is the input's relative path with that suffix. Two inputs that would
write the same output (``a.bmp`` and ``a.png``) are refused before anything runs, so distinct inputs
always have distinct outputs and a re-run writes the same names again (it overwrites, never adds).
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass

import pyarrow.fs as pafs

from revpers_client.protocol import INPUT_SUFFIXES, OUTPUT_FORMATS

LIST_SUFFIXES = (".txt", ".lst", ".list")
KEEP_FORMATS = {".jpg": "jpeg", ".jpeg": "jpeg", ".png": "png", ".webp": "webp"}
FORMAT_CHOICES = ("keep",) + tuple(OUTPUT_FORMATS)
RUN_FILES = ("run-summary.json", "review.csv", "review.json", "audit.parquet")
STATE_DIR = ".revpers-batch"  # resume state inside OUTPUT (hidden: never walked as input)


class InputError(ValueError):
    """INPUT or OUTPUT cannot be used; the message says why (exit code 2)."""


@dataclass(frozen=True)
class Location:
    """A folder or file on some filesystem: ``path`` is the filesystem's own path (no scheme)."""

    fs: pafs.FileSystem
    path: str
    uri: str  # as given (for messages and the run summary)


@dataclass(frozen=True)
class NotTaken:
    path: str  # relative to the input root
    reason: str  # e.g. "unsupported format .txt"


@dataclass(frozen=True)
class Plan:
    root: str  # the filesystem path every input lies under ("" when none is shared)
    files: list[str]  # filesystem paths of the inputs taken, sorted
    not_taken: list[NotTaken]


def has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def locate(uri: str) -> Location:
    """A local path or a URI -> (filesystem, path). Local paths are made absolute."""
    if "://" in uri:
        try:
            fs, path = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise InputError(f"{uri}: {exc}") from None
        return Location(fs, path.rstrip("/") or "/", uri)
    return Location(pafs.LocalFileSystem(), os.path.abspath(uri), uri)


def relative(path: str, root: str) -> str:
    return path[len(root) :].lstrip("/") if root else path.lstrip("/")


def output_name(rel: str, fmt_choice: str = "keep") -> tuple[str, str]:
    """(output path relative to OUTPUT, output format) for an input at ``rel``."""
    stem, suffix = posixpath.splitext(rel)
    known = KEEP_FORMATS.get(suffix.lower())
    if fmt_choice == "keep":
        return (rel, known) if known else (stem + OUTPUT_FORMATS["png"], "png")
    if known == fmt_choice:
        return rel, fmt_choice
    return stem + OUTPUT_FORMATS[fmt_choice], fmt_choice


def glob_regex(pattern: str) -> re.Pattern:
    """A glob over '/'-separated paths: ``**/`` any folders (or none), ``*`` and ``?`` within a segment."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:[^/]+/)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            j = pattern.find("]", i + 2)
            if j < 0:
                out.append(re.escape("["))
                i += 1
            else:
                body = pattern[i + 1 : j]
                out.append("[" + ("^" + body[1:] if body.startswith("!") else body).replace("\\", "\\\\") + "]")
                i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def _walk(loc: Location, exclude: str | None) -> list[str]:
    """Files under a folder (recursive), hidden entries and ``exclude`` (a folder path) left out."""
    selector = pafs.FileSelector(loc.path, recursive=True)
    try:
        infos = loc.fs.get_file_info(selector)
    except (OSError, ValueError) as exc:
        raise InputError(f"{loc.uri}: cannot list: {exc}") from None
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = relative(info.path, loc.path)
        if _hidden(rel) or (exclude and (info.path == exclude or info.path.startswith(exclude.rstrip("/") + "/"))):
            continue
        files.append(info.path)
    return files


def _read_list(loc: Location) -> tuple[pafs.FileSystem, list[str]]:
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{loc.uri}: cannot read the list file: {exc}") from None
    base = posixpath.dirname(loc.path)
    entries, fs_kind = [], None
    fs = loc.fs
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" in line:
            entry = locate(line)
            here, path = entry.fs, entry.path
        else:
            here, path = loc.fs, posixpath.normpath(line if line.startswith("/") else posixpath.join(base, line))
        kind = here.type_name
        if fs_kind is not None and kind != fs_kind:
            raise InputError(f"{loc.uri}:{n}: every entry must be on one filesystem ({fs_kind}), got {kind}")
        fs_kind, fs = kind, here
        entries.append(path)
    if not entries:
        raise InputError(f"{loc.uri}: the list file names no file")
    return fs, entries


def _found_by_glob(input_uri: str, exclude: str):
    scheme, sep, rest = input_uri.partition("://")
    body = rest if sep else input_uri
    parts = body.split("/")
    k = next(i for i, part in enumerate(parts) if has_magic(part))
    lead = "/".join(parts[:k]) or ("/" if body.startswith("/") else ".")
    loc = locate(f"{scheme}://{lead}" if sep else lead)
    pattern = glob_regex("/".join(parts[k:]))
    found = [p for p in _walk(loc, exclude) if pattern.match(relative(p, loc.path))]
    if not found:
        raise InputError(f"{input_uri}: the pattern matches nothing")
    return loc.fs, loc.path, found


def _found_at(input_uri: str, exclude: str):
    """A folder (walked), a list file (its entries) or one file: (filesystem, root, files)."""
    loc = locate(input_uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type == pafs.FileType.Directory:
        return loc.fs, loc.path, _walk(loc, exclude)
    if info.type == pafs.FileType.File and posixpath.splitext(loc.path)[1].lower() in LIST_SUFFIXES:
        fs, found = _read_list(loc)
        root = posixpath.commonpath(found) if len(found) > 1 else posixpath.dirname(found[0])
        if root in found:  # one entry, or an entry that is the common folder itself
            root = posixpath.dirname(root)
        return fs, root, found
    if info.type == pafs.FileType.File:
        return loc.fs, posixpath.dirname(loc.path), [loc.path]
    raise InputError(f"{input_uri}: no such file or folder")


def _sort_out(found, root: str, fmt_choice: str) -> tuple[dict[str, str], dict[str, NotTaken]]:
    """Inputs taken (output path -> input) and files not taken, with why; refuses two inputs that
    would write the same output."""
    taken: dict[str, str] = {}
    not_taken: dict[str, NotTaken] = {}
    for path in sorted(set(found)):
        rel = relative(path, root)
        name = posixpath.basename(rel)
        if name in RUN_FILES or (name.endswith(".json") and posixpath.splitext(name[:-5])[1].lower() in INPUT_SUFFIXES):
            continue  # what a run writes (reports beside images, run files): not an input
        suffix = posixpath.splitext(name)[1].lower()
        if suffix not in INPUT_SUFFIXES:
            not_taken[rel] = NotTaken(rel, f"unsupported format {suffix or '(no suffix)'}")
            continue
        out_rel, _ = output_name(rel, fmt_choice)
        if out_rel in taken:
            raise InputError(
                f"{taken[out_rel]} and {path} would both be written to {out_rel}; "
                "anonymize them in separate runs or to separate output folders"
            )
        taken[out_rel] = path
    return taken, not_taken


def plan(input_uri: str, output: Location, fmt_choice: str = "keep") -> tuple[pafs.FileSystem, Plan]:
    """The inputs of a run (see the module docstring); InputError when there are none or two would
    write the same output."""
    if fmt_choice not in FORMAT_CHOICES:
        raise InputError(f"--format must be one of {', '.join(FORMAT_CHOICES)}, got {fmt_choice!r}")
    finder = _found_by_glob if has_magic(input_uri) else _found_at
    fs, root, found = finder(input_uri, output.path)
    if fs.type_name == output.fs.type_name and output.path == root:
        raise InputError(f"the output folder {output.uri} is the input folder; choose another")
    taken, not_taken = _sort_out(found, root, fmt_choice)
    if not taken:
        raise InputError(
            f"{input_uri}: no input images found (taken: {', '.join(sorted(INPUT_SUFFIXES))}"
            + (f"; not taken: {len(not_taken)} file(s), e.g. {next(iter(not_taken))}" if not_taken else "")
            + ")"
        )
    return fs, Plan(root, sorted(taken.values()), [not_taken[k] for k in sorted(not_taken)])
