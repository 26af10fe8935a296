"""The teacher cache: run a run's teachers once, store their top-k logits per (epoch, sample), train from them.

In a RepCon run every step runs every teacher on the same augmented images,
epoch after epoch. rcfast's augmentation plan is a pure function of (seed,
epoch, image index), so the teachers' outputs for every image a run will see
can be computed once, ahead of time:

- :func:`build_teacher_cache` (``rcfast cache-teachers --config run.yaml
  --epochs E [--top-k K] [--out DIR]``) iterates the run's exact batches for E
  epochs, runs the teachers and stores, per (epoch, sample, teacher), the top-k
  logits and their class indices in memory-mapped chunk files
  (:mod:`~rcfast.train.teacher_cache.store`) with a manifest of what the cache
  is valid for (:mod:`~rcfast.train.teacher_cache.manifest`);
- a run whose config says ``teacher_cache: DIR`` reads them instead
  (:class:`CachedTeachers`, a :class:`~rcfast.train.teachers.TeacherSource`),
  through the sparse loss, or the dense loss when every teacher is stored whole.
  With ``--tail-mass`` the cache also keeps, per (sample, teacher), the mass of
  the classes outside the top k (at the run's temperature, spread evenly over
  them), and the run's target is the teacher's exact top-k probabilities plus
  that tail instead of the k entries renormalised.

See docs/teacher_cache.md.
"""
from rcfast.train.teacher_cache.build import build_teacher_cache, run_epochs_needed, top_k_rows, top_k_temperatures
from rcfast.train.teacher_cache.manifest import read_manifest, run_pins
from rcfast.train.teacher_cache.source import CachedTeachers
from rcfast.train.teacher_cache.store import CacheError, Layout, TeacherCacheFiles

__all__ = ["build_teacher_cache", "CachedTeachers", "CacheError", "Layout", "TeacherCacheFiles", "read_manifest",
           "run_pins", "run_epochs_needed", "top_k_rows", "top_k_temperatures"]
