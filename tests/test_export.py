"""mbdml export: one file that plain PyTorch loads, with the probabilities of the run's own classifier."""

import json
import subprocess
import sys

import pytest
import torch

from mbdml.cli import main
from mbdml.evaluate import compute_embeddings
from mbdml.export import read_export_info
from mbdml.components import load_run

# Loads the exported file in a fresh interpreter where importing mbdml fails.
LOAD_WITHOUT_MBDML = """
import sys
sys.modules["mbdml"] = None  # any import of mbdml now raises ImportError
import torch
images = torch.load(sys.argv[2])
files = {"mbdml.json": ""}
program = torch.export.load(sys.argv[1], extra_files=files)
torch.save({"probs": program.module()(images), "info": files["mbdml.json"]}, sys.argv[3])
"""


def small_run(tmp_path, *extra):
    argv = ["-q", "train", "--dataset", "digits", "--max_epochs", "2", "--eval_every", "2", "--k", "20", "--width", "8",
            "--embedding_dim", "16", "--save_dir", str(tmp_path), "--name", "run", "--no-progress", *extra]
    assert main(argv) == 0
    return tmp_path / "run"


@pytest.mark.parametrize("extra", [(), ("--class_floor", "authors", "--tta_flip", "true", "--k", "5")])
def test_exported_file_gives_the_runs_probabilities_without_mbdml(tmp_path, extra):
    run = small_run(tmp_path, *extra)
    out = tmp_path / "model.pt2"
    assert main(["export", str(run), "--out", str(out)]) == 0
    loaded = load_run(run)
    images = loaded_images = torch.randint(0, 256, (5, *loaded.image_shape), dtype=torch.uint8)
    torch.save(loaded_images, tmp_path / "images.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_MBDML, str(out), str(tmp_path / "images.pt"), str(tmp_path / "got.pt")],
                   check=True, cwd=tmp_path)
    got = torch.load(tmp_path / "got.pt")
    cfg = loaded.config
    with torch.no_grad():
        emb = compute_embeddings(loaded.model, images, mean=cfg.mean, std=cfg.std, flip_average=cfg.tta_flip)
        want = loaded.kernel.predict_log_proba(emb).exp()
    assert got["probs"].shape == (5, 10)
    assert torch.allclose(got["probs"], want, atol=1e-5)
    info = json.loads(got["info"])
    assert info["classes"] == [str(c) for c in range(10)] and info["image_shape"] == [1, 8, 8]
    assert read_export_info(out)["method"] == cfg.method


def test_export_errors_name_the_fix(tmp_path, capsys):
    run = small_run(tmp_path)
    (tmp_path / "afile").write_text("x")
    assert main(["export", str(run), "--out", str(tmp_path / "afile" / "m.pt2")]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "nothing"), "--out", str(tmp_path / "m.pt2")]) == 2
    assert "no run folder" in capsys.readouterr().err
