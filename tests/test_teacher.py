import math
import pytest
import torch
import torch.nn as nn

from sslkd.teacher import make_teacher, ema_update, cosine_schedule


def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def storages(m):
    return {t.untyped_storage().data_ptr() for t in [*m.parameters(), *m.buffers()]}


def test_make_teacher_copies_without_sharing():
    s = net()
    t = make_teacher(s)
    assert not storages(s) & storages(t)
    assert all(not p.requires_grad for p in t.parameters())
    assert all(p.requires_grad for p in s.parameters())  # the student is untouched
    assert not t.training and s.training
    for (na, a), (nb, b) in zip(s.state_dict().items(), t.state_dict().items()):
        assert na == nb and torch.equal(a, b)
    # changing the student in place does not change the teacher
    with torch.no_grad(): s[0].weight.add_(1.)
    assert not torch.equal(s[0].weight, t[0].weight)


def test_make_teacher_vit_head():
    from sslkd.vit import ViT
    from sslkd.heads import DINOHead
    torch.manual_seed(0)
    vit = ViT(img_size=12, patch_size=2, in_chans=1, embed_dim=16, depth=1, num_heads=2, drop_path_rate=0.5)
    s = nn.Sequential(vit, DINOHead(16, 10, hidden_dim=8, bottleneck_dim=4))
    t = make_teacher(s)
    assert not storages(s) & storages(t)
    x = torch.randn(2, 1, 12, 12)
    assert torch.equal(t(x), t(x))  # eval mode: no stochastic depth


def tiny(w, b):
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([w])); lin.bias.fill_(b)
    return lin


def test_momentum_edge_cases_exact():
    s = tiny([1., 2.], 3.)
    t = make_teacher(tiny([5., 6.], 7.))
    ema_update(t, s, 1.)
    assert torch.equal(t.weight, torch.tensor([[5., 6.]])) and torch.equal(t.bias, torch.tensor([7.]))
    ema_update(t, s, 0.5)
    assert torch.equal(t.weight, torch.tensor([[3., 4.]])) and torch.equal(t.bias, torch.tensor([5.]))
    ema_update(t, s, 0.75)
    assert torch.equal(t.weight, torch.tensor([[2.5, 3.5]])) and torch.equal(t.bias, torch.tensor([4.5]))
    ema_update(t, s, 0.)
    assert torch.equal(t.weight, s.weight.detach()) and torch.equal(t.bias, s.bias.detach())
    # the student is never modified
    assert torch.equal(s.weight, torch.tensor([[1., 2.]])) and torch.equal(s.bias, torch.tensor([3.]))


def test_ema_matches_naive_loop():
    s, t = net(), make_teacher(net())
    with torch.no_grad():
        for p in t.parameters(): p.normal_()
    ref = [(0.9 * pt + 0.1 * ps).detach() for pt, ps in zip(t.parameters(), s.parameters())]
    ema_update(t, s, 0.9)
    for r, p in zip(ref, t.parameters()): torch.testing.assert_close(p, r, atol=1e-6, rtol=0)


def test_buffers_copied():
    s = net(); t = make_teacher(s)
    s(torch.randn(16, 4))  # training-mode forward moves the running statistics
    assert not torch.equal(s[1].running_mean, t[1].running_mean)
    ema_update(t, s, 0.999)
    for a, b in zip(s.buffers(), t.buffers()): assert torch.equal(a, b)
    assert not storages(s) & storages(t)  # copied, not aliased


def test_gradients_never_reach_teacher():
    s = net(); t = make_teacher(s); t.train()
    x = torch.randn(8, 4)
    out = t(x)
    assert not out.requires_grad
    loss = (s(x) - out).pow(2).mean() + t(x).sum()
    loss.backward()
    assert all(p.grad is None for p in t.parameters())
    assert all(p.grad is not None for p in s.parameters())
    ema_update(t, s, 0.5)
    assert all(not p.requires_grad and p.grad is None for p in t.parameters())


def test_ema_rejects_mismatch_and_bad_m():
    with pytest.raises(ValueError, match='make_teacher'):
        ema_update(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match=r'must be in \[0, 1\]'):
        ema_update(nn.Linear(2, 2), nn.Linear(2, 2), -0.1)


def test_ema_frozen_student_params_follow():
    from sslkd.heads import DINOHead
    s = DINOHead(4, 6, hidden_dim=8, bottleneck_dim=3)
    t = make_teacher(s)
    with torch.no_grad(): s.last_layer.parametrizations.weight.original1.mul_(2.)
    ema_update(t, s, 0.)
    for a, b in zip(s.state_dict().values(), t.state_dict().values()): assert torch.equal(a, b)


# ---- schedules

def test_schedule_exact_points():
    assert cosine_schedule(0, 100, 1., 0.) == 1.
    assert math.isclose(cosine_schedule(50, 100, 1., 0.), 0.5, abs_tol=1e-12)
    assert math.isclose(cosine_schedule(25, 100, 1., 0.), 0.5 * (1 + math.cos(math.pi / 4)), abs_tol=1e-12)
    assert cosine_schedule(100, 100, 1., 0.) == 0.
    assert cosine_schedule(1000, 100, 1., 0.) == 0.
    assert cosine_schedule(0, 10, 0.996, 1.) == 0.996
    assert cosine_schedule(10, 10, 0.996, 1.) == 1.
    assert isinstance(cosine_schedule(3, 10, 1, 0), float)


def test_schedule_warmup():
    kw = dict(total_steps=110, start=1., end=0., warmup_steps=10, warmup_start=0.5)
    assert cosine_schedule(0, **kw) == 0.5
    assert math.isclose(cosine_schedule(4, **kw), 0.7, abs_tol=1e-12)
    assert cosine_schedule(10, **kw) == 1.
    assert math.isclose(cosine_schedule(60, **kw), 0.5, abs_tol=1e-12)  # middle of the cosine part
    assert cosine_schedule(110, **kw) == 0.
    assert cosine_schedule(0, 10, 1., 0., warmup_steps=5) == 0.  # default warmup_start is 0


def test_schedule_monotone():
    up = [cosine_schedule(s, 37, 0.04, 0.4) for s in range(40)]
    assert all(a <= b for a, b in zip(up, up[1:])) and up[0] == 0.04 and up[-1] == 0.4
    lr = [cosine_schedule(s, 50, 1e-3, 1e-6, warmup_steps=7) for s in range(51)]
    assert all(a < b for a, b in zip(lr[:7], lr[1:8]))          # strictly rising warm-up
    assert all(a >= b for a, b in zip(lr[7:], lr[8:]))          # then non-increasing
    assert max(lr) == 1e-3 and lr[7] == 1e-3
    temp = [cosine_schedule(s, 50, 0.07, 0.07, warmup_steps=20, warmup_start=0.04) for s in range(51)]
    assert all(a <= b for a, b in zip(temp, temp[1:]))
    assert temp[20:] == [0.07] * 31


def test_schedule_one_step_and_full_warmup():
    assert cosine_schedule(0, 1, 0.996, 1.) == 0.996
    assert cosine_schedule(1, 1, 0.996, 1.) == 1.
    assert cosine_schedule(0, 1, 1., 0., warmup_steps=1, warmup_start=0.25) == 0.25
    assert cosine_schedule(2, 4, 1., 0., warmup_steps=4) == 0.5


@pytest.mark.parametrize('args,msg', [((0, 0, 1., 0.), 'total_steps'), ((0, 5, 1., 0., 6), 'warm-up'),
                                      ((-1, 5, 1., 0.), 'step=-1'), ((0, 5, 1., 0., -1), 'warmup_steps')])
def test_schedule_errors(args, msg):
    with pytest.raises(ValueError, match=msg): cosine_schedule(*args)
