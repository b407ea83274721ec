"""`revpers bundle init` and `revpers bundle check`: build a model bundle from downloaded weights, and
validate one without loading its large files.

``init`` takes SDXL as a diffusers folder or a Hugging Face hub cache (the repository's cache folder
``models--stabilityai--stable-diffusion-xl-base-1.0`` or one of its ``snapshots/<hash>`` folders,
whose files are links into ``blobs/``), in fp32 or the ``fp16`` variant, links (or copies) the files
the pipeline loads into the layout ``bundle.load_bundle`` expects and writes manifest.json.

``check`` reads only what describes each file: safetensors headers (8-byte length + JSON), the
adapter's pickle through a memory map (``torch.load(mmap=True)``: shapes only, no tensor data read),
ONNX graphs without external data, every manifest key (``MANIFEST_KEYS``). Each problem is one line
``path: problem``. ``require_valid_bundle`` runs the same check before anonymize/export/repository/serve
load anything. docs/real-weights.md documents the files, licences and keys.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from revpers.core.errors import BundleError, FaceModelError
from revpers.faces.analysis import INSIGHTFACE_DETECTOR_FILE, face_recognition_models_dir
from revpers.gate.policy import ARCFACE_THRESHOLD, DLIB_THRESHOLD
from revpers.gate.recognizers import verify_thresholds
from revpers.models.architecture import FACEID_EMBED_DIM, faceid_layout_for
from revpers.models.bundle import FORMAT, MANIFEST, VERSION, Bundle, load_bundle, write_manifest

SDXL_CACHE_REPO = "models--stabilityai--stable-diffusion-xl-base-1.0"
# SDXL components with weights -> the weight file's base name (diffusers models / transformers models)
SDXL_WEIGHTED = {
    "unet": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
SDXL_PLAIN = ("scheduler", "tokenizer", "tokenizer_2")  # configuration files only
SDXL_CLASSES = {
    "unet": ("diffusers", "UNet2DConditionModel"),
    "vae": ("diffusers", "AutoencoderKL"),
    "text_encoder": ("transformers", "CLIPTextModel"),
    "text_encoder_2": ("transformers", "CLIPTextModelWithProjection"),
}
ARCFACE_RECOGNIZER_FILE = "w600k_r50.onnx"  # buffalo_l's ArcFace R50
SCRFD_OUTPUTS = {9: "ok", 15: "ok", 6: "no keypoints", 10: "no keypoints"}  # insightface's SCRFD runner
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class BundleCheckError(BundleError):
    """The bundle check found problems; ``problems`` holds one ``path: problem`` line each."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


class BadFile(ValueError):
    """A weights file cannot be read (the message says why, without the path)."""


# ------------------------------------------------------------------------------------ manifest keys
REQUIRED = object()


@dataclass(frozen=True)
class Key:
    """One manifest key: JSON type, default (REQUIRED when it must be there), meaning, and for the
    ``faces`` section the detector it applies to."""

    name: str
    kind: str  # str | path | int | number | bool | object | number list | str or null
    default: object
    meaning: str
    detector: str | None = None


MANIFEST_KEYS = (
    Key("format", "str", REQUIRED, f'always "{FORMAT}"'),
    Key("version", "int", VERSION, f"manifest format version; {VERSION}"),
    Key("name", "str", "the folder name", "shown in reports and audit records"),
    Key(
        "smoke",
        "bool",
        False,
        "true for smoke bundles (random weights): every output says so and the gate does not use the random ArcFace",
    ),
    Key(
        "native_size",
        "int",
        REQUIRED,
        "face crop size in pixels that the diffusion runs at (SDXL: 1024); a multiple of 8, at least 32",
    ),
    Key(
        "embedding_dim",
        "int",
        REQUIRED,
        "identity embedding size: the recognizer's output and the adapter's projection input (ArcFace R50: 512)",
    ),
    Key("sdxl", "path", REQUIRED, "SDXL folder in diffusers layout"),
    Key(
        "sdxl_variant",
        "str or null",
        None,
        'diffusers weight variant of that folder: "fp16" loads '
        "*.fp16.safetensors (each component without one falls back to its plain file); null loads the plain files",
    ),
    Key("ip_adapter", "path", REQUIRED, "IP-Adapter FaceID SDXL file (.bin or .safetensors) with its LoRA"),
    Key("faces", "object", REQUIRED, "face detector and recognizer (keys below)"),
    Key("verify", "object", {}, "identity gate thresholds (keys below; docs/verification.md)"),
    Key("seed", "int", None, "smoke bundles: the seed their random weights were drawn with (information only)"),
    Key("full_size", "bool", None, "smoke bundles: SDXL-size models (information only)"),
    Key("note", "str", None, "free text (information only)"),
    Key(
        "sources", "object", None, "written by `revpers bundle init`: where each part was taken from (information only)"
    ),
)
FACES_KEYS = (
    Key(
        "detector",
        "str",
        REQUIRED,
        '"insightface" (SCRFD from a buffalo_l-style pack) or "dlib" (HOG, offline from PyPI)',
    ),
    Key("recognizer", "path", REQUIRED, "ArcFace-contract ONNX file: (N, 3, S, S) aligned face -> (N, embedding_dim)"),
    Key("pack", "path", REQUIRED, "local insightface model pack folder (never downloaded)", "insightface"),
    Key("detector_file", "str", INSIGHTFACE_DETECTOR_FILE, "SCRFD ONNX file inside the pack", "insightface"),
    Key(
        "det_thresh",
        "number",
        0.1,
        "SCRFD score threshold, in (0, 1); lower finds more faces and more false positives",
        "insightface",
    ),
    Key(
        "det_size",
        "int",
        640,
        "SCRFD input size in pixels (the photo is scaled into it keeping its aspect ratio); a positive multiple of 32",
        "insightface",
    ),
    Key(
        "landmarks",
        "path",
        "shape_predictor_68_face_landmarks.dat from face-recognition-models",
        "dlib 68-point landmark model",
        "dlib",
    ),
    Key(
        "upsample",
        "int",
        1,
        "times (each 2x) the photo is upsampled for the extra HOG pass that finds faces under ~80 px (0: no such pass)",
        "dlib",
    ),
    Key(
        "max_pixels",
        "number",
        24e6,
        "upsampling is reduced so the upsampled image stays below this many pixels",
        "dlib",
    ),
    Key(
        "rotations",
        "number list",
        [-30.0, 30.0],
        "extra passes on the photo rotated by these angles (degrees) for tilted heads; [] disables",
        "dlib",
    ),
    Key("min_score", "number", 0.0, "HOG SVM score threshold (a raw margin, not a probability)", "dlib"),
)
VERIFY_KEYS = (
    Key(
        "arcface_threshold",
        "number",
        ARCFACE_THRESHOLD,
        "ArcFace cosine at or above which a face still matches its input, in (-1, 1)",
    ),
    Key(
        "dlib_threshold",
        "number",
        DLIB_THRESHOLD,
        "dlib ResNet distance at or below which a face still matches, in (0, 2)",
    ),
)
DETECTORS = ("insightface", "dlib")


def _type_problem(kind: str, value) -> str | None:
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    ok = {
        "str": isinstance(value, str),
        "path": isinstance(value, str) and value != "",
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": number(value),
        "bool": isinstance(value, bool),
        "object": isinstance(value, dict),
        "number list": isinstance(value, list) and all(number(v) for v in value),
        "str or null": value is None or (isinstance(value, str) and value != ""),
    }[kind]
    if ok:
        return None
    want = {
        "str": "a string",
        "path": "a non-empty path string",
        "int": "an integer",
        "number": "a number",
        "bool": "true or false",
        "object": "an object",
        "number list": "a list of numbers",
        "str or null": "a string or null",
    }[kind]
    return f"expected {want}, got {json.dumps(value)}"


def _range_problem(key: str, value) -> str | None:
    rules = {
        "format": (lambda v: v == FORMAT, f'"{FORMAT}"'),
        "version": (lambda v: v == VERSION, f"{VERSION} (the version this revpers reads)"),
        "native_size": (lambda v: v >= 32 and v % 8 == 0, "a multiple of 8, at least 32"),
        "embedding_dim": (lambda v: v > 0, "positive"),
        "sdxl_variant": (lambda v: v is None or re.fullmatch(r"[A-Za-z0-9_]+", v), 'a variant name such as "fp16"'),
        "faces.detector": (lambda v: v in DETECTORS, '"insightface" or "dlib"'),
        "faces.det_thresh": (lambda v: 0 < v < 1, "in (0, 1)"),
        "faces.det_size": (lambda v: v > 0 and v % 32 == 0, "a positive multiple of 32 (SCRFD's largest stride)"),
        "faces.upsample": (lambda v: v >= 0, "0 or more"),
        "faces.max_pixels": (lambda v: v > 0, "positive"),
        "faces.rotations": (lambda v: all(-180 <= a <= 180 for a in v), "angles in [-180, 180]"),
    }
    rule = rules.get(key)
    if rule and not rule[0](value):
        return f"must be {rule[1]}, got {json.dumps(value)}"
    return None


def _unknown_keys(values: dict, known: dict, prefix: str) -> list[str]:
    out = []
    for name in values:
        if name not in known:
            close = difflib.get_close_matches(name, list(known), n=1)
            out.append(
                f"{prefix}{name}: unknown key"
                + (f" (did you mean {close[0]!r}?)" if close else f"; known: {', '.join(known)}")
            )
    return out


def _key_problem(k: Key, values: dict, prefix: str, detector: str | None) -> str | None:
    """The problem of key ``k`` in ``values`` (missing, wrong type or range, other detector's), or None."""
    if k.name not in values:
        if k.default is REQUIRED and (k.detector is None or k.detector == detector):
            return f"{prefix}{k.name}: missing (required)"
        return None
    value = values[k.name]
    problem = _type_problem(k.kind, value) or _range_problem(prefix + k.name, value)
    if problem:
        return f"{prefix}{k.name}: {problem}"
    if k.detector and detector in DETECTORS and k.detector != detector:
        return (
            f"{prefix}{k.name}: only used by the {k.detector} detector; this bundle's detector is "
            f"{detector} (remove it or change the detector)"
        )
    return None


def _section_problems(values: dict, keys: tuple[Key, ...], prefix: str, detector: str | None = None) -> list[str]:
    out = _unknown_keys(values, {k.name: k for k in keys}, prefix)
    for k in keys:
        problem = _key_problem(k, values, prefix, detector)
        if problem:
            out.append(problem)
    return out


def manifest_problems(manifest: dict) -> list[str]:
    """Type, range and name problems of manifest values, each ``key: problem``."""
    out = _section_problems(manifest, MANIFEST_KEYS, "")
    faces = manifest.get("faces")
    if isinstance(faces, dict):
        out += _section_problems(faces, FACES_KEYS, "faces.", faces.get("detector"))
    verify = manifest.get("verify")
    if isinstance(verify, dict):
        out += _section_problems(verify, VERIFY_KEYS, "verify.")
        try:
            verify_thresholds(manifest)
        except BundleError as exc:
            out.append(str(exc))
    return out


# ------------------------------------------------------------------------------------ reading files
_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header alone, after checking that the header
    describes exactly the bytes the file holds (a truncated download fails here)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 0 < n <= min(size - 8, MAX_HEADER):
            raise BadFile(f"not a safetensors file (its first 8 bytes give a {n}-byte header for a {size}-byte file)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadFile("not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise BadFile("not a safetensors file (its header is not a JSON object)")
    shapes, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, stop) = entry["dtype"], [int(d) for d in entry["shape"]], entry["data_offsets"]
            nbytes = math.prod(shape) * _DTYPE_BYTES[dtype]
        except (KeyError, TypeError, ValueError):
            raise BadFile(f"malformed header entry for tensor {name!r}") from None
        if stop - start != nbytes:
            raise BadFile(
                f"header entry {name!r} spans {stop - start} bytes; a {dtype} tensor of shape {shape} needs {nbytes}"
            )
        shapes[name] = tuple(shape)
        end = max(end, stop)
    data = size - 8 - n
    if data < end:
        raise BadFile(
            f"truncated: its header describes {end} bytes of tensor data, the file holds {data} "
            "(an interrupted download?)"
        )
    if data > end:
        raise BadFile(f"{data - end} bytes follow the tensor data its header describes (safetensors refuses it)")
    return shapes


def _flatten_shapes(obj, prefix: str = "") -> dict[str, tuple[int, ...]]:
    out = {}
    if isinstance(obj, torch.Tensor):
        out[prefix] = tuple(obj.shape)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flatten_shapes(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def torch_file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name (nested dict keys joined with '.') -> shape of a ``torch.save`` file, loaded with
    ``weights_only`` through a memory map: only the pickle is parsed, tensor bytes are not read."""
    with path.open("rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):
        raise BadFile("not a PyTorch weights file (neither a torch.save zip archive nor a pickle)")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 29": the error below says it better
            warnings.simplefilter("ignore")
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as exc:  # noqa: BLE001 - any failure to read it is what the check reports
        text = str(exc).strip()
        unpickler = re.search(r"WeightsUnpickler error: ([^\n]*)", text)
        reason = (
            f"it holds more than tensors: {unpickler.group(1)[:160]}"
            if unpickler
            else f"{type(exc).__name__}: {text.splitlines()[0][:160]}"
            if text
            else type(exc).__name__
        )
        raise BadFile(f"not a PyTorch weights file that loads with weights_only ({reason})") from None
    shapes = _flatten_shapes(obj)
    if not shapes:
        raise BadFile(f"holds no tensors (a {type(obj).__name__})")
    return shapes


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return safetensors_shapes(path) if path.suffix == ".safetensors" else torch_file_shapes(path)


def _absent(path: Path) -> str:
    if path.is_symlink() and not path.exists():
        return f"missing (broken link to {os.readlink(path)}; an incomplete download?)"
    return "missing"


def _weight_names(base: str, variant: str | None) -> list[str]:
    v = f".{variant}" if variant else ""
    return [f"{base}{v}.safetensors", f"{base}.safetensors.index{v}.json", f"{base}{v}.bin"]


def _variant_files(folder: Path, base: str) -> list[str]:
    b = re.escape(base)
    pattern = re.compile(rf"{b}\.(\w+)\.(safetensors|bin)$|{b}\.safetensors\.index\.(\w+)\.json$")
    return sorted(p.name for p in folder.glob(f"{base}*") if pattern.match(p.name))


# ------------------------------------------------------------------------------------ the check
class _Check:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.problems: list[str] = []
        self.facts: dict[str, object] = {}

    def bad(self, path: Path | str, problem: str) -> None:
        self.problems.append(f"{path}: {problem}")

    def json_file(self, path: Path, what: str):
        if not path.is_file():
            self.bad(path, f"{_absent(path)} ({what})")
            return None
        try:
            return json.loads(path.read_bytes())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            self.bad(path, f"not valid JSON ({exc})")
            return None


def _meta_model(library: str, class_name: str, folder: Path, config: dict):
    """The component's module built from its config on the meta device (shapes, no memory)."""
    import importlib

    cls = getattr(importlib.import_module(library), class_name)
    with torch.device("meta"):
        if library == "diffusers":
            return cls.from_config(config)
        return cls(cls.config_class.from_pretrained(folder))


def _component_model(c: _Check, sdxl: Path, name: str, index: dict):
    """(meta module, class name) built from ``name``/config.json with the class model_index.json names; None
    (reported) when the config is unreadable or its class cannot build it."""
    folder = sdxl / name
    config = c.json_file(folder / "config.json", f"the {name} configuration")
    if not isinstance(config, dict):
        return None
    entry = index.get(name) if isinstance(index, dict) else None
    library, class_name = entry if isinstance(entry, list) and len(entry) == 2 else SDXL_CLASSES[name]
    if library not in ("diffusers", "transformers"):
        c.bad(sdxl / "model_index.json", f"{name}: library {library!r} is neither diffusers nor transformers")
        return None
    try:
        return _meta_model(library, class_name, folder, config), class_name
    except Exception as exc:  # noqa: BLE001 - a config its class cannot build is the problem reported
        c.bad(folder / "config.json", f"{library}.{class_name} cannot be built from it ({str(exc)[:160]})")
        return None


def _find_weights(c: _Check, folder: Path, name: str, variant: str | None) -> Path | None:
    """The component's weight file (or shard index), preferring ``variant``; None (reported) when there is none."""
    base = SDXL_WEIGHTED[name]
    names = _weight_names(base, variant) + (_weight_names(base, None) if variant else [])
    found = next((folder / n for n in names if (folder / n).is_file() or (folder / n).is_symlink()), None)
    if found is None:
        others = _variant_files(folder, base)
        hint = ""
        if others and not variant:
            v = re.search(r"\.(\w+)\.(?:safetensors|bin|json)$", others[0]).group(1)
            hint = (
                f'; the folder has {", ".join(others)}: set "sdxl_variant": "{v}" in {MANIFEST} '
                "(or rebuild it with `revpers bundle init`)"
            )
        c.bad(folder / names[0], f"missing ({name} weights){hint}")
        return None
    if not found.exists():
        c.bad(found, _absent(found))
        return None
    return found


def _weight_files(c: _Check, folder: Path, found: Path) -> list[Path] | None:
    """``found`` itself, or the shards its index lists; None (reported) for an unusable index."""
    if not found.name.endswith(".json"):
        return [found]
    weight_map = c.json_file(found, "the shard index")
    if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
        if weight_map is not None:
            c.bad(found, "not a shard index (no weight_map object)")
        return None
    return [folder / f for f in sorted(set(weight_map["weight_map"].values()))]


def _files_shapes(c: _Check, files: list[Path]) -> dict[str, tuple[int, ...]] | None:
    """Tensor name -> shape over all ``files``; None (reported) at the first missing or unreadable one."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if not f.is_file():
            c.bad(f, _absent(f))
            return None
        try:
            shapes.update(tensor_shapes(f))
        except BadFile as exc:
            c.bad(f, str(exc))
            return None
    return shapes


def _compare_shapes(c: _Check, found: Path, name: str, class_name: str, model, shapes: dict) -> int:
    """Reports tensors the module needs that the files lack or hold in another shape; returns how many it needs."""
    if hasattr(model, "_fix_state_dict_keys_on_load"):  # diffusers renames pre-0.14 attention keys on load
        model._fix_state_dict_keys_on_load(shapes)
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in want if k not in shapes]
    wrong = [
        f"{k}: file {list(shapes[k])} vs config {list(s)}" for k, s in want.items() if k in shapes and shapes[k] != s
    ]
    if missing:
        c.bad(
            found,
            f"{len(missing)} of the {len(want)} tensors {class_name} needs are missing "
            f"(e.g. {', '.join(missing[:3])}); is this the {name} file?",
        )
    if wrong:
        c.bad(found, f"{len(wrong)} tensors differ in shape from {name}/config.json (e.g. {'; '.join(wrong[:3])})")
    return len(want)


def _component(c: _Check, sdxl: Path, name: str, index: dict, variant: str | None):
    """Config, weight files and their shapes against the config's module; returns the meta module."""
    folder = sdxl / name
    built = _component_model(c, sdxl, name, index)
    if built is None:
        return None
    model, class_name = built
    found = _find_weights(c, folder, name, variant)
    if found is None:
        return model
    files = _weight_files(c, folder, found)
    if files is None:
        return model
    shapes = _files_shapes(c, files)
    if shapes is None:
        return model
    n = _compare_shapes(c, found, name, class_name, model, shapes)
    c.facts.setdefault("sdxl_tensors", 0)
    c.facts["sdxl_tensors"] += n
    c.facts.setdefault("sdxl_files", []).append(str(found.relative_to(sdxl)))
    return model


def _check_sdxl(c: _Check, manifest: dict):
    rel = manifest.get("sdxl")
    if not isinstance(rel, str) or not rel:
        return None
    sdxl = c.root / rel
    if not sdxl.is_dir():
        c.bad(sdxl, f"{_absent(sdxl)} (the SDXL folder in diffusers layout)")
        return None
    variant = manifest.get("sdxl_variant") if isinstance(manifest.get("sdxl_variant"), str) else None
    index = c.json_file(sdxl / "model_index.json", "the diffusers pipeline index")
    models = {name: _component(c, sdxl, name, index or {}, variant) for name in SDXL_WEIGHTED}
    for name in ("tokenizer", "tokenizer_2"):
        folder = sdxl / name
        if not (
            (folder / "tokenizer.json").is_file()
            or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file())
        ):
            c.bad(folder, "missing tokenizer files (tokenizer.json, or vocab.json and merges.txt)")
    c.json_file(sdxl / "scheduler" / "scheduler_config.json", "the scheduler configuration")
    return models["unet"]


def _check_adapter(c: _Check, manifest: dict, unet) -> None:
    rel = manifest.get("ip_adapter")
    if not isinstance(rel, str) or not rel:
        return
    path = c.root / rel
    if not path.is_file():
        c.bad(path, f"{_absent(path)} (the IP-Adapter FaceID file)")
        return
    try:
        shapes = tensor_shapes(path)
    except BadFile as exc:
        c.bad(path, str(exc))
        return
    groups = sorted({k.split(".", 1)[0] for k in shapes})
    if not {"image_proj", "ip_adapter"} <= set(groups):
        c.bad(
            path,
            f"not an IP-Adapter file: no 'image_proj' and 'ip_adapter' weights (top-level keys: "
            f"{', '.join(groups[:6])})",
        )
        return
    proj = shapes.get("image_proj.proj.0.weight")
    dim = manifest.get("embedding_dim")
    if proj and len(proj) == 2 and isinstance(dim, int) and proj[1] != dim:
        c.bad(c.root / MANIFEST, f"embedding_dim: {dim}, but {rel} projects {proj[1]}-d identity embeddings")
    if unet is None:
        return  # the UNet configuration is unusable (reported): nothing to compare the layout with
    try:
        want = faceid_layout_for(shapes, unet)
    except (ValueError, IndexError, TypeError, ZeroDivisionError) as exc:
        c.bad(path, f"its layout cannot be matched to the UNet ({exc})")
        return
    lora = [k for k in shapes if "_lora." in k]
    if not lora:
        c.bad(
            path,
            "no FaceID LoRA weights (ip_adapter.N.to_q_lora.down.weight, ...): the method needs "
            "ip-adapter-faceid_sdxl.bin, which carries them (plain IP-Adapter or FaceID Plus files do not fit)",
        )
        want = {k: s for k, s in want.items() if "_lora." not in k}
    wrong = [
        f"{k}: file {list(shapes[k])} vs UNet {list(s)}" for k, s in want.items() if k in shapes and shapes[k] != s
    ]
    missing = [k for k in want if k not in shapes]
    extra = [k for k in shapes if k not in want]
    if wrong or missing or extra:
        parts = (
            ([f"{len(wrong)} differ in shape (e.g. {'; '.join(wrong[:2])})"] if wrong else [])
            + ([f"{len(missing)} missing (e.g. {', '.join(missing[:2])})"] if missing else [])
            + ([f"{len(extra)} unexpected (e.g. {', '.join(extra[:2])})"] if extra else [])
        )
        c.bad(
            path,
            f"does not fit the UNet in {manifest.get('sdxl')}/unet/config.json: of {len(want)} tensors, "
            + ", ".join(parts),
        )
        return
    c.facts["adapter"] = (len(shapes), shapes[lora[0]][0] if lora else None)


def _onnx_model(c: _Check, path: Path, what: str):
    import onnx

    if not path.is_file():
        c.bad(path, f"{_absent(path)} ({what})")
        return None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf raises several kinds on a damaged file
        c.bad(path, f"not an ONNX model ({type(exc).__name__}: {str(exc)[:120]})")
        return None
    if model.ir_version <= 0 or not model.graph.node:
        c.bad(path, "not an ONNX model (no graph in it)")
        return None
    for t in model.graph.initializer:  # weights kept beside the graph must be there
        if t.data_location == onnx.TensorProto.EXTERNAL:
            loc = {e.key: e.value for e in t.external_data}.get("location", "")
            if not (path.parent / loc).is_file():
                c.bad(path.parent / loc, f"missing (external weights of {path.name})")
                return None
    return model


def _dims(value_info) -> list:
    return [
        d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim
    ]


def _graph_inputs(model) -> list:
    init = {t.name for t in model.graph.initializer}  # old exporters list weights as inputs too
    return [i for i in model.graph.input if i.name not in init]


def _check_recognizer(c: _Check, path: Path, dim) -> None:
    model = _onnx_model(c, path, "the ArcFace recognizer")
    if model is None:
        return
    inputs = _graph_inputs(model)
    shape = _dims(inputs[0]) if len(inputs) == 1 else None
    if (
        shape is None
        or len(shape) != 4
        or shape[1] not in (3, "?")
        or not isinstance(shape[2], int)
        or shape[2] != shape[3]
        or not (shape[2] % 112 == 0 or shape[2] % 128 == 0)
    ):
        got = ", ".join(f"{i.name} {_dims(i)}" for i in inputs) or "none"
        c.bad(
            path,
            f"not an ArcFace-contract recognizer: expected one input (N, 3, S, S) with S a multiple of "
            f"112 or 128, graph inputs: {got}",
        )
        return
    out = _dims(model.graph.output[0]) if model.graph.output else []
    if len(out) != 2:
        c.bad(path, f"not an ArcFace-contract recognizer: first output has shape {out}, expected (N, embedding)")
    elif isinstance(out[1], int) and isinstance(dim, int) and out[1] != dim:
        c.bad(path, f"gives {out[1]}-d embeddings but the manifest's embedding_dim is {dim}")
    else:
        c.facts["recognizer"] = f"{path.name} ({shape[2]} px in, {out[1]}-d out)"


def _check_detector(c: _Check, path: Path) -> None:
    model = _onnx_model(c, path, "the SCRFD face detector")
    if model is None:
        return
    inputs = _graph_inputs(model)
    shape = _dims(inputs[0]) if inputs else []
    if len(inputs) != 1 or len(shape) != 4 or shape[1] not in (3, "?"):
        c.bad(
            path,
            f"not an SCRFD detector: expected one image input (N, 3, H, W), graph inputs: "
            f"{', '.join(f'{i.name} {_dims(i)}' for i in inputs) or 'none'}",
        )
        return
    kind = SCRFD_OUTPUTS.get(len(model.graph.output))
    if kind is None:
        c.bad(
            path,
            f"not an SCRFD detector: {len(model.graph.output)} outputs (expected 9 or 15: scores, boxes "
            "and 5-point keypoints per stride)",
        )
    elif kind == "no keypoints":
        c.bad(path, "an SCRFD detector without 5-point keypoints: alignment needs them (use buffalo_l's det_10g.onnx)")


def _check_pack(c: _Check, faces: dict) -> None:
    pack = c.root / faces["pack"]
    if not pack.is_dir():
        c.bad(pack, f"{_absent(pack)} (the insightface model pack folder)")
    else:
        det = faces.get("detector_file", INSIGHTFACE_DETECTOR_FILE)
        _check_detector(c, pack / (det if isinstance(det, str) else INSIGHTFACE_DETECTOR_FILE))


def _check_landmarks(c: _Check, faces: dict) -> None:
    landmarks = faces.get("landmarks")
    if isinstance(landmarks, str) and landmarks:
        if not (c.root / landmarks).is_file():
            c.bad(c.root / landmarks, f"{_absent(c.root / landmarks)} (the dlib 68-point landmark model)")
    else:
        try:
            default = face_recognition_models_dir() / "shape_predictor_68_face_landmarks.dat"
            if not default.is_file():
                c.bad(default, "missing (dlib's 68-point landmark model of face-recognition-models)")
        except FaceModelError as exc:
            c.bad(c.root / MANIFEST, f"faces.detector dlib: {exc}")


def _check_faces(c: _Check, manifest: dict) -> None:
    faces = manifest.get("faces")
    if not isinstance(faces, dict):
        return
    if isinstance(faces.get("recognizer"), str) and faces["recognizer"]:
        _check_recognizer(c, c.root / faces["recognizer"], manifest.get("embedding_dim"))
    detector = faces.get("detector")
    if detector == "insightface" and isinstance(faces.get("pack"), str) and faces["pack"]:
        _check_pack(c, faces)
    elif detector == "dlib":
        _check_landmarks(c, faces)
    if detector in DETECTORS:
        c.facts["detector"] = detector


def run_check(root: str | Path) -> _Check:
    c = _Check(Path(root))
    if not c.root.is_dir():
        c.bad(
            c.root,
            "model bundle folder does not exist"
            if not c.root.exists()
            else "not a folder (a model bundle is a folder)",
        )
        c.problems[-1] += (
            " (build one with `revpers bundle init` from downloaded weights, see docs/real-weights.md, "
            "or a test one with `revpers smoke-model`)"
        )
        return c
    manifest = c.json_file(c.root / MANIFEST, "the bundle manifest")
    if manifest is None:
        return c
    if not isinstance(manifest, dict):
        c.bad(c.root / MANIFEST, f"expected a JSON object, got {type(manifest).__name__}")
        return c
    for problem in manifest_problems(manifest):
        c.bad(c.root / MANIFEST, problem)
    unet = _check_sdxl(c, manifest)
    _check_adapter(c, manifest, unet)
    _check_faces(c, manifest)
    c.facts.update(manifest=manifest)
    return c


def check_bundle(root: str | Path) -> list[str]:
    """Every problem of the bundle at ``root``, one ``path: problem`` line each; [] when it is sound.
    Large files are not read: headers, pickles through a memory map, ONNX graphs without external data."""
    return run_check(root).problems


def require_valid_bundle(root: str | Path) -> Bundle:
    """The bundle at ``root`` loaded, after ``check_bundle`` found nothing; BundleCheckError otherwise."""
    problems = check_bundle(root)
    if problems:
        raise BundleCheckError(problems)
    return load_bundle(root)


def check_summary(c: _Check) -> str:
    m = c.facts.get("manifest", {})
    tensors, rank = c.facts.get("adapter", (0, None))
    return (
        f"{c.root}: OK: {m.get('name', c.root.name)}{' (SMOKE WEIGHTS)' if m.get('smoke') else ''}, "
        f"{m.get('native_size')} px faces; SDXL {m.get('sdxl_variant') or 'fp32'} weights, "
        f"{c.facts.get('sdxl_tensors', 0)} tensors in {len(c.facts.get('sdxl_files', []))} files; "
        f"IP-Adapter FaceID {tensors} tensors, LoRA rank {rank}; faces: {c.facts.get('detector')} detector, "
        f"recognizer {c.facts.get('recognizer')}"
    )


# ------------------------------------------------------------------------------------ init
def resolve_sdxl_source(path: str | Path) -> Path:
    """The SDXL diffusers folder in ``path``: the folder itself, a Hugging Face cache snapshot, the
    repository's cache folder (``refs/main``, else its only complete snapshot) or the hub cache root."""
    p = Path(path).expanduser()
    if (p / "model_index.json").is_file():
        return p
    if (p / "snapshots").is_dir():
        ref = p / "refs" / "main"
        if ref.is_file():
            main = p / "snapshots" / ref.read_text().strip()
            if (main / "model_index.json").is_file():
                return main
        snaps = sorted(s for s in (p / "snapshots").iterdir() if (s / "model_index.json").is_file())
        if len(snaps) == 1:
            return snaps[0]
        if not snaps:
            raise BundleError(f"{p}: no snapshot in it has model_index.json (is the download complete?)")
        raise BundleError(
            f"{p}: {len(snaps)} snapshots ({', '.join(s.name[:12] for s in snaps)}); "
            f"pass the one to use as --sdxl {p}/snapshots/<hash>"
        )
    if (p / SDXL_CACHE_REPO).is_dir():
        return resolve_sdxl_source(p / SDXL_CACHE_REPO)
    if not p.exists():
        raise BundleError(f"{p}: does not exist")
    raise BundleError(
        f"{p}: not an SDXL diffusers folder (no model_index.json) nor a Hugging Face cache of "
        f"stabilityai/stable-diffusion-xl-base-1.0 (no snapshots/)"
    )


def _pick_weights(folder: Path, base: str, variant: str) -> tuple[list[Path], str | None]:
    order = {"auto": [None, "fp16"], "fp32": [None], "fp16": ["fp16"]}[variant]
    for v in order:
        for name in _weight_names(base, v):
            f = folder / name
            if f.is_symlink() and not f.exists():
                raise BundleError(f"{f}: {_absent(f)}")
            if f.is_file():
                if name.endswith(".json"):
                    shards = sorted(set(json.loads(f.read_text()).get("weight_map", {}).values()))
                    return [f, *(folder / s for s in shards)], v
                return [f], v
    want = " or ".join(_weight_names(base, v)[0] for v in order)
    raise BundleError(
        f"{folder}: no {want} (download that folder's weights{'' if variant == 'auto' else ', or use --variant auto'})"
    )


def _sdxl_files(src: Path, variant: str) -> tuple[list[tuple[Path, str]], str | None]:
    """(source file, path inside sdxl/) pairs to put in the bundle, and the variant used."""
    files = [(src / "model_index.json", "model_index.json")]
    for name in SDXL_PLAIN:
        folder = src / name
        if not folder.is_dir():
            raise BundleError(f"{folder}: missing (download the {name} folder)")
        files += [(f, f"{name}/{f.name}") for f in sorted(folder.iterdir()) if f.is_file() or f.is_symlink()]
    used = set()
    for name, base in SDXL_WEIGHTED.items():
        folder = src / name
        if not (folder / "config.json").is_file():
            config = folder / "config.json"
            raise BundleError(f"{config}: {_absent(config)} (download the {name} folder)")
        weights, v = _pick_weights(folder, base, variant)
        used.add(v)
        files += [(folder / "config.json", f"{name}/config.json")] + [(w, f"{name}/{w.name}") for w in weights]
    return files, next((v for v in used if v), None)


def _faces_files(faces: Path, detector: str, recognizer: str | None) -> tuple[list[tuple[Path, str]], dict]:
    if not faces.is_dir():
        raise BundleError(
            f"{faces}: {'does not exist' if not faces.exists() else 'not a folder'} (--faces takes the "
            "folder holding the face models, e.g. insightface's buffalo_l)"
        )
    if detector == "auto":
        detector = "insightface" if (faces / INSIGHTFACE_DETECTOR_FILE).is_file() else "dlib"
    onnx_files = sorted(f.name for f in faces.glob("*.onnx") if f.name != INSIGHTFACE_DETECTOR_FILE)
    if recognizer is None:
        if ARCFACE_RECOGNIZER_FILE in onnx_files:
            recognizer = ARCFACE_RECOGNIZER_FILE
        elif len(onnx_files) == 1:
            recognizer = onnx_files[0]
        else:
            raise BundleError(
                f"{faces}: {'no' if not onnx_files else 'several'} recognizer ONNX files "
                f"({', '.join(onnx_files) or 'none'}); name one with --recognizer"
            )
    if not (faces / recognizer).is_file():
        raise BundleError(f"{faces / recognizer}: {_absent(faces / recognizer)} (the ArcFace recognizer)")
    if detector == "insightface":
        if not (faces / INSIGHTFACE_DETECTOR_FILE).is_file():
            raise BundleError(
                f"{faces / INSIGHTFACE_DETECTOR_FILE}: missing (the insightface detector; or use --detector dlib)"
            )
        pack = f"face_models/{faces.resolve().name}"
        files = [
            (faces / INSIGHTFACE_DETECTOR_FILE, f"{pack}/{INSIGHTFACE_DETECTOR_FILE}"),
            (faces / recognizer, f"{pack}/{recognizer}"),
        ]
        return files, {"detector": "insightface", "pack": pack, "recognizer": f"{pack}/{recognizer}"}
    return [(faces / recognizer, f"face_models/{recognizer}")], {
        "detector": "dlib",
        "recognizer": f"face_models/{recognizer}",
    }


def _check_output(out: Path, sources: tuple[Path, ...], force: bool) -> None:
    """``out`` must not hold a source, and must be empty or absent unless ``force``."""
    out_r = out.resolve()
    for s in sources:
        if out_r == s.resolve() or out_r in s.resolve().parents:
            raise BundleError(f"{out}: it holds the source {s}; choose another output folder")
    if out.is_symlink() or out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not force:
            raise BundleError(f"{out}: exists and is not empty (use --force to replace it)")


def _native_size(src: Path) -> int:
    """The face size SDXL generates natively: the UNet's sample size times the VAE's downsampling."""
    try:
        unet_cfg = json.loads((src / "unet" / "config.json").read_text())
        vae_cfg = json.loads((src / "vae" / "config.json").read_text())
        return int(unet_cfg["sample_size"]) * 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    except (ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{src}: cannot read the face size from unet/vae config.json ({exc})") from None


def _adapter_embedding_dim(ip_adapter: Path) -> int:
    try:
        proj = tensor_shapes(ip_adapter).get("image_proj.proj.0.weight")
        return int(proj[1]) if proj and len(proj) == 2 else FACEID_EMBED_DIM
    except BadFile:
        return FACEID_EMBED_DIM  # `bundle check` names the file's problem below


def _place_files(tmp: Path, files: list[tuple[Path, str]], copy: bool) -> None:
    for f, rel in files:
        dst = tmp / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not f.exists():
            raise BundleError(f"{f}: {_absent(f)}")
        if copy:
            shutil.copyfile(f, dst)
        else:
            dst.symlink_to(f.resolve())


def _replace_with(out: Path, tmp: Path) -> None:
    if out.is_symlink() or out.is_file():
        out.unlink()
    elif out.exists():
        shutil.rmtree(out)
    tmp.rename(out)


def init_bundle(
    out: str | Path,
    sdxl: str | Path,
    ip_adapter: str | Path,
    faces: str | Path,
    *,
    copy: bool = False,
    force: bool = False,
    variant: str = "auto",
    detector: str = "auto",
    recognizer: str | None = None,
    name: str | None = None,
    smoke: bool = False,
) -> Path:
    """Write a bundle at ``out`` from downloaded files (links, or copies with ``copy``); returns ``out``.
    Built in a temporary sibling folder and renamed into place, so a failure leaves nothing behind."""
    out = Path(out).expanduser()
    src = resolve_sdxl_source(sdxl)
    ip_adapter = Path(ip_adapter).expanduser()
    if not ip_adapter.is_file():
        raise BundleError(f"{ip_adapter}: {_absent(ip_adapter)} (--ip-adapter takes ip-adapter-faceid_sdxl.bin)")
    sdxl_files, used_variant = _sdxl_files(src, variant)
    face_files, faces_spec = _faces_files(Path(faces).expanduser(), detector, recognizer)
    out_r = out.resolve()
    _check_output(out, (src, ip_adapter, Path(faces).expanduser()), force)
    files = [(f, f"sdxl/{rel}") for f, rel in sdxl_files] + face_files + [(ip_adapter, f"ip_adapter/{ip_adapter.name}")]
    native = _native_size(src)
    embedding_dim = _adapter_embedding_dim(ip_adapter)
    tmp = out_r.parent / f".{out_r.name}.init-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _place_files(tmp, files, copy)
        extra = {
            "sources": {
                "sdxl": str(src.resolve()),
                "ip_adapter": str(ip_adapter.resolve()),
                "faces": str(Path(faces).expanduser().resolve()),
            }
        }
        if used_variant:
            extra["sdxl_variant"] = used_variant
        write_manifest(
            tmp,
            native_size=native,
            embedding_dim=embedding_dim,
            smoke=smoke,
            faces=faces_spec,
            name=name or out_r.name,
            ip_adapter=f"ip_adapter/{ip_adapter.name}",
            extra=extra,
        )
        _replace_with(out, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def repository_bundle(repository: str | Path) -> Path | None:
    """The bundle a Triton model repository's BLS model loads (from revpers/config.pbtxt), if any."""
    config = Path(repository) / "revpers" / "config.pbtxt"
    if not config.is_file():
        return None
    m = re.search(r'key:\s*"bundle"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', config.read_text())
    return Path(m.group(1)) if m else None
