"""Recovery after pruning: distillation from the dense parent or plain cross-entropy, through LoRA
(merged before saving) or full fine-tuning. See secateurs.recovery.api.recover and its settings,
secateurs.recovery.settings.RecoverySettings.

The public names are imported on first use, so that the command line's parsers can read
RecoverySettings (secateurs.recovery.settings) without paying for torch."""

from secateurs.lazy import lazy_names

_PUBLIC = {
    "PRESETS": "secateurs.recovery.settings",
    "RecoverySettings": "secateurs.recovery.settings",
    "RECOVERY_FILENAME": "secateurs.recovery.api",
    "RecoveryResult": "secateurs.recovery.api",
    "check_teacher": "secateurs.recovery.api",
    "recover": "secateurs.recovery.api",
    "RecoveryData": "secateurs.recovery.data",
    "RecoveryDataError": "secateurs.recovery.data",
    "load_recovery_data": "secateurs.recovery.data",
    "Objective": "secateurs.recovery.objectives",
    "RecoveryError": "secateurs.recovery.trainer",
}

__all__ = sorted(_PUBLIC)


__getattr__ = lazy_names(__name__, _PUBLIC)
