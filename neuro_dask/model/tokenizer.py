"""A checkpoint's tokenizer.json through the `tokenizers` library (no transformers at run time)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from neuro_dask.errors import TruncatedFileError


class Tokenizer:
    def __init__(self, inner: _HFTokenizer, *, add_special_tokens: bool = True):
        self._inner = inner
        self.add_special_tokens = add_special_tokens

    @classmethod
    def from_file(cls, path: str | Path) -> Tokenizer:
        try:
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as exc:  # tokenizers raises a bare Exception on malformed JSON
            raise TruncatedFileError(str(path), f"not a valid tokenizer.json: {exc}") from exc

    def pipeline(self) -> dict:
        """The tokenizer.json this tokenizer runs (normalizer, pre-tokenizer, model, added tokens),
        as plain data: what a caller may reason about without tokenizing (the gateway's bound)."""
        return json.loads(self._inner.to_str())

    @property
    def vocab_size(self) -> int:
        return self._inner.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        return self._inner.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._inner.encode(text, add_special_tokens=self.add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._inner.encode_batch(list(texts), add_special_tokens=self.add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._inner.decode(list(ids), skip_special_tokens=skip_special_tokens)
