"""The engine: the tuned paths behind :mod:`nlref.nn.functional`, reached through one seam.

:mod:`nlref.nn.functional` is the textbook: every layer written as its equation, with a
portable (array-API) body. Where speed needed storage orders, column plans, buffer reuse
or chunking, the textbook calls one of the functions below instead, and the names listed
in ``__all__`` are the whole seam. Everything behind it changes how fast a layer runs,
never what it computes: each path is tested equal to the textbook's definition
(:func:`~nlref.nn.functional.conv3d_reference` for the convolution, the portable loops for
the pools) and the same training run gives the same weights to the bit. The exception is
:mod:`nlref.nn.engine.fused_numba` (``NLREF_NN_ENGINE``, "auto" when Numba is installed): its
sums run in another order (float64 partials), so its results equal the NumPy passes' to
rounding, and a training run's weights differ in the last bits between the two engines (they
are the same to the bit for any number of threads).

Its modules:

* :mod:`nlref.nn.engine.conv`: the 3-D convolution: channels-last im2col in cache-sized
  chunks, paired output columns, the flipped stride-1 backward, the dense per-frame
  product, spare padded buffers.
* :mod:`nlref.nn.engine.layout`: channels-last storage and batch norm's per-channel matrix
  (positions folded into rows).
* :mod:`nlref.nn.engine.pool`: max pooling's running maximum and gradient routing, and the
  pools' in-place scatter, branch-free.
* :mod:`nlref.nn.engine.elementwise`: sums, products, ReLU and ``exp`` written into fresh
  temporaries the caller owns.
* :mod:`nlref.nn.engine.nonlocal_op`: the non-local operation's (B, N, M) steps written into
  buffers a block keeps between calls, and the dot product and the concatenation computed
  without that matrix (their sums over keys taken first: the same function, summed in
  another order).
* :mod:`nlref.nn.engine.adam`: Adam's update on all parameters as one flat vector.
* :mod:`nlref.nn.engine.fused_numba`: softmax rows, the concatenation's ReLU, batch norm and
  the block's max pool as fused, multi-threaded Numba loops (optional; ``NLREF_NN_ENGINE``
  picks them).

Each trick is described in one line where it lives; the figure it bought, measured on the
project's 2-core test machine, and its history are in ``docs/engine.md``.
"""

from .adam import adam_step_flat, flat_adam_applies
from .conv import conv3d_backward, conv3d_forward
from .elementwise import add_owned, exp_inplace, relu_owned
from .fused_numba import (BatchNormCache, batchnorm_backward_numba, batchnorm_forward_numba, maxpool_backward_numba,
                          maxpool_numba, numba_applies, softmax_backward_rows, softmax_rows)
from .nonlocal_op import NonLocalWorkspace
from .layout import ChannelRows, channel_sums, channels_first, channels_last, stored_channels_last
from .pool import add_at, running_max, winner_gradients

__all__ = [
    "conv3d_forward", "conv3d_backward",
    "ChannelRows", "channels_last", "channels_first", "stored_channels_last", "channel_sums",
    "exp_inplace", "add_owned", "add_at", "relu_owned", "running_max", "winner_gradients",
    "adam_step_flat", "flat_adam_applies", "NonLocalWorkspace",
    "numba_applies", "softmax_rows", "softmax_backward_rows", "batchnorm_forward_numba", "batchnorm_backward_numba",
    "BatchNormCache", "maxpool_numba", "maxpool_backward_numba",
]
