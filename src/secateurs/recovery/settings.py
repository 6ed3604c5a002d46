"""Every recovery setting, declared once: `RecoverySettings` is what secateurs.recover trains with
(`recover(student, teacher, settings=...)`, or its keywords), what `secateurs recover` and
`prune --recover` build their flags from (secateurs.settings.fields), and where every check that needs
no model lives: types and bounds (with the command line's words), the settings that apply only with
another, and the preset. Checks that need the models (the objective's teacher, the context length)
are `check(has_teacher, student)`. No torch here, so that `secateurs --help` answers at once.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from secateurs.errors import SecateursError
from secateurs.settings.fields import check_choices, check_declared, from_keywords, option
from secateurs.settings.values import (
    TOKENS,
    finite_float,
    float_in,
    int_in,
    nonempty,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
)

OBJECTIVES = ("kd", "ce")
METHODS = ("full", "lora")
# How several processes share the training (secateurs.runtime.distributed): ddp, every process holds the
# whole student; fsdp, the student is sharded over them (secateurs.runtime.sharding); auto chooses.
STRATEGIES = ("auto", "ddp", "fsdp")
# Where the teacher lives under fsdp: replicated, whole in every process; sharded like the student
# (secateurs.runtime.sharding); auto shards it where the memory plan says the replicated one does not fit.
TEACHER_SHARDINGS = ("auto", "replicated", "sharded")
# The AMP paper's recovery (official fine_tune.py): LoRA r=8, alpha=16, dropout 0.05 on the seven
# projections, lr 3e-4. Its data (Alpaca-cleaned, 2 epochs) is the caller's --data.
PRESETS = {"amp-paper": {"method": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "lr": 3e-4}}
DEFAULTS = {"method": "full", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.05}
DEFAULT_LR = {"full": 1e-4, "lora": 3e-4}

# Recovery runs estimated to take longer are refused (secateurs.recovery.estimate; --max-hours): three days,
# past any budget this machine class finishes, short of a cluster job's.
DEFAULT_MAX_HOURS = 72.0
# The learning-rate schedulers of transformers.get_scheduler that the recovery loop can drive: built from
# (name, optimizer, num_warmup_steps, num_training_steps) alone and stepped once per optimiser step
# (tests/test_recovery_faults.py runs each). The others fail, inside get_scheduler or at the first step,
# after the models and data are loaded: refused here, with the reason where there is one.
SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
              "inverse_sqrt")
UNSUPPORTED_SCHEDULERS = {
    "reduce_lr_on_plateau": "steps on a validation metric, not once per optimiser step",
    "greedy": "steps on a validation metric, not once per optimiser step",
    "cosine_with_min_lr": "needs a minimum learning rate (min_lr), which secateurs does not pass",
    "cosine_warmup_with_min_lr": "needs a minimum learning rate (min_lr), which secateurs does not pass",
    "warmup_stable_decay": "needs a number of decay steps, which secateurs does not pass",
}
POLYNOMIAL_END = 1e-7  # get_polynomial_decay_schedule_with_warmup's lr_end: the initial rate must exceed it

# Upper bounds of recovery settings (refused above, by the command line and by secateurs.recover, in the
# same words): a distillation temperature scales the loss by T^2 (published runs use 1 to 10); the
# hidden-state weight is relative to a KL of order 1; a LoRA rank cannot exceed a projection's width (the
# widest real ones are below 2^17); LoRA scales its update by alpha / r (published alphas are 8 to 512).
MAX_TEMPERATURE = 100.0
MAX_LOSS_WEIGHT = 1000.0
MAX_LORA_R = 131072
MAX_LORA_ALPHA = 65536.0
TEMPERATURE = float_in(0, MAX_TEMPERATURE, "the loss is scaled by T^2", low_open=True)
LOSS_WEIGHT = float_in(0, MAX_LOSS_WEIGHT, "relative to a KL of order 1")
LORA_R = int_in(1, MAX_LORA_R, "a rank cannot exceed a projection's width")
LORA_ALPHA = float_in(0, MAX_LORA_ALPHA, "the adapter is scaled by alpha/r", low_open=True)
DROPOUT = float_in(0, 1, high_open=True)
LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout")  # the adapter's settings: they apply with method 'lora'


def _short(rate: float) -> str:
    """A learning rate as people write it: 3e-4."""
    mantissa, exponent = f"{rate:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def check_scheduler(name: str, lr: float | None = None) -> str:
    """Refuse a learning-rate scheduler the loop cannot drive (see SCHEDULERS), and 'polynomial' with a
    learning rate it cannot decay from (at most its final 1e-7); returns the name."""
    if name in SCHEDULERS:
        if name == "polynomial" and lr is not None and lr <= POLYNOMIAL_END:
            raise SecateursError(f"the 'polynomial' scheduler decays the learning rate to {POLYNOMIAL_END:g} and "
                                 f"needs a larger one, got {lr:g}; raise --lr or choose another --scheduler")
        return name
    why = UNSUPPORTED_SCHEDULERS.get(name) if isinstance(name, str) else None
    what = f"the scheduler {name!r} {why}" if why else f"unknown scheduler {name!r}"
    raise SecateursError(f"{what}; use one of {', '.join(SCHEDULERS)}")


@dataclass(frozen=True)
class RecoverySettings:
    """What a recovery run trains on, how and for how long. Unset (None) method, lr and LoRA settings
    come from the preset, then the defaults (DEFAULTS, DEFAULT_LR); explicit values override the
    preset. Built refused when a value is out of its bounds or a setting applies only with another."""

    data: str = option("self", "recovery data: text file, .jsonl (text or Alpaca records; Alpaca learns the "
                               "response only), hf:NAME:SPLIT, 'tinystories', or 'self' (text sampled from the "
                               "teacher; default)", type=nonempty)
    tokens: int = option(200_000, "training budget in tokens (default: {default})", type=positive_int)
    self_samples: int | None = option(None, "with --data self: generate exactly N sequences of --train-length tokens "
                                            "and go over them as many times as --tokens needs (default: just enough "
                                            "for --tokens)", type=positive_int, metavar="N")
    objective: str | None = option(None, "kd: forward KL from the teacher (default with a teacher); ce: cross-entropy "
                                         "(default without)", choices=OBJECTIVES)
    kd_ratio: float = option(1.0, "weight of distillation against cross-entropy, loss = r*KD + (1-r)*CE "
                                  "(default: {default})", type=finite_float)
    temperature: float = option(1.0, "distillation temperature T (loss scaled by T^2; default: {default:g})",
                                type=TEMPERATURE)
    hidden_weight: float = option(0.0, "also match every student layer's output with the teacher layer it came "
                                       "from, with this weight (useful after depth pruning and HARP; default: "
                                       "{default:g}, off)", type=LOSS_WEIGHT)
    method: str | None = option(None, "what trains: 'full' (every weight) or 'lora' (adapters merged into the "
                                      "weights before saving) (default: the preset's, else full)",
                                switches={"--lora": ("lora", "train LoRA adapters (merged into the weights before "
                                                             "saving)"),
                                          "--full": ("full", "train every weight (default)")},
                                dest="train_method")
    preset: str | None = option(None, "amp-paper: LoRA r=8, alpha=16, dropout 0.05 on the seven projections, lr 3e-4",
                                choices=tuple(PRESETS))
    lr: float | None = option(None, f"peak learning rate (default: {_short(DEFAULT_LR['full'])} full, "
                                    f"{_short(DEFAULT_LR['lora'])} LoRA)", type=positive_float)
    lora_r: int | None = option(None, f"LoRA rank (with --lora; default: {DEFAULTS['lora_r']})", type=LORA_R)
    lora_alpha: float | None = option(None, f"LoRA alpha (with --lora; default: {DEFAULTS['lora_alpha']})",
                                      type=LORA_ALPHA)
    lora_dropout: float | None = option(None, f"LoRA dropout (with --lora; default: {DEFAULTS['lora_dropout']})",
                                        type=DROPOUT)
    seq_len: int = option(256, "tokens per packed training sequence (default: {default})", flag="--train-length",
                          type=TOKENS, metavar="N")
    batch_size: int = option(2, "training sequences per micro-batch, of all processes together (default: {default})",
                             flag="--train-batch-size", type=positive_int, metavar="N")
    grad_accum: int = option(1, "micro-batches per optimiser step (default: {default})", type=positive_int)
    val_tokens: int = option(4096, "held-out validation tokens (default: {default}; 0: none)", type=nonnegative_int)
    eval_every: int | None = option(None, "steps between validations (default: a tenth of the run)",
                                    type=positive_int)
    patience: int | None = option(3, "stop after this many validations without improvement, keeping the best "
                                     "weights (default: {default}; 0: never)", type=nonnegative_int)
    save_every: int | None = option(None, "write a checkpoint every N steps (to --checkpoint-dir)", type=positive_int)
    checkpoint_dir: str | os.PathLike | None = option(None, "checkpoint folder, created by the run (default: "
                                                            "OUT.checkpoints, removed after success if this run "
                                                            "wrote it)", type=nonempty)
    resume: bool = option(False, "continue from the checkpoint, bit-identically", action="store_true")
    scheduler: str = option("cosine", "learning-rate schedule from transformers (default: {default})",
                            choices=SCHEDULERS)
    warmup_ratio: float = option(0.05, "fraction of steps warming up (default: {default})", type=finite_float)
    weight_decay: float = option(0.0, "AdamW weight decay on matrices (default: {default:g})", type=finite_float)
    max_grad_norm: float | None = option(1.0, "gradient clipping norm (default: {default}; 0: off)",
                                         type=nonnegative_float)
    gradient_checkpointing: bool = option(False, "recompute activations in backward (less memory)",
                                          action="store_true")
    bf16: bool = option(False, "bfloat16 autocast for the forward passes (GPUs); weights and optimiser keep --dtype, "
                               "losses are float32", action="store_true")
    strategy: str = option("auto", "how several processes (torchrun) share the training: ddp, each holds the whole "
                                   "student; fsdp, the student, its gradients and optimiser state are sharded over "
                                   "them (for students that do not fit one device); auto chooses (default: "
                                   "{default}; one process trains unsharded)", choices=STRATEGIES)
    teacher_sharding: str = option("auto", "the teacher under --strategy fsdp: replicated, whole in every process; "
                                           "sharded like the student, each process holding 1/N of it; auto shards it "
                                           "when the replicated one does not fit (default: {default})",
                                   choices=TEACHER_SHARDINGS)
    max_hours: float = option(DEFAULT_MAX_HOURS, "refuse a run estimated to take longer (the estimate is printed "
                                                 "before the first step; default: {default:g})",
                              type=positive_float, metavar="H")
    teacher_any: bool = option(False, "the teacher is meant not to be the dense model the student was pruned from "
                                      "(no warning)", action="store_true")
    teacher_cache: str | os.PathLike | None = option(None, "distil from the teacher's top-K log-probabilities that "
                                                           "`secateurs teacher-logits` wrote to this folder, with no "
                                                           "teacher in memory (instead of --teacher)", type=nonempty,
                                                     metavar="CACHE")
    seed: int = option(0, "seed for the data split and order and LoRA init (default: {default})", flag="--seed",
                       type=nonnegative_int, shared=True)
    chunk_rows: int = option(256, "token rows per chunk of the loss over the vocabulary (bounds its memory)",
                             flag=None, type=positive_int)
    data_offset: int = option(0, "training sequences of the seeded order to skip, so a run continuing an earlier "
                                 "one's budget on the same data sees new text", flag=None, type=nonnegative_int)

    def __post_init__(self):
        self._check_training()
        check_declared(self)  # every bounded setting against its declaration, in the command line's words
        self._check_loop()
        self._check_applies_with()

    @classmethod
    def from_keywords(cls, keywords: dict) -> RecoverySettings:
        """The settings from secateurs.recover's keywords; a keyword that is no setting is refused."""
        return from_keywords(cls, keywords, "recovery")

    def replace(self, **changes) -> RecoverySettings:
        """A copy with `changes` (checked like any new settings)."""
        return dataclasses.replace(self, **changes)

    # -- what the preset and the defaults resolve to --------------------------------------------------
    def resolved(self) -> dict:
        """method, lr and the LoRA settings: given, else the preset's, else the defaults."""
        values = {**DEFAULTS, **PRESETS.get(self.preset, {})}
        values.update({k: getattr(self, k) for k in ("method", "lr", *LORA_ONLY) if getattr(self, k) is not None})
        if values.get("lr") is None:
            values["lr"] = DEFAULT_LR.get(values["method"], 1e-4)
        return values

    @property
    def training_method(self) -> str:
        return self.resolved()["method"]

    @property
    def learning_rate(self) -> float:
        return self.resolved()["lr"]

    @property
    def lora(self) -> dict | None:
        """The LoRA adapter's r, alpha and dropout when the method is 'lora', else None."""
        v = self.resolved()
        return {"r": v["lora_r"], "alpha": v["lora_alpha"], "dropout": v["lora_dropout"]} if v["method"] == "lora" \
            else None

    def objective_for(self, has_teacher: bool) -> str:
        """The objective: as given, else 'kd' with a teacher and 'ce' without."""
        return self.objective or ("kd" if has_teacher or self.teacher_cache is not None else "ce")

    def self_tokens(self, has_teacher: bool) -> int:
        """Tokens the teacher generates for data 'self' (0 for any other data)."""
        if self.data != "self" or not has_teacher:
            return 0
        return self.self_samples * self.seq_len if self.self_samples else self.tokens + self.val_tokens

    # -- checks ------------------------------------------------------------------------------------
    def check(self, has_teacher: bool, student=None) -> None:
        """What needs to know the models: the objective's teacher, distillation settings with 'ce',
        and (given the student) its context length."""
        objective = self.objective_for(has_teacher)
        if objective == "kd" and not (has_teacher or self.teacher_cache is not None):
            raise SecateursError("objective 'kd' distils from a teacher: pass the dense model (--teacher), "
                                 "or use objective 'ce'")
        if objective == "ce" and (self.kd_ratio != 1.0 or self.temperature != 1.0):
            raise SecateursError("kd_ratio and temperature (--kd-ratio, --temperature) shape the distillation loss "
                                 "and apply with objective 'kd'; objective 'ce' trains on the data's next tokens alone")
        if self.hidden_weight and objective != "kd":
            raise SecateursError("hidden_weight (hidden-state distillation) must be >= 0 and needs objective 'kd'")
        context = getattr(student.config, "max_position_embeddings", None) if student is not None else None
        if context is not None and self.seq_len > context:
            raise SecateursError(f"seq_len {self.seq_len} exceeds the model's context of {context} tokens")

    def _check_teacher_cache(self, objective: str) -> None:
        """A teacher-logit cache holds the teacher's output distributions: it serves objective 'kd' alone, without
        the hidden-state term (the teacher's hidden states are not in it) and on data the cache can name."""
        if self.teacher_cache is None:
            return
        if objective != "kd":
            raise SecateursError("teacher_cache (--teacher-cache) holds the teacher's next-token distributions for "
                                 "objective 'kd'; objective 'ce' uses no teacher")
        if self.hidden_weight:
            raise SecateursError("hidden_weight (--hidden-weight) matches the teacher's hidden states, which a "
                                 "teacher-logit cache does not hold: distil from the teacher itself (--teacher)")
        if self.data == "self":
            raise SecateursError("data 'self' is text sampled from the teacher, and a run from a teacher-logit cache "
                                 "has no teacher: give the text file the cache was made from (--data)")

    def _check_training(self) -> None:
        tokens = self.tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise SecateursError(f"tokens is the training budget in tokens and must be a positive integer, got "
                                 f"{tokens!r}")
        if self.objective is not None and self.objective not in OBJECTIVES:
            raise SecateursError(f"unknown objective {self.objective!r}; use one of {', '.join(OBJECTIVES)}")
        if not (isinstance(self.kd_ratio, (int, float)) and 0.0 <= self.kd_ratio <= 1.0):
            raise SecateursError(f"kd_ratio weighs distillation against cross-entropy and must be in [0, 1], got "
                                 f"{self.kd_ratio}")
        if self.preset is not None and self.preset not in PRESETS:
            raise SecateursError(f"unknown preset {self.preset!r}; available: {', '.join(PRESETS)}")
        values = self.resolved()
        if values["method"] not in METHODS:
            raise SecateursError(f"unknown method {values['method']!r}; use 'lora' or 'full'")
        lr = values["lr"]
        if isinstance(lr, bool) or not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise SecateursError(f"the learning rate must be a positive number, got {lr!r}")
        given = [k for k in LORA_ONLY if getattr(self, k) is not None]
        if given and values["method"] != "lora":
            raise SecateursError(f"{', '.join(given)} (--{', --'.join(k.replace('_', '-') for k in given)}) set the "
                                 "LoRA adapter and apply with method 'lora' (--lora); this run trains every weight")
        for name, low in (("seq_len", 2), ("batch_size", 1), ("grad_accum", 1), ("chunk_rows", 1), ("val_tokens", 0),
                          ("data_offset", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SecateursError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (isinstance(self.warmup_ratio, (int, float)) and 0.0 <= self.warmup_ratio < 1.0) or not (
                isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise SecateursError(f"warmup_ratio must be in [0, 1) and weight_decay >= 0 (got {self.warmup_ratio}, "
                                 f"{self.weight_decay})")

    def _check_loop(self) -> None:
        check_scheduler(self.scheduler, self.learning_rate)
        norm = self.max_grad_norm
        if norm is not None and (isinstance(norm, bool) or not (isinstance(norm, (int, float)) and math.isfinite(norm)
                                                                 and norm > 0)):
            raise SecateursError(f"max_grad_norm (gradient clipping) must be a positive number, or None (0 on the "
                                 f"command line) for no clipping; got {norm!r}")
        step = self.batch_size * self.seq_len * self.grad_accum
        if step > self.tokens:
            raise SecateursError(f"one optimiser step takes batch_size x seq_len x grad_accum = {self.batch_size} x "
                                 f"{self.seq_len} x {self.grad_accum} = {step:,} tokens, more than the budget of "
                                 f"{self.tokens:,}: lower --train-batch-size or --grad-accum, or raise --tokens")

    def _check_applies_with(self) -> None:
        """Settings that apply only with another."""
        self._check_teacher_cache(self.objective_for(False))
        if self.hidden_weight and self.objective not in (None, "kd"):
            raise SecateursError("hidden_weight (hidden-state distillation) must be >= 0 and needs objective 'kd'")
        if self.self_samples is not None and self.data != "self":
            raise SecateursError("self_samples (--self-samples) sets how many sequences the teacher generates and "
                                 f"applies with data 'self' (--data self), not {self.data!r}")
        if self.checkpoint_dir is not None and not (self.save_every or self.resume):
            raise SecateursError("checkpoint_dir (--checkpoint-dir) applies with save_every (--save-every) or resume "
                                 "(--resume); without them no checkpoint is written or read")

    def loop_keywords(self) -> dict:
        """The training loop's settings (secateurs.recovery.trainer.LoopSettings' keywords)."""
        return dict(tokens=self.tokens, batch_size=self.batch_size, grad_accum=self.grad_accum,
                    lr=float(self.learning_rate), weight_decay=self.weight_decay, scheduler=self.scheduler,
                    warmup_ratio=self.warmup_ratio, max_grad_norm=self.max_grad_norm, eval_every=self.eval_every,
                    patience=self.patience, save_every=self.save_every, seed=self.seed, data_offset=self.data_offset)


LIBRARY_ONLY = tuple(f.name for f in dataclasses.fields(RecoverySettings) if f.metadata["flag"] is None)

CACHE_DTYPES = ("float32", "float16")
CACHE_SELECTIONS = ("top-k", "sampled")
# A cache's K is at most a vocabulary (the largest real ones are below 2^18 tokens).
TOP_K = int_in(1, 262144, "a vocabulary's size at most")


@dataclass(frozen=True)
class TeacherLogitsSettings:
    """What `secateurs teacher-logits` (secateurs.recovery.teacher_cache) writes: the teacher's top-K
    log-probabilities at `temperature` for every supervised position of the recovery sequences that
    `secateurs recover` draws from the same data, tokens, val_tokens, seq_len and seed."""

    data: str | None = option(None, "recovery data, as `recover --data` takes it: text file, .jsonl, hf:NAME:SPLIT "
                                    "or 'tinystories' (not 'self': the run that reads the cache has no teacher to "
                                    "sample it)", type=nonempty)
    tokens: int = option(200_000, "training tokens to cover: the --tokens of the recover runs that read the cache "
                                  "(default: {default})", type=positive_int)
    val_tokens: int = option(4096, "held-out validation tokens, as recover's --val-tokens (default: {default})",
                             type=nonnegative_int)
    seq_len: int = option(256, "tokens per packed training sequence, as recover's (default: {default})",
                          flag="--train-length", type=TOKENS, metavar="N")
    top_k: int = option(64, "teacher log-probabilities kept per position (with --selection sampled: the draws "
                            "per position) (default: {default})", type=TOP_K, metavar="K")
    selection: str = option("sampled", "which tokens a position keeps: 'sampled', K draws from the teacher's "
                                       "distribution kept as the distinct tokens drawn and their frequencies, an "
                                       "unbiased estimate of it (random-sampling distillation); 'top-k', the K most "
                                       "probable and the rest's mass as one bucket, biased below the vocabulary and "
                                       "exact at it (default: {default})", choices=CACHE_SELECTIONS)
    temperature: float = option(1.0, "distillation temperature T of the recover runs (default: {default:g})",
                                type=TEMPERATURE)
    cache_dtype: str = option("float16", "dtype of the stored log-probabilities: float16 rounds them by 2^-11, "
                                         "far below what K leaves out (default: {default})", choices=CACHE_DTYPES)
    seed: int = option(0, "seed of the data split and order, as recover's --seed (default: {default})", flag="--seed",
                       type=nonnegative_int, shared=True)
    shard_sequences: int = option(256, "sequences per shard: the unit written at once and resumed", flag=None,
                                  type=positive_int)
    batch_size: int = option(4, "sequences per teacher forward", flag=None, type=positive_int)
    chunk_rows: int = option(256, "positions per chunk of the softmax over the vocabulary", flag=None,
                             type=positive_int)

    def __post_init__(self):
        check_declared(self)
        if self.data is None:
            raise SecateursError("teacher-logits needs the recovery data (--data): the cache holds the teacher's "
                                 "outputs on the sequences recover draws from it")
        if self.data == "self":
            raise SecateursError("data 'self' is text sampled from the teacher, and a run from a teacher-logit cache "
                                 "has no teacher to sample it: give a text file, .jsonl or hf:NAME:SPLIT")
        check_choices(self)

    @classmethod
    def from_keywords(cls, keywords: dict) -> TeacherLogitsSettings:
        return from_keywords(cls, keywords, "teacher-logits")


@dataclass(frozen=True)
class BriefRecovery:
    """The demo's recovery: a taste of `secateurs recover`, sized to keep the demo within minutes on
    2 cores. It trains on the calibration text (for 'self', the samples pruning already drew and cached,
    so nothing is generated twice), several passes over it, holding out at most `val_sequences` of them
    for `validations` validations. lr 3e-5: amp's default re-fits the layers, so the pruned model starts
    close to the teacher; on SmolLM2 four steps at 3e-4 made the held-out KL worse (the best step was the
    untrained one), at 1e-4 0.483 -> 0.463, at 3e-5 -> 0.444 (0 tokens: no recovery)."""

    tokens: int = 2048
    lr: float = 3e-5
    batch_size: int = 4
    val_sequences: int = 4
    validations: int = 1
