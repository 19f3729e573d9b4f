"""Run a stage module that stops itself (SIGSTOP) right after saving the checkpoint of a given step, so a test can
signal it at that step on any machine, however fast: `python tests/pause_after_save.py [STAGE:]STEP -m MODULE ...`.
Without it, a test that waits for a checkpoint and then signals races the training, which a fast machine may finish
first.

With STAGE (`dpo:10`), only that stage's trainer pauses: `pipeline.run` trains several stages in one process. Under
a multi-process launch only the main process pauses; the others wait for it at their next collective step.
Processes another launcher starts (`python -m pipeline.node`) pause the same way through `node_hooks/`."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path


def pause_after_saving(where: str) -> None:
    """Make every Trainer of this process stop it once checkpoint `[STAGE:]STEP` is saved, on rank 0 only."""
    import transformers.trainer
    from transformers import TrainerCallback

    stage, _, step = where.rpartition(":")

    class PauseAfterSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - the Trainer's callback signature
            # The stage trains in <run>/<stage>.partial/checkpoints (pipeline.core.artifacts' layout).
            in_stage = not stage or Path(args.output_dir).parent.name.startswith(f"{stage}.")
            if state.global_step == int(step) and in_stage and os.environ.get("RANK", "0") == "0":
                os.kill(os.getpid(), signal.SIGSTOP)  # the checkpoint is on disk: the test signals, then continues us

    transformers.trainer.DEFAULT_CALLBACKS.append(PauseAfterSave)


if __name__ == "__main__":
    pause_after_saving(sys.argv[1])
    assert sys.argv[2] == "-m", "usage: pause_after_save.py [STAGE:]STEP -m MODULE [ARGS...]"
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
