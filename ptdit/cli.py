"""The `ptdit` command. Each subcommand imports what it needs when it runs.

    ptdit models [--format table|csv|json|markdown]
    ptdit convert SRC DST --to {ptdit,diffusers,official} [--format auto|NAME] [--name NAME]
                  [--dtype float32|bfloat16|float16|float64] [--config JSON] [--window F H W]
                  [--force]
    ptdit flops --model M [M ...] --resolution R [R ...] [--frames F ...] [--batch B]
                [--text-tokens L] [--window F H W] [--counter analytic|torch|fvcore|all]
                [--backend sdpa|math] [--dtype float32|bfloat16|float16|float64] [--format ...]
                [--store PATH]
    ptdit reproduce [--out DIR] [--store PATH]
    ptdit bench latency|memory|profile --model M [M ...] --resolution R [R ...] [--frames F ...]
                [--batch B ...] [--dtype D ...] [--mode forward|cfg|train ...] [--device cpu|cuda]
                [--backend sdpa|math ...] [--repeats N] [--warmup N] [--compile] [--cuda-graphs]
                [--text-tokens L] [--override FIELD=VALUE ...] [--threads N] [--format ...]
                [--store PATH [--retry-failed]]
    ptdit sweep FILE.toml --out STORE.jsonl [--dry-run] [--smoke] [--report DIR] [--threads N]
                [--retry-failed]
    ptdit report STORE.jsonl --out DIR
    ptdit sample --model NAME [--checkpoint PATH] --vae DIR --resolution R [--frames F]
                 (--class-labels SPEC | --prompt-embeddings FILE | --prompts FILE --t5 DIR)
                 --num-samples N --out DIR [--first-index I] [--scheduler ddpm|dpm|flow]
                 [--steps N] [--cfg-scale S] [--guidance-channels 3|all] [--seed S]
                 [--init-seed S] [--batch-size B]
                 [--device D] [--dtype D] [--npz] [--store PATH] [--override FIELD=VALUE ...]
    ptdit fid SAMPLES REF [--inception-weights PATH] [--antialias] [--batch-size B]
              [--cache-dir DIR] [--device D] [--store PATH]
    ptdit clip-score SAMPLES CAPTIONS [--clip-weights PATH] [--batch-size B] [--device D]
                     [--store PATH]
    ptdit attention --model NAME [--checkpoint PATH] --resolution R [--frames F] --out DIR
                    [--class-labels SPEC | --prompt-embeddings FILE] [--steps I ...]
                    [--sampler-steps N] [--scheduler S] [--cfg-scale S] [--window W ...]
                    [--layers I ...] [--heads I ...] [--samples N] [--seed S] [--headwise]
                    [--max-pairs N] [--override FIELD=VALUE ...]
"""

import argparse
import sys

from ptdit.attention import BACKENDS
from ptdit.checks import DTYPES

FORMATS = ("table", "csv", "json", "markdown")
COUNTERS = ("analytic", "torch", "fvcore")   # bench.flops.COUNTERS, not imported for --help
MODES = ("forward", "cfg", "train")            # bench.latency.MODES, likewise
RUNTIME_DTYPES = ("float32", "bfloat16", "float16")   # bench.latency.DTYPES, likewise


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


PROVENANCE = ("schema_version", "git_sha", "time_utc", "host", "torch", "table")
# the exit status of flops, bench and sweep, as their --help states it
EXIT_RULE = ("Exit status: 1 when some row has an 'error: …' status, else 0 ('oom' and "
             "'skipped: …' rows are results); 2 for bad input, before anything is measured.")


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
        from bench.store import Store, check_writable

        store = Store(check_writable(args.store, "--store"), "flops")
        with store.lock():
            for row in sweep(works, counters, args.backend, args.dtype, skip=store.done(KEY)):
                store.append(row)
            # this request's rows, those stored by earlier runs too: a resumed run shows them
            stored = store.latest(KEY)
        rows = [stored[key(w, c, args.backend, args.dtype)] for w in works for c in counters]
    df = pd.DataFrame(rows)
    if args.format in ("table", "markdown"):
        zero = [c for c in df.columns if c.startswith(("linear_", "attn_"))
                and c.endswith("_gmacs") and not df[c].fillna(0).any()]
        df = df.drop(columns=[c for c in (*PROVENANCE, *zero) if c in df])
    print(render(df, args.format))
    return 1 if df["status"].astype(str).str.startswith("error").any() else 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from bench.reproduce import run
    from bench.store import Store, check_writable

    if args.store is None:
        print(run(args.out))
        return 0
    store = Store(check_writable(args.store, "--store"), "complexity").check()
    with store.lock():
        print(run(args.out, store))
    return 0


TEXT_COLUMNS = ("overrides", "flop_model", "prediction")   # left out of printed tables


def _override(text: str) -> tuple[str, object]:
    """FIELD=VALUE, the value in TOML syntax (2, 0.5, true, "x"); a bare word is a string."""
    import tomllib

    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, e.g. depth=2; got {text!r}")
    try:
        return field.strip(), tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        return field.strip(), value


def _runtime_table(rows: list[dict], fmt: str) -> str:
    import pandas as pd

    from bench.report import render

    df = pd.DataFrame(rows)
    if fmt in ("table", "markdown"):
        df = df.drop(columns=[c for c in (*PROVENANCE, *TEXT_COLUMNS) if c in df])
    return render(df, fmt)


def _set_threads(threads: int | None) -> None:
    import torch

    if threads is not None:
        if threads < 1:
            raise ValueError(f"--threads must be a positive integer, got {threads}")
        torch.set_num_threads(threads)


def cmd_bench(args: argparse.Namespace) -> int:
    from bench.store import Store, check_writable
    from bench.sweep import failed, grids, plan, run, stored_rows

    _set_threads(args.threads)
    eager_only = [f for f, on in (("--compile", args.compile),
                                  ("--cuda-graphs", args.cuda_graphs)) if on]
    if args.measurement == "memory" and eager_only:
        many = len(eager_only) > 1
        raise ValueError(f"memory rows measure eager steps; {' and '.join(eager_only)} "
                         f"appl{'y' if many else 'ies'} to latency and profile rows only: drop "
                         f"{'them' if many else 'it'}, or measure latency")
    if args.retry_failed and args.store is None:
        raise ValueError("--retry-failed measures the failed cases of --store again; give "
                         "--store")
    spec = {"models": args.model, "resolutions": args.resolution, "batch": args.batch,
            "dtype": args.dtype, "mode": args.mode, "backend": args.backend,
            "measure": args.measurement, "device": args.device, "repeats": args.repeats,
            "warmup": args.warmup, "compile": args.compile, "cuda_graphs": args.cuda_graphs,
            "text_tokens": args.text_tokens, "overrides": dict(args.override)}
    if args.frames:
        spec["frames"] = args.frames
    flags = {"models": "--model", "resolutions": "--resolution", "frames": "--frames",
             "batch": "--batch", "dtype": "--dtype", "mode": "--mode", "backend": "--backend",
             "measure": "the measurement", "device": "--device", "repeats": "--repeats",
             "warmup": "--warmup", "compile": "--compile", "cuda_graphs": "--cuda-graphs",
             "text_tokens": "--text-tokens", "overrides": "--override"}
    jobs = plan(grids(spec, names=flags))
    store = None if args.store is None else Store(check_writable(args.store, "--store"),
                                                  "runtime")
    try:
        if store is None:
            rows = list(run(jobs))
        else:
            with store.lock():
                for _ in run(jobs, store, retry_failed=args.retry_failed):
                    pass
            rows = stored_rows(jobs, store)   # a resumed run shows the earlier rows too
    except KeyboardInterrupt:
        kept = (f"every finished row is in {store.path}: run the same command again to resume"
                if store else "without --store no row was kept")
        print(f"ptdit bench: interrupted; {kept}", file=sys.stderr)
        return 130
    shown = [row for row in rows if row.get("level") != "op"]   # a profile's categories
    print(_runtime_table(shown, args.format))
    return 1 if any(failed(row) for row in rows) else 0


def _write_report(store_path, out_dir) -> None:
    from bench.runtime_report import write_report
    from bench.store import Store

    frame = Store(store_path, "runtime").frame()
    if frame.empty:
        raise ValueError(f"no rows in {store_path}: nothing to report (fill it with `ptdit "
                         f"sweep FILE.toml --out {store_path}`)")
    for name, path in write_report(frame, out_dir).items():
        print(f"{name}: {path}")


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from bench.store import check_writable_folder

    if not Path(args.store).is_file():
        raise ValueError(f"no results store at {args.store}; make one with `ptdit sweep "
                         f"FILE.toml --out {args.store}`")
    check_writable_folder(args.out, "--out")
    _write_report(args.store, args.out)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from bench import sweep
    from bench.store import Store, check_writable, check_writable_folder, row_key

    _set_threads(args.threads)
    cases = sweep.grids(sweep.load(args.file), args.file)
    jobs = sweep.plan(sweep.smoke(cases) if args.smoke else cases)
    paths = [args.out] + ([args.report] if args.report else [])
    if any("{device}" in p for p in paths):
        slug = sweep.device_slug(jobs)
        paths = [p.replace("{device}", slug) for p in paths]
    out, report = paths[0], (paths[1] if args.report else None)
    store = Store(check_writable(out, "--out"), "runtime")
    if report:
        check_writable_folder(report, "--report")
    if args.dry_run:   # nothing is measured or written
        done = sweep.stored_keys(store, args.retry_failed)
        listed = [{**job.fields(), "stored": job.key() in done} for job in jobs]
        print(_runtime_table(listed, "table"))
        print(f"{len(jobs)} cases, {sum(row['stored'] for row in listed)} already in {out}; "
              f"the timed steps' closed-form work: {sweep.estimate_tflop(jobs):.4g} TFLOP")
        return 0
    try:
        with store.lock():
            new = list(sweep.run(jobs, store, retry_failed=args.retry_failed))
    except KeyboardInterrupt:
        print(f"ptdit sweep: interrupted; every finished row is in {store.path}: run the same "
              "command again to resume", file=sys.stderr)
        return 130
    measured = {row_key(row, sweep.KEY) for row in new}   # a profile case writes several rows
    per_case = {row_key(row, sweep.KEY): row for row in sweep.stored_rows(jobs, store)}
    tally = sweep.counts(per_case.values())
    kept = sum(sweep.failed(row) for key, row in per_case.items() if key not in measured)
    print(f"{len(jobs)} cases of {args.file}: {len(measured)} measured now, "
          f"{len(jobs) - len(measured)} already stored; "
          + ", ".join(f"{n} {status}" for status, n in tally.items())
          + (f"; {kept} failed case{'s' * (kept != 1)} not retried (--retry-failed measures "
             "them again)" if kept else "") + f"; store: {store.path}")
    if report:
        _write_report(store.path, report)
    return 1 if tally["error"] else 0


#################################################################################
#                                  Quality                                      #
#################################################################################

def _sample_model(args: argparse.Namespace):
    """The model of --model: loaded from --checkpoint, else random weights drawn under
    torch.manual_seed(--init-seed, default --seed), so two runs build the same weights (the
    global RNG is left as it was)."""
    import math

    import torch

    import ptdit

    overrides = dict(args.override)
    bad = [f"{k}={v}" for k, v in overrides.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"--override {' '.join(bad)}: not finite; allowed: finite numbers")
    if args.checkpoint is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_init_seed(args))
            return ptdit.build(args.model, **overrides)
    if overrides:
        raise ValueError("--override changes a model's layers, so it cannot apply to "
                         f"--checkpoint {args.checkpoint}; drop one of them")
    return ptdit.load(args.checkpoint, name=args.model)


def _init_seed(args: argparse.Namespace) -> int | None:
    """The seed of untrained weights (--init-seed, else --seed); None with --checkpoint."""
    if args.checkpoint is not None:
        return None
    init_seed = getattr(args, "init_seed", None)
    return args.seed if init_seed is None else init_seed


def _sample_conditions(args: argparse.Namespace, model):
    from analysis import conditions

    given = [f for f in ("class_labels", "prompt_embeddings", "prompts")
             if getattr(args, f) is not None]
    if len(given) != 1:
        raise ValueError("give exactly one of --class-labels, --prompt-embeddings or --prompts "
                         f"(with --t5); got {len(given) or 'none'}")
    if args.class_labels is not None:
        return conditions.class_conditions(args.class_labels)
    if args.prompt_embeddings is not None:
        return conditions.prompt_embeddings(args.prompt_embeddings)
    return conditions.encode_prompts(args.prompts, args.t5, conditions.text_tokens(model),
                                     device=args.device)


def _quality_checks(args: argparse.Namespace, outputs: dict[str, tuple[str, bool]]):
    """What every quality command checks before any work: the device (a torch.device back),
    finite float options, and that the outputs ({flag: (path, is a folder)}) can be
    written; one-line ValueErrors naming the flag. Creates nothing."""
    import math

    from analysis.distributed import check_device
    from bench.store import check_writable, check_writable_folder

    device = check_device(args.device, "--device")
    cfg_scale = getattr(args, "cfg_scale", None)   # the quality commands' one float option
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise ValueError(f"--cfg-scale {cfg_scale} is not finite; allowed: a finite number "
                         "(1: unguided)")
    for flag, (path, folder) in outputs.items():
        (check_writable_folder if folder else check_writable)(path, flag)
    return device


def cmd_sample(args: argparse.Namespace) -> int:
    from pathlib import Path

    from analysis.offline import VAE, go_offline

    device = _quality_checks(args, {
        "--out": (args.out, True),
        "--store": (args.store or Path(args.out) / "samples.jsonl", False)})
    go_offline()
    VAE.path(args.vae)       # a missing folder fails in a moment, before the heavy imports
    if args.checkpoint is not None and not Path(args.checkpoint).exists():
        raise ValueError(f"--checkpoint {args.checkpoint} does not exist")
    from analysis.distributed import process_group
    from analysis.sampling import load_vae, sample

    if len(args.resolution) > 2:
        raise ValueError(f"--resolution takes a side or height width in pixels, got "
                         f"{len(args.resolution)} numbers")
    resolution = args.resolution[0] if len(args.resolution) == 1 else tuple(args.resolution)
    vae = load_vae(args.vae)            # a missing folder fails before the model is built
    with process_group(device) as (rank, _, device):
        model = _sample_model(args)
        try:
            row = sample(model, vae=vae, conditions=_sample_conditions(args, model),
                         num=args.num_samples, out=args.out, resolution=resolution,
                         scheduler=args.scheduler, steps=args.steps, cfg_scale=args.cfg_scale,
                         guidance_channels=args.guidance_channels, seed=args.seed,
                         start=args.first_index, batch_size=args.batch_size,
                         frames=args.frames, device=device, dtype=args.dtype,
                         write_npz=args.npz, store=args.store, checkpoint=args.checkpoint,
                         init_seed=_init_seed(args))
        except KeyboardInterrupt:
            print(f"ptdit sample: interrupted; the finished PNGs are kept in {args.out}: run "
                  "the same command again to resume", file=sys.stderr)
            return 130
        if rank == 0:                        # under torchrun, rank 0 reports for all
            _print_row(row)
    return 0 if row["status"] == "ok" else 1


def _metric_store(args: argparse.Namespace):
    """The results store of a metric's row (--store, default beside the samples), checked
    to be writable and to hold metric rows; nothing is created until the row is appended."""
    from pathlib import Path

    from bench.store import Store, check_writable

    if args.store is not None:
        path = args.store
    else:
        samples = Path(args.samples)
        path = (samples / "metrics.jsonl" if samples.is_dir()
                else samples.with_name(samples.name + ".metrics.jsonl"))
    return Store(check_writable(path, "--store"), "metrics").check()


def _print_row(row: dict, store=None) -> None:
    width = max(map(len, row))
    for name, value in row.items():
        print(f"{name:<{width}}  {value}")
    if store is not None:
        print(f"{'(stored in)':<{width}}  {store.path}")


def _metric(args: argparse.Namespace, check_weights, compute) -> int:
    """Checks --device, --store and the weights (check_weights()), then runs compute(device)
    on every rank (under torchrun: sharded, one process group); rank 0 appends the row and
    prints it."""
    from analysis.distributed import process_group
    from analysis.offline import go_offline

    device = _quality_checks(args, {})
    store = _metric_store(args)
    check_weights()                          # fails in a moment, before the heavy imports
    go_offline()
    with process_group(device) as (rank, _, device):
        row = compute(device)
        if rank == 0:                        # under torchrun, rank 0 reports for all
            row = store.append(row)
            _print_row(row, store)
    return 0


def cmd_fid(args: argparse.Namespace) -> int:
    from analysis.offline import INCEPTION

    def compute(device):
        from analysis.metrics.fid import fid

        return fid(args.samples, args.reference, inception_weights=args.inception_weights,
                   batch_size=args.batch_size, device=device, antialias=args.antialias,
                   cache_dir=args.cache_dir)
    return _metric(args, lambda: INCEPTION.path(args.inception_weights), compute)


def cmd_clip_score(args: argparse.Namespace) -> int:
    from analysis.offline import CLIP

    def compute(device):
        from analysis.metrics.clip_score import clip_score

        return clip_score(args.samples, args.captions, clip_weights=args.clip_weights,
                          batch_size=args.batch_size, device=device)
    return _metric(args, lambda: CLIP.path(args.clip_weights), compute)


#################################################################################
#                               Attention analysis                              #
#################################################################################

def _attention_conditions(args: argparse.Namespace, model):
    from analysis import conditions

    if args.class_labels is not None and args.prompt_embeddings is not None:
        raise ValueError("give one of --class-labels and --prompt-embeddings, not both")
    if args.prompt_embeddings is not None:
        return conditions.prompt_embeddings(args.prompt_embeddings)
    if args.class_labels is None and model.config.condition == "text":
        raise ValueError(f"{args.model} is text-conditioned: give --prompt-embeddings FILE "
                         "(`embeddings` (N, L, C) and `mask` (N, L) T5 features)")
    return conditions.class_conditions(args.class_labels or "0")


def cmd_attention(args: argparse.Namespace) -> int:
    import math

    from analysis.attention_run import run
    from bench.store import check_writable_folder

    for flag, value in (("--sampler-steps", args.sampler_steps), ("--samples", args.samples),
                        ("--edge-margin", args.edge_margin), ("--max-pairs", args.max_pairs)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if args.cfg_scale is not None and not math.isfinite(args.cfg_scale):
        raise ValueError(f"--cfg-scale must be a finite number, got {args.cfg_scale}")
    if args.vae is not None and args.images is None:
        raise ValueError("--vae encodes the real images of --images; give both, or neither "
                         "to analyse the sampler's own trajectory")
    check_writable_folder(args.out, "--out")
    vae = None
    if args.vae is not None:
        from analysis.offline import VAE, go_offline
        go_offline()
        VAE.path(args.vae)
        from analysis.sampling import load_vae
        vae = load_vae(args.vae)
    model = _sample_model(args)
    result = run(model, _attention_conditions(args, model), out=args.out,
                 resolution=args.resolution, frames=args.frames, images=args.images, vae=vae,
                 scheduler=args.scheduler, steps=args.sampler_steps, analyse_steps=args.steps,
                 cfg_scale=args.cfg_scale, seed=args.seed, samples=args.samples,
                 windows=args.window, layers=args.layers, heads=args.heads,
                 headwise=args.headwise, max_pairs=args.max_pairs, edge_margin=args.edge_margin,
                 checkpoint=args.checkpoint, init_seed=_init_seed(args), force=args.force)
    print(result.text())
    return 0 if all(row["status"] == "ok" for row in result.rows) else 1


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
        "device (no memory, any size). " + EXIT_RULE)
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
    p.add_argument("--store", metavar="PATH", help="JSONL results store of flops rows: each "
                   "row is appended as it finishes and the cases it already holds are not "
                   "counted again; the table shows every case asked for, stored earlier or now. "
                   "One writer at a time: a second run on the same store is refused")
    p.set_defaults(func=cmd_flops)

    p = sub.add_parser(
        "reproduce", help="the DiT and PT-DiT papers' complexity figures vs our exact counts",
        description="Writes complexity.csv, complexity.md and plots (GMACs vs resolution, "
        "attention share, video vs frames) and prints the Markdown tables.")
    p.add_argument("--out", default="results/complexity", metavar="DIR",
                   help="output folder (default results/complexity)")
    p.add_argument("--store", metavar="STORE.jsonl",
                   help="also append the closed-form rows behind the tables and plots, with "
                   "provenance, to this results store (of complexity rows)")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "bench", help="measure step latency or peak memory (forward, cfg, train) on CPU or CUDA",
        description="Every model × resolution × frames × batch × dtype × backend × mode given, "
        "as results rows (printed; appended to --store if given, where the cases already "
        "stored are not measured again). Latency: median, IQR and min in ms of --repeats timed "
        "steps after --warmup untimed ones (perf_counter on the CPU, CUDA events on CUDA), "
        "torch.compile's time apart in compile_s, the closed-form MACs of the step and "
        "achieved_tflops by the row's flop_model (FLOPs = 2 × MACs; train ≈ 3 × forward). "
        "Memory: peak MiB of one step above what was held before it (CPU: a fresh process, "
        "its peak RSS; CUDA: max_memory_allocated), beside the closed-form activation MiB. "
        "Profile: torch.profiler over --repeats steps, each operator's self time by category "
        "(gemm, attention, layout, norm, elementwise, …) with the achieved TFLOP/s of the "
        "GEMMs and of attention (bench.profile). Ctrl-C stops it with exit status 130, every "
        "finished row kept in --store. " + EXIT_RULE)
    p.add_argument("measurement", choices=("latency", "memory", "profile"))
    p.add_argument("--model", nargs="+", required=True, metavar="M",
                   help="model name(s), see `ptdit models`")
    p.add_argument("--resolution", nargs="+", type=int, required=True, metavar="R",
                   help="square image side in pixels (latent side = R / 8)")
    p.add_argument("--frames", nargs="+", type=int, metavar="F",
                   help="LATENT frames for video latents (B, 4, F, H, W); omit for images")
    p.add_argument("--batch", nargs="+", type=int, default=[1], metavar="B",
                   help="requested batch size(s) (default 1); cfg runs the model at 2 × B")
    p.add_argument("--dtype", nargs="+", choices=RUNTIME_DTYPES, default=["float32"],
                   metavar="D", help=f"{', '.join(RUNTIME_DTYPES)} (default float32)")
    p.add_argument("--mode", nargs="+", choices=MODES, default=["forward"], metavar="MODE",
                   help="forward (no_grad), cfg (the guided forward: batch doubled) or train "
                   "(forward, MSE loss, backward, AdamW step); default forward")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                   help="cpu (default) or cuda (the current GPU: pick it with "
                   "CUDA_VISIBLE_DEVICES); cuda without a GPU is an error, never a CPU run")
    p.add_argument("--backend", nargs="+", choices=list(BACKENDS), default=["sdpa"],
                   metavar="NAME", help=f"attention backend(s): {', '.join(BACKENDS)} "
                   "(default sdpa)")
    p.add_argument("--repeats", type=int, default=10, metavar="N",
                   help="timed steps per latency row (default 10)")
    p.add_argument("--warmup", type=int, default=2, metavar="N",
                   help="untimed steps before them (default 2)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (latency; "
                   "compilation + first call in compile_s, never in latency_ms_*; memory rows "
                   "refuse it)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the step as a CUDA graph (latency on cuda; memory rows refuse "
                   "it)")
    p.add_argument("--text-tokens", type=int, default=120, metavar="L",
                   help="T5 caption tokens for text models (default 120)")
    p.add_argument("--override", nargs="+", type=_override, action="extend", default=[],
                   metavar="FIELD=VALUE", help="config fields of every model, e.g. depth=2 "
                   "hidden_size=64 (values in TOML syntax)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU intra-op threads "
                   "(torch.set_num_threads; default: torch's, one per core), recorded in each "
                   "row's threads and device")
    p.add_argument("--format", choices=FORMATS, default="table")
    p.add_argument("--store", metavar="PATH", help="JSONL results store of runtime rows to "
                   "append the rows to; its path is checked before anything is measured, and a "
                   "second run on the same store is refused while this one writes")
    p.add_argument("--retry-failed", action="store_true", help="measure again the cases whose "
                   "latest row in --store failed ('error: …'; 'oom' and 'skipped' rows stay)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "sweep", help="run a sweep file's latency/memory grid into a results store (resumable)",
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
    p.add_argument("--threads", type=int, metavar="N", help="CPU intra-op threads "
                   "(torch.set_num_threads; default: torch's, one per core), recorded in each "
                   "row's threads and device")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser(
        "report", help="latency/memory rows of a results store as CSV, Markdown and plots",
        description="Writes bench.runtime_report's tables (runtime.md, latency.csv, "
        "memory.csv, speedups.csv) and plots from the rows of STORE into DIR. A store without "
        "rows, or of other rows (flops, …), is an error (exit status 2).")
    p.add_argument("store", metavar="STORE.jsonl", help="a results store of runtime rows "
                   "(ptdit sweep --out, ptdit bench --store)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(func=cmd_report)

    _quality_parsers(sub)
    _attention_parser(sub)
    return parser


class _RenamedFlag(argparse.Action):
    """A flag that was renamed: a one-line error naming the new flag and why, never an
    alias."""

    def __init__(self, option_strings, dest, new: str, why: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.new, self.why = new, why

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{parser.prog}: error: {option_string} was renamed {self.new}: "
                    f"{self.why}\n")


TORCHRUN_CLASH = ("torchrun reads the options after the script too, and takes {old} as an "
                  "ambiguous prefix of its own {theirs}")


def _quality_parsers(sub) -> None:
    # allow_abbrev=False: no prefix ever stands for a flag (torchrun's own options would
    # shadow some prefixes), so --num cannot silently mean --num-samples
    p = sub.add_parser(
        "sample", allow_abbrev=False, help="generate images (or video frames) with a real "
        "scheduler and VAE, resumable, sharded under torchrun",
        description="Samples indices FIRST..FIRST+N-1 (--first-index, --num-samples) of NAME "
        "(random weights drawn under --init-seed unless --checkpoint) into "
        "OUT/{index:06d}.png, skipping finished ones: the seed of sample i derives from --seed "
        "and i, so any shard or restart reproduces it. OUT/run.json records the settings; a "
        "rerun with other settings into the same OUT is refused. Schedulers: ddpm (DiT: "
        "IDDPM-respaced, 250 steps, learned variance), dpm (PixArt-α: DPM-Solver++, 20), flow "
        "(PT-DiT: rectified-flow Euler, 30); the family's by default. Under `torchrun "
        "--nproc_per_node N -m ptdit.cli sample …` the indices are shared among the ranks. "
        "Nothing downloads: the VAE and T5 come from local folders. Exit status: 0 when every "
        "sample is made, 1 when some are not (non-finite values), 2 for bad input, 130 on "
        "Ctrl-C (finished PNGs are kept; rerun to resume).")
    p.add_argument("--model", required=True, metavar="NAME", help="registry name (`ptdit "
                   "models`); with --checkpoint, the checkpoint must hold its layers")
    p.add_argument("--checkpoint", metavar="PATH", help="weights in any format ptdit.load "
                   "reads (default: random weights, recorded as 'untrained')")
    p.add_argument("--vae", metavar="DIR", help="a diffusers AutoencoderKL folder (default "
                   "$PTDIT_VAE)")
    p.add_argument("--resolution", type=int, nargs="+", required=True, metavar="PX",
                   help="image side, or height width, in pixels")
    p.add_argument("--frames", type=int, metavar="F", help="latent frames (video models)")
    p.add_argument("--class-labels", metavar="SPEC", help='"1,2,3", "0-999", "0,5-9" or a '
                   "file of one label per line; sample i takes label i mod N")
    p.add_argument("--prompt-embeddings", metavar="FILE", help=".safetensors/.pt with "
                   "`embeddings` (N, L, C) and `mask` (N, L) T5 features")
    p.add_argument("--prompts", metavar="FILE", help="a text file, one prompt a line, "
                   "encoded by the T5 of --t5")
    p.add_argument("--t5", metavar="DIR", help="a transformers T5EncoderModel folder with "
                   "its tokenizer (default $PTDIT_T5)")
    p.add_argument("--num-samples", type=int, required=True, metavar="N",
                   help="samples to make")
    p.add_argument("--first-index", type=int, default=0, metavar="I",
                   help="index of the first sample (default 0)")
    p.add_argument("--num", action=_RenamedFlag, new="--num-samples",
                   why=TORCHRUN_CLASH.format(old="--num", theirs="--numa-binding"))
    p.add_argument("--start", action=_RenamedFlag, new="--first-index",
                   why=TORCHRUN_CLASH.format(old="--start", theirs="--start-method"))
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--scheduler", choices=("ddpm", "dpm", "flow"),
                   help="default: the model family's")
    p.add_argument("--steps", type=int, metavar="N", help="default: the scheduler's release "
                   "(ddpm 250, dpm 20, flow 30)")
    p.add_argument("--cfg-scale", type=float, metavar="S", help="guidance scale (1: "
                   "unguided; default: the family's)")
    p.add_argument("--guidance-channels", choices=("3", "all"), help="3: DiT's official "
                   "guidance of the first 3 latent channels; all: every channel")
    p.add_argument("--seed", type=int, default=0, help="seeds sample i's noise with (seed, "
                   "i) (default 0)")
    p.add_argument("--init-seed", type=int, metavar="S", help="without --checkpoint: the "
                   "seed the random weights are drawn with (default: --seed), recorded in "
                   "the row and OUT/run.json")
    p.add_argument("--batch-size", type=int, default=16, metavar="B",
                   help="samples per forward (twice the rows when guided; default 16)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda (under torchrun: "
                   "GPU LOCAL_RANK) or cuda:N; cuda without a GPU is an error")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--npz", action="store_true", help="also write OUT/samples.npz (arr_0 "
                   "uint8 NHWC, ADM's format) at the end")
    p.add_argument("--store", metavar="PATH", help="results store for the run's row "
                   "(default OUT/samples.jsonl)")
    p.add_argument("--override", nargs="+", type=_override, action="extend", default=[],
                   metavar="FIELD=VALUE", help="config fields of a random-weight model, "
                   "e.g. depth=2")
    p.set_defaults(func=cmd_sample)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--device", default="cpu", help="cpu (default), cuda (under "
                        "torchrun: GPU LOCAL_RANK) or cuda:N")
    common.add_argument("--store", metavar="PATH", help="results store for the row (default "
                        "SAMPLES/metrics.jsonl, or SAMPLES.metrics.jsonl beside an .npz)")

    p = sub.add_parser(
        "fid", parents=[common], allow_abbrev=False, help="FID of a folder / .npz of samples "
        "against a reference "
        "(torchmetrics, torch-fidelity's Inception from a local file)",
        description="FID with torchmetrics' FrechetInceptionDistance (2048-d pool features, "
        "float64 statistics) on torch-fidelity's TF-ported Inception-v3 from a local file; the "
        "TF-compatible bilinear resize (antialias off) unless --antialias. The reference's "
        "statistics are cached with their settings; ADM reference batches (.npz with mu and "
        "sigma) are read as statistics. Under torchrun each rank reads its share of the "
        "images and the statistics are summed across ranks.")
    p.add_argument("samples", metavar="SAMPLES", help="a folder of images or an .npz (arr_0 "
                   "uint8 NHWC)")
    p.add_argument("reference", metavar="REF", help="the same kinds, or an .npz of mu/sigma")
    p.add_argument("--inception-weights", metavar="PATH", help="weights-inception-2015-12-05-"
                   "6726825d.pth (default $PTDIT_INCEPTION_WEIGHTS)")
    p.add_argument("--antialias", action="store_true", help="antialiased resize (torchmetrics' "
                   "default since 1.8; not comparable with TF/ADM figures)")
    p.add_argument("--batch-size", type=int, default=50, metavar="B")
    p.add_argument("--cache-dir", metavar="DIR", help="where reference statistics are cached "
                   "(default: beside the reference)")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser(
        "clip-score", parents=[common], allow_abbrev=False, help="CLIP score of samples against "
        "their captions "
        "(clip-anytorch, local weights)",
        description="The mean over image–caption pairs of 100·max(cos, 0) between CLIP's image "
        "and text embeddings (clip-anytorch, a local OpenAI checkpoint); captions over 77 "
        "tokens are truncated and counted.")
    p.add_argument("samples", metavar="SAMPLES", help="a folder of images or an .npz")
    p.add_argument("captions", metavar="CAPTIONS", help="a text file, one caption per line in "
                   "the samples' sorted file-name order, or a CSV (file,caption) / JSON "
                   "{file: caption} mapping")
    p.add_argument("--clip-weights", metavar="PATH", help="e.g. ViT-L-14.pt (default "
                   "$PTDIT_CLIP_WEIGHTS)")
    p.add_argument("--batch-size", type=int, default=64, metavar="B")
    p.set_defaults(func=cmd_clip_score)


def _attention_parser(sub) -> None:
    p = sub.add_parser(
        "attention", help="how alike the attention rows of tokens in one window are, along a "
        "real sampling trajectory or on noised real images (the redundancy PT-DiT rests on)",
        description="Runs the family's sampler (analysis.sampling.denoise) from seeded noise — "
        "or noises real images (--images) to the timesteps it visits — and, at the analysed "
        "steps, reduces every self-attention map on the fly (DiT / PixArt: token "
        "self-attention; PT-DiT: proxy self-attention) to window statistics: within-window "
        "cosine, Jensen–Shannon divergence, mean-row replacement error and its A·V output "
        "error, each beside a random-pair baseline (absolute redundancy: what one proxy per "
        "window assumes) and a position-matched baseline (window-specific structure: pairs at "
        "the same offset and edge distances in other windows), and cosine vs distance — per "
        "window size, layer, head, step and guidance branch. Writes OUT/attention.jsonl "
        "(rows), figures, and OUT/maps.npz (the maps of Figure 3), and prints a summary per "
        "analysed step. Without --checkpoint the weights are random (seeded by --init-seed), "
        "and the output says so.")
    p.add_argument("--model", required=True, metavar="NAME")
    p.add_argument("--checkpoint", metavar="PATH", help="real weights (ptdit.load: facebook "
                   "DiT, PixArt-α, diffusers, official PT-DiT)")
    p.add_argument("--resolution", type=int, required=True, metavar="PX")
    p.add_argument("--frames", type=int, metavar="F", help="latent frames (video models)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder; one that "
                   "already holds an analysis is refused unless --force")
    p.add_argument("--force", action="store_true", help="replace the analysis already in "
                   "--out (once the new one has finished)")
    p.add_argument("--images", metavar="PATH", help="analyse real images instead of the "
                   "sampler's trajectory: a folder of images or an .npz (arr_0 uint8 NHWC); "
                   "the first --samples are resized (shorter side), centre-cropped, encoded "
                   "by --vae (or fed in pixel space to a 3-channel model) and noised to the "
                   "sampler's timesteps")
    p.add_argument("--vae", metavar="DIR", help="with --images: a diffusers AutoencoderKL "
                   "folder that encodes them")
    p.add_argument("--class-labels", metavar="SPEC", help='class models (default "0")')
    p.add_argument("--prompt-embeddings", metavar="FILE", help="text models: T5 features "
                   "(`embeddings`, `mask`; `null_embedding` for PT-DiT guidance)")
    p.add_argument("--steps", type=int, nargs="+", metavar="I", help="denoising steps to "
                   "analyse, 0 = the first (pure noise); default: the first, middle and last")
    p.add_argument("--sampler-steps", type=int, default=25, metavar="N",
                   help="steps of the sampling run (default 25)")
    p.add_argument("--scheduler", choices=("ddpm", "dpm", "flow"), help="default: the family's")
    p.add_argument("--cfg-scale", type=float, metavar="S", help="guidance scale (1: no "
                   "guidance branch; default: the family's)")
    p.add_argument("--window", type=int, nargs="+", metavar="W", help="window sides in tokens "
                   "(default 2 4 8 16; those that do not tile the grid are skipped)")
    p.add_argument("--edge-margin", type=int, metavar="N", help="tokens from a grid edge "
                   "beyond which the position-matched baseline counts a pair as far from it "
                   "(default: a quarter of each grid side)")
    p.add_argument("--layers", type=int, nargs="+", metavar="I", help="default: all")
    p.add_argument("--heads", type=int, nargs="+", metavar="I", help="default: all")
    p.add_argument("--samples", type=int, default=1, metavar="N", help="trajectories (seeded "
                   "by index, as ptdit sample) or images, pooled per branch (default 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    p.add_argument("--init-seed", type=int, metavar="S", help="seed of the random weights "
                   "without --checkpoint (default: --seed); recorded in every row")
    p.add_argument("--headwise", action="store_true", help="recompute the maps one head at a "
                   "time (least memory: for large resolutions)")
    p.add_argument("--max-pairs", type=int, default=2048, metavar="N", help="token pairs per "
                   "statistic above which pairs are sampled (seeded; default 2048)")
    p.add_argument("--override", nargs="+", type=_override, action="extend", default=[],
                   metavar="FIELD=VALUE", help="config fields of a random-weight model")
    p.set_defaults(func=cmd_attention)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:   # bad input, or a path that cannot be read or written
        print(f"ptdit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:   # Ctrl-C: a message, not a traceback (sample and sweep say more)
        print(f"ptdit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
