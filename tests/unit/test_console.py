"""The console's pure parts: its colours meet WCAG AA, the throughput chart's geometry, the value formats."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from api.console import _duration, _size
from api.console.pages import CHART_HEIGHT, CHART_WIDTH, throughput_chart

CSS = Path(__file__).resolve().parents[2] / "api" / "console" / "static" / "console" / "console.css"
# (foreground, background) pairs the stylesheet puts text in; AA asks 4.5:1 for normal text.
PAIRS = [
    ("--text", "--bg"), ("--text", "--panel"), ("--muted", "--bg"), ("--muted", "--panel"), ("--link", "--bg"),
    ("--link", "--panel"), ("#ffffff", "--link"), ("#ffffff", "--bad-fg"), ("--ok-fg", "--ok-bg"),
    ("--bad-fg", "--bad-bg"), ("--run-fg", "--run-bg"), ("--wait-fg", "--wait-bg"), ("--off-fg", "--off-bg"),
    ("--text", "--wait-bg"),
]


def _colours() -> dict[str, str]:
    return dict(re.findall(r"(--[a-z-]+):\s*(#[0-9a-fA-F]{6})", CSS.read_text()))


def _luminance(hex_colour: str) -> float:
    channels = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    linear = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * linear[0] + 0.7152 * linear[1] + 0.0722 * linear[2]


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


@pytest.mark.parametrize(("fg", "bg"), PAIRS)
def test_text_colours_meet_wcag_aa(fg: str, bg: str) -> None:
    colours = _colours()
    ratio = contrast(colours.get(fg, fg), colours.get(bg, bg))
    assert ratio >= 4.5, f"{fg} on {bg}: {ratio:.2f}:1"


def test_contrast_formula_matches_wcag_examples() -> None:
    assert contrast("#000000", "#ffffff") == pytest.approx(21.0)
    assert contrast("#777777", "#ffffff") == pytest.approx(4.48, abs=0.01)  # the classic just-fails grey


def test_throughput_chart_spans_the_box() -> None:
    chart = throughput_chart([(0.0, 0.0), (2.0, 4.0), (4.0, 1.0)])
    assert chart is not None
    points = [tuple(map(float, p.split(","))) for p in chart.points.split()]
    assert points[0] == (0.0, CHART_HEIGHT) and points[-1][0] == CHART_WIDTH
    assert min(y for _, y in points) == pytest.approx(10.0)  # the peak reaches the top margin
    assert chart.peak == 4.0 and "peak 4.00 per second" in chart.label
    assert throughput_chart([]) is None


def test_formats() -> None:
    assert _duration(None) == "–" and _duration(42) == "42 s" and _duration(3725) == "1 h 2 min"
    assert _size(512) == "512 B" and _size(138_000_000) == "138.0 MB"
