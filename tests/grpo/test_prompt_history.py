"""Skipping prompts by their reward history (GRESO): the streaks, the skip probability, the adaptive p's, and
the trainer replacing prompts with long all-equal streaks before generating them."""

import math

import pytest
import torch
from grpo_setup import make_trainer
from test_grpo_trainer import parity_reward

from llm_iif.core.errors import UserError
from llm_iif.grpo import GroupFilter
from llm_iif.grpo.prompt_history import P_MAX, P_MIN, PromptHistory, prompt_key, uniform_kinds


def test_uniform_kinds_tell_solved_unsolved_and_informative_groups():
    nan = math.nan
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0,    # all equal, above the mean: solved
                            0.0, 0.0, 0.0, 0.0,    # all equal, below it: unsolved
                            0.0, 1.0, 0.0, 1.0,    # informative
                            nan, nan, nan, 1.0])   # one finite reward: nothing learnt
    assert uniform_kinds(rewards, 4).tolist() == [1, -1, 0, 0]


def test_streaks_grow_restart_and_end():
    history = PromptHistory(0.25)
    for kinds in ([1, -1, 0], [1, 1, -1], [1, -1, 0]):
        history.record(["a", "b", "c"], torch.tensor(kinds))
    assert history.streaks == {"a": 3, "b": -1}  # b turned solved then unsolved; c's last group was informative


def test_skip_probability_is_one_minus_p_to_the_streak_and_never_certain():
    history = PromptHistory(0.25, p_solved=0.5, p_unsolved=0.8, streaks={"a": 2, "b": -1, "c": 50})
    assert history.skip_probability("a") == pytest.approx(0.75)
    assert history.skip_probability("b") == pytest.approx(0.2)
    assert history.skip_probability("c") == pytest.approx(0.99)
    assert history.skip_probability("new") == 0.0


def test_p_moves_towards_the_target_share_of_uniform_groups_within_bounds():
    history = PromptHistory(0.3)  # targets: solved 0.1, unsolved 0.2
    history.record(list("abcdefghij"), torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, -1]))  # solved 0.2, unsolved 0.1
    metrics = history.adapt()
    assert (history.p_solved, history.p_unsolved) == (pytest.approx(0.49), pytest.approx(0.51))  # skip solved more
    assert metrics["uniform_solved_fraction"] == pytest.approx(0.2) and metrics["p_unsolved"] == history.p_unsolved
    assert history.adapt() == {}  # nothing recorded since
    for _ in range(100):
        history.record(["a"], torch.tensor([1]))
        history.adapt()
    assert (history.p_solved, history.p_unsolved) == (P_MIN, P_MAX)


def test_history_survives_a_weights_only_checkpoint(tmp_path):
    history = PromptHistory(0.25, p_solved=0.37, streaks={prompt_key("1+2="): 3,
                                                            prompt_key([{"role": "user", "content": "x"}]): -2})
    torch.save(history.state_dict(), tmp_path / "state.pt")
    loaded = PromptHistory(0.25)
    loaded.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert loaded.state_dict() == history.state_dict()


def even_fraction(trainer, calls=12, prompts=4):
    """The share of even first operands (all-equal groups under `parity_reward`) among the prompts generated in
    ``calls`` training generation batches of ``prompts`` prompts each, after the first two."""
    trainer.model.train()
    shares = []
    for call in range(calls):
        start = (call * prompts) % len(trainer.train_dataset)
        rows = [trainer.train_dataset[(start + i) % len(trainer.train_dataset)]
                for i in range(prompts) for _ in range(trainer.num_generations)]
        trainer._generate_and_score_completions(rows)
        generated = [r["prompt"] for r in trainer.generation_records][::trainer.num_generations]
        shares.append(sum(int(p.split("+")[0]) % 2 == 0 for p in generated) / len(generated))
    return sum(shares[2:]) / len(shares[2:])


def test_prompts_with_all_equal_groups_are_skipped_before_generation(random_adder_dir, tmp_path):
    """8 problems seen again and again: with skip_by_history the even ones, whose groups are always all-equal,
    are generated less often than they come from the data, and the history of them is recorded."""
    def trainer(skip):
        return make_trainer(random_adder_dir, tmp_path / str(skip), problems=8, reward_funcs=[parity_reward],
                            max_completion_length=6, group_filter=GroupFilter("dapo", skip_by_history=skip))

    plain, skipping = trainer(False), trainer(True)
    assert even_fraction(skipping) < even_fraction(plain) - 0.2  # measured: 0.23 against 0.50
    evens = {prompt_key(r["prompt"]) for r in skipping.train_dataset if int(r["prompt"].split("+")[0]) % 2 == 0}
    assert evens and all(skipping._history.streaks[key] < 0 for key in evens)  # unsolved: reward 0, below the mean
    assert sum(skipping._metrics["train"]["iif/skipped_prompts"]) > 0
    state = skipping.iif_state_dict()
    torch.save(state, tmp_path / "iif_state.pt")
    resumed = trainer(True)
    resumed.load_iif_state_dict(torch.load(tmp_path / "iif_state.pt", weights_only=True))
    assert resumed._history.state_dict() == skipping._history.state_dict()
    assert resumed._skip_generator.get_state().equal(skipping._skip_generator.get_state())


def test_skip_by_history_needs_dapo(random_adder_dir, tmp_path):
    with pytest.raises(UserError, match="group_filter.skip_by_history: skips prompts for DAPO's dynamic sampling "
                                        r"\(expected group_filter.kind dapo, got pods\)"):
        make_trainer(random_adder_dir, tmp_path, group_filter=GroupFilter("pods", keep_per_group=2,
                                                                          skip_by_history=True))
