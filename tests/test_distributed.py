"""Data-parallel training on 2 CPU processes (gloo), launched as torchrun launches them."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mbdml import distributed as D
from mbdml.data.batches import BatchLoader

SCRIPTS = Path(__file__).parent / "distributed_scripts"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------- pure parts
@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 4), (0, 2)])
def test_shards_cover_the_range_once_in_order(n, world):
    parts = [D.shard_slice(n, r, world) for r in range(world)]
    assert [i for p in parts for i in range(n)[p]] == list(range(n))
    sizes = [p.stop - p.start for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_single_process_context_changes_nothing():
    ctx = D.init_distributed("cpu") if "WORLD_SIZE" not in os.environ else D.SINGLE
    assert not ctx.enabled and ctx.is_main
    x = torch.arange(6.0).view(3, 2)
    assert D.all_gather_rows(x, ctx) is x
    assert D.sum_scalars({"a": 1.5}, ctx) == {"a": 1.5}
    assert D.broadcast_object({"k": 1}, ctx) == {"k": 1}


def test_sharded_loader_slices_the_same_global_batch():
    """Every rank draws the same global batch and augmentation, then keeps its slice."""
    from mbdml.data.batches import Augmentation

    images = torch.randint(0, 255, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40) % 4
    aug = Augmentation(flip=True, crop_padding=2)

    def batches(shard, batch):
        loader = BatchLoader(images, labels, batch, shuffle=True, augmentation=aug, generator=torch.Generator().manual_seed(5), shard=shard, drop_last=True)
        return list(loader)

    whole = batches(None, 8)
    parts = [batches((r, 2), 4) for r in range(2)]
    assert len(whole) == len(parts[0]) == len(parts[1]) == 5
    for w, a, b in zip(whole, *parts):
        assert torch.equal(torch.cat([a.indices, b.indices]), w.indices)
        assert torch.equal(torch.cat([a.images, b.images]), w.images)
        assert torch.equal(torch.cat([a.labels, b.labels]), w.labels)


# ------------------------------------------------------------ two real processes
def test_one_step_equals_one_process_on_the_concatenated_batch(tmp_path):
    """Loss and gradients (network, head, kernel weights) of a 2-process step equal a
    single process on the 2B images. BatchNorm runs on its running statistics here:
    on CPUs its batch statistics are per process. Mixup is off (alpha 0): its pairs
    are drawn per process by design. Pair- and proxy-based baselines are not compared:
    their pairs are formed inside each process's slice."""
    methods = "nngk,softmax,mbdml1,mbdml2,mbdml3,softtriple"
    res = torchrun(str(SCRIPTS / "one_step.py"), str(tmp_path / "two.pt"), methods, "8")
    assert res.returncode == 0, res.stderr[-3000:]
    single = subprocess.run([sys.executable, str(SCRIPTS / "one_step.py"), str(tmp_path / "one.pt"), methods, "16"], capture_output=True, text=True, env=ENV, timeout=120)
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    for m in methods.split(","):
        a, b = two[m], one[m]
        assert sum(a["indices"], []) == b["indices"][0]  # the same 16 images
        assert len(set(a["indices"][0]) & set(a["indices"][1])) == 0
        assert sum(a["losses"]) / 2 == pytest.approx(b["losses"][0], rel=1e-5), m
        assert a["grads"].keys() == b["grads"].keys()
        for name, g in b["grads"].items():
            assert torch.allclose(a["grads"][name], g, rtol=1e-4, atol=1e-6), (m, name)
        if m.startswith(("nngk", "mbdml")):
            assert "method.kernel.log_weights" in a["grads"]  # kernel weights kept in step


def _summary(run_root: Path) -> dict:
    (run,) = [p for p in run_root.iterdir() if p.is_dir()]
    return json.loads((run / "summary.json").read_text())


def test_two_process_run_matches_one_process_run(tmp_path):
    """A short digits run on 2 processes (B=32 each) against 1 process (B=64): the same
    global batches, so the same accuracy up to Mixup pairs and BatchNorm batch stats."""
    common = ["train", "--dataset", "digits", "--method", "mbdml2", "--max_epochs", "16", "--no-progress", "--retrieval_metrics", "false"]
    res = torchrun("-m", "mbdml", *common, "--batch_size", "32", "--save_dir", str(tmp_path / "two"))
    assert res.returncode == 0, res.stderr[-3000:]
    single = subprocess.run([sys.executable, "-m", "mbdml", *common, "--batch_size", "64", "--save_dir", str(tmp_path / "one")], capture_output=True, text=True, env=ENV, timeout=240)
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = _summary(tmp_path / "two"), _summary(tmp_path / "one")
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["final"]["nngk_acc"] > 0.75
    assert abs(two["final"]["nngk_acc"] - one["final"]["nngk_acc"]) < 0.05
    # only rank 0 wrote: one run folder, one table on stdout
    assert len(list((tmp_path / "two").iterdir())) == 1
    assert res.stdout.count("final model") == 1
    (run,) = list((tmp_path / "two").iterdir())
    assert {"config.json", "metrics.csv", "summary.json", "last.pt", "best.pt"} <= {p.name for p in run.iterdir()}
    state = torch.load(run / "last.pt", weights_only=False)
    assert state["world_size"] == 2 and len(state["mix_gen_ranks"]) == 2
    # resuming with another number of processes would change the batches: refused clearly
    again = subprocess.run([sys.executable, "-m", "mbdml", "train", "--resume", str(run)], capture_output=True, text=True, env=ENV, timeout=120)
    assert again.returncode == 2
    assert "trained with 2 process(es) and is resumed with 1" in again.stderr


def test_a_dead_rank_stops_the_other_with_a_clear_message(tmp_path):
    """Rank 1 is killed mid-run (as if its node died); rank 0 must not hang: its next
    collective fails and it stops with a message that names the cause and the fix."""
    port = free_port()
    args = [sys.executable, "-m", "mbdml", "train", "--dataset", "digits", "--method", "nngk", "--max_epochs", "400", "--batch_size", "16",
            "--no-progress", "--save_dir", str(tmp_path), "--dist_timeout", "60"]
    procs = []
    for rank in range(2):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    try:
        deadline = time.time() + 120
        while not list(tmp_path.glob("*/metrics.csv")):
            assert time.time() < deadline, "the run never finished an epoch"
            assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL)
        t0 = time.time()
        _, err = procs[0].communicate(timeout=90)
        assert time.time() - t0 < 60
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[0].returncode == 2, err[-2000:]
    assert "lost contact with the other training processes" in err
    assert "--resume" in err
    assert "Traceback" not in err


def test_two_processes_share_the_teachers_labelling_and_keep_the_same_images(tmp_path):
    """Each process embeds half of the unlabelled images for the teacher; the gathered
    labels equal one process's labelling of them all."""
    from mbdml.config import make_config
    from mbdml.self_training import label_with_teacher
    from mbdml.train import train
    from mbdml.training_data import prepare_data

    small = dict(dataset="digits", model="resnet_small", width=8, embedding_dim=16, k=20, batch_size=32, sigma=1.0,
                 progress=False, retrieval_metrics=False, deterministic=True, cache_dir=str(tmp_path / "cache"))
    teacher = train(make_config(**small, method="mbdml1", max_epochs=2, save_dir=str(tmp_path), name="teacher")).run_dir
    student = {**small, "method": "mixup", "teacher": str(teacher), "teacher_fraction": 0.6}
    (tmp_path / "student.json").write_text(json.dumps(student))
    res = torchrun(str(SCRIPTS / "teacher_labels.py"), str(tmp_path / "two.pt"), str(tmp_path / "student.json"))
    assert res.returncode == 0, res.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt")
    cfg = make_config(**student).resolved()
    data = prepare_data(cfg)
    one = label_with_teacher(cfg, data, torch.device("cpu"))
    n = len(data.unlabelled)
    assert sum(two["embedded"]) == n and abs(two["embedded"][0] - two["embedded"][1]) <= 1
    assert torch.equal(two["indices"], one.indices) and torch.equal(two["labels"], one.labels)
    assert torch.allclose(two["confidence"], one.confidence, atol=1e-5)
    assert 0.5 * n <= one.indices.numel() <= 0.6 * n
