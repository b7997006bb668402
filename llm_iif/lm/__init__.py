"""Layer 2: causal-LM components: the LoRA policy with a value head, generation, prompts, the offline tiny
model, rollout collection and the LM side of the IIF stage (validation target, per-sample PPO loss)."""
