"""How much memory a recovery run needs on each device, from the models' shapes alone.

The plan reads parameter counts and layer widths (a model in memory, or a skeleton on the meta
device built from a config.json: `skeleton`), never weights, and adds up, per device and per
strategy, what the run holds at its highest points:

* forward and loss (the student's graph alive): student weights, AdamW state, the best weights
  kept for early stopping, the student's saved activations of one micro-batch, one chunk of
  logits and the LM head's gradient being accumulated chunk by chunk, the teacher's weights and its
  forward activations (no grad);
* optimiser step: student weights, gradients, AdamW state, the best weights, the teacher's weights;
* loading: the whole student and the teacher in every process (ddp); under fsdp with several processes
  only process 0 reads them, into its host memory (`host_load`), and every device receives its shards
  (secateurs.runtime.sharding: loaded once), so the device's loading peak is its share.

The peak is the largest of the three: gradients exist from the backward pass to the step
(`zero_grad(set_to_none=True)`), while the activations are freed during that same backward pass.

Strategies over P processes (the teacher forward only: replicated, or under fsdp sharded like the
student when `teacher_sharding` says so; 'auto' shards it where the replicated one does not fit):

* ddp: every process holds the whole student, its gradients and its AdamW state;
* fsdp: student weights, gradients and AdamW state divided over the P processes (one shard per
  decoder layer), plus what is gathered whole at a time: the root group (embeddings, final norm, LM
  head) and two decoder layers (the one computing and the next one being gathered; in backward a
  layer's weights and its unsharded gradient). A sharded teacher: 1/P of its weights, plus its root
  group (gathered through the loss's head chunks) and one decoder layer gathered at a time.

Sizes (bytes): weights and gradients in the parameters' dtype; AdamW's two moments in the dtype of
the parameter they belong to (torch.optim.AdamW allocates them with zeros_like); LoRA trains only
the adapters (r x (in + out) per adapted projection), which peft keeps in float32 over 16-bit base
weights. The activations per token and decoder layer come from ACTIVATION_BYTES (see there).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from secateurs.adapters import get_adapter
from secateurs.errors import SecateursError
from secateurs.planning.budget import plan_budget
from secateurs.planning.plan import CONFIG_KEY
from secateurs.recovery.settings import RecoverySettings
from secateurs.storage.hfcompat import load_config
from secateurs.storage.pruned import check_pruned_config, config_layout, meta_model
from secateurs.surgery.apply import replace_attention, resize_layer

STRATEGIES = ("ddp", "fsdp")
MEMORY_MARGIN = 0.9  # a plan fits when its peak is at most this share of the device's memory
FLOAT32 = 4
# Bytes saved for backward per token and decoder layer (Llama-like layers, scaled dot-product
# attention): per hidden unit, per query/key/value unit (heads x head_dim), per MLP neuron, and a
# constant; 4 more bytes per attention head (the attention's float32 log-sum-exp). Measured with
# torch.autograd.graph.saved_tensors_hooks on one forward of 2 and 4 layers (the difference is two
# layers) at several widths, transformers 5.23, torch 2.13: every width's coefficient is exact for
# the shapes measured. Keys: (activation bytes, what trains). 16-bit runs keep the norms' float32
# inputs; LoRA's dropout keeps a dropped copy of each adapted projection's input, and peft computes
# its adapters in float32.
ACTIVATION_BYTES = {
    (4, "full"): (24, 8, 16, 8), (2, "full"): (16, 4, 8, 8),
    (4, "lora"): (16, 8, 16, 232), (2, "lora"): (28, 6, 10, 232),
    (4, "lora-dropout"): (48, 12, 20, 232), (2, "lora-dropout"): (48, 8, 14, 232),
}
# Outside the decoder layers, per token and hidden unit: the embeddings' output and the final norm,
# measured as above (activation_bytes adds the rotary tables, two values per head_dim unit, and the
# final hidden states the loss reads with their gradient, two values per hidden unit).
OUTSIDE_PER_HIDDEN = {4: 8, 2: 6}
TEACHER_LIVE_HIDDEN, TEACHER_LIVE_NEURONS = 4, 3  # live at once inside one no-grad layer, per token
# On the CPU, glibc's heap keeps blocks freed between the saved activations (each layer's temporary
# tensors), so resident memory exceeds the live activations: by 13% to 46% of them over six Llama
# shapes (8 and 16 layers, 4,096 and 6,144 tokens, float32 and bfloat16, with
# secateurs.recovery.allocator's thresholds; with every block returned to the kernel the excess is gone).
CPU_HEAP_SLACK = 0.35


@dataclass(frozen=True)
class LayerWidths:
    """One decoder layer as the plan reads it."""

    params: int
    heads: int
    q_width: int  # query heads x head_dim
    kv_width: int  # key/value heads x head_dim
    intermediate: int
    adapted: int  # sum of in + out features over the projections LoRA adapts


@dataclass(frozen=True)
class ModelShapes:
    """What the plan reads of a model: counts and widths, no tensors."""

    params: int  # every parameter once (tied embeddings once)
    head_params: int  # the LM head's weight (the embeddings' when tied)
    hidden_size: int
    head_dim: int
    vocab_size: int
    dtype_bytes: int
    layers: tuple[LayerWidths, ...]

    @property
    def root_params(self) -> int:
        """Parameters outside the decoder layers: embeddings, final norm, LM head."""
        return self.params - sum(layer.params for layer in self.layers)

    @property
    def largest_layer(self) -> int:
        return max((layer.params for layer in self.layers), default=0)

    def lora_params(self, r: int) -> int:
        return r * sum(layer.adapted for layer in self.layers)

    def to_dict(self) -> dict:
        return {"params": self.params, "layers": len(self.layers), "hidden_size": self.hidden_size,
                "vocab_size": self.vocab_size, "dtype_bytes": self.dtype_bytes}


def shapes_of(model: nn.Module) -> ModelShapes:
    """The shapes of `model` (real or on the meta device)."""
    adapter = get_adapter(model)
    layers = []
    for layer in adapter.decoder_layers(model):
        shape, d = adapter.layer_shape(layer), adapter.head_dim(layer)
        adapted = sum(m.in_features + m.out_features for block in (adapter.attention(layer), adapter.mlp(layer))
                      for m in block.modules() if isinstance(m, nn.Linear))
        layers.append(LayerWidths(sum(p.numel() for p in layer.parameters()), shape.num_heads, shape.num_heads * d,
                                  shape.num_kv_heads * d, shape.intermediate_size, adapted))
    params = {id(p): p for p in model.parameters()}.values()
    head = model.get_output_embeddings().weight
    return ModelShapes(sum(p.numel() for p in params), head.numel(), model.config.get_text_config().hidden_size,
                       max((adapter.head_dim(layer) for layer in adapter.decoder_layers(model)), default=0),
                       head.shape[0], next(iter(params)).element_size(), tuple(layers))


@dataclass(frozen=True)
class DevicePlan:
    """Bytes one device holds, by what they are, under one strategy."""

    strategy: str
    method: str  # 'full' or 'lora'
    student_weights: int
    gradients: int
    optimizer: int  # AdamW's two moments
    best_weights: int  # the best validated trainable weights (early stopping)
    gathered: int  # fsdp: what is unsharded at a time (root group, two layers); ddp: 0
    activations: int  # the student's saved activations of one micro-batch of this process
    heap_slack: int  # CPU: freed temporaries the C heap keeps between the activations (CPU_HEAP_SLACK)
    logits: int  # one chunk of logits for student and teacher, and the LM head's gradient in flight
    teacher_weights: int
    teacher_activations: int
    whole_student: int = 0  # the student's weights as loaded, before fsdp shards them
    teacher_gathered: int = 0  # a sharded teacher: its root group and one layer gathered during its forward
    loaded_once: bool = False  # fsdp over several processes: process 0 alone reads the weights (host memory)
    whole_teacher: int = 0  # the teacher's weights as read

    @property
    def resident(self) -> int:
        """Held from the first step to the last."""
        return self.student_weights + self.optimizer + self.best_weights + self.teacher_weights

    @property
    def forward_peak(self) -> int:
        return (self.resident + self.gathered + self.activations + self.heap_slack + self.logits
                + self.teacher_activations + self.teacher_gathered)

    @property
    def step_peak(self) -> int:
        return self.resident + self.gradients

    @property
    def load_peak(self) -> int:
        """On the device while the models load: every process the whole student and teacher, or, loaded
        once, the shards it receives (and a replicated teacher whole)."""
        if self.loaded_once:
            return self.student_weights + self.teacher_weights
        return self.whole_student + self.teacher_weights

    @property
    def host_load(self) -> int:
        """Process 0's host memory while the models load once (fsdp over several processes): the whole
        student and teacher as read; 0 when every process loads onto its device."""
        return self.whole_student + self.whole_teacher if self.loaded_once else 0

    @property
    def peak(self) -> int:
        return max(self.forward_peak, self.step_peak, self.load_peak)

    @property
    def training_state(self) -> int:
        """What training adds to the weights: gradients, optimiser state, activations."""
        return self.gradients + self.optimizer + self.activations

    def to_dict(self) -> dict:
        keys = ("student_weights", "gradients", "optimizer", "best_weights", "gathered", "activations", "heap_slack",
                "logits", "teacher_weights", "teacher_gathered", "teacher_activations")
        return {"strategy": self.strategy, "method": self.method, **{k: getattr(self, k) for k in keys},
                "forward_peak": self.forward_peak, "step_peak": self.step_peak, "load_peak": self.load_peak,
                "host_load": self.host_load, "peak": self.peak}


@dataclass(frozen=True)
class MemoryPlan:
    """Per-device plans of one run for every strategy, full fine-tuning and LoRA."""

    processes: int
    method: str  # the run's
    tokens_per_process: int  # one micro-batch's tokens on each process
    student: ModelShapes
    teacher: ModelShapes | None
    lora_r: int
    devices: dict = field(default_factory=dict)  # (strategy, method) -> DevicePlan

    def device(self, strategy: str, method: str | None = None) -> DevicePlan:
        return self.devices[(strategy, method or self.method)]

    def trainable_params(self, method: str | None = None) -> int:
        """Parameters that train: every one (full), or the adapters' (LoRA at rank lora_r)."""
        return self.student.params if (method or self.method) == "full" else self.student.lora_params(self.lora_r)

    def to_dict(self) -> dict:
        return {"processes": self.processes, "method": self.method, "tokens_per_process": self.tokens_per_process,
                "student": self.student.to_dict(), "teacher": self.teacher.to_dict() if self.teacher else None,
                "devices": [d.to_dict() for d in self.devices.values()]}


def activation_bytes(shapes: ModelShapes, tokens: int, act: int, trains: str, checkpointing: bool) -> int:
    """Saved activations of `tokens` tokens (one micro-batch of one process), `act` bytes per value
    (float64 scales the float32 coefficients)."""
    measured = 2 if act <= 2 else FLOAT32
    scale = act / measured
    per_hidden, per_attention, per_neuron, constant = (scale * c for c in ACTIVATION_BYTES[(measured, trains)])

    def layer(w: LayerWidths) -> int:
        return (per_hidden * shapes.hidden_size + per_attention * (w.q_width + w.kv_width)
                + per_neuron * w.intermediate + constant + FLOAT32 * w.heads)

    outside = (scale * OUTSIDE_PER_HIDDEN[measured] * shapes.hidden_size + 2 * act * shapes.head_dim
               + 2 * act * shapes.hidden_size)
    if checkpointing:  # each layer keeps its input; one layer's activations exist again during its backward
        body = len(shapes.layers) * act * shapes.hidden_size + max(map(layer, shapes.layers), default=0)
    else:
        body = sum(map(layer, shapes.layers))
    return round(tokens * (body + outside))


def logits_bytes(shapes: ModelShapes, rows: int, logit: int, teacher: bool, temperature: float) -> int:
    """One chunk of the loss (secateurs.recovery.objectives): the logits of student and teacher,
    their float32 copies when 16-bit, the log-probabilities and the teacher's probabilities."""
    models = 2 if teacher else 1
    per_row = models * (logit + (FLOAT32 if logit < FLOAT32 else 0)) + (logit if logit < FLOAT32 else 0)
    per_row += FLOAT32 * (3 if teacher else 1) + (FLOAT32 if teacher and temperature != 1.0 else 0)
    return rows * shapes.vocab_size * per_row


def device_plan(student: ModelShapes, teacher: ModelShapes | None, settings: RecoverySettings, processes: int,
                strategy: str, method: str, device: str = "cpu", teacher_sharded: bool = False) -> DevicePlan:
    """What one of `processes` devices (of type `device`: cpu, cuda, ...) holds under `strategy`,
    training `method` (with the teacher sharded over the processes: `teacher_sharded`, fsdp only)."""
    w = student.dtype_bytes
    act = 2 if settings.bf16 or w < FLOAT32 else w
    tokens = tokens_per_process(settings, processes)
    lora = lora_of(settings)
    if method == "lora":  # peft keeps the adapters in float32
        trainable, t_bytes = student.lora_params(lora["r"]), FLOAT32
        trains = "lora-dropout" if lora["dropout"] else "lora"
    else:
        trainable, t_bytes, trains = student.params, w, "full"
    adapters = trainable * t_bytes if method == "lora" else 0
    shard = processes if strategy == "fsdp" else 1
    teacher_shard = processes if teacher_sharded and strategy == "fsdp" and processes > 1 else 1
    teacher_bytes = teacher.params * teacher.dtype_bytes if teacher else 0
    rows = min(settings.chunk_rows, tokens)
    head_grad = 0 if method == "lora" else student.head_params * w * (2 if tokens > settings.chunk_rows else 1)
    activations = activation_bytes(student, tokens, act, trains, settings.gradient_checkpointing)
    return DevicePlan(
        strategy=strategy, method=method,
        student_weights=ceil_div(student.params * w + adapters, shard),
        gradients=ceil_div(trainable * t_bytes, shard),
        optimizer=ceil_div(2 * trainable * t_bytes, shard),
        best_weights=ceil_div(trainable * t_bytes, shard) if settings.patience else 0,
        gathered=(student.root_params + 2 * student.largest_layer) * (2 if settings.bf16 else w)
        if strategy == "fsdp" and processes > 1 else 0,
        activations=activations, heap_slack=round(CPU_HEAP_SLACK * activations) if device == "cpu" else 0,
        logits=logits_bytes(student, rows, 2 if settings.bf16 else w, teacher is not None, settings.temperature)
        + head_grad,
        teacher_weights=ceil_div(teacher_bytes, teacher_shard),
        teacher_gathered=(teacher.root_params + teacher.largest_layer) * (2 if settings.bf16 else teacher.dtype_bytes)
        if teacher and teacher_shard > 1 else 0,
        whole_student=student.params * w + adapters, whole_teacher=teacher_bytes,
        loaded_once=strategy == "fsdp" and processes > 1,
        teacher_activations=tokens * act * (TEACHER_LIVE_HIDDEN * teacher.hidden_size + TEACHER_LIVE_NEURONS * max(
            (layer.intermediate for layer in teacher.layers), default=0)) if teacher else 0)


def plan_memory(student: ModelShapes, teacher: ModelShapes | None, settings: RecoverySettings,
                processes: int = 1, device: str = "cpu", device_bytes: int | None = None) -> MemoryPlan:
    """The run's per-device plan for every strategy, full fine-tuning and LoRA, on devices of type
    `device` (of `device_bytes` each, where known: what teacher_sharding 'auto' decides by).
    `teacher`: the teacher in the loss (None for objective 'ce')."""
    if processes < 1:
        raise SecateursError(f"the number of processes must be at least 1, got {processes}")
    devices = {}
    for m in ("full", "lora"):
        for s in STRATEGIES:
            devices[(s, m)] = device_plan(student, teacher, settings, processes, s, m, device)
        if teacher_sharded(devices[("fsdp", m)], settings.teacher_sharding, device_bytes):
            devices[("fsdp", m)] = device_plan(student, teacher, settings, processes, "fsdp", m, device, True)
    return MemoryPlan(processes, settings.training_method, tokens_per_process(settings, processes), student, teacher,
                      lora_of(settings)["r"], devices)


def teacher_sharded(replicated: DevicePlan, setting: str, device_bytes: int | None) -> bool:
    """Whether the teacher is sharded under `replicated`'s fsdp plan (the plan with the teacher whole):
    'sharded' yes, 'replicated' no; 'auto' where the replicated one does not fit MEMORY_MARGIN of
    `device_bytes` (not known: no). Only fsdp over several processes shards it."""
    if replicated.strategy != "fsdp" or not replicated.loaded_once or not replicated.teacher_weights:
        return False
    if setting != "auto":
        return setting == "sharded"
    return device_bytes is not None and replicated.peak > MEMORY_MARGIN * device_bytes


def lora_of(settings: RecoverySettings) -> dict:
    """The run's LoRA settings, or the defaults' for the LoRA column of a full fine-tuning run."""
    return settings.lora or settings.replace(method="lora").lora


def tokens_per_process(settings: RecoverySettings, processes: int) -> int:
    """Tokens of one micro-batch on each process (the batch is of all processes together)."""
    return ceil_div(settings.batch_size, processes) * settings.seq_len


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def candidates(plan: MemoryPlan, strategy: str = "auto") -> tuple[str, ...]:
    """The strategies a run may take, in order of preference: `strategy` when not 'auto', else ddp
    then fsdp (ddp alone in one process, which shards nothing)."""
    if strategy != "auto":
        return (strategy,)
    return STRATEGIES if plan.processes > 1 else ("ddp",)


def fits(plan: MemoryPlan, name: str, device_bytes: int | None) -> bool:
    return device_bytes is None or plan.device(name).peak <= MEMORY_MARGIN * device_bytes


def choose_strategy(plan: MemoryPlan, device_bytes: int | None, strategy: str = "auto") -> str:
    """The strategy the run takes: `strategy` when not 'auto', else ddp where it fits, else fsdp
    (with several processes); refused with the numbers when the one chosen cannot fit in
    MEMORY_MARGIN of `device_bytes` (None: not known, nothing is refused)."""
    names = candidates(plan, strategy)
    chosen = next((name for name in names if fits(plan, name, device_bytes)), None)
    if chosen is not None:
        return chosen
    tried = ", ".join(f"{name} {gib(plan.device(name).peak)}" for name in names)
    raise SecateursError(
        f"this recovery needs more memory per device than {MEMORY_MARGIN:.0%} of {gib(device_bytes)} "
        f"({plan.processes} process{'es' if plan.processes > 1 else ''}, {plan.method}: {tried}): lower "
        "--train-batch-size or --train-length, add --gradient-checkpointing, "
        + ("use --lora, " if plan.method == "full" else "") + "run more processes, or free memory")


def free_memory(device: torch.device) -> int | None:
    """Bytes free on `device` (None where it cannot be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def resident_bytes(models, device: torch.device) -> int:
    """Bytes the weights of `models` (None skipped; tied weights once) already hold on `device`."""
    params = {id(p): p for m in models if m is not None for p in m.parameters()}.values()
    return sum(p.numel() * p.element_size() for p in params if p.device.type == device.type)


def strategy_for(student: nn.Module, teacher: nn.Module | None, settings: RecoverySettings, processes: int) -> str:
    """The strategy of a run whose models are loaded and whose strategy setting is 'auto': ddp where
    it fits the student's device (its free memory plus what the models hold there), else fsdp. A run
    that fits under neither is refused by the estimate's check (choose_strategy), not here."""
    device = next(student.parameters()).device
    plan = plan_for_models(student, teacher, settings, processes, device.type)
    free = free_memory(device)
    device_bytes = None if free is None else free + resident_bytes((student, teacher), device)
    names = candidates(plan)
    return next((name for name in names if fits(plan, name, device_bytes)), names[-1])  # refused by the check


def teacher_sharding_for(student: nn.Module, teacher: nn.Module | None, settings: RecoverySettings, processes: int,
                         strategy: str) -> bool:
    """Whether a run of `strategy` over `processes` shards its teacher (teacher_sharding: 'auto' by the
    free memory of the student's device, as strategy_for; a device it cannot read: replicated)."""
    if strategy != "fsdp" or processes < 2 or teacher is None:
        return False
    device = next(student.parameters()).device
    plan = plan_for_models(student, teacher, settings, processes, device.type)
    return plan.device("fsdp").teacher_gathered > 0


def gib(n: int | None) -> str:
    return f"{n / 2**30:,.2f} GiB" if n is not None else "?"


# -- skeletons from configs --------------------------------------------------------------------------
def skeleton(source: str | os.PathLike, dtype: torch.dtype | None = None, assume_ratio: float | None = None):
    """The model a config.json describes, on the meta device: `source` is a config.json, a model
    folder or a pruned folder (its per-layer widths and HARP layers from the config); no weight is
    read. assume_ratio: the dense model cut uniformly by that share of all parameters, as AMP's budget
    does with the balanced split (the same fraction of head units, in whole KV groups, as of neurons;
    secateurs.planning.budget.plan_budget's defaults)."""
    path = Path(source).expanduser()
    folder = path.parent if path.is_file() and path.name == "config.json" else path
    if not (folder / "config.json").is_file():
        raise SecateursError(f"{source}: no config.json there; the memory plan reads a model folder or its "
                             "config.json")
    config = load_config(folder)
    check_pruned_config(folder, config)
    model = meta_model(config, dtype)
    adapter = get_adapter(model)
    layers = adapter.decoder_layers(model)
    info = getattr(config, CONFIG_KEY, None) or {}
    shapes, replaced = config_layout(config)
    if assume_ratio is not None:
        if info:
            raise SecateursError(f"{source} is already pruned; --assume-ratio cuts a dense model's config")
        shapes = [(k.num_heads, k.num_kv_heads, k.intermediate_size)
                  for k in plan_budget(model, assume_ratio).counts]
    if info.get("layer_shapes") or assume_ratio is not None:
        for layer, (heads, kv, neurons) in zip(layers, shapes):
            resize_layer(adapter, layer, heads, kv, neurons)
    for index, mode in replaced.items():
        replace_attention(adapter, layers[index], mode)
    model.tie_weights()  # tied embeddings are one parameter, as in the loaded model
    return model


def plan_for_models(student: nn.Module, teacher: nn.Module | None, settings: RecoverySettings,
                    processes: int = 1, device: str = "cpu") -> MemoryPlan:
    """plan_memory for models (real or meta); `teacher`: the teacher in the loss, or None. teacher_sharding
    'auto' decides by the student's device: its free memory plus what the models hold there."""
    device_bytes = None
    if teacher is not None and processes > 1 and settings.teacher_sharding == "auto":
        home = next(student.parameters()).device
        free = free_memory(home)
        device_bytes = None if free is None else free + resident_bytes((student, teacher), home)
    return plan_memory(shapes_of(student), shapes_of(teacher) if teacher is not None else None, settings, processes,
                       device, device_bytes)


def describe(plan: MemoryPlan, device_bytes: int | None, chosen: str | None) -> str:
    """The plan as a table per device (GiB), every strategy a column, and the choice."""
    rows = [("student weights", "student_weights"), ("gradients", "gradients"), ("AdamW moments", "optimizer"),
            ("best weights (early stopping)", "best_weights"), ("gathered (fsdp)", "gathered"),
            ("activations", "activations"), ("CPU heap slack", "heap_slack"),
            ("logits chunk + LM head grad", "logits"),
            ("teacher weights", "teacher_weights"), ("teacher gathered (sharded)", "teacher_gathered"),
            ("teacher activations", "teacher_activations"),
            ("peak: forward and loss", "forward_peak"), ("peak: optimiser step", "step_peak"),
            ("peak: loading", "load_peak"), ("peak", "peak"), ("host, process 0: loading", "host_load")]
    plans = [plan.device(s) for s in STRATEGIES]
    s = plan.student
    lines = [f"memory plan per device: {plan.processes} process{'es' if plan.processes > 1 else ''}, "
             f"{'LoRA' if plan.method == 'lora' else 'full fine-tuning'}, "
             f"{plan.tokens_per_process:,} tokens per micro-batch per process",
             f"student {s.params:,} parameters ({len(s.layers)} layers, {s.dtype_bytes} bytes each)"
             + (f", teacher {plan.teacher.params:,}" if plan.teacher else ", no teacher in the loss"),
             "", f"| {'GiB per device':<30} | " + " | ".join(f"{p.strategy:>8}" for p in plans) + " |",
             f"| {'-' * 30} | " + " | ".join("-" * 8 for _ in plans) + " |"]
    for label, key in rows:
        if key == "heap_slack" and not any(p.heap_slack for p in plans):
            continue
        lines.append(f"| {label:<30} | " + " | ".join(f"{getattr(p, key) / 2**30:8.2f}" for p in plans) + " |")
    lines.append("")
    memory = f"{gib(device_bytes)} per device" if device_bytes is not None else "device memory unknown"
    if plan.processes == 1:
        lines.append("one process: fsdp would shard over one device, ddp is the plan that applies")
    lines.append(f"chosen: {chosen} ({memory}, fits within {MEMORY_MARGIN:.0%})" if chosen
                 else f"chosen: none ({memory})")
    return "\n".join(lines)


def world_size() -> int:
    """The processes a launcher started (WORLD_SIZE), 1 without one."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1



def dry_run(student: str, teacher: str | None, settings: RecoverySettings, *, processes: int,
            device: str = "cpu", device_bytes: int | None = None, dtype: torch.dtype | None = None,
            assume_ratio: float | None = None) -> tuple[str, str | None]:
    """(the plan as text, the refusal or None) of a recovery of `student` from `teacher` (config.json
    files or model folders; no weights read) over `processes` devices of `device_bytes` each (None:
    the free memory of `device` here). assume_ratio: the student is the dense config cut that share."""
    has_teacher = teacher is not None
    settings.check(has_teacher)
    student_model = skeleton(student, dtype, assume_ratio)
    kd = settings.objective_for(has_teacher) != "ce" and settings.teacher_cache is None
    teacher_model = skeleton(teacher, dtype) if has_teacher and kd else None
    kind = torch.device(device).type
    if device_bytes is None:
        device_bytes = free_memory(torch.device(device))
    plan = plan_memory(shapes_of(student_model), shapes_of(teacher_model) if teacher_model is not None else None,
                       settings, processes, kind, device_bytes)
    try:
        chosen, refusal = choose_strategy(plan, device_bytes, settings.strategy), None
    except SecateursError as exc:
        chosen, refusal = None, str(exc)
    if settings.batch_size % processes:
        refusal = (f"--train-batch-size {settings.batch_size} is the batch of all {processes} processes together "
                   f"and must split evenly: give a multiple of {processes}")
    what = (f"student {student}" + (f" cut {assume_ratio:.0%} of all parameters (AMP's budget, balanced split)"
                                    if assume_ratio is not None else "")
            + (f", teacher {teacher}" if teacher_model is not None else ""))
    return f"{what}\n{describe(plan, device_bytes, chosen)}", refusal
