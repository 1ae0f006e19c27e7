"""The declared dependencies match what is installed and tested."""

import tomllib
from pathlib import Path

import pytorch_metric_learning

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pytorch_metric_learning_is_bounded_to_the_tested_major_version():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    spec = next(d for d in deps if d.startswith("pytorch-metric-learning"))
    # 3.0 moves AccuracyCalculator's module and the testers: only 2.x is tested
    assert spec.replace(" ", "") == "pytorch-metric-learning>=2.3,<3"
    major, minor = (int(x) for x in pytorch_metric_learning.__version__.split(".")[:2])
    assert (major, minor) >= (2, 3) and major < 3
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # the module mbdml imports

    assert AccuracyCalculator.__module__ == "pytorch_metric_learning.utils.accuracy_calculator"
