"""analysis.metrics.clip_score: a small random CLIP loaded through clip.load from a local file
scores exactly the mean over pairs of 100 * max(cos, 0); captions from lists and files, long ones
truncated and counted; CLIP's preprocessing on tensors; the backbone named from its dimensions;
independent of the number of processes; missing weights and bad captions refused by name."""

import csv
import json
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import CenterCrop, Normalize, ToTensor

from analysis.metrics.clip_score import (
    MEAN,
    STD,
    backbone,
    clip_preprocess,
    clip_score,
    load_clip,
    read_captions,
)

from conftest import modules_at_failure

with warnings.catch_warnings():  # clip-anytorch imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import clip

# the tests call clip.load directly too, which tries torch.jit.load first
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")

TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
            vision_patch_size=8, context_length=77, vocab_size=49408, transformer_width=64,
            transformer_heads=1, transformer_layers=2)  # heads: build_model infers width // 64
WORDS = "cat dog red blue small large photo painting of a the on under tree house car".split()


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A small CLIP with clip-anytorch's own random initialisation, saved as a state dict;
    drawn again until its cosines on random pairs are negative about half the time (a fresh
    CLIP can embed every image and caption within 90 degrees), so scores exercise the clamp."""
    path = tmp_path_factory.mktemp("clip") / "tiny-clip.pt"
    for _ in range(50):
        model = clip.model.CLIP(**TINY).eval()
        negative = (cosines(model, random_images(64), random_captions(64)) < 0).double().mean()
        if 0.3 < negative < 0.7:
            torch.save(model.state_dict(), path)
            return path
    pytest.fail("no random CLIP of 50 had cosines of both signs")


def random_captions(n: int) -> list[str]:
    picks = torch.randint(0, len(WORDS), (n, 6)).tolist()
    return [" ".join(WORDS[i] for i in row) for row in picks]


def random_images(n: int, h: int = 40, w: int = 48) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8)


def cosines(model, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """cos(image embedding, text embedding) per pair, computed directly."""
    with torch.no_grad():
        image = model.encode_image(clip_preprocess(model.visual.input_resolution)(images))
        text = model.encode_text(clip.tokenize(captions, truncate=True))
    return F.cosine_similarity(image.double(), text.double(), dim=-1)


def test_clip_score_is_the_mean_over_pairs_of_clamped_cosines(clip_file):
    images, captions = random_images(32), random_captions(32)
    row = clip_score(images, captions, clip_weights=clip_file, batch_size=5)
    model, _ = clip.load(str(clip_file), device="cpu", jit=False)
    cos = cosines(model, images, captions)
    assert (cos < 0).any() and (cos > 0).any()  # both sides of the clamp are exercised
    assert row["clip_score"] == pytest.approx((100 * cos.clamp(min=0)).mean().item(), rel=1e-5)
    assert row["clip_score"] != pytest.approx(max(100 * cos.mean().item(), 0), rel=1e-3)
    assert row["convention"] == "mean over pairs of 100*max(cos,0)"
    assert "torchmetrics" in row["convention_note"] and row["n_pairs"] == 32
    assert row["weights_file"] == str(clip_file.resolve()) and len(row["weights_sha256"]) == 64
    assert row["backbone"] == "custom ViT (width 64, layers 2, patch 8, input 32 px)"
    assert row["input_resolution"] == 32 and row["context_length"] == 77
    assert row["dtype"] == "float32" and row["status"] == "ok" and row["batch"] == 5
    json.dumps(row, allow_nan=False)  # a results-store row


def test_batch_size_and_injected_model_give_the_same_score(clip_file):
    images, captions = random_images(7), random_captions(7)
    by_file = clip_score(images, captions, clip_weights=clip_file, batch_size=7)
    model, _ = load_clip(clip_file)
    injected = clip_score(images, captions, model=model, batch_size=2,
                          preprocess=clip_preprocess(32))
    assert injected["clip_score"] == pytest.approx(by_file["clip_score"], rel=1e-5)
    assert injected["weights_file"] is None and injected["preprocess"].startswith("custom")
    assert by_file["preprocess"].startswith("CLIP's")


def test_captions_over_77_tokens_are_truncated_and_counted(clip_file):
    captions = ["a " * 75, "a " * 76, "word " * 100] + random_captions(2)  # 75 + 2 tokens fit
    images = random_images(5)
    row = clip_score(images, captions, clip_weights=clip_file)
    assert row["captions_truncated"] == 2
    model, _ = load_clip(clip_file)
    expected = (100 * cosines(model, images, captions).clamp(min=0)).mean().item()
    assert row["clip_score"] == pytest.approx(expected, rel=1e-5)


def test_captions_from_text_csv_and_json_files_match_the_list(tmp_path, clip_file):
    images, names = random_images(5), ["b.png", "a.png", "e.png", "c.png", "d.png"]
    (tmp_path / "images").mkdir()
    for name, image in zip(names, images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / "images" / name)
    captions = dict(zip(names, random_captions(5)))
    in_order = [captions[n] for n in sorted(names)]
    (tmp_path / "captions.txt").write_text("\n".join(in_order) + "\n")
    with open(tmp_path / "captions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file", "caption"])
        writer.writerows(captions.items())
    (tmp_path / "captions.json").write_text(json.dumps({**captions, "unused.png": "extra"}))

    listed = clip_score(tmp_path / "images", in_order, clip_weights=clip_file)
    for name in ("captions.txt", "captions.csv", "captions.json"):
        row = clip_score(tmp_path / "images", tmp_path / name, clip_weights=clip_file)
        assert row["clip_score"] == pytest.approx(listed["clip_score"], rel=1e-12)
        assert row["captions_path"] == str(tmp_path / name)


@pytest.mark.parametrize("write, message", [
    (lambda p: p.with_suffix(".txt").write_text("one\ntwo\n"), "has 2 captions for 3 images"),
    (lambda p: p.with_suffix(".txt").write_text("one\n \nthree\n"), "line 2 is empty"),
    (lambda p: p.with_suffix(".csv").write_text("file,caption\n000000,x\n000001,y\n"),
     "no caption for image '000002'"),
    (lambda p: p.with_suffix(".csv").write_text("name,text\n000000,x\n"),
     "allowed: a header with the columns file, caption"),
    (lambda p: p.with_suffix(".csv").write_text("file,caption\n000000,x\n000000,y\n"),
     "a second caption for '000000'"),
    (lambda p: p.with_suffix(".json").write_text('["x", "y", "z"]'), "allowed JSON is one object"),
    (lambda p: p.with_suffix(".json").write_text('{"000000": "x", "000001": "", "000002": "z"}'),
     "image '000001' is empty"),
])
def test_bad_caption_files_are_refused_by_name(tmp_path, write, message):
    write(tmp_path / "captions")
    path = next(tmp_path.iterdir())
    with pytest.raises(ValueError, match=message):
        read_captions(path, ["000000", "000001", "000002"])


def test_bad_caption_lists_and_missing_files_are_refused(tmp_path):
    names = ["000000", "000001"]
    with pytest.raises(ValueError, match="captions list has 3 captions for 2 images"):
        read_captions(["x", "y", "z"], names)
    with pytest.raises(ValueError, match=r"caption 1 \(image '000001'\) is empty"):
        read_captions(["x", "  "], names)
    with pytest.raises(ValueError, match="nowhere.txt' does not exist"):
        read_captions(tmp_path / "nowhere.txt", names)


# ----------------------------------------------------------------------------------------------
# Preprocessing and backbones
# ----------------------------------------------------------------------------------------------

def levels(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest difference of two normalised batches, in uint8 levels."""
    return round(((a - b).abs() * torch.tensor(STD).view(1, 3, 1, 1) * 255).max().item())


@pytest.mark.parametrize("resolution", [32, 224])
def test_preprocessing_matches_pil_bicubic_resize_crop_normalise(resolution):
    """Pixel noise against Pillow's classic order (horizontal pass, then vertical), which CLIP's
    published numbers were computed with."""
    for _ in range(6):
        h, w = torch.randint(8, 300, (2,)).tolist()
        images = random_images(2, h, w)
        H, W = ((resolution, int(resolution * w / h)) if h <= w
                else (int(resolution * h / w), resolution))

        def pil(image, W=W, H=H, h=h):
            im = Image.fromarray(image.permute(1, 2, 0).numpy())
            im = im.resize((W, h), Image.BICUBIC).resize((W, H), Image.BICUBIC)
            return Normalize(MEAN, STD)(ToTensor()(CenterCrop(resolution)(im)))
        ours = clip_preprocess(resolution)(images)
        assert ours.shape == (2, 3, resolution, resolution) and ours.dtype == torch.float32
        assert levels(ours, torch.stack([pil(i) for i in images])) <= 2


def test_preprocessing_matches_clip_loads_own_on_smooth_images(clip_file):
    _, pil_preprocess = clip.load(str(clip_file), device="cpu", jit=False)
    for _ in range(4):
        h, w = torch.randint(20, 120, (2,)).tolist()
        coarse = torch.rand(2, 3, 5, 6) * 175 + 40  # inside [0, 255] after bicubic overshoot
        images = F.interpolate(coarse, (h, w), mode="bilinear").round().to(torch.uint8)
        expected = torch.stack([pil_preprocess(Image.fromarray(i.permute(1, 2, 0).numpy()))
                                for i in images])
        assert levels(clip_preprocess(32)(images), expected) <= 2


def test_backbone_is_named_from_the_model_dimensions():
    published = {
        "ViT-B/32": dict(embed_dim=512, image_resolution=224, vision_layers=12, vision_width=768,
                         vision_patch_size=32),
        "ViT-L/14": dict(embed_dim=768, image_resolution=224, vision_layers=24,
                         vision_width=1024, vision_patch_size=14),
        "ViT-L/14@336px": dict(embed_dim=768, image_resolution=336, vision_layers=24,
                               vision_width=1024, vision_patch_size=14),
        "RN50": dict(embed_dim=1024, image_resolution=224, vision_layers=(3, 4, 6, 3),
                     vision_width=64, vision_patch_size=None),
    }
    text = dict(context_length=77, vocab_size=49408, transformer_width=512,
                transformer_heads=8, transformer_layers=12)
    for name, dims in published.items():
        with torch.device("meta"):  # shapes only: no memory, no time
            model = clip.model.CLIP(**dims, **text)
        assert backbone(model) == name
    with torch.device("meta"):
        model = clip.model.CLIP(**{**published["RN50"], "vision_width": 32}, **text)
    assert backbone(model) == "custom ResNet (width 32, blocks (3, 4, 6, 3), input 224 px)"


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

def _clip_worker(rank, world_size, init, samples, captions, weights, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank,
                                         world_size=world_size)
    try:
        row = clip_score(samples, captions, clip_weights=weights, batch_size=1)
        (out / f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters import torch, torchvision and clip: 20-40 s on 2 cores
def test_clip_score_does_not_depend_on_the_number_of_processes(tmp_path, clip_file):
    captions = random_captions(8) + ["word " * 90]  # 9 pairs: shards of 5 and 4
    np.savez(tmp_path / "samples.npz", random_images(9).permute(0, 2, 3, 1).numpy())
    one = clip_score(tmp_path / "samples.npz", captions, clip_weights=clip_file, batch_size=1)
    torch.multiprocessing.spawn(_clip_worker, nprocs=2, args=(
        2, f"file://{tmp_path}/rendezvous", tmp_path / "samples.npz", captions, clip_file,
        tmp_path))
    for rank in range(2):
        row = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert row["clip_score"] == pytest.approx(one["clip_score"], rel=1e-9)
        assert row["n_pairs"] == 9 and row["captions_truncated"] == 1
        assert row["world_size"] == 2


# ----------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------



def test_missing_clip_weights_fail_at_once_naming_file_source_and_flag(tmp_path, monkeypatch,
                                                                       no_network):
    monkeypatch.delenv("PTDIT_CLIP_WEIGHTS", raising=False)
    images, captions = random_images(2), random_captions(2)
    with pytest.raises(FileNotFoundError) as err:
        clip_score(images, captions, clip_weights=None)
    for part in ("ViT-B-32.pt", "openaipublic.azureedge.net/clip/models", "--clip-weights",
                 "PTDIT_CLIP_WEIGHTS"):
        assert part in str(err.value)
    monkeypatch.setenv("PTDIT_CLIP_WEIGHTS", str(tmp_path / "ViT-L-14.pt"))
    with pytest.raises(FileNotFoundError, match=r"ViT-L-14.pt' \(from \$PTDIT_CLIP_WEIGHTS"):
        clip_score(images, captions)
    assert no_network == []


def test_missing_clip_weights_fail_before_clip_is_imported(monkeypatch):
    """The weights check comes before clip (and the torchvision it pulls in) is imported."""
    monkeypatch.delenv("PTDIT_CLIP_WEIGHTS", raising=False)
    error, imported = modules_at_failure("""
        import torch
        from analysis.metrics.clip_score import clip_score
        clip_score(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a cat", "a dog"],
                   clip_weights=None)""")
    assert error.startswith("FileNotFoundError(") and "--clip-weights" in error
    assert "analysis" in imported and not imported & {"clip", "torchvision"}


def test_a_broken_clip_file_is_named(tmp_path, no_network):
    path = tmp_path / "ViT-B-32.pt"
    path.write_bytes(bytes(torch.randint(0, 256, (256,)).tolist()))
    with pytest.raises(ValueError, match="ViT-B-32.pt' cannot be loaded by clip.load"):
        clip_score(random_images(2), random_captions(2), clip_weights=path)
    assert no_network == []


@pytest.mark.parametrize("name, content, message", [
    ("captions.txt", "un café\nthé\n".encode("latin-1"), "is not UTF-8 text"),
    ("captions.csv", "file,caption\n000000,café\n".encode("latin-1"), "is not UTF-8 text"),
    ("captions.json", b'{"000000": "x", "000001": }', "is not valid JSON .line 1 column"),
])
def test_unreadable_caption_files_are_named_with_the_problem(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=f"captions file '.*{name}' {message}"):
        read_captions(tmp_path / name, ["000000", "000001"])


def test_a_folder_given_as_captions_is_named_as_a_folder(tmp_path):
    (tmp_path / "captions").mkdir()
    with pytest.raises(ValueError, match="captions' is a folder; allowed: a text file"):
        read_captions(tmp_path / "captions", ["000000"])


def test_an_empty_clip_weights_file_says_so(tmp_path, no_network):
    (tmp_path / "ViT-B-32.pt").write_bytes(b"")
    with pytest.raises(ValueError, match=r"ViT-B-32.pt' .*is empty \(0 bytes\); expected"):
        clip_score(random_images(2), random_captions(2), clip_weights=tmp_path / "ViT-B-32.pt")
