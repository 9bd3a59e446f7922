"""A data scientist's first run with an architecture of the transformers trunk, in real processes:
`neuro-dask shard` a gpt-oss checkpoint as transformers writes it (with a tokenizer and a chat
template), `neuro-dask inspect` it, `neuro-dask demo --model` it on a local cluster of worker
processes; and the OpenAI gateway serving it with the checkpoint's own chat template."""

from __future__ import annotations

import shutil

import pytest
from process_helpers import run_cli

from neuro_dask.demo.addition import ASSET_DIR
from neuro_dask.testing.tiny_transformers import write_tiny_checkpoint

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss-cli")
    checkpoint = write_tiny_checkpoint("gpt_oss", root / "hf", seed=3)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # 15 tokens: within the tiny vocabulary
        shutil.copyfile(ASSET_DIR / name, checkpoint / name)
    (checkpoint / "chat_template.jinja").write_text(TEMPLATE)
    done = run_cli("shard", str(checkpoint), str(root / "sharded"), "--quiet")
    assert done.returncode == 0, done.stdout
    assert "(gpt_oss, transformers layout)" in done.stdout
    return root / "sharded"


def test_inspect_and_demo_with_a_gpt_oss_model(store):
    inspected = run_cli("inspect", str(store))
    assert inspected.returncode == 0, inspected.stdout
    assert "gpt_oss" in inspected.stdout and "transformers layout, float experts" in inspected.stdout
    assert (store / "chat_template.jinja").is_file()  # shipped with the store for the gateway
    demo = run_cli(
        "demo", "--model", str(store), "--workers", "2", "--prompt", "12+34=", "--max-new-tokens", "3", timeout=300
    )
    assert demo.returncode == 0, demo.stdout
    assert "model: gpt_oss, 8 experts x 3 layers, top-2" in demo.stdout
    assert "published sharded: 24 experts on 2 workers" in demo.stdout
    assert "12+34=" in demo.stdout


def test_gateway_serves_it_with_the_checkpoints_chat_template(store):
    openai = pytest.importorskip("openai")
    from distributed import Client

    import neuro_dask as nd
    from neuro_dask.client.cluster import local_cluster
    from neuro_dask.gateway import Gateway, GatewayServer

    with (
        local_cluster(2, processes=False, worker_args=["--neuro-no-benchmark"], dashboard_address=None) as cluster,
        Client(cluster) as client,
        nd.load(store, client=client) as model,
    ):
        gateway = Gateway(model)
        assert gateway.chat_template.render([{"role": "user", "content": "1+1="}]) == "<|user|>1+1=<|assistant|>"
        server = GatewayServer(gateway, "127.0.0.1", 0).start()
        try:
            api = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="none")
            reply = api.chat.completions.create(
                model=gateway.model_id, max_tokens=3, messages=[{"role": "user", "content": "1+1="}]
            )
            assert reply.choices[0].message.role == "assistant"
            assert reply.usage.completion_tokens <= 3 and reply.usage.prompt_tokens > 0
        finally:
            server.stop()
            gateway.close()
