"""Type aliases for the annotations of nlref's public API (nothing here is checked at run time).

nlref is array-agnostic: a function takes and returns arrays of NumPy, CuPy, PyTorch or any
array-API library, which no single static type describes, so :data:`Array` is ``Any``; the
numpydoc sections of each docstring give the shapes and dtypes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Union

import numpy as np

#: An array of NumPy, CuPy, PyTorch or any array-API library.
Array = Any
#: A size per spatial axis, or one int for every axis.
Size = Union[int, Sequence[int]]
#: What ``numpy.random.default_rng`` takes.
Seed = Union[int, np.random.Generator, None]
#: A folder or file name.
PathLike = Union[str, "os.PathLike[str]"]
#: A NumPy-style dtype name or object (``"float32"``, ``numpy.float64``).
DType = Any

__all__ = ["Array", "Size", "Seed", "PathLike", "DType"]
