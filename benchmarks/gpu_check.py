"""The one script a GPU machine runs: nlref's suite on CuPy, CuPy against NumPy, and the GPU benchmarks.

    python benchmarks/gpu_check.py OUT_DIR                 # on the GPU machine (at most 8 minutes)
    python benchmarks/gpu_check.py OUT_DIR --dry-run       # here, on the CPU (under 5 minutes)
    python benchmarks/gpu_check.py OUT_DIR --dry-run --size tiny   # seconds: what the test suite runs

It first lists the packages it needs and which are missing, with the commands that
bring their wheels to a machine without a package index, and stops (exit status 2)
when one it cannot do without is missing. Then, each part under its own time limit
(a part that runs out is cut off, its remaining rows say so, and the next part starts):

1. ``tests``: pytest on the ``gpu``-marked tests (the backend fixture's CuPy cases and
   the CuPy Dask tests), in a subprocess; its output goes to ``OUT_DIR/pytest.txt``.
2. ``compare``: every public function (NL-means' methods and aggregations, the noise
   estimate, the functional layers, the non-local operation, ``NonLocalBlock`` forward
   and backward, the networks' forward) on the same host inputs, once with NumPy and
   once on the target; the largest difference relative to the NumPy result's largest
   magnitude must stay below 1e-10 (float64) or 1e-5 (float32), ten times that for batch
   norm, the 3-D convolution and the networks (longer sums).
3. ``nlmeans``: 1024 x 1024 float32, 7x7 patch, 21x21 search: nlref on the target
   against scikit-image's fast mode on the host CPU and against nlref on NumPy.
4. ``block``: forward + backward, float32, against PyTorch autograd with the same
   weights (N = 8 x 56 x 56 in the chunked form first, then ``bench_block``'s sizes and modes).
5. ``train``: training steps of the default network against PyTorch (``bench_train``).

Everything lands in ``OUT_DIR/gpu_check.md`` (one Markdown table, then the pytest
summary), rewritten after every row, so that a run cut short still leaves its rows.

``--dry-run`` runs the same parts with the target array library array-api-strict, its
arrays placed on a device other than the CPU (``array_api_strict.Device("device1")``,
which refuses every implicit move to NumPy, as CuPy does), the benchmarks' target on
NumPy and PyTorch on the CPU, and pytest on the backend fixture's ``strict-device1``
cases instead of the ``gpu`` ones.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

#: (import name, pip name, what needs it, required). A required package missing stops the script.
PACKAGES = (
    ("numpy", "numpy", "everything", True),
    ("array_api_compat", "array-api-compat", "nlref itself", True),
    ("pytest", "pytest", "the tests part", True),
    ("hypothesis", "hypothesis", "the tests part (property tests)", True),
    ("array_api_strict", "array-api-strict", "the tests part (fixture) and the dry run", True),
    ("nbformat", "nbformat", "the tests part (the course's tests read notebooks when collected)", True),
    ("torch", "torch", "the block and training benchmarks (PyTorch peer)", False),
    ("skimage", "scikit-image", "the NL-means benchmark (scikit-image peer)", False),
)

#: Seconds per part; the sum stays under the 8 minutes the GPU machine gives (and 5 for the dry run).
# On the GPU, CuPy compiles each new kernel once (NVRTC, cached on disk): the tests part fills the
# cache for most of what the comparisons run, but a fresh machine pays for it there.
BUDGETS = {"gpu": {"tests": 150, "compare": 100, "nlmeans": 70, "block": 90, "train": 40},
           "dry": {"tests": 90, "compare": 45, "nlmeans": 50, "block": 50, "train": 25}}
PARTS = tuple(BUDGETS["gpu"])
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}


# --------------------------------------------------------------------------- packages
def missing_packages(need_cupy):
    """(missing required, missing optional, found {name: version}): import names as pip names."""
    found, required, optional = {}, [], []
    wanted = list(PACKAGES)
    if need_cupy:
        wanted.insert(0, ("cupy", "cupy-cuda13x", "the target (CuPy on the GPU)", True))
    for module, pip_name, _, must in wanted:
        try:
            found[pip_name] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception:  # an ImportError, or a broken install (a CuPy without its CUDA libraries)
            (required if must else optional).append(pip_name)
    return required, optional, found


def wheel_advice(names):
    """The two commands that carry wheels to a machine without a package index."""
    names = " ".join(names)
    py = f"{sys.version_info.major}{sys.version_info.minor}"
    return (f"  on a machine with an index:  pip download --only-binary=:all: --platform manylinux2014_x86_64 "
            f"--python-version {py} -d wheels {names}\n"
            f"  copy wheels/ to this machine, then:  pip install --no-index --find-links wheels {names}")


def cupy_device_problem():
    """None when CuPy sees a working CUDA device, else why not (a message)."""
    try:
        cupy = importlib.import_module("cupy")
        count = cupy.cuda.runtime.getDeviceCount()
        if count < 1:
            return "CuPy imports but sees no CUDA device"
        (cupy.arange(3) + 1).get()  # a kernel compiled and run: the driver and NVRTC work
    except Exception as e:  # noqa: BLE001 (any failure is a reason to report, not a traceback)
        return f"CuPy cannot run a kernel: {type(e).__name__}: {e}"
    return None


# --------------------------------------------------------------------------- the target
class Target:
    """The array library under test: CuPy (on the GPU) or array-api-strict on a second device (dry run)."""

    def __init__(self, dry_run):
        import numpy as np

        import nlref.backend as B

        self.np, self.B = np, B
        if dry_run:
            import array_api_strict

            self.module, self.device = array_api_strict, array_api_strict.Device("device1")
            self.name = "array-api-strict" if self.device is None else f"array-api-strict on {self.device}"
            self.bench_module = np  # timings of a wrapper library would mean nothing
        else:
            import cupy

            self.module, self.device = cupy, cupy.cuda.Device()
            self.name = f"CuPy {cupy.__version__} on {device_name(cupy)}"
            self.bench_module = cupy
        self.xp = B.compat_namespace(self.module)

    def move(self, host):
        """A host NumPy array on the target's device (an explicit move)."""
        host = self.np.asarray(host)
        return self.xp.asarray(host) if self.device is None else self.xp.asarray(host, device=self.device)

    def sync(self):
        if self.bench_module is not self.np:
            self.bench_module.cuda.Device().synchronize()


def device_name(cupy):
    try:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        name = props["name"]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:  # noqa: BLE001
        return "a CUDA device"


# --------------------------------------------------------------------------- the comparison
def relative_difference(expected, actual):
    """max |expected - actual| / max |expected| (host arrays; 0/0 = 0); inf for a shape mismatch or a NaN."""
    import numpy as np

    a = np.asarray(expected, dtype=np.float64)
    b = np.asarray(actual, dtype=np.float64)
    if a.shape != b.shape:
        return math.inf
    if a.size == 0:
        return 0.0
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return 0.0 if np.array_equal(a, b, equal_nan=True) else math.inf
    scale = float(np.max(np.abs(a)))
    diff = float(np.max(np.abs(a - b)))
    return 0.0 if diff == 0.0 else diff / (scale if scale > 0 else 1.0)


def compare_outputs(expected, actual, dtype, factor=1.0):
    """(worst relative difference, passed) over matching lists of outputs (``actual`` already on the host)."""
    worst = max((relative_difference(e, a) for e, a in zip(expected, actual)), default=0.0)
    if len(expected) != len(actual):
        worst = math.inf
    return worst, worst <= TOLERANCE[dtype] * factor


# --------------------------------------------------------------------------- the report
@dataclass
class Report:
    """The rows of the one table, written to ``path`` after each row."""

    path: Path
    header: list
    rows: list = field(default_factory=list)
    pytest_summary: str = "(the tests part did not run)"

    def add(self, part, check, status, value="", detail=""):
        self.rows.append((part, check, status, value, detail))
        print(f"[{part}] {check}: {status} {value} {detail}".rstrip(), flush=True)
        self.write()

    def failures(self):
        return [r for r in self.rows if r[2] in ("FAIL", "error")]

    def write(self):
        lines = list(self.header) + ["", "| part | check | status | value | detail |", "|---|---|---|---|---|"]
        lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in self.rows]
        lines += ["", "## pytest summary", "", "```", self.pytest_summary.strip(), "```", ""]
        self.path.write_text("\n".join(lines))


class PartTimeout(Exception):
    """Raised inside a part when its time limit has passed."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raise :class:`PartTimeout` in the main thread after ``seconds`` (SIGALRM; between Python bytecodes)."""
    def expire(signum, frame):
        raise PartTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_part(report, name, budget, body):
    """Run ``body(report)`` under ``budget`` seconds; a timeout or an exception becomes a row, not a traceback."""
    t0 = time.perf_counter()
    try:
        with time_limit(budget):
            body(report)
    except PartTimeout:
        report.add(name, "(rest of the part)", "cut off", f"{budget} s", "the part's time limit ran out")
    except Exception as e:  # noqa: BLE001 (the script reports and goes on to the next part)
        report.add(name, "(part)", "error", "", f"{type(e).__name__}: {e}")
    print(f"[{name}] {time.perf_counter() - t0:.1f} s of {budget} s", flush=True)


# --------------------------------------------------------------------------- part 1: tests
def tests_part(args, target_is_gpu):
    def body(report):
        selection = ["-m", "gpu"] if target_is_gpu else ["-k", "strict-device1"]
        # a module that cannot be imported there (a missing optional package) must not stop the CuPy cases
        command = [sys.executable, "-m", "pytest", *args.tests, *selection, "-q", "-p", "no:cacheprovider",
                   "-rfEs", "-o", "addopts=", "--continue-on-collection-errors"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        budget = args.budgets["tests"] - 5
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as e:
            output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            output += f"\n(pytest stopped after {budget} s, the part's time limit)"
            code = "timeout"
        (args.out / "pytest.txt").write_text(" ".join(map(shlex.quote, command)) + "\n\n" + output)
        lines = [line for line in output.strip().splitlines() if line.strip()]
        summary = lines[-1].strip("= ") if lines else "(no output)"
        report.pytest_summary = "\n".join(lines[-25:])
        status = "ok" if code in (0, 5) and "failed" not in summary and "error" not in summary else "FAIL"
        if code == "timeout":
            status = "cut off"
        report.add("tests", " ".join(selection), status, summary, f"exit status {code}; pytest.txt")
    return body


# --------------------------------------------------------------------------- part 2: compare
def compare_cases(size):
    """(name, dtype, tolerance factor, run(xp, move, build) -> list of arrays, host inputs) for every public function.

    ``run`` gets the namespace, a function moving host arrays onto the device and a
    builder ``build(cls, **kw)`` that makes a layer or network on that device.
    """
    import numpy as np

    import nlref
    from nlref.nn import NonLocalBlock
    from nlref.nn import functional as F
    from nlref.nn import nonlocal_op as op
    from nlref.nn.attention import attention_backward, attention_forward
    from nlref.nn.models import ImageResNet, VideoNet, VideoTransformer

    rng = np.random.default_rng(20261207)
    side = 24 if size == "tiny" else 64

    def image(shape, dtype):
        grid = np.indices(shape[:2]).sum(0) / sum(shape[:2])
        clean = np.sin(6 * grid) * 0.4 + 0.5
        clean = clean.reshape(clean.shape + (1,) * (len(shape) - 2))
        return (clean + 0.1 * rng.standard_normal(shape)).astype(dtype)

    cases = []

    def case(name, dtype, run, *host, factor=1.0):
        cases.append((name, dtype, factor, run, [np.asarray(h, dtype=dtype) if h.dtype.kind == "f" else h
                                                 for h in host]))

    for dtype in ("float64", "float32"):
        grey, colour = image((side, side), dtype), image((side, side, 3), dtype)
        volume = image((8, side // 2, side // 2), dtype)
        for method in ("fast", "naive"):
            for aggregation in ("pixel", "patch"):
                if method == "naive" and dtype == "float32":
                    continue
                small = grey[:16, :16] if method == "naive" else grey
                case(f"nl_means {method} {aggregation} grey {small.shape}", dtype,
                     lambda xp, mv, bd, im, m=method, a=aggregation: [nlref.nl_means(
                         im, sigma=0.1, patch_size=5, search_size=7, method=m, aggregation=a)], small)
        case(f"nl_means fast colour {colour.shape}", dtype,
             lambda xp, mv, bd, im: [nlref.nl_means(im, sigma=0.1, channel_axis=-1, patch_size=3, search_size=7)],
             colour)
        case(f"nl_means fast volume {volume.shape}", dtype,
             lambda xp, mv, bd, im: [nlref.nl_means(im, sigma=0.1, patch_size=3, search_size=5)], volume)
        case(f"nl_means fast volume {volume.shape} patch 3x1x3", dtype,
             lambda xp, mv, bd, im: [nlref.nl_means(im, sigma=0.1, patch_size=(3, 1, 3), search_size=5)], volume)
        case("nl_means presets (sigma estimated)", dtype, lambda xp, mv, bd, im: [nlref.nl_means(im)], grey)
        case("estimate_sigma", dtype, lambda xp, mv, bd, im: [nlref.estimate_sigma(im)], grey)
        case("estimate_sigma colour", dtype,
             lambda xp, mv, bd, im: [nlref.estimate_sigma(im, channel_axis=-1)], colour)
        case("nl_means_weights", dtype,
             lambda xp, mv, bd, im: [nlref.nl_means_weights(im, (5, 7), sigma=0.1, patch_size=5, search_size=9)],
             grey)

        x5 = rng.standard_normal((2, 6, 3, 6, 6))
        dx5 = rng.standard_normal((2, 6, 3, 6, 6))
        case("conv1x1 fwd+bwd", dtype, lambda xp, mv, bd, x, w, b, d: _pair(
            F.conv1x1_forward, F.conv1x1_backward, (x, w, b), d),
             x5, rng.standard_normal((4, 6)), rng.standard_normal(4), rng.standard_normal((2, 4, 3, 6, 6)))
        case("batchnorm fwd+bwd (training) + running stats", dtype, lambda xp, mv, bd, x, g, b, m, v, d: _bn(
            F, x, g, b, m, v, d), x5, rng.standard_normal(6), rng.standard_normal(6), rng.standard_normal(6),
             rng.uniform(0.5, 2, 6), dx5, factor=10)
        case("relu fwd+bwd", dtype, lambda xp, mv, bd, x, d: _pair(F.relu_forward, F.relu_backward, (x,), d),
             x5, dx5)
        case("maxpool (1,2,2) fwd+bwd", dtype, lambda xp, mv, bd, x, d: _pair(
            lambda a: F.maxpool_forward(a, (1, 2, 2)), F.maxpool_backward, (x,), d),
             x5, rng.standard_normal((2, 6, 3, 3, 3)))
        case("softmax fwd+bwd", dtype, lambda xp, mv, bd, x, d: _pair(F.softmax_forward, F.softmax_backward, (x,), d),
             x5, dx5)
        th, ph = rng.standard_normal((2, 4, 10)), rng.standard_normal((2, 4, 7))
        case("dot_pairwise fwd+bwd", dtype, lambda xp, mv, bd, a, b, d: _pair(
            F.dot_pairwise_forward, F.dot_pairwise_backward, (a, b), d), th, ph, rng.standard_normal((2, 10, 7)))
        case("concat_pairwise fwd+bwd", dtype, lambda xp, mv, bd, a, b, w, d: _pair(
            F.concat_pairwise_forward, F.concat_pairwise_backward, (a, b, w), d),
             th, ph, rng.standard_normal(8), rng.standard_normal((2, 10, 7)))
        case("conv3d 3x3x3 stride 2 pad 1 fwd+bwd", dtype, lambda xp, mv, bd, x, w, b, d: _pair(
            lambda *a: F.conv3d_forward(*a, stride=2, padding=1), F.conv3d_backward, (x, w, b), d),
             x5, rng.standard_normal((5, 6, 3, 3, 3)), rng.standard_normal(5), rng.standard_normal((2, 5, 2, 3, 3)),
             factor=10)
        case("avgpool3d fwd+bwd", dtype, lambda xp, mv, bd, x, d: _pair(
            lambda a: F.avgpool3d_forward(a, (1, 3, 3), (1, 2, 2), (0, 1, 1)), F.avgpool3d_backward, (x,), d),
             x5, rng.standard_normal((2, 6, 3, 3, 3)))
        case("maxpool3d fwd+bwd", dtype, lambda xp, mv, bd, x, d: _pair(
            lambda a: F.maxpool3d_forward(a, (1, 3, 3), (1, 2, 2), (0, 1, 1)), F.maxpool3d_backward, (x,), d),
             x5, rng.standard_normal((2, 6, 3, 3, 3)))
        case("global_avgpool fwd+bwd", dtype, lambda xp, mv, bd, x, d: _pair(
            F.global_avgpool_forward, F.global_avgpool_backward, (x,), d), x5, rng.standard_normal((2, 6)))
        case("linear fwd+bwd", dtype, lambda xp, mv, bd, x, w, b, d: _pair(
            F.linear_forward, F.linear_backward, (x, w, b), d),
             rng.standard_normal((5, 6)), rng.standard_normal((3, 6)), rng.standard_normal(3),
             rng.standard_normal((5, 3)))
        case("softmax_cross_entropy fwd+bwd", dtype, lambda xp, mv, bd, z, y: _xent(F, xp, z, y),
             rng.standard_normal((5, 4)), np.array([0, 3, 1, 2, 3]))
        case("layernorm fwd+bwd", dtype, lambda xp, mv, bd, x, g, b, d: _pair(
            F.layernorm_forward, F.layernorm_backward, (x, g, b), d),
             rng.standard_normal((3, 5, 8)), rng.standard_normal(8), rng.standard_normal(8),
             rng.standard_normal((3, 5, 8)))
        case("gelu fwd+bwd", dtype, lambda xp, mv, bd, x, d: _pair(F.gelu_forward, F.gelu_backward, (x,), d),
             x5, dx5)
        q, k, v = (rng.standard_normal((2, 2, 9, 4)) for _ in range(3))
        case("attention fwd+bwd", dtype, lambda xp, mv, bd, q, k, v, d: _pair(
            attention_forward, attention_backward, (q, k, v), d), q, k, v, rng.standard_normal((2, 2, 9, 4)))
        theta, phi, g = rng.standard_normal((2, 4, 12)), rng.standard_normal((2, 4, 9)), rng.standard_normal((2, 3, 9))
        dy = rng.standard_normal((2, 3, 12))
        for mode in op.MODES if hasattr(op, "MODES") else ("embedded_gaussian", "gaussian", "dot_product",
                                                           "concatenation"):
            for chunk in (None, 4):
                case(f"nonlocal_op {mode} chunk={chunk} fwd+bwd", dtype,
                     lambda xp, mv, bd, a, b, c, w, d, m=mode, ch=chunk: _pair(
                         lambda a, b, c, w: op.nonlocal_forward(a, b, c, mode=m, w_f=w if m == "concatenation"
                                                                else None, chunk_size=ch),
                         op.nonlocal_backward, (a, b, c, w), d),
                     theta, phi, g, rng.standard_normal(8), dy)
        block_x, block_dz = rng.standard_normal((2, 8, 2, 6, 6)), rng.standard_normal((2, 8, 2, 6, 6))
        for mode in ("embedded_gaussian", "gaussian", "dot_product", "concatenation"):
            for chunk in (None, 16):
                case(f"NonLocalBlock {mode} chunk={chunk} fwd+bwd", dtype,
                     lambda xp, mv, bd, x, d, m=mode, ch=chunk, t=dtype: _block(bd(
                         NonLocalBlock, 8, mode=m, dims=3, chunk_size=ch, dtype=t, seed=3), x, d), block_x,
                     block_dz)
        clips = rng.standard_normal((2, 1, 8, 16, 16))
        case("VideoNet c2d + NL forward", dtype, lambda xp, mv, bd, x, t=dtype: _net(bd(
            VideoNet, nonlocal_blocks=1, widths=(4, 6, 8), dropout=0.0, dtype=t), x), clips, factor=10)
        case("VideoNet i3d + NL forward", dtype, lambda xp, mv, bd, x, t=dtype: _net(bd(
            VideoNet, flavour="i3d", nonlocal_blocks=1, widths=(4, 6, 8), dropout=0.0, dtype=t), x), clips,
             factor=10)
        case("ImageResNet + NL forward", dtype, lambda xp, mv, bd, x, t=dtype: _net(bd(
            ImageResNet, nonlocal_blocks=1, width=6, dtype=t), x), rng.standard_normal((2, 1, 16, 16)),
             factor=10)
        case("VideoTransformer forward", dtype, lambda xp, mv, bd, x, t=dtype: _net(bd(
            VideoTransformer, dtype=t), x), clips, factor=10)
    return cases


def _pair(forward, backward, inputs, dout):
    out, cache = forward(*inputs)
    grads = backward(dout, cache)
    grads = grads if isinstance(grads, (tuple, list)) else [grads]
    return [out, *(g for g in grads if g is not None)]  # None: no gradient for an unused input


def _bn(F, x, gamma, beta, mean, var, dout):
    state = {"running_mean": mean, "running_var": var}
    out, cache = F.batchnorm_forward(x, gamma, beta, state, training=True)
    return [out, *F.batchnorm_backward(dout, cache), state["running_mean"], state["running_var"]]


def _xent(F, xp, logits, labels):
    loss, cache = F.softmax_cross_entropy_forward(logits, labels)
    return [loss, F.softmax_cross_entropy_backward(1.0, cache)]


def _block(block, x, dz):
    z = block.forward(x)
    dx = block.backward(dz)
    return [z, dx, *(block.grads[k] for k in sorted(block.grads))]


def _net(net, x):
    net.train()
    return [net.forward(x)]


def compare_part(target, size):
    import numpy as np

    import nlref.backend as B

    def on_numpy(cls, *a, **kw):
        return cls(*a, **kw)

    def on_target(cls, *a, **kw):
        placed = {} if target.device is None else {"device": target.device}
        return cls(*a, xp=target.module, **placed, **kw)

    def host(outputs):
        return [np.asarray(B.to_numpy(o)) if not isinstance(o, (float, int)) else np.asarray(o) for o in outputs]

    def body(report):
        for name, dtype, factor, run, inputs in compare_cases(size):
            label = f"{name} {dtype}"
            try:
                expected = host(run(B.compat_namespace(np), lambda a: a, on_numpy, *inputs))
                moved = [target.move(a) for a in inputs]
                outputs = run(target.xp, target.move, on_target, *moved)
                wrong_library = [i for i, o in enumerate(outputs) if type(o) is not type(moved[0])
                                 and not isinstance(o, (float, int))]
                worst, passed = compare_outputs(expected, host(outputs), dtype, factor)
            except PartTimeout:
                raise
            except Exception as e:  # noqa: BLE001 (a failure on the target is a row)
                report.add("compare", label, "error", "", f"{type(e).__name__}: {e}")
                continue
            detail = f"tolerance {TOLERANCE[dtype] * factor:.0e}"
            if wrong_library:
                passed, detail = False, f"{detail}; outputs {wrong_library} left the target's library"
            report.add("compare", label, "ok" if passed else "FAIL", f"{worst:.1e}", detail)
    return body


# --------------------------------------------------------------------------- part 3: NL-means speed
def timed(run, sync, repeats):
    """Median seconds of ``repeats`` synchronised runs after one untimed run (CuPy: kernels compiled there)."""
    import ceiling  # benchmarks/ceiling.py, on sys.path from main()

    def once():
        run()
        sync()

    return ceiling.median_seconds(once, repeats)


def nlmeans_part(target, size, have_skimage):
    import numpy as np

    import nlref
    import nlref.backend as B

    def body(report):
        side = {"tiny": 96, "full": 1024}[size]
        rng = np.random.default_rng(0)
        grid = np.indices((side, side)).sum(0) / (2 * side)
        noisy = (np.sin(12 * grid) * 0.4 + 0.5 + 0.1 * rng.standard_normal((side, side))).astype(np.float32)
        kw = dict(sigma=0.1, h=0.08, patch_size=7, search_size=21)
        on_target = target.move(noisy) if target.bench_module is not np else noisy
        label = f"{side}x{side} float32 7x7/21x21"
        t_target = timed(lambda: nlref.nl_means(on_target, **kw), target.sync, 7 if size == "full" else 3)
        name = "nlref on CuPy" if target.bench_module is not np else "nlref on NumPy (dry run)"
        # the machine's own limit for a pass over the image: one copy of it on the target (read + write)
        module = target.bench_module
        src = module.ones(noisy.size, dtype=module.float32)
        dst = module.empty_like(src)
        t_copy = timed(lambda: module.copyto(dst, src), target.sync, 7)
        offsets = 21 * 21
        report.add("nlmeans", f"{name}, {label}", "ok", f"{t_target * 1e3:.1f} ms",
                   f"per offset {t_target / offsets * 1e6:.1f} us = {t_target / offsets / t_copy:.1f} copies of the "
                   f"image ({2 * noisy.nbytes / t_copy / 1e9:.0f} GB/s read + write on the target)")
        ours = nlref.nl_means(on_target, **kw)
        t_numpy = timed(lambda: nlref.nl_means(noisy, **kw), lambda: None, 3)
        worst, same = compare_outputs([nlref.nl_means(noisy, **kw)], [B.to_numpy(ours)], "float32")
        report.add("nlmeans", f"nlref on NumPy (host CPU, {os.cpu_count()} CPUs), {label}", "ok" if same else "FAIL",
                   f"{t_numpy * 1e3:.1f} ms", f"NumPy time / target time: {t_numpy / t_target:.1f}; results differ "
                   f"by {worst:.1e} (relative to the largest value)")
        if not have_skimage:
            report.add("nlmeans", f"scikit-image fast mode, {label}", "skipped", "", "scikit-image not installed")
            return
        from skimage.restoration import denoise_nl_means

        t_sk = timed(lambda: denoise_nl_means(noisy, patch_size=7, patch_distance=10, h=0.08, sigma=0.1,
                                              fast_mode=True), lambda: None, 3)
        report.add("nlmeans", f"scikit-image fast mode (host CPU, one thread), {label}", "ok", f"{t_sk * 1e3:.1f} ms",
                   f"scikit-image time / target time: {t_sk / t_target:.1f} (issue 26's aim on a GPU: 100)")
    return body


# --------------------------------------------------------------------------- part 4: the block
def block_part(target, size, torch_device):
    import numpy as np

    import bench_block as bb
    import nlref.backend as B
    from nlref.nn import NonLocalBlock

    def body(report):
        import torch

        if size == "tiny":
            plan = [((2, 8, 2, 6, 6), True, "embedded_gaussian", None), ((2, 8, 2, 6, 6), False, "concatenation", None),
                    ((1, 8, 2, 8, 8), True, "embedded_gaussian", 16)]
        else:
            # the large case first, so that a part cut short still has it (on the CPU of a dry
            # run, N = 8 x 28 x 28: PyTorch's full form at 8 x 56 x 56 holds gigabytes of attention)
            big = (2, 64, 8, 56, 56) if target.bench_module is not np else (1, 64, 8, 28, 28)
            plan = [(big, True, "embedded_gaussian", 1024)]
            plan += [(shape, sub, mode, None) for shape in bb.SHAPES for sub in (True, False) for mode in bb.MODES]
        xp = target.bench_module
        for shape, sub_sample, mode, chunk in plan:
            label = f"{'x'.join(map(str, shape))} {mode} sub_sample={sub_sample}" + (f" chunk={chunk}" if chunk else "")
            host_block = bb.random_block(mode, sub_sample, shape[1])
            block = NonLocalBlock(shape[1], mode=mode, dims=3, sub_sample=sub_sample, chunk_size=chunk,
                                  **({} if xp is np else {"xp": xp}))
            block.load_state_dict(host_block.state_dict())
            peer = bb.torch_block(torch, host_block).to(torch_device)
            rng = np.random.default_rng(1)
            x_host = rng.standard_normal(shape).astype(np.float32)
            dz_host = rng.standard_normal(shape).astype(np.float32)
            x, dz = (a if xp is np else target.move(a) for a in (x_host, dz_host))
            tx = torch.from_numpy(x_host).to(torch_device).requires_grad_()
            tdz = torch.from_numpy(dz_host).to(torch_device)

            def sync_torch():
                if torch_device != "cpu":
                    torch.cuda.synchronize()

            def ours():
                block.forward(x)
                block.backward(dz)
                target.sync()

            def theirs():
                peer.zero_grad(set_to_none=True)
                tx.grad = None
                peer(tx).backward(tdz)
                sync_torch()

            z, dx = block.forward(x), block.backward(dz)
            peer.zero_grad(set_to_none=True)
            tz = peer(tx)
            tz.backward(tdz)
            # as bench_block: |ours - theirs| / |theirs| in the 2-norm (float32 sums over N' keys differ)
            worst = max(float(np.linalg.norm(B.to_numpy(a) - b.detach().cpu().numpy())
                              / np.linalg.norm(b.detach().cpu().numpy())) for a, b in ((z, tz), (dx, tx.grad)))
            t_ours, t_theirs = bb.time_pair(ours, theirs, repeats=5 if size == "full" else 2,
                                            rounds=2 if size == "full" else 1)
            flops = bb.matmul_flops(mode, shape, sub_sample)
            report.add("block", label, "ok" if worst < 1e-3 else "FAIL",
                       f"{t_ours * 1e3:.2f} ms vs {t_theirs * 1e3:.2f} ms",
                       f"nlref / PyTorch {t_ours / t_theirs:.2f} (aim <= 1.5); {flops / t_ours / 1e9:.0f} GFLOP/s; "
                       f"relative error (2-norm) {worst:.1e}")
    return body


# --------------------------------------------------------------------------- part 5: training step
def train_part(target, size, torch_device):
    import numpy as np

    import bench_train as bt
    import nlref.backend as B
    from nlref.data.sprites import sprite_clips
    from nlref.nn.optim import Adam
    from nlref.train import TrainConfig, build_model

    def body(report):
        import torch
        from torch_oracle import TorchVideoNet, load_videonet_params

        xp = target.bench_module
        batch, steps = (8, 2) if size == "tiny" else (32, 10 if xp is not np else 3)  # 3: the CPU's dry run
        widths = (4, 6, 8) if size == "tiny" else (16, 32, 64)
        config = TrainConfig(dropout=0.0, widths=widths)
        net = build_model(config, xp=None if xp is np else xp)
        tnet = load_videonet_params(TorchVideoNet(net).float(), net).to(torch_device).train()
        net.train()
        opt = Adam(net, lr=config.lr, weight_decay=config.weight_decay)
        topt = torch.optim.Adam(tnet.parameters(), lr=config.lr)
        clips = sprite_clips(batch * steps, seed=0, size=16)
        ours, theirs = [], []
        for i in range(steps):
            sl = slice(i * batch, (i + 1) * batch)
            x, y = clips.video[sl], clips.labels[sl]
            ours.append((B.asarray(x, xp=xp), B.asarray(y, xp=xp)))
            theirs.append((torch.from_numpy(x).to(torch_device), torch.from_numpy(y).to(torch_device)))

        def sync_torch():
            if torch_device != "cpu":
                torch.cuda.synchronize()

        t_ours = timed(lambda: bt.nlref_steps(net, opt, ours), target.sync, 3) / steps
        t_theirs = timed(lambda: bt.torch_steps(torch, tnet, topt, theirs), sync_torch, 3) / steps
        report.add("train", f"one training step, default network widths {widths}, batch {batch}", "ok",
                   f"{t_ours * 1e3:.1f} ms vs {t_theirs * 1e3:.1f} ms",
                   f"nlref / PyTorch {t_ours / t_theirs:.2f}; PyTorch on {torch_device}")
    return body


# --------------------------------------------------------------------------- main
def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", metavar="DIR", help="folder for gpu_check.md and pytest.txt (created)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: array-api-strict on a second device as the target, NumPy and PyTorch CPU "
                             "for the benchmarks")
    parser.add_argument("--size", default="full", help="full (the issue's sizes) or tiny (seconds: for tests)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--tests", nargs="+", default=["tests"], metavar="PATH",
                        help="what pytest collects (default: tests)")
    args = parser.parse_args(argv)
    if args.size not in ("full", "tiny"):
        parser.error(f"--size must be 'full' or 'tiny'; got {args.size!r}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        parser.error(f"--parts must name some of {', '.join(PARTS)}; got {args.parts!r}")
    args.parts = parts
    for path in args.tests:
        if not (ROOT / path).exists() and not Path(path).exists():
            parser.error(f"--tests: no such file or folder: {path!r}")
    args.out = Path(args.out)
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"DIR must be a folder; {str(args.out)!r} is a file")
    args.budgets = BUDGETS["dry" if args.dry_run else "gpu"]
    return args


def main(argv=None):
    args = parse_args(argv)
    required, optional, found = missing_packages(need_cupy=not args.dry_run)
    print("packages: " + ", ".join(f"{k} {v}" for k, v in found.items()))
    if optional:
        print(f"missing (their rows are skipped): {', '.join(optional)}\n{wheel_advice(optional)}")
    if required:
        print(f"missing, needed: {', '.join(required)}\n{wheel_advice(required)}\n"
              "gpu_check: stopped before running anything: install the packages above.", file=sys.stderr)
        return 2
    if not args.dry_run:
        problem = cupy_device_problem()
        if problem:
            print(f"gpu_check: {problem}. Nothing was run (try --dry-run on a machine without a GPU).",
                  file=sys.stderr)
            return 2
    sys.path[:0] = [str(ROOT), str(HERE), str(ROOT / "tests" / "nn")]
    import numpy as np

    args.out.mkdir(parents=True, exist_ok=True)
    target = Target(args.dry_run)
    torch_device = "cpu" if args.dry_run else "cuda"
    command = "python benchmarks/gpu_check.py " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    now = datetime.datetime.now(datetime.timezone.utc)
    header = [f"# gpu_check {'(dry run) ' if args.dry_run else ''}{now:%Y-%m-%d %H:%M} UTC",
              "", f"- command: `{command}`", f"- target: {target.name}; size: {args.size}",
              f"- host: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
              f"numpy {np.__version__}",
              "- packages: " + ", ".join(f"{k} {v}" for k, v in found.items()),
              "- compare: max |NumPy - target| / max |NumPy| per function (outputs and gradients)"]
    report = Report(args.out / "gpu_check.md", header)
    report.write()
    parts = {
        "tests": lambda: tests_part(args, not args.dry_run),
        "compare": lambda: compare_part(target, args.size),
        "nlmeans": lambda: nlmeans_part(target, args.size, "scikit-image" in found),
        "block": lambda: block_part(target, args.size, torch_device),
        "train": lambda: train_part(target, args.size, torch_device),
    }
    for name in args.parts:
        if name in ("block", "train") and "torch" not in found:
            report.add(name, "(part)", "skipped", "", "PyTorch not installed")
            continue
        run_part(report, name, args.budgets[name], parts[name]())
    failures = report.failures()
    print(f"gpu_check: wrote {report.path} ({len(report.rows)} rows, {len(failures)} failed)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
