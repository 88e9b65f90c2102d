r"""Multi-head self-attention, positional encodings and the pre-norm transformer block,
every backward pass by hand (chapter 8).

The non-local block of chapter 5 is one head of softmax self-attention with a residual:
with ``theta``, ``phi``, ``g`` as the query, key and value maps and ``W_z`` as the output
projection, :math:`z = x + W_z\,\mathrm{softmax}(\theta(x)\phi(x)^\top / \sqrt d)\, g(x)`.
A transformer block runs ``h`` such heads side by side on ``E / h`` channels each,
normalises each token (LayerNorm) before the attention and before a two-layer MLP,
and adds both back to the stream::

    x = x + MHA(LN1(x))
    x = x + W2 gelu(W1 LN2(x) + b1) + b2

Shapes: ``B`` clips, ``N`` tokens, ``E`` channels (``embed_dim``), ``h`` heads of
``d = E / h`` channels. Inputs are ``(B, N, E)`` (PyTorch's ``batch_first=True``).

The layers' parameters carry PyTorch's names, so a state dict of
``torch.nn.MultiheadAttention(E, h, batch_first=True)`` or of
``torch.nn.TransformerEncoderLayer(E, h, mlp_dim, dropout=0.0, activation="gelu",
batch_first=True, norm_first=True)`` loads as it is (``load_state_dict``) and
``state_dict(layout="torch")`` writes one back. Some of those modules' options leave
no trace in the keys or shapes: the number of heads, ``add_zero_attn``, and the
encoder layer's ``norm_first``, ``activation`` and ``layer_norm_eps`` (a post-norm
layer builds the same submodules as a pre-norm one; only its forward differs). Give
``load_state_dict`` the module itself and they are checked; a plain state dict
cannot be (``TransformerBlock.load_state_dict(state, norm_first=False)`` is refused).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import numpy as np

from .. import backend as B
from . import functional as F
from ._shapes import check_float, check_grad, check_scores_overflow
from ._state import state_entry

__all__ = ["attention_forward", "attention_backward", "split_heads", "merge_heads", "MultiHeadAttention",
           "TransformerBlock", "PositionalEncoding", "sinusoidal_encoding", "spacetime_sinusoidal_encoding",
           "ACTIVATIONS", "ENCODINGS"]

#: The MLP nonlinearities of :class:`TransformerBlock` (``"gelu"`` is PyTorch's erf form).
ACTIVATIONS = ("gelu", "gelu_tanh", "relu")
#: The kinds of :class:`PositionalEncoding`.
ENCODINGS = ("sinusoidal", "learned")


# --------------------------------------------------------------------------- small checks
def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _dtype_option(dtype):
    name = dtype if isinstance(dtype, str) else B.dtype_name(dtype)
    if name not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return name


def _host(a):
    """A host NumPy copy of ``a`` (NumPy, a list, or any library's array, a torch tensor included)."""
    if isinstance(a, (np.ndarray, np.generic, list, tuple, int, float, bool)):
        return np.array(a)
    return np.array(B.to_numpy(a))


class _Params(B.KeepsNamespace):
    """What every layer here shares: parameters made in one library and dtype, checked inputs."""

    def _setup(self, dtype, xp, device=None):
        self.dtype_name = _dtype_option(dtype)
        self.xp = B.library(xp)
        self.device = device
        self.dtype = getattr(self.xp, self.dtype_name)
        self.training = True
        self._cache = None

    def _array(self, host):
        return B.asarray(np.asarray(host), xp=self.xp, dtype=self.dtype, device=self.device)

    def _check_tokens(self, x, name="x"):
        """x must be (B, N, E) of the layer's library and dtype."""
        xp_x = B.array_namespace(x, names=[name])
        if B.compat_namespace(xp_x) is not self.xp and not (B.is_numpy(xp_x) and B.is_numpy(self.xp)):
            raise TypeError(f"{name} comes from {getattr(xp_x, '__name__', xp_x)} but the layer's parameters live "
                            f"in {getattr(self.xp, '__name__', self.xp)}; move {name} or build the layer with xp=")
        if B.dtype_name(x.dtype) != self.dtype_name:
            raise TypeError(f"{name} has dtype {B.dtype_name(x.dtype)} but the layer's parameters are "
                            f"{self.dtype_name}")
        params = getattr(self, "params", None)
        if params:
            B.check_on_device(x, next(iter(params.values())), name=name, owner="layer")
        if x.ndim != 3 or x.shape[2] != self.embed_dim:
            raise ValueError(f"{name} must have shape (B, N, E) with E = embed_dim = {self.embed_dim}, "
                             f"got shape {tuple(x.shape)}")
        if x.shape[0] < 1 or x.shape[1] < 1:
            raise ValueError(f"{name} must hold at least one clip and one token, got shape {tuple(x.shape)}")

    def _pop_cache(self, dout):
        """The last forward's cache, taken once ``dout`` is checked against it (library, dtype, device and
        the output's shape): a wrong ``dout`` leaves the cache for a retry, and a float64 gradient cannot
        turn a float32 layer's gradients into float64."""
        if self._cache is None:
            raise RuntimeError(f"{type(self).__name__}.backward needs a forward pass before it (one per forward)")
        self._check_tokens(dout, "dout")
        x_shape = self._cache[0]
        if tuple(dout.shape) != x_shape:
            raise ValueError(f"dout must have the output's shape {x_shape}, got {tuple(dout.shape)}")
        cache, self._cache = self._cache, None
        return cache

    def train(self):
        """No dropout and no batch statistics here: a flag kept for the network's sake. Returns self."""
        self.training = True
        return self

    def eval(self):
        """See :meth:`train`. Returns self."""
        self.training = False
        return self

    # ---------------------------------------------------------------- state
    def state_dict(self, layout="torch"):
        """Host NumPy copies of the parameters under PyTorch's names (``layout="torch"``, the only one)."""
        if layout != "torch":
            raise ValueError(f"layout must be 'torch' (PyTorch's parameter names), got {layout!r}")
        return {k: np.array(B.to_numpy(v)) for k, v in self.params.items()}

    def load_state_dict(self, state, layout="torch", **options):
        """Load a state dict under PyTorch's names (NumPy arrays or torch tensors); checked whole first.

        Parameters
        ----------
        state : dict of arrays, or the torch module itself
            A ``state_dict()``; or the ``torch.nn.MultiheadAttention`` /
            ``torch.nn.TransformerEncoderLayer`` it comes from, whose options that
            leave no trace in the keys (the number of heads, ``add_zero_attn``;
            ``norm_first``, the activation, ``layer_norm_eps``) are then checked
            against this layer's too. A plain dict cannot be checked for them: a
            module built with other values of these options has exactly the same
            keys and shapes and computes another function.
        layout : {"torch"}
        **options
            :class:`TransformerBlock` only: ``norm_first=`` (bool), what the saved
            layer was built with; False is refused (this block is pre-norm).

        Raises
        ------
        ValueError
            Missing or unexpected keys (the PyTorch option that makes them is named
            where it is known), a wrong shape, non-finite values (the key is named),
            or a module option this layer does not compute.
        TypeError
            ``state`` is neither a dict nor a torch module.
        """
        if layout != "torch":
            raise ValueError(f"layout must be 'torch' (PyTorch's parameter names), got {layout!r}")
        allowed = ("norm_first",) if isinstance(self, TransformerBlock) else ()
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise TypeError(f"{type(self).__name__}.load_state_dict got unexpected keyword arguments {unknown}; "
                            f"allowed: {list(allowed)}")
        if "norm_first" in options:
            _check_norm_first(B.check_flag("norm_first", options["norm_first"]), "norm_first=False")
        if _is_torch_module(state):
            self._check_torch_module(state)
            state = state.state_dict()
        if not hasattr(state, "keys"):
            raise TypeError(f"state must be a dict of arrays (a state_dict()) or the torch module, got "
                            f"{type(state).__name__}")
        own = self.params
        missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or extra:
            hints = [hint for key, hint in _TORCH_KEY_HINTS.items() if any(k.endswith(key) for k in extra)]
            if missing and not extra and all(k.endswith("bias") for k in missing):
                hints.append("the state has no biases, as a torch module built with bias=False; " + (
                    "build this layer with bias=False" if isinstance(self, MultiHeadAttention)
                    else "nlref's TransformerBlock has biases"))
            elif extra and not missing and all(k.endswith("bias") for k in extra):
                hints.append("the state has biases: build this layer with bias=True")
            raise ValueError(f"state dict does not fit {type(self).__name__}: missing {missing[:6]}, "
                             f"unexpected {extra[:6]}" + "".join(f"; {hint}" for hint in hints))
        host = {key: state_entry(f"state dict entry {key!r}", state[key], ref.shape, self.dtype_name)
                for key, ref in own.items()}  # checked copies in the layer's dtype
        for key, value in host.items():
            self.params[key] = self._array(value)
        return self


#: Keys of torch.nn.MultiheadAttention options nlref's self-attention has no twin for, and why.
_TORCH_KEY_HINTS = {
    "q_proj_weight": "q_proj_weight/k_proj_weight/v_proj_weight come from kdim or vdim other than embed_dim; "
                     "nlref's attention is self-attention with one in_proj_weight (kdim = vdim = embed_dim)",
    "bias_k": "bias_k/bias_v come from add_bias_kv=True, which nlref's attention does not have",
}


def _is_torch_module(obj):
    """Whether ``obj`` is a torch.nn.Module (without importing torch when it is not loaded)."""
    import sys

    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


def _check_norm_first(norm_first, where):
    if not norm_first:
        raise ValueError(f"{where}: a post-norm layer (x = LN1(x + MHA(x)); out = LN2(x + MLP(x))) has the same "
                         "keys as a pre-norm one but computes another function; nlref's TransformerBlock is "
                         "pre-norm (norm_first=True), so its weights would mean something else here")


def _torch_activation(fn):
    """A TransformerEncoderLayer's activation as one of :data:`ACTIVATIONS`, or None."""
    import torch

    if fn is torch.nn.functional.relu or isinstance(fn, torch.nn.ReLU):
        return "relu"
    if fn is torch.nn.functional.gelu:
        return "gelu"
    if isinstance(fn, torch.nn.GELU):
        return "gelu_tanh" if fn.approximate == "tanh" else "gelu"
    return None


# --------------------------------------------------------------------------- the attention core
def split_heads(x, num_heads):
    """(B, N, E) -> (B, h, N, d), ``d = E / h``: head ``k`` owns channels ``k d .. (k+1) d - 1``."""
    xp = B.array_namespace(x, names=["x"])
    num_heads = _positive_int("num_heads", num_heads)
    if x.ndim != 3 or x.shape[2] % num_heads:
        raise ValueError(f"split_heads: x must have shape (B, N, E) with E a multiple of num_heads = {num_heads}, "
                         f"got shape {tuple(x.shape)}")
    b, n, e = x.shape
    return xp.permute_dims(xp.reshape(x, (b, n, num_heads, e // num_heads)), (0, 2, 1, 3))


def merge_heads(x):
    """(B, h, N, d) -> (B, N, h d): the inverse of :func:`split_heads`."""
    xp = B.array_namespace(x, names=["x"])
    if x.ndim != 4:
        raise ValueError(f"merge_heads: x must have shape (B, h, N, d), got shape {tuple(x.shape)}")
    b, h, n, d = x.shape
    return xp.reshape(xp.permute_dims(x, (0, 2, 1, 3)), (b, n, h * d))


def _check_attention(xp, q, k, v, scale, bias):
    """attention_forward's arguments: floats of one dtype, q (..., N, d), k (..., M, d), v (..., M, d_v) with the
    same leading axes and M >= 1, a finite scale, a bias that broadcasts to (..., N, M); returns the scale."""
    func = "attention_forward"
    check_float(func, xp, q=q, k=k, v=v, bias=bias)
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim or not (q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        raise ValueError(f"{func}: q, k and v must have shapes (..., N, d), (..., M, d), (..., M, d_v) with the same "
                         f"leading axes, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1] or q.shape[-1] < 1 or v.shape[-2] != k.shape[-2] or k.shape[-2] < 1:
        raise ValueError(f"{func}: k must have q's d >= 1 channels and v k's M >= 1 keys, got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    logits = (*q.shape[:-1], k.shape[-2])
    if bias is not None:
        try:
            fits = np.broadcast_shapes(tuple(bias.shape), logits) == logits
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"{func}: bias must broadcast to the logits' shape {logits}, got {tuple(bias.shape)}")
    if scale is None:
        return 1.0 / math.sqrt(q.shape[-1])
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"{func}: scale must be a finite number (or None for 1 / sqrt(d)), got {scale!r}")
    return float(scale)


class AttentionCache(NamedTuple):
    """What :func:`attention_backward` needs from :func:`attention_forward`."""

    q: Any  # (..., N, d)
    k: Any  # (..., M, d)
    v: Any  # (..., M, d_v)
    p: Any  # (..., N, M) the attention, rows summing to 1
    scale: float


def attention_forward(q, k, v, *, scale=None, bias=None):
    r"""Scaled dot-product attention, each query against every key.

    .. math::
        S = s\, Q K^\top + M, \qquad P = \mathrm{softmax}_{\text{rows}}(S), \qquad O = P V

    with :math:`s = 1/\sqrt d` by default and :math:`M` an additive mask (0 where a query
    may look, :math:`-\infty` where it may not). This is the non-local operation in its
    embedded-Gaussian form with ``theta(x) = Q``, ``phi(x) = K``, ``g(x) = V``.

    Parameters
    ----------
    q : array, shape (..., N, d)
    k : array, shape (..., M, d)
    v : array, shape (..., M, d_v)
    scale : float, optional
        The logit scale ``s`` (default ``1 / sqrt(d)``).
    bias : array, shape broadcastable to (..., N, M), optional
        The additive mask ``M`` (every row must keep one finite entry).

    Returns
    -------
    out : array, shape (..., N, d_v)
    cache : AttentionCache
        ``(q, k, v, p, scale)``; ``p`` is the attention, shape (..., N, M).

    Raises
    ------
    TypeError
        ``q``, ``k``, ``v`` or ``bias`` is not a float32/float64 array, or they mix dtypes.
    ValueError
        Shapes that do not fit (leading axes differ, ``k`` without ``q``'s ``d``, no key),
        a non-finite ``scale``, or a ``bias`` that masks every key of a query.
    """
    xp = B.array_namespace(q, k, v, *([] if bias is None else [bias]), names=["q", "k", "v", "bias"])
    scale = _check_attention(xp, q, k, v, scale, bias)
    s = xp.matmul(q, xp.matrix_transpose(k)) * scale
    if bias is not None:
        s = s + bias
    m = xp.max(s, axis=-1, keepdims=True)
    if bias is not None and bool(xp.any(m == -math.inf)):
        raise ValueError("attention_forward: bias masks every key of a query (a row of -inf); every row must "
                         "keep at least one finite entry")
    if bias is None or bool(xp.all(bias < math.inf)):  # no +inf or NaN given in the mask
        check_scores_overflow("attention_forward", xp, m, q=q, k=k)
    p = xp.exp(s - m)  # exp(-inf) = 0: masked keys get exactly no weight
    p = p / xp.sum(p, axis=-1, keepdims=True)
    return xp.matmul(p, v), AttentionCache(q, k, v, p, scale)


def attention_backward(dout, cache):
    r"""Gradients of :func:`attention_forward`.

    .. math::
        dV = P^\top dO, \quad dP = dO\, V^\top, \quad
        dS_{ij} = P_{ij}\Big(dP_{ij} - \sum_k dP_{ik} P_{ik}\Big), \quad
        dQ = s\, dS\, K, \quad dK = s\, dS^\top Q

    ``dout`` must have the output's shape (..., N, d_v) and dtype (no broadcasting).

    Returns
    -------
    dq, dk, dv : arrays, the shapes of ``q``, ``k``, ``v``
    """
    q, k, v, p, scale = cache
    xp = B.array_namespace(dout, p, names=["dout", "p"])
    check_float("attention_backward", xp, dout=dout, p=p)  # a float64 dout made a float32 layer's gradients float64
    check_grad("attention_backward", dout, (*p.shape[:-1], v.shape[-1]))  # no broadcasting: (1, ...) gave wrong values
    dv = xp.matmul(xp.matrix_transpose(p), dout)
    dp = xp.matmul(dout, xp.matrix_transpose(v))
    ds = F.softmax_backward(dp, (p, -1)) * scale
    return xp.matmul(ds, k), xp.matmul(xp.matrix_transpose(ds), q), dv


# --------------------------------------------------------------------------- multi-head attention
class MultiHeadAttention(_Params):
    r"""Multi-head self-attention on (B, N, E), forward and backward by hand.

    .. math::
        [Q\ K\ V] = x W_{in}^\top + b_{in}, \qquad
        O_k = \mathrm{softmax}\big(Q_k K_k^\top / \sqrt d + M\big)\, V_k \ (k = 1..h), \qquad
        \mathrm{out} = [O_1 \cdots O_h]\, W_{out}^\top + b_{out}

    Head ``k`` uses channels ``k d .. (k+1) d - 1`` of Q, K and V (``d = E / h``), as
    ``torch.nn.MultiheadAttention`` does.

    Parameters
    ----------
    embed_dim : int
        ``E``.
    num_heads : int
        ``h``; must divide ``E``.
    bias : bool
        Biases on the input and output projections (PyTorch's default).
    dtype : {"float32", "float64"}
    seed : int
        Seeds the initial weights, drawn as PyTorch draws them: Xavier-uniform for
        ``in_proj_weight``, uniform +-1/sqrt(E) for ``out_proj.weight``, zero biases.
    xp : module, optional
        The parameters' array library (numpy by default).
    device : device, optional
        The parameters' device (a ``cupy.cuda.Device``, ``array_api_strict.Device(...)``);
        None: ``xp``'s default. Inputs on another device are an error.

    Attributes
    ----------
    params : dict of arrays
        ``in_proj_weight`` (3E, E) (the rows of W_q, W_k, W_v stacked), ``in_proj_bias``
        (3E,), ``out_proj.weight`` (E, E), ``out_proj.bias`` (E,): PyTorch's names.
    grads : dict of arrays
        Same keys, set by :meth:`backward`.

    Notes
    -----
    One layer object is not meant to run in several threads at once: it keeps the
    cache of its last forward pass for the backward pass. Different objects, copies included,
    are independent in any threads; ``copy.deepcopy`` and ``pickle`` copy one whole (its array
    library by name), also between a forward pass and its backward pass.
    """

    def __init__(self, embed_dim, num_heads, *, bias=True, dtype="float32", seed=0, xp=None, device=None):
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        self.num_heads = _positive_int("num_heads", num_heads)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"num_heads ({num_heads}) must divide embed_dim ({embed_dim}): each head gets "
                             "embed_dim / num_heads channels")
        self.bias = B.check_flag("bias", bias)
        self.head_dim = self.embed_dim // self.num_heads
        self._setup(dtype, xp, device)
        rng = B.rng(seed)
        e = self.embed_dim
        xavier = math.sqrt(6.0 / (e + 3 * e))
        self.params = {"in_proj_weight": self._array(rng.uniform(-xavier, xavier, (3 * e, e)))}
        if self.bias:
            self.params["in_proj_bias"] = self._array(np.zeros(3 * e))
        self.params["out_proj.weight"] = self._array(rng.uniform(-1, 1, (e, e)) / math.sqrt(e))
        if self.bias:
            self.params["out_proj.bias"] = self._array(np.zeros(e))
        self.grads = {k: None for k in self.params}

    def __repr__(self):
        return (f"MultiHeadAttention({self.embed_dim}, {self.num_heads}, bias={self.bias}, "
                f"dtype={self.dtype_name!r})")

    def _check_torch_module(self, module, where="module"):
        """Refuse a torch module whose options (not all in its keys) give another function than this layer."""
        import torch

        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"{where} must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        if module.embed_dim != self.embed_dim or module.num_heads != self.num_heads:
            raise ValueError(f"{where} has embed_dim={module.embed_dim}, num_heads={module.num_heads}; this layer "
                             f"has embed_dim={self.embed_dim}, num_heads={self.num_heads} (the number of heads is "
                             "not in the state dict's keys or shapes, but splits the channels differently)")
        if module.add_zero_attn:
            raise ValueError(f"{where}.add_zero_attn=True (a key of zeros added to every sequence) has no nlref twin")
        if module.bias_k is not None or not module._qkv_same_embed_dim:
            raise ValueError(f"{where} has add_bias_kv=True or kdim/vdim other than embed_dim; nlref's attention is "
                             "self-attention with one in_proj_weight and neither")

    def mask_bias(self, x, mask=None, causal=False):
        """The additive mask for ``x`` (0 where a query may look at a key, -inf elsewhere), or None.

        ``mask`` is boolean, shape (N, N) or (B, N, N), True where query ``i`` may attend
        key ``j`` (the convention of ``torch.nn.functional.scaled_dot_product_attention``;
        ``torch.nn.MultiheadAttention``'s boolean ``attn_mask`` is its negation).
        ``causal`` adds "no key after the query". Every query must keep at least one key.
        """
        causal = B.check_flag("causal", causal)
        if mask is None and not causal:
            return None
        b, n = x.shape[0], x.shape[1]
        allowed = np.ones((1, n, n), dtype=bool)
        if mask is not None:
            try:
                host = _host(mask)
            except Exception as err:  # a string, an object without the array protocols
                raise TypeError(f"mask must be a boolean array (True where a query may attend a key), got "
                                f"{type(mask).__name__}") from err
            if host.dtype != np.bool_:
                raise TypeError(f"mask must be a boolean array (True where a query may attend a key), "
                                f"got dtype {host.dtype}")
            if host.shape not in ((n, n), (b, n, n)):
                raise ValueError(f"mask must have shape ({n}, {n}) or ({b}, {n}, {n}) for x of shape "
                                 f"{tuple(x.shape)}, got {host.shape}")
            allowed = allowed & host.reshape((-1, n, n))
        if causal:
            allowed = allowed & np.tril(np.ones((n, n), dtype=bool))[None]
        empty = ~allowed.any(axis=-1)
        if empty.any():
            where = np.argwhere(empty)[0]
            raise ValueError(f"the mask leaves query {int(where[1])} (clip {int(where[0])}) no key to attend: "
                             "every row needs at least one True")
        bias = np.where(allowed, 0.0, -np.inf)[:, None, :, :]  # (1 or B, 1, N, N): the same for every head
        return B.asarray(bias, like=x, dtype=x.dtype)

    def forward(self, x, *, mask=None, causal=False, return_attention=False):
        """Self-attention of the tokens ``x``.

        Parameters
        ----------
        x : array, shape (B, N, E)
        mask : boolean array, shape (N, N) or (B, N, N), optional
            True where query ``i`` may attend key ``j`` (see :meth:`mask_bias`).
        causal : bool
            Each token attends only to itself and the tokens before it.
        return_attention : bool
            Also return every head's attention, shape (B, h, N, N), rows summing to 1
            (PyTorch returns their mean over heads by default).

        Returns
        -------
        out : array, shape (B, N, E)
        attention : array, shape (B, h, N, N), only with ``return_attention``
        """
        return_attention = B.check_flag("return_attention", return_attention)
        self._cache = None  # a forward that fails leaves no cache for a backward to misuse
        self._check_tokens(x)
        bias = self.mask_bias(x, mask, causal)
        xp = self.xp
        b, n, e = x.shape
        qkv, c_in = F.linear_forward(xp.reshape(x, (b * n, e)), self.params["in_proj_weight"],
                                     self.params.get("in_proj_bias"))
        qkv = xp.reshape(qkv, (b, n, 3 * e))
        q, k, v = (split_heads(qkv[:, :, i * e:(i + 1) * e], self.num_heads) for i in range(3))
        o, c_att = attention_forward(q, k, v, bias=bias)
        out, c_out = F.linear_forward(xp.reshape(merge_heads(o), (b * n, e)), self.params["out_proj.weight"],
                                      self.params.get("out_proj.bias"))
        self._cache = (tuple(x.shape), c_in, c_att, c_out)
        out = xp.reshape(out, (b, n, e))
        return (out, c_att.p) if return_attention else out

    def backward(self, dout):
        """Back-propagate dL/d(out); sets ``grads`` and returns dL/dx, shape (B, N, E)."""
        x_shape, c_in, c_att, c_out = self._pop_cache(dout)
        xp = self.xp
        b, n, e = x_shape
        do, self.grads["out_proj.weight"], db_out = F.linear_backward(xp.reshape(dout, (b * n, e)), c_out)
        dq, dk, dv = attention_backward(split_heads(xp.reshape(do, (b, n, e)), self.num_heads), c_att)
        dqkv = xp.concat([merge_heads(dq), merge_heads(dk), merge_heads(dv)], axis=2)  # (B, N, 3E)
        dx, self.grads["in_proj_weight"], db_in = F.linear_backward(xp.reshape(dqkv, (b * n, 3 * e)), c_in)
        if self.bias:
            self.grads["in_proj_bias"], self.grads["out_proj.bias"] = db_in, db_out
        return xp.reshape(dx, x_shape)


# --------------------------------------------------------------------------- the transformer block
class TransformerBlock(_Params):
    r"""The pre-norm transformer block, forward and backward by hand.

    .. math::
        h = x + \mathrm{MHA}(\mathrm{LN}_1(x)), \qquad
        \mathrm{out} = h + W_2\, \sigma\big(W_1\, \mathrm{LN}_2(h) + b_1\big) + b_2

    Its gradient follows the two residual paths: ``dh = dout + (MLP branch)^T dout``,
    ``dx = dh + (attention branch)^T dh``; the identity term is why deep pre-norm stacks
    train (the gradient reaches every block unchanged, plus what the branches add).

    The parameters are those of ``torch.nn.TransformerEncoderLayer(embed_dim, num_heads,
    mlp_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)``:
    ``self_attn.*`` (see :class:`MultiHeadAttention`), ``linear1.weight`` (mlp_dim, E),
    ``linear1.bias``, ``linear2.weight`` (E, mlp_dim), ``linear2.bias``, ``norm1.weight``,
    ``norm1.bias``, ``norm2.weight``, ``norm2.bias`` (E,).

    Parameters
    ----------
    embed_dim, num_heads : int
    mlp_dim : int
        Width of the MLP's hidden layer (PyTorch's ``dim_feedforward``; 4 E in most models).
    activation : {"gelu", "gelu_tanh", "relu"}
        The MLP's nonlinearity: GELU's erf form (PyTorch's ``"gelu"``), its tanh
        approximation, or ReLU (PyTorch's default for this layer).
    eps : float
        LayerNorm's epsilon (PyTorch's ``layer_norm_eps``, 1e-5).
    dtype, seed, xp, device :
        As :class:`MultiHeadAttention` (linear layers drawn as PyTorch's: uniform
        +-1/sqrt(fan_in); LayerNorm gamma = 1, beta = 0).

    Notes
    -----
    Threads and copies: as :class:`MultiHeadAttention`.
    """

    def __init__(self, embed_dim, num_heads, mlp_dim, *, activation="gelu", eps=1e-5, dtype="float32", seed=0,
                 xp=None, device=None):
        self.attn = MultiHeadAttention(embed_dim, num_heads, dtype=dtype, seed=seed, xp=xp, device=device)
        self.embed_dim, self.num_heads = self.attn.embed_dim, self.attn.num_heads
        self.mlp_dim = _positive_int("mlp_dim", mlp_dim)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not math.isfinite(eps) or eps <= 0:
            raise ValueError(f"eps must be a positive finite number, got {eps!r}")
        self.eps = float(eps)
        self._setup(dtype, xp, device)
        rng = np.random.default_rng([seed, 1])
        e, m = self.embed_dim, self.mlp_dim

        def uniform(shape, fan_in):
            return self._array(rng.uniform(-1, 1, shape) / math.sqrt(fan_in))

        self.params = {f"self_attn.{k}": v for k, v in self.attn.params.items()}
        self.params.update({"linear1.weight": uniform((m, e), e), "linear1.bias": uniform((m,), e),
                            "linear2.weight": uniform((e, m), m), "linear2.bias": uniform((e,), m),
                            "norm1.weight": self._array(np.ones(e)), "norm1.bias": self._array(np.zeros(e)),
                            "norm2.weight": self._array(np.ones(e)), "norm2.bias": self._array(np.zeros(e))})
        self.grads = {k: None for k in self.params}

    def __repr__(self):
        return (f"TransformerBlock({self.embed_dim}, {self.num_heads}, {self.mlp_dim}, "
                f"activation={self.activation!r}, dtype={self.dtype_name!r})")

    def _check_torch_module(self, module):
        """Refuse a TransformerEncoderLayer whose options (not in its keys) give another function than this block."""
        import torch

        if not isinstance(module, torch.nn.TransformerEncoderLayer):
            raise TypeError(f"module must be a torch.nn.TransformerEncoderLayer, got {type(module).__name__}")
        _check_norm_first(module.norm_first, "module.norm_first=False")
        activation = _torch_activation(module.activation)
        if activation != self.activation:
            raise ValueError(f"module.activation is {module.activation!r} ({activation or 'no nlref twin'}); this "
                             f"block has activation={self.activation!r}")
        for name in ("norm1", "norm2"):
            eps = float(getattr(module, name).eps)
            if eps != self.eps:
                raise ValueError(f"module.{name}.eps is {eps!r} (layer_norm_eps); this block has eps={self.eps!r}")
        self.attn._check_torch_module(module.self_attn, "module.self_attn")

    def _act_forward(self, h):
        if self.activation == "relu":
            return F.relu_forward(h)
        return F.gelu_forward(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")

    def _act_backward(self, d, cache):
        return F.relu_backward(d, cache) if self.activation == "relu" else F.gelu_backward(d, cache)

    def forward(self, x, *, mask=None, causal=False, return_attention=False):
        """``out = h + MLP(LN2(h))`` with ``h = x + MHA(LN1(x))``.

        Parameters
        ----------
        x : array, shape (B, N, E)
        mask, causal, return_attention :
            As :meth:`MultiHeadAttention.forward`.

        Returns
        -------
        out : array, shape (B, N, E)
        attention : array, shape (B, h, N, N), only with ``return_attention``
        """
        return_attention = B.check_flag("return_attention", return_attention)
        causal = B.check_flag("causal", causal)
        self._cache = None  # a forward that fails leaves no cache for a backward to misuse
        self._check_tokens(x)
        xp, p = self.xp, self.params
        b, n, e = x.shape
        self.attn.params = {k[len("self_attn."):]: v for k, v in p.items() if k.startswith("self_attn.")}
        a, c_ln1 = F.layernorm_forward(x, p["norm1.weight"], p["norm1.bias"], self.eps)
        a = self.attn.forward(a, mask=mask, causal=causal, return_attention=return_attention)
        if return_attention:
            a, attention = a
        h = x + a
        u, c_ln2 = F.layernorm_forward(h, p["norm2.weight"], p["norm2.bias"], self.eps)
        u, c_l1 = F.linear_forward(xp.reshape(u, (b * n, e)), p["linear1.weight"], p["linear1.bias"])
        u, c_act = self._act_forward(u)
        u, c_l2 = F.linear_forward(u, p["linear2.weight"], p["linear2.bias"])
        out = h + xp.reshape(u, (b, n, e))
        self._cache = (tuple(x.shape), c_ln1, c_ln2, c_l1, c_act, c_l2)
        return (out, attention) if return_attention else out

    def backward(self, dout):
        """Back-propagate dL/d(out) through both residual paths; sets ``grads``, returns dL/dx."""
        x_shape, c_ln1, c_ln2, c_l1, c_act, c_l2 = self._pop_cache(dout)
        xp, g = self.xp, self.grads
        b, n, e = x_shape
        d, g["linear2.weight"], g["linear2.bias"] = F.linear_backward(xp.reshape(dout, (b * n, e)), c_l2)
        d = self._act_backward(d, c_act)
        d, g["linear1.weight"], g["linear1.bias"] = F.linear_backward(d, c_l1)
        d, g["norm2.weight"], g["norm2.bias"] = F.layernorm_backward(xp.reshape(d, x_shape), c_ln2)
        dh = dout + d                       # the residual path and the MLP branch meet
        d = self.attn.backward(dh)
        g.update({f"self_attn.{k}": v for k, v in self.attn.grads.items()})
        d, g["norm1.weight"], g["norm1.bias"] = F.layernorm_backward(d, c_ln1)
        return dh + d                       # and again around the attention


# --------------------------------------------------------------------------- positional encodings
def sinusoidal_encoding(length, dim, *, base=10000.0):
    r"""The sinusoidal position table of Vaswani et al. (2017), a host float64 array (length, dim).

    .. math::
        PE[p, 2i] = \sin\big(p / \mathrm{base}^{2i/\mathrm{dim}}\big), \qquad
        PE[p, 2i+1] = \cos\big(p / \mathrm{base}^{2i/\mathrm{dim}}\big)

    Each pair of channels turns at its own rate, so ``PE[p + k]`` is a fixed rotation of
    ``PE[p]``: relative offsets are linear maps of the table.
    """
    length, dim = _positive_int("length", length), _positive_int("dim", dim)
    if dim % 2:
        raise ValueError(f"dim must be even (sine and cosine pairs), got {dim}")
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not base > 1:
        raise ValueError(f"base must be a number > 1, got {base!r}")
    pos = np.arange(length, dtype=np.float64)[:, None]
    rate = float(base) ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    table = np.empty((length, dim))
    table[:, 0::2] = np.sin(pos * rate)
    table[:, 1::2] = np.cos(pos * rate)
    return table


def spacetime_sinusoidal_encoding(frames, height, width, dim, *, base=10000.0):
    """A factorised space-time table, host float64, shape (frames * height * width, dim).

    The channels are split in three even parts, one sinusoidal table per axis
    (time, row, column; the time and row parts get ``2 * (dim // 6)`` channels each,
    the column the rest), concatenated; tokens are ordered row-major over (T, H, W).
    """
    frames, height, width = (_positive_int(n, v) for n, v in (("frames", frames), ("height", height),
                                                                ("width", width)))
    dim = _positive_int("dim", dim)
    if dim % 2 or dim < 6:
        raise ValueError(f"dim must be even and at least 6 (a sine/cosine pair per axis), got {dim}")
    dt = 2 * (dim // 6)
    parts = [sinusoidal_encoding(frames, dt, base=base)[:, None, None, :],
             sinusoidal_encoding(height, dt, base=base)[None, :, None, :],
             sinusoidal_encoding(width, dim - 2 * dt, base=base)[None, None, :, :]]
    shape = (frames, height, width)
    table = np.concatenate([np.broadcast_to(p, shape + (p.shape[-1],)) for p in parts], axis=-1)
    return table.reshape(frames * height * width, dim)


class PositionalEncoding(_Params):
    r"""Adds a position code to every token: ``out[b, n] = x[b, n] + P[n]``.

    Attention alone is blind to order: permuting the tokens permutes its output the same
    way. Adding ``P`` makes a token's value depend on where it is.

    Parameters
    ----------
    shape : int or (T, H, W)
        ``N`` tokens in a sequence, or a clip's grid of ``T x H x W`` tokens (row-major).
    embed_dim : int
    kind : {"sinusoidal", "learned"}
        Fixed sines and cosines (:func:`sinusoidal_encoding`, or for a clip
        :func:`spacetime_sinusoidal_encoding`), or learned tables: ``weight`` (N, E) for
        a sequence; for a clip, factorised as ``time`` (T, E) + ``space`` (H W, E)
        (TimeSformer's separate embeddings), drawn normal with std 0.02.
    dtype, seed, xp, device :
        As :class:`MultiHeadAttention`.
    """

    def __init__(self, shape, embed_dim, *, kind="learned", dtype="float32", seed=0, xp=None, device=None):
        if isinstance(shape, (tuple, list)):
            if len(shape) not in (1, 3):
                raise ValueError(f"shape must be N or (T, H, W), got {shape!r}")
            shape = tuple(_positive_int("shape", s) for s in shape)
        else:
            shape = (_positive_int("shape", shape),)
        self.shape = shape
        self.num_tokens = math.prod(shape)
        self.embed_dim = _positive_int("embed_dim", embed_dim)
        if kind not in ENCODINGS:
            raise ValueError(f"kind must be one of {ENCODINGS}, got {kind!r}")
        self.kind = kind
        self._setup(dtype, xp, device)
        self.params, self.table = {}, None
        if kind == "sinusoidal":
            table = (sinusoidal_encoding(shape[0], self.embed_dim) if len(shape) == 1
                     else spacetime_sinusoidal_encoding(*shape, self.embed_dim))
            self.table = self._array(table)
        else:
            rng = np.random.default_rng([seed, 2])
            if len(shape) == 1:
                self.params["weight"] = self._array(0.02 * rng.standard_normal((shape[0], self.embed_dim)))
            else:
                self.params["time"] = self._array(0.02 * rng.standard_normal((shape[0], self.embed_dim)))
                self.params["space"] = self._array(0.02 * rng.standard_normal((shape[1] * shape[2], self.embed_dim)))
        self.grads = {k: None for k in self.params}

    def __repr__(self):
        return f"PositionalEncoding({self.shape}, {self.embed_dim}, kind={self.kind!r}, dtype={self.dtype_name!r})"

    def encoding(self):
        """The (N, E) table ``P`` added to every clip (computed from the parameters when learned)."""
        xp, p = self.xp, self.params
        if self.kind == "sinusoidal":
            return self.table
        if len(self.shape) == 1:
            return p["weight"]
        t, hw = self.shape[0], self.shape[1] * self.shape[2]
        return xp.reshape(p["time"][:, None, :] + p["space"][None, :, :], (t * hw, self.embed_dim))

    def forward(self, x):
        """x (B, N, E) -> x + P."""
        self._cache = None  # a forward that fails leaves no cache for a backward to misuse
        self._check_tokens(x)
        if x.shape[1] != self.num_tokens:
            raise ValueError(f"x has {x.shape[1]} tokens but the encoding has {self.num_tokens} "
                             f"(shape {self.shape})")
        self._cache = (tuple(x.shape),)
        return x + self.encoding()

    def backward(self, dout):
        """dx = dout; the tables get dout summed over the clips (and over space / time when factorised)."""
        (x_shape,) = self._pop_cache(dout)
        xp = self.xp
        if self.kind == "learned":
            dp = xp.sum(dout, axis=0)                                 # (N, E)
            if len(self.shape) == 1:
                self.grads["weight"] = dp
            else:
                dp = xp.reshape(dp, (self.shape[0], self.shape[1] * self.shape[2], self.embed_dim))
                self.grads["time"], self.grads["space"] = xp.sum(dp, axis=1), xp.sum(dp, axis=0)
        return dout
