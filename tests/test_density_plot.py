import os

import matplotlib.pyplot as plt
import pytest

from density_plot import density_generate, get_esd_plot


def test_density_generate_matches_original_grid_rule():
    nodes = [[-1.0, 0.0, 2.0], [-0.5, 0.1, 1.5, 3.0]]  # runs may differ in length
    weights = [[0.2, 0.5, 0.3], [0.1, 0.4, 0.4, 0.1]]
    grid, dens = density_generate(nodes, weights)
    assert len(grid) == 10000
    assert grid[0] == pytest.approx((-1.0 - 0.5) / 2 - 0.01)
    assert grid[-1] == pytest.approx((2.0 + 3.0) / 2 + 0.01)
    assert (dens.sum() * (grid[1] - grid[0])) == pytest.approx(1.0)


def test_get_esd_plot_writes_pdf_and_png_and_closes_figure(tmp_path):
    before = len(plt.get_fignums())
    out = get_esd_plot([[0.0, 1.0, 5.0]], [[0.5, 0.3, 0.2]], str(tmp_path / "sub" / "esd.pdf"))
    assert out == [str(tmp_path / "sub" / "esd.pdf"), str(tmp_path / "sub" / "esd.png")]
    with open(out[0], "rb") as fh:
        assert fh.read(5) == b"%PDF-"
    with open(out[1], "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(plt.get_fignums()) == before
    assert not [f for f in os.listdir(tmp_path / "sub") if ".tmp" in f]
