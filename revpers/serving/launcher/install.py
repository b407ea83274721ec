"""Finding a tritonserver installation and preparing the Python-backend directory its stubs need.

Where the server comes from, the backend-directory layout and why the stub needs its import path
passed in an environment variable: docs/serving.md, "The launcher".
"""

from __future__ import annotations

import contextlib
import errno
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from revpers.serving.launcher.errors import TritonNotFoundError, TritonServerError

LOG = logging.getLogger("revpers.serving.launcher")

ENV_BINARY = "REVPERS_TRITONSERVER"
ENV_BACKENDS = "REVPERS_TRITON_BACKENDS"
ENV_CACHE = "REVPERS_CACHE_DIR"
INSTALL_HINT = "pip install 'revpers[server]'"
# the directory holding the top-level `revpers` package (this module is revpers.<...>.install)
REPO_ROOT = Path(__file__).resolve().parents[len(__name__.split(".")) - 1]
STUB = "triton_python_backend_stub"
_BACKEND_FILES = ("libtriton_python.so", "triton_python_backend_utils.py")


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver installation.

    ``kind`` is ``"wheel"`` (nvidia-pytriton layout: ``lib_dir`` must go on ``LD_LIBRARY_PATH``
    and the Python stub is picked from ``stubs_dir``) or ``"system"`` (a full install such as
    NGC's ``/opt/tritonserver``: ``backends_dir`` is used as is).
    """

    binary: Path
    backends_dir: Path
    lib_dir: Path | None = None
    stubs_dir: Path | None = None
    version: str = "unknown"
    kind: str = "wheel"

    def stub_for(self, version_info: Sequence[int] | None = None) -> Path:
        """The Python-backend stub built for ``version_info`` (default: this interpreter)."""
        major, minor = tuple(version_info or sys.version_info)[:2]
        if self.stubs_dir is None:
            stub = self.backends_dir / "python" / STUB
            if stub.is_file():
                return stub
            raise TritonServerError(f"no {STUB} in {self.backends_dir / 'python'}")
        stub = self.stubs_dir / f"{major}.{minor}" / STUB
        if not stub.is_file():
            have = sorted(
                (p.name for p in self.stubs_dir.iterdir() if (p / STUB).is_file()) if self.stubs_dir.is_dir() else [],
                key=lambda v: [int(x) if x.isdigit() else 0 for x in v.split(".")],
            )
            raise TritonServerError(
                f"the Triton Python backend has no stub for Python {major}.{minor} "
                f"(stubs in {self.stubs_dir}: {', '.join(have) or 'none'}); "
                "run revpers under one of those Python versions"
            )
        return stub


def stub_python_version(stub: Path) -> tuple[int, int] | None:
    """The Python a stub binary embeds, read from the libpython3.X it links (None if unknown)."""
    try:
        data = stub.read_bytes()
    except OSError:
        return None
    m = re.search(rb"libpython(\d)\.(\d+)", data)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _wheel_layout(binary: Path, version: str) -> TritonInstall | None:
    """nvidia-pytriton's layout: <sp>/pytriton/tritonserver/{bin,backends,python_backend_stubs}."""
    root = binary.parent.parent
    if not (root / "python_backend_stubs").is_dir():
        return None
    libs = root.parent.parent / "nvidia_pytriton.libs"
    return TritonInstall(
        binary=binary,
        backends_dir=root / "backends",
        lib_dir=libs if libs.is_dir() else None,
        stubs_dir=root / "python_backend_stubs",
        version=version,
        kind="wheel",
    )


def _system_install(binary: Path) -> TritonInstall | None:
    candidates = [os.environ.get(ENV_BACKENDS), binary.parent.parent / "backends", "/opt/tritonserver/backends"]
    for cand in candidates:
        if cand and Path(cand).is_dir():
            backends = Path(cand)
            version = "unknown"
            vfile = backends.parent / "TRITON_VERSION"
            with contextlib.suppress(OSError):
                version = vfile.read_text().strip() or version
            return TritonInstall(binary=binary, backends_dir=backends, version=version, kind="system")
    return None


def _pytriton_version() -> str:
    try:
        return "pytriton" + importlib.metadata.version("nvidia-pytriton")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def find_tritonserver() -> TritonInstall:
    """Locate tritonserver: ``$REVPERS_TRITONSERVER``, then the nvidia-pytriton wheel, then ``PATH``."""
    explicit = os.environ.get(ENV_BINARY)
    if explicit:
        found = shutil.which(explicit) if os.sep not in explicit else explicit
        path = Path(found) if found else None
        if path is None or not path.is_file() or not os.access(path, os.X_OK):
            raise TritonNotFoundError(f"{ENV_BINARY}={explicit!r} is not an executable tritonserver binary")
        path = path.absolute()
        install = _wheel_layout(path, _pytriton_version()) or _system_install(path)
        if install is None:
            raise TritonNotFoundError(
                f"{ENV_BINARY}={explicit!r}: no backends directory found next to it "
                f"({path.parent.parent / 'backends'}) nor in /opt/tritonserver/backends; set {ENV_BACKENDS}"
            )
        return install

    spec = importlib.util.find_spec("pytriton")
    if spec is not None and spec.submodule_search_locations:
        root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
        binary = root / "bin" / "tritonserver"
        if binary.is_file():
            install = _wheel_layout(binary, _pytriton_version())
            if install is not None:
                return install

    on_path = shutil.which("tritonserver")
    if on_path:
        install = _system_install(Path(on_path).absolute())
        if install is not None:
            return install

    raise TritonNotFoundError(
        "tritonserver not found: install the server extra with "
        f"`{INSTALL_HINT}` (nvidia-pytriton ships tritonserver with the Python backend), "
        f"run inside NVIDIA's Triton container, or set {ENV_BINARY}=/path/to/tritonserver"
    )


def default_cache_dir() -> Path:
    base = os.environ.get(ENV_CACHE)
    if base:
        return Path(base) / "triton-backends"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return Path(xdg or Path.home() / ".cache") / "revpers" / "triton-backends"


# Appended to our copy of triton_python_backend_utils.py, which the stub imports before the
# model: the stub runs its interpreter in isolated mode (PYTHONPATH is ignored), so the paths a
# model.py needs (the revpers checkout, this venv's site-packages) are passed in an env var.
STUB_PATH_ENV = "REVPERS_STUB_PYTHONPATH"
_BOOTSTRAP = f"""

# --- added by revpers.serving.launcher: the stub ignores PYTHONPATH (isolated interpreter) ---
def _revpers_extend_sys_path():
    import os, sys
    entries = [p for p in os.environ.get("{STUB_PATH_ENV}", "").split(os.pathsep) if p]
    for p in reversed(entries):
        if p not in sys.path:
            sys.path.insert(1 if sys.path and sys.path[0] == "" else 0, p)


_revpers_extend_sys_path()
del _revpers_extend_sys_path
"""
_MANIFEST = "revpers-backend.json"


def _manifest(sources: Mapping[str, Path]) -> dict:
    out: dict = {"bootstrap": _BOOTSTRAP}
    for name, src in sources.items():
        st = src.stat()
        out[name] = [str(src), st.st_size, st.st_mtime_ns]
    return out


def _backend_sources(install: TritonInstall) -> dict[str, Path]:
    """File name in ``python/`` -> the wheel's file: the backend files and the stub for this Python."""
    stub = install.stub_for(sys.version_info)
    sources = {name: install.backends_dir / "python" / name for name in _BACKEND_FILES}
    sources[STUB] = stub
    for src in sources.values():
        if not src.is_file():
            raise TritonServerError(f"the tritonserver install lacks {src}; reinstall with `{INSTALL_HINT}`")
    return sources


def _up_to_date(target: Path, expected: dict, sources: Mapping[str, Path]) -> bool:
    try:
        found = json.loads((target / _MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return found == expected and all((target / "python" / name).is_file() for name in sources)


def _fill_backend_dir(tmp: Path, sources: Mapping[str, Path], expected: dict) -> None:
    (tmp / "python").mkdir()
    for name, src in sources.items():
        shutil.copy2(src, tmp / "python" / name)
    (tmp / "python" / STUB).chmod(0o755)
    with open(tmp / "python" / "triton_python_backend_utils.py", "a") as fh:
        fh.write(_BOOTSTRAP)
    (tmp / _MANIFEST).write_text(json.dumps(expected, indent=1))
    tmp.chmod(0o755)


def _move_into_place(tmp: Path, target: Path, base: Path, expected: dict, sources: Mapping[str, Path]) -> None:
    """Rename ``tmp`` to ``target``; if ``target`` exists and is stale, swap it out first."""
    try:
        os.rename(tmp, target)
    except OSError as exc:  # target exists: another builder won, or it is stale
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        if not _up_to_date(target, expected, sources):
            stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=base))
            os.rename(target, stale / "old")
            os.rename(tmp, target)
            shutil.rmtree(stale, ignore_errors=True)


def prepare_backend_dir(install: TritonInstall, cache_dir: str | os.PathLike | None = None) -> Path:
    """The directory to pass as ``--backend-directory``.

    For a wheel install it is ``<cache_dir>/<version>-py3X/`` (``cache_dir`` defaults to
    :func:`default_cache_dir`) with ``python/`` holding libtriton_python.so, the stub for this
    Python and triton_python_backend_utils.py (plus a few lines that put ``$REVPERS_STUB_PYTHONPATH``
    on the model's ``sys.path``). It is built once, atomically (safe against concurrent
    builders), and rebuilt only if the wheel's files changed. A system install's own backends
    directory is returned as is.
    """
    if install.kind != "wheel":
        if not install.backends_dir.is_dir():
            raise TritonServerError(f"backends directory {install.backends_dir} does not exist")
        return install.backends_dir
    sources = _backend_sources(install)
    expected = _manifest(sources)

    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = base / f"{install.version}-py{sys.version_info[0]}{sys.version_info[1]}"
    if _up_to_date(target, expected, sources):
        return target
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
    try:
        _fill_backend_dir(tmp, sources, expected)
        _move_into_place(tmp, target, base, expected, sources)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not _up_to_date(target, expected, sources):
        raise TritonServerError(f"could not prepare the Python backend in {target}")
    LOG.debug("prepared Triton Python backend in %s", target)
    return target


def python_path_entries(include_site_packages: bool = True) -> list[str]:
    """PYTHONPATH for the Python-backend stubs: the repository root (``import revpers``), then
    this interpreter's non-stdlib sys.path entries (site-packages, editable installs)."""
    stdlib_roots = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)}
    entries = [str(REPO_ROOT)]
    if include_site_packages:
        for p in sys.path:
            if not p or not os.path.isdir(p):
                continue
            real = os.path.realpath(p)
            if any(real == r or real.startswith(r + os.sep) for r in stdlib_roots) and "site-packages" not in real:
                continue
            entries.append(os.path.abspath(p))
    seen: set[str] = set()
    return [e for e in entries if not (e in seen or seen.add(e))]
