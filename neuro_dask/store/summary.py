"""What `neuro-dask inspect` reports: architecture, parameters (total and active), experts, bytes."""

from __future__ import annotations

from typing import Any

from neuro_dask.store.manifest import ROLE_TOKENIZER, Manifest


def summarize(manifest: Manifest) -> dict[str, Any]:
    cfg = manifest.model_config
    trunk = manifest.trunk
    experts = manifest.experts
    per_expert = experts[0].parameters if experts else 0
    expert_params = sum(a.parameters for a in experts)
    spec = manifest.experts_spec or {}
    return {
        "architecture": manifest.architecture,
        "layout": manifest.layout,
        "expert_format": spec.get("format", "float"),
        "layers": cfg.num_hidden_layers,
        "moe_layers": len(cfg.moe_layers),
        "experts_per_layer": cfg.num_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "expert_files": len(experts),
        "shared_expert": bool(getattr(cfg, "shared_expert_intermediate_size", 0) or spec.get("shared_experts")),
        "hidden_size": cfg.hidden_size,
        "vocab_size": cfg.vocab_size,
        "dtype": trunk.dtype,
        "parameters_total": trunk.parameters + expert_params,
        "parameters_trunk": trunk.parameters,
        "parameters_per_expert": per_expert,
        # Each token runs the whole trunk and top-k experts in every MoE layer.
        "parameters_active_per_token": trunk.parameters + cfg.num_experts_per_tok * per_expert * len(cfg.moe_layers),
        "bytes_total": sum(a.bytes for a in manifest.artifacts),
        "bytes_trunk": trunk.bytes,
        "bytes_experts": sum(a.bytes for a in experts),
        "tokenizer": any(a.role == ROLE_TOKENIZER for a in manifest.artifacts),
    }


def format_summary(summary: dict[str, Any]) -> str:
    def n(x: int) -> str:
        for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if x >= size:
                return f"{x / size:.2f}{unit}"
        return str(x)

    def b(x: int) -> str:
        for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if x >= size:
                return f"{x / size:.2f} {unit}"
        return f"{x} B"

    s = summary
    lines = [
        f"architecture       {s['architecture']} ({s['dtype']}; {s.get('layout', 'neuro')} layout, "
        f"{s.get('expert_format', 'float')} experts)",
        f"layers             {s['layers']} ({s['moe_layers']} MoE), hidden {s['hidden_size']}, vocab {s['vocab_size']}",
        f"experts            {s['experts_per_layer']} per layer, top-{s['experts_per_token']}, "
        f"{s['expert_files']} files{', plus a shared expert' if s['shared_expert'] else ''}",
        f"parameters         {n(s['parameters_total'])} total, {n(s['parameters_active_per_token'])} active per token",
        f"                   trunk {n(s['parameters_trunk'])}, {n(s['parameters_per_expert'])} per expert",
        f"bytes              {b(s['bytes_total'])} total: trunk {b(s['bytes_trunk'])}, experts {b(s['bytes_experts'])}",
        f"tokenizer          {'tokenizer.json' if s['tokenizer'] else 'none'}",
    ]
    return "\n".join(lines)
