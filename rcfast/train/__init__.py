"""The consolidation trainer: ``Consolidator``, its configs, checkpoints and DDP set-up."""
from rcfast.train.checkpoint import atomic_save, latest_checkpoint, load_checkpoint
from rcfast.train.config import (ConfigError, DataConfig, OptimConfig, RunConfig, StudentConfig, TaskConfig,
                                 TeacherConfig, TrainConfig, config_from_dict, config_to_dict, dump_config,
                                 load_config)
from rcfast.train.consolidator import Consolidator
from rcfast.train.distributed import DistContext, setup_distributed
from rcfast.train.metrics import read_metrics
from rcfast.train.teachers import TeacherEnsemble, load_teacher

__all__ = [
    "Consolidator", "RunConfig", "StudentConfig", "TeacherConfig", "DataConfig", "TaskConfig", "OptimConfig",
    "TrainConfig", "ConfigError", "load_config", "config_from_dict", "config_to_dict", "dump_config",
    "atomic_save", "load_checkpoint", "latest_checkpoint", "DistContext", "setup_distributed",
    "TeacherEnsemble", "load_teacher", "read_metrics",
]
