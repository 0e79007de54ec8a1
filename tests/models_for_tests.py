"""Small models the core tests share: a random bridge with norms and MLPs, and one with a word tokenizer."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from chg_tlens.core.data import GateData
from chg_tlens.models.adapter import build_native_model

WORDS = ["<bos>", "<pad>", "<unk>", "when", "mary", "and", "john", "went", "to", "the", "store",
         "gave", "a", "drink", "keys", "key", "cabinet", "are", "is", "of"]


def random_bridge(n_layers: int = 2, n_heads: int = 4, d_head: int = 8, n_ctx: int = 16,
                  d_vocab: int = 20, attn_only: bool = False, normalization: str | None = "LN",
                  seed: int = 0, model_name: str = "native", n_key_value_heads: int | None = None
                  ) -> nn.Module:
    """A randomly initialised TransformerLens model (a bridge on TL 4), deterministic by seed;
    ``n_key_value_heads`` makes its attention grouped-query, as in SmolLM2."""
    grouped = {} if n_key_value_heads is None else {"n_key_value_heads": n_key_value_heads}
    return build_native_model(
        model_name=model_name, seed=seed, d_model=n_heads * d_head, d_head=d_head, n_layers=n_layers,
        n_ctx=n_ctx, n_heads=n_heads,
        d_vocab=d_vocab, attn_only=attn_only, normalization_type=normalization, act_fn="relu",
        d_mlp=4 * n_heads * d_head, **grouped,
    )


@torch.no_grad()
def with_a_key_value_head_per_query_head(grouped: nn.Module, **config: object) -> nn.Module:
    """The same function as a grouped-query ``random_bridge(..., **config)`` (pass the same config), each
    key/value head copied to every query head that reads it (head ``h`` reads ``h // group``): ordinary
    multi-head attention, where a head's key input is its own."""
    config = {key: value for key, value in config.items() if key != "n_key_value_heads"}
    copied = random_bridge(**config)
    n_heads, d_head = grouped.cfg.n_heads, grouped.cfg.d_head
    group = n_heads // grouped.cfg.n_key_value_heads
    bridge = hasattr(grouped, "original_model")
    source = (grouped.original_model if bridge else grouped).state_dict()
    target = copied.original_model if bridge else copied
    state = {}
    for key, value in target.state_dict().items():
        hooked_name = key.replace("attn.W_K", "attn._W_K").replace("attn.W_V", "attn._W_V")
        hooked_name = hooked_name.replace("attn.b_K", "attn._b_K").replace("attn.b_V", "attn._b_V")
        found = source[key] if key in source else source[hooked_name]
        if found.shape != value.shape:  # one key/value head per query head: repeat each group times
            if bridge:  # nn.Linear rows: [n_kv * d_head, ...]
                found = found.reshape(-1, d_head, *found.shape[1:]).repeat_interleave(group, dim=0)
                found = found.reshape(n_heads * d_head, *found.shape[2:])
            else:  # [n_kv, ...]
                found = found.repeat_interleave(group, dim=0)
        state[key] = found
    target.load_state_dict(state)
    return copied


def random_twins(n: int = 5, seq: int = 8, seed: int = 0, first_target: int = 4,
                 d_vocab: int = 20) -> GateData:
    """Random prompts of ``random_bridge``'s vocabulary, each with a random corrupt twin, targets from
    ``first_target`` on: data on which every example has its own clean-vs-corrupt difference."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, d_vocab, (n, seq), generator=generator)
    corrupt = torch.randint(0, d_vocab, (n, seq), generator=generator)
    mask = torch.zeros(n, seq, dtype=torch.bool)
    mask[:, first_target:] = True
    return GateData.from_tokens(tokens, mask).with_corrupt(GateData.from_tokens(corrupt, mask))


@torch.no_grad()
def randomize_final_norm(model: nn.Module, seed: int = 0) -> list[nn.Parameter]:
    """Give the final norm a random weight (around 1) and bias (when it has one), on either TL version.

    A fresh model's norm has weight 1 and bias 0, where a logit path that skipped them would still
    look right. Returns the parameters written (weight first)."""
    generator = torch.Generator().manual_seed(seed)
    written = []
    for parameter in model.ln_final.parameters():
        noise = torch.randn(parameter.shape, generator=generator)
        parameter.copy_(1.0 + 0.5 * noise if not written else 0.5 * noise)
        written.append(parameter)
    if not written:
        raise AssertionError(f"{type(model.ln_final).__name__} has no parameters to randomize")
    return written


def word_tokenizer(words: list[str] = WORDS) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer over ``words`` (WORDS): real tokenizer code, no download."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<bos>", pad_token="<pad>",
                                   unk_token="<unk>")


def word_model(n_ctx: int = 16, words: list[str] = WORDS) -> nn.Module:
    """A random bridge that tokenizes text with the word tokenizer (over ``words``, WORDS first)."""
    model = random_bridge(n_ctx=n_ctx, d_vocab=len(words))
    model.tokenizer = word_tokenizer(words)  # boot_native would try to re-download a named tokenizer
    return model
