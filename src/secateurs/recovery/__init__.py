"""Recovery after pruning: distillation from the dense parent or plain cross-entropy, through LoRA
(merged before saving) or full fine-tuning. See secateurs.recovery.api.recover."""

from secateurs.recovery.api import PRESETS, RECOVERY_FILENAME, RecoveryResult, check_teacher, recover
from secateurs.recovery.data import RecoveryData, RecoveryDataError, load_recovery_data
from secateurs.recovery.objectives import Objective
from secateurs.recovery.trainer import RecoveryError

__all__ = ["PRESETS", "RECOVERY_FILENAME", "Objective", "RecoveryData", "RecoveryDataError", "RecoveryError",
           "RecoveryResult", "check_teacher", "load_recovery_data", "recover"]
