"""Layer 0.5: what every run shares, whichever trainer runs it: the layout of run, comparison and suite
directories and the containment rule (`paths`), what ``--overwrite`` deletes (`outputs.claim_run_directory`),
its outputs and trackers (`outputs.RunOutputs`), checkpoints, manifests and resume (`state`), and a clean stop
on SIGINT or SIGTERM (`signals.FinishOnSignal`)."""
