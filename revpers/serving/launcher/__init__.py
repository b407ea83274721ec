"""Running tritonserver without a container: finding it (install), one server process (process),
keeping it serving and draining it (supervise), and the ``revpers serve`` command (serve)."""

from revpers.serving.launcher.errors import (
    PortInUseError,
    ServerUsageError,
    TritonNotFoundError,
    TritonServerError,
)
from revpers.serving.launcher.install import TritonInstall, find_tritonserver, prepare_backend_dir
from revpers.serving.launcher.process import (
    Security,
    ServerUrls,
    Stub,
    TritonServer,
    free_port,
    free_ports,
    port_in_use,
)

__all__ = [
    "PortInUseError",
    "Security",
    "ServerUrls",
    "ServerUsageError",
    "Stub",
    "TritonInstall",
    "TritonNotFoundError",
    "TritonServer",
    "TritonServerError",
    "find_tritonserver",
    "free_port",
    "free_ports",
    "port_in_use",
    "prepare_backend_dir",
]
