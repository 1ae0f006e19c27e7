"""Bad input through the real command line: each case ends in one line naming the problem
and the fix (exit status 2, no traceback), and nothing is lost, run or left behind."""

from __future__ import annotations

import csv
import json
import os
import resource
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbdml.checkpoint import load_checkpoint, save_checkpoint
from mbdml.cli import build_parser, config_from_args, main
from mbdml.config import make_config
from mbdml.run_folder import RunFolderLock
from mbdml.train import Trainer
from cli_helpers import error_line

TINY = ["--width", "8", "--embedding_dim", "8", "--k", "10", "--batch_size", "32", "--retrieval_metrics", "False", "--no-progress"]
DIGITS = ["--dataset", "digits", *TINY, "--labelled_fraction", "0.2"]


def run_cli(*argv: str, cwd: Path | None = None, max_file_bytes: int | None = None) -> subprocess.CompletedProcess:
    """``mbdml ARGV`` in a new process; ``max_file_bytes`` makes every larger file write fail
    (the process's file size limit: what a full disk does to the writes that need more room)."""

    def limit_file_size() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run([sys.executable, "-m", "mbdml", *argv], capture_output=True, text=True, timeout=600, cwd=cwd,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), preexec_fn=limit_file_size if max_file_bytes else None)




@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch run on the digits."""
    save = tmp_path_factory.mktemp("trained")
    assert main(["-q", "train", *DIGITS, "--method", "mbdml1", "--max_epochs", "1", "--save_dir", str(save), "--name", "run"]) == 0
    return save / "run"


@pytest.fixture
def run_copy(trained: Path, tmp_path: Path) -> Path:
    shutil.copytree(trained, tmp_path / "run")
    return tmp_path / "run"


def write_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), n: int = 8, side: int = 12, ext: str = "jpg") -> None:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)).save(root / c / f"{i}.{ext}")


# ------------------------------------------------------------------ a full disk
def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_file(tmp_path: Path) -> None:
    # 200 kB: config.json, the logs and metrics fit, a checkpoint of this network does not
    res = run_cli("train", *DIGITS, "--max_epochs", "1", "--save_dir", str(tmp_path), "--name", "r", max_file_bytes=200_000)
    error_line(res.returncode, res.stderr, "could not write", ".pt", "the previous file there is intact", "Free disk space", "--resume")
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert (tmp_path / "r" / "config.json").is_file()
    assert "run stopped: could not write" in (tmp_path / "r" / "train.log").read_text()


def test_a_full_disk_under_the_image_cache_costs_only_the_cache(tmp_path: Path) -> None:
    write_folder(tmp_path / "data", n=20, side=32)  # the cache file: 40 images of 3 kB
    code = ("from mbdml.data import load_image_folder; import sys; "
            f"d = load_image_folder({str(tmp_path / 'data')!r}, cache_dir={str(tmp_path / 'cache')!r}); print(len(d))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         preexec_fn=lambda: (signal.signal(signal.SIGXFSZ, signal.SIG_IGN),
                                             resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, 60_000))))
    assert res.returncode == 0 and res.stdout.strip() == "40", res.stderr
    assert "cannot write image cache" in res.stderr and "free disk space" in res.stderr and "--cache_dir" in res.stderr
    assert "Traceback" not in res.stderr
    assert list((tmp_path / "cache").iterdir()) == []  # no partial .tmp


# ------------------------------------------------------------------ zero is a number
def test_pseudo_start_zero_is_the_first_epoch(tmp_path: Path) -> None:
    # four epochs: without the 0, pseudo-labels would start at epoch 4 // 4 = 1
    argv = ["-q", "train", *DIGITS, "--method", "mbdml_semi", "--pseudo_start", "0", "--max_epochs", "4", "--eval_every", "4",
            "--save_dir", str(tmp_path), "--name", "s"]
    assert main(argv) == 0
    assert json.loads((tmp_path / "s" / "config.json").read_text())["pseudo_start"] == 0  # what was asked
    with open(tmp_path / "s" / "metrics.csv", newline="") as f:
        first = next(csv.DictReader(f))
    assert first["epoch"] == "1" and first["pseudo_n"] != ""  # labelled before the first epoch


@pytest.mark.parametrize(
    "flag, needle",
    [
        ("--teacher_epochs", "teacher_epochs must be a whole number >= 1"),
        ("--recalibrate_bn_images", "recalibrate_bn_images must be a whole number >= 1 (or none"),
        ("--embedding_dim", "embedding_dim must be >= 1 (or none"),
    ],
)
def test_zero_where_it_has_no_meaning_is_refused_and_none_spells_off(tmp_path: Path, capsys: pytest.CaptureFixture, flag: str, needle: str) -> None:
    code = main(["train", *DIGITS, "--method", "mbdml1", flag, "0", "--save_dir", str(tmp_path / "runs")])
    line = error_line(code, capsys.readouterr().err, needle, "got 0")
    assert "none" in line
    assert not (tmp_path / "runs").exists()  # refused before anything started
    cfg = config_from_args(build_parser().parse_args(["train", flag, "none"]))
    assert getattr(cfg, flag[2:]) is None


# ------------------------------------------------------------------ checkpoints with unexpected contents
def _damage(path: Path, how: str) -> None:
    state = load_checkpoint(path)
    if how == "no method":
        del state["method"]
    else:
        state["method"] = list(state["method"])
    save_checkpoint(state, path)


@pytest.mark.parametrize("how, needle", [("no method", "has no 'method'"), ("method a list", "has 'method' as a list")])
@pytest.mark.parametrize("command", ["evaluate", "embed", "resume", "teacher"])
def test_a_checkpoint_with_unexpected_contents_is_described(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            command: str, how: str, needle: str) -> None:
    for name in ("best.pt", "last.pt"):
        _damage(run_copy / name, how)
    before = (run_copy / "last.pt").read_bytes()
    argv = {
        "evaluate": ["evaluate", str(run_copy)],
        "embed": ["embed", str(run_copy), "--out", str(tmp_path / "e.npz")],
        "resume": ["train", "--resume", str(run_copy)],
        "teacher": ["train", *DIGITS, "--method", "mbdml1", "--max_epochs", "1", "--teacher", str(run_copy), "--save_dir", str(tmp_path / "runs")],
    }[command]
    error_line(main(argv), capsys.readouterr().err, "checkpoint", needle, "was not written by mbdml, or was edited")
    assert (run_copy / "last.pt").read_bytes() == before
    assert not (tmp_path / "e.npz").exists()


# ------------------------------------------------------------------ unwritable places
def test_an_unwritable_save_dir_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    for save_dir, why in ((tmp_path / "file", "is a file, not a folder"), (Path("/proc/mbdml-test"), "")):
        code = main(["train", *DIGITS, "--max_epochs", "1", "--save_dir", str(save_dir)])
        error_line(code, capsys.readouterr().err, "cannot create the run folder", why, "choose another --save_dir")
    assert (tmp_path / "file").read_text() == "x"


def test_out_files_that_cannot_be_written_name_out(run_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "file").write_text("x")
    for argv in (["embed", str(run_copy), "--out", str(tmp_path / "file" / "e.npz")],
                 ["evaluate", str(run_copy), "--out", str(tmp_path / "file" / "m.json")]):
        line = error_line(main(argv), capsys.readouterr().err, "is a file, not a folder", "pass another --out")
        assert "--save_dir" not in line
    assert main(["embed", str(run_copy), "--out", str(tmp_path / "e.npz")]) == 0
    assert np.load(tmp_path / "e.npz")["test_embeddings"].shape[1] == 8


# ------------------------------------------------------------------ leftovers
def test_a_start_that_fails_before_training_logs_why_and_leaves_its_name_free(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", *DIGITS, "--num_classes", "7", "--max_epochs", "1", "--save_dir", str(tmp_path), "--name", "r"])
    error_line(code, capsys.readouterr().err, "--num_classes 7 disagrees")
    assert "run stopped: --num_classes 7 disagrees" in (tmp_path / "r" / "train.log").read_text()
    assert main(["-q", "train", *DIGITS, "--max_epochs", "1", "--save_dir", str(tmp_path), "--name", "r"]) == 0
    assert (tmp_path / "r" / "summary.json").is_file() and not (tmp_path / "r-2").exists()


class Stop(Exception):
    pass


def test_resume_removes_half_written_files_and_counts_the_time_before(tmp_path: Path) -> None:
    cfg = make_config(dataset="digits", width=8, embedding_dim=8, k=10, batch_size=32, retrieval_metrics=False, labelled_fraction=0.2,
                      max_epochs=2, update_interval=1, progress=False, save_dir=str(tmp_path), name="r")

    def stop(row: dict) -> None:
        raise Stop

    with pytest.raises(Stop):
        Trainer(cfg, on_epoch_end=stop).run()
    run = tmp_path / "r"
    state = load_checkpoint(run / "last.pt")
    assert state["epoch"] == 1 and 0 < state["seconds"] < 1000
    state["seconds"] = 1000.0  # as if the first epoch had taken 1000 s
    save_checkpoint(state, run / "last.pt")
    (run / ".last.pt.x7f3k2.tmp").write_bytes(b"what a killed write left")
    assert main(["-q", "train", "--resume", str(run)]) == 0
    assert not list(run.glob("*.tmp"))
    assert json.loads((run / "summary.json").read_text())["seconds"] > 1000


# ------------------------------------------------------------------ paths
def test_paths_are_saved_absolute_so_runs_work_from_any_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_folder(tmp_path / "data" / "train", n=12)
    write_folder(tmp_path / "data" / "test", n=4)
    split = [*TINY, "--method", "mbdml1", "--max_epochs", "1", "--labelled_fraction", "0.5", "--val_fraction", "0.2", "--k", "5", "--batch_size", "4"]
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "train", "--data_dir", "data/train", "--test", "data/test", *split, "--save_dir", "runs", "--name", "teacher"]) == 0
    saved = json.loads((tmp_path / "runs" / "teacher" / "config.json").read_text())
    assert saved["dataset"] == str(tmp_path / "data" / "train") and saved["test_dir"] == str(tmp_path / "data" / "test")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["evaluate", str(tmp_path / "runs" / "teacher")]) == 0
    # the teacher's folder named relative, the data absolute: the same split, accepted
    student = ["--data_dir", str(tmp_path / "data" / "train"), "--test", str(tmp_path / "data" / "test"), *split]
    assert main(["-q", "train", *student, "--teacher", "../runs/teacher", "--save_dir", "../runs", "--name", "student"]) == 0
    assert json.loads((tmp_path / "runs" / "student" / "config.json").read_text())["teacher"] == str(tmp_path / "runs" / "teacher")


# ------------------------------------------------------------------ one writer per run folder
def test_a_second_writer_of_a_run_folder_is_refused_with_the_first_ones_pid(run_copy: Path) -> None:
    before = {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != ".mbdml.lock"}
    with RunFolderLock(run_copy):  # this process writes the run
        res = run_cli("train", "--resume", str(run_copy))
    error_line(res.returncode, res.stderr, f"is in use by another mbdml process (PID {os.getpid()})", f"kill {os.getpid()}")
    assert {p.name: p.read_bytes() for p in run_copy.iterdir() if p.is_file() and p.name != ".mbdml.lock"} == before


# ------------------------------------------------------------------ data
def png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels (a few hundred bytes: a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def test_an_image_of_too_many_pixels_is_refused_before_decoding(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_folder(tmp_path / "train", ext="png")
    write_folder(tmp_path / "test", ext="png", n=2)
    png_header_only(tmp_path / "train" / "cat" / "bomb.png", 13_000, 13_000)
    base = ["train", "--data_dir", str(tmp_path / "train"), "--test", str(tmp_path / "test"), "--im_ext", "png", *TINY,
            "--max_epochs", "1", "--save_dir", str(tmp_path / "runs"), "--cache_dir", str(tmp_path / "cache")]
    error_line(main(base), capsys.readouterr().err, "bomb.png' is 13000 x 13000 = 169,000,000 pixels", "100,000,000",
               "--max_image_pixels", "--on-bad-image skip")
    # a cap below the real images' 144 pixels refuses them too; the default takes them
    error_line(main([*base, "--max_image_pixels", "100"]), capsys.readouterr().err, "0.png' is 12 x 12 = 144 pixels", "100 of --max_image_pixels")
    assert main(["-q", *base, "--on-bad-image", "skip", "--name", "skip"]) == 0
    assert "skipped 1 unreadable image file" in capsys.readouterr().err


def test_a_single_class_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_folder(tmp_path / "train", classes=("cat",))
    write_folder(tmp_path / "test", classes=("cat",), n=2)
    code = main(["train", "--data_dir", str(tmp_path / "train"), "--test", str(tmp_path / "test"), *TINY, "--save_dir", str(tmp_path / "runs")])
    error_line(code, capsys.readouterr().err, "has a single class ('cat')", "at least two classes")


def test_a_class_folder_linking_to_the_data_folder_is_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_folder(tmp_path / "train")
    write_folder(tmp_path / "test", n=2)
    (tmp_path / "train" / "self").symlink_to(".")
    code = main(["train", "--data_dir", str(tmp_path / "train"), "--test", str(tmp_path / "test"), *TINY, "--save_dir", str(tmp_path / "runs")])
    error_line(code, capsys.readouterr().err, "train/self' is a symbolic link to", "(a link loop, not a class); remove the link")
