from __future__ import annotations

import json

import pytest

from neuro_dask.errors import ConfigFieldError, MissingConfigError, NeuroDaskError, UnsupportedModelError
from neuro_dask.model.config import QK_NORM_FULL, QK_NORM_NONE, QK_NORM_PER_HEAD, SUPPORTED_MODEL_TYPES, MoEConfig

BASE = dict(
    vocab_size=32,
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
)
RAW = {
    "mixtral": dict(BASE, model_type="mixtral", num_local_experts=4, intermediate_size=24),
    "qwen2_moe": dict(
        BASE,
        model_type="qwen2_moe",
        num_experts=4,
        moe_intermediate_size=8,
        intermediate_size=24,
        shared_expert_intermediate_size=12,
        mlp_only_layers=[0],
    ),
    "qwen3_moe": dict(
        BASE, model_type="qwen3_moe", num_experts=4, moe_intermediate_size=8, head_dim=8, norm_topk_prob=True
    ),
    "olmoe": dict(BASE, model_type="olmoe", num_experts=4, intermediate_size=8, clip_qkv=2.0),
}


@pytest.mark.parametrize(
    "model_type, experts, expert_size, qk_norm, normalize, shared, moe_layers",
    [
        ("mixtral", 4, 24, QK_NORM_NONE, True, 0, (0, 1)),
        ("qwen2_moe", 4, 8, QK_NORM_NONE, False, 12, (1,)),
        ("qwen3_moe", 4, 8, QK_NORM_PER_HEAD, True, 0, (0, 1)),
        ("olmoe", 4, 8, QK_NORM_FULL, False, 0, (0, 1)),
    ],
)
def test_each_architecture_maps_to_plain_fields(
    model_type, experts, expert_size, qk_norm, normalize, shared, moe_layers
):
    cfg = MoEConfig.from_hf(RAW[model_type])
    assert (cfg.num_experts, cfg.moe_intermediate_size, cfg.qk_norm) == (experts, expert_size, qk_norm)
    assert cfg.norm_topk_prob is normalize
    assert cfg.shared_expert_intermediate_size == shared
    assert cfg.moe_layers == moe_layers


def test_head_dim_defaults_to_hidden_over_heads_and_can_differ():
    assert MoEConfig.from_hf(RAW["mixtral"]).head_dim == 4
    assert MoEConfig.from_hf(RAW["qwen3_moe"]).head_dim == 8


def test_rope_theta_from_transformers5_parameters_and_older_top_level_field():
    new = dict(RAW["mixtral"], rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
    old = dict(RAW["mixtral"], rope_theta=5e5)
    assert MoEConfig.from_hf(new).rope_theta == 1e6
    assert MoEConfig.from_hf(old).rope_theta == 5e5


def test_unsupported_model_type_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as err:
        MoEConfig.from_hf(dict(BASE, model_type="llama"))
    for name in SUPPORTED_MODEL_TYPES:
        assert name in str(err.value)
    assert "'llama'" in str(err.value)
    assert isinstance(err.value, NeuroDaskError)


def test_missing_config_json_names_the_folder(tmp_path):
    with pytest.raises(MissingConfigError, match=str(tmp_path)):
        MoEConfig.from_file(tmp_path)


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"num_local_experts": None}, "num_local_experts"),
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope_parameters.rope_type"),
        ({"sliding_window": 0}, "sliding_window"),
    ],
)
def test_bad_fields_name_the_field(patch, field, tmp_path):
    raw = dict(RAW["mixtral"], **patch)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigFieldError) as err:
        MoEConfig.from_file(path)
    assert err.value.field == field
    assert str(path) in str(err.value)


def test_invalid_json_is_a_config_error(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigFieldError, match="not valid JSON"):
        MoEConfig.from_file(tmp_path)


def test_qwen_sliding_window_is_refused_not_silently_ignored():
    with pytest.raises(ConfigFieldError, match="use_sliding_window"):
        MoEConfig.from_hf(dict(RAW["qwen2_moe"], use_sliding_window=True))


def test_settings_take_dask_config_with_either_spelling_and_reject_unknown_keys():
    import dask

    from neuro_dask.settings import ClientSettings, WorkerSettings, parse_bytes

    with dask.config.set({"neuro.worker.cache_dir": "/tmp/x", "neuro.worker.memory-budget": "2GiB"}):
        s = WorkerSettings.load()
    assert s.cache_dir == "/tmp/x" and s.budget_bytes(10**12) == 2 * 2**30
    assert WorkerSettings.load(memory_budget=None).budget_bytes(1000) == 500
    with dask.config.set({"neuro.client.deadlin": 3}):
        with pytest.raises(ConfigFieldError, match="deadlin"):
            ClientSettings.load()
    with pytest.raises(ConfigFieldError, match="transport"):
        ClientSettings.load(transport="carrier-pigeon")
    with pytest.raises(ConfigFieldError, match="memory-budget"):
        parse_bytes("lots", "memory-budget")


def test_the_speculative_setting_takes_every_draft_kind_a_model_builds_alone():
    from neuro_dask.settings import ClientSettings

    for kind in (None, "off", "prompt-lookup", "self", "mtp"):
        assert ClientSettings.load(speculative=kind).speculative == kind
    with pytest.raises(ConfigFieldError, match="prompt-lookup, self or mtp"):
        ClientSettings.load(speculative="draft-model")  # it needs a draft model, which no setting names


def test_configs_example_lists_exactly_the_settings_and_defaults_the_code_has():
    from pathlib import Path

    import yaml

    from neuro_dask.settings import ClientSettings, SchedulerSettings, WorkerSettings

    root = Path(__file__).resolve().parents[2]
    example = yaml.safe_load((root / "configs" / "neuro.yaml").read_text())["neuro"]
    packaged = yaml.safe_load((root / "neuro_dask" / "neuro.yaml").read_text())["neuro"]
    assert example == packaged
    for section, cls in (("worker", WorkerSettings), ("scheduler", SchedulerSettings), ("client", ClientSettings)):
        assert {f.replace("_", "-") for f in cls.__dataclass_fields__} == set(example[section])
        assert cls.load() == cls(**{k.replace("-", "_"): v for k, v in example[section].items()})
