"""Unlabelled images as they come: a folder in any nesting, and the train/ + unlabelled/ + test/ layout."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbdml.data import (
    UNKNOWN_LABEL,
    ImageSet,
    UnlabelledImages,
    detect_folder_kind,
    load_dataset,
    load_image_folder,
    load_unlabelled_folder,
)
from mbdml.errors import ConfigError, DataError

RNG = np.random.default_rng(40)


def rgb(h: int = 6, w: int = 5) -> np.ndarray:
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save(path: Path, arr: np.ndarray, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)
    return path


def reference(path: Path, hw: tuple[int, int] | None = None) -> torch.Tensor:
    """The file as (3, H, W) uint8, written plainly with PIL: RGB, resized bilinear to hw if it differs."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if hw is not None and im.size != (hw[1], hw[0]):
            im = im.resize((hw[1], hw[0]), Image.BILINEAR)
        return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def class_folders(root: Path, classes: dict[str, int], h: int = 6, w: int = 5) -> None:
    for name, n in classes.items():
        for i in range(n):
            save(root / name / f"{i}.png", rgb(h, w))


def layout(root: Path, test: bool = True, unlabelled: str = "unlabelled") -> list[Path]:
    """root/train/<class>/, root/<unlabelled>/ (nested, mixed formats), root/test/<class>/; returns
    the unlabelled files in sorted order of their relative paths."""
    class_folders(root / "train", {"cat": 3, "dog": 2})
    if test:
        class_folders(root / "test", {"cat": 2, "dog": 2})
    u = root / unlabelled
    files = [
        save(u / "a.png", rgb()),
        save(u / "deep" / "er" / "b.BMP", rgb()),
        save(u / "deep" / "c.webp", rgb(), lossless=True),
        save(u / "z" / "d.Png", rgb(9, 4)),  # another size
    ]
    return sorted(files, key=lambda p: p.relative_to(u).as_posix())


# --------------------------------------------------------------------------- the folder loader


def test_nested_folders_mixed_extensions_and_case(tmp_path: Path) -> None:
    root = tmp_path / "u"
    want = {
        "1.png": rgb(),
        "A/2.PNG": rgb(),
        "A/B/C/3.bmp": rgb(),
        "A/B/4.WebP": rgb(),
        "D/5.JPG": rgb(),
        "D/6.jpeg": rgb(),
        "D/7.tif": rgb(),
    }
    for rel, a in want.items():
        save(root / rel, a, **({"lossless": True} if rel.lower().endswith(".webp") else {}))
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    save(root / ".hidden" / "x.png", rgb())  # hidden folders and files are left out
    save(root / "D" / ".y.png", rgb())
    data = load_unlabelled_folder(root)
    rels = sorted(want)
    assert isinstance(data, UnlabelledImages) and len(data) == 7 and data.images.shape == (7, 3, 6, 5)
    assert data.paths == [str(root.resolve() / r) for r in rels]
    for i, rel in enumerate(rels):
        if rel.lower().endswith((".jpg", ".jpeg")):
            assert torch.equal(data.images[i], reference(root / rel))  # lossy: what PIL decodes
        else:
            assert torch.equal(data.images[i].permute(1, 2, 0), torch.from_numpy(want[rel])), rel
    # only the named extensions, when given
    assert [Path(p).name for p in load_unlabelled_folder(root, im_ext="png").paths] == ["1.png", "2.PNG"]


def test_grey_rgba_and_palette_images_become_rgb(tmp_path: Path) -> None:
    grey = RNG.integers(0, 256, size=(6, 5), dtype=np.uint8)
    rgba = RNG.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    save(tmp_path / "0grey.png", grey)
    save(tmp_path / "1rgba.png", rgba)
    Image.fromarray(rgb()).quantize(colors=8).save(tmp_path / "2pal.png")
    data = load_unlabelled_folder(tmp_path)
    assert data.images.shape == (3, 3, 6, 5) and data.channels == 3
    assert all(torch.equal(data.images[0, c], torch.from_numpy(grey)) for c in range(3))
    assert torch.equal(data.images[1].permute(1, 2, 0), torch.from_numpy(rgba[:, :, :3]))
    assert torch.equal(data.images[2], reference(tmp_path / "2pal.png"))


def test_images_of_another_size_are_resized(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i in range(3):
        save(tmp_path / f"{i}.png", rgb(6, 5))
    save(tmp_path / "odd.png", rgb(11, 3))
    with caplog.at_level(logging.INFO, logger="mbdml"):
        data = load_unlabelled_folder(tmp_path)
    assert data.image_size == (6, 5) and "resized 1 of them to 6x5" in caplog.text  # the most common size
    assert torch.equal(data.images[3], reference(tmp_path / "odd.png", (6, 5)))
    # a size asked for: a side, or (height, width)
    square = load_unlabelled_folder(tmp_path, image_size=4)
    assert square.image_size == (4, 4) and torch.equal(square.images[0], reference(tmp_path / "0.png", (4, 4)))
    pair = load_unlabelled_folder(tmp_path, image_size=(7, 3))
    assert pair.image_size == (7, 3) and torch.equal(pair.images[3], reference(tmp_path / "odd.png", (7, 3)))
    for bad in (0, (4,), (4, 0), 2.5, True):
        with pytest.raises(ConfigError, match="image size"):
            load_unlabelled_folder(tmp_path, image_size=bad)  # type: ignore[arg-type]


def test_an_unreadable_image_is_an_error_or_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save(tmp_path / "a" / "good.png", rgb())
    save(tmp_path / "b" / "good.png", rgb())
    (tmp_path / "a" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError) as err:
        load_unlabelled_folder(tmp_path)
    msg = str(err.value)
    assert "broken.jpg" in msg and "--on-bad-image skip" in msg
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        data = load_unlabelled_folder(tmp_path, on_bad_image="skip")
    assert [Path(p).relative_to(tmp_path.resolve()).as_posix() for p in data.paths] == ["a/good.png", "b/good.png"]
    assert "skipped 1 unreadable image file(s)" in caplog.text and "a/broken.jpg" in caplog.text
    # every file unreadable: a clear error, not an empty tensor
    for p in tmp_path.rglob("good.png"):
        p.write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 3 image files .* could be read"):
        load_unlabelled_folder(tmp_path, on_bad_image="skip")
    with pytest.raises(ConfigError, match="--on-bad-image"):
        load_unlabelled_folder(tmp_path, on_bad_image="ignore")


def test_the_pixel_cap_refuses_a_huge_image_before_decoding(tmp_path: Path) -> None:
    save(tmp_path / "small.png", rgb(4, 4))
    save(tmp_path / "huge.png", rgb(40, 40))
    with pytest.raises(DataError, match=r"huge.png' is 40 x 40 = 1,600 pixels.*--max_image_pixels"):
        load_unlabelled_folder(tmp_path, max_image_pixels=100)
    assert len(load_unlabelled_folder(tmp_path, max_image_pixels=100, on_bad_image="skip")) == 1
    assert len(load_unlabelled_folder(tmp_path, max_image_pixels=None)) == 2


def test_missing_empty_or_imageless_folder_names_the_folder_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_unlabelled_folder(tmp_path / "nowhere")
    assert f"'{tmp_path / 'nowhere'}' does not exist" in str(err.value) and "--unlabelled" in str(err.value)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError) as err:
        load_unlabelled_folder(tmp_path / "empty")
    msg = str(err.value)
    assert f"unlabelled image folder '{tmp_path / 'empty'}' holds no image files (it is empty)" in msg
    assert "put the unlabelled images in it" in msg
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    (tmp_path / "text" / "b.csv").write_text("x")
    with pytest.raises(DataError, match=r"holds no image files \(it holds 1 '.txt', 1 '.csv' files instead\)"):
        load_unlabelled_folder(tmp_path / "text")
    save(tmp_path / "file.png", rgb())
    with pytest.raises(DataError, match="is a file, not a folder"):
        load_unlabelled_folder(tmp_path / "file.png")


def test_links_that_loop_or_lead_nowhere_are_left_out(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "u"
    save(root / "a" / "x.png", rgb())
    (root / "a" / "up").symlink_to(root)  # a folder loop: read once, never forever
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    (root / "elsewhere").symlink_to(tmp_path / "other")
    save(tmp_path / "other" / "y.png", rgb())
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        data = load_unlabelled_folder(root)
    assert sorted(Path(p).name for p in data.paths) == ["x.png", "y.png"]
    assert "left out 1 link(s)" in caplog.text


def test_the_cache_skips_decoding_and_follows_the_files(tmp_path: Path) -> None:
    root, cache = tmp_path / "u", tmp_path / "cache"
    save(root / "a.png", rgb())
    save(root / "s" / "b.png", rgb())
    first = load_unlabelled_folder(root, cache_dir=cache)
    assert len(list(cache.glob("*.pt"))) == 1
    for f in root.rglob("*.png"):  # junk of the same size and time: decoding again would fail
        st = f.stat()
        f.write_bytes(b"\0" * st.st_size)
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = load_unlabelled_folder(root, cache_dir=cache)
    assert torch.equal(again.images, first.images) and again.paths == first.paths
    new = save(root / "t" / "c.png", rgb())
    with pytest.raises(DataError, match="cannot read image file"):  # a new file: the folder is read again
        load_unlabelled_folder(root, cache_dir=cache)
    for f in root.rglob("*.png"):
        if f != new:
            save(f, rgb())
    assert len(load_unlabelled_folder(root, cache_dir=cache)) == 3
    obj = torch.load(sorted(cache.glob("*.pt"))[-1], weights_only=True)  # plain tensors and strings
    assert isinstance(obj["images"], torch.Tensor)


# --------------------------------------------------------------------------- ImageSet and unlabelled images


def test_like_matches_the_labelled_size_and_channels() -> None:
    imgs = torch.from_numpy(RNG.integers(0, 256, size=(2, 3, 4, 4), dtype=np.uint8))
    unl = UnlabelledImages(imgs, ["p", "q"])
    grey_set = ImageSet(torch.zeros(1, 1, 2, 2, dtype=torch.uint8), torch.zeros(1), ["a"])
    grey = unl.like(ImageSet(torch.zeros(1, 1, 4, 4, dtype=torch.uint8), torch.zeros(1), ["a"]))
    want = np.rint(np.einsum("nchw,c->nhw", imgs.numpy().astype(np.float64), [0.299, 0.587, 0.114]))
    assert grey.images.shape == (2, 1, 4, 4) and grey.paths == ["p", "q"]
    assert np.abs(grey.images[:, 0].numpy().astype(int) - want).max() <= 1
    assert unl.like(grey_set).images.shape == (2, 1, 2, 2)
    back = UnlabelledImages(grey.images, ["p", "q"]).like(ImageSet(imgs, torch.zeros(2), ["a"]))
    assert back.images.shape == (2, 3, 4, 4) and all(torch.equal(back.images[:, c], grey.images[:, 0]) for c in range(3))
    with pytest.raises(DataError, match="file paths"):
        UnlabelledImages(imgs, ["p"])


def test_with_unlabelled_appended_gives_unknown_labels() -> None:
    imgs = torch.from_numpy(RNG.integers(0, 256, size=(3, 3, 2, 2), dtype=np.uint8))
    unl = torch.from_numpy(RNG.integers(0, 256, size=(2, 3, 2, 2), dtype=np.uint8))
    train = ImageSet(imgs, torch.tensor([0, 1, 0]), ["a", "b"], unlabelled=UnlabelledImages(unl, ["u", "v"]))
    joined = train.with_unlabelled_appended()
    assert joined.labels.tolist() == [0, 1, 0, UNKNOWN_LABEL, UNKNOWN_LABEL] and UNKNOWN_LABEL == -1
    assert torch.equal(joined.images, torch.cat([imgs, unl])) and joined.unlabelled is None
    assert train.subset(torch.tensor([1])).unlabelled is None  # a subset holds labelled images only
    assert torch.equal(ImageSet(imgs, train.labels, ["a", "b"]).with_unlabelled_appended().labels, train.labels)


# --------------------------------------------------------------------------- the data-folder layout


def test_layout_with_unlabelled_images_is_recognised_and_loaded(tmp_path: Path) -> None:
    files = layout(tmp_path)
    assert detect_folder_kind(tmp_path) == "train-unlabelled-test"
    train, test = load_dataset(str(tmp_path), im_ext="png", cache_dir=None)
    want = load_image_folder(tmp_path / "train", im_ext="png")
    assert torch.equal(train.images, want.images) and torch.equal(train.labels, want.labels)
    assert train.classes == ["cat", "dog"] and len(test) == 4 and test.classes == train.classes
    unl = train.unlabelled
    assert unl is not None and len(unl) == 4 and unl.image_size == train.image_size == (6, 5)
    assert unl.paths == [str(p.resolve()) for p in files]
    for i, f in enumerate(files):
        assert torch.equal(unl.images[i], reference(f, (6, 5))), f.name  # the 9x4 one resized to the training size
    joined = train.with_unlabelled_appended()
    assert len(joined) == 9 and (joined.labels[5:] == -1).all()
    (files[0]).write_bytes(b"junk")  # not read at all when not asked for
    only, _ = load_dataset(str(tmp_path), im_ext="png", cache_dir=None, load_unlabelled=False)
    assert only.unlabelled is None and torch.equal(only.images, train.images)


def test_layout_options_reach_the_unlabelled_images(tmp_path: Path) -> None:
    layout(tmp_path, unlabelled="unlabeled")  # either spelling
    (tmp_path / "unlabeled" / "bad.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="bad.png.*--on-bad-image skip"):
        load_dataset(str(tmp_path), im_ext="png", cache_dir=None)
    train, _ = load_dataset(str(tmp_path), im_ext="png", image_size=8, on_bad_image="skip", cache_dir=tmp_path / "c")
    assert train.image_size == (8, 8) and train.unlabelled is not None and train.unlabelled.image_size == (8, 8)
    assert len(train.unlabelled) == 4
    again, _ = load_dataset(str(tmp_path), im_ext="png", image_size=8, on_bad_image="skip", cache_dir=tmp_path / "c")
    assert again.unlabelled is not None and torch.equal(again.unlabelled.images, train.unlabelled.images)


def test_layout_test_set_is_needed_and_test_dir_replaces_it(tmp_path: Path) -> None:
    layout(tmp_path, test=False)
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path), im_ext="png", cache_dir=None)
    msg = str(err.value)
    assert f"'{tmp_path}' has train/ and unlabelled/ but no test/" in msg and "--test" in msg
    class_folders(tmp_path / "elsewhere", {"dog": 1, "cat": 1})
    train, test = load_dataset(str(tmp_path), test_dir=tmp_path / "elsewhere", im_ext="png", cache_dir=None)
    assert len(test) == 2 and train.unlabelled is not None and len(train.unlabelled) == 4


def test_layout_with_an_empty_unlabelled_folder_says_so(tmp_path: Path) -> None:
    class_folders(tmp_path / "train", {"cat": 2, "dog": 2})
    class_folders(tmp_path / "test", {"cat": 1, "dog": 1})
    (tmp_path / "unlabelled").mkdir()
    with pytest.raises(DataError) as err:
        load_dataset(str(tmp_path), im_ext="png", cache_dir=None)
    assert f"'{tmp_path / 'unlabelled'}' holds no image files (it is empty)" in str(err.value)
    assert "leave the folder out" in str(err.value)


def test_plain_class_folder_data_sets_load_as_before(tmp_path: Path) -> None:
    class_folders(tmp_path / "tt" / "train", {"cat": 2, "dog": 2})
    class_folders(tmp_path / "tt" / "test", {"cat": 1, "dog": 1})
    assert detect_folder_kind(tmp_path / "tt") == "train-test"
    train, test = load_dataset(str(tmp_path / "tt"), im_ext="png", cache_dir=None)
    assert train.unlabelled is None and len(train) == 4 and len(test) == 2
    assert torch.equal(train.images, load_image_folder(tmp_path / "tt" / "train", im_ext="png").images)
    assert torch.equal(train.with_unlabelled_appended().labels, train.labels)
    # the authors' --data_dir / --test
    assert detect_folder_kind(tmp_path / "tt" / "train") == "class-folders"
    train2, _ = load_dataset(str(tmp_path / "tt" / "train"), test_dir=tmp_path / "tt" / "test", im_ext="png", cache_dir=None)
    assert train2.unlabelled is None and torch.equal(train2.images, train.images)
    digits, _ = load_dataset("digits")
    assert digits.unlabelled is None
    (tmp_path / "none").mkdir()
    assert detect_folder_kind(tmp_path / "none") is None
