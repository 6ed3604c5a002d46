"""The names the command line offers as choices (methods, budget modes, tasks, dtypes), kept here
without torch so that `secateurs --help` answers at once; the modules that implement them import
these tuples, and a test checks that the method list matches secateurs.methods.METHODS."""

GQA_MODES = ("groups", "in-group")
ROUNDINGS = ("balanced", "paper", "structures")
RATIO_OF = ("all", "prunable")
SELECTIONS = ("standard", "reversed", "random")
ALLOCATIONS = ("uniform", "global")
SPLITS = ("balanced", "search")
RECONSTRUCT_MODES = ("sequential", "dense")
STANDARD_TASKS = ("piqa", "arc_easy", "boolq", "winogrande", "openbookqa")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16", "float64")
WIDTH_METHODS = ("amp", "amp-heads", "amp-mlp", "wanda-sp", "wanda-sp-heads", "flap", "magnitude", "random", "harp")
DEPTH_METHOD_NAMES = ("consensus", "depth-bi", "depth-angular", "depth-cka", "depth-ppl", "depth-random")
METHOD_NAMES = WIDTH_METHODS + DEPTH_METHOD_NAMES
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # secateurs.export.gguf_export.OUTTYPES

# Recovery runs estimated to take longer are refused (secateurs.recovery.estimate; --max-hours): three days,
# past any budget this machine class finishes, short of a cluster job's.
DEFAULT_MAX_HOURS = 72.0
# The learning-rate schedulers of transformers.get_scheduler that the recovery loop can drive: built from
# (name, optimizer, num_warmup_steps, num_training_steps) alone and stepped once per optimiser step
# (secateurs.recovery.trainer explains the others; tests/test_recovery_faults.py runs each).
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")

# Upper bounds of recovery settings (refused above, by the command line and by secateurs.recover): a
# distillation temperature scales the loss by T^2 (published runs use 1 to 10); the hidden-state weight is
# relative to a KL of order 1; a LoRA rank cannot exceed a projection's width (the widest real ones are
# below 2^17); LoRA scales its update by alpha / r (published alphas are 8 to 512).
MAX_TEMPERATURE = 100.0
MAX_LOSS_WEIGHT = 1000.0
MAX_LORA_R = 131072
MAX_LORA_ALPHA = 65536.0

# Speed ratios (secateurs.evaluation.speed): paired rounds go on until the ratios' interquartile range /
# median is at most this (never reported above 25%).
DEFAULT_MAX_SPREAD = 0.10
