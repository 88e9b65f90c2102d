import numpy as np

import nlref
import nlref.backend as B


def test_figures_accept_any_array_library(xp_cpu):
    img = B.asarray(nlref.data.camera()[:32, :32], xp=xp_cpu)
    fig = nlref.viz.image_grid([img, img], ["a", "b"])
    assert len(fig.axes) == 2 and fig.axes[1].get_title() == "b"
    fig = nlref.viz.averaging_plot([1, 2, 4], [0.01, 0.005, 0.0025], 0.1)
    line = fig.axes[0].lines[1]
    np.testing.assert_allclose(line.get_ydata(), [0.01, 0.005, 0.0025])  # the sigma^2 / N law
    w = nlref.nl_means_weights(img, (10, 12), sigma=0.05, search_size=9, patch_size=3)
    fig = nlref.viz.weights_plot(img, [(10, 12)], [w], search_size=(9, 9))
    assert len(fig.axes) == 2
    import matplotlib.pyplot as plt

    plt.close("all")


def test_attention_plot(xp_cpu):
    import matplotlib.pyplot as plt
    import pytest

    img = B.asarray(nlref.data.camera()[:32, :32], xp=xp_cpu)
    a = np.zeros((16, 4))
    a[5, 2] = 1.0  # query (1, 1) on the 4x4 grid attends to key (1, 0) of the 2x2 grid
    fig = nlref.viz.attention_plot(img, B.asarray(a, xp=xp_cpu), [(1, 1)], query_shape=(4, 4), key_shape=(2, 2))
    shown = fig.axes[1].images[1].get_array()
    np.testing.assert_array_equal(np.asarray(shown), [[0, 0], [1, 0]])
    with pytest.raises(ValueError, match=r"attention must have shape \(16, 4\)"):
        nlref.viz.attention_plot(img, a[:, :3], [(0, 0)], query_shape=(4, 4), key_shape=(2, 2))
    plt.close("all")
