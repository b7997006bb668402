"""Layer 2.75: the models a run loads by name: ``builtin:`` names resolved to local directories and built on
first use (`builtins`), and reward models trained from preference pairs (`reward_model`, `llm-iif reward
train`)."""
