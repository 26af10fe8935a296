"""``rcfast demo --method iekd|dmc``: the data lists, the scoring helpers, and both demos at smoke-test size."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rcfast import cli
from rcfast.train.demo_iekd import IEKDDemoSettings, run_iekd_demo
from rcfast.train.method_demos import accuracy, digit_lists, format_mean_std, glyph_lists, mean_std, write_list

from helpers.consolidate_runs import restore_global_rng  # noqa: F401

pytestmark = pytest.mark.usefixtures("restore_global_rng")


def test_accuracy_maps_subset_models_to_global_labels_and_filters_classes():
    predictions = torch.tensor([0, 1, 2, 0])
    labels = torch.tensor([5, 6, 2, 7])
    assert accuracy(predictions, labels, classes=[5, 6, 7]) == 0.5  # outputs 0, 1, 2 are digits 5, 6, 7
    assert accuracy(predictions, labels, classes=[5, 6, 7], among=[5, 6]) == 1.0
    assert accuracy(torch.tensor([2, 2]), torch.tensor([2, 3])) == 0.5
    with pytest.raises(ValueError, match="no image to score"):
        accuracy(predictions, labels, among=[9])


def test_mean_std_and_format():
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and std == pytest.approx(0.1)
    assert format_mean_std([0.8, 0.9, 1.0]) == "90.0 ± 10.0"


def test_write_list_keeps_and_relabels_classes(tmp_path):
    items = [("a.png", 3), ("b.png", 7), ("c.png", 5)]
    path = write_list(tmp_path / "l.txt", items, classes=[5, 6, 7], relabel=True)
    assert Path(path).read_text().splitlines() == ["b.png 2", "c.png 0"]
    write_list(tmp_path / "g.txt", items, classes=[5, 6, 7])
    assert (tmp_path / "g.txt").read_text().splitlines() == ["b.png 7", "c.png 5"]
    with pytest.raises(ValueError, match="no image"):
        write_list(tmp_path / "x.txt", items, classes=[0])


def test_task_lists_checks_the_data_name_and_the_extras_before_any_work(tmp_path, monkeypatch):
    import rcfast.extras
    from rcfast.extras import MissingExtraError
    from rcfast.train.method_demos import task_lists

    with pytest.raises(ValueError, match="data must be one of"):
        task_lists("cifar", tmp_path)
    real = rcfast.extras._importable
    monkeypatch.setattr(rcfast.extras, "_importable", lambda module: module != "sklearn" and real(module))
    with pytest.raises(MissingExtraError, match=r"IE-KD/DMC demos needs scikit-learn.*rcfast\[train\]"):
        task_lists("digits", tmp_path / "digits")
    assert not any(tmp_path.iterdir())  # nothing written before the check


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """The digits written once for the module's tests."""
    root = tmp_path_factory.mktemp("digits")
    digit_lists(root)
    return root


@pytest.mark.slow
def test_digit_lists_are_disjoint_relabeled_splits(digits_root):
    from sklearn.datasets import load_digits

    lists = digit_lists(digits_root)
    targets = load_digits().target
    assert (len(lists.teacher_train), len(lists.auxiliary), len(lists.pool), len(lists.test)) == (576, 629, 1205, 592)
    indices = {name: {int(Path(p).stem) for p, _ in getattr(lists, name)}
               for name in ("teacher_train", "auxiliary", "test")}
    assert not indices["teacher_train"] & indices["auxiliary"]
    assert not (indices["teacher_train"] | indices["auxiliary"]) & indices["test"]
    for path, digit in lists.pool + lists.test:
        assert digit == targets[int(Path(path).stem)]
    assert {d for _, d in lists.test} == set(range(10))
    assert sorted(p.name for p in Path(lists.auxiliary_folder).iterdir()) == sorted(
        Path(p).name for p, _ in lists.auxiliary)


def _check_results(out: Path, scores: dict, rows: set, runs: int) -> None:
    assert set(scores) == rows
    assert all(0.0 <= v <= 1.0 for per in scores.values() for v in per)
    assert (out / "report.md").is_file() and "± " in (out / "report.md").read_text()
    # every run went through a YAML config that `rcfast consolidate` accepts
    assert len(list((out / "configs").glob("*.yaml"))) == runs


@pytest.mark.slow
def test_iekd_demo_quick_runs_every_student(tmp_path, digits_root, one_thread):
    out = tmp_path / "iekd"
    settings = IEKDDemoSettings.quick()
    settings.seeds = 1
    results = run_iekd_demo(out, settings=settings, data_root=digits_root, log=lambda line: None)
    rows = {"scratch", "kd", "iekd_l1", "iekd_cos", "iekd_cka", "dml", "ie_dml"}
    _check_results(out, results["students"], rows, runs=len(rows) + 2)  # + the teacher and its auto-encoder
    assert set(results["claims"]) == {"l1", "cos", "cka"}
    assert json.loads((out / "results.json").read_text())["students"] == results["students"]


@pytest.mark.slow
def test_dmc_demo_quick_through_the_cli(tmp_path, capsys, one_thread):
    out = tmp_path / "dmc"
    assert cli.main(["demo", "--method", "dmc", "--quick", "--seeds", "1", "--out", str(out)]) == 0
    assert "DMC student" in capsys.readouterr().out
    accuracy_ = json.loads((out / "results.json").read_text())["accuracy"]
    _check_results(out, {name: per["all"] + per["old"] + per["new"] for name, per in accuracy_.items()},
                   {"old", "new", "finetune", "dmc", "joint"}, runs=5)
    assert accuracy_["old"]["new"] == [0.0] and accuracy_["new"]["old"] == [0.0]  # each names only its classes


@pytest.mark.parametrize("args, message", [(["--seeds", "2"], "--seeds"), (["--data", "glyphs"], "--data")])
def test_seeds_and_data_only_for_the_method_demos(capsys, args, message):
    assert cli.main(["demo", *args]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_glyph_lists_are_ten_classes_in_three_disjoint_splits(tmp_path):
    lists = glyph_lists(tmp_path / "glyphs")
    assert len(lists.names) == 10 and "Georgian" in lists.description
    for split in (lists.teacher_train, lists.auxiliary, lists.test):
        assert sorted({label for _, label in split}) == list(range(10))
        assert len(split) == 10 * 60
    paths = [{p for p, _ in split} for split in (lists.teacher_train, lists.auxiliary, lists.test)]
    assert not (paths[0] & paths[1]) and not (paths[2] & (paths[0] | paths[1]))
    # a class's folder is its label everywhere
    folders = {Path(p).parent.name: label for p, label in lists.teacher_train + lists.test}
    assert len(folders) == 10 and sorted(folders.values()) == list(range(10))
