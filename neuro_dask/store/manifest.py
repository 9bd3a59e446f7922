"""manifest.json of a sharded model: the config, and every artifact with its role, size and sha256."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neuro_dask.errors import ManifestError, MissingConfigError
from neuro_dask.model.config import MoEConfig
from neuro_dask.model.hf_config import TransformersMoEConfig

FORMAT = "neuro-dask-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"

ROLE_TRUNK = "trunk"
ROLE_EXPERT = "expert"
ROLE_TOKENIZER = "tokenizer"
# Multi-token-prediction layers a checkpoint ships after its decoder layers (DeepSeek-V3's
# num_nextn_predict_layers): the client's draft, never placed on workers (store/mtp_sharder.py).
ROLE_MTP = "mtp"
ROLE_MTP_EXPERT = "mtp-expert"

LAYOUT_NEURO = "neuro"  # the hand-written trunk's canonical names; experts as gate/up/down (model/keymap.py)
LAYOUT_TRANSFORMERS = "transformers"  # transformers' own names and experts layout (store/hf_sharder.py)
LAYOUTS = (LAYOUT_NEURO, LAYOUT_TRANSFORMERS)


def expert_path(layer: int, expert: int) -> str:
    return f"experts/layer-{layer:03d}/expert-{expert:03d}.safetensors"


@dataclass(frozen=True)
class Artifact:
    path: str  # relative to the store root, '/'-separated
    role: str
    sha256: str
    bytes: int
    dtype: str | None = None
    layer: int | None = None
    expert: int | None = None
    parameters: int = 0

    def __post_init__(self) -> None:
        """A manifest may come from an untrusted mirror: every field is checked before use."""
        parts = self.path.split("/") if isinstance(self.path, str) else []
        if not parts or self.path.startswith("/") or any(p in ("", ".", "..") or "\\" in p for p in parts):
            raise ValueError(f"artifact path {self.path!r} must be a relative path inside the store")
        if (
            not isinstance(self.role, str)
            or not isinstance(self.sha256, str)
            or len(self.sha256) != 64
            or any(c not in "0123456789abcdef" for c in self.sha256)
        ):
            raise ValueError(f"artifact {self.path!r} needs a string role and a sha256 of 64 hex digits")
        for name in ("bytes", "parameters", "layer", "expert"):
            value = getattr(self, name)
            if value is None and name in ("layer", "expert"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"artifact {self.path!r}: {name} must be an integer >= 0, got {value!r}")
        if self.dtype is not None and not isinstance(self.dtype, str):
            raise ValueError(f"artifact {self.path!r}: dtype must be a string")


@dataclass(frozen=True)
class Manifest:
    architecture: str
    config: dict[str, Any]  # the checkpoint's own config.json, verbatim
    artifacts: tuple[Artifact, ...]
    generation_config: dict[str, Any] | None = None
    tokenizer_files: tuple[str, ...] = ()
    source: str = ""
    format: str = FORMAT
    format_version: int = FORMAT_VERSION
    layout: str = LAYOUT_NEURO
    experts_spec: dict[str, Any] | None = None  # transformers layout: how workers run the experts
    _by_key: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ManifestError(
                MANIFEST_NAME, f"has layout {self.layout!r}; this neuro_dask reads {', '.join(LAYOUTS)}"
            )
        if self.layout == LAYOUT_TRANSFORMERS and not isinstance(self.experts_spec, dict):
            raise ManifestError(
                MANIFEST_NAME, "has the transformers layout but no experts_spec; re-run `neuro-dask shard`"
            )
        for a in self.artifacts:
            self._by_key[(a.role, a.layer, a.expert, a.path if a.role == ROLE_TOKENIZER else None)] = a

    @property
    def model_config(self) -> MoEConfig | TransformersMoEConfig:
        if self.layout == LAYOUT_TRANSFORMERS:
            return TransformersMoEConfig.from_manifest(
                self.architecture, self.config, self.experts_spec or {}, self.experts
            )
        return MoEConfig.from_hf(self.config, f"{MANIFEST_NAME}:config")

    @property
    def model_id(self) -> str:
        """The id a scheduler publishes this model under: same content, same id. It hashes the
        whole manifest that decides the model's answers (the config and every artifact: trunk,
        each expert, tokenizer files), so two stores that differ in any expert are two models:
        a store sharing the genuine trunk with other experts cannot be published in its place."""
        return f"{self.architecture}-{self.content_hash()[:12]}"

    def content_hash(self) -> str:
        """sha256 over a canonical encoding of the config and every artifact's path, role,
        position, dtype, size and sha256 (order-independent: artifacts are sorted)."""
        import hashlib

        artifacts = sorted([a.role, a.path, a.layer, a.expert, a.dtype, a.bytes, a.sha256] for a in self.artifacts)
        head = ["neuro-model-v1", self.architecture, self.config, artifacts]
        if self.layout != LAYOUT_NEURO:  # how the experts run decides the answers too
            head += [self.layout, self.experts_spec]
        canonical = json.dumps(head, sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    @property
    def trunk(self) -> Artifact:
        return self._get(ROLE_TRUNK, None, None)

    def expert(self, layer: int, expert: int) -> Artifact:
        return self._get(ROLE_EXPERT, layer, expert)

    @property
    def experts(self) -> tuple[Artifact, ...]:
        return tuple(a for a in self.artifacts if a.role == ROLE_EXPERT)

    @property
    def mtp(self) -> Artifact | None:
        """The multi-token-prediction layers' tensors but their routed experts, if the store has them."""
        return self._by_key.get((ROLE_MTP, None, None, None))

    def mtp_expert(self, layer: int, expert: int) -> Artifact:
        return self._get(ROLE_MTP_EXPERT, layer, expert)

    @property
    def mtp_experts(self) -> tuple[Artifact, ...]:
        return tuple(a for a in self.artifacts if a.role == ROLE_MTP_EXPERT)

    def tokenizer(self, name: str = "tokenizer.json") -> Artifact | None:
        return self._by_key.get((ROLE_TOKENIZER, None, None, name))

    def _get(self, role: str, layer: int | None, expert: int | None) -> Artifact:
        try:
            return self._by_key[(role, layer, expert, None)]
        except KeyError:
            what = role if layer is None else f"{role} layer {layer} expert {expert}"
            raise ManifestError(MANIFEST_NAME, f"lists no {what}; re-run `neuro-dask shard`") from None

    def to_json(self) -> str:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["artifacts"] = [asdict(a) for a in self.artifacts]
        d["tokenizer_files"] = list(self.tokenizer_files)
        return json.dumps(d, indent=1, sort_keys=True)

    def write(self, root: Path) -> Path:
        path = Path(root) / MANIFEST_NAME
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(self.to_json())
        tmp.replace(path)  # the manifest appears last, so a half-written store has none
        return path

    @classmethod
    def read(cls, root: str | Path) -> Manifest:
        path = Path(root) / MANIFEST_NAME
        if not path.is_file():
            if (Path(root) / "config.json").is_file():
                raise ManifestError(
                    str(path),
                    f"is missing: {root} is a Hugging Face checkpoint, not a sharded one. "
                    f"Run `neuro-dask shard {root} DST` and load DST.",
                )
            raise MissingConfigError(str(root))
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ManifestError(str(path), f"is not valid JSON ({exc}); re-run `neuro-dask shard`") from exc
        except RecursionError:  # a hostile store's "[[[[..." nests deeper than any manifest
            raise ManifestError(str(path), "nests too deeply to be a manifest; re-run `neuro-dask shard`") from None
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(raw, dict):
            raise ManifestError(where, f"must be a JSON object, not {type(raw).__name__}")
        if raw.get("format") != FORMAT:
            raise ManifestError(where, f"is not a neuro_dask manifest (format {raw.get('format')!r})")
        if raw.get("format_version") != FORMAT_VERSION:
            raise ManifestError(
                where,
                f"has format_version {raw.get('format_version')}, this neuro_dask reads "
                f"{FORMAT_VERSION}; re-shard with this version",
            )
        try:
            if not isinstance(raw["architecture"], str) or not isinstance(raw["config"], dict):
                raise TypeError("architecture must be a string and config an object")
            artifacts = tuple(Artifact(**a) for a in raw["artifacts"])
            return cls(
                architecture=raw["architecture"],
                config=raw["config"],
                artifacts=artifacts,
                generation_config=raw.get("generation_config"),
                tokenizer_files=tuple(raw.get("tokenizer_files", ())),
                source=raw.get("source", ""),
                layout=raw.get("layout", LAYOUT_NEURO),
                experts_spec=raw.get("experts_spec"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ManifestError(where, f"is malformed ({exc}); re-run `neuro-dask shard`") from exc
