import copy, io, math
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from sslkd.dino import DINO, DINOConfig, multicrop_cross_entropy, center_sharpen
from sslkd.vit import ViT
from sslkd.multiteacher import (MultiTeacher, MultiTeacherConfig, TeacherSlot, AGGREGATES, entropy_weights,
                                teacher_entropy, multi_teacher_loss, cls_tokens, check_level_block, reinit_, next_stage)


SMALL = dict(out_dim=32, hidden_dim=32, bottleneck_dim=16, n_local=2)

def tiny_vit(depth=2, **kw):
    "16 px / patch 2: 64 tokens, above the ViT's MIN_TOKENS, so no warning."
    return ViT(img_size=16, patch_size=2, in_chans=1, embed_dim=32, depth=depth, num_heads=2, **kw)

def tiny(cfg=None, seed=0, backbone=None, **kw):
    torch.manual_seed(seed)
    return MultiTeacher(backbone or tiny_vit(), 16, 1, (0.3,), (0.3,), cfg or MultiTeacherConfig(**SMALL, **kw))

def batch(n=8, seed=0):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))

def train(m, steps, total=None, lr=1e-3, seed=0, data=None):
    opt = torch.optim.AdamW(m.student.parameters(), lr=lr)
    total, losses = total or steps, []
    for step in range(steps):
        x = batch(seed=seed + step) if data is None else data[step % len(data)]
        loss, _ = m.training_step(x, torch.Generator().manual_seed(seed + step), step, total)
        opt.zero_grad(); loss.backward(); m.after_backward(step, total, 100); opt.step(); m.after_step(step, total)
        losses.append(loss.item())
    return losses

def states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)

def bn_cnn():
    net = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten())
    net.embed_dim = 8
    return net


# --- aggregation -------------------------------------------------------------------------------------------------

def test_entropy_weights_favour_the_confident_teacher():
    K = 4
    sure, flat = torch.tensor([1., 0, 0, 0]), torch.full((K,), 1 / K)
    w = entropy_weights(torch.stack([sure, flat]))
    torch.testing.assert_close(w, torch.tensor([K / (K + 1), 1 / (K + 1)]))   # softmax(0, -ln K)
    # per sample: teacher A is sure on image 0, teacher B on image 1
    q = torch.stack([torch.stack([sure, flat]), torch.stack([flat, sure])])  # (T=2, B=2, K)
    w = entropy_weights(q)
    assert w[0, 0] > w[1, 0] and w[1, 1] > w[0, 1]
    torch.testing.assert_close(w.sum(0), torch.ones(2))
    # the weighted target leans towards the sure teacher: more mass on its prototype than the plain mean gives
    student = torch.zeros(2, 2, K).log_softmax(-1)
    _, target, _ = multi_teacher_loss(student, q[:, None].expand(2, 2, 2, K), 'entropy_weighted')
    assert target[0, 0, 0] > (sure[0] + flat[0]) / 2 + 0.1
    torch.testing.assert_close(teacher_entropy(flat), torch.tensor(math.log(K)))


def test_mean_loss_equals_mean_probs_cross_entropy_is_linear_in_the_target():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    q = torch.randn(3, 2, 5, 7, generator=g, dtype=torch.float64).div(0.05).softmax(-1)   # three different teachers
    ls = F.log_softmax(s / 0.1, -1)
    a, b = multi_teacher_loss(ls, q, 'mean_probs')[0], multi_teacher_loss(ls, q, 'mean_loss')[0]
    # reference: a loop over teachers of the single-teacher DINO loss
    ref = sum(multicrop_cross_entropy(ls, qt) for qt in q) / 3
    torch.testing.assert_close(b, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    ga, = torch.autograd.grad(a, s, retain_graph=True); gb, = torch.autograd.grad(b, s)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-12)


def test_aggregates_agree_for_identical_teachers_and_differ_otherwise():
    g = torch.Generator().manual_seed(2)
    ls = F.log_softmax(torch.randn(4, 5, 7, generator=g, dtype=torch.float64) / 0.1, -1)
    q = torch.randn(3, 2, 5, 7, generator=g, dtype=torch.float64).div(0.05).softmax(-1)
    single = multicrop_cross_entropy(ls, q[0])
    same = q[:1].expand(3, -1, -1, -1)
    for k in AGGREGATES: torch.testing.assert_close(multi_teacher_loss(ls, same, k)[0], single, rtol=1e-10, atol=1e-10)
    base = multi_teacher_loss(ls, q, 'mean_probs')[0]
    for k in ('entropy_weighted', 'mean_logprobs'): assert abs(multi_teacher_loss(ls, q, k)[0] - base) > 1e-3, k
    for k in AGGREGATES:  # every target is a distribution, every weight set sums to 1 over the teachers
        _, target, w = multi_teacher_loss(ls, q, k)
        torch.testing.assert_close(target.sum(-1), torch.ones(2, 5, dtype=torch.float64))
        torch.testing.assert_close(w.sum(0), torch.ones(2, 5, dtype=torch.float64))


def test_geometric_mean_survives_disjoint_teachers():
    "Teachers whose supports do not overlap (underflowed zeros) must not give NaN targets."
    q = torch.zeros(2, 1, 1, 3); q[0, ..., 0] = 1; q[1, ..., 2] = 1
    loss, target, _ = multi_teacher_loss(torch.zeros(3, 1, 3).log_softmax(-1), q, 'mean_logprobs')
    assert torch.isfinite(loss) and torch.isfinite(target).all()


def test_loss_and_config_errors():
    with pytest.raises(ValueError, match="mean_probs"):
        multi_teacher_loss(torch.zeros(2, 1, 3), torch.ones(1, 2, 1, 3) / 3, 'max')
    with pytest.raises(ValueError, match=r"\(T, G, B, K\)"):
        multi_teacher_loss(torch.zeros(2, 1, 3), torch.ones(2, 1, 3) / 3)
    for bad in (dict(aggregate='max'), dict(targets_from='some'), dict(eval_teacher='best'), dict(momenta=(1.2,)),
                dict(level_weight=-1.)):
        with pytest.raises(ValueError): tiny(MultiTeacherConfig(**SMALL, **bad))


# --- the method ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('aggregate', list(AGGREGATES))
def test_one_teacher_is_dino(aggregate):
    torch.manual_seed(0); bb = tiny_vit()
    torch.manual_seed(1); dino = DINO(copy.deepcopy(bb), 16, 1, (0.3,), (0.3,), DINOConfig(**SMALL))
    torch.manual_seed(1)
    mt = MultiTeacher(copy.deepcopy(bb), 16, 1, (0.3,), (0.3,),
                      MultiTeacherConfig(momenta=(0.99,), aggregate=aggregate, **SMALL))
    exact = aggregate != 'mean_logprobs'   # log then softmax rounds
    for step in range(2):
        ld, _ = dino.training_step(batch(seed=step), torch.Generator().manual_seed(step), step, 10)
        lm, _ = mt.training_step(batch(seed=step), torch.Generator().manual_seed(step), step, 10)
        if exact: assert lm.item() == ld.item()
        else: assert lm.item() == pytest.approx(ld.item(), rel=1e-6)
        for m, loss in ((dino, ld), (mt, lm)):
            m.student.zero_grad(); loss.backward()
            with torch.no_grad():  # the same SGD step for both students
                for p in m.student.parameters():
                    if p.grad is not None: p.sub_(0.1 * p.grad)
            m.after_step(step, 10)
        torch.testing.assert_close(mt.teachers[0].center, dino.loss.center, rtol=0, atol=0 if exact else 1e-6)
    for a, b in zip(dino.teacher.parameters(), mt.teachers[0].net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0 if exact else 1e-5)


def test_method_mean_probs_equals_mean_loss_but_not_weighted_with_different_teachers():
    m = tiny()
    with torch.no_grad():  # make the two EMA teachers clearly different
        for p in m.teachers[0].net.parameters(): p.add_(0.3 * torch.randn_like(p))
    sd, out = m.state_dict(), {}
    for agg in ('mean_probs', 'mean_loss', 'entropy_weighted'):
        other = tiny(MultiTeacherConfig(aggregate=agg, **SMALL), seed=7)
        other.load_state_dict(sd)
        out[agg] = other.training_step(batch(), torch.Generator().manual_seed(0), 0, 10)[0].item()
    assert out['mean_loss'] == pytest.approx(out['mean_probs'], rel=1e-6)
    assert abs(out['entropy_weighted'] - out['mean_probs']) > 1e-4


def test_ema_teachers_use_their_own_momenta_and_frozen_teachers_never_change():
    m = tiny(momenta=(0.9, 0.5))
    m.add_frozen_teacher()
    frozen_before = copy.deepcopy(m.frozen[0].net)
    loss, _ = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 1000)
    loss.backward()
    with torch.no_grad():
        for p in m.student.parameters(): p.add_(0.05)   # an optimiser step
    before = [[p.clone() for p in t.net.parameters()] for t in m.teachers]
    m.after_step(0, 1000)
    for i, (t, b, mom) in enumerate(zip(m.teachers, before, (0.9, 0.5))):
        assert m.momentum(0, 1000, i) == mom
        for p0, p, ps in zip(b, t.net.parameters(), m.student.parameters()):
            torch.testing.assert_close(p, mom * p0 + (1 - mom) * ps)
    assert not torch.equal(m.teachers[0].net.head.mlp[0].weight, m.teachers[1].net.head.mlp[0].weight)
    assert states_equal(m.frozen[0].net, frozen_before)
    assert all(p.grad is None and not p.requires_grad for t in [*m.teachers, *m.frozen] for p in t.parameters())


def test_frozen_batchnorm_teacher_keeps_its_running_statistics():
    m = tiny(backbone=bn_cnn(), momenta=(0.9,))
    m.add_frozen_teacher()
    before = copy.deepcopy(m.frozen[0].net)
    train(m, 2, total=10)
    assert states_equal(m.frozen[0].net, before)
    assert not states_equal(m.teachers[0].net, before)      # the EMA teacher moved


def test_eval_backbone_is_the_slowest_teacher_by_default():
    m = tiny(momenta=(0.99, 0.996, 0.9))
    assert m.eval_backbone() is m.teachers[1].net.backbone
    f = tiny(MultiTeacherConfig(momenta=(0.99, 0.996, 0.9), eval_teacher='fastest', **SMALL))
    assert f.eval_backbone() is f.teachers[2].net.backbone


def test_targets_from_selects_teachers():
    m = tiny(MultiTeacherConfig(targets_from='frozen', **SMALL))
    assert [n for n, _, _ in m.active_teachers()] == ['ema0', 'ema1']   # no frozen teacher yet: the EMA ones
    m.add_frozen_teacher()
    assert [n for n, _, _ in m.active_teachers()] == ['frozen0']
    m.cfg.targets_from = 'all'
    assert [n for n, _, _ in m.active_teachers()] == ['ema0', 'ema1', 'frozen0']


def test_float32_loss_and_centres_under_bf16_autocast():
    m = tiny(MultiTeacherConfig(level_weight=0.5, level_out_dim=16, aggregate='entropy_weighted', **SMALL))
    m.add_frozen_teacher()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, logs = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 10, log=True)
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and math.isfinite(logs['teacher_entropy'])
    assert all(b.dtype == torch.float32 for t in [*m.teachers, *m.frozen] for b in t.buffers(recurse=False))
    loss.backward()


SIGNALS = ('teacher_entropy', 'teacher_mean_entropy', 'ln_K', 'kl_teacher_student', 'agreement', 'feature_std',
           'effective_rank')

def test_logs_collapse_signals_and_per_teacher_numbers():
    m = tiny(MultiTeacherConfig(aggregate='entropy_weighted', **SMALL))
    m.add_frozen_teacher()
    loss, logs = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 10, log=True)
    for k in SIGNALS: assert isinstance(logs[k], float), k
    assert logs['ln_K'] == pytest.approx(math.log(32), rel=1e-6) and logs['loss'] == pytest.approx(loss.item())
    names = ('ema0', 'ema1', 'frozen0')
    assert sum(logs[f'weight_{n}'] for n in names) == pytest.approx(1.)
    for n in names: assert 0 <= logs[f'entropy_{n}'] <= math.log(32) + 1e-4 and f'loss_{n}' in logs
    assert logs['momentum_ema0'] == 0.99 and logs['momentum_ema1'] == logs['momentum'] == 0.996
    _, quiet = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 10)
    assert 'teacher_entropy' not in quiet


# --- multi-stage ---------------------------------------------------------------------------------------------------

def test_next_stage_reinitialises_student_and_snapshots_teacher():
    m = tiny()
    train(m, 3, total=10)
    old_student = copy.deepcopy(m.student)
    old_teacher = copy.deepcopy(m.teachers[m.eval_index])
    params = [id(p) for p in m.student.parameters()]
    assert next_stage(m) is m
    assert m.n_frozen == 1
    assert states_equal(m.frozen[0], old_teacher)                     # the snapshot: weights and centre
    assert m.frozen[0].center.abs().sum() > 0
    for (k, a), b in zip(m.student.named_parameters(), old_student.parameters()):
        if a.requires_grad: assert not torch.equal(a, b), k   # every trained weight is new (the fixed gain stays 1)
    assert [id(p) for p in m.student.parameters()] == params   # in place: an optimiser could keep its references
    for t in m.teachers:                                      # EMA teachers restart from the new student, centres at 0
        assert states_equal(t.net, m.student) and t.center.abs().sum() == 0
    snap = copy.deepcopy(m.frozen[0])
    train(m, 2, total=10, seed=5)
    assert states_equal(m.frozen[0].net, snap.net)            # the frozen teacher shares nothing with the student


def test_next_stage_with_a_fresh_backbone_and_errors():
    m = tiny()
    torch.manual_seed(9); fresh = tiny_vit()
    m.next_stage(fresh)
    assert states_equal(m.student.backbone, fresh)
    with pytest.raises(ValueError, match='does not match'): m.next_stage(tiny_vit(depth=3))
    assert m.n_frozen == 1                                            # the failed call changed nothing
    class Odd(nn.Module):
        def __init__(self): super().__init__(); self.scale = nn.Parameter(torch.ones(3)); self.embed_dim = 3
        def forward(self, x): return x.flatten(1)[:, :3] * self.scale
    odd = tiny(backbone=Odd())
    with pytest.raises(ValueError, match='freshly built backbone'): odd.next_stage()
    assert odd.n_frozen == 0


def test_reinit_vit_redraws_everything_like_its_constructor():
    torch.manual_seed(0); vit = tiny_vit(use_mask_token=True)
    with torch.no_grad():
        for p in vit.parameters(): p.add_(1.)
    before = copy.deepcopy(vit)
    reinit_(vit)
    for (k, a), b in zip(vit.named_parameters(), before.parameters()): assert not torch.equal(a, b), k
    assert vit.mask_token.abs().sum() == 0 and abs(vit.pos_embed.std().item() - 0.02) < 0.004
    assert vit.blocks[0].norm1.weight.eq(1).all() and vit.blocks[0].mlp[0].bias.eq(0).all()


def test_distilling_a_frozen_teacher_lowers_the_loss():
    "Stage 2 of multi-stage training: a fresh student against a fixed teacher; over 30 steps the loss must go down."
    g = torch.Generator().manual_seed(0)
    # a tiny synthetic dataset: 4 kinds of bars (rows or columns, light or dark) with noise
    data = []
    for i in range(6):
        kind = torch.randint(0, 4, (16,), generator=g)
        x = torch.rand(16, 1, 16, 16, generator=g) * 60
        for b, k in enumerate(kind.tolist()):
            line = slice(4 * (k // 2) + 2, 4 * (k // 2) + 6)
            if k % 2: x[b, 0, :, line] += 180
            else: x[b, 0, line, :] += 180
        data.append(x.clamp(0, 255).to(torch.uint8))
    m = tiny(MultiTeacherConfig(targets_from='frozen', **SMALL))
    train(m, 20, data=data)           # stage 1, long enough for the teacher's centre to settle
    m.next_stage()
    signals = lambda: m.training_step(data[0], torch.Generator().manual_seed(0), 0, 30, log=True)[1]
    before = signals()
    losses = train(m, 30, lr=2e-3, data=data, seed=100)
    after = signals()
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, losses
    # the student matches the teacher, not just a lower entropy
    assert after['kl_teacher_student'] < before['kl_teacher_student'] / 4


# --- checkpoints ---------------------------------------------------------------------------------------------------

def test_state_dict_round_trip_rebuilds_frozen_teachers():
    m = tiny()
    train(m, 2, total=10)
    m.next_stage(); train(m, 1, total=10, seed=3); m.add_frozen_teacher()
    assert m.n_frozen == 2
    buf = io.BytesIO(); torch.save(m.state_dict(), buf); buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    fresh = tiny(seed=123)
    assert fresh.n_frozen == 0
    fresh.load_state_dict(sd)
    assert fresh.n_frozen == 2 and states_equal(fresh, m)
    more = tiny(seed=4); [more.add_frozen_teacher() for _ in range(3)]
    more.load_state_dict(sd)
    assert more.n_frozen == 2 and states_equal(more, m)
    wrapped = nn.ModuleDict(dict(method=tiny(seed=5)))             # also as part of a larger module
    wrapped.load_state_dict({f'method.{k}': v for k, v in sd.items()})
    assert wrapped['method'].n_frozen == 2 and states_equal(wrapped['method'], m)
    student_only = {k: v for k, v in sd.items() if k.startswith('student.')}
    wrapped['method'].load_state_dict(student_only, strict=False)   # a partial load keeps the frozen teachers
    assert wrapped['method'].n_frozen == 2
    la = m.training_step(batch(seed=9), torch.Generator().manual_seed(9), 4, 10)[0]
    lb = fresh.training_step(batch(seed=9), torch.Generator().manual_seed(9), 4, 10)[0]
    assert la.item() == lb.item()


def test_add_frozen_teacher_from_a_dino_teacher_and_errors():
    torch.manual_seed(0)
    dino = DINO(tiny_vit(), 16, 1, (0.3,), (0.3,), DINOConfig(**SMALL))
    m = tiny()
    slot = m.add_frozen_teacher(dino.teacher)                          # a teacher net: centre starts at 0
    assert states_equal(slot.net, dino.teacher) and slot.center.abs().sum() == 0
    slot2 = m.add_frozen_teacher(m.teachers[0].state_dict())           # a slot's state dict: centre copied
    assert states_equal(slot2, m.teachers[0])
    other = DINO(tiny_vit(depth=3), 16, 1, (0.3,), (0.3,), DINOConfig(**SMALL))
    with pytest.raises(ValueError, match="student's structure"): m.add_frozen_teacher(other.teacher)


# --- multi-level ---------------------------------------------------------------------------------------------------

def test_cls_tokens_match_the_vit_and_a_cut_vit():
    torch.manual_seed(0); vit, x = tiny_vit(depth=3), torch.randn(3, 1, 16, 16)
    tok = cls_tokens(vit, x, -2)
    torch.testing.assert_close(tok[:, 0], vit(x))
    cut = copy.deepcopy(vit); cut.blocks = cut.blocks[:2]
    torch.testing.assert_close(tok[:, 1], cut(x))
    torch.testing.assert_close(cls_tokens(vit, x, 0)[:, 1], cls_tokens(vit, x, -3)[:, 1])


def test_multi_level_loss_with_a_vit():
    m = tiny(MultiTeacherConfig(level_weight=0.5, level_out_dim=16, **SMALL))
    assert 'level_head' in m.student and m.teachers[0].level_center.shape == (1, 16)
    loss, logs = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 10, log=True)
    assert loss.item() == pytest.approx(logs['loss_main'] + 0.5 * logs['loss_level'], rel=1e-5)
    assert logs['loss_level'] > 0
    loss.backward()
    assert m.student.level_head.mlp[0].weight.grad.abs().sum() > 0
    assert (m.teachers[0].level_center != 0).all()
    heavy = tiny(MultiTeacherConfig(level_weight=2., level_out_dim=16, **SMALL))   # same seed: same weights
    lh, logs_h = heavy.training_step(batch(), torch.Generator().manual_seed(0), 0, 10, log=True)
    assert logs_h['loss_main'] == logs['loss_main'] and logs_h['loss_level'] == logs['loss_level']
    assert lh.item() == pytest.approx(loss.item() + 1.5 * logs['loss_level'], rel=1e-5)
    assert all(math.isfinite(l) for l in train(m, 2, total=10))


def test_multi_level_errors_without_a_vit():
    for bb, match in ((bn_cnn(), 'use a ViT backbone'), (tiny_vit(depth=1), 'depth >= 2')):
        with pytest.raises(ValueError, match=match): tiny(MultiTeacherConfig(level_weight=0.5, **SMALL), backbone=bb)
    with pytest.raises(ValueError, match='before the last'):
        tiny(MultiTeacherConfig(level_weight=0.5, level_block=-1, **SMALL))
    with pytest.raises(ValueError, match='before the last'): check_level_block(tiny_vit(depth=2), 5)
    tiny(MultiTeacherConfig(**SMALL), backbone=bn_cnn())   # without the level loss a CNN is fine


# ---- no host synchronisation in an ordinary step ------------------------------------------------------------

from step_syncs import syncs_in_step


@pytest.mark.parametrize('kw', [{}, dict(aggregate='entropy_weighted'), dict(aggregate='mean_loss', level_weight=0.5),
                                dict(aggregate='mean_logprobs')])
def test_an_ordinary_step_never_waits_for_the_host(kw):
    m = tiny(**kw)
    m.add_frozen_teacher()
    s, _ = syncs_in_step(m, batch())
    assert s.n == 0, dict(s.counts)
