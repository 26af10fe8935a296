"""The benchmark's outputs: ``results.json``, ``report.md`` and the chart ``transfer.png``."""
from __future__ import annotations

from pathlib import Path

from rcfast.eval.report import bar_chart, format_table, markdown_table
from rcfast.train.transfer_benchmark.claims import MEAN_TASK

__all__ = ["score_table", "write_report", "write_chart", "CHART"]

CHART = "transfer.png"


def _pm(stat: dict | None, digits: int = 3) -> str:
    if stat is None:
        return "-"
    std = f" ± {stat['std']:.{digits}f}" if stat.get("std") is not None else ""
    return f"{stat['mean']:.{digits}f}{std}"


def _task_columns(results: dict) -> list[str]:
    return [*results["downstream_tasks"], MEAN_TASK]


def score_table(results: dict, metric: str = "score", markdown: bool = True) -> str:
    """Models x downstream tasks (+ their mean): ``metric`` as mean ± std over seeds."""
    labels, agg = results["models"], results["aggregate"]
    columns = _task_columns(results)
    rows = {labels[m]: {c: _pm(agg[m][c].get(metric)) for c in columns} for m in labels}
    return (markdown_table if markdown else format_table)(rows, columns)


def _shots_table(results: dict) -> str:
    labels, agg, shots = results["models"], results["aggregate"], results["settings"]["shots"]
    columns = [f"probe@{n}" for n in shots] + [f"knn@{n}" for n in shots]
    rows = {labels[m]: {c: _pm(agg[m][MEAN_TASK][c]) for c in columns} for m in labels}
    return markdown_table(rows, columns)


def _claims_markdown(claims: list[dict]) -> str:
    out = []
    for claim in claims:
        verdict = "**holds**" if claim["holds"] else (
            "**does not hold**" if claim["decidable"] else "**undecided** (one seed: no spread to test against)")
        out.append(f"{claim['id']}. {claim['statement']} — {verdict}.  \n"
                   f"   Measured on: {claim['metric']}.  ")
        for c in claim["comparisons"]:
            std = f"{c['std']:.3f}" if c["std"] is not None else "n/a"
            rule = "mean > 0 and mean > std" if c["rule"] == "greater" else f"mean + std ≤ {c['margin']:.3f}"
            p = f", p = {c['p_value']:.3f}" if c["p_value"] is not None else ""
            per_seed = ", ".join(f"{d:+.3f}" for d in c["differences"])
            out.append(f"   - {c['name']}: {c['mean']:+.3f} ± {std} (per seed: {per_seed}; rule {rule}: "
                       f"{'passes' if c['passes'] else 'fails'}{p})")
    return "\n".join(out)


def _check(results: dict) -> str:
    check = results["learning_check"]
    verdict = "yes" if check["holds"] else ("no" if check["decidable"] else "undecided (one seed)")
    return f"{check['statement']} — **{verdict}**: {check['test']}."


def write_chart(results: dict, path: Path) -> Path:
    labels, agg = results["models"], results["aggregate"]
    columns = _task_columns(results)
    rows = {labels[m]: {c: agg[m][c]["score"]["mean"] for c in columns} for m in labels}
    errors = {labels[m]: {c: agg[m][c]["score"]["std"] for c in columns} for m in labels}
    shots = "/".join(map(str, results["settings"]["shots"]))
    return bar_chart(rows, columns, path, errors=errors, ylabel=f"linear probe, mean of {shots}-shot",
                     title=f"Transfer to classes no model saw (frozen backbones; mean ± std over "
                           f"{len(results['seeds'])} seeds)")


def write_report(results: dict, path: Path) -> Path:
    s, p = results["settings"], results["settings"]["protocol"]
    shots = "/".join(map(str, s["shots"]))
    init = "the generalist's weights" if s["student_init"] == "generalist" else "random weights"
    teachers = "\n".join(f"- {results['models'][name]}: {_pm(stat)}"
                         for name, stat in results["teacher_accuracy"].items())
    training = "\n".join(
        f"- {results['models'].get(name, name)}: {t['steps']} steps, final loss {_pm(t['final_loss'])}, "
        f"{_pm(t['cpu_time_s'], 0)} s CPU" for name, t in results["training"].items())
    timing = results["timing"]
    text = f"""# rcfast transfer benchmark: representation consolidation on glyphs

`{results['command']}` · benchmark version {results['version']} · seeds {results['seeds']}

Every number is the mean ± sample std over the {len(results['seeds'])} seeds; each seed is a full replicate
(its own class split, renderings, teachers, students and probes).

## The paper's claims

{_claims_markdown(results['claims'])}

Not a claim of the paper, a check that the teachers learned something transferable: {_check(results)}

How a claim is decided: comparisons are paired by seed (all models of a seed are probed on the same tasks);
"A beats B" needs the mean per-seed difference to be positive and larger than its std over seeds (a paired
t-statistic above √n); "close" needs the mean gap plus one std to stay within the margin. The p-values are
one-sided paired t-tests, for reference.

## Transfer score: linear probe on frozen features, mean of {shots}-shot

{score_table(results)}

![transfer scores]({CHART})

## kNN (cosine, k = min({s['knn_k']}, shots)), mean of {shots}-shot

{score_table(results, 'knn_mean')}

## Mean over the downstream tasks, per shot count

{_shots_table(results)}

## Protocol

- General domain ({', '.join(p['general_scripts'])}): the generalist teacher trains on {p['general_classes']}
  classes; {p['general_future_classes']} other classes are held out (`future_general`).
- Specialist scripts ({', '.join(p['specialist_scripts'])}): a specialist teacher per script, fine-tuned from
  the generalist on {p['specialist_classes']} classes; {p['specialist_future_classes']} other classes of each
  are held out: the expert's future tasks (`future_<script>`).
- {p['unused_script']}: {p['unused_classes']} classes of a script no model and no proxy image shows
  (`unused_...`).
- Teachers' labeled data: {p['teacher_train_images']} images per class ({p['teacher_test_images']} more for
  their test accuracy). Proxy: {p['proxy_images']} unlabeled images of each specialist's training class (other
  images than the labeled ones; no held-out class; the general domain is not replayed). Downstream: {p['probe_train_images']} training and {p['probe_test_images']} test images per
  class; the n-shot set is each class's first n. Images {p['image_size']}×{p['image_size']}.
- Backbone `small_cnn` width {s['width']} ({4 * s['width']}-d features) for every model. Generalist
  {s['generalist_steps']} steps from scratch; specialists {s['specialist_steps']} steps at lr
  {s['specialist_lr']}; students and oracle {s['student_steps']} steps, initialised from {init}; batch
  {s['batch_size']}, AdamW lr {s['lr']} (warm-up + cosine), KD temperature {s['temperature']}, {s['precision']}.
- Students distil on the proxy images only (no labels): (a) the first specialist alone, (b) RepCon: every
  specialist head + the generalist head, (c) every specialist head without the generalist; (d) the oracle trains
  with the labels of the teachers' own data (one cross-entropy head per task, the batch split over the tasks).

Teacher accuracy on their own test splits:
{teachers}

Training runs (per seed; mean over seeds):
{training}

Time: {timing['wall_s']:.0f} s wall, {timing['cpu_s']:.0f} s CPU in this process (training, evaluation;
rendering runs in worker processes and is not counted), {timing['threads']} torch thread(s), load average
{timing['load_average']} at the end. Configs of every run: `seeds/<seed>/configs/`.
"""
    path.write_text(text, encoding="utf-8")
    return path
