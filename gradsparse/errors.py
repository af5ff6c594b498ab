"""The exceptions a training loop raises, on the bottom layer: every module that raises or catches
one imports it from here, never from a sibling.

- :class:`TrainingDiverged` (a RuntimeError): the loss or a gradient became NaN/inf; names the
  step, where, and the last good checkpoint. ``gradsparse`` exits 3.
- :class:`TrainingInterrupted` (a KeyboardInterrupt): Ctrl-C during a run; says what was kept and
  whether the run can be resumed. ``gradsparse`` exits 130 and prints the ``--resume`` command.
- :class:`CheckpointDamaged` (a ValueError): a checkpoint file whose bytes are not what was
  saved; ``--resume --skip-damaged`` skips such files. ``gradsparse`` exits 2.
"""

from __future__ import annotations

from pathlib import Path


class TrainingDiverged(RuntimeError):
    """Raised when the loss or a gradient becomes NaN/inf; names the step and the first bad layer."""

    def __init__(self, step: int, where: str, checkpoint: Path | None):
        self.step, self.where, self.checkpoint = step, where, checkpoint
        keep = f"; last good checkpoint: {checkpoint}" if checkpoint else ""
        super().__init__(f"non-finite loss or gradient at step {step} ({where}){keep}")


class TrainingInterrupted(KeyboardInterrupt):
    """Raised when training is interrupted (Ctrl-C, SIGINT): a checkpoint at the current step
    was saved when one could be written (``checkpoint``, ``saved``), so ``--resume`` continues
    from ``step``; ``message`` says what was kept."""

    def __init__(self, step: int, steps: int, checkpoint: Path | None, saved: bool, out: Path | None,
                 why_not: str | None = None):
        self.step, self.steps, self.checkpoint, self.saved, self.out = step, steps, checkpoint, saved, out
        msg = f"interrupted at step {step} of {steps}; "
        if why_not:
            msg += f"no checkpoint written ({why_not}); "
        if out is None:
            msg += "no run folder: nothing kept"
        elif saved:
            msg += f"checkpoint {checkpoint} holds step {step}"
        elif checkpoint is not None:
            msg += f"the newest checkpoint is {checkpoint}"
        else:
            msg += "no checkpoint yet, so a resume starts from step 0"
        self.message = msg
        self.resumable = out is not None
        super().__init__(msg)


class CheckpointDamaged(ValueError):
    """A checkpoint file whose bytes are not what was saved (truncated, flipped, edited); the
    message names the file and says "damaged"."""
