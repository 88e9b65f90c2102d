"""Neural-network layers with hand-written backward passes (no autograd).

* :mod:`nlref.nn.functional` -- the textbook: forward/backward pairs: 1x1 conv, batch
  norm, ReLU, max pooling, softmax, the pairwise functions; for networks: conv3d (and
  its loop definition, ``conv3d_reference``), avg/max pool3d, global average pool,
  dropout, linear, softmax cross-entropy.
* :mod:`nlref.nn.engine` -- the tuned paths the textbook calls through one seam:
  channels-last im2col convolution, batch norm's per-channel rows, in-place pooling
  loops, Adam's flat update. Same numbers, faster (see ``docs/engine.md``).
* :mod:`nlref.nn.nonlocal_op` -- the non-local operation (full and chunked).
* :mod:`nlref.nn.block` -- :class:`NonLocalBlock`.
* :mod:`nlref.nn.layouts` -- the peers' state-dict layouts (AlexHex7, mmcv, SlowFast,
  pytorchvideo, timm): which key holds which weight, what each peer can express.
* :mod:`nlref.nn.compare` -- :func:`~nlref.compare_block`, nlref as the oracle for a PyTorch module.
* :mod:`nlref.nn.attention` -- :class:`MultiHeadAttention`, :class:`TransformerBlock`,
  :class:`PositionalEncoding` (chapter 8), loading PyTorch's state dicts.
* :mod:`nlref.nn.models` -- :class:`VideoNet`, small C2D / I3D networks with NL blocks;
  :class:`VideoTransformer`, a small space-time transformer.
* :mod:`nlref.nn.optim` -- SGD with momentum, Adam, the step schedule.
* :mod:`nlref.nn.gradcheck` -- finite-difference gradient checks.
"""

from . import attention, engine, functional, layouts, models, nonlocal_op, optim
from .attention import MultiHeadAttention, PositionalEncoding, TransformerBlock
from .block import NonLocalBlock
from .gradcheck import GradcheckResult, gradcheck, layer_gradcheck
from .models import VideoNet

__all__ = ["functional", "engine", "nonlocal_op", "layouts", "models", "optim", "NonLocalBlock", "VideoNet",
           "attention", "MultiHeadAttention", "TransformerBlock", "PositionalEncoding",
           "gradcheck", "layer_gradcheck", "GradcheckResult"]
