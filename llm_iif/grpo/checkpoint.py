"""What filtering adds to trl's checkpoints: ``iif_state.pt`` beside trl's own files, so that a resumed
`IIFGRPOTrainer` run filters, refills and draws DPO mini-batches as an uninterrupted one would."""

from __future__ import annotations

from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object

from llm_iif.attribution.stage import IIFStage
from llm_iif.core.errors import UserError, first_line
from llm_iif.core.fileio import atomic_path
from llm_iif.core.guards import NonfiniteGuard
from llm_iif.lm.trusted import TrustedTriples
from llm_iif.runs.state import IIF_STATE_FILE, load_plain


class FilterState:
    """The filter's random generators, the NaN patience count, the fresh target's position in the validation
    set and every process's DPO generator: tensors and plain values only, loaded with ``weights_only=True``.
    ``stage`` and ``trusted`` are None when the run has no IIF or no trusted triples."""

    def __init__(self, accelerator: Accelerator, refill_generator: torch.Generator, guard: NonfiniteGuard,
                 stage: IIFStage | None, trusted: TrustedTriples | None):
        self.accelerator, self.refill_generator, self.guard = accelerator, refill_generator, guard
        self.stage, self.trusted = stage, trusted

    def state_dict(self) -> dict:
        """Call on every process: it gathers the DPO generators."""
        state = {"refill_generator": self.refill_generator.get_state(),
                 "nonfinite_batches_in_a_row": self.guard.rounds_in_a_row}
        if self.stage is not None:
            state["filter_generator"] = self.stage.generator.get_state()
            if hasattr(self.stage.target_source, "round"):
                state["target_round"] = self.stage.target_source.round
        if self.trusted is not None:  # one generator per process: gathered, every process takes its own
            state["trusted_generators"] = gather_object([self.trusted.generator.get_state()])
        return state

    def load_state_dict(self, state: dict) -> None:
        self.refill_generator.set_state(state["refill_generator"])
        self.guard.rounds_in_a_row = state["nonfinite_batches_in_a_row"]
        if self.stage is not None:
            self.stage.generator.set_state(state["filter_generator"])
            if hasattr(self.stage.target_source, "round"):  # "fresh_target_round": checkpoints of version 0.1
                self.stage.target_source.round = state.get("target_round", state.get("fresh_target_round"))
        if self.trusted is not None and "trusted_generators" in state:
            self.trusted.generator.set_state(state["trusted_generators"][self.accelerator.process_index])

    def save(self, checkpoint: Path, main_process: bool) -> None:
        """Write ``checkpoint``/iif_state.pt from the main process (the filter's generators are alike on every
        process); call on every process."""
        state = self.state_dict()
        if main_process:
            with atomic_path(Path(checkpoint) / IIF_STATE_FILE) as tmp:
                torch.save(state, tmp)

    def load(self, checkpoint: Path) -> None:
        """Restore from ``checkpoint``/iif_state.pt, if there is one; `UserError` naming the file if unreadable."""
        path = Path(checkpoint) / IIF_STATE_FILE
        if not path.is_file():
            return
        state = load_plain(path, "IIF state")
        try:
            self.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError) as err:
            raise UserError(f"{path}: not a readable IIF state ({first_line(err)})") from err
