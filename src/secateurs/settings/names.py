"""The names the command line offers as choices (budget modes, tasks, dtypes), kept here without
torch so that `secateurs --help` answers at once; the modules that implement them import these
tuples. The method names are declared with their options (secateurs.methods.options.METHOD_NAMES)."""

GQA_MODES = ("groups", "in-group")
ROUNDINGS = ("balanced", "paper", "structures")
RATIO_OF = ("all", "prunable")
SELECTIONS = ("standard", "reversed", "random")
ALLOCATIONS = ("uniform", "global")
SPLITS = ("balanced", "search")
RECONSTRUCT_MODES = ("sequential", "dense")
STANDARD_TASKS = ("piqa", "arc_easy", "boolq", "winogrande", "openbookqa")
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16", "float64")
GGUF_OUTTYPES = ("f32", "f16", "bf16", "q8_0")  # secateurs.export.gguf_export.OUTTYPES

# Speed ratios (secateurs.evaluation.speed): paired rounds go on until the ratios' interquartile range /
# median is at most this (never reported above 25%).
DEFAULT_MAX_SPREAD = 0.10
