"Host syncs of one ordinary training step of a method, its augmentation held fixed: shared by the method tests."
import torch
from sslkd.masking import HostSyncs


class FixedViews:
    "The views `augment` made once, returned at every call: a step counted without the augmentation's own ops."
    def __init__(self, augment, x, g): self.n_global, self.views = augment.n_global, augment(x, g)
    def __call__(self, x, g): return self.views


def syncs_in_step(m, x, **kw):
    "Host syncs of one ordinary training step of `m` on `x`, its backward included; returns the counter and the logs."
    m.augment = FixedViews(m.augment, x, torch.Generator().manual_seed(0))
    m.training_step(x, torch.Generator().manual_seed(1), 0, 100, **kw)  # the first call may make constants
    with HostSyncs() as s:
        loss, logs = m.training_step(x, torch.Generator().manual_seed(1), 1, 100, **kw)
        loss.backward()
    return s, logs
