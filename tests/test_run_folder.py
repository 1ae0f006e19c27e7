"""A run folder has one writer at a time, and a new run gets a folder of its own."""

import os

import pytest

from mbdml.checkpoint import save_checkpoint
from mbdml.errors import CheckpointError
from mbdml.run_folder import RunFolderLock, claim_new_run_dir, claim_run_dir


def test_second_writer_is_refused_with_the_first_ones_pid(tmp_path):
    first = RunFolderLock(tmp_path).acquire()
    with pytest.raises(CheckpointError, match=f"in use by another mbdml process \\(PID {os.getpid()}\\).*kill {os.getpid()}"):
        RunFolderLock(tmp_path).acquire()
    first.release()
    RunFolderLock(tmp_path).acquire().release()  # free again once released


def test_claiming_a_folder_removes_what_killed_writes_left(tmp_path):
    save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    (tmp_path / ".last.pt.k3j2h1.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / "teacher").mkdir()
    (tmp_path / "teacher" / ".best.pt.x.tmp").write_bytes(b"half")
    lock = claim_run_dir(tmp_path)
    try:
        assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [".mbdml.lock", "last.pt"]
    finally:
        lock.release()


def _claim(args):
    save_dir, name, barrier = args
    barrier.wait()
    path, lock = claim_new_run_dir(save_dir, name)
    (path / "config.json").write_text("{}")  # the run starts: the folder now holds a run
    lock.release()
    return str(path)


def test_processes_starting_at_once_get_folders_of_their_own(tmp_path):
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(4)
        with ctx.Pool(4) as pool:
            got = pool.map(_claim, [(str(tmp_path), "run", barrier)] * 4)
    assert sorted(got) == sorted(str(tmp_path / n) for n in ("run", "run-2", "run-3", "run-4"))


def test_a_folder_left_by_a_failed_start_is_used_again(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train.log").write_text("run stopped: bad data\n")
    path, lock = claim_new_run_dir(tmp_path, "run")
    lock.release()
    assert path == tmp_path / "run"
    (tmp_path / "run" / "config.json").write_text("{}")
    path, lock = claim_new_run_dir(tmp_path, "run")
    lock.release()
    assert path == tmp_path / "run-2"
