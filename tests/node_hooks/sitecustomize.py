"""Imported by every Python process started with this folder on PYTHONPATH. In the training processes a launcher
starts (they have a LOCAL_RANK), PAUSE_AFTER_SAVE=[STAGE:]STEP pauses rank 0 once that checkpoint is saved, as
`tests/pause_after_save.py` does for a module it runs itself."""

import os
import sys
from pathlib import Path

if os.environ.get("PAUSE_AFTER_SAVE") and "LOCAL_RANK" in os.environ:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from pause_after_save import pause_after_saving

    pause_after_saving(os.environ["PAUSE_AFTER_SAVE"])
