"""The method's math, over plain tensors and a ``denoise(x, t, cond)`` callable; no model loading.

- ``schedule``: SDXL's noise schedule and the method's timesteps.
- ``sampling``: the SDE-DPM-Solver++(2M) step (Lu et al., "DPM-Solver++", arXiv:2211.01095),
  edit-friendly DDPM inversion (Huberman-Spiegelglas et al., arXiv:2304.06140) and guided generation.
- ``conditioning``: the classifier-free guidance branches of both passes, with IP-Adapter identity
  tokens (Ye et al., "IP-Adapter", arXiv:2308.06721) as reverse personalization uses them
  (Kung et al., "Reverse Personalization", the paper in docs/algorithm.md).
- ``params``: the method's parameters and the validation of untrusted values.
- ``pipeline``: the whole method for a batch of aligned face crops over any set of components.
- ``errors``: the one error root every layer raises.
"""
