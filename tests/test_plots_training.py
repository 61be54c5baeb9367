"""The training pictures of the stage notebooks (05-08, 10): loss curves, share bars, image + text."""
import json

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tinygptv_lib import plots  # noqa: E402
from tinygptv_lib.data.world import make_scene  # noqa: E402


def test_moving_average_is_trailing_and_keeps_length():
    np.testing.assert_allclose(plots.moving_average([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(plots.moving_average([5, 7], 10), [5, 6])
    np.testing.assert_allclose(plots.moving_average([1, 2, 3], 1), [1, 2, 3])
    assert len(plots.moving_average([], 3)) == 0


def test_read_metrics_skips_blank_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 0, "loss": 2.0}) + "\n\n" + json.dumps({"step": 1, "loss": 1.5}) + "\n")
    assert [r["loss"] for r in plots.read_metrics(path)] == [2.0, 1.5]


@pytest.mark.parametrize("together", [False, True])
def test_loss_curves_one_panel_per_run_or_one_for_all(tmp_path, together):
    path = tmp_path / "m.jsonl"
    path.write_text("".join(json.dumps({"step": i, "loss": 3 - 0.1 * i}) + "\n" for i in range(12)))
    rows = [{"step": i, "loss": 1.0} for i in range(5)]
    fig = plots.loss_curves({"stage 1": path, "stage 2": rows, "stage 3": rows}, smooth=3, together=together, ncols=2)
    visible = [ax for ax in fig.axes if ax.axison]
    assert len(visible) == (1 if together else 3)
    lines = [line for ax in visible for line in ax.get_lines()]
    if together:  # stage 2 continues where stage 1 ended
        xs = [line.get_xdata() for line in visible[0].get_lines() if line.get_label() == "stage 2"][0]
        assert xs[0] == 12
    assert len(lines) >= 6


def test_share_bars_normalise_both_lists():
    fig = plots.share_bars(["a", "b"], [1, 3], [10, 10])
    widths = sorted(round(p.get_width(), 3) for p in fig.axes[0].patches)
    assert widths == [0.25, 0.5, 0.5, 0.75]


def test_image_with_text_has_an_image_and_a_text_panel():
    fig = plots.image_with_text(make_scene(2, 64).image, "first paragraph\nsecond", title="t")
    assert len(fig.axes) == 2
    assert "second" in fig.axes[1].texts[0].get_text()
