"""Circuits on SmolLM2-135M: how CHG's heads are wired, and how path patching's edges compare with EAP's.

    python benchmarks/circuit_study.py OUT [--docs]            # induction and ioi; resumable
    python benchmarks/circuit_study.py OUT --tasks induction --n 12 --threads 1
    python benchmarks/circuit_study.py OUT --fit-from FIT --exact --docs   # the published report (FIT:
        runs/optimiser_study_n8/fits/{task}/lbfgs/result, the certified L-BFGS fits, in quotes)

Per task (induction with ``seq_len=8`` as ``convergence_study.py``; ioi), on ``--n`` held-out prompts
(seed 1; the fits saw seed 0), two node sets:

- ``chg``: the ``--top-k`` facilitating heads (in every seed) of a CHG fit, ranked by G- averaged over
  seeds. By default the convergence study's saved reference fit (3 seeds x 400 updates per stage, 64
  prompts; not certified), with ``--fit-from`` any saved fit (e.g. a certified one of
  ``optimiser_study.py``), or with ``--fit short`` an L-BFGS fit run here. The report says which stages of
  the fit carry the convergence certificate.
- ``attention``: heads picked from attention patterns alone, independent of any mechanism claim: on
  induction the top previous-token heads (attention on t-1) in layers below the top induction heads
  (attention on the token after the current token's earlier occurrence); on ioi the top duplicate-token
  heads (S2 -> S1), S-inhibition heads (end -> S2) and name movers (end -> IO).

For each node set and counterfactual (induction: each head's mean output and the task's corrupt twin,
whose second half is fresh tokens; ioi: the swap-subject twin), :func:`chg_tlens.circuit` measures every
edge through each receiver's query, key and value plus each node's direct edge to the logits, with 90%
bootstrap intervals over prompts. SmolLM2 shares each key/value head among 3 query heads, and
TransformerLens' edge attribution patching has no key/value edge per query head there; so the study
measures on a copy whose every query head has its own copy of its group's key/value weights (the same
logits, checked), where "through the key of head r" is r's own key input for both methods. (``circuit``
itself gives the same edges on SmolLM2 directly: it holds the heads sharing r's key/value head clean.)

Edge attribution patching (EAP, Syed et al. 2023) scores each of the same edges as ``(clean - cf) output
of the sender, written to the residual stream`` dotted with the gradient of the metric at the receiver's
split q/k/v input (TransformerLens 4.3's hooks and ``cache_activation_and_gradient``; the gradient at
the clean run, ``eap``, as Syed et al., and with the twin also at the corrupt run, ``eap_corrupt``, as
TransformerLens' ``attribution_patch`` does), signed like ``circuit``'s effects (positive: the edge
helps the clean answer). TransformerLens 4.3's own ``attribution_patch(granularity="edge")`` scores
every edge of the whole graph per position in Python (about a minute per prompt here), so it runs on
``--tl-parity`` prompts only, to check that the node-set scores equal its numbers summed over positions.

With ``--exact`` every circuit is measured a second time by exact path patching (one pass per edge, the
receiver's change carried through the rest of the model), and the report says how far ``circuit``'s fast
edges (one pass per sender; first order beyond the receiver) are from it. EAP's edges get 90% bootstrap
intervals over the same resamples of the prompts as path patching's, so sign agreement can be read on the
edges that both methods call clearly non-zero.

Every (task, node set, counterfactual) is saved under OUT/<task>/ as it finishes; a rerun continues.
Tables go to OUT/circuit_study.{md,json} and, with --docs, to docs/results/circuit_study/ with each circuit
(``<task>_<nodes>-<counterfactual>.circuit.json``, readable by ``Circuit.load``, and its HTML graph).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from chg_tlens import CHGConfig, CHGResult, Circuit, circuit, fit_chg, load_model
from chg_tlens.analysis.baselines import HeadScores, mean_head_activations
from chg_tlens.analysis.circuit import LOGITS, head_name
from chg_tlens.analysis.metrics import spearman_rows
from chg_tlens.analysis.patching import PathPatchingRun, target_logprob_metric, target_logprob_per_example
from chg_tlens.analysis.statistics import bootstrap
from chg_tlens.app.markdown import markdown_table
from chg_tlens.app.runs import write_json
from chg_tlens.core import interventions
from chg_tlens.core.checkpoint import atomic_write_bytes
from chg_tlens.core.data import GateData
from chg_tlens.core.objectives import target_positions
from chg_tlens.models import adapter
from chg_tlens.models.gguf import gguf_hf_folder
from chg_tlens.models.load import embedded_gguf_path
from chg_tlens.tasks import make_task
from chg_tlens.testbeds.benchmark_models import attention_diagnostics

Head = tuple[int, int]
EdgeKey = tuple[Head, Head | str, str]
EdgeScores = dict[str, dict[EdgeKey, np.ndarray]]
"""Per kind of score (``clean``, ``corrupt``, ``heads_frozen``): each edge's per-prompt values."""

TASK_OPTIONS: dict[str, dict[str, Any]] = {"induction": {"seq_len": 8}, "ioi": {}}
"""As ``convergence_study.py``: shorter repeats than the task's default, so the study fits on a CPU."""
COUNTERFACTUALS = {"induction": ("mean", "corrupt"), "ioi": ("corrupt",)}
SAVED_FIT = "docs/results/convergence_study/fits/{task}/reference/result"
"""The convergence study's reference fit (``python benchmarks/convergence_study.py docs/results/
convergence_study``): 3 seeds x 400 updates per stage, batch 16, 64 prompts of seed 0."""
GROUPS = {"induction": ("previous-token", "induction"),
          "ioi": ("duplicate-token", "S-inhibition", "name mover")}
"""The attention node set's groups, in the order the mechanism says information flows."""
PER_GROUP = {"induction": 4, "ioi": 3}
"""Attention nodes per group by default: 8 on induction, 9 on ioi."""
DOCS = Path("docs/results/circuit_study")


# ------------------------------------------------------------------------------------------ model
def per_head_kv_model(folder: Path) -> Any:
    """SmolLM2-135M with each query head given its own copy of its group's key and value weights.

    Grouped-query attention shares one key/value head among ``n_heads / n_kv`` query heads, so "the key
    input of query head r" does not exist on the original; here it does, and the function is unchanged
    (query head h reads key/value head ``h // group`` in Hugging Face's layout, as the copies are laid).
    """
    from safetensors.torch import load_file, save_file

    source = gguf_hf_folder(embedded_gguf_path())
    config = json.loads((source / "config.json").read_text())
    n_q, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    d_head = config.get("head_dim") or config["hidden_size"] // n_q
    weights = load_file(source / "model.safetensors")
    for name, value in weights.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            grouped = value.view(n_kv, d_head, -1).repeat_interleave(n_q // n_kv, dim=0)
            weights[name] = grouped.reshape(n_q * d_head, -1).contiguous()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(weights, folder / "model.safetensors")
    config["num_key_value_heads"] = n_q
    (folder / "config.json").write_text(json.dumps(config))
    for path in source.iterdir():
        if path.name not in ("model.safetensors", "config.json"):
            shutil.copy(path, folder / path.name)
    return load_model(folder)


def load_models() -> tuple[Any, float]:
    """The per-head key/value copy, and its largest logit difference from the original on a few
    induction prompts."""
    original = load_model("smollm2-135m")
    tokens = make_task("induction", original, n=4, seed=1, **TASK_OPTIONS["induction"]).tokens
    with torch.no_grad():
        reference = original(tokens)
    del original
    with tempfile.TemporaryDirectory() as folder:
        model = per_head_kv_model(Path(folder))
    with torch.no_grad():
        gap = float((model(tokens) - reference).abs().max())
    return model, gap


# ------------------------------------------------------------------------------------------ nodes
def chg_nodes(model: Any, task: str, args: argparse.Namespace, out: Path
              ) -> tuple[HeadScores, dict[str, Any]]:
    """The CHG fit's facilitating heads (in every seed) scored by mean G-, other heads at -1."""
    if args.fit_from:
        source = Path(args.fit_from.format(task=task))
        result, origin = CHGResult.load(source), f"saved: {source}"
        if args.docs:  # keep the fit the nodes came from beside the tables
            result.save(DOCS / "fits" / task)
            origin = f"{origin} (copied to {DOCS / 'fits' / task})"
        return _fit_nodes(model, result, origin)
    saved = Path(SAVED_FIT.format(task=task))
    if args.fit == "saved" and (saved / "chg_result.json").is_file():
        result, origin = CHGResult.load(saved), f"saved: {saved} (convergence study reference)"
    else:
        folder = out / task / "fit"
        if (folder / "chg_result.json").is_file():
            result = CHGResult.load(folder)
        else:
            data = make_task(task, model, n=args.fit_n, seed=0, **TASK_OPTIONS[task])
            config = CHGConfig(optimizer="lbfgs", n_seeds=1, steps=args.fit_steps, batch_size=args.fit_n,
                               progress=False)
            result = fit_chg(model, data, config)
            result.save(folder)
        origin = (f"short fit here: L-BFGS, 1 seed, {args.fit_steps} iterations per stage, "
                  f"{args.fit_n} prompts")
    return _fit_nodes(model, result, origin)


def _fit_nodes(model: Any, result: CHGResult, origin: str) -> tuple[HeadScores, dict[str, Any]]:
    roles = result.roles()
    scores = torch.full((model.cfg.n_layers, model.cfg.n_heads), -1.0)
    for head in roles["facilitating"]:
        scores[head] = float(result.facilitating[:, head[0], head[1]].mean())
    certificate = result.convergence()
    fit = {"origin": origin, "n_seeds": int(result.g_minus.shape[0]),
           "n_facilitating": len(roles["facilitating"]),
           "certified_share": float(certificate["certified"].mean()), "config": result.config}
    return HeadScores(scores, "chg G- (facilitating in every seed)"), fit


def attention_nodes(model: Any, task: str, data: GateData, per_group: int
                    ) -> tuple[list[Head], dict[Head, str], dict[str, Any]]:
    """Heads picked by attention patterns alone (see the module docstring), each with its group."""
    scores = induction_scores(model, data) if task == "induction" else ioi_scores(model, data)
    groups = GROUPS[task]
    chosen: dict[Head, str] = {}
    ceiling = model.cfg.n_layers
    for group in reversed(groups):  # the last group first; earlier groups sit in earlier layers
        table = scores[group].clone()
        table[ceiling:] = -1.0
        for index in torch.argsort(table.flatten(), descending=True, stable=True)[:per_group].tolist():
            head = divmod(int(index), model.cfg.n_heads)
            chosen.setdefault(head, group)
        ceiling = min(layer for (layer, _), g in chosen.items() if g == group)
    summary = {group: {head_name(h): round(float(scores[group][h]), 3)
                       for h, g in chosen.items() if g == group} for group in groups}
    return sorted(chosen), chosen, summary


def induction_scores(model: Any, data: GateData) -> dict[str, torch.Tensor]:
    seq_len = int(data.meta["options"]["seq_len"])
    n = len(data)
    found = attention_diagnostics(model, data.tokens, torch.full((n,), seq_len),
                                  torch.ones(n, dtype=torch.long))
    return {"previous-token": found["previous_token"], "induction": found["induction"]}


def ioi_scores(model: Any, data: GateData) -> dict[str, torch.Tensor]:
    """Mean attention end -> IO (name movers), end -> S2 (S-inhibition) and S2 -> S1 (duplicate token)."""
    example, end = target_positions(data.target_mask, data.targets)
    io, subject = data.labels(), data.corrupt.labels()
    rows = []
    for i, position in zip(example.tolist(), end.tolist(), strict=True):
        tokens = data.tokens[i, : position + 1]
        io_at = (tokens == io[i]).nonzero().flatten()
        s_at = (tokens == subject[i]).nonzero().flatten()
        if len(io_at) == 1 and len(s_at) == 2:  # a name split into the template's other tokens is skipped
            rows.append((i, position, int(io_at[0]), int(s_at[0]), int(s_at[1])))
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(data.tokens, names_filter=names)
    out = {group: torch.zeros(model.cfg.n_layers, model.cfg.n_heads) for group in GROUPS["ioi"]}
    for layer, name in enumerate(names):
        pattern = cache[name].float()  # [batch, head, query, key]
        for i, position, io_at, s1, s2 in rows:
            out["name mover"][layer] += pattern[i, :, position, io_at] / len(rows)
            out["S-inhibition"][layer] += pattern[i, :, position, s2] / len(rows)
            out["duplicate-token"][layer] += pattern[i, :, s2, s1] / len(rows)
    return out


def receiver_sharpness(model: Any, data: GateData, nodes: list[Head]) -> dict[Head, float]:
    """Each node's largest attention weight at the scored positions, averaged: near 1 = saturated."""
    example, position = target_positions(data.target_mask, data.targets)
    layers = sorted({layer for layer, _ in nodes})
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    with torch.no_grad():
        _, cache = model.run_with_cache(data.tokens, names_filter=names)
    return {(layer, head): float(cache[f"blocks.{layer}.attn.hook_pattern"][example, head, position]
                                 .max(dim=-1).values.mean()) for layer, head in nodes}


# ------------------------------------------------------------------------------------------ EAP
def eap_edges(model: Any, data: GateData, nodes: list[Head], counterfactual: str) -> EdgeScores:
    """Per endpoint (``clean``; with the twin also ``corrupt``): every edge's per-example EAP score; and
    ``heads_frozen``: each node's edge to the logits as path patching defines it (MLPs included), to first
    order (see :func:`frozen_head_gradients`).

    ``(z_clean - z_cf) W_O`` of the sender (what it writes to the residual stream, the counterfactual
    being ``circuit``'s own) dotted with d metric / d (the receiver's split q/k/v input, or the final
    residual for the logits), summed over positions: the first-order estimate of ``metric(clean) -
    metric(the edge carries the counterfactual)``, so it reads like ``circuit``'s effects.
    """
    twin = counterfactual == "corrupt"
    run = PathPatchingRun(model, data, data.corrupt if twin else None,
                          ablated_z=None if twin else mean_head_activations(model, data))
    with torch.no_grad():
        run.caches()
    changes, writes = {}, {}
    for layer, head in nodes:
        name = adapter.hook_z_name(layer)
        changes[(layer, head)] = (run.clean_z[name][:, :, head] - run.corrupt_z[name][:, :, head]).float()
        writes[(layer, head)] = changes[(layer, head)] @ model.blocks[layer].attn.W_O[head].detach().float()
    layers = sorted({layer for layer, _ in nodes})
    endpoints = {"clean": run.clean_tokens} | ({"corrupt": run.corrupt_tokens} if twin else {})
    out = {}
    for endpoint, tokens in endpoints.items():
        grads = reader_gradients(model, data, tokens, layers)
        scores: dict[EdgeKey, np.ndarray] = {}
        for sender in nodes:
            for receiver in nodes:
                if receiver[0] <= sender[0]:
                    continue
                for kind in ("q", "k", "v"):
                    grad = grads[f"blocks.{receiver[0]}.attn.hook_{kind}_input"][:, :, receiver[1]]
                    scores[(sender, receiver, kind)] = _dot(writes[sender], grad)
            scores[(sender, LOGITS, LOGITS)] = _dot(writes[sender], grads[final_residual(model)])
        out[endpoint] = scores
    frozen = frozen_head_gradients(model, data, run, layers)
    out["heads_frozen"] = {}
    for layer, head in nodes:
        out["heads_frozen"][((layer, head), LOGITS, LOGITS)] = _dot(changes[(layer, head)],
                                                                    frozen[layer][:, :, head].float())
    return out


def frozen_head_gradients(model: Any, data: GateData, run: PathPatchingRun, layers: list[int]
                          ) -> dict[int, torch.Tensor]:
    """d metric / d (each layer's ``hook_z``) at the clean run with every head's output frozen at its clean
    value and the MLPs free: the gradient of path patching's own direct edge (what reaches the logits
    through the residual stream and MLPs), where EAP's edge to the logits is the direct write alone."""
    rows = target_logprob_per_example(data)
    probe_hooks, leaves = interventions.probe(layers)
    with torch.enable_grad(), model.hooks(fwd_hooks=run.frozen_hooks(run.clean_z) + probe_hooks):
        objective = rows(model(run.clean_tokens)).sum()
        grads = torch.autograd.grad(objective, [leaves[layer] for layer in layers])
    return dict(zip(layers, grads, strict=True))


def final_residual(model: Any) -> str:
    return f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"


def reader_gradients(model: Any, data: GateData, tokens: torch.Tensor, layers: list[int]
                     ) -> dict[str, torch.Tensor]:
    """d (sum over prompts of each prompt's mean target log-prob) / d (every reader input), on ``tokens``,
    through TransformerLens' ``cache_activation_and_gradient`` with split q/k/v inputs switched on."""
    from transformer_lens.tools.analysis.attribution_patching import cache_activation_and_gradient

    rows = target_logprob_per_example(data)
    names = [f"blocks.{layer}.attn.hook_{kind}_input" for layer in layers for kind in "qkv"]
    names.append(final_residual(model))
    was = bool(model.cfg.use_split_qkv_input)
    model.set_use_split_qkv_input(True)
    try:
        cache = cache_activation_and_gradient(model, tokens, lambda logits: rows(logits).sum(),
                                              names_filter=names)
    finally:
        model.set_use_split_qkv_input(was)
    return {name: cache.gradients[name].float() for name in names}


def _dot(write: torch.Tensor, grad: torch.Tensor) -> np.ndarray:
    return (write * grad).sum(dim=(1, 2)).double().numpy()


def tl_parity(model: Any, data: GateData, nodes: list[Head], ours: dict[EdgeKey, np.ndarray], n: int
              ) -> dict[str, Any]:
    """TransformerLens 4.3's own ``attribution_patch(granularity="edge")`` on ``n`` prompts, its per-position
    head -> head and head -> logits edges summed over positions, against this study's corrupt-endpoint EAP."""
    from transformer_lens.tools.analysis import EdgeAttributionConfig, attribution_patch

    started = time.time()
    worst, biggest = 0.0, 0.0
    for index in range(n):
        example = data.subset([index])
        result = attribution_patch(model, example.tokens, example.corrupt.tokens,
                                   target_logprob_metric(example), EdgeAttributionConfig(granularity="edge"))
        theirs: dict[EdgeKey, float] = defaultdict(float)
        for (writer, reader), score in result.edge_scores.items():
            sender = (writer.layer, writer.head)
            if writer.kind != "attn_head_out" or sender not in nodes:
                continue
            if reader.kind == "logits":
                theirs[(sender, LOGITS, LOGITS)] += score
            elif reader.kind in ("q_input", "k_input", "v_input") and (reader.layer, reader.head) in nodes:
                theirs[(sender, (reader.layer, reader.head), reader.kind[0])] += score
        for key, value in ours.items():
            worst = max(worst, abs(theirs.get(key, 0.0) - float(value[index])))
            biggest = max(biggest, abs(float(value[index])))
    return {"prompts": n, "edges": len(ours), "max_abs_difference": worst, "largest_score": biggest,
            "seconds": round(time.time() - started, 1)}


# ------------------------------------------------------------------------------------------ comparison
def compare(found: Circuit, eap: EdgeScores, sharpness: dict[Head, float], exact: Circuit | None = None
            ) -> tuple[pd.DataFrame, list[dict[str, Any]]]:
    """One row per edge (path patching beside EAP, each with its interval over the same resamples of the
    prompts; and path patching's exact edge when measured), and per endpoint the agreement over edges."""
    frame = found.to_frame()
    keys = [(e.sender, e.receiver, e.input) for e in found.edges]
    if exact is not None:
        exact_effect = {(e.sender, e.receiver, e.input): e.effect for e in exact.edges}
        frame["effect_exact"] = [exact_effect.get(key, np.nan) for key in keys]
    for endpoint, scores in eap.items():
        column = f"eap_{endpoint}" if endpoint != "clean" else "eap"
        intervals = [eap_interval(scores[key], found.n_boot) if key in scores else None for key in keys]
        frame[column] = [i.estimate if i else np.nan for i in intervals]
        if endpoint != "heads_frozen":
            frame[f"{column}_low"] = [i.low if i else np.nan for i in intervals]
            frame[f"{column}_high"] = [i.high if i else np.nan for i in intervals]
    frame["receiver_max_attn"] = [sharpness.get(e.receiver, np.nan) if e.receiver != LOGITS else np.nan
                                  for e in found.edges]
    kept = frame["kept"].to_numpy()
    effect = frame["effect"].to_numpy()
    clear = ((frame["low"] > 0) | (frame["high"] < 0)).to_numpy()
    k = max(int(kept.sum()), 1)
    top_pp = set(np.argsort(-np.abs(effect), kind="stable")[:k])
    rows = []
    for column in [c for c in frame.columns if c in ("eap", "eap_corrupt")]:
        score = frame[column].to_numpy()
        eap_clear = ((frame[f"{column}_low"] > 0) | (frame[f"{column}_high"] < 0)).to_numpy()
        both = clear & eap_clear
        top_eap = set(np.argsort(-np.abs(score), kind="stable")[:k])
        heads = (frame["receiver"] != LOGITS).to_numpy()
        rows.append({
            "eap": column, "edges": len(frame), "kept": int(kept.sum()),
            "spearman": float(spearman_rows(effect[None], score[None])[0]),
            "spearman_head_to_head": float(spearman_rows(effect[heads][None], score[heads][None])[0]),
            "sign_agreement_kept": _share(np.sign(effect[kept]) == np.sign(score[kept])),
            "sign_agreement_clear": _share(np.sign(effect[clear]) == np.sign(score[clear])),
            "n_clear": int(clear.sum()),
            "sign_agreement_both_clear": _share(np.sign(effect[both]) == np.sign(score[both])),
            "n_both_clear": int(both.sum()), "n_clear_eap_only": int((eap_clear & ~clear).sum()),
            f"top_{k}_overlap": len(top_pp & top_eap) / k,
            "kept_missed_by_eap": [_edge(frame, i) for i in sorted(top_pp - top_eap)],
            "eap_top_not_kept": [_edge(frame, i) for i in sorted(top_eap - top_pp)],
        })
    return frame, rows


def eap_interval(values: np.ndarray, n_boot: int) -> Any:
    """An EAP edge's mean over prompts and its 90% interval, over the resamples ``circuit`` draws for its
    own intervals (same seed and count), so the two methods' intervals move with the same prompts."""
    return bootstrap([np.asarray(values, dtype=float)[:, None, None]], lambda rows: rows[:, 0], n_boot=n_boot)


def exact_summary(frame: pd.DataFrame, cut: float) -> dict[str, Any]:
    """How far ``circuit``'s fast edges (first order beyond the receiver) are from exact path patching;
    ``cut``: the effect an edge needs to be kept (the circuit's threshold x its total effect)."""
    heads = frame[frame["input"] != LOGITS]
    gap = (heads["effect"] - heads["effect_exact"]).abs()
    kept_fast = set(heads.index[heads["kept"]])
    kept_exact = set(heads.index[heads["effect_exact"].abs() >= cut])
    return {"edges": len(heads), "max_abs_difference": float(gap.max()) if len(gap) else np.nan,
            "largest_exact": float(heads["effect_exact"].abs().max()) if len(heads) else np.nan,
            "spearman": float(spearman_rows(heads["effect"].to_numpy()[None],
                                            heads["effect_exact"].to_numpy()[None])[0]) if len(heads) > 2
            else np.nan,
            "kept_same": len(kept_fast & kept_exact), "kept_fast_only": len(kept_fast - kept_exact),
            "kept_exact_only": len(kept_exact - kept_fast)}


def mechanism(frame: pd.DataFrame, groups: dict[Head, str], order: tuple[str, ...]) -> pd.DataFrame:
    """Sum of edge effects (and EAP) from one group into the next, by the receiver's input."""
    named = {head_name(h): g for h, g in groups.items()}
    rows = []
    for sender_group, receiver_group in zip(order, order[1:], strict=False):
        for kind in ("q", "k", "v"):
            mask = ((frame["sender"].map(named) == sender_group)
                    & (frame["receiver"].map(named) == receiver_group) & (frame["input"] == kind))
            part = frame[mask]
            row = {"from": sender_group, "to": receiver_group, "input": kind, "edges": int(mask.sum()),
                   "kept": int(part["kept"].sum()), "effect_sum": float(part["effect"].sum())}
            for column in [c for c in frame.columns if c in ("eap", "eap_corrupt")]:
                row[f"{column}_sum"] = float(part[column].sum())
            rows.append(row)
    return pd.DataFrame(rows)


def _share(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _edge(frame: pd.DataFrame, i: int) -> str:
    row = frame.iloc[int(i)]
    return f"{row['sender']}->{row['receiver']}" + ("" if row["input"] == LOGITS else f".{row['input']}")


# ------------------------------------------------------------------------------------------ runs
def run_case(model: Any, data: GateData, nodes: list[Head] | HeadScores, counterfactual: str, folder: Path,
             args: argparse.Namespace, top_k: int | None) -> tuple[Circuit, EdgeScores, Circuit | None]:
    """One circuit, its EAP scores and (``--exact``) its exact twin, each read back from ``folder`` when an
    earlier call saved it."""
    if (folder / "eap.json").is_file():
        found = Circuit.load(folder / "circuit.json")
        raw = json.loads((folder / "eap.json").read_text())
        eap = {e: {_key(k): np.array(v) for k, v in s.items()} for e, s in raw.items()}
    else:
        started = time.time()
        found = circuit(model, data, nodes, top_k=top_k, counterfactual=counterfactual,
                        threshold=args.threshold, n_boot=args.n_boot)
        eap = eap_edges(model, data, found.nodes, counterfactual)
        folder.mkdir(parents=True, exist_ok=True)
        found.save(folder / "circuit.json")
        found.write_html(folder / "circuit.html", title=f"{folder.parent.name}: {folder.name}")
        write_json({e: {json.dumps(_plain(k)): v.tolist() for k, v in s.items()} for e, s in eap.items()},
                   folder / "eap.json")
        print(f"  {folder.parent.name}/{folder.name}: {len(found.nodes)} nodes, "
              f"{len(found.kept_edges())} kept edges, {found.passes} passes, circuit {found.seconds:.0f} s, "
              f"all {time.time() - started:.0f} s", flush=True)
    return found, eap, exact_twin(model, data, found, folder, args) if args.exact else None


def exact_twin(model: Any, data: GateData, found: Circuit, folder: Path, args: argparse.Namespace) -> Circuit:
    """``found``'s nodes measured again by exact path patching (one pass per edge), cached in ``folder``."""
    exact_file = folder / "circuit_exact.json"
    if exact_file.is_file():
        return Circuit.load(exact_file)
    exact = circuit(model, data, found.nodes, counterfactual=found.counterfactual, threshold=args.threshold,
                    n_boot=args.n_boot, exact=True)
    exact.save(exact_file)
    print(f"  {folder.parent.name}/{folder.name} exact: {exact.passes} passes, {exact.seconds:.0f} s",
          flush=True)
    return exact


def _plain(key: EdgeKey) -> list[Any]:
    sender, receiver, kind = key
    return [list(sender), receiver if receiver == LOGITS else list(receiver), kind]


def _key(text: str) -> EdgeKey:
    sender, receiver, kind = json.loads(text)
    return tuple(sender), receiver if receiver == LOGITS else tuple(receiver), kind


def run_task(model: Any, task: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Every node set x counterfactual of one task, compared with EAP; cached whole once finished."""
    record_file = out / task / "record.json"
    if record_file.is_file():
        return json.loads(record_file.read_text())
    started = time.time()
    data = make_task(task, model, n=args.n, seed=1, **TASK_OPTIONS[task])
    scores, fit = chg_nodes(model, task, args, out)
    per_group = args.per_group or PER_GROUP[task]
    attention, groups, picked = attention_nodes(model, task, data, per_group)
    node_sets = {"chg": (scores, args.top_k), "attention": (attention, None)}
    record: dict[str, Any] = {"task": task, "n": len(data), "fit": fit, "attention_scores": picked,
                              "attention_nodes_chg_facilitating": [head_name(h) for h in attention
                                                                   if float(scores.scores[h]) > -1.0],
                              "cases": {}}
    parity_source = None
    for nodes_name, (source, top_k) in node_sets.items():
        for counterfactual in COUNTERFACTUALS[task]:
            folder = out / task / f"{nodes_name}-{counterfactual}"
            found, eap, exact = run_case(model, data, source, counterfactual, folder, args, top_k)
            sharpness = receiver_sharpness(model, data, found.nodes)
            frame, agreement = compare(found, eap, sharpness, exact)
            shown = ("score", "ablation_effect", "ablation_low", "ablation_high")
            case: dict[str, Any] = {
                "nodes": [{"head": head_name(h),
                           "group": groups.get(h) if nodes_name == "attention" else None,
                           **{k: found.node_info[h].get(k) for k in shown}, "max_attn": sharpness[h]}
                          for h in found.nodes],
                "settings": {"counterfactual": counterfactual, "carry": found.carry,
                             "threshold": found.threshold, "total_effect": found.total_effect,
                             "clean_metric": found.clean_metric, "passes": found.passes,
                             "seconds": found.seconds, "n_boot": found.n_boot},
                "edges": frame.to_dict(orient="records"), "agreement": agreement}
            if exact is not None:
                case["exact"] = (exact_summary(frame, found.threshold * abs(found.total_effect))
                                 | {"passes": exact.passes, "seconds": exact.seconds})
            if nodes_name == "attention":
                case["mechanism"] = mechanism(frame, groups, GROUPS[task]).to_dict(orient="records")
                if counterfactual == "corrupt" and parity_source is None:
                    parity_source = (found.nodes, eap["corrupt"])
            record["cases"][f"{nodes_name}-{counterfactual}"] = case
    if parity_source is not None and args.tl_parity > 0 and task == "induction":
        record["tl_parity"] = tl_parity(model, data, *parity_source, args.tl_parity)
        print(f"  TL attribution_patch parity: {record['tl_parity']}", flush=True)
    record["seconds"] = round(time.time() - started, 1)
    text = json.dumps(record, indent=1, default=str)  # not write_json: its sorted keys would reorder tables
    atomic_write_bytes(record_file, lambda tmp: Path(tmp).write_text(text))
    return record


# ------------------------------------------------------------------------------------------ report
def report(records: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    command = settings["command"]
    text = ["# Circuits on SmolLM2-135M: path patching's edges and edge attribution patching", "",
            f"Every number below: `{command}` ({settings['threads']} thread(s) on this project's 2-core CPU "
            f"machine: the tasks took {settings['task_seconds']:.0f} s, of which `circuit` "
            f"{settings['case_seconds']:.0f} s and TransformerLens' whole-graph check "
            f"{settings['parity_seconds']:.0f} s). Model: SmolLM2-135M-Instruct "
            "(embedded), with each query head given its own copy of its group's key/value weights so that "
            "key and value edges exist per query head (largest logit difference from the original: "
            f"{settings['logit_gap']:.2e}). "
            f"Prompts: {settings['n']} per task, seed 1 (held out from the fits). Edges: "
            "`chg_tlens.circuit` (path patching through each receiver's q, k, v separately, 90% bootstrap "
            f"intervals over prompts, kept when |effect| >= {settings['threshold']} of the total effect; "
            "`carry` = how a receiver's change reaches the metric: SmolLM2 has a final RMSNorm, so beyond "
            "the receiver it is first order). Metric: mean target log-prob. EAP: `eap` (gradient at the "
            "clean run, Syed et al.), `eap_corrupt` (at the corrupt run, TransformerLens' convention); both "
            "signed like the effects (positive: the edge helps the clean answer). `receiver_max_attn`: the "
            "receiver's largest attention weight at the scored positions, averaged (near 1 = saturated). "
            "EAP's intervals (`eap_low`, `eap_high`, ...) are 90% bootstrap intervals over the same "
            "resamples of the prompts as path patching's.", ""]
    text += ["## Findings", "", *findings(records), ""]
    for task, record in records.items():
        fit = record["fit"]
        text += [f"## {task}", "",
                 f"CHG nodes: the top {settings['top_k']} of {fit['n_facilitating']} heads facilitating in "
                 f"every seed, by mean G-; fit: {fit['origin']}; certified stage x seed rows: "
                 f"{fit['certified_share']:.0%}" + (" (**not certified**: its roles are a sketch)"
                                                    if fit["certified_share"] < 1 else "") + ".",
                 "Attention nodes (mean attention score per group): " + "; ".join(
                     f"{group}: " + ", ".join(f"{h} ({s})" for h, s in heads.items())
                     for group, heads in record["attention_scores"].items()) + ".", ""]
        if "tl_parity" in record:
            parity = record["tl_parity"]
            text += ["TransformerLens 4.3's own `attribution_patch(granularity=\"edge\")` on "
                     f"{parity['prompts']} prompt(s), summed over positions, against this study's "
                     f"`eap_corrupt` on the same {parity['edges']} edges: largest difference "
                     f"{parity['max_abs_difference']:.2e} (largest score {parity['largest_score']:.3g}; "
                     f"{parity['seconds']:.0f} s for TL's whole-graph sweep).", ""]
        for name, case in record["cases"].items():
            settings_case = case["settings"]
            text += [f"### {task}: {name.replace('-', ' nodes, counterfactual ')}", "",
                     "Total effect (clean - all heads counterfactual) "
                     f"{settings_case['total_effect']:.3f} nats; carry: {settings_case['carry']}; "
                     f"{settings_case['passes']} passes, "
                     f"{settings_case['seconds']:.0f} s.", "",
                     markdown_table(pd.DataFrame(case["nodes"]).dropna(axis=1, how="all")), "",
                     "Kept edges:", ""]
            edges = pd.DataFrame(case["edges"])
            kept = edges[edges["kept"]].drop(columns=["kept"])
            text += [markdown_table(kept) if len(kept) else "(none)", ""]
            agreement = pd.DataFrame(case["agreement"])
            lists = agreement[["eap", "kept_missed_by_eap", "eap_top_not_kept"]]
            text += ["Agreement over all measured edges (top-k: k = the kept edges' count; sign agreement "
                     "over kept edges, over edges whose path-patching interval excludes 0, and over edges "
                     "where both methods' intervals exclude 0; `n_clear_eap_only`: edges EAP calls clearly "
                     "non-zero and path patching does not):", "",
                     markdown_table(agreement.drop(columns=["kept_missed_by_eap", "eap_top_not_kept"])), "",
                     markdown_table(lists.map(lambda v: ", ".join(v) if isinstance(v, list) else v)), ""]
            if "exact" in case:
                exact = case["exact"]
                text += [f"Fast edges against exact path patching (`--exact`: one pass per edge, "
                         f"{exact['passes']} passes, {exact['seconds']:.0f} s) over the {exact['edges']} "
                         f"head-to-head edges: largest difference {exact['max_abs_difference']:.3g} nats "
                         f"(largest exact edge {exact['largest_exact']:.3g}), Spearman "
                         f"{exact['spearman']:.3f}; kept by both {exact['kept_same']}, by the fast "
                         f"edges only {exact['kept_fast_only']}, by the exact ones only "
                         f"{exact['kept_exact_only']}.",
                         ""]
            if "mechanism" in case:
                text += ["Summed edges from each group into the next, by the receiver's input:", "",
                         markdown_table(pd.DataFrame(case["mechanism"])), ""]
    text += ["## Why path patching and EAP differ here", "",
             "- EAP linearises the receiver's own attention, whose response to a key or query is bounded "
             "(a softmax): a first-order estimate overshoots when the sender's change moves the attention "
             "far (mean-ablating a previous-token head takes away the very key an induction head matches), "
             "and vanishes where the attention is saturated; path patching recomputes the softmax.",
             "- Path patching lets MLPs run free, so sender -> MLP -> receiver counts in its edge; EAP's "
             "edge is the sender's direct write only (MLP-mediated routes are other edges of its graph).",
             "  `eap_heads_frozen` (edges to the logits only) is path patching's own direct edge (every "
             "other head frozen, MLPs free) to first order: where it sides with the effect against `eap`, "
             "the sender reaches the logits through MLPs rather than by its direct write.",
             "- Beyond the receiver both are first order here (the final RMSNorm), from the same clean-run "
             "gradient for `eap`; `eap_corrupt` takes it at the corrupt run, which can differ in sign "
             "where the corrupt run does not use the edge at all.", ""]
    return "\n".join(text)


def findings(records: dict[str, dict[str, Any]]) -> list[str]:
    """The numbers the tables below hold, read off as sentences: which input carries each group's edges,
    how well EAP ranks the edges, how far the fast edges are from exact ones (``--exact``), and each kept
    edge EAP gets wrong by more than 2x or in sign."""
    lines = []
    for task, record in records.items():
        chg = next((case for name, case in record["cases"].items() if name.startswith("chg")), None)
        if chg is not None and "attention_nodes_chg_facilitating" in record:
            picked = [h for heads in record["attention_scores"].values() for h in heads]
            both = record["attention_nodes_chg_facilitating"]
            lines.append(f"- {task}: the CHG fit calls {len(both)} of the {len(picked)} attention-picked "
                         f"heads facilitating in every seed ({', '.join(both) or 'none'}); its own top "
                         f"{len(chg['nodes'])} by G- are {', '.join(node['head'] for node in chg['nodes'])}.")
        for name, case in record["cases"].items():
            if "exact" in case:
                exact = case["exact"]
                lines.append(f"- {task} ({name}): fast edges vs exact path patching over {exact['edges']} "
                             f"head-to-head edges: Spearman {exact['spearman']:.3f}, largest difference "
                             f"{exact['max_abs_difference']:.3f} nats (largest edge "
                             f"{exact['largest_exact']:.3f}); "
                             f"kept by both {exact['kept_same']}, fast only {exact['kept_fast_only']}, "
                             f"exact only {exact['kept_exact_only']}.")
            for row_group in _mechanism_rows(case):
                lines.append(f"- {task} ({name}): {row_group}")
            for row in case["agreement"]:
                top = next(key for key in row if key.startswith("top_"))  # top_<k>_overlap
                lines.append(f"- {task} ({name}): `{row['eap']}` vs path patching over {row['edges']} edges: "
                             f"Spearman {row['spearman']:.2f}, sign agreement "
                             f"{row['sign_agreement_clear']:.0%} on the {row['n_clear']} edges whose "
                             f"interval excludes 0, top-{top.split('_')[1]} overlap {row[top]:.0%}.")
            edges = pd.DataFrame(case["edges"])
            for edge in edges[edges["kept"]].itertuples():
                ratio = edge.eap / edge.effect if edge.effect else float("nan")
                if 0.5 <= ratio <= 2.0:
                    continue
                target = edge.receiver if edge.input == LOGITS else f"{edge.receiver}.{edge.input}"
                extra = (f", path patching's own edge to first order {edge.eap_heads_frozen:+.3f}"
                         if edge.input == LOGITS
                         else f", receiver's max attention {edge.receiver_max_attn:.2f}")
                lines.append(f"- {task} ({name}): kept edge {edge.sender} -> {target} "
                             f"{edge.effect:+.3f} [{edge.low:+.3f}, {edge.high:+.3f}], EAP {edge.eap:+.3f} "
                             f"({ratio:.1f}x){extra}.")
    return lines


def _mechanism_rows(case: dict[str, Any]) -> list[str]:
    if "mechanism" not in case:
        return []
    frame = pd.DataFrame(case["mechanism"])
    out = []
    for (source, target), part in frame.groupby(["from", "to"], sort=False):
        by_input = {row.input: row for row in part.itertuples()}
        patched = ", ".join(f"{kind} {by_input[kind].effect_sum:+.3f}" for kind in "qkv")
        eap = ", ".join(f"{kind} {by_input[kind].eap_sum:+.3f}" for kind in "qkv")
        kept = int(part["kept"].sum())
        out.append(f"{source} -> {target}, summed over {int(part['edges'].sum())} edges: path patching "
                   f"{patched} ({kept} kept); EAP {eap}.")
    return out


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    model, gap = load_models()
    print(f"per-head key/value copy: largest logit difference {gap:.2e}", flush=True)
    records = {task: run_task(model, task, args, out) for task in args.tasks}
    settings = {"command": "python benchmarks/circuit_study.py " + " ".join(sys.argv[1:]), "n": args.n,
                "threads": args.threads, "threshold": args.threshold, "n_boot": args.n_boot,
                "top_k": args.top_k,
                "per_group": args.per_group, "fit": args.fit, "logit_gap": gap,
                "seconds": time.time() - started}
    settings["case_seconds"] = sum(case["settings"]["seconds"] for record in records.values()
                                   for case in record["cases"].values())
    settings["task_seconds"] = sum(record["seconds"] for record in records.values())
    settings["parity_seconds"] = sum(r.get("tl_parity", {}).get("seconds", 0.0) for r in records.values())
    text = report(records, settings)
    write_json({"settings": settings, "tasks": records}, out / "circuit_study.json")
    (out / "circuit_study.md").write_text(text)
    print(text)
    if args.docs:
        DOCS.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "circuit_study.json", DOCS / "circuit_study.json")
        shutil.copy(out / "circuit_study.md", DOCS / "circuit_study.md")
        for task in args.tasks:
            for case in sorted((out / task).glob("*-*/circuit.json")):
                for suffix in (".json", ".html"):
                    shutil.copy(case.with_suffix(suffix), DOCS / f"{task}_{case.parent.name}.circuit{suffix}")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", help="study folder (results are cached here; rerun to continue)")
    parser.add_argument("--tasks", nargs="+", default=["induction", "ioi"], choices=list(TASK_OPTIONS))
    parser.add_argument("--n", type=int, default=12, help="held-out prompts per task")
    parser.add_argument("--top-k", type=int, default=8, help="CHG nodes: the top facilitating heads")
    parser.add_argument("--per-group", type=int, default=None,
                        help="attention nodes per group (default: 4 on induction's 2 groups, 3 on ioi's 3)")
    parser.add_argument("--threshold", type=float, default=0.05,
                        help="kept: |effect| >= this share of the total effect")
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--fit", choices=["saved", "short"], default="saved",
                        help="CHG nodes from the convergence study's saved reference fit, or a short "
                             "fit here")
    parser.add_argument("--fit-from", default=None,
                        help="CHG nodes from a saved fit: a folder with {task} in it, e.g. a certified fit "
                             "of optimiser_study.py, OUT/fits/{task}/lbfgs/result (overrides --fit)")
    parser.add_argument("--exact", action="store_true",
                        help="also measure every edge by exact path patching (one pass per edge) and report "
                             "how far the fast edges are from it")
    parser.add_argument("--fit-steps", type=int, default=20, help="--fit short: L-BFGS iterations per stage")
    parser.add_argument("--fit-n", type=int, default=16, help="--fit short: prompts (seed 0)")
    parser.add_argument("--tl-parity", type=int, default=1,
                        help="prompts on which to run TransformerLens' whole-graph edge attribution (about "
                             "a minute each here); 0 skips it")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--docs", action="store_true", help="also write docs/results/circuit_study/")
    return parser.parse_args()


if __name__ == "__main__":
    main()
