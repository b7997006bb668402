"""The attribution core against a per-sample autograd loop, and the filter semantics."""

import warnings

import pytest
import torch

from torch import nn

from conftest import assert_scores_match
from llm_iif.attribution.gradients import LayerGradientCapture, LoraGradientCapture, grad_cosine, grad_dot, lora_parameters
from llm_iif.attribution.filters import filter_mask
from llm_iif.core.errors import UserError
from llm_iif.lm.policy import position_ids_from_mask

VOCAB = 40


def tiny_lora_model(arch: str):
    """A randomly initialised two-layer model of ``arch`` with LoRA on every projection, B ≠ 0."""
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig)

    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
        targets, fan_in_fan_out = ["c_attn", "c_proj", "c_fc"], True
    elif arch == "llama":
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        targets, fan_in_fan_out = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False
    else:
        config = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=0)
        targets, fan_in_fan_out = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], False
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # init_lora_weights=False draws B at random too, so ∇A is not trivially zero.
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=targets, fan_in_fan_out=fan_in_fan_out,
                      init_lora_weights=False)
    return get_peft_model(base, lora).eval()


def left_padded_batch(lengths, generator_seed=1):
    g = torch.Generator().manual_seed(generator_seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, width - n:] = 1
    weights = torch.randn(len(lengths), width, generator=g) * mask  # a per-token "advantage"
    weights[:, 1:] *= mask[:, :-1]  # a row's first token has no prediction from inside the row
    return ids, mask, weights


def per_sample_losses(model, ids, mask, weights):
    """[B] advantage-weighted next-token log-likelihoods, each depending only on its own sample."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return -(logprobs * weights[:, 1:]).sum(dim=1)


def reference_grads(model, ids, mask, weights):
    """Per-sample gradients by one backward per sample, each sample run alone without its padding."""
    params = lora_parameters(model)
    grads = {name: [] for name in params}
    for i in range(ids.shape[0]):
        keep = mask[i].bool()
        loss = per_sample_losses(model, ids[i:i + 1, keep], mask[i:i + 1, keep], weights[i:i + 1, keep])[0]
        for name, grad in zip(params, torch.autograd.grad(loss, list(params.values()))):
            grads[name].append(grad)
    return {name: torch.stack(g) for name, g in grads.items()}


def relative_error(a, b):
    return ((a - b).norm() / b.norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "gpt_neox"])
def test_per_sample_grads_and_dots_match_autograd_loop(arch):
    model = tiny_lora_model(arch)
    ids, mask, weights = left_padded_batch([7, 3, 5, 7])
    expected = reference_grads(model, ids, mask, weights)

    with LoraGradientCapture(model) as capture:
        per_sample_losses(model, ids, mask, weights).sum().backward()
    grads = capture.per_sample_grads()

    assert list(grads) == list(lora_parameters(model))  # exactly the LoRA names, in model order
    assert any(name.endswith("lora_A.default.weight") for name in grads)
    for name, param in lora_parameters(model).items():
        assert grads[name].shape == (4, *param.shape)
        assert relative_error(grads[name], expected[name]) <= 1e-4, name
        # The per-sample gradients add up to the batch gradient autograd accumulated.
        assert relative_error(grads[name].sum(0), param.grad) <= 1e-4, name

    target = {name: torch.randn_like(p) for name, p in lora_parameters(model).items()}
    expected_dots = torch.stack([sum((expected[n][i] * target[n]).sum() for n in target) for i in range(4)])
    assert_scores_match(capture.dot(target), expected_dots)

    model.zero_grad()
    with LoraGradientCapture(model, target=target) as streaming:
        per_sample_losses(model, ids, mask, weights).sum().backward()
    assert_scores_match(streaming.scores(), expected_dots)
    with pytest.raises(RuntimeError, match="streaming"):
        streaming.per_sample_grads()


def test_conv2d_and_linear_per_sample_grads_match_autograd_loop():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 2, stride=2, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(5 * 3 * 3, 2))
    images = torch.randn(6, 3, 7, 7)
    layers = {name: m for name, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    params = dict(net.named_parameters())

    def loss(x):  # [B] per-sample losses
        return net(x).pow(2).sum(dim=1)

    expected = {name: torch.stack([torch.autograd.grad(loss(images[i:i + 1]).sum(), p)[0] for i in range(6)])
                for name, p in params.items()}
    with LayerGradientCapture(net, layers) as capture:
        loss(images).sum().backward()
    grads = capture.per_sample_grads()
    assert set(grads) == set(params)
    for name in params:
        assert grads[name].shape == (6, *params[name].shape)
        assert relative_error(grads[name], expected[name]) <= 1e-4, name

    target = {name: torch.randn_like(p) for name, p in params.items()}
    expected_dots = torch.stack([sum((expected[n][i] * target[n]).sum() for n in target) for i in range(6)])
    with LayerGradientCapture(net, layers, target=target) as streaming:
        loss(images).sum().backward()
    assert_scores_match(streaming.scores(), expected_dots)

    # Three targets stacked [3, *shape]: one pass gives the [B, 3] scores of each against every sample.
    targets = [target, {n: torch.randn_like(p) for n, p in params.items()}, {n: -t for n, t in target.items()}]
    stacked = {n: torch.stack([t[n] for t in targets]) for n in params}
    expected_stacked = torch.stack([torch.stack([sum((expected[n][i] * t[n]).sum() for n in t) for t in targets])
                                    for i in range(6)])
    with LayerGradientCapture(net, layers, target=stacked) as streaming:
        loss(images).sum().backward()
    assert streaming.scores().shape == (6, 3)
    assert relative_error(streaming.scores(), expected_stacked) <= 1e-4

    # Group sums: samples 0-2 and 3-5 summed separately, then scores from a second backward of one forward.
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    with LayerGradientCapture(net, layers) as capture:
        losses = loss(images)
        capture.sum_by_group(groups, 2)
        torch.autograd.grad(losses.sum(), list(params.values()), retain_graph=True)
        sums = capture.group_sums()
        capture.score_against(target)
        torch.autograd.grad(losses.sum(), list(params.values()))
        assert_scores_match(capture.scores(), expected_dots)
    for name in params:
        assert relative_error(sums[name], torch.stack([expected[name][:3].sum(0), expected[name][3:].sum(0)])) <= 1e-4


def test_unsupported_layers_are_rejected():
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(TypeError, match="groups=1"):
        LayerGradientCapture(grouped, {"conv": grouped})
    embedding = nn.Embedding(5, 3)
    with pytest.raises(TypeError, match="Embedding"):
        LayerGradientCapture(embedding, {"embedding": embedding})


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_does_not_double_count(use_reentrant):
    model = tiny_lora_model("llama")
    ids, mask, weights = left_padded_batch([6, 4, 6])
    expected = reference_grads(model, ids, mask, weights)
    model.base_model.model.activation_checkpointing_enable({"use_reentrant": use_reentrant})
    model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    model.train()  # transformers only checkpoints in training mode; the model has no dropout
    with LoraGradientCapture(model) as capture:
        per_sample_losses(model, ids, mask, weights).sum().backward()
    for name, grad in capture.per_sample_grads().items():
        assert relative_error(grad, expected[name]) <= 1e-4, name


class AppliedTwice(nn.Module):
    """One Linear layer applied twice in a forward, as a weight-shared or looped block would."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(3, 3)

    def forward(self, x):
        return self.shared(torch.tanh(self.shared(x)))


def test_a_layer_called_twice_in_one_forward_is_refused_not_half_counted():
    model, x = AppliedTwice(), torch.randn(4, 3)
    with LayerGradientCapture(model, {"shared.weight": model.shared}):
        with pytest.raises(UserError, match="^attribution: the layer 'shared.weight' ran twice in one forward pass"):
            model(x)
    # One call per forward is fine, forward after forward, each with its backward.
    single = nn.Linear(3, 3)
    with LayerGradientCapture(single, {"weight": single}) as capture:
        for _ in range(2):
            (single(x) ** 2).sum().backward()
    assert capture.per_sample_grads()["weight"].shape == (4, 3, 3)


def test_capture_inside_a_wrapper_uses_the_wrappers_parameter_names():
    from llm_iif.lm.policy import PolicyWithValueHead

    policy = PolicyWithValueHead(tiny_lora_model("gpt2"))
    ids, mask, weights = left_padded_batch([5, 2])
    with LoraGradientCapture(policy) as capture:
        logits, values = policy(ids, mask)
        (values * weights).sum().backward()  # a value-only loss still reaches the LoRA backbone
    grads = capture.per_sample_grads()
    assert all(name.startswith("lm.") and ".lora_" in name for name in grads)
    assert "value_head.weight" not in grads


def test_capture_without_backward_says_what_is_missing():
    model = tiny_lora_model("gpt2")
    ids, mask, weights = left_padded_batch([3, 3])
    with LoraGradientCapture(model) as capture:
        per_sample_losses(model, ids, mask, weights)
    with pytest.raises(RuntimeError, match="loss.backward"):
        capture.per_sample_grads()


def test_target_with_wrong_shape_is_rejected():
    model = tiny_lora_model("gpt2")
    target = {name: torch.zeros(3) for name in lora_parameters(model)}
    with pytest.raises(ValueError, match="shape"):
        LoraGradientCapture(model, target=target)


def test_grad_cosine_and_dot():
    a = {"x": torch.tensor([1.0, 0.0]), "y": torch.tensor([[2.0]])}
    b = {"x": torch.tensor([0.0, 3.0]), "y": torch.tensor([[1.0]])}
    assert grad_dot(a, b).item() == 2.0
    assert grad_cosine(a, b) == pytest.approx(2.0 / (5 ** 0.5 * 10 ** 0.5))
    assert grad_cosine(a, {"x": torch.zeros(2), "y": torch.zeros(1, 1)}) == 0.0


# ---------------------------------------------------------------------------------------------- filters

SCORES = torch.tensor([0.5, -3.0, -1.0, 2.0, -2.0, 0.0, -1.0, 1.0])  # 4 negatives, one zero


def dropped(mask):
    return sorted((~mask).nonzero().squeeze(-1).tolist())


def test_neg_bottom_drops_the_most_negative_share_of_negatives():
    assert dropped(filter_mask(SCORES, "neg-bottom", 0.5)) == [1, 4]
    # p = 1 drops every negative; zero and positive scores are always kept.
    assert dropped(filter_mask(SCORES, "neg-bottom", 1.0)) == [1, 2, 4, 6]
    assert dropped(filter_mask(SCORES, "neg-bottom", 0.0)) == []
    # floor(0.3 · 4) = 1
    assert dropped(filter_mask(SCORES, "neg-bottom", 0.3)) == [1]


def test_ties_are_broken_by_position():
    # Two samples tie at -1.0 (positions 2 and 6); dropping three negatives takes the earlier one.
    assert dropped(filter_mask(SCORES, "neg-bottom", 0.75)) == [1, 2, 4]
    assert dropped(filter_mask(torch.zeros(4), "bottom", 0.5)) == [0, 1]


def test_bottom_drops_the_lowest_fraction_of_all_scores():
    assert dropped(filter_mask(SCORES, "bottom", 0.25)) == [1, 4]
    assert dropped(filter_mask(SCORES, "bottom", 0.0)) == []


def test_random_modes_drop_the_right_count_reproducibly():
    big = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    n_neg = int((big < 0).sum())
    for mode, pool in (("random", 1000), ("neg-random", n_neg), ("matched-random", n_neg)):
        first = filter_mask(big, mode, 0.5, torch.Generator().manual_seed(3))
        again = filter_mask(big, mode, 0.5, torch.Generator().manual_seed(3))
        assert torch.equal(first, again)
        assert int((~first).sum()) == pool // 2
    neg_random = filter_mask(big, "neg-random", 0.5, torch.Generator().manual_seed(3))
    assert bool((big[~neg_random] < 0).all())
    # A random drop ignores the scores: it removes positives as well as negatives.
    random = filter_mask(big, "random", 0.5, torch.Generator().manual_seed(3))
    assert bool((big[~random] > 0).any()) and bool((big[~random] < 0).any())
    # The size-matched one drops as many as neg-bottom, but from the whole batch.
    matched = filter_mask(big, "matched-random", 0.5, torch.Generator().manual_seed(3))
    assert int((~matched).sum()) == int((~filter_mask(big, "neg-bottom", 0.5)).sum())
    assert bool((big[~matched] > 0).any()) and bool((big[~matched] < 0).any())


def test_none_keeps_everything():
    assert filter_mask(SCORES, "none", 1.0).all()


def test_never_drops_every_sample():
    with pytest.warns(UserWarning, match="keeping the highest-scoring one"):
        mask = filter_mask(torch.tensor([-1.0, -0.5, -2.0]), "neg-bottom", 1.0)
    assert dropped(mask) == [0, 2]
    with pytest.warns(UserWarning):
        assert int(filter_mask(SCORES, "random", 1.0).sum()) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        filter_mask(SCORES, "bottom", 0.875)  # one sample left: no warning


@pytest.mark.parametrize("mode, p, scores, match", [
    ("top", 0.5, SCORES, "expected one of"),
    ("bottom", 1.5, SCORES, r"\[0, 1\]"),
    ("bottom", 0.5, torch.tensor([]), "non-empty"),
    ("neg-bottom", 0.5, torch.tensor([1.0, float("nan")]), "NaN"),
])
def test_bad_filter_arguments(mode, p, scores, match):
    with pytest.raises(ValueError, match=match):
        filter_mask(scores, mode, p)
