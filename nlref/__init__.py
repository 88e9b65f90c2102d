"""nlref: non-local means and the non-local block, a readable reference for NumPy and CuPy.

The same functions run on NumPy, CuPy, PyTorch tensors and any array-API
library; results come back in the library, device and dtype they were given.
"""

from . import averaging, backend, data, metrics, nn, viz
from .averaging import add_gaussian_noise, average, averaging_curve, noisy_copies
from .metrics import mse, psnr
from .nlmeans import estimate_sigma, nl_means, nl_means_store, nl_means_weights, resolve_parameters
from .nn import NonLocalBlock, gradcheck, layer_gradcheck
from .nn.compare import compare_block

__version__ = "0.1.0"

__all__ = [
    "nl_means", "nl_means_weights", "resolve_parameters", "estimate_sigma", "nl_means_store",
    "add_gaussian_noise", "noisy_copies", "average", "averaging_curve",
    "mse", "psnr", "backend", "data", "averaging", "metrics", "viz",
    "NonLocalBlock", "gradcheck", "layer_gradcheck", "nn", "compare_block",
]
