"""Assemble a `PPOTrainer` from a recipe: the one place where components are built and wired.

The order of construction is part of reproducibility: LoRA and value-head initialisation draw from the
global seed before anything else, and the per-process random streams are seeded only after
``accelerator.prepare``.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from llm_iif.attribution.stage import IIFStage
from llm_iif.core import ppo
from llm_iif.recipes import Recipe
from llm_iif.core.distributed import check_scoring_supported, fsdp2_layer_classes, shard_with_fsdp2
from llm_iif.core.errors import UserError
from llm_iif.core.guards import NonfiniteGuard
from llm_iif.runs.paths import RunPaths
from llm_iif.lm.data import (PromptColumns, PromptQueue, load_prompts, load_validation_set, read_prompts,
                             read_trusted_triples)
from llm_iif.lm.evaluation import Evaluator
from llm_iif.lm.generation import sample_responses
from llm_iif.lm.iif import ValidationTarget, policy_logprobs
from llm_iif.lm.policy import load_policy, prompt_formatter
from llm_iif.lm.rollouts import RewardWithColumns, RolloutCollector, Sampler, estimate_advantages
from llm_iif.lm.trusted import ppo_trusted_triples
from llm_iif.models.builtins import resolve_builtin, resolve_reward_config
from llm_iif.models.reward_model import reward_training_pairs, triples_among_pairs
from llm_iif.runs.outputs import RunOutputs
from llm_iif.training.trainer import PPOTrainer, TrainerParts
from reward_models import load_reward_model
from reward_models.python_callable import CallableReward

logger = logging.getLogger(__name__)


def build_trainer(recipe: Recipe, accelerator: Accelerator | None = None, *,
                  sampler: Sampler = sample_responses, fsdp2_layers: list[str] | None = None) -> PPOTrainer:
    """A `PPOTrainer` for ``recipe``, with every component built from it.

    ``accelerator`` defaults to `make_accelerator(recipe)`; ``sampler`` replaces response sampling (tests
    use fixed responses, so runs with different process counts see the same rollouts). ``fsdp2_layers``
    shards the policy with FSDP2 around these decoder layer classes where the launch does not ask for it
    (Accelerate runs FSDP only on GPUs; tests shard CPU processes this way); an FSDP2 launch's
    ``fsdp_transformer_layer_cls_to_wrap`` is used otherwise."""
    acc = accelerator or make_accelerator(recipe)
    check_distributed_support(acc, recipe)
    if recipe.run.batch_size % acc.num_processes:
        raise UserError(f"run.batch_size: {recipe.run.batch_size} does not divide evenly over "
                        f"{acc.num_processes} processes")
    seed = recipe.run.seed

    set_seed(seed)  # the same LoRA and value-head initialisation on every process
    with acc.main_process_first():  # built-in models are built once, by the main process
        model_cfg = dataclasses.replace(recipe.model, name_or_path=resolve_builtin(recipe.model.name_or_path))
        policy, tokenizer = load_policy(model_cfg, recipe.lora)
    layer_classes = fsdp2_layer_classes(acc) or fsdp2_layers
    if layer_classes:  # before the optimiser is built: it must hold the sharded parameters
        shard_with_fsdp2(policy, layer_classes, generating=policy.lm.get_base_model())
    with acc.main_process_first():
        reward_cfg = resolve_reward_config(recipe.reward)
        reward_function = load_reward_model(reward_cfg, device=acc.device)
        eval_rewards = {name: load_reward_model(resolve_reward_config(cfg, f"eval.rewards.{name}"), device=acc.device,
                                                section=f"eval.rewards.{name}")
                        for name, cfg in recipe.eval.rewards.items()} if recipe.eval.every else {}
    format_prompt = prompt_formatter(tokenizer, recipe.model.chat_template)
    prompts = load_prompts(recipe.data, tokenizer, seed)
    eval_prompts, _, eval_columns = (read_prompts(recipe.eval.data, tokenizer, "eval.data") if recipe.eval.every
                                     else ([], 0, PromptColumns()))
    eval_prompts = eval_prompts[:recipe.eval.size]
    columns = prompts.columns.merged(eval_columns)  # what rewards read besides the text
    reward_function = RewardWithColumns(reward_function, columns, "reward")
    eval_rewards = {name: RewardWithColumns(model, columns, f"eval.rewards.{name}")
                    for name, model in eval_rewards.items()}
    validation = triples = None
    if recipe.trusted.source is not None:
        triples = read_trusted_triples(recipe.trusted)
        if acc.is_main_process:
            for model_dir in filter(None, [reward_cfg.name_or_path, *reward_cfg.members]):
                warn_of_shared_pairs(triples, model_dir, recipe.trusted.source)
    if recipe.iif.enabled:
        if recipe.iif.val_size % acc.num_processes:
            raise UserError(f"iif.val_size: {recipe.iif.val_size} does not divide evenly over "
                            f"{acc.num_processes} processes")
        if recipe.iif.target == "preference" and len(triples["prompt"]) // acc.num_processes % 2:
            raise UserError(f"trusted.size: {len(triples['prompt'])} triples give each of {acc.num_processes} "
                            "process(es) an odd number; expected an even number per process (the preference "
                            "target's two halves take whole triples)")
        if recipe.iif.target_source != "batch" and recipe.iif.target != "preference":
            validation = load_validation_set(recipe.iif, prompts)  # the batch source needs no validation data
    report_rewards = {name: RewardWithColumns(CallableReward(path, key=f"reward.report.{name}"), columns,
                                              f"reward.report.{name}")
                      for name, path in recipe.reward.report.items()}
    optimizer = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=recipe.ppo.learning_rate)
    if acc.state.deepspeed_plugin is not None:  # no data loader is prepared, so DeepSpeed must be told
        acc.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = recipe.ppo.mini_batch_size
    if layer_classes:  # already sharded: no DDP wrap, and Accelerate's FSDP2 leaves a sharded model as it is
        prepared_policy, optimizer = acc.prepare_model(policy, evaluation_mode=True), acc.prepare_optimizer(optimizer)
    else:
        prepared_policy, optimizer = acc.prepare(policy, optimizer)
    kl_controller = (ppo.AdaptiveKLController(recipe.ppo.init_kl_coef, recipe.ppo.target_kl, recipe.ppo.kl_horizon)
                     if recipe.ppo.adaptive_kl else ppo.FixedKLController(recipe.ppo.init_kl_coef))

    # Sampling differs per process; the prompt order is shared so processes take disjoint slices.
    set_seed(seed, device_specific=True)
    minibatch_generator = torch.Generator().manual_seed(seed + acc.process_index)
    filter_generator = torch.Generator().manual_seed(seed)  # the same on every process
    guard = NonfiniteGuard(recipe.run.nonfinite_patience)
    unwrapped = acc.unwrap_model(prepared_policy)
    collector = RolloutCollector(unwrapped, tokenizer, reward_function, recipe.reward.name, format_prompt,
                                 recipe.ppo, acc, guard, sampler)
    trusted = None if triples is None else ppo_trusted_triples(
        recipe.trusted, triples, unwrapped, tokenizer, format_prompt, recipe.ppo.temperature,
        recipe.ppo.forward_batch_size, acc, torch.Generator().manual_seed(seed + acc.process_index))
    iif = None
    if recipe.iif.enabled:
        target = None if recipe.iif.target_source == "batch" else ValidationTarget(
            recipe.iif, validation, collector,
            lambda rollout: estimate_advantages(rollout, kl_controller.value, recipe.ppo, acc), acc, trusted)
        iif = IIFStage(recipe.iif, acc, target, policy_logprobs(recipe.ppo.temperature), guard, filter_generator)
    evaluator = (Evaluator(unwrapped, tokenizer, format_prompt, recipe.ppo, eval_prompts, eval_rewards,
                           recipe.eval.every, seed, acc) if recipe.eval.every else None)
    return PPOTrainer(TrainerParts(
        recipe=recipe, accelerator=acc, policy=prepared_policy, optimizer=optimizer, tokenizer=tokenizer,
        collector=collector, prompts=PromptQueue(prompts.train, recipe.run.batch_size, seed, acc.process_index,
                                                 acc.num_processes),
        kl_controller=kl_controller, iif=iif, guard=guard,
        outputs=RunOutputs(RunPaths(recipe.run.output_dir), recipe, acc), evaluator=evaluator,
        report_rewards=report_rewards, minibatch_generator=minibatch_generator, filter_generator=filter_generator,
        trusted=trusted))


def warn_of_shared_pairs(triples: dict[str, list[str]], reward_model_dir: str, source: str) -> None:
    """Warn when trusted triples are among the reward model's training pairs (when those are known): such a
    target shares the proxy's data, and so its flaws."""
    pairs = reward_training_pairs(reward_model_dir)
    shared = triples_among_pairs(triples, pairs) if pairs else 0
    if shared:
        logger.warning("trusted.source: %d of %d trusted triples of '%s' are among the reward model's training "
                       "pairs; a trusted set should be disjoint from them", shared, len(triples["prompt"]), source)


def make_accelerator(recipe: Recipe) -> Accelerator:
    """The Accelerator for ``recipe``: its ``run.mixed_precision`` overrides the `accelerate launch` setting."""
    if recipe.run.mixed_precision is None:
        return Accelerator()
    return Accelerator(mixed_precision=recipe.run.mixed_precision)


def check_distributed_support(accelerator: Accelerator, recipe: Recipe) -> None:
    """Refuse launches influence scoring does not support (`sharding_refusal`: ZeRO-3, FSDP1, FSDP2 with
    offloaded parameters); standard PPO and random filtering run under all of them."""
    if recipe.iif.lds_rounds and accelerator.num_processes > 1:
        raise UserError(f"iif.lds_rounds: the LDS check runs in one process; this launch has "
                        f"{accelerator.num_processes} (launch one process, or set iif.lds_rounds: [])")
    if recipe.iif.enabled and recipe.iif.mode != "random":
        check_scoring_supported(accelerator)
