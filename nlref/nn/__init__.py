"""Neural-network layers with hand-written backward passes (no autograd).

* :mod:`nlref.nn.functional` -- forward/backward pairs: 1x1 conv, batch norm,
  ReLU, max pooling, softmax, the pairwise functions.
* :mod:`nlref.nn.nonlocal_op` -- the non-local operation (full and chunked).
* :mod:`nlref.nn.block` -- :class:`NonLocalBlock`.
* :mod:`nlref.nn.gradcheck` -- finite-difference gradient checks.
"""

from . import functional, nonlocal_op
from .block import NonLocalBlock
from .gradcheck import GradcheckResult, gradcheck, layer_gradcheck

__all__ = ["functional", "nonlocal_op", "NonLocalBlock", "gradcheck", "layer_gradcheck", "GradcheckResult"]
