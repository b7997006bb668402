"""Train IIF-GRPO on fixed completions, then save each step's kept completions and this process's weights;
then one step of DAPO with refill, saving how many rows each process kept; then, for three loss types (one of
each normaliser: per completion, per micro-batch token mean rescaled, per batch token sum), one step with
gradient accumulation, saving every completion's influence score, and the same with in-run scoring for two.

``python tests/grpo/fixed_completion_run.py MODEL_DIR OUT_DIR PROCESSES [compare]``, as one process or under
``accelerate launch``. With ``compare``, instead: two IIF steps with Adam-preconditioned scores on a LoRA
adapter made here, under DDP into OUT_DIR/ddp and then sharded with FSDP2 around each GPT2Block (as
Accelerate's FSDP2 plugin shards on GPUs) into OUT_DIR/fsdp2, saving every completion's influence score too. Completions come from trl's ``rollout_func``
hook and depend only on the prompt and the completion's place in its group, so runs with different process
counts train on the same completions.
"""

import gc
import json
import sys
import zlib
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
import grpo_setup
from grpo_setup import make_trainer

from llm_iif.recipes import GRPOIIFConfig
from llm_iif.grpo import GroupFilter, IIFGRPOTrainer

GLOBAL_BATCH = 16
SCORED_LOSS_TYPES = ("grpo", "bnpo", "dapo")
IN_RUN_LOSS_TYPES = ("grpo", "dapo")


def fixed_completions(prompts, trainer):
    """Per prompt: 1-4 digits drawn from a generator seeded by the prompt text and the completion's index
    in its group, then EOS."""
    tokenizer = trainer.processing_class
    prompt_ids, completion_ids, seen = [], [], {}
    for prompt in prompts:
        k = seen[prompt] = seen.get(prompt, -1) + 1
        generator = torch.Generator().manual_seed(zlib.crc32(f"{prompt}|{k}".encode()))
        length = int(torch.randint(1, 5, (1,), generator=generator))
        digits = "".join(str(int(d)) for d in torch.randint(0, 10, (length,), generator=generator))
        prompt_ids.append(tokenizer(prompt)["input_ids"])
        completion_ids.append(tokenizer(digits)["input_ids"] + [tokenizer.eos_token_id])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None}


def length_when_odd(prompts, completions, **kwargs):
    """Constant for even first operands (a group DAPO drops), the completion's length otherwise."""
    return [0.0 if int(p.split("+")[0]) % 2 == 0 else float(len(c)) for p, c in zip(prompts, completions)]


def completion_length(prompts, completions, **kwargs):
    return [float(len(c)) for c in completions]


class RecordingTrainer(IIFGRPOTrainer):
    """Records every step's kept completions and their influence, by prompt and completion text, over all
    processes, and this process's (rows, kept rows) before the cut, from its generation records."""
    kept_by_step: list = []
    scores_by_step: list = []
    rows_by_step: list = []

    def _log_filter_round(self, metrics, kept, batch_size, seconds):
        records = self.generation_records  # this process's rows before the cut, refills included
        self.rows_by_step.append((len(records), sum(r["kept"] for r in records)))
        self.kept_by_step.append(sorted(gather_object([(r["prompt"] + "|" + r["response"], r["kept"])
                                                       for r in records])))
        self.scores_by_step.append(sorted(gather_object([(r["prompt"] + "|" + r["response"], r["influence"])
                                                         for r in records])))
        super()._log_filter_round(metrics, kept, batch_size, seconds)


class ShardedTrainer(RecordingTrainer):
    """Leaves a model sharded beforehand where it is: transformers' Trainer would move it, which FSDP2's
    DTensors refuse."""

    def _move_model_to_device(self, model, device):
        pass


def data_parallel_run(model_dir: Path, out: Path, processes: int, parallelism: str) -> None:
    """Two IIF steps on a LoRA adapter built here (the same initialisation for both kinds), under DDP or FSDP2;
    saves the kept completions, every completion's influence and this process's whole weights."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from llm_iif.core.distributed import is_sharded, shard_with_fsdp2, whole_tensor

    for recorded in (RecordingTrainer.kept_by_step, RecordingTrainer.scores_by_step, RecordingTrainer.rows_by_step):
        recorded.clear()
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), grpo_setup.lora_config())
    grpo_setup.IIFGRPOTrainer = RecordingTrainer
    if parallelism == "fsdp2":
        shard_with_fsdp2(model, ["GPT2Block"], generating=model.get_base_model())
        model._is_accelerate_prepared = True  # no DDP wrap: Accelerate's own FSDP2 would not add one either
        grpo_setup.IIFGRPOTrainer = ShardedTrainer
    out.mkdir(exist_ok=True)  # by every process
    trainer = make_trainer(model_dir, out, model=model, max_steps=2,
                           per_device_train_batch_size=GLOBAL_BATCH // processes, rollout_func=fixed_completions,
                           reward_funcs=[completion_length],  # differs within groups: nonzero scores
                           iif=GRPOIIFConfig(enabled=True, target_source="batch", folds=2, mode="bottom", p=0.5,
                                             precondition="adam", scoring="separate"))
    trainer.train()
    assert is_sharded(trainer.model) == (parallelism == "fsdp2")
    preconditioned = [e["iif/preconditioned"] for e in trainer.state.log_history if "iif/preconditioned" in e]
    assert preconditioned == [0, 1], preconditioned  # no Adam state before the first step
    weights = {n: whole_tensor(p).detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
    torch.save(weights, out / f"weights_rank{trainer.accelerator.process_index}.pt")
    if trainer.accelerator.is_main_process:
        (out / "kept.json").write_text(json.dumps(RecordingTrainer.kept_by_step))
        (out / "scores.json").write_text(json.dumps(RecordingTrainer.scores_by_step))
    del trainer, model
    gc.collect()


if __name__ == "__main__":
    model_dir, out, processes = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    grpo_setup.IIFGRPOTrainer = RecordingTrainer  # make_trainer builds this subclass
    if sys.argv[4:] == ["compare"]:
        for parallelism in ("ddp", "fsdp2"):
            data_parallel_run(model_dir, out / parallelism, processes, parallelism)
        PartialState().destroy_process_group()
        sys.exit(0)
    trainer = make_trainer(model_dir, out, max_steps=2, per_device_train_batch_size=GLOBAL_BATCH // processes,
                           rollout_func=fixed_completions,
                           reward_funcs=[completion_length],  # differs within groups: a target that is not 0
                           iif=GRPOIIFConfig(enabled=True, target_source="batch", folds=2, mode="bottom", p=0.5,
                                             scoring="separate"))
    trainer.train()
    accelerator = trainer.accelerator
    weights = {n: p.detach().cpu() for n, p in trainer.model.named_parameters() if p.requires_grad}
    torch.save(weights, out / f"weights_rank{accelerator.process_index}.pt")
    if accelerator.is_main_process:
        (out / "kept.json").write_text(json.dumps(RecordingTrainer.kept_by_step))
    RecordingTrainer.rows_by_step.clear()
    dapo = make_trainer(model_dir, out / "dapo", max_steps=1, per_device_train_batch_size=GLOBAL_BATCH // processes,
                        rollout_func=fixed_completions, reward_funcs=[length_when_odd],
                        group_filter=GroupFilter("dapo", refill=True, max_refill_batches=4))
    dapo.train()
    (out / f"dapo_rows_rank{accelerator.process_index}.json").write_text(json.dumps(RecordingTrainer.rows_by_step))
    scores = {}
    for loss_type in SCORED_LOSS_TYPES:
        scored = make_trainer(model_dir, out / loss_type, max_steps=1, loss_type=loss_type, beta=0.1,
                              steps_per_generation=2, gradient_accumulation_steps=2,
                              per_device_train_batch_size=GLOBAL_BATCH // processes // 2,
                              rollout_func=fixed_completions, reward_funcs=[completion_length],
                              iif=GRPOIIFConfig(enabled=True, target_source="batch", folds=2, mode="bottom", p=0.5,
                                                scoring="separate"))
        scored.train()
        rows = [(r["prompt"] + "|" + r["response"], r["influence"]) for r in scored.generation_records]
        scores[loss_type] = sorted(gather_object(rows))
    for loss_type in IN_RUN_LOSS_TYPES:  # in-run scoring: the scores from the update's backward (beta 0)
        scored = make_trainer(model_dir, out / f"in-run-{loss_type}", max_steps=1, loss_type=loss_type,
                              steps_per_generation=2, gradient_accumulation_steps=2,
                              per_device_train_batch_size=GLOBAL_BATCH // processes // 2,
                              rollout_func=fixed_completions, reward_funcs=[completion_length],
                              iif=GRPOIIFConfig(enabled=True, target_source="batch", folds=2, mode="bottom", p=0.5,
                                                scoring="in-run"))
        scored.train()
        rows = [(r["prompt"] + "|" + r["response"], r["influence"]) for r in scored.generation_records]
        scores[f"in-run {loss_type}"] = sorted(gather_object(rows))
    if accelerator.is_main_process:
        (out / "scores.json").write_text(json.dumps(scores))
    del trainer, dapo, scored  # their DDP models must go while the process group exists: gloo's threads abort
    gc.collect()               # the process at exit if they outlive it
    accelerator.end_training()
