"""The HTML report of a run folder: right roles, self-contained, escaped, and it renders in a browser.

The browser test needs Debian's ``chromium`` (CI installs it: ``apt-get install -y chromium``); without
it the test fails rather than skips, so a CI machine that lost it cannot pass silently.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from chg_tlens import CHGConfig, ContrastiveConfig, fit_chg, fit_contrastive_chg
from chg_tlens.app.report import load_run_result, render_contrastive_report, render_report, write_report
from chg_tlens.app.runs import write_contrastive_run_folder
from chg_tlens.core.result import CHGResult, ContrastiveResult
from chg_tlens.core.result_files import META_FILE, TENSORS_FILE, ResultFileError
from chg_tlens.errors import InputError

HOSTILE_TASK = "repeat & <b>bold</b>"
HOSTILE_COMMAND = ["chg-tlens", "fit", "--task", "<script>alert(1)</script>"]
HOSTILE_NOTE = "<img src=x onerror=alert(2)>"
VALIDATION = {
    "targeted_ablation": [
        {"role": "facilitating", "heads": 1, "delta_logprob": -2.3125},
        {"role": "interfering", "heads": 1, "delta_logprob": 0.8437},
    ],
    "accuracy": {"clean": 0.98, "gated": 0.97},
    "note": HOSTILE_NOTE,
}
N_PICTURES = 7  # the standard six, and roles over updates (a fitted result carries its trace)
VIRIDIS_YELLOW = np.array([253, 231, 37])  # the colour of an open gate (G+ = 1) in the heatmaps


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory, repeat):
    """A fitted planted circuit written as a run folder with every optional file."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer toy model: threads only contend with other jobs
    try:
        config = CHGConfig(n_seeds=3, steps=150, batch_size=32, progress=False)
        result = fit_chg(repeat.model, repeat.data(256, seed=0), config)
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("run")
    result.save(folder)
    run = {"command": HOSTILE_COMMAND, "model": "planted-repeat", "task": HOSTILE_TASK,
           "config": {"steps": 150, "threshold": 0.5}}
    (folder / "run.json").write_text(json.dumps(run))
    (folder / "validation.json").write_text(json.dumps(VALIDATION))
    result.to_frame().to_csv(folder / "roles.csv", index=False)
    return folder, result


@pytest.fixture(scope="module")
def planted_page(planted_run) -> str:
    """The planted run's report, written once for the tests that only read it."""
    folder, _ = planted_run
    return write_report(folder).read_text()


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory):
    """A small contrastive fit of the planted two-modes model, written as a contrastive run folder."""
    from chg_tlens.testbeds.planted import contrastive_circuit

    circuit = contrastive_circuit()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        config = ContrastiveConfig(n_seeds=2, steps=150, batch_size=32, progress=False)
        result = fit_contrastive_chg(circuit.model, circuit.data(128, 0), config,
                                     eval_data=circuit.data(64, 99))
    finally:
        torch.set_num_threads(threads)
    folder = tmp_path_factory.mktemp("contrastive")
    run = {"command": HOSTILE_COMMAND, "model": "planted-two-modes", "function": HOSTILE_TASK,
           "retain": "icl"}
    write_contrastive_run_folder(result, folder, run)
    return folder, result, circuit


def images_in(page: str) -> dict[str, bytes]:
    """data-plot name -> decoded PNG bytes of every inline picture."""
    found = re.findall(r'<img class="plot" data-plot="([^"]+)"[^>]*src="data:image/png;base64,([^"]*)"',
                       page)
    return {name: base64.b64decode(data) for name, data in found}


def test_report_lists_the_planted_roles(planted_run, repeat):
    folder, result = planted_run
    path = write_report(folder)
    assert path == folder / "report.html"
    page = path.read_text()
    for role in ("facilitating", "interfering", "irrelevant"):
        truth = repeat.heads_with_role(role)
        assert result.roles()[role] == truth  # the fit got it right, so the report must show it
        row = re.search(rf'<tr data-role="{role}">.*?<td class="num">(\d+)</td>'
                        rf'<td class="heads">([^<]*)</td>', page)
        assert row is not None
        assert int(row.group(1)) == len(truth)
        assert row.group(2) == ", ".join(f"L{layer}H{head}" for layer, head in truth)
    summary = re.search(r'<table class="roles" id="role-summary">(.*?)</table>', page).group(1)
    assert summary.count("<tr") == 1 + result.n_seeds + 1  # header, each seed, every seed
    assert "12.5%" in summary and "75.0%" in summary  # 1 of 8 heads facilitating, 6 of 8 irrelevant


def test_report_is_self_contained(planted_page):
    page = planted_page
    pictures = images_in(page)
    assert len(pictures) == N_PICTURES and "heatmaps" in pictures
    for name, data in pictures.items():
        image = Image.open(io.BytesIO(data))
        assert image.format == "PNG" and min(image.size) > 100, name
    assert len(re.findall(r"<img\b", page)) == N_PICTURES
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.IGNORECASE)
    assert "<link" not in page and not re.search(r"<script[^>]*\bsrc=", page)
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    policy = html.unescape(policy)
    assert "default-src 'none'" in policy and "img-src data:" in policy  # the page may fetch nothing


def test_report_escapes_every_text(planted_page):
    page = planted_page
    assert page.count("<script") == 1  # only the page's own error recorder
    assert "<b>bold</b>" not in page and "repeat &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert HOSTILE_NOTE not in page and "&lt;img src=x onerror=alert(2)&gt;" in page


def test_report_shows_validation_numbers_and_run_details(planted_run, planted_page):
    _, result = planted_run
    page = planted_page
    validation = re.search(r'<section id="validation">(.*?)</section>', page, re.DOTALL).group(1)
    assert "<h3>targeted_ablation</h3>" in validation
    assert '<td class="num">-2.312</td>' in validation and '<td class="num">0.8437</td>' in validation
    assert "<th>gated</th>" in validation and '<td class="num">0.97</td>' in validation
    assert "planted-repeat" in page and result.provenance["data_fingerprint"] in page
    assert "roles.csv" in page  # listed among the run folder's files


def test_report_needs_only_the_result_files(planted_run, tmp_path):
    folder, result = planted_run
    for name in (TENSORS_FILE, META_FILE):
        shutil.copy(folder / name, tmp_path / name)
    page = write_report(tmp_path).read_text()
    assert len(images_in(page)) == N_PICTURES
    assert 'id="role-summary"' in page and 'id="validation"' not in page
    assert "run.json" not in page
    assert "CHG report: planted-repeat" in page  # the model name comes from the provenance


def test_threshold_comes_from_run_json_unless_given(planted_run, tmp_path):
    folder, _ = planted_run
    for name in (TENSORS_FILE, META_FILE):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "run.json").write_text(json.dumps({"config": {"threshold": 0.9}}))
    assert "(score \u2265 0.9)" in write_report(tmp_path).read_text()
    assert "(score \u2265 0.7)" in write_report(tmp_path, threshold=0.7).read_text()
    with pytest.raises(ValueError, match="threshold"):
        write_report(tmp_path, threshold=3.0)


def test_bad_run_folders_fail_with_the_path(planted_run, tmp_path):
    with pytest.raises(FileNotFoundError, match="run_folder: expected a folder"):
        write_report(tmp_path / "missing")
    with pytest.raises(ResultFileError, match="missing"):
        write_report(tmp_path)
    folder, _ = planted_run
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in (TENSORS_FILE, META_FILE):
        shutil.copy(folder / name, broken / name)
    (broken / "validation.json").write_text("{not json")
    with pytest.raises(ResultFileError, match="validation.json is not valid JSON"):
        write_report(broken)
    with pytest.raises(InputError, match="result: expected a chg_tlens.CHGResult"):
        render_report({"theta": 1})


def test_json_of_any_shape_becomes_tables():
    result = CHGResult(torch.zeros(1, 2, 2), torch.ones(1, 2, 2), -torch.ones(1, 2, 2))
    validation = {
        "matrix": [[0.5, 0.25], [1.0, float("nan")]],
        "long": list(range(100)),
        "nested": {"deeper": {"value": True}},
        "mixed": [1, {"a": 2}],
    }
    page = render_report(result, validation=validation)
    assert '<td class="num">0.25</td>' in page and '<td class="num">nan</td>' in page
    assert "(36 more)" in page
    assert "<h4>deeper</h4>" in page and "<td>true</td>" in page
    assert "<ol start=\"0\">" in page


# --------------------------------------------------------------------------- headless browser
def chromium() -> str:
    """Path of a Chromium binary; fails (not skips) when there is none, naming the install command."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)
    pytest.fail("The report test needs headless Chromium and none was found on PATH (tried $CHROMIUM, "
                "chromium, chromium-browser, google-chrome). Install it with: "
                "apt-get update && apt-get install -y chromium")


def run_chromium(page: Path, profile: Path, *mode: str) -> subprocess.CompletedProcess:
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", *mode, page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done


def console_lines(stderr: str) -> list[str]:
    """Console messages Chromium logged for the page (the report itself never logs on purpose)."""
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_report_renders_in_headless_chromium(planted_run, tmp_path):
    folder, _ = planted_run
    report = write_report(folder, output=tmp_path / "report.html")

    dom = run_chromium(report, tmp_path / "profile-dom", "--dump-dom")
    assert console_lines(dom.stderr) == []
    body = re.search(r"<body([^>]*)>", dom.stdout).group(1)
    assert 'data-page-check="done"' in body, "the page's load check did not run"
    assert 'data-page-errors="0"' in body
    heatmap = re.search(r'<img class="plot" data-plot="heatmaps"[^>]*src="data:image/png;base64,([^"]+)"',
                        dom.stdout)
    assert heatmap is not None and len(heatmap.group(1)) > 10_000

    shot = tmp_path / "report.png"
    run_chromium(report, tmp_path / "profile-shot", "--window-size=1280,2400", f"--screenshot={shot}")
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=int)
    assert pixels.shape[:2] == (2400, 1280)
    assert (pixels.min(axis=2) < 200).mean() > 0.05, "the screenshot is almost blank"
    near_yellow = (np.abs(pixels - VIRIDIS_YELLOW).max(axis=2) < 30).sum()
    assert near_yellow > 2_000, "no open-gate heatmap cells visible in the screenshot"

    # The error check can fail: a picture whose data does not decode is reported in the page.
    broken = tmp_path / "broken.html"
    page = report.read_text()
    broken.write_text(page.replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1))
    dom = run_chromium(broken, tmp_path / "profile-broken", "--dump-dom")
    assert 'data-page-errors="1"' in dom.stdout
    assert "failed to load &lt;img&gt; Gates and role scores" in dom.stdout


def test_contrastive_report_shows_the_table_the_closed_heads_and_convergence(contrastive_run):
    folder, result, circuit = contrastive_run
    for name in ("heads.csv", "table.csv", "run.json", "report.html", "pictures/gate_map.png"):
        assert (folder / name).is_file(), name
    page = (folder / "report.html").read_text()
    assert "Contrastive CHG report: planted-two-modes" in page
    facts = re.search(r'<section id="what-was-run">(.*?)</section>', page, re.DOTALL).group(1)
    for row in ("<th>retain view</th><td>icl</td>", '<th>seeds</th><td class="num">2</td>',
                '<th>updates</th><td class="num">150</td>', '<th>batch size</th><td class="num">32</td>',
                '<th>\u03bb</th><td class="num">0.1</td>',
                '<th>closing threshold</th><td class="num">0.5</td>'):
        assert row in facts, row
    table = re.search(r'<table[^>]*id="before-after-table"[^>]*>(.*?)</table>', page, re.DOTALL).group(1)
    assert table.count("<tr") == 1 + 4  # header, retain/forget x before/after
    assert f"{result.table()['logprob'].iloc[3]:.3g}" in table
    forget = circuit.extra["forget_head"]
    assert result.closed_heads() == [forget]  # the fit found the planted forget head: the page must show it
    every = re.search(r'<tr class="consensus" id="closed-every-seed">(.*?)</tr>', page).group(1)
    assert f">L{forget[0]}H{forget[1]}<" in every
    convergence = re.search(r'<section id="convergence">(.*?)</section>', page, re.DOTALL).group(1)
    for line in result.convergence_text().splitlines():
        assert f"<li>{html.escape(line)}</li>" in convergence
    assert "gradient" in convergence and "contrastive" in convergence
    pictures = images_in(page)
    assert set(pictures) == {"gate_map", "loss_curves"}
    for data in pictures.values():
        assert Image.open(io.BytesIO(data)).format == "PNG"
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", page, re.IGNORECASE)
    assert "<b>bold</b>" not in page and "alert(1)</script>" not in page and page.count("<script") == 1
    assert result.provenance["data_fingerprint"] in page and "heads.csv" in page


def test_a_run_folder_is_read_as_the_kind_it_holds(contrastive_run, planted_run, tmp_path):
    folder, result, _ = contrastive_run
    loaded = load_run_result(folder)
    assert isinstance(loaded, ContrastiveResult) and torch.equal(loaded.theta, result.theta.float())
    assert isinstance(load_run_result(planted_run[0]), CHGResult)
    for name in (TENSORS_FILE, META_FILE):
        shutil.copy(folder / name, tmp_path / name)
    (tmp_path / "run.json").write_text(json.dumps({"threshold": 0.9999}))
    assert "<th>closing threshold</th><td class=\"num\">0.9999</td>" in write_report(tmp_path).read_text()
    page = write_report(tmp_path, threshold=0.2).read_text()
    assert "<th>closing threshold</th><td class=\"num\">0.2</td>" in page
    with pytest.raises(InputError, match="expected a chg_tlens.ContrastiveResult"):
        render_contrastive_report(load_run_result(planted_run[0]))
    with pytest.raises(InputError, match="expected a chg_tlens.CHGResult"):
        render_report(result)
    with pytest.raises(ValueError, match="threshold"):
        render_contrastive_report(result, threshold=2.0)


def test_report_shows_error_bars_by_source(tmp_path, repeat, planted_page):
    """With prompt resamples beside the seeds the report has one row per source (optimiser, seeds,
    prompts) with the number of gate sets behind it, and error_bars.csv holds the per-head shares;
    without them it still shows the optimiser and seeds and says how to add prompts. Rejects a report
    that ignores the run's prompt_resamples folder and one that counts the seeds as resamples."""
    from chg_tlens.analysis.error_bars import error_bars
    from chg_tlens.app.runs import write_run_folder

    assert 'id="error-bars"' in planted_page and "--prompt-resamples N" in planted_page
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bars = error_bars(repeat.model, repeat.data(64, seed=0),
                          CHGConfig(n_seeds=2, steps=40, batch_size=32, progress=False), n_resamples=3)
    finally:
        torch.set_num_threads(threads)
    folder = write_run_folder(bars.seeds, tmp_path / "run", {"model": "planted-repeat"}, pictures=False,
                              report=False, prompt_resamples=bars.prompts)
    page = write_report(folder).read_text()
    table = re.search(r'<table id="error-bars-table">(.*?)</table>', page, re.S).group(1)
    header = re.findall(r"<th>(.*?)</th>", table)
    cell_rows = [re.findall(r"<td>(.*?)</td>", row) for row in re.findall(r"<tr>(.*?)</tr>", table, re.S)]
    rows = {cells[0]: dict(zip(header, cells, strict=True)) for cells in cell_rows if cells}
    assert list(rows) == ["optimiser", "seeds", "prompts"]
    assert rows["seeds"]["gate_sets"] == "2" and rows["prompts"]["gate_sets"] == "3"
    expected = bars.summary()
    assert float(rows["prompts"]["mean_agreement"]) == pytest.approx(
        expected.loc["prompts", "mean_agreement"], abs=1e-3)
    shares = pd.read_csv(folder / "error_bars.csv")
    assert len(shares) == repeat.model.cfg.n_layers * repeat.model.cfg.n_heads
    assert {"seeds_agree", "prompts_agree", "optimiser_agree"} <= set(shares.columns)
