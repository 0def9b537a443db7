"""SVG chart of one `make bench` results file: taskhost beside each Celery variant of the same run.

One panel per scenario, each with its own linear axis from 0, so an 80x gap in throughput
and a 2x gap in latency are both readable; every bar carries its value, and taskhost's bar
says how it compares with the best Celery variant. Built as plain SVG text with the standard
library only, so a chart can be redrawn from any results JSON (`run.py --chart-only FILE`).
"""
import json
import re
from pathlib import Path
from typing import NamedTuple
from xml.sax.saxutils import escape


class Panel(NamedTuple):
    title: str
    unit: str
    higher_is_better: bool
    rows: list  # (sub-heading or None, key in each system's figures)


PANELS = [
    Panel("drain, results ignored", "tasks/s", True, [(None, "drain_ignored_per_s")]),
    Panel("drain, results stored", "tasks/s", True, [(None, "drain_results_per_s")]),
    Panel("media.thumbnail", "images/s", True, [(None, "thumbnails_per_s")]),
    Panel("round trip, python client", "ms", False, [("p50", "round_trip_p50_ms"), ("p99", "round_trip_p99_ms")]),
    Panel("round trip, rust client", "ms", False,
          [("p50", "native_round_trip_p50_ms"), ("p99", "native_round_trip_p99_ms")]),
    Panel("memory", "MB", False, [("idle RSS, all processes", "idle_rss_mb"), ("idle PSS, all processes", "idle_pss_mb"),
                                  ("RSS after the run, all processes", "after_rss_mb")]),
]

WIDTH = 960
MARGIN = 20
LEFT = 190  # bars start here; system names end just before
RIGHT = 300  # room after the longest bar for its value and comparison
BAR, GAP = 16, 4
TASKHOST_COLOR = "#e6550d"
CELERY_COLORS = ["#3182bd", "#6baed6", "#9ecae1", "#c6dbef"]


def write_chart(json_path):
    """Draws the results file at json_path into the same path with .svg; returns that path."""
    json_path = Path(json_path)
    svg_path = json_path.with_suffix(".svg")
    svg_path.write_text(render(json.loads(json_path.read_text()), commit_of(json_path)))
    return svg_path


def commit_of(json_path):
    """The commit in a results file name, <date>-<commit>-scale<N>.json (the whole stem otherwise)."""
    m = re.fullmatch(r"\d{4}-\d{2}-\d{2}-(.+)-scale[^-]+", json_path.stem)
    return m[1] if m else json_path.stem


def render(results, commit):
    """The whole SVG document: a heading, then one panel per scenario the results hold."""
    systems = results["systems"]
    colors = system_colors(systems)
    body, y = heading(results, commit), 70
    for panel in PANELS:
        rows = [(label, key) for label, key in panel.rows if all(key in fig for fig in systems.values())]
        if rows:
            elements, y = draw_panel(panel._replace(rows=rows), systems, colors, y)
            body += elements
    return "\n".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{y}" '
                      f'viewBox="0 0 {WIDTH} {y}" font-family="sans-serif" font-size="12">',
                      '<rect width="100%" height="100%" fill="white"/>', *body, "</svg>", ""])


def system_colors(systems):
    """taskhost in orange, the Celery variants in shades of blue, in the results' order."""
    celery = iter(CELERY_COLORS)
    return {name: TASKHOST_COLOR if is_taskhost(name) else next(celery) for name in systems}


def is_taskhost(name):
    return name.startswith("taskhost")


def heading(results, commit):
    m = results["machine"]
    return [text(MARGIN, 28, f"taskhost vs Celery: make bench at {commit}, scale {results['scale']}",
                 size=18, weight="bold"),
            text(MARGIN, 48, f"{results['date'][:10]}; {m['cores']} cores, {m['platform']}, Python {m['python']}",
                 size=11, fill="#555")]


def draw_panel(panel, systems, colors, y):
    """One panel's elements from height y down, each row a group of one bar per system; returns
    them and the y below the panel."""
    better = "higher" if panel.higher_is_better else "lower"
    out = [text(MARGIN, y + 14, f"{panel.title} ({panel.unit}, {better} is better)", size=14, weight="bold")]
    y += 24
    top = y
    largest = max(fig[key] for _, key in panel.rows for fig in systems.values())
    px_per_unit = (WIDTH - LEFT - RIGHT) / largest
    for label, key in panel.rows:
        if label:
            out.append(text(MARGIN + 10, y + 12, label, fill="#333", style="italic"))
            y += 18
        for name, fig in systems.items():
            caption = f"{number(fig[key])}{comparison(name, key, systems, panel.higher_is_better)}"
            out += bar(y, name, fig[key] * px_per_unit, caption, colors[name])
            y += BAR + GAP
        y += 6
    out.append(f'<line x1="{LEFT}" y1="{top - 2}" x2="{LEFT}" y2="{y - 8}" stroke="#333"/>')
    return out, y + 16


def bar(y, name, width, caption, color):
    """A labelled horizontal bar: system name to the left, its value to the right."""
    return [text(LEFT - 6, y + 12, name, anchor="end"),
            f'<rect x="{LEFT}" y="{y}" width="{max(width, 1):.1f}" height="{BAR}" fill="{color}"/>',
            text(LEFT + max(width, 1) + 5, y + 12, caption)]


def comparison(name, key, systems, higher_is_better):
    """For taskhost's bar, ' (N× better/worse than the best Celery)'; empty for the others."""
    celery = [fig[key] for other, fig in systems.items() if not is_taskhost(other)]
    if not is_taskhost(name) or not celery:
        return ""
    best = max(celery) if higher_is_better else min(celery)
    ratio = systems[name][key] / best if higher_is_better else best / systems[name][key]
    if ratio >= 1:
        return f" ({ratio:.1f}× better than the best Celery)"
    return f" ({1 / ratio:.1f}× worse than the best Celery)"


def number(value):
    """Enough digits to read a value at a glance: 60,588 / 36.2 / 3.52."""
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def text(x, y, content, size=None, weight=None, fill=None, anchor=None, style=None):
    attrs = {"font-size": size, "font-weight": weight, "fill": fill, "text-anchor": anchor, "font-style": style}
    extra = "".join(f' {k}="{v}"' for k, v in attrs.items() if v is not None)
    return f'<text x="{x:.1f}" y="{y}"{extra}>{escape(content)}</text>'
