"""Table 2 of Wang et al. (2018) in miniature: ablations of the non-local block on the sprite task.

Every row trains a network from scratch with ``nlref.train`` (hand-written
backprop, NumPy) for each seed and reports the validation accuracy as
mean +- std over the seeds:

  2a  baseline C2D vs one block of each pairwise function (in res3)
  2b  the stage of a single embedded-Gaussian block: res2, res3, res4
  2c  1, 2 and 4 blocks
  2d  space-only, time-only and space-time attention
  2e  C2D, I3D, NL C2D, NL I3D
  optimiser  Adam (nlref's default) vs SGD with momentum (the paper's)

Usage::

    python benchmarks/ablation.py                     # 3 seeds, nlref train's default schedule
    python benchmarks/ablation.py --seeds 0 --only 2a # a quick look
    python benchmarks/ablation.py --n-train 1500 --epochs 5 --n-val 400   # a shorter schedule
    python benchmarks/ablation.py --json results.json # also keep the raw numbers (after every row)

Every run uses ``nlref train``'s default schedule (4000 training clips, 1000
validation clips, 10 epochs), so the "NL C2D, 1 block" row is the default run
with three seeds; the 15 distinct configurations x 3 seeds take about an hour on
2 cores. Results and their discussion: ``docs/training.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")  # before NumPy loads OpenBLAS: see bench_train.py

from pathlib import Path  # noqa: E402

from nlref._files import folder_problem, write_atomically  # noqa: E402
from nlref.backend import retain_freed_memory  # noqa: E402
from nlref.train import TrainConfig, train  # noqa: E402

_DEFAULT = TrainConfig()
SCHEDULE = dict(n_train=_DEFAULT.n_train, n_val=_DEFAULT.n_val, epochs=_DEFAULT.epochs)

ROWS = {
    "2a": [("C2D baseline", dict(nonlocal_blocks=0)),
           ("Gaussian", dict(mode="gaussian")),
           ("Gaussian, embed", dict(mode="embedded_gaussian")),
           ("dot-product", dict(mode="dot_product")),
           ("concatenation", dict(mode="concatenation"))],
    "2b": [("res2", dict(stage="res2")),
           ("res3", dict(stage="res3")),
           ("res4", dict(stage="res4"))],
    "2c": [("1-block", dict(nonlocal_blocks=1)),
           ("2-block", dict(nonlocal_blocks=2)),
           ("4-block", dict(nonlocal_blocks=4))],
    "2d": [("space-only", dict(extent="space")),
           ("time-only", dict(extent="time")),
           ("spacetime", dict(extent="spacetime"))],
    "2e": [("C2D", dict(nonlocal_blocks=0)),
           ("I3D", dict(model="i3d", nonlocal_blocks=0)),
           ("NL C2D, 1 block", dict(nonlocal_blocks=1)),
           ("NL I3D, 1 block", dict(model="i3d", nonlocal_blocks=1))],
    "optimiser": [("NL C2D, Adam lr 1e-3 (nlref default)", dict()),
                  ("NL C2D, SGD lr 0.1 (the paper's optimiser)", dict(optimizer="sgd", lr=0.1)),
                  ("NL C2D, SGD lr 0.01", dict(optimizer="sgd", lr=0.01))],
}


def run(overrides, seed, schedule):
    config = TrainConfig(**{**schedule, **overrides, "seed": seed})
    t0 = time.perf_counter()
    result = train(config, None, progress=False, log=None)
    return {"val_accuracy": result["val_accuracy"], "seconds": time.perf_counter() - t0,
            "clips_per_second": result["clips_per_second"], "params": result["model"].num_params()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=sorted(ROWS), help="tables to run (default: all)")
    parser.add_argument("--rows", nargs="+", metavar="LABEL",
                        choices=sorted({label for rows in ROWS.values() for label, _ in rows}),
                        help="rows to run, by label, within the tables chosen (default: all)")
    parser.add_argument("--n-train", type=int, default=SCHEDULE["n_train"])
    parser.add_argument("--epochs", type=int, default=SCHEDULE["epochs"])
    parser.add_argument("--n-val", type=int, default=SCHEDULE["n_val"])
    parser.add_argument("--json", help="write the raw results to this file, rewritten (atomically) after every row, "
                                       "so that an interrupted ablation keeps the rows it finished")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    args = parser.parse_args()
    schedule = {**SCHEDULE, "n_train": args.n_train, "epochs": args.epochs, "n_val": args.n_val}
    check_plan(parser, args, schedule)  # every run's configuration and the --json folder, before an hour of runs
    retain_freed_memory()  # as nlref train does
    print(f"# nlref ablation: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"schedule {schedule}, seeds {args.seeds}")
    cache, results, saved = {}, {}, []
    try:
        ablate(args, schedule, cache, results, saved)
    except KeyboardInterrupt:
        rows = saved[-1] if saved else 0
        kept = f"; the {rows} rows finished are in {args.json}" if args.json and rows else ""
        print(f"ablation.py: stopped by Ctrl-C{kept}", file=sys.stderr)
        raise SystemExit(130) from None
    save(args, schedule, results, saved, complete=True)


def save(args, schedule, results, saved, *, complete):
    """The raw results so far into ``--json`` (whole or not at all: an interrupted write keeps the file that was
    there); ``complete`` is False until the last row is in."""
    if args.json:
        text = json.dumps({"schedule": schedule, "seeds": args.seeds, "complete": complete, "tables": results},
                          indent=1)
        write_atomically(Path(args.json), lambda f: f.write(text.encode()))
        saved.append(sum(len(rows) for rows in results.values()))


def ablate(args, schedule, cache, results, saved):
    """Train and print every row chosen; each row's results are saved (``--json``) as soon as they are in."""
    for table in args.only or sorted(ROWS):
        print(f"\n## Table {table}\n\n| model | val accuracy (%) | params | s / run |\n|---|---|---|---|")
        for label, overrides in ROWS[table]:
            if args.rows and label not in args.rows:
                continue
            key = json.dumps(TrainConfig(**{**schedule, **overrides}).as_dict(), sort_keys=True)
            if key not in cache:                      # rows shared between tables are trained once
                cache[key] = [run(overrides, seed, schedule) for seed in args.seeds]
            runs = cache[key]
            accs = [100 * r["val_accuracy"] for r in runs]
            spread = statistics.stdev(accs) if len(accs) > 1 else 0.0
            seconds = statistics.median(r["seconds"] for r in runs)
            results.setdefault(table, []).append({"label": label, "overrides": overrides, "runs": runs})
            save(args, schedule, results, saved, complete=False)  # before the row's line: it says the row is in
            print(f"| {label} | {statistics.mean(accs):.1f} +- {spread:.1f} | {runs[0]['params']:,} | "
                  f"{seconds:.0f} |", flush=True)


def check_plan(parser, args, schedule):
    """Refuse, before any run, a row selection that runs nothing, a configuration ``train`` would refuse
    (``--seeds -1`` failed after the first seed's runs), and a ``--json`` that cannot be written there."""
    planned = [(label, overrides) for table in args.only or sorted(ROWS) for label, overrides in ROWS[table]
               if not args.rows or label in args.rows]
    repeated = sorted({seed for seed in args.seeds if args.seeds.count(seed) > 1})
    if repeated:  # a seed run twice gives the same accuracy twice: a mean +- std over fewer seeds than it says
        parser.error(f"--seeds: {' '.join(map(str, repeated))} given more than once; give each seed once")
    if not planned:
        parser.error(f"--rows {' '.join(args.rows)}: no such row in the tables chosen ({' '.join(args.only or sorted(ROWS))})")
    for label, overrides in planned:
        for seed in args.seeds:
            try:
                TrainConfig(**{**schedule, **overrides, "seed": seed}).validate()
            except (TypeError, ValueError) as err:
                parser.error(f"row {label!r}, seed {seed}: {err}")
    if args.json:
        folder = Path(args.json).resolve().parent
        if Path(args.json).is_dir() or not folder.is_dir() or not os.access(folder, os.W_OK):
            parser.error(f"--json {args.json!r}: not a file that can be written in an existing folder")
        if (Path(args.json).exists() or Path(args.json).is_symlink()) and not getattr(args, "overwrite", False):
            parser.error(f"--json {args.json!r} already exists: add --overwrite to replace it, or choose another name")
        try:  # os.access passes a full disk: the results of an hour would be lost at the end
            problem = folder_problem(folder)
        except OSError as err:
            problem = str(err)
        if problem:
            parser.error(f"--json {args.json!r}: {problem}")


if __name__ == "__main__":
    main()
