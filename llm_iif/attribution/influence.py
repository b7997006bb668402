"""Target gradients and influence scores over a model's trainable LoRA parameters (or, without LoRA, its
trainable Linear layers: `scored_layers`).

Every target has the same shape,

    f(θ) = (1/N) Σ_v Σ_t w_{v,t} · log π_θ(y_{v,t} | x_v, y_{v,<t}),

and differs only in its token weights w. The functions take the model unwrapped (no DDP) and never touch
parameter ``.grad`` fields, so nothing here synchronises processes; `llm_iif.attribution.stage` reduces the
target and gathers the scores.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from llm_iif.attribution.gradients import LayerGradientCapture, scored_layers, scored_parameters, whole_shape
from llm_iif.core.preference import preference_token_weights


@dataclass
class TargetBatch:
    """This process's validation rows of the target f: left-padded prompts [V, P], right-padded responses
    [V, T] and per-token weights [V, T]."""
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    weights: torch.Tensor

    def __len__(self) -> int:
        return self.query_ids.shape[0]


@dataclass
class GroupGradients:
    """The target terms' gradients summed over groups of rows: ``parts[j]`` is group j's sum {name: fp32
    tensor}, and ``magnitudes[j]`` (float64) the norm of the sum over its rows with a positive term plus that
    over its rows with a negative term. That is what the group's norm would be if no row cancelled another, and
    sets the scale of the rounding error in its sum (`llm_iif.attribution.stage.FLOAT_NOISE`)."""
    parts: list[dict[str, torch.Tensor]]
    magnitudes: torch.Tensor


class TargetSource(Protocol):
    def __call__(self, model: nn.Module) -> TargetBatch:
        """This process's validation rows and token weights at the model's current parameters θ(k)."""


def preference_target_rows(tokenize: Callable[[list, list[str]], tuple[torch.Tensor, ...]], prompts: list,
                           chosen: list[str], rejected: list[str], length_normalised: bool = False) -> TargetBatch:
    """The rows of the preference target f = Σ_v [log π(chosen_v | x_v) − log π(rejected_v | x_v)] over V
    trusted triples (each log π a mean over tokens when ``length_normalised``): the V chosen responses with
    token weight +1, then the V rejected ones with −1 (`preference_token_weights`). With V even, the target's
    parity split (`target_split_cos`) keeps both rows of a triple in one half.

    tokenize: (prompts, responses) -> (query_ids [2V, P], query_mask, response_ids [2V, T], response_mask)."""
    ids = tokenize(prompts + prompts, chosen + rejected)
    return TargetBatch(*ids, preference_token_weights(ids[3], length_normalised))


# (model, query_ids [b, P], query_mask, response_ids [b, T], response_mask) -> log π(y_t | x, y_<t) [b, T]
SequenceLogprobs = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# (model, rows [b] indices into this process's batch) -> each row's training loss L_i [b]
PerSampleLoss = Callable[[nn.Module, torch.Tensor], torch.Tensor]
# (model, rows [b]) -> (L_i [b], each row's target term -Σ_t w_{i,t} log π(y_{i,t}) [b]), from one forward
PerSampleLossAndTarget = Callable[[nn.Module, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (model) -> [1] a zero term through the model from a stand-in row: the pass a process runs when it has no rows
# left but others do, since under FSDP2 every forward and backward is a collective
IdlePass = Callable[[nn.Module], torch.Tensor]


def agreed_passes(rows: int, chunk_size: int, device) -> int:
    """The number of chunks of ``chunk_size`` rows that every process runs: the most that any process's
    ``rows`` need. Under FSDP2 each forward gathers weights from every process, so a process that stopped early
    would leave the others waiting; with one process it is its own count."""
    passes = -(-rows // chunk_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        count = torch.tensor([passes], device=device)
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
        passes = int(count.item())
    return passes


def _chunks(rows: int, chunk_size: int, device) -> list[torch.Tensor | None]:
    """This process's chunks of row indices, then None for each pass it runs idle (`agreed_passes`)."""
    own = [chunk for chunk in torch.split(torch.arange(rows, device=device), chunk_size) if len(chunk)]
    return own + [None] * (agreed_passes(rows, chunk_size, device) - len(own))


def target_gradient_parts(model: nn.Module, rows: TargetBatch, sequence_logprobs: SequenceLogprobs,
                          part: torch.Tensor, n_parts: int, chunk_size: int,
                          idle: IdlePass | None = None) -> tuple[GroupGradients, int]:
    """∇ of -Σ_v Σ_t w_{v,t} log π(y_{v,t}) over the scored parameters (`scored_parameters`), summed separately
    over each part of the rows: ``part`` [V] gives each row's part in [0, n_parts). Returns this process's
    `GroupGradients` of the n_parts parts (a part without rows is zero) and the number of rows left out because
    their term is NaN or inf.

    The sums are formed by the layer hooks from each row's activations and output gradients, not by autograd
    over the parameters, so they are whole tensors even when the parameters are FSDP2 shards. One forward and
    backward per chunk of rows; a NaN or inf row is left out by the hooks, not by a second pass, and a process
    with fewer chunks than another runs ``idle`` passes, so every process runs the same passes (under FSDP2
    each is a collective)."""
    totals = _zero_group_sums(model, n_parts)
    left_out = 0
    with LayerGradientCapture(model, scored_layers(model)) as capture:
        for chunk in _chunks(len(rows), chunk_size, rows.query_ids.device):
            if chunk is None:
                _idle_group_pass(capture, _checked(idle)(model), n_parts)
                continue
            terms = _target_terms(model, rows, sequence_logprobs, chunk)
            left_out += int((~_add_group_sums(capture, totals, terms, part[chunk.cpu()], n_parts)).sum())
    return _group_gradients(totals, n_parts), left_out


def _checked(idle: IdlePass | None) -> IdlePass:
    if idle is None:
        raise RuntimeError("this process has fewer rows to score than another: pass idle= to keep in step")
    return idle


def _idle_group_pass(capture: LayerGradientCapture, idle_term: torch.Tensor, n_groups: int,
                     retain_graph: bool = False) -> None:
    """The backward of an idle pass's term (`IdlePass`), adding nothing to any group's sum."""
    capture.sum_by_group(torch.tensor([-1]), 2 * n_groups)
    capture.backward(idle_term.sum(), retain_graph=retain_graph)


def _zero_group_sums(model: nn.Module, n_groups: int) -> dict[str, torch.Tensor]:
    """{name: zeros [2 · n_groups, *param.shape]} (fp32) over the scored parameters, whole however they are
    sharded: row 2j sums group j's rows with a positive (or zero) term, row 2j + 1 those with a negative one."""
    return {name: torch.zeros(2 * n_groups, *whole_shape(p), dtype=torch.float32, device=p.device)
            for name, p in scored_parameters(model).items()}


def _add_group_sums(capture: LayerGradientCapture, totals: dict[str, torch.Tensor], terms: torch.Tensor,
                    groups: torch.Tensor, n_groups: int, retain_graph: bool = False,
                    allow_unused: bool = False) -> torch.Tensor:
    """Add the gradients of ``terms`` [b] (one forward's target terms), summed by ``groups`` [b] and by the
    terms' sign, to ``totals`` in place (`_zero_group_sums`; with ``allow_unused``, layers the capture holds
    beyond them, which the terms need not reach, are left out), leaving out the terms that are NaN or inf (no
    second pass: every process runs the same passes); returns [b] bool (CPU), the terms that counted."""
    finite = torch.isfinite(terms.detach()).cpu()
    signed = 2 * groups.long() + (terms.detach() < 0).long().cpu()
    capture.sum_by_group(signed.where(finite, -1), 2 * n_groups)
    capture.backward(terms.sum(), retain_graph=retain_graph, allow_unused=allow_unused)
    sums = capture.group_sums()
    for name in totals:
        totals[name] += sums[name]
    return finite


def _group_gradients(totals: dict[str, torch.Tensor], n_groups: int) -> GroupGradients:
    """The `GroupGradients` of sums split by sign (`_zero_group_sums`)."""
    squares = sum(t.flatten(1).double().pow(2).sum(dim=1) for t in totals.values())        # [2 · n_groups]
    return GroupGradients([{name: t[2 * j] + t[2 * j + 1] for name, t in totals.items()} for j in range(n_groups)],
                          squares.sqrt().view(n_groups, 2).sum(dim=1).cpu())


def _target_terms(model: nn.Module, rows: TargetBatch, sequence_logprobs: SequenceLogprobs,
                  chunk: torch.Tensor) -> torch.Tensor:
    """[b] -Σ_t w_{v,t} log π(y_{v,t}) of the rows ``chunk``, with gradient."""
    logprobs = sequence_logprobs(model, rows.query_ids[chunk], rows.query_mask[chunk],
                                 rows.response_ids[chunk], rows.response_mask[chunk])
    return -(rows.weights[chunk] * logprobs * rows.response_mask[chunk]).sum(dim=1)


def target_value(model: nn.Module, rows: TargetBatch, sequence_logprobs: SequenceLogprobs,
                 chunk_size: int) -> float:
    """Σ_v Σ_t w_{v,t} log π(y_{v,t}) over this process's ``rows`` at the model's current parameters (divide
    the all-process sum by N for f); no gradient."""
    total = 0.0
    with torch.no_grad():
        for chunk in torch.split(torch.arange(len(rows), device=rows.query_ids.device), chunk_size):
            logprobs = sequence_logprobs(model, rows.query_ids[chunk], rows.query_mask[chunk],
                                         rows.response_ids[chunk], rows.response_mask[chunk])
            total += float((rows.weights[chunk] * logprobs * rows.response_mask[chunk]).sum())
    return total


def influence_scores(model: nn.Module, per_sample_loss: PerSampleLoss, batch_size: int, target: dict,
                     chunk_size: int, device, idle: IdlePass | None = None) -> torch.Tensor:
    """[B] influence ⟨target, ∇L_i⟩ of every sample, from one batched backward per chunk of rows.

    ``target`` is ∇L_val = -∇f over the scored parameters ([B, K] scores for K targets stacked as
    [K, *param.shape]); ``per_sample_loss(model, rows)`` gives L_i [b] of the batch rows ``rows``. A process
    with fewer chunks than another runs ``idle`` passes (`agreed_passes`), whose scores are dropped."""
    scores = [torch.zeros(0, device=device)]  # a process may have no rows to score
    for chunk in _chunks(batch_size, chunk_size, device):
        with LayerGradientCapture(model, scored_layers(model), target=target) as capture:
            capture.backward((per_sample_loss(model, chunk) if chunk is not None else _checked(idle)(model)).sum())
        if chunk is not None:
            scores.append(capture.scores())
    return torch.cat(scores)


def cross_fitted_dots(model: nn.Module, loss_and_target: PerSampleLossAndTarget, batch_size: int, fold: torch.Tensor,
                      n_folds: int, chunk_size: int, fold_targets: Callable[[GroupGradients], list[dict]],
                      device, idle: IdlePass | None = None) -> tuple[torch.Tensor, list[dict], torch.Tensor]:
    """[B, K] dot products ⟨G_j, ∇L_i⟩ of every sample with every fold's target gradient G_j, the G_j, and [B]
    bool: the rows whose target term is finite, the only ones in the G_j (one NaN or inf row would spoil its
    whole fold). ``fold_targets`` makes the G_j (fp32 {name: tensor}) from this process's `GroupGradients` of
    the folds: summed over processes, and whatever else the caller does to them.

    ``fold`` [B] gives each row's fold. When the batch fits one chunk, one forward serves both backward
    passes: the target terms' (summed per fold by the hooks), then the losses' (scored against the stacked
    G_j). Otherwise the chunks run forward twice, once per backward. Every process runs as many chunks as the
    one with the most (`agreed_passes`), ``idle`` passes where it has no rows left, and so fuses alike."""
    chunks = _chunks(batch_size, chunk_size, device)
    fused = len(chunks) == 1
    in_target = torch.ones(batch_size, dtype=torch.bool)
    with LayerGradientCapture(model, scored_layers(model)) as capture:
        totals = _zero_group_sums(model, n_folds)  # a process without rows still joins the sum over processes
        for chunk in chunks:
            if chunk is None:
                losses = _checked(idle)(model)
                _idle_group_pass(capture, losses, n_folds, retain_graph=fused)
                continue
            losses, target_terms = loss_and_target(model, chunk)
            in_target[chunk.cpu()] = _add_group_sums(capture, totals, target_terms, fold[chunk.cpu()], n_folds,
                                                     retain_graph=fused)  # fused: the losses reuse the graph
        parts = fold_targets(_group_gradients(totals, n_folds))
        capture.score_against({name: torch.stack([part[name] for part in parts]) for name in parts[0]})
        dots = [torch.zeros(0, n_folds, device=device)]
        for chunk in chunks:
            if not fused:
                losses = loss_and_target(model, chunk)[0] if chunk is not None else idle(model)
            capture.backward(losses.sum())
            if chunk is not None:
                dots.append(capture.scores())
    return torch.cat(dots), parts, in_target


# (model, rows [b]) -> (per-row terms whose per-sample gradients are wanted, each [b]; the rows' target terms [b]
# or None), from one forward
RowTerms = Callable[[nn.Module, torch.Tensor], tuple[list[torch.Tensor], torch.Tensor | None]]


def row_gradients(model: nn.Module, layers: dict[str, nn.Module], row_terms: RowTerms, n_terms: int,
                  batch_size: int, chunk_size: int, fold: torch.Tensor | None = None, n_folds: int = 0,
                  ) -> tuple[list[dict[str, torch.Tensor]], GroupGradients | None, torch.Tensor]:
    """Every row's gradient of each of its terms, over the parameters of ``layers``, and the target terms'
    gradients summed per fold, from one forward per chunk of ``chunk_size`` rows.

    ``row_terms(model, rows)`` gives the ``n_terms`` terms ([b] each) and, with ``fold`` [B] (each row's fold in
    [0, n_folds)), the target terms [b]. Returns, per term, {name: [B, *param.shape]} (fp32); the folds'
    `GroupGradients` over the scored parameters (`scored_parameters`), or None without ``fold``; and [B] bool,
    the rows whose target term is finite, the only ones in the fold sums. A term need not reach every layer
    (its gradient there is zero). One process's rows only: the passes are not agreed over processes
    (`agreed_passes`), so it is not for FSDP2, where every forward is a collective."""
    device = next(model.parameters()).device
    totals = _zero_group_sums(model, n_folds) if fold is not None else None
    in_target = torch.ones(batch_size, dtype=torch.bool)
    capture = LayerGradientCapture(model, layers)
    params = dict(model.named_parameters())
    empty = {name: torch.zeros(0, *whole_shape(params[name]), device=device) for name in capture.parameter_names}
    per_term: list[list[dict[str, torch.Tensor]]] = [[empty] for _ in range(n_terms)]  # a process may have no rows
    with capture:
        for chunk in torch.split(torch.arange(batch_size, device=device), chunk_size):
            terms, target_terms = row_terms(model, chunk)
            if totals is not None:
                in_target[chunk.cpu()] = _add_group_sums(capture, totals, target_terms, fold[chunk.cpu()], n_folds,
                                                         retain_graph=True, allow_unused=True)
            capture.per_sample()
            for j, term in enumerate(terms):
                capture.backward(term.sum(), retain_graph=j + 1 < len(terms), allow_unused=True)
                per_term[j].append(capture.per_sample_grads())
    gradients = [{name: torch.cat([chunk[name] for chunk in chunks]) for name in chunks[0]} for chunks in per_term]
    return gradients, (_group_gradients(totals, n_folds) if totals is not None else None), in_target
