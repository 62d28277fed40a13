"""The `ptdit` command: the model table, flops through its store, reproduce's store."""

import argparse
import collections
import io
import json
from contextlib import redirect_stdout

import pytest

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


def subcommands() -> dict:
    """name -> parser of every `ptdit` subcommand (the entry-point group's included)."""
    from ptdit.cli import build_parser

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_every_package_registers_its_commands():
    assert list(subcommands()) == ["convert", "models", "flops", "reproduce", "bench", "sweep",
                                   "report", "sample", "fid", "clip-score", "attention",
                                   "train", "study", "digits-classifier"]


def test_no_flag_has_two_meanings():
    """Across every subcommand a flag name means one thing: one destination and one value
    grammar (the type that parses it), wherever it appears. Deprecated spellings are left out:
    they forward to the flag that replaced them."""
    from ptdit.cli import Deprecated

    meanings = collections.defaultdict(set)
    for parser in subcommands().values():
        for action in parser._actions:
            if isinstance(action, Deprecated) or action.help == argparse.SUPPRESS:
                continue
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    meanings[flag].add((action.dest, getattr(action.type, "__name__", None),
                                        type(action).__name__))
    assert len(meanings) > 40
    assert {flag: m for flag, m in meanings.items() if len(m) > 1} == {}
    assert meanings["--resolution"] == {("resolution", "resolution", "_StoreAction")}
    assert meanings["--batch-size"] == {("batch_size", "positive_int", "_StoreAction")}
    for renamed in ("--batch", "--steps", "--samples"):
        assert renamed not in meanings


@pytest.mark.parametrize("argv, dest, value, new", [
    (["flops", "--model", "DiT-S/2", "--resolution", "256", "--batch", "2"], "batch_size", 2,
     "--batch-size"),
    (["bench", "latency", "--model", "DiT-S/2", "--resolution", "256", "--batch", "1", "2"],
     "batch_size", [1, 2], "--batch-size"),
    (["convert", "a.pt", "b.safetensors", "--to", "ptdit", "--format", "facebook-dit"],
     "source_format", "facebook-dit", "--source-format"),
    (["sample", "--model", "DiT-S/2", "--resolution", "256", "--out", "o", "--steps", "5"],
     "sampler_steps", 5, "--sampler-steps"),
    (["attention", "--model", "DiT-S/2", "--resolution", "256", "--out", "o", "--steps", "0",
      "3"], "analyse_steps", [0, 3], "--analyse-steps"),
    (["attention", "--model", "DiT-S/2", "--resolution", "256", "--out", "o", "--window", "2",
      "4"], "window_sides", [2, 4], "--window-sides"),
    (["attention", "--model", "DiT-S/2", "--resolution", "256", "--out", "o", "--samples",
      "2"], "num_samples", 2, "--num-samples")])
def test_old_spellings_warn_and_work(argv, dest, value, new, capsys):
    from ptdit.cli import build_parser

    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    assert f"is deprecated and goes in the next release; use {new}" in capsys.readouterr().err


def test_sample_keeps_the_two_number_resolution_with_a_warning(tmp_path, capsys):
    """`--resolution H W` (the old sample grammar) still works, as HxW, with a warning; the
    run then stops at its missing VAE folder."""
    assert main(["sample", "--model", "DiT-S/2", "--resolution", "256", "512", "--vae",
                 str(tmp_path / "no-vae"), "--class-labels", "1", "--num-samples", "1",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "--resolution H W is deprecated" in err and "no-vae" in err


def test_bad_arguments_are_one_line_naming_the_command(capsys):
    assert main(["flops", "--model", "DiT-S/2", "--resolution", "256x"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("ptdit flops: error: argument --resolution: '256x' is not a "
                          "resolution; allowed: PX")
    assert main(["flops", "--mod", "DiT-S/2", "--resolution", "256"]) == 2   # no prefixes
    assert "the following arguments are required: --model" in capsys.readouterr().err


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


# Every `ptdit` command the README showed before the flags were unified, as it was written.
OLD_README = [
    "flops --model PT-DiT/XL DiT-XL/2 --resolution 256 1024 --counter all",
    "flops --model PT-DiT/H --resolution 512 --frames 48 --format markdown",
    "flops --model PixArt-XL/2 --resolution 1024 --dtype bfloat16",
    "reproduce --out results/complexity",
    "convert SRC DST --to ptdit --dtype bfloat16 --force",
    "bench latency --model PT-DiT/B DiT-B/2 --resolution 256 512 --mode forward cfg "
    "--override depth=2 --store /tmp/runtime.jsonl",
    "bench memory --model PT-DiT/B --resolution 256 --mode train --override depth=2",
    "bench profile --model PT-DiT/B DiT-B/2 --resolution 1024 --override depth=1",
    "sweep bench/sweeps/cpu.toml --out results/cpu/cpu_sweep.jsonl --report results/cpu/report",
    "report results/cpu/cpu_sweep.jsonl --out results/cpu/report",
    "fid samples/pixart-512 coco30k_images/ --inception-weights "
    "weights-inception-2015-12-05-6726825d.pth",
    "clip-score samples/pixart-512 coco30k_captions.txt --clip-weights ViT-L-14.pt",
    "attention --model DiT-S/2 --resolution 256 --out /tmp/att",
    "attention --model DiT-XL/2 --checkpoint DiT-XL-2-256x256.pt --resolution 256 --layers 0 "
    "13 27 --steps 0 12 24 --out results/attention/dit-xl-2-256",
    "attention --model PixArt-XL/2 --checkpoint PixArt-XL-2-512x512.pth --resolution 512 "
    "--prompt-embeddings prompts.safetensors --headwise --out results/attention/pixart-512"]


@pytest.mark.parametrize("line", OLD_README, ids=lambda line: " ".join(line.split()[:2]))
def test_the_previous_readme_commands_still_parse(line, capsys):
    """Each parses to the same request (old spellings with a deprecation warning, never an
    error). The previous README's torchrun line used `sample --num`, which torchrun itself
    always took as its own --numa-binding: that spelling is an error naming --num-samples."""
    from ptdit.cli import build_parser

    args = build_parser().parse_args(line.split())
    assert callable(args.run)
    err = capsys.readouterr().err
    assert "error" not in err and (err == "" or "is deprecated" in err)
    if "--steps" in line:
        assert args.analyse_steps == [0, 12, 24]
    assert main(["sample", "--model", "PixArt-XL/2", "--resolution", "512", "--num", "30000",
                 "--out", "o"]) == 2
    assert "--num was renamed --num-samples" in capsys.readouterr().err
