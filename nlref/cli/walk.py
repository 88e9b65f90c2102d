"""The teaching walk of ``nlref demo``: averaging, NL-means, the non-local block, a short training."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from nlref.cli._common import _timed, say


#: Every figure the walk writes into its folder (``nlref demo`` refuses to replace them without --overwrite).
FIGURES = ("averaging_curve.png", "averaging_images.png", "nlmeans_camera.png", "nlmeans_weights.png",
           "nlmeans_astronaut.png", "nonlocal_attention.png", "training_curves.png", "training_attention.png")


def _save(fig, path):
    """Save a figure whole or not at all (a demo stopped half-way leaves no broken PNG), then close it."""
    import matplotlib.pyplot as plt

    from nlref._files import replaced_atomically

    try:
        with replaced_atomically(path) as tmp:
            fig.savefig(tmp, dpi=110)
    finally:
        plt.close(fig)


def run_demo(out_dir, *, quick=False, seed=0):
    """The teaching walk so far: averaging copies, then NL-means, with figures and a table."""
    import nlref
    from nlref import viz

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sigma = 20 / 255
    camera = nlref.data.camera()
    astro = nlref.data.astronaut()
    if quick:
        camera, astro = camera[96:224, 160:288], astro[30:158, 180:308]
    rows = []

    # 1. averaging N noisy copies: the variance falls as sigma^2 / N
    counts = [1, 2, 4, 8, 16, 32, 64]
    variances = nlref.averaging_curve(camera, sigma, counts, seed=seed)
    _save(viz.averaging_plot(counts, variances, sigma), out / "averaging_curve.png")
    copies = nlref.noisy_copies(camera, sigma, 16, seed=seed)
    shown = [copies[0], nlref.average(copies[:4]), nlref.average(copies)]
    _save(viz.image_grid([camera] + shown, ["clean", "1 noisy copy", "mean of 4", "mean of 16"],
                         title="averaging N noisy copies of the camera image (noise sigma = 20/255)"),
          out / "averaging_images.png")
    for n, var in zip(counts, variances):
        if n in (4, 16):
            rows.append((f"mean of {n} noisy copies", "camera", 10 * np.log10(1 / var), None))

    # 2. NL-means on one noisy copy: pixel-wise and patch-wise
    noisy = nlref.add_gaussian_noise(camera, sigma, seed=seed)
    pixel, t_pixel = _timed(lambda: nlref.nl_means(noisy, sigma=sigma))
    patch, t_patch = _timed(lambda: nlref.nl_means(noisy, sigma=sigma, aggregation="patch"))
    estimated = nlref.estimate_sigma(noisy)
    rows += [
        ("noisy (one copy)", "camera", nlref.psnr(camera, noisy), None),
        ("NL-means, pixel-wise", "camera", nlref.psnr(camera, pixel), t_pixel),
        ("NL-means, patch-wise", "camera", nlref.psnr(camera, patch), t_patch),
    ]
    _save(viz.image_grid([noisy, pixel, patch, noisy - pixel],
                         ["noisy", "NL-means pixel-wise", "NL-means patch-wise", "method noise: noisy - pixel-wise"],
                         limits=[None, None, None, (-3 * sigma, 3 * sigma)],
                         colorbars=[None, None, None, "noisy - denoised (grey level, 0..1 scale)"],
                         title="NL-means on the camera image (noise sigma = 20/255); the method noise should look "
                               "like noise"),
          out / "nlmeans_camera.png")

    # 3. the weights of a few pixels: the first picture of attention
    crop = noisy[160:288, 200:328] if not quick else noisy
    positions = [(40, 40), (64, 90), (100, 30)]
    params = nlref.resolve_parameters(crop, sigma=sigma, search_size=31)
    maps = [nlref.nl_means_weights(crop, p, sigma=sigma, search_size=31, patch_size=params["patch_size"])
            for p in positions]
    _save(viz.weights_plot(crop, positions, maps, search_size=(31, 31)), out / "nlmeans_weights.png")

    # 4. colour
    noisy_rgb = nlref.add_gaussian_noise(astro, sigma, seed=seed)
    rgb, t_rgb = _timed(lambda: nlref.nl_means(noisy_rgb, sigma=sigma, channel_axis=-1))
    rows += [
        ("noisy (one copy)", "astronaut", nlref.psnr(astro, noisy_rgb), None),
        ("NL-means, pixel-wise", "astronaut", nlref.psnr(astro, rgb), t_rgb),
    ]
    _save(viz.image_grid([astro, noisy_rgb, rgb], ["clean", "noisy", "NL-means"],
                         title="NL-means on a colour image: one weight per pair of pixels, from all three "
                               "channels (noise sigma = 20/255)"),
          out / "nlmeans_astronaut.png")

    block_lines = _demo_block(out, nlref.data.camera(), seed=seed)
    training_lines = _demo_training(out, quick=quick, seed=seed)

    size = "x".join(map(str, camera.shape))
    say(f"nlref demo: sigma = 20/255, camera {size}, estimated sigma {estimated * 255:.1f}/255")
    say(f"{'step':<26} {'image':<10} {'PSNR dB':>8} {'time s':>7}")
    for name, image, value, seconds in rows:
        timing = "-" if seconds is None else f"{seconds:.2f}"
        say(f"{name:<26} {image:<10} {value:8.2f} {timing:>7}")
    say()
    say("\n".join(block_lines))
    say()
    say("\n".join(training_lines))
    say(f"figures written to {out.resolve()}")
    return rows


def _nlmeans_block(image, *, grid=32, radius=1, h=0.15):
    """An embedded-Gaussian block whose hand-set theta and phi compute NL-means weights.

    The input has, at each position of the image shrunk to grid x grid, the
    (2r+1)^2 values P of its neighbourhood, |P|^2 and a constant 1. With
    theta = [2 P / h^2; 1] and phi = [P; -|P|^2 / h^2] (1x1 convolutions with
    0/1 weights), theta_i . phi_j = -(|P_i - P_j|^2 - |P_i|^2) / h^2, and the
    softmax over j drops the constant |P_i|^2: the weights of NL-means with
    whole-image search windows (chapter 3 of the notebooks).
    """
    import nlref

    rows, cols = image.shape
    small = image[: rows - rows % grid, : cols - cols % grid]
    small = small.reshape(grid, rows // grid, grid, cols // grid).astype(np.float64).mean(axis=(1, 3))
    padded = np.pad(small, radius, mode="reflect")
    k = 2 * radius + 1
    patches = np.stack([padded[i:i + grid, j:j + grid] for i in range(k) for j in range(k)])
    x = np.concatenate([patches, (patches**2).sum(axis=0, keepdims=True), np.ones((1, grid, grid))])
    n = k * k
    block = nlref.NonLocalBlock(n + 2, inter_channels=n + 1, mode="embedded_gaussian", sub_sample=False,
                                dtype="float64")
    w_theta, w_phi = np.zeros((n + 1, n + 2)), np.zeros((n + 1, n + 2))
    w_theta[:n, :n] = 2 / h**2 * np.eye(n)
    w_theta[n, n + 1] = 1.0
    w_phi[:n, :n] = np.eye(n)
    w_phi[n, n] = -1 / h**2
    block.params.update({"theta.weight": w_theta, "theta.bias": np.zeros(n + 1),
                         "phi.weight": w_phi, "phi.bias": np.zeros(n + 1)})
    return block, x[None], small, patches.reshape(n, -1)


def _demo_block(out, image, *, seed=0):
    """The non-local block: gradient checks of every mode, identity at start, an attention figure."""
    import nlref
    from nlref import viz

    rng = np.random.default_rng(seed)
    lines = ["non-local block: float64 gradient check of forward + backward (centred differences)",
             f"{'mode':<20} {'max relative error':>19} {'result':>7}"]
    for mode in nlref.nn.nonlocal_op.MODES:
        block = nlref.NonLocalBlock(4, mode=mode, dims=2, dtype="float64", seed=seed)
        for name, value in block.params.items():
            block.params[name] = rng.standard_normal(value.shape)
        result = nlref.layer_gradcheck(block, rng.standard_normal((2, 4, 4, 4)))
        lines.append(f"{mode:<20} {result.max_error:19.1e} {'passed' if result.passed else 'FAILED':>7}")

    block = nlref.NonLocalBlock(64, dims=3)  # a fresh block: BN gamma = 0
    x = rng.standard_normal((2, 64, 4, 14, 14)).astype(np.float32)
    (z, seconds) = _timed(lambda: block.forward(x))
    _, seconds_back = _timed(lambda: block.backward(np.ones_like(z)))
    lines.append(f"fresh block on (2, 64, 4, 14, 14): z == x exactly: {bool(np.array_equal(z, x))}; "
                 f"forward {seconds * 1e3:.0f} ms, backward {seconds_back * 1e3:.0f} ms")

    h = 0.15
    block, x, small, patches = _nlmeans_block(image, h=h)
    _, attention = block.forward(x, return_attention=True)
    d2 = ((patches[:, :, None] - patches[:, None, :]) ** 2).sum(axis=0)  # |P_i - P_j|^2 for all pairs
    weights = np.exp(-(d2 - d2.min(axis=1, keepdims=True)) / h**2)
    gap = float(np.abs(attention[0] - weights / weights.sum(axis=1, keepdims=True)).max())
    lines.append(f"embedded-Gaussian block with hand-set theta, phi on 3x3 patches: attention == NL-means weights "
                 f"(max difference {gap:.1e})")
    queries = [(4, 28), (20, 24), (18, 6)]  # sky, grass, coat
    fig = viz.attention_plot(small, attention[0], queries, query_shape=(32, 32), key_shape=(32, 32),
                             titles=[f"attention of {q} ({name})" for q, name in zip(queries, ("sky", "grass", "coat"))])
    fig.suptitle("embedded-Gaussian block with NL-means weights on the 32x32 camera image", fontsize=10)
    _save(fig, out / "nonlocal_attention.png")
    return lines


def _demo_training(out, *, quick, seed):
    """Train the C2D baseline and the NL C2D briefly on the two-sprite task; curves and an attention figure.

    The teaching schedule of notebook 6 (3 brightness kinds, 1000 clips, 4 epochs, widths 8-16-32,
    no dropout, Adam 3e-3: well under a minute on 2 cores); ``quick`` trains a tiny network for
    the tests. Writes ``training_curves.png`` and ``training_attention.png`` (the attention of
    a query at sprite 1 of a validation clip) and returns the lines to print.
    """
    from nlref import viz
    from nlref.backend import to_numpy
    from nlref.data.sprites import additive_ceiling
    from nlref.train import TrainConfig, build_data, train

    schedule = (dict(n_train=64, n_val=32, epochs=2, batch_size=16, widths=(4, 6, 8)) if quick
                else dict(n_train=1000, n_val=300, epochs=4, widths=(8, 16, 32)))
    base = dict(kinds=3, frames=8, size=16, dropout=0.0, lr=3e-3, seed=seed, **schedule)
    runs = {label: train(TrainConfig(**base, nonlocal_blocks=blocks), progress=False, log=None)
            for label, blocks in (("C2D", 0), ("NL C2D", 1))}
    _save(viz.training_curves({label: r["history"] for label, r in runs.items()}), out / "training_curves.png")

    config, net = runs["NL C2D"]["config"], runs["NL C2D"]["model"]
    _, val = build_data(config)
    _, attention = net.eval().forward(val.video, return_attention=True)
    (layer, a), = attention.items()
    a = to_numpy(a)
    q_shape = (config.frames, config.size // 4, config.size // 4)     # res3 grid of queries
    k_shape = (config.frames, config.size // 8, config.size // 8)     # keys max-pooled by (1, 2, 2)
    meta, duration = val.meta, 3                                      # sprite_clips' default duration

    def cell(i, s, step, size):                                       # (t, row, col) of a sprite's centre
        r, c = meta["origin"][i, s] + meta["velocity"][i, s] * step + 2
        return int(meta["start"][i, s] + step), int(r // size), int(c // size)

    def index(t, y, x, shape):
        return (t * shape[1] + y) * shape[2] + x

    mass = []                                                         # sprite-1 query's weight on sprite 2's cells
    for i in range(len(val)):
        row = a[i, index(*cell(i, 0, 1, 4), q_shape)]                 # query: sprite 1's middle frame, res3 grid
        mass.append(row[[index(*cell(i, 1, k, 8), k_shape) for k in range(duration)]].sum())
    i = int(np.argmax(meta["kind"][:, 1] > meta["kind"][:, 0]))      # first clip whose sprite 2 is brighter
    query = cell(i, 0, 1, 4)
    _save(viz.spacetime_attention_plot(val.video[i], a[i, index(*query, q_shape)], query, key_shape=k_shape,
                                       query_shape=q_shape, title=f"{layer}: attention of the query at sprite 1 "
                                       f"(red circle), validation clip {i}, sprite 2 brighter: {mass[i]:.2f} on "
                                       f"sprite 2's cells (mean over all {len(val)} clips {np.mean(mass):.2f})"),
          out / "training_attention.png")
    ceiling = additive_ceiling(config.kinds)
    lines = [f"training on the two-sprite task ({config.kinds} brightness kinds, {config.n_train} clips x "
             f"{config.epochs} epochs, {config.n_val} validation clips; additive ceiling {ceiling:.3f})",
             f"{'network':<26} {'val accuracy':>12} {'clips/s':>8}"]
    for label, r in runs.items():
        lines.append(f"{label:<26} {r['val_accuracy']:12.3f} {r['clips_per_second']:8.0f}")
    lines.append(f"attention of a sprite-1 query on sprite 2's cells: {float(np.mean(mass)):.3f} "
                 f"(uniform {duration / np.prod(k_shape):.3f}), the mean over the {len(val)} validation clips; "
                 f"training_attention.png draws clip {i}, where it is {float(mass[i]):.3f}")
    return lines
