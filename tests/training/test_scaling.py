"""Memory and precision options, evaluation during training, and the distributed-launch guard."""

import math
import re
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_recipe_dict
from llm_iif.attribution.influence import influence_scores
from llm_iif.lm.iif import ppo_sample_loss
from llm_iif.lm.rollouts import estimate_advantages
from llm_iif.recipes import ModelConfig, PPOConfig, recipe_from_dict
from llm_iif.core.distributed import fsdp2_layer_classes
from llm_iif.core.errors import UserError
from llm_iif.lm.policy import quantization_kwargs
from llm_iif.lm.generation import sample_responses
from llm_iif.training import build_trainer
from llm_iif.training.factory import check_distributed_support


def scoring_inputs(tmp_path, **model):
    raw = tiny_recipe_dict(tmp_path)
    raw["model"].update(model)
    raw["iif"] = {"enabled": True, "val_size": 8}
    trainer = build_trainer(recipe_from_dict(raw))
    rollout, _ = trainer.collector(trainer.prompts.next_batch())
    advantages = estimate_advantages(rollout, trainer.kl_controller.value, trainer.cfg, trainer.accelerator)
    target, _ = trainer.iif.target_gradient(trainer.policy)
    return trainer, rollout, advantages, target


def test_gradient_checkpointing_gives_the_same_scores_and_trains(tmp_path, tiny_model_dir):
    """Checkpointed layers run their forward twice; the attribution hooks must not count it twice."""
    trainer, rollout, advantages, target = scoring_inputs(tmp_path / "plain")
    policy = trainer.accelerator.unwrap_model(trainer.policy)
    args = (ppo_sample_loss(rollout, advantages, trainer.cfg, "policy", 5.0), len(rollout), target, 4, "cpu")
    plain = influence_scores(policy, *args)

    checkpointed = build_trainer(recipe_from_dict({**tiny_recipe_dict(tmp_path / "ckpt"),
                                                "model": {"name_or_path": "builtin:tiny-sentiment",
                                                          "gradient_checkpointing": True}}))
    lm = checkpointed.accelerator.unwrap_model(checkpointed.policy)
    calls = []
    first_lora_a = next(m for n, m in lm.named_modules() if n.endswith("lora_A.default"))
    first_lora_a.register_forward_hook(lambda *_: calls.append(1))
    lm.load_state_dict(policy.state_dict())
    scores = influence_scores(lm, *args)
    # Each chunk of 4 runs the forward twice (again in the backward pass): checkpointing is on.
    assert len(calls) == 2 * math.ceil(len(rollout) / 4)
    assert torch.allclose(scores, plain, rtol=1e-4, atol=1e-7)
    assert not any(m.training for n, m in lm.named_modules() if "drop" in n.split(".")[-1])
    history = checkpointed.train()
    assert all(math.isfinite(m["policy_loss"]) for m in history)


def test_iif_rounds_keep_gradient_checkpointing_for_the_updates(tmp_path, tiny_model_dir):
    """Scoring runs in eval mode, so checkpointing is off there; afterwards every module gets its own mode back,
    and the updates still recompute their layers in the backward pass."""
    raw = {**tiny_recipe_dict(tmp_path), "model": {"name_or_path": "builtin:tiny-sentiment",
                                                   "gradient_checkpointing": True},
           "iif": {"enabled": True, "score_batch_size": 4}}
    trainer = build_trainer(recipe_from_dict(raw))
    lm = trainer.accelerator.unwrap_model(trainer.policy)
    checkpointed = [m for m in lm.modules() if getattr(m, "gradient_checkpointing", False)]
    assert checkpointed and all(m.training for m in checkpointed)
    calls = {"checkpointed forward": 0, "recomputed": 0}  # of a LoRA layer in the first decoder layer

    def count(*_):
        if torch._C._current_graph_task_id() != -1:  # inside a backward pass: checkpointing's recomputation
            calls["recomputed"] += 1
        elif torch.is_grad_enabled() and checkpointed[0].training:
            calls["checkpointed forward"] += 1

    next(m for n, m in lm.named_modules() if n.endswith("lora_A.default")).register_forward_hook(count)
    history = trainer.train()
    assert all(m["filtered"] == 1 for m in history)  # both rounds scored
    assert all(m.training for m in checkpointed)
    # Every update minibatch of both rounds ran checkpointed, and was recomputed in its backward.
    assert calls["checkpointed forward"] == calls["recomputed"] >= 2 * 2


@pytest.fixture
def fresh_accelerator_state():
    """Accelerate keeps one state per process; mixed precision can only be chosen by a fresh one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_bf16_mixed_precision_round(tmp_path, tiny_model_dir, fresh_accelerator_state):
    raw = tiny_recipe_dict(tmp_path)
    raw["run"].update(rounds=1, mixed_precision="bf16")
    raw["iif"] = {"enabled": True, "val_size": 8, "mode": "bottom", "p": 0.25}
    trainer = build_trainer(recipe_from_dict(raw))
    assert trainer.accelerator.mixed_precision == "bf16"
    (metrics,) = trainer.train()
    assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))
    assert metrics["kept_fraction"] == 0.75
    # At θ(k) the update's first ratio is 1 only if rollout and update forwards share the precision.
    assert abs(metrics["approx_kl"]) < 0.05


def test_generation_batches_do_not_change_greedy_responses(tmp_path, tiny_model_dir):
    trainer = build_trainer(recipe_from_dict(tiny_recipe_dict(tmp_path)))
    lm = trainer.accelerator.unwrap_model(trainer.policy).lm
    prompts = trainer.prompts.prompts[:7]
    whole = sample_responses(lm, trainer.tokenizer, prompts, PPOConfig(top_k=1, max_new_tokens=6), "cpu")
    chunked = sample_responses(lm, trainer.tokenizer, prompts,
                               PPOConfig(top_k=1, max_new_tokens=6, generation_batch_size=3), "cpu")
    for a, b in zip(whole, chunked):
        assert torch.equal(a, b)


def test_eval_hook_logs_each_eval_reward(tmp_path, tiny_model_dir):
    raw = tiny_recipe_dict(tmp_path)
    raw["run"]["rounds"] = 3
    raw["eval"] = {"every": 2, "size": 6, "data": {"source": "builtin:review-prompts"},
                   "rewards": {"sentiment": {"name": "vader"},
                               "length": {"name": "callable", "function": "llm_iif.lm.builtin:hidden_preference_score"}}}
    history = build_trainer(recipe_from_dict(raw)).train()
    # After round 1 (every 2nd) and after the last round.
    assert ["eval/sentiment" in m for m in history] == [False, True, True]
    assert all(-1 <= m["eval/sentiment"] <= 1 and m["eval/length"] > 0 for m in history[1:])


def launch_state(distributed_type, zero_stage=None, fsdp_version=None, offload=False):
    """A stand-in for an Accelerator's launch state (DeepSpeed and FSDP do not start without a GPU)."""
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    deepspeed = SimpleNamespace(zero_stage=zero_stage) if zero_stage else None
    fsdp = SimpleNamespace(fsdp_version=fsdp_version, cpu_offload=CPUOffloadPolicy() if offload else OffloadPolicy(),
                           transformer_cls_names_to_wrap=["GPT2Block"]) if fsdp_version else None
    return SimpleNamespace(distributed_type=distributed_type, num_processes=2,
                           state=SimpleNamespace(deepspeed_plugin=deepspeed, fsdp_plugin=fsdp))


@pytest.mark.parametrize("state, refusal", [
    (launch_state("FSDP", fsdp_version=1), "fsdp_version: 1 (FSDP1) is not supported"),
    (launch_state("FSDP", fsdp_version=2, offload=True), "fsdp_offload_params: true is not supported"),
    (launch_state("DEEPSPEED", zero_stage=3), "DeepSpeed ZeRO-3 (zero_stage: 3) is not supported"),
    (launch_state("FSDP", fsdp_version=2), None),
    (launch_state("DEEPSPEED", zero_stage=2), None),
    (launch_state("MULTI_GPU"), None),
])
def test_launches_influence_scoring_does_not_support_are_refused(tmp_path, state, refusal):
    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True}
    if refusal:
        with pytest.raises(UserError, match=f"^{re.escape(refusal)}.*iif.mode: random"):
            check_distributed_support(state, recipe_from_dict(raw))
        raw["iif"]["mode"] = "random"  # no scores, nothing to get wrong
    check_distributed_support(state, recipe_from_dict(raw))


def test_a_layer_class_the_model_lacks_is_a_one_line_error(tmp_path, tiny_model_dir):
    raw = tiny_recipe_dict(tmp_path)
    raw["iif"] = {"enabled": True, "val_size": 8}
    with pytest.raises(UserError) as err:
        build_trainer(recipe_from_dict(raw), fsdp2_layers=["LlamaDecoderLayer"])
    assert str(err.value) == ("fsdp_transformer_layer_cls_to_wrap: 'LlamaDecoderLayer' is not a module class of "
                              "the model (expected one of: GPT2Block)")


def test_an_fsdp2_launch_names_the_layers_to_shard():
    assert fsdp2_layer_classes(launch_state("FSDP", fsdp_version=2)) == ["GPT2Block"]
    assert fsdp2_layer_classes(launch_state("FSDP", fsdp_version=1)) is None
    assert fsdp2_layer_classes(launch_state("MULTI_GPU")) is None
    unnamed = launch_state("FSDP", fsdp_version=2)
    unnamed.state.fsdp_plugin.transformer_cls_names_to_wrap = None
    with pytest.raises(UserError, match="^fsdp_transformer_layer_cls_to_wrap: an FSDP2 launch needs"):
        fsdp2_layer_classes(unnamed)


def test_quantization_without_bitsandbytes_is_a_clear_error():
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    with pytest.raises(UserError, match=r"model.quantization: '4bit' needs bitsandbytes; pip install"):
        quantization_kwargs(ModelConfig(name_or_path="x", quantization="4bit"))
