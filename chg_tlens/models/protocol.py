"""What a model must offer chg_tlens, written down as a type instead of ``Any``.

Both TransformerLens 4's ``TransformerBridge`` and 3.9's ``HookedTransformer`` satisfy it, and nothing in
the package asks for more (``adapter`` hides where the two differ). ``isinstance(model,
TransformerLensModel)`` only checks that the members exist; ``adapter.require_model`` is the check a fit
runs (an ``nn.Module`` with a ``hook_z`` on every layer and heads to gate), naming what is missing.

    cfg            n_layers, n_heads, d_head, n_ctx, d_vocab (read by every per-head shape)
    hook_dict      hook name -> hook point: where ``blocks.{l}.attn.hook_z`` is found
    hooks()        a context with forward hooks attached: how the gates are applied
    run_with_cache cached activations (patching, ACDC's corrupt values, baselines)
    __call__       tokens -> logits
    tokenizer      may be None: only text inputs need it (token ids do not)
    parameters(), modules(), eval(), train()   the ``nn.Module`` parts a fit freezes and restores

``to_tokens`` and ``run_with_hooks`` are not used: text is tokenised with ``tokenizer`` by
``adapter.encode``, and hooks are attached with ``hooks()``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class HeadConfig(Protocol):
    """The fields of ``model.cfg`` that give every per-head result its shape (read-only here, so any
    config class with these attributes matches, whatever else it holds)."""

    @property
    def n_layers(self) -> int: ...

    @property
    def n_heads(self) -> int: ...

    @property
    def d_head(self) -> int: ...

    @property
    def n_ctx(self) -> int: ...

    @property
    def d_vocab(self) -> int: ...


@runtime_checkable
class TransformerLensModel(Protocol):
    """A TransformerLens model as chg_tlens uses it (see the module docstring for why each member)."""

    @property
    def cfg(self) -> HeadConfig: ...

    @property
    def tokenizer(self) -> Any: ...

    @property
    def hook_dict(self) -> Mapping[str, Any]: ...

    def hooks(self, fwd_hooks: Any = ..., bwd_hooks: Any = ..., reset_hooks_end: bool = ...,
              clear_contexts: bool = ...) -> AbstractContextManager[Any]: ...

    def run_with_cache(self, *args: Any, **kwargs: Any) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def parameters(self, recurse: bool = ...) -> Iterator[Any]: ...

    def modules(self) -> Iterator[Any]: ...

    def eval(self) -> Any: ...

    def train(self, mode: bool = ...) -> Any: ...
