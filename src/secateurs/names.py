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
