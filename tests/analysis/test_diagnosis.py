"""Classic-RL diagnosis: Monte-Carlo advantages, rank statistics, and the diagnose / intervene commands."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_in_process

pytest.importorskip("stable_baselines3", reason="needs the classic extra: pip install 'llm_iif[classic]'")

from gymnasium import spaces  # noqa: E402
from stable_baselines3.common.buffers import RolloutBuffer  # noqa: E402

from llm_iif.analysis.diagnosis import advantage_agreement, average_ranks, discounted_returns, monte_carlo_advantages, spearman  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
FROZENLAKE = str(REPO / "recipes/classic/frozenlake.yaml")
SHORT = ["ppo.n_steps=128", "ppo.batch_size=32", "ppo.n_epochs=2", "run.rounds=3", "run.eval_episodes=5"]


def test_discounted_returns_stop_at_episode_ends_and_flag_the_cut_episode():
    rewards = np.array([[0.0], [1.0], [0.0], [0.0], [1.0], [0.0]])
    starts = np.array([[1], [0], [1], [0], [0], [1]])
    returns, complete = discounted_returns(rewards, starts, gamma=0.5)
    # Episodes: steps 0-1, steps 2-4, and step 5 which the buffer cuts off.
    np.testing.assert_allclose(returns[:, 0], [0.5, 1.0, 0.25, 0.5, 1.0, 0.0])
    assert complete[:, 0].tolist() == [True, True, True, True, True, False]


def two_state_buffer() -> RolloutBuffer:
    """Episodes in state 0: action 1 then reward 1 (return 1), or action 0 then reward 0 (return 0)."""
    buffer = RolloutBuffer(5, spaces.Discrete(2), spaces.Discrete(2), n_envs=1)
    buffer.observations = np.zeros((5, 1, 1), dtype=np.float32)
    buffer.actions = np.array([1, 0, 1, 0, 1], dtype=np.float32).reshape(5, 1, 1)
    buffer.rewards = np.array([1, 0, 1, 0, 1], dtype=np.float32).reshape(5, 1)
    buffer.episode_starts = np.ones((5, 1), dtype=np.float32)
    return buffer


def test_monte_carlo_advantages_are_q_minus_v_over_complete_episodes():
    # The last episode is cut off by the buffer, so V̄(0) averages 1, 0, 1, 0 = 0.5.
    advantages = monte_carlo_advantages(two_state_buffer(), gamma=0.99)
    np.testing.assert_allclose(advantages, [0.5, -0.5, 0.5, -0.5, 0.5])


def test_monte_carlo_advantages_need_discrete_states():
    buffer = RolloutBuffer(4, spaces.Box(-1, 1, (2,)), spaces.Discrete(2), n_envs=1)
    with pytest.raises(Exception, match="discrete observation space"):
        monte_carlo_advantages(buffer, gamma=0.99)


def test_rank_statistics():
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    x = np.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)


def test_advantage_agreement_counts_sign_mismatches_by_influence_region():
    scores = np.arange(10.0)[::-1]                 # record 0 is the most helpful
    gae = np.ones(10)
    monte_carlo = np.array([1, 1, 1, 1, 1, 1, 1, 1, -1, -1.0])  # the two bottom records disagree in sign
    stats = advantage_agreement(scores, gae, np.r_[monte_carlo])
    assert stats["sign_mismatch_top"] == 0.0 and stats["sign_mismatch_bottom"] == 1.0
    assert stats["sign_mismatch_all"] == pytest.approx(0.2)
    assert stats["mean_abs_gap_bottom"] == pytest.approx(2.0) and stats["mean_abs_gap_top"] == 0.0
    assert stats["spearman_influence_vs_mc_times_gae"] > 0
    assert stats["spearman_rank_vs_mc_times_gae"] == -stats["spearman_influence_vs_mc_times_gae"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llm_iif", "classic", *args], capture_output=True, text=True,
                          timeout=600)


def test_diagnose_command_writes_the_analysis(tmp_path):
    proc = run_cli("diagnose", FROZENLAKE, "--round", "1", "--bottom", "5", "--action-target", "14,2",
                   "--output-dir", str(tmp_path), *[a for s in SHORT for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "diagnosis.json").read_text())
    assert result["round"] == 1 and result["records"] + result["records_without_mc"] == 128
    assert len(result["bottom_records"]) == 5 and len(result["action_target"]["top_records"]) == 5
    influences = [row["influence"] for row in result["bottom_records"]]
    assert influences == sorted(influences)  # the most harmful record first
    rows = (tmp_path / "records.csv").read_text().splitlines()
    assert rows[0].startswith("rank,state,action,gae_advantage,mc_advantage,influence") and len(rows) == 129
    assert (tmp_path / "diagnosis.png").exists() and "sign mismatch" in proc.stdout


def test_intervene_command_compares_three_updates_per_round(tmp_path):
    proc = run_cli("intervene", FROZENLAKE, "--rounds", "0-1", "--seeds", "0", "--output-dir", str(tmp_path),
                   *[a for s in SHORT for a in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "intervention.json").read_text())
    rows = result["seeds"]["0"]
    assert [row["round"] for row in rows] == [0, 1]
    for row in rows:
        assert 0 < row["dropped"] < row["records"] == 128
        assert row["delta_influence"] == pytest.approx(row["return_influence"] - row["return_all"])
    assert (tmp_path / "intervention.png").exists()


@pytest.mark.parametrize("args, message", [
    (["diagnose", str(REPO / "recipes/classic/acrobot.yaml"), "--round", "0"], "discrete observation space"),
    (["diagnose", FROZENLAKE, "--round", "50"], "--round 50: expected 0 <= K < run.rounds"),
    (["diagnose", FROZENLAKE, "--action-target", "14"], "--action-target 14: expected STATE,ACTION"),
    (["intervene", FROZENLAKE, "--rounds", "1-x"], "--rounds 1-x: expected 1,2,5 or 1-10"),
    (["intervene", FROZENLAKE, "--rounds", "60"], "--rounds: expected rounds in 0..49"),
])
def test_diagnosis_bad_input_is_one_line_exit_2(args, message, tmp_path, capsys):
    code, stderr = cli_in_process(capsys, "classic", *args, "--output-dir", tmp_path)
    assert code == 2 and message in stderr and stderr.count("\n") == 1
