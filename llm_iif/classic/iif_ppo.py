"""IIF for Stable-Baselines3 PPO: score every transition of a rollout at θ(k), drop the harmful ones, train.

``IIFPPO`` is a drop-in subclass of SB3's ``PPO``. Each round, after the rollout buffer is filled and before
the PPO epochs, it scores every transition against the return target on the same buffer (the paper's
classic-RL setting, §1.5 of its code):

    target loss   L_val = -mean_j Â_j log π(a_j|s_j)            Â: raw GAE advantages of the buffer
    sample loss   L_i   = -Â_i^norm log π(a_i|s_i) - c_ent H_i   Â^norm: normalised within random minibatches
                                                               of SB3's batch_size, as its first epoch does
    score         I_i   = ⟨∇L_val, ∇L_i⟩ over the policy network's Linear layers (value network excluded)

At θ(k) the PPO ratio is 1 and clipping is inactive, so L_i is the first epoch's policy term for sample i.
A score > 0 means a step on the sample lowers L_val. ``filter_mask`` then picks the kept transitions and
SB3's usual epochs run on those only.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3 import PPO
from stable_baselines3.common.buffers import RolloutBuffer
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from llm_iif.attribution.filters import filter_mask
from llm_iif.attribution.gradients import LayerGradientCapture
from llm_iif.attribution.precondition import adam_preconditioner, check_second_moments
from llm_iif.recipes import CLASSIC_GUARDS, CLASSIC_TARGETS, FILTER_MODES


class IIFPPO(PPO):
    """SB3 ``PPO`` with iterative influence-based filtering of each rollout.

    iif_mode, iif_p: the ``filter_mask`` rule (``neg-bottom`` with p = 0.5 drops the most negative half of the
        negative-score transitions); ``none`` trains on everything, like ``PPO``.
    iif_target: the objective the kept transitions should improve; ``return`` is the advantage-weighted
        log-likelihood of the buffer itself.
    iif_precondition: ``adam`` scores the return target with ⟨P ∇L_val, ∇L_i⟩, P from the Adam optimiser's
        second moments (`llm_iif.attribution.precondition`; plain scores before its first step); needs
        ``policy_kwargs={"optimizer_class": torch.optim.Adam}`` or SB3's default Adam.
    iif_average_identical: replace each transition's score by the mean score of its identical records, as the
        paper's code does (`identical_group_means`; identical = same observation, action, log-probability under
        θ(k) and raw advantage). Identical records then differ only in their random minibatch's advantage
        normalisation, which the mean averages out.
    iif_guard: transitions never dropped, whatever their score: ``none``; ``positive-advantage`` (a raw GAE
        advantage > 0: filtering may remove what pushes the policy away from an action, never what pulls it
        towards one); ``rewarded`` (a reward > 0, e.g. FrozenLake's steps onto the goal: near convergence,
        dropping them leaves the updates to value-function noise).
    All other arguments are ``PPO``'s.
    """

    def __init__(self, policy, env, iif_mode: str = "neg-bottom", iif_p: float = 0.5, iif_target: str = "return",
                 iif_precondition: str = "none", iif_average_identical: bool = False,
                 iif_guard: str = "none", **kwargs):
        if iif_mode not in FILTER_MODES:
            raise ValueError(f"iif_mode '{iif_mode}': expected one of {', '.join(FILTER_MODES)}")
        if not 0.0 <= iif_p <= 1.0:
            raise ValueError(f"iif_p={iif_p}: expected a value in [0, 1]")
        if iif_target not in CLASSIC_TARGETS:
            raise ValueError(f"iif_target '{iif_target}': expected one of {', '.join(CLASSIC_TARGETS)}")
        if iif_precondition not in ("none", "adam"):
            raise ValueError(f"iif_precondition '{iif_precondition}': expected none or adam")
        if iif_guard not in CLASSIC_GUARDS:
            raise ValueError(f"iif_guard '{iif_guard}': expected one of {', '.join(CLASSIC_GUARDS)}")
        self.iif_mode, self.iif_p, self.iif_target = iif_mode, iif_p, iif_target
        self.iif_precondition, self.preconditioned = iif_precondition, False
        self.iif_average_identical = iif_average_identical
        self.iif_guard = iif_guard
        super().__init__(policy, env, **kwargs)
        if iif_precondition == "adam":
            check_second_moments(self.policy.optimizer, "iif.precondition")

    def train(self) -> None:
        start = time.perf_counter()
        n = self.rollout_buffer.buffer_size * self.rollout_buffer.n_envs
        scores = torch.zeros(n) if self.iif_mode in ("random", "none") else self.influence_scores()
        if self.iif_average_identical:
            scores = identical_group_means(scores, self.record_identity())
        protected = {"positive-advantage": self.flat_buffer()[2] > 0, "rewarded": self.flat_rewards() > 0}
        keep = filter_mask(scores, self.iif_mode, self.iif_p)
        if self.iif_guard != "none":
            keep |= protected[self.iif_guard]
        self.logger.record("iif/kept_fraction", keep.float().mean().item())
        self.logger.record("iif/influence_neg_fraction", (scores < 0).float().mean().item())
        for name, kind in (("rewarded", protected["rewarded"]), ("positive_advantage", protected["positive-advantage"])):
            self.logger.record(f"iif/kept_fraction_{name}", keep[kind].float().mean().item() if kind.any() else 1.0)
        self.logger.record("iif/time_influence_s", time.perf_counter() - start)
        self.logger.record("iif/preconditioned", int(self.preconditioned))
        self.last_scores, self.last_keep = scores, keep
        self.train_on(keep.numpy())

    def train_on(self, keep: np.ndarray) -> None:
        """SB3's PPO epochs on the transitions of the filled rollout buffer where ``keep`` [N] is True."""
        full_buffer = self.rollout_buffer
        self.rollout_buffer = kept_transitions(full_buffer, keep)
        try:
            super().train()
        finally:
            self.rollout_buffer = full_buffer  # the next rollout refills the full-size buffer

    def influence_scores(self, target: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[N] influence of each transition of the filled rollout buffer (flattened env-major, as SB3's
        ``RolloutBuffer.get`` orders them) on a target, at the current parameters.

        target: the gradient of the target *loss* (−f) over `scored_parameters`, e.g. from `action_target`;
        None scores against the return target of the buffer itself (preconditioned with
        ``iif_precondition: adam``).
        """
        observations, actions, advantages = self.flat_buffer()
        self.policy.set_training_mode(False)
        if target is None:
            log_prob, _ = self._log_prob_and_entropy(observations, actions)
            target = self._gradient(-(advantages * log_prob).mean())
            precondition = (adam_preconditioner(self.policy.optimizer, self.scored_parameters())
                            if self.iif_precondition == "adam" else None)
            self.preconditioned = precondition is not None
            if precondition is not None:
                target = precondition(target)
        layers = policy_layers(self.policy)
        with LayerGradientCapture(self.policy, {f"{key}.weight": layer for key, layer in layers.items()},
                                   target=target) as capture:
            log_prob, entropy = self._log_prob_and_entropy(observations, actions)
            losses = -minibatch_normalized(advantages, self.batch_size, self.normalize_advantage) * log_prob
            if entropy is not None:
                losses = losses - self.ent_coef * entropy
            self._gradient(losses.sum())
        return capture.scores().detach().cpu()

    def linear_datamodeling_check(self, num_subsets: int = 16, seed: int = 0) -> dict:
        """How well this round's scores predict training, on the filled rollout buffer at θ(k) (`llm_iif.attribution.lds`).

        For each of ``num_subsets`` random half-subsets of the buffer, the round's real update (SB3's epochs,
        from the same parameters, optimiser state and random streams) runs on that subset alone and the change
        of the return target f = mean_j Â_j log π(a_j|s_j) is measured; the model is restored afterwards.
        Returns the LDS (with a 95% bootstrap interval) of the plain scores, the Adam-preconditioned ones (when
        the optimiser has second moments) and random scores, and ``sign_agreement``: whether training on the
        non-negative-score transitions alone raised f more than training on all of them, as the scores predict.
        """
        from llm_iif.attribution.lds import random_half_subsets, scores_report

        n = self.rollout_buffer.buffer_size * self.rollout_buffer.n_envs
        generator = torch.Generator().manual_seed(seed)
        subsets = random_half_subsets(n, num_subsets, generator)
        saved = (copy.deepcopy(self.policy.state_dict()), copy.deepcopy(self.policy.optimizer.state_dict()),
                 np.random.get_state(), torch.get_rng_state(), self._n_updates)

        def restore():
            self.policy.load_state_dict(saved[0])
            self.policy.optimizer.load_state_dict(saved[1])
            np.random.set_state(saved[2])
            torch.set_rng_state(saved[3])
            self._n_updates = saved[4]

        def scores(precondition: str) -> torch.Tensor:
            restore()
            self.iif_precondition, mode = precondition, self.iif_precondition
            try:
                return self.influence_scores()
            finally:
                self.iif_precondition = mode

        def target_change(keep: torch.Tensor) -> float:
            restore()
            before = self._return_target()
            self.train_on(keep.numpy())
            return self._return_target() - before

        plain = scores("none")
        preconditioned = scores("adam") if isinstance(self.policy.optimizer, torch.optim.Adam) else None
        by_kind = {"plain": plain, "random": torch.randn(n, generator=generator)}
        if preconditioned is not None and self.preconditioned:
            by_kind["preconditioned"] = preconditioned
        actual = torch.tensor([target_change(subset) for subset in subsets])
        result = {}
        for kind, (lds, interval) in scores_report(by_kind, subsets, actual, generator).items():
            result[f"lds_{kind}"], result[f"lds_{kind}_interval"] = lds, interval
        result["sign_agreement"] = bool(target_change(plain >= 0) > target_change(torch.ones(n, dtype=torch.bool)))
        restore()
        return result

    def _return_target(self) -> float:
        """f = mean_j Â_j log π(a_j|s_j) over the filled buffer (raw GAE advantages), at the current parameters."""
        observations, actions, advantages = self.flat_buffer()
        with torch.no_grad():
            log_prob, _ = self._log_prob_and_entropy(observations, actions)
        return float((advantages * log_prob).mean())

    def action_target(self, observation, action) -> dict[str, torch.Tensor]:
        """The paper's action target f = log π(a|s) for one (s, a), as the gradient of its loss −f over
        `scored_parameters`; pass it to `influence_scores` to rank transitions by how they raise π(a|s)."""
        observation, _ = self.policy.obs_to_tensor(np.asarray(observation))
        action = torch.as_tensor(np.asarray(action), device=self.device).reshape(1, -1)
        self.policy.set_training_mode(False)
        log_prob, _ = self._log_prob_and_entropy(observation, action)
        return self._gradient(-log_prob.sum())

    def scored_parameters(self) -> dict[str, nn.Parameter]:
        """The parameters influence is computed over: weights and biases of `policy_layers`."""
        params = dict(self.policy.named_parameters())
        return {n: params[n] for key in policy_layers(self.policy) for n in (f"{key}.weight", f"{key}.bias")
                if n in params}

    def _gradient(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        params = self.scored_parameters()
        return dict(zip(params, torch.autograd.grad(loss, list(params.values()))))

    def flat_buffer(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The filled rollout buffer's observations [N, *obs], actions [N, *act] and raw GAE advantages [N],
        flattened env-major (the order of `influence_scores`)."""
        buffer = self.rollout_buffer
        observations, actions, advantages = (torch.as_tensor(buffer.swap_and_flatten(a), device=self.device)
                                             for a in (buffer.observations, buffer.actions, buffer.advantages))
        return observations, actions, advantages.flatten().float()

    def flat_rewards(self) -> torch.Tensor:
        """[N] the reward of each transition of the filled buffer, in the order of `flat_buffer`."""
        return torch.as_tensor(self.rollout_buffer.swap_and_flatten(self.rollout_buffer.rewards)).flatten()

    def record_identity(self) -> torch.Tensor:
        """[N, d] what identifies a transition of the filled buffer in the paper's code, row by row in the
        order of `flat_buffer`: its observation, action, log-probability under θ(k) and raw advantage."""
        observations, actions, advantages = self.flat_buffer()
        log_probs = torch.as_tensor(self.rollout_buffer.swap_and_flatten(self.rollout_buffer.log_probs))
        return torch.cat([column.reshape(len(advantages), -1).double()
                          for column in (observations, actions, log_probs, advantages)], dim=1)

    def _excluded_save_params(self) -> list[str]:
        return [*super()._excluded_save_params(), "last_scores", "last_keep"]

    def _log_prob_and_entropy(self, observations, actions):
        if isinstance(self.action_space, spaces.Discrete):
            actions = actions.long().flatten()
        _, log_prob, entropy = self.policy.evaluate_actions(observations, actions)
        return log_prob, entropy


def policy_layers(policy: nn.Module) -> dict[str, nn.Module]:
    """The policy network's Linear and Conv2d layers by module name: every one outside the value network
    (``value_net``, ``vf_features_extractor``). A features extractor shared with the value network is the
    policy's too, as in the paper's MiniGrid CNN."""
    layers = {name: m for name, m in policy.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
              and "value_net" not in name and not name.startswith("vf_features_extractor")}
    if not layers:
        raise ValueError("the policy has no Linear or Conv2d layers outside its value network to score")
    return layers


class SmallCNN(BaseFeaturesExtractor):
    """The paper's MiniGrid network for small image observations [C, H, W]: conv 16 3×3 → conv 32 3×3 →
    linear ``features_dim``, ReLU after each (SB3's NatureCNN needs images of at least 36×36)."""

    def __init__(self, observation_space: spaces.Box, features_dim: int = 64):
        super().__init__(observation_space, features_dim)
        self.cnn = nn.Sequential(nn.Conv2d(observation_space.shape[0], 16, 3), nn.ReLU(),
                                 nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten())
        with torch.no_grad():
            flat = self.cnn(torch.zeros(1, *observation_space.shape)).shape[1]
        self.linear = nn.Sequential(nn.Linear(flat, features_dim), nn.ReLU())

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.linear(self.cnn(observations))


def minibatch_normalized(advantages: torch.Tensor, batch_size: int, normalize: bool) -> torch.Tensor:
    """Advantages [N] normalised within random minibatches of ``batch_size``, as SB3's first epoch does.

    The partition is drawn from numpy's global RNG, the one SB3's ``RolloutBuffer.get`` draws from.
    """
    if not normalize:
        return advantages
    out = advantages.clone()
    for batch in np.array_split(np.random.permutation(len(advantages)),
                                range(batch_size, len(advantages), batch_size)):
        if len(batch) > 1:  # SB3 skips normalisation for a single-sample minibatch
            chunk = advantages[batch]
            out[batch] = (chunk - chunk.mean()) / (chunk.std() + 1e-8)
    return out


def identical_group_means(scores: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """Scores [N] with each replaced by the mean score of the rows whose ``identity`` [N, d] row is equal to
    its own (a group of one keeps its score)."""
    _, group = torch.unique(identity, dim=0, return_inverse=True)
    sums = torch.zeros(int(group.max()) + 1, dtype=scores.dtype).index_add_(0, group, scores)
    return (sums / torch.bincount(group).to(scores.dtype))[group]


def kept_transitions(buffer: RolloutBuffer, keep: np.ndarray) -> RolloutBuffer:
    """A filled ``RolloutBuffer`` holding only the transitions where ``keep`` [N] is True (flattened order)."""
    kept = RolloutBuffer(int(keep.sum()), buffer.observation_space, buffer.action_space, device=buffer.device,
                         gae_lambda=buffer.gae_lambda, gamma=buffer.gamma, n_envs=1)
    for name in ("observations", "actions", "values", "log_probs", "advantages", "returns"):
        flat = buffer.swap_and_flatten(getattr(buffer, name)) if not buffer.generator_ready else getattr(buffer, name)
        setattr(kept, name, flat[keep])
    kept.full, kept.generator_ready = True, True
    return kept
