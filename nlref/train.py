"""Train a small non-local network on a synthetic task, with hand-written backprop.

``train(TrainConfig(...), out_dir)`` generates the data (the two-sprite clips of
:mod:`nlref.data.sprites`, or with ``task="pairs2d"`` the two-shape images of
:mod:`nlref.data.pairs2d`), builds the network (a :class:`~nlref.nn.models.VideoNet`,
a :class:`~nlref.nn.models.VideoTransformer`, or for images an
:class:`~nlref.nn.models.ImageResNet`), and runs epochs of
forward -> softmax cross-entropy -> backward -> optimiser step. After every
epoch it evaluates on the validation split, appends a row to ``metrics.json``
and ``metrics.csv`` and writes ``checkpoint.npz``; every file is written to a
temporary name in the same directory and renamed over the old one, so an
interruption never leaves a half-written file, and the previous checkpoint
stays intact until the new one is complete.

Everything random follows from ``config.seed``: the data, the initial
weights, each epoch's shuffle and each step's dropout mask (seeded by
``(seed, epoch, step)``). That is what makes ``resume=True`` exact: a run
resumed from the checkpoint of epoch ``k`` performs the same arithmetic as an
uninterrupted run and ends with bit-identical weights (on the same backend).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import inspect
import io
import json
import math
import os
import signal
import threading
import time
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._files import folder_problem, write_atomically
from ._typing import PathLike
from . import backend as B
from .data.pairs2d import PairImages, pair_splits
from .data.sprites import GLYPHS, RELATIONS, SpriteClips, sprite_clips, sprite_splits
from .nn import functional as F
from .nn.models import EXTENTS, MODELS, STAGES, ImageResNet, VideoNet, VideoTransformer, nonlocal_slots
from .nn.block import check_options as check_block_options
from .nn.nonlocal_op import MODES
from .nn.optim import SGD, Adam, StepSchedule

__all__ = ["TrainConfig", "train", "load_checkpoint", "evaluate", "build_model", "build_data", "CheckpointError",
           "OutDirError"]

CHECKPOINT = "checkpoint.npz"
RUN_FILES = (CHECKPOINT, "metrics.json", "metrics.csv")
OPTIMISERS = ("adam", "sgd")
#: What ``nlref train --task`` trains on: the two-sprite clips or the two-shape images (:mod:`nlref.data.pairs2d`).
TASKS = ("sprites", "pairs2d")
#: The models that apply to each task (``"c2d"`` on images is the 2-D :class:`~nlref.nn.models.ImageResNet`).
TASK_MODELS = {"sprites": MODELS, "pairs2d": ("c2d",)}
#: Where a task's documented run departs from :class:`TrainConfig`'s shared defaults (docs/training.md):
#: ``nlref train --task`` starts from these for the flags left out. ``TrainConfig(task=...)`` does not.
TASK_DEFAULTS = {"sprites": {}, "pairs2d": {"size": 24, "kinds": 4, "dropout": 0.0}}
_FORMAT = "nlref-checkpoint-1"
# frames each sprite is visible: sprite_clips' default, which build_data keeps
_SPRITE_DURATION = inspect.signature(sprite_clips).parameters["duration"].default


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: unreadable, corrupted, or from another configuration."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (and must match to resume one).

    The defaults are the issue's default configuration: a C2D network with one
    embedded-Gaussian non-local block in res3, trained with Adam for 10 epochs
    on 4000 clips of 8 x 16 x 16 (about a minute on 2 CPU cores with NumPy).

    With ``task="pairs2d"`` the data are :func:`~nlref.data.pairs2d.pair_images` of
    ``size`` x ``size`` (``relation``, ``kinds``, ``channels``, ``noise`` and ``margin``
    apply; ``frames`` does not) and the network is an :class:`~nlref.nn.models.ImageResNet` of width
    ``widths[0]`` with ``blocks[0]`` residual blocks and ``nonlocal_blocks`` non-local blocks
    (``stage``, ``extent``, the other widths and blocks and the transformer's fields do not
    apply). Its local receptive field must stay within ``2 * margin + 1`` pixels, where the
    task's 75% ceiling binds the network without a non-local block.
    """

    task: str = "sprites"
    model: str = "c2d"
    nonlocal_blocks: int = 1
    stage: str = "res3"
    mode: str = "embedded_gaussian"
    extent: str = "spacetime"
    sub_sample: bool = True
    bn_layer: bool = True
    scale: bool = False
    pool: str = "after"
    widths: tuple = (16, 32, 64)
    blocks: tuple = (1, 2, 2)
    dropout: float = 0.5
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    milestones: tuple = (0.6, 0.85)
    # the epochs whose steps the milestones are fractions of (None: epochs); a run extended by resume=True
    # with more epochs keeps the schedule it started with, and equals the run with schedule_epochs set so
    schedule_epochs: int | None = None
    warmup: int = 0
    n_train: int = 4000
    n_val: int = 1000
    relation: str = "brightness"
    kinds: int = 8
    frames: int = 8
    size: int = 16
    channels: int = 1
    noise: float = 0.05
    margin: int = 3  # task="pairs2d": each shape keeps this many pixels from the centre lines
    dtype: str = "float32"
    seed: int = 0
    # model="transformer" (a VideoTransformer; the convolutional fields above do not apply to it)
    embed_dim: int = 32
    depth: int = 2
    num_heads: int = 2
    mlp_dim: int = 64
    tubelet: tuple = (1, 4, 4)

    def validate(self) -> "TrainConfig":
        """Check every field; raise ValueError naming the first bad one (before any heavy work).

        ``task``, ``model`` (one that applies to the task), ``mode``, ``stage``, ``extent``, ``optimizer``,
        ``pool``, ``relation`` and ``dtype`` are one of their choices; ``sub_sample``, ``bn_layer`` and
        ``scale`` are booleans (``scale`` only with a softmax ``mode`` where non-local blocks are built,
        ``pool="before"`` only with ``sub_sample``); ``epochs``, ``batch_size`` (at most ``n_train``),
        ``n_train``, ``n_val`` are positive integers; ``widths`` and ``blocks`` are 3 positive integers;
        ``nonlocal_blocks`` is an integer >= 0 that fits the network's slots; ``kinds`` is 2 to 8,
        ``channels`` 1 or 3, ``frames`` even and >= 6, ``size`` >= 16; ``lr`` > 0; ``weight_decay`` >= 0;
        ``momentum``, ``dropout`` and ``noise`` in [0, 1); ``milestones`` is a sequence of fractions in (0,
        1); ``schedule_epochs`` is None or a positive integer; ``warmup`` and ``seed`` are integers >= 0.
        With ``task="pairs2d"``, ``margin`` is an integer >= 0 with ``size // 2 >= 5 + margin``,
        ``nonlocal_blocks`` is at most ``blocks[0]`` and the network's local receptive field is at most ``2
        * margin + 1``. With ``model="transformer"``, ``embed_dim``, ``depth``, ``num_heads``, ``mlp_dim``
        and ``tubelet`` are checked by building the (small) network.
        """
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS} (--task), got {self.task!r}")
        if self.model not in TASK_MODELS[self.task]:
            raise ValueError(f"model must be one of {TASK_MODELS[self.task]} with task={self.task!r} (--model, "
                             f"--task), got {self.model!r}")
        choices = {"model": TASK_MODELS[self.task], "mode": MODES, "stage": STAGES, "extent": EXTENTS,
                   "optimizer": OPTIMISERS, "pool": ("after", "before"), "relation": RELATIONS,
                   "dtype": ("float32", "float64")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("sub_sample", "bn_layer", "scale"):
            B.check_flag(name, getattr(self, name))

        def is_int(value):
            return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))

        def is_number(value):
            return (isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
                    and math.isfinite(value))

        for name, low in (("epochs", 1), ("batch_size", 1), ("n_train", 1), ("n_val", 1), ("kinds", 2),
                          ("frames", 2), ("size", 16), ("channels", 1), ("warmup", 0), ("seed", 0),
                          ("nonlocal_blocks", 0), ("margin", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                what = "a positive integer" if low == 1 else f"an integer >= {low}"
                raise ValueError(f"{name} must be {what}, got {value!r}")
        if self.schedule_epochs is not None and (not is_int(self.schedule_epochs) or self.schedule_epochs < 1):
            raise ValueError(f"schedule_epochs must be a positive integer (or None: that of epochs), "
                             f"got {self.schedule_epochs!r}")
        if self.batch_size > self.n_train:
            raise ValueError(f"batch_size ({self.batch_size}) must not exceed n_train ({self.n_train})")
        if self.kinds > len(GLYPHS):
            raise ValueError(f"kinds must be between 2 and {len(GLYPHS)}, got {self.kinds!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels!r}")
        if self.frames % 2 or self.frames < 2 * _SPRITE_DURATION:
            raise ValueError(f"frames must be even and at least {2 * _SPRITE_DURATION} (two sprites of "
                             f"{_SPRITE_DURATION} frames), got {self.frames!r}")
        for name in ("widths", "blocks"):
            value = getattr(self, name)
            if (not isinstance(value, (tuple, list)) or len(value) != len(STAGES)
                    or not all(is_int(v) and v >= 1 for v in value)):
                raise ValueError(f"{name} must be {len(STAGES)} positive integers (one per stage), got {value!r}")
        if self.task == "pairs2d":
            if self.size // 2 < 5 + self.margin:
                raise ValueError(f"size (--size) // 2 must be at least 5 + margin (--margin) = {5 + self.margin} with "
                                 f"task='pairs2d' (a 5x5 shape per quadrant), got size={self.size}, "
                                 f"margin={self.margin}")
            if self.nonlocal_blocks > self.blocks[0]:
                raise ValueError(f"nonlocal_blocks (--nonlocal) must be at most blocks[0] = {self.blocks[0]} with "
                                 f"task='pairs2d' (one before each residual block), got {self.nonlocal_blocks}")
        else:
            try:
                nonlocal_slots(self.nonlocal_blocks, stage=self.stage, blocks=tuple(self.blocks))
            except ValueError as err:
                raise ValueError(f"nonlocal_blocks: {err}") from None
        if self.nonlocal_blocks > 0 and (self.task == "pairs2d" or self.model != "transformer"):
            # the blocks' own check, before the network is built (a refusal there was an internal error of nlref)
            check_block_options(mode=self.mode, sub_sample=self.sub_sample, scale=self.scale, pool=self.pool)
        if not is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        for name in ("momentum", "dropout", "noise"):
            value = getattr(self, name)
            if not is_number(value) or not 0 <= value < 1:
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        milestones = self.milestones
        if (not isinstance(milestones, (tuple, list))
                or not all(is_number(m) and 0 < m < 1 for m in milestones)):
            raise ValueError(f"milestones must be a sequence of fractions of training in (0, 1), "
                             f"got {milestones!r}")
        if self.model == "transformer":
            build_model(self)  # VideoTransformer checks its own options (ValueError naming them); a cheap build
        if self.task == "pairs2d":
            reach = image_receptive_field(self.blocks[0])
            if reach > 2 * self.margin + 1:
                raise ValueError(f"margin (--margin) {self.margin} is too small for the network: with "
                                 f"task='pairs2d' its local receptive field ({reach} pixels for blocks[0] = "
                                 f"{self.blocks[0]}) must be at most 2 * margin + 1 = {2 * self.margin + 1}, or a "
                                 "network without non-local blocks can see both shapes and the task's 75% ceiling "
                                 f"does not bind it; raise margin to at least {reach // 2} or lower "
                                 "blocks[0]")
        return self

    def as_dict(self):
        """The fields as plain JSON values: tuples as lists, NumPy scalars (``np.int64(3)``) as Python numbers."""
        def plain(value):
            if isinstance(value, (tuple, list)):
                return [plain(v) for v in value]
            return value.item() if isinstance(value, np.generic) else value

        return {k: plain(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        """The configuration of a mapping of field names (``as_dict``'s, a checkpoint's ``meta["config"]``).

        Lists become tuples; fields left out take their defaults. Not validated (call ``validate``).
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"d must be a mapping of TrainConfig's field names to values (as as_dict gives), "
                            f"got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown configuration keys {unknown}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**d)


# --------------------------------------------------------------------------- building blocks
def image_receptive_field(blocks):
    """The local receptive field (pixels) of the task="pairs2d" network with ``blocks`` residual blocks.

    Read off a network of width 1 (:attr:`nlref.nn.models.ImageResNet.local_receptive_field`), so it is the
    one the trained network has.
    """
    return ImageResNet(width=1, blocks=blocks).local_receptive_field


def build_model(config, xp=None, device=None):
    """The network a configuration describes, with its initial weights (from ``config.seed``).

    Parameters
    ----------
    config : TrainConfig
    xp : array namespace, optional
        Where the parameters live (NumPy by default).
    device : optional
        ``xp``'s device (its default when None).

    Returns
    -------
    VideoNet, VideoTransformer or ImageResNet
        A :class:`~nlref.nn.models.VideoNet`, the ``"transformer"`` model's
        :class:`~nlref.nn.models.VideoTransformer`, or with ``task="pairs2d"`` an
        :class:`~nlref.nn.models.ImageResNet`, in training mode; ``load_state_dict`` of a
        checkpoint's ``model`` and ``eval()`` make it the trained network (docs/training.md).
    """
    if config.model == "transformer":
        return VideoTransformer(frames=config.frames, size=config.size, in_channels=config.channels, num_classes=2,
                                tubelet=config.tubelet, embed_dim=config.embed_dim, depth=config.depth,
                                num_heads=config.num_heads, mlp_dim=config.mlp_dim, dtype=config.dtype,
                                seed=config.seed, xp=xp, device=device)
    options = {"sub_sample": config.sub_sample, "bn_layer": config.bn_layer, "scale": config.scale,
               "pool": config.pool}
    if config.task == "pairs2d":
        return ImageResNet(nonlocal_blocks=config.nonlocal_blocks, mode=config.mode, nonlocal_options=options,
                           in_channels=config.channels, num_classes=2, width=config.widths[0],
                           blocks=config.blocks[0], dropout=config.dropout, dtype=config.dtype, seed=config.seed,
                           xp=xp, device=device)
    return VideoNet(config.model, nonlocal_blocks=config.nonlocal_blocks, stage=config.stage, mode=config.mode,
                    extent=config.extent, nonlocal_options=options, in_channels=config.channels, num_classes=2,
                    widths=config.widths, blocks=config.blocks, dropout=config.dropout, dtype=config.dtype,
                    seed=config.seed, xp=xp, device=device)


def data_bytes(config):
    """Bytes of a run's train and validation sets: the clips (or images) alone, in ``config.dtype``."""
    per_example = config.channels * config.size**2 * (1 if config.task == "pairs2d" else config.frames)
    return (config.n_train + config.n_val) * per_example * np.dtype(config.dtype).itemsize


def _physical_memory():
    """This machine's memory in bytes, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX, or the names unknown here
        return None


def check_memory(config):
    """Refuse, before any work, a run whose data set alone is larger than this machine's memory.

    The data are made on the host in NumPy whatever ``xp`` is, and the network's
    activations come on top, so the run could not finish: it would be killed
    while making the data (``size=1000`` asks for 160 GB with the other defaults).
    """
    need, have = data_bytes(config), _physical_memory()
    if have is None or need <= have:
        return
    example = (f"images of {config.channels} x {config.size} x {config.size}" if config.task == "pairs2d" else
               f"clips of {config.channels} x {config.frames} x {config.size} x {config.size}")
    raise ValueError(f"the data set alone would take {need / 1e9:.1f} GB (n_train + n_val = "
                     f"{config.n_train + config.n_val} {example} {config.dtype}), more than this machine's "
                     f"{have / 2**30:.1f} GiB of memory: lower size, n_train or n_val")


def build_data(config, xp=None, device=None):
    """The (train, val) splits a configuration describes, the same for the same ``config`` on any machine.

    Parameters
    ----------
    config : TrainConfig
    xp : array namespace, optional
        Where the arrays live (NumPy by default).
    device : optional
        ``xp``'s device (its default when None).

    Returns
    -------
    tuple
        Two :class:`~nlref.data.sprites.SpriteClips`, or with ``task="pairs2d"`` two
        :class:`~nlref.data.pairs2d.PairImages`.
    """
    if config.task == "pairs2d":
        return pair_splits(config.n_train, config.n_val, seed=config.seed, relation=config.relation,
                           size=config.size, margin=config.margin, kinds=config.kinds, channels=config.channels,
                           noise=config.noise, xp=xp, dtype=config.dtype, device=device)
    return sprite_splits(config.n_train, config.n_val, seed=config.seed, relation=config.relation,
                         kinds=config.kinds, frames=config.frames, size=config.size, channels=config.channels,
                         noise=config.noise, xp=xp, dtype=config.dtype, device=device)


def _optimiser(config, model):
    if config.optimizer == "sgd":
        return SGD(model, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    return Adam(model, lr=config.lr, weight_decay=config.weight_decay)


def _step_seed(seed, epoch, step):
    """The dropout seed of one step: a pure function of (seed, epoch, step)."""
    return int(np.random.SeedSequence([seed, epoch, step]).generate_state(1, np.uint64)[0])


def _inputs(data):
    """The network inputs of a data set: clips, or images for the 2-D task."""
    return data.image if isinstance(data, PairImages) else data.video


def _take(xp, a, idx):
    return xp.take(a, B.asarray(idx, like=a), axis=0)


def _correct(xp, logits, labels):
    """How many arg-max predictions equal the labels (a host int)."""
    return int(xp.sum(xp.astype(xp.argmax(logits, axis=1) == labels, xp.int64)))


def evaluate(model, clips, *, batch_size=100):
    """Mean loss and accuracy of ``model`` (in eval mode) on ``clips``; the model is left in eval mode.

    ``clips`` is a :class:`~nlref.data.sprites.SpriteClips` (or, for the 2-D network, a
    :class:`~nlref.data.pairs2d.PairImages`) of at least one example, with one label per example;
    ``batch_size`` (an integer >= 1) sets how many go through the network at a time and changes
    nothing but the rounding.
    """
    if not isinstance(clips, (SpriteClips, PairImages)):
        raise TypeError(f"clips must be a SpriteClips or PairImages (a split of build_data, or one made from "
                        f"your own arrays and labels), got {type(clips).__name__}")
    if isinstance(batch_size, (bool, np.bool_)) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    n = len(clips)
    if n < 1 or _inputs(clips).shape[0] != n:
        raise ValueError(f"clips must hold at least one example and one label per example, got "
                         f"{_inputs(clips).shape[0]} examples and {n} labels")
    model.eval()
    xp = B.array_namespace(_inputs(clips))
    total_loss, correct = 0.0, 0
    for lo in range(0, n, batch_size):
        idx = np.arange(lo, min(lo + batch_size, n))
        x, y = _take(xp, _inputs(clips), idx), _take(xp, clips.labels, idx)
        logits = model.forward(x)
        loss, _ = F.softmax_cross_entropy_forward(logits, y)
        total_loss += float(loss) * idx.size
        correct += _correct(xp, logits, y)
    return total_loss / n, correct / n


# --------------------------------------------------------------------------- files
def _digest(arrays):
    h = hashlib.sha256()
    for key in sorted(arrays):
        h.update(key.encode())
        h.update(np.ascontiguousarray(arrays[key]).tobytes())
    return h.hexdigest()


def save_checkpoint(path, *, config, model, optimiser, epoch, history):
    """Atomically write model, optimiser, epoch, history and config to ``path`` (an ``.npz``)."""
    arrays = {f"model/{k}": v for k, v in model.state_dict().items()}
    opt = optimiser.state_dict()
    for key, slots in opt["state"].items():
        for name, value in slots.items():
            arrays[f"optim/{name}/{key}"] = value
    saved = config.as_dict()
    if saved["schedule_epochs"] is None:  # left out unless set: nlref before the field reads such checkpoints
        del saved["schedule_epochs"]
    meta = {"format": _FORMAT, "config": saved, "epoch": epoch, "optim_steps": opt["steps"],
            "history": history, "sha256": _digest(arrays)}
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    write_atomically(path, lambda f: np.savez(f, **arrays))


_META_KEYS = ("format", "config", "epoch", "optim_steps", "history", "sha256")  # what save_checkpoint writes


def _meta_problem(meta):
    """What is wrong with a checkpoint's metadata (the types save_checkpoint writes), or None."""
    def count(value):
        return isinstance(value, int) and not isinstance(value, bool) and value >= 0

    config = meta["config"]
    if not isinstance(config, dict):
        return f"its configuration is a {type(config).__name__}, not a mapping of TrainConfig's fields"
    unknown = sorted(map(str, set(config) - {f.name for f in dataclasses.fields(TrainConfig)}))
    if unknown:
        return f"its configuration has fields this nlref does not know ({', '.join(unknown)})"
    if not count(meta["epoch"]) or not count(meta["optim_steps"]):
        return (f"its epoch ({meta['epoch']!r}) and optimiser step count ({meta['optim_steps']!r}) must be "
                "integers >= 0")
    history = meta["history"]
    if not (isinstance(history, list) and len(history) == meta["epoch"]
            and all(isinstance(row, dict) for row in history)):
        return f"its history must be one row per epoch done ({meta['epoch']}), got {history!r:.80}"
    return None


def load_checkpoint(path):
    """Read and verify a checkpoint; returns ``(meta, model_state, optimiser_state)``.

    Raises
    ------
    CheckpointError
        The file is missing, truncated, not an nlref checkpoint, or its contents
        do not match the checksum stored in it.
    """
    from . import __version__

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    what_to_do = ("it cannot be resumed: restore it from a copy, or start the run over (discarding it: "
                  "overwrite=True, or --overwrite on the command line)")
    # The reasons NumPy and zipfile give are not passed on: for a file that is not a zip archive NumPy
    # suggests loading it with allow_pickle=True, which would run whatever code a damaged or foreign
    # file holds, and is never the fix for a checkpoint.
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated (not a readable .npz archive); "
                              + what_to_do)
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: np.array(data[k]) for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, KeyError) as err:
        raise CheckpointError(f"checkpoint {path} is corrupted or truncated ({type(err).__name__} while "
                              f"reading its arrays); " + what_to_do) from None
    try:
        meta = json.loads(arrays.pop("meta").tobytes().decode())
        tag = meta["format"]
        if not (isinstance(tag, str) and tag.startswith(_FORMAT.rsplit("-", 1)[0] + "-")):
            raise ValueError(tag)
    except Exception as err:
        raise CheckpointError(f"{path} is not an nlref checkpoint ({_FORMAT}): it holds no nlref metadata; "
                              "point out_dir (--out) at the folder of an nlref run") from err
    if tag != _FORMAT:  # an explicit test (an assert is skipped under python -O)
        raise CheckpointError(f"checkpoint {path} was written by another version of nlref in the format {tag!r}; "
                              f"this nlref ({__version__}) reads {_FORMAT!r}: resume it with the nlref that "
                              "started the run")
    missing = [k for k in _META_KEYS if k not in meta]
    if missing or not all(k.count("/") >= (2 if k.startswith("optim/") else 1) for k in arrays):
        raise CheckpointError(f"checkpoint {path} is not one nlref wrote: "
                              + (f"its metadata lacks {', '.join(missing)}" if missing else
                                 "it holds arrays that are neither model/NAME nor optim/SLOT/NAME")
                              + "; " + what_to_do)
    problem = _meta_problem(meta)
    if problem:
        raise CheckpointError(f"checkpoint {path} is not one this nlref ({__version__}) wrote: {problem}; "
                              "resume it with the nlref that started the run, or " + what_to_do.split(": ", 1)[1])
    if _digest(arrays) != meta["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: its contents do not match the stored checksum; "
                              + what_to_do)
    model_state = {k[len("model/"):]: v for k, v in arrays.items() if k.startswith("model/")}
    opt_state = {"steps": meta["optim_steps"], "state": {}}
    for k, v in arrays.items():
        if k.startswith("optim/"):
            _, name, key = k.split("/", 2)
            opt_state["state"].setdefault(key, {})[name] = v
    return meta, model_state, opt_state


def _write_metrics(out_dir, history):
    write_atomically(out_dir / "metrics.json", lambda f: f.write(json.dumps(history, indent=1).encode()))
    text = io.StringIO()
    if history:
        writer = csv.DictWriter(text, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    write_atomically(out_dir / "metrics.csv", lambda f: f.write(text.getvalue().encode()))


@contextlib.contextmanager
def _signals_held():
    """Hold SIGINT and SIGTERM while the block runs, then deliver them.

    Wraps the writing of one epoch's checkpoint and metrics, so that an interruption
    (Ctrl-C, ``kill``) never lands between the two files: after it, ``metrics.json``
    and ``metrics.csv`` describe exactly the epochs in ``checkpoint.npz``. Each file
    is written atomically in any case. Signal handlers can only be set in the main
    thread; elsewhere (and where a handler was installed outside Python) this does nothing.
    """
    names = [s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None)) if s is not None]
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in names}
    if any(h is None for h in previous.values()):
        yield
        return
    caught = []
    for s in names:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for signum in caught[:1]:
            signal.raise_signal(signum)


class OutDirError(ValueError):
    """``out_dir`` cannot take the run: it cannot be written, it holds a run (and neither ``resume`` nor
    ``overwrite`` was given), or another run is writing there."""


def _check_out_dir(out_dir, resume, overwrite):
    """Refuse to resume where there is no checkpoint, and to start where a run is, unless ``overwrite``."""
    existing = [name for name in RUN_FILES if (Path(out_dir) / name).exists()]
    if resume and not (Path(out_dir) / CHECKPOINT).is_file():
        raise CheckpointError(f"nothing to resume in {str(out_dir)!r}: it holds no {CHECKPOINT}; "
                              "start a new run there without resume (--resume)")
    if existing and not (resume or overwrite):
        raise OutDirError(f"{str(out_dir)!r} already holds a training run ({', '.join(existing)}); "
                          "continue it with resume=True (--resume), start it over with overwrite=True "
                          "(--overwrite, which replaces those files when the new run's first epoch is "
                          "written), or choose another out_dir (--out)")


def _prepare_out_dir(out_dir):
    out_dir = Path(out_dir)
    problem = folder_problem(out_dir)
    if problem:
        raise OutDirError(f"out directory {str(out_dir)!r} cannot be written: {problem}")
    return out_dir


@contextlib.contextmanager
def _run_lock(out_dir):
    """Hold an exclusive lock on the folder ``out_dir`` while a run writes there; refuse one held by another run.

    Two runs into one folder (the same ``--out`` in two terminals) replaced each other's checkpoint and
    metrics every epoch, and both ended as if all was well, one of them lost. The lock is ``flock`` on the
    folder itself: no lock file is left behind, and the system drops it when the process ends, even when it
    is killed. Where there is no ``fcntl`` (Windows) or the file system has no locks, runs are not locked.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutDirError(f"{str(out_dir)!r} is in use: another training run is writing there now; wait for it "
                              "to end, or choose another out_dir (--out)") from None
        except OSError:  # a file system without locks (some network mounts)
            pass
        yield
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- the loop
def train(config: TrainConfig | None = None, out_dir: PathLike | None = None, *, xp: Any = None,
          device: Any = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
          log: Callable[[str], Any] | None = print,
          callback: Callable[[int, dict, VideoNet], Any] | None = None) -> dict:
    """Train a :class:`VideoNet` on the sprite task (or, per ``config.task``, another network and task).

    Parameters
    ----------
    config : TrainConfig, optional
        The run (defaults: :class:`TrainConfig`).
    out_dir : str or Path, optional
        Where ``checkpoint.npz``, ``metrics.json`` and ``metrics.csv`` go (nothing is
        written when omitted). One run at a time: the folder is locked while a run
        writes there, and a second run into it is refused (where the system has ``flock``).
    xp : module, optional
        Array library for data and weights (numpy by default; ``cupy`` on a GPU).
    device : device, optional
        Device for data and weights (with ``xp``): a ``cupy.cuda.Device``; ``xp``'s default when None.
    resume : bool
        Continue from ``out_dir/checkpoint.npz``; its configuration must equal ``config``, but
        for ``epochs``: more epochs than the checkpoint's extend the run, on the learning-rate
        schedule it started with (the returned ``config`` has ``schedule_epochs`` set to it),
        so that the result equals, to the bit, the uninterrupted run of that ``config``; the
        checkpoint of a finished run is first copied to ``checkpoint-epochN.npz``. An
        ``out_dir`` without a checkpoint is an error (nothing to resume).
    overwrite : bool
        Start from scratch in an ``out_dir`` that holds a run. Nothing of the old run is
        deleted first: every check passes, the network, the optimiser, the schedule and the
        data are built, and the old checkpoint and metrics files are replaced (atomically)
        only when the new run writes its first epoch; a run that fails before that leaves
        the old one as it was. Without ``overwrite`` (or ``resume``) such an ``out_dir`` is
        refused, so that a finished run is never replaced by accident.
    progress : bool
        Show a tqdm bar per epoch.
    log : callable
        Receives one summary line per epoch (``print`` by default; ``None`` for silence).
    callback : callable, optional
        ``callback(epoch, row, model)`` after each epoch's checkpoint is written.

    Returns
    -------
    dict
        ``history`` (one dict per epoch, whose ``lr`` is the learning rate of the
        epoch's first step; the rows of ``metrics.json``), ``model`` (the network after
        the last epoch, the one in ``checkpoint.npz``, in eval mode: ready to predict),
        ``config`` (the validated :class:`TrainConfig`), ``val_accuracy`` (the last
        epoch's), ``seconds`` and ``clips_per_second`` (training throughput).

    Raises
    ------
    TypeError
        ``config`` not a :class:`TrainConfig`, ``out_dir`` not a path, ``log`` or ``callback`` not callable.
    ValueError
        A bad configuration; an empty ``out_dir``; a data set larger than this machine's memory; ``resume`` and
        ``overwrite`` together; ``out_dir`` holds a run and neither ``resume`` nor
        ``overwrite`` is given; ``out_dir`` cannot be written; another run is writing in ``out_dir``
        (these three are :class:`OutDirError`, a ValueError).
    CheckpointError
        ``resume`` without a checkpoint in ``out_dir``, or with one that is corrupted or
        from another configuration, or that holds more epochs than ``config.epochs``, or
        whose schedule is not ``config.schedule_epochs`` (when given).
    OSError
        The disk of ``out_dir`` is full (before the run, or at an epoch's checkpoint: the one of
        the epoch before stays complete, and ``resume=True`` continues from it once there is
        space); the error names the file that could not be written.
    """
    if config is not None and not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig (TrainConfig(**fields), or TrainConfig.from_dict(d)), "
                        f"got {type(config).__name__}")
    for name, value in (("resume", resume), ("overwrite", overwrite), ("progress", progress)):
        B.check_flag(name, value)  # a truthy "no" would resume, overwrite or show a bar
    for name, value in (("log", log), ("callback", callback)):  # checked now, not after the first epoch
        if value is not None and not callable(value):
            raise TypeError(f"{name} must be a callable or None, got {type(value).__name__}")
    B.library(xp)  # an xp that is no array library is refused before out_dir is touched
    if out_dir is not None:
        if isinstance(out_dir, bytes) or not isinstance(out_dir, (str, os.PathLike)):
            raise TypeError(f"out_dir must be a folder's path (a str or Path) or None, got {type(out_dir).__name__}")
        if not os.fspath(out_dir):  # Path("") is the current folder: an empty name is a mistake (--out '' is refused)
            raise ValueError("out_dir must name a folder for the run (or be None: nothing written), got ''")
    config = (config or TrainConfig()).validate()
    check_memory(config)
    if resume and out_dir is None:
        raise ValueError("resume=True needs out_dir (where the checkpoint is)")
    if resume and overwrite:
        raise ValueError("resume=True continues the run in out_dir and overwrite=True discards it: pass one of them")
    if out_dir is None:
        return _run(config, None, xp=xp, device=device, resume=resume, progress=progress, log=log,
                    callback=callback)
    _check_out_dir(out_dir, resume, overwrite)
    out_dir = _prepare_out_dir(out_dir)
    with _run_lock(out_dir):
        _check_out_dir(out_dir, resume, overwrite)  # again, locked: another run may have written since the first check
        return _run(config, out_dir, xp=xp, device=device, resume=resume, progress=progress, log=log,
                    callback=callback)


def _schedule_length(config):
    """The epochs whose steps ``config.milestones`` are fractions of: ``config.schedule_epochs``, else ``epochs``."""
    return config.epochs if config.schedule_epochs is None else config.schedule_epochs


#: The fields a resumed run may change: ``epochs`` (to extend or end a run), and ``schedule_epochs`` only
#: to restate the schedule the run has.
_RESUME_MAY_CHANGE = ("epochs", "schedule_epochs")


def _resumed_config(config, meta, path):
    """The configuration a run resumed from ``path`` (its ``meta``) goes on with, and the path of the finished
    run's copy to keep (None when the run was not finished or is not extended).

    Every field but ``epochs`` must equal the checkpoint's. ``epochs`` may change: the schedule stays
    the one the run started with (``schedule_epochs``, else its ``epochs``), so the run equals, to the bit,
    the uninterrupted run of the returned configuration. A ``schedule_epochs`` given must be that one.
    """
    saved = TrainConfig.from_dict(meta["config"])
    done = meta["epoch"]
    requested = config.as_dict()
    diffs = [f"{k}: checkpoint {v!r}, requested {requested[k]!r}" for k, v in saved.as_dict().items()
             if k not in _RESUME_MAY_CHANGE and requested[k] != v]
    if diffs:
        raise CheckpointError(f"checkpoint {path} is from a different configuration (" + "; ".join(diffs)
                              + "); resume with the options the run was started with (only epochs may change)")
    started = _schedule_length(saved)
    if config.schedule_epochs is not None and config.schedule_epochs != started:
        raise CheckpointError(f"checkpoint {path}: its {_epochs(done)} followed the learning-rate schedule of "
                              f"{_epochs(started)}, and a resumed run keeps it: leave schedule_epochs "
                              f"(--schedule-epochs) out or give {started}, not {config.schedule_epochs}; to train "
                              f"on the schedule of {config.schedule_epochs} epochs start a new run (another out_dir)")
    if config.epochs < done:
        raise CheckpointError(f"checkpoint {path} holds {_epochs(done)} already, more than epochs={config.epochs} "
                              f"(--epochs): give epochs >= {done} (more epochs extend the run)")
    resumed = dataclasses.replace(config, schedule_epochs=None if started == config.epochs else started)
    finished = done == saved.epochs
    kept = path.with_name(f"{path.stem}-epoch{done}{path.suffix}") if finished and config.epochs > done else None
    return resumed, kept


def _epochs(n):
    return f"{n} epoch{'' if n == 1 else 's'}"


def _keep_finished(path, kept):
    """Copy the checkpoint ``path`` of a finished run to ``kept`` (atomically) before the run is extended.

    An existing ``kept`` with the same bytes (an extension stopped before its first epoch) is left; one
    with other bytes is never replaced: OutDirError.
    """
    data = path.read_bytes()
    if kept.exists() or kept.is_symlink():
        if kept.is_file() and kept.read_bytes() == data:
            return
        raise OutDirError(f"{str(kept)!r} exists and is not the checkpoint of this finished run, which the "
                          f"extended run would keep there: move it away, or extend a copy of the folder")
    write_atomically(kept, lambda f: f.write(data))


def _run(config, out_dir, *, xp, device, resume, progress, log, callback):
    """The run of :func:`train`, its arguments checked (and ``out_dir`` locked, when given)."""
    # Everything that can refuse the run is built before anything is written: with overwrite=True the
    # old run's files are replaced only by the first epoch's checkpoint and metrics (atomic renames),
    # never deleted beforehand.
    model = build_model(config, xp, device)
    optimiser = _optimiser(config, model)
    steps_per_epoch = config.n_train // config.batch_size
    train_set, val_set = build_data(config, xp, device)
    data_xp = B.array_namespace(_inputs(train_set))
    history, first_epoch, kept = [], 0, None
    if resume:
        meta, model_state, opt_state = load_checkpoint(out_dir / CHECKPOINT)
        config, kept = _resumed_config(config, meta, out_dir / CHECKPOINT)
        try:
            model.load_state_dict(model_state)
            optimiser.load_state_dict(opt_state)
        except ValueError as err:
            raise CheckpointError(f"checkpoint {out_dir / CHECKPOINT} does not fit the network: {err}") from err
        history, first_epoch = meta["history"], meta["epoch"]
    schedule = StepSchedule(config.lr, _schedule_length(config) * steps_per_epoch, milestones=config.milestones,
                            warmup=config.warmup)
    if resume:
        with _signals_held():  # metrics written by a run stopped between its two writes catch up
            if kept is not None:  # the finished run being extended stays whole beside the new one
                _keep_finished(out_dir / CHECKPOINT, kept)
            _write_metrics(out_dir, history)
        if log:
            log(f"resumed from {out_dir / CHECKPOINT} after epoch {first_epoch}")
            if config.schedule_epochs is not None and config.epochs > first_epoch:
                log(f"the learning-rate schedule stays that of {_epochs(config.schedule_epochs)} "
                    f"(milestones at steps {', '.join(map(str, schedule.milestone_steps)) or 'none'}): epochs "
                    f"{first_epoch + 1} to {config.epochs} start at lr {schedule(first_epoch * steps_per_epoch):.12g}"
                    + (f"; the finished run is kept as {kept.name}" if kept is not None else ""))

    bar_factory = None
    if progress:
        from tqdm.auto import tqdm
        bar_factory = tqdm
    train_seconds = sum(row["seconds"] for row in history)
    for epoch in range(first_epoch, config.epochs):
        model.train()
        order = np.random.default_rng([config.seed, epoch]).permutation(config.n_train)
        steps = range(steps_per_epoch)
        bar = bar_factory(steps, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False) if bar_factory else steps
        t0 = time.perf_counter()
        loss_sum, correct = 0.0, 0
        for step in bar:
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            x, y = _take(data_xp, _inputs(train_set), idx), _take(data_xp, train_set.labels, idx)
            logits = model.forward(x, dropout_seed=_step_seed(config.seed, epoch, step))
            loss, cache = F.softmax_cross_entropy_forward(logits, y)
            model.backward(F.softmax_cross_entropy_backward(1.0, cache), input_grad=False)
            optimiser.step(lr=schedule(epoch * steps_per_epoch + step))
            loss_value = float(loss)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the training loss became {loss_value} at epoch {epoch + 1}, "
                                         f"step {step}; lower lr (now {config.lr})")
            loss_sum += loss_value
            correct += _correct(data_xp, logits, y)
            if bar_factory:
                bar.set_postfix(loss=f"{loss_sum / (step + 1):.3f}")
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        val_loss, val_acc = evaluate(model, val_set)
        seen = steps_per_epoch * config.batch_size
        # the epoch's learning rate: that of its first step, without the float noise of base * 0.1 ** k
        # (1.0000000000000003e-05), so that it reads as the banner and the configuration state it
        row = {"epoch": epoch + 1, "lr": float(f"{schedule(epoch * steps_per_epoch):.12g}"),
               "train_loss": loss_sum / steps_per_epoch, "train_accuracy": correct / seen,
               "val_loss": val_loss, "val_accuracy": val_acc, "seconds": seconds, "clips_per_second": seen / seconds}
        history.append(row)
        if out_dir is not None:
            with _signals_held():
                save_checkpoint(out_dir / CHECKPOINT, config=config, model=model, optimiser=optimiser,
                                epoch=epoch + 1, history=history)
                _write_metrics(out_dir, history)
        if log:
            log(f"epoch {epoch + 1:2d}/{config.epochs}  train loss {row['train_loss']:.3f} "
                f"acc {row['train_accuracy']:.3f}  val loss {val_loss:.3f} acc {val_acc:.3f}  "
                f"{seconds:.1f} s ({row['clips_per_second']:.0f} clips/s)")
        if callback is not None:
            callback(epoch + 1, row, model)
    seen = len(history) * steps_per_epoch * config.batch_size
    model.eval()  # as evaluate leaves it; a resumed finished run never reached evaluate and was in training mode
    return {"history": history, "model": model, "config": config,
            "val_accuracy": history[-1]["val_accuracy"] if history else float("nan"),
            "seconds": train_seconds, "clips_per_second": seen / train_seconds if train_seconds else float("nan")}
