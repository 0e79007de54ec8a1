"""The top-level API: one way in for notebooks, ``dir`` showing the lazy names, and the model protocol
that replaces ``Any`` in the fit signatures (met by TL 4's bridge and TL 3.9's HookedTransformer alike:
this file runs under both)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import typing
from pathlib import Path
from types import SimpleNamespace

import pytest
from models_for_tests import random_bridge

import chg_tlens
from chg_tlens.models import adapter
from chg_tlens.models.protocol import HeadConfig, TransformerLensModel

pytestmark = pytest.mark.tl39  # runs again on TransformerLens 3.9: make pytest-tl39

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
LAZY = ["validate", "baselines", "compare", "metrics", "plot", "task_accuracy", "error_bars",
        "evaluate_gates", "circuit", "Circuit"]


def test_dir_lists_the_lazy_names_before_they_are_loaded():
    """In a fresh interpreter, so nothing has loaded them yet."""
    code = ("import chg_tlens, sys; print(repr(dir(chg_tlens))); "
            "print('chg_tlens.analysis.ablation' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    listed, loaded = out.splitlines()
    names = ast.literal_eval(listed)
    assert set(LAZY) <= set(names) and set(chg_tlens.__all__) <= set(names)
    assert "fit_chg" in names and names == sorted(names)
    assert loaded == "False"  # listing them loads nothing


def test_every_exported_name_resolves_to_the_defining_object():
    from chg_tlens.analysis import ablation, accuracy, baselines, circuit, error_bars

    for name in chg_tlens.__all__:
        assert getattr(chg_tlens, name) is not None, name
    assert chg_tlens.evaluate_gates is ablation.evaluate_gates
    assert chg_tlens.task_accuracy is accuracy.task_accuracy
    assert chg_tlens.error_bars is error_bars.error_bars
    assert chg_tlens.circuit is circuit.circuit and chg_tlens.Circuit is circuit.Circuit
    assert chg_tlens.baselines is baselines
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        chg_tlens.nonsense  # noqa: B018


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.name)
def test_notebooks_import_the_top_level_names_not_their_modules(notebook):
    """Names chg_tlens exports (or tool modules it loads) are imported from chg_tlens, not from deeper, and
    nothing is imported from a module chg_tlens offers as a namespace (``chg_tlens.compare``, not
    ``chg_tlens.analysis.compare``)."""
    tool_modules = dict(chg_tlens._TOOL_MODULES)
    exported = set(chg_tlens.__all__) | set(tool_modules)
    namespaces = {module: name for name, module in tool_modules.items()}
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        code = "".join(line for line in cell["source"] if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chg_tlens."):
                deep = [alias.name for alias in node.names if alias.name in exported]
                assert not deep, f"{notebook.name}: from {node.module} import {deep}; use chg_tlens"
                namespace = namespaces.get(node.module)
                assert namespace is None, f"{notebook.name}: {node.module}; use chg_tlens.{namespace}"


def test_the_installed_transformer_lens_model_satisfies_the_protocol():
    model = random_bridge()
    expected = "HookedTransformer" if adapter.legacy_model_class() is not None else "TransformerBridge"
    assert type(model).__name__ == expected  # TL 3.9 and TL 4 each meet it when this runs under them
    assert isinstance(model, TransformerLensModel) and isinstance(model.cfg, HeadConfig)
    adapter.require_model(model)  # and the check a fit runs agrees


def _model_like(**drop: bool) -> SimpleNamespace:
    members = {"cfg": SimpleNamespace(n_layers=1, n_heads=1, d_head=1, n_ctx=4, d_vocab=4), "tokenizer": None,
               "hook_dict": {}, "hooks": lambda **kwargs: None, "run_with_cache": lambda *a, **k: None,
               "parameters": lambda recurse=True: iter(()), "modules": lambda: iter(()),
               "eval": lambda: None, "train": lambda mode=True: None}
    return SimpleNamespace(**{key: value for key, value in members.items() if key not in drop})


class _Callable(SimpleNamespace):
    def __call__(self, *args, **kwargs):
        return None


def test_an_object_lacking_a_member_does_not_satisfy_the_protocol():
    complete = _Callable(**vars(_model_like()))
    assert isinstance(complete, TransformerLensModel)  # the members are what the protocol asks, no more
    for member in ("cfg", "hook_dict", "hooks", "run_with_cache", "tokenizer"):
        assert not isinstance(_Callable(**vars(_model_like(**{member: True}))), TransformerLensModel), member
    assert not isinstance(_model_like(), TransformerLensModel)  # not callable: no logits
    assert not isinstance(SimpleNamespace(n_layers=2, n_heads=2), HeadConfig)


def test_the_fit_signatures_name_the_protocol():
    from chg_tlens.core import fit

    for function in (fit.fit_chg, fit.fit_contrastive_chg, fit.run_stages, fit.nll_objective):
        assert typing.get_type_hints(function)["model"] is TransformerLensModel, function.__name__
