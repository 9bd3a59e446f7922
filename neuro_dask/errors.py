"""One root error, specific subclasses with fields and a message that says how to fix it."""

from __future__ import annotations

from collections.abc import Iterable


class NeuroDaskError(Exception):
    """Root of every error neuro_dask raises on purpose."""

    def __reduce__(self):
        # Subclasses take their fields, not the message, in __init__: rebuild without calling it,
        # so that an error pickled by Dask (or a test's subprocess) comes back whole.
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> Exception:
    err = cls.__new__(cls)
    Exception.__init__(err, *args)
    err.__dict__.update(state)
    return err


class ConfigError(NeuroDaskError, ValueError):
    """A configuration (config.json, configs/*.yaml, a keyword) is missing, malformed or unsupported."""


class MissingConfigError(ConfigError, FileNotFoundError):
    def __init__(self, path: str):
        self.path = str(path)
        super().__init__(
            f"{self.path}: no config.json found. Point at a Hugging Face checkpoint folder "
            "(the one `save_pretrained` writes) or at a folder sharded by `neuro-dask shard`."
        )


class UnsupportedModelError(ConfigError):
    def __init__(self, model_type: object, supported: Iterable[str], path: str = "config.json", reason: str = ""):
        self.model_type = model_type
        self.supported = tuple(sorted(supported))
        self.path = str(path)
        self.reason = reason
        super().__init__(
            f"{self.path}: model_type {model_type!r} is not supported{': ' + reason if reason else ''}; "
            f"neuro_dask runs {', '.join(self.supported)}."
        )


class ConfigFieldError(ConfigError):
    def __init__(self, path: str, field: str, problem: str):
        self.path = str(path)
        self.field = field
        self.problem = problem
        super().__init__(f"{self.path}: field {field!r} {problem}")


class CheckpointError(NeuroDaskError):
    """A checkpoint or a sharded store is incomplete or damaged."""


class MissingTensorError(CheckpointError, KeyError):
    def __init__(self, name: str, where: str):
        self.name = name
        self.where = str(where)
        super().__init__(
            f"{self.where}: tensor {name!r} is missing. The checkpoint is incomplete or is not the "
            "architecture its config.json names; re-export it with `save_pretrained`."
        )

    def __str__(self) -> str:  # KeyError would repr() the message
        return self.args[0]


class TensorShapeError(CheckpointError):
    def __init__(self, name: str, where: str, expected: tuple[int, ...], actual: tuple[int, ...]):
        self.name = name
        self.where = str(where)
        self.expected = tuple(expected)
        self.actual = tuple(actual)
        super().__init__(
            f"{self.where}: tensor {name!r} has shape {list(self.actual)}, config.json implies "
            f"{list(self.expected)}. The weights do not belong to this config."
        )


class IntegrityError(CheckpointError):
    def __init__(self, path: str, expected: str, actual: str):
        self.path = str(path)
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"{self.path}: sha256 {actual[:16]}… does not match the manifest's {expected[:16]}…. "
            "The file is corrupt or was tampered with; delete it and fetch or re-shard it."
        )


class TruncatedFileError(CheckpointError):
    def __init__(self, path: str, detail: str):
        self.path = str(path)
        self.detail = detail
        super().__init__(
            f"{self.path}: cannot be read as safetensors ({detail}). The file is truncated or "
            "not a safetensors file; copy or download it again."
        )


class ManifestError(CheckpointError):
    def __init__(self, path: str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class InputError(NeuroDaskError, ValueError):
    """Bad input to forward/generate: empty prompt, ids out of range, too long, bad options."""


class EmptyPromptError(InputError):
    def __init__(self, index: int):
        self.index = index
        super().__init__(f"prompt {index} is empty: give at least one token (for example the tokenizer's BOS token).")


class TokenOutOfRangeError(InputError):
    def __init__(self, token_id: int, vocab_size: int, index: int):
        self.token_id = token_id
        self.vocab_size = vocab_size
        self.index = index
        super().__init__(
            f"prompt {index} holds token id {token_id}, outside the vocabulary [0, {vocab_size}). "
            "Encode text with this model's own tokenizer."
        )


class PromptTooLongError(InputError):
    def __init__(self, length: int, limit: int, index: int, field: str = "max_position_embeddings"):
        self.length = length
        self.limit = limit
        self.index = index
        super().__init__(
            f"prompt {index} needs {length} positions but the model's {field} is {limit}: "
            "shorten the prompt or lower max_new_tokens."
        )


class GenerationOptionError(InputError):
    def __init__(self, field: str, value: object, expected: str):
        self.field = field
        self.value = value
        super().__init__(f"{field}={value!r}: {expected}")


class TokenizerMissingError(NeuroDaskError):
    def __init__(self, path: str):
        self.path = str(path)
        super().__init__(
            f"{self.path}: this model ships no tokenizer.json, so text in or out is impossible; "
            "pass token ids to generate(), or shard a checkpoint that includes tokenizer.json."
        )


class CertificateError(NeuroDaskError, ValueError):
    """A certificate, key or certificate folder of mutual TLS (`neuro-dask certs`) is missing or unusable."""


class LimitExceededError(InputError):
    """A request asks for more than neuro.security allows one peer (docs/security.md)."""

    def __init__(self, field: str, limit: int, got: int, subject: str | None = None, fix: str | None = None):
        self.field = field  # the setting: neuro.security.<field>
        self.limit = limit
        self.got = got
        what = subject or field.replace("-", " ")
        # The limit in its own terms: what was asked, what is allowed, where the setting lives
        # (never a suggested value: the request's own size may be absurd).
        fix = f": {fix}" if fix else ""
        super().__init__(
            f"{what} is {got}, above the limit of {limit} (neuro.security.{field}){fix}. The operator sets "
            f"that limit in Dask config or DASK_NEURO__SECURITY__{field.replace('-', '_').upper()}"
        )
