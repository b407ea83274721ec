"""Running tritonserver without a container: finding it (install), one server process (process),
keeping it serving and draining it (supervise), and the ``revpers serve`` command (serve)."""

from .errors import (
    PortInUseError,
    ServerUsageError,
    TritonNotFoundError,
    TritonServerError,
)
from .install import TritonInstall, find_tritonserver, prepare_backend_dir
from .process import (
    Security,
    ServerUrls,
    Stub,
    TritonServer,
    free_port,
    free_ports,
    port_in_use,
)

__all__ = [
    "PortInUseError", "Security", "ServerUrls", "ServerUsageError", "Stub", "TritonInstall", "TritonNotFoundError",
    "TritonServer", "TritonServerError", "find_tritonserver", "free_port", "free_ports", "port_in_use",
    "prepare_backend_dir",
]
