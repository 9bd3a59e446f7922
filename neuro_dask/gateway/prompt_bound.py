"""How few tokens a text can become, from its length alone, so that a prompt far over
neuro.security.max-prompt-tokens is refused without being tokenized.

Pure: the tokenizer is read from its tokenizer.json (as a mapping), nothing is imported from
`tokenizers`. The bound must never exceed the true count (a prompt that fits is never refused),
so it exists only for pipelines where it is provable, and `prompt_bound` answers None for any
other (the gateway then tokenizes, off its event loop):

- the normalizer never shortens the text (none, Prepend, NFD, NFKD, Lowercase, ByteLevel, or a
  Replace of a string by one at least as long): NFC/NFKC compose, Strip and StripAccents delete;
- the pre-tokenizer never drops text (Split and Punctuation unless "Removed", ByteLevel,
  Metaspace, Digits): Whitespace, WhitespaceSplit and BertPreTokenizer drop whitespace;
- no added token has lstrip/rstrip (one such token swallows any run of spaces next to it);
- no truncation (the tokenizer would cut the count itself);
- the model gives each token at most `per_token` characters of the text:
  * BPE whose every character is known: a byte-level alphabet wholly in the vocabulary, or
    byte fallback with all 256 byte tokens, or an unk token that is not fused (a fused unk
    covers any run of unknown characters). A token covers at most its own length (a
    byte-level token's characters are bytes, and a character is at least one byte);
  * WordLevel behind Split(Regex("."), Isolated) (the bundled adder): every character "."
    matches is a word of its own, so one token each; a run of line breaks, which "." does not
    match, may be a single word, so line breaks are not counted;
  * WordPiece (a word over max_input_chars_per_word is one [UNK]) and Unigram (unknown runs
    fuse): no bound.

Added tokens are matched in the text before the model runs: each covers its content, so
`per_token` is at least the longest of them. Special tokens the post-processor adds (BOS) only
add to the count.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# What "." does not match in Oniguruma is "\n" alone; every line break is left uncounted anyway,
# since an uncounted character can only lower the bound.
LINE_BREAKS = "\n\r\x0b\x0c\x85\u2028\u2029"

_LENGTH_KEEPING_NORMALIZERS = frozenset({"Prepend", "NFD", "NFKD", "Lowercase", "ByteLevel"})
_KEEPING_PRE_TOKENIZERS = frozenset({"ByteLevel", "Metaspace", "Digits"})
_BEHAVIOUR_PRE_TOKENIZERS = frozenset({"Split", "Punctuation"})  # keep text unless behavior is "Removed"


@dataclass(frozen=True)
class PromptBound:
    """tokens(text) >= min_tokens(text): each token covers at most `per_token` of the text's
    characters, and characters in `uncounted` may cover none."""

    per_token: int
    uncounted: str = ""

    def min_tokens(self, text: str) -> int:
        counted = len(text) - sum(text.count(c) for c in self.uncounted)  # str.count: C speed, no copies
        return -(-counted // self.per_token)


def prompt_bound(spec: Mapping[str, Any]) -> PromptBound | None:
    """The bound of a tokenizer.json, or None where none is provable (see the module's doc)."""
    added = spec.get("added_tokens") or []
    if spec.get("truncation") or any(t.get("lstrip") or t.get("rstrip") for t in added):
        return None
    if not _keeps_length(spec.get("normalizer")) or not _keeps_text(spec.get("pre_tokenizer")):
        return None
    longest_added = max((len(t.get("content", "")) for t in added), default=1)
    model = spec.get("model") or {}
    if model.get("type") == "BPE":
        vocab = model.get("vocab") or {}
        if not vocab or not _bpe_knows_every_character(model, vocab, _uses_byte_level(spec)):
            return None
        return PromptBound(max(longest_added, max(len(token) for token in vocab)))
    if model.get("type") == "WordLevel" and _splits_every_character(spec.get("pre_tokenizer")):
        return PromptBound(max(1, longest_added), LINE_BREAKS)
    return None


def _keeps_length(normalizer: Mapping[str, Any] | None) -> bool:
    if normalizer is None:
        return True
    kind = normalizer.get("type")
    if kind == "Sequence":
        return all(_keeps_length(n) for n in normalizer.get("normalizers") or [])
    if kind == "Replace":
        pattern = normalizer.get("pattern") or {}
        old = pattern.get("String")
        return isinstance(old, str) and len(normalizer.get("content") or "") >= len(old)
    return kind in _LENGTH_KEEPING_NORMALIZERS


def _keeps_text(pre: Mapping[str, Any] | None) -> bool:
    if pre is None:
        return True
    kind = pre.get("type")
    if kind == "Sequence":
        return all(_keeps_text(p) for p in pre.get("pretokenizers") or [])
    if kind in _BEHAVIOUR_PRE_TOKENIZERS:
        return pre.get("behavior") != "Removed"
    return kind in _KEEPING_PRE_TOKENIZERS


def _steps(pre: Mapping[str, Any] | None) -> list[Mapping[str, Any]]:
    if pre is None:
        return []
    if pre.get("type") == "Sequence":
        return [step for p in pre.get("pretokenizers") or [] for step in _steps(p)]
    return [pre]


def _uses_byte_level(spec: Mapping[str, Any]) -> bool:
    normalizers = spec.get("normalizer") or {}
    chain = normalizers.get("normalizers") or [normalizers]
    return any(s.get("type") == "ByteLevel" for s in _steps(spec.get("pre_tokenizer"))) or any(
        isinstance(n, Mapping) and n.get("type") == "ByteLevel" for n in chain
    )


def _bpe_knows_every_character(model: Mapping[str, Any], vocab: Mapping[str, int], byte_level: bool) -> bool:
    if byte_level and byte_alphabet() <= vocab.keys():
        return True
    if model.get("byte_fallback") and all(f"<0x{b:02X}>" in vocab for b in range(256)):
        return True
    return model.get("unk_token") in vocab and not model.get("fuse_unk")


def _splits_every_character(pre: Mapping[str, Any] | None) -> bool:
    """Split(Regex("."), Isolated): each character "." matches is a word of its own."""
    return (
        pre is not None
        and pre.get("type") == "Split"
        and (pre.get("pattern") or {}).get("Regex") == "."
        and pre.get("behavior") == "Isolated"
        and not pre.get("invert")
    )


def byte_alphabet() -> frozenset[str]:
    """The 256 characters GPT-2's byte-level BPE writes bytes as (bytes_to_unicode)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [256 + i for i, _ in enumerate(b for b in range(256) if b not in printable)]
    return frozenset(map(chr, printable + shifted))
