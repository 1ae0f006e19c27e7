"""mbdml suggest: the least certain unlabelled images, spread over the embedding space."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from PIL import Image

from mbdml.cli import main
from mbdml.data.sources import load_digits_builtin
from mbdml.evaluate import compute_embeddings
from mbdml.suggest import margins, spread_picks
from mbdml.components import load_run
from cli_helpers import error_line

TINY = ["--width", "8", "--embedding_dim", "16", "--k", "20", "--batch_size", "32", "--retrieval_metrics", "False", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    save = tmp_path_factory.mktemp("suggest-run")
    argv = ["-q", "train", "--dataset", "digits", "--max_epochs", "2", "--eval_every", "2", "--save_dir", str(save), "--name", "run", *TINY]
    assert main(argv) == 0
    return save / "run"


@pytest.fixture(scope="module")
def pool() -> torch.Tensor:
    """Forty digits test images, uint8 (40, 1, 8, 8)."""
    return load_digits_builtin()[1].images[:40]


def save_grey(images: torch.Tensor, folder: Path, stem: str = "img") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"{stem}{i:03d}.png")
        Image.fromarray(image[0].numpy(), mode="L").save(paths[-1])
    return paths


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def direct(run_dir: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and probabilities by load_run, compute_embeddings, predict_log_proba."""
    loaded = load_run(run_dir)
    cfg = loaded.config
    with torch.no_grad():
        emb = compute_embeddings(loaded.model, images, mean=cfg.mean, std=cfg.std, flip_average=cfg.tta_flip)
        return emb, loaded.kernel.predict_log_proba(emb).exp()


def farthest_first_by_hand(points: list[list[float]], margin: list[float], n: int, pool: int) -> list[int]:
    """The rule written plainly: the pool is the `pool` smallest margins (ties by index);
    start at the smallest; then the pool member farthest from its nearest pick (ties: smaller margin)."""
    candidates = sorted(range(len(margin)), key=lambda i: (margin[i], i))[:pool]
    picks = [candidates[0]]
    while len(picks) < n:
        best, best_gap = None, -1.0
        for c in candidates:
            if c in picks:
                continue
            gap = min(sum((a - b) ** 2 for a, b in zip(points[c], points[p])) for p in picks)
            if gap > best_gap:
                best, best_gap = c, gap
        picks.append(best)
    return picks


def test_margins_are_the_two_largest_probabilities_apart() -> None:
    probs = torch.softmax(torch.randn(50, 7, generator=torch.Generator().manual_seed(0)), dim=1)
    want = [sorted(row, reverse=True)[0] - sorted(row, reverse=True)[1] for row in probs.tolist()]
    assert margins(probs).tolist() == pytest.approx(want, abs=1e-7)


def test_spread_picks_is_farthest_first_over_the_least_certain() -> None:
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(60, 4, generator=g)
    margin = torch.rand(60, generator=g)
    for n, per_pick in ((1, 5.0), (6, 3.0), (10, 2.5), (12, 1.0)):
        got = spread_picks(emb, margin, n, per_pick).tolist()
        assert got == farthest_first_by_hand(emb.tolist(), margin.tolist(), n, min(60, math.ceil(per_pick * n)))
    # one candidate per pick: the least certain alone (the least certain of all first)
    alone = spread_picks(emb, margin, 8, 1.0).tolist()
    assert sorted(alone) == sorted(torch.argsort(margin)[:8].tolist()) and alone[0] == int(torch.argmin(margin))


def test_copies_of_one_uncertain_image_are_picked_once() -> None:
    g = torch.Generator().manual_seed(2)
    emb = torch.cat([torch.zeros(10, 3), torch.randn(20, 3, generator=g) * 5])  # ten copies of one image first
    margin = torch.cat([torch.full((10,), 0.01), 0.02 + torch.rand(20, generator=g)])  # the copies are the least certain
    picks = spread_picks(emb, margin, 6, candidates_per_pick=5)
    assert sum(int(i) < 10 for i in picks) == 1 and int(picks[0]) < 10
    assert all(int(i) < 10 for i in spread_picks(emb, margin, 6, candidates_per_pick=1))  # margin alone takes six copies


def test_suggest_writes_margins_and_spreads_the_picks(run: Path, pool: torch.Tensor, tmp_path: Path, capsys) -> None:
    files = save_grey(pool, tmp_path / "unlabelled" / "batch1")
    emb, probs = direct(run, pool)
    m = margins(probs)
    hardest = int(torch.argmin(m))
    # eight more copies of the least certain image, deeper down
    save_grey(pool[hardest : hardest + 1].expand(8, -1, -1, -1), tmp_path / "unlabelled" / "batch2" / "again", stem="copy")
    out = tmp_path / "s.csv"
    assert main(["suggest", str(run), "--unlabelled", str(tmp_path / "unlabelled"), "--n", "5", "--out", str(out)]) == 0
    assert "5 of 48 images" in capsys.readouterr().out
    rows = read_csv(out)
    assert list(rows[0]) == ["rank", "file", "margin", "class_1", "probability_1", "class_2", "probability_2"]
    assert [r["rank"] for r in rows] == ["1", "2", "3", "4", "5"]
    copies_or_original = {str(files[hardest])} | {str(p) for p in (tmp_path / "unlabelled" / "batch2" / "again").iterdir()}
    assert sum(r["file"] in copies_or_original for r in rows) == 1
    assert rows[0]["file"] in copies_or_original  # the least certain comes first
    index = {str(p): i for i, p in enumerate(files)}
    for r in rows:
        i = index.get(r["file"], hardest)
        top = probs[i].topk(2)
        assert float(r["margin"]) == pytest.approx(float(m[i]), abs=2e-6)
        assert (r["class_1"], r["class_2"]) == (str(int(top.indices[0])), str(int(top.indices[1])))
        assert float(r["probability_1"]) - float(r["probability_2"]) == pytest.approx(float(r["margin"]), abs=3e-6)
    # the same picks as the rule applied to the directly computed embeddings and margins (a copy stands for the others)
    all_emb = torch.cat([emb, emb[hardest : hardest + 1].expand(8, -1)])
    all_m = torch.cat([m, m[hardest : hardest + 1].expand(8)])
    names = [str(p) for p in files] + sorted(str(p) for p in (tmp_path / "unlabelled" / "batch2" / "again").iterdir())
    same = lambda name: "the hardest" if name in copies_or_original else name  # noqa: E731
    assert [same(r["file"]) for r in rows] == [same(names[int(i)]) for i in spread_picks(all_emb, all_m, 5)]


def test_picks_are_copied_for_labelling_without_overwriting(run: Path, pool: torch.Tensor, tmp_path: Path, capsys) -> None:
    save_grey(pool[:20], tmp_path / "unlabelled")
    target = tmp_path / "to_label"
    out = tmp_path / "s.csv"
    argv = ["suggest", str(run), "--unlabelled", str(tmp_path / "unlabelled"), "--n", "4", "--out", str(out), "--copy_to", str(target)]
    assert main(argv) == 0
    rows = read_csv(out)
    assert sorted(p.name for p in target.iterdir()) == [f"{i + 1:03d}-{Path(r['file']).name}" for i, r in enumerate(rows)]
    for r in rows:
        assert Path(r["copy"]).read_bytes() == Path(r["file"]).read_bytes()
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    code = main(argv)  # the folder now holds files
    assert code == 2 and "--copy_into_nonempty" in capsys.readouterr().err
    code = main(argv + ["--copy_into_nonempty"])  # the same names: refused, nothing overwritten
    assert code == 2 and "no file is ever overwritten" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main(argv[:-1] + [str(other), "--copy_into_nonempty"]) == 0
    assert (other / "notes.txt").read_text() == "mine" and len(list(other.iterdir())) == 5




@pytest.mark.parametrize(
    "argv, needles",
    [
        (["{run}", "--unlabelled", "{tmp}/u", "--n", "8"], ["--n 8", "the 7 in", "--n 7 or fewer"]),
        (["{run}", "--unlabelled", "{tmp}/u", "--n", "7"], ["broken.png", "--on-bad-image skip"]),
        (["{run}", "--unlabelled", "{tmp}/u", "--n", "7", "--on-bad-image", "skip"], ["once the 1 unreadable ones are skipped", "--n 6 or fewer"]),
        (["{run}", "--unlabelled", "{tmp}/u", "--n", "0"], ["--n 0", "positive"]),
        (["{run}", "--unlabelled", "{tmp}/u", "--n", "2", "--candidates_per_pick", "0.5"], ["--candidates_per_pick 0.5"]),
        (["{run}", "--unlabelled", "{tmp}/empty", "--n", "2"], ["holds no image files"]),
        (["{run}", "--unlabelled", "{tmp}/missing", "--n", "2"], ["does not exist"]),
        (["{tmp}", "--unlabelled", "{tmp}/u", "--n", "2"], ["config.json"]),
        (["{run}", "--unlabelled", "{tmp}/u", "--n", "2", "--copy_to", "{tmp}/u/picks"], ["inside the unlabelled folder"]),
        (["{run}", "--unlabelled", "{tmp}/u", "--n", "2", "--copy_to", "{tmp}/u/img000.png"], ["is a file"]),
    ],
)
def test_bad_input_is_one_line_with_status_2(run: Path, pool: torch.Tensor, tmp_path: Path, capsys, argv: list[str], needles: list[str]) -> None:
    (tmp_path / "empty").mkdir()
    save_grey(pool[:6], tmp_path / "u")
    (tmp_path / "u" / "broken.png").write_bytes(b"not a png")
    code = main(["suggest", *[a.format(run=run, tmp=tmp_path) for a in argv]])
    error_line(code, capsys.readouterr().err, *needles)
