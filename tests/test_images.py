"""analysis.images: folders, ADM-style .npz and tensors read as uint8 (B, 3, H, W) batches, in
sorted order, sharded by index % world_size, and every bad input refused by name."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.images import (
    FLOAT_INPUT,
    UINT8_INPUT,
    _npz_chunks,
    check_images,
    count_images,
    image_names,
    image_size,
    quantisation,
    read_images,
)


def random_images(n: int, h: int = 6, w: int = 5) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8)


def nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


def write_folder(folder, images: torch.Tensor, names: list[str]) -> None:
    folder.mkdir(exist_ok=True)
    for name, array in zip(names, nhwc(images)):  # webp is lossy unless told otherwise
        Image.fromarray(array).save(folder / name, lossless=True)


def read_all(source, batch_size=4, **shard) -> torch.Tensor:
    batches = list(read_images(source, batch_size=batch_size, **shard))
    for batch in batches:
        assert batch.dtype == torch.uint8 and batch.dim() == 4 and batch.shape[1] == 3
        assert batch.is_contiguous() and len(batch) <= batch_size
    return torch.cat(batches)


def test_folder_is_read_in_sorted_name_order_and_other_files_are_ignored(tmp_path):
    images = random_images(5)
    names = ["b.png", "a.PNG", "c.bmp", "e.webp", "d.png"]  # lossless formats: exact pixels
    write_folder(tmp_path, images, names)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "sub.png").mkdir()  # a folder, not an image file
    order = sorted(range(5), key=lambda i: names[i])
    assert image_names(tmp_path) == [names[i] for i in order]
    assert count_images(tmp_path) == 5 and image_size(tmp_path) == (6, 5)
    assert torch.equal(read_all(tmp_path, batch_size=2), images[order])


def test_grayscale_palette_and_rgba_files_are_converted_to_rgb(tmp_path):
    gray = torch.randint(0, 256, (6, 5), dtype=torch.uint8).numpy()
    rgba = torch.randint(0, 256, (6, 5, 4), dtype=torch.uint8).numpy()
    Image.fromarray(gray).save(tmp_path / "0.png")
    Image.fromarray(rgba).save(tmp_path / "1.png")
    Image.fromarray(rgba[..., :3]).convert("P").save(tmp_path / "2.png")
    batch = read_all(tmp_path)
    assert batch.shape == (3, 3, 6, 5)
    assert torch.equal(batch[0], torch.from_numpy(gray).expand(3, 6, 5))
    assert torch.equal(batch[1], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))
    palette = np.array(Image.open(tmp_path / "2.png").convert("RGB"))
    assert torch.equal(batch[2], torch.from_numpy(palette).permute(2, 0, 1))


@pytest.mark.parametrize("save", [np.savez, np.savez_compressed])
def test_npz_reads_arr_0_nhwc_by_slices(tmp_path, save):
    images = random_images(11, 7, 4)
    path = tmp_path / "samples.npz"
    save(path, nhwc(images), labels=np.arange(11))  # arr_0 + another key, as ADM writes
    assert count_images(path) == 11 and image_size(path) == (7, 4)
    assert image_names(path) == [f"{i:06d}" for i in range(11)]
    assert torch.equal(read_all(path, batch_size=3), images)


def test_uncompressed_npz_is_memory_mapped_not_loaded(tmp_path):
    path = tmp_path / "samples.npz"
    np.savez(path, nhwc(random_images(6)))
    chunk = next(_npz_chunks(path, 4))
    assert isinstance(chunk, np.memmap) and chunk.shape == (4, 6, 5, 3)


@pytest.mark.parametrize("world_size", [2, 3])
def test_shards_are_index_mod_world_size_and_cover_the_set_once(tmp_path, world_size):
    images = random_images(10)
    np.savez(tmp_path / "s.npz", nhwc(images))
    write_folder(tmp_path / "f", images, [f"{i:02d}.png" for i in range(10)])
    for source in (images, tmp_path / "s.npz", tmp_path / "f"):
        for rank in range(world_size):
            shard = read_all(source, batch_size=2, rank=rank, world_size=world_size)
            assert torch.equal(shard, images[rank::world_size])


def test_float_tensors_in_0_1_are_rounded_to_uint8():
    images = torch.rand(4, 3, 5, 5, dtype=torch.float64)
    assert torch.equal(read_all(images), (images * 255).round().to(torch.uint8))
    assert quantisation(images) == FLOAT_INPUT and quantisation(random_images(2)) == UINT8_INPUT


@pytest.mark.parametrize("images, message", [
    (torch.randint(0, 256, (2, 3, 4, 4)), "dtype torch.int64; allowed: torch.uint8"),
    (torch.rand(2, 3, 4, 4) * 2 - 0.5, "allowed: [0, 1]"),
    (torch.full((2, 3, 4, 4), float("nan")), "NaN"),
    (torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8), "3 (RGB) channels"),
    (torch.randint(0, 256, (2, 4, 4, 4), dtype=torch.uint8), "3 (RGB) channels"),
    (torch.randint(0, 256, (3, 4, 4), dtype=torch.uint8), "allowed: (N, 3, H, W)"),
    (np.zeros((2, 3, 4, 4), np.uint8), "expected a torch.Tensor"),
])
def test_bad_tensors_are_refused(images, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        check_images(images)


def test_missing_and_unsupported_paths_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist; allowed: a folder"):
        count_images(tmp_path / "nowhere")
    (tmp_path / "list.txt").write_text("a.png")
    with pytest.raises(ValueError, match="is a .txt file"):
        list(read_images(tmp_path / "list.txt", batch_size=2))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image files"):
        image_names(tmp_path / "empty")


def test_unreadable_and_16_bit_image_files_are_named(tmp_path):
    write_folder(tmp_path / "bad", random_images(2), ["0.png", "1.png"])
    (tmp_path / "bad" / "2.jpg").write_bytes(bytes(torch.randint(0, 256, (64,)).tolist()))
    with pytest.raises(ValueError, match="2.jpg' cannot be read as an image"):
        read_all(tmp_path / "bad")
    (tmp_path / "deep").mkdir()
    deep = torch.randint(0, 65536, (6, 5), dtype=torch.int32).numpy().astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep" / "0.png")
    with pytest.raises(ValueError, match="16-bit or float.*allowed: 8-bit"):
        read_all(tmp_path / "deep")


def test_images_of_different_sizes_in_one_set_are_refused(tmp_path):
    write_folder(tmp_path, random_images(2), ["0.png", "1.png"])
    write_folder(tmp_path, random_images(1, 8, 8), ["2.png"])
    with pytest.raises(ValueError, match="2.png' is 8x8 .*'0.png' is 5x6"):
        read_all(tmp_path)


@pytest.mark.parametrize("array, message", [
    (torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8).numpy(), "channels first"),
    (torch.randint(0, 256, (2, 6, 5, 4), dtype=torch.uint8).numpy(), r"allowed: \(N, H, W, 3\)"),
    (torch.randint(0, 256, (2, 6, 5, 1), dtype=torch.uint8).numpy(), r"allowed: \(N, H, W, 3\)"),
    (torch.rand(2, 6, 5, 3).numpy(), "dtype float32; allowed: uint8"),
])
def test_npz_of_the_wrong_layout_or_dtype_is_refused(tmp_path, array, message):
    np.savez(tmp_path / "x.npz", array)
    with pytest.raises(ValueError, match=message):
        read_all(tmp_path / "x.npz")


def test_npz_without_arr_0_or_not_a_zip_is_refused(tmp_path):
    np.savez(tmp_path / "x.npz", images=nhwc(random_images(2)))
    with pytest.raises(ValueError, match="has no 'arr_0' array \\(keys: images\\)"):
        count_images(tmp_path / "x.npz")
    (tmp_path / "y.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="not a readable .npz"):
        count_images(tmp_path / "y.npz")
