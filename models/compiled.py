"""The ranker's predictions compiled to native code by lleaves (LLVM).

LightGBM's ``predict`` walks each tree node by node; lleaves turns the model into machine code
that gives the same predictions (to the last bits of a float's rounding), 10-15 x faster on a
decision's few dozen rows. Compiling costs about 4 ms per tree, once per model, in a child
process (``python -m models.compiled MODEL BINARY``): LLVM's optimiser keeps some 75 MB it
never gives back, and a crash in it must not take the service down. The service then loads the
compiled binary (a few ms). Where lleaves is missing or the compile fails, LightGBM predicts.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:  # the child process that compiles does without LightGBM's import
    import lightgbm as lgb

log = logging.getLogger(__name__)

Predict = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]

# A 2,000-tree model compiles in about 10 s.
COMPILE_TIMEOUT_S = 300


def compile_predictor(booster: lgb.Booster, version: str) -> Predict | None:
    """The booster's ``predict`` as native code, or None (LightGBM's then). Blocks for the
    compile: call off the event loop (``ModelLoader`` loads models in a worker thread)."""
    try:
        import lleaves  # type: ignore[import-untyped]
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="nbv-model-") as folder:
        model_file, binary = Path(folder) / "model.txt", Path(folder) / "model.o"
        booster.save_model(str(model_file))
        try:
            subprocess.run(
                [sys.executable, "-m", "models.compiled", str(model_file), str(binary)],
                check=True,
                capture_output=True,
                timeout=COMPILE_TIMEOUT_S,
            )
            model = lleaves.Model(model_file=str(model_file))
            model.compile(cache=str(binary))  # loads the binary the child wrote
        except Exception as exc:
            stderr = getattr(exc, "stderr", None) or b""
            log.warning(
                "cannot compile the model; LightGBM predicts",
                extra={"model": version, "error": repr(exc), "stderr": stderr[-500:].decode()},
            )
            return None

    def predict(features: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        # One thread, as LightGBM's: a call holds a few dozen rows.
        return np.asarray(model.predict(features, n_jobs=1), dtype=np.float64)

    return predict


def main(argv: list[str] | None = None) -> None:
    import lleaves

    model_file, binary = argv if argv is not None else sys.argv[1:]
    lleaves.Model(model_file=model_file).compile(cache=binary)


if __name__ == "__main__":
    main()
