"""`neuro-dask demo --speculative ...` as a user runs it: the same answers, and how many tokens
each pass over the layers yielded."""

from __future__ import annotations

import re

from process_helpers import run_cli


def test_the_demo_drafts_with_the_bundled_draft_model_over_a_cluster():
    out = run_cli(
        "demo", "--workers", "2", "--speculative", "draft-model", "--prompt", "123+456=", "908+97=", timeout=300
    )
    assert out.returncode == 0, out.stdout
    assert "123+456=579" in out.stdout and "908+97=1005" in out.stdout, out.stdout
    assert "drafts from" in out.stdout and "adder-draft" in out.stdout
    per_pass = re.search(r"speculative decoding: ([0-9.]+) tokens per pass", out.stdout)
    assert per_pass and float(per_pass.group(1)) > 1.0, out.stdout


def test_a_draft_model_flag_without_a_draft_is_refused_with_a_reason():
    # any model but the bundled adder has no default draft: the user is told what to pass
    from neuro_dask.demo.train import DRAFT_ASSET_DIR

    out = run_cli("demo", "--local", "--model", str(DRAFT_ASSET_DIR), "--speculative", "draft-model")
    assert out.returncode != 0
    assert "--draft-model DIR" in out.stdout, out.stdout


def test_generate_in_process_says_why_it_drafted_nothing():
    from neuro_dask.demo.addition import ASSET_DIR

    out = run_cli("generate", str(ASSET_DIR), "123+456=", "--max-new-tokens", "6", "--speculative", "self")
    assert out.returncode == 0, out.stdout
    assert "123+456=579" in out.stdout
    assert "drafted nothing" in out.stdout and "across a network" in out.stdout, out.stdout
