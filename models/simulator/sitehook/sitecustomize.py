"""Loaded by Python at start-up when this folder is on PYTHONPATH: puts the process on the
simulator's clock (``models.simulator.clock``) when ``NBV_SIM_CLOCK`` names its file."""

import os
from pathlib import Path

if os.environ.get("NBV_SIM_CLOCK"):
    from models.simulator.clock import follow

    follow(Path(os.environ["NBV_SIM_CLOCK"]))
