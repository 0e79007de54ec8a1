"""A circuit drawn as self-contained HTML: inline SVG, inline CSS, one small inline script, nothing fetched.

Layers holding nodes are rows (the first on top, the logits at the bottom), heads sit at their head
index, coloured by role. An edge's colour is its sign (blue: helps the clean answer, red: works
against it), its width its size, its dash the receiver's input (query dashed, key dotted, value solid;
it also lands on the left, middle or right of the receiver; an edge passing rows runs down a gap
between head columns); edges below the threshold are drawn faint (a checkbox hides them). Hovering
a node or an edge shows its numbers (the script fills a tooltip; every element also has an SVG
``<title>``, so the numbers show where scripts do not run). The page forbids every fetch in its
Content-Security-Policy and allows its one script by hash; the notebook fragment is the same drawing
without the policy.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
import uuid
from dataclasses import dataclass, field
from typing import Any

from chg_tlens.core.result_html import ROLE_COLOURS

POSITIVE, NEGATIVE = "#2166ac", "#b2182b"
NODE_COLOUR = "#9ecae1"
"""Nodes picked from a score map or a list have no role."""
DASHES = {"q": "8 4", "k": "2 3", "v": "", "logits": ""}
INPUT_NAMES = {"q": "query", "k": "key", "v": "value", "logits": "logits"}
PORTS = {"q": -9.0, "k": 0.0, "v": 9.0, "logits": 0.0}
"""Where an edge lands on its receiver, left to right."""
RADIUS, ROW_GAP, TOP, LEFT = 15.0, 110.0, 40.0, 64.0
MANY_EDGES = 300
"""Above this many edges, those below the threshold start hidden (a checkbox shows them)."""


@dataclass(frozen=True)
class DrawnNode:
    name: str
    layer: int
    head: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DrawnEdge:
    sender: str
    receiver: str
    input: str
    effect: float
    low: float
    high: float
    kept: bool


@dataclass(frozen=True)
class Drawing:
    """What the page shows: plain values, so this module needs nothing from the circuit's own module."""

    nodes: list[DrawnNode]
    edges: list[DrawnEdge]
    n_layers: int
    n_heads: int
    facts: dict[str, str] = field(default_factory=dict)
    model: str = ""


_SCRIPT = """
(function () {
  "use strict";
  var root = document.currentScript.closest(".chg-circuit");
  var tip = root.querySelector(".circuit-tip");
  root.addEventListener("mouseover", function (event) {
    var item = event.target.closest("[data-tip]");
    if (!item) { return; }
    tip.textContent = item.getAttribute("data-tip");
    tip.setAttribute("data-for", item.getAttribute("data-node") || item.getAttribute("data-edge"));
    tip.style.left = ((event.clientX || 0) + 14) + "px";
    tip.style.top = ((event.clientY || 0) + 14) + "px";
    tip.hidden = false;
  });
  root.addEventListener("mouseout", function (event) {
    if (event.target.closest("[data-tip]")) { tip.hidden = true; }
  });
  root.setAttribute("data-ready", "yes");
})();
"""

_CSS = """
.chg-circuit { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f; }
.chg-circuit table { border-collapse: collapse; margin: 0.4em 0 0.8em; font-size: 0.9em; }
.chg-circuit th, .chg-circuit td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
.chg-circuit svg.circuit-graph { display: block; max-width: 100%; height: auto; }
.chg-circuit .legend svg { vertical-align: middle; }
.chg-circuit .edge { fill: none; stroke-linecap: round; pointer-events: stroke; }
.chg-circuit .edge.cut { opacity: 0.18; }
.chg-circuit .show-cut:not(:checked) ~ svg .edge.cut { display: none; }
.chg-circuit .edge:hover { opacity: 1; filter: drop-shadow(0 0 2px #000); }
.chg-circuit .node circle { stroke: #333; stroke-width: 1.2; }
.chg-circuit .node:hover circle { stroke-width: 3; }
.chg-circuit .node text, .chg-circuit .label { font-size: 11px; pointer-events: none; }
.chg-circuit .circuit-tip { position: fixed; z-index: 10; background: #fffff4; border: 1px solid #888;
  padding: 4px 8px; white-space: pre; font-size: 12px; box-shadow: 0 1px 4px rgba(0,0,0,.25); }
.chg-circuit .legend span { margin-right: 14px; white-space: nowrap; }
"""


def circuit_page(drawing: Drawing, title: str | None = None) -> str:
    """A whole HTML page: the facts, a legend, the graph, and a policy forbidding every fetch."""
    heading = title or ("Circuit" + (f": {drawing.model}" if drawing.model else ""))
    script_hash = base64.b64encode(hashlib.sha256(_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    policy = (f"default-src 'none'; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'; "
              "base-uri 'none'; form-action 'none'")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(policy)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(heading)}</title>
<style>body {{ margin: 0 auto; padding: 12px 24px 40px; max-width: 1400px; background: #fff; }}{_CSS}</style>
</head>
<body>
{_body(drawing, heading)}
</body>
</html>
"""


def circuit_fragment(drawing: Drawing) -> str:
    """The drawing for a notebook cell (no page, no policy)."""
    return f"<style>{_CSS}</style>\n{_body(drawing, None)}"


# --------------------------------------------------------------------------- pieces
def _body(drawing: Drawing, heading: str | None) -> str:
    facts = "".join(f"<tr><th>{_e(key)}</th><td>{_e(value)}</td></tr>"
                    for key, value in drawing.facts.items())
    counts = (f"{len(drawing.nodes)} nodes, {sum(e.kept for e in drawing.edges)} of {len(drawing.edges)} "
              "measured edges kept")
    return ('<div class="chg-circuit">\n'
            + (f"<h1>{_e(heading)}</h1>\n" if heading else "")
            + f'<p class="counts">{_e(counts)}</p>\n<table class="facts">{facts}</table>\n'
            + _legend(drawing) + "\n" + _cut_toggle(drawing) + "\n" + _svg(drawing)
            + '\n<div class="circuit-tip" hidden></div>\n'
            + f"<script>{_SCRIPT}</script>\n</div>")


def _cut_toggle(drawing: Drawing) -> str:
    """A checkbox (plain CSS, no script) that hides the edges below the threshold; they stay in the page.
    Shown by default unless there are more than ``MANY_EDGES`` edges."""
    checked = " checked" if len(drawing.edges) <= MANY_EDGES else ""
    name = f"show-cut-{uuid.uuid4().hex[:12]}"  # one page (or notebook) may hold several circuits
    return (f'<input type="checkbox" class="show-cut" id="{name}"{checked}>'
            f'<label for="{name}"> show the edges below the threshold</label>')


def _legend(drawing: Drawing) -> str:
    roles = sorted({node.info.get("role", "node") for node in drawing.nodes})
    parts = [f'<span><svg width="14" height="14"><circle cx="7" cy="7" r="6" fill="{_colour(role)}" '
             f'stroke="#333"/></svg> {_e(role)}</span>' for role in roles]
    for kind in ("q", "k", "v", "logits"):
        parts.append(f'<span><svg width="36" height="10"><line x1="2" y1="5" x2="34" y2="5" '
                     f'stroke="#555" stroke-width="2.5" stroke-dasharray="{DASHES[kind]}"/></svg> '
                     f"{INPUT_NAMES[kind]}</span>")
    parts.append(f'<span style="color:{POSITIVE}">\u25a0 helps the clean answer</span>')
    parts.append(f'<span style="color:{NEGATIVE}">\u25a0 works against it</span>')
    parts.append("<span>faint: below the threshold</span>")
    return f'<p class="legend">{"".join(parts)}</p>'


def _svg(drawing: Drawing) -> str:
    rows = sorted({node.layer for node in drawing.nodes})
    row_of = {layer: i for i, layer in enumerate(rows)}
    step = min(90.0, max(36.0, 960.0 / max(drawing.n_heads, 1)))
    width = LEFT + drawing.n_heads * step + 24
    logits_y = TOP + len(rows) * ROW_GAP
    height = logits_y + 50
    where = {node.name: (LEFT + (node.head + 0.5) * step, TOP + row_of[node.layer] * ROW_GAP)
             for node in drawing.nodes}
    largest = max((abs(e.effect) for e in drawing.edges if math.isfinite(e.effect)), default=0.0) or 1.0
    parts = [f'<svg class="circuit-graph" xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" '
             f'height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" role="img" '
             f'aria-label="circuit graph">']
    for layer in rows:
        y = TOP + row_of[layer] * ROW_GAP
        parts.append(f'<line x1="{LEFT - 8}" y1="{y}" x2="{width - 12:.0f}" y2="{y}" stroke="#eee"/>'
                     f'<text class="label" x="8" y="{y + 4}">layer {layer}</text>')
    parts.append(f'<rect x="{LEFT - 8}" y="{logits_y - 12}" width="{width - LEFT - 4:.0f}" height="26" '
                 f'rx="6" fill="#f3f3f5" stroke="#999" data-node="logits"/>'
                 f'<text class="label" x="8" y="{logits_y + 5}">logits</text>')
    for edge in sorted(drawing.edges, key=lambda e: e.kept):  # kept edges on top of cut ones
        parts.append(_edge_svg(edge, where, logits_y, largest, step))
    for node in drawing.nodes:
        x, y = where[node.name]
        tip = _node_tip(node)
        role = node.info.get("role", "node")
        parts.append(f'<g class="node" data-node="{_e(node.name)}" data-role="{_e(role)}" '
                     f'data-tip="{_e(tip)}"><title>{_e(tip)}</title>'
                     f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{RADIUS}" fill="{_colour(role)}"/>'
                     f'<text x="{x:.1f}" y="{y + 4:.1f}" text-anchor="middle">{node.layer}.{node.head}'
                     "</text></g>")
    parts.append("</svg>")
    return "".join(parts)


def _edge_svg(edge: DrawnEdge, where: dict[str, tuple[float, float]], logits_y: float, largest: float,
              step: float) -> str:
    x0, y0 = where[edge.sender]
    y0 += RADIUS
    if edge.receiver == "logits":
        x1, y1 = x0, logits_y - 12
    else:
        x1, y1 = where[edge.receiver]
        x1, y1 = x1 + PORTS[edge.input], y1 - RADIUS
    if any(y0 + RADIUS < y < y1 - RADIUS for _, y in where.values()):
        # rows in between: run down the gap between head columns nearest the middle, clear of their nodes
        nearest = LEFT + round(((x0 + x1) / 2 - LEFT) / step) * step
        gap = (x0 + step / 2 + 5.0 if edge.receiver == "logits" else nearest) + PORTS[edge.input] / 3.0
        if edge.receiver == "logits":
            x1 = gap
        top, bottom = y0 + 0.35 * ROW_GAP, y1 - 0.35 * ROW_GAP
        path = (f"M{x0:.1f},{y0:.1f} C{x0:.1f},{top:.1f} {gap:.1f},{y0:.1f} {gap:.1f},{top:.1f} "
                f"L{gap:.1f},{bottom:.1f} C{gap:.1f},{y1:.1f} {x1:.1f},{bottom:.1f} {x1:.1f},{y1:.1f}")
    else:
        bend, middle = PORTS[edge.input] / 9.0 * 0.35 * step, (y0 + y1) / 2
        path = (f"M{x0:.1f},{y0:.1f} C{x0 + bend:.1f},{middle:.1f} {x1 + bend:.1f},{middle:.1f} "
                f"{x1:.1f},{y1:.1f}")
    size = abs(edge.effect) if math.isfinite(edge.effect) else 0.0
    thickness = (1.0 + 7.0 * size / largest) if edge.kept else (0.6 + 2.0 * size / largest)
    colour = POSITIVE if edge.effect >= 0 else NEGATIVE
    tip = _edge_tip(edge)
    dash = f' stroke-dasharray="{DASHES[edge.input]}"' if DASHES.get(edge.input) else ""
    name = f"{edge.sender}>{edge.receiver}:{edge.input}"
    state = "kept" if edge.kept else "cut"
    return (f'<path class="edge kind-{_e(edge.input)} {state}" data-edge="{_e(name)}" data-tip="{_e(tip)}" '
            f'd="{path}" stroke="{colour}" stroke-width="{thickness:.2f}"{dash}>'
            f"<title>{_e(tip)}</title></path>")


def _node_tip(node: DrawnNode) -> str:
    info = node.info
    lines = [f"{node.name} (layer {node.layer}, head {node.head}): {info.get('role', 'node')}"]
    if "g_plus" in info:
        confidence = info.get("confidence")
        lines.append(f"G+ {_number(info['g_plus'])}   G\u2212 {_number(info['g_minus'])}   confidence "
                     + ("n/a" if confidence is None else _number(confidence)))
    if "score" in info:
        lines.append(f"score {_number(info['score'])}")
    if "ablation_effect" in info:
        lines.append(f"ablation effect {_number(info['ablation_effect'])} [{_number(info['ablation_low'])}, "
                     f"{_number(info['ablation_high'])}]")
    return "\n".join(lines)


def _edge_tip(edge: DrawnEdge) -> str:
    target = "logits (direct)" if edge.receiver == "logits" else f"{edge.receiver} {INPUT_NAMES[edge.input]}"
    return (f"{edge.sender} \u2192 {target}\neffect {_number(edge.effect)} [{_number(edge.low)}, "
            f"{_number(edge.high)}]\n" + ("kept" if edge.kept else "below the threshold"))


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, (int, float)) else str(value)


def _colour(role: Any) -> str:
    return ROLE_COLOURS.get(role, NODE_COLOUR) if isinstance(role, str) else NODE_COLOUR


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)
