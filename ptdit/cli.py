"""The `ptdit` command. Each subcommand imports what it needs when it runs.

    ptdit models [--format table|csv|json|markdown]
    ptdit convert SRC DST --to {ptdit,diffusers,official} [--format auto|NAME] [--name NAME]
                  [--dtype float32|bfloat16|float16|float64] [--config JSON] [--window F H W]
                  [--force]
    ptdit flops --model M [M ...] --resolution R [R ...] [--frames F ...] [--batch B]
                [--text-tokens L] [--window F H W] [--counter analytic|torch|fvcore|all]
                [--backend sdpa|math] [--dtype float32|bfloat16|float16|float64] [--format ...]
                [--store PATH]
    ptdit reproduce [--out DIR]
"""

import argparse
import sys

from ptdit.attention import BACKENDS
from ptdit.checks import DTYPES

FORMATS = ("table", "csv", "json", "markdown")
COUNTERS = ("analytic", "torch", "fvcore")   # bench.flops.COUNTERS, not imported for --help


def cmd_models(args: argparse.Namespace) -> int:
    import pandas as pd

    from bench.catalog import describe
    from bench.report import render
    from ptdit.configs import list_models

    df = pd.DataFrame([describe(name) for name in list_models()])
    print(render(df, args.format))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    import dataclasses
    from pathlib import Path

    from ptdit.configs import get_config
    from ptdit.interop import load, save, target_format
    from ptdit.interop.load import check_destination, read_json
    from ptdit.interop.ptdit_format import registry_name

    # every argument, and the destination, before anything is loaded
    if args.name is not None:
        get_config(args.name)
    config = None
    if args.config is not None:
        path = Path(args.config)
        if path.is_dir():
            raise ValueError(f"--config {path} is a folder; it must be a JSON file")
        if not path.is_file():
            raise ValueError(f"--config {path} does not exist; it must be a JSON file")
        config = read_json(path, "the --config JSON")
    check_destination(args.dst, args.force)
    model = load(args.src, name=args.name, format=args.format, dtype=args.dtype, config=config)
    if args.window is not None:
        if model.config.family != "PT-DiT":
            raise ValueError(f"--window sets a PT-DiT's window; {args.src} holds a "
                             f"{model.config.family} model")
        # the weights do not depend on the window: only the config changes
        model.config = dataclasses.replace(model.config, window=tuple(args.window))
        model.name = registry_name(model.config)
    fmt = target_format(model.config.family, args.to)
    paths = save(model, args.dst, fmt.name, force=args.force)
    dtype = next(model.parameters()).dtype
    print(f"{args.src} -> {fmt.name} ({model.config.family}"
          f"{', ' + model.name if model.name else ''}, {str(dtype).removeprefix('torch.')}): "
          + ", ".join(str(p) for p in paths))
    return 0


PROVENANCE = ("schema_version", "git_sha", "time_utc", "host", "torch")


def cmd_flops(args: argparse.Namespace) -> int:
    import pandas as pd

    from bench.flops import KEY, key, sweep, workloads
    from bench.report import render

    counters = COUNTERS if args.counter == "all" else (args.counter,)
    works = workloads(args.model, args.resolution, args.frames or (None,), args.batch,
                      args.text_tokens, tuple(args.window) if args.window else None)
    if args.store is None:
        rows = list(sweep(works, counters, args.backend, args.dtype))
    else:
        from bench.store import Store

        store = Store(args.store)
        for row in sweep(works, counters, args.backend, args.dtype, skip=store.done(KEY)):
            store.append(row)
        # this request's rows, those stored by earlier runs too: a resumed run shows them all
        stored = {tuple(row.get(k) for k in KEY): row for row in store.rows()}
        rows = [stored[key(w, c, args.backend, args.dtype)] for w in works for c in counters]
    df = pd.DataFrame(rows)
    if args.format in ("table", "markdown"):
        zero = [c for c in df.columns if c.startswith(("linear_", "attn_"))
                and c.endswith("_gmacs") and not df[c].fillna(0).any()]
        df = df.drop(columns=[*PROVENANCE, *zero])
    print(render(df, args.format))
    return 0 if (df["status"] == "ok").all() else 1


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bench.reproduce import run
    from bench.store import Store

    print(run(args.out, Store(args.store) if args.store else None))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ptdit", description="PT-DiT, DiT and PixArt-alpha: models, cost and analysis.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="every named configuration: parameters (ours vs the "
                       "paper's, in millions), depth, width, heads, patch, attention layout")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("convert", help="convert a checkpoint (facebook DiT .pt, diffusers "
                       "folder, official PixArt-alpha .pth, official PT-DiT, ptdit) to "
                       "safetensors")
    p.add_argument("src", help="checkpoint file or diffusers folder")
    p.add_argument("dst", help="a .safetensors file (--to ptdit/official) or a folder "
                   "(--to diffusers); official PT-DiT also writes DST's .json predictor config")
    p.add_argument("--to", required=True, choices=("ptdit", "diffusers", "official"),
                   help="ptdit: our format (config in the metadata); official: the release's "
                   "layout (facebook DiT, PixArt .pth keys, PT-DiT PTDiTDiffuser)")
    p.add_argument("--format", default="auto",
                   help="source format: auto (recognised from keys/config) or a format name")
    p.add_argument("--name", help="registry model name the checkpoint must match; it also "
                   "gives what SRC cannot say (the head count, ...)")
    p.add_argument("--dtype", choices=list(DTYPES), help="convert to this dtype (default: keep)")
    p.add_argument("--config", help="the source's config JSON (official PT-DiT predictor); "
                   "default: SRC's .json sidecar, else inferred from shapes")
    p.add_argument("--window", nargs=3, type=int, metavar=("F", "H", "W"),
                   help="PT-DiT only: the converted model's window in tokens (frames, rows, "
                   "cols); the weights do not depend on it. --to official needs one for a "
                   "PT-DiT without (every registry PT-DiT but Qihoo-T2I-1B)")
    p.add_argument("--force", action="store_true", help="overwrite an existing DST")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser(
        "flops", help="exact MACs / FLOPs / parameters / activations per module category",
        description="Exact cost of one forward pass, per module category and in every "
        "convention: linear_gmacs (linear/conv layers only: the PT-DiT paper's figures), "
        "attention_gmacs (QKᵀ and AV products), total_gmacs = linear + attention (the DiT "
        "paper's Gflops), total_gflops = 2 × total_gmacs. Norms and elementwise ops count 0. "
        "Counters: analytic (closed form), torch (FlopCounterMode) and fvcore, both on the meta "
        "device (no memory, any size).")
    p.add_argument("--model", nargs="+", required=True, metavar="M",
                   help="model name(s), see `ptdit models`")
    p.add_argument("--resolution", nargs="+", type=int, required=True, metavar="R",
                   help="square image side in pixels (latent side = R / 8)")
    p.add_argument("--frames", nargs="+", type=int, metavar="F",
                   help="LATENT frames for video latents (B, 4, F, H, W); omit for images")
    p.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    p.add_argument("--text-tokens", type=int, default=120, metavar="L",
                   help="T5 caption tokens (width 4096) for text models (default 120, the "
                   "papers' setting)")
    p.add_argument("--window", nargs=3, type=int, metavar=("F", "H", "W"),
                   help="PT-DiT window in tokens (frames, rows, cols); default: the paper's "
                   "schedule, 8x8 windows per frame and 4 frames per window")
    p.add_argument("--counter", choices=(*COUNTERS, "all"), default="analytic")
    p.add_argument("--backend", choices=list(BACKENDS), default="sdpa",
                   help="attention backend the counted models run (default sdpa)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="element type: activation_mib and attn_scores_mib scale with its size, "
                   "MACs and params do not; torch/fvcore count the model built in it "
                   "(default float32)")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--store", metavar="PATH", help="JSONL results store: each row is appended "
                   "as it finishes and the cases it already holds are not counted again; the "
                   "table shows every case asked for, stored earlier or now")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser(
        "reproduce", help="the DiT and PT-DiT papers' complexity figures vs our exact counts",
        description="Writes complexity.csv, complexity.md and plots (GMACs vs resolution, "
        "attention share, video vs frames) and prints the Markdown tables.")
    p.add_argument("--out", default="results/complexity", metavar="DIR",
                   help="output folder (default results/complexity)")
    p.add_argument("--store", metavar="STORE.jsonl",
                   help="also append the closed-form rows behind the tables and plots, with "
                   "provenance, to this results store")
    p.set_defaults(func=cmd_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:   # bad input, or a path that cannot be read or written
        print(f"ptdit {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
