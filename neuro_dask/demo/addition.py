"""The demo model's task: multi-digit addition, whose answers anyone can check.

A prompt is "123+456=" and the answer "579". Operands have 1 to 3 digits. A fixed, seeded rule
holds out about 2% of all operand pairs: the trainer never sees them, and the accuracy test asks
only those.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

MAX_DIGITS = 3
MAX_OPERAND = 10**MAX_DIGITS - 1
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SYMBOLS = [PAD, BOS, EOS, *"0123456789", "+", "="]
ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "adder"


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> str:
        return str(self.a + self.b)


def is_held_out(a: int, b: int) -> bool:
    """About 2% of pairs, chosen by a hash so that the held-out set has no arithmetic structure
    (a linear rule such as (7919a + 104729b) % 50 == 0 would hold out only sums ending in 0)."""
    digest = hashlib.blake2b(f"{a}+{b}".encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little") % 50 == 0


def _operand(rng: random.Random) -> int:
    digits = rng.randint(1, MAX_DIGITS)  # uniform over lengths, so short numbers are not rare
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def sample_problems(n: int, rng: random.Random, held_out: bool) -> list[Problem]:
    """n problems from the held-out set (held_out=True) or from the training set."""
    out: list[Problem] = []
    while len(out) < n:
        a, b = _operand(rng), _operand(rng)
        if is_held_out(a, b) == held_out:
            out.append(Problem(a, b))
    return out


def build_tokenizer():
    """A character-level tokenizer.json: BOS prepended, digits and signs one token each."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = {s: i for i, s in enumerate(SYMBOLS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, vocab[BOS])])
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([PAD, BOS, EOS])
    return tok


# The chat template (tokenizer_config.json, as transformers reads it): the model answers the last
# user message, which must be a problem such as "123+456=". The gateway's chat endpoint uses it.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages if message['role'] == 'user' %}"
    "{% if loop.last %}{{ message['content'] | trim }}{% endif %}{% endfor %}"
)


def tokenizer_config() -> dict:
    return {
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": PAD,
        "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def exact_match(predictions: Iterable[str], problems: Iterable[Problem]) -> float:
    pairs = list(zip(predictions, problems, strict=True))
    return sum(p.strip() == q.answer for p, q in pairs) / max(len(pairs), 1)


def evaluate(model, problems: list[Problem], batch_size: int = 256, **options) -> tuple[float, list[str]]:
    """Greedy answers through model.generate_text (with `options`, e.g. speculative=); returns
    (exact-match accuracy, answers)."""
    answers: list[str] = []
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        answers += model.generate_text([p.prompt for p in chunk], max_new_tokens=MAX_DIGITS + 2, **options)
    return exact_match(answers, problems), answers
