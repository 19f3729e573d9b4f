"""Run a stage module that stops itself (SIGSTOP) right after saving the checkpoint of a given step, so a test can
signal it at that step on any machine, however fast: `python tests/pause_after_save.py [STAGE:]STEP -m MODULE ...`.
Without it, a test that waits for a checkpoint and then signals races the training, which a fast machine may finish
first.

With STAGE (`dpo:10`), only that stage's trainer pauses: `pipeline.run` trains several stages in one process. Under
a multi-process launch only the main process pauses; the others wait for it at their next collective step."""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

import transformers.trainer
from transformers import TrainerCallback

STAGE, _, STEP = sys.argv[1].rpartition(":")


class PauseAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - the Trainer's callback signature
        # The stage trains in <run>/<stage>.partial/checkpoints (pipeline.core.artifacts' layout).
        in_stage = not STAGE or Path(args.output_dir).parent.name.startswith(f"{STAGE}.")
        if state.global_step == int(STEP) and in_stage and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGSTOP)  # the checkpoint is on disk: the test signals, then continues us


transformers.trainer.DEFAULT_CALLBACKS.append(PauseAfterSave)
assert sys.argv[2] == "-m", "usage: pause_after_save.py [STAGE:]STEP -m MODULE [ARGS...]"
module = sys.argv[3]
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
