"""The tokenizer as GGUF metadata, so an exported file is self-contained (llama.cpp tokenizes,
detokenizes and applies the chat template from the file alone).

The Hugging Face tokenizer is saved to a scratch folder and read back with the gguf package's own
helpers, as llama.cpp's converter does: SentencePiece-style BPE with byte fallback (Llama 1/2,
Mistral, TinyLlama, stories260K) through `gguf.LlamaHfVocab` (tokenizer model "llama"), byte-level
BPE (GPT-2 style: SmolLM, Llama 3, Qwen) as tokenizer model "gpt2" with its merges and the
pre-tokenizer name llama.cpp knows it by (`pre_tokenizers.py`). Special tokens, add-BOS/EOS flags
and the chat template come from `gguf.SpecialVocab`. Anything else is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from hashlib import sha256
from pathlib import Path

import gguf
from transformers import PreTrainedTokenizerFast

from secateurs.errors import SecateursError
from secateurs.export.pre_tokenizers import CHECK_TEXT, PRE_TOKENIZERS

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


# llama.cpp's vocab loader (llama-vocab.cpp, "set attributes by model/tokenizer/architecture name")
# looks these tokens up, unguarded, when general.name contains "phi-3" or "phi3": loading fails
# without them.
_PHI3_NAMES = re.compile("phi-?3", re.IGNORECASE)
_PHI3_NAME_TOKENS = {"</s>", "<unk>", "<s>", "<|endoftext|>"}


def add_tokenizer(writer: gguf.GGUFWriter, source, vocab_size: int, name: str = "model") -> str:
    """Write the tokenizer and the model's `name` into `writer`, padded to the model's `vocab_size`;
    returns the tokenizer model name written ("llama" or "gpt2"). `source`: a folder holding
    tokenizer.json (its files are read as saved: transformers may rebuild a tokenizer by the folder's
    model_type on load) or a loaded fast tokenizer."""
    with tempfile.TemporaryDirectory(prefix="secateurs-gguf-vocab-") as scratch:
        folder = Path(scratch)
        if isinstance(source, (str, os.PathLike)):
            for name in TOKENIZER_FILES:  # fixed names only: nothing outside the model folder is read
                path = Path(source) / name
                if path.is_file() and not path.is_symlink():
                    shutil.copyfile(path, folder / name)
        elif source is not None:
            if not getattr(source, "is_fast", False):
                raise SecateursError("GGUF export reads the fast tokenizer (tokenizer.json); this model only has a "
                                     "slow one")
            source.save_pretrained(folder)
        if not (folder / "tokenizer.json").is_file():
            raise SecateursError("the model has no tokenizer (no tokenizer.json beside it): a GGUF file carries its "
                                 "tokenizer, so save the model with one (save_pruned(..., tokenizer=...))")
        try:
            spec = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]
            tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise SecateursError(f"tokenizer.json cannot be read ({exc}); re-save the model with its "
                                 "tokenizer") from exc
        quiet = logging.getLogger("gguf").level
        logging.getLogger("gguf").setLevel(logging.WARNING)
        try:
            if spec.get("type") == "BPE" and spec.get("byte_fallback"):
                kind, (tokens, scores, types) = "llama", _sentencepiece_tokens(folder, spec)
                writer.add_tokenizer_pre("default")
            elif spec.get("type") == "BPE":
                kind, scores = "gpt2", None
                tokens, types = _byte_level_tokens(tokenizer)
                writer.add_tokenizer_pre(_pre_tokenizer(tokenizer))
            else:
                raise SecateursError(f"tokenizer model {spec.get('type')!r} is not exported to GGUF (BPE with byte "
                                     "fallback and byte-level BPE are)")
            if len(tokens) > vocab_size:
                raise SecateursError(f"the tokenizer has {len(tokens)} tokens but the model only {vocab_size} "
                                     "embeddings; they do not belong together")
            for i in range(len(tokens), vocab_size):  # embeddings padded past the tokenizer (e.g. to a multiple of 64)
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
                if scores is not None:
                    scores.append(-1000.0)
            texts = {t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in tokens}
            writer.add_name(name if _PHI3_NAME_TOKENS <= texts else _PHI3_NAMES.sub("phi 3", name))
            writer.add_tokenizer_model(kind)
            writer.add_token_list(tokens)
            if scores is not None:
                writer.add_token_scores(scores)
            writer.add_token_types(types)
            special = gguf.SpecialVocab(folder, load_merges=kind == "gpt2", n_vocab=vocab_size)
            special.add_to_gguf(writer, quiet=True)
        finally:
            logging.getLogger("gguf").setLevel(quiet)
    return kind


def _sentencepiece_tokens(folder: Path, spec: dict) -> tuple[list, list[float], list]:
    """Tokens and types from gguf.LlamaHfVocab; scores from the BPE merges (gguf's helper writes a
    placeholder -1000 for every token, and llama.cpp's SentencePiece tokenizer merges by score, so
    it would split words differently from the Hugging Face tokenizer). A token made by the merge of
    rank r scores -r: the earlier the merge, the higher the score, as in the SentencePiece model the
    merges were made from."""
    rank: dict[str, int] = {}
    for r, merge in enumerate(spec.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    vocab = gguf.LlamaHfVocab(folder)
    tokens, scores, types = [], [], []
    for text, _, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(-float(rank[text.decode("utf-8")]) if text.decode("utf-8") in rank else 0.0)
        types.append(kind)
    return tokens, scores, types


def _byte_level_tokens(tokenizer) -> tuple[list[str], list]:
    """Token strings in id order with their types, as llama.cpp's converter (get_vocab_base) makes them."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer, found as its converter finds it."""
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise SecateursError(f"llama.cpp does not know this byte-level BPE tokenizer's pre-tokenizer (hash "
                             f"{digest[:16]}...); without it llama.cpp would split text differently from the model's "
                             "own tokenizer, so no GGUF file is written")
    return PRE_TOKENIZERS[digest]
