import os
import pickle

import pytest
import torch

from mbdml.checkpoint import check_model_state, load_checkpoint, save_checkpoint, save_json
from mbdml.errors import CheckpointError


def test_roundtrip(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "epoch": 2, "history": [{"a": 1.0, "b": None}], "gen": torch.Generator().get_state()}
    save_checkpoint(state, tmp_path / "last.pt")
    back = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["history"] == state["history"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = _RunsCode()
    evil.marker = marker
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"model": evil}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)
    assert not marker.exists()


def test_truncated_and_missing_files(tmp_path):
    save_checkpoint({"w": torch.randn(1000)}, tmp_path / "a.pt")
    data = (tmp_path / "a.pt").read_bytes()
    (tmp_path / "a.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt, truncated"):
        load_checkpoint(tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "nothing.pt")


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous file there is intact"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_torch_save_reporting_a_full_disk_as_runtime_error_keeps_previous_checkpoint(tmp_path, monkeypatch):
    # torch.save raises RuntimeError (not OSError) when the disk fills during its write
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/3: file write failed")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="could not write .*last.pt.*previous file there is intact. Free disk space.*--resume"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no partial .tmp left


def test_other_runtime_errors_are_not_taken_for_a_full_disk(tmp_path, monkeypatch):
    def broken(obj, f, *a, **k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        save_checkpoint({"epoch": 2}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_a_file_in_the_way_of_the_folder_is_named(tmp_path):
    (tmp_path / "blocker").write_text("x")
    with pytest.raises(CheckpointError, match=r"'.*blocker' is a file, not a folder\); pass another --out"):
        save_json({"a": 1}, tmp_path / "blocker" / "sub" / "m.json", fix="pass another --out")


def _model_state(**over):
    state = {"model": {"w": torch.zeros(2, 1, 3, 3)}, "method": {"kernel._num_classes_buf": torch.tensor(3)}, "epoch": 2, "classes": ["a", "b", "c"]}
    state.update(over)
    return {k: v for k, v in state.items() if v is not _GONE}


_GONE = object()


@pytest.mark.parametrize(
    "over, needle",
    [
        ({"method": _GONE}, "has no 'method'"),
        ({"method": ["kernel"]}, "has 'method' as a list of 1, not a dictionary of tensors"),
        ({"model": {"w": "weights"}}, "has 'model' as a dict of 1, not a dictionary of tensors"),
        ({"method": {}}, "no kernel class count"),
        ({"epoch": "two"}, "has 'epoch' as a str, not a whole number"),
        ({"classes": "abc"}, "has 'classes' as a str, not a list of class names"),
    ],
)
def test_a_checkpoint_with_unexpected_contents_is_described(tmp_path, over, needle):
    with pytest.raises(CheckpointError, match=needle):
        check_model_state(_model_state(**over), tmp_path / "best.pt")
    check_model_state(_model_state(), tmp_path / "best.pt")  # the well-formed one passes
