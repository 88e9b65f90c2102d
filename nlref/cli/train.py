"""``nlref train``: the options map one to one onto :class:`nlref.train.TrainConfig`."""

from __future__ import annotations

import sys
from pathlib import Path

from nlref.cli._common import CommandError, _count, _stamp, flag_names, path_arg, say, writable_folder

#: The flags of ``nlref train`` in the order added, by destination: (flag, True for an on/off flag).
_FLAGS = {}

#: TrainConfig's field names, as the flags the user types (for the messages of TrainConfig.validate).
_FIELD_FLAGS = {"nonlocal_blocks": "--nonlocal", "batch_size": "--batch-size", "n_train": "--n-train",
                "n_val": "--n-val", "embed_dim": "--embed-dim", "num_heads": "--heads", "mlp_dim": "--mlp-dim",
                "sub_sample": "--no-sub-sample", "bn_layer": "--no-bn", "schedule_epochs": "--schedule-epochs"}
_FIELD_FLAGS.update({name: f"--{name}" for name in ("task", "margin", "model", "stage", "mode", "extent", "scale",
                                                      "pool", "dropout", "epochs", "optimizer", "lr", "seed",
                                                      "relation", "kinds", "size", "dtype", "depth")})


def _train_command(args):
    """The ``nlref train`` command line that continues the run of ``args`` (``--resume``, no ``--overwrite``)."""
    import shlex

    from nlref.cli import build_parser

    defaults = vars(build_parser().parse_args(["train"]))
    words = ["nlref", "train"]
    for dest, (flag, switch) in _FLAGS.items():
        value = getattr(args, dest)
        if switch:
            words += [flag] if value else []
        elif value != defaults[dest] or dest == "out":
            words += [flag, str(value)]
    return shlex.join(words + ["--resume"])


def _train_interrupted(args, signame):
    """One line: the epoch whose checkpoint is intact, and the command that continues from it."""
    from nlref.train import CHECKPOINT, CheckpointError, load_checkpoint

    path = Path(args.out) / CHECKPOINT
    try:
        epoch = load_checkpoint(path)[0]["epoch"] if path.is_file() else 0
    except CheckpointError:
        epoch = None
    previous = getattr(args, "previous_checkpoint", None)
    if previous is not None and _stamp(path) == previous:
        return (f"nlref train: stopped by {signame} before the new run's first epoch was complete; nothing of it "
                f"was saved, and {args.out} still holds the previous run (--overwrite replaces it only when the "
                f"first epoch is written): run the same command again to start over")
    if epoch is None:
        return f"nlref train: stopped by {signame}; the checkpoint {path} cannot be read"
    if epoch == 0:
        return (f"nlref train: stopped by {signame} before the first epoch was complete; nothing was saved: "
                f"run the same command again to start")
    return (f"nlref train: stopped by {signame} after epoch {epoch} of {args.epochs} (checkpoint {path} is "
            f"complete); to continue: {_train_command(args)}")


def _train_failed(args):
    """What a run that failed on the machine (a full disk) left: the epoch whose checkpoint is intact, and how to go on."""
    from nlref.train import CHECKPOINT, CheckpointError, load_checkpoint

    path = Path(args.out) / CHECKPOINT
    previous = getattr(args, "previous_checkpoint", None)
    if previous is not None and _stamp(path) == previous:
        return f"no epoch of the new run was saved, and {args.out} still holds the previous run"
    try:
        epoch = load_checkpoint(path)[0]["epoch"] if path.is_file() else 0
    except CheckpointError:
        return f"the checkpoint {path} cannot be read"
    if epoch == 0:
        return "no epoch was saved"
    return f"the checkpoint {path} of epoch {epoch} of {args.epochs} is complete; to continue: {_train_command(args)}"


#: Options that apply to one task or network only, by destination: (flag, TrainConfig field). Their default is
#: None on the command line, so that one the user typed is told from one left out.
_SPECIFIC = {"stage": ("--stage", "stage"), "extent": ("--extent", "extent"), "margin": ("--margin", "margin"),
             "nonlocal_blocks": ("--nonlocal", "nonlocal_blocks"), "mode": ("--mode", "mode"), "pool": ("--pool", "pool"),
             "embed_dim": ("--embed-dim", "embed_dim"), "depth": ("--depth", "depth"),
             "heads": ("--heads", "num_heads"), "mlp_dim": ("--mlp-dim", "mlp_dim")}


#: Options whose default depends on --task (nlref.train.TASK_DEFAULTS); None on the command line when left out.
_PER_TASK = ("size", "kinds", "dropout")


def _refuse_ignored(args):
    """An option typed for another task or network would be ignored silently: refuse it, saying where it applies."""
    def typed(*names):
        return [_SPECIFIC[name][0] for name in names if getattr(args, name) is not None]

    transformer = typed("embed_dim", "depth", "heads", "mlp_dim")
    if args.task == "pairs2d" and typed("stage", "extent") + transformer:
        flags = typed("stage", "extent") + transformer
        raise CommandError(f"{', '.join(flags)}: not used by --task pairs2d (a 2-D residual network); they apply to "
                           "the sprite clips (--task sprites)")
    if args.task != "pairs2d" and typed("margin"):
        raise CommandError("--margin applies only to --task pairs2d (the two-shape images)")
    if args.model != "transformer" and transformer:
        raise CommandError(f"{', '.join(transformer)}: not used by --model {args.model}; they apply only to --model "
                           "transformer")
    if args.model == "transformer":
        blocks = typed("nonlocal_blocks", "stage", "mode", "extent", "pool") + [flag for flag, on in (("--no-sub-sample", args.no_sub_sample),
                                                                   ("--no-bn", args.no_bn), ("--scale", args.scale))
                                             if on]
        if blocks:
            raise CommandError(f"{', '.join(blocks)}: not used by --model transformer (it has no non-local blocks); "
                               "they apply to the non-local blocks of --model c2d, i3d and i3d_3x1x1")


def run_train(args):
    """``nlref train``: the options map one to one onto :class:`nlref.train.TrainConfig`."""
    from nlref.backend import retain_freed_memory
    from nlref.train import (CHECKPOINT, RUN_FILES, TASK_DEFAULTS, CheckpointError, OutDirError, TrainConfig,
                             check_memory, load_checkpoint, train)

    xp = None
    if args.backend == "cupy":
        try:
            import cupy as xp
        except ImportError as err:
            raise CommandError(f"--backend cupy needs CuPy with a CUDA device ({err})") from None
    _refuse_ignored(args)
    d = TrainConfig()
    given = {name: getattr(args, name) for name in (*_SPECIFIC, *_PER_TASK)}
    left_out = {**{_SPECIFIC[name][1]: getattr(d, _SPECIFIC[name][1]) for name in _SPECIFIC},
                **{name: getattr(d, name) for name in _PER_TASK}, **TASK_DEFAULTS[args.task]}
    given = {name: left_out[_SPECIFIC[name][1] if name in _SPECIFIC else name] if value is None else value
             for name, value in given.items()}
    fields = {"task": args.task, "margin": given["margin"], "model": args.model,
              "nonlocal_blocks": given["nonlocal_blocks"], "stage": given["stage"], "mode": given["mode"],
              "extent": given["extent"], "sub_sample": not args.no_sub_sample, "bn_layer": not args.no_bn,
              "scale": args.scale, "pool": given["pool"], "dropout": given["dropout"],
              "epochs": args.epochs, "schedule_epochs": args.schedule_epochs, "batch_size": args.batch_size,
              "optimizer": args.optimizer,
              "n_train": args.n_train, "n_val": args.n_val, "seed": args.seed, "relation": args.relation,
              "kinds": given["kinds"], "size": given["size"], "dtype": args.dtype, "embed_dim": given["embed_dim"],
              "depth": given["depth"], "num_heads": given["heads"], "mlp_dim": given["mlp_dim"]}
    if args.lr is not None:
        fields["lr"] = args.lr
    elif args.optimizer == "sgd":
        fields["lr"] = 0.1
    try:
        config = TrainConfig(**fields).validate()
        check_memory(config)
    except (ValueError, TypeError) as err:  # the values the user typed: the message names their flags
        raise CommandError(flag_names(str(err), _FIELD_FLAGS)) from None
    out = Path(args.out)
    if not args.out:
        raise CommandError("--out must name a folder for the run; got ''")
    if out.exists() and not out.is_dir():
        raise CommandError(f"--out {args.out!r} exists and is not a folder; choose a folder for the run")
    existing = [name for name in RUN_FILES if (out / name).exists()]
    if args.resume and not (out / CHECKPOINT).is_file():
        raise CommandError(f"--resume: there is no run to resume in {str(out)!r} (no {CHECKPOINT} there); "
                           "start a new run without --resume")
    if existing and not (args.resume or args.overwrite):
        raise CommandError(f"--out {str(out)!r} already holds a training run ({', '.join(existing)}): add --resume "
                           "to continue it, --overwrite to start it over (replacing those files), or choose another "
                           "--out")
    writable_folder(out, "--out", args.out)
    # the checkpoint --overwrite will replace when the new run's first epoch is written: an
    # interruption before that leaves this previous run, which the message must not offer to resume
    args.previous_checkpoint = _stamp(out / CHECKPOINT) if args.overwrite else None
    retain_freed_memory()  # this process is ours: reuse freed memory rather than page-fault it back in
    steps = " and ".join(f"{m:.0%}" for m in config.milestones)
    data = (f"two-shape images of {config.size}x{config.size} (margin {config.margin})" if config.task == "pairs2d"
            else f"clips of {config.frames}x{config.size}x{config.size}")
    if config.task == "pairs2d":
        network = f"2-D residual network with {_count(config.nonlocal_blocks, 'non-local block')} ({config.mode})"
    elif config.model != "transformer":
        network = (f"{config.model} with {_count(config.nonlocal_blocks, 'non-local block')} ({config.mode}, "
                   f"{config.extent})")
    else:
        network = (f"transformer ({_count(config.depth, 'block')} of {config.embed_dim} channels, "
                   f"{_count(config.num_heads, 'head')})")
    schedule = config.schedule_epochs
    if args.resume and schedule is None:  # the run's own schedule, which an extended run keeps (train checks the rest)
        try:
            saved = TrainConfig.from_dict(load_checkpoint(out / CHECKPOINT)[0]["config"])
            schedule = saved.epochs if saved.schedule_epochs is None else saved.schedule_epochs
        except (CheckpointError, ValueError, TypeError):
            pass
    of = "the steps" if schedule in (None, config.epochs) else f"the steps of {_count(schedule, 'epoch')}"
    say(f"nlref train: {network}, {_count(config.epochs, 'epoch')}, {config.optimizer} lr "
        f"{config.lr:.12g} (x0.1 after {steps} of {of}), {config.n_train} {data} -> {args.out}")
    try:
        result = train(config, args.out, xp=xp, resume=args.resume, overwrite=args.overwrite,
                       progress=not args.no_progress and sys.stderr.isatty(), log=say)
    except CheckpointError as err:  # the checkpoint in --out does not fit the options given
        raise CommandError(f"--resume: {err}") from None
    except OutDirError as err:  # --out cannot be written, or another run is writing there (checked before any work)
        raise CommandError(f"--out: {err}") from None
    say(f"val accuracy {result['val_accuracy']:.3f} after {_count(len(result['history']), 'epoch')}; "
        f"{result['seconds']:.0f} s of training at {result['clips_per_second']:.0f} clips/s")
    return result


_TRAIN = """\
--task pairs2d trains a 2-D residual network (--model c2d, width and depth the first
stage's) on the two-shape images of nlref.data.pairs2d instead of the sprite clips,
with the documented run's --size, --kinds and --dropout unless given;
--stage, --extent and the transformer's options do not apply to it.
Writes OUT/checkpoint.npz, metrics.json and metrics.csv after every epoch (atomically).
An OUT that already holds a run is refused unless --resume (continue it) or --overwrite
(start it over). Ctrl-C or SIGTERM stops the run cleanly: the last complete
checkpoint stays valid, and the command that continues it is printed."""


def add_parser(sub, fmt):
    """The ``nlref train`` subcommand."""
    from nlref.data.sprites import RELATIONS
    from nlref.nn.models import EXTENTS, MODELS, STAGES
    from nlref.nn.nonlocal_op import MODES
    from nlref.train import OPTIMISERS, TASK_DEFAULTS, TASKS, TrainConfig

    d = TrainConfig()

    def per_task(name):
        others = "".join(f"; {values[name]:g} with --task {task}" for task, values in TASK_DEFAULTS.items()
                         if name in values)
        return f" (default: {getattr(d, name):g}{others})"

    tr = sub.add_parser("train", help="train a small (non-local) network on the sprite clips or the two-shape images",
                        description=_TRAIN, formatter_class=fmt)
    dflt = " (default: %(default)s)"

    def opt(*flags, **kwargs):
        action = tr.add_argument(*flags, **kwargs)
        _FLAGS[action.dest] = (flags[0], action.nargs == 0)
        return action

    opt("--task", choices=TASKS, default=d.task,
                    help="the two-sprite clips, or the two-shape images (a 2-D network)" + dflt)
    opt("--model", choices=MODELS, default=d.model,
                    help="network: 2-D or inflated 3-D convs, or a space-time transformer" + dflt)
    opt("--embed-dim", type=int, default=None, help=f"transformer: token channels (default: {d.embed_dim})")
    opt("--depth", type=int, default=None, help=f"transformer: blocks (default: {d.depth})")
    opt("--heads", type=int, default=None, help=f"transformer: attention heads (default: {d.num_heads})")
    opt("--mlp-dim", type=int, default=None, help=f"transformer: MLP width (default: {d.mlp_dim})")
    opt("--nonlocal", dest="nonlocal_blocks", type=int, default=None,
                    help=f"number of non-local blocks, 0 for the baseline (default: {d.nonlocal_blocks})")
    opt("--stage", choices=STAGES, default=None, help=f"stage of a single block (default: {d.stage})")
    opt("--mode", choices=MODES, default=None, help=f"pairwise function of the blocks (default: {d.mode})")
    opt("--extent", choices=EXTENTS, default=None, help=f"what a block attends over (default: {d.extent})")
    opt("--no-sub-sample", action="store_true",
                    help="no max-pooling of the keys and values (default: off, they are pooled)")
    opt("--no-bn", action="store_true",
                    help="no BN after W_z, W_z starts at 0 instead (default: off, BN with gamma 0)")
    opt("--scale", action="store_true", help="1/sqrt(d) on the softmax logits (default: off)")
    opt("--pool", choices=("after", "before"), default=None,
                    help=f"max-pool after phi and g, or x before them (default: {d.pool})")
    opt("--dropout", type=float, default=None,
                    help="dropout probability before the classifier" + per_task("dropout"))
    opt("--epochs", type=int, default=d.epochs, help="passes over the training clips" + dflt)
    opt("--schedule-epochs", type=int, default=None,
                    help="epochs whose steps the milestones (60%%, 85%%) are fractions of (default: --epochs; with "
                         "--resume, the run's own, which it keeps when a larger --epochs extends it)")
    opt("--batch-size", type=int, default=d.batch_size, help="clips per step" + dflt)
    opt("--optimizer", choices=OPTIMISERS, default=d.optimizer, help="optimiser" + dflt)
    opt("--lr", type=float,
                    help=f"base learning rate, x0.1 after 60%% and 85%% of the steps (default: {d.lr:g} for adam, "
                         "0.1 for sgd)")
    opt("--n-train", type=int, default=d.n_train, help="training clips" + dflt)
    opt("--n-val", type=int, default=d.n_val, help="validation clips" + dflt)
    opt("--relation", choices=RELATIONS, default=d.relation,
                    help="what the two sprites are compared on" + dflt)
    opt("--kinds", type=int, default=None, help="kinds of sprite or shape (brightness levels)" + per_task("kinds"))
    opt("--size", type=int, default=None, help="frame height and width" + per_task("size"))
    opt("--margin", type=int, default=None,
                    help=f"pairs2d: pixels each shape keeps from the centre lines (default: {d.margin})")
    opt("--dtype", choices=("float32", "float64"), default=d.dtype, help="floating-point type" + dflt)
    opt("--seed", type=int, default=d.seed, help="seed of the data, weights and shuffles" + dflt)
    opt("--backend", choices=("numpy", "cupy"), default="numpy", help="array library" + dflt)
    opt("--out", default="nlref-train", type=path_arg, help="folder for checkpoint and metrics" + dflt)
    again = tr.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in OUT from its checkpoint (default: off)")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in an OUT that holds a run, replacing its checkpoint and metrics "
                            "when the first epoch is written (default: off)")
    opt("--no-progress", action="store_true",
                    help="no progress bar (default: a bar when stderr is a terminal, none otherwise)")
    return tr
