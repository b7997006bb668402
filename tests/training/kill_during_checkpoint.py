"""``python tests/training/kill_during_checkpoint.py RECIPE``: train, and SIGKILL this process halfway through writing
checkpoint-2 (after the weights, before the manifest), as a crash or an OOM kill would."""

import os
import signal
import sys

from llm_iif.runs import state as checkpoints
from llm_iif.cli import main

write_manifest = checkpoints.write_manifest


def write_manifest_or_die(directory, state):
    if state["rounds_completed"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(directory, state)


if __name__ == "__main__":
    checkpoints.write_manifest = write_manifest_or_die
    sys.exit(main(["train", sys.argv[1]]))
