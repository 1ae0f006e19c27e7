"""mbdml predict: image files in, the run's own kernel-classifier probabilities out, as CSV."""

from __future__ import annotations

import csv
import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbdml.cli import main
from mbdml.data.sources import load_digits_builtin
from mbdml.evaluate import compute_embeddings
from mbdml.export import export_run
from mbdml.predict import classify_files, classify_images, image_files, open_run, read_images
from mbdml.components import load_run
from cli_helpers import error_line

TINY = ["--width", "8", "--embedding_dim", "16", "--k", "20", "--batch_size", "32", "--retrieval_metrics", "False", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-epoch digits run (grey 8x8) that averages each embedding with its mirror image's."""
    save = tmp_path_factory.mktemp("predict-run")
    argv = ["-q", "train", "--dataset", "digits", "--max_epochs", "2", "--eval_every", "2", "--tta_flip", "true",
            "--save_dir", str(save), "--name", "run", *TINY]
    assert main(argv) == 0
    return save / "run"


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Twelve digits test images, uint8 (12, 1, 8, 8)."""
    return load_digits_builtin()[1].images[:12]


def save_grey(images: torch.Tensor, folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for image, path in zip(images, paths):
        Image.fromarray(image[0].numpy(), mode="L").save(path)
    return paths


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def direct_probabilities(run_dir: Path, images: torch.Tensor) -> torch.Tensor:
    """load_run, compute_embeddings (with the run's flip averaging), predict_log_proba."""
    loaded = load_run(run_dir)
    cfg = loaded.config
    with torch.no_grad():
        emb = compute_embeddings(loaded.model, images, mean=cfg.mean, std=cfg.std, flip_average=cfg.tta_flip)
        return loaded.kernel.predict_log_proba(emb).exp()




def test_probabilities_are_the_runs_and_the_exported_programs(run: Path, digits: torch.Tensor, tmp_path: Path, capsys) -> None:
    # nested folders, an upper-case extension, and one file named on its own
    files = save_grey(digits[:8], tmp_path / "in" / "a" / "b", [f"{i:02d}.PNG" for i in range(8)])
    files += save_grey(digits[8:], tmp_path / "in", [f"{i:02d}.png" for i in range(8, 12)])
    single = save_grey(digits[:1], tmp_path / "other", ["one.bmp"])
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(tmp_path / "in"), str(single[0]), "--out", str(out), "--batch_size", "5"]) == 0
    assert f"wrote {out}: 13 images" in capsys.readouterr().out
    rows = read_csv(out)
    in_order = files[8:] + files[:8]  # sorted by path: in/08.png ... before in/a/b/...
    assert [r["file"] for r in rows] == [str(p) for p in in_order + single]
    want = direct_probabilities(run, torch.cat([digits[8:], digits[:8], digits[:1]]))
    top_p, top_c = want.topk(3, dim=1)
    for i, r in enumerate(rows):
        assert r["class"] == str(int(top_c[i, 0])) and r["class_2"] == str(int(top_c[i, 1])) and r["class_3"] == str(int(top_c[i, 2]))
        for j, key in enumerate(("probability", "probability_2", "probability_3")):
            assert abs(float(r[key]) - float(top_p[i, j])) <= 2e-6  # 6 decimals, and batches of another size
    # the library's full probabilities against the one-file program of 'mbdml export'
    program_path = export_run(run, tmp_path / "model.pt2")
    program = torch.export.load(str(program_path)).module()
    result = classify_files(open_run(run, device="cpu"), [tmp_path / "in"])
    with torch.no_grad():
        exported = program(torch.cat([digits[8:], digits[:8]]))
    assert torch.allclose(result.probabilities, exported, atol=1e-5)
    assert torch.allclose(result.probabilities, want[:12], atol=1e-6)


def test_uncertain_marks_the_probabilities_below_min_confidence(run: Path, digits: torch.Tensor, tmp_path: Path) -> None:
    save_grey(digits, tmp_path / "in", [f"{i:02d}.png" for i in range(12)])
    top = direct_probabilities(run, digits).max(1).values
    threshold = float(top.median())
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(tmp_path / "in"), "--out", str(out), "--min_confidence", str(threshold)]) == 0
    rows = read_csv(out)
    assert list(rows[0]) == ["file", "class", "probability", "class_2", "probability_2", "class_3", "probability_3", "uncertain"]
    marked = [r["uncertain"] == "true" for r in rows]
    assert marked == [bool(p < threshold) for p in top]
    assert 0 < sum(marked) < len(marked)
    for bound, expected in (("0", "false"), ("1", "true")):
        assert main(["predict", str(run), str(tmp_path / "in"), "--out", str(out), "--min_confidence", bound]) == 0
        assert {r["uncertain"] for r in read_csv(out)} == {expected}


def test_folders_are_searched_at_any_depth_for_image_extensions_in_any_case(tmp_path: Path) -> None:
    tiny = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    found = save_grey(tiny, tmp_path / "d" / "x" / "y" / "z", ["deep.JPG"]) + save_grey(tiny, tmp_path / "d", ["top.webp"])
    save_grey(tiny, tmp_path / "d" / ".hidden", ["secret.png"])
    (tmp_path / "d" / "notes.txt").write_text("not an image")
    (tmp_path / "d" / ".thumb.png").write_bytes(b"")
    (tmp_path / "d" / "x" / "loop").symlink_to(tmp_path / "d")  # a link back up is searched once
    listed = image_files([tmp_path / "d", found[1]])
    assert listed == [tmp_path / "d" / "top.webp", tmp_path / "d" / "x" / "y" / "z" / "deep.JPG"]


def test_an_image_of_another_size_or_mode_is_brought_to_the_runs_shape(run: Path, digits: torch.Tensor, tmp_path: Path, capsys) -> None:
    loaded = open_run(run, device="cpu")
    assert loaded.image_shape == (1, 8, 8)
    # a grey digit stored as a colour file: the same image, the same probabilities
    colour = tmp_path / "in" / "colour.png"
    colour.parent.mkdir()
    Image.fromarray(digits[0, 0].numpy(), mode="L").convert("RGB").save(colour)
    # a colour photo of another size: PIL bilinear to 8x8, then PIL's grey
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    Image.fromarray(photo).save(tmp_path / "in" / "photo.png")
    expected = np.array(Image.fromarray(photo).resize((8, 8), Image.BILINEAR).convert("L"))
    read = read_images(image_files([tmp_path / "in"]), (1, 8, 8))
    assert torch.equal(read.images[0], digits[0]) and np.array_equal(read.images[1, 0].numpy(), expected)
    assert (read.resized, read.made_grey) == (1, 1)
    out = tmp_path / "p.csv"
    assert main(["predict", str(run), str(tmp_path / "in"), "--out", str(out)]) == 0
    assert "1 resized to 8x8; 1 colour image(s) made grey" in capsys.readouterr().out
    _, want = classify_images(loaded, torch.stack([digits[0], torch.from_numpy(expected)[None]]))
    got = [float(r["probability"]) for r in read_csv(out)]
    assert got == pytest.approx(want.max(1).values.tolist(), abs=2e-6)


def test_an_unreadable_file_stops_with_its_name_or_is_skipped_and_counted(run: Path, digits: torch.Tensor, tmp_path: Path, capsys) -> None:
    save_grey(digits[:3], tmp_path / "in", ["a.png", "b.png", "c.png"])
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "p.csv"
    code = main(["predict", str(run), str(tmp_path / "in"), "--out", str(out)])
    error_line(code, capsys.readouterr().err, "broken.jpg", "--on-bad-image skip")
    assert not out.exists()
    for spelling in ("--on-bad-image", "--on_bad_image"):
        assert main(["predict", str(run), str(tmp_path / "in"), "--out", str(out), spelling, "skip"]) == 0
        said = capsys.readouterr().out
        assert "3 images" in said and "1 unreadable file(s) skipped" in said
        assert [Path(r["file"]).name for r in read_csv(out)] == ["a.png", "b.png", "c.png"]


def test_the_skip_count_is_in_the_final_message(run: Path, digits: torch.Tensor, tmp_path: Path) -> None:
    save_grey(digits[:3], tmp_path / "in", ["a.png", "b.png", "c.png"])
    (tmp_path / "in" / "broken.png").write_bytes(b"nothing")
    res = subprocess.run([sys.executable, "-m", "mbdml", "predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "p.csv"),
                          "--on-bad-image", "skip"], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "3 images" in res.stdout and "1 unreadable file(s) skipped" in res.stdout
    assert "\r" not in res.stderr and "image/s" not in res.stderr  # a redirected log gets no bar frames


def test_a_bar_is_drawn_on_a_terminal(run: Path, digits: torch.Tensor, tmp_path: Path) -> None:
    save_grey(digits, tmp_path / "in", [f"{i:02d}.png" for i in range(12)])
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    proc = subprocess.Popen([sys.executable, "-m", "mbdml", "predict", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "p.csv"),
                             "--batch_size", "4"], stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the process closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    assert b"12/12" in seen and b"images" in seen


@pytest.mark.parametrize(
    "argv, needles",
    [
        (["{run}", "{tmp}/empty"], ["holds no image files", "empty"]),
        (["{run}", "{tmp}/missing"], ["does not exist"]),
        (["{tmp}", "{tmp}/in"], ["config.json", "run folder"]),
        (["{run}", "{tmp}/in", "--min_confidence", "1.5"], ["--min_confidence 1.5", "from 0 to 1"]),
        (["{run}", "{tmp}/in", "--min_confidence", "-0.1"], ["--min_confidence -0.1"]),
        (["{run}", "{tmp}/in", "--batch_size", "0"], ["--batch_size 0"]),
        (["{run}", "{tmp}/in", "--out", "{tmp}/in"], ["is a folder"]),
        (["{run}", "{tmp}/in", "--max_image_pixels", "10"], ["--max_image_pixels", "a.png"]),
    ],
)
def test_bad_input_is_one_line_with_status_2(run: Path, digits: torch.Tensor, tmp_path: Path, capsys, argv: list[str], needles: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    save_grey(digits[:1], tmp_path / "in", ["a.png"])
    code = main(["predict", *[a.format(run=run, tmp=tmp_path) for a in argv]])
    error_line(code, capsys.readouterr().err, *needles)


def test_bad_input_through_a_new_process(run: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "mbdml", "predict", str(run), str(tmp_path / "nothing-here")],
                         capture_output=True, text=True, timeout=300)
    error_line(res.returncode, res.stderr, "nothing-here", "does not exist")
