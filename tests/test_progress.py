"""Progress bars only on a terminal: a redirected log gets one line per epoch."""

from __future__ import annotations

import io
import sys

import pytest

from mbdml.cli import main
from mbdml.progress import progress_bar


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_when_standard_error_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    items = [1, 2, 3]
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert progress_bar(items, desc="x", enabled=True) is items
    assert progress_bar(desc="x", enabled=True, total=3) is None


def test_a_terminal_gets_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("tqdm")
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = progress_bar(range(3), desc="epoch 1/1", enabled=True, file=term)
    assert list(bar) == [0, 1, 2]
    assert "epoch 1/1" in term.getvalue()


def test_a_redirected_training_log_has_one_line_per_epoch_and_no_bar_frames(tmp_path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--dataset", "digits", "--width", "4", "--embedding_dim", "8", "--max_epochs", "2", "--k", "10",
                 "--batch_size", "32", "--retrieval_metrics", "false", "--save_dir", str(tmp_path),
                 "--cache_dir", str(tmp_path / "cache"), "--name", "r"])
    assert code == 0
    err = capsys.readouterr().err
    assert "it/s" not in err and "\r" not in err
    assert [line.split()[1] for line in err.splitlines() if line.startswith("epoch ")] == ["1/2", "2/2"]
