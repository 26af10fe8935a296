"""The glyph transfer benchmark (`rcfast benchmark transfer`): its machinery, never its claims.

- The statistics and the claims' rules on hand-made seed results whose
  verdicts are known (pass, fail, one seed, the oracle margin, the best
  teacher chosen per task).
- Settings and output-folder rules (refused, continued, rebuilt), cheap.
- The protocol's data roles on DejaVu Sans alone (a one-font catalogue).
- Bad input through the CLI: one `rcfast: error:` line before any work.
- One `--quick` run through the CLI (slow): every file, the results' schema,
  numbers consistent with each other, configs as the protocol says, a second
  call continuing instead of retraining, and a different folder's parameters
  refused.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rcfast import cli
from rcfast.data.glyphs import glyph_dataset
from rcfast.data.glyphs.fonts import matplotlib_font_dir
from rcfast.data.glyphs.protocol import GlyphProtocol, choose_classes, script_slug
from rcfast.train.config import load_config
from rcfast.train.experiment import labeled_images
from rcfast.train.transfer_benchmark import BenchmarkSettings, aggregate, evaluate_claims, train_glyph_classifier
from rcfast.train.transfer_benchmark.evaluate import first_per_class
from rcfast.train.transfer_benchmark.run import SPEC_FILE, prepare_output

DEJAVU = str(matplotlib_font_dir() / "DejaVuSans.ttf")
TASKS = ["future_general", "future_georgian", "future_arabic", "unused_canadian_aboriginal"]
MODELS = ["random_init", "teacher_general", "teacher_georgian", "teacher_arabic", "single_kd", "repcon",
          "multi_kd", "oracle"]


# ---------------------------------------------------------------------------------------------
# Statistics and claims on hand-made results


def _seed_result(seed: int, scores: dict, shots=(5, 20)) -> dict:
    """A seed's results where every probe@n of (model, task) is scores[model][task] (default 0.5)."""
    transfer = {}
    for model in MODELS:
        transfer[model] = {}
        for task in TASKS:
            value = scores.get(model, {}).get(task, 0.5)
            transfer[model][task] = {**{f"probe@{n}": value for n in shots}, **{f"knn@{n}": value / 2 for n in shots}}
    return {"seed": seed, "transfer": transfer}


def _claims(results, margin=0.02):
    return evaluate_claims(results, downstream=TASKS, specialist_tasks=["georgian", "arabic"],
                           specialist_futures=["future_georgian", "future_arabic"],
                           specialist_scripts=["Georgian", "Arabic"], shots=(5, 20), oracle_margin=margin)


def _everywhere(value):
    return {task: value for task in TASKS}


def test_claims_hold_when_every_seed_shows_the_papers_pattern():
    results = []
    for seed, jitter in enumerate((0.0, 0.01, -0.01)):
        results.append(_seed_result(seed, {
            "teacher_general": _everywhere(0.60 + jitter),
            "teacher_georgian": {**_everywhere(0.55 + jitter), "future_georgian": 0.65 + jitter},
            "teacher_arabic": {**_everywhere(0.55 + jitter), "future_arabic": 0.66 + jitter},
            "single_kd": _everywhere(0.50 + jitter),
            "repcon": {**_everywhere(0.62 + jitter), "future_georgian": 0.70 + jitter, "future_arabic": 0.71},
            "oracle": _everywhere(0.64 + jitter),
        }))
    claims = _claims(results)
    assert [c["id"] for c in claims] == [1, 2, 3]
    assert all(c["holds"] and c["decidable"] for c in claims), [c["test"] for c in claims]
    gap = claims[0]["comparisons"][0]
    assert gap["name"] == "generalist - (a)" and gap["differences"] == pytest.approx([0.10, 0.10, 0.10])
    # Claim 2 against the best teacher per task: Georgian's on its script, Arabic's on its own.
    best = claims[1]["comparisons"][1]
    assert best["differences"][0] == pytest.approx(np.mean([0.70 - 0.65, 0.71 - 0.66]))


def test_claims_fail_on_inconsistent_seeds_and_say_why():
    results = [_seed_result(0, {"single_kd": _everywhere(0.40)}),   # (a) worse than the generalist
               _seed_result(1, {"single_kd": _everywhere(0.60)}),   # (a) better
               _seed_result(2, {"single_kd": _everywhere(0.45)})]
    claim = _claims(results)[0]
    first = claim["comparisons"][0]
    assert first["differences"] == pytest.approx([0.10, -0.10, 0.05])
    assert first["mean"] == pytest.approx(0.05 / 3) and first["std"] == pytest.approx(np.std([0.1, -0.1, 0.05],
                                                                                             ddof=1))
    assert not first["passes"] and not claim["holds"] and claim["decidable"]
    assert "fails" in claim["test"]


def test_oracle_margin_counts_one_std_on_the_pessimistic_side():
    def run(gaps):
        return _claims([_seed_result(i, {"oracle": _everywhere(0.5 + g)}) for i, g in enumerate(gaps)])[2]

    assert run([0.01, 0.01, 0.01])["holds"]                # 1 point behind, no spread
    assert not run([0.03, 0.03, 0.03])["holds"]            # 3 points behind
    assert not run([0.0, 0.03, -0.01])["holds"]            # mean 0.007 but std 0.02: not shown to be close
    assert run([-0.05, -0.04, -0.06])["holds"]             # RepCon above the oracle


def test_learning_check_compares_the_generalist_with_a_random_backbone():
    from rcfast.train.transfer_benchmark.claims import learning_check

    def check(gains):
        return learning_check([_seed_result(i, {"teacher_general": _everywhere(0.5 + g)}) for i, g in enumerate(gains)],
                              downstream=TASKS, shots=(5, 20))

    assert check([0.1, 0.12, 0.08])["holds"]
    worse = check([-0.02, 0.01, -0.03])
    assert not worse["holds"] and worse["comparisons"][0]["mean"] == pytest.approx(-0.04 / 3)


def test_one_seed_decides_nothing():
    claims = _claims([_seed_result(0, {"single_kd": _everywhere(0.1)})])
    assert all(not c["holds"] and not c["decidable"] for c in claims)
    assert all(c["comparisons"][0]["std"] is None for c in claims)


def test_aggregate_is_mean_and_sample_std_over_seeds_with_a_mean_task():
    results = [_seed_result(0, {"repcon": {"future_general": 0.2}}), _seed_result(1, {"repcon": {"future_general": 0.4}})]
    agg = aggregate(results, shots=(5, 20))
    cell = agg["repcon"]["future_general"]
    assert cell["score"]["mean"] == pytest.approx(0.3) and cell["score"]["std"] == pytest.approx(np.std([.2, .4], ddof=1))
    assert cell["knn@5"]["values"] == pytest.approx([0.1, 0.2]) and cell["knn_mean"]["mean"] == pytest.approx(0.15)
    assert agg["repcon"]["mean"]["score"]["values"] == pytest.approx([(0.2 + 1.5) / 4, (0.4 + 1.5) / 4])


def test_first_per_class_takes_the_first_n_in_order():
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2])
    assert first_per_class(labels, 2).tolist() == [0, 1, 3, 4, 6, 7]
    with pytest.raises(ValueError, match="fewer than the 4 shots"):
        first_per_class(labels, 4)


# ---------------------------------------------------------------------------------------------
# Settings and the output folder


@pytest.mark.parametrize("change, message", [
    ({"seeds": 0}, "seeds must be a positive integer"),
    ({"seeds": -2}, "seeds must be a positive integer"),
    ({"student_steps": 0}, "student_steps"),
    ({"shots": (5, 50)}, "probe_train_images=20"),
    ({"shots": (0, 5)}, "shots must be a positive integer"),
    ({"shots": (20, 5)}, "increasing"),
    ({"student_init": "imagenet"}, "student_init must be one of"),
    ({"temperature": 0.0}, "temperature"),
])
def test_bad_settings_are_refused_naming_the_setting(change, message):
    import dataclasses

    with pytest.raises(ValueError, match=message):
        dataclasses.replace(BenchmarkSettings(), **change).validate()


def test_presets_are_valid_and_keep_the_protocols_shape():
    quick, medium, full = (BenchmarkSettings.preset(size) for size in ("quick", "medium", "full"))
    assert full == BenchmarkSettings() and quick == BenchmarkSettings.quick()
    for preset in (quick, medium, full):
        preset.validate()
    # The floor: a generalist on >= 300 classes, >= 2 specialists (quick is the smoke test only).
    assert medium.protocol.general_classes >= 300 and full.protocol.general_classes >= 300
    assert len(medium.protocol.specialist_scripts) >= 2
    assert medium.student_steps < full.student_steps and BenchmarkSettings.medium(seeds=5).seeds == 5
    with pytest.raises(ValueError, match="size must be one of"):
        BenchmarkSettings.preset("huge")


def test_cli_refuses_quick_with_another_size(tmp_path, capsys):
    out = tmp_path / "bench"
    assert cli.main(["benchmark", "transfer", "--quick", "--size", "medium", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcfast: error: --quick and --size medium contradict") and not out.exists()


def test_protocol_needs_two_specialists_and_positive_counts():
    with pytest.raises(ValueError, match="at least 2 specialist scripts"):
        GlyphProtocol(specialist_scripts=("Georgian",))
    with pytest.raises(ValueError, match="general_classes must be a positive integer"):
        GlyphProtocol(general_classes=0)


def test_output_folder_is_continued_refused_or_rebuilt(tmp_path):
    spec = BenchmarkSettings.quick().spec()
    out = prepare_output(tmp_path / "bench", spec, overwrite=False)
    (out / "seeds" / "0").mkdir(parents=True)
    (out / "report.md").write_text("old")
    (out / "data").mkdir()
    assert prepare_output(out, spec, overwrite=False) == out and (out / "report.md").exists()  # continued

    more_seeds = BenchmarkSettings.quick(seeds=3).spec()  # seeds are replicates: added, the rest kept
    assert prepare_output(out, more_seeds, overwrite=False) == out and (out / "seeds" / "0").exists()
    assert json.loads((out / SPEC_FILE).read_text()) == more_seeds

    other = BenchmarkSettings.quick(seeds=3, student_steps=11).spec()
    with pytest.raises(ValueError, match=r"other parameters \(settings.student_steps: 10 -> 11\).*--overwrite"):
        prepare_output(out, other, overwrite=False)
    assert (out / "report.md").exists()
    prepare_output(out, other, overwrite=True)
    assert not (out / "report.md").exists() and not (out / "seeds").exists()
    assert (out / "data").exists()  # rendered data are kept: glyph_dataset checks their parameters itself
    assert json.loads((out / SPEC_FILE).read_text()) == other

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not empty and holds no transfer benchmark"):
            prepare_output(foreign, spec, overwrite=overwrite)
    assert (foreign / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# The protocol's data roles (DejaVu Sans alone: a one-font catalogue)


def test_protocol_roles_are_disjoint_and_seeded():
    protocol = GlyphProtocol(general_classes=100, general_future_classes=30, specialist_classes=30,
                             specialist_future_classes=20, unused_classes=30)
    a = choose_classes(protocol, 0, fonts=DEJAVU)
    parts = [a.general, a.general_future, *a.specialists.values(), *a.specialist_futures.values(), a.unused]
    assert [len(p) for p in parts] == [100, 30, 30, 30, 20, 20, 30]
    flat = [c for p in parts for c in p]
    assert len(set(flat)) == len(flat)
    assert list(a.specialists) == ["Georgian", "Arabic"]
    assert choose_classes(protocol, 0, fonts=DEJAVU) == a and choose_classes(protocol, 1, fonts=DEJAVU) != a
    # Names are matched case-insensitively and given back as the catalogue spells them.
    lower = GlyphProtocol(specialist_scripts=("georgian", "ARABIC"), unused_script="canadian_aboriginal")
    assert lower.resolve(DEJAVU).specialist_scripts == ("Georgian", "Arabic")
    assert script_slug("Canadian Aboriginal") == "canadian_aboriginal"


def test_protocol_refuses_unknown_scripts_too_few_classes_and_double_roles():
    with pytest.raises(ValueError, match=r"'Klingon' is not available.*Latin \(\d+\)"):
        choose_classes(GlyphProtocol(specialist_scripts=("Georgian", "Klingon")), 0, fonts=DEJAVU)
    with pytest.raises(ValueError, match=r"fewer than the 495 asked.*Georgian \(\d+\)"):
        choose_classes(GlyphProtocol(specialist_classes=450), 0, fonts=DEJAVU)
    with pytest.raises(ValueError, match="two roles"):
        choose_classes(GlyphProtocol(unused_script="Arabic"), 0, fonts=DEJAVU)


def test_evaluation_reads_each_class_in_image_order(tmp_path):
    """The n-shot set is "the first n images of each class": the evaluation order must be file order."""
    ds = glyph_dataset(tmp_path / "g", ["U+0041", "U+0042", "U+0043"], splits={"train": 6}, fonts=DEJAVU)
    arrays, labels = ds.arrays("train")  # sorted file order: class, then image index
    from rcfast.data import IMAGENET_MEAN, IMAGENET_STD

    expected = (torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255 - torch.tensor(IMAGENET_MEAN).view(
        1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    images, got = zip(*labeled_images(ds.splits["train"], 32, batch_size=4))
    images = torch.cat(images)
    assert torch.cat(got).tolist() == labels.tolist()
    nearest = torch.cdist(images.flatten(1), expected.flatten(1)).argmin(dim=1)
    assert nearest.tolist() == list(range(len(labels)))


@pytest.mark.slow
def test_train_glyph_classifier_trains_once_and_scores(tmp_path, one_thread):
    ds = glyph_dataset(tmp_path / "g", ["U+0041", "U+0042", "U+0043", "U+0044"],
                       splits={"train": 16, "test": 4}, fonts=DEJAVU)
    logs = []
    clf = train_glyph_classifier(ds, tmp_path / "run", steps=3, log=logs.append)
    assert clf.checkpoint.is_file() and clf.num_classes == 4 and clf.summary["steps"] == 3
    assert 0.0 <= clf.accuracy(ds) <= 1.0
    assert clf.model()(torch.zeros(2, 3, 32, 32)).shape == (2, 4)
    assert clf.backbone()(torch.zeros(2, 3, 32, 32)).shape == (2, 64)
    assert load_config(tmp_path / "run" / "config.yaml").tasks[0].num_classes == 4
    before = clf.checkpoint.stat().st_mtime_ns
    again = train_glyph_classifier(ds, tmp_path / "run", steps=3, log=logs.append)
    assert again.checkpoint.stat().st_mtime_ns == before and "finished earlier" in logs[-1]
    with pytest.raises(ValueError, match="classes differ"):
        clf.accuracy(glyph_dataset(tmp_path / "h", ["U+0041", "U+0042"], splits={"test": 2}, fonts=DEJAVU))


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI: one line, before any work


@pytest.mark.slow  # loads the glyph catalogue of matplotlib's fonts (cached for the session)
@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds must be >= 1, got 0"),
    (["--seeds", "-3"], "--seeds must be >= 1, got -3"),
    (["--specialist-scripts", "Georgian,Klingon"], r"script 'Klingon' is not available.*Latin \(\d+\)"),
    (["--specialist-classes", "200"], r"fewer than the 208 asked.*available scripts.*Georgian \(\d+\)"),
    (["--general-classes", "5000"], r"fewer than the 5010 asked"),
    (["--specialist-scripts", "Georgian"], "at least 2 specialist scripts"),
    (["--unused-script", "Latin"], "two roles"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "bench"
    assert cli.main(["benchmark", "transfer", "--quick", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcfast: error: ") and err.count("\n") == 1, err
    assert __import__("re").search(message, err), err
    assert not out.exists()  # nothing written, nothing rendered, nothing trained


# ---------------------------------------------------------------------------------------------
# One quick run end to end


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "bench"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli.main(["benchmark", "transfer", "--quick", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_quick_run_writes_every_output(quick_run):
    out = quick_run
    for name in (SPEC_FILE, "results.json", "report.md", "transfer.png", "seeds/0/results.json",
                 "seeds/1/results.json"):
        assert (out / name).is_file(), name
    assert (out / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for seed in (0, 1):
        for run in ("teacher_general", "teacher_georgian", "teacher_arabic", *MODELS[4:]):
            assert (out / "seeds" / str(seed) / "runs" / run / "final.pt").is_file()
            load_config(out / "seeds" / str(seed) / "configs" / f"{run}.yaml")  # what `rcfast consolidate` reads


@pytest.mark.slow
def test_quick_results_schema_and_consistent_numbers(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    assert results["seeds"] == [0, 1] and results["format"] == "rcfast.transfer_benchmark"
    assert set(results["models"]) == set(MODELS) and results["downstream_tasks"] == TASKS
    assert len(results["claims"]) == 3 and isinstance(results["learning_check"]["holds"], bool)
    for claim in results["claims"]:
        assert isinstance(claim["statement"], str) and isinstance(claim["holds"], bool) and claim["decidable"]
        for c in claim["comparisons"]:
            d = np.array(c["differences"])
            assert len(d) == 2 and c["mean"] == pytest.approx(d.mean()) and c["std"] == pytest.approx(d.std(ddof=1))
            rule = (c["mean"] > 0 and c["mean"] > c["std"]) if c["rule"] == "greater" else (
                c["mean"] + c["std"] <= c["margin"])
            assert c["passes"] == rule
        assert claim["holds"] == all(c["passes"] for c in claim["comparisons"])
    # The aggregate is recomputable from the per-seed numbers.
    shots = results["settings"]["shots"]
    assert shots == [2, 5]
    for model in MODELS:
        for task in TASKS:
            per_seed = [np.mean([s["transfer"][model][task][f"probe@{n}"] for n in shots]) for s in results["per_seed"]]
            cell = results["aggregate"][model][task]["score"]
            assert cell["mean"] == pytest.approx(np.mean(per_seed)) and cell["std"] == pytest.approx(
                np.std(per_seed, ddof=1))
            assert all(0.0 <= s["transfer"][model][task][f"knn@{n}"] <= 1.0 for s in results["per_seed"] for n in shots)
    assert set(results["teacher_accuracy"]) == {"teacher_general", "teacher_georgian", "teacher_arabic"}
    report = (quick_run / "report.md").read_text()
    for claim in results["claims"]:
        assert claim["statement"] in report
    for label in results["models"].values():
        assert f"| {label} |" in report


@pytest.mark.slow
def test_quick_runs_follow_the_protocol(quick_run):
    seed_dir = quick_run / "seeds" / "0"
    config = {name: load_config(seed_dir / "configs" / f"{name}.yaml") for name in
              ("teacher_general", "teacher_georgian", "single_kd", "repcon", "multi_kd", "oracle")}
    generalist = str(seed_dir / "runs" / "teacher_general" / "final.pt")
    assert config["teacher_general"].student.init_from == "" and config["teacher_general"].tasks[0].num_classes == 40
    assert config["teacher_georgian"].student.init_from == generalist
    for name in ("single_kd", "repcon", "multi_kd"):
        c = config[name]
        assert c.student.init_from == generalist
        assert not c.tasks and not c.data.labels  # students see no label
        assert Path(c.data.source).name == "proxy" and [t["term"] for t in c.objective] == ["multihead_kd"]
    assert [t.name for t in config["single_kd"].teachers] == ["georgian"]
    assert [t.name for t in config["repcon"].teachers] == ["georgian", "arabic", "general"]
    assert config["repcon"].teachers[2].generalist
    assert [t.name for t in config["multi_kd"].teachers] == ["georgian", "arabic"]
    assert [t.name for t in config["oracle"].tasks] == ["general", "georgian", "arabic"]
    # The proxy images show the specialists' training classes, unlabeled; held-out classes appear nowhere.
    seed = json.loads((seed_dir / "results.json").read_text())
    classes = seed["classes"]
    proxy = json.loads((quick_run / "data" / "seed_0" / "proxy" / "manifest.json").read_text())
    assert not proxy["spec"]["labeled"]
    assert {c["id"] for c in proxy["classes"]} == {c for v in classes["specialists"].values() for c in v}
    teacher_classes = set(classes["general"]) | {c for v in classes["specialists"].values() for c in v}
    held_out = set(classes["general_future"]) | set(classes["unused"]) | {
        c for v in classes["specialist_futures"].values() for c in v}
    assert not held_out & teacher_classes


@pytest.mark.slow
def test_quick_rerun_continues_and_other_parameters_are_refused(quick_run, capsys):
    before = json.loads((quick_run / "results.json").read_text())
    mtimes = {p: p.stat().st_mtime_ns for p in quick_run.rglob("final.pt")}
    assert cli.main(["benchmark", "transfer", "--quick", "--out", str(quick_run)]) == 0
    printed = capsys.readouterr().out
    assert "finished earlier, kept" in printed
    after = json.loads((quick_run / "results.json").read_text())
    assert after["claims"] == before["claims"] and after["aggregate"] == before["aggregate"]
    assert {p: p.stat().st_mtime_ns for p in quick_run.rglob("final.pt")} == mtimes

    assert cli.main(["benchmark", "transfer", "--quick", "--student-init", "random", "--out", str(quick_run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "other parameters (settings.student_init: 'generalist' -> 'random')" in err
    assert "--overwrite" in err
    assert {p: p.stat().st_mtime_ns for p in quick_run.rglob("final.pt")} == mtimes

    # Fewer seeds: the same folder, nothing trained; one seed decides nothing. Back to two: as before.
    assert cli.main(["benchmark", "transfer", "--quick", "--seeds", "1", "--out", str(quick_run)]) == 0
    one = json.loads((quick_run / "results.json").read_text())
    assert one["seeds"] == [0] and not any(c["decidable"] for c in one["claims"])
    assert cli.main(["benchmark", "transfer", "--quick", "--out", str(quick_run)]) == 0
    assert json.loads((quick_run / "results.json").read_text())["aggregate"] == before["aggregate"]
    assert {p: p.stat().st_mtime_ns for p in quick_run.rglob("final.pt")} == mtimes
