"""Export of the served components: one description each (export.components) drives the ONNX
export (export.onnx_export), the TensorRT build (export.tensorrt_build) and the Triton
configuration (export.triton_config)."""
