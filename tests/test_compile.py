"""`--compile` compiles an ordinary step's tensor work whole: `forward_loss` is one graph, with no graph break.

Graph breaks are counted with `torch._dynamo.explain`, which traces without compiling (seconds, not minutes);
one real compilation checks that `fit` uses the compiled graph on ordinary steps and gets the eager loss."""
import pytest, torch, torch.nn as nn
import torch._dynamo as dynamo
from torch._dynamo.utils import counters
from sslkd.data import ImageData
from sslkd.registry import METHODS
from sslkd.train import Method, TrainConfig, compile_step, fit
from step_syncs import default_method


@pytest.mark.parametrize('name', [n for n in METHODS if n != 'random'])
def test_the_step_tensor_work_is_one_graph(name):
    method, x = default_method(name)
    inputs, _ = method.prepare(x, torch.Generator().manual_seed(0), 1, 100)
    dynamo.reset()
    ex = dynamo.explain(method.forward_loss)(*inputs)
    assert (ex.graph_count, ex.graph_break_count) == (1, 0), [str(b.reason)[:300] for b in ex.break_reasons]
    assert ex.op_count > 20  # the graph holds the networks, not a stub


class Pull(Method):
    "Two noisy views of each image pulled together: a method small enough to compile in seconds."
    def prepare(self, x, g, step, total_steps):
        v = x.float().div(255).flatten(1)
        return (v + 0.1 * torch.randn(v.shape, generator=g), v.flip(-1)), {}
    def forward_loss(self, a, b, log=False):
        loss = 1 - torch.cosine_similarity(self.student(a), self.student(b)).mean()
        return loss, {'loss': loss.item()} if log else {}


def _pull(seed=0):
    torch.manual_seed(seed)
    return Pull(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8)), 4, 1, (0.5,), (0.5,))


def test_fit_compiles_the_step_and_trains_as_eager_does():
    data = ImageData(torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8), torch.zeros(64, dtype=torch.long),
                     ['x'], (0.5,), (0.5,))
    cfg = dict(epochs=2, batch_size=16, lr=1e-2, eval_every=0, progress=False, log_every=3)
    dynamo.reset(); counters.clear()
    compiled, eager = _pull(), _pull()
    fit(compiled, data, TrainConfig(**cfg, compile='on'))
    assert compiled.compiled_loss is not None and counters['stats']['unique_graphs'] >= 1
    fit(eager, data, TrainConfig(**cfg, compile='off'))
    assert eager.compiled_loss is None
    for p, q in zip(compiled.parameters(), eager.parameters()): torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_compile_choices():
    m = _pull()
    assert not compile_step(m, 'auto', torch.device('cpu')) and m.compiled_loss is None  # auto: on a GPU only
    assert not compile_step(m, False)
    with pytest.raises(ValueError, match='choose one of auto, on, off'): compile_step(m, 'yes')

    class OwnStep(Pull):  # its own training_step: the student's modules are compiled in place, keys unchanged
        def training_step(self, x, g, step, total_steps, log=False):
            return super().training_step(x, g, step, total_steps, log)
    own = OwnStep(nn.Sequential(nn.Linear(16, 8)), 4, 1, (0.5,), (0.5,))
    keys = list(own.state_dict())
    assert compile_step(own, 'on') and own.compiled_loss is None and list(own.state_dict()) == keys
    assert own.student[0]._compiled_call_impl is not None
