"""--amp: bfloat16 only where the device computes it natively, and said so where it is not."""

import json
import logging

import pytest
import torch

from mbdml import precision
from mbdml.config import make_config
from mbdml.errors import ConfigError
from mbdml.precision import resolve_amp

CPU = torch.device("cpu")


@pytest.fixture
def native(monkeypatch):
    """Set whether this CPU 'has' bfloat16 instructions."""
    def set_native(value: bool) -> None:
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: value)
    return set_native


@pytest.mark.parametrize("has_bf16,expected", [(True, "bf16"), (False, "none")])
def test_auto_takes_bf16_only_where_the_cpu_computes_it(native, has_bf16, expected, caplog):
    native(has_bf16)
    with caplog.at_level(logging.INFO, logger="mbdml"):
        assert resolve_amp("auto", CPU) == expected
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_explicit_bf16_is_kept_and_warned_about_where_it_is_emulated(native, caplog):
    native(False)
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        assert resolve_amp("bf16", CPU) == "bf16"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "without bfloat16 instructions" in warning and "--amp auto" in warning and "--amp none" in warning
    caplog.clear()
    native(True)
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        assert resolve_amp("bf16", CPU) == "bf16" and resolve_amp("none", CPU) == "none"
    assert not caplog.records


def test_the_answer_matches_what_torch_reports_for_this_cpu():
    # No monkeypatching: on this machine the check agrees with oneDNN's own.
    assert precision.cpu_has_native_bf16() == bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert resolve_amp("auto", CPU) == ("bf16" if precision.cpu_has_native_bf16() else "none")


def test_unknown_amp_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"amp.*none, bf16, auto"):
        make_config(dataset="digits", amp="fp16").resolved()


@pytest.mark.parametrize("has_bf16,expected", [(True, "bf16"), (False, "none")])
def test_a_run_saves_the_precision_it_used_not_auto(tmp_path, native, has_bf16, expected):
    from mbdml.components import load_run
    from mbdml.train import train

    native(has_bf16)
    cfg = make_config(dataset="digits", method="nngk", width=8, embedding_dim=16, k=20, max_epochs=1, batch_size=32, progress=False,
                      retrieval_metrics=False, amp="auto", save_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"), name="auto")
    res = train(cfg)
    assert json.loads((res.run_dir / "config.json").read_text())["amp"] == expected
    assert load_run(res.run_dir, "last").config.amp == expected
    env = json.loads((res.run_dir / "environment.json").read_text())
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert env["cpu"] and env["cpu"] == precision.cpu_model_name()


def test_cli_takes_amp_auto():
    from mbdml.cli import build_parser

    args = build_parser().parse_args(["train", "--dataset", "digits", "--amp", "auto"])
    assert args.amp == "auto"


def test_a_self_training_run_in_emulated_bf16_warns_once(tmp_path, native, caplog):
    """The run warns; the teacher's labelling inside it, in the same precision, does not again."""
    from mbdml.train import train

    small = dict(dataset="digits", width=8, embedding_dim=16, k=20, max_epochs=1, batch_size=32, progress=False,
                 retrieval_metrics=False, save_dir=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    teacher = train(make_config(**small, method="mbdml1", name="teacher")).run_dir
    native(False)
    with caplog.at_level(logging.WARNING, logger="mbdml"):
        train(make_config(**small, method="mixup", amp="bf16", teacher=str(teacher), name="student"))
    warnings = [r.getMessage() for r in caplog.records if "without bfloat16 instructions" in r.getMessage()]
    assert len(warnings) == 1
