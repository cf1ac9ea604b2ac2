import math
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import sslkd.contrastive as con
from sslkd.contrastive import (projection_mlp, nt_xent, nt_xent_naive, info_nce, info_nce_naive, in_batch_info_nce,
                               enqueue_, byol_loss, byol_symmetric_loss, top1_agreement, online_encoder, SimCLR,
                               SimCLRConfig, MoCo, MoCoConfig, BYOL, BYOLConfig)
from sslkd.dino import teacher_mode_
from sslkd.metrics import effective_rank, feature_std
from sslkd.resnet import small_cnn
from sslkd.vit import vit_nano

pytestmark = pytest.mark.filterwarnings('ignore:ViT with img_size')
STATS = ((0.3,), (0.35,))


def tiny_cnn():
    "A 16-channel conv net with BatchNorm: small enough for 20-step tests."
    net = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                        nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net.embed_dim = 32
    return net


def images(n=16, size=16, seed=0):
    "Smooth random uint8 images: upsampled noise, so two crops of one image look alike."
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(size, size), mode='bilinear', align_corners=False)
    return (x * 255).to(torch.uint8)


SMALL = dict(hidden_dim=64, out_dim=32)
METHODS = {
    'simclr': lambda bb, size, **kw: SimCLR(bb, size, 1, *STATS, SimCLRConfig(**{**SMALL, **kw})),
    'moco_v2': lambda bb, size, **kw: MoCo(bb, size, 1, *STATS, MoCoConfig(**{**SMALL, 'queue_size': 256, **kw})),
    'moco_v3': lambda bb, size, **kw: MoCo(bb, size, 1, *STATS,
                                           MoCoConfig(**{**SMALL, 'variant': 'v3', 'pred_hidden_dim': 64, **kw})),
    'byol': lambda bb, size, **kw: BYOL(bb, size, 1, *STATS, BYOLConfig(**{**SMALL, 'pred_hidden_dim': 64, **kw})),
}


def make(name, seed=0, **kw):
    torch.manual_seed(seed)
    return METHODS[name](tiny_cnn(), 16, **kw)


def sgd_steps(method, x, n, lr=2e-3, seed=0):
    opt = torch.optim.AdamW(method.student.parameters(), lr=lr, weight_decay=0.)
    g, losses = torch.Generator().manual_seed(seed), []
    for step in range(n):
        loss, _ = method.training_step(x[step] if isinstance(x, list) else x, g, step, n)
        opt.zero_grad(); loss.backward(); method.after_backward(step, n, n); opt.step(); method.after_step(step, n)
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------- losses: fast == naive, exact values

def independent_nt_xent(z1, z2, T):
    "Pure-python NT-Xent from the formula, float64."
    z = [F.normalize(r, dim=0).tolist() for r in torch.cat([z1, z2])]
    n, B = len(z), len(z1)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))
    total = 0.
    for i in range(n):
        num = math.exp(dot(z[i], z[(i + B) % n]) / T)
        den = sum(math.exp(dot(z[i], z[k]) / T) for k in range(n) if k != i)
        total += -math.log(num / den)
    return total / n


@pytest.mark.parametrize('B,D,T', [(1, 3, 0.5), (2, 2, 1.), (5, 7, 0.2), (8, 4, 0.07)])
def test_nt_xent_matches_naive_and_formula(B, D, T):
    g = torch.Generator().manual_seed(B * 100 + D)
    z1 = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(B, D, generator=g, dtype=torch.float64, requires_grad=True)
    naive, fast = nt_xent_naive(z1, z2, T), nt_xent(z1, z2, T)
    torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-12)
    assert fast.item() == pytest.approx(independent_nt_xent(z1.detach(), z2.detach(), T), rel=1e-10)
    gn = torch.autograd.grad(naive, (z1, z2)); gf = torch.autograd.grad(fast, (z1, z2))
    for a, b in zip(gf, gn): torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_nt_xent_exact_values():
    # two images, identical views a=(1,0), b=(0,1), T=1: every row sees its positive at cos 1 and two negatives at cos 0
    ab = torch.tensor([[1., 0.], [0., 1.]], dtype=torch.float64)
    assert nt_xent(ab, ab, 1.).item() == pytest.approx(math.log(math.e + 2) - 1, abs=1e-14)
    # the views swapped: each row's positive is orthogonal to it, one negative is identical (cos 1), one orthogonal
    assert nt_xent(ab, ab.flip(0), 1.).item() == pytest.approx(math.log(math.e + 2), abs=1e-14)
    # one image: the positive is the only candidate
    assert nt_xent(torch.randn(1, 4), torch.randn(1, 4)).item() == 0.
    # a collapsed (constant) embedding: ln(2B - 1) at any temperature
    assert nt_xent(torch.ones(6, 3), torch.ones(6, 3), 0.1).item() == pytest.approx(math.log(11), rel=1e-6)
    # scale does not matter (normalised), and low precision input is computed in float32
    z1, z2 = torch.randn(4, 5), torch.randn(4, 5)
    torch.testing.assert_close(nt_xent(3 * z1, 0.5 * z2), nt_xent(z1, z2))
    assert nt_xent(z1.bfloat16(), z2.bfloat16()).dtype == torch.float32


def test_info_nce_matches_naive_and_exact_value():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k, queue = torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randn(30, 8, generator=g, dtype=torch.float64)
    naive, fast = info_nce_naive(q, k, queue, 0.2), info_nce(q, k, queue, 0.2)
    torch.testing.assert_close(fast, naive, rtol=1e-12, atol=1e-12)
    gn, = torch.autograd.grad(naive, q); gf, = torch.autograd.grad(fast, q)
    torch.testing.assert_close(gf, gn, rtol=1e-10, atol=1e-12)
    # q = k, negatives at cos 0 and -1, T = 0.5: -log(e^2 / (e^2 + 1 + e^-2))
    e = torch.tensor([[1., 0.]], dtype=torch.float64)
    negs = torch.tensor([[0., 2.], [-3., 0.]], dtype=torch.float64)
    want = -math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2)))
    assert info_nce(e, e, negs, 0.5).item() == pytest.approx(want, abs=1e-14)
    # keys and queue get no gradient
    k.requires_grad_(True); queue.requires_grad_(True)
    info_nce(q, k, queue).backward()
    assert k.grad is None and queue.grad is None and q.grad is not None


def test_in_batch_info_nce_is_info_nce_over_the_other_keys():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64)
    T = 0.25
    ref = sum(info_nce_naive(q[i:i + 1], k[i:i + 1], torch.cat([k[:i], k[i + 1:]]), T) for i in range(5)) / 5
    assert in_batch_info_nce(q, k, T).item() == pytest.approx(2 * T * ref.item(), rel=1e-12)


def test_byol_loss_values_and_symmetric_sum():
    e = torch.tensor([[1., 0.], [0., 1.]], dtype=torch.float64)
    assert byol_loss(e, e).item() == pytest.approx(0., abs=1e-15)
    assert byol_loss(e, -2 * e).item() == pytest.approx(4.)
    assert byol_loss(e, e.flip(0)).item() == pytest.approx(2.)
    r = torch.tensor([[1., 1.], [0., 1.]], dtype=torch.float64)   # cos 1/sqrt(2), then cos 1
    assert byol_loss(e, r).item() == pytest.approx((2 - math.sqrt(2) + 0) / 2, abs=1e-14)
    g = torch.Generator().manual_seed(2)
    p1, p2, z1, z2 = torch.randn(4, 7, 5, generator=g, dtype=torch.float64)
    p1.requires_grad_(True)
    sym = byol_symmetric_loss(p1, p2, z1, z2)
    torch.testing.assert_close(sym, byol_loss(p1, z2) + byol_loss(p2, z1), rtol=1e-12, atol=1e-12)  # summed, not mean
    z2.requires_grad_(True)
    byol_loss(p1, z2).backward()
    assert z2.grad is None and p1.grad is not None


def test_projection_mlp_and_agreement():
    mlp = projection_mlp(10, 20, 4, nlayers=3, last_bn=True)
    assert [type(m).__name__ for m in mlp] == ['Linear', 'BatchNorm1d', 'ReLU'] * 2 + ['Linear', 'BatchNorm1d']
    assert mlp(torch.randn(6, 10)).shape == (6, 4) and not mlp[-1].affine
    assert len(projection_mlp(10, nlayers=1)) == 1
    with pytest.raises(ValueError, match='at least one layer'): projection_mlp(10, nlayers=0)
    x = torch.randn(8, 5)
    assert top1_agreement(x, x) == 1. and top1_agreement(x, x.roll(1, 0)) == 0.
    y = x.clone(); y[:2] = y[:2].flip(0)   # two rows swapped: 6 of 8 find their partner
    assert top1_agreement(x, y) == pytest.approx(0.75)


# ---------------------------------------------------------------- the queue

def test_queue_fills_in_order_and_wraps():
    Q, ptr = torch.zeros(7, 2), torch.zeros(1, dtype=torch.long)
    for i in range(4):   # 3 keys per step: 0-2, 3-5, 6 then wraps to 0-1, 2-4
        enqueue_(Q, ptr, torch.arange(3 * i, 3 * i + 3, dtype=torch.float)[:, None].expand(3, 2))
    assert Q[:, 0].tolist() == [7, 8, 9, 10, 11, 5, 6] and ptr.item() == 5
    with pytest.raises(ValueError, match='raise queue_size to at least 8'): enqueue_(Q, ptr, torch.zeros(8, 2))


def test_moco_queue_holds_the_momentum_keys_in_order():
    m = make('moco_v2', queue_size=80)
    x, B = images(16), 16
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        v1, v2 = m.augment(x, torch.Generator().manual_seed(step))
        with torch.no_grad():
            teacher_mode_(m.momentum_encoder)
            want = F.normalize(m.momentum_encoder.projector(m.momentum_encoder.backbone(torch.cat([v2, v1]))), dim=1)
        m.training_step(x, g, step, 10)
        start = (2 * B * step) % 80
        idx = (start + torch.arange(2 * B)) % 80   # step 2 wraps around the end of the queue
        torch.testing.assert_close(m.queue[idx], want, rtol=1e-5, atol=1e-6)
        assert m.queue_ptr.item() == (2 * B * (step + 1)) % 80
    one_sided = make('moco_v2', symmetric=False)
    one_sided.training_step(x, torch.Generator(), 0, 10)
    assert one_sided.queue_ptr.item() == B
    with pytest.raises(ValueError, match='raise queue_size'):
        make('moco_v2', queue_size=20).training_step(x, torch.Generator(), 0, 10)


def test_moco_keys_gathered_across_processes(monkeypatch):
    "A fake second process contributes keys: every process enqueues the whole global batch, rank 0's keys first."
    other = []
    def all_gather(out, t):
        out[0].copy_(t); out[1].copy_(-t); other.append(t.shape)
    monkeypatch.setattr(con.dist, 'is_initialized', lambda: True)
    monkeypatch.setattr(con.dist, 'get_world_size', lambda: 2)
    monkeypatch.setattr(con.dist, 'get_rank', lambda: 0)
    monkeypatch.setattr(con.dist, 'all_gather', all_gather)
    m = make('moco_v2', queue_size=128)
    m.training_step(images(16), torch.Generator(), 0, 10)
    assert other == [(32, 32)] and m.queue_ptr.item() == 64
    torch.testing.assert_close(m.queue[32:64], -m.queue[:32])
    # v3: rank 1's queries must find their keys in the second half of the gathered batch
    monkeypatch.setattr(con.dist, 'get_rank', lambda: 1)
    g = torch.Generator().manual_seed(0)
    q, keys, other_keys = torch.randn(3, 4, 6, generator=g, dtype=torch.float64)
    monkeypatch.setattr(con.dist, 'all_gather', lambda out, t: [o.copy_(v) for o, v in zip(out, (other_keys, t))])
    want = F.cross_entropy(F.normalize(q, dim=1) @ F.normalize(torch.cat([other_keys, keys]), dim=1).T / 0.2,
                           torch.arange(4, 8)) * 0.4
    torch.testing.assert_close(in_batch_info_nce(q, keys, 0.2), want)


def _ddp_worker(rank, world, init, z1, z2, q, k, T, out):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=init, rank=rank, world_size=world)
    try:
        B = len(z1) // world
        sl = slice(rank * B, (rank + 1) * B)
        a, b, qq = (t[sl].clone().requires_grad_(True) for t in (z1, z2, q))
        loss = nt_xent(a, b, T)
        loss.backward()
        l3 = in_batch_info_nce(qq, k[sl], T)
        l3.backward()
        torch.save(dict(loss=loss.detach(), ga=a.grad, gb=b.grad, l3=l3.detach(), gq=qq.grad), f'{out}/{rank}.pt')
        dist.barrier()  # gloo aborts a rank whose peer leaves while their last exchange is in flight
    finally: dist.destroy_process_group()


def test_distributed_losses_equal_single_process_at_the_global_batch(tmp_path):
    "Two gloo processes with half the batch each: mean loss = 1-process loss; world_size x local grads = global grads."
    import torch.distributed as dist, torch.multiprocessing as mp
    if not dist.is_available(): pytest.skip('torch.distributed is not available')
    g = torch.Generator().manual_seed(0)
    z1, z2, q, k = torch.randn(4, 8, 5, generator=g, dtype=torch.float64)
    T, W = 0.3, 2
    ctx = mp.get_context('fork')   # no re-import in the children: a second, not ten
    args = lambda r: (r, W, f'file://{tmp_path}/pg', z1, z2, q, k, T, str(tmp_path))
    procs = [ctx.Process(target=_ddp_worker, args=args(r)) for r in range(W)]
    for p in procs: p.start()
    for p in procs: p.join(60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    res = [torch.load(tmp_path / f'{r}.pt') for r in range(W)]
    a, b, qq = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True), q.clone().requires_grad_(True)
    full = nt_xent(a, b, T); full.backward()
    torch.testing.assert_close(sum(r['loss'] for r in res) / W, full.detach())
    torch.testing.assert_close(torch.cat([r['ga'] for r in res]) / W, a.grad)   # DDP averages: (1/W) sum over processes
    torch.testing.assert_close(torch.cat([r['gb'] for r in res]) / W, b.grad)
    full3 = in_batch_info_nce(qq, k, T); full3.backward()
    torch.testing.assert_close(sum(r['l3'] for r in res) / W, full3.detach())
    torch.testing.assert_close(torch.cat([r['gq'] for r in res]) / W, qq.grad)


# ---------------------------------------------------------------- the methods

def eval_loss(method, x, queue=None):
    "The loss of `x` with fixed views (and MoCo v2 negatives `queue`), leaving the method's state as it was."
    state = {k: v.clone() for k, v in method.state_dict().items()}
    if queue is not None: method.queue.copy_(queue)
    with torch.no_grad(): loss = method.training_step(x, torch.Generator().manual_seed(123), 0, 1)[0].item()
    method.load_state_dict(state)
    return loss


@pytest.mark.parametrize('name', list(METHODS))
def test_loss_goes_down_on_a_tiny_batch(name):
    "20 steps lower the loss of fixed views of the batch by > 5% (with lr=0 the ratio is exactly 1: no augment noise)."
    m, x = make(name), images(16)
    q0 = m.queue.clone() if name == 'moco_v2' else None   # v2 is scored against the same negatives before and after
    before = eval_loss(m, x, q0)
    # v2 trains on a stream of other images: a queue full of the batch's own keys would make them their own negatives
    losses = sgd_steps(m, [images(16, seed=100 + s) for s in range(20)] if name == 'moco_v2' else x, 20)
    assert all(math.isfinite(l) for l in losses)
    assert eval_loss(m, x, q0) < 0.95 * before


@pytest.mark.parametrize('name', list(METHODS))
def test_state_dict_round_trip(name):
    m = make(name)
    x = images(16)
    sgd_steps(m, x, 2)
    fresh = make(name, seed=123)
    fresh.load_state_dict(m.state_dict())
    a, _ = m.training_step(x, torch.Generator().manual_seed(7), 2, 10)
    b, _ = fresh.training_step(x, torch.Generator().manual_seed(7), 2, 10)
    assert a.item() == b.item()
    if name == 'moco_v2':
        assert torch.equal(m.queue, fresh.queue) and m.queue_ptr.item() == fresh.queue_ptr.item() == 96
        assert {'queue', 'queue_ptr'} <= set(m.state_dict())


@pytest.mark.parametrize('name', ['moco_v2', 'moco_v3', 'byol'])
def test_momentum_encoder_is_separate_and_follows_by_ema(name):
    m = make(name)
    x = images(16)
    for mod in (m, m.double(), m.float()):
        ptrs = {p.data_ptr() for p in mod.student.parameters()}
        assert not any(p.data_ptr() in ptrs for p in mod.momentum_encoder.parameters())
    assert all(not p.requires_grad for p in m.momentum_encoder.parameters())
    names = lambda mod: [n for n, _ in mod.named_parameters()]
    assert names(m.momentum_encoder) == names(online_encoder(m.student))
    loss, _ = m.training_step(x, torch.Generator(), 0, 10)
    loss.backward()
    assert all(p.grad is None for p in m.momentum_encoder.parameters())
    assert all(p.grad is not None for p in m.student.parameters())
    before = [p.clone() for p in m.momentum_encoder.parameters()]
    bn_before = m.momentum_encoder.backbone[1].running_mean.clone()
    with torch.no_grad():
        for p in m.student.parameters(): p.add_(0.1)
    mom = m.momentum(3, 10)
    assert mom == pytest.approx(0.99 + 0.01 * 0.5 * (1 - math.cos(math.pi * 0.3)))
    m.after_step(3, 10)
    for b0, t, s in zip(before, m.momentum_encoder.parameters(), online_encoder(m.student).parameters()):
        torch.testing.assert_close(t, mom * b0 + (1 - mom) * s)
    torch.testing.assert_close(m.momentum_encoder.backbone[1].running_mean, bn_before)  # its own BN statistics
    assert m.momentum(10, 10) == 1.0


def test_byol_step_is_the_sum_of_the_two_one_sided_terms():
    m = make('byol')
    x = images(16)
    loss, logs = m.training_step(x, torch.Generator().manual_seed(5), 0, 10, log=True)
    v1, v2 = m.augment(x, torch.Generator().manual_seed(5))
    p = m.student.predictor(m.student.projector(m.student.backbone(torch.cat([v1, v2]))))
    with torch.no_grad():
        teacher_mode_(m.momentum_encoder)
        z = m.momentum_encoder.projector(m.momentum_encoder.backbone(torch.cat([v1, v2])))
    want = byol_loss(p[:16], z[16:]) + byol_loss(p[16:], z[:16])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert logs['loss'] == pytest.approx(loss.item()) and 0 < logs['loss'] < 8


@pytest.mark.parametrize('name', list(METHODS))
def test_logs_eval_backbone_and_fp32_under_autocast(name):
    m = make(name)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, logs = m.training_step(images(16), torch.Generator(), 0, 10, log=True)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert {'loss', 'feature_std', 'effective_rank', 'agreement'} <= set(logs)
    assert 0 <= logs['agreement'] <= 1 and logs['effective_rank'] > 1 and logs['feature_std'] > 0
    _, quiet = m.training_step(images(16), torch.Generator(), 0, 10)
    assert 'loss' not in quiet
    assert m.eval_backbone() is m.student.backbone   # the online backbone by default
    if name != 'simclr':
        mom = make(name, eval_encoder='momentum')
        assert mom.eval_backbone() is mom.momentum_encoder.backbone


@pytest.mark.parametrize('name', ['moco_v2', 'byol'])
@pytest.mark.parametrize('which', ['online', 'momentum'])
def test_collapse_signals_are_those_of_the_evaluated_backbone(name, which):
    m = make(name, eval_encoder=which)
    with torch.no_grad():
        for p in m.momentum_encoder.parameters(): p.add_(0.3 * torch.randn_like(p))   # make the two encoders differ
    x = images(16)
    _, logs = m.training_step(x, torch.Generator().manual_seed(4), 0, 10, log=True)
    v1, v2 = m.augment(x, torch.Generator().manual_seed(4))
    with torch.no_grad():
        teacher_mode_(m.momentum_encoder)
        bb = m.eval_backbone()
        feats = bb(torch.cat([v1, v2]))[:16]   # view 1's features (BatchNorm statistics of both views, as in the step)
    assert logs['effective_rank'] == pytest.approx(effective_rank(feats), rel=1e-4)
    assert logs['feature_std'] == pytest.approx(feature_std(feats), rel=1e-4)
    other = (m.momentum_encoder if which == 'online' else m.student).backbone(torch.cat([v1, v2]))[:16]
    assert logs['effective_rank'] != pytest.approx(effective_rank(other), rel=1e-3)


@pytest.mark.parametrize('name', list(METHODS))
def test_vit_backbone(name):
    torch.manual_seed(0)
    m = METHODS[name](vit_nano(16, 4, 1, depth=1, embed_dim=32), 16)
    loss, logs = m.training_step(images(8), torch.Generator(), 0, 10, log=True)
    loss.backward()
    assert math.isfinite(loss.item()) and m.student.backbone.blocks[0].attn.qkv.weight.grad is not None


def test_bad_configs_raise_clear_errors():
    for cfg_cls in (SimCLRConfig, MoCoConfig):
        with pytest.raises(ValueError, match='temperature=0 must be > 0'): cfg_cls(temperature=0)
        with pytest.raises(ValueError, match='temperature=-0.1 must be > 0'): cfg_cls(temperature=-0.1)
    with pytest.raises(ValueError, match=r"variant='v1'; choose one of \['v2', 'v3'\]"): MoCoConfig(variant='v1')
    with pytest.raises(ValueError, match='queue_size=0'): MoCoConfig(queue_size=0)
    with pytest.raises(ValueError, match='momentum_start <= momentum_end'): BYOLConfig(momentum_start=1.1)
    with pytest.raises(ValueError, match="eval_encoder='target'"): BYOLConfig(eval_encoder='target')
    with pytest.raises(ValueError, match='global_scale'): SimCLRConfig(global_scale=(0.5, 1.5))
    with pytest.raises(ValueError, match='proj_layers'): SimCLRConfig(proj_layers=0)
    with pytest.raises(ValueError, match='unknown augmentation preset'):
        SimCLR(tiny_cnn(), 16, 1, *STATS, SimCLRConfig(augment='nope'))
    with pytest.raises(ValueError, match='embed_dim'): BYOL(nn.Conv2d(1, 2, 3), 16, 1, *STATS)
    with pytest.raises(ValueError, match='two .batch, dim. tensors'): nt_xent(torch.randn(3, 4), torch.randn(4, 4))
    assert MoCoConfig().augment == 'moco' and MoCoConfig(variant='v3').augment == 'byol'
    assert MoCoConfig(variant='v3', augment='simclr').augment == 'simclr'
