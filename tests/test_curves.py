"""Learning curves: per-epoch records read back, seed means and bands, figures drawn."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from guessgrad.curves import _mean_band, curves_figure, draw_curves, read_metrics, seed_std

PNG = b"\x89PNG\r\n\x1a\n"


def _records(accuracies: list[float]) -> list[dict]:
    return [
        {"epoch": e, "train_loss": 2.0 - a, "train_accuracy": a, "test_accuracy": a - 0.05}
        for e, a in enumerate(accuracies, start=1)
    ]


def test_read_metrics_stops_at_a_line_cut_short(tmp_path: Path) -> None:
    lines = [json.dumps(r) for r in _records([0.1, 0.2, 0.3])]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n" + lines[2][:10])
    assert read_metrics(tmp_path) == _records([0.1, 0.2])
    assert read_metrics(tmp_path / "absent") == []


def test_seed_mean_and_band_over_the_epochs_all_seeds_reached() -> None:
    runs = [_records([0.1, 0.3, 0.5]), _records([0.2, 0.4]), _records([0.3, 0.2, 0.9])]
    epochs, mean, std = _mean_band(runs, "train_accuracy")
    assert epochs == [1, 2]
    assert mean == pytest.approx([0.2, 0.3])
    assert std == pytest.approx(
        [statistics.stdev([0.1, 0.2, 0.3]), statistics.stdev([0.3, 0.4, 0.2])]
    )
    assert _mean_band(runs[:1], "test_accuracy")[1:] == ([0.05, 0.25, 0.45], [0.0, 0.0, 0.0])


def test_draw_curves_writes_a_png_and_skips_panels_without_records(tmp_path: Path) -> None:
    panels = [
        ("width 8", {"a": [_records([0.1, 0.2]), _records([0.2, 0.3])], "b": [[]]}),
        ("width 16", {"a": [[]]}),
    ]
    assert draw_curves(panels, tmp_path / "curves.png", "title")
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == PNG
    assert int.from_bytes(png[16:20], "big") == 720  # one panel: 6 inches at 120 dpi
    assert not draw_curves([("width 16", {"a": [[]]})], tmp_path / "none.png", "title")
    assert not (tmp_path / "none.png").exists()


def test_a_method_keeps_its_colour_in_every_panel() -> None:
    runs = [_records([0.1, 0.2])]
    fig = curves_figure([("w 8", {"a": runs, "b": runs}), ("w 16", {"b": runs})], "title")
    assert fig is not None
    top_8, top_16 = fig.axes[0], fig.axes[1]  # the accuracy panels, in order
    # each label draws train and test accuracy: "b" is the 3rd and 4th line at width 8
    assert [ln.get_color() for ln in top_8.lines] == ["C0", "C0", "C1", "C1"]
    assert [ln.get_color() for ln in top_16.lines] == ["C1", "C1"]
    legend = fig.axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["a", "b"]
    assert curves_figure([("w 8", {"a": [[]]})], "title") is None


def test_a_curve_that_stops_early_ends_in_a_dot() -> None:
    fig = curves_figure(
        [("w 8", {"done": [_records([0.1, 0.2, 0.3])], "stopped": [_records([0.1, 0.25])]})],
        "title",
    )
    assert fig is not None
    top, bottom = fig.axes[0], fig.axes[1]
    dots = [ln for ln in top.lines if ln.get_marker() == "o"]
    # the stopped curve's train and test accuracy end in a dot at its last epoch, the other not
    assert [(ln.get_color(), list(ln.get_xdata())) for ln in dots] == [("C1", [2]), ("C1", [2])]
    assert list(dots[0].get_ydata()) == [0.25]
    assert [list(ln.get_xdata()) for ln in bottom.lines if ln.get_marker() == "o"] == [[2]]


def test_seed_std_is_the_sample_std_and_nan_for_a_diverged_seed() -> None:
    assert seed_std([1.0, 3.0]) == pytest.approx(statistics.stdev([1.0, 3.0])) == 2**0.5
    assert all(seed_std([1.0, bad]) != seed_std([1.0, bad]) for bad in (float("nan"), float("inf")))


def test_given_colours_are_kept_and_faded_curves_drawn_pale() -> None:
    """The report fixes each method's colour (the same in all its figures) and draws
    unfinished runs in their method's colour, pale; panels share their y axes."""
    runs = [_records([0.1, 0.2])]
    panels = [("w 8", {"a": runs, "b": runs, "b (unfinished)": runs}), ("w 16", {"a": runs})]
    fig = curves_figure(
        panels, "title", colors={"b": "C0", "b (unfinished)": "C0"}, faded={"b (unfinished)"}
    )
    assert fig is not None
    top_8, top_16, bottom_8, _ = fig.axes
    # "a" takes the first colour that no fixed label has
    assert [ln.get_color() for ln in top_8.lines] == ["C1", "C1", "C0", "C0", "C0", "C0"]
    assert [ln.get_alpha() for ln in top_8.lines] == [None, None, None, None, 0.5, 0.5]
    assert top_8.get_shared_y_axes().joined(top_8, top_16)
    # each loss keeps its scale: one run blowing up would flatten the others
    others = [ax for ax in fig.axes if ax is not bottom_8]
    assert not any(bottom_8.get_shared_y_axes().joined(bottom_8, ax) for ax in others)


def test_a_diverged_curve_ends_in_a_cross_and_says_so() -> None:
    good = _records([0.1, 0.2, 0.3])
    bad = _records([0.1, 0.2, 0.3])
    bad[2]["train_loss"] = float("nan")
    fig = curves_figure([("w 8", {"ok": [good], "bad": [good, bad]})], "title")
    assert fig is not None
    bottom = fig.axes[1]
    crosses = [ln for ln in bottom.lines if ln.get_marker() == "x"]
    assert [(ln.get_color(), list(ln.get_xdata())) for ln in crosses] == [("C1", [2])]
    legend = fig.axes[-1].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["ok", "bad (diverged)"]
    bad[0]["train_loss"] = float("inf")  # from the first epoch: said, with nowhere to cross
    fig = curves_figure([("w 8", {"bad": [bad]})], "title")
    assert fig is not None
    assert not [ln for ln in fig.axes[1].lines if ln.get_marker() == "x"]
    assert [t.get_text() for t in fig.axes[-1].get_legend().get_texts()] == ["bad (diverged)"]


def test_twenty_methods_get_twenty_colours_before_one_repeats() -> None:
    """Past ten methods the colours went round again (the eleventh drawn as the first)."""
    from guessgrad.curves import COLOURS, _palette, colour

    labels = [f"method {i}" for i in range(20)]
    palette = _palette(labels, {})
    assert len(set(palette.values())) == 20 and len(set(COLOURS)) == 20
    assert palette["method 0"] == "C0" and colour(20) == colour(0)
    fixed = _palette(labels, {"method 5": "C0"})  # a fixed colour is not handed out again
    assert fixed["method 5"] == "C0" and list(fixed.values()).count("C0") == 1
    assert len(set(fixed.values())) == 20
