"""The equal-compute study: DiT, PixArt-α and PT-DiT (and PT-DiT's ablations) at the same
width, depth, heads and patch, trained on the same real data (analysis.training.datasets) with the
suite's own harness (analysis.training.harness) (a) for the same closed-form training FLOPs and
(b) for the
same wall-clock time, then sampled, scored (analysis.metrics.digits: the Fréchet distance in a
digits classifier's features, never called FID) and timed; the final weights of each arm are
analysed for window similarity next to their untrained initialisation.

    study = load("bench/studies/digits.toml")
    rows = run(study, "results/study")            # resumable: finished evaluations are kept

A study file (TOML) holds:
- `dataset`, `size` (pixels per side), `seed`: the data and the seed of every run;
- `[model]`: the config fields every arm shares (depth, hidden_size, num_heads, patch_size);
- `[train]`: analysis.training.harness.TrainOptions fields every run shares (batch_size, lr, ...);
- `[regimes]`: `tflop` (a: the training budget of every arm), `seconds` (b: the wall-clock
  budget of every arm), `evaluations` (evaluation points along regime a, evenly spaced in FLOPs;
  regime b is evaluated at its end);
- `[evaluate]`: `samples` (per evaluation, class i % classes), `sampler_steps`, `cfg_scale`,
  `latency_repeats`;
- `[attention]`: `sampler_steps`, `analyse_steps`, `window_sides` of the window-similarity
  analysis of each arm's final regime-a weights and of its untrained initialisation;
- `[[arm]]`: `name`, `model` (a registry name), `overrides` (config fields of this arm only),
  `objective` (default: the family's);
- `[photos]` (optional): one more model (`arm`: whose architecture), trained for `steps` on
  crops of the bundled photographs, analysed for window similarity only (no classifier there).

Rows (bench.store table "study", `study.jsonl` in the output folder): one per evaluation
(`kind` "evaluation": arm, regime, step, training TFLOP and wall seconds so far, the loss, fd,
its floor, sample accuracy, forward latency) and one per attention summary (`kind`
"attention": arm, weights trained/untrained, evaluation point, window, metric, analysed step
and layer, the value within windows and its two baselines). A rerun skips what the store
already holds and resumes unfinished training.
"""

import dataclasses
import math
import os
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import ptdit
from bench.latency import Case, measure
from bench.rows import provenance
from bench.store import Store, check_writable_folder
from ptdit.attention import attention_modules

from ..attention_run import run as analyse_attention
from ..conditions import class_conditions, prompt_embeddings, text_tokens
from ..metrics.digits import fd_digits
from ..sampling import PixelSpace, sample
from .datasets import load as load_data
from .harness import EMA_FILE, TrainOptions, checkpoint_info, train
from .study_report import STUDY_ROWS

TOP = ("dataset", "size", "seed", "model", "train", "regimes", "evaluate", "attention", "arm",
       "photos", "name")
REGIMES = ("flops", "time")


#################################################################################
#                                The study file                                 #
#################################################################################

@dataclass(frozen=True)
class Arm:
    """One architecture of the study."""
    name: str
    model: str
    overrides: dict = field(default_factory=dict)
    objective: str | None = None

    @property
    def slug(self) -> str:
        return _slug(self.name)


@dataclass(frozen=True)
class Study:
    name: str
    dataset: str
    size: int
    seed: int
    model: dict
    train: dict
    regimes: dict
    evaluate: dict
    attention: dict
    arms: tuple[Arm, ...]
    photos: dict | None = None


DEFAULTS = {
    "regimes": {"tflop": None, "seconds": None, "evaluations": 3},
    "evaluate": {"samples": 200, "sampler_steps": 30, "cfg_scale": 1.0, "latency_repeats": 10,
                 "batch_size": 100},
    "attention": {"sampler_steps": 10, "analyse_steps": [0, 5, 9], "window_sides": [2, 4],
                  "samples": 2},
}


def _table(spec: dict, key: str, where: str) -> dict:
    value = spec.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}: [{key}] must be a table, got {value!r}")
    unknown = set(value) - set(DEFAULTS.get(key, value))
    if unknown:
        raise ValueError(f"{where}: [{key}] has unknown key(s) {', '.join(sorted(unknown))}; "
                         f"allowed: {', '.join(DEFAULTS[key])}")
    return {**DEFAULTS.get(key, {}), **value}


def _positive(value, what: str, where: str, kind=(int, float)) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or not value > 0 \
            or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{where}: {what} must be a positive number, got {value!r}")


def parse(spec: dict, where: str = "study") -> Study:
    """A Study from a parsed study file; ValueError naming the key and what is allowed."""
    unknown = set(spec) - set(TOP)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: "
                         f"{', '.join(TOP)}")
    for key in ("dataset", "size", "arm"):
        if key not in spec:
            raise ValueError(f"{where}: `{key}` is required")
    _positive(spec["size"], "size", where, int)
    regimes = _table(spec, "regimes", where)
    for key in ("tflop", "seconds"):
        if regimes[key] is None:
            raise ValueError(f"{where}: [regimes] needs `{key}` (the budget of regime "
                             f"{'a: training TFLOP' if key == 'tflop' else 'b: wall seconds'})")
        _positive(regimes[key], f"[regimes] {key}", where)
    _positive(regimes["evaluations"], "[regimes] evaluations", where, int)
    evaluate = _table(spec, "evaluate", where)
    for key in ("samples", "sampler_steps", "latency_repeats", "batch_size"):
        _positive(evaluate[key], f"[evaluate] {key}", where, int)
    arms = spec["arm"]
    if not isinstance(arms, list) or not arms:
        raise ValueError(f"{where}: [[arm]] must list at least one arm")
    parsed = []
    for i, arm in enumerate(arms):
        bad = set(arm) - {"name", "model", "overrides", "objective"}
        if bad or "name" not in arm or "model" not in arm:
            raise ValueError(f"{where}: arm {i + 1} needs `name` and `model` (and optionally "
                             f"`overrides`, `objective`); got {', '.join(sorted(arm))}")
        parsed.append(Arm(arm["name"], arm["model"], dict(arm.get("overrides", {})),
                          arm.get("objective")))
    slugs = [a.slug for a in parsed]
    if len(set(slugs)) != len(slugs):
        raise ValueError(f"{where}: arm names must differ: {', '.join(a.name for a in parsed)}")
    photos = spec.get("photos")
    if photos is not None:
        if set(photos) - {"arm", "size", "steps"} or photos.get("arm") not in \
                {a.name for a in parsed}:
            raise ValueError(f"{where}: [photos] takes `arm` (one of "
                             f"{', '.join(a.name for a in parsed)}), `size`, `steps`")
        _positive(photos.get("steps"), "[photos] steps", where, int)
    return Study(spec.get("name", Path(where).stem), spec["dataset"], spec["size"],
                 spec.get("seed", 0), dict(spec.get("model", {})), dict(spec.get("train", {})),
                 regimes, evaluate, _table(spec, "attention", where), tuple(parsed), photos)


def load(path: str | os.PathLike) -> Study:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"study file {str(path)!r} does not exist")
    try:
        spec = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"study file {str(path)!r} is not TOML: {err}") from None
    return parse(spec, str(path))


def smoke(study: Study) -> Study:
    """The same study shrunk to run in a minute or two: tiny layers, a few steps, a few
    samples. It checks the machinery end to end; its numbers mean nothing."""
    model = {**study.model, "depth": 1, "hidden_size": 32, "num_heads": 2}
    train = {**study.train, "batch_size": 16, "warmup_steps": 0, "checkpoint_every": 2,
             "log_every": 1}
    regimes = {**study.regimes, "tflop": 0.002, "seconds": 2.0, "evaluations": 2}
    evaluate = {**study.evaluate, "samples": 20, "sampler_steps": 3, "latency_repeats": 2,
                "batch_size": 20}
    attention = {**study.attention, "sampler_steps": 2, "analyse_steps": [1],
                 "window_sides": study.attention["window_sides"][:1], "samples": 1}
    photos = None if study.photos is None else {**study.photos, "steps": 2}
    return dataclasses.replace(study, name=f"{study.name} (smoke)", model=model, train=train,
                               regimes=regimes, evaluate=evaluate, attention=attention,
                               photos=photos)


#################################################################################
#                                  Running                                      #
#################################################################################

def _check_out(out: Path, study: Study) -> Store:
    out = check_writable_folder(out, "out")
    store = Store(out / STUDY_ROWS, "study").check()
    names = {r.get("study") for r in store.rows()}
    if names - {study.name}:
        raise ValueError(f"{out} holds another study's rows ({', '.join(map(str, names))}); "
                         f"give another --out")
    return store


def _slug_of(arm: Arm, regime: str) -> str:
    return f"{arm.slug}-{regime}"


def _options(study: Study, arm: Arm, **budget) -> TrainOptions:
    return TrainOptions(**{**study.train, "seed": study.seed, "objective": arm.objective,
                           **budget})


def _fields(study: Study, arm: Arm) -> dict:
    return {**study.model, **arm.overrides}


def _conditions(model, info: dict, run_folder: Path):
    """What a trained model samples with: its classes (sample i shows class i mod N), or the
    per-class caption embeddings its training wrote (row i = class i)."""
    if info["condition"] == "class":
        return class_conditions(f"0-{info['num_classes'] - 1}")
    return prompt_embeddings(run_folder / info["prompt_embeddings"])


def _latency(model, study: Study) -> dict:
    """The forward latency of `model`'s architecture at batch 1 on the study's token grid
    (bench.latency; random weights of the same config: latency depends on the shapes only).
    bench's workloads count latent pixels as pixels / 8, so the study's pixel side is given
    as 8 × size."""
    tokens = text_tokens(model) if model.config.condition == "text" else 0
    work = ptdit.Workload(model.config, resolution=8 * study.size, batch=1,
                          text_tokens=tokens)
    row = measure(Case(work), repeats=study.evaluate["latency_repeats"])
    return {"latency_ms": row["latency_ms_median"], "latency_status": row["status"],
            "forward_gflops": row.get("step_gflops")}


def evaluate(run_folder: Path, study: Study, into: Path, progress: bool = False) -> dict:
    """Samples the run's EMA weights (its training sampler, the study's steps and guidance)
    into `into` and scores them: the fd_digits_classifier row's fields and the sampling time."""
    weights = run_folder / EMA_FILE
    info = checkpoint_info(weights)
    model = ptdit.load(weights)
    conditions = _conditions(model, info, run_folder)
    n = study.evaluate["samples"]
    if into.exists():           # an evaluation cut short: its samples are redone
        shutil.rmtree(into)
    made = sample(model, vae=PixelSpace(model.in_channels), conditions=conditions, num=n,
                  out=into, resolution=study.size, scheduler=info["sampler"],
                  steps=study.evaluate["sampler_steps"], cfg_scale=study.evaluate["cfg_scale"],
                  seed=study.seed, batch_size=study.evaluate["batch_size"], checkpoint=weights,
                  progress=progress)
    labels = [i % info["num_classes"] for i in range(n)]
    score = fd_digits(into, labels=labels if info["labelled"] else None,
                      size=max(16, study.size))
    return {"fd": score["fd"], "fd_floor": score["fd_floor"],
            "sample_accuracy": score["sample_accuracy"], "n_samples": score["n_samples"],
            "classifier_test_accuracy": score["classifier_test_accuracy"],
            "sampler": info["sampler"], "sample_s_per_image": made["wall_s"] / n,
            "samples_status": made["status"], "step": info["step"], "samples": str(into)}


def _row(study: Study, arm: Arm, label: str, regime: str, **fields) -> dict:
    """A study row: provenance, the arm (`label`: its name in tables), the regime, `fields`."""
    return {**provenance(study.train.get("device", "cpu"), "math",
                         study.train.get("dtype", "float32")),
            "model": arm.model, "resolution": study.size, "latent_frames": 1, "tokens": None,
            "batch": study.train.get("batch_size"), "status": "ok", "study": study.name,
            "arm": label, "regime": regime, "overrides": _fields(study, arm), **fields}


def _done(row: dict) -> tuple:
    """What a stored row stands for: a rerun skips the work of a key it finds."""
    return (row.get("kind"), row.get("arm"), row.get("regime"), row.get("point"),
            row.get("weights"))


def run(study: Study, out: str | os.PathLike, *, progress: bool = True) -> list[dict]:
    """Runs the study into `out` (see the module docstring); returns the rows it added. What
    the store already holds is skipped; unfinished training resumes from its checkpoint."""
    out = Path(out)
    store = _check_out(out, study)
    data = load_data(study.dataset, size=study.size, split="train", seed=study.seed)
    held = {_done(r) for r in store.rows()
            if r.get("status") == "ok" or str(r.get("status")).startswith("skipped")}
    added = []

    def keep(row: dict) -> None:
        added.append(store.append(row))

    images = _held_out_images(study, out)
    for arm in study.arms:
        for regime in REGIMES:
            folder = out / "runs" / _slug_of(arm, regime)
            points = study.regimes["evaluations"] if regime == "flops" else 1
            for point in range(1, points + 1):
                # regime a: window similarity along training too (the weights of each point
                # exist only until the run goes on, so a point is finished before the next)
                evaluated = ("evaluation", arm.name, regime, point, None) in held
                analysed = regime != "flops" or ("attention", arm.name, regime, point,
                                                 "trained") in held
                if evaluated and analysed:
                    continue
                budget = ({"budget_tflop": study.regimes["tflop"] * point / points}
                          if regime == "flops" else
                          {"budget_seconds": float(study.regimes["seconds"])})
                trained = train(arm.model, data, folder, size=study.size,
                                overrides=_fields(study, arm),
                                options=_options(study, arm, **budget), progress=progress)
                if not evaluated:
                    scores = evaluate(folder, study, out / "samples" /
                                      f"{_slug_of(arm, regime)}-{point}", progress=progress)
                    keep(_row(study, arm, arm.name, regime, kind="evaluation", point=point,
                              train_tflop=trained["tflop_spent"],
                              train_wall_s=trained["train_s"], loss=trained["loss"],
                              steps_done=trained["step"], images_per_s=trained["images_per_s"],
                              **scores, **_latency(ptdit.load(folder / EMA_FILE), study)))
                if not analysed:
                    _attention(study, arm, arm.name, folder, images, out, point, held, keep)
    if study.photos is not None:
        _photos(study, out, held, keep, progress)
    return added


def _attention(study: Study, arm: Arm, label: str, folder: Path, images: Path, out: Path,
               point: int, held: set, keep) -> None:
    """Window similarity of the run's current EMA weights (evaluation `point`) — and, at the
    first point, of their untrained initialisation (the same seed and config: point 0) — on
    real held-out images noised to the sampler's timesteps. One row per weights, window,
    metric, analysed step and layer: the value within windows and its two baselines, mean over
    heads and images."""
    weights = folder / EMA_FILE
    info = checkpoint_info(weights)
    trained = ptdit.load(weights)
    kinds = {m.kind for m in attention_modules(trained).values()}
    analysed = kinds & {"global", "proxy"}
    todo = [("trained", point, trained)]
    if point == 1:   # the initialisation the run started from: train builds with its seed
        todo.insert(0, ("untrained", 0, ptdit.build(info["model"], seed=study.seed,
                                                    **info["model_config"])))
    settings = study.attention
    for weights_kind, at, model in todo:
        if ("attention", label, "flops", at, weights_kind) in held:
            continue
        if not analysed:     # PT-DiT without GIIM: only window attentions, nothing global
            keep(_row(study, arm, label, "flops", kind="attention", weights=weights_kind,
                      point=at, status="skipped: no attention over all positions to analyse "
                      "(without GIIM a PT-DiT has window attentions only)"))
            continue
        result = analyse_attention(
            model, _conditions(model, info, folder),
            out=out / "attention" / f"{_slug(label)}-{weights_kind}-{at}",
            resolution=info["image_size"], images=str(images), vae=None,
            scheduler=info["sampler"], steps=settings["sampler_steps"],
            analyse_steps=settings["analyse_steps"], cfg_scale=study.evaluate["cfg_scale"],
            seed=study.seed, samples=settings["samples"],
            windows=[(1, s, s) for s in settings["window_sides"]],
            checkpoint=weights if weights_kind == "trained" else None,
            init_seed=None if weights_kind == "trained" else study.seed, force=True,
            figures=False)
        frame = result.frame()
        frame = frame[(frame.status == "ok") & (frame.branch == "cond")]
        groups = frame.groupby(["window", "metric", "step", "layer"])
        for (window, metric, step, layer), rows in groups:
            keep(_row(study, arm, label, "flops", kind="attention", weights=weights_kind,
                      point=at, steps_done=info["step"] if at else 0,
                      attention=f"{rows.kind.iloc[0]} self-attention, {rows.grid.iloc[0]} "
                      f"{'proxies' if rows.kind.iloc[0] == 'proxy' else 'tokens'}",
                      window=window, metric=metric, step=int(step), layer=int(layer),
                      timestep=float(rows.timestep.iloc[0]), within=rows.value.mean(),
                      position_matched=rows.baseline_position_matched.mean(),
                      random_pairs=rows.baseline_random.mean(),
                      matched_share=rows.position_matched_fraction.mean(),
                      heads=int(rows["head"].nunique())))


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _held_out_images(study: Study, out: Path, dataset: str | None = None,
                     size: int | None = None) -> Path:
    """The first images of the dataset's test split as an .npz (uint8 NHWC) in `out`, for the
    attention analysis (written once)."""
    dataset, size = dataset or study.dataset, size or study.size
    path = out / f"held_out_{_slug(dataset)}_{size}px.npz"
    if not path.exists():
        test = load_data(dataset, size=size, split="test", seed=study.seed)
        pixels = ((test.images[:64].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        pixels = pixels.repeat(1, 3 // pixels.shape[1], 1, 1).permute(0, 2, 3, 1).numpy()
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, arr_0=pixels)   # ADM's layout: uint8 (N, H, W, 3)
    return path


def _photos(study: Study, out: Path, held: set, keep, progress: bool) -> None:
    """One model of the `photos` arm's architecture trained on crops of the bundled
    photographs, then analysed like the arms (window similarity only: no classifier there)."""
    arm = next(a for a in study.arms if a.name == study.photos["arm"])
    label = f"{arm.name} on photos"
    if ("attention", label, "flops", 1, "trained") in held:
        return
    size = study.photos.get("size", study.size)
    folder = out / "runs" / f"photos-{arm.slug}"
    data = load_data("photos", size=size, split="train", seed=study.seed)
    options = _options(study, arm, steps=study.photos["steps"])
    train(arm.model, data, folder, size=size, overrides=_fields(study, arm), options=options,
          progress=progress)
    _attention(study, arm, label, folder, _held_out_images(study, out, "photos", size), out, 1,
               held, keep)
