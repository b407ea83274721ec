"""Shared benchmark plumbing: the photo folder, the smoke bundle, machine/version stamps and
writing results (JSON + Markdown + PNG) under ``benchmarks/results/``."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

from revpers import __version__
from revpers.cli.logs import quiet_libraries
from revpers.export.onnx_export import export_bundle
from revpers.faces.samples import insightface_photo
from revpers.models.bundle import MANIFEST, load_bundle
from revpers.models.smoke import write_smoke_bundle
from revpers.service.images import FORMATS
from revpers.serving.launcher import find_tritonserver
from revpers.serving.repository import BACKENDS as REPOSITORY_BACKENDS
from revpers.serving.repository import build_repository
from revpers_client.cli import faces_of

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
WORK = ROOT / "build" / "bench"
# thread settings that change CPU timings; recorded in every result (the server inherits them)
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "REVPERS_ORT_THREADS")


def quiet() -> None:
    """Silence library chatter (same settings as the CLI and the tests)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore")
    try:
        quiet_libraries()
    except Exception:  # pragma: no cover - only cosmetics
        pass


# --------------------------------------------------------------------------------------- inputs
def photo_folder() -> list[Path]:
    """Five real photos that ship inside installed wheels (no download).

    insightface ``data/images``: t1.jpg (6 faces), Tom_Hanks_54745.png (1 face, 112 px),
    mask_blue.jpg (4 people wearing masks; dlib's HOG detector finds no face in it, so the service
    returns it unchanged: a real-world case a folder contains too); scikit-image ``astronaut.png``
    (1 face); matplotlib sample data ``grace_hopper.jpg`` (1 face).
    """
    skimage_data = Path(importlib.util.find_spec("skimage").submodule_search_locations[0]) / "data"
    mpl_data = Path(importlib.util.find_spec("matplotlib").submodule_search_locations[0]) / "mpl-data" / "sample_data"
    photos = [
        insightface_photo("t1.jpg"),
        insightface_photo("Tom_Hanks_54745.png"),
        skimage_data / "astronaut.png",
        mpl_data / "grace_hopper.jpg",
        insightface_photo("mask_blue.jpg"),
    ]
    missing = [str(p) for p in photos if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"benchmark photos missing: {missing} (install .[dev,bench])")
    return photos


def load_photos(folder: str | Path | None, limit: int | None = None) -> list[Path]:
    if folder:
        photos = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in FORMATS)
    else:
        photos = photo_folder()
    return photos[:limit] if limit else photos


def smoke_bundle(path: Path | None = None) -> Path:
    """The smoke bundle the benchmarks use (seed 0), built once under build/bench."""

    path = Path(path or WORK / "smoke-bundle")
    if not (path / MANIFEST).is_file():
        write_smoke_bundle(path, seed=0, overwrite=True)
    return path


def add_run_arguments(p, no_server_help: str = "skip the served parts") -> None:
    """The options every photo benchmark (stages, compare) takes, one definition for both."""
    p.add_argument("--steps", type=int, default=20, help="inversion = generation steps (paper default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bundle", type=Path, default=None, help="model bundle (default: the smoke bundle, built once)")
    p.add_argument("--photos", type=Path, default=None, help="folder of photos (default: five shipped photos)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N photos")
    p.add_argument("--backend", choices=REPOSITORY_BACKENDS, default="onnxruntime", help="Triton repository backend")
    p.add_argument("--device", default="cpu", help="torch device of the in-process pipeline")
    p.add_argument("--inversion-batch", type=int, default=10)
    p.add_argument(
        "--bls-instances",
        type=int,
        default=2,
        help="BLS processes (each also serves up to 8 requests at once from threads)",
    )
    p.add_argument(
        "--component-instances",
        type=int,
        default=None,
        help="instances of each component model (default: 2 on the CPU, where sessions run "
        "single-threaded so that two batches run at once; 1 on a GPU)",
    )
    p.add_argument("--no-server", action="store_true", help=no_server_help)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--work", type=Path, default=WORK)


def component_instances(args) -> int:
    """Instances per component model: --component-instances, else 2 on the CPU and 1 on a GPU."""
    if getattr(args, "component_instances", None):
        return int(args.component_instances)
    return 1 if str(getattr(args, "device", "cpu")).startswith("cuda") else 2


def served_repository(
    bundle: Path,
    backend: str,
    work: Path,
    inversion_batch: int = 10,
    bls_instances: int = 2,
    gpu: bool = False,
    component_instances: int = 1,
) -> Path:
    """Export the bundle (ONNX; TensorRT engines when the backend is tensorrt; nothing for the
    pytorch backend, which runs the bundle itself) and build a Triton repository for ``backend`` with
    ``revpers.repository.build_repository``."""

    artifacts = None
    if backend != "pytorch":
        artifacts = work / "artifacts"
        export_bundle(
            load_bundle(bundle),
            artifacts,
            inversion_batch=inversion_batch,
            tensorrt=backend == "tensorrt",
            log=lambda *_: None,
        )  # engines need TensorRT and a GPU
    return build_repository(
        artifacts,
        work / f"repository-{backend}",
        backend,
        bundle=bundle,
        bls_instances=bls_instances,
        inversion_batch=inversion_batch,
        force=True,
        gpu=gpu or backend == "tensorrt",
        component_instances=component_instances,
    )


# ---------------------------------------------------------------------------------------- stamps
def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except Exception:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    info = {
        "hostname": platform.node(),
        "os": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_cores_logical": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    try:
        import psutil

        info["cpu_cores_physical"] = psutil.cpu_count(logical=False)
        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    except ImportError:
        info["ram_gib"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
            "count": torch.cuda.device_count(),
        }
    else:
        info["gpu"] = None
    return info


def versions() -> dict:
    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__}
    for dist in (
        "diffusers",
        "transformers",
        "onnxruntime",
        "onnxruntime-gpu",
        "nvidia-pytriton",
        "tritonclient",
        "tensorrt",
        "numpy",
        "dlib-bin",
        "insightface",
    ):
        v = _version(dist)
        if v:
            out[dist] = v
    try:
        out["tritonserver"] = find_tritonserver().version
    except Exception as exc:
        out["tritonserver"] = f"not found ({type(exc).__name__})"

    out["revpers"] = __version__
    out["revpers_commit"] = revpers_commit()
    return out


def revpers_commit() -> str | None:
    """HEAD of this checkout, ``+dirty`` when tracked files have changes; None outside git."""
    commit = _git("rev-parse", "HEAD")
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    return (commit + ("+dirty" if dirty else "")) if commit else None


def stamp(name: str, params: dict, module: str | None = None) -> dict:
    """The header of every result; ``module``: what ``python -m`` ran (default ``benchmarks.<name>``)."""
    env = {k: os.environ[k] for k in THREAD_ENV if k in os.environ}
    return {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(
            [
                *(f"{k}={v}" for k, v in env.items()),
                Path(sys.executable).name,
                "-m",
                module or f"benchmarks.{name}",
                *sys.argv[1:],
            ]
        ),
        "machine": machine(),
        "versions": versions(),
        "thread_env": env,
        "params": params,
    }


# --------------------------------------------------------------------------------------- numbers
def anonymized_faces(report: dict) -> int:
    """Faces a photo-mode report says were anonymized (the count every benchmark records)."""
    return sum(f.get("action") == "anonymized" for f in faces_of(report))


# --------------------------------------------------------------------------------------- writing
def md_table(headers: list[str], rows: list[list]) -> str:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def stamp_md(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    gpu = m.get("gpu")
    lines = [
        f"- date: {result['date']}",
        f"- command: `{result['command']}`",
        f"- machine: {m['cpu']}, {m['cpu_cores_logical']} logical cores, {m.get('ram_gib')} GiB RAM"
        + (f", GPU {gpu['name']} ({gpu['memory_gib']} GiB)" if gpu else ", no GPU")
        + (f", load average at start {m['load_average_at_start']}" if m.get("load_average_at_start") else ""),
        "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
        "- parameters: " + ", ".join(f"{k}={val}" for k, val in result["params"].items()),
    ]
    return "\n".join(lines)


def write_results(name: str, result: dict, markdown: str, plot=None, out_dir: Path | None = None) -> dict[str, Path]:
    """Write ``<name>.json``, ``<name>.md`` (stamp + ``markdown``) and, when ``plot(result)`` is given
    (it returns a matplotlib figure), ``<name>.png``; returns the paths."""
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{name}.json", "md": out_dir / f"{name}.md"}
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        paths["png"] = out_dir / f"{name}.png"
        fig = plot(result)
        try:
            fig.tight_layout()
            fig.savefig(paths["png"], dpi=110)
        finally:
            plt.close(fig)
        result.setdefault("files", {})["png"] = paths["png"].name
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    title = result.get("title", name)
    paths["md"].write_text(
        f"# {title}\n\n{stamp_md(result)}\n\n{markdown.strip()}\n"
        + (f"\n![{name}]({name}.png)\n" if plot is not None else "")
    )
    return paths


def target(description: str, measured: float | None, threshold: float, higher_is_better: bool = True) -> dict:
    """A target check written into the results (never asserted): pass/fail or null when unmeasured."""
    if measured is None:
        ok = None
    else:
        ok = measured >= threshold if higher_is_better else measured <= threshold
    return {
        "target": description,
        "measured": None if measured is None else round(measured, 4),
        "threshold": threshold,
        "pass": ok,
    }
