"""The consolidation trainer: ``Consolidator``, its objectives, configs, checkpoints, runtime and DDP set-up."""
from rcfast.extras import require

require("rcfast.train", "numpy", "yaml", "tqdm")  # before anything below imports them

# ruff: noqa: E402
from rcfast.train.checkpoint import atomic_save, isolated_rng, latest_checkpoint, load_checkpoint
from rcfast.train.config import (ConfigError, DataConfig, OptimConfig, RunConfig, StudentConfig, TaskConfig,
                                 TeacherConfig, TrainConfig, config_from_dict, config_to_dict, dump_config,
                                 load_config)
from rcfast.train.consolidator import Consolidator
from rcfast.train.distributed import DistContext, setup_distributed
from rcfast.train.errors import CheckpointError, DistributedError, DivergenceError, TrainingError
from rcfast.train.metrics import read_metrics
from rcfast.train.objectives import Objective, Term, available_terms, register_term
from rcfast.train.runtime import RuntimeSettings, apply_runtime, check_runtime
from rcfast.train.teachers import OnlineTeachers, TeacherSource, load_teacher

__all__ = [
    "Consolidator", "RunConfig", "StudentConfig", "TeacherConfig", "DataConfig", "TaskConfig", "OptimConfig",
    "TrainConfig", "ConfigError", "load_config", "config_from_dict", "config_to_dict", "dump_config",
    "atomic_save", "load_checkpoint", "latest_checkpoint", "isolated_rng", "DistContext", "setup_distributed",
    "OnlineTeachers", "TeacherSource", "load_teacher", "read_metrics", "Objective", "Term", "register_term",
    "available_terms", "RuntimeSettings", "apply_runtime", "check_runtime", "TrainingError", "CheckpointError",
    "DivergenceError", "DistributedError",
]
