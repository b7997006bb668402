"""The parts `IIFGRPOTrainer` is built from, one at a time and without trl: batch surgery, the group filter and
its refill, reward bookkeeping, the fresh target's rows, the filter's checkpoint state and the stage adapter."""

import math
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator

from llm_iif.attribution.stage import Selection
from llm_iif.core.distributed import global_max, global_mean, global_min, global_sum
from llm_iif.core.errors import UserError
from llm_iif.core.guards import NonfiniteGuard
from llm_iif.grpo.batches import concatenated, first_kept, generation_records, kept_rows, rows_of
from llm_iif.grpo.checkpoint import FilterState
from llm_iif.grpo.groups import GroupFilter, GroupFiltering, group_ids
from llm_iif.grpo.rewards import BatchRewards, checked_reward
from llm_iif.grpo.scoring import GRPOScoring, TrlLoss
from llm_iif.grpo.targets import FreshGroupTarget
from llm_iif.runs.state import IIF_STATE_FILE

G = 2  # completions per prompt


@pytest.fixture(scope="module")
def accelerator():
    return Accelerator(cpu=True)


def second_of_two():
    """What the parts read of an accelerator, as process 1 of 2 sees it."""
    return SimpleNamespace(num_processes=2, process_index=1, device=torch.device("cpu"))


def batch_of(rewards: list[float], completion_width: int = 3, prompt_width: int = 2, first_token: int = 10) -> dict:
    """A generation batch shaped as trl's, one row per reward: row i's prompt and completion tokens are i + first."""
    rows = len(rewards)
    ids = torch.arange(first_token, first_token + rows)[:, None]
    return {"prompt_ids": ids.repeat(1, prompt_width), "prompt_mask": torch.ones(rows, prompt_width, dtype=torch.long),
            "completion_ids": ids.repeat(1, completion_width),
            "completion_mask": torch.ones(rows, completion_width, dtype=torch.long),
            "advantages": torch.tensor(rewards) - 0.5, "num_items_in_batch": torch.tensor(rows * completion_width)}


# ------------------------------------------------------------------------------------------------ batches
def test_concatenated_pads_prompts_left_and_completions_right():
    first, second = batch_of([0.0, 1.0], completion_width=2), batch_of([1.0], completion_width=4, prompt_width=3)
    joined = concatenated(first, second, pad_token_id=0)
    assert joined["prompt_ids"].tolist() == [[0, 10, 10], [0, 11, 11], [10, 10, 10]]
    assert joined["prompt_mask"][:, 0].tolist() == [0, 0, 1]
    assert joined["completion_ids"].tolist() == [[10, 10, 0, 0], [11, 11, 0, 0], [10, 10, 10, 10]]
    assert joined["completion_mask"].sum(dim=1).tolist() == [2, 2, 4]
    assert joined["advantages"].tolist() == [-0.5, 0.5, 0.5]
    assert joined["num_items_in_batch"] is first["num_items_in_batch"]  # recounted by kept_rows


def test_rows_of_cuts_per_row_tensors_only_and_first_kept_stops_at_most():
    batch = batch_of([0.0, 1.0, 1.0])
    cut = rows_of(batch, torch.tensor([2, 0]))
    assert cut["completion_ids"][:, 0].tolist() == [12, 10] and cut["num_items_in_batch"] == 9
    keep = torch.tensor([True, False, True, True])
    assert first_kept(keep, 2).tolist() == [True, False, True, False] and keep.sum() == 3


def test_kept_rows_pads_to_whole_micro_batches_with_rows_that_train_on_nothing(accelerator):
    batch = batch_of([0.0, 1.0, 1.0, 0.0, 1.0])
    keep = torch.tensor([False, True, False, True, True])
    cut = kept_rows(batch, keep, accelerator, chunks=2)
    assert cut["completion_ids"][:, 0].tolist() == [11, 13, 14, 10]  # 3 kept, then 1 dropped row as padding
    assert cut["completion_mask"].sum(dim=1).tolist() == [3, 3, 3, 0]
    assert cut["advantages"][3] == 0 and int(cut["num_items_in_batch"]) == 9 and int(cut["iif_kept_rows"]) == 3


def test_generation_records_hold_every_row_with_nan_where_not_scored():
    batch = batch_of([0.0, 1.0])
    decode = lambda ids: [f"<{row[0]}>" for row in ids.tolist()]  # noqa: E731
    records = generation_records(batch, decode, torch.tensor([0.0, 1.0]), torch.tensor([False, True]), None)
    assert [(r["prompt"], r["reward"], r["kept"]) for r in records] == [("<10>", 0.0, False), ("<11>", 1.0, True)]
    assert all(math.isnan(r["influence"]) for r in records)


# ---------------------------------------------------------------------------------------------- reductions
def test_global_reductions_on_one_process(accelerator):
    values = torch.tensor([1.0, 2.0, 6.0])
    assert global_sum(accelerator, values) == 9 and global_mean(accelerator, values) == 3
    assert global_min(accelerator, torch.tensor(4)) == 4 and global_max(accelerator, torch.tensor(5)) == 5
    assert global_mean(accelerator, torch.tensor([])) == 0


# ------------------------------------------------------------------------------------------- group filters
def test_group_ids_are_unique_over_processes_and_refill_batches():
    acc = second_of_two()
    assert group_ids(acc, 4, G).tolist() == [2, 2, 3, 3]  # process 0 holds groups 0 and 1
    assert group_ids(acc, 4, G, generation=1).tolist() == [10, 10, 11, 11]  # after the 8 rows of generation 0


def filtering(spec: GroupFilter, accelerator, refills: list[list[float]]) -> tuple[GroupFiltering, list]:
    """A filter over a train set of 100 prompt rows whose refill batches carry ``refills``' rewards in turn."""
    asked = []

    def generate(inputs):
        asked.append(inputs)
        rewards = torch.tensor(refills[len(asked) - 1])
        return batch_of(refills[len(asked) - 1], first_token=100 * len(asked)), rewards, rewards.isnan()

    train = [{"prompt": f"p{i}"} for i in range(100)]
    return GroupFiltering(spec, accelerator, G, "group", train, torch.Generator().manual_seed(0), 0, generate), asked


def test_dapo_drops_groups_with_equal_rewards_and_nan_rewards(accelerator):
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, math.nan])
    flt, asked = filtering(GroupFilter("dapo"), accelerator, [])
    _, keep, metrics, _, groups = flt(batch_of(rewards.tolist()), rewards, rewards.isnan(), rewards)
    assert keep.tolist() == [False, False, True, True, False, False] and not asked
    assert metrics["informative_fraction"] == pytest.approx(2 / 6) and groups.tolist() == [0, 0, 1, 1, 2, 2]


def test_dapo_refills_until_the_batch_is_full_and_keeps_no_more(accelerator):
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0])
    flt, asked = filtering(GroupFilter("dapo", refill=True, max_refill_batches=4), accelerator,
                           [[1.0, 1.0, 0.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    batch, keep, metrics, kept_rewards, groups = flt(batch_of(rewards.tolist()), rewards, rewards.isnan(), rewards)
    assert metrics["refill_batches"] == 2 and len(asked) == 2 and len(asked[0]) == 4
    assert asked[0][0] == asked[0][1]  # each drawn prompt repeated G times
    assert keep.tolist() == [False, False, True, True, False, False, False, False, True, True, False, False]
    assert batch["completion_ids"][:, 0].tolist()[8:10] == [200, 201] and len(kept_rewards) == len(groups) == 12
    assert groups.tolist()[8:] == [8, 8, 9, 9]  # ids of generation 2: past every id of the 4-row batches before


def test_dapo_refill_stops_after_max_refill_batches(accelerator):
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0])
    flt, asked = filtering(GroupFilter("dapo", refill=True, max_refill_batches=2), accelerator,
                           [[0.0, 0.0, 0.0, 0.0]] * 3)
    _, keep, metrics, _, _ = flt(batch_of(rewards.tolist()), rewards, rewards.isnan(), rewards)
    assert metrics["refill_batches"] == 2 and len(asked) == 2 and not keep.any()


def test_pods_keeps_the_most_varied_subset_and_recomputes_its_advantages(accelerator):
    rewards = torch.tensor([0.0, 1.0, 0.5, 2.0])
    group_of_four = GroupFiltering(GroupFilter("pods", keep_per_group=2), accelerator, 4, "group", [], None, 0, None)
    batch, keep, _, _, _ = group_of_four(batch_of(rewards.tolist()), rewards, rewards.isnan(), rewards)
    assert keep.tolist() == [True, False, False, True]  # the lowest and the highest reward
    assert batch["advantages"][keep].tolist() == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-4)


# ------------------------------------------------------------------------------------------------ rewards
def test_batch_rewards_weigh_the_functions_and_mark_nonfinite_completions(accelerator):
    guard = NonfiniteGuard(patience=1)
    rewards = BatchRewards(accelerator, guard)
    [double] = rewards.checked([lambda completions, **kwargs: [2.0 * len(c) for c in completions[:2]] + [math.inf]])
    rewards.start()
    returned = double(completions=["a", "bb", "ccc"])
    assert returned == [2.0, 4.0, None]  # inf handed to trl as None
    per_func = torch.tensor([[2.0, 1.0], [4.0, math.nan], [math.nan, math.nan]])
    rewards.record(per_func, torch.tensor([1.0, 0.5]), batch_size=3)
    assert rewards.latest[:2].tolist() == [2.5, 4.0] and rewards.latest[2].isnan()
    guard.start_round()
    assert rewards.nonfinite_mask(3).tolist() == [False, False, True]
    assert guard.end_round()["nonfinite_reward"] == 1


def test_a_reward_function_that_returns_the_wrong_count_is_named():
    def short(completions, **kwargs):
        return [1.0]

    with pytest.raises(UserError, match=r"rewards.short: returned 1 rewards for 2 completions"):
        checked_reward(short, set())(completions=["a", "b"])


# ------------------------------------------------------------------------------------------------ targets
def test_the_fresh_target_takes_disjoint_validation_prompts_per_process_and_cycles():
    validation = [{"prompt": f"v{i}"} for i in range(5)]
    seen = []

    def generate_groups(rows):
        seen.append([row["prompt"] for row in rows])
        return batch_of([0.0, 1.0] * len(rows))

    target = FreshGroupTarget(validation, second_of_two(), 2, generate_groups)
    rows = target(None)
    target(None)
    assert seen == [["v2", "v3"], ["v1", "v2"]] and target.round == 2  # process 0 takes v0, v1, then v4, v0
    assert rows.weights.shape == rows.response_ids.shape and rows.weights[1].tolist() == [0.5] * 3
    assert "time_val_generate_s" in target.metrics


# ---------------------------------------------------------------------------------------------- checkpoint
def test_the_filter_state_round_trips_through_a_checkpoint(accelerator, tmp_path):
    def state(seed):
        stage = SimpleNamespace(generator=torch.Generator().manual_seed(seed), target_source=SimpleNamespace(round=seed))
        guard = NonfiniteGuard(patience=3)
        guard.rounds_in_a_row = seed
        return FilterState(accelerator, torch.Generator().manual_seed(seed + 1), guard, stage, None)

    saved = state(5)
    torch.rand(3, generator=saved.stage.generator)
    saved.save(tmp_path, main_process=True)
    loaded = state(0)
    loaded.load(tmp_path)
    assert loaded.stage.target_source.round == 5 and loaded.guard.rounds_in_a_row == 5
    assert torch.equal(torch.rand(2, generator=loaded.stage.generator), torch.rand(2, generator=saved.stage.generator))
    assert torch.equal(torch.rand(2, generator=loaded.refill_generator),
                       torch.rand(2, generator=saved.refill_generator))


def test_an_unreadable_filter_state_is_refused_naming_the_file(accelerator, tmp_path):
    torch.save({"refill_generator": torch.zeros(3)}, tmp_path / IIF_STATE_FILE)
    with pytest.raises(UserError, match=f"{IIF_STATE_FILE}: not a readable IIF state"):
        FilterState(accelerator, torch.Generator(), NonfiniteGuard(1), None, None).load(tmp_path)


# --------------------------------------------------------------------------------------------- the stage
def test_cispo_scales_the_policy_term_and_nothing_else_does():
    settings = dict(beta=0.0, use_bias_correction_kl=False, epsilon_high=0.2, importance_sampling_level="token",
                    max_completion_length=4)
    assert TrlLoss("cispo", **settings).policy_scale == 0.2 and TrlLoss("dapo", **settings).policy_scale == 1.0


def test_a_decision_among_candidates_spreads_over_every_row(accelerator):
    scored = []

    def select(model, per_sample_loss, batch_size, precondition=None, groups=None):
        scored.append((batch_size, groups.tolist()))
        return Selection(torch.tensor([True, False]), torch.tensor([0.5, -0.5]), {"filtered": 1})

    stage = SimpleNamespace(select=select, config=SimpleNamespace(precondition="none", target_source="fresh"))
    loss = TrlLoss("dapo", 0.0, False, 0.2, "token", 4)
    scoring = GRPOScoring(stage, accelerator, loss, None, lambda: None)
    candidates = torch.tensor([False, True, False, True])
    keep, influence, metrics = scoring.decide(None, batch_of([0.0, 1.0, 0.0, 1.0]), candidates,
                                              torch.tensor([0, 0, 1, 1]))
    assert scored == [(2, [0, 1])] and keep.tolist() == [False, True, False, False]
    assert influence[[1, 3]].tolist() == [0.5, -0.5] and influence[[0, 2]].isnan().all() and metrics == {"filtered": 1}
