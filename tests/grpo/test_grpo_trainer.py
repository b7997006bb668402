"""IIFGRPOTrainer: the per-completion loss is trl's, the scores are exact, dropped rows leave the update."""

import itertools
import json
import os
import subprocess

import pytest
import torch
from conftest import launch_command
from grpo_setup import grpo_args, make_trainer
from trl import GRPOTrainer

from llm_iif.attribution.gradients import scored_parameters
from llm_iif.recipes import GRPOIIFConfig
from llm_iif.core.errors import UserError
from llm_iif.grpo import GroupFilter
from llm_iif.grpo.batches import kept_rows
from llm_iif.grpo.checks import check_filter_settings
from llm_iif.grpo.groups import group_ids, max_variance_subsets, subset_advantages, varied_groups
from llm_iif.grpo.losses import SUPPORTED_LOSSES


def generation_batch(trainer, prompts=4):
    """trl's own generation batch (no filtering) for the first ``prompts`` problems, G completions each."""
    rows = [trainer.train_dataset[i] for i in range(prompts) for _ in range(trainer.num_generations)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return GRPOTrainer._generate_and_score_completions(trainer, rows)


def select(trainer, batch):
    """The stage's selection over every row of a generation batch, folded by group as the trainer folds it."""
    size = len(batch["advantages"])
    return trainer._scoring.stage.select(trainer.model, trainer._scoring.loss_and_target(batch), size,
                                 groups=group_ids(trainer.accelerator, size, trainer.num_generations))


def flat_grad(value, params):
    return torch.cat([g.flatten() for g in torch.autograd.grad(value, params, retain_graph=True)])


def batch_rows(batch, rows, size):
    """The rows ``rows`` of a generation batch of ``size`` rows (per-row tensors cut, the rest kept)."""
    return {k: (v[rows] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size else v) for k, v in batch.items()}


def off_the_reference(trainer):
    """LoRA's B starts at zero: move the policy off the reference so that the KL term counts."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1 * torch.randn_like(param))


@pytest.mark.parametrize("loss_type,beta,extra", [
    *((loss_type, 0.1, {}) for loss_type in SUPPORTED_LOSSES),  # cispo: policy term scaled by epsilon_high
    ("dapo", 0.0, {}),
    ("grpo", 0.1, dict(importance_sampling_level="sequence", use_bias_correction_kl=True)),  # GSPO's ratio
])
def test_completion_losses_sum_to_trls_loss(random_adder_dir, tmp_path, loss_type, beta, extra):
    """Σ_i L_i over a generation batch equals the trained loss (trl's, rescaled after filtering) summed over
    its micro-batches, with gradient accumulation (2 micro-batches of 8 per optimiser step); the gradients agree
    for every loss type."""
    trainer = make_trainer(random_adder_dir, tmp_path, loss_type=loss_type, beta=beta, steps_per_generation=2,
                           gradient_accumulation_steps=2, per_device_train_batch_size=8, **extra,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch"))
    off_the_reference(trainer)
    batch = generation_batch(trainer)
    params = list(scored_parameters(trainer.model).values())
    ours, _ = trainer._scoring.loss_and_target(batch)(trainer.model, torch.arange(16))
    trainer.current_gradient_accumulation_steps = 2
    trained = kept_rows(batch, torch.ones(16, dtype=torch.bool), trainer.accelerator, trainer.args.steps_per_generation)
    theirs = sum(trainer._compute_loss(trainer.model, batch_rows(trained, rows, 16))
                 for rows in (slice(0, 8), slice(8, 16)))
    if loss_type not in ("cispo", "sapo", "vespo"):  # their values are not -A·r at r = 1; only gradients agree
        torch.testing.assert_close(ours.sum(), theirs, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(flat_grad(ours.sum(), params), flat_grad(theirs, params), rtol=1e-4, atol=1e-7)


def target_term(trainer, batch, i: int) -> torch.Tensor:
    """Completion i's target term -Â_i Σ_t log π(y_{i,t}), rebuilt from an explicit log_softmax over the model's
    logits (temperature-scaled, as trl samples), not from the trainer's own code: its completion alone, its prompt
    as trl pads it (trl's forward gives the model no position ids, and neither does this one)."""
    prompt, completion = batch["prompt_ids"][i:i + 1], batch["completion_ids"][i:i + 1]
    ids = torch.cat([prompt, completion], dim=1)
    mask = torch.cat([batch["prompt_mask"][i:i + 1], batch["completion_mask"][i:i + 1]], dim=1)
    logits = trainer.model(input_ids=ids, attention_mask=mask).logits[:, prompt.shape[1] - 1:-1].float()
    logprobs = torch.log_softmax(logits / trainer.temperature, dim=-1).gather(-1, completion[..., None])[..., 0]
    return -batch["advantages"][i] * (logprobs * batch["completion_mask"][i:i + 1]).sum()


def brute_force_scores(trainer, batch, target=None, folds=2, left_out=(), fold=None):
    """Each completion's ⟨target gradient, ∇L_i⟩ from one autograd call per completion; without ``target``,
    the cross-fitted target of the other folds (a completion's whole group in one fold: group index mod folds),
    its terms rebuilt independently (`target_term`)."""
    fn = trainer._scoring.loss_and_target(batch)
    params = list(scored_parameters(trainer.model).values())
    n = len(batch["advantages"])
    loss_grads, target_grads = [], []
    for i in range(n):
        result = fn(trainer.model, torch.tensor([i]))
        loss = result[0] if isinstance(result, tuple) else result
        loss_grads.append(flat_grad(loss.sum(), params))
        if isinstance(result, tuple):
            target_grads.append(flat_grad(target_term(trainer, batch, i), params))
    if target is not None:
        return torch.stack(loss_grads) @ target
    fold = (torch.arange(n) // trainer.num_generations) % folds if fold is None else fold
    scores = []
    for i in range(n):
        others = [target_grads[j] for j in range(n) if fold[j] != fold[i] and j not in left_out]
        scores.append(torch.dot(sum(others) / len(others), loss_grads[i]))
    return torch.stack(scores)


@pytest.mark.parametrize("loss_type,score_batch_size", [
    *((loss_type, 64) for loss_type in SUPPORTED_LOSSES),  # one fused pass
    ("dapo", 5),                                          # chunks that run forward twice
])
def test_cross_fitted_scores_equal_brute_force(random_adder_dir, tmp_path, loss_type, score_batch_size):
    trainer = make_trainer(random_adder_dir, tmp_path, beta=0.1, loss_type=loss_type, steps_per_generation=2,
                           gradient_accumulation_steps=2, per_device_train_batch_size=8, iif=GRPOIIFConfig(
                               enabled=True, target_source="batch", folds=2, score_batch_size=score_batch_size))
    off_the_reference(trainer)
    batch = generation_batch(trainer)
    selection = select(trainer, batch)
    expected = brute_force_scores(trainer, batch)
    assert expected.abs().max() > 0
    torch.testing.assert_close(selection.influence, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_a_nan_target_row_is_left_out_of_its_fold_and_counted(random_adder_dir, tmp_path):
    """A completion whose target term is NaN (here its advantage) would spoil its fold's gradient and so every
    other fold's scores; it is left out of the target, counted, and only its own score is NaN."""
    trainer = make_trainer(random_adder_dir, tmp_path, nonfinite_patience=1,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch", folds=2))
    batch = generation_batch(trainer)
    batch["advantages"][5] = float("nan")
    trainer._guard.start_round()
    selection = select(trainer, batch)
    assert trainer._guard.end_round()["nonfinite_target"] == 1
    scores = selection.influence
    assert scores[5].isnan() and scores.isfinite().sum() == 15 and not selection.keep[5]
    expected = brute_force_scores(trainer, batch, left_out={5})
    torch.testing.assert_close(scores[scores.isfinite()], expected[expected.isfinite()], rtol=1e-4,
                               atol=1e-4 * expected[expected.isfinite()].abs().max().item())


def test_fresh_target_scores_equal_brute_force(random_adder_dir, tmp_path):
    from datasets import Dataset

    from llm_iif.lm.addition import addition_problems

    validation = Dataset.from_list(addition_problems(8, seed=5))
    trainer = make_trainer(random_adder_dir, tmp_path, validation_dataset=validation,
                           iif=GRPOIIFConfig(enabled=True, target_source="fresh", val_size=8))
    batch = generation_batch(trainer)
    source, seen = trainer._scoring.stage.target_source, []
    trainer._scoring.stage.target_source = lambda model: seen.append(source(model)) or seen[-1]
    selection = select(trainer, batch)
    rows = seen[0]
    assert len(rows) == 8 and rows.weights.shape == rows.response_mask.shape
    params = list(scored_parameters(trainer.model).values())
    logps = trainer._sequence_logprobs(trainer.model, rows.query_ids, rows.query_mask, rows.response_ids,
                                       rows.response_mask)
    target = flat_grad(-(rows.weights * logps * rows.response_mask).sum() / len(rows), params)
    expected = brute_force_scores(trainer, batch, target)
    torch.testing.assert_close(selection.influence, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_a_nan_row_of_the_fresh_target_is_left_out_and_counted(random_adder_dir, tmp_path):
    from datasets import Dataset

    from llm_iif.lm.addition import addition_problems

    trainer = make_trainer(random_adder_dir, tmp_path, nonfinite_patience=1,
                           validation_dataset=Dataset.from_list(addition_problems(8, seed=5)),
                           iif=GRPOIIFConfig(enabled=True, target_source="fresh", val_size=8))
    batch = generation_batch(trainer)
    source, seen = trainer._scoring.stage.target_source, []

    def with_a_nan_row(model):
        rows = source(model)
        rows.weights = rows.weights.clone()  # expanded from one advantage per row
        rows.weights[0] = float("nan")
        seen.append(rows)
        return rows

    trainer._scoring.stage.target_source = with_a_nan_row
    trainer._guard.start_round()
    selection = select(trainer, batch)
    assert trainer._guard.end_round()["nonfinite_target"] == 1
    rows = seen[0]
    params = list(scored_parameters(trainer.model).values())
    logps = trainer._sequence_logprobs(trainer.model, rows.query_ids[1:], rows.query_mask[1:],
                                       rows.response_ids[1:], rows.response_mask[1:])
    target = flat_grad(-(rows.weights[1:] * logps * rows.response_mask[1:]).sum() / (len(rows) - 1), params)
    expected = brute_force_scores(trainer, batch, target)
    torch.testing.assert_close(selection.influence, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_scores_are_computed_without_dropout(random_adder_dir, tmp_path):
    trainer = make_trainer(random_adder_dir, tmp_path, iif=GRPOIIFConfig(enabled=True, target_source="batch"))
    for module in trainer.model.modules():
        if hasattr(module, "lora_dropout"):
            module.lora_dropout["default"] = torch.nn.Dropout(0.5)
    batch = generation_batch(trainer)
    first, second = (select(trainer, batch).influence for _ in range(2))
    assert trainer.model.training  # back in training mode for the update
    torch.testing.assert_close(first, second)


def test_scores_without_lora_cover_the_linear_layers(tmp_path):
    """A model trained without LoRA is scored on its trainable nn.Linear layers, exactly."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llm_iif.lm.addition import adder_tokenizer

    tokenizer = adder_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         tie_word_embeddings=False, bos_token_id=tokenizer.eos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    trainer = make_trainer(tmp_path / "llama", tmp_path / "out", lora=False,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch", folds=2))
    assert "model.layers.0.mlp.up_proj.weight" in scored_parameters(trainer.model)
    batch = generation_batch(trainer)
    selection = select(trainer, batch)
    expected = brute_force_scores(trainer, batch)
    torch.testing.assert_close(selection.influence, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_dropped_completions_leave_the_batch_and_the_normaliser(random_adder_dir, tmp_path):
    """Kept rows only (padded to split evenly into steps_per_generation chunks); the loss of the cut batch
    equals trl's loss on the kept completions alone."""
    trainer = make_trainer(random_adder_dir, tmp_path, loss_type="grpo", steps_per_generation=2,
                           gradient_accumulation_steps=2, per_device_train_batch_size=8,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch", p=1.0))
    batch = generation_batch(trainer)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[[0, 3, 4, 9, 14]] = True  # 5 kept: one padding row makes 6, which splits into 2 chunks of 3
    cut = kept_rows(batch, keep, trainer.accelerator, trainer.args.steps_per_generation)
    assert cut["completion_ids"].shape[0] == 6 and cut["iif_kept_rows"].item() == 5
    assert cut["completion_mask"][5].sum() == 0 and cut["advantages"][5] == 0
    assert cut["num_items_in_batch"].item() == batch["completion_mask"][keep].sum().item()
    trainer.current_gradient_accumulation_steps = 2
    ours = trainer._compute_loss(trainer.model, cut)
    kept_only = batch_rows(batch, keep, 16)
    trainer.current_gradient_accumulation_steps = 1
    torch.testing.assert_close(ours, GRPOTrainer._compute_loss(trainer, trainer.model, kept_only))


def test_bnpo_after_filtering_is_a_token_mean_over_the_kept_batch(random_adder_dir, tmp_path):
    """trl's bnpo is a token mean per micro-batch; after filtering the micro-batches hold unequal token counts
    (here the second has the padding row), and their losses must still add up to the kept batch's token mean."""
    trainer = make_trainer(random_adder_dir, tmp_path, loss_type="bnpo", steps_per_generation=2,
                           gradient_accumulation_steps=2, per_device_train_batch_size=8,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch", p=1.0))
    batch = generation_batch(trainer)
    keep = torch.zeros(16, dtype=torch.bool)
    keep[[0, 3, 4, 9, 14]] = True
    cut = kept_rows(batch, keep, trainer.accelerator, trainer.args.steps_per_generation)
    micro_batches = [batch_rows(cut, rows, 6) for rows in (slice(0, 3), slice(3, 6))]
    assert micro_batches[0]["completion_mask"].sum() != micro_batches[1]["completion_mask"].sum()
    trainer.current_gradient_accumulation_steps = 2
    ours = sum(trainer._compute_loss(trainer.model, micro) for micro in micro_batches)
    kept_only = batch_rows(batch, keep, 16)
    trainer.current_gradient_accumulation_steps = 1
    torch.testing.assert_close(ours, GRPOTrainer._compute_loss(trainer, trainer.model, kept_only))


def test_training_filters_each_generation_batch(random_adder_dir, tmp_path):
    trainer = make_trainer(random_adder_dir, tmp_path, max_steps=2,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch", p=1.0, scoring="separate"))
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "iif/kept_fraction" in entry]
    assert len(logged) == 2
    for entry in logged:
        assert 0 < entry["iif/kept_fraction"] <= 1
        assert entry["iif/kept_fraction"] == pytest.approx(1 - entry["iif/influence_neg_fraction"])
        assert -1 <= entry["iif/target_split_cos"] <= 1
    assert len(trainer._buffered_inputs[0]["advantages"]) < 16 or logged[-1]["iif/kept_fraction"] == 1


def test_a_step_without_kept_completions_leaves_the_weights(random_adder_dir, tmp_path, caplog):
    """Step 1 keeps informative groups; step 2's rewards are all equal, so DAPO keeps nothing. AdamW would
    still move the weights by its momentum: the step is skipped instead."""
    from transformers import TrainerCallback

    calls = []

    def varied_then_constant(completions, **kwargs):
        calls.append(len(completions))
        return [float(i % 2) if len(calls) == 1 else 0.0 for i in range(len(completions))]

    trainer = make_trainer(random_adder_dir, tmp_path, reward_funcs=[varied_then_constant], max_steps=2,
                           group_filter=GroupFilter("dapo"))
    weights = []

    class AfterEachStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights.append({n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad})

    trainer.add_callback(AfterEachStep())
    trainer.train()
    assert len(weights) == 2 and len(calls) == 2
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
    assert "filtering kept no completion for optimiser step 2; the step is skipped" in caplog.text


# ------------------------------------------------------------------------------------------- group filters
def test_varied_groups_drop_groups_with_equal_rewards():
    rewards = torch.tensor([1.0, 1, 1, 0, 0, 0, 1, 0.5])
    assert varied_groups(rewards, 2).tolist() == [False, False, True, True, False, False, True, True]


def test_group_filters_ignore_nan_rewards_and_float_noise():
    nan = float("nan")
    rewards = torch.tensor([1.0, 1.0 + 1e-9, nan, 0.0, nan, nan, 2.0, nan])
    # float noise is no spread; a NaN reward neither counts nor is kept; one finite reward is no spread either
    assert varied_groups(rewards, 2).tolist() == [False, False, False, False, False, False, False, False]
    assert varied_groups(torch.tensor([nan, 1.0, 0.0, 1.0]), 4).tolist() == [False, True, True, True]
    kept = max_variance_subsets(torch.tensor([0.0, nan, 5.0, 1.0, nan, nan, nan, 3.0]), 4, 2)
    assert kept.tolist() == [True, False, True, False, False, False, False, True]


def test_pods_advantages_are_renormalised_over_the_kept_completions():
    """As in the PODS authors' code: centred on the kept group's mean, divided by its std (Bessel) + 1e-4."""
    rewards = torch.tensor([0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0, 4.0])
    keep = max_variance_subsets(rewards, 4, 2)
    advantages = subset_advantages(rewards, keep, 4, "group")
    for group in range(2):
        rows = torch.arange(4 * group, 4 * group + 4)[keep[4 * group:4 * group + 4]]
        kept = rewards[rows]
        torch.testing.assert_close(advantages[rows], (kept - kept.mean()) / (kept.std() + 1e-4))
    assert (advantages[~keep] == 0).all()
    torch.testing.assert_close(subset_advantages(rewards, keep, 4, "none")[keep], torch.tensor([-1.5, 1.5, -1.0, 1.0]))


def test_max_variance_subsets_match_exhaustive_search():
    generator = torch.Generator().manual_seed(0)
    rewards = torch.randint(0, 4, (5 * 6,), generator=generator).float()
    for keep in (1, 2, 3, 5):
        mask = max_variance_subsets(rewards, 6, keep).view(5, 6)
        for g, group in enumerate(rewards.view(5, 6)):
            best = max(group[list(rows)].var(unbiased=False).item() if keep > 1 else 0.0
                       for rows in itertools.combinations(range(6), keep))
            chosen = group[mask[g]]
            assert len(chosen) == keep
            assert (chosen.var(unbiased=False).item() if keep > 1 else 0.0) == pytest.approx(best)


def parity_reward(prompts, completions, **kwargs):
    """Constant for even first operands (a group with equal rewards), the completion's length otherwise."""
    return [0.0 if int(p.split("+")[0]) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]


def test_iif_after_dapo_scores_the_informative_groups_only(random_adder_dir, tmp_path):
    trainer = make_trainer(random_adder_dir, tmp_path, reward_funcs=[parity_reward], max_completion_length=6,
                           group_filter=GroupFilter("dapo"), iif=GRPOIIFConfig(enabled=True, folds=2))
    rows = [trainer.train_dataset[i] for i in range(8) for _ in range(4)]
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = GRPOTrainer._generate_and_score_completions(trainer, rows)
    informative = varied_groups(trainer._rewards.latest, 4)
    groups = group_ids(trainer.accelerator, 32, trainer.num_generations)
    assert 0 < informative.sum() < 32 and len(set((groups[informative] % 2).tolist())) == 2
    keep, influence, _ = trainer._scoring.decide(trainer.model, batch, informative, groups)
    assert not keep[~informative].any() and influence[~informative].isnan().all()
    sub = batch_rows(batch, informative, 32)
    expected = brute_force_scores(trainer, sub, fold=groups[informative] % 2)
    torch.testing.assert_close(influence[informative], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert keep[informative].equal(expected >= 0)  # neg-bottom, p = 1: the negative ones go


def test_iif_keeps_everything_when_the_batch_has_fewer_prompts_than_folds(random_adder_dir, tmp_path):
    trainer = make_trainer(random_adder_dir, tmp_path, iif=GRPOIIFConfig(enabled=True, folds=2))
    batch = generation_batch(trainer)
    one_group = torch.zeros(16, dtype=torch.bool)
    one_group[4:8] = True
    groups = group_ids(trainer.accelerator, 16, trainer.num_generations)
    keep, influence, metrics = trainer._scoring.decide(trainer.model, batch, one_group, groups)
    assert keep.equal(one_group) and influence.isnan().all() and metrics["filtered"] == 0


@pytest.mark.parametrize("refill", [False, True])
def test_dapo_drops_equal_groups_and_refills(random_adder_dir, tmp_path, refill):
    trainer = make_trainer(random_adder_dir, tmp_path, reward_funcs=[parity_reward], max_completion_length=6,
                           group_filter=GroupFilter("dapo", refill=refill, max_refill_batches=6))
    rows = [trainer.train_dataset[i] for i in range(4) for _ in range(4)]
    even = sum(int(r["prompt"].split("+")[0]) % 2 == 0 for r in rows[::4])
    trainer.model.train()
    cut = trainer._generate_and_score_completions(rows)
    kept = int(cut["iif_kept_rows"])
    refills = trainer._metrics["train"]["iif/refill_batches"][-1]
    if refill:
        assert kept == 16 or refills == 6
    else:
        assert kept <= 16 - 4 * even and refills == 0
    assert (cut["advantages"][:kept] != 0).any()


# ----------------------------------------------------------------------------------------------- bad input
def nan_reward(completions, **kwargs):
    return [float("nan") if i == 0 else 1.0 for i in range(len(completions))]


@pytest.mark.parametrize("kwargs,message", [
    (dict(iif=GRPOIIFConfig(enabled=True, target_source="cached")), "iif.target_source: 'cached'"),
    (dict(iif=GRPOIIFConfig(enabled=True, mode="bottom", p=1.0)), "would drop every completion"),
    (dict(iif=GRPOIIFConfig(enabled=True), top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(iif=GRPOIIFConfig(enabled=True), group_filter=GroupFilter("pods", keep_per_group=2)),
     "iif and group_filter.kind pods: IIF runs after a dapo group filter only"),
    (dict(group_filter=GroupFilter("pods", keep_per_group=4)), "group_filter.keep_per_group: 4"),
    (dict(iif=GRPOIIFConfig(enabled=True, target_source="fresh")), "validation_dataset"),
    (dict(iif=GRPOIIFConfig(enabled=True), loss_type="grpo", entropy_coef=0.01), "entropy_coef / router aux loss"),
    (dict(iif=GRPOIIFConfig(enabled=True), multi_objective_aggregation="normalize_then_sum"),
     "multi_objective_aggregation: filtering needs per-group rewards"),
    (dict(iif=GRPOIIFConfig(enabled=True), loss_type="dapo", entropy_coef=0.01), "trained but not scored"),
    (dict(iif=GRPOIIFConfig(enabled=True), off_policy_mask_threshold=0.5), "off_policy_mask_threshold: masks"),
])
def test_conflicting_settings_are_one_line_errors(random_adder_dir, tmp_path, kwargs, message):
    with pytest.raises(UserError, match=message) as err:
        make_trainer(random_adder_dir, tmp_path, **kwargs)
    assert "\n" not in str(err.value)


def test_refill_needs_whole_groups_on_every_process(random_adder_dir, tmp_path, monkeypatch):
    """12 completions over 2 processes put 6 on each, which splits a group of 4; one process is simulated."""
    from accelerate import Accelerator

    monkeypatch.setattr(Accelerator, "num_processes", property(lambda self: 2))
    with pytest.raises(UserError, match="group_filter.refill: each process's generation batch of 6 completions"):
        make_trainer(random_adder_dir, tmp_path, per_device_train_batch_size=12,
                     group_filter=GroupFilter("dapo", refill=True))


def test_an_async_callable_class_reward_is_left_to_trl():
    from llm_iif.grpo.rewards import checked_reward

    class Judge:
        async def __call__(self, completions, **kwargs):
            return [1.0] * len(completions)

    judge = Judge()
    assert checked_reward(judge, set()) is judge  # wrapped, its coroutine would never be awaited


def test_an_unchecked_trl_version_is_refused(random_adder_dir, tmp_path, monkeypatch):
    import trl

    monkeypatch.setattr(trl, "__version__", "1.17.0")
    with pytest.raises(UserError, match=r"trl 1.17.0: IIFGRPOTrainer overrides GRPOTrainer internals checked for"):
        make_trainer(random_adder_dir, tmp_path)


def test_a_multimodal_model_is_refused_with_filtering(random_adder_dir, tmp_path):
    trainer = make_trainer(random_adder_dir, tmp_path, iif=GRPOIIFConfig(enabled=True))
    trainer._is_vlm = True  # what trl sets for a ProcessorMixin processing class
    with pytest.raises(UserError, match="model: filtering supports text-only models"):
        check_filter_settings(trainer)


def test_validation_rows_are_copied_before_trl_writes_into_them(random_adder_dir, tmp_path):
    """trl merges a rollout_func's extra fields into its input rows: G references to one row would all end up
    with the last completion's value."""
    from datasets import Dataset
    from fixed_completion_run import fixed_completions

    from llm_iif.lm.addition import addition_problems

    seen = []

    def tagged(prompts, trainer):
        return {**fixed_completions(prompts, trainer), "tag": list(range(len(prompts)))}

    def tag_reward(completions, tag, **kwargs):
        seen.append(list(tag))
        return [0.0] * len(completions)

    validation = Dataset.from_list(addition_problems(8, seed=5))
    trainer = make_trainer(random_adder_dir, tmp_path, rollout_func=tagged, reward_funcs=[tag_reward],
                           validation_dataset=validation,
                           iif=GRPOIIFConfig(enabled=True, target_source="fresh", val_size=8))
    trainer.model.train()
    trainer._validation_batch([validation[0], validation[1]])
    assert seen[-1] == list(range(8))


def test_validation_set_without_prompts(random_adder_dir, tmp_path):
    from datasets import Dataset

    data = Dataset.from_list([{"question": "1+1=", "answer": "2"}] * 4)
    with pytest.raises(UserError, match="validation_dataset: .*'prompt' column .*question, answer"):
        make_trainer(random_adder_dir, tmp_path, validation_dataset=data,
                     iif=GRPOIIFConfig(enabled=True, target_source="fresh", val_size=4))


def test_model_without_trainable_layers(random_adder_dir, tmp_path):
    """LoRA on the embedding only: no trainable lora_A/lora_B Linear layers and no trainable nn.Linear."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from llm_iif.grpo import IIFGRPOTrainer
    from llm_iif.lm.addition import addition_problems, exact_match_reward

    with pytest.raises(UserError, match="iif: the model has no trainable peft LoRA layers and no trainable nn.Linear"):
        IIFGRPOTrainer(model=str(random_adder_dir), reward_funcs=[exact_match_reward], args=grpo_args(tmp_path),
                       train_dataset=Dataset.from_list(addition_problems(16, seed=0)),
                       processing_class=AutoTokenizer.from_pretrained(random_adder_dir),
                       peft_config=LoraConfig(r=2, target_modules=["wte"], task_type="CAUSAL_LM"),
                       iif=GRPOIIFConfig(enabled=True))


def test_nan_reward_stops_training_after_the_patience(random_adder_dir, tmp_path):
    trainer = make_trainer(random_adder_dir, tmp_path, reward_funcs=[nan_reward], max_steps=2,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch"))
    with pytest.raises(UserError, match=r"reward: NaN or inf for 1 of 16 completions \(1 round\(s\) in a row\)"):
        trainer.train()
    patient = make_trainer(random_adder_dir, tmp_path, reward_funcs=[nan_reward], max_steps=2, nonfinite_patience=2,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch"))
    patient.train()
    logged = [e for e in patient.state.log_history if "iif/nonfinite_reward" in e]
    assert [e["iif/nonfinite_reward"] for e in logged] == [1, 1]
    assert all(e["iif/kept_fraction"] <= 15 / 16 for e in logged)


# ----------------------------------------------------------------------------------------------- processes
def run_fixed_completions(model_dir, out, processes, *mode):
    """tests/grpo/fixed_completion_run.py, as one process or under `accelerate launch`; the kept completions
    of its first run (none in ``compare`` mode, which writes into out/ddp and out/fsdp2)."""
    script = os.path.join(os.path.dirname(__file__), "fixed_completion_run.py")
    launch = launch_command(script, processes)
    out.mkdir()
    proc = subprocess.run([*launch, str(model_dir), str(out), str(processes), *mode], capture_output=True,
                          text=True,
                          timeout=600, env={**os.environ, "ACCELERATE_USE_CPU": "1",
                                            "PYTHONPATH": os.path.dirname(__file__)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "kept.json").read_text()) if not mode else None


def test_two_processes_keep_what_one_keeps_and_end_with_identical_weights(random_adder_dir, tmp_path):
    """On fixed completions, 2 CPU processes score the same 16 completions, keep the same 8 and train to the
    same weights as one process; both ranks hold identical weights."""
    one = run_fixed_completions(random_adder_dir, tmp_path / "one", 1)
    two = run_fixed_completions(random_adder_dir, tmp_path / "two", 2)
    assert len(one) == len(two) == 2
    for step_one, step_two in zip(one, two):
        assert step_one == step_two
        assert sum(kept for _, kept in step_one) == 8
    rank0, rank1 = (torch.load(tmp_path / "two" / f"weights_rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "one" / "weights_rank0.pt")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name])
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-6)
    # with gradient accumulation, 2 processes score every completion as one does (to 1e-4), in-run scoring too
    scores_one, scores_two = (json.loads((tmp_path / run / "scores.json").read_text()) for run in ("one", "two"))
    for loss_type, rows in scores_one.items():
        assert [text for text, _ in rows] == [text for text, _ in scores_two[loss_type]]
        one_values, two_values = (torch.tensor([v for _, v in r]) for r in (rows, scores_two[loss_type]))
        assert one_values.abs().max() > 0, loss_type
        torch.testing.assert_close(two_values, one_values, rtol=1e-4, atol=1e-4 * one_values.abs().max().item())
    # DAPO with refill: each process keeps at most its own batch of 8, however its refills went
    for rank in (0, 1):
        [(rows, kept)] = json.loads((tmp_path / "two" / f"dapo_rows_rank{rank}.json").read_text())
        assert rows >= 8 and kept == 8, (rank, rows, kept)


def test_fsdp2_scores_filters_and_trains_as_ddp(random_adder_dir, tmp_path):
    """2 CPU processes, the LoRA model sharded by FSDP2 around each GPT2Block: over 2 steps on fixed completions
    (the batch target; step 2 Adam-preconditioned) the same influence as DDP to 1e-5 of the largest score, the
    same kept completions, and the same weights after the 2 steps."""
    run_fixed_completions(random_adder_dir, tmp_path / "runs", 2, "compare")
    sharded, ddp = (json.loads((tmp_path / "runs" / run / "kept.json").read_text()) for run in ("fsdp2", "ddp"))
    assert len(sharded) == len(ddp) == 2 and sharded == ddp
    scores = [json.loads((tmp_path / "runs" / run / "scores.json").read_text()) for run in ("fsdp2", "ddp")]
    for step_sharded, step_ddp in zip(*scores):
        assert [text for text, _ in step_sharded] == [text for text, _ in step_ddp] and len(step_ddp) == 16
        values, expected = (torch.tensor([v for _, v in step]) for step in (step_sharded, step_ddp))
        assert (expected != 0).sum() >= 8  # completions of groups whose rewards differ
        assert (values - expected).abs().max() <= 1e-5 * expected.abs().max()
    rank0, rank1, reference = (torch.load(tmp_path / "runs" / run / f"weights_rank{r}.pt")
                               for run, r in (("fsdp2", 0), ("fsdp2", 1), ("ddp", 0)))
    for name in reference:
        assert torch.equal(rank0[name], rank1[name])
        torch.testing.assert_close(rank0[name], reference[name], rtol=1e-5, atol=1e-6)


def test_scoring_leaves_the_accumulation_windows_gradient_sync_off(random_adder_dir, tmp_path):
    """transformers' Trainer runs each micro-batch but the last of an accumulation window inside
    ``accelerator.no_sync``, and trl generates and scores inside the first. Accelerate's FSDP2 ``no_sync`` sets
    the model's gradient sync off on entry and on at exit, whatever it was before, so scoring inside a
    ``no_sync`` of its own made the first micro-batch's backward reduce-scatter early. A stand-in with the same
    semantics (Accelerate's FSDP2 branch) records the sync state at every training backward."""
    from contextlib import contextmanager

    trainer = make_trainer(random_adder_dir, tmp_path, max_steps=1, steps_per_generation=2,
                           gradient_accumulation_steps=2, per_device_train_batch_size=8,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch", mode="bottom", p=0.5))
    accelerator, gradient_sync, synced_at_backward = trainer.accelerator, [True], []

    @contextmanager
    def fsdp2_no_sync(model):
        gradient_sync[0] = False
        try:
            yield
        finally:
            gradient_sync[0] = True

    def recording_backward(loss, backward=accelerator.backward, **kwargs):
        synced_at_backward.append(gradient_sync[0])
        return backward(loss, **kwargs)

    accelerator.no_sync, accelerator.backward = fsdp2_no_sync, recording_backward
    trainer.train()
    assert [e["iif/kept_fraction"] for e in trainer.state.log_history if "iif/kept_fraction" in e] == [0.5]
    assert synced_at_backward == [False, True]  # held back in the window's first micro-batch, reduced at its last


def test_trl_buffering_features_keep_working(random_adder_dir, tmp_path):
    """steps_per_generation, gradient accumulation, num_iterations, scale_rewards and a row-mean loss_type with
    filtering: one generation (and one filter decision) per 2 × 2 micro-steps, every step on kept rows."""
    trainer = make_trainer(random_adder_dir, tmp_path, max_steps=4, steps_per_generation=2,
                           gradient_accumulation_steps=2, num_iterations=2, per_device_train_batch_size=8,
                           scale_rewards="batch", loss_type="grpo", beta=0.05,
                           iif=GRPOIIFConfig(enabled=True, target_source="batch", mode="bottom", p=0.5))
    trainer.train()
    assert trainer.state.global_step == 4
    decisions = [e for e in trainer.state.log_history if "iif/kept_fraction" in e]
    assert len(decisions) == 2  # 8 micro-steps, one generation per steps_per_generation × num_iterations = 4
    assert all(d["iif/kept_fraction"] == 0.5 for d in decisions)  # 16 completions, 8 kept
    assert [len(chunk["advantages"]) for chunk in trainer._buffered_inputs] == [4, 4]
    assert all(chunk["iif_kept_rows"].item() == 8 for chunk in trainer._buffered_inputs)
