"""Peak memory of IIF's two passes against a plain forward and backward, under DDP and under FSDP2, and of a
checkpoint save under FSDP2.

    .venv/bin/python benchmarks/sharded_scoring_memory.py [--layers 4] [--width 256] [--repeats 3]
                                                          [--part passes|save|all]

Launches itself on 2 CPU processes (``accelerate launch``, gloo). The model is GPT-2 shaped, made here with
random weights (``--layers`` blocks of width ``--width``, vocabulary 512), with LoRA on c_attn, c_proj and
c_fc. For batch (rows per process), sequence length and LoRA rank, each at two sizes, and for each data
parallelism, every process measures how far its resident memory rises above its level before a pass
(Linux's peak RSS, reset through /proc/self/clear_refs; freed heap is handed back first, so a pass cannot
hide in memory an earlier one left behind):

- ``train``: forward and backward of the rows' summed token loss, as one update step (no optimiser);
- ``target``: the target gradient over the same rows (`target_gradient_parts`, two halves, as the stage);
- ``score``: their influence scores against a target (`influence_scores`, one chunk of all rows).

Each pass runs ``--repeats`` times in turn; the median rise counts. Prints rank 0's MB and the ratios
target / train and score / train (rank 1 sees the same shapes), and the bytes of the model's weights each
process holds. Scores and targets are exact under both (tested in
tests/training/test_trainer.py and tests/grpo/test_grpo_trainer.py); this measures memory only.

The save part shards models of two widths (``SAVE_WIDTHS``; ``--layers`` blocks) at two LoRA ranks with FSDP2,
takes one AdamW step so that the optimizer holds state, and measures rank 0's rise while it gathers a
checkpoint in two ways, each with the optimizer's state:

- ``whole model``: every parameter, frozen base weights included (what a save gathered before 2026-12-07);
- ``trainable``: the trainable parameters only (`whole_state`, what a save gathers now).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import itertools
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from llm_iif.core.distributed import is_dtensor, shard_with_fsdp2, whole_state
from llm_iif.core.tokens import response_logprobs

SIZES = {"batch": (4, 16), "sequence": (64, 256), "rank": (8, 64)}
PASSES = ("train", "target", "score")
SAVE_WIDTHS = (256, 1024)
GATHERS = ("whole model", "trainable")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--part", choices=("passes", "save", "all"), default="all")
    args = parser.parse_args()
    if "LOCAL_RANK" not in os.environ:  # relaunch on 2 processes
        accelerate = Path(sys.executable).parent / "accelerate"
        command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", __file__, *sys.argv[1:]]
        sys.exit(subprocess.run(command, env={**os.environ, "ACCELERATE_USE_CPU": "1"}).returncode)
    from accelerate import PartialState

    state = PartialState(cpu=True)
    torch.set_num_threads(1)  # 2 processes on 2 cores
    if args.part in ("passes", "all"):
        measure_passes(state, args.layers, args.width, args.repeats)
    if args.part in ("save", "all"):
        measure_saves(state, args.layers, args.repeats)
    state.destroy_process_group()


def measure_passes(state, layers: int, width: int, repeats: int) -> None:
    rows = []
    for parallelism in ("ddp", "fsdp2"):
        for rank in SIZES["rank"]:
            model = lora_model(layers, width, rank)
            wrapped = shard(model, parallelism)
            held = sum((p.to_local() if is_dtensor(p) else p).numel() * p.element_size() for p in model.parameters())
            for batch, sequence in itertools.product(SIZES["batch"], SIZES["sequence"]):
                ids = torch.randint(0, 512, (batch, sequence), generator=torch.Generator().manual_seed(batch))
                rises = {name: [] for name in PASSES}
                for _, name in itertools.product(range(repeats), PASSES):
                    rises[name].append(peak_rise(lambda: run_pass(name, wrapped, model, ids)))
                peaks = {name: statistics.median(values) for name, values in rises.items()}
                rows.append((parallelism, rank, batch, sequence, held, peaks))
            del model, wrapped
            gc.collect()
    if state.is_main_process:
        print_table(rows, layers, width)


def measure_saves(state, layers: int, repeats: int) -> None:
    """Rank 0's peak rise while it gathers a checkpoint of an FSDP2 model, the whole model or its trainable
    parameters, with AdamW's state, for each width in ``SAVE_WIDTHS`` and LoRA rank."""
    rows = []
    for width, rank in itertools.product(SAVE_WIDTHS, SIZES["rank"]):
        model = lora_model(layers, width, rank)
        shard(model, "fsdp2")
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        run_pass("train", model, model, ids, keep_grads=True)
        optimizer.step()  # the optimizer now holds state to save
        whole = sum(p.numel() * p.element_size() for p in model.parameters())  # global shapes
        gathered = {name: tensor_bytes(gather_checkpoint(name, model, optimizer)) for name in GATHERS}
        rises = {name: [] for name in GATHERS}
        for _, name in itertools.product(range(repeats), GATHERS):
            rises[name].append(peak_rise(lambda: gather_checkpoint(name, model, optimizer)))
        rows.append((width, rank, whole, gathered, {name: statistics.median(v) for name, v in rises.items()}))
        del model, optimizer
        gc.collect()
    if state.is_main_process:
        print_save_table(rows, layers)


def gather_checkpoint(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(weights, optimizer state) with whole tensors on rank 0: ``name`` "trainable" or "whole model"."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    if name == "trainable":
        return whole_state(model, optimizer)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options), get_optimizer_state_dict(model, optimizer, options=options)


def tensor_bytes(state) -> int:
    """Bytes of every tensor in a nested state of dicts, lists and tuples."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(tensor_bytes(value) for value in state.values())
    if isinstance(state, (list, tuple)):
        return sum(tensor_bytes(value) for value in state)
    return 0


def lora_model(layers: int, width: int, rank: int) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=512, n_positions=512, n_embd=width, n_layer=layers, n_head=4, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = get_peft_model(GPT2LMHeadModel(config), LoraConfig(r=rank, lora_alpha=2 * rank, fan_in_fan_out=True,
                                                               target_modules=["c_attn", "c_proj", "c_fc"]))
    model.eval()
    return model


def shard(model: torch.nn.Module, parallelism: str) -> torch.nn.Module:
    """The module a training step calls: DDP around ``model``, or ``model`` itself sharded in place."""
    if parallelism == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    shard_with_fsdp2(model, ["GPT2Block"], generating=model.get_base_model())
    return model


def run_pass(name: str, wrapped: torch.nn.Module, model: torch.nn.Module, ids: torch.Tensor,
             keep_grads: bool = False) -> None:
    from llm_iif.attribution.influence import TargetBatch, influence_scores, target_gradient_parts

    mask = torch.ones_like(ids)
    if name == "train":
        token_logprobs(wrapped, ids[:, :1], mask[:, :1], ids[:, 1:], mask[:, 1:]).sum().neg().backward()
        if not keep_grads:
            model.zero_grad(set_to_none=True)
        return
    rows = TargetBatch(ids[:, :1], mask[:, :1], ids[:, 1:], mask[:, 1:], mask[:, 1:].float())
    if name == "target":
        target_gradient_parts(model, rows, token_logprobs, torch.arange(len(ids)) % 2, 2, len(ids))
        return
    target = {n: torch.ones(p.shape) for n, p in model.named_parameters() if p.requires_grad}  # whole shapes

    def loss(m, chunk):
        return -token_logprobs(m, rows.query_ids[chunk], rows.query_mask[chunk], rows.response_ids[chunk],
                               rows.response_mask[chunk]).sum(dim=1)

    influence_scores(model, loss, len(ids), target, len(ids), torch.device("cpu"))


def token_logprobs(model, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
    """[b, T] log π(y_t | x, y_<t) of the responses."""
    ids = torch.cat([query_ids, response_ids], dim=1)
    logits = model(input_ids=ids, attention_mask=torch.cat([query_mask, response_mask], dim=1)).logits
    return response_logprobs(logits, response_ids, temperature=1.0)


def peak_rise(run) -> int:
    """Bytes by which this process's peak resident memory during ``run()`` exceeds its level before it."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kb("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    run()
    return (status_kb("VmHWM") - before) * 1024


def status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def print_table(rows: list, layers: int, width: int) -> None:
    mb = 2 ** 20
    print(f"GPT-2 shaped, {layers} layers × width {width}, vocabulary 512, LoRA on c_attn/c_proj/c_fc; "
          "2 processes; rank 0's peak rise over its level before each pass")
    print(f"{'parallelism':<12}{'rank':>5}{'batch':>6}{'seq':>5}{'weights MB':>11}"
          + "".join(f"{name + ' MB':>11}" for name in PASSES) + f"{'target/train':>14}{'score/train':>13}")
    for parallelism, rank, batch, sequence, held, peaks in rows:
        print(f"{parallelism:<12}{rank:>5}{batch:>6}{sequence:>5}{held / mb:>11.1f}"
              + "".join(f"{peaks[name] / mb:>11.1f}" for name in PASSES)
              + f"{peaks['target'] / peaks['train']:>14.2f}{peaks['score'] / peaks['train']:>13.2f}")


def print_save_table(rows: list, layers: int) -> None:
    mb = 2 ** 20
    print(f"\nCheckpoint gather under FSDP2: GPT-2 shaped, {layers} layers, vocabulary 512, LoRA on c_attn/c_proj/"
          "c_fc, AdamW state included; 2 processes; rank 0's peak rise over its level before the gather")
    print(f"{'width':>6}{'rank':>5}{'model MB':>10}"
          + "".join(f"{name + ' gathered MB':>26}{'rise MB':>9}" for name in GATHERS) + f"{'rise ratio':>12}")
    for width, rank, whole, gathered, rises in rows:
        print(f"{width:>6}{rank:>5}{whole / mb:>10.1f}"
              + "".join(f"{gathered[name] / mb:>26.1f}{rises[name] / mb:>9.1f}" for name in GATHERS)
              + f"{rises['trainable'] / rises['whole model']:>12.3f}")


if __name__ == "__main__":
    main()
