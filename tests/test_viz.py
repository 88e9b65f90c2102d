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
