"""analysis's subcommands of `ptdit`: sample, fid, clip-score, attention. Each is an
`add_X(subparsers)` beside a `run_X(args)` that makes one call into analysis.commands and
prints what it returns; the flags are ptdit.cli's shared definitions."""

import argparse
import sys

from ptdit.cli import add, deprecated, finite_float, positive_int, resolution


def register(sub) -> None:
    """The entry point of the `ptdit.commands` group."""
    for add_command in (add_sample, add_fid, add_clip_score, add_attention, add_train,
                        add_study, add_digits_classifier):
        add_command(sub)


def _print_row(row: dict, store=None) -> None:
    width = max(map(len, row))
    for name, value in row.items():
        print(f"{name:<{width}}  {value}")
    if store is not None:
        print(f"{'(stored in)':<{width}}  {store}")


class _RenamedFlag(argparse.Action):
    """A flag that was renamed and cannot stay as an alias: a one-line error naming the new
    flag and why."""

    def __init__(self, option_strings, dest, new: str, why: str, **kwargs):
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)
        self.new, self.why = new, why

    def __call__(self, parser, namespace, values, option_string=None):
        parser.exit(2, f"{parser.prog}: error: {option_string} was renamed {self.new}: "
                    f"{self.why}\n")


TORCHRUN_CLASH = ("torchrun reads the options after the script too, and takes {old} as an "
                  "ambiguous prefix of its own {theirs}")


#################################################################################
#                                     sample                                    #
#################################################################################

def add_sample(sub) -> None:
    p = sub.add_parser(
        "sample", help="generate images (or video frames) with a real scheduler and VAE, "
        "resumable, sharded under torchrun",
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
    add(p, "--model", "required without --checkpoint; with one, the file must hold its layers "
        "(a file ptdit wrote names its model itself)", required=False)
    add(p, "--checkpoint")
    add(p, "--vae", "that decodes the latents (default $PTDIT_VAE)")
    p.add_argument("--resolution", required=True, nargs="+", type=resolution, metavar="PX|HxW",
                   help="image size in pixels: a side (256) or HxW (256x512); latent = "
                   "pixels / 8 (the older two-number form H W still works, with a warning)")
    add(p, "--frames")
    for flag in ("--class-labels", "--prompt-embeddings", "--prompts", "--t5"):
        add(p, flag)
    add(p, "--num-samples", "samples to make (required)")
    p.add_argument("--first-index", type=int, default=0, metavar="I",
                   help="index of the first sample (default 0)")
    p.add_argument("--num", action=_RenamedFlag, new="--num-samples",
                   why=TORCHRUN_CLASH.format(old="--num", theirs="--numa-binding"))
    p.add_argument("--start", action=_RenamedFlag, new="--first-index",
                   why=TORCHRUN_CLASH.format(old="--start", theirs="--start-method"))
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    add(p, "--scheduler")
    add(p, "--sampler-steps", "default: the scheduler's release: ddpm 250, dpm 20, flow 30")
    add(p, "--cfg-scale")
    deprecated(p, "--steps", "--sampler-steps", type=positive_int)
    p.add_argument("--guidance-channels", choices=("3", "all"), help="3: DiT's official "
                   "guidance of the first 3 latent channels; all: every channel")
    add(p, "--seed", "sample i's noise comes from (seed, i)")
    add(p, "--init-seed")
    add(p, "--batch-size", "samples per forward (twice the rows when guided; default 16)",
        default=16)
    add(p, "--device")
    add(p, "--dtype")
    p.add_argument("--npz", action="store_true", help="also write OUT/samples.npz (arr_0 "
                   "uint8 NHWC, ADM's format) at the end")
    add(p, "--store", "where the run's row goes (default OUT/samples.jsonl)")
    add(p, "--override", "of a random-weight model")
    p.set_defaults(run=run_sample)


def run_sample(args: argparse.Namespace) -> int:
    from .commands import sample

    if args.num_samples is None:
        raise ValueError("--num-samples is required: how many samples to make")
    size = args.resolution[0]
    if len(args.resolution) == 2 and all(isinstance(r, int) for r in args.resolution):
        print("ptdit sample: warning: --resolution H W is deprecated and goes in the next "
              "release; use --resolution HxW", file=sys.stderr)
        size = tuple(args.resolution)
    elif len(args.resolution) != 1:
        raise ValueError(f"--resolution takes one size, PX or HxW; got {len(args.resolution)}")
    try:
        row = sample(model=args.model, checkpoint=args.checkpoint, overrides=args.override,
                     seed=args.seed, init_seed=args.init_seed, vae=args.vae, resolution=size,
                     frames=args.frames, class_labels=args.class_labels,
                     prompt_embeddings=args.prompt_embeddings, prompts=args.prompts,
                     t5=args.t5, num_samples=args.num_samples, first_index=args.first_index,
                     out=args.out, scheduler=args.scheduler, sampler_steps=args.sampler_steps,
                     cfg_scale=args.cfg_scale, guidance_channels=args.guidance_channels,
                     batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                     npz=args.npz, store=args.store)
    except KeyboardInterrupt:
        print(f"ptdit sample: interrupted; the finished PNGs are kept in {args.out}: run "
              "the same command again to resume", file=sys.stderr)
        return 130
    if row is None:                          # under torchrun, rank 0 reports for all
        return 0
    _print_row(row)
    return 0 if row["status"] == "ok" else 1


#################################################################################
#                                fid, clip-score                                #
#################################################################################

def _metric_flags(p, batch: int) -> None:
    add(p, "--device")
    add(p, "--store", "where the row goes (default SAMPLES/metrics.jsonl, or "
        "SAMPLES.metrics.jsonl beside an .npz)")
    add(p, "--batch-size", f"images per forward (default {batch})", default=batch)


def add_fid(sub) -> None:
    p = sub.add_parser(
        "fid", help="FID of a folder / .npz of samples against a reference (torchmetrics, "
        "torch-fidelity's Inception from a local file)",
        description="FID with torchmetrics' FrechetInceptionDistance (2048-d pool features, "
        "float64 statistics) on torch-fidelity's TF-ported Inception-v3 from a local file; the "
        "TF-compatible bilinear resize (antialias off) unless --antialias. The reference's "
        "statistics are cached with their settings and a fingerprint of its contents; ADM "
        "reference batches (.npz with mu and sigma) are read as statistics. Under torchrun "
        "each rank reads its share of the images and the statistics are summed across ranks.")
    p.add_argument("samples", metavar="SAMPLES", help="a folder of images or an .npz (arr_0 "
                   "uint8 NHWC)")
    p.add_argument("reference", metavar="REF", help="the same kinds, or an .npz of mu/sigma")
    p.add_argument("--inception-weights", metavar="PATH", help="weights-inception-2015-12-05-"
                   "6726825d.pth (default $PTDIT_INCEPTION_WEIGHTS)")
    p.add_argument("--antialias", action="store_true", help="antialiased resize (torchmetrics' "
                   "default since 1.8; not comparable with TF/ADM figures)")
    p.add_argument("--cache-dir", metavar="DIR", help="where reference statistics are cached "
                   "(default: beside the reference)")
    _metric_flags(p, 50)
    p.set_defaults(run=run_fid)


def run_fid(args: argparse.Namespace) -> int:
    from .commands import fid

    done = fid(samples=args.samples, reference=args.reference,
               inception_weights=args.inception_weights, antialias=args.antialias,
               batch_size=args.batch_size, cache_dir=args.cache_dir, device=args.device,
               store=args.store)
    if done is not None:
        _print_row(*done)
    return 0


def add_clip_score(sub) -> None:
    p = sub.add_parser(
        "clip-score", help="CLIP score of samples against their captions (clip-anytorch, "
        "local weights)",
        description="The mean over image–caption pairs of 100·max(cos, 0) between CLIP's image "
        "and text embeddings (clip-anytorch, a local OpenAI checkpoint); captions over 77 "
        "tokens are truncated and counted.")
    p.add_argument("samples", metavar="SAMPLES", help="a folder of images or an .npz")
    p.add_argument("captions", metavar="CAPTIONS", help="a text file, one caption per line in "
                   "the samples' sorted file-name order, or a CSV (file,caption) / JSON "
                   "{file: caption} mapping")
    p.add_argument("--clip-weights", metavar="PATH", help="e.g. ViT-L-14.pt (default "
                   "$PTDIT_CLIP_WEIGHTS)")
    _metric_flags(p, 64)
    p.set_defaults(run=run_clip_score)


def run_clip_score(args: argparse.Namespace) -> int:
    from .commands import clip_score

    done = clip_score(samples=args.samples, captions=args.captions,
                      clip_weights=args.clip_weights, batch_size=args.batch_size,
                      device=args.device, store=args.store)
    if done is not None:
        _print_row(*done)
    return 0


#################################################################################
#                                   attention                                   #
#################################################################################

def add_attention(sub) -> None:
    p = sub.add_parser(
        "attention", help="how alike the attention rows of tokens in one window are, along a "
        "real sampling trajectory or on noised real images (the redundancy PT-DiT rests on)",
        description="Runs the family's sampler from seeded noise — or noises real images "
        "(--images) to the timesteps it visits — and, at the analysed steps, reduces every "
        "self-attention map on the fly (DiT / PixArt: token self-attention; PT-DiT: proxy "
        "self-attention) to window statistics: within-window cosine, Jensen–Shannon "
        "divergence, mean-row replacement error and its A·V output error, each beside a "
        "random-pair baseline (absolute redundancy: what one proxy per window assumes) and a "
        "position-matched baseline (window-specific structure: pairs at the same offset and "
        "edge distances in other windows), and cosine vs distance — per window size, layer, "
        "head, step and guidance branch. Writes OUT/attention.jsonl (rows), figures, and "
        "OUT/maps.npz (the maps of Figure 3), and prints a summary per analysed step. Without "
        "--checkpoint the weights are random (seeded by --init-seed), and the output says so. "
        "Exit status: 1 when some row is not ok (maps that held NaN or Inf).")
    add(p, "--model", "required without --checkpoint; with one, the file must hold its layers "
        "(a file ptdit wrote names its model itself)", required=False)
    add(p, "--checkpoint")
    add(p, "--resolution", "the analysis takes square images")
    add(p, "--frames")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder; one that "
                   "already holds an analysis is refused unless --force")
    p.add_argument("--force", action="store_true", help="replace what is at the destination "
                   "(the analysis already in --out, once the new one has finished)")
    p.add_argument("--images", metavar="PATH", help="analyse real images instead of the "
                   "sampler's trajectory: a folder of images or an .npz (arr_0 uint8 NHWC); "
                   "the first --num-samples are resized (shorter side), centre-cropped, "
                   "encoded by --vae (or fed in pixel space to a 3-channel model) and noised "
                   "to the sampler's timesteps")
    add(p, "--vae", "that encodes the --images")
    add(p, "--class-labels", 'default "0"')
    add(p, "--prompt-embeddings")
    p.add_argument("--analyse-steps", type=int, nargs="+", metavar="I", help="sampler steps "
                   "to analyse, 0 = the first (pure noise); default: the first, middle and last")
    deprecated(p, "--steps", "--analyse-steps", type=int, nargs="+")
    add(p, "--scheduler")
    add(p, "--sampler-steps", "of the sampling run (default 25)", default=25)
    add(p, "--cfg-scale")
    p.add_argument("--window-sides", type=positive_int, nargs="+", metavar="W",
                   help="analysis window sides in tokens (default 2 4 8 16; those that do not "
                   "tile the grid are skipped)")
    deprecated(p, "--window", "--window-sides", type=positive_int, nargs="+")
    p.add_argument("--edge-margin", type=positive_int, metavar="N", help="tokens from a grid "
                   "edge beyond which the position-matched baseline counts a pair as far "
                   "from it (default: a quarter of each grid side)")
    p.add_argument("--layers", type=int, nargs="+", metavar="I", help="default: all")
    p.add_argument("--heads", type=int, nargs="+", metavar="I", help="default: all")
    add(p, "--num-samples", "trajectories (seeded by index, as ptdit sample) or images, "
        "pooled per branch (default 1)", default=1)
    deprecated(p, "--samples", "--num-samples", type=positive_int)
    add(p, "--seed")
    add(p, "--init-seed")
    p.add_argument("--headwise", action="store_true", help="recompute the maps one head at a "
                   "time (least memory: for large resolutions)")
    p.add_argument("--max-pairs", type=positive_int, default=2048, metavar="N", help="token "
                   "pairs per statistic above which pairs are sampled (seeded; default 2048)")
    add(p, "--override", "of a random-weight model")
    p.set_defaults(run=run_attention)


def run_attention(args: argparse.Namespace) -> int:
    from .commands import attention

    result = attention(
        model=args.model, checkpoint=args.checkpoint, overrides=args.override, seed=args.seed,
        init_seed=args.init_seed, resolution=args.resolution, frames=args.frames, out=args.out,
        images=args.images, vae=args.vae, class_labels=args.class_labels,
        prompt_embeddings=args.prompt_embeddings, sampler_steps=args.sampler_steps,
        analyse_steps=args.analyse_steps, scheduler=args.scheduler, cfg_scale=args.cfg_scale,
        window_sides=args.window_sides, edge_margin=args.edge_margin, layers=args.layers,
        heads=args.heads, num_samples=args.num_samples, headwise=args.headwise,
        max_pairs=args.max_pairs, force=args.force)
    print(result.text())
    return 0 if all(row["status"] == "ok" for row in result.rows) else 1


#################################################################################
#                        train, study, digits-classifier                        #
#################################################################################

def add_train(sub) -> None:
    p = sub.add_parser(
        "train", help="train any model on real bundled data (digits, photos), an image folder "
        "or an .npz; resumable, under torchrun data-parallel",
        description="Trains NAME (with --override fields) on --data into OUT: the family's "
        "objective (DiT and PixArt-α: IDDPM's learned-variance hybrid loss; PT-DiT: rectified "
        "flow; --objective picks another) in pixel space (in_channels = the images' channels), "
        "or on --vae latents. AdamW with warm-up, gradient clipping, EMA, class/caption "
        "dropout for guidance, random horizontal flips. OUT gets checkpoint.pt (every "
        "--checkpoint-every steps, at the end and on Ctrl-C / SIGTERM: the same command "
        "resumes exactly), ema.safetensors (the EMA weights, ptdit.load / ptdit sample "
        "--checkpoint read it; ema.training.json says how it was trained), run.json and "
        "train.jsonl (loss, images/s, TFLOP/s, TFLOP spent). An OUT holding another run is "
        "refused. Exit status: 0 done, 2 bad input, 130 interrupted (checkpoint written).")
    add(p, "--model")
    p.add_argument("--data", required=True, metavar="NAME|PATH", help="digits (UCI "
                   "handwritten digits from scikit-learn's files: 10 classes, grey), photos "
                   "(random crops of the photographs bundled with scikit-learn, scikit-image "
                   "and matplotlib), a folder of images (subfolders as classes) or an .npz")
    add(p, "--resolution", "the training images' side (square); the pixels themselves "
        "without --vae")
    p.add_argument("--out", required=True, metavar="DIR", help="the run's folder")
    how_long = p.add_mutually_exclusive_group(required=True)
    how_long.add_argument("--train-steps", type=positive_int, metavar="N",
                          help="optimizer steps")
    how_long.add_argument("--budget-tflop", type=finite_float, metavar="T", help="closed-form "
                          "training TFLOP (3 × forward FLOPs × batch per step)")
    how_long.add_argument("--budget-seconds", type=finite_float, metavar="S", help="training "
                          "time on this machine (checkpoint writing excluded)")
    add(p, "--batch-size", "global images per optimizer step (default 64)", default=64)
    p.add_argument("--grad-accum", type=positive_int, default=1, metavar="K",
                   help="micro-batches per step (default 1)")
    p.add_argument("--lr", type=finite_float, default=1e-4, help="AdamW learning rate "
                   "(default 1e-4, DiT's)")
    p.add_argument("--warmup-steps", type=int, default=0, metavar="N",
                   help="linear warm-up steps (default 0)")
    p.add_argument("--weight-decay", type=finite_float, default=0.0, metavar="W",
                   help="AdamW weight decay (default 0, DiT's)")
    p.add_argument("--grad-clip", type=finite_float, default=1.0, metavar="N",
                   help="max gradient norm (default 1.0)")
    p.add_argument("--ema-decay", type=finite_float, default=0.9999, metavar="D",
                   help="EMA decay (default 0.9999, DiT's)")
    add(p, "--seed", "of the weights, the data order and every draw")
    add(p, "--dtype", "bfloat16: autocast over float32 master weights",
        choices=("float32", "bfloat16"))
    p.add_argument("--objective", choices=("iddpm", "flow"), help="default: the family's")
    p.add_argument("--cond-dropout", type=finite_float, default=0.1, metavar="P",
                   help="probability of the null class / caption (default 0.1)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="no random horizontal flips")
    p.add_argument("--checkpoint-every", type=positive_int, default=500, metavar="N")
    p.add_argument("--log-every", type=positive_int, default=10, metavar="N")
    p.add_argument("--compile", action="store_true", help="torch.compile each block")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each block in the backward pass")
    add(p, "--vae", "train on its latents (default: pixel space)")
    add(p, "--device")
    add(p, "--override", "config fields of the model")
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from .commands import train
    from .training.harness import TrainingInterrupted

    try:
        row = train(model=args.model, data=args.data, resolution=args.resolution,
                    out=args.out, overrides=args.override, vae=args.vae,
                    train_steps=args.train_steps, budget_tflop=args.budget_tflop,
                    budget_seconds=args.budget_seconds, batch_size=args.batch_size,
                    grad_accum=args.grad_accum, lr=args.lr, warmup_steps=args.warmup_steps,
                    weight_decay=args.weight_decay, grad_clip=args.grad_clip,
                    ema_decay=args.ema_decay, seed=args.seed, dtype=args.dtype,
                    objective=args.objective, cond_dropout=args.cond_dropout, flip=args.flip,
                    checkpoint_every=args.checkpoint_every, log_every=args.log_every,
                    compile=args.compile, grad_checkpointing=args.grad_checkpointing,
                    device=args.device)
    except TrainingInterrupted as stop:
        print(f"ptdit train: {stop}", file=sys.stderr)
        return 130
    keep = ("model", "step", "loss", "tflop_spent", "train_s", "images_per_s", "objective",
            "space", "status", "out")
    _print_row({k: row.get(k) for k in keep})
    return 0 if row["status"] == "ok" else 1


def add_study(sub) -> None:
    p = sub.add_parser(
        "study", help="the equal-compute study: architectures trained on the same data for "
        "the same FLOPs and the same time, sampled, scored and analysed",
        description="Runs a study file (TOML; analysis/studies/digits.toml is the shipped "
        "one): each [[arm]] trained on the same data (a) for the same closed-form training "
        "TFLOP, evaluated along the way, and (b) for the same wall-clock time; each "
        "evaluation samples the EMA weights and scores them with the Fréchet distance in a "
        "digits classifier's features (fd_digits_classifier, beside its floor) and the "
        "samples' class accuracy; the forward latency of each architecture; window "
        "similarity of each arm's trained and untrained weights. Resumable: rerun the same "
        "command and finished work is kept. Writes OUT/study.jsonl, study.md, study.csv, "
        "attention.csv, attention_layers.csv and figures.")
    p.add_argument("file", metavar="FILE.toml", help="the study file")
    p.add_argument("--out", required=True, metavar="DIR", help="the study's folder")
    p.add_argument("--smoke", action="store_true", help="the same study shrunk to run in a "
                   "minute or two (tiny layers, a few steps): checks the machinery; its "
                   "numbers mean nothing")
    p.set_defaults(run=run_study)


def run_study(args: argparse.Namespace) -> int:
    from .commands import study

    written = study(file=args.file, out=args.out, smoke=args.smoke)
    for name, path in written.items():
        print(f"{name:<24}  {path}")
    return 0


def add_digits_classifier(sub) -> None:
    p = sub.add_parser(
        "digits-classifier", help="train and cache the digits classifier whose features the "
        "digits Fréchet distance uses",
        description="Trains a small CNN on the digits train split (deterministic, seconds on a "
        "CPU), reports its held-out accuracy and caches its weights ($PTDIT_CACHE or "
        "~/.cache/ptdit); fd_digits_classifier makes it on first use if missing.")
    p.add_argument("--size", type=positive_int, default=32, metavar="PX",
                   help="the classifier's input side in pixels (default 32, at least 16)")
    p.add_argument("--cache-dir", metavar="DIR", help="default $PTDIT_CACHE or ~/.cache/ptdit")
    p.set_defaults(run=run_digits_classifier)


def run_digits_classifier(args: argparse.Namespace) -> int:
    from .commands import digits_classifier

    _print_row(digits_classifier(size=args.size, cache_dir=args.cache_dir))
    return 0
