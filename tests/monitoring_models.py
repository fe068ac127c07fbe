"""The small Python model the monitoring tests serve: it doubles ``x``."""

from __future__ import annotations

from pathlib import Path

DOUBLER = """
class Doubler:
    def load(self):
        pass

    def predict(self, inputs):
        return {"y": inputs["x"] * 2}
"""


def doubler_repository(root: Path, extra: str = "") -> Path:
    """A repository under ``root`` holding ``doubler`` (version 1); ``extra``: more model.yaml lines."""
    repository = root / "models"
    (repository / "doubler" / "1").mkdir(parents=True)
    (repository / "doubler" / "1" / "model.py").write_text(DOUBLER)
    (repository / "doubler" / "model.yaml").write_text(
        f"runtime: python\nmax_batch_size: 8\n{extra}"
        "inputs: [{name: x, datatype: FP32, shape: [-1, 1]}]\noutputs: [{name: y, datatype: FP32, shape: [-1, 1]}]\n"
    )
    return repository
