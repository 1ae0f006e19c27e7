"""The benchmark scripts' settings: what the accuracy suite and the method comparison
pass to the library must form valid run configurations (a typo there costs hours of
CPU before it shows)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from accuracy_suite import PARTS  # noqa: E402
from methods_cifar10 import epochs_per_method, mean_std, parse_settings  # noqa: E402

from mbdml.config import PRESETS, make_config  # noqa: E402
from mbdml.methods import METHODS  # noqa: E402


def test_settings_parse_json_values_and_bare_words():
    got = parse_settings(["preset=finetune", "amp=bf16", "mean=[0.5]", "learning_rate=0.02", "tta_flip=false", "pretrained=null", "name=a=b"])
    assert got == {"preset": "finetune", "amp": "bf16", "mean": [0.5], "learning_rate": 0.02, "tta_flip": False, "pretrained": None, "name": "a=b"}


def test_mean_std_gives_the_sample_spread_and_none_for_one_seed():
    assert mean_std([0.8752]) == "87.52"  # one seed: no "± 0.00" that reads as a measured spread
    assert mean_std([0.8829, 0.8768, None, 0.8752]) == "87.83 ± 0.41"  # sample std, None skipped
    assert mean_std([None]) == "-"


def test_epochs_per_method_names_every_method():
    assert epochs_per_method("12", ["nngk", "mixup"]) == {"nngk": 12, "mixup": 12}
    assert epochs_per_method("mbdml1=30,mixup=60", ["mbdml1", "mixup"]) == {"mbdml1": 30, "mixup": 60}
    with pytest.raises(SystemExit, match="no epoch count for nngk"):
        epochs_per_method("mbdml1=30", ["mbdml1", "nngk"])


@pytest.mark.parametrize("name", sorted(PARTS))
def test_every_accuracy_suite_part_is_a_valid_configuration(name):
    part = PARTS[name]
    settings = part["settings"]
    assert settings.get("preset", "default") in PRESETS
    own = part.get("method_settings", {})
    assert set(own) <= set(part["epochs"]), "settings for a method the part does not run"
    for method, epochs in part["epochs"].items():
        assert method in METHODS
        merged = {**settings, **own.get(method, {})}
        cfg = make_config(method=method, dataset=part["dataset"], max_epochs=epochs, seed=0, **merged)
        cfg.validate()
        assert (cfg.method, cfg.max_epochs) == (method, epochs)
        for key, value in merged.items():
            got = getattr(cfg, key)
            assert got == value or (isinstance(got, tuple) and list(got) == value), (key, got, value)
    if name.startswith("finetune") or name.startswith("semi_finetune"):
        size = 128 if name.endswith("128") else 96
        assert (cfg.model, cfg.pretrained, cfg.input_size) == ("efficientnet_lite0", "imagenet", size)
        assert cfg.freeze_stages == 3


def _tiny_run(tmp_path, method):
    from mbdml.train import train

    cfg = make_config(dataset="digits", method=method, model="resnet_small", width=8, embedding_dim=16, max_epochs=1, k=20,
                      batch_size=32, sigma=1.0, progress=False, retrieval_metrics=False, save_dir=str(tmp_path),
                      cache_dir=str(tmp_path / "cache"), name=method)
    return train(cfg).run_dir


def test_pseudo_labellers_prints_a_row_per_share_and_rejects_a_run_without_head(tmp_path, monkeypatch, capsys):
    import pseudo_labellers

    run_dir = _tiny_run(tmp_path, "mbdml1")
    monkeypatch.setattr(sys, "argv", ["pseudo_labellers.py", str(run_dir), "--images", "300", "--shares", "0.5,1.0"])
    pseudo_labellers.main()
    out = capsys.readouterr().out
    assert "300 of 1211 unlabelled images" in out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| 0.5 ") or line.startswith("| 1.0 ")]
    assert len(rows) == 2 and all(0 <= float(v) <= 100 for row in rows for v in row[1:])

    nngk_dir = _tiny_run(tmp_path, "nngk")
    monkeypatch.setattr(sys, "argv", ["pseudo_labellers.py", str(nngk_dir)])
    with pytest.raises(SystemExit, match="trained with nngk, which has no mixup head"):
        pseudo_labellers.main()


def test_kept_accuracy_counts_only_the_most_confident_of_each_class():
    import torch
    from pseudo_labellers import kept_accuracy

    # 4 images of predicted class 0 and 4 of class 1; the surer half of each is right
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45], [0.1, 0.9], [0.2, 0.8], [0.4, 0.6], [0.45, 0.55]])
    truth = torch.tensor([0, 0, 1, 1, 1, 1, 0, 0])
    assert kept_accuracy(probs, truth, share=0.5) == 1.0  # 2 per class: the right ones
    assert kept_accuracy(probs, truth, share=1.0) == 0.5
