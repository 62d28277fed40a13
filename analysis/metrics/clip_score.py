"""CLIP score of images against their captions, offline and sharded.

Model: OpenAI CLIP through clip-anytorch, `clip.load(<local file>, jit=False)` on the file from
`analysis.offline.CLIP` (`--clip-weights` or $PTDIT_CLIP_WEIGHTS; a JIT archive as OpenAI
publishes it, or a state dict); nothing downloads. The backbone's name (ViT-B/32, ViT-L/14, …)
is inferred from the loaded model's dimensions, never from the file name.

Convention: score = 100 * max(cos(image embedding, text embedding), 0) for each pair, then the
mean over pairs. torchmetrics' CLIPScore clamps the mean instead, max(mean(100 * cos), 0); the
two agree unless some pair has cos < 0. Captions longer than the 77-token context are truncated
(`clip.tokenize(truncate=True)`) and counted in `captions_truncated`.

Preprocessing: CLIP's own, on uint8 batches: bicubic resize of the shorter side to the input
resolution (torchvision, antialiased; on CPU in uint8, horizontal then vertical pass, as Pillow
does), center crop, normalisation by CLIP's mean and std. It matches `clip.load`'s PIL pipeline
to within two uint8 levels per pixel, except where Pillow >= 13 picks the vertical pass first
(python-pillow/Pillow#9549) and bicubic overshoot is clipped at 0 or 255 between the passes
(sharp edges, pixel noise): there PIL's own result depends on the Pillow version.

Captions: a list, a text file with one caption per line in the images' order (sorted file
names), a .csv with columns `file,caption`, or a .json object {file name: caption}; entries for
images not in the set are ignored.

Under torch.distributed (torchrun: analysis.distributed starts the process group) each rank
scores its shard of the pairs (analysis.images) and the sums are all-reduced in float64, so the
score does not depend on the number of processes.
"""

import csv
import functools
import io
import json
import os
import warnings
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptdit.checks import check_device

from ..distributed import process_group
from ..images import Source, image_names, read_images, shard
from ..offline import CLIP
from . import file_sha256, result_row, source_name

CONVENTION = "mean over pairs of 100*max(cos,0)"
CONVENTION_NOTE = "torchmetrics CLIPScore clamps the mean instead: max(mean(100*cos), 0)"
PREPROCESS = ("CLIP's, batch-wise: torchvision bicubic antialiased resize of the shorter side to "
              "the input resolution, center crop, normalise by CLIP mean/std")
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)
# the published backbones by their visual dimensions: ("vit", width, layers, patch, input px)
# or ("resnet", width, blocks per stage, input px), as clip.model.build_model reads them
BACKBONES = {
    ("vit", 768, 12, 32, 224): "ViT-B/32",
    ("vit", 768, 12, 16, 224): "ViT-B/16",
    ("vit", 1024, 24, 14, 224): "ViT-L/14",
    ("vit", 1024, 24, 14, 336): "ViT-L/14@336px",
    ("resnet", 64, (3, 4, 6, 3), 224): "RN50",
    ("resnet", 64, (3, 4, 23, 3), 224): "RN101",
    ("resnet", 80, (4, 6, 10, 6), 288): "RN50x4",
    ("resnet", 96, (6, 8, 18, 8), 384): "RN50x16",
    ("resnet", 128, (3, 15, 36, 10), 448): "RN50x64",
}
BACKBONE_FROM = "the loaded model's visual width, layers, patch size and input resolution"


def _clip():
    with warnings.catch_warnings():  # clip-anytorch imports the deprecated pkg_resources
        warnings.filterwarnings("ignore", "pkg_resources is deprecated", UserWarning)
        import clip
    return clip


@functools.cache
def _tokenizer():
    from clip.simple_tokenizer import SimpleTokenizer
    return SimpleTokenizer()


def backbone(model: nn.Module) -> str:
    """The published name of `model`'s backbone (e.g. 'ViT-L/14'), else its dimensions."""
    visual = model.visual
    if hasattr(visual, "transformer"):
        dims = ("vit", visual.conv1.out_channels, len(visual.transformer.resblocks),
                visual.conv1.kernel_size[0], visual.input_resolution)
        unknown = "custom ViT (width {1}, layers {2}, patch {3}, input {4} px)"
    else:
        blocks = tuple(len(getattr(visual, f"layer{i}")) for i in range(1, 5))
        dims = ("resnet", visual.conv3.out_channels, blocks, visual.input_resolution)
        unknown = "custom ResNet (width {1}, blocks {2}, input {3} px)"
    return BACKBONES.get(dims) or unknown.format(*dims)


def load_clip(clip_weights: str | os.PathLike | None = None,
              device: str | torch.device = "cpu") -> tuple[nn.Module, Path]:
    """(model in eval mode, weights path) from a local OpenAI CLIP checkpoint; clip.load keeps
    fp16 weights on CUDA and makes them float32 on CPU."""
    path = CLIP.path(clip_weights).resolve()  # absolute: never a clip model name it downloads
    clip = _clip()
    try:
        with warnings.catch_warnings():  # clip.load tries torch.jit.load first
            warnings.filterwarnings("ignore", "`torch.jit.load` is deprecated", FutureWarning)
            model, _ = clip.load(str(path), device=device, jit=False)
    except Exception as err:   # a damaged pickle raises almost any type
        raise ValueError(f"{CLIP.what} file {str(path)!r} cannot be loaded by clip.load "
                         f"({CLIP.expected}): {err}") from err
    return model.eval(), path


def clip_preprocess(resolution: int) -> Callable[[Tensor], Tensor]:
    """CLIP's preprocessing on batches: uint8 (N, 3, H, W) -> float32 (N, 3, R, R), R =
    `resolution`; on CPU torchvision resizes uint8 natively, as Pillow does."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    def preprocess(images: Tensor) -> Tensor:
        images = TF.resize(images, resolution, InterpolationMode.BICUBIC, antialias=True)
        images = TF.center_crop(images, [resolution, resolution])
        return TF.normalize(images.float() / 255, MEAN, STD)
    return preprocess


# ----------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------

def _read_text(path: Path) -> str:
    """The captions file's text; ValueError naming it when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"captions file {str(path)!r} is not UTF-8 text ({err.reason} at byte "
                         f"{err.start}: {err.object[err.start:err.start + 4]!r}); save it as "
                         "UTF-8") from None


def _mapping(path: Path) -> dict:
    """file name -> caption from a .csv (columns file, caption) or a .json object."""
    if path.suffix.lower() == ".json":
        try:
            mapping = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"captions file {str(path)!r} is not valid JSON (line {err.lineno} "
                             f"column {err.colno}: {err.msg}); allowed JSON is one object "
                             '{"file name": "caption", …}') from None
        if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
            raise ValueError(f"captions file {str(path)!r}: allowed JSON is one object "
                             '{"file name": "caption", …}')
        return mapping
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))
    try:
        if not {"file", "caption"} <= set(reader.fieldnames or ()):
            raise ValueError(f"captions file {str(path)!r} has columns {reader.fieldnames}; "
                             "allowed: a header with the columns file, caption")
        mapping = {}
        for line, entry in enumerate(reader, 2):
            if entry["file"] in mapping:
                raise ValueError(f"captions file {str(path)!r} line {line}: a second caption "
                                 f"for {entry['file']!r}; allowed: one per file")
            mapping[entry["file"]] = entry["caption"] or ""
    except csv.Error as err:
        raise ValueError(f"captions file {str(path)!r} is not a readable CSV ({err})") from None
    return mapping


def read_captions(captions: str | os.PathLike | Sequence[str], names: Sequence[str]) -> list[str]:
    """The caption of each image in `names` (image_names' order). Raises ValueError naming the
    caption or image that is missing or empty, or the counts that differ."""
    if isinstance(captions, (str, os.PathLike)):
        path = Path(captions).expanduser()
        allowed = ("allowed: a text file (one caption per line), a .csv (file, caption) or a "
                   ".json object")
        if path.is_dir():
            raise ValueError(f"captions file {str(path)!r} is a folder; {allowed}")
        if not path.is_file():
            raise ValueError(f"captions file {str(path)!r} does not exist; {allowed}")
        if path.suffix.lower() in (".csv", ".json"):
            mapping = _mapping(path)
            missing = [name for name in names if name not in mapping]
            if missing:
                raise ValueError(f"captions file {str(path)!r} has no caption for image "
                                 f"{missing[0]!r} ({len(missing)} of {len(names)} missing); its "
                                 f"keys start {list(mapping)[:3]}")
            texts, labels = [mapping[name] for name in names], [f"image {n!r}" for n in names]
        else:
            texts = _read_text(path).splitlines()
            labels = [f"line {i}" for i in range(1, len(texts) + 1)]
        what = f"captions file {str(path)!r}"
    else:
        texts, what = list(captions), "captions list"
        labels = [f"caption {i} (image {n!r})" for i, n in enumerate(names)]
    if len(texts) != len(names):
        raise ValueError(f"{what} has {len(texts)} captions for {len(names)} images; allowed: "
                         "one caption per image, in sorted file-name order")
    for text, label in zip(texts, labels):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{what}: {label} is empty or not a string ({text!r}); every image "
                             "needs a caption")
    return texts


# ----------------------------------------------------------------------------------------------
# CLIP score
# ----------------------------------------------------------------------------------------------

def _all_reduce(values: Tensor) -> Tensor:
    if shard()[1] > 1:
        torch.distributed.all_reduce(values)
    return values


def clip_score(samples: Source, captions: str | os.PathLike | Sequence[str], *,
               clip_weights: str | os.PathLike | None = None, batch_size: int = 64,
               device: str | torch.device = "cpu", model: nn.Module | None = None,
               preprocess: Callable[[Tensor], Tensor] | None = None) -> dict:
    """CLIP score of `samples` (a folder, an image .npz or a tensor; analysis.images) against
    `captions`, as one results row.

    model: a loaded clip.model.CLIP to use instead of `clip_weights`' (then weights_file and
        weights_sha256 are None). preprocess: uint8 (N, 3, H, W) -> (N, 3, R, R) model input,
        instead of clip_preprocess(R).
    Returns the row: `clip_score`, `n_pairs`, `captions_truncated`, `convention`,
    `convention_note`, `backbone`, `backbone_from`, `weights_file`, `weights_sha256`,
    `context_length`, `input_resolution`, `preprocess`, `captions_path` and DESIGN's row fields.
    Under torchrun (WORLD_SIZE > 1) a process group is started if none runs
    (analysis.distributed).
    """
    names = image_names(samples)
    if not names:
        raise ValueError(f"CLIP score needs at least 1 image, got 0 (from "
                         f"{source_name(samples)})")
    texts = read_captions(captions, names)
    with process_group(check_device(device, "device")) as (rank, world, device):
        weights = None
        if model is None:
            model, weights = load_clip(clip_weights, device)
        clip = _clip()
        resolution, context = model.visual.input_resolution, model.context_length
        how = (PREPROCESS if preprocess is None
               else f"custom {getattr(preprocess, '__qualname__', '')}")
        preprocess = preprocess or clip_preprocess(resolution)
        texts = texts[rank::world]  # this rank's shard, in read_images' order of its images
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # score sum, pairs, truncated
        done = 0
        with torch.no_grad():
            for images in read_images(samples, batch_size=batch_size, rank=rank,
                                      world_size=world):
                batch_texts, done = texts[done:done + len(images)], done + len(images)
                tokens = clip.tokenize(batch_texts, context_length=context, truncate=True)
                image = model.encode_image(preprocess(images.to(device)))   # (B, E)
                text = model.encode_text(tokens.to(device))                 # (B, E)
                cos = (F.normalize(image.double(), dim=-1)
                       * F.normalize(text.double(), dim=-1)).sum(-1)            # (B,)
                truncated = sum(len(_tokenizer().encode(t)) + 2 > context for t in batch_texts)
                sums += torch.tensor([(100 * cos.clamp(min=0)).sum().item(), len(images),
                                      truncated], dtype=torch.float64, device=device)
        total, pairs, truncated = _all_reduce(sums).tolist()
        row = result_row(metric="clip_score", samples=samples, device=device,
                         backend=f"clip-anytorch {version('clip-anytorch')}",
                         dtype=str(model.dtype).removeprefix("torch."), batch=batch_size)
    return {**row, "clip_score": total / pairs, "n_pairs": int(pairs),
            "captions_truncated": int(truncated), "convention": CONVENTION,
            "convention_note": CONVENTION_NOTE, "backbone": backbone(model),
            "backbone_from": BACKBONE_FROM,
            "weights_file": None if weights is None else str(weights),
            "weights_sha256": None if weights is None else file_sha256(weights),
            "context_length": context, "input_resolution": resolution, "preprocess": how,
            "captions_path": (str(captions) if isinstance(captions, (str, os.PathLike))
                              else f"list of {len(names)} captions")}
