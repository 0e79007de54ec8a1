"""A run folder -> one self-contained ``report.html``: what was run, the roles, the pictures, validation.

A run folder holds the files ``CHGResult.save`` writes (``chg_gates.safetensors``, ``chg_result.json``)
and optionally ``run.json`` (what was run: command, model, task, config), ``validation.json`` (any JSON
of validation numbers) and ``roles.csv``. Only the CHGResult files are required. A folder holding a
``ContrastiveResult`` instead (``chg-tlens contrastive``) gets the contrastive page: the before/after
table, the heads closed in every seed, convergence and pictures.

The page needs nothing outside itself: pictures are inline base64 PNGs, the CSS is inline, and the one
small script (which surfaces script errors and images that fail to decode, for readers and for
headless-browser tests) is allowed by hash in a Content-Security-Policy that forbids every fetch.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from chg_tlens.analysis.circuit import CIRCUIT_HTML
from chg_tlens.analysis.error_bars import RoleErrorBars
from chg_tlens.app import plot
from chg_tlens.core.result import ROLES, UNCLASSIFIED, CHGResult, ContrastiveResult
from chg_tlens.core.result_files import META_FILE, TENSORS_FILE, ResultFileError
from chg_tlens.errors import InputError

ROLES_FILE = "roles.csv"
RUN_FILE = "run.json"
"""What the run was: the command line, the model and task, the threshold."""
VALIDATION_FILE = "validation.json"
"""What ``chg-tlens validate`` found, shown in the report when present."""
REPORT_FILE = "report.html"
PROMPT_RESAMPLES_DIR = "prompt_resamples"
"""Where a run folder keeps the gate sets fitted on bootstrap resamples of its prompts
(``chg-tlens fit --prompt-resamples N``)."""
ERROR_BARS_FILE = "error_bars.csv"
DEFAULT_THRESHOLD = 0.5
MAX_LIST_ITEMS = 64
"""Longer JSON lists (and matrices with more rows) are cut in the page, with a note saying how many."""

FIGURE_CAPTIONS = {
    "heatmaps": "Gates and role scores per head (layer down, head across), mean over seeds. "
                "Facilitating = G\u2212, interfering = 1 \u2212 G+, irrelevant = G+ (1 \u2212 G\u2212).",
    "role_map": "Role of each head: the role most seeds give it.",
    "seed_agreement": "Fraction of seeds that agree with each head's majority role (1 = every seed).",
    "gate_scatter": "G+ against G\u2212 for every head and seed, coloured by that seed's role; dashed "
                    "lines are where a role's score equals the threshold.",
    "role_shares": "Share of heads in each role, per seed.",
    "validation_ablation": "Targeted ablation on held-out data: heads set to 0 cumulatively in order of "
                           "their role score; from G+ facilitating should fall and irrelevant stay flat, "
                           "from the full model interfering should rise; shaded: random head orders.",
    "loss_curves": "Loss per update in each stage: each seed thin, the mean thick, mean target NLL dashed.",
    "role_trace": "Role of every head (rows, layer by layer) at each snapshot of the G+/G\u2212 fit "
                  "(columns, by update), per seed: straight bands = settled roles; changes near the right "
                  "edge = roles the fit had not settled when it ended.",
    "gate_map": "Gate per head (layer down, head across), mean over seeds: boxed solid red = closed in every "
                "seed, dashed orange = closed in some seeds only.",
}


def write_report(
    run_folder: str | os.PathLike,
    output: str | os.PathLike | None = None,
    threshold: float | None = None,
) -> Path:
    """Read a run folder and write its HTML report (default ``<run_folder>/report.html``); return the path.

    ``threshold`` (the role score cut-off; for a ContrastiveResult the closing one) defaults to the one
    recorded in ``run.json``, else 0.5 (a ContrastiveResult: its fit's own).
    """
    folder = Path(run_folder)
    if not folder.is_dir():
        found = "a file" if folder.exists() else "nothing"
        raise FileNotFoundError(f"run_folder: expected a folder holding {TENSORS_FILE} and {META_FILE}, "
                                f"found {found} at {folder}.")
    result = load_run_result(folder)
    run = _read_json(folder / RUN_FILE)
    target = Path(output) if output is not None else folder / REPORT_FILE
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()
             and not p.name.startswith(".") and p.resolve() != target.resolve()}
    if isinstance(result, ContrastiveResult):
        if threshold is None:
            threshold = _recorded_threshold(run, result.config.get("threshold", DEFAULT_THRESHOLD))
        page = render_contrastive_report(result, run=run, threshold=threshold, files=files,
                                         title=folder.resolve().name)
        return _write_page(page, target)
    validation = _read_json(folder / VALIDATION_FILE)
    if threshold is None:
        threshold = _recorded_threshold(run)
    validation_pictures = {p.stem: p.read_bytes()
                           for p in sorted((folder / "pictures").glob("validation_*.png"))}
    resamples = folder / PROMPT_RESAMPLES_DIR
    bars = RoleErrorBars(result, CHGResult.load(resamples), threshold) if resamples.is_dir() else None
    page = render_report(result, run=run, validation=validation, threshold=threshold, files=files,
                         title=folder.resolve().name, validation_pictures=validation_pictures,
                         circuit_page=CIRCUIT_HTML if (folder / CIRCUIT_HTML).is_file() else None,
                         error_bars=bars)
    return _write_page(page, target)


def load_run_result(folder: str | os.PathLike) -> CHGResult | ContrastiveResult:
    """The result a run folder holds, of the kind its ``chg_result.json`` names (``format``).

    A folder without a readable kind is read as a CHGResult, whose loader says what is wrong with it.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        meta = None
    kind = meta.get("format") if isinstance(meta, dict) else None
    if kind == f"chg_tlens.{ContrastiveResult.__name__}":
        return ContrastiveResult.load(folder)
    return CHGResult.load(folder)


def render_report(
    result: CHGResult,
    run: dict[str, Any] | None = None,
    validation: Any = None,
    threshold: float = DEFAULT_THRESHOLD,
    files: dict[str, int] | None = None,
    title: str | None = None,
    validation_pictures: dict[str, bytes] | None = None,
    circuit_page: str | None = None,
    error_bars: RoleErrorBars | None = None,
) -> str:
    """The report page as a string, for a result in memory (``write_report`` adds the folder's files).
    ``error_bars``: the same seeds beside gate sets fitted on resamples of the prompts, shown by source.

    ``validation_pictures`` maps a name to PNG bytes (``chg-tlens validate`` writes ablation curves);
    ``circuit_page`` is the relative address of the run's circuit page (``chg-tlens circuit``), linked.
    """
    if not isinstance(result, CHGResult):
        raise InputError(f"result: expected a chg_tlens.CHGResult, got {type(result).__name__}.")
    _check_run(run)
    result.role_labels(threshold)  # rejects a bad threshold before any drawing
    run = run or {}
    model, task = _model_and_task(result, run)
    heading = "CHG report: " + " \u00b7 ".join(x for x in (model, task) if x) if (model or task) \
        else "CHG report"
    sections = [
        _section("What was run", _key_facts(result, run, threshold)),
        _section("Roles", _roles_html(result, threshold)),
        _section("Convergence", _convergence_html(result, threshold), section_id="convergence"),
        _section("Error bars by source", _error_bars_html(result, error_bars, threshold),
                 section_id="error-bars"),
        _section("Pictures", _figures_html(result, threshold)),
    ]
    if validation is not None or validation_pictures:
        content = "" if validation is None else _json_html(validation)
        content += _png_figures(validation_pictures or {})
        sections.append(_section("Validation", content, section_id="validation"))
    if circuit_page:
        sections.append(_section("Circuit", f'<p><a href="{_e(circuit_page)}">{_e(circuit_page)}</a>: the '
                                 "facilitating heads wired into a circuit, each edge through the receiver's "
                                 "query, key or value, with intervals over prompts (written by "
                                 "<code>chg-tlens circuit</code>).</p>", section_id="circuit"))
    sections.append(_section("Details", _details_html(result, run, files)))
    return _page(heading, title or heading, "\n".join(sections))


def render_contrastive_report(
    result: ContrastiveResult,
    run: dict[str, Any] | None = None,
    threshold: float | None = None,
    files: dict[str, int] | None = None,
    title: str | None = None,
) -> str:
    """The page of a contrastive run: what was run, before/after, the closed heads, convergence, pictures.

    ``threshold`` (a head is closed when its gate ends below it) defaults to the fit's own.
    """
    if not isinstance(result, ContrastiveResult):
        raise InputError(f"result: expected a chg_tlens.ContrastiveResult, got {type(result).__name__}.")
    _check_run(run)
    threshold = result.config.get("threshold", DEFAULT_THRESHOLD) if threshold is None else threshold
    result.closed(threshold)  # rejects a bad threshold before any drawing
    run = run or {}
    model, function = _model_and_function(result, run)
    heading = "Contrastive CHG report: " + " \u00b7 ".join(x for x in (model, function) if x) \
        if (model or function) else "Contrastive CHG report"
    sections = [
        _section("What was run", _contrastive_facts(result, run, threshold)),
        _section("Before and after", _before_after_html(result), section_id="before-after"),
        _section("Closed heads", _closed_heads_html(result, threshold), section_id="closed-heads"),
        _section("Convergence", _convergence_html(result, threshold), section_id="convergence"),
        _section("Pictures", _figures_html(result, threshold)),
        _section("Details", _details_html(result, run, files)),
    ]
    return _page(heading, title or heading, "\n".join(sections))


# --------------------------------------------------------------------------- sections
def _key_facts(result: CHGResult, run: dict[str, Any], threshold: float) -> str:
    config = result.config
    model, task = _model_and_task(result, run)
    clamp = f"{config['clamp_mode']} at {config.get('clamp')}" if "clamp_mode" in config else None
    return _facts_html(result, run, {"model": model, "task": task}, "updates per stage",
                       {"clamp": clamp, "role threshold": threshold})


def _contrastive_facts(result: ContrastiveResult, run: dict[str, Any], threshold: float) -> str:
    model, function = _model_and_function(result, run)
    return _facts_html(result, run, {"model": model, "function": function, "retain view": run.get("retain")},
                       "updates", {"log-prob clamp": result.config.get("logprob_clamp"),
                                   "closing threshold": threshold,
                                   "evaluated on": result.provenance.get("evaluated_on")})


def _facts_html(result: CHGResult | ContrastiveResult, run: dict[str, Any], gated: dict[str, Any],
                steps_name: str, method: dict[str, Any]) -> str:
    """The "what was run" table: the command, what was gated (``gated``), heads, seeds and the fit's
    settings, the method's own (``method``), then the data and the time; empty entries left out."""
    provenance, config = result.provenance, result.config
    n_seeds, n_layers, n_heads = plot.head_layout(result)
    facts: dict[str, Any] = {
        "command": run.get("command"),
        **gated,
        "heads": f"{n_layers} layers \u00d7 {n_heads} heads = {n_layers * n_heads}",
        "seeds": n_seeds,
        steps_name: config.get("steps"),
        "batch size": config.get("batch_size"),
        "\u03bb": config.get("lam"),
        **method,
        "examples": provenance.get("n_examples"),
        "fit time (s)": provenance.get("seconds"),
        "created": provenance.get("created"),
    }
    if isinstance(facts["command"], list):
        facts["command"] = " ".join(str(part) for part in facts["command"])
    rows = {k: v for k, v in facts.items() if v not in (None, "")}
    return _key_value_table(rows, code_keys={"command"})


def _before_after_html(result: ContrastiveResult) -> str:
    if not result.metrics:
        return "<p>This result records no before/after numbers.</p>"
    where = {"eval_data": "held-out items"}.get(result.provenance.get("evaluated_on"), "the training items")
    note = (f"<p>Accuracy and mean target log-prob on {_e(where)}: <em>before</em> with every gate open, "
            "<em>after</em> with each seed's gates (mean over seeds, and the lowest and highest seed). "
            "Retain should hold, forget should fall.</p>")
    table = result.table().to_html(index=False, float_format=lambda v: f"{v:.3g}",
                                   table_id="before-after-table")
    return note + table


def _closed_heads_html(result: ContrastiveResult, threshold: float) -> str:
    closed = result.closed(threshold)
    listed = [(str(seed), result.closed_heads(threshold, seed=seed)) for seed in range(closed.shape[0])]
    listed.append(("every seed", result.closed_heads(threshold)))
    rows = []
    for name, heads in listed:
        css = ' class="consensus" id="closed-every-seed"' if name == "every seed" else ""
        rows.append(f'<tr{css}><th>{_e(name)}</th><td class="num">{len(heads)}</td>'
                    f'<td class="heads">{_e(_heads_text(heads))}</td></tr>')
    note = (f"<p>Heads whose gate ends below {_e(_number(threshold))}, per seed; the last row holds the "
            f"heads closed in every seed (of {closed.shape[1] * closed.shape[2]} heads).</p>")
    return (note + '<table class="closed" id="closed-heads-table"><thead><tr><th>seed</th><th>closed</th>'
            f"<th>heads (layer, head)</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _heads_text(heads: list[tuple[int, int]]) -> str:
    return ", ".join(f"L{layer}H{head}" for layer, head in heads) or "none"


def _convergence_html(result: CHGResult | ContrastiveResult, threshold: float) -> str:
    """In words per stage, then the figures behind the words: a user should not read noise as roles (or,
    for a ContrastiveResult, as closed heads; ``threshold`` is then the closing one)."""
    if not result.trace:
        return "<p>This result carries no trace (saved by an older chg_tlens): convergence unknown.</p>"
    frame = result.convergence(threshold)
    words = "".join(f"<li>{_e(line)}</li>" for line in result.convergence_text(threshold).splitlines())
    columns = ["stage", "seed", "updates", "stopped_at", "settled_at", "example_passes", "window", "flips",
               "borderline", "flips_of", "drift", "loss_change", "loss_noise", "undecided_at_initial",
               "gradient", "gap", "certified", "certified_by", "advice"]
    table = frame[columns].to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-")
    return f"<ul>{words}</ul>{table}"


def _error_bars_html(result: CHGResult, bars: RoleErrorBars | None, threshold: float) -> str:
    """The three things that move a role, side by side: the optimiser (how long each head has held its
    role in the certificate window), the initial gates (seeds) and the sample of prompts (resamples)."""
    if bars is None:
        if not result.trace:
            return "<p>No trace and no prompt resamples: no error bars.</p>"
        stability = result.confidence(threshold, source="optimiser").numpy()
        seeds = result.confidence(threshold, source="seeds").numpy()
        rows = [("optimiser", float(stability.mean()), float((stability == 1.0).mean()), 1),
                ("seeds", float(seeds.mean()), float((seeds == 1.0).mean()), result.n_seeds)]
        frame = pd.DataFrame(rows, columns=["source", "mean_agreement", "heads_all_agree", "gate_sets"])
        note = ("<p>Per source, the mean share of gate sets (or, for the optimiser, of the certificate "
                "window's snapshots) agreeing with each head's role, and the share of heads on which all "
                "agree. The sample of prompts is not measured for this run: fit with "
                "<code>--prompt-resamples N</code> (<code>chg_tlens.error_bars</code>) to add it.</p>")
    else:
        frame = bars.summary().reset_index()
        note = ("<p>Per source, the mean share of gate sets agreeing with seed 0's role per head (optimiser: "
                "of the certificate window's snapshots), the share of heads on which all agree, and "
                "whether every stage of every gate set is certified. <code>error_bars.csv</code> holds "
                "the per-head shares.</p>")
    table = frame.to_html(index=False, float_format=lambda v: f"{v:.3g}", na_rep="-")
    return note + table.replace('<table border="1" class="dataframe">', '<table id="error-bars-table">', 1)


def _roles_html(result: CHGResult, threshold: float) -> str:
    summary = result.summary(threshold)
    columns = list(ROLES) + [UNCLASSIFIED]
    head = "".join(f"<th>{_e(c)}</th>" for c in ["seed"] + columns)
    rows = []
    for seed, row in summary.iterrows():
        cells = "".join(f'<td class="num">{100 * float(row[c]):.1f}%</td>' for c in columns)
        css = ' class="consensus"' if seed == "every seed" else ""
        rows.append(f"<tr{css}><th>{_e(seed)}</th>{cells}</tr>")
    table = (f'<table class="roles" id="role-summary"><thead><tr>{head}</tr></thead>'
             f"<tbody>{''.join(rows)}</tbody></table>")
    note = (f"<p>Share of the {result.n_layers * result.n_heads} heads in each role (score \u2265 "
            f"{_e(_number(threshold))}); the last row counts heads with the same role in every seed.</p>")
    consensus = result.roles(threshold)
    items = []
    for role in columns:
        heads = consensus[role]
        listed = _heads_text(heads)
        items.append(f'<tr data-role="{_e(role)}"><th><span class="swatch" style="background:'
                     f'{plot.ROLE_COLORS[role]}"></span>{_e(role)}</th><td class="num">{len(heads)}</td>'
                     f'<td class="heads">{_e(listed)}</td></tr>')
    heads_table = ('<table class="consensus-heads" id="consensus-heads"><thead><tr><th>role</th>'
                   "<th>heads</th><th>same role in every seed (layer, head)</th></tr></thead>"
                   f"<tbody>{''.join(items)}</tbody></table>")
    return note + table + "<h3>Heads with the same role in every seed</h3>" + heads_table


def _figures_html(result: CHGResult | ContrastiveResult, threshold: float) -> str:
    return _png_figures({name: plot.figure_png(figure, dpi=100)
                         for name, figure in plot.figures(result, threshold).items()})


def _png_figures(pictures: dict[str, bytes]) -> str:
    if not pictures:
        return ""
    blocks = []
    for name, png in pictures.items():
        encoded = base64.b64encode(png).decode("ascii")
        caption = FIGURE_CAPTIONS.get(name, name.replace("_", " "))
        blocks.append(
            f'<figure id="fig-{_e(name)}"><img class="plot" data-plot="{_e(name)}" alt="{_e(caption)}" '
            f'src="data:image/png;base64,{encoded}"><figcaption>{_e(caption)}</figcaption></figure>'
        )
    return '<div class="figures">' + "\n".join(blocks) + "</div>"


def _details_html(result: CHGResult | ContrastiveResult, run: dict[str, Any],
                  files: dict[str, int] | None) -> str:
    parts = []
    if run:
        parts.append(f"<h3>{_e(RUN_FILE)}</h3>" + _key_value_table(_flatten(run)))
    if result.config:
        parts.append("<h3>Fit configuration</h3>" + _key_value_table(_flatten(result.config)))
    if result.provenance:
        parts.append("<h3>Provenance</h3>" + _key_value_table(_flatten(result.provenance)))
    if files:
        sizes = {name: _size(size) for name, size in files.items()}
        parts.append("<h3>Files in the run folder</h3>" + _key_value_table(sizes, code_keys=set()))
    return "\n".join(parts) or "<p>No details recorded.</p>"


# --------------------------------------------------------------------------- JSON -> HTML
def _json_html(value: Any, depth: int = 0) -> str:
    """Any JSON value as tables: scalars in key/value tables, lists of records and matrices as grids."""
    if _is_scalar(value):
        return f"<p>{_cell(value)}</p>"
    if isinstance(value, dict):
        flat = {k: v for k, v in value.items() if _is_scalar(v) or _is_scalar_list(v)}
        parts = [_key_value_table(flat)] if flat else []
        level = min(3 + depth, 6)
        for key, item in value.items():
            if key not in flat:
                parts.append(f"<h{level}>{_e(key)}</h{level}>" + _json_html(item, depth + 1))
        return "\n".join(parts) or "<p>(empty)</p>"
    if isinstance(value, list):
        if not value:
            return "<p>(empty list)</p>"
        if _is_scalar_list(value):
            return f"<p>{_list_text(value)}</p>"
        shown, cut = value[:MAX_LIST_ITEMS], len(value) - MAX_LIST_ITEMS
        more = f'<p class="note">\u2026 {cut} more rows not shown.</p>' if cut > 0 else ""
        if all(isinstance(item, dict) for item in value):
            columns: list[str] = []
            for item in shown:
                columns += [str(k) for k in item if str(k) not in columns]
            head = "".join(f"<th>{_e(c)}</th>" for c in columns)
            body = "".join("<tr>" + "".join(_td({str(k): v for k, v in item.items()}.get(c, ""))
                                            for c in columns) + "</tr>" for item in shown)
            return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}'
        if all(_is_scalar_list(item) for item in value):
            width = max(len(item) for item in shown)
            head = "<th></th>" + "".join(f"<th>{j}</th>" for j in range(width))
            body = "".join(f"<tr><th>{i}</th>" + "".join(_td(v) for v in row) + "</tr>"
                           for i, row in enumerate(shown))
            return f'<table class="data"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>{more}'
        items = "".join(f"<li>{_json_html(item, depth + 1)}</li>" for item in shown)
        return f"<ol start=\"0\">{items}</ol>{more}"
    return f"<p>{_e(repr(value))}</p>"


def _key_value_table(rows: dict[str, Any], code_keys: set[str] | None = None) -> str:
    code_keys = code_keys or set()
    body = []
    for key, value in rows.items():
        cell = f"<td><code>{_e(value)}</code></td>" if key in code_keys else _td(value)
        body.append(f"<tr><th>{_e(key)}</th>{cell}</tr>")
    return f'<table class="kv"><tbody>{"".join(body)}</tbody></table>'


def _td(value: Any) -> str:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return f'<td class="num">{_cell(value)}</td>' if numeric else f"<td>{_cell(value)}</td>"


def _cell(value: Any) -> str:
    if _is_scalar_list(value):
        return _list_text(value)
    if _is_scalar(value):
        return _e(_number(value))
    return f"<code>{_e(json.dumps(value, default=str)[:2000])}</code>"


def _list_text(values: list) -> str:
    shown = ", ".join(_number(v) for v in values[:MAX_LIST_ITEMS])
    more = f" \u2026 ({len(values) - MAX_LIST_ITEMS} more)" if len(values) > MAX_LIST_ITEMS else ""
    return _e(f"[{shown}{more}]")


def _number(value: Any) -> str:
    if value is None:
        return "\u2014"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(value) if not math.isfinite(value) else f"{value:.4g}"
    return str(value)


def _flatten(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys, so a config reads as one two-column table."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _is_scalar_list(value: Any) -> bool:
    return isinstance(value, list) and all(_is_scalar(v) for v in value)


# --------------------------------------------------------------------------- page
_ERROR_SCRIPT = """
(function () {
  "use strict";
  var errors = [];
  var box = document.getElementById("page-errors");
  function record(message) {
    errors.push(String(message));
    box.textContent = "Problems on this page:\\n" + errors.join("\\n");
    box.hidden = false;
    document.body.setAttribute("data-page-errors", String(errors.length));
  }
  window.addEventListener("error", function (event) {
    var target = event.target;
    if (target && target !== window && target.tagName) {
      target.setAttribute("data-failed", "yes");
      record("failed to load <" + target.tagName.toLowerCase() + "> " + (target.alt || ""));
    } else {
      record(event.message || "script error");
    }
  }, true);
  window.addEventListener("unhandledrejection", function (event) {
    record("unhandled promise rejection: " + event.reason);
  });
  document.addEventListener("securitypolicyviolation", function (event) {
    record("blocked by the page's security policy: " + event.blockedURI);
  });
  window.addEventListener("load", function () {
    Array.prototype.forEach.call(document.images, function (image) {
      if (!image.hasAttribute("data-failed") && (!image.complete || image.naturalWidth === 0)) {
        record("image did not decode: " + image.alt);
      }
    });
    document.body.setAttribute("data-page-check", "done");
  });
  document.body.setAttribute("data-page-errors", "0");
})();
"""

_CSS = """
:root { color-scheme: light; }
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1d1d1f;
       background: #fff; max-width: 1280px; margin: 0 auto; padding: 16px 28px 48px; }
h1 { font-size: 1.6em; margin: 0.4em 0 0.2em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 1.6em; }
h3 { font-size: 1.05em; margin: 1.2em 0 0.4em; }
h4, h5, h6 { font-size: 0.95em; margin: 1em 0 0.3em; }
table { border-collapse: collapse; margin: 0.4em 0 0.8em; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
thead th { background: #f3f3f5; }
tbody th { background: #fafafa; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.heads { max-width: 780px; word-wrap: break-word; font-family: ui-monospace, monospace; font-size: 0.9em; }
tr.consensus td, tr.consensus th { border-top: 2px solid #999; font-weight: 600; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, monospace; font-size: 0.92em;
       white-space: pre-wrap; word-break: break-all; }
.swatch { display: inline-block; width: 0.8em; height: 0.8em; margin-right: 6px; border-radius: 2px; }
.figures { display: flex; flex-wrap: wrap; gap: 8px 28px; align-items: flex-start; }
figure { margin: 0.6em 0 1.2em; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 4px; max-width: 640px; }
.note { color: #666; font-size: 0.9em; }
.page-errors { background: #fdecea; color: #8a1c12; border: 1px solid #f5c2bc; padding: 8px 12px; }
footer { margin-top: 3em; color: #888; font-size: 0.85em; }
"""


def _page(heading: str, title: str, body: str) -> str:
    from chg_tlens import __version__

    script_hash = base64.b64encode(hashlib.sha256(_ERROR_SCRIPT.encode("utf-8")).digest()).decode("ascii")
    policy = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
              f"script-src 'sha256-{script_hash}'; base-uri 'none'; form-action 'none'")
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{_e(policy)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title>
<style>{_CSS}</style>
</head>
<body>
<pre id="page-errors" class="page-errors" hidden></pre>
<script>{_ERROR_SCRIPT}</script>
<h1>{_e(heading)}</h1>
{body}
<footer>Written by chg_tlens {_e(__version__)}: Causal Head Gating (Nam et al., 2025).</footer>
</body>
</html>
"""


def _section(heading: str, content: str, section_id: str | None = None) -> str:
    anchor = section_id or heading.lower().replace(" ", "-")
    return f'<section id="{_e(anchor)}">\n<h2>{_e(heading)}</h2>\n{content}\n</section>'


# --------------------------------------------------------------------------- inputs
def _read_json(path: Path) -> Any:
    """The file's JSON, or None when the optional file is absent; a broken file fails loudly."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ResultFileError(f"{path} is not valid JSON: {error}") from None


def _recorded_threshold(run: Any, default: float = DEFAULT_THRESHOLD) -> float:
    if isinstance(run, dict):
        for source in (run, run.get("config")):
            if isinstance(source, dict) and isinstance(source.get("threshold"), (int, float)) \
                    and not isinstance(source.get("threshold"), bool):
                return float(source["threshold"])
    return default


def _check_run(run: Any) -> None:
    if run is not None and not isinstance(run, dict):
        raise InputError(f"run: expected a dict (the contents of {RUN_FILE}), got {type(run).__name__}.")


def _write_page(page: str, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(page, encoding="utf-8")
    return target


def _model_and_function(result: ContrastiveResult, run: dict[str, Any]) -> tuple[str, str]:
    """The model and the function task of a contrastive run (``run.json``'s ``function``, else the data's)."""
    model, task = _model_and_task(result, run)
    data_meta = result.provenance.get("data_meta") or {}
    recorded = data_meta.get("function") if isinstance(data_meta, dict) else None
    return model, str(run.get("function") or recorded or task)


def _model_and_task(result: CHGResult | ContrastiveResult, run: dict[str, Any]) -> tuple[str, str]:
    model = run.get("model") or result.provenance.get("model_name") or ""
    data_meta = result.provenance.get("data_meta") or {}
    task = run.get("task") or (data_meta.get("task") if isinstance(data_meta, dict) else None) or ""
    if isinstance(model, dict):
        model = model.get("name") or json.dumps(model, default=str)
    if isinstance(task, dict):
        task = task.get("name") or json.dumps(task, default=str)
    return str(model), str(task)


def _size(n_bytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return f"{n_bytes} B"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


__all__ = ["REPORT_FILE", "ROLES_FILE", "RUN_FILE", "VALIDATION_FILE", "load_run_result",
           "render_contrastive_report", "render_report", "write_report"]
