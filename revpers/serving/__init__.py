"""Serving on NVIDIA Triton: the BLS model's request handling, the runtimes of the served
component models, the model-repository builder (its templates ship in ``model_repository/``) and
the tritonserver launcher."""
