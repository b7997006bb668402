"""Layer 0: errors, recipes and their enumerations, PPO maths, records, paths, file writing, timing,
cross-process helpers and the non-finite guard. Imports nothing else from llm_iif."""
