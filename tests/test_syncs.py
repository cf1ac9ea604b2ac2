"""No host synchronisation in an ordinary training step, for every method (issue: a GPU waits on every `.item()`).

Counted on the CPU with `HostSyncs` (a `TorchDispatchMode`): reading a value back (`_local_scalar_dense`), `nonzero`,
`masked_select`, boolean-mask indexing, and tensors made from Python data inside the step (`lift_fresh`, a blocking
copy on a GPU). The optimiser's own step is left out: AdamW keeps its step counters on the host by design."""
import pytest, torch
from torch.utils._python_dispatch import _disable_current_modes
from sslkd.masking import HostSyncs
from step_syncs import default_method
from sslkd.registry import METHODS
from sslkd.train import TrainConfig, train_step, param_groups

CPU = torch.device('cpu')


def _setup(name, batch=16):
    method, x = default_method(name, batch)
    opt = torch.optim.AdamW(param_groups(method.student), lr=1e-3)
    step = opt.step
    def host_step(*a, **k):  # AdamW's step counters live on the host: its own `.item()`s are not the step's
        with _disable_current_modes(): return step(*a, **k)
    opt.step = host_step
    return method, opt, x, torch.Generator().manual_seed(0), TrainConfig(batch_size=batch)


def _count(method, opt, x, g, cfg, step, log=False):
    with HostSyncs() as h: loss, _ = train_step(method, opt, x, g, cfg, CPU, step, 100, 10, log=log)
    return h, loss


@pytest.mark.parametrize('name', [n for n in METHODS if n != 'random'])
def test_an_ordinary_step_never_waits_for_the_device(name):
    method, opt, x, g, cfg = _setup(name)
    train_step(method, opt, x, g, cfg, CPU, 0, 100, 10)  # the first step builds caches (constants, centres)
    h, loss = _count(method, opt, x, g, cfg, 1)
    assert h.n == 0, dict(h.counts)
    assert h.ops > 100 and torch.isfinite(loss)  # the counter saw a real step


def test_the_counter_sees_a_sync_and_log_steps_may_read_values():
    method, opt, x, g, cfg = _setup('dino')
    train_step(method, opt, x, g, cfg, CPU, 0, 100, 10)
    h, _ = _count(method, opt, x, g, cfg, 1, log=True)  # logged values are read back: allowed, every log_every steps
    assert h.counts['aten::_local_scalar_dense'] > 0
    with HostSyncs() as h: torch.ones(3).sum().item(); torch.tensor([1., 2.]); torch.ones(3)[torch.ones(3) > 0]
    assert h.n >= 3
