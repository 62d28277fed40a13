"""The `ptdit` command: the model table, flops through its store, reproduce's store."""

import io
import json
from contextlib import redirect_stdout

import ptdit
from ptdit.cli import main


def run(*argv):
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(list(argv))
    return code, out.getvalue()


def test_models_lists_every_configuration_with_paper_params():
    code, text = run("models", "--format", "json")
    rows = {r["model"]: r for r in json.loads(text)}
    assert code == 0 and list(rows) == ptdit.list_models()
    assert rows["Qihoo-T2I-1B"]["params_m"] == 1131.629
    assert rows["PT-DiT/H"]["paper_params_m"] == 1795.0
    assert rows["PT-DiT/H"]["params_diff_pct"] == round(100 * (1890.739 / 1795 - 1), 2)
    assert rows["DiT-XL/2"]["frozen_params_m"] == 0.295   # the frozen sin-cos table
    assert rows["PT-DiT/XL"]["attention"].startswith("proxy self + proxy->token cross + window")
    for r in rows.values():
        assert {"depth", "width", "heads", "patch", "source"} <= set(r)


def test_models_markdown_table():
    code, text = run("models", "--format", "markdown")
    assert code == 0 and text.startswith("| model")
    assert text.count("\n") >= len(ptdit.list_models()) + 1


def test_unwritable_output_is_an_error_not_a_traceback(tmp_path, capsys):
    taken = tmp_path / "a_file"
    taken.write_text("not a folder")
    assert main(["reproduce", "--out", str(taken)]) == 2
    assert "ptdit reproduce: error: --out" in capsys.readouterr().err
    assert main(["reproduce", "--out", "/proc/ptdit-cannot-be-here"]) == 2
    assert "cannot create the output folder" in capsys.readouterr().err


def test_cli_counter_choices_are_bench_flops_counters():
    from bench.flops import COUNTERS
    from ptdit import cli

    assert cli.COUNTERS == COUNTERS


def test_flops_store_appends_each_case_once_and_shows_the_whole_request(tmp_path):
    store = tmp_path / "results" / "flops.jsonl"
    argv = ["flops", "--model", "DiT-S/8", "--counter", "all", "--store", str(store)]
    code, text = run(*argv, "--resolution", "256", "--format", "json")
    rows = [json.loads(line) for line in store.read_text().splitlines()]
    assert code == 0 and json.loads(text) == rows
    assert [(r["counter"], r["status"]) for r in rows] == [
        ("analytic", "ok"), ("torch", "ok"), ("fvcore", "ok")]
    code, first = run(*argv, "--resolution", "256", "512")    # resumed: counts 512 only
    assert code == 0 and len(store.read_text().splitlines()) == 6
    assert first.count("DiT-S/8") == 6
    code, again = run(*argv, "--resolution", "256", "512")    # all stored: counts nothing
    assert code == 0 and again == first and len(store.read_text().splitlines()) == 6


def test_flops_bad_input_exits_2_before_the_store_is_created(tmp_path, capsys):
    folder = tmp_path / "results"
    argv = ["flops", "--model", "PT-DiT/XXL", "--resolution", "256", "--store",
            str(folder / "flops.jsonl")]
    assert main(argv) == 2
    assert "nearest: PT-DiT/XL" in capsys.readouterr().err and not folder.exists()


def test_flops_exits_1_only_on_an_error_row(monkeypatch):
    import bench.flops

    def broken(model, backend):
        raise RuntimeError("no such backend here")
    monkeypatch.setattr(bench.flops, "set_backend", broken)
    code, text = run("flops", "--model", "DiT-S/8", "--resolution", "256", "--counter", "all",
                     "--format", "json")
    statuses = [r["status"] for r in json.loads(text)]
    assert code == 1 and statuses == ["ok"] + 2 * ["error: RuntimeError: no such backend here"]
    code, _ = run("flops", "--model", "DiT-S/8", "--resolution", "256")
    assert code == 0


def test_flops_and_reproduce_stores_hold_their_own_tables(tmp_path, capsys):
    from bench.rows import SCHEMA_VERSION

    flops = tmp_path / "flops.jsonl"
    code, _ = run("flops", "--model", "DiT-S/8", "--resolution", "256", "--store", str(flops))
    rows = [json.loads(line) for line in flops.read_text().splitlines()]
    assert code == 0 and [(r["schema_version"], r["table"]) for r in rows] == [
        (SCHEMA_VERSION, "flops")]
    # complexity rows do not go into a flops store: refused before anything is written
    assert main(["reproduce", "--out", str(tmp_path / "complexity"), "--store",
                 str(flops)]) == 2
    assert capsys.readouterr().err == (f"ptdit reproduce: error: {flops} holds flops rows "
                                       f"(line 1); expected complexity rows of schema version "
                                       f"{SCHEMA_VERSION}: write to another store\n")
    assert not (tmp_path / "complexity").exists() and len(flops.read_text().splitlines()) == 1
