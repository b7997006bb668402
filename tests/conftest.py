import os

# Tests never reach a model hub; a hub id must fail fast instead of waiting on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# `make test` runs two pytest workers on 2 cores: one thread each, and for the processes they launch, so that
# four threads do not share two cores.
THREADS = 1 if os.environ.get("PYTEST_XDIST_WORKER") else 2
if THREADS == 1:
    os.environ["OMP_NUM_THREADS"] = "1"

import socket  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(THREADS)


@pytest.fixture(autouse=True)
def mixed_precision_left_off():
    """Fail a test that leaves Accelerate's process-wide state in mixed precision: every later ``Accelerator()``
    of the process would inherit it, and train and score in bf16 without saying so."""
    yield
    from accelerate.state import AcceleratorState

    precision = AcceleratorState._shared_state.get("_mixed_precision", "no")
    if precision != "no":
        AcceleratorState._reset_state(reset_partial_state=True)  # so that the tests after this one run as usual
        pytest.fail(f"the test left Accelerate's state in {precision} mixed precision")


@pytest.fixture
def harmless_sigterm():
    """SIGTERM does nothing while the test runs, unless a trainer's own handler takes it: a signal the trainer
    missed then fails an assertion instead of killing pytest."""
    import signal

    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
    yield
    signal.signal(signal.SIGTERM, previous)


def launch_command(script: str, processes: int) -> list[str]:
    """``python SCRIPT`` for one process, else `accelerate_launch` of it."""
    if processes == 1:
        return [sys.executable, script]
    return [*accelerate_launch(processes), script]


def accelerate_launch(processes: int) -> list[str]:
    """``accelerate launch`` on ``processes`` CPU processes (with ``ACCELERATE_USE_CPU=1`` in the environment),
    on a free port: two pytest workers may launch at once."""
    return [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--multi_gpu", "--num_processes",
            str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port())]


def free_port() -> int:
    """A TCP port no process listens on now (the OS picks it)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def cli_in_process(capsys, *args) -> tuple[int, str]:
    """`llm-iif ARGS` in this process: (exit code, stderr). For errors raised before training, without the
    seconds a new interpreter spends importing torch and transformers; an uncaught exception fails the test."""
    from llm_iif.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def tiny_recipe_dict(output_dir) -> dict:
    """A recipe for the built-in tiny model that runs a round in about a second."""
    return {
        "model": {"name_or_path": "builtin:tiny-sentiment"},
        "lora": {"r": 4, "alpha": 8, "target_modules": ["c_attn"]},
        "data": {"source": "builtin:review-prompts"},
        "reward": {"name": "vader"},
        "ppo": {"mini_batch_size": 4, "epochs": 2, "max_new_tokens": 8, "learning_rate": 1e-3},
        "run": {"rounds": 2, "batch_size": 8, "output_dir": str(output_dir), "log_samples": 2},
    }


@pytest.fixture(scope="session")
def tiny_model_dir():
    from llm_iif.lm.builtin import ensure_tiny_model

    return ensure_tiny_model()


@pytest.fixture(scope="session")
def random_adder_dir(tmp_path_factory):
    """A randomly initialised tiny GPT-2 and the adder tokenizer, saved like a hub model (GRPO tests)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llm_iif.lm.addition import adder_tokenizer

    out = tmp_path_factory.mktemp("random-adder")
    tokenizer = adder_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    GPT2LMHeadModel(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ------------------------------------------------------------------------------- the preference target
def moved_off_zero(model):
    """LoRA's B starts at zero, which zeroes A's gradients: give B values so that every gradient counts."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.1 * torch.randn_like(param))


def brute_force_margin_gradient(model, sequence_logprobs, tokenize, triples, rows) -> dict:
    """∇ of −Σ_v [log π(chosen_v) − log π(rejected_v)] / (2V), one row at a time (no padding shared)."""
    from llm_iif.attribution.gradients import scored_parameters

    params = scored_parameters(model)
    total = 0.0
    for v in range(rows):
        for response, sign in ((triples["chosen"][v], 1.0), (triples["rejected"][v], -1.0)):
            ids = tokenize([triples["prompt"][v]], [response])
            total = total - sign * (sequence_logprobs(model, *ids) * ids[3]).sum()
    grads = torch.autograd.grad(total / (2 * rows), list(params.values()))
    return dict(zip(params, grads))


def assert_scores_match(ours: torch.Tensor, expected: torch.Tensor, tolerance: float = 1e-4):
    """Influence scores against a reference: within ``tolerance`` of it relative to its norm, and of the same
    sign wherever the reference is farther from 0 than that tolerance allows, since the filter acts on signs
    (a norm-relative bound alone lets a small score with the wrong sign pass)."""
    assert expected.norm() > 0
    assert ((ours - expected).norm() / expected.norm()).item() <= tolerance
    clear = expected.abs() > tolerance * expected.norm()
    assert clear.any() and torch.equal(torch.sign(ours[clear]), torch.sign(expected[clear]))


def assert_gradients_close(ours: dict, expected: dict):
    flat = torch.cat([ours[name].flatten() for name in expected])
    want = torch.cat([grad.flatten() for grad in expected.values()])
    assert want.norm() > 0
    assert ((flat - want).norm() / want.norm()).item() <= 1e-4
