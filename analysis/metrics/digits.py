"""A small digits classifier, trained here, and the Fréchet distance in its feature space
(`fd_digits_classifier`): a quality score for generators trained on the `digits` set
(analysis.training.datasets) that needs no downloaded weights. It is not FID and not comparable
with FID:
the features are this classifier's, not Inception's.

- The classifier (DigitsClassifier) is a 3-layer CNN on grey (N, 1, S, S) images in [-1, 1]; its
  features are the SiLU activations of the hidden layer before the logits (FEATURE_DIM). SiLU
  rather than ReLU: no unit is exactly 0 on every image, so the features' covariance has full
  rank and its matrix square root is well conditioned.
- make_classifier trains it on the digits train split, deterministically: the seed fixes the
  initial weights, the batch order and the shifts; training runs on one CPU thread (the same
  weights whatever the thread count, and fastest for a network this small).
- classifier() loads it from the cache folder ($PTDIT_CACHE, else ~/.cache/ptdit), as
  `digits_classifier_{S}px.safetensors` whose metadata holds the training info, or makes it.
- fd_digits: torchmetrics' FrechetInceptionDistance with DigitsFeatures as its feature module;
  statistics and distance in float64. Its floor is the same distance between the digits test
  split (360 images) and train split (1,437): what a generator of unseen digits as good as the
  data would score. Like FID, the estimate is biased upwards at small sample counts, so compare
  distances from equal numbers of samples, and read the floor as the value at 360.
"""

import json
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from bench.rows import check_row, device_label, provenance

from ..hashing import tensors_sha256
from ..images import image_size, read_images
from ..training.datasets import load
from . import source_name

NUM_CLASSES = 10
FEATURE_DIM = 128
CHANNELS = (16, 32, 32)
POOLED = 4                 # the last feature map is average-pooled to POOLED x POOLED
MIN_SIZE = 16              # smaller inputs leave the strided convolutions too little
EPOCHS, BATCH_SIZE, LEARNING_RATE = 12, 64, 3e-3
FORMAT = "ptdit digits classifier 1"
COMMAND = "ptdit digits-classifier --size {size}"
REFERENCES = ("train", "test")
METRIC = "fd_digits_classifier"
PREPROCESSING = ("grey = mean of the RGB channels (1-channel input as is); resized to the "
                 "classifier's size with torch bilinear (antialias on, align_corners=False) when "
                 "it differs; files read as uint8 p and mapped to p / 127.5 - 1")


class DigitsClassifier(nn.Module):
    """A small CNN over grey digits (N, 1, S, S) in [-1, 1]: 10 logits, and the penultimate
    activations as features."""

    def __init__(self):
        super().__init__()
        c1, c2, c3 = CHANNELS
        self.conv1 = nn.Conv2d(1, c1, 5, stride=2, padding=2)    # S -> S/2
        self.conv2 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)   # S/2 -> S/4
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(POOLED)                 # any S -> POOLED x POOLED
        self.hidden = nn.Linear(c3 * POOLED * POOLED, FEATURE_DIM)
        self.head = nn.Linear(FEATURE_DIM, NUM_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """(N, 1, S, S) in [-1, 1] -> penultimate activations (N, FEATURE_DIM)."""
        x = F.silu(self.conv1(x))                       # (N, c1, S/2, S/2)
        x = F.silu(self.conv2(x))                       # (N, c2, S/4, S/4)
        x = F.silu(self.conv3(x))                       # (N, c3, S/4, S/4)
        x = self.pool(x).flatten(1)                     # (N, c3 * POOLED^2)
        return F.silu(self.hidden(x))                   # (N, FEATURE_DIM)

    def forward(self, x: Tensor) -> Tensor:
        """(N, 1, S, S) in [-1, 1] -> logits (N, 10)."""
        return self.head(self.features(x))


class DigitsFeatures(nn.Module):
    """A classifier's features as torchmetrics' FrechetInceptionDistance takes a custom feature
    module: `num_features` set (so it runs no dummy forward), float input (the metric passes
    images through unchanged, `normalize` only picks the dummy input's dtype), float64 output
    (the metric casts its distance back to the features' dtype)."""

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier, self.num_features = classifier, FEATURE_DIM

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        return self.classifier.features(images).double()  # (N, 1, S, S) -> (N, D) float64


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------

def _check_size(size) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size < MIN_SIZE:
        raise ValueError(f"size {size!r}; allowed: an int >= {MIN_SIZE} (the classifier's "
                         "pixels per side; smaller samples are upsampled to it)")
    return size


def _shifted(images: Tensor, shift: int, generator: torch.Generator) -> Tensor:
    """Each image moved by a random whole number of pixels in [-shift, shift] along each axis,
    the uncovered border filled with -1 (the digits' background)."""
    n, _, size, _ = images.shape
    padded = F.pad(images, (shift,) * 4, value=-1.0)
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator).tolist()
    return torch.stack([padded[k, :, dy:dy + size, dx:dx + size]
                        for k, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def _logits(model: DigitsClassifier, images: Tensor, batch_size: int = 512) -> Tensor:
    return torch.cat([model(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def accuracy(model: DigitsClassifier, images: Tensor, labels: Tensor) -> float:
    """The fraction of `images` (N, 1, S, S) whose predicted class is `labels` (N,)."""
    return (_logits(model, images).argmax(1) == labels).double().mean().item()


def make_classifier(size: int = 32, seed: int = 0, *,
                    epochs: int = EPOCHS) -> tuple[DigitsClassifier, dict]:
    """A DigitsClassifier trained on the digits train split at `size` px, and its info
    (held-out test accuracy, epochs, seed, weights sha256, the recipe). Deterministic: the same
    weights for the same arguments on one machine; about 5 s at 32 px on one CPU thread.

    Recipe: Adam with a one-cycle learning rate up to LEARNING_RATE, batches of BATCH_SIZE in a
    seeded random order, each image shifted by up to max(1, size // 16) px (a quarter of a digit
    pixel), cross-entropy."""
    _check_size(size)
    train, test = load("digits", size=size, split="train"), load("digits", size=size, split="test")
    shift = max(1, size // 16)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):   # seeds the initial weights, leaves the caller's
            torch.manual_seed(seed)
            model = DigitsClassifier()
        generator = torch.Generator().manual_seed(seed)
        steps = epochs * -(-len(train.labels) // BATCH_SIZE)
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=LEARNING_RATE,
                                                       total_steps=steps)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(len(train.labels), generator=generator)
            for i in range(0, len(order), BATCH_SIZE):
                batch = order[i:i + BATCH_SIZE]
                images = _shifted(train.images[batch], shift, generator)
                loss = F.cross_entropy(model(images), train.labels[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                schedule.step()
        model.eval()
        test_accuracy = accuracy(model, test.images, test.labels)
    finally:
        torch.set_num_threads(threads)
    info = {"format": FORMAT, "size": size, "seed": seed, "epochs": epochs,
            "test_accuracy": test_accuracy, "test_count": len(test.labels),
            "train_count": len(train.labels), "weights_sha256": tensors_sha256(model),
            "recipe": f"Adam, one-cycle lr up to {LEARNING_RATE}, batch {BATCH_SIZE}, random "
                      f"shifts of up to {shift} px (fill -1), cross-entropy, 1 CPU thread",
            "digits_test_indices_sha256": test.info["test_indices_sha256"],
            "torch": torch.__version__}
    return model, info


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

def cache_file(size: int, cache_dir: str | os.PathLike | None = None) -> Path:
    """`digits_classifier_{size}px.safetensors` in `cache_dir`, else $PTDIT_CACHE, else
    ~/.cache/ptdit."""
    folder = cache_dir or os.environ.get("PTDIT_CACHE") or Path.home() / ".cache" / "ptdit"
    return Path(folder).expanduser() / f"digits_classifier_{size}px.safetensors"


def _write(path: Path, model: DigitsClassifier, info: dict) -> None:
    """Writes atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        save_file(model.state_dict(), tmp, metadata={"format": FORMAT, "info": json.dumps(info)})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read(path: Path, size: int) -> tuple[DigitsClassifier, dict]:
    remake = f"delete it or run `{COMMAND.format(size=size)}` to remake it"
    try:
        with safe_open(path, "pt") as f:
            metadata = f.metadata() or {}
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise ValueError(f"digits classifier file {str(path)!r} cannot be read ({err}); "
                         f"{remake}") from err
    info = json.loads(metadata.get("info", "{}"))
    if metadata.get("format") != FORMAT or info.get("size") != size:
        raise ValueError(f"digits classifier file {str(path)!r} holds format "
                         f"{metadata.get('format')!r} at size {info.get('size')!r}; this code "
                         f"reads {FORMAT!r} at size {size}: {remake}")
    model = DigitsClassifier()
    model.load_state_dict(state)
    if tensors_sha256(model) != info["weights_sha256"]:
        raise ValueError(f"digits classifier file {str(path)!r}: its weights' sha256 differs "
                         f"from the one its metadata records; {remake}")
    return model.eval(), info


def _classifier(size: int, cache_dir, make: bool) -> DigitsClassifier:
    """classifier(); apart so that fd_digits, whose argument `classifier` hides the public
    name, can call it."""
    path = cache_file(_check_size(size), cache_dir)
    if path.is_file():
        return _read(path, size)[0]
    if not make:
        raise FileNotFoundError(f"no digits classifier at {str(path)!r}; make it with "
                                f"`{COMMAND.format(size=size)}` (trains for seconds on a CPU)")
    model, info = make_classifier(size)
    try:
        _write(path, model, info)
    except OSError as err:   # a read-only cache costs the next run a retraining, nothing more
        warnings.warn(f"could not cache the digits classifier at {str(path)!r}: {err}",
                      stacklevel=3)
    return model


def classifier(size: int = 32, *, cache_dir: str | os.PathLike | None = None,
               make: bool = True) -> DigitsClassifier:
    """The cached DigitsClassifier for `size` px (cache_file), in eval mode; made and cached when
    missing if `make`, else FileNotFoundError naming the command that makes it."""
    return _classifier(size, cache_dir, make)


def main_make(size: int, cache_dir: str | os.PathLike | None = None) -> dict:
    """`ptdit digits-classifier`: trains the classifier for `size` px, writes it to the cache
    (replacing any there) and returns its info with the file's path."""
    model, info = make_classifier(_check_size(size))
    path = cache_file(size, cache_dir)
    _write(path, model, info)
    return {**info, "path": str(path)}


# ----------------------------------------------------------------------------------------------
# Fréchet distance
# ----------------------------------------------------------------------------------------------

def fd_metric(model: DigitsClassifier):
    """torchmetrics' FrechetInceptionDistance over `model`'s features (DigitsFeatures)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    return FrechetInceptionDistance(feature=DigitsFeatures(model.eval()), normalize=True)


STATES = ("features_sum", "features_cov_sum", "features_num_samples")
_references: dict[tuple, dict] = {}   # (size, weights sha256) -> the digits splits' statistics


def _digits_statistics(model: DigitsClassifier, sha: str, size: int, batch_size: int) -> dict:
    """The metric's feature states of the digits train and test splits, the floor (the test
    split's distance to the train split) and the classifier's test accuracy; computed once per
    process per (size, weights)."""
    key = (size, sha)
    if key not in _references:
        train, test = (load("digits", size=size, split=split) for split in REFERENCES)
        metric = fd_metric(model)
        for i in range(0, len(train.images), batch_size):
            metric.update(train.images[i:i + batch_size], real=True)
        for i in range(0, len(test.images), batch_size):
            metric.update(test.images[i:i + batch_size], real=False)
        _references[key] = {
            "train": {name: getattr(metric, f"real_{name}").clone() for name in STATES},
            "test": {name: getattr(metric, f"fake_{name}").clone() for name in STATES},
            "floor": float(metric.compute()),
            "test_accuracy": accuracy(model, test.images, test.labels)}
    return _references[key]


def _grey(samples, size: int) -> Tensor:
    """`samples` as grey (N, 1, size, size) float32 in [-1, 1] (PREPROCESSING)."""
    if isinstance(samples, Tensor):
        if samples.dim() != 4 or samples.shape[1] not in (1, 3) or not samples.is_floating_point():
            raise ValueError(f"samples: tensor {tuple(samples.shape)} {samples.dtype}; allowed: "
                             "float (N, C, H, W) with C 1 or 3, values in [-1, 1]")
        if not torch.isfinite(samples).all():
            raise ValueError("samples hold NaN or infinite values; allowed: floats in [-1, 1]")
        low, high = samples.min().item(), samples.max().item()
        if low < -1 or high > 1:
            raise ValueError(f"samples span [{low:g}, {high:g}]; allowed: [-1, 1] (clamp the "
                             "sampler's output first)")
        images = samples.detach().float().cpu()
    else:
        images = torch.cat([b.float() for b in read_images(samples, batch_size=256, rank=0,
                                                             world_size=1)]).div(127.5).sub(1)
    height, width = images.shape[2:]
    if height != width:
        raise ValueError(f"samples are {height}x{width} (HxW); allowed: square images")
    images = images.mean(1, keepdim=True)                                    # (N, 1, H, W)
    if height != size:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                               antialias=True)
    return images.contiguous()


def fd_digits(samples, *, labels=None, size: int = 32, reference: str = "train",
              classifier: DigitsClassifier | None = None, batch_size: int = 256) -> dict:
    """The Fréchet distance between `samples` and the digits `reference` split in the digits
    classifier's feature space, as one results row (`metric`: "fd_digits_classifier").

    samples: a float tensor (N, C, H, W) in [-1, 1], C 1 or 3, or a folder of images (or an
        ADM .npz) as `ptdit sample` writes; made grey and resized as PREPROCESSING says.
    labels: the classes (N,) the samples were meant to show, for `sample_accuracy`, or None.
    size: the classifier's input size in pixels.
    reference: the digits split compared with: "train" or "test".
    classifier: a DigitsClassifier, else the cached one for `size` (made if missing).
    Returns the row: `fd` (clamped at 0; `fd_raw` before), `fd_floor` (test split against train
    split), `sample_accuracy` (None without labels), `n_samples`, `reference`, `n_reference`,
    `n_floor`, `classifier_sha256`, `classifier_test_accuracy`, `size`, the settings and the
    results-row fields (bench.rows). Runs on the CPU.
    """
    _check_size(size)
    if reference not in REFERENCES:
        raise ValueError(f"reference {reference!r}; allowed: {', '.join(REFERENCES)}")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size {batch_size!r}; allowed: a positive int")
    model = (classifier if classifier is not None else _classifier(size, None, True)).eval()
    device = next(model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"classifier on {device}; allowed: a CPU module (the metric runs on the "
                         "CPU; move it with .cpu())")
    images = _grey(samples, size)
    n = len(images)
    if n < 2:
        raise ValueError(f"samples: {n} image; allowed: at least 2 (a covariance needs 2)")
    if labels is not None:
        labels = torch.as_tensor(labels)
        if labels.shape != (n,) or labels.is_floating_point() or not (
                (labels >= 0) & (labels < NUM_CLASSES)).all():
            raise ValueError(f"labels: {tuple(labels.shape)} {labels.dtype}; allowed: integer "
                             f"class ids in [0, {NUM_CLASSES}) of shape ({n},)")
    sha = tensors_sha256(model)
    digits = _digits_statistics(model, sha, size, batch_size)
    metric = fd_metric(model)
    for name in STATES:   # the reference split's statistics, as if updated with its images
        getattr(metric, f"real_{name}").copy_(digits[reference][name])
    for i in range(0, n, batch_size):
        metric.update(images[i:i + batch_size], real=False)
    raw = float(metric.compute())
    sample_accuracy = None if labels is None else accuracy(model, images, labels.long())

    import torchmetrics  # loaded by fd_metric
    side = int(samples.shape[2]) if isinstance(samples, Tensor) else image_size(samples)[0]
    row = {**provenance(device_label("cpu"), f"torchmetrics {torchmetrics.__version__} "
                        "FrechetInceptionDistance (custom feature module)", "float32"),
           "model": None, "resolution": side, "latent_frames": None, "tokens": None,
           "batch": batch_size, "status": "ok", "metric": METRIC,
           "samples_path": source_name(samples), "image_height_px": side, "image_width_px": side,
           "fd": max(raw, 0.0), "fd_raw": raw, "fd_floor": digits["floor"],
           "sample_accuracy": sample_accuracy, "n_samples": n, "reference": f"digits {reference}",
           "n_reference": int(digits[reference]["features_num_samples"]),
           "n_floor": int(digits["test"]["features_num_samples"]),
           "classifier_sha256": sha, "classifier_test_accuracy": digits["test_accuracy"],
           "size": size,
           "feature_extractor": "ptdit DigitsClassifier penultimate SiLU activations",
           "feature_dim": FEATURE_DIM, "preprocessing": PREPROCESSING,
           "statistics_dtype": "float64"}
    check_row(row)
    return row
