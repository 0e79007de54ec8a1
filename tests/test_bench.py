"""Benchmarks: the files are written with every measurement and sane numbers; bucketing is a pure,
complete batch order; the GPU script runs end to end on a tiny model. No timing thresholds.

The speed harness is a script, ``benchmarks/bench_speed.py``, not package code: it is imported here from
its file."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

from chg_tlens.core.data import GateData
from chg_tlens.models import adapter

REPO = Path(__file__).resolve().parents[1]


def _benchmark_script(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` as a module (registered first: dataclasses look their module up)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


bench = _benchmark_script("bench_speed")
MEASUREMENTS = {"gate overhead", "target-only logits", "masks per pass", "length bucketing", "fused G+/G-",
                "end to end"}


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in subprocesses: on a busy 2-core machine, two spinning threads per
    process make a seconds-long run take minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(threads)


def test_run_benchmarks_writes_every_measurement(tmp_path, monkeypatch, one_thread):
    monkeypatch.setattr(bench, "MIN_BLOCK_SECONDS", 0.0)
    table = bench.run_benchmarks(tmp_path, skip_real=True, repeats=1)

    assert list(table.columns) == bench.COLUMNS
    assert set(table["measurement"]) == MEASUREMENTS
    masks = table[table["measurement"] == "masks per pass"]
    assert [case.split(",")[0] for case in masks["case"]] == [f"K={k}" for k in bench.MASK_COUNTS]
    assert set(table["model"]) == {"tiny", "planted-repeat"}
    for column in ("baseline_value", "candidate_value"):
        assert (table[column] > 0).all(), table[["measurement", "case", column]]
    ratios = table["ratio"].dropna()
    assert len(ratios) == len(table) - 1  # only the wall-time row has no ratio
    assert (ratios > 0).all() and ratios.map(math.isfinite).all()
    padding = table[table["unit"] == "% pad tokens"].iloc[0]
    assert padding["candidate_value"] < padding["baseline_value"]  # sorting lengths 4-48 must help

    record = json.loads((tmp_path / bench.BENCH_FILE).read_text())
    assert len(record["rows"]) == len(table)
    assert record["settings"]["repeats"] == 1 and record["machine"]["cpu_count"] >= 1
    assert len(record["load_average_before"]) == 3
    timed = [r for r in record["rows"] if r["unit"] in ("ms/step", "ms/seed-step", "s/window")]
    assert timed and all(len(values) == 1 for r in timed for values in r["samples"].values())
    rss = next(r for r in record["rows"] if r["case"].endswith("peak RSS"))
    assert rss["candidate_value"] >= next(r for r in record["rows"]
                                          if r["case"].endswith("RSS after imports"))["candidate_value"]
    assert any(f"K={max(bench.MASK_COUNTS)}" in note for note in record["notes"])

    text = (tmp_path / bench.MARKDOWN_FILE).read_text()
    assert "| " + " | ".join(bench.COLUMNS) + " |" in text
    assert text.count("\n| ") == len(table) + 1
    assert all(name in text for name in MEASUREMENTS)


def test_fused_regularised_row_on_tiny_model(monkeypatch, one_thread):
    monkeypatch.setattr(bench, "MIN_BLOCK_SECONDS", 0.0)
    subject = bench.tiny_subject(torch.device("cpu"))
    task, batch = next(iter(subject.short.items()))
    with adapter.frozen(subject.model):
        rows = bench.fused_regularised(subject.model, batch, 2, subject.name, task, seed_counts=(1, 2))

    assert [row.case.split(",")[0] for row in rows] == ["n_seeds=1", "n_seeds=2"]
    for row, n in zip(rows, (1, 2), strict=True):
        assert (row.measurement, row.model, row.unit) == ("fused G+/G-", "tiny", "ms/step")
        assert row.baseline == f"G+ then G- ({n} masks each)" and row.candidate == f"fused ({2 * n} masks)"
        assert row.baseline_value > 0 and row.candidate_value > 0
        assert row.ratio > 0 and math.isfinite(row.ratio)  # never the value: timings are for people
        assert set(row.samples) == {"fused", "separate"} and all(len(v) == 2 for v in row.samples.values())
    notes = bench.findings(rows)
    assert len(notes) == 2 and all(note.startswith("tiny, n_seeds=") for note in notes)


def test_run_benchmarks_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="repeats must be a positive integer, got 0"):
        bench.run_benchmarks(tmp_path, skip_real=True, repeats=0)
    with pytest.raises(ValueError, match="device must name a torch device"):
        bench.run_benchmarks(tmp_path, skip_real=True, repeats=1, device="not-a-device")
    assert not (tmp_path / bench.BENCH_FILE).exists()


def _varied_data(n: int = 37, seed: int = 0) -> GateData:
    lengths = torch.randint(2, 30, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return GateData.from_sequences([[1] * k for k in lengths], [[False] * (k - 1) + [True] for k in lengths])


def test_bucketed_batches_cover_the_same_chain_sorted_by_length():
    data, batch, window = _varied_data(), 4, 3
    for w in range(5):
        bucketed = [data.batch_indices(w * window + slot, batch, seed=2, bucket_window=window)
                    for slot in range(window)]
        chain = data.batch_indices(w, window * batch, seed=2)
        # the window holds exactly the examples the random order would use there ...
        assert sorted(torch.cat(bucketed).tolist()) == sorted(chain.tolist())
        # ... and each batch holds lengths no batch of the same window interleaves with
        spans = sorted((int(data.lengths[b].min()), int(data.lengths[b].max())) for b in bucketed)
        assert all(high <= next_low for (_, high), (next_low, _) in zip(spans, spans[1:], strict=False))
    again = data.batch_indices(7, batch, seed=2, bucket_window=window)
    assert torch.equal(again, data.batch_indices(7, batch, seed=2, bucket_window=window))


def test_padding_share_counts_pad_tokens():
    lengths = torch.tensor([2, 4, 4, 1])
    # batch [0, 1]: padded to 4 -> 8 tokens, 6 real; batch [2, 3]: 8 tokens, 5 real
    assert bench.padding_share(lengths, [torch.tensor([0, 1]), torch.tensor([2, 3])]) == pytest.approx(5 / 16)
    assert bench.padding_share(lengths, [torch.tensor([1, 2])]) == 0.0
    data = _varied_data(96)
    random = [data.batch_indices(s, 8) for s in range(48)]
    bucketed = [data.batch_indices(s, 8, bucket_window=8) for s in range(48)]
    assert bench.padding_share(data.lengths, bucketed) < bench.padding_share(data.lengths, random)


def test_gpu_bench_runs_tiny_on_cpu(tmp_path, one_thread):
    out = tmp_path / "gpu.json"
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_bench.py"), "--tiny",
                           "--device", "cpu", "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["model"]["tiny"] and record["model"]["n_parameters"] > 0
    results = record["results"]
    assert {(r["dtype"], r["batch_size"], r["n_masks"]) for r in results} == {
        (dtype, b, k) for dtype in ("bfloat16 autocast", "fp32") for b in (2, 4) for k in (1, 2)}
    assert all(r["status"] == "ok" and r["steps_per_s"] > 0 for r in results)
    assert all(r["gated_rows_per_s"] == pytest.approx(r["steps_per_s"] * r["batch_size"] * r["n_masks"])
               for r in results)
