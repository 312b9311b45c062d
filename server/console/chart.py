"""The campaign effect chart: spend per member by week for the treated and the control group,
as inline SVG built here (serving needs no plotting library).

The weekly series are floats (report_campaign.weekly) and only place points; every money
label is exact: the y-axis ticks are whole numbers of minor units, and the period's spend
per member of each group comes from the report's integer sums. Both series differ by more
than colour (a solid line with circles, a dashed line with squares) for readers who do not
tell the colours apart and for printing in grey.
"""
from __future__ import annotations

import xml.etree.ElementTree as ET
from datetime import date
from fractions import Fraction

from server.report_campaign import minor_units
from server.reports import money_text

SVG = "http://www.w3.org/2000/svg"
WIDTH, HEIGHT = 720, 340
LEFT, RIGHT, TOP, BOTTOM = 110, 45, 20, 90       # room for money ticks, dates, and the legend's two lines
TICKS_MAX = 6
DATE_LABELS_MAX = 8
# (group, words, colour, dashes, marker): the words are what the legend and <desc> say.
SERIES = (("treated", "treated (solid line, circles)", "#0b5cad", None, "circle"),
          ("control", "control (dashed line, squares)", "#8a5300", "8 5", "square"))


def per_member(group: dict) -> Fraction | None:
    """A group's spend per member over the period, exactly; None without members."""
    return Fraction(group["spend"], group["members"]) if group["members"] else None


def tick_step(top: float) -> int:
    """A round step in minor units (1, 2 or 5 times a power of ten) giving at most TICKS_MAX ticks."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if top <= step * factor * (TICKS_MAX - 1):
                return step * factor
        step *= 10


def weekly_svg(weeks: list[tuple[date, float, float]], report: dict, currency: str, title: str) -> str:
    """The chart as an <svg> element's text: one <path> per group, markers on each week, axes
    with labels, a legend with each group's exact spend per member, <title> and <desc>."""
    low = min(0.0, *(min(w[1], w[2]) for w in weeks))
    high = max(0.0, *(max(w[1], w[2]) for w in weeks))
    step = tick_step(max(high - low, 1.0))
    bottom_tick, top_tick = _floor_to(low, step), -_floor_to(-high, step)
    top_tick = max(top_tick, bottom_tick + step)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(i: int) -> float:
        return LEFT + (plot_w * i / (len(weeks) - 1) if len(weeks) > 1 else plot_w / 2)

    def y(value: float) -> float:
        return TOP + plot_h * (top_tick - value) / (top_tick - bottom_tick)

    root = ET.Element("svg", {"xmlns": SVG, "viewBox": f"0 0 {WIDTH} {HEIGHT}", "role": "img",
                              "class": "chart", "aria-labelledby": "chart-title chart-desc"})
    ET.SubElement(root, "title", {"id": "chart-title"}).text = title
    ET.SubElement(root, "desc", {"id": "chart-desc"}).text = _description(weeks, report, currency)
    _axes(root, weeks, currency, step, bottom_tick, top_tick, x, y)
    for index, (group, _words, colour, dashes, marker) in enumerate(SERIES):
        points = [(x(i), y(week[1 + index])) for i, week in enumerate(weeks)]
        _series(root, group, points, colour, dashes, marker)
    _legend(root, report, currency)
    return ET.tostring(root, encoding="unicode")


def _floor_to(value: float, step: int) -> int:
    return int(value // step) * step


def _axes(root, weeks, currency: str, step: int, bottom_tick: int, top_tick: int, x, y) -> None:
    axes = ET.SubElement(root, "g", {"class": "axes", "stroke": "#5b6570", "font-size": "12",
                                     "fill": "#1d232a"})
    plot_bottom = HEIGHT - BOTTOM
    for value in range(bottom_tick, top_tick + 1, step):
        ET.SubElement(axes, "line", {"x1": str(LEFT), "x2": str(WIDTH - RIGHT), "y1": _n(y(value)),
                                     "y2": _n(y(value)), "stroke": "#d6dbe0"})
        label = ET.SubElement(axes, "text", {"x": str(LEFT - 6), "y": _n(y(value) + 4), "text-anchor": "end",
                                             "stroke": "none"})
        label.text = money_text(value, currency)
    ET.SubElement(axes, "line", {"x1": str(LEFT), "x2": str(LEFT), "y1": str(TOP), "y2": str(plot_bottom)})
    every = -(-len(weeks) // DATE_LABELS_MAX)
    for i in range(0, len(weeks), every):
        label = ET.SubElement(axes, "text", {"x": _n(x(i)), "y": str(plot_bottom + 18), "text-anchor": "middle",
                                             "stroke": "none"})
        label.text = weeks[i][0].isoformat()
    ET.SubElement(axes, "text", {"x": _n(LEFT + (WIDTH - LEFT - RIGHT) / 2), "y": str(plot_bottom + 38),
                                 "text-anchor": "middle", "stroke": "none"}).text = \
        "week from (a shorter last week scaled to 7 days)"
    ET.SubElement(axes, "text", {"x": "14", "y": _n(TOP + (plot_bottom - TOP) / 2), "text-anchor": "middle",
                                 "stroke": "none", "transform": f"rotate(-90 14 {_n(TOP + (plot_bottom - TOP) / 2)})"}
                  ).text = f"spend per member ({currency})"


def _series(root, group: str, points: list[tuple[float, float]], colour: str, dashes: str | None,
            marker: str) -> None:
    g = ET.SubElement(root, "g", {"class": f"series {group}", "fill": colour, "stroke": colour})
    d = " ".join(f"{'M' if i == 0 else 'L'}{_n(px)} {_n(py)}" for i, (px, py) in enumerate(points))
    attributes = {"d": d, "fill": "none", "stroke-width": "2.5", "data-group": group}
    if dashes:
        attributes["stroke-dasharray"] = dashes
    ET.SubElement(g, "path", attributes)
    for px, py in points:
        if marker == "circle":
            ET.SubElement(g, "circle", {"cx": _n(px), "cy": _n(py), "r": "4"})
        else:
            ET.SubElement(g, "rect", {"x": _n(px - 4), "y": _n(py - 4), "width": "8", "height": "8"})


def _legend(root, report: dict, currency: str) -> None:
    legend = ET.SubElement(root, "g", {"class": "legend", "font-size": "12", "fill": "#1d232a"})
    for index, (group, _words, colour, dashes, marker) in enumerate(SERIES):
        left, base = LEFT + 10, HEIGHT - 26 + 18 * index
        sample = {"x1": str(left), "x2": str(left + 30), "y1": str(base - 4), "y2": str(base - 4),
                  "stroke": colour, "stroke-width": "2.5"}
        if dashes:
            sample["stroke-dasharray"] = dashes
        ET.SubElement(legend, "line", sample)
        if marker == "circle":
            ET.SubElement(legend, "circle", {"cx": str(left + 15), "cy": str(base - 4), "r": "4", "fill": colour})
        else:
            ET.SubElement(legend, "rect", {"x": str(left + 11), "y": str(base - 8), "width": "8", "height": "8",
                                           "fill": colour})
        ET.SubElement(legend, "text", {"x": str(left + 36), "y": str(base)}).text = \
            f"{group}: {_mean_text(report[group], currency)}"


def _mean_text(group: dict, currency: str) -> str:
    mean = per_member(group)
    return "no members" if mean is None else f"{money_text(minor_units(mean), currency)} per member over the period"


def _description(weeks, report: dict, currency: str) -> str:
    parts = [f"Spend per member in each week from {weeks[0][0].isoformat()}, {len(weeks)} week(s)."]
    for group, words, *_ in SERIES:
        parts.append(f"The {words}: {_mean_text(report[group], currency)}.")
    return " ".join(parts)


def _n(value: float) -> str:
    """A coordinate (not money): one decimal is finer than a pixel."""
    return f"{value:.1f}"
