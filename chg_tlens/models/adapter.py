"""The one place that knows which TransformerLens it is talking to.

TransformerLens 4.x gives a ``TransformerBridge`` (hook names such as ``blocks.0.attn.hook_z`` are
aliases of the wrapped module's own hook points); 3.9 gives a ``HookedTransformer`` (the names are the
keys of ``hook_dict``). Everything else in the package asks this module, never the model's class.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from chg_tlens.errors import InputError


def hook_z_name(layer: int) -> str:
    """Name of the hook on a layer's per-head attention output before W_O."""
    return f"blocks.{layer}.attn.hook_z"


def is_hook_z(name: str) -> bool:
    """Whether a hook name is some layer's ``hook_z`` (a ``names_filter`` for caching head outputs)."""
    return name.endswith("attn.hook_z")


def is_transformer_lens_model(model: Any) -> bool:
    """True for a TransformerBridge (TL 4) or HookedTransformer (TL 3.9)."""
    return (
        isinstance(model, nn.Module)
        and hasattr(model, "cfg")
        and hasattr(model, "hooks")
        and hasattr(model, "hook_dict")
    )


def is_bridge(model: Any) -> bool:
    """True for a TransformerBridge (hook names may be aliases, weights live in ``original_model``)."""
    return type(model).__name__ == "TransformerBridge" or hasattr(model, "original_model")


def _canonical_hook_names(model: nn.Module) -> set[str]:
    hook_dict = model.hook_dict
    names = set(hook_dict.keys())
    if is_bridge(model):
        names |= _bridge_alias_names(model)
    return names


def _bridge_alias_names(model: nn.Module) -> set[str]:
    """hook_z on a bridge is an alias registered on the attention component, not a key."""
    names = set()
    for layer in range(model.cfg.n_layers):
        name = hook_z_name(layer)
        getter = getattr(model, "get_hook_point", None)
        try:
            if getter is not None and getter(name) is not None:
                names.add(name)
        except (AttributeError, KeyError, IndexError):
            continue
    return names


@dataclass(frozen=True)
class HeadLayout:
    """Where the heads are: the shape every per-head result in the package shares."""

    n_layers: int
    n_heads: int
    d_head: int
    n_ctx: int
    d_vocab: int
    """Input vocabulary: the token ids the model embeds."""
    d_vocab_out: int = -1
    """Output vocabulary: the width of the logits (``d_vocab`` unless the model unembeds to another
    set, as compiled RASP programs do); ``-1`` when not known."""


def require_model(model: Any, argument: str = "model") -> HeadLayout:
    """Check that ``model`` is a TransformerLens model with hook_z on every layer.

    Fails before any compute, naming what was found, so a wrong object never reaches a fit.
    """
    if not is_transformer_lens_model(model):
        raise InputError(
            f"{argument}: expected a TransformerLens model (TransformerBridge or HookedTransformer), "
            f"got {type(model).__name__}. Load one with chg_tlens.load_model(...)."
        )
    cfg = model.cfg
    n_layers = int(getattr(cfg, "n_layers", 0) or 0)
    n_heads = int(getattr(cfg, "n_heads", 0) or 0)
    if n_layers <= 0 or n_heads <= 0:
        raise InputError(
            f"{argument}: the model has no attention heads to gate "
            f"(cfg.n_layers={n_layers}, cfg.n_heads={n_heads})."
        )
    names = _canonical_hook_names(model)
    missing = [hook_z_name(layer) for layer in range(n_layers) if hook_z_name(layer) not in names]
    if missing:
        raise InputError(
            f"{argument}: the model has no per-head attention output hooks "
            f"(missing {missing[:3]}{' ...' if len(missing) > 3 else ''}); CHG gates hook_z "
            f"[batch, pos, head_index, d_head] on every layer."
        )
    return HeadLayout(
        n_layers=n_layers,
        n_heads=n_heads,
        d_head=int(cfg.d_head),
        n_ctx=int(cfg.n_ctx),
        d_vocab=int(cfg.d_vocab),
        d_vocab_out=int(cfg.d_vocab_out if (getattr(cfg, "d_vocab_out", -1) or -1) > 0 else cfg.d_vocab),
    )


def is_causal(model: Any) -> bool:
    """Whether each position attends only to itself and earlier ones (GPT-style; the default)."""
    return getattr(model.cfg, "attention_dir", "causal") != "bidirectional"


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless model)."""
    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def model_name(model: Any) -> str:
    """A name for provenance records."""
    cfg = getattr(model, "cfg", None)
    return str(getattr(cfg, "model_name", None) or type(model).__name__)


def tokenizer_of(model: Any, purpose: str) -> Any:
    """The model's tokenizer, or a clear error saying what needed it."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise InputError(
            f"{purpose} needs a tokenizer, but the model has none (model.tokenizer is None). "
            "Pass token ids with GateData.from_tokens(...) instead."
        )
    return tokenizer


def prepends_bos(model: Any) -> bool:
    """Whether the model expects a BOS token at the start of every sequence."""
    return bool(getattr(model.cfg, "default_prepend_bos", True))


def pad_token_id(model: Any) -> int:
    """Token used for right padding; never a target, so its value does not matter to the loss."""
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        for attribute in ("pad_token_id", "eos_token_id", "bos_token_id"):
            value = getattr(tokenizer, attribute, None)
            if value is not None:
                return int(value)
    return 0


def encode(model: Any, text: str, prepend_bos: bool) -> list[int]:
    """Token ids of ``text`` as the model's own tokenizer makes them."""
    tokenizer = tokenizer_of(model, "Tokenizing text")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if prepend_bos:
        bos = getattr(tokenizer, "bos_token_id", None)
        if bos is None:
            bos = getattr(tokenizer, "eos_token_id", None)
        if bos is not None:
            ids = [int(bos), *ids]
    return [int(i) for i in ids]


@contextmanager
def frozen(model: nn.Module, track_weights: bool = False) -> Iterator[nn.Module]:
    """Switch to eval and freeze the weights for a fit, then restore both as they were.

    Gradients then reach only the gates, and dropout never perturbs a fit. ``track_weights=True``
    keeps every weight tracked by autograd instead (TransformerLens' attribution_patch differentiates
    through them with ``torch.autograd.grad``; no ``.grad`` buffer is written).
    """
    requires_grad = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for parameter, _ in requires_grad:
            parameter.requires_grad_(track_weights)
        model.eval()
        yield model
    finally:
        for parameter, flag in requires_grad:
            parameter.requires_grad_(flag)
        for module, training in modes:
            module.train(training)


@dataclass(frozen=True)
class FinalResidual:
    """Where the unembedding's input can be caught, and what still has to run on it to give logits."""

    hook_name: str
    norm: Callable[[Tensor], Tensor]
    """The final norm when the hook fires before it (identity when the hook is after it, or no norm)."""


def final_residual(model: Any) -> FinalResidual:
    """The final residual stream of either TransformerLens.

    A bridge has ``unembed.hook_in`` (after the final norm). A HookedTransformer has no hook there, and
    ``ln_final.hook_normalized`` fires before the norm's weight and bias, so the last block's
    ``hook_resid_post`` is used and the model's own ``ln_final`` is applied to the rows that are kept.
    """
    names = set(model.hook_dict.keys())
    if "unembed.hook_in" in names:
        return FinalResidual("unembed.hook_in", _identity)
    last = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    if last not in names:
        raise RuntimeError(f"{type(model).__name__} has neither unembed.hook_in nor {last}.")
    norm = getattr(model, "ln_final", None)
    return FinalResidual(last, norm if norm is not None else _identity)


def _identity(x: Tensor) -> Tensor:
    return x


def final_norm_kind(model: Any) -> Literal["RMS", "LN"] | None:
    """What the final norm does to the residual, read from the module (not ``cfg``: TL 3.9 builds an
    RMSNorm for ``normalization_type="LN"`` with ``final_rms``): ``"RMS"`` scales, ``"LN"`` centres
    and scales, None for no norm (no ``ln_final.hook_scale``)."""
    if "ln_final.hook_scale" not in model.hook_dict:
        return None
    norm = model.ln_final
    if is_bridge(model):
        return "RMS" if getattr(norm, "uses_rms_norm", False) else "LN"
    kind = type(norm).__name__
    if kind in ("RMSNorm", "RMSNormPre"):
        return "RMS"
    if kind in ("LayerNorm", "LayerNormPre"):
        return "LN"
    raise InputError(f"{kind} as the final norm is not known here; RMSNorm and LayerNorm (and their folded "
                     "'Pre' forms) are.")


# ----------------------------------------------------------------------------------- toy models
def legacy_model_class() -> type | None:
    """``HookedTransformer`` on TransformerLens 3.x, None on 4.x (where it was removed)."""
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            from transformer_lens import HookedTransformer
    except ImportError:
        return None
    return HookedTransformer


def build_native_model(model_name: str = "native", seed: int = 0, **config: Any) -> nn.Module:
    """A randomly initialised TransformerLens model from config fields, on either TL version.

    TL 3.x: ``HookedTransformer``; TL 4: ``TransformerBridge.boot_native``. Planted circuits and tests
    build their models here so the same code runs against both.
    """
    legacy = legacy_model_class()
    if legacy is not None:
        from transformer_lens import HookedTransformerConfig

        torch.manual_seed(seed)
        model = legacy(HookedTransformerConfig(model_name=model_name, seed=seed, **config))
    else:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge

        model = TransformerBridge.boot_native(
            TransformerBridgeConfig(model_name=model_name, seed=seed, **config), model_name=model_name
        )
    model.eval()
    return model


def embedding_weights(model: nn.Module) -> dict[str, Tensor]:
    """Views of the embedding ``W_E [vocab, d_model]``, positional ``W_pos [n_ctx, d_model]`` and
    unembedding ``W_U [d_model, vocab]`` in TransformerLens layouts, whichever version holds them."""
    if is_bridge(model):
        native = model.original_model
        return {"W_E": native.tok_embed.weight, "W_pos": native.pos.weight, "W_U": native.head.weight.T}
    return {"W_E": model.embed.W_E, "W_pos": model.pos_embed.W_pos, "W_U": model.unembed.W_U}


def head_weights(model: nn.Module, layer: int, head: int) -> dict[str, Tensor]:
    """Views of one head's ``W_Q, W_K, W_V [d_model, d_head]`` and ``W_O [d_head, d_model]``: writing
    into them (under ``torch.no_grad()``) changes the model, so only test beds do it."""
    if is_bridge(model):
        attn = model.original_model.layers[layer].attn
        rows = slice(head * model.cfg.d_head, (head + 1) * model.cfg.d_head)
        return {"W_Q": attn.q.weight[rows].T, "W_K": attn.k.weight[rows].T, "W_V": attn.v.weight[rows].T,
                "W_O": attn.o.weight[:, rows].T}
    attn = model.blocks[layer].attn
    return {"W_Q": attn.W_Q[head], "W_K": attn.W_K[head], "W_V": attn.W_V[head], "W_O": attn.W_O[head]}


@torch.no_grad()
def load_native_weights(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Write weights given in ``TransformerBridge.boot_native``'s layout (``layers.0.attn.q.weight``,
    ``head.weight``, ...) into a model from :func:`build_native_model`, on either TransformerLens.

    That layout is what converters such as ``transformer_lens.utilities.tracr`` emit; TL 3.9's
    ``HookedTransformer`` gets the same weights under its own names. Every parameter must be written:
    one left at its random initialisation would silently change the model, so all are set to NaN first
    and any still NaN afterwards is named.
    """
    if not is_bridge(model):
        state_dict = _native_to_hooked(state_dict, int(model.cfg.n_heads))
    for parameter in model.parameters():
        parameter.fill_(float("nan"))
    unexpected = model.load_state_dict(state_dict, strict=False).unexpected_keys
    if unexpected:
        raise InputError(f"state_dict: keys {unexpected[:4]} have no place in {type(model).__name__}.")
    unwritten = [name for name, parameter in model.named_parameters() if torch.isnan(parameter).any()]
    if unwritten:
        raise InputError(
            f"state_dict: gives no (or NaN) values for {unwritten[:4]} of {type(model).__name__}.")


_HOOKED_NAMES = {
    "tok_embed.weight": "embed.W_E", "pos.weight": "pos_embed.W_pos",
    "head.weight": "unembed.W_U", "head.bias": "unembed.b_U",
    "attn.q.weight": "attn.W_Q", "attn.k.weight": "attn.W_K", "attn.v.weight": "attn.W_V",
    "attn.q.bias": "attn.b_Q", "attn.k.bias": "attn.b_K", "attn.v.bias": "attn.b_V",
    "attn.o.weight": "attn.W_O", "attn.o.bias": "attn.b_O",
    "mlp.fc_in.weight": "mlp.W_in", "mlp.fc_in.bias": "mlp.b_in",
    "mlp.fc_out.weight": "mlp.W_out", "mlp.fc_out.bias": "mlp.b_out",
}
"""``boot_native`` parameter names (within a layer where they have one) -> HookedTransformer names."""


def _native_to_hooked(state_dict: dict[str, Tensor], n_heads: int) -> dict[str, Tensor]:
    """``boot_native`` names and ``nn.Linear`` layouts -> HookedTransformer names and per-head layouts."""
    from einops import rearrange

    converted = {}
    for key, value in state_dict.items():
        layer, rest = "", key
        if key.startswith("layers."):
            index, _, rest = key.removeprefix("layers.").partition(".")
            layer = f"blocks.{index}."
        if rest not in _HOOKED_NAMES:
            raise InputError(f"state_dict: key {key!r} has no HookedTransformer counterpart.")
        if rest in ("attn.q.weight", "attn.k.weight", "attn.v.weight"):
            value = rearrange(value, "(h d) m -> h m d", h=n_heads)
        elif rest in ("attn.q.bias", "attn.k.bias", "attn.v.bias"):
            value = rearrange(value, "(h d) -> h d", h=n_heads)
        elif rest == "attn.o.weight":
            value = rearrange(value, "m (h d) -> h d m", h=n_heads)
        elif rest.endswith(".weight") and rest not in ("tok_embed.weight", "pos.weight"):
            value = value.T  # nn.Linear keeps [out, in]; TransformerLens keeps [in, out]
        converted[layer + _HOOKED_NAMES[rest]] = value
    return converted
