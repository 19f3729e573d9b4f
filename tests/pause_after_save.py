"""Run a stage module that stops itself (SIGSTOP) right after saving the checkpoint of a given step, so a test can
signal it at that step on any machine, however fast: `python tests/pause_after_save.py STEP -m pipeline.sft ...`.
Without it, a test that waits for a checkpoint and then signals races the training, which a fast machine may finish
first."""

from __future__ import annotations

import os
import runpy
import signal
import sys

import transformers.trainer
from transformers import TrainerCallback

STEP = int(sys.argv[1])


class PauseAfterSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):  # noqa: ANN001, ANN201 - the Trainer's callback signature
        if state.global_step == STEP:
            os.kill(os.getpid(), signal.SIGSTOP)  # the checkpoint is on disk: the test signals, then continues us


transformers.trainer.DEFAULT_CALLBACKS.append(PauseAfterSave)
assert sys.argv[2] == "-m", "usage: pause_after_save.py STEP -m MODULE [ARGS...]"
module = sys.argv[3]
sys.argv = [module, *sys.argv[4:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
