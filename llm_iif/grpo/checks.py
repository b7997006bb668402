"""The settings checks of `IIFGRPOTrainer`: one-line `UserError`s for trl settings that filtering, or
in-run scoring, cannot honour. They read the trainer's trl settings once trl's ``__init__`` has run."""

from __future__ import annotations

from llm_iif.attribution.gradients import scored_layers, scored_parameters, trainable_outside
from llm_iif.attribution.stage import active_dropout
from llm_iif.core.distributed import check_scoring_supported, gradients_held_elsewhere
from llm_iif.core.errors import UserError
from llm_iif.grpo.losses import RESCALED_LOSSES, SUPPORTED_LOSSES
from llm_iif.lm.trusted import TrustedTriples
from llm_iif.recipes import GRPOIIFConfig


def check_filter_settings(trainer) -> None:
    """One-line errors for ``trainer``'s settings that conflict with filtering (an `IIFGRPOTrainer`, once trl's
    part of it is built)."""
    iif, args = trainer.iif, trainer.args
    if iif is None and trainer.group_filter is None:
        return
    if iif is not None and trainer.group_filter is not None and trainer.group_filter.kind != "dapo":
        raise UserError(f"iif and group_filter.kind {trainer.group_filter.kind}: IIF runs after a dapo group filter "
                        "only (expected group_filter.kind dapo, or one filter)")
    if trainer._is_vlm:
        raise UserError("model: filtering supports text-only models; this processing class is a multimodal "
                        "processor")
    if trainer.loss_type not in SUPPORTED_LOSSES:
        raise UserError(f"loss_type: '{trainer.loss_type}' is not supported with filtering "
                        f"(expected one of {', '.join(SUPPORTED_LOSSES)})")
    if trainer.loss_type in RESCALED_LOSSES and (trainer._entropy_bonus_enabled or trainer.aux_loss_enabled):
        raise UserError(f"entropy_coef / router aux loss: loss_type '{trainer.loss_type}' is rescaled to the kept "
                        "completions, which would rescale these terms too; use loss_type dapo")
    if trainer.multi_objective_aggregation != "sum_then_normalize":
        raise UserError("multi_objective_aggregation: filtering needs per-group rewards "
                        "(expected sum_then_normalize)")
    if trainer.group_filter is not None:
        kind = trainer.group_filter.kind
        if kind not in ("dapo", "pods"):
            raise UserError(f"group_filter.kind: '{kind}' (expected dapo or pods)")
        if kind == "pods" and not 1 <= trainer.group_filter.keep_per_group < trainer.num_generations:
            raise UserError(f"group_filter.keep_per_group: {trainer.group_filter.keep_per_group} would keep no "
                            f"or every completion; expected 1..{trainer.num_generations - 1}")
        if trainer.group_filter.max_refill_batches < 0:
            raise UserError("group_filter.max_refill_batches: expected 0 or more")
        per_process = args.generation_batch_size // trainer.accelerator.num_processes
        if kind == "dapo" and trainer.group_filter.refill and per_process % trainer.num_generations:
            raise UserError(f"group_filter.refill: each process's generation batch of {per_process} completions "
                            f"must hold whole groups (expected a multiple of num_generations = "
                            f"{trainer.num_generations})")
        if iif is None:
            return
    if iif.mode != "random":
        check_scoring_supported(trainer.accelerator)
    if iif.target_source not in ("batch", "fresh"):
        raise UserError(f"iif.target_source: '{iif.target_source}' is not available for GRPO "
                        "(expected batch or fresh)")
    groups = args.generation_batch_size // trainer.num_generations  # per generation batch, over all processes
    if iif.target_source == "batch" and iif.folds > groups:
        raise UserError(f"iif.folds: {iif.folds} folds of a generation batch of {groups} prompts (folds take "
                        f"whole groups of {trainer.num_generations} completions); expected at most {groups}")
    if iif.mode in ("bottom", "random") and iif.p >= 1.0:
        raise UserError(f"iif.p: {iif.p} with iif.mode {iif.mode} would drop every completion; expected p < 1")
    if args.top_entropy_quantile < 1.0:
        raise UserError("top_entropy_quantile: < 1 masks tokens per micro-batch after scoring; the scores "
                        "would not match the update (expected 1.0 with iif)")
    # Terms of trl's loss that the scored per-completion loss (llm_iif.grpo.losses) leaves out.
    if trainer._entropy_bonus_enabled or trainer.aux_loss_enabled:
        raise UserError("entropy_coef / router aux loss: these terms are trained but not scored; expected "
                        "entropy_coef 0 and no router aux loss with iif")
    if trainer.off_policy_mask_threshold is not None:
        raise UserError("off_policy_mask_threshold: masks sequences per micro-batch after scoring; the scores "
                        "would not match the update (expected null with iif)")
    if trainer.loss_type == "vespo" and trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        raise UserError("loss_type: vespo weighs completions by vLLM's importance-sampling ratio, which IIF's "
                        "scores leave out; use another loss_type or vllm_importance_sampling_correction: false")
    try:
        scored_layers(trainer.accelerator.unwrap_model(trainer.model))
    except ValueError as err:
        raise UserError(f"iif: {err}; pass a peft_config or leave some nn.Linear layers trainable") from err
    if iif.target != "preference" and iif.target_source == "fresh":
        check_validation(trainer, iif)

def in_run_obstacle(trainer) -> str | None:
    """The one-line error for a setting of ``trainer`` that in-run scoring cannot honour (`llm_iif.grpo.in_run`),
    or None."""
    iif, args = trainer.iif, trainer.args
    separate = "; or set iif.scoring: separate"
    model = trainer.accelerator.unwrap_model(trainer.model)
    if iif.mode == "random":
        return ("iif.scoring: in-run with iif.mode random: random dropping scores nothing; expected "
                "iif.scoring: separate")
    if trainer.num_iterations != 1:
        return (f"num_iterations: {trainer.num_iterations}; in-run scoring takes its scores from the first "
                f"update's backward, and later iterations train at moved parameters: expected 1{separate}")
    if args.steps_per_generation != args.gradient_accumulation_steps:
        return (f"steps_per_generation: {args.steps_per_generation} with gradient_accumulation_steps "
                f"{args.gradient_accumulation_steps}; in-run scoring decides before the generation batch's "
                f"one optimiser step: expected them equal{separate}")
    if trainer.beta != 0.0 and iif.target_source == "batch":
        return (f"beta: {trainer.beta} with iif.target_source batch; in-run scoring builds the batch target "
                f"from the policy term's gradient, which the KL term changes: expected beta 0{separate}")
    if trainer.dpo_coef:
        return (f"trusted.dpo_coef: {trainer.dpo_coef}; the DPO term runs through the scored layers in "
                f"the same backward: expected 0 with in-run scoring{separate}")
    if trainer.use_vllm:
        return f"use_vllm: in-run scoring is not run with vLLM's importance-sampling ratios{separate}"
    held_elsewhere = gradients_held_elsewhere(trainer.accelerator, model)
    if held_elsewhere:
        return held_elsewhere + separate
    dropout = active_dropout(model)
    if dropout and not args.disable_dropout:
        return (f"disable_dropout: false with dropout p={dropout} in the model; in-run scores would "
                f"carry the update's dropout noise: expected disable_dropout: true{separate}")
    unscored = trainable_outside(model, scored_parameters(model).values())
    if unscored:
        return (f"iif.scoring: in-run corrects the scored (LoRA) parameters' gradient only, and "
                f"'{unscored[0]}' is trainable too ({len(unscored)} such){separate}")
    return None

def check_validation(trainer, iif: GRPOIIFConfig) -> None:
    """``validation_dataset`` fits ``iif.target_source: fresh``."""
    data, per_round = trainer.validation_dataset, trainer.num_generations * trainer.accelerator.num_processes
    if data is None or len(data) == 0 or "prompt" not in data.column_names:
        columns = "none" if data is None else ", ".join(data.column_names) or "none"
        raise UserError(f"validation_dataset: iif.target_source fresh needs validation rows with a 'prompt' "
                        f"column (got columns: {columns})")
    if iif.val_size % per_round:
        raise UserError(f"iif.val_size: {iif.val_size} completions; expected a multiple of num_generations × "
                        f"processes = {per_round}")

def check_preferences(iif: GRPOIIFConfig, trusted: TrustedTriples | None, processes: int) -> None:
    """This process's share of the ``trusted`` triples fits ``iif.target: preference``."""
    if iif.target_source != "fresh":
        raise UserError(f"iif.target_source: '{iif.target_source}' with iif.target preference; expected fresh "
                        "(the training batch holds no preferences)")
    if trusted is None:
        raise UserError("trusted: iif.target preference needs trusted (prompt, chosen, rejected) triples; "
                        "expected a trusted set (a recipe's trusted section, the trainer's trusted argument)")
    if trusted.size % 2:
        raise UserError(f"trusted.size: {trusted.size * processes} triples give each of {processes} "
                        "process(es) an odd number; expected an even number per process (the preference "
                        "target's two halves take whole triples)")
