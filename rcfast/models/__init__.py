"""Student and backbone models: ``MultiHeadStudent``, built-in backbones, the registry, IE-KD auto-encoders."""
from rcfast.models.autoencoder import FactorAutoEncoder, pretrain_factor_autoencoder
from rcfast.models.backbones import ResNetBackbone, SmallCNN, resnet18_backbone, small_cnn
from rcfast.models.registry import (available_models, build_classifier, build_model, build_student,
                                    classifier_backbone, register_model)
from rcfast.models.student import MultiHeadStudent

__all__ = [
    "MultiHeadStudent", "SmallCNN", "ResNetBackbone", "small_cnn", "resnet18_backbone",
    "register_model", "available_models", "build_model", "build_classifier", "build_student",
    "classifier_backbone", "FactorAutoEncoder", "pretrain_factor_autoencoder",
]
