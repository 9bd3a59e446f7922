"""The CLI as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

CLI = [sys.executable, "-m", "neuro_dask.cli.main"]


def run(*args, check=True):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def test_shard_then_inspect_then_generate(hf_checkpoint, tmp_path):
    dst = tmp_path / "sharded"
    out = run("shard", hf_checkpoint("qwen2_moe"), dst)
    assert "manifest.json" in out.stdout
    summary = json.loads(run("inspect", dst, "--json").stdout)
    assert summary["architecture"] == "qwen2_moe"
    assert summary["expert_files"] == 2 * 6  # two MoE layers, one dense
    assert summary["parameters_active_per_token"] < summary["parameters_total"]
    assert "active per token" in run("inspect", dst).stdout


@pytest.mark.parametrize("args", [[], ["--transport", "futures", "--workers", "2"], ["--local"]])
def test_demo_answers_held_out_problems(args):
    out = run("demo", "-n", "60", "--show", "3", *args)
    assert "exact match on 60 held-out problems" in out.stdout
    pct = float(out.stdout.split("held-out problems: ")[1].split("%")[0])
    assert pct >= 95.0
    if "--local" not in args:
        assert "dashboard: http" in out.stdout and "tokens/s" in out.stdout
        assert "Traceback" not in out.stderr


def test_demo_with_prompts():
    out = run("demo", "--prompt", "12+30=", "999+1=", "--workers", "2")
    assert out.stdout.splitlines()[-2:] == ["12+30=42", "999+1=1000"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "/nonexistent/model"], "no config.json"),
        (["shard", "/nonexistent/src", "/tmp/x"], "no config.json"),
        (["serve", "--channel", "adder"], "--channel needs --scheduler"),
    ],
)
def test_errors_exit_2_with_a_message_and_no_traceback(args, message):
    proc = run(*args, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("mode", ["perturb", "collude"])
def test_drill_reports_json_and_catches_every_adversary(mode):
    out = run("drill", "--workers", "10", "--adversaries", "0.3", "--mode", mode, "--prompts", "40", "--json")
    report = json.loads(out.stdout)
    assert report["identical"] is True and report["wrong_accepted"] == 0
    # Every adversary that received a call is out of routing; one hosting only experts the router
    # never picked had nothing to catch (the adder's routing is skewed) and is listed as such.
    assert len(report["adversaries"]) == 3
    assert sorted(report["caught"] + report["unexercised"]) == report["adversaries"]
    assert len(report["caught"]) >= 2
    assert 1.0 <= report["replicas_per_call"] <= 3.0
    assert {"hedges", "layer_p50_ms", "layer_p99_ms"} <= set(report)


def test_crash_drill_loses_nothing_when_adversaries_die_mid_generation():
    out = run("drill", "--workers", "6", "--adversaries", "0.34", "--mode", "crash", "--after", "0", "--json")
    report = json.loads(out.stdout)
    assert report["identical"] is True and report["wrong_accepted"] == 0
    # Each adversary dies at its first call; one the router never called had nothing to die on.
    assert len(report["adversaries"]) == 2 and report["departed"]
    assert sorted(report["departed"] + report["unexercised"]) == report["adversaries"]


def test_straggle_drill_hedges_within_the_cap():
    out = run(
        "drill",
        "--workers",
        "6",
        "--adversaries",
        "0.5",
        "--mode",
        "straggle",
        "--probability",
        "0.3",
        "--delay",
        "0.05",
        "--json",
    )
    report = json.loads(out.stdout)
    assert report["identical"] is True and report["wrong_accepted"] == 0
    assert report["extra_calls"] <= 0.1 + 0.01  # the cap is checked before each hedge
    assert len(report["adversaries"]) == 3
    # That stragglers get overtaken is tested where every worker straggles
    # (tests/integration/test_trust_drills.py); here few calls may reach them.
