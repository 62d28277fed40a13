"""The `ptdit` command: this dispatcher, `ptdit convert`, and the definitions of the flags the
subcommands share, so that a flag means one thing everywhere. The other subcommands live with
what they run — `bench/cli.py` (models, flops, reproduce, bench, sweep, report) and
`analysis/cli.py` (sample, fid, clip-score, attention) — and are found through the
`ptdit.commands` entry-point group of the installed distribution (pyproject.toml), so this
package imports neither. Each registers `add_X(subparsers)` beside a `run_X(args)` that makes
one call into its package's library; `ptdit --help` lists them all.
"""

import argparse
import math
import sys
from importlib.metadata import entry_points

from ptdit.checks import DTYPES
from ptdit.workload import DEFAULT_TEXT_TOKENS

COMMANDS_GROUP = "ptdit.commands"
ORDER = ("bench", "analysis")                  # registration order: the order of --help
FORMATS = ("table", "csv", "json", "markdown")


#################################################################################
#                        Value grammars of the shared flags                     #
#################################################################################

def resolution(text: str) -> int | tuple[int, int]:
    """PX (a square side) or HxW, in pixels: '256' -> 256, '256x512' -> (256, 512)."""
    parts = text.lower().split("x")
    if len(parts) in (1, 2) and all(p.isdigit() and int(p) > 0 for p in parts):
        values = tuple(int(p) for p in parts)
        return values[0] if len(values) == 1 or values[0] == values[1] else values
    raise argparse.ArgumentTypeError(f"{text!r} is not a resolution; allowed: PX (a square "
                                     "side in pixels, e.g. 256) or HxW (e.g. 256x512)")


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_int(text: str) -> int:
    if not text.lstrip("+").isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer (1, 2, …)")
    return int(text)


def override(text: str) -> tuple[str, object]:
    """FIELD=VALUE, the value in TOML syntax (2, 0.5, true, "x"); a bare word is a string."""
    import tomllib

    field, sep, value = text.partition("=")
    if not sep or not field.strip():
        raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, e.g. depth=2; got {text!r}")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    if isinstance(parsed, float) and not math.isfinite(parsed):
        raise argparse.ArgumentTypeError(f"{text!r}: {field.strip()} must be finite")
    return field.strip(), parsed


#################################################################################
#                    Shared flags: one definition, one meaning each             #
#################################################################################

SHARED = {
    "--model": dict(required=True, metavar="NAME", help="registry name: {models}"),
    "--resolution": dict(required=True, type=resolution, metavar="PX|HxW", help="image size "
                         "in pixels: a side (256) or HxW (256x512); latent = pixels / 8"),
    "--frames": dict(type=positive_int, metavar="F", help="LATENT frames of video latents "
                     "(B, 4, F, H, W); omit for images"),
    "--batch-size": dict(type=positive_int, default=1, metavar="B", help="batch size"),
    "--window": dict(nargs=3, type=positive_int, metavar=("F", "H", "W"),
                     help="a PT-DiT's window in tokens (frames, rows, cols)"),
    "--text-tokens": dict(type=positive_int, default=DEFAULT_TEXT_TOKENS, metavar="L",
                          help="T5 caption tokens (width 4096) of text models (default "
                          f"{DEFAULT_TEXT_TOKENS}, the papers')"),
    "--format": dict(choices=FORMATS, default="table", help="how rows are printed (default "
                     "table)"),
    "--store": dict(metavar="STORE.jsonl", help="a JSONL results store"),
    "--override": dict(nargs="+", type=override, action="extend", default=[],
                       metavar="FIELD=VALUE", help="config fields, values in TOML syntax "
                       "(e.g. depth=2 hidden_size=64)"),
    "--dtype": dict(choices=tuple(DTYPES), default="float32", metavar="DTYPE",
                    help="element type (default float32)"),
    "--device": dict(default="cpu", help="cpu (default), cuda (the current GPU; under "
                     "torchrun LOCAL_RANK's) or cuda:N; cuda without a GPU is an error"),
    "--threads": dict(type=positive_int, metavar="N", help="CPU intra-op threads (default: "
                      "torch's, one per core), recorded in each row's device"),
    "--checkpoint": dict(metavar="PATH", help="weights in any format ptdit.load reads; "
                         "default: random weights, recorded as 'untrained'"),
    "--seed": dict(type=int, default=0, help="the noise seed (default 0)"),
    "--init-seed": dict(type=int, metavar="S", help="seed of the random weights without "
                        "--checkpoint (default: --seed); recorded in every row"),
    "--scheduler": dict(choices=("ddpm", "dpm", "flow"), help="default: the family's"),
    "--sampler-steps": dict(type=positive_int, metavar="N", help="sampler steps"),
    "--cfg-scale": dict(type=finite_float, metavar="S", help="guidance scale (1: unguided; "
                        "default: the family's)"),
    "--num-samples": dict(type=positive_int, metavar="N", help="how many samples"),
    "--class-labels": dict(metavar="SPEC", help='class models: "1,2,3", "0-999", "0,5-9" or '
                           "a file of one label per line; sample i takes label i mod N"),
    "--prompt-embeddings": dict(metavar="FILE", help="text models: .safetensors/.pt with "
                                "`embeddings` (N, L, C), `mask` (N, L) and optionally "
                                "`null_embedding` T5 features"),
    "--prompts": dict(metavar="FILE", help="text models: one prompt a line, encoded by --t5"),
    "--t5": dict(metavar="DIR", help="a local T5EncoderModel folder with its tokenizer "
                 "(default $PTDIT_T5)"),
    "--vae": dict(metavar="DIR", help="a local diffusers AutoencoderKL folder"),
}


def add(p, flag: str, help: str | None = None, many: bool = False, **changes) -> None:
    """Adds shared `flag` to parser `p`: its one definition (SHARED), `help` appended,
    `many` values (nargs '+'), other argparse fields changed (a default, say)."""
    spec = {**SHARED[flag], **changes}
    if many:
        spec["nargs"] = "+"
        if "default" in spec and "default" not in changes and spec.get("action") != "extend":
            spec["default"] = [spec["default"]]
    if "{models}" in spec["help"]:
        from ptdit.configs import list_models
        spec["help"] = spec["help"].format(models=", ".join(list_models()))
    spec["help"] += f"; {help}" if help else ""
    p.add_argument(flag, **spec)


class Deprecated(argparse.Action):
    """An old spelling that still works for one release: stores into the new flag's dest and
    warns on stderr, naming the new spelling."""

    def __init__(self, option_strings, dest, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated and goes in the next "
              f"release; use {self.new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def deprecated(p, old: str, new: str, **kwargs) -> None:
    """Keeps `old` working as `new` (same dest) with a warning."""
    dest = new.lstrip("-").replace("-", "_")
    p.add_argument(old, dest=dest, action=Deprecated, new=new, **kwargs)


#################################################################################
#                                   convert                                     #
#################################################################################

def add_convert(sub) -> None:
    p = sub.add_parser("convert", help="convert a checkpoint (facebook DiT .pt, diffusers "
                       "folder, official PixArt-alpha .pth, official PT-DiT, ptdit) to "
                       "safetensors")
    p.add_argument("src", help="checkpoint file or diffusers folder")
    p.add_argument("dst", help="a .safetensors file (--to ptdit/official) or a folder "
                   "(--to diffusers); official PT-DiT also writes DST's .json predictor config")
    p.add_argument("--to", required=True, choices=("ptdit", "diffusers", "official"),
                   help="ptdit: our format (config in the metadata); official: the release's "
                   "layout (facebook DiT, PixArt .pth keys, PT-DiT PTDiTDiffuser)")
    p.add_argument("--source-format", default="auto", metavar="NAME",
                   help="the source's format: auto (recognised from keys/config, the default) "
                   "or a format name")
    deprecated(p, "--format", "--source-format")
    p.add_argument("--name", help="registry model name the checkpoint must match; it also "
                   "gives what SRC cannot say (the head count, ...)")
    add(p, "--dtype", "convert to it (default: keep the source's)", default=None)
    p.add_argument("--config", help="the source's config JSON (official PT-DiT predictor); "
                   "default: SRC's .json sidecar, else inferred from shapes")
    add(p, "--window", "the converted model's; the weights do not depend on it. --to official "
        "needs one for a PT-DiT without (every registry PT-DiT but Qihoo-T2I-1B)")
    p.add_argument("--force", action="store_true", help="replace what is at the destination")
    p.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from ptdit.interop.convert import convert

    print(convert(args.src, args.dst, args.to, source_format=args.source_format,
                  name=args.name, dtype=args.dtype, config=args.config, window=args.window,
                  force=args.force))
    return 0


#################################################################################
#                                  Dispatcher                                   #
#################################################################################

class Parser(argparse.ArgumentParser):
    """Every ptdit parser: no abbreviated flags (torchrun's own options shadow some prefixes,
    and a prefix should never silently stand for a flag), and bad arguments are one line on
    stderr (exit status 2) that names the command and points at its --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _registrations() -> list:
    """The `register(subparsers)` functions of the installed packages' commands."""
    found = {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}
    if not found:
        raise SystemExit(f"ptdit: no subcommands are registered (entry-point group "
                         f"{COMMANDS_GROUP!r}): install the project, e.g. `pip install -e .`")
    names = [n for n in ORDER if n in found] + sorted(set(found) - set(ORDER))
    return [found[name].load() for name in names]


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ptdit", description="PT-DiT, DiT and PixArt-α in one codebase: models, exact "
        "cost, runtime, sampling and quality metrics, attention analysis.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                parser_class=Parser)
    add_convert(sub)
    for register in _registrations():
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs `ptdit ARGV`; returns the exit status (also for bad arguments and --help)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as stop:          # --help, or bad arguments (already printed)
        return stop.code if isinstance(stop.code, int) else 2
    try:
        return args.run(args)
    except (ValueError, OSError) as err:   # bad input, or a path that cannot be read or written
        print(f"ptdit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ptdit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
