"""CHG training speed on a Llama-3.2-1B-sized model with random weights: steps/s at fp32 and bf16 autocast.

    python benchmarks/gpu_bench.py --out gpu_bench.json                 # on a GPU machine (offline)
    python benchmarks/gpu_bench.py --tiny --device cpu --out tiny.json  # a seconds-long check anywhere

The model has Llama-3.2-1B's shape (16 layers, d_model 2048, 32 query heads, 8 KV heads, d_mlp 8192,
vocab 128,256, tied embeddings) and random weights, so no download is needed; speed does not depend on
the weight values. It is booted into a TransformerBridge exactly as ``load_model`` boots a checkpoint,
with a small word-level tokenizer built here (the prompts are random token ids, so its words never
matter). Each setting runs ``fit_chg`` (three stages of ``--steps`` Adam updates) after a warm-up fit
and reports updates per second; results are rewritten after every setting, so a run that hits a time
limit still leaves the settings it finished. ``--budget-s`` skips the settings that would start after
that many seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402

from chg_tlens import CHGConfig, fit_chg  # noqa: E402
from chg_tlens.core.data import GateData  # noqa: E402

LLAMA_1B = dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True)
"""Llama-3.2-1B's shape (transformers LlamaConfig fields)."""
TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=512, tie_word_embeddings=True)
"""A CPU-sized model of the same architecture, for checking the script."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    shape = TINY if args.tiny else LLAMA_1B
    batch_sizes = args.batch_sizes or ([2, 4] if args.tiny else [8, 32, 64])
    mask_counts = args.n_masks or ([1, 2] if args.tiny else [1, 4, 10])
    seq_len = args.seq_len or (8 if args.tiny else 32)
    steps = args.steps or (2 if args.tiny else 10)

    started = time.time()
    model = build_model(shape, device)
    n_parameters = sum(p.numel() for p in model.parameters())
    data = random_prompts(max(batch_sizes), seq_len, shape["vocab_size"])
    record: dict[str, Any] = {
        "machine": machine_record(device),
        "model": {"shape": shape, "n_parameters": n_parameters, "tiny": args.tiny,
                  "boot_seconds": round(time.time() - started, 1)},
        "settings": {"seq_len": seq_len, "steps_per_stage": steps, "batch_sizes": batch_sizes,
                     "n_masks": mask_counts, "dtypes": args.dtypes, "budget_s": args.budget_s},
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "results": [],
    }
    for dtype in args.dtypes:
        autocast = None if dtype == "float32" else dtype
        warm_up(model, data, autocast, device)
        for batch_size in batch_sizes:
            for n_masks in mask_counts:
                setting = {"dtype": "fp32" if autocast is None else f"{dtype} autocast",
                           "batch_size": batch_size, "n_masks": n_masks, "seq_len": seq_len}
                if args.budget_s and time.time() - started > args.budget_s:
                    record["results"].append({**setting, "status": "skipped (time budget)"})
                    continue
                result = time_fit(model, data, batch_size, n_masks, steps, autocast, device)
                record["results"].append({**setting, **result})
                write(record, args.out)
                print(_line(record["results"][-1]), flush=True)
    record["seconds"] = round(time.time() - started, 1)
    write(record, args.out)
    print(f"wrote {args.out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_bench.json"), help="JSON file to write")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and few steps (checks the script)")
    parser.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="examples per update (default 8 32 64; tiny 2 4)")
    parser.add_argument("--n-masks", type=int, nargs="+", default=None,
                        help="gate sets per pass (default 1 4 10; tiny 1 2)")
    parser.add_argument("--seq-len", type=int, default=None, help="prompt+answer tokens (default 32; tiny 8)")
    parser.add_argument("--steps", type=int, default=None, help="updates per stage (default 10; tiny 2)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float16", "float32"],
                        help="forward precision: bf16/fp16 autocast or plain fp32 (default bfloat16 float32)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new setting after this many seconds (default: no limit)")
    return parser.parse_args(argv)


def build_model(shape: dict[str, int], device: str) -> Any:
    """A random-weight Llama of ``shape`` in a TransformerBridge, built directly on ``device``."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=2048, rope_theta=500000.0,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        hf_model = LlamaForCausalLM(config)
    hf_model.eval()
    bridge = TransformerBridge.boot_transformers("random-llama", hf_model=hf_model,
                                                 tokenizer=word_tokenizer(), device=device)
    return bridge.eval()


def word_tokenizer() -> Any:
    """A small word-level tokenizer: the bridge wants one, the prompts are token ids.

    Saved to a folder and read back, because the bridge reloads tokenizers by their folder name.
    """
    import tempfile

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>", "<unk>"] + [f"w{i}" for i in range(60)]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")
    with tempfile.TemporaryDirectory() as folder:
        fast.save_pretrained(folder)
        return AutoTokenizer.from_pretrained(folder, add_bos_token=True)


def random_prompts(n: int, seq_len: int, vocab: int) -> GateData:
    """Random token ids after BOS; the last token is the one target (a one-token answer)."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, vocab, (n, seq_len), generator=generator)
    tokens[:, 0] = 1
    target_mask = torch.zeros(n, seq_len, dtype=torch.bool)
    target_mask[:, -1] = True
    return GateData.from_tokens(tokens, target_mask, pad_token_id=0, meta={"task": "random"})


def warm_up(model: Any, data: GateData, autocast: str | None, device: str) -> None:
    """One short fit so kernel selection and allocator growth stay out of the timings."""
    fit_chg(model, data, CHGConfig(n_seeds=1, batch_size=min(8, len(data)), steps=2, progress=False,
                                   device=device, autocast=autocast))


def time_fit(model: Any, data: GateData, batch_size: int, n_masks: int, steps: int,
             autocast: str | None, device: str) -> dict[str, Any]:
    """Updates per second of a three-stage fit_chg with these settings (or why it could not run)."""
    config = CHGConfig(n_seeds=n_masks, batch_size=batch_size, steps=steps, progress=False, device=device,
                       autocast=autocast)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    start = time.perf_counter()
    try:
        fit_chg(model, data, config)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "out of memory"}
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    updates = 3 * steps
    return {
        "status": "ok",
        "steps_per_s": updates / seconds,
        "seconds_per_step": seconds / updates,
        "gated_rows_per_s": updates * batch_size * n_masks / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
    }


def machine_record(device: str) -> dict[str, Any]:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "device": device, "gpu": torch.cuda.get_device_name(0) if device.startswith("cuda") else None,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32}


def write(record: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def _line(result: dict[str, Any]) -> str:
    head = f"{result['dtype']:>17}  batch {result['batch_size']:>3}  masks {result['n_masks']:>2}"
    if result["status"] != "ok":
        return f"{head}  {result['status']}"
    memory = f"  peak {result['peak_memory_gib']:.1f} GiB" if result["peak_memory_gib"] is not None else ""
    return f"{head}  {result['steps_per_s']:7.2f} steps/s  {result['gated_rows_per_s']:8.1f} rows/s{memory}"


if __name__ == "__main__":
    sys.exit(main())
