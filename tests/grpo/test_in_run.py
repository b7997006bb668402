"""In-run scoring (``iif.scoring: in-run``): scores from the update's own backward, equal to per-sample autograd,
and an update equal to the separate pass's."""

import pytest
import torch
from fixed_completion_run import completion_length, fixed_completions
from grpo_setup import make_trainer
from test_grpo_trainer import brute_force_scores, flat_grad

from llm_iif.attribution.gradients import scored_parameters
from llm_iif.recipes import GRPOIIFConfig
from llm_iif.core.errors import UserError
from llm_iif.grpo.checks import in_run_obstacle

WINDOW = dict(max_steps=1, steps_per_generation=2, gradient_accumulation_steps=2, per_device_train_batch_size=8)


def validation_rows():
    from datasets import Dataset

    from llm_iif.lm.addition import addition_problems

    return Dataset.from_list(addition_problems(8, seed=5))


def in_run_trainer(model_dir, out, target_source="batch", loss_type="dapo", **kwargs):
    iif = GRPOIIFConfig(**{**dict(enabled=True, target_source=target_source, scoring="in-run", mode="bottom",
                                  p=0.5, val_size=8), **kwargs.pop("iif", {})})
    return make_trainer(model_dir, out, loss_type=loss_type, iif=iif, validation_dataset=validation_rows(),
                        **{**WINDOW, **kwargs})


def train_recording_the_window(trainer):
    """Train one step; returns (the generation batch as the window opened it, the parameters at θ(0))."""
    start = {name: p.detach().clone() for name, p in scored_parameters(trainer.model).items()}
    opened, open_window = [], trainer._scoring.open_window

    def recording(*args):
        batch = open_window(*args)
        opened.append({k: v.clone() if torch.is_tensor(v) else v for k, v in batch.items()})
        return batch

    trainer._scoring.open_window = recording
    trainer.train()
    assert len(opened) == 1
    return opened[0], start


@pytest.mark.parametrize("target_source,loss_type", [("batch", "dapo"), ("batch", "grpo"), ("batch", "bnpo"),
                                                     ("batch", "dr_grpo"), ("fresh", "dapo")])
def test_in_run_scores_equal_per_sample_autograd(random_adder_dir, tmp_path, target_source, loss_type):
    """Two micro-batches of 8 in one accumulation window: every completion's score, read from the training
    backward's hooks, equals ⟨target, ∇L_i⟩ from one autograd call per completion at θ(0), to 1e-4 of the
    largest, with the same sign wherever the reference is clear of that tolerance."""
    trainer = in_run_trainer(random_adder_dir, tmp_path, target_source, loss_type)
    batch, start = train_recording_the_window(trainer)
    with torch.no_grad():
        for name, param in scored_parameters(trainer.model).items():
            param.copy_(start[name])
    target = None
    if target_source == "fresh":
        rows = trainer._scoring.stage.target_rows
        logps = trainer._sequence_logprobs(trainer.model, rows.query_ids, rows.query_mask, rows.response_ids,
                                           rows.response_mask)
        target = flat_grad(-(rows.weights * logps * rows.response_mask).sum() / len(rows),
                           list(scored_parameters(trainer.model).values()))
    expected = brute_force_scores(trainer, batch, target)
    scores = torch.tensor([r["influence"] for r in trainer.generation_records])
    assert len(scores) == 16 and expected.abs().max() > 0
    tolerance = 1e-4 * expected.abs().max().item()
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=tolerance)
    clear = expected.abs() > tolerance
    assert torch.equal(scores[clear].sign(), expected[clear].sign())
    assert sum(r["kept"] for r in trainer.generation_records) == 8


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo"])
def test_in_run_keeps_and_trains_as_the_separate_pass(random_adder_dir, tmp_path, loss_type):
    """On fixed completions, plain SGD: in-run scoring keeps the same completions as the separate scoring pass,
    and its corrected gradient moves the weights where training on the kept completions alone does."""
    runs = {}
    for scoring in ("separate", "in-run"):
        trainer = make_trainer(random_adder_dir, tmp_path / scoring, loss_type=loss_type, optim="sgd",
                               learning_rate=0.5, max_grad_norm=0.0, rollout_func=fixed_completions,
                               reward_funcs=[completion_length], **WINDOW,
                               iif=GRPOIIFConfig(enabled=True, target_source="batch", scoring=scoring,
                                                 mode="bottom", p=0.5))
        start = {name: p.detach().clone() for name, p in scored_parameters(trainer.model).items()}
        trainer.train()
        moved = {name: p.detach() - start[name] for name, p in scored_parameters(trainer.model).items()}
        runs[scoring] = ([r["kept"] for r in trainer.generation_records], moved)
    (kept_separate, moved_separate), (kept_in_run, moved_in_run) = runs["separate"], runs["in-run"]
    assert kept_in_run == kept_separate and sum(kept_in_run) == 8
    assert max(t.abs().max() for t in moved_separate.values()) > 0
    for name, expected in moved_separate.items():
        torch.testing.assert_close(moved_in_run[name], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


@pytest.mark.parametrize("settings,message", [
    (dict(num_iterations=2), r"^num_iterations: 2; in-run scoring takes its scores from the first update's backward"),
    (dict(steps_per_generation=4), r"^steps_per_generation: 4 with gradient_accumulation_steps 2; "),
    (dict(beta=0.1), r"^beta: 0.1 with iif.target_source batch; "),
    (dict(iif=dict(mode="random")), r"^iif.scoring: in-run with iif.mode random"),
])
def test_settings_in_run_scoring_cannot_honour_are_one_line(random_adder_dir, tmp_path, settings, message):
    with pytest.raises(UserError, match=message) as err:
        in_run_trainer(random_adder_dir, tmp_path, **settings)
    assert "\n" not in str(err.value) and "iif.scoring: separate" in str(err.value)


def test_auto_scores_in_run_where_it_can_and_else_falls_back_saying_why(random_adder_dir, tmp_path, caplog):
    """``iif.scoring: auto``, the default: in-run with settings it can honour; with one it cannot, the separate
    pass, and the log names the setting."""
    assert GRPOIIFConfig().scoring == "auto"
    assert in_run_trainer(random_adder_dir, tmp_path / "a", iif=dict(scoring="auto"))._in_run is not None
    with caplog.at_level("INFO", logger="llm_iif.grpo.trainer"):
        fallback = in_run_trainer(random_adder_dir, tmp_path / "b", num_iterations=2, iif=dict(scoring="auto"))
    assert fallback._in_run is None
    assert "iif.scoring auto: the separate scoring pass, since num_iterations: 2" in caplog.text


@pytest.mark.parametrize("plugin,message", [("fsdp_plugin", "FSDP2"), ("deepspeed_plugin", "DeepSpeed")])
def test_auto_falls_back_under_a_launch_that_shards_at_train_time(random_adder_dir, tmp_path, monkeypatch, plugin,
                                                                  message):
    """Accelerate applies an FSDP2 or DeepSpeed launch's plugin when training starts, after the trainer is built:
    the plugin itself is an obstacle, not only a model already sharded."""
    trainer = in_run_trainer(random_adder_dir, tmp_path, iif=dict(scoring="auto"))
    state = trainer.accelerator.state
    if isinstance(getattr(type(state), plugin, None), property):  # deepspeed_plugin is read from the plugins held
        monkeypatch.setattr(type(state), plugin, property(lambda self: object()))
    else:
        monkeypatch.setattr(state, plugin, object(), raising=False)
    assert message in in_run_obstacle(trainer)
