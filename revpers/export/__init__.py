"""Export of the served components to ONNX and TensorRT, driven by the component registry
(``revpers.models.components``): one description per component gives the ONNX axes, the TensorRT
profiles and the Triton config."""
