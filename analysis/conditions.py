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

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from .offline import T5, go_offline

PTDIT_TEXT_TOKENS = 200   # T5 tokens of the released PT-DiT (docs/ptdit_release.md §1)
EMBEDDING_KEYS = ("embeddings", "mask", "null_embedding", "null_mask")


class ClassLabels:
    """Class labels as runs of consecutive labels (ranges), so "0-99999999" costs one run;
    sample i takes label i % N of the N listed. Built from ints, a (N,) tensor or ranges."""

    def __init__(self, labels: Tensor | Sequence[int] | Sequence[range]):
        if isinstance(labels, Tensor):
            labels = labels.tolist()
        runs: list[range] = []
        for item in labels:
            run = item if isinstance(item, range) else range(int(item), int(item) + 1)
            if run.step != 1 or run.stop <= run.start:
                raise ValueError(f"class labels: {run!r} is not a non-empty run of "
                                 "consecutive labels")
            if runs and runs[-1].stop == run.start:   # "0-4,5-9" is the run 0..9
                runs[-1] = range(runs[-1].start, run.stop)
            else:
                runs.append(run)
        if not runs:
            raise ValueError("class labels: no labels given")
        self.runs = tuple(runs)

    @property
    def count(self) -> int:
        """N, the number of labels listed (a Python int: any size)."""
        return sum(run.stop - run.start for run in self.runs)

    def __len__(self) -> int:
        return self.count

    def __eq__(self, other) -> bool:
        return isinstance(other, ClassLabels) and self.runs == other.runs

    def __repr__(self) -> str:
        return f"ClassLabels({describe_runs(self.runs)})"

    @property
    def labels(self) -> Tensor:
        """(N,) int64, every label listed; ValueError above 10^7 labels (use `at`)."""
        if self.count > 10**7:
            raise ValueError(f"class labels {describe_runs(self.runs)}: {self.count} labels "
                             "are too many to list; index them with at()")
        return torch.cat([torch.arange(run.start, run.stop, dtype=torch.int64)
                          for run in self.runs])

    def at(self, indices: Sequence[int] | Tensor) -> Tensor:
        """(B,) int64, the labels of sample `indices` (label i % N)."""
        k = torch.as_tensor(list(indices), dtype=torch.int64) % self.count
        sizes = torch.tensor([run.stop - run.start for run in self.runs])
        ends = sizes.cumsum(0)
        run = torch.searchsorted(ends, k, right=True)                # the run holding k
        return torch.tensor([r.start for r in self.runs])[run] + k - (ends - sizes)[run]

    def outside(self, low: int, high: int) -> tuple[list[int], int]:
        """The first (up to 8, sorted) labels outside low..high (inclusive), and how many are."""
        bad, count = [], 0
        for run in self.runs:
            for part in (range(run.start, min(run.stop, low)),
                         range(max(run.start, high + 1), run.stop)):
                if part.stop > part.start:
                    count += part.stop - part.start
                    bad.extend(part[:8])
        return sorted(set(bad))[:8], count

    def fingerprint(self) -> str:
        """sha256 of the label runs: equal for equal label lists however they were written."""
        text = ",".join(f"{run.start}-{run.stop - 1}" for run in self.runs)
        return hashlib.sha256(f"class labels {text}".encode()).hexdigest()


def describe_runs(runs: Sequence[range], limit: int = 4) -> str:
    """'0-999' style text of label runs, the first `limit` of them."""
    parts = [str(r.start) if r.stop - r.start == 1 else f"{r.start}-{r.stop - 1}"
             for r in runs[:limit]]
    return ",".join(parts) + (f",… ({len(runs)} runs)" if len(runs) > limit else "")


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

    def at(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """(B, L, C) embeddings and (B, L) masks of sample indices."""
        rows = torch.as_tensor(list(indices), dtype=torch.int64) % len(self)
        return self.embeddings[rows], self.mask[rows]

    def fingerprint(self) -> str:
        """sha256 over the tensors (dtype, shape and bytes) that condition the samples."""
        digest = hashlib.sha256(b"prompt embeddings")
        for name in EMBEDDING_KEYS:
            tensor = getattr(self, name)
            digest.update(f"|{name}:".encode())
            if tensor is not None:
                tensor = tensor.detach().cpu().contiguous()
                digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes()
                              if tensor.numel() else b"")
        return digest.hexdigest()


#################################################################################
#                                 Class labels                                  #
#################################################################################

def _parse_labels(text: str, source: str) -> list[range]:
    runs = []
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
        runs.append(range(lo, hi + 1))   # a range, never a list: "0-99999999999" is cheap
    if not runs:
        raise ValueError(f"class labels {source}: no labels given")
    return runs


def class_conditions(spec: str | os.PathLike | list[int] | tuple[int, ...] | Tensor
                     ) -> ClassLabels:
    """Class labels from "1,2,3", "0-999", "0,5-9", a file of one label per line, or ints."""
    if isinstance(spec, ClassLabels):
        return spec
    if isinstance(spec, Tensor):
        spec = spec.tolist()
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(v, int) and v >= 0 for v in spec):
            raise ValueError(f"class labels must be non-negative ints, got {list(spec)[:8]}")
        return ClassLabels(spec)
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and os.path.isfile(spec)):
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"class label file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"class label file {str(path)!r} is not UTF-8 text ({err.reason} "
                             f"at byte {err.start}); expected one label per line") from None
        return ClassLabels(_parse_labels(text, f"file {str(path)!r}"))
    if isinstance(spec, str):
        return ClassLabels(_parse_labels(spec, repr(spec)))
    raise ValueError(f"class labels must be a string, a file or ints, got "
                     f"{type(spec).__name__}")


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


def _check_finite(embeddings: Tensor, what: str, row: str) -> None:
    """ValueError naming the first row (prompt) of (N, L, C) `embeddings` with a NaN or Inf."""
    bad = ~torch.isfinite(embeddings).flatten(1).all(1)
    if bad.any():
        first = int(bad.nonzero()[0])
        where = f" (first in {row} {first}, {int(bad.sum())} of {len(bad)} {row}s)" if row else ""
        raise ValueError(f"{what} holds NaN or infinite values{where}; allowed: finite floats "
                         "(a T5 encoder's output)")


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
    _check_finite(embeddings, f"{source}: 'embeddings'", "prompt")
    mask = _check_mask(mask, (N, L), f"{source}: 'mask'")
    if null_embedding is not None:
        if not isinstance(null_embedding, Tensor) or tuple(null_embedding.shape) != (L, C) \
                or not null_embedding.is_floating_point():
            got = (tuple(null_embedding.shape) if isinstance(null_embedding, Tensor)
                   else type(null_embedding).__name__)
            raise ValueError(f"{source}: 'null_embedding' must be a float ({L}, {C}) tensor "
                             f"like one prompt's embeddings, got {got}")
        _check_finite(null_embedding[None], f"{source}: 'null_embedding'", "")
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
    if path.suffix not in (".safetensors", ".pt"):
        hint = (" (a text file of prompts goes to --prompts, with --t5)"
                if path.suffix in (".txt", ".csv", ".json", "") else "")
        raise ValueError(f"prompt embeddings {str(path)!r}: unknown file type {path.suffix!r}; "
                         f"allowed: .safetensors, .pt{hint}")
    expected = ("expected a .safetensors file" if path.suffix == ".safetensors" else
                "expected a torch.save'd dict of tensors")
    expected += " with embeddings (N, L, C) and mask (N, L)"
    if path.stat().st_size == 0:
        raise ValueError(f"prompt embeddings {str(path)!r} is empty (0 bytes); {expected}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            tensors = load_file(path)
        else:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:   # damaged, truncated, text, or a pickle of other objects
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"prompt embeddings {str(path)!r} cannot be read ({reason}); "
                         f"{expected}") from None
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
        bad, count = conditions.outside(0, num_classes - 1)   # from the runs: no list
        if count:
            more = f" and {count - len(bad)} more" if count > len(bad) else ""
            raise ValueError(f"class labels {bad}{more} out of range for {name}: allowed "
                             f"0..{num_classes - 1} (given: {describe_runs(conditions.runs)})")
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
