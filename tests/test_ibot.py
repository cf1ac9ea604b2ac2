import io, math
import pytest, torch, torch.nn.functional as F
from sslkd.ibot import (iBOTPatchLoss, iBOTLoss, iBOTConfig, iBOT, ibot_patch_loss_naive, masked_patch_cross_entropy,
                        PATCH_MEAN_OVER)
from sslkd.dino import dino_loss_naive, center_sharpen
from sslkd.vit import vit_nano

pytestmark = pytest.mark.filterwarnings('ignore:ViT with img_size')


def random_case(seed=0, G=2, B=4, N=9, K=6, p=0.3):
    g = torch.Generator().manual_seed(seed)
    sp = torch.randn(G, B, N, K, generator=g, dtype=torch.float64, requires_grad=True)
    tp = torch.randn(G, B, N, K, generator=g, dtype=torch.float64)
    c = torch.randn(1, K, generator=g, dtype=torch.float64)
    mask = torch.rand(G, B, N, generator=g) < p
    mask[:, 0] = False; mask[0, 1, 0] = True  # images without masks, and at least one with
    return sp, tp, c, mask


def python_reference(sp, tp, mask, c, tt, ts, mean_over):
    "Independent reference with python floats."
    G, B, N, K = sp.shape
    vals = []
    for v in range(G):
        for b in range(B):
            idx = [j for j in range(N) if mask[v, b, j]]
            if not idx:
                if mean_over == 'all_images': vals.append(0.)
                continue
            tot = 0.
            for j in idx:
                tl = [(tp[v, b, j, k] - c[0, k]).item() / tt for k in range(K)]
                mt = max(tl); q = [math.exp(a - mt) for a in tl]; z = sum(q); q = [a / z for a in q]
                sl = [sp[v, b, j, k].item() / ts for k in range(K)]
                ms = max(sl); lse = ms + math.log(sum(math.exp(a - ms) for a in sl))
                tot += -sum(q[k] * (sl[k] - lse) for k in range(K))
            vals.append(tot / len(idx))
    return sum(vals) / len(vals)


@pytest.mark.parametrize('mean_over', list(PATCH_MEAN_OVER))
@pytest.mark.parametrize('seed', [0, 1])
def test_patch_loss_vectorised_equals_naive(mean_over, seed):
    sp, tp, c, mask = random_case(seed)
    loss = iBOTPatchLoss(6, mean_over=mean_over).double(); loss.center.copy_(c)
    fast = loss(sp, tp, mask, 0.05)
    naive = ibot_patch_loss_naive(sp, tp, mask, c, 0.05, mean_over=mean_over)
    torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-12)
    assert fast.item() == pytest.approx(python_reference(sp.detach(), tp, mask, c, 0.05, 0.1, mean_over), rel=1e-10)
    gf, = torch.autograd.grad(fast, sp); gn, = torch.autograd.grad(naive, sp)
    torch.testing.assert_close(gf, gn, rtol=1e-12, atol=1e-12)
    # weighting every token by its mask is selecting the masked tokens (the version that waits for the host)
    ce = -(center_sharpen(tp, c, 0.05) * F.log_softmax(sp.detach() / 0.1, -1)).sum(-1)
    n = mask.sum(-1)
    selected = (ce / n.clamp(min=1)[..., None])[mask].sum() / PATCH_MEAN_OVER[mean_over](n.flatten()).clamp(min=1)
    torch.testing.assert_close(fast.detach(), selected, rtol=1e-12, atol=1e-12)


def test_all_images_is_masked_images_times_fraction():
    sp, tp, c, mask = random_case(3)
    a = iBOTPatchLoss(6, mean_over='masked_images').double()(sp, tp, mask, 0.05)
    b = iBOTPatchLoss(6, mean_over='all_images').double()(sp, tp, mask, 0.05)
    frac = mask.any(-1).double().mean()
    torch.testing.assert_close(b, a * frac)


def test_uniform_gives_ln_K_and_no_mask_gives_zero():
    G, B, N, K = 2, 3, 5, 11
    mask = torch.zeros(G, B, N, dtype=torch.bool); mask[1, 2, 3] = True; mask[0, 0] = True
    out = iBOTPatchLoss(K)(torch.zeros(G, B, N, K), torch.randn(1, 1, 1, K).expand(G, B, N, K), mask, 0.04)
    assert out.item() == pytest.approx(math.log(K), rel=1e-6)
    s = torch.randn(G, B, N, K, requires_grad=True)
    zero = iBOTPatchLoss(K)(s, torch.randn(G, B, N, K), torch.zeros(G, B, N, dtype=torch.bool), 0.04)
    assert zero.item() == 0.
    zero.backward()  # still differentiable: a batch that drew no mask must not break the step
    assert s.grad is not None and s.grad.abs().sum() == 0


def test_unmasked_tokens_contribute_nothing():
    sp, tp, c, mask = random_case(5)
    loss = iBOTPatchLoss(6).double()
    base = loss(sp, tp, mask, 0.05, update_center=False)
    sp2 = sp.detach().clone()
    sp2[~mask] = torch.randn(int((~mask).sum()), 6, dtype=torch.float64) * 100
    torch.testing.assert_close(loss(sp2, tp, mask, 0.05, update_center=False), base, rtol=0, atol=0)
    g, = torch.autograd.grad(base, sp)
    assert g[~mask].abs().max() == 0 and g[mask].abs().max() > 0


def test_per_image_normalisation():
    "An image with 1 masked token weighs as much as one with 10."
    m = torch.zeros(1, 2, 10, dtype=torch.bool); m[0, 0, 0] = True; m[0, 1] = True
    t = torch.zeros(1, 2, 10, 2, dtype=torch.float64)  # uniform teacher
    s = torch.zeros(1, 2, 10, 2, dtype=torch.float64); s[0, 0, :, 0] = math.log(3) * 0.1  # image 0: student (3/4, 1/4)
    a, b = -(0.5 * math.log(3 / 4) + 0.5 * math.log(1 / 4)), math.log(2)
    out = iBOTPatchLoss(2).double()(s, t, m, 0.05)
    assert out.item() == pytest.approx((a + b) / 2, abs=1e-12)
    assert out.item() != pytest.approx((a + 10 * b) / 11, abs=1e-3)
    # and in gradient terms: each image's masked tokens share a total weight of 1/2
    s.requires_grad_(True)
    ce = iBOTPatchLoss(2).double()(s, t, m, 0.05)
    g, = torch.autograd.grad(ce, s)
    assert g[0, 1, 0].abs().sum() * 10 == pytest.approx(g[0, 1].abs().sum().item())
    assert g[0, 0, 0].abs().sum() > 5 * g[0, 1, 0].abs().sum()


def test_patch_center_ema_exact():
    G, B, N, K = 2, 2, 3, 4
    tp = torch.arange(G * B * N * K, dtype=torch.float64).view(G, B, N, K)
    mask = torch.ones(G, B, N, dtype=torch.bool)
    loss = iBOTPatchLoss(K, center_momentum=0.8).double()
    loss(torch.zeros(G, B, N, K, dtype=torch.float64), tp, mask, 0.04)
    torch.testing.assert_close(loss.center, 0.2 * tp.mean((0, 1, 2))[None])  # all teacher tokens, every image
    loss(torch.zeros(G, B, N, K, dtype=torch.float64), tp, torch.zeros_like(mask), 0.04)
    torch.testing.assert_close(loss.center, 0.36 * tp.mean((0, 1, 2))[None])  # updated even when nothing is masked


def test_ibot_loss_combines_parts_with_own_centres():
    sp, tp, c, mask = random_case(7)
    g = torch.Generator().manual_seed(1)
    sc, tc = (torch.randn(n, 4, 5, generator=g, dtype=torch.float64) for n in (4, 2))
    crit = iBOTLoss(5, 6, lambda1=0.7, lambda2=1.3, center_momentum=0.9, patch_center_momentum=0.5).double()
    out = crit(sc, tc, sp, tp, mask, 0.04, 0.06)
    ref = 0.7 * dino_loss_naive(sc, tc, torch.zeros(1, 5, dtype=torch.float64), 0.04) + \
          1.3 * ibot_patch_loss_naive(sp, tp, mask, torch.zeros(1, 6, dtype=torch.float64), 0.06)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(crit.cls_loss.center, 0.1 * tc.mean((0, 1))[None])
    torch.testing.assert_close(crit.patch_loss.center, 0.5 * tp.mean((0, 1, 2))[None])
    assert set(crit.parts) == {'loss_cls', 'loss_patch'}
    assert set(crit.state_dict()) == {'cls_loss.center', 'patch_loss.center'}


def test_patch_loss_errors():
    loss = iBOTPatchLoss(4)
    with pytest.raises(ValueError, match="teacher's shape"):  # masked tokens only: the loss wants every token
        loss(torch.zeros(3, 4), torch.zeros(1, 2, 3, 4), torch.ones(1, 2, 3, dtype=torch.bool), 0.04)
    with pytest.raises(ValueError, match=r'\(G,B,N\)'):
        loss(torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.ones(2, 3, dtype=torch.bool), 0.04)
    with pytest.raises(ValueError, match='masked_images'): iBOTPatchLoss(4, mean_over='tokens')


def test_float32_under_autocast():
    sp, tp, c, mask = random_case(2)
    loss = iBOTPatchLoss(6)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = loss(sp.detach().bfloat16(), tp.bfloat16(), mask, 0.05, update_center=False)
    assert out.dtype == torch.float32
    ref = ibot_patch_loss_naive(sp.detach().bfloat16().float(), tp.bfloat16().float(), mask, torch.zeros(1, 6), 0.05)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- the method ---------------------------------------------------------------------------------------------

def tiny_cfg(**kw):
    return iBOTConfig(**{**dict(out_dim=64, hidden_dim=32, bottleneck_dim=16, n_local=2), **kw})

def tiny_ibot(cfg=None, seed=0, **vit_kw):
    torch.manual_seed(seed)
    return iBOT(vit_nano(16, 4, 1, depth=1, use_mask_token=True, **vit_kw), 16, 1, (0.3,), (0.3,), cfg or tiny_cfg())

def batch(n=8, seed=0):
    return torch.randint(0, 256, (n, 1, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_needs_mask_token_and_consistent_heads():
    with pytest.raises(ValueError, match='use_mask_token=True'):
        iBOT(vit_nano(16, 4, 1, depth=1), 16, 1, (0.3,), (0.3,), tiny_cfg())
    with pytest.raises(ValueError, match='shared_head=False'): tiny_ibot(tiny_cfg(patch_out_dim=32))
    with pytest.raises(ValueError, match='mode'): tiny_ibot(tiny_cfg(mask_mode='grid'))


@pytest.mark.parametrize('shared', [True, False])
def test_training_step_shared_and_separate_heads(shared):
    m = tiny_ibot(tiny_cfg(shared_head=shared, patch_out_dim=None if shared else 48, mask_prob=1.))
    assert ('patch_head' in m.student) == (not shared)
    assert m.loss.patch_loss.center.shape == (1, 64 if shared else 48)
    loss, logs = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 100, log=True)
    assert loss.ndim == 0 and loss.dtype == torch.float32 and loss.requires_grad
    for k in ('loss', 'loss_cls', 'loss_patch', 'mask_ratio', 'teacher_temp', 'teacher_patch_temp', 'momentum'):
        assert isinstance(logs[k], float), k
    assert logs['loss'] == pytest.approx(logs['loss_cls'] + logs['loss_patch'], rel=1e-5)
    assert 0 < logs['mask_ratio'] <= 0.5 + 1e-6
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
    assert m.student.backbone.mask_token.grad.abs().sum() > 0
    if not shared:  # the patch head is trained by the patch loss, the CLS head by the CLS loss
        assert all(p.grad is not None for p in m.student.patch_head.mlp.parameters())
        assert all(p.grad is not None for p in m.student.head.mlp.parameters())
    assert m.eval_backbone() is m.teacher.backbone


def test_head_sees_every_token_the_loss_only_the_masked_and_teacher_unmasked(monkeypatch):
    "The student's masked globals carry the mask; its patch head maps every token, the loss trains the masked ones."
    m = tiny_ibot(tiny_cfg(mask_prob=1., shared_head=False, patch_out_dim=48))
    seen = {'student': [], 'teacher': [], 'patch_head': []}
    for who in ('student', 'teacher'):
        net = getattr(m, who).backbone
        def ff(x, mask=None, _orig=net.forward_features, _who=who, **kw):
            seen[_who].append(mask); return _orig(x, mask, **kw)
        monkeypatch.setattr(net, 'forward_features', ff)
    m.student.patch_head.register_forward_hook(lambda mod, inp, out: seen['patch_head'].append(inp[0].shape))
    grads = []
    m.student.patch_head.register_full_backward_hook(lambda mod, gin, gout: grads.append(gout[0]))
    loss, _ = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 10)
    assert seen['teacher'] == [None]
    mask, local = seen['student']  # masked globals, then the locals without a mask
    assert local is None
    assert mask.shape == (2 * 8, 16) and mask.dtype == torch.bool and mask.any(-1).all()  # prob 1: every image masked
    assert seen['patch_head'] == [torch.Size([2 * 8, 16, 128])]
    loss.backward()
    g = grads[0].abs().sum(-1)                     # (G*B, N): the loss's gradient on each token's patch logits
    assert (g[~mask] == 0).all() and (g[mask] > 0).all()


def test_mask_prob_zero_gives_no_patch_loss():
    m = tiny_ibot(tiny_cfg(mask_prob=0.))
    loss, logs = m.training_step(batch(), torch.Generator().manual_seed(0), 0, 10, log=True)
    assert logs['loss_patch'] == 0. and logs['mask_ratio'] == 0.
    assert loss.item() == pytest.approx(logs['loss_cls'])
    loss.backward()


def test_after_backward_freezes_both_heads_last_layers():
    m = tiny_ibot(tiny_cfg(shared_head=False, mask_prob=1.))
    m.training_step(batch(), torch.Generator().manual_seed(0), 0, 100)[0].backward()
    m.after_backward(3, 100, steps_per_epoch=10)
    last = [n for n, p in m.student.named_parameters() if 'last_layer' in n and p.requires_grad]
    assert any('patch_head' in n for n in last) and any(n.startswith('head') for n in last)
    assert all(p.grad is None for n, p in m.student.named_parameters() if 'last_layer' in n)


def test_student_fits_a_frozen_teacher():
    m = tiny_ibot(tiny_cfg(momentum_start=1., center_momentum=1., patch_center_momentum=1., freeze_last_layer_epochs=0,
                           mask_prob=1.))
    opt = torch.optim.AdamW(m.student.parameters(), lr=3e-3)
    x, losses = batch(16), []
    for step in range(12):
        loss, _ = m.training_step(x, torch.Generator().manual_seed(0), step, 12)
        opt.zero_grad(); loss.backward(); m.after_backward(step, 12, 100); opt.step(); m.after_step(step, 12)
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses


def test_end_to_end_default_schedule_and_repeatability():
    def run(seed):
        m = tiny_ibot(seed=seed)
        opt = torch.optim.AdamW(m.student.parameters(), lr=1e-3)
        g, out = torch.Generator().manual_seed(0), []
        for step in range(3):
            loss, logs = m.training_step(batch(seed=step), g, step, 3, log=True)
            opt.zero_grad(); loss.backward(); m.after_backward(step, 3, 2); opt.step(); m.after_step(step, 3)
            assert torch.isfinite(loss)
            out.append(loss.item())
        return out
    assert run(1) == run(1)


def test_logs_collapse_signals():
    pytest.importorskip('sslkd.metrics')
    _, logs = tiny_ibot().training_step(batch(), torch.Generator().manual_seed(0), 0, 10, log=True)
    for k in ('teacher_entropy', 'teacher_mean_entropy', 'ln_K', 'kl_teacher_student', 'agreement', 'feature_std',
              'effective_rank'):
        assert isinstance(logs[k], float), k


def test_state_dict_round_trip_restores_centres_and_teacher():
    m = tiny_ibot(tiny_cfg(shared_head=False))
    opt = torch.optim.AdamW(m.student.parameters(), lr=1e-3)
    for step in range(2):
        loss, _ = m.training_step(batch(seed=step), torch.Generator().manual_seed(step), step, 10)
        opt.zero_grad(); loss.backward(); opt.step(); m.after_step(step, 10)
    buf = io.BytesIO(); torch.save(m.state_dict(), buf); buf.seek(0)
    m2 = tiny_ibot(tiny_cfg(shared_head=False), seed=99)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    for name in ('cls_loss', 'patch_loss'):
        c1, c2 = getattr(m.loss, name).center, getattr(m2.loss, name).center
        assert c1.abs().sum() > 0
        torch.testing.assert_close(c2, c1)
    for a, b in zip(m.teacher.state_dict().values(), m2.teacher.state_dict().values()): torch.testing.assert_close(a, b)
    la = m.training_step(batch(seed=5), torch.Generator().manual_seed(5), 3, 10)[0]
    lb = m2.training_step(batch(seed=5), torch.Generator().manual_seed(5), 3, 10)[0]
    assert la.item() == lb.item()


# ---- no host synchronisation in an ordinary step ------------------------------------------------------------

from step_syncs import syncs_in_step


@pytest.mark.parametrize('kw', [{}, dict(mask_mode='random'), dict(patch_mean_over='all_images', shared_head=False),
                                dict(mask_prob=0.), dict(mask_prob=1.)])
def test_an_ordinary_step_never_waits_for_the_host(kw):
    s, logs = syncs_in_step(tiny_ibot(tiny_cfg(**kw)), batch())
    assert s.n == 0, dict(s.counts)
    assert set(logs) == {'teacher_temp', 'teacher_patch_temp', 'momentum'}   # plain numbers, nothing read back
