"""Training-health checks: loss fluctuation (a warning) and NaN/spike detection (a stop).

The seed asks that "loss fluctuation < 0.05". A falling loss is not a fluctuation, so we measure
the spread of the losses around their own quadratic trend over a sliding window, relative to the mean
loss, and warn (once per window) when it passes the threshold. A non-finite loss, or one far above
the window's median, means the run has diverged: training stops with a message saying what to do.
"""

from __future__ import annotations

import math
from collections import deque

import numpy as np

from ownlm.core.errors import OwnlmError


class TrainingDiverged(OwnlmError):
    """The loss became NaN/inf or spiked: continuing would only waste compute."""


class LossMonitor:
    def __init__(self, window: int = 50, max_fluctuation: float = 0.05, spike_factor: float = 3.0):
        self.window, self.max_fluctuation, self.spike_factor = window, max_fluctuation, spike_factor
        self.losses: deque[float] = deque(maxlen=window)
        self.steps_since_warning = window

    def fluctuation(self) -> float | None:
        if len(self.losses) < self.window:
            return None
        y = np.asarray(self.losses)
        x = np.arange(len(y))
        # A quadratic trend: early in training the loss falls along a curve, and a curve is no fluctuation.
        trend = np.polyval(np.polyfit(x, y, 2), x)
        return float(np.std(y - trend) / max(abs(float(np.mean(y))), 1e-8))

    def update(self, step: int, loss: float) -> str | None:
        """Record a loss; raise on divergence; return a warning line when the loss fluctuates."""
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"pretrain: loss is {loss} at step {step}; lower pretrain.lr or raise pretrain.warmup_steps, "
                "then continue from the last checkpoint with --resume"
            )
        if len(self.losses) == self.window:
            median = float(np.median(self.losses))
            if loss > self.spike_factor * median:
                raise TrainingDiverged(
                    f"pretrain: loss spiked to {loss:.3f} at step {step} (> {self.spike_factor} × recent "
                    f"median {median:.3f}); lower pretrain.lr or pretrain.grad_clip, then --resume"
                )
        self.losses.append(loss)
        self.steps_since_warning += 1
        fl = self.fluctuation()
        if fl is not None and fl > self.max_fluctuation and self.steps_since_warning >= self.window:
            self.steps_since_warning = 0
            return (
                f"warning: loss fluctuation {fl:.3f} over the last {self.window} steps exceeds "
                f"{self.max_fluctuation} (step {step}); consider a lower lr or a larger batch"
            )
        return None

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "steps_since_warning": self.steps_since_warning}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.steps_since_warning = state["steps_since_warning"]
