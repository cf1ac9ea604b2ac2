import math, warnings
import pytest, torch, torch.nn.functional as F
from sslkd import ibot_rkd
from sslkd.ibot_rkd import (iBOTRKD, iBOTRKDConfig, rkd_loss, relation_logits, structure_loss, EMBEDDINGS,
                            ibot_rkd_d, ibot_rkd_a, ibot_rkd_da, ibot_rkd_struct)
from sslkd.ibot import iBOT, iBOTConfig
from sslkd.rkd import rkd_distance_loss, rkd_angle_loss, distance_potential
from sslkd.vit import vit_nano


SMALL = dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local=2)


def tiny(seed=0):
    torch.manual_seed(seed)
    return vit_nano(img_size=16, patch_size=2, in_chans=1, embed_dim=32, depth=2, num_heads=2, use_mask_token=True)


def build(make=ibot_rkd_da, seed=0, **kw):
    b = tiny(seed)
    torch.manual_seed(seed + 100)  # the heads
    return make(b, 16, 1, (0.5,), (0.25,), iBOTRKDConfig(**{**SMALL, **kw}))


def batch(n=8, seed=0):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def step(m, x, seed=1, s=0, total=10, log=True):
    return m.training_step(x, torch.Generator().manual_seed(seed), s, total, log=log)


def rot(d, g):
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]


def test_module_importable_from_the_package():
    assert ibot_rkd.ibot_rkd_d is ibot_rkd_d and ibot_rkd.iBOTRKD is iBOTRKD


@pytest.mark.parametrize('make,rel', [(ibot_rkd_d, 'd'), (ibot_rkd_a, 'a'), (ibot_rkd_da, 'da'),
                                      (ibot_rkd_struct, 'struct')])
def test_constructors_set_the_relation(make, rel):
    m = make(tiny(), 16, 1, (0.5,), (0.25,), iBOTRKDConfig(**SMALL, relation='d'))
    assert m.cfg.relation == rel and isinstance(m, iBOT)
    assert make.__name__ == f'ibot_rkd_{rel}'


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="relation='cos'"): build(iBOTRKD, relation='cos')
    with pytest.raises(ValueError, match="embedding='tokens'"): build(iBOTRKD, embedding='tokens')
    with pytest.raises(ValueError, match='relation'): rkd_loss(torch.randn(5, 3), torch.randn(5, 3), 'x')


def test_rkd_loss_is_the_mean_over_sets_with_the_paper_weights():
    g = torch.Generator().manual_seed(0)
    s, t = (torch.randn(2, 3, 9, d, generator=g, dtype=torch.float64) for d in (6, 4))
    flat_s, flat_t = s.flatten(0, 1), t.flatten(0, 1)
    d = sum(rkd_distance_loss(a, b) for a, b in zip(flat_s, flat_t)) / 6
    a = sum(rkd_angle_loss(x, y) for x, y in zip(flat_s, flat_t)) / 6
    torch.testing.assert_close(rkd_loss(s, t, 'd'), d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rkd_loss(s, t, 'da'), d + 2 * a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rkd_loss(s, t, 'da', 0.5, 3.), 0.5 * d + 3 * a, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rkd_loss(s[0, 0], t[0, 0], 'd'), rkd_distance_loss(s[0, 0], t[0, 0]))  # one set (N, D)


def test_relation_logits_are_minus_the_distance_potential():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    r = relation_logits(x)
    eye = torch.eye(7, dtype=torch.bool)
    assert r[:, eye].isinf().all() and (r[:, eye] < 0).all()
    for ri, xi in zip(r, x): torch.testing.assert_close(ri[~eye], -distance_potential(xi)[~eye])
    # 3 points on a line at 0, 1, 3: distances 1, 2, 3 with mean 2
    line = torch.tensor([[0.], [1.], [3.]], dtype=torch.float64)
    torch.testing.assert_close(relation_logits(line)[0, 1:], torch.tensor([-0.5, -1.5], dtype=torch.float64))


def test_structure_loss_values_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    r = relation_logits(x)
    q = F.softmax(r / 0.1, -1)
    torch.testing.assert_close(structure_loss(r, r, 0., 0.1), -torch.special.xlogy(q, q).sum(-1).mean())  # H(q)
    ref = structure_loss(r, r, 0., 0.04)
    moved = relation_logits(2.5 * x @ rot(4, g) + torch.randn(4, generator=g, dtype=torch.float64))
    torch.testing.assert_close(structure_loss(moved, r, 0., 0.04), ref)
    torch.testing.assert_close(structure_loss(r, moved, 0., 0.04), ref)
    other = relation_logits(torch.randn(2, 6, 4, generator=g, dtype=torch.float64))
    assert structure_loss(other, r, 0., 0.04) > ref + 0.1
    # the centre shifts the teacher's target rows; a constant shift of a row changes nothing
    torch.testing.assert_close(structure_loss(r, r, 3., 0.04), ref)


@pytest.mark.parametrize('make', [ibot_rkd_d, ibot_rkd_a, ibot_rkd_da, ibot_rkd_struct])
def test_step_trains_backbone_and_bottleneck_not_prototypes(make):
    m = build(make)
    loss, logs = step(m, batch())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert m.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert m.student.head.mlp[0].weight.grad.abs().sum() > 0
    assert m.student.head.last_layer.parametrizations.weight.original1.grad is None  # no prototypes to match
    assert all(p.grad is None for p in m.teacher.parameters())
    assert {'loss_rkd_cls', 'loss_rkd_patch', 'feature_std', 'effective_rank'} <= set(logs)
    torch.testing.assert_close(loss.item(), logs['loss_rkd_cls'] + logs['loss_rkd_patch'], rtol=1e-5, atol=1e-6)


def test_embeddings():
    for emb, dim in (('backbone', 32), ('bottleneck', 16), ('logits', 64)):
        m = build(ibot_rkd_d, embedding=emb)
        assert EMBEDDINGS[emb](m.student.head, torch.randn(5, 32)).shape == (5, dim)
        loss, _ = step(m, batch())
        loss.backward()
        head_grad = m.student.head.mlp[0].weight.grad
        assert (head_grad is None) == (emb == 'backbone')  # RKD on the backbone leaves the head out


def test_added_with_weight_zero_is_ibot():
    "add_to_ibot=True, rkd_weight=0: the same loss as iBOT, draw for draw."
    x = batch()
    b = tiny(); torch.manual_seed(100)
    ibot = iBOT(b, 16, 1, (0.5,), (0.25,), iBOTConfig(**SMALL))
    start = {k: v.clone() for k, v in ibot.state_dict().items()}  # before the step moves the centres
    rkd = build(ibot_rkd_d, add_to_ibot=True, rkd_weight=0.)
    rkd.load_state_dict(start, strict=False)
    (l1, logs1), (l2, logs2) = step(ibot, x), step(rkd, x)
    assert l1.item() == l2.item() and logs1['teacher_entropy'] == logs2['teacher_entropy']
    assert logs2['loss_rkd_cls'] > 0
    # with a weight the relational term is added on top
    rkd2 = build(ibot_rkd_d, add_to_ibot=True, rkd_weight=2.)
    rkd2.load_state_dict(start, strict=False)
    l3, logs3 = step(rkd2, x)
    expected = l1.item() + 2 * (logs3['loss_rkd_cls'] + logs3['loss_rkd_patch'])
    torch.testing.assert_close(l3.item(), expected, rtol=1e-5, atol=1e-6)


def test_patch_structure_centre_moves_only_for_struct_and_is_checkpointed():
    for make, moves in ((ibot_rkd_struct, True), (ibot_rkd_d, False)):
        m = build(make)
        assert 'patch_struct_center' in m.state_dict() and m.patch_struct_center.shape == (64, 64)
        step(m, batch())
        assert bool(m.patch_struct_center.abs().sum() > 0) == moves
    m2 = build(ibot_rkd_struct).eval(); step(m2, batch())
    assert m2.patch_struct_center.abs().sum() == 0  # evaluation never moves the centre


def test_no_masked_image_gives_a_zero_patch_term():
    m = build(ibot_rkd_da, mask_prob=0.)
    loss, logs = step(m, batch())
    assert logs['loss_rkd_patch'] == 0. and loss.item() == pytest.approx(logs['loss_rkd_cls'])
    loss.backward()


def test_float32_under_bf16_autocast():
    m = build(ibot_rkd_da)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, _ = step(m, batch())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize('make', [ibot_rkd_d, ibot_rkd_struct])
def test_loss_goes_down(make):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(256) % 4
    right = torch.arange(16) >= 8
    x = (torch.rand(256, 1, 16, 16, generator=g) * 60 + y.view(-1, 1, 1, 1) * 50 * right).to(torch.uint8)
    m = build(make)
    opt, losses = torch.optim.AdamW(m.student.parameters(), lr=1e-3), []
    for s in range(40):
        loss, _ = m.training_step(x[torch.randint(0, 256, (32,), generator=g)], g, s, 40)
        opt.zero_grad(); loss.backward(); opt.step(); m.after_step(s, 40)
        losses.append(loss.item())
    assert sum(losses[-8:]) / 8 < 0.9 * sum(losses[:8]) / 8


# ---- weights instead of selection: the same values, and no host synchronisation --------------------------------

from sslkd.ibot_rkd import relational_loss, ema_structure_, RELATIONS
from step_syncs import syncs_in_step


@pytest.mark.parametrize('relation', RELATIONS)
def test_weighted_sets_equal_the_selected_sets(relation):
    "The old path selected the masked crops with a boolean index; weighting them 1 or 0 gives the same loss."
    g = torch.Generator().manual_seed(3)
    s = torch.randn(6, 9, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(6, 9, 4, generator=g, dtype=torch.float64)
    w, center = torch.tensor([0, 1, 1, 0, 1, 0], dtype=torch.bool), torch.randn(9, 9, generator=g, dtype=torch.float64)
    cfg = iBOTRKDConfig(relation=relation)
    weighted = relational_loss(cfg, s, t, center, 0.04, 0.1, weights=w)
    selected = relational_loss(cfg, s[w], t[w], center, 0.04, 0.1)
    torch.testing.assert_close(weighted, selected, rtol=1e-12, atol=1e-12)
    gw, = torch.autograd.grad(weighted, s); gs, = torch.autograd.grad(selected, s)
    torch.testing.assert_close(gw, gs, rtol=1e-10, atol=1e-12)
    assert (gw[~w] == 0).all() and (gw[w] != 0).any()          # the crops without a mask get no gradient
    none = relational_loss(cfg, s, t, center, 0.04, 0.1, weights=torch.zeros(6, dtype=torch.bool))
    assert none.item() == 0. and none.requires_grad


def test_weighted_structure_centre_equals_the_selected_one():
    g = torch.Generator().manual_seed(4)
    t_rel = relation_logits(torch.randn(5, 8, 3, generator=g, dtype=torch.float64))
    w, c = torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool), torch.randn(8, 8, generator=g, dtype=torch.float64)
    c1, c2 = c.clone(), c.clone()
    ema_structure_(c1, t_rel, 0.9, w); ema_structure_(c2, t_rel[w], 0.9)
    torch.testing.assert_close(c1, c2, rtol=1e-12, atol=1e-12)
    c3 = c1.clone(); ema_structure_(c1, t_rel, 0.9, torch.zeros(5, dtype=torch.bool))
    assert torch.equal(c1, c3)                                 # no masked crop: the centre stays


@pytest.mark.parametrize('make', [ibot_rkd_d, ibot_rkd_a, ibot_rkd_da, ibot_rkd_struct])
@pytest.mark.parametrize('kw', [{}, dict(add_to_ibot=True), dict(mask_prob=0.)])
def test_an_ordinary_step_never_waits_for_the_host(make, kw):
    s, _ = syncs_in_step(build(make, **kw), batch(), log=False)
    assert s.n == 0, dict(s.counts)
