"""Loading real data: image folders, CIFAR pickles, IDX files, digits, the CIFAR-10 archive."""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
import pickle
import struct
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import mbdml.data.cifar as cifar
import mbdml.data.decode as decode
import mbdml.data.sources as sources
from mbdml.data import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    ImageSet,
    find_cifar10_archive,
    load_cifar_pickle,
    load_dataset,
    load_digits_builtin,
    load_fashion_mnist,
    load_idx,
    load_image_folder,
    resize_images,
    unpack_cifar10_archive,
)
from mbdml.errors import ConfigError, DataError

RNG = np.random.default_rng(1234)


def rgb(h: int = 6, w: int = 5) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save(path: Path, arr: np.ndarray, mode: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode=mode).save(path) if mode else Image.fromarray(arr).save(path)
    return path


def make_png_folder(root: Path, classes: dict[str, int], h: int = 6, w: int = 5) -> dict[str, list[np.ndarray]]:
    """Writes root/<class>/<i>.png with random RGB pixels; returns the arrays per class."""
    out: dict[str, list[np.ndarray]] = {}
    for name, n in classes.items():
        out[name] = []
        for i in range(n):
            a = rgb(h, w)
            save(root / name / f"{i:03d}.png", a)
            out[name].append(a)
    return out


# --------------------------------------------------------------------------- ImageSet


def test_imageset_properties_and_subset() -> None:
    imgs = torch.arange(4 * 3 * 2 * 5, dtype=torch.uint8).view(4, 3, 2, 5)
    s = ImageSet(imgs, torch.tensor([0, 1, 1, 0]), ["a", "b", "c"])
    assert len(s) == 4 and s.num_classes == 3 and s.channels == 3 and s.image_size == (2, 5)
    assert s.subset(torch.tensor([True, False, False, True])).labels.tolist() == [0, 0]
    sub = s.subset(torch.tensor([3, 1]))
    assert sub.classes == ["a", "b", "c"]
    assert torch.equal(sub.images, imgs[[3, 1]]) and sub.labels.tolist() == [0, 1]
    assert sub.images.is_contiguous() and sub.labels.dtype == torch.int64


def test_imageset_rejects_bad_tensors() -> None:
    with pytest.raises(DataError, match="uint8"):
        ImageSet(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.int64), ["a"])
    with pytest.raises(DataError, match="one label per image"):
        ImageSet(torch.zeros(2, 1, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), ["a"])


# --------------------------------------------------------------------------- image folders


def test_png_folder_round_trip(tmp_path: Path) -> None:
    arrays = make_png_folder(tmp_path, {"zebra": 3, "ant": 2, "cat": 4})
    (tmp_path / ".hidden").mkdir()  # hidden folders are not classes
    data = load_image_folder(tmp_path, im_ext="png")
    assert data.classes == ["ant", "cat", "zebra"]
    assert data.images.shape == (9, 3, 6, 5) and data.images.dtype == torch.uint8
    assert data.images.is_contiguous()
    assert data.labels.tolist() == [0, 0, 1, 1, 1, 1, 2, 2, 2]
    expected = [a for name in data.classes for a in arrays[name]]
    for got, want in zip(data.images, expected):
        assert torch.equal(got.permute(1, 2, 0), torch.from_numpy(want))


@pytest.mark.parametrize("ext", ["png", ".png", "PNG", ".Png"])
def test_extension_match_is_case_insensitive(tmp_path: Path, ext: str) -> None:
    save(tmp_path / "a" / "x.PNG", rgb())
    save(tmp_path / "a" / "y.png", rgb())
    save(tmp_path / "b" / "z.Png", rgb())
    data = load_image_folder(tmp_path, im_ext=ext)
    assert len(data) == 3 and data.labels.tolist() == [0, 0, 1]


def test_grey_rgba_palette_become_rgb(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, size=(6, 5), dtype=np.uint8)
    rgba = RNG.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    base = rgb()
    pal = Image.fromarray(base).quantize(colors=8)
    save(tmp_path / "c" / "0grey.png", grey)
    save(tmp_path / "c" / "1rgba.png", rgba)
    pal.save(tmp_path / "c" / "2pal.png")
    data = load_image_folder(tmp_path, im_ext="png")
    assert data.images.shape == (3, 3, 6, 5)
    g = data.images[0]
    assert all(torch.equal(g[ch], torch.from_numpy(grey)) for ch in range(3))
    assert torch.equal(data.images[1].permute(1, 2, 0), torch.from_numpy(rgba[:, :, :3]))
    assert torch.equal(data.images[2].permute(1, 2, 0), torch.from_numpy(np.array(pal.convert("RGB"))))


def test_sixteen_bit_grey_keeps_its_range(tmp_path: Path) -> None:
    a = np.array([[0, 256, 40000, 65535]], dtype=np.uint16)
    (tmp_path / "c").mkdir()
    Image.fromarray(a).save(tmp_path / "c" / "x.png")
    data = load_image_folder(tmp_path, im_ext="png")
    assert data.images[0, :, 0].tolist() == [[0, 1, 156, 255]] * 3


def test_image_size_resizes_with_pil_bilinear(tmp_path: Path) -> None:
    a, b = rgb(10, 7), rgb(4, 9)
    save(tmp_path / "k" / "a.png", a)
    save(tmp_path / "k" / "b.png", b)
    data = load_image_folder(tmp_path, im_ext="png", image_size=8)
    assert data.images.shape == (2, 3, 8, 8)
    for got, src in zip(data.images, (a, b)):
        want = np.array(Image.fromarray(src).resize((8, 8), Image.BILINEAR))
        assert torch.equal(got.permute(1, 2, 0), torch.from_numpy(want))


def test_mixed_sizes_go_to_most_common_size(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    odd = rgb(9, 3)
    save(tmp_path / "a" / "0.png", rgb(6, 5))
    save(tmp_path / "a" / "1.png", odd)
    save(tmp_path / "b" / "0.png", rgb(6, 5))
    with caplog.at_level(logging.INFO, logger="mbdml"):
        data = load_image_folder(tmp_path, im_ext="png")
    assert data.images.shape == (3, 3, 6, 5)
    want = np.array(Image.fromarray(odd).resize((5, 6), Image.BILINEAR))
    assert torch.equal(data.images[1].permute(1, 2, 0), torch.from_numpy(want))
    assert "most common size" in caplog.text and "6x5" in caplog.text


def test_jpeg_folder_decodes_like_pil(tmp_path: Path) -> None:
    a = rgb(8, 8)
    save(tmp_path / "a" / "0.jpg", a)
    save(tmp_path / "b" / "0.JPEG", a)  # other extension: not picked up with im_ext=jpg
    save(tmp_path / "b" / "1.jpg", a)
    data = load_image_folder(tmp_path)
    want = np.array(Image.open(tmp_path / "a" / "0.jpg").convert("RGB"))
    assert len(data) == 2
    assert torch.equal(data.images[0].permute(1, 2, 0), torch.from_numpy(want))


def test_test_folder_mapped_onto_train_classes(tmp_path: Path) -> None:
    make_png_folder(tmp_path / "train", {"a": 1, "b": 1, "c": 1})
    make_png_folder(tmp_path / "test", {"c": 2, "a": 1})
    train = load_image_folder(tmp_path / "train", im_ext="png")
    test = load_image_folder(tmp_path / "test", im_ext="png", classes=train.classes)
    assert test.classes == ["a", "b", "c"] and test.labels.tolist() == [0, 2, 2]
    make_png_folder(tmp_path / "test", {"dog": 1})
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "test", im_ext="png", classes=train.classes)
    assert "'dog'" in str(err.value) and "rename or remove" in str(err.value)


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "does not exist" in str(err.value) and "check the path" in str(err.value)


def test_root_is_a_file(tmp_path: Path) -> None:
    f = save(tmp_path / "x.png", rgb())
    with pytest.raises(DataError) as err:
        load_image_folder(f)
    assert str(f) in str(err.value) and "<class name>" in str(err.value)


def test_root_without_class_folders(tmp_path: Path) -> None:
    save(tmp_path / "loose.jpg", rgb())
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "no class sub-folders" in msg and "1 loose files" in msg
    assert "one sub-folder per class" in msg


def test_empty_class_folder(tmp_path: Path) -> None:
    make_png_folder(tmp_path, {"a": 2})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, im_ext="png")
    msg = str(err.value)
    assert str(tmp_path / "empty") in msg and "holds no '.png' images" in msg and "remove the folder" in msg


def test_class_folder_with_other_extensions(tmp_path: Path) -> None:
    make_png_folder(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("hello")
    save(tmp_path / "b" / "0.jpg", rgb())
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, im_ext="png")
    msg = str(err.value)
    assert str(tmp_path / "b") in msg and "'.txt'" in msg and "'.jpg'" in msg and "--im_ext" in msg


def test_txt_files_beside_images_are_ignored(tmp_path: Path) -> None:
    make_png_folder(tmp_path, {"a": 2})
    (tmp_path / "a" / "README.txt").write_text("not an image")
    assert len(load_image_folder(tmp_path, im_ext="png")) == 2


def write_bad_files(root: Path) -> tuple[Path, Path]:
    """A non-image renamed .png and a truncated JPEG."""
    make_png_folder(root, {"a": 3, "b": 2})
    garbage = root / "a" / "zz_garbage.png"
    garbage.write_bytes(b"this is not a png at all")
    buf = io.BytesIO()
    Image.fromarray(rgb(32, 32)).save(buf, format="PNG")
    truncated = root / "b" / "zz_truncated.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return garbage, truncated


def test_corrupt_file_is_an_error_naming_it(tmp_path: Path) -> None:
    garbage, _ = write_bad_files(tmp_path)
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, im_ext="png")
    msg = str(err.value)
    assert str(garbage) in msg and "--on-bad-image skip" in msg


def test_truncated_file_is_an_error_naming_it(tmp_path: Path) -> None:
    _, truncated = write_bad_files(tmp_path)
    (tmp_path / "a" / "zz_garbage.png").unlink()
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, im_ext="png")
    assert str(truncated) in str(err.value) and "--on-bad-image skip" in str(err.value)


def test_skip_mode_counts_and_logs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    write_bad_files(tmp_path)
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        data = load_image_folder(tmp_path, im_ext="png", on_bad_image="skip")
    assert len(data) == 5 and data.labels.tolist() == [0, 0, 0, 1, 1]
    assert "skipped 2 unreadable image file(s)" in caplog.text


def test_skip_mode_class_left_empty_is_an_error(tmp_path: Path) -> None:
    make_png_folder(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "0.png").write_bytes(b"junk")
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, im_ext="png", on_bad_image="skip")
    assert str(tmp_path / "b") in str(err.value) and "replace the broken files" in str(err.value)


def test_bad_options(tmp_path: Path) -> None:
    make_png_folder(tmp_path, {"a": 1})
    with pytest.raises(ConfigError, match="--on-bad-image"):
        load_image_folder(tmp_path, im_ext="png", on_bad_image="ignore")
    with pytest.raises(ConfigError, match="--input_size"):
        load_image_folder(tmp_path, im_ext="png", image_size=0)


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A PNG whose header declares width x height pixels and whose data is a few bytes."""
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    head = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_an_image_of_more_pixels_than_the_cap_is_refused_before_decoding(tmp_path: Path, num_workers: int) -> None:
    make_png_folder(tmp_path, {"a": 2, "b": 2}, h=20, w=20)
    _png_declaring(tmp_path / "a" / "zz_bomb.png", 13_000, 13_000)  # 164 kB of real PNG decodes to 2 GB
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path, im_ext="png", num_workers=num_workers)
    msg = str(err.value)  # had it been decoded, the few bytes of data would give a 'broken data stream' error
    assert "zz_bomb.png' is 13000 x 13000 = 169,000,000 pixels, more than the 100,000,000 of --max_image_pixels" in msg
    assert "--max_image_pixels N, or none" in msg and "--on-bad-image skip" in msg
    kept = load_image_folder(tmp_path, im_ext="png", num_workers=num_workers, on_bad_image="skip")
    assert len(kept) == 4
    # the cap is the caller's: 400 pixels take the 20 x 20 images, 399 refuse them
    (tmp_path / "a" / "zz_bomb.png").unlink()
    assert len(load_image_folder(tmp_path, im_ext="png", max_image_pixels=400)) == 4
    with pytest.raises(DataError, match="is 20 x 20 = 400 pixels, more than the 399 of --max_image_pixels"):
        load_image_folder(tmp_path, im_ext="png", max_image_pixels=399)
    with pytest.raises(ConfigError, match="--max_image_pixels"):
        load_image_folder(tmp_path, im_ext="png", max_image_pixels=0)
    from mbdml.config import RunConfig

    assert RunConfig().max_image_pixels == sources.DEFAULT_MAX_IMAGE_PIXELS  # a run's default is the loader's


def test_a_single_class_data_set_is_refused(tmp_path: Path) -> None:
    make_png_folder(tmp_path / "train", {"cat": 3})
    make_png_folder(tmp_path / "test", {"cat": 2})
    with pytest.raises(DataError, match="has a single class \\('cat'\\).*at least two classes"):
        load_dataset(str(tmp_path), im_ext="png", cache_dir=None)


def test_files_of_other_image_extensions_are_counted_with_how_to_include_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_png_folder(tmp_path, {"a": 2, "b": 2})
    save(tmp_path / "a" / "x.JPEG", rgb())
    save(tmp_path / "b" / "y.jpg", rgb())
    (tmp_path / "b" / "notes.txt").write_text("not an image")
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        assert len(load_image_folder(tmp_path, im_ext="png")) == 4
    assert "left out 2 image file(s)" in caplog.text and "not '.png' (1 '.jpeg', 1 '.jpg')" in caplog.text
    assert "pass --im_ext png,jpeg,jpg" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        assert len(load_image_folder(tmp_path, im_ext="png,jpeg,jpg")) == 6
    assert "left out" not in caplog.text


@pytest.mark.parametrize(
    "name, target, needle",
    [
        ("loop", "loop", "is a symbolic link that loops back on itself"),
        ("gone", "nowhere", "is a symbolic link that points to 'nowhere', which does not exist"),
        ("self", ".", "is a symbolic link to"),
        ("up", "..", "is a symbolic link to"),
    ],
)
def test_class_folder_links_that_loop_are_named(tmp_path: Path, name: str, target: str, needle: str) -> None:
    make_png_folder(tmp_path / "data", {"a": 2, "b": 2})
    (tmp_path / "data" / name).symlink_to(target)
    with pytest.raises(DataError) as err:
        load_image_folder(tmp_path / "data", im_ext="png")
    assert f"class folder '{tmp_path / 'data' / name}' {needle}" in str(err.value)
    if target in (".", ".."):
        assert "a link loop, not a class" in str(err.value)


def test_file_links_that_loop_are_counted_and_a_looping_data_path_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    make_png_folder(tmp_path / "data", {"a": 2, "b": 2})
    (tmp_path / "data" / "a" / "l.png").symlink_to("l.png")
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        assert len(load_image_folder(tmp_path / "data", im_ext="png")) == 4
    assert "left out 1 link(s)" in caplog.text
    (tmp_path / "x").symlink_to("y")
    (tmp_path / "y").symlink_to("x")
    with pytest.raises(DataError, match="data path '.*x' is a symbolic link that loops back on itself"):
        load_dataset(str(tmp_path / "x"), cache_dir=None)


def test_worker_pool_gives_the_same_result(tmp_path: Path) -> None:
    make_png_folder(tmp_path, {"a": 5, "b": 4, "c": 3})
    save(tmp_path / "c" / "odd.png", rgb(3, 3))
    one = load_image_folder(tmp_path, im_ext="png", num_workers=0)
    two = load_image_folder(tmp_path, im_ext="png", num_workers=2)
    assert torch.equal(one.images, two.images) and torch.equal(one.labels, two.labels)
    (tmp_path / "b" / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="bad.png"):
        load_image_folder(tmp_path, im_ext="png", num_workers=2)


def test_many_files_use_chunks(tmp_path: Path) -> None:
    make_png_folder(tmp_path, {"a": 7, "b": 6}, h=3, w=3)
    (tmp_path / "b" / "zz.png").write_bytes(b"junk")
    paths = sorted(str(p) for p in tmp_path.rglob("*.png"))  # 14 files: chunks of 4, 4, 4 and 2
    one = decode.decode_files(paths, None, "skip", 0, chunk=4)
    two = decode.decode_files(paths, None, "skip", 2, chunk=4)
    assert len(one[0]) == 4  # one group per chunk (all images are 3 x 3)
    for (size_1, pos_1, arr_1), (size_2, pos_2, arr_2) in zip(one[0], two[0], strict=True):
        assert size_1 == size_2 == (3, 3) and np.array_equal(pos_1, pos_2) and np.array_equal(arr_1, arr_2)
    assert sorted(int(p) for _, pos, _ in one[0] for p in pos) == [i for i, p in enumerate(paths) if not p.endswith("zz.png")]
    assert [pos for pos, _ in one[1]] == [pos for pos, _ in two[1]] == [paths.index(str(tmp_path / "b" / "zz.png"))]
    with pytest.raises(DataError, match="zz.png"):
        decode.decode_files(paths, None, "error", 2, chunk=4)


# --------------------------------------------------------------------------- the decoded cache


def test_cache_round_trip_and_no_second_decode(tmp_path: Path) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_png_folder(root, {"a": 2, "b": 3})
    first = load_image_folder(root, im_ext="png", cache_dir=cache)
    files = list(cache.glob("*.pt"))
    assert len(files) == 1 and len(files[0].stem) == 40
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]

    # the files now hold junk of the same size and time: decoding them again would fail
    for f in sorted(root.rglob("*.png")):
        st = f.stat()
        f.write_bytes(b"\0" * st.st_size)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = load_image_folder(root, im_ext="png", cache_dir=cache)
    assert torch.equal(first.images, again.images) and torch.equal(first.labels, again.labels)
    assert again.classes == first.classes
    # the cache holds plain tensors and strings: loadable with weights_only
    obj = torch.load(files[0], weights_only=True)
    assert obj["classes"] == ["a", "b"]


def test_cache_key_follows_files_and_options(tmp_path: Path) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_png_folder(root, {"a": 2, "b": 1})
    load_image_folder(root, im_ext="png", cache_dir=cache)
    load_image_folder(root, im_ext="png", cache_dir=cache, image_size=4)
    assert len(list(cache.glob("*.pt"))) == 2
    new = rgb()
    save(root / "b" / "new.png", new)
    data = load_image_folder(root, im_ext="png", cache_dir=cache)
    assert len(data) == 4 and len(list(cache.glob("*.pt"))) == 3
    # rewriting a file changes its size/mtime: the stale entry is not used
    target = root / "a" / "000.png"
    other = rgb()
    save(target, other)
    os.utime(target, ns=(time.time_ns(), time.time_ns() + 10**9))
    data = load_image_folder(root, im_ext="png", cache_dir=cache)
    assert torch.equal(data.images[0].permute(1, 2, 0), torch.from_numpy(other))


def test_unreadable_cache_falls_back_to_decoding(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    make_png_folder(root, {"a": 2})
    first = load_image_folder(root, im_ext="png", cache_dir=cache)
    (entry,) = cache.glob("*.pt")
    entry.write_bytes(b"garbage")
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        again = load_image_folder(root, im_ext="png", cache_dir=cache)
    assert torch.equal(first.images, again.images)
    assert "unreadable" in caplog.text
    assert torch.load(entry, weights_only=True)["images"].shape == (2, 3, 6, 5)  # rewritten


def test_cache_remembers_skipped_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root, cache = tmp_path / "data", tmp_path / "cache"
    write_bad_files(root)
    load_image_folder(root, im_ext="png", on_bad_image="skip", cache_dir=cache)
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        data = load_image_folder(root, im_ext="png", on_bad_image="skip", cache_dir=cache)
    assert len(data) == 5 and "skipped 2" in caplog.text
    with pytest.raises(DataError, match="zz_garbage.png"):  # error mode is a different key
        load_image_folder(root, im_ext="png", cache_dir=cache)


# --------------------------------------------------------------------------- CIFAR pickles


def dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    dump(root / "batches.meta", {b"label_names": names, b"num_cases_per_batch": per_batch})
    xs, ys = [], []
    for i in range(1, 6):
        x = RNG.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        y = RNG.integers(0, 10, size=per_batch).tolist()
        dump(root / f"data_batch_{i}", {b"batch_label": b"x", b"data": x, b"labels": y})
        xs.append(x)
        ys += y
    tx = RNG.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
    ty = RNG.integers(0, 10, size=per_batch).tolist()
    dump(root / "test_batch", {b"data": tx, b"labels": ty})
    return np.concatenate(xs), np.asarray(ys), tx, np.asarray(ty)


def test_cifar10_pickle_round_trip(tmp_path: Path) -> None:
    x, y, tx, ty = write_cifar10(tmp_path)
    train = load_cifar_pickle(tmp_path, train=True)
    test = load_cifar_pickle(tmp_path, train=False)
    assert train.classes[0] == "airplane" and train.num_classes == 10
    assert train.images.shape == (15, 3, 32, 32) and test.images.shape == (3, 3, 32, 32)
    assert torch.equal(train.images, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    assert train.labels.tolist() == y.tolist() and test.labels.tolist() == ty.tolist()
    # row-major RGB planes: the first 1024 bytes are the red channel
    assert torch.equal(train.images[0, 0].reshape(-1), torch.from_numpy(x[0, :1024]))
    assert torch.equal(test.images[2, 2].reshape(-1), torch.from_numpy(tx[2, 2048:]))


def test_cifar100_pickle_and_nested_folder(tmp_path: Path) -> None:
    root = tmp_path / "cifar-100-python"
    names = [f"class{i}".encode() for i in range(100)]
    dump(root / "meta", {b"fine_label_names": names, b"coarse_label_names": names[:20]})
    x = RNG.integers(0, 256, size=(4, 3072), dtype=np.uint8)
    dump(root / "train", {b"data": x, b"fine_labels": [0, 99, 5, 5], b"coarse_labels": [0, 1, 2, 3]})
    dump(root / "test", {b"data": x[:2], b"fine_labels": [1, 2], b"coarse_labels": [0, 1]})
    train = load_cifar_pickle(tmp_path, train=True)
    assert train.num_classes == 100 and train.classes[99] == "class99"
    assert train.labels.tolist() == [0, 99, 5, 5]
    assert torch.equal(train.images, torch.from_numpy(x.reshape(-1, 3, 32, 32)))
    tr, te = load_dataset(str(tmp_path), cache_dir=None)
    assert len(tr) == 4 and te.labels.tolist() == [1, 2]


def test_cifar_missing_file(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DataError) as err:
        load_cifar_pickle(tmp_path, train=True)
    assert "data_batch_3" in str(err.value) and "unpack the CIFAR 'python version'" in str(err.value)
    assert len(load_cifar_pickle(tmp_path, train=False)) == 3


def test_cifar_damaged_files(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError) as err:
        load_cifar_pickle(tmp_path, train=False)
    assert "test_batch" in str(err.value) and "fresh copy" in str(err.value)
    dump(tmp_path / "test_batch", {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="uint8 \\(N, 3072\\)"):
        load_cifar_pickle(tmp_path, train=False)
    dump(tmp_path / "test_batch", {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    with pytest.raises(DataError, match="2 images but 1 labels"):
        load_cifar_pickle(tmp_path, train=False)


def test_cifar_folder_without_meta(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="holds no CIFAR python files"):
        load_cifar_pickle(tmp_path, train=True)


# --------------------------------------------------------------------------- IDX


def idx_bytes(images: np.ndarray | None = None, labels: np.ndarray | None = None) -> bytes:
    if images is not None:
        n, r, c = images.shape
        return struct.pack(">IIII", 0x803, n, r, c) + images.tobytes()
    assert labels is not None
    return struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    x = RNG.integers(0, 256, size=(7, 28, 28), dtype=np.uint8)
    y = RNG.integers(0, 10, size=7)
    suffix = ".gz" if gz else ""
    opener = gzip.open if gz else open
    with opener(tmp_path / f"imgs{suffix}", "wb") as f:
        f.write(idx_bytes(images=x))
    with opener(tmp_path / f"lbls{suffix}", "wb") as f:
        f.write(idx_bytes(labels=y))
    data = load_idx(tmp_path / f"imgs{suffix}", tmp_path / f"lbls{suffix}")
    assert data.images.shape == (7, 1, 28, 28) and data.classes == [str(i) for i in range(10)]
    assert torch.equal(data.images[:, 0], torch.from_numpy(x)) and data.labels.tolist() == y.tolist()
    named = load_idx(tmp_path / f"imgs{suffix}", tmp_path / f"lbls{suffix}", classes=list("abcdefghij"))
    assert named.classes[3] == "d"


def test_idx_errors(tmp_path: Path) -> None:
    x = RNG.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    (tmp_path / "i").write_bytes(idx_bytes(images=x))
    (tmp_path / "l").write_bytes(idx_bytes(labels=np.array([1, 2, 3])))
    (tmp_path / "l2").write_bytes(idx_bytes(labels=np.array([1, 2])))
    with pytest.raises(DataError) as err:  # swapped
        load_idx(tmp_path / "l", tmp_path / "i")
    assert "0x00000803" in str(err.value) and "swap" in str(err.value)
    with pytest.raises(DataError) as err:
        load_idx(tmp_path / "i", tmp_path / "l2")
    assert "3 images" in str(err.value) and "2 labels" in str(err.value)
    (tmp_path / "t").write_bytes(idx_bytes(images=x)[:-10])
    with pytest.raises(DataError, match="truncated"):
        load_idx(tmp_path / "t", tmp_path / "l")
    with pytest.raises(DataError, match="missing"):
        load_idx(tmp_path / "nope", tmp_path / "l")
    (tmp_path / "bad.gz").write_bytes(b"\x1f\x8bnot really gzip")
    with pytest.raises(DataError, match="bad.gz"):
        load_idx(tmp_path / "bad.gz", tmp_path / "l")


def write_idx_folder(folder: Path, n_train: int = 6, n_test: int = 4) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = RNG.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        y = np.arange(n) % 10
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(idx_bytes(images=x))
        (folder / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels=y))


def test_idx_folder_via_load_dataset_and_resize(tmp_path: Path) -> None:
    write_idx_folder(tmp_path)
    train, test = load_dataset(str(tmp_path), cache_dir=None)
    assert train.images.shape == (6, 1, 28, 28) and test.images.shape == (4, 1, 28, 28)
    small, _ = load_dataset(str(tmp_path), image_size=14, cache_dir=None)
    want = F.interpolate(train.images.float(), size=(14, 14), mode="bilinear", antialias=True).round().to(torch.uint8)
    assert small.images.shape == (6, 1, 14, 14) and torch.equal(small.images, want)


def test_fashion_mnist_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path / "none")
    assert "apt-get install dataset-fashion-mnist" in str(err.value) and "none" in str(err.value)


def test_fashion_mnist_from_a_folder(tmp_path: Path) -> None:
    write_idx_folder(tmp_path)
    train, test = load_fashion_mnist(tmp_path)
    assert train.classes == FASHION_MNIST_CLASSES and len(test) == 4


@pytest.mark.skipif(not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist() -> None:
    train, test = load_dataset("fashion-mnist", cache_dir=None)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert torch.bincount(test.labels).tolist() == [1000] * 10 and test.classes[9] == "Ankle boot"


# --------------------------------------------------------------------------- digits


def test_digits_split_is_stratified_and_fixed() -> None:
    train, test = load_digits_builtin()
    assert len(train) + len(test) == 1797 and train.images.shape[1:] == (1, 8, 8)
    assert int(train.images.max()) == 255 and int(train.images.min()) == 0
    counts_test = torch.bincount(test.labels, minlength=10)
    counts_all = counts_test + torch.bincount(train.labels, minlength=10)
    assert torch.all((counts_test.float() - 0.25 * counts_all.float()).abs() <= 1)
    train2, test2 = load_digits_builtin()
    assert torch.equal(test.images, test2.images) and torch.equal(test.labels, test2.labels)
    _, test3 = load_digits_builtin(seed=1)
    assert not torch.equal(test.images, test3.images)
    # disjoint: no test image equals a training image position-wise; count check via the full set
    from sklearn.datasets import load_digits

    full = np.rint(load_digits().data * 255 / 16).astype(np.uint8)
    all_rows = {r.tobytes() for r in full}
    assert {r.numpy().tobytes() for r in test.images.reshape(len(test), -1)} <= all_rows


def test_digits_via_load_dataset_resized() -> None:
    train, test = load_dataset("digits", image_size=16, cache_dir=None)
    assert train.images.shape[1:] == (1, 16, 16) and train.images.dtype == torch.uint8
    assert test.images.shape[1:] == (1, 16, 16)


def test_resize_images_keeps_size_and_dtype() -> None:
    x = torch.randint(0, 256, (3, 2, 5, 5), dtype=torch.uint8)
    assert resize_images(x, 5) is not None and torch.equal(resize_images(x, 5), x)
    y = resize_images(x, (10, 4))
    assert y.shape == (3, 2, 10, 4) and y.dtype == torch.uint8


# --------------------------------------------------------------------------- load_dataset on folders


def test_load_dataset_train_test_layout_and_test_dir(tmp_path: Path) -> None:
    make_png_folder(tmp_path / "both" / "train", {"a": 2, "b": 2})
    make_png_folder(tmp_path / "both" / "test", {"b": 1})
    train, test = load_dataset(str(tmp_path / "both"), im_ext="png", cache_dir=None)
    assert len(train) == 4 and test.labels.tolist() == [1] and test.classes == ["a", "b"]
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path / "both" / "train"), im_ext="png", cache_dir=None)
    assert "--test" in str(err.value)
    train, test = load_dataset(
        str(tmp_path / "both" / "train"), test_dir=str(tmp_path / "both" / "test"), im_ext="png", cache_dir=None
    )
    assert len(test) == 1
    make_png_folder(tmp_path / "other", {"a": 3})
    train, test = load_dataset(str(tmp_path / "both"), test_dir=str(tmp_path / "other"), im_ext="png", cache_dir=None)
    assert train.classes == ["a", "b"] and test.labels.tolist() == [0, 0, 0]


def test_load_dataset_test_resized_to_train_size(tmp_path: Path) -> None:
    make_png_folder(tmp_path / "train", {"a": 2, "b": 1}, h=6, w=6)
    make_png_folder(tmp_path / "test", {"a": 2, "b": 1}, h=4, w=4)
    train, test = load_dataset(str(tmp_path), im_ext="png", cache_dir=None)
    assert test.image_size == train.image_size == (6, 6)


def test_load_dataset_unknown_spec(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_dataset("cifar11")
    msg = str(err.value)
    assert "cifar11" in msg and "digits" in msg and "fashion-mnist" in msg and "cifar10" in msg
    (tmp_path / "loose.txt").write_text("x")
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path))
    assert str(tmp_path) in str(err.value) and "matches no known layout" in str(err.value)
    with pytest.raises(DataError, match="is a file"):
        load_dataset(str(tmp_path / "loose.txt"))
    with pytest.raises(ConfigError, match="drop --test"):
        load_dataset("digits", test_dir=str(tmp_path))


def test_each_folder_kind_is_recognised_in_order(tmp_path: Path) -> None:
    from mbdml.data import detect_folder_kind

    make_png_folder(tmp_path / "tt" / "train", {"a": 1, "b": 1})
    make_png_folder(tmp_path / "tt" / "test", {"a": 1})
    write_cifar10(tmp_path / "pickles", per_batch=1)
    write_idx_folder(tmp_path / "idx")
    (tmp_path / "none").mkdir()
    assert detect_folder_kind(tmp_path / "tt") == "train-test"
    assert detect_folder_kind(tmp_path / "tt" / "train") == "class-folders"
    assert detect_folder_kind(tmp_path / "tt" / "train", test_dir=tmp_path / "tt" / "test") == "class-folders"
    assert detect_folder_kind(tmp_path / "pickles") == "cifar-pickle"
    assert detect_folder_kind(tmp_path / "idx") == "idx"
    assert detect_folder_kind(tmp_path / "none") is None
    # train/ without test/ is a train-test folder once --test is given
    make_png_folder(tmp_path / "only" / "train", {"a": 1, "b": 1})
    assert detect_folder_kind(tmp_path / "only") == "class-folders"
    assert detect_folder_kind(tmp_path / "only", test_dir=tmp_path / "tt" / "test") == "train-test"
    # names are looked up before paths, in any spelling
    assert sources.DATASET_NAMES == tuple(sources.NAMED_DATASETS) == ("digits", "fashion-mnist", "cifar10")
    assert sources.is_dataset_name(" Fashion_MNIST ") and not sources.is_dataset_name(str(tmp_path / "tt"))


# --------------------------------------------------------------------------- the CIFAR-10 JPEG archive


def add_member(tf: tarfile.TarFile, name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    info.linkname = link
    tf.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def jpeg_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="JPEG")
    return buf.getvalue()


def write_fake_archive(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for split, n in (("train", 3), ("test", 2)):
            for cls in ("cat", "dog"):
                for i in range(n):
                    add_member(tf, f"cifar10/{split}/{cls}/{i:04d}.jpg", jpeg_bytes(rgb(32, 32)))


def test_find_archive_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    write_fake_archive(archive)
    monkeypatch.setenv("MBDML_DATA", str(tmp_path))
    assert find_cifar10_archive() == archive.resolve()
    monkeypatch.setenv("MBDML_DATA", str(archive))
    assert find_cifar10_archive() == archive.resolve()


def test_unpack_once_and_load_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = tmp_path / "data" / "cifar10-jpeg.tar.gz"
    write_fake_archive(archive)
    cache = tmp_path / "cache"
    base = unpack_cifar10_archive(archive, cache)
    assert (base / "train" / "cat" / "0000.jpg").is_file() and (base / "test").is_dir()
    assert not [p for p in cache.iterdir() if "tmp" in p.name]

    def no_open(*a: object, **k: object) -> None:
        raise AssertionError("unpacked twice")

    monkeypatch.setattr(tarfile, "open", no_open)
    assert unpack_cifar10_archive(archive, cache) == base
    monkeypatch.undo()
    monkeypatch.setenv("MBDML_DATA", str(archive.parent))
    train, test = load_dataset("cifar10", cache_dir=cache)
    assert train.images.shape == (6, 3, 32, 32) and test.images.shape == (4, 3, 32, 32)
    assert train.classes == ["cat", "dog"] and test.labels.tolist() == [0, 0, 1, 1]
    assert len(list(cache.glob("*.pt"))) == 2


def test_unpack_one_split_then_both(tmp_path: Path) -> None:
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    write_fake_archive(archive)
    cache = tmp_path / "cache"
    base = unpack_cifar10_archive(archive, cache, splits=("test",))
    assert (base / "test" / "dog" / "0001.jpg").is_file() and not (base / "train").exists()
    assert json.loads((cache / "cifar10-jpeg" / ".mbdml-unpacked").read_text())["splits"] == ["test"]
    base = unpack_cifar10_archive(archive, cache)  # needs train too: unpacks again, both
    assert (base / "train" / "cat" / "0002.jpg").is_file() and (base / "test" / "cat").is_dir()
    assert unpack_cifar10_archive(archive, cache, splits=("test",)) == base
    with pytest.raises(ConfigError, match="splits"):
        unpack_cifar10_archive(archive, cache, splits=("val",))


@pytest.mark.parametrize(
    "name,kind,link",
    [
        ("../evil.jpg", tarfile.REGTYPE, ""),
        ("/abs/evil.jpg", tarfile.REGTYPE, ""),
        ("cifar10/train/a/../../../evil.jpg", tarfile.REGTYPE, ""),
        ("cifar10/link", tarfile.SYMTYPE, "/etc/passwd"),
    ],
)
def test_unpack_refuses_unsafe_members(tmp_path: Path, name: str, kind: bytes, link: str) -> None:
    archive = tmp_path / "cifar10-jpeg.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        add_member(tf, "cifar10/train/a/0.jpg", b"x")
        add_member(tf, name, b"evil", kind=kind, link=link)
    with pytest.raises(DataError) as err:
        unpack_cifar10_archive(archive, tmp_path / "cache")
    assert "refusing to unpack" in str(err.value) and "fresh copy" in str(err.value)
    assert not (tmp_path / "evil.jpg").exists()
    assert not (tmp_path / "cache" / "cifar10-jpeg").exists()


def test_unpack_damaged_or_missing_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "cifar10-jpeg.tar.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00 not a real archive")
    with pytest.raises(DataError, match="fresh copy"):
        unpack_cifar10_archive(bad, tmp_path / "cache")
    with pytest.raises(DataError, match="does not exist"):
        unpack_cifar10_archive(tmp_path / "none.tar.gz", tmp_path / "cache")
    monkeypatch.setenv("MBDML_DATA", str(tmp_path / "empty"))
    monkeypatch.setattr(cifar, "find_cifar10_archive", lambda: None)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", cache_dir=tmp_path / "cache")
    assert "MBDML_DATA" in str(err.value) and "cifar10-jpeg.tar.gz" in str(err.value)


@pytest.mark.cifar
def test_real_cifar10_archive_test_split(tmp_path: Path) -> None:
    archive = find_cifar10_archive()
    if archive is None:
        pytest.skip("cifar10-jpeg.tar.gz not found (../shared/data or $MBDML_DATA)")
    start = time.perf_counter()
    base = unpack_cifar10_archive(archive, tmp_path, splits=("test",))  # 10,000 files, not 60,000
    assert not (base / "train").exists()
    test = load_image_folder(base / "test")
    assert time.perf_counter() - start < 120
    assert test.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert test.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert json.loads((tmp_path / "cifar10-jpeg" / ".mbdml-unpacked").read_text())["archive"] == archive.name
