"""The command line: complete help, run folders that validate and report, exit codes for bad input.

Everything runs in-process through ``chg_tlens.cli.main`` (the ``chg-tlens`` entry point), on the planted
repeat circuit (known roles), on the planted two-modes circuit for ``contrastive`` (standing in for the
model and its function task) and, sized small, on the embedded SmolLM2-135M.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import io
import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from chg_tlens.app import report
from chg_tlens.app.cli import EXIT_INTERNAL, EXIT_OK, EXIT_USAGE, UsageError, build_parser, main
from chg_tlens.core.checkpoint import CheckpointError
from chg_tlens.core.result import ContrastiveResult
from chg_tlens.core.result_files import ResultFileError
from chg_tlens.errors import InputError

SUBCOMMANDS = ["fit", "contrastive", "validate", "circuit", "compare", "report", "demo"]
REQUIRED = {"fit": ["--task", "sva", "--out", "x"], "contrastive": ["--out", "x"], "validate": ["x"],
            "circuit": ["x"], "compare": ["--out", "x"], "report": ["x"], "demo": []}
"""The least each subcommand's parser needs."""


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_complete_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        for flag in action.option_strings:
            assert flag in text
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help text"


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory) -> Path:
    """``chg-tlens demo --planted`` then ``chg-tlens validate`` on its run folder."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    assert main(["demo", "--planted", "--quiet", "--out", str(folder)]) == EXIT_OK
    assert main(["validate", str(folder), "--n", "32", "--random", "5"]) == EXIT_OK
    return folder


def test_demo_writes_a_complete_run_folder_with_the_planted_roles(planted_run):
    for name in ("chg_gates.safetensors", "chg_result.json", "roles.csv", "summary.csv", "losses.csv",
                 "certificate.csv", "run.json", "report.html", "pictures/heatmaps.png"):
        assert (planted_run / name).is_file(), name
    certificate = pd.read_csv(planted_run / "certificate.csv")
    assert set(certificate["stage"]) == {"zero", "plus", "minus"} and "gradient" in certificate
    roles = pd.read_csv(planted_run / "roles.csv")
    head_11 = roles[(roles["layer"] == 1) & (roles["head"] == 1)]
    assert set(head_11["role"]) == {"facilitating"}  # the planted repeat head, in every seed
    assert json.loads((planted_run / "run.json").read_text())["model"] == "planted-repeat"


def test_validate_confirms_the_planted_circuit_on_held_out_data(planted_run):
    summary = json.loads((planted_run / "validation.json").read_text())["chg_tlens_validate"]
    assert summary["held_out"] is True
    assert summary["facilitating_heads"] == ["1.1"]
    sufficiency, necessity = summary["sufficiency"], summary["necessity"]
    assert sufficiency["circuit"]["logprob"] > sufficiency["no heads"]["logprob"] + 1.0
    assert sufficiency["circuit_at_least_as_strong_share"] == 1.0
    assert necessity["circuit"]["logprob"] < necessity["full model"]["logprob"] - 1.0
    ablation = summary["ablation"]
    assert ablation["facilitating"]["delta_logprob_at_k"] < ablation["irrelevant"]["delta_logprob_at_k"] - 1.0
    assert ablation["interfering"]["start"] == "ones" and ablation["interfering"]["delta_logprob_at_k"] > 0
    assert ablation["facilitating"]["delta_logprob_at_k"] <= ablation["facilitating"]["random_min_at_k"]
    assert "skipped" in summary["activation_patching"]  # the repeat task has no corrupt twin
    page = (planted_run / "report.html").read_text()
    assert 'data-plot="validation_ablation"' in page and "circuit_at_least_as_strong_share" in page
    assert (planted_run / "validation_ablation.csv").is_file()


@pytest.fixture(scope="module")
def contrastive_run(tmp_path_factory) -> tuple[Path, str, object]:
    """``chg-tlens contrastive`` with the planted two-modes circuit standing in for the model and its
    function task (retain = the circuit's retain mode): the run folder, what it printed, the circuit."""
    from chg_tlens.testbeds.planted import contrastive_circuit

    circuit = contrastive_circuit()
    asked: list[str] = []

    def views(model, n, seed, function, split):
        assert model is circuit.model and function == "plural" and split in ("train", "test")

        def contrastive(keep):
            asked.append(keep)
            return circuit.data(n, seed)

        return SimpleNamespace(contrastive=contrastive)

    folder = tmp_path_factory.mktemp("cli") / "contrastive"
    threads = torch.get_num_threads()
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out):
        patch.setattr("chg_tlens.models.load.load_model", lambda name, device=None, dtype=None: circuit.model)
        # the module by import: the name chg_tlens.tasks.function is the task function, not its module
        patch.setattr(importlib.import_module("chg_tlens.tasks.function"), "function_views", views)
        torch.set_num_threads(1)
        try:
            code = main(["contrastive", "--n", "128", "--n-eval", "64", "--n-seeds", "2", "--steps", "150",
                         "--batch-size", "32", "--quiet", "--out", str(folder)])
        finally:
            torch.set_num_threads(threads)
    assert code == EXIT_OK and asked == ["in_context", "in_context"]
    return folder, out.getvalue(), circuit


def test_fit_with_prompt_resamples_writes_error_bars_by_source(tmp_path):
    """``--prompt-resamples N`` fits N gate sets on bootstrap resamples beside the seeds: the run folder
    keeps them (prompt_resamples/) with error_bars.csv, and the result in the folder holds the seeds
    only. Rejects a fit that saves the joint gate sets as the seeds, or drops the resamples."""
    from chg_tlens.core.result import CHGResult

    out = tmp_path / "run"
    code = main(["fit", "--task", "sva", "--n", "4", "--steps", "2", "--n-seeds", "2", "--batch-size", "4",
                 "--prompt-resamples", "2", "--quiet", "--no-pictures", "--out", str(out)])
    assert code == EXIT_OK
    assert CHGResult.load(out).n_seeds == 2
    assert CHGResult.load(out / "prompt_resamples").n_seeds == 2
    shares = pd.read_csv(out / "error_bars.csv")
    assert len(shares) == 30 * 9 and "prompts_agree" in shares.columns
    assert main(["fit", "--task", "sva", "--prompt-resamples", "-1", "--out", str(tmp_path / "x"),
                 "--quiet"]) == EXIT_USAGE


def test_fit_from_a_jsonl_file_on_the_embedded_model(tmp_path, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"question": p, "answer": t}) for p, t in [
        ("The capital of France is", " Paris"), ("The capital of Italy is", " Rome"),
        ("The capital of Spain is", " Madrid"), ("The capital of Japan is", " Tokyo")]))
    out = tmp_path / "run"
    code = main(["fit", "--data", str(data), "--prompt-field", "question", "--target-field", "answer",
                 "--steps", "2", "--n-seeds", "2", "--batch-size", "2", "--quiet", "--no-pictures",
                 "--out", str(out)])
    assert code == EXIT_OK
    roles = pd.read_csv(out / "roles.csv")
    assert len(roles) == 2 * 30 * 9  # seeds x layers x heads of SmolLM2-135M
    run = json.loads((out / "run.json").read_text())
    assert run["data"] == str(data) and run["prompt_field"] == "question"
    assert "Share of heads per role" in capsys.readouterr().out


def test_contrastive_writes_a_complete_run_folder_that_loads_back(contrastive_run):
    folder, printed, circuit = contrastive_run
    for name in ("chg_gates.safetensors", "chg_result.json", "heads.csv", "table.csv", "run.json",
                 "contrastive.json", "report.html", "pictures/gate_map.png", "pictures/loss_curves.png"):
        assert (folder / name).is_file(), name
    result = ContrastiveResult.load(folder)
    again = ContrastiveResult.load(result.save(folder.parent / "saved-again"))
    assert torch.equal(again.theta, result.theta) and again.metrics.keys() == result.metrics.keys()
    assert result.closed_heads() == [circuit.extra["forget_head"]]  # the planted forget head, every seed
    pd.testing.assert_frame_equal(pd.read_csv(folder / "heads.csv"), result.to_frame(), check_dtype=False)
    pd.testing.assert_frame_equal(pd.read_csv(folder / "table.csv"), result.table())
    summary = json.loads((folder / "contrastive.json").read_text())  # kept for older readers
    assert summary["closed_heads_every_seed"] == [list(head) for head in result.closed_heads()]
    run = json.loads((folder / "run.json").read_text())
    assert run["function"] == "plural" and run["retain"] == "icl" and run["threshold"] == 0.5
    assert printed.rstrip().endswith(result.convergence_text())  # the last lines: convergence in words


def test_report_on_a_contrastive_run_folder(contrastive_run, tmp_path, capsys):
    folder, _, _ = contrastive_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in folder.iterdir():
        if path.is_file() and path.name != "report.html":
            (copy / path.name).write_bytes(path.read_bytes())
    assert main(["report", str(copy)]) == EXIT_OK
    assert str(copy / "report.html") in capsys.readouterr().out
    page = (copy / "report.html").read_text()
    assert "Contrastive CHG report" in page and 'id="before-after-table"' in page
    assert '<section id="convergence">' in page and "stage contrastive:" in page
    assert 'id="closed-every-seed"' in page and 'data-plot="gate_map"' in page


def test_compare_scores_the_known_role_benchmarks(tmp_path):
    out = tmp_path / "compare"
    code = main(["compare", "--out", str(out), "--no-trained", "--methods", "chg,random", "--n", "32",
                 "--quiet"])
    assert code == EXIT_OK
    rows = pd.DataFrame(json.loads((out / "results.json").read_text())["rows"])
    chg = rows[(rows["method"] == "chg_max") & rows["auc"].notna()]
    assert len(chg) >= 3 and (chg["auc"] == 1.0).all()
    assert "ROC AUC" in (out / "results.md").read_text()


@pytest.mark.parametrize("argv, words", [
    (["fit", "--task", "nonsense", "--out", "{tmp}/x"], ["unknown task", "nonsense"]),
    (["fit", "--data", "{tmp}/missing.jsonl", "--out", "{tmp}/x"], ["not found", "missing.jsonl"]),
    (["fit", "--task", "sva", "--threshold", "1.5", "--out", "{tmp}/x"], ["--threshold", "1.5"]),
    (["validate", "{tmp}"], ["run.json", "not found"]),
    (["compare", "--out", "{tmp}/c", "--methods", "chg,telepathy"], ["unknown", "telepathy"]),
    (["compare", "--out", "{tmp}/c", "--no-known"], ["nothing to compare"]),
    (["compare", "--out", "{tmp}/c", "--task", "ioi", "--chg-fit", "ioi"], ["--chg-fit", "TASK=RESULT_DIR"]),
    (["compare", "--out", "{tmp}/c", "--task", "ioi", "--chg-fit", "sva={tmp}"], ["'sva'", "--task"]),
    (["compare", "--out", "{tmp}/c", "--task", "ioi", "--chg-fit", "ioi={tmp}/nofit"], ["nofit"]),
    (["report", "{tmp}/nowhere"], ["nowhere"]),
])
def test_bad_input_exits_2_with_one_line_naming_the_problem(argv, words, tmp_path, capsys):
    code = main([a.replace("{tmp}", str(tmp_path)) for a in argv])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE
    assert len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, (word, err)


def test_validate_on_a_corrupt_result_file_exits_2_and_leaves_the_folder_alone(planted_run, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in planted_run.iterdir():
        if path.is_file():
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "chg_gates.safetensors").write_bytes(b"not a tensor file")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert main(["validate", str(folder)]) == EXIT_USAGE
    assert "chg_gates.safetensors" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_takes_the_common_flags(command):
    args = build_parser().parse_args([command, *REQUIRED[command], "--quiet"])
    assert args.quiet is True
    if command != "report":  # every subcommand that runs a model takes --device
        assert build_parser().parse_args([command, *REQUIRED[command], "--device", "cpu"]).device == "cpu"


def test_a_bool_config_field_is_a_switch_pair_that_arrives_as_a_bool():
    from chg_tlens.app.cli import config_from_args
    from chg_tlens.core.config import CHGConfig, ContrastiveConfig

    parse = build_parser().parse_args
    plain = config_from_args(CHGConfig, parse(["fit", *REQUIRED["fit"]]))
    assert plain.early_stop is False and plain.fuse_regularised is True  # the dataclass defaults
    switched = config_from_args(CHGConfig, parse(["fit", *REQUIRED["fit"], "--early-stop",
                                                  "--no-fuse-regularised"]))
    assert switched.early_stop is True and switched.fuse_regularised is False
    contrastive = config_from_args(ContrastiveConfig, parse(["contrastive", *REQUIRED["contrastive"],
                                                             "--early-stop"]))
    assert contrastive.early_stop is True


@pytest.mark.parametrize("argv", [["--early-stop", "True"], ["--fuse-regularised", "False"]])
def test_a_bool_config_field_refuses_a_value_after_its_flag(argv, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["fit", *REQUIRED["fit"], *argv])
    assert stop.value.code == EXIT_USAGE
    assert "unrecognized arguments" in capsys.readouterr().err


def test_a_bool_config_field_says_its_default_in_the_help(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--early-stop, --no-early-stop" in text and "--fuse-regularised, --no-fuse-regularised" in text
    assert "the same arithmetic as two stages. (default True)" in text  # fuse_regularised
    assert "(default: True)" not in text and "(default: False)" not in text  # said once, not twice


def _report_raising(monkeypatch, error: BaseException) -> None:
    """Make the library call behind ``chg-tlens report`` raise ``error``."""
    def broken(*args, **kwargs):
        raise error

    monkeypatch.setattr(report, "write_report", broken)


@pytest.mark.parametrize("error", [InputError("threshold: expected a number, got 'x'."),
                                   UsageError("--n must be at least 1."),
                                   ResultFileError("CHG result file missing: chg_result.json"),
                                   CheckpointError("checkpoint belongs to another config.")])
def test_an_input_error_from_the_library_is_one_line_and_exit_2(error, monkeypatch, tmp_path, capsys):
    _report_raising(monkeypatch, error)
    assert main(["report", str(tmp_path)]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err == f"chg-tlens report: error: {error}"
    assert "Traceback" not in err


@pytest.mark.parametrize("error", [TypeError("unsupported operand type(s)"), ValueError("shape mismatch"),
                                   KeyError("theta_plus"), RuntimeError("CUDA error"),
                                   ImportError("No module named 'gguf'"), OSError("disk on fire"),
                                   FileNotFoundError(errno.ENOENT, "No such file", "/nowhere/lib.json")])
def test_a_bug_keeps_its_traceback_and_exits_1(error, monkeypatch, tmp_path, capsys):
    _report_raising(monkeypatch, error)
    assert main(["report", str(tmp_path)]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and type(error).__name__ in err
    assert "internal error" in err.splitlines()[-1]


def test_a_bug_in_a_handler_exits_1(monkeypatch, tmp_path, capsys):
    from chg_tlens.app import cli

    def broken(args):
        raise ValueError("a plain ValueError is a bug, not bad usage")

    monkeypatch.setattr(cli, "run_report", broken)
    assert main(["report", str(tmp_path)]) == EXIT_INTERNAL
    assert "a plain ValueError is a bug" in capsys.readouterr().err


@pytest.mark.parametrize("kind", [FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                                  PermissionError])
def test_a_file_error_about_the_users_path_exits_2(kind, monkeypatch, tmp_path, capsys):
    named = tmp_path / "run" / "chg_result.json"  # lies under the folder the user gave
    (tmp_path / "run").mkdir()
    _report_raising(monkeypatch, kind(errno.EACCES, "cannot open", str(named)))
    assert main(["report", str(tmp_path / "run")]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(named) in err


def test_a_missing_user_file_exits_2(tmp_path, capsys):
    (tmp_path / "run.json").write_text(json.dumps({"model": "planted-repeat", "threshold": 0.5}))
    assert main(["validate", str(tmp_path), "--quiet"]) == EXIT_USAGE  # no chg_result.json beside it
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "chg_result.json" in err


def test_a_real_file_error_under_the_users_folder_exits_2(planted_run, tmp_path, capsys):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in planted_run.iterdir():
        if path.is_file() and path.name != "report.html":
            (folder / path.name).write_bytes(path.read_bytes())
    (folder / "report.html").mkdir()  # the report cannot be written: IsADirectoryError from the library
    assert main(["report", str(folder), "--quiet"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "report.html" in err


def _raising(error: BaseException):
    def broken(*args, **kwargs):
        raise error

    return broken


def test_out_dot_and_a_file_missing_from_the_package_is_a_bug_not_bad_input(monkeypatch, capsys):
    """``--out .`` names the working folder, not everything beneath it: a file error two levels down
    (here inside the installed package) is a bug and keeps its traceback."""
    import chg_tlens
    from chg_tlens.analysis import compare

    package = Path(chg_tlens.__file__).parent
    monkeypatch.chdir(package.parent)
    missing = package / "app" / "missing_template.json"
    monkeypatch.setattr(compare, "compare_methods",
                        _raising(FileNotFoundError(errno.ENOENT, "No such file or directory", str(missing))))
    assert main(["compare", "--out", ".", "--no-trained", "--methods", "random", "--quiet"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "missing_template.json" in err
    assert "internal error" in err.splitlines()[-1]


def test_a_string_argument_is_not_a_path(monkeypatch, tmp_path, capsys):
    """``--task sva`` is a task name: a file error about ``./sva`` is not the user's to fix."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("chg_tlens.models.load.load_model", _raising(
        FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "sva"))))
    assert main(["fit", "--task", "sva", "--out", str(tmp_path / "run"), "--quiet"]) == EXIT_INTERNAL
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_a_missing_input_file_the_user_named_exits_2_naming_it(monkeypatch, tmp_path, capsys):
    weights = tmp_path / "weights.gguf"  # e.g. removed between the command and its reading
    monkeypatch.setattr("chg_tlens.models.load.load_model", _raising(
        FileNotFoundError(errno.ENOENT, "No such file or directory", str(weights))))
    code = main(["fit", "--task", "sva", "--model", str(weights), "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == EXIT_USAGE
    assert len(err.splitlines()) == 1 and str(weights) in err and "Traceback" not in err


def test_a_file_error_deeper_than_the_users_run_folder_is_a_bug(monkeypatch, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    deeper = tmp_path / "run" / "cache" / "entry.pt"  # not a file the CLI keeps directly in the folder
    _report_raising(monkeypatch, FileNotFoundError(errno.ENOENT, "No such file", str(deeper)))
    assert main(["report", str(tmp_path / "run")]) == EXIT_INTERNAL
    assert "Traceback (most recent call last)" in capsys.readouterr().err
