"""The benchmark scripts' settings: what the accuracy suite and the method comparison
pass to the library must form valid run configurations (a typo there costs hours of
CPU before it shows)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from accuracy_suite import PARTS  # noqa: E402
from methods_cifar10 import epochs_per_method, parse_settings  # noqa: E402

from mbdml.config import PRESETS, make_config  # noqa: E402
from mbdml.methods import METHODS  # noqa: E402


def test_settings_parse_json_values_and_bare_words():
    got = parse_settings(["preset=finetune", "amp=bf16", "mean=[0.5]", "learning_rate=0.02", "tta_flip=false", "pretrained=null", "name=a=b"])
    assert got == {"preset": "finetune", "amp": "bf16", "mean": [0.5], "learning_rate": 0.02, "tta_flip": False, "pretrained": None, "name": "a=b"}


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
    if name == "finetune":
        assert (cfg.model, cfg.pretrained, cfg.input_size) == ("efficientnet_lite0", "imagenet", 96)
        assert cfg.freeze_stages == 3
