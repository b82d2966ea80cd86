import math

import numpy as np
import pytest

from ownlm.pretrain.monitors import LossMonitor, TrainingDiverged
from ownlm.pretrain.stage import PretrainConfig, lr_at


def test_nan_and_inf_stop_training_with_advice():
    m = LossMonitor(window=5)
    for bad in (math.nan, math.inf):
        with pytest.raises(TrainingDiverged, match="--resume"):
            m.update(3, bad)


def test_spike_stops_but_a_steady_decline_does_not():
    m = LossMonitor(window=10, spike_factor=3.0)
    for step, loss in enumerate(np.linspace(6.0, 4.0, 30)):
        assert m.update(step, float(loss)) is None  # smooth decline: no fluctuation warning either
    with pytest.raises(TrainingDiverged, match="spiked"):
        m.update(31, 20.0)


def test_fluctuation_warns_once_per_window():
    rng = np.random.default_rng(0)
    m = LossMonitor(window=20, max_fluctuation=0.05)
    warnings = [m.update(s, float(4.0 + rng.normal(0, 0.5))) for s in range(60)]
    got = [w for w in warnings if w]
    assert 1 <= len(got) <= 3 and "fluctuation" in got[0]
    state = m.state_dict()
    m2 = LossMonitor(window=20)
    m2.load_state_dict(state)
    assert m2.fluctuation() == m.fluctuation()


def test_lr_schedules():
    cfg = PretrainConfig(lr=1.0, warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(60, cfg) == pytest.approx(0.55)
    wsd = cfg.model_copy(update={"schedule": "wsd", "wsd_decay_fraction": 0.2})
    assert lr_at(80, wsd) == 1.0 and lr_at(110, wsd) == pytest.approx(0.1)
    assert lr_at(99, wsd) == pytest.approx(1.0 - 0.9 * 11 / 22)
