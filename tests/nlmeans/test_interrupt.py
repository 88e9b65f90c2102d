"""Ctrl-C stops NL-means' offset loop within one short step (nlref.nlmeans._pool).

Leaving a thread pool's block waits for every task it was given, so a
KeyboardInterrupt used to come out only when the running tiles were done: for a
48x48 image with a 401-wide search window (now refused: more offsets than 95 x 95), 14
to 18 s after the signal (the Numba engine gives each tile all its offsets in one
compiled call). Each case here runs in a child process (a signal must not reach
pytest), on a 256x256 image with that 501-wide window, which sends SIGINT to its own
main thread, from another thread, 20 ms after the first step starts, and counts the
offsets the engine processes after that. Counted, not timed: the
old code went on to the end of every started tile (Numba) or part (NumPy) of the
offsets, and the case of one worker on the Numba engine to the end of the tile
its compiled call was given.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = str(Path(__file__).resolve().parents[2])

_CHILD = r"""
import json, os, signal, sys, threading
import numpy as np
import nlref
from nlref.nlmeans import fast, fast_numba

engine, workers, aggregation = sys.argv[1], int(sys.argv[2]), sys.argv[3]
os.environ[fast.ENGINE_VARIABLE] = engine
image = np.random.default_rng(0).random((256, 256)).astype(np.float32)  # a search window of 501 needs >= 251
# every kernel compiled or loaded from Numba's cache before the signal, which that Python code could swallow
nlref.nl_means(image[:20, :20], sigma=0.1, h=0.1, workers=workers, aggregation=aggregation)
lock = threading.Lock()
seen = {"processed": 0, "started": False, "at_signal": None}

def signal_main():
    with lock:
        seen["at_signal"] = seen["processed"]
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

def starting():  # SIGINT to the main thread 20 ms after the first step starts, from another thread
    with lock:
        if not seen["started"]:
            seen["started"] = True
            threading.Timer(0.02, signal_main).start()

def processed(count):
    with lock:
        seen["processed"] += count

if engine == "numba":  # one call of a kernel: a run of offsets over one tile
    def counted(kernel):
        def call(rows, lo, hi, deltas, *rest):
            starting()
            try:
                kernel(rows, lo, hi, deltas, *rest)
            finally:  # in the caller's thread, the KeyboardInterrupt is raised as the call returns
                processed(len(deltas))
        return call
    fast_numba._sums_tile = counted(fast_numba._sums_tile)
    fast_numba._patch_tile = counted(fast_numba._patch_tile)
else:  # one batch of offsets of a part, all of them whole-image array steps
    batches = fast._batches
    def counted_batches(deltas, batch):
        for d0, count in batches(deltas, batch):
            starting()
            yield d0, count  # resumed when the batch is done
            processed(count)
    fast._batches = counted_batches
search = 501
total = (search * search - 1) // 2  # offsets per pass, per tile for the Numba engine
try:
    nlref.nl_means(image, sigma=0.1, h=0.1, search_size=search, workers=workers, aggregation=aggregation)
    outcome = "finished"
except KeyboardInterrupt:
    outcome = "interrupted"
for thread in threading.enumerate():  # a thread still running would add its offsets later: wait for it
    if thread is not threading.main_thread():
        thread.join()
print(json.dumps(dict(seen, outcome=outcome, total=total)))
"""

ENGINES = ["numpy", pytest.param("numba", marks=pytest.mark.skipif(
    importlib.util.find_spec("numba") is None, reason="Numba is not installed (nlref[fast])"))]


@pytest.mark.parametrize("workers, aggregation", [(2, "pixel"), (2, "patch"), (1, "pixel")])
@pytest.mark.parametrize("engine", ENGINES)
def test_ctrl_c_stops_the_offset_loop_within_one_step(engine, workers, aggregation):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _CHILD, engine, str(workers), aggregation],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["outcome"] == "interrupted" and seen["at_signal"] is not None, seen
    after = seen["processed"] - seen["at_signal"]
    # The old code went on to the end of every started tile (Numba: all 125,500 offsets of the pass) or part (NumPy:
    # 1/24 of them each, so about 2/24 on two threads). Now each thread finishes the step it is in and reads the stop
    # before the next; on two busy cores the main thread may wait tens of ms for a core before it sets the stop, so
    # up to about a thousand offsets.
    assert after < seen["total"] // 40, seen
