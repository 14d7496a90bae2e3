"""Token counts per text encoder, computed in the API with the `tokenizers` library (no torch).

SDXL's CLIP encoders see 77 tokens (BOS + 75 + EOS). Longer prompts are never truncated silently: the
request either asks for chunked encoding or gets a 422 with the counts.
"""

import json
import logging
import time
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

log = logging.getLogger("app.tokens")

CLIP_WINDOW = 77
# CLIP's own pre-tokenization pattern (from openai/clip-vit-large-patch14's tokenizer.json)
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def _from_vocab(folder: Path) -> Tokenizer:
    """Rebuild CLIP's fast tokenizer from vocab.json + merges.txt (hub repos that ship no tokenizer.json)."""
    vocab = json.loads((folder / "vocab.json").read_text())
    merges: list[tuple[str, str]] = [
        (line.split()[0], line.split()[1])
        for line in (folder / "merges.txt").read_text().splitlines()[1:]
        if line and not line.startswith("#")
    ]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<|endoftext|>", end_of_word_suffix="</w>",
                               continuing_subword_prefix=""))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.RobertaProcessing(
        ("<|endoftext|>", vocab["<|endoftext|>"]), ("<|startoftext|>", vocab["<|startoftext|>"]),
        trim_offsets=False, add_prefix_space=False,
    )
    return tok


def locate(model: str, sub: str, revision: str | None) -> Path | None:
    local = Path(model) / sub
    if local.is_dir():
        return local
    try:  # a hub id: use the local cache only (the API never downloads)
        from huggingface_hub import snapshot_download

        snap = snapshot_download(model, revision=revision, allow_patterns=[f"{sub}/*"], local_files_only=True)
        path = Path(snap) / sub
        return path if path.is_dir() else None
    except Exception:
        return None


def _load(folder: Path) -> Tokenizer:
    if (folder / "tokenizer.json").exists():
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    else:
        tok = _from_vocab(folder)
    tok.no_truncation()
    tok.no_padding()
    return tok


def _differing_tokens(tok1: Tokenizer, tok2: Tokenizer) -> frozenset[str] | None:
    """The added tokens whose presence in a text can make the two tokenizers' counts differ, or None when
    anything else differs (then every text is counted by both).

    SDXL's two CLIP tokenizers share normalizer, splitting, vocabulary and merges; tokenizer_2 only adds its
    pad token `!` as a special token, which splits a text differently only where the text holds a `!`."""
    a, b = json.loads(tok1.to_str()), json.loads(tok2.to_str())
    if any(a.get(k) != b.get(k) for k in ("normalizer", "pre_tokenizer", "model", "post_processor")):
        return None
    added_a = {t["content"]: t for t in a.get("added_tokens") or []}
    added_b = {t["content"]: t for t in b.get("added_tokens") or []}
    return frozenset(c for c in added_a.keys() | added_b.keys() if added_a.get(c) != added_b.get(c))


class TokenCounter:
    def __init__(self, tok1: Tokenizer, tok2: Tokenizer) -> None:
        self.tok1 = tok1
        self.tok2 = tok2
        self.differing = _differing_tokens(tok1, tok2)
        self._last: tuple[str, int] | None = None  # a submit counts its prompt for both encoders in turn

    def count(self, text: str, encoder: int) -> int:
        if encoder != 1 and (self.differing is None or any(c in text for c in self.differing)):
            return len(self.tok2.encode(text).ids)
        if self._last is not None and self._last[0] == text:
            return self._last[1]
        n = len(self.tok1.encode(text).ids)
        self._last = (text, n)
        return n


MISSING_RETRY_SECONDS = 30.0  # a lookup that found nothing is tried again after this (weights may arrive later)
_found: dict[tuple[str, str | None], TokenCounter] = {}
_missing: dict[tuple[str, str | None], float] = {}  # (model, revision) -> monotonic time of the next try


def counter_for(model: str, revision: str | None = None) -> TokenCounter | None:
    """None when the tokenizers are not on this machine (the worker then applies the same rule). A miss is
    not cached for good: the first download of the weights (a worker's, or the operator's) is picked up
    within MISSING_RETRY_SECONDS, with no API restart."""
    key = (model, revision)
    if key in _found:
        return _found[key]
    if time.monotonic() < _missing.get(key, 0.0):
        return None
    f1, f2 = locate(model, "tokenizer", revision), locate(model, "tokenizer_2", revision)
    if f1 is None or f2 is None:
        if key not in _missing:
            log.warning("tokenizers for %s not found locally: token counts are left to the worker; looking "
                        "again every %.0f s", model, MISSING_RETRY_SECONDS)
        _missing[key] = time.monotonic() + MISSING_RETRY_SECONDS
        return None
    _missing.pop(key, None)
    _found[key] = TokenCounter(_load(f1), _load(f2))
    return _found[key]
