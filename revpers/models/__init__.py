"""Model bundles and the networks in them: the bundle format, SDXL/FaceID architecture facts,
smoke bundles (random models of the real architectures), the in-process PyTorch models, and the
component registry that describes each served model once (``components``)."""
