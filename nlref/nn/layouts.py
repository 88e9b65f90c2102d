"""The peers' state-dict layouts: which key holds which of nlref's weights, and what each peer can express.

A *layout* is the naming of a non-local block's weights in one code base. nlref's
:class:`~nlref.nn.NonLocalBlock` writes and reads them
(``block.state_dict(layout=...)``, ``block.load_state_dict(state)``), and
:func:`nlref.compare_block` uses them to match a peer's gradients with nlref's.

.. list-table:: The layouts, and the code each was read from
   :header-rows: 1

   * - layout
     - module
     - source read (file, commit)
   * - ``"nlref"``
     - :class:`~nlref.nn.NonLocalBlock`
     - the keys of ``block.params`` and ``block.buffers``, and BN's ``bn.num_batches_tracked``
   * - ``"alexhex7"``
     - ``NONLocalBlock{1,2,3}D``
     - ``AlexHex7/Non-local_pytorch`` ``lib/non_local_{gaussian,embedded_gaussian,dot_product,concatenation}.py``
       at ``0276c7b11d313a5f057363f9f89f99b48b2e29bc``
   * - ``"mmcv"``
     - ``mmcv.cnn.NonLocal{1,2,3}d``
     - ``mmcv/cnn/bricks/non_local.py``, mmcv-lite 2.2.0 (the installed package)
   * - ``"slowfast"``
     - ``slowfast.models.nonlocal_helper.Nonlocal``
     - ``facebookresearch/SlowFast`` ``slowfast/models/nonlocal_helper.py`` at
       ``728d8f7b33742fdd65684408403ca2aee91ef177`` (the norm is ``self.bn``, built by ``norm_module``)
   * - ``"pytorchvideo"``
     - ``pytorchvideo.layers.nonlocal_net.NonLocal`` (``create_nonlocal``)
     - pytorchvideo 0.1.5 (the installed package); also SlowFast's older
       ``Nonlocal(..., norm_type=...)`` (at ``1739b74ce06007285f17126fe582bf67d254a5ae``),
       whose norm is ``self.norm``
   * - ``"timm"``
     - ``NonLocalAttn``
     - ``timm/models/layers/non_local_attn.py``, timm 0.6.13 (the installed package;
       ``timm/layers/non_local_attn.py`` in timm 1.x, same names)
   * - ``"keras"``
     - ``non_local_block(ip, ...)`` (a function building Keras layers)
     - ``titu1994/keras-non-local-nets`` ``non_local.py`` at
       ``ea0108aadb3d3ccca8b44932896a37119ae6a8f1``; its layers are named automatically
       (``conv2d_3``...), so the keys are the roles ``theta``, ``phi``, ``g``, ``W_z``; the port run
       channels-last (Keras's default): channels-first, its ``Reshape`` reads the branches' memory
       as other positions, a function no layout can express, with kernels of the same shapes

:data:`MODULE_NAMES` is the public mapping: for each peer layout, the name of the
submodule that holds each of nlref's pieces. ``{pool}`` stands for ``".0"`` when the
peer wraps the convolution in ``Sequential(conv, pool)`` (AlexHex7 and mmcv with
subsampling) and ``{norm}`` for ``".0"`` when AlexHex7 wraps ``W`` in
``Sequential(conv, bn)``. A weight's key is the submodule's name, a dot, and the
parameter's name (``weight``, ``bias``; BN: ``weight`` = gamma, ``bias`` = beta,
``running_mean``, ``running_var``, ``num_batches_tracked``). The PyTorch peers' convolution
weights carry trailing singleton axes: (out, in, 1), (out, in, 1, 1) or (out, in, 1, 1, 1).

The Keras layout is different in kind: the port has no biases, no batch norm and no
stable layer names, so its key is the role alone (``"theta"``, ``"phi"``, ``"g"``,
``"W_z"``) and its value the kernel as Keras stores it, leading singleton axes and
the channels transposed: (1, C_in, C_out), (1, 1, C_in, C_out) or (1, 1, 1, C_in, C_out),
the transpose of nlref's (C_out, C_in) (see :func:`to_layout`).

>>> from nlref.nn.layouts import MODULE_NAMES
>>> MODULE_NAMES["slowfast"]["bn"], MODULE_NAMES["pytorchvideo"]["bn"]
('bn', 'norm')
"""

from __future__ import annotations

import math
import numbers

from .. import backend as B
from . import functional as F

__all__ = ["LAYOUTS", "PEER_LAYOUTS", "MODULE_NAMES", "SOURCES", "module_names", "key_map", "counter_key",
           "problems", "check_expressible", "detect", "layout_of_keys", "parameter_mismatch", "slowfast_options",
           "to_layout", "from_layout"]

#: Every layout :meth:`NonLocalBlock.state_dict` writes and :meth:`NonLocalBlock.load_state_dict` reads.
LAYOUTS = ("nlref", "alexhex7", "mmcv", "slowfast", "pytorchvideo", "timm", "keras")
#: The layouts a PyTorch module can have (the ones :func:`nlref.compare_block` takes).
PEER_LAYOUTS = ("alexhex7", "mmcv", "slowfast", "pytorchvideo", "timm")

#: layout -> nlref piece -> the peer's submodule name (see the module docstring for ``{pool}``, ``{norm}``).
#: ``"w_f"`` is the concatenation's projection, a (1, 2d, 1, 1) Conv2d weight in every peer that has it.
MODULE_NAMES = {
    "alexhex7": {"theta": "theta", "phi": "phi{pool}", "g": "g{pool}", "W_z": "W{norm}", "bn": "W.1",
                 "w_f": "concat_project.0"},
    "mmcv": {"theta": "theta.conv", "phi": "phi{pool}.conv", "g": "g{pool}.conv", "W_z": "conv_out.conv",
             "bn": "conv_out.bn", "w_f": "concat_project.conv"},
    "slowfast": {"theta": "conv_theta", "phi": "conv_phi", "g": "conv_g", "W_z": "conv_out", "bn": "bn"},
    "pytorchvideo": {"theta": "conv_theta", "phi": "conv_phi", "g": "conv_g", "W_z": "conv_out", "bn": "norm"},
    "timm": {"theta": "t", "phi": "p", "g": "g", "W_z": "z", "bn": "norm"},
    "keras": {"theta": "theta", "phi": "phi", "g": "g", "W_z": "W_z"},  # roles: the port's names are automatic
}

#: layout -> where its names were read (file and commit or package version).
SOURCES = {
    "alexhex7": "AlexHex7/Non-local_pytorch lib/non_local_*.py @ 0276c7b11d313a5f057363f9f89f99b48b2e29bc",
    "mmcv": "mmcv/cnn/bricks/non_local.py, mmcv-lite 2.2.0",
    "slowfast": "facebookresearch/SlowFast slowfast/models/nonlocal_helper.py @ "
                "728d8f7b33742fdd65684408403ca2aee91ef177",
    "pytorchvideo": "pytorchvideo/layers/nonlocal_net.py, pytorchvideo 0.1.5 (and SlowFast's nonlocal_helper.py @ "
                    "1739b74ce06007285f17126fe582bf67d254a5ae)",
    "timm": "timm/models/layers/non_local_attn.py, timm 0.6.13",
    "keras": "titu1994/keras-non-local-nets non_local.py @ ea0108aadb3d3ccca8b44932896a37119ae6a8f1",
}

_BN_KEYS = {"gamma": "weight", "beta": "bias", "running_mean": "running_mean", "running_var": "running_var"}


def _check_layout(layout, allowed=LAYOUTS):
    if layout not in allowed:
        raise ValueError(f"layout must be one of {allowed}, got {layout!r}")


def module_names(layout, *, sub_sample, bn_layer):
    """nlref piece -> the peer's submodule name, for a block with these options.

    Parameters
    ----------
    layout : one of :data:`PEER_LAYOUTS`
    sub_sample, bn_layer : bool
        The block's options (they decide AlexHex7's and mmcv's ``Sequential`` wrappers).

    Returns
    -------
    dict of str to str
        Keys ``"theta"``, ``"phi"``, ``"g"``, ``"W_z"``, ``"bn"`` and, where the peer
        has a concatenation mode, ``"w_f"``.
    """
    _check_layout(layout, PEER_LAYOUTS)
    fill = {"pool": ".0" if sub_sample else "", "norm": ".0" if bn_layer else ""}
    return {piece: name.format(**fill) for piece, name in MODULE_NAMES[layout].items()}


def key_map(block, layout):
    """nlref key -> (the layout's key, the layout's shape), for ``block``'s parameters and buffers.

    Parameters
    ----------
    block : NonLocalBlock
    layout : one of :data:`LAYOUTS`

    Returns
    -------
    dict of str to (str, tuple of int)
        E.g. ``{"theta.weight": ("conv_theta.weight", (d, C, 1, 1, 1)), ...}``;
        BN's ``num_batches_tracked`` is :func:`counter_key`.

    Raises
    ------
    ValueError
        An unknown layout, or the concatenation mode in a layout without one.
    """
    _check_layout(layout)
    native = {k: tuple(v.shape) for k, v in {**block.params, **block.buffers}.items()}
    if layout == "nlref":
        return {k: (k, shape) for k, shape in native.items()}
    if layout == "keras":  # kernels only; a block with anything else is refused, naming the option
        check_expressible(block, layout)
        return {key: (MODULE_NAMES["keras"][key.split(".")[0]], (1,) * block.dims + shape[::-1])
                for key, shape in native.items()}
    names = module_names(layout, sub_sample=block.sub_sample, bn_layer=block.bn_layer)
    out = {}
    for key, shape in native.items():
        if key == "w_f":
            if "w_f" not in names:
                raise ValueError(f"the {layout} layout has no concatenation mode")
            out[key] = (f"{names['w_f']}.weight", (1,) + shape + (1, 1))  # a 1 x 2d x 1 x 1 Conv2d
            continue
        piece, kind = key.split(".")
        if piece == "bn":
            out[key] = (f"{names['bn']}.{_BN_KEYS[kind]}", shape)
        else:
            out[key] = (f"{names[piece]}.{kind}", shape + (1,) * block.dims if kind == "weight" else shape)
    return out


def counter_key(block, layout):
    """The layout's BN ``num_batches_tracked`` key for ``block`` (``"bn.num_batches_tracked"`` in nlref's;
    None without BN, or in the Keras port's layout, which has no BN)."""
    _check_layout(layout)
    if layout == "keras" or not block.bn_layer:
        return None
    return f"{'bn' if layout == 'nlref' else MODULE_NAMES[layout]['bn']}.num_batches_tracked"


def problems(block, layout):
    """The options of ``block`` the peer cannot express (empty when it computes exactly this block).

    Returns
    -------
    list of str
        One entry per option, naming it and what the peer does instead.
    """
    _check_layout(layout)
    if layout == "nlref":
        return []
    if layout == "keras":
        return _keras_problems(block)
    found = []
    if not block.projection_bias:
        found.append(f"projection_bias=False (the {layout} layout's theta, phi and g have biases)")
    default_pool = not block.sub_sample or (block.kernel == F.pool_kernel(block.dims) and block.stride == block.kernel)
    scale = block.logit_scale
    if layout == "alexhex7":
        if block.sub_sample and block.pool != "after":
            found.append(f"pool={block.pool!r} (the port pools after phi and g)")
        if not default_pool:
            found.append(f"pool_kernel={block.kernel}, pool_stride={block.stride} (the port's are fixed)")
        if scale != 1.0:
            found.append(f"scale={block.scale!r} (the port has no scale)")
        if not block.W_z_bias:
            found.append("W_z_bias=False (the port's W has a bias)")
    elif layout == "mmcv":
        if block.sub_sample and block.pool != "after":
            found.append(f"pool={block.pool!r} (mmcv pools after phi and g)")
        if not default_pool:
            found.append(f"pool_kernel={block.kernel}, pool_stride={block.stride} (mmcv's are fixed)")
        if block.W_z_bias == block.bn_layer:
            found.append(f"W_z_bias={block.W_z_bias} with bn_layer={block.bn_layer} (mmcv's conv_out has a "
                         "bias exactly when no norm follows)")
        if not (scale == 1.0 or (block.mode == "embedded_gaussian" and block.scale is True)):
            found.append(f"scale={block.scale!r} (mmcv's use_scale is 1/sqrt(inter_channels), embedded "
                         "Gaussian only)")
    elif layout in ("slowfast", "pytorchvideo"):
        who = "SlowFast's Nonlocal" if layout == "slowfast" else "pytorchvideo's NonLocal"
        if block.dims != 3:
            found.append(f"dims={block.dims} ({who} is 3-D)")
        if block.mode not in ("embedded_gaussian", "dot_product"):
            found.append(f"mode={block.mode!r} ({who} has instantiation 'softmax' = embedded_gaussian and "
                         "'dot_product')")
        if block.sub_sample and block.pool != "before":
            found.append(f"pool={block.pool!r} ({who} pools x before phi and g)")
        if block.sub_sample and block.stride != block.kernel:
            found.append(f"pool_stride={block.stride} ({who}'s stride is its pool_size)")
        if block.mode == "embedded_gaussian" and block.scale is not True:
            found.append(f"scale={block.scale!r} ({who}'s softmax scales by dim_inner ** -0.5: scale=True)")
        if not block.W_z_bias:
            found.append(f"W_z_bias=False ({who}'s conv_out has a bias)")
        if layout == "slowfast" and not block.bn_layer:
            found.append("bn_layer=False (SlowFast's Nonlocal always builds its norm_module; pytorchvideo's "
                         "NonLocal has norm=None)")
    elif layout == "timm":
        if block.dims != 2 or block.mode != "embedded_gaussian" or block.sub_sample or not block.bn_layer:
            found.append(f"dims={block.dims}, mode={block.mode!r}, sub_sample={block.sub_sample}, "
                         f"bn_layer={block.bn_layer} (timm's NonLocalAttn: 2-D, embedded Gaussian, no "
                         "subsampling, BN)")
        if not (scale == 1.0 or math.isclose(scale, block.in_channels ** -0.5, rel_tol=1e-12)):
            found.append(f"scale={block.scale!r} (timm multiplies by in_channels ** -0.5 = "
                         f"{block.in_channels ** -0.5!r}, or by 1 with use_scale=False)")
        if not block.W_z_bias:
            found.append("W_z_bias=False (timm's z has a bias)")
    return found


def _keras_problems(block):
    """What the titu1994 Keras port cannot express (facts from its ``non_local.py``, see :data:`SOURCES`)."""
    found = []
    if block.mode == "concatenation":
        found.append("mode='concatenation' (the port raises NotImplementedError for 'concatenate')")
    if block.bn_layer:
        found.append("bn_layer=True (the port has no batch norm: bn_layer=False)")
    if block.W_z_bias or block.projection_bias:
        found.append(f"W_z_bias={block.W_z_bias}, projection_bias={block.projection_bias} (the port's 1x1 "
                     "convolutions have use_bias=False: both False)")
    if block.logit_scale != 1.0:
        found.append(f"scale={block.scale!r} (the port's softmax is not scaled)")
    if block.sub_sample:
        if block.mode != "embedded_gaussian":
            found.append(f"sub_sample=True with mode={block.mode!r} (the port compresses only in its embedded mode)")
        if block.pool != "flattened":
            found.append(f"pool={block.pool!r} (the port's compression max-pools the flattened position sequence "
                         "after phi and g: pool='flattened')")
        elif block.stride != block.kernel:
            found.append(f"pool_stride={block.stride} (MaxPool1D's stride is its pool size, the compression)")
    return found


def to_layout(layout, value, shape):
    """nlref's array for one key -> the layout's array of ``shape`` (a reshape; Keras kernels are transposed too).

    Parameters
    ----------
    layout : one of :data:`LAYOUTS`
    value : numpy.ndarray, nlref's shape ((C_out, C_in) for a projection)
    shape : tuple of int, the layout's shape (from :func:`key_map`)
    """
    _check_layout(layout)
    if layout == "keras":  # Keras computes x @ kernel over channels-last x: kernel = W.T
        return value.T.reshape(shape)
    return value.reshape(shape)


def from_layout(layout, value, shape):
    """The inverse of :func:`to_layout`: the layout's array -> nlref's array of ``shape``."""
    _check_layout(layout)
    if layout == "keras":
        return value.reshape(tuple(shape)[::-1]).T
    return value.reshape(shape)


def check_expressible(block, layout):
    """Raise ValueError unless the peer computes exactly ``block`` (else its weights would mean something else)."""
    found = problems(block, layout)
    if found:
        raise ValueError(f"the {layout} layout cannot express this block's options: {'; '.join(found)}; "
                         "its weights would mean something else there")


def detect(block, keys):
    """The layout whose keys for ``block`` are exactly ``keys`` (BN's counter aside).

    Where two layouts have the same keys (SlowFast's and pytorchvideo's without a
    norm), the one that can express the block wins.

    Raises
    ------
    ValueError
        No layout fits; the message names the closest, with its unmatched and missing keys.
    """
    keys = set(keys)
    exact, best = [], None
    for layout in LAYOUTS:
        try:
            wanted = {peer_key for peer_key, _ in key_map(block, layout).values()}
        except ValueError:  # the concatenation mode in a layout without one
            continue
        found = keys - {counter_key(block, layout)}
        if found == wanted:
            exact.append(layout)
            continue
        score = len(found & wanted)
        if best is None or score > best[0]:
            best = (score, layout, sorted(found - wanted), sorted(wanted - found))
    if exact:
        return next((layout for layout in exact if not problems(block, layout)), exact[0])
    _, layout, unmatched, missing = best
    raise ValueError(f"state dict fits none of the layouts {LAYOUTS} for {block!r}; the closest is {layout!r}, "
                     f"with unmatched keys {unmatched} and missing keys {missing}")


def _prefix_hint(block, state, layout=None):
    """``"; ..."`` naming the key prefixes under which ``state`` fits ``block`` (in ``layout``, or any), else ``""``.

    A state dict saved from ``DataParallel``/``DistributedDataParallel`` has every key
    under ``module.``; a whole model's has the block's keys under its submodule's name.
    """
    keys = [k for k in state if isinstance(k, str)]
    prefixes = sorted({key[:i + 1] for key in keys for i, ch in enumerate(key) if ch == "."}, key=len)
    found = []
    for prefix in prefixes:
        sub = [key[len(prefix):] for key in keys if key.startswith(prefix)]
        try:
            fits = detect(block, sub) if layout is None else layout
            if layout is not None:
                wanted = {peer_key for peer_key, _ in key_map(block, layout).values()}
                if set(sub) - {counter_key(block, layout)} != wanted:
                    continue
        except ValueError:
            continue
        found.append(f"{prefix!r} ({fits} layout)")
    if not found:
        return ""
    return (f"; the keys under {', '.join(found[:4])} fit this block: pass prefix={found[0].split(' ')[0]} "
            "(a DataParallel/DistributedDataParallel state dict has every key under 'module.'; a whole model's "
            "has the block's under its name)")


def layout_of_keys(keys):
    """The peer layout a module's state-dict keys belong to, without a block (None if none fits).

    Told apart by names only the one peer uses: mmcv's ``conv_out.conv``, SlowFast's
    ``conv_*`` with ``bn``, pytorchvideo's ``conv_*`` with ``norm`` or no norm,
    timm's ``t``/``z``, AlexHex7's ``W``.
    """
    keys = set(keys)
    if any(k.startswith("conv_out.conv.") for k in keys):
        return "mmcv"
    if "conv_theta.weight" in keys or "conv_g.weight" in keys:
        return "slowfast" if any(k.startswith("bn.") for k in keys) else "pytorchvideo"
    if {"t.weight", "z.weight"} <= keys:
        return "timm"
    if "W.weight" in keys or "W.0.weight" in keys:
        return "alexhex7"
    return None


_PARAMETER_KEY_SETS = {}


def _parameter_key_sets(layout):
    """Every set of parameter keys (no buffers) a module of the peer ``layout`` has: one per combination
    of the options that name weights (mode, subsampling, BN, the biases) that the peer can express."""
    if layout not in _PARAMETER_KEY_SETS:
        import itertools

        from .block import NonLocalBlock
        from .nonlocal_op import MODES, SOFTMAX_MODES

        found = set()
        for mode, sub_sample, bn_layer, w_z_bias, projection_bias in itertools.product(MODES, *[(False, True)] * 4):
            names = None
            pools = ("after", "before") if sub_sample else ("after",)
            for dims, pool, scale in itertools.product((2, 3, 1), pools, (False, True)):
                if scale and mode not in SOFTMAX_MODES:
                    continue
                block = NonLocalBlock(2, mode=mode, dims=dims, sub_sample=sub_sample, bn_layer=bn_layer,
                                      W_z_bias=w_z_bias, projection_bias=projection_bias, pool=pool, scale=scale,
                                      dtype="float64")
                try:
                    mapping = key_map(block, layout)
                except ValueError:  # the concatenation mode in a layout without one
                    break
                if not problems(block, layout):
                    names = frozenset(peer_key for key, (peer_key, _) in mapping.items() if key in block.params)
                    break
            if names is not None:
                found.add(names)
        _PARAMETER_KEY_SETS[layout] = sorted(found, key=sorted)
    return _PARAMETER_KEY_SETS[layout]


def parameter_mismatch(names, layout):
    """How a module's parameter names (``named_parameters()``, no buffers) miss the peer ``layout``.

    Parameters
    ----------
    names : iterable of str
    layout : one of :data:`PEER_LAYOUTS`

    Returns
    -------
    None or (list of str, list of str)
        None when some block options give exactly these names in ``layout``; else, for the
        closest such set of names, the module's names it lacks (unmatched) and the names
        the module lacks (missing).
    """
    _check_layout(layout, PEER_LAYOUTS)
    names = set(names)
    best = None
    for wanted in _parameter_key_sets(layout):
        if names == wanted:
            return None
        unmatched, missing = sorted(names - wanted), sorted(wanted - names)
        if best is None or (len(unmatched) + len(missing), unmatched, missing) < best:
            best = (len(unmatched) + len(missing), unmatched, missing)
    return best[1], best[2]


def slowfast_options(dim, dim_inner, pool_size=None, instantiation="softmax", zero_init_final_conv=False,
                     zero_init_final_norm=True, norm_eps=1e-5, norm_momentum=0.1, norm_module=None):
    """The :class:`~nlref.nn.NonLocalBlock` keyword arguments for SlowFast's ``Nonlocal(...)`` arguments.

    The signature is SlowFast's (``slowfast/models/nonlocal_helper.py`` at
    ``728d8f7b33742fdd65684408403ca2aee91ef177``), so a config's arguments pass through unchanged:
    ``NonLocalBlock(**slowfast_options(**kwargs))`` computes what ``Nonlocal(**kwargs)`` computes,
    and ``block.state_dict(layout="slowfast")`` loads into it with ``strict=True``.

    Parameters
    ----------
    dim, dim_inner : int
        ``in_channels`` and ``inter_channels``.
    pool_size : sequence of 3 ints, optional
        Max-pool ``x`` before phi and g with kernel = stride = ``pool_size`` (``pool="before"``);
        None or all ones: no pooling.
    instantiation : {"softmax", "dot_product"}
        ``"softmax"``: ``mode="embedded_gaussian"`` with ``scale=True`` (``dim_inner ** -0.5``).
    zero_init_final_conv, zero_init_final_norm : bool
        Flags SlowFast's weight initialiser reads (``conv_out.zero_init``,
        ``bn.transform_final_bn``); they set initial values only, so they map to no
        option. nlref's block starts with BN's gamma = 0, as SlowFast's default
        ``zero_init_final_norm=True``; load the module's weights for any other start.
    norm_eps, norm_momentum : float
        ``bn_eps`` and ``bn_momentum``.
    norm_module : class, optional
        ``torch.nn.BatchNorm3d`` (the default, also when None). Any other class
        (SlowFast's ``SubBatchNorm3d``, ``NaiveSyncBatchNorm3d``...) is refused: its
        statistics or keys differ from one batch norm's.

    Returns
    -------
    dict
        ``in_channels``, ``inter_channels``, ``dims=3``, ``mode``, ``scale``,
        ``sub_sample``, ``bn_eps``, ``bn_momentum``; with pooling also ``pool="before"``
        and ``pool_kernel``.

    Raises
    ------
    ValueError
        An instantiation or norm module nlref has no twin for, or a malformed argument.
    """
    if norm_module is not None:
        name = getattr(norm_module, "__name__", type(norm_module).__name__)
        if name != "BatchNorm3d" or getattr(norm_module, "__module__", "").split(".")[0] != "torch":
            raise ValueError(f"norm_module={name} has no nlref twin: nlref's block normalises with one batch "
                             "norm, torch.nn.BatchNorm3d (SlowFast's default)")
    modes = {"softmax": "embedded_gaussian", "dot_product": "dot_product"}
    if instantiation not in modes:
        raise ValueError(f"instantiation must be 'softmax' or 'dot_product' (SlowFast's two), got {instantiation!r}")
    for name, value in (("zero_init_final_conv", zero_init_final_conv), ("zero_init_final_norm", zero_init_final_norm)):
        B.check_flag(name, value)
    options = {"in_channels": dim, "inter_channels": dim_inner, "dims": 3, "mode": modes[instantiation],
               "scale": instantiation == "softmax", "bn_eps": norm_eps,
               "bn_momentum": norm_momentum, "sub_sample": False}
    if pool_size is not None:
        if isinstance(pool_size, (str, bytes)) or not hasattr(pool_size, "__len__") or len(pool_size) != 3:
            raise ValueError(f"pool_size must be None or 3 ints (time, height, width), got {pool_size!r}")
        if any(isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1 for k in pool_size):
            raise ValueError(f"pool_size must hold ints >= 1, got {pool_size!r}")
        if any(k > 1 for k in pool_size):
            options.update(sub_sample=True, pool="before", pool_kernel=tuple(int(k) for k in pool_size))
    return options
