"""The dry-run memory plan (rl/engine/memory_plan.py) against hand-computed values, the
shipped models' real parameter counts, and the H200 measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rl.config import load_config
from rl.core.errors import ConfigError
from rl.engine import memory_plan as mp

REPO = Path(__file__).resolve().parent.parent
GIB = 2**30
QWEN_1_5B = mp.KNOWN_ARCHITECTURES["Qwen/Qwen2.5-1.5B-Instruct"]
QWEN_7B = mp.KNOWN_ARCHITECTURES["Qwen/Qwen2.5-7B-Instruct"]


def test_qwen_parameter_counts():
    # the random Qwen2-1.5B of the H200 throughput run counted its parameters:
    # 1,543,714,304 (benchmarks/results/gpu/summary.md)
    assert mp.parameter_count(QWEN_1_5B) == 1_543_714_304
    # 7B by hand: embedding and untied head 2 x 152064 x 3584; per layer q,o 2 x 3584^2,
    # k,v 2 x 3584 x 512, biases 3584 + 2 x 512, MLP 3 x 3584 x 18944, norms 2 x 3584
    layer = 2 * 3584**2 + 2 * 3584 * 512 + (3584 + 1024) + 3 * 3584 * 18944 + 2 * 3584
    assert mp.parameter_count(QWEN_7B) == 2 * 152064 * 3584 + 28 * layer + 3584
    assert mp.parameter_count(QWEN_7B) == 7_615_616_512
    # a value model drops the untied output layer only
    assert mp.backbone_parameter_count(QWEN_7B) == 7_615_616_512 - 152064 * 3584
    assert mp.backbone_parameter_count(QWEN_1_5B) == mp.parameter_count(QWEN_1_5B)


def test_random_model_sizes_match_the_table():
    """benchmarks/random_model.py's qwen2-1.5b (the measured model) is the table's shape."""
    from benchmarks.random_model import SIZES

    size = SIZES["qwen2-1.5b"]
    assert (size["hidden_size"], size["num_hidden_layers"], size["intermediate_size"]) == (
        QWEN_1_5B.hidden_size,
        QWEN_1_5B.num_layers,
        QWEN_1_5B.intermediate_size,
    )
    assert (size["num_attention_heads"], size["num_key_value_heads"], size["vocab_size"]) == (
        QWEN_1_5B.num_heads,
        QWEN_1_5B.num_kv_heads,
        QWEN_1_5B.vocab_size,
    )


def safetensors_parameter_count(path: Path) -> int:
    """Elements in a safetensors file, from its JSON header (no torch)."""
    raw = path.read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    total = 0
    for name, entry in header.items():
        if name != "__metadata__":
            count = 1
            for dim in entry["shape"]:
                count *= dim
            total += count
    return total


@pytest.mark.parametrize("name", ["builtin:arith-tiny", "builtin:chat-tiny"])
def test_builtin_architectures_count_the_shipped_weights(name: str):
    prefix, _ = mp.BUILTIN_KINDS[name]
    shipped = sorted((REPO / "rl/engine/start_models").glob(f"{prefix}-*"))[0]
    arch = mp.architecture_for(name)
    assert mp.parameter_count(arch) == safetensors_parameter_count(shipped / "model.safetensors")
    # and the same shape read through AutoConfig from the directory (config only)
    assert mp.architecture_for(str(shipped)) == arch


def test_unknown_model_is_a_one_line_error_naming_it(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="'no-such-org/no-such-model'") as err:
        mp.architecture_for("no-such-org/no-such-model")
    assert "\n" not in str(err.value)


def test_model_states_by_zero_stage():
    p = 1_500_000_000
    # bf16 weights: 2 bytes per parameter, replicated below ZeRO-3, / N under it
    assert mp.weight_bytes(p, 2, 2, 8) == 3_000_000_000
    assert mp.weight_bytes(p, 2, 3, 8) == 3_000_000_000 // 8
    # gradients: bf16, partitioned under ZeRO-2/3, on the CPU with optimizer offload
    assert mp.gradient_bytes(p, 2, 2, 8, offload=False) == 3_000_000_000 // 8
    assert mp.gradient_bytes(p, 2, 3, 8, offload=True) == 0
    assert mp.gradient_bytes(p, 2, 1, 8, offload=False) == 3_000_000_000
    # Adam with fp32 master weights: 12 bytes per parameter, / N from ZeRO-1 on
    assert mp.optimizer_bytes(p, 2, 0, 8, offload=False) == 12 * p
    assert mp.optimizer_bytes(p, 2, 2, 8, offload=False) == 12 * p // 8
    assert mp.optimizer_bytes(p, 2, 3, 8, offload=True) == 0
    # fp32 weights are their own master copy: the two moments only
    assert mp.optimizer_bytes(p, 4, 3, 8, offload=False) == 8 * p // 8
    assert mp.offloaded_optimizer_bytes(p, 2, 8) == 16 * p // 8


def test_gradient_buckets_follow_the_deepspeed_json():
    zero2 = json.loads((REPO / "configs/deepspeed/zero2.json").read_text())["zero_optimization"]
    # two (overlap_comm) bf16 buffers of DeepSpeed's default 5e8 elements
    assert mp.gradient_bucket_bytes(2, zero2, 2) == 2 * 500_000_000 * 2
    assert mp.gradient_bucket_bytes(2, {**zero2, "overlap_comm": False}, 2) == 500_000_000 * 2
    assert mp.gradient_bucket_bytes(2, {**zero2, "reduce_bucket_size": 1000}, 2) == 2 * 1000 * 2
    assert mp.gradient_bucket_bytes(3, {}, 2) == 500_000_000 * 2
    assert mp.gradient_bucket_bytes(0, zero2, 2) == 0


def test_activations_and_kv_cache_by_hand():
    # per token per layer, bf16: norms 2 x (4 + 2) x 1536; q 1536, k and v 256 each,
    # attention output and o-projection input 2 x 1536, all x 2 bytes; MLP 4 x 8960 x 2
    per_layer = 2 * 6 * 1536 + 2 * (1536 + 2 * 256 + 2 * 1536) + 4 * 8960 * 2
    assert per_layer == 100_352
    assert mp.layer_activation_bytes_per_token(QWEN_1_5B, 2) == per_layer
    tokens = 8 * 1000
    assert mp.activation_bytes(QWEN_1_5B, 2, tokens, False) == tokens * 28 * per_layer
    # checkpointing keeps each layer's bf16 input and recomputes one layer
    assert mp.activation_bytes(QWEN_1_5B, 2, tokens, True) == tokens * (28 * 2 * 1536 + per_layer)
    # KV cache: keys and values, 28 layers x 2 kv heads x 128 x 2 bytes
    assert mp.kv_cache_bytes_per_token(QWEN_1_5B, 2) == 2 * 28 * 256 * 2
    assert mp.kv_cache_bytes_per_token(QWEN_7B, 2) == 2 * 28 * 512 * 2


def test_chunk_size_matches_the_forward_pass():
    from rl.engine.forward import CHUNK_TOKENS

    assert mp.CHUNK_TOKENS == CHUNK_TOKENS


def test_world_size_from_launcher_env_or_recipe():
    cfg = load_config(REPO / "configs/recipes/qwen2.5-7b/grpo_2x8.yaml")
    recipe = mp.plan_world_size(cfg, environ={})
    assert (recipe.ranks, recipe.nodes) == (16, 2)
    assert "recipe" in recipe.source
    env = mp.plan_world_size(cfg, environ={"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})
    assert (env.ranks, env.nodes) == (8, 2)
    assert "WORLD_SIZE" in env.source


def items_by_name(plan: mp.MemoryPlan) -> dict[str, int]:
    return {item.name: item.bytes for item in plan.items}


def test_plan_models_per_algorithm():
    world = mp.WorldSize(8, 1, "test")
    names = {
        algo: set(
            items_by_name(
                mp.build_plan(
                    load_config(REPO / f"configs/recipes/qwen2.5-7b/{algo}_1x8.yaml"),
                    QWEN_7B,
                    world,
                )
            )
        )
        for algo in ("grpo", "prime", "pav", "ppo")
    }
    extras = {
        "implicit PRM weights",
        "reference (frozen)",
        "critic weights",
        "PAV verifier (frozen)",
    }
    assert names["grpo"] & extras == set()  # kl_coef 0: no reference
    assert names["prime"] & extras == {"implicit PRM weights", "reference (frozen)"}
    assert names["pav"] & extras == {"PAV verifier (frozen)"}
    assert names["ppo"] & extras == {"critic weights", "reference (frozen)"}


def test_plan_sums_its_lines_per_phase():
    cfg = load_config(REPO / "configs/recipes/qwen2.5-7b/prime_1x8.yaml")
    plan = mp.build_plan(cfg, QWEN_7B, mp.WorldSize(8, 1, "test"))
    items = items_by_name(plan)
    p = mp.parameter_count(QWEN_7B)
    assert items["policy weights"] == 2 * p // 8  # ZeRO-3 over 8 ranks
    assert items["policy optimizer"] == 12 * p // 8
    assert items["implicit PRM optimizer"] == 12 * p // 8
    assert items["ZeRO gradient buckets"] == 2 * 500_000_000 * 2  # one per ZeRO-3 engine
    assert items["vLLM engine (weights + KV cache)"] == int(0.4 * 80 * GIB)
    # vLLM sleeps during the update; activations exist only in it
    update = plan.phase_bytes("update")
    rollout = plan.phase_bytes("rollout")
    act = items["activations (with gradient checkpointing)"]
    assert (
        update - rollout
        == act
        + items["output layer (chunked log-probs)"]
        - items["vLLM engine (weights + KV cache)"]
    )
    assert plan.peak_bytes == max(update, rollout)
    # 4 sequences of 512 + 1024 tokens per micro-batch
    assert act == mp.activation_bytes(QWEN_7B, 2, 4 * 1536, True)


def test_plan_matches_the_h200_measurements():
    """Within 25% of the peak GPU memory measured on one H200 (benchmarks/results/gpu/), for
    every phase above 1 GiB. The throughput run's update phase matches the plan *without*
    gradient checkpointing, though the run asked for it: see docs/recipes.md."""
    from benchmarks.memory_plan_check import compare, render

    rows = compare()
    assert render(rows) in (REPO / "docs/recipes.md").read_text()  # the docs' table is current
    checked = [r for r in rows if r.measured_mib > 900]
    assert len(checked) >= 7
    for row in checked:
        if row.case.startswith("throughput") and row.phase == "update":
            assert row.estimate_other_gc_mib is not None
            assert abs(row.estimate_other_gc_mib / row.measured_mib - 1) < 0.25, row
        else:
            assert abs(row.error) < 0.25, row


def test_batch_split_of_a_recipe():
    cfg = load_config(REPO / "configs/recipes/qwen2.5-math-1.5b/grpo_1x8.yaml")
    # 128 prompts x 8 samples over 8 ranks: 16 prompts = 128 samples per rank, 2 mini-batches
    # of 64, micro-batches of 8 -> 8 accumulation steps per optimizer step
    split = mp.batch_plan(cfg, 8)
    assert (split.local_prompts, split.local_seqs, split.mini_batch_seqs) == (16, 128, 64)
    assert (split.micro_batch_size, split.grad_accum_steps) == (8, 8)
    assert mp.batch_plan(cfg, 16).grad_accum_steps == 4
