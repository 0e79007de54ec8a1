"""Speed benchmarks of chg_tlens: what gating costs, what the shortcuts save, and what a real fit needs.

    python benchmarks/bench_speed.py OUT_DIR [--skip-real] [--repeats 5] [--device cpu]

Writes bench.json and bench.md into OUT_DIR and prints the Markdown. Run it on a quiet machine: the
1-minute load average is recorded with every row, and numbers taken under load mislead. A harness, not
library code, so it lives here rather than in the package (it was ``chg-tlens bench``).

Six measurements, each a ratio of two variants timed side by side in one process:

    gate overhead       gated forward+backward (full logits, one mask) / the same frozen model's
                        plain forward+backward with the embedding output requiring grad
    target-only logits  step that unembeds only target positions / step with full logits
    masks per pass      per-seed cost of K masks in one batched pass / K one-mask steps
    length bucketing    share of pad tokens, and time for the same examples, with length-sorted
                        buckets / with random batches
    fused G+/G-         one optimiser update of the fused regularised stage (2 x n_seeds masks) / one
                        update of each separate stage (G+ then G-, n_seeds masks each): stages 2+3 only
    end to end          the demo fit in its own process: wall time, peak RSS / fp32 model size

Timing: variants run round-robin (order rotated each repeat), each timed block repeated until it lasts
``MIN_BLOCK_SECONDS``; a ratio is the median over repeats of the per-repeat ratio, so slow drift in the
machine's load cancels. The 1-minute load average is recorded with every row: read numbers taken
under load with care. Nothing here asserts a speed; the numbers are for people.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from jaxtyping import Int
from torch import Tensor

from chg_tlens.app.markdown import markdown_table
from chg_tlens.app.runs import write_json
from chg_tlens.core.config import CHGConfig
from chg_tlens.core.data import GateData
from chg_tlens.core.fit import nll_objective, regularised
from chg_tlens.core.forward import gated_logits
from chg_tlens.core.gates import HeadGates
from chg_tlens.core.objectives import chg_loss, per_mask_grad_clip_, target_nll
from chg_tlens.errors import InputError
from chg_tlens.models import adapter

MIN_BLOCK_SECONDS = 0.2
"""Each timed block repeats its step until it lasts at least this long (tiny models take milliseconds)."""
MASK_COUNTS = (1, 2, 4, 8)
"""Masks per pass compared in the masks-per-pass measurement."""
BUCKET_WINDOW = 8
"""Length bucketing sorts windows of this many batches by length, then shuffles the batches."""
BATCH_SIZE = 8
"""Examples per batch in every step measurement (the demo's batch size)."""
LAM = 0.1
"""Regulariser strength of the measured steps (G+ stage); its cost is negligible either way."""
FUSED_SEED_COUNTS = (2, 4)
"""Seeds per G+/G- gate set compared in the fused G+/G- measurement (the demo fits 2)."""
GATE_OVERHEAD_TARGET = 1.05
RSS_TARGET = 3.0
BENCH_FILE, MARKDOWN_FILE = "bench.json", "bench.md"
END_TO_END_CHILD = "--end-to-end-child"
"""First argument that makes this script run ``end_to_end_child`` (the fresh process end to end measures)."""
COLUMNS = ["measurement", "model", "case", "baseline", "baseline_value", "candidate", "candidate_value",
           "unit", "ratio", "target", "load_1m"]


@dataclass
class Row:
    """One line of the benchmark table; ``ratio`` is candidate / baseline (below 1: candidate cheaper)."""

    measurement: str
    model: str
    case: str
    baseline: str
    baseline_value: float
    candidate: str
    candidate_value: float
    unit: str
    ratio: float | None
    """None where two numbers have no meaningful ratio (load time vs fit time)."""
    target: str = ""
    load_1m: float = field(default_factory=lambda: os.getloadavg()[0])
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Subject:
    """A model to measure, a short-prompt batch, and data with varied lengths for bucketing."""

    name: str
    model: Any
    short: dict[str, GateData]
    varied: GateData
    varied_name: str


# ----------------------------------------------------------------------------------- entry point
def run_benchmarks(
    out: str | os.PathLike[str],
    skip_real: bool = False,
    repeats: int = 5,
    device: str | None = None,
) -> pd.DataFrame:
    """Run every measurement, write ``bench.json`` and ``bench.md`` into ``out``, return the table.

    ``skip_real`` measures only a tiny random model and the planted demo (seconds); otherwise
    SmolLM2-135M as well (minutes). ``repeats`` timed repeats per measurement (median reported).
    """
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise InputError(f"run_benchmarks: repeats must be a positive integer, got {repeats!r}.")
    device_name = device or "cpu"
    try:
        torch_device = torch.device(device_name)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"run_benchmarks: device must name a torch device such as 'cpu' or 'cuda', "
                         f"got {device!r}.") from exc
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()

    rows: list[Row] = []
    for make_subject in [tiny_subject] + ([] if skip_real else [smollm2_subject]):
        rows += measure_subject(make_subject(torch_device), repeats)  # one model in memory at a time
    rows += end_to_end("planted-repeat", device)
    if not skip_real:
        rows += end_to_end("smollm2-135m", device)

    table = pd.DataFrame([{k: getattr(r, k) for k in COLUMNS} for r in rows], columns=COLUMNS)
    record = {
        "machine": machine_record(device_name),
        "load_average_before": list(load_before),
        "load_average_after": list(os.getloadavg()),
        "seconds": round(time.time() - started, 1),
        "settings": {"skip_real": skip_real, "repeats": repeats, "device": device_name,
                     "batch_size": BATCH_SIZE, "min_block_seconds": MIN_BLOCK_SECONDS},
        "command": " ".join(sys.argv),
        "notes": findings(rows),
        "rows": [asdict(r) for r in rows],
    }
    write_json(record, folder / BENCH_FILE)
    (folder / MARKDOWN_FILE).write_text(markdown(table, record))
    return table


def measure_subject(subject: Subject, repeats: int) -> list[Row]:
    """Every in-process measurement on one model (weights frozen throughout, as in a fit)."""
    model, rows = subject.model, []
    first_task = next(iter(subject.short))
    with adapter.frozen(model):
        rows.append(gate_overhead(model, subject.short[first_task], repeats, subject.name, first_task))
        for task, batch in subject.short.items():
            rows.append(target_only_floor(model, batch, repeats, subject.name, task))
        rows += masks_per_pass(model, subject.short[first_task], repeats, subject.name, first_task)
        rows += length_bucketing(model, subject.varied, repeats, subject.name, subject.varied_name)
        rows += fused_regularised(model, subject.short[first_task], repeats, subject.name, first_task)
    return rows


# ----------------------------------------------------------------------------------- subjects
def tiny_subject(device: torch.device) -> Subject:
    """A small random model (4 layers x 4 heads, vocab 2048) with random short prompts."""
    model = adapter.build_native_model(
        model_name="bench-tiny", seed=0, d_model=128, d_head=32, n_layers=4, n_heads=4, n_ctx=64,
        d_vocab=2048, d_mlp=512, act_fn="gelu", normalization_type="LN",
    )
    if adapter.model_device(model) != device:
        with contextlib.redirect_stdout(io.StringIO()):  # TransformerLens announces the move
            model = model.to(device)
    generator = torch.Generator().manual_seed(0)
    short = random_prompts(BATCH_SIZE, [8] * BATCH_SIZE, 2048, generator)
    lengths = torch.randint(4, 49, (96,), generator=generator).tolist()
    varied = random_prompts(len(lengths), lengths, 2048, generator)
    return Subject("tiny", model, {"random 8-token prompts": short}, varied, "random lengths 4-48")


def smollm2_subject(device: torch.device) -> Subject:
    """SmolLM2-135M on subject-verb agreement (7 tokens) and IOI (16-20), plus a mix of five tasks."""
    from chg_tlens.models.load import load_model
    from chg_tlens.tasks import make_task

    model = load_model("smollm2-135m", device=str(device))
    short = {task: make_task(task, model, n=BATCH_SIZE, seed=0) for task in ("sva", "ioi")}
    mixed = [make_task(task, model, n=16, seed=1) for task in ("sva", "aba_abb", "ioi", "arithmetic",
                                                                 "function")]
    varied = GateData.stack_padded(mixed)
    return Subject("smollm2-135m", model, short, varied, "sva+aba_abb+ioi+arithmetic+function, 16 each")


def random_prompts(n: int, lengths: list[int], vocab: int, generator: torch.Generator) -> GateData:
    """Random token sequences whose last token is the target (a one-token answer after a prompt)."""
    sequences = [torch.randint(1, vocab, (length,), generator=generator).tolist() for length in lengths]
    masks = [[False] * (length - 1) + [True] for length in lengths]
    return GateData.from_sequences(sequences, masks, pad_token_id=0, meta={"task": "random"})


# ----------------------------------------------------------------------------------- steps
Step = Callable[[], None]


def plain_step(model: Any, batch: GateData) -> Step:
    """Forward+backward of the frozen model with no gates; the embedding output requires grad, so the
    backward runs through the whole network as a gated one does."""
    tokens, target_mask = _on_model_device(model, batch)
    hook_name = "hook_embed"
    if hook_name not in model.hook_dict:
        raise InputError(f"gate overhead: the model has no {hook_name!r} hook to make the embedding "
                         "output require grad.")

    def step() -> None:
        zero = torch.zeros((), device=tokens.device, requires_grad=True)
        with model.hooks(fwd_hooks=[(hook_name, lambda embed, hook: embed + zero)]):
            logits = model(tokens)
        target_nll(logits, tokens, target_mask).sum().backward()

    return step


def full_logit_step(model: Any, gates: HeadGates, batch: GateData) -> Step:
    """A gated training step computing logits at every position (what a naive loop does)."""
    tokens, target_mask = _on_model_device(model, batch)

    def step() -> None:
        nll = target_nll(gated_logits(model, gates, tokens), tokens, target_mask, gates.n_masks)
        chg_loss(nll, gates.theta, LAM, 4.0).sum().backward()
        gates.theta.grad = None

    return step


def target_only_step(model: Any, gates: HeadGates, batch: GateData) -> Step:
    """The training step ``fit_chg`` runs: the stage objective (target logits only), then backward."""
    config, lams = CHGConfig(), torch.full((gates.n_masks,), LAM)

    def step() -> None:
        data_term, _ = nll_objective(model, gates, batch)
        regularised(data_term.mean(dim=1), gates.theta, lams, config).sum().backward()
        gates.theta.grad = None

    return step


def regularised_update(model: Any, theta: Tensor, lams: list[float], batch: GateData,
                       config: CHGConfig) -> Step:
    """One Adam update of a regularised stage as ``fit_chg`` runs it: the data term over one copy of
    ``theta`` per lambda (two: the fused G+/G- stage), backward, per-mask gradient clip, Adam step."""
    gates = HeadGates(theta.shape[1], theta.shape[2], len(lams) * theta.shape[0],
                      theta=theta.repeat(len(lams), 1, 1)).to(adapter.model_device(model))
    mask_lams = torch.tensor(lams, dtype=torch.float32).repeat_interleave(theta.shape[0])
    optimizer = torch.optim.Adam([gates.theta], lr=config.lr_reg[0])

    def step() -> None:
        data_term, _ = nll_objective(model, gates, batch)
        loss = regularised(data_term.mean(dim=1), gates.theta, mask_lams, config)
        optimizer.zero_grad(set_to_none=True)
        loss.sum().backward()
        per_mask_grad_clip_(gates.theta.grad, config.grad_clip)
        optimizer.step()

    return step


def steps_in_turn(steps: list[Step]) -> Step:
    """One step made of several steps run one after the other."""

    def step() -> None:
        for each in steps:
            each()

    return step


def _on_model_device(model: Any, batch: GateData) -> tuple[Tensor, Tensor]:
    device = adapter.model_device(model)
    return batch.tokens.to(device), batch.target_mask.to(device)


def _gates(model: Any, n_masks: int, seed: int = 0) -> HeadGates:
    return HeadGates.from_model(model, n_masks=n_masks, seed=seed).to(adapter.model_device(model))


# ----------------------------------------------------------------------------------- timing
def interleaved_times(variants: dict[str, Step], repeats: int,
                      min_seconds: float | None = None) -> dict[str, list[float]]:
    """Seconds per call of each variant, one value per repeat, variants run round-robin.

    Each variant is warmed up once, then called ``n`` times per block where ``n`` makes a block last
    about ``min_seconds``; the order of variants rotates every repeat.
    """
    min_seconds = MIN_BLOCK_SECONDS if min_seconds is None else min_seconds
    calls = {}
    for name, step in variants.items():
        start = time.perf_counter()
        step()  # warm-up: allocator, lazy init
        seconds = time.perf_counter() - start
        if seconds < min_seconds:  # a long step needs no second call to know it is long
            start = time.perf_counter()
            step()
            seconds = time.perf_counter() - start
        calls[name] = max(1, math.ceil(min_seconds / max(seconds, 1e-6)))
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            _synchronize()
            start = time.perf_counter()
            for _ in range(calls[name]):
                variants[name]()
            _synchronize()
            times[name].append((time.perf_counter() - start) / calls[name])
    return times


def paired_ratio(candidate: list[float], baseline: list[float]) -> float:
    """Median over repeats of candidate / baseline timed in the same repeat."""
    return statistics.median(c / b for c, b in zip(candidate, baseline, strict=True))


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ms(seconds: list[float]) -> float:
    return 1000.0 * statistics.median(seconds)


# ----------------------------------------------------------------------------------- measurements
def gate_overhead(model: Any, batch: GateData, repeats: int, model_name: str, task: str) -> Row:
    """Gated forward+backward (full logits, one mask) against the plain one on the same batch."""
    times = interleaved_times({"plain": plain_step(model, batch),
                               "gated": full_logit_step(model, _gates(model, 1), batch)}, repeats)
    return Row("gate overhead", model_name, f"{task}, batch {len(batch)}, 1 mask, full logits",
               "plain fwd+bwd (embedding grad)", _ms(times["plain"]), "gated fwd+bwd to gates",
               _ms(times["gated"]), "ms/step", paired_ratio(times["gated"], times["plain"]),
               f"<= {GATE_OVERHEAD_TARGET}", samples=times)


def target_only_floor(model: Any, batch: GateData, repeats: int, model_name: str, task: str) -> Row:
    """The step fit_chg runs (target-position logits only) against a full-logit step."""
    gates = _gates(model, 1)
    times = interleaved_times({"full": full_logit_step(model, gates, batch),
                               "target": target_only_step(model, gates, batch)}, repeats)
    width = batch.tokens.shape[1]
    return Row("target-only logits", model_name, f"{task}, batch {len(batch)}, {width} positions, 1 mask",
               "full logits", _ms(times["full"]), "target logits only", _ms(times["target"]), "ms/step",
               paired_ratio(times["target"], times["full"]), samples=times)


def masks_per_pass(model: Any, batch: GateData, repeats: int, model_name: str, task: str,
                   mask_counts: tuple[int, ...] = MASK_COUNTS) -> list[Row]:
    """Per-seed step cost of K masks in one batched pass against K one-mask steps in turn."""
    variants = {}
    for k in mask_counts:
        variants[f"batched {k}"] = target_only_step(model, _gates(model, k), batch)
        singles = [target_only_step(model, _gates(model, 1, seed), batch) for seed in range(k)]
        variants[f"sequential {k}"] = steps_in_turn(singles)
    times = interleaved_times(variants, repeats)
    rows = []
    for k in mask_counts:
        batched = [t / k for t in times[f"batched {k}"]]
        sequential = [t / k for t in times[f"sequential {k}"]]
        rows.append(Row("masks per pass", model_name, f"K={k}, {task}, batch {len(batch)}",
                        f"{k} one-mask steps", _ms(sequential), f"one {k}-mask pass", _ms(batched),
                        "ms/seed-step", paired_ratio(batched, sequential),
                        samples={"batched_per_seed": batched, "sequential_per_seed": sequential}))
    return rows


def length_bucketing(model: Any, data: GateData, repeats: int, model_name: str, case: str,
                     batch_size: int = BATCH_SIZE, window: int = BUCKET_WINDOW,
                     n_masks: int = 1) -> list[Row]:
    """Pad share of random batches against length-sorted buckets, and the time of one window of each.

    Both orders are compared over whole windows, where they hold the very same examples.
    """
    horizon = window * max(1, math.ceil(20 * len(data) / (window * batch_size)))  # ~20 epochs
    random_batches = [data.batch_indices(step, batch_size) for step in range(horizon)]
    bucketed_batches = [data.batch_indices(step, batch_size, bucket_window=window)
                        for step in range(horizon)]
    random_waste = padding_share(data.lengths, random_batches)
    bucketed_waste = padding_share(data.lengths, bucketed_batches)
    rows = [Row("length bucketing", model_name, f"{case}; batch {batch_size}, window {window} batches",
                "random batches", 100 * random_waste, "length buckets", 100 * bucketed_waste,
                "% pad tokens", bucketed_waste / random_waste if random_waste > 0 else 1.0)]
    gates = _gates(model, n_masks)
    windows = {}
    for name, batches in (("random", random_batches), ("bucketed", bucketed_batches)):
        subsets = [data.subset(index) for index in batches[:window]]
        windows[name] = steps_in_turn([target_only_step(model, gates, s) for s in subsets])
    times = interleaved_times(windows, repeats)
    rows.append(Row("length bucketing", model_name, f"{case}; {window} steps (one window), {n_masks} mask",
                    "random batches", statistics.median(times["random"]), "length buckets",
                    statistics.median(times["bucketed"]), "s/window",
                    paired_ratio(times["bucketed"], times["random"]), samples=times))
    return rows


def fused_regularised(model: Any, batch: GateData, repeats: int, model_name: str, task: str,
                      seed_counts: tuple[int, ...] = FUSED_SEED_COUNTS) -> list[Row]:
    """Stages 2+3 per optimiser step: one update of the fused G+/G- stage (2n masks, one pass) against
    one update of the G+ stage and one of the G- stage (n masks each, two passes), same batch.

    Both start from the same stage-1 gates (a random draw: gate values do not change the cost); stage 1
    is not run, so its cost does not dilute the ratio.
    """
    variants = {}
    for n in seed_counts:
        config = CHGConfig(n_seeds=n)
        theta_zero = _gates(model, n).theta.detach()
        variants[f"fused {n}"] = regularised_update(model, theta_zero, [+config.lam, -config.lam], batch,
                                                    config)
        variants[f"separate {n}"] = steps_in_turn(
            [regularised_update(model, theta_zero, [sign * config.lam], batch, config) for sign in (+1, -1)])
    times = interleaved_times(variants, repeats)
    rows = []
    for n in seed_counts:
        fused, separate = times[f"fused {n}"], times[f"separate {n}"]
        rows.append(Row("fused G+/G-", model_name, f"n_seeds={n}, {task}, batch {len(batch)}",
                        f"G+ then G- ({n} masks each)", _ms(separate), f"fused ({2 * n} masks)", _ms(fused),
                        "ms/step", paired_ratio(fused, separate),
                        samples={"fused": fused, "separate": separate}))
    return rows


def padding_share(lengths: Int[Tensor, " example"], batches: list[Tensor]) -> float:
    """Share of pad tokens among all tokens the model runs, each batch padded to its longest example."""
    padded = sum(int(lengths[b].max()) * len(b) for b in batches)
    real = sum(int(lengths[b].sum()) for b in batches)
    return (padded - real) / padded


# ----------------------------------------------------------------------------------- end to end
def end_to_end(which: str, device: str | None) -> list[Row]:
    """The demo fit (``which`` = 'smollm2-135m' or 'planted-repeat') in a fresh process: time and RSS."""
    with tempfile.TemporaryDirectory() as scratch:
        result_path = Path(scratch) / "end_to_end.json"
        command = [sys.executable, __file__, END_TO_END_CHILD, which, device or "", str(result_path)]
        done = subprocess.run(command, capture_output=True, text=True,
                              env={**os.environ, "TQDM_DISABLE": "1"})
        if done.returncode != 0 or not result_path.is_file():
            raise RuntimeError(f"end-to-end benchmark ({which}) failed with exit code {done.returncode}:\n"
                               f"{done.stderr[-3000:]}")
        measured = json.loads(result_path.read_text())
    fp32_mb = measured["n_parameters"] * 4 / 2**20
    case, load = measured["setting"], measured["load_1m"]
    target = f"<= {RSS_TARGET}" if which == "smollm2-135m" else ""
    rss_rows = [("peak RSS", "peak RSS of the process", "peak_rss_mb", target),
                ("RSS after imports", "peak RSS before loading", "imports_rss_mb", ""),
                ("RSS after loading", "peak RSS, loaded + one forward", "loaded_rss_mb", "")]
    return [Row("end to end", which, f"{case}: wall time", "model load", measured["load_seconds"],
                "three-stage fit", measured["fit_seconds"], "s", None, load_1m=load)] + [
        Row("end to end", which, f"{case}: {name}", "fp32 model size", fp32_mb, label, measured[key], "MiB",
            measured[key] / fp32_mb, row_target, load_1m=load)
        for name, label, key, row_target in rss_rows]


def end_to_end_child(which: str, device: str | None, result_path: str) -> None:
    """Body of the end-to-end subprocess: load, fit with the demo settings, write time and RSS as JSON."""
    from chg_tlens.app.settings import DEMO_SETTINGS, demo_fit_settings
    from chg_tlens.core.fit import fit_chg

    imports_rss = peak_rss_mb()
    started = time.perf_counter()
    if which == "smollm2-135m":
        from chg_tlens.models.load import load_model
        from chg_tlens.tasks import make_task

        model = load_model("smollm2-135m", device=device)
        settings = DEMO_SETTINGS
        data = make_task(settings["task"], model, n=settings["n_examples"], seed=0)
        config = CHGConfig(batch_size=len(data), progress=False, device=device, **demo_fit_settings())
    elif which == "planted-repeat":
        from chg_tlens.testbeds.planted import repeat_circuit

        circuit = repeat_circuit()
        model, data = circuit.model, circuit.data(128, 0)
        config = CHGConfig(n_seeds=4, steps=150, batch_size=32, progress=False, device=device)
        settings = {"n_examples": 128}
    else:
        raise InputError(
            f"end_to_end_child: which must be 'smollm2-135m' or 'planted-repeat', got {which!r}.")
    loaded = time.perf_counter()
    with torch.no_grad():  # weights are memory-mapped until first used: page them in
        model(data.tokens[:1].to(adapter.model_device(model)))
    loaded_rss = peak_rss_mb()
    fit_chg(model, data, config)
    fitted = time.perf_counter()
    record = {
        "setting": f"{data.meta.get('task', which)}, {settings['n_examples']} examples, "
                   f"{config.n_seeds} seeds, batch {config.batch_size}, {config.steps} steps x 3 stages",
        "n_parameters": sum(p.numel() for p in model.parameters()),
        "load_seconds": loaded - started,
        "fit_seconds": fitted - loaded,
        "imports_rss_mb": imports_rss,
        "loaded_rss_mb": loaded_rss,
        "peak_rss_mb": peak_rss_mb(),
        "load_1m": os.getloadavg()[0],
    }
    Path(result_path).write_text(json.dumps(record))


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    Reads ``VmHWM`` on Linux: ``getrusage``'s ``ru_maxrss`` survives ``exec``, so a child started from
    a big parent would report the parent's peak. Elsewhere falls back to ``ru_maxrss``.
    """
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


# ----------------------------------------------------------------------------------- report
def machine_record(device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": device,
            "cuda": torch.cuda.get_device_name(0) if device.startswith("cuda") else None}


def findings(rows: list[Row]) -> list[str]:
    """Plain-language reading of the rows: targets met or not, the masks-per-pass suggestion."""
    notes = []
    for row in rows:
        if row.measurement == "gate overhead":
            verdict = "meets" if row.ratio <= GATE_OVERHEAD_TARGET else "misses"
            notes.append(f"{row.model}: gated step costs {row.ratio:.3f}x a plain forward+backward "
                         f"({verdict} the {GATE_OVERHEAD_TARGET}x target).")
        elif row.measurement == "target-only logits":
            notes.append(f"{row.model}, {row.case.split(',')[0]}: a target-only step takes {row.ratio:.2f}x "
                         f"the time of a full-logit step (speed-up {1 / row.ratio:.2f}x).")
        elif row.measurement == "end to end" and row.case.endswith("peak RSS") and row.target:
            verdict = "meets" if row.ratio <= RSS_TARGET else "misses"
            notes.append(f"{row.model}: peak RSS {row.candidate_value:.0f} MiB = {row.ratio:.2f}x the fp32 "
                         f"model ({verdict} the {RSS_TARGET}x target).")
    for model in dict.fromkeys(r.model for r in rows if r.measurement == "masks per pass"):
        per_k = {int(r.case.split(",")[0][2:]): r for r in rows
                 if r.measurement == "masks per pass" and r.model == model}
        best = min(per_k, key=lambda k: per_k[k].candidate_value)
        speedups = ", ".join(f"K={k}: {1 / r.ratio:.2f}x" for k, r in per_k.items())
        notes.append(f"{model}: one batched pass vs sequential one-mask steps, per-seed speed-up {speedups}; "
                     f"cheapest per seed at K={best}"
                     + (" (or beyond): keep all seeds in one pass." if best == max(per_k)
                        else f": run seeds in passes of about {best} masks."))
    for row in rows:
        if row.measurement == "length bucketing" and row.unit.startswith("%"):
            notes.append(f"{row.model}: length buckets cut padding from {row.baseline_value:.1f}% to "
                         f"{row.candidate_value:.1f}% of tokens ({row.case.split(';')[0]}).")
        elif row.measurement == "fused G+/G-":
            verdict = "keep fuse_regularised=True" if row.ratio < 1 else "fusing does not pay here"
            notes.append(f"{row.model}, {row.case.split(',')[0]}: a fused G+/G- step takes {row.ratio:.2f}x "
                         f"the time of separate G+ and G- steps (speed-up {1 / row.ratio:.2f}x; {verdict}).")
    return notes


def markdown(table: pd.DataFrame, record: dict[str, Any]) -> str:
    """The table and its context as Markdown."""
    machine = record["machine"]
    lines = [
        "# chg_tlens speed benchmarks", "",
        f"Machine: {machine['processor']}, {machine['cpu_count']} CPUs, {machine['torch_threads']} torch "
        f"threads, device {machine['device']}{' (' + machine['cuda'] + ')' if machine['cuda'] else ''}; "
        f"torch {machine['torch']}, Python {machine['python']}.",
        "Load average (1/5/15 min) before: " + " / ".join(f"{v:.2f}" for v in record["load_average_before"])
        + "; after: " + " / ".join(f"{v:.2f}" for v in record["load_average_after"]) + ".",
        f"Command: `{record['command']}`; {record['settings']['repeats']} repeats, median of paired ratios; "
        f"{record['seconds']:.0f} s in all.", "",
        "`ratio` = candidate / baseline (below 1: the candidate is cheaper).", "",
    ]
    lines.append(markdown_table(table))
    lines += ["", "## Findings", ""] + [f"- {note}" for note in record["notes"]]
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------- script
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path, help="folder for bench.json and bench.md")
    parser.add_argument("--skip-real", action="store_true", help="tiny and planted models only (seconds)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (default 5)")
    parser.add_argument("--device", default=None, help="torch device (default cpu)")
    args = parser.parse_args()
    run_benchmarks(args.out, skip_real=args.skip_real, repeats=args.repeats, device=args.device)
    print((args.out / MARKDOWN_FILE).read_text())


if __name__ == "__main__":
    if sys.argv[1:2] == [END_TO_END_CHILD]:
        end_to_end_child(sys.argv[2], sys.argv[3] or None, sys.argv[4])
    else:
        main()
