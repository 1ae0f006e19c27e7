"""A real training process killed with SIGKILL mid-run resumes to the same result."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from mbdml.checkpoint import load_checkpoint

ARGS = ["--dataset", "digits", "--method", "mbdml3", "--width", "8", "--embedding_dim", "16", "--k", "20", "--sigma", "0.5",
        "--batch_size", "8", "--max_epochs", "6", "--update_interval", "2", "--eval_every", "1", "--deterministic", "True",
        "--retrieval_metrics", "False", "--no-progress"]


def train_cmd(save_dir, name):
    return [sys.executable, "-m", "mbdml", "-q", "train", *ARGS, "--save_dir", str(save_dir), "--name", name]


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    full = subprocess.run(train_cmd(tmp_path, "full"), capture_output=True, text=True, timeout=300, env=env)
    assert full.returncode == 0, full.stderr

    proc = subprocess.Popen(train_cmd(tmp_path, "cut"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    last = tmp_path / "cut" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not last.exists():
        time.sleep(0.02)
    assert last.exists(), "the run wrote no checkpoint"
    time.sleep(0.3)  # well inside a later epoch
    still_running = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert still_running, "the run ended before it could be killed; make it longer"
    done = load_checkpoint(last)["epoch"]  # the checkpoint left behind is loadable
    assert 1 <= done < 6

    resumed = subprocess.run([sys.executable, "-m", "mbdml", "-q", "train", "--resume", str(tmp_path / "cut")], capture_output=True, text=True, timeout=300, env=env)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "summary.json").read_text())
    b = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert a["final"] == b["final"] and a["best_val"] == b["best_val"]
    ha = load_checkpoint(tmp_path / "full" / "last.pt")["history"]
    hb = load_checkpoint(last)["history"]
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]
    assert len(hb) == 6
