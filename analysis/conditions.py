"""What each sample is conditioned on: class labels, or T5 prompt embeddings with their masks.

Conventions
- Sample index i takes condition i % N of the N given (labels or prompts cycle over the
  indices), so index 1234 of a 50 000-image run with labels "0-999" has label 234.
- Class labels: `class_conditions("1,2,3")`, a range `"0-999"` (both ends included), a mix
  `"0,5-9"`, a text file with one label per line (blank lines skipped), or a sequence of ints.
- Prompt embeddings file (`.safetensors`, or `.pt` holding a dict of tensors), keys:
    embeddings      (N, L, C) float  T5 encoder output, C = caption_channels (4096 for T5-XXL)
    mask            (N, L)    0/1    1 keeps a token (T5's attention_mask)
    null_embedding  (L, C)    float  optional: the encoding of the empty prompt "", the null
    null_mask       (L,)      0/1    optional, with null_embedding (default: all ones)
  `encode_prompts` writes the same fields from a prompt file and a local T5 folder.
- The null condition for classifier-free guidance (conditional half first, then null):
  class models take the null class `num_classes`; text models with a learned null caption
  (PixArt's `y_embedder.y_embedding`) take it with the prompt's own mask, as PixArt-alpha's
  sampler does (its forward repeats the caption mask over both halves); text models without
  one (PT-DiT) take `null_embedding` and `null_mask`, the empty prompt, as the diffusers
  pipelines do.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .offline import T5, go_offline

PTDIT_TEXT_TOKENS = 200   # T5 tokens of the released PT-DiT (official_ptdit.md, section 1)
EMBEDDING_KEYS = ("embeddings", "mask", "null_embedding", "null_mask")


@dataclass(frozen=True)
class ClassLabels:
    """Class labels (N,) int64; sample i takes labels[i % N]."""
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def at(self, indices: list[int]) -> Tensor:
        """(B,) the labels of sample indices."""
        return self.labels[torch.tensor(indices) % len(self)]


@dataclass(frozen=True)
class Prompts:
    """T5 prompt embeddings (N, L, C) with keep-masks (N, L), and optionally the null (empty
    prompt) embedding (L, C) with its mask (L,); sample i takes prompt i % N."""
    embeddings: Tensor
    mask: Tensor
    null_embedding: Tensor | None = None
    null_mask: Tensor | None = None
    source: str = ""

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def tokens(self) -> int:
        return self.embeddings.shape[1]

    def at(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        """(B, L, C) embeddings and (B, L) masks of sample indices."""
        rows = torch.tensor(indices) % len(self)
        return self.embeddings[rows], self.mask[rows]


#################################################################################
#                                 Class labels                                  #
#################################################################################

def _parse_labels(text: str, source: str) -> list[int]:
    labels = []
    for item in (part.strip() for part in text.replace("\n", ",").split(",")):
        if not item:
            continue
        first, dash, last = item.partition("-")
        if not first.strip().isdigit() or (dash and not last.strip().isdigit()):
            raise ValueError(f"class labels {source}: cannot read {item!r}; allowed: labels "
                             "'1,2,3', an inclusive range '0-999', a mix '0,5-9', or a file "
                             "with one label per line")
        lo = int(first)
        hi = int(last) if dash else lo
        if hi < lo:
            raise ValueError(f"class labels {source}: range {item!r} runs backwards; "
                             f"did you mean '{hi}-{lo}'?")
        labels.extend(range(lo, hi + 1))
    if not labels:
        raise ValueError(f"class labels {source}: no labels given")
    return labels


def class_conditions(spec: str | os.PathLike | list[int] | tuple[int, ...] | Tensor
                     ) -> ClassLabels:
    """Class labels from "1,2,3", "0-999", "0,5-9", a file of one label per line, or ints."""
    if isinstance(spec, Tensor):
        spec = spec.tolist()
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(v, int) and v >= 0 for v in spec):
            raise ValueError(f"class labels must be non-negative ints, got {list(spec)[:8]}")
        labels = list(spec)
    elif isinstance(spec, os.PathLike) or (isinstance(spec, str) and os.path.isfile(spec)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"class label file {str(path)!r} does not exist")
        labels = _parse_labels(path.read_text(), f"file {str(path)!r}")
    elif isinstance(spec, str):
        labels = _parse_labels(spec, repr(spec))
    else:
        raise ValueError(f"class labels must be a string, a file or ints, got "
                         f"{type(spec).__name__}")
    return ClassLabels(torch.tensor(labels, dtype=torch.int64))


#################################################################################
#                              Prompt embeddings                                #
#################################################################################

def _check_mask(mask: Tensor, shape: tuple, what: str) -> Tensor:
    if not isinstance(mask, Tensor) or tuple(mask.shape) != shape:
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(f"{what} must have shape {shape}, got {got}")
    if mask.dtype.is_complex or ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"{what} values must be 0 (drop) or 1 (keep)")
    if (mask.reshape(-1, shape[-1]).sum(-1) == 0).any():
        raise ValueError(f"{what}: every caption must keep at least one token")
    return mask.to(torch.int64)


def make_prompts(embeddings: Tensor, mask: Tensor, null_embedding: Tensor | None = None,
                 null_mask: Tensor | None = None, source: str = "prompt embeddings") -> Prompts:
    """Prompts from tensors, checked: embeddings (N, L, C) float, mask (N, L) of 0/1, null
    embedding (L, C) and null mask (L,) optional."""
    if not isinstance(embeddings, Tensor) or embeddings.dim() != 3 or \
            not embeddings.is_floating_point() or 0 in embeddings.shape:
        got = (f"{embeddings.dtype} {tuple(embeddings.shape)}" if isinstance(embeddings, Tensor)
               else type(embeddings).__name__)
        raise ValueError(f"{source}: 'embeddings' must be a float (N, L, C) tensor (N prompts, "
                         f"L tokens, C = T5 width), got {got}")
    N, L, C = embeddings.shape
    mask = _check_mask(mask, (N, L), f"{source}: 'mask'")
    if null_embedding is not None:
        if not isinstance(null_embedding, Tensor) or tuple(null_embedding.shape) != (L, C) \
                or not null_embedding.is_floating_point():
            got = (tuple(null_embedding.shape) if isinstance(null_embedding, Tensor)
                   else type(null_embedding).__name__)
            raise ValueError(f"{source}: 'null_embedding' must be a float ({L}, {C}) tensor "
                             f"like one prompt's embeddings, got {got}")
        null_mask = (torch.ones(L, dtype=torch.int64) if null_mask is None else
                     _check_mask(null_mask, (L,), f"{source}: 'null_mask'"))
    elif null_mask is not None:
        raise ValueError(f"{source}: 'null_mask' given without 'null_embedding'")
    return Prompts(embeddings, mask, null_embedding, null_mask, source)


def prompt_embeddings(file: str | os.PathLike) -> Prompts:
    """Prompt embeddings from a .safetensors or .pt file with the keys `embeddings` (N, L, C),
    `mask` (N, L), and optionally `null_embedding` (L, C) and `null_mask` (L,)."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt embeddings file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        tensors = load_file(path)
    elif path.suffix == ".pt":
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    else:
        raise ValueError(f"prompt embeddings {str(path)!r}: unknown file type {path.suffix!r}; "
                         "allowed: .safetensors, .pt")
    if not isinstance(tensors, dict):
        raise ValueError(f"prompt embeddings {str(path)!r} must hold a dict of tensors, got "
                         f"{type(tensors).__name__}")
    unknown = sorted(set(tensors) - set(EMBEDDING_KEYS))
    missing = [k for k in ("embeddings", "mask") if k not in tensors]
    if unknown or missing:
        problem = (f"unknown keys {', '.join(unknown)}" if unknown else
                   f"lacks {', '.join(missing)}")
        raise ValueError(f"prompt embeddings {str(path)!r}: {problem}; expected keys: "
                         "embeddings (N, L, C), mask (N, L), optional null_embedding (L, C), "
                         f"null_mask (L,); found: {', '.join(tensors) or 'none'}")
    return make_prompts(*(tensors.get(k) for k in EMBEDDING_KEYS), source=str(path))


def text_tokens(model: nn.Module) -> int:
    """The T5 token count a text model takes: PixArt's `model_max_length` (120), or the
    released PT-DiT's 200."""
    config = model.config
    if config.condition != "text":
        raise ValueError(f"{config.family} model is class-conditional: it takes no text")
    return getattr(config, "model_max_length", PTDIT_TEXT_TOKENS)


def _t5_folders(folder: Path) -> tuple[Path, Path]:
    """(encoder, tokenizer) folders: a folder holding both, or a diffusers pipeline folder with
    text_encoder/ and tokenizer/."""
    if (folder / "text_encoder").is_dir() and (folder / "tokenizer").is_dir():
        return folder / "text_encoder", folder / "tokenizer"
    return folder, folder


@torch.no_grad()
def encode_prompts(file: str | os.PathLike, t5_folder: str | os.PathLike | None,
                   max_length: int, *, batch_size: int = 8, device="cpu") -> Prompts:
    """Encodes the prompts of a text file (one a line, blank lines skipped) and the empty prompt
    (the null) with a local T5 (`transformers.T5EncoderModel` + `AutoTokenizer`), padded to
    `max_length` tokens (`text_tokens(model)`). `t5_folder` None reads $PTDIT_T5."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"prompt file {str(path)!r} holds no prompts (one a line)")
    encoder_dir, tokenizer_dir = _t5_folders(T5.path(t5_folder))
    go_offline()
    from transformers import AutoTokenizer, T5EncoderModel
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    encoder = T5EncoderModel.from_pretrained(encoder_dir, local_files_only=True).to(device).eval()
    embeddings, masks = [], []
    texts = prompts + [""]   # the empty prompt last: the null condition
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size], padding="max_length", max_length=max_length,
                           truncation=True, add_special_tokens=True, return_tensors="pt")
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        embeddings.append(encoder(input_ids=ids, attention_mask=mask)[0].float().cpu())
        masks.append(mask.cpu())
    embeddings, masks = torch.cat(embeddings), torch.cat(masks)
    return make_prompts(embeddings[:-1], masks[:-1], embeddings[-1], masks[-1],
                        source=f"{path} encoded by {encoder_dir}")


#################################################################################
#                      Conditions -> model inputs, checked                      #
#################################################################################

def check_conditions(model: nn.Module, conditions: ClassLabels | Prompts, guided: bool) -> None:
    """ValueError unless `conditions` suit `model` (kind, label range, caption width and
    length, a null condition when `guided`)."""
    config = model.config
    name = getattr(model, "name", None) or config.family
    if config.condition == "class":
        if not isinstance(conditions, ClassLabels):
            raise ValueError(f"{name} is class-conditional: give class labels "
                             f"(class_conditions('0-999')), not {type(conditions).__name__}")
        num_classes = config.num_classes
        bad = conditions.labels[(conditions.labels < 0) | (conditions.labels >= num_classes)]
        if len(bad):
            raise ValueError(f"class labels {sorted(set(bad.tolist()))[:8]} out of range for "
                             f"{name}: allowed 0..{num_classes - 1}")
        if guided and config.class_dropout_prob <= 0:
            raise ValueError(f"{name} has no null class (class_dropout_prob=0): sample it with "
                             "cfg_scale=1")
        return
    if not isinstance(conditions, Prompts):
        raise ValueError(f"{name} is text-conditional: give T5 prompt embeddings "
                         f"(prompt_embeddings(file) or encode_prompts(...)), not "
                         f"{type(conditions).__name__}")
    C, L, limit = config.caption_channels, conditions.tokens, text_tokens(model)
    if conditions.embeddings.shape[2] != C:
        raise ValueError(f"{conditions.source}: embeddings have {conditions.embeddings.shape[2]}"
                         f" channels; {name} takes caption_channels={C} (T5-XXL: 4096)")
    if L > limit:
        raise ValueError(f"{conditions.source}: {L} caption tokens; {name} takes at most "
                         f"{limit}")
    null = learned_null(model)
    if guided and null is not None and L != len(null):
        raise ValueError(f"{conditions.source}: {L} caption tokens, but {name}'s learned null "
                         f"caption has {len(null)}: encode the prompts with "
                         f"max_length={len(null)}")
    if guided and null is None and conditions.null_embedding is None:
        raise ValueError(f"{name} holds no learned null caption: for guidance give the empty "
                         "prompt's encoding as 'null_embedding' (encode_prompts does), or "
                         "sample with cfg_scale=1")


def learned_null(model: nn.Module) -> Tensor | None:
    """A text model's learned null caption (L, C) (PixArt's y_embedding), or None."""
    return getattr(model.y_embedder, "y_embedding", None)


def condition_inputs(model: nn.Module, conditions: ClassLabels | Prompts, indices: list[int],
                     guided: bool, device, dtype: torch.dtype) -> dict[str, Tensor]:
    """The condition keyword arguments of `model`'s forward for sample `indices`: the
    conditional rows, then (`guided`) the null rows. DiT: y (B,); PT-DiT/S-Class: text (B,)
    labels; text models: text (B, L, C) and text_mask (B, L)."""
    config = model.config
    if config.condition == "class":
        labels = conditions.at(indices)
        if guided:
            labels = torch.cat([labels, torch.full_like(labels, config.num_classes)])
        return {"y" if config.family == "DiT" else "text": labels.to(device)}
    text, mask = conditions.at(indices)
    if guided:
        null = learned_null(model)
        if null is not None:
            null_text, null_mask = null[None].expand_as(text), mask
        else:
            null_text = conditions.null_embedding[None].expand_as(text)
            null_mask = conditions.null_mask[None].expand_as(mask)
        text = torch.cat([text, null_text.to(text)])
        mask = torch.cat([mask, null_mask.to(mask)])
    return {"text": text.to(device, dtype), "text_mask": mask.to(device)}
