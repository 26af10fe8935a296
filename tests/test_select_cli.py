"""``rcfast rank-teachers``: a folder of teachers (some unusable) ranked for a labeled target folder."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rcfast import cli
from rcfast.models import build_classifier
from rcfast.select.repository import Skipped, TeacherSpec, read_repository

pytestmark = pytest.mark.usefixtures("one_thread")


class RunsCode:
    """Unpickling this would call ``Path.touch(marker)``: a stand-in for a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def target_folder(root: Path, classes: int = 3, per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True)
        colour = rng.integers(0, 256, size=3)
        for i in range(per_class):
            pixels = np.clip(colour + rng.normal(0, 20, size=(8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


def add_teacher(repo: Path, name: str, classes: int, seed: int, **spec) -> Path:
    """A random small_cnn with ``classes`` outputs and its YAML (``spec`` overrides YAML entries)."""
    torch.manual_seed(seed)
    path = repo / f"{name}.pt"
    torch.save(build_classifier("small_cnn", classes, width=4).state_dict(), path)
    entry = {"builder": "small_cnn", "num_classes": classes, "builder_kwargs": {"width": 4}}
    entry.update(spec)
    (repo / f"{name}.yaml").write_text(yaml.safe_dump(entry))
    return path


def make_repository(tmp_path: Path) -> tuple[Path, Path]:
    repo = tmp_path / "repo"
    repo.mkdir()
    for i, classes in enumerate((5, 8, 3)):
        add_teacher(repo, f"good_{i}", classes, seed=i)
    marker = tmp_path / "code_ran"
    good = (repo / "good_0.pt").read_bytes()
    add_teacher(repo, "corrupt", 5, seed=10)
    (repo / "corrupt.pt").write_bytes(bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8)))
    add_teacher(repo, "truncated", 5, seed=11)
    (repo / "truncated.pt").write_bytes(good[: len(good) // 2])
    add_teacher(repo, "code", 5, seed=12)
    torch.save({"weights": torch.zeros(2), "payload": RunsCode(marker)}, repo / "code.pt")
    add_teacher(repo, "wrong_classes", 5, seed=13, num_classes=7)
    add_teacher(repo, "pretrained", 5, seed=14, builder="timm:resnet18", builder_kwargs={"pretrained": True})
    add_teacher(repo, "escapes", 5, seed=15, checkpoint="../outside.pt")
    add_teacher(repo, "extra_key", 5, seed=16, script="rm -rf /")
    torch.save(build_classifier("small_cnn", 4, width=4).state_dict(), repo / "no_yaml.pt")
    return repo, marker


def test_rank_teachers_command_ranks_the_usable_teachers_and_reports_the_rest(tmp_path, capsys):
    repo, marker = make_repository(tmp_path)
    target = target_folder(tmp_path / "target")
    out = tmp_path / "ranking.json"
    status = cli.main(["rank-teachers", "--repo", str(repo), "--target", str(target), "--image-size", "8",
                       "--data-backend", "pil", "--json", str(out), "--save-costs", str(tmp_path / "costs")])
    printed = capsys.readouterr().out
    assert status == 0, printed
    assert not marker.exists()  # the code-carrying checkpoint was never unpickled as code

    result = json.loads(out.read_text())
    ranking, skipped = result["ranking"], {s["name"]: s["reason"] for s in result["skipped"]}
    assert [r["rank"] for r in ranking] == [1, 2, 3]
    assert sorted(r["name"] for r in ranking) == ["good_0", "good_1", "good_2"]
    scores = [r["score"] for r in ranking]
    assert scores == sorted(scores) and all(r["seconds"] > 0 for r in ranking)
    assert result["num_classes"] == 3 and result["method"] == "ot"
    assert set(skipped) == {"corrupt", "truncated", "code", "wrong_classes", "pretrained", "escapes", "extra_key",
                            "no_yaml"}
    for name in ("corrupt", "truncated", "code"):
        assert "not a loadable weights-only checkpoint" in skipped[name]
    assert "does not fit builder 'small_cnn' with num_classes=7" in skipped["wrong_classes"]
    assert "'pretrained' is not allowed for the third-party builder 'timm:resnet18'" in skipped["pretrained"]
    assert "not a file of the repository folder" in skipped["escapes"]
    assert "unknown keys ['script']" in skipped["extra_key"]
    assert "no_yaml.pt has no no_yaml.yaml" in skipped["no_yaml"]

    lines = printed.splitlines()
    assert "lower = more related" in lines[0]
    for row in ranking:
        assert any(line.split()[:2] == [str(row["rank"]), row["name"]] for line in lines)
    for name in skipped:
        assert any(line.split()[:3] == ["-", name, "skipped:"] for line in lines)

    # ... though it is a real payload: plain unpickling runs it (touches the marker file).
    torch.load(repo / "code.pt", weights_only=False)
    assert marker.exists()

    # the saved costs are what the ot_distill term reads
    for row in ranking:
        cost = torch.load(tmp_path / "costs" / f"{row['name']}.cost.pt", weights_only=True)
        assert cost.shape == (row["num_classes"], 3) and (cost >= 0).all() and (cost <= 1).all()


@pytest.mark.parametrize("method", ["leep", "linear_probe"])
def test_baseline_methods_rank_higher_is_better(tmp_path, capsys, method):
    repo = tmp_path / "repo"
    repo.mkdir()
    for i in range(2):
        add_teacher(repo, f"t{i}", 4, seed=i)
    target = target_folder(tmp_path / "target", per_class=8)
    assert cli.main(["rank-teachers", "--repo", str(repo), "--target", str(target), "--image-size", "8",
                     "--data-backend", "pil", "--method", method, "--json", str(tmp_path / "r.json")]) == 0
    ranking = json.loads((tmp_path / "r.json").read_text())["ranking"]
    assert ranking[0]["score"] >= ranking[1]["score"]
    assert "higher = more related" in capsys.readouterr().out


def test_no_usable_teacher_or_missing_folders_are_one_line_errors(tmp_path, capsys):
    repo, _ = make_repository(tmp_path)
    for name in ("good_0", "good_1", "good_2"):
        (repo / f"{name}.yaml").unlink()
        (repo / f"{name}.pt").unlink()
    target = target_folder(tmp_path / "target")
    assert cli.main(["rank-teachers", "--repo", str(repo), "--target", str(target), "--data-backend", "pil"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcfast: error: --repo: no usable teacher") and "corrupt:" in err
    assert cli.main(["rank-teachers", "--repo", str(tmp_path / "nope"), "--target", str(target)]) == 2
    assert "--repo: " in capsys.readouterr().err
    assert cli.main(["rank-teachers", "--repo", str(repo), "--target", str(tmp_path / "nope")]) == 2
    assert "--target: " in capsys.readouterr().err


def test_read_repository_allow_lists_builder_kwargs(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    add_teacher(repo, "plain", 3, seed=0, builder_kwargs={"width": 4, "norm": "group"})
    add_teacher(repo, "path_value", 3, seed=1, builder_kwargs={"width": 4, "norm": "/etc/passwd"})
    add_teacher(repo, "tv_weights", 3, seed=2, builder="torchvision:resnet18", builder_kwargs={"weights": "DEFAULT"})
    add_teacher(repo, "tv_numeric", 3, seed=3, builder="torchvision:resnet18", builder_kwargs={"width_per_group": 32})
    add_teacher(repo, "nested", 3, seed=4, builder_kwargs={"width": {"a": 1}})
    specs = {spec.name: spec for spec in read_repository(repo)}
    assert isinstance(specs["plain"], TeacherSpec) and specs["plain"].builder_kwargs == {"width": 4, "norm": "group"}
    assert isinstance(specs["tv_numeric"], TeacherSpec)
    for name in ("path_value", "tv_weights", "nested"):
        assert isinstance(specs[name], Skipped), name
    assert "'weights' is not allowed" in specs["tv_weights"].reason
