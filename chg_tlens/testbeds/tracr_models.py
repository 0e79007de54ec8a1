"""Compiled RASP programs (tracr): models whose heads a compiler wrote, so no one here chose their roles.

tracr (Lindner et al., 2023) compiles a RASP program into transformer weights. Every attention head it
emits computes one ``Aggregate`` or ``SelectorWidth`` of the program, and the program holds only
ancestors of its output; each attention layer gets as many heads as the busiest one needs, and the rest
(with whole attention layers between MLP-only steps) are zero-filled. So the truth is read off the
compiled weights: a head with a nonzero OV circuit is one the program computes with ("facilitating"),
an all-zero one is padding ("irrelevant").

    program      task                                            layers x heads   compiled heads
    reverse      the tokens reversed (a length head, then a flip)     4 x 1        0.0, 3.0
    frac_prevs   share of "x" among the tokens so far (numerical)     2 x 1        1.0
    sort         the tokens sorted (ties broken by position)          3 x 1        1.0, 2.0
    hist         how often each token occurs                          1 x 1        0.0 (every head)

Compiled models attend in both directions and emit their answer at every position (position 0 is BOS
and is not scored): ``.data()`` holds per-position targets (``GateData.targets``), and all examples
have one length, as right padding would be seen by every position. That length is one less than the
compiled maximum: a SelectorWidth head (reverse's length head) silenced reads as the maximum count, so
on full-length inputs the length head is compiled yet not needed. Models are built through
``transformer_lens.utilities.tracr`` (TL 4: a TransformerBridge; TL 3.9: the same weights in a
HookedTransformer) and must reproduce the RASP evaluator's outputs before they are returned.

A measured caveat for gradient methods: a SelectorWidth head feeds an MLP that tracr compiles into a
near-exact step function, so the task loss is flat in that head's gate except for a cliff near 0.9.
A gate that starts below the cliff gets no gradient at all.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor, nn

from chg_tlens.core import checks
from chg_tlens.core.data import GateData
from chg_tlens.errors import InputError, MissingDependencyError
from chg_tlens.models import adapter

TRACR_PIP = 'pip install "chg_tlens[tracr]" (or: pip install tracr-pypi)'
BOS = "BOS"
"""The compiler's BOS token; every input starts with it."""
CHECK_INPUTS = 16
"""Random inputs a loaded model must answer exactly as the RASP program does before it is returned."""
MAX_ENUMERATED_INPUTS = 20_000
"""A numerical program's readout needs every value it can output; it is enumerated up to this many inputs."""


@dataclass(frozen=True)
class Recipe:
    """A named RASP program and the input space it is compiled for."""

    build: Callable[[SimpleNamespace, int], Any]
    """(tracr's ``lib`` and ``rasp``, ``max_seq_len``) -> the program's output SOp."""
    vocab: tuple[Any, ...]
    max_seq_len: int
    description: str

    @property
    def length(self) -> int:
        """Input length of ``.data()``: below the compiled maximum, so every compiled head is needed."""
        return self.max_seq_len - 1


RECIPES: dict[str, Recipe] = {
    "reverse": Recipe(lambda t, _: t.lib.make_reverse(t.rasp.tokens), (1, 2, 3), 5,
                      "the input reversed: a SelectorWidth head counts the length, an Aggregate flips"),
    "frac_prevs": Recipe(lambda t, _: t.lib.make_frac_prevs(t.rasp.tokens == "x"), ("a", "b", "x"), 5,
                         "share of 'x' among the tokens so far (numerical output)"),
    "sort": Recipe(lambda t, n: t.lib.make_sort(t.rasp.tokens, t.rasp.tokens, max_seq_len=n, min_key=1),
                   (1, 2, 3, 4), 5, "the input sorted: a SelectorWidth head ranks, an Aggregate moves"),
    "hist": Recipe(lambda t, _: t.lib.make_hist(), ("a", "b", "c"), 5,
                   "how often each token occurs in the input (one SelectorWidth head)"),
}


@dataclass
class CompiledProgram:
    """One compiled RASP program as a TransformerLens model, with the roles its compiler gave its heads.

    Same surface as the planted benchmarks (``name``, ``model``, ``data(n, seed)``, ``true_roles()``,
    ``description``), so any code that scores methods against known roles takes it as is.
    """

    name: str
    model: nn.Module
    program: Any
    """The RASP output SOp (``tracr.rasp``): its evaluator gives the targets."""
    assembled: Any
    """tracr's ``AssembledTransformerModel``, the compiler's own output."""
    vocab: tuple[Any, ...]
    max_seq_len: int
    length: int
    """Input length of ``.data()`` (see ``Recipe.length``)."""
    input_ids: dict[Any, int]
    """Input value (and BOS, pad) -> token id, tracr's input encoding."""
    output_values: tuple[Any, ...]
    """The value each logit column stands for."""
    compiled_heads: Bool[np.ndarray, "layer head"]
    """Where tracr placed a head of the program (True) rather than zero padding."""
    description: str = ""
    readout_sigma: float | None = None
    """Numerical programs only: the standard deviation of the Gaussian readout (see ``numerical_readout``)."""

    def true_roles(self) -> np.ndarray:
        """``[layer, head]`` object array: "facilitating" for compiled heads, "irrelevant" for padding."""
        return np.where(self.compiled_heads, "facilitating", "irrelevant").astype(object)

    def heads_with_role(self, role: str) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in zip(*np.nonzero(self.true_roles() == role), strict=True)]

    # ---------------------------------------------------------------------- inputs and outputs
    def sample_inputs(self, n: int, seed: int = 0, length: int | None = None) -> list[list[Any]]:
        """``n`` inputs of ``length`` values (default: the data length) drawn uniformly, seeded."""
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(self.vocab), size=(n, length or self.length))
        return [[self.vocab[i] for i in row] for row in draws]

    def program_outputs(self, inputs: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """What the RASP program itself says, per input and position (tracr's RASP evaluator)."""
        rasp = _tracr().rasp
        return [list(rasp.evaluate(self.program, list(x))) for x in inputs]

    def encode(self, inputs: Sequence[Sequence[Any]]) -> Int[Tensor, "example pos"]:
        """Token ids, BOS first."""
        lengths = {len(x) for x in inputs}
        if len(lengths) != 1 or not 0 < next(iter(lengths)) <= self.max_seq_len:
            raise InputError(f"{self.name}: inputs must share one length in [1, {self.max_seq_len}] "
                             f"(bidirectional models cannot take padding), got lengths {sorted(lengths)}.")
        unknown = {v for x in inputs for v in x} - set(self.vocab)
        if unknown:
            raise InputError(f"{self.name}: values {sorted(map(str, unknown))} are not in the vocabulary "
                             f"{list(self.vocab)}.")
        return torch.tensor([[self.input_ids[BOS]] + [self.input_ids[v] for v in x] for x in inputs])

    def output_columns(self, outputs: Sequence[Sequence[Any]]) -> Int[Tensor, "example pos"]:
        """The logit column of each output value, shifted one right to line up with the tokens (BOS
        first, its column 0 unused)."""
        return torch.tensor([[0] + [self._column(v) for v in row] for row in outputs])

    @torch.no_grad()
    def predict(self, inputs: Sequence[Sequence[Any]]) -> list[list[Any]]:
        """The loaded model's answer per input and position (the argmax column's value)."""
        columns = self.model(self.encode(inputs).to(adapter.model_device(self.model))).argmax(dim=-1)
        return [[self.output_values[c] for c in row[1:].tolist()] for row in columns]

    def check_outputs(self, inputs: Sequence[Sequence[Any]]) -> None:
        """Fail unless the loaded model answers every input exactly as the RASP program does.

        A mismatch means the compiled weights did not survive loading: a limitation of the converter,
        not bad input, hence ``RuntimeError``.
        """
        outputs = self.program_outputs(inputs)
        expected = [[self.output_values[self._column(v)] for v in row] for row in outputs]
        for x, got, want in zip(inputs, self.predict(inputs), expected, strict=True):
            if got != want:
                raise RuntimeError(
                    f"the TransformerLens model loaded from tracr's compiled {self.name!r} answers {x} with "
                    f"{got}, the RASP program with {want}; the weights did not load faithfully."
                )

    def data(self, n: int = 64, seed: int = 0) -> GateData:
        """``n`` random inputs with per-position targets (the program's output at every position after
        BOS) and a corrupt twin of independently drawn inputs, for the patching baselines."""
        checks.positive_int(n, "n")
        clean = self._gate_data(self.sample_inputs(n, seed * 2))
        return clean.with_corrupt(self._gate_data(self.sample_inputs(n, seed * 2 + 1)))

    def _gate_data(self, inputs: list[list[Any]]) -> GateData:
        tokens = self.encode(inputs)
        mask = torch.ones_like(tokens, dtype=torch.bool)
        mask[:, 0] = False  # BOS: tracr leaves its output unspecified
        pad = self.input_ids[_tracr().compiling.COMPILER_PAD]
        return GateData.from_tokens(tokens, mask, pad_token_id=pad,
                                    targets=self.output_columns(self.program_outputs(inputs)),
                                    meta={"source": "tracr", "program": self.name})

    def _column(self, value: Any) -> int:
        if self.readout_sigma is None:
            if value not in self.output_values:
                raise RuntimeError(f"{self.name}: the program output {value!r}, which the compiled model "
                                   f"cannot (its outputs are {list(self.output_values)}).")
            return self.output_values.index(value)
        gaps = np.abs(np.asarray(self.output_values, dtype=float) - float(value))
        if gaps.min() > 1e-9:
            raise RuntimeError(f"{self.name}: output {value!r} is not among the readout's values.")
        return int(gaps.argmin())


# ------------------------------------------------------------------------------ loading
def load_program(name: str, check: bool = True) -> CompiledProgram:
    """Compile ``name`` (once per process), load it into TransformerLens and check it against RASP.

    ``name`` is one of :data:`RECIPES`. A fresh model comes back on every call (compilation is cached),
    so a caller that writes into one never changes another's.
    """
    recipe = _recipe(name)
    program, assembled = compile_program(name)
    tracr = _tracr()
    numerical = tracr.rasp.is_numerical(program)
    sigma = None
    if numerical:
        values = numerical_output_values(program, recipe)
        sigma = float(np.diff(values).min() / 2)
        view = _one_column_view(assembled, program.label)
        unembed = numerical_readout(view, values, sigma)
        output_values: tuple[Any, ...] = tuple(values.tolist())
    else:
        view = assembled
        encoding = assembled.output_encoder.encoding_map
        output_values = tuple(sorted(encoding, key=encoding.get))
        unembed = None
    compiled = CompiledProgram(
        name=name, model=_to_transformer_lens(name, view, unembed), program=program, assembled=assembled,
        vocab=recipe.vocab, max_seq_len=recipe.max_seq_len, length=recipe.length,
        input_ids=dict(assembled.input_encoder.encoding_map), output_values=output_values,
        compiled_heads=compiled_heads(assembled), description=recipe.description, readout_sigma=sigma,
    )
    if check:
        for length in sorted({compiled.length, compiled.max_seq_len}):
            compiled.check_outputs(compiled.sample_inputs(CHECK_INPUTS, seed=10_007, length=length))
    return compiled


@functools.cache
def compile_program(name: str) -> tuple[Any, Any]:
    """(RASP program, tracr's ``AssembledTransformerModel``) for a recipe, compiled once per process
    (a few seconds each). The compiled weights are numpy/jax arrays that nothing here writes to."""
    recipe = _recipe(name)
    tracr = _tracr()
    program = recipe.build(tracr, recipe.max_seq_len)
    assembled = tracr.compiling.compile_rasp_to_model(program, vocab=set(recipe.vocab),
                                                      max_seq_len=recipe.max_seq_len, compiler_bos=BOS)
    return program, assembled


def compiled_heads(assembled: Any) -> Bool[np.ndarray, "layer head"]:
    """``[layer, head]``: True where tracr placed one of the program's heads, read off its weights.

    tracr fills the heads a layer does not need (and attention layers with no head at all) with zeros,
    so a head is the program's exactly when its OV circuit ``W_V W_O`` is nonzero.
    """
    config = assembled.model_config
    found = np.zeros((config.num_layers, config.num_heads), dtype=bool)
    for layer in range(config.num_layers):
        prefix = f"transformer/layer_{layer}/attn"
        value = np.asarray(assembled.params[f"{prefix}/value"]["w"])  # [d_model, head * key]
        out = np.asarray(assembled.params[f"{prefix}/linear"]["w"])  # [head * key, d_model]
        value = value.reshape(value.shape[0], config.num_heads, config.key_size)
        out = out.reshape(config.num_heads, config.key_size, out.shape[-1])
        found[layer] = np.abs(np.einsum("mhk,hkn->hmn", value, out)).reshape(config.num_heads, -1).max(1) > 0
    return found


def numerical_output_values(program: Any, recipe: Recipe) -> Float[np.ndarray, " value"]:
    """Every value a numerical program outputs on inputs of ``max_seq_len`` tokens, sorted.

    Enumerated with the RASP evaluator: tracr's own value-set inference undercounts a numerical
    ``Aggregate`` (for frac_prevs it misses 2/5, 3/5, 2/3, 3/4, 4/5).
    """
    count = len(recipe.vocab) ** recipe.max_seq_len
    if count > MAX_ENUMERATED_INPUTS:
        raise InputError(f"numerical readout: {count} inputs to enumerate (at most {MAX_ENUMERATED_INPUTS}).")
    rasp = _tracr().rasp
    values = {round(float(v), 12) for x in itertools.product(recipe.vocab, repeat=recipe.max_seq_len)
              for v in rasp.evaluate(program, list(x))}
    return np.asarray(sorted(values))


def numerical_readout(
    view: Any, values: Float[np.ndarray, " value"], sigma: float
) -> Float[Tensor, "value d_model"]:
    """Unembedding for a one-dimensional output ``y``: a categorical over the values it can take.

    Column ``j`` scores ``-(y - v_j)^2 / (2 sigma^2)``, the log-likelihood of value ``v_j`` if ``y`` were
    ``v_j`` plus Gaussian noise of fixed ``sigma``. Under a softmax the ``-y^2 / (2 sigma^2)`` term is the
    same for every column and cancels, so the logits are linear in the residual:
    ``(v_j * y - v_j^2 / 2) / sigma^2``, with ``y`` read off the output direction and the constant off
    tracr's ``one`` direction (1 at every position). Why this and not a regression loss: every method
    here scores log-softmax over the logits; this readout is that log-probability exactly (the Gaussian
    likelihood normalised over the values the program can output), so CHG and each baseline score it
    unchanged, and top-1 accuracy means "rounds to the right value". ``sigma`` is half the smallest gap
    between values: at an exact output the right value beats its nearest neighbour by 2 nats.
    """
    from transformer_lens.utilities import tracr as tl_tracr

    labels = list(view.residual_labels)
    if "one" not in labels:
        raise RuntimeError("numerical readout: the compiled model has no 'one' direction for the constant.")
    output = torch.tensor(tl_tracr.make_tracr_categorical_unembed(view)[:, 0])  # [d_model]: reads y
    one = torch.zeros(len(labels))
    one[labels.index("one")] = 1.0
    v = torch.tensor(values, dtype=torch.float32)[:, None]
    return (v * output[None, :] - v**2 / 2 * one[None, :]) / sigma**2


def _one_column_view(assembled: Any, output_label: str) -> SimpleNamespace:
    """A numerical tracr model as ``transformer_lens.utilities.tracr`` can read it.

    The utility reads categorical outputs only (``output_encoder.encoding_map`` and ``label:value``
    residual labels); a numerical output is the single direction ``label``. Shown as a categorical with
    one value, the utility builds config and weights unchanged, its unembedding reading ``y``.
    """
    labels = [f"{label}:y" if label == output_label else label for label in assembled.residual_labels]
    if labels == list(assembled.residual_labels):
        raise RuntimeError(f"numerical output {output_label!r} is not among the compiled residual labels.")
    return SimpleNamespace(params=assembled.params, model_config=assembled.model_config,
                           residual_labels=labels, output_encoder=SimpleNamespace(encoding_map={"y": 0}))


_CONFIG_FIELDS = ("n_layers", "d_model", "d_head", "n_ctx", "d_vocab", "d_mlp", "n_heads", "act_fn",
                  "attention_dir", "normalization_type")
"""What ``make_tracr_transformer_bridge_config`` sets, carried into ``adapter.build_native_model``."""


def _to_transformer_lens(name: str, view: Any, unembed: Tensor | None) -> nn.Module:
    """The utility's config and weights in a model from ``adapter.build_native_model`` (either TL)."""
    from transformer_lens.utilities import tracr as tl_tracr

    config = tl_tracr.make_tracr_transformer_bridge_config(view)
    weights = tl_tracr.make_tracr_transformer_bridge_state_dict(view)
    if unembed is not None:
        weights["head.weight"] = unembed.float()
    d_vocab_out = weights["head.weight"].shape[0]
    weights["head.bias"] = torch.zeros(d_vocab_out)  # tracr unembeds without a bias
    model = adapter.build_native_model(model_name=f"tracr_{name}", d_vocab_out=d_vocab_out,
                                       **{key: getattr(config, key) for key in _CONFIG_FIELDS})
    adapter.load_native_weights(model, weights)
    return model


def _recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise InputError(f"tracr program: expected one of {sorted(RECIPES)}, got {name!r}.")
    return RECIPES[name]


def _tracr() -> SimpleNamespace:
    """tracr's compiler, program library and RASP, or a clear error saying how to install it."""
    try:
        from tracr.compiler import compiling, lib
        from tracr.rasp import rasp
    except ImportError as error:
        raise MissingDependencyError(
            f"compiled RASP testbeds need tracr, which cannot be imported ({error}). {TRACR_PIP}"
        ) from None
    return SimpleNamespace(compiling=compiling, lib=lib, rasp=rasp)
