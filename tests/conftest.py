import os
import warnings

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore", category=FutureWarning)


@pytest.fixture(scope="session")
def smoke_bundle_dir(tmp_path_factory):
    from revpers.smoke import write_smoke_bundle

    return write_smoke_bundle(tmp_path_factory.mktemp("bundle") / "smoke", seed=0)


@pytest.fixture(scope="session")
def smoke_bundle(smoke_bundle_dir):
    from revpers.bundle import load_bundle

    return load_bundle(smoke_bundle_dir)


@pytest.fixture(scope="session")
def torch_models(smoke_bundle):
    from revpers.models import TorchModels

    return TorchModels.load(smoke_bundle, device="cpu")


def real_photo(name: str = "Tom_Hanks_54745.png"):
    """A real photo that ships inside the insightface wheel, as RGB uint8."""
    import importlib.util
    from pathlib import Path

    from revpers.images import read_image

    root = Path(importlib.util.find_spec("insightface").submodule_search_locations[0])
    return read_image(root / "data" / "images" / name)
