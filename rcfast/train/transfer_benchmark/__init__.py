"""The glyph transfer benchmark: the representation-consolidation paper's protocol, several seeds, its claims.

``rcfast benchmark transfer`` runs :func:`run_transfer_benchmark`: a
generalist teacher on a broad general domain of glyph scripts, specialist
teachers fine-tuned from it on specialist scripts, students distilled on
unlabeled proxy images (single-head KD, RepCon, multi-head KD) and a
multi-task oracle, then few-shot linear probes and kNN of every frozen
backbone on classes no model saw; mean ± std over seeds and the paper's three
claims tested as statements. See docs/benchmark.md.

Modules: ``settings`` (what determines the numbers), ``runs`` (one seed's
runs; :func:`train_glyph_classifier` for other experiments), ``evaluate``
(few-shot probes), ``claims`` (statistics and verdicts), ``report``
(``report.md``, the chart), ``run`` (the whole benchmark, resumable).
The data layout is :mod:`rcfast.data.glyphs.protocol`.
"""
from rcfast.train.transfer_benchmark.claims import aggregate, evaluate_claims
from rcfast.train.transfer_benchmark.run import run_transfer_benchmark
from rcfast.train.transfer_benchmark.runs import GlyphClassifier, seed_configs, train_glyph_classifier
from rcfast.train.transfer_benchmark.settings import BenchmarkSettings

__all__ = ["BenchmarkSettings", "GlyphClassifier", "aggregate", "evaluate_claims", "run_transfer_benchmark",
           "seed_configs", "train_glyph_classifier"]
