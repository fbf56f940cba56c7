"""The SANF flow as plain ``nn.Module``s (no training, no file I/O).

- ``clamp.py``: ``soft_clamp``, the bounded log-scale ``(2 alpha / pi) atan(s / alpha)``.
- ``fusion.py``: the feature fusion module ``FFM`` and the registry ``FUSION_MODES``
  (``none``, ``gap``, ``learnable``, ``semantic``).
- ``coupling.py``: ``CouplingLayer``, one flow-based learning layer (permutation, split, two half-couplings).
- ``model.py``: ``SANFlow`` (the stack, its seeded permutations, both input layouts) and ``log_likelihood``.

    flow = SANFlow(dim, patch_dim, num_tokens, fusion="semantic", ...)
    z, logdet = flow(x, patch)
    nll = -log_likelihood(z, logdet)
"""

from .clamp import soft_clamp
from .coupling import SPATIAL_CHANNELS, CouplingLayer
from .fusion import FFM, FUSION_MODES, register_fusion
from .model import MAIN_INPUTS, SANFlow, log_likelihood

__all__ = [
    "FFM",
    "FUSION_MODES",
    "MAIN_INPUTS",
    "SPATIAL_CHANNELS",
    "CouplingLayer",
    "SANFlow",
    "log_likelihood",
    "register_fusion",
    "soft_clamp",
]
