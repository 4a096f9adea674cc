"""gdrd_fast: fused kernels for knowledge distillation and the GDRD method for low-resolution faces."""
from .env import env_report
from .functional import (crd_log_z, crd_nce_loss, feature_regression_loss, infonce_bank_loss,
                         relational_contrastive_loss, relational_log_z)
from .losses import CRDLoss, FeatureRegressionLoss, InfoNCEBankLoss, RelationalContrastiveLoss
from .memory import MemoryBank, MemoryQueue
from .params import RelationalParams
from .validation import set_checks

__version__ = "0.1.0"
__all__ = ["crd_nce_loss", "crd_log_z", "infonce_bank_loss", "relational_contrastive_loss", "relational_log_z",
           "feature_regression_loss", "CRDLoss", "InfoNCEBankLoss", "FeatureRegressionLoss",
           "RelationalContrastiveLoss", "MemoryBank", "MemoryQueue", "RelationalParams", "set_checks",
           "env_report"]
