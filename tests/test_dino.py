import io, math, warnings
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import sslkd.dino as dino_mod
from sslkd.dino import (DINOLoss, DINOConfig, DINO, dino_loss_naive, multicrop_cross_entropy, center_sharpen,
                        batch_center, ema_center_, teacher_temp_schedule, local_crop_size, multicrop_forward,
                        teacher_mode_, cross_view_pairs, as_views)
from sslkd.vit import vit_nano
from sslkd.resnet import small_cnn

pytestmark = pytest.mark.filterwarnings('ignore:ViT with img_size')


def per_pair_reference(student, teacher, center, tt, ts):
    "Independent reference: python loops over pairs, images and prototypes, float64."
    V, B, K = student.shape
    total, n = 0.0, 0
    for i in range(teacher.shape[0]):
        for v in range(V):
            if v == i: continue
            term = 0.0
            for b in range(B):
                tl = [(teacher[i, b, k] - center[0, k]).item() / tt for k in range(K)]
                mt = max(tl); q = [math.exp(a - mt) for a in tl]; zq = sum(q); q = [a / zq for a in q]
                sl = [student[v, b, k].item() / ts for k in range(K)]
                ms = max(sl); lse = ms + math.log(sum(math.exp(a - ms) for a in sl))
                term += -sum(q[k] * (sl[k] - lse) for k in range(K))
            total += term / B; n += 1
    return total / n


@pytest.mark.parametrize('G,V', [(2, 2), (2, 6), (1, 3), (3, 5)])
def test_vectorised_equals_naive_and_reference(G, V):
    g = torch.Generator().manual_seed(G * 10 + V)
    s = torch.randn(V, 4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t, c = torch.randn(G, 4, 9, generator=g, dtype=torch.float64), torch.randn(1, 9, generator=g, dtype=torch.float64)
    naive = dino_loss_naive(s, t, c, 0.05, 0.1)
    fast = multicrop_cross_entropy(F.log_softmax(s / 0.1, -1), center_sharpen(t, c, 0.05))
    torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-12)
    assert fast.item() == pytest.approx(per_pair_reference(s.detach(), t, c, 0.05, 0.1), rel=1e-10)
    gn, = torch.autograd.grad(naive, s); gf, = torch.autograd.grad(fast, s)
    torch.testing.assert_close(gf, gn, rtol=1e-12, atol=1e-12)
    loss = DINOLoss(9).double(); loss.center.copy_(c)
    torch.testing.assert_close(loss(s, t, 0.05), naive, rtol=1e-12, atol=1e-12)


def test_pairs_skip_same_view_only():
    # a student that copies teacher view 0 exactly on its view 0 and is uniform elsewhere: the copy pair must not count
    K = 5
    t = torch.randn(2, 3, K, dtype=torch.float64)
    s = torch.zeros(4, 3, K, dtype=torch.float64)
    s[0] = t[0] / 0.04 * 0.1  # student view 0 == teacher view 0 at the temperatures below
    loss = dino_loss_naive(s, t, torch.zeros(1, K, dtype=torch.float64), 0.04)
    fast = DINOLoss(K).double()(s, t, 0.04)
    torch.testing.assert_close(fast, loss)
    q1 = F.softmax(t[1] / 0.04, -1)
    ls0 = F.log_softmax(s[0] / 0.1, -1)
    # t1 vs s0; the rest are uniform students
    terms = [-(q1 * ls0).sum(-1).mean()] + [torch.tensor(math.log(K), dtype=torch.float64)] * 5
    torch.testing.assert_close(fast, sum(terms) / 6)


def test_uniform_student_gives_ln_K():
    K = 13
    loss = DINOLoss(K)
    out = loss(torch.zeros(6, 4, K), torch.randn(2, 4, K), 0.04)
    assert out.item() == pytest.approx(math.log(K), rel=1e-6)


def test_exact_value_by_hand():
    s = torch.tensor([[[math.log(3), 0.]], [[0., 0.]]], dtype=torch.float64)
    t = torch.tensor([[[0., 0.]], [[1., 0.]]], dtype=torch.float64)
    p1 = math.e / (math.e + 1)
    by_hand = (math.log(2) - (p1 * math.log(3 / 4) + (1 - p1) * math.log(1 / 4))) / 2
    out = DINOLoss(2, student_temp=1.).double()(s, t, teacher_temp=1.)
    assert out.item() == pytest.approx(by_hand, abs=1e-12)


def test_center_ema_exact_and_used_before_update():
    K = 3
    loss = DINOLoss(K, center_momentum=0.9).double()
    t1 = torch.full((2, 4, K), 1., dtype=torch.float64); t1[..., 0] = 3.
    s = torch.randn(3, 4, K, dtype=torch.float64)
    out = loss(s, t1, 0.07)
    old_centre = torch.zeros(1, K, dtype=torch.float64)
    torch.testing.assert_close(out, dino_loss_naive(s, t1, old_centre, 0.07))
    torch.testing.assert_close(loss.center, torch.tensor([[0.3, 0.1, 0.1]], dtype=torch.float64))
    loss(s, t1, 0.07)
    torch.testing.assert_close(loss.center, torch.tensor([[0.57, 0.19, 0.19]], dtype=torch.float64))
    before = loss.center.clone(); loss(s, t1, 0.07, update_center=False)
    torch.testing.assert_close(loss.center, before)
    assert loss.teacher_probs.shape == (2, 4, K) and not loss.teacher_probs.requires_grad


def test_center_is_all_reduced(monkeypatch):
    "Simulate a second process whose teacher batch mean is `other`: the centre uses the average of both."
    other = torch.tensor([[4., 0., 2.]])
    calls = []
    def all_reduce(t): calls.append(1); t.add_(other)
    monkeypatch.setattr(dino_mod.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dino_mod.dist, 'get_world_size', lambda: 2)
    monkeypatch.setattr(dino_mod.dist, 'all_reduce', all_reduce)
    mine = torch.tensor([[[2., 2., 0.], [0., 2., 0.]]])  # batch mean (1, 2, 0)
    torch.testing.assert_close(batch_center(mine), torch.tensor([[2.5, 1., 1.]]))
    loss = DINOLoss(3)
    loss(torch.zeros(2, 2, 3), mine.expand(2, 2, 3), 0.04)
    torch.testing.assert_close(loss.center, 0.1 * torch.tensor([[2.5, 1., 1.]]))
    assert len(calls) == 2


def test_center_with_a_real_process_group(tmp_path):
    import torch.distributed as dist
    if not dist.is_available(): pytest.skip('torch.distributed is not available')
    dist.init_process_group('gloo', init_method=f'file://{tmp_path}/pg', rank=0, world_size=1)
    try:
        x = torch.randn(2, 5, 4)
        torch.testing.assert_close(batch_center(x), x.mean((0, 1))[None])
    finally: dist.destroy_process_group()


def test_float32_under_autocast():
    s, t = torch.randn(4, 8, 16), torch.randn(2, 8, 16)
    loss = DINOLoss(16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = loss(s.bfloat16(), t.bfloat16(), 0.04, update_center=False)
    assert out.dtype == torch.float32
    ref = dino_loss_naive(s.bfloat16().float(), t.bfloat16().float(), torch.zeros(1, 16), 0.04)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_shape_errors():
    loss = DINOLoss(5)
    with pytest.raises(ValueError, match='view'): loss(torch.zeros(8, 5), torch.zeros(2, 4, 5), 0.04)
    with pytest.raises(ValueError, match='out_dim=5'): loss(torch.zeros(4, 4, 6), torch.zeros(2, 4, 6), 0.04)
    with pytest.raises(ValueError, match='global views first'): loss(torch.zeros(1, 4, 5), torch.zeros(2, 4, 5), 0.04)
    with pytest.raises(ValueError, match='no pair'): loss(torch.zeros(1, 4, 5), torch.zeros(1, 4, 5), 0.04)
    assert as_views([torch.zeros(3, 5)] * 4).shape == (4, 3, 5)


def test_teacher_temp_schedule():
    assert teacher_temp_schedule(0, 1000) == 0.04
    assert teacher_temp_schedule(150, 1000) == pytest.approx(0.055)
    assert teacher_temp_schedule(300, 1000) == 0.07
    assert teacher_temp_schedule(999, 1000) == 0.07
    assert teacher_temp_schedule(5, 10, 0.02, 0.06, warmup_frac=1.) == pytest.approx(0.04)


def test_cross_view_pairs():
    q, ls = torch.arange(2 * 3).view(2, 3, 1), torch.arange(4 * 3).view(4, 3, 1)
    tq, sl = cross_view_pairs(q, ls)
    assert tq.flatten().tolist() == [0, 1, 2, 3, 4, 5] and sl.flatten().tolist() == [3, 4, 5, 0, 1, 2]
    tq, sl = cross_view_pairs(q[:1], ls)
    assert sl.flatten().tolist() == [3, 4, 5]


# ---- the method ---------------------------------------------------------------------------------------------

def tiny_cfg(**kw):
    return DINOConfig(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local=2, **kw)

def tiny_dino(cfg=None, seed=0, **vit_kw):
    torch.manual_seed(seed)
    return DINO(vit_nano(16, 4, 1, depth=1, **vit_kw), 16, 1, (0.3,), (0.3,), cfg or tiny_cfg())

def batch(n=8, seed=0):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_local_crop_size():
    vit = vit_nano(28, 4, 1, depth=1)
    assert local_crop_size(28, vit) == 16 and local_crop_size(32, vit_nano(32, 4, 3, depth=1)) == 16
    assert local_crop_size(28, small_cnn(1)) == 14 and local_crop_size(28, vit, 12) == 12
    with pytest.raises(ValueError, match='multiple of the backbone'): local_crop_size(28, vit, 14)
    with pytest.raises(ValueError, match='multiple of the backbone'):
        DINO(vit, 28, 1, (0.3,), (0.3,), DINOConfig(local_size=14))
    m = DINO(vit, 28, 1, (0.3,), (0.3,))
    assert [v.size for v in m.augment.views] == [28, 28, 16, 16]  # 2 global + the default 2 local crops


def test_multicrop_forward_equals_per_view():
    torch.manual_seed(0)
    vit = vit_nano(16, 4, 1, depth=1).eval()
    views = [torch.randn(3, 1, s, s) for s in (16, 16, 8, 8, 16)]
    with torch.no_grad():
        torch.testing.assert_close(multicrop_forward(vit, views), torch.cat([vit(v) for v in views]),
                                   rtol=1e-5, atol=1e-5)


def test_training_step_shapes_logs_and_no_teacher_grads():
    m = tiny_dino()
    loss, logs = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 100, log=True)
    assert loss.ndim == 0 and loss.requires_grad and loss.dtype == torch.float32
    for k in ('loss', 'teacher_temp', 'momentum'): assert isinstance(logs[k], float), k
    assert logs['teacher_temp'] == 0.04 and logs['momentum'] == 0.99 and logs['loss'] == pytest.approx(loss.item())
    _, quiet = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 100)
    assert set(quiet) == {'teacher_temp', 'momentum'}
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert all(p.grad is not None for n, p in m.student.named_parameters() if p.requires_grad)
    assert m.loss.center.abs().sum() > 0
    assert m.eval_backbone() is m.teacher.backbone
    assert {id(p) for p in m.student.parameters()}.isdisjoint(id(p) for p in m.teacher.parameters())


def test_after_backward_freezes_last_layer_in_first_epoch():
    m = tiny_dino(tiny_cfg(freeze_last_layer_epochs=1))
    # a long run freezes one epoch (10 steps); a short one at most 5% of its steps (here 5 of 100)
    for step, total, frozen in ((9, 1000, True), (10, 1000, False), (4, 100, True), (5, 100, False)):
        m.student.zero_grad(set_to_none=True)
        m.training_step(batch(), torch.Generator().manual_seed(0), step, total)[0].backward()
        m.after_backward(step, total, steps_per_epoch=10)
        grads = {n: p.grad for n, p in m.student.named_parameters() if p.requires_grad}
        assert all((g is None) == frozen for n, g in grads.items() if 'last_layer' in n)
        assert all(g is not None for n, g in grads.items() if 'last_layer' not in n)


def test_after_step_is_ema_with_cosine_momentum():
    m = tiny_dino()
    with torch.no_grad():
        for p in m.student.parameters(): p.add_(1.)
    before = [p.clone() for p in m.teacher.parameters()]
    mom = m.momentum(50, 100)
    assert mom == pytest.approx(0.995)
    m.after_step(50, 100)
    for b, t, s in zip(before, m.teacher.parameters(), m.student.parameters()):
        torch.testing.assert_close(t, mom * b + (1 - mom) * s)


def test_teacher_mode_and_drop_path():
    m = tiny_dino(drop_path_rate=0.5)
    x = batch()
    m.train()
    l1, _ = m.training_step(x, torch.Generator().manual_seed(1), 0, 10)
    t1 = m.loss.teacher_probs.clone()
    m.loss.center.zero_()
    l2, _ = m.training_step(x, torch.Generator().manual_seed(1), 0, 10)
    torch.testing.assert_close(m.loss.teacher_probs, t1)   # the teacher is deterministic: no stochastic depth
    assert not m.teacher.training and m.student.training


def test_cnn_teacher_uses_batch_statistics_and_keeps_its_running_stats():
    torch.manual_seed(0)
    m = DINO(small_cnn(1), 16, 1, (0.3,), (0.3,), tiny_cfg())
    loss, _ = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 10)
    assert torch.isfinite(loss)
    t_bns = [mod for mod in m.teacher.modules() if isinstance(mod, nn.BatchNorm2d)]
    s_bns = [mod for mod in m.student.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert t_bns and all(bn.training for bn in t_bns)
    own = [bn.running_mean.clone() for bn in t_bns]
    assert all(o.abs().sum() > 0 for o in own)            # updated by the teacher's forward on the global crops
    assert not torch.equal(own[0], s_bns[0].running_mean)  # the student's mix globals and locals
    before = [p.clone() for p in m.teacher.parameters()]
    with torch.no_grad():
        for p in m.student.parameters(): p.add_(1.)
    m.after_step(0, 10)
    for o, bn in zip(own, t_bns): torch.testing.assert_close(bn.running_mean, o)
    for b, t_, s_ in zip(before, m.teacher.parameters(), m.student.parameters()):
        torch.testing.assert_close(t_, 0.99 * b + 0.01 * s_)


def test_student_fits_a_frozen_teacher():
    "With the teacher and centre frozen and the same views every step, the student's loss must go down."
    m = tiny_dino(tiny_cfg(momentum_start=1., center_momentum=1., freeze_last_layer_epochs=0))
    opt = torch.optim.AdamW(m.student.parameters(), lr=3e-3)
    x, losses = batch(16), []
    for step in range(12):
        loss, _ = m.training_step(x, torch.Generator().manual_seed(0), step, 12)
        opt.zero_grad(); loss.backward(); m.after_backward(step, 12, 100); opt.step(); m.after_step(step, 12)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_end_to_end_default_schedule_runs():
    m = tiny_dino()
    opt = torch.optim.AdamW(m.student.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        loss, logs = m.training_step(batch(seed=step), g, step, 4, log=step == 3)
        opt.zero_grad(); loss.backward(); m.after_backward(step, 4, 2); opt.step(); m.after_step(step, 4)
        assert torch.isfinite(loss)
    assert logs['loss'] == pytest.approx(loss.item())


SIGNALS = ('teacher_entropy', 'teacher_mean_entropy', 'ln_K', 'kl_teacher_student', 'agreement', 'feature_std',
           'effective_rank')

def test_logs_collapse_signals():
    pytest.importorskip('sslkd.metrics')
    m = tiny_dino()
    loss, logs = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 100, log=True)
    for k in SIGNALS: assert isinstance(logs[k], float), k
    assert logs['ln_K'] == pytest.approx(math.log(64), rel=1e-5)
    assert 0 <= logs['teacher_entropy'] <= math.log(64) + 1e-4
    assert logs['kl_teacher_student'] >= -1e-6


def test_seeded_repeatability():
    a = tiny_dino(seed=3).training_step(batch(), torch.Generator().manual_seed(5), 0, 10)[0]
    b = tiny_dino(seed=3).training_step(batch(), torch.Generator().manual_seed(5), 0, 10)[0]
    assert a.item() == b.item()


def test_state_dict_round_trip_restores_center_and_teacher():
    m = tiny_dino()
    opt = torch.optim.AdamW(m.student.parameters(), lr=1e-3)
    for step in range(2):
        loss, _ = m.training_step(batch(seed=step), torch.Generator().manual_seed(step), step, 10)
        opt.zero_grad(); loss.backward(); opt.step(); m.after_step(step, 10)
    buf = io.BytesIO(); torch.save(m.state_dict(), buf); buf.seek(0)
    m2 = tiny_dino(seed=123)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    torch.testing.assert_close(m2.loss.center, m.loss.center)
    assert m.loss.center.abs().sum() > 0
    for a, b in zip(m.teacher.state_dict().values(), m2.teacher.state_dict().values()): torch.testing.assert_close(a, b)
    la = m.training_step(batch(seed=9), torch.Generator().manual_seed(9), 3, 10)[0]
    lb = m2.training_step(batch(seed=9), torch.Generator().manual_seed(9), 3, 10)[0]
    assert la.item() == lb.item()


def test_family_follows_the_method_contract():
    "Each method of the family is a `Method` built by one constructor; `config_cls` gives the default settings."
    from sslkd.train import Method
    from sslkd.dino import SelfDistillation
    from sslkd.ibot import iBOT, iBOTConfig
    from sslkd.ibot_rkd import iBOTRKD, iBOTRKDConfig
    from sslkd.multiteacher import MultiTeacher, MultiTeacherConfig
    for cls, cfg_cls in ((DINO, DINOConfig), (iBOT, iBOTConfig), (iBOTRKD, iBOTRKDConfig),
                         (MultiTeacher, MultiTeacherConfig)):
        assert issubclass(cls, SelfDistillation) and issubclass(cls, Method) and cls.config_cls is cfg_cls
        assert '__init__' not in vars(cls) or cls is iBOTRKD  # the family's one constructor, reached via super()
        m = cls(vit_nano(16, 4, 1, depth=2, use_mask_token=True), 16, 1, (0.3,), (0.3,))
        assert type(m.cfg) is cfg_cls and m.cfg == cfg_cls()
        assert set(m.student) >= {'backbone', 'head'} and m.eval_backbone() is not m.student.backbone


# ---- no host synchronisation in an ordinary step ------------------------------------------------------------

from step_syncs import syncs_in_step


@pytest.mark.parametrize('G,V', [(2, 2), (2, 6), (1, 3), (3, 5)])
def test_pair_weights_equal_the_mean_of_the_selected_pairs(G, V):
    g = torch.Generator().manual_seed(G * 10 + V)
    ls, q = F.log_softmax(torch.randn(V, 4, 9, generator=g), -1), F.softmax(torch.randn(G, 4, 9, generator=g), -1)
    ce = -torch.einsum('gbk,vbk->gv', q, ls) / 4
    torch.testing.assert_close(multicrop_cross_entropy(ls, q), ce[~torch.eye(G, V, dtype=torch.bool)].mean())


def test_weighted_center_is_the_mean_of_the_selected_rows():
    x, w = torch.randn(3, 4, 5), torch.rand(3, 4) < 0.5
    w[0, 0] = True
    torch.testing.assert_close(batch_center(x, w), x[w].mean(0, keepdim=True))
    soft = torch.rand(3, 4)
    torch.testing.assert_close(batch_center(x, soft), (soft[..., None] * x).sum((0, 1))[None] / soft.sum())
    c = torch.randn(1, 5)
    c2 = c.clone(); ema_center_(c2, x, 0.8, w)
    torch.testing.assert_close(c2, 0.8 * c + 0.2 * x[w].mean(0, keepdim=True))
    c2 = c.clone(); ema_center_(c2, x, 0.8, torch.zeros(3, 4))
    assert torch.equal(c2, c)                                 # nothing selected: the centre stays


def test_weighted_center_is_all_reduced_with_its_weights(monkeypatch):
    "A second process contributed rows summing to `other` with total weight 3: the weighted mean over both."
    other = torch.tensor([[6., 3., 0., 3.]])                   # weighted sums (3 values) and the total weight
    monkeypatch.setattr(dino_mod.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(dino_mod.dist, 'all_reduce', lambda t: t.add_(other))
    x, w = torch.tensor([[1., 1., 1.], [5., 5., 5.]]), torch.tensor([1., 0.])
    torch.testing.assert_close(batch_center(x, w), torch.tensor([[7., 4., 1.]]) / 4)
    c = torch.zeros(1, 3); ema_center_(c, x, 0.5, torch.zeros(2))   # none here, 3 on the other process: it moves
    torch.testing.assert_close(c, 0.5 * torch.tensor([[6., 3., 0.]]) / 3)


def test_an_ordinary_step_never_waits_for_the_host():
    s, _ = syncs_in_step(tiny_dino(), batch())
    assert s.n == 0, dict(s.counts)
