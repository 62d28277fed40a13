"""bench's subcommands of `ptdit`: models, flops, reproduce, bench, sweep, report. Each is an
`add_X(subparsers)` beside a `run_X(args)` that makes one call into bench's library and prints
what it returns; the flags are ptdit.cli's shared definitions, and `ptdit bench`'s are built
from the sweep keys (bench.sweep.KEYS), so a sweep file and the flags take the same cases."""

import argparse
import sys

from ptdit.attention import BACKENDS
from ptdit.cli import add, deprecated, positive_int

from . import sweep
from .flops import COUNTERS
from .latency import DTYPES as RUNTIME_DTYPES
from .latency import MODES
from .sweep import EXIT_RULE, KEYS, MEASUREMENTS


def register(sub) -> None:
    """The entry point of the `ptdit.commands` group."""
    for add_command in (add_models, add_flops, add_reproduce, add_bench, add_sweep,
                        add_report):
        add_command(sub)


def _interrupted(command: str, store) -> int:
    kept = (f"every finished row is in {store}: run the same command again to resume"
            if store else "without --store no row was kept")
    print(f"ptdit {command}: interrupted; {kept}", file=sys.stderr)
    return 130


#################################################################################
#                                models, flops                                  #
#################################################################################

def add_models(sub) -> None:
    p = sub.add_parser("models", help="every named configuration: parameters (ours vs the "
                       "paper's, in millions), depth, width, heads, patch, attention layout")
    add(p, "--format")
    p.set_defaults(run=run_models)


def run_models(args: argparse.Namespace) -> int:
    from .catalog import table

    print(table(args.format))
    return 0


def add_flops(sub) -> None:
    p = sub.add_parser(
        "flops", help="exact MACs / FLOPs / parameters / activations per module category",
        description="Exact cost of one forward pass, per module category and in every "
        "convention: linear_gmacs (linear/conv layers only: the PT-DiT paper's figures), "
        "attention_gmacs (QKᵀ and AV products), total_gmacs = linear + attention (the DiT "
        "paper's Gflops), total_gflops = 2 × total_gmacs. Norms and elementwise ops count 0. "
        "Counters: analytic (closed form), torch (FlopCounterMode) and fvcore, both on the meta "
        "device (no memory, any size). " + EXIT_RULE)
    add(p, "--model", many=True)
    add(p, "--resolution", many=True)
    add(p, "--frames", many=True)
    add(p, "--batch-size", "of the forward (default 1)")
    deprecated(p, "--batch", "--batch-size", type=positive_int)
    add(p, "--text-tokens")
    add(p, "--window", "default: the paper's schedule, 8x8 windows per frame and 4 frames per "
        "window")
    p.add_argument("--counter", choices=(*COUNTERS, "all"), default="analytic",
                   help="analytic (default), torch, fvcore or all")
    p.add_argument("--backend", choices=list(BACKENDS), default="sdpa",
                   help="attention backend of the counted models (default sdpa)")
    add(p, "--dtype", "activation_mib and attn_scores_mib scale with its size, MACs and params "
        "do not; torch/fvcore count the model built in it")
    add(p, "--format")
    add(p, "--store", "each flops row is appended as it finishes and the cases it holds are "
        "not counted again; the table shows every case asked for. One writer at a time")
    p.set_defaults(run=run_flops)


def run_flops(args: argparse.Namespace) -> int:
    from .flops import run, table

    rows = run(args.model, args.resolution, args.frames, args.batch_size, args.text_tokens,
               args.window, COUNTERS if args.counter == "all" else (args.counter,),
               args.backend, args.dtype, store=args.store)
    print(table(rows, args.format))
    return sweep.exit_status(rows)


#################################################################################
#                                  reproduce                                    #
#################################################################################

def add_reproduce(sub) -> None:
    p = sub.add_parser(
        "reproduce", help="the DiT and PT-DiT papers' complexity figures vs our exact counts",
        description="Writes complexity.csv, complexity.md and plots (GMACs vs resolution, "
        "attention share, video vs frames) and prints the Markdown tables.")
    p.add_argument("--out", default="results/complexity", metavar="DIR",
                   help="output folder (default results/complexity)")
    add(p, "--store", "also append the closed-form rows behind the tables and plots, with "
        "provenance (complexity rows)")
    p.set_defaults(run=run_reproduce)


def run_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import run

    print(run(args.out, args.store))
    return 0


#################################################################################
#                              bench, sweep, report                            #
#################################################################################

def _key_flag(p, key: str) -> None:
    """`ptdit bench`'s flag for sweep key `key`: the shared definition where ptdit.cli has
    one, otherwise built from KEYS[key] (its doc, allowed values and default)."""
    spec = KEYS[key]
    shared = {"models": {}, "resolutions": {}, "frames": {}, "batch": {}, "text_tokens": {},
              "overrides": {}, "dtype": {"choices": RUNTIME_DTYPES},
              "device": {"choices": ("cpu", "cuda")}}
    if key in shared:
        many = spec.many and key != "overrides"
        add(p, spec.flag, spec.doc, many=many, **shared[key])
        return
    if isinstance(spec.default, list) and spec.default == [False]:
        p.add_argument(spec.flag, action="store_true", help=spec.doc)
        return
    choices = {"backend": list(BACKENDS), "mode": list(MODES)}.get(key)
    p.add_argument(spec.flag, nargs="+" if spec.many else None, choices=choices,
                   type=None if choices else int, default=spec.default,
                   metavar=spec.flag.lstrip("-").upper().replace("-", "_"),
                   help=f"{spec.doc}; allowed: {spec.allowed} (default {spec.default})")


def add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="measure step latency, peak memory or a profile (forward, cfg, train) on "
        "CPU or CUDA",
        description="Every model × resolution × frames × batch × dtype × backend × mode given, "
        "as results rows (printed; appended to --store if given, where the cases already "
        "stored are not measured again). Latency: median, IQR and min in ms of --repeats timed "
        "steps after --warmup untimed ones (perf_counter on the CPU, CUDA events on CUDA), "
        "torch.compile's time apart in compile_s, the closed-form MACs of the step and "
        "achieved_tflops. Memory: peak MiB of one step above what was held before it (CPU: a "
        "fresh process, its peak RSS; CUDA: max_memory_allocated), beside the closed-form "
        "activation MiB. Profile: torch.profiler's self time by category with the achieved "
        "TFLOP/s of GEMMs and attention. The flags are the sweep-file keys (bench/sweep.py "
        "KEYS). Ctrl-C stops it with exit status 130, every finished row kept in --store. "
        + EXIT_RULE)
    p.add_argument("measurement", choices=MEASUREMENTS)
    for key in KEYS:
        if key != "measure":
            _key_flag(p, key)
    deprecated(p, "--batch", "--batch-size", nargs="+", type=positive_int)
    add(p, "--threads")
    add(p, "--format")
    add(p, "--store", "runtime rows are appended as they finish; the cases it holds are not "
        "measured again; checked before anything is measured; one writer at a time")
    p.add_argument("--retry-failed", action="store_true", help="measure again the cases whose "
                   "latest row in --store failed ('error: …'; 'oom' and 'skipped' rows stay)")
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from .markdown import rows_table

    dests = {"models": "model", "resolutions": "resolution", "batch": "batch_size",
             "measure": "measurement", "overrides": "override"}
    spec = {key: getattr(args, dests.get(key, key)) for key in KEYS}
    spec = {key: value for key, value in spec.items() if value is not None}   # None: default
    spec["overrides"] = dict(spec["overrides"])
    spec["resolutions"] = [list(r) if isinstance(r, tuple) else r for r in spec["resolutions"]]
    try:
        rows = sweep.run_flags(spec, args.store, args.retry_failed, args.threads)
    except KeyboardInterrupt:
        return _interrupted("bench", args.store)
    print(rows_table(rows, args.format))
    return sweep.exit_status(rows)


def add_sweep(sub) -> None:
    p = sub.add_parser(
        "sweep", help="run a sweep file's latency/memory/profile grid into a results store "
        "(resumable)",
        description="Runs the grid of a TOML sweep file (keys: bench/sweep.py KEYS; examples: "
        "bench/sweeps/*.toml), appending each row to --out as it finishes. Every case is "
        "validated before the first is measured; a rerun skips the cases already stored; a "
        "case that runs out of memory is an 'oom' row and the larger cases of its model and "
        "setup are 'skipped: …' rows; failed cases ('error: …') stay as they are unless "
        "--retry-failed. --out and --report are checked before anything is measured, and one "
        "sweep at a time writes a store. Ctrl-C stops it with exit status 130, every finished "
        "row kept. " + EXIT_RULE)
    p.add_argument("file", help="the sweep file (TOML)")
    p.add_argument("--out", required=True, metavar="STORE.jsonl",
                   help="results store; '{device}' in the path becomes the device's name, "
                   "e.g. results/gpu/{device}/store.jsonl")
    p.add_argument("--dry-run", action="store_true",
                   help="validate and list the cases (and which are stored), measure nothing")
    p.add_argument("--smoke", action="store_true",
                   help="the same grid on the CPU in seconds: depth 1, width 64, one "
                   "small size (<= 256 px, <= 4 latent frames), one repeat, no warm-up, eager")
    p.add_argument("--report", metavar="DIR", help="then write `ptdit report`'s output to DIR "
                   "('{device}' as in --out)")
    p.add_argument("--retry-failed", action="store_true", help="measure again the cases whose "
                   "latest stored row failed ('error: …'; 'oom' and 'skipped' rows stay)")
    add(p, "--threads")
    p.set_defaults(run=run_sweep)


def run_sweep(args: argparse.Namespace) -> int:
    from .runtime_report import report_store

    try:
        result = sweep.run_file(args.file, args.out, quick=args.smoke, dry_run=args.dry_run,
                                report=args.report, retry_failed=args.retry_failed,
                                threads=args.threads)
    except KeyboardInterrupt:
        return _interrupted("sweep", args.out)
    print(result.text)
    if result.report:
        for name, path in report_store(result.store.path, result.report).items():
            print(f"{name}: {path}")
    return result.status


def add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="the runtime rows of a results store as CSV, Markdown and plots",
        description="Writes bench.runtime_report's tables (runtime.md, latency.csv, "
        "memory.csv, speedups.csv, profile.csv) and plots from the rows of STORE into DIR. A "
        "store without runtime rows is refused.")
    p.add_argument("store", metavar="STORE.jsonl", help="a results store (ptdit sweep --out)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(run=run_report)


def run_report(args: argparse.Namespace) -> int:
    from .runtime_report import report_store

    for name, path in report_store(args.store, args.out).items():
        print(f"{name}: {path}")
    return 0
