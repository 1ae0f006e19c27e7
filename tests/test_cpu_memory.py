import json
import platform
import subprocess
import sys

import pytest

from mbdml.cpu_memory import find_allocator_library, preloaded_allocator

GLIBC_LINUX = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"

MAPS = """\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1 /usr/bin/python3.11
7f0a1c000000-7f0a1c200000 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libc.so.6
7f0a1d000000-7f0a1d100000 r-xp 00000000 08:01 3 /venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so
7f0a1e000000-7f0a1e001000 rw-p 00000000 00:00 0 [heap]
"""


def run_python(code: str, env_extra: dict[str, str] | None = None) -> str:
    import os

    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"} | (env_extra or {})
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return out.stdout.strip()


def test_preloaded_allocator_is_read_from_the_memory_map():
    assert preloaded_allocator(MAPS) is None
    jemalloc = MAPS + "7f0a1f000000-7f0a1f100000 r-xp 00000000 08:01 4 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"
    assert preloaded_allocator(jemalloc) == "jemalloc"
    tcmalloc = MAPS + "7f0a1f000000-7f0a1f100000 r-xp 00000000 08:01 4 /usr/lib/libtcmalloc_minimal.so.4.5.10\n"
    assert preloaded_allocator(tcmalloc) == "tcmalloc"
    assert preloaded_allocator("") is None


@pytest.mark.skipif(not GLIBC_LINUX, reason="glibc's mallopt: Linux with glibc only")
def test_keep_freed_memory_tunes_glibc_in_a_fresh_process():
    # A fresh process: the setting is process-wide and cannot be undone.
    said = run_python("from mbdml.cpu_memory import keep_freed_memory; print(keep_freed_memory())")
    assert said.startswith("glibc, tuned")


@pytest.mark.skipif(not GLIBC_LINUX, reason="LD_PRELOAD of a shared library: Linux only")
def test_a_preloaded_allocator_is_left_alone():
    library = find_allocator_library("jemalloc") or find_allocator_library("tcmalloc")
    if library is None:
        pytest.skip("neither jemalloc nor tcmalloc is installed (apt-get install libjemalloc2)")
    said = run_python("from mbdml.cpu_memory import keep_freed_memory; print(keep_freed_memory())", {"LD_PRELOAD": library})
    assert said.endswith("(preloaded): left as it is")
    assert said.split()[0] in library


def test_off_switch_is_recorded_and_changes_no_result(tmp_path):
    from mbdml.cli import main
    from mbdml.config import make_config
    from mbdml.engine import Trainer

    cfg = make_config(dataset="digits", method="nngk", model="resnet_small", width=8, embedding_dim=16, max_epochs=2, k=20, batch_size=32,
                      sigma=1.0, deterministic=True, progress=False, retrieval_metrics=False, save_dir=str(tmp_path), name="tuned")
    first = Trainer(cfg).run()
    assert main(["-q", "train", "--config", str(first.run_dir / "config.json"), "--name", "plain", "--keep_freed_memory", "false", "--no-progress"]) == 0
    plain = tmp_path / "plain"
    assert json.loads((plain / "config.json").read_text())["keep_freed_memory"] is False
    assert json.loads((plain / "environment.json").read_text())["allocator"].startswith("left as it is")
    assert json.loads((first.run_dir / "config.json").read_text())["keep_freed_memory"] is True
    if GLIBC_LINUX:
        said = json.loads((first.run_dir / "environment.json").read_text())["allocator"]
        assert said.startswith("glibc, tuned") or "preloaded" in said
    assert json.loads((plain / "summary.json").read_text())["final"] == first.summary["final"]
