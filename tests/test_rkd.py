import itertools, math
import pytest, torch, torch.nn.functional as F
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode
from sslkd.rkd import (rkd_distance_loss, rkd_angle_loss, rkd_angle_loss_naive, distance_potential, angle_potential,
                       edge_tol, auto_chunk)

F64 = dict(dtype=torch.float64)
SQ3 = math.sqrt(3)


def rand(*shape, seed=0): return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), **F64)

def value_and_grad(loss, s, t, **kw):
    s = s.detach().clone().requires_grad_()
    v = loss(s, t, **kw)
    return v, torch.autograd.grad(v, s)[0]

def huber(r): return 0.5 * r * r if abs(r) < 1 else abs(r) - 0.5

TRI = torch.tensor([[0., 0.], [3., 0.], [0., 4.]], **F64)     # 3-4-5 right triangle
EQ = torch.tensor([[0., 0.], [1., 0.], [0.5, SQ3 / 2]], **F64)  # equilateral
RIGHT = torch.tensor([[0., 0.], [1., 0.], [0., 1.]], **F64)     # right isosceles
ANGLE_LOSSES = [rkd_angle_loss_naive, rkd_angle_loss, lambda s, t: rkd_angle_loss(s, t, chunk_size=1)]


# ---- independent references: plain python loops over pairs and triplets, following the documented rules ----
def coincident(x):
    "Python-loop version of the documented rule: |xi-xj|^2 <= sqrt(eps) (|xi-m|^2 + |xj-m|^2), or i == j."
    n, m = len(x), x.mean(0)
    r = [float(((x[i] - m) ** 2).sum()) for i in range(n)]
    return [[i == j or float(((x[i] - x[j]) ** 2).sum()) <= edge_tol(x.dtype) * (r[i] + r[j]) for j in range(n)]
            for i in range(n)]

def angle_loss_loops(s, t):
    cs, ct, n = coincident(s), coincident(t), len(s)
    def cos(x, co, i, j, k):
        if co[i][j] or co[k][j]: return 0.
        a, b = x[i] - x[j], x[k] - x[j]
        return float(a @ b / (a.norm() * b.norm()))
    total, count = 0., 0
    for i, j, k in itertools.permutations(range(n), 3):
        if ct[i][j] or ct[k][j]: continue  # no teacher angle, no target: not counted
        total += huber(cos(s, cs, i, j, k) - cos(t, ct, i, j, k)); count += 1
    return total / max(count, 1)

def distance_loss_loops(s, t):
    def pot(x):
        co, n = coincident(x), len(x)
        d = [[0. if co[i][j] else float((x[i] - x[j]).norm()) for j in range(n)] for i in range(n)]
        nz = [d[i][j] for i in range(n) for j in range(n) if not co[i][j]]
        mu = sum(nz) / len(nz) if nz else 1.
        return [[v / mu for v in row] for row in d]
    ps, pt, n = pot(s), pot(t), len(s)
    return sum(huber(ps[i][j] - pt[i][j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))

def distance_loss_autograd_reference(s, t):
    "From N x N x D difference tensors (no Gram matrix), differentiable: for gradients."
    def pot(x):
        d2 = (x[None] - x[:, None]).pow(2).sum(-1)
        xc = x - x.mean(0); r = xc.pow(2).sum(-1)
        valid = (d2 > edge_tol(x.dtype) * (r[:, None] + r[None])) & ~torch.eye(len(x), dtype=torch.bool)
        d = torch.where(valid, torch.where(valid, d2, 1).sqrt(), 0)
        return d / d[valid].mean()
    n = len(s)
    return F.smooth_l1_loss(pot(s), pot(t.detach()), reduction='sum') / (n * (n - 1))


# ---- exact values on tiny inputs ----
def test_distance_by_hand():
    # 3-4-5: potentials .75, 1, 1.25; equilateral: all 1 -> two pairs off by .25, each counted twice, over 6 pairs
    assert torch.allclose(distance_potential(TRI), torch.tensor([[0, .75, 1], [.75, 0, 1.25], [1, 1.25, 0]], **F64))
    assert rkd_distance_loss(EQ, TRI).item() == pytest.approx(1 / 48, abs=1e-15)
    assert rkd_distance_loss(TRI, TRI).item() == 0.
    # duplicates: points 0, 0, 1, 3 -> non-zero distances 1, 3, 1, 3, 2 (mean 2); the duplicate pair has potential 0
    line = torch.tensor([[0.], [0.], [1.], [3.]], **F64)
    expected = torch.tensor([[0, 0, .5, 1.5], [0, 0, .5, 1.5], [.5, .5, 0, 1], [1.5, 1.5, 1, 0]], **F64)
    assert torch.allclose(distance_potential(line), expected, atol=1e-15)
    assert rkd_distance_loss(line, line).item() == 0.


def test_distance_potential_of_identical_points_is_zero():
    assert torch.equal(distance_potential(torch.ones(4, 3, **F64)), torch.zeros(4, 4, **F64))
    # student collapsed onto a point against a teacher with mean potential 1 over its pairs
    t = rand(5, 3)
    ones = torch.ones(5, 2, **F64)
    assert rkd_distance_loss(ones, t).item() == pytest.approx(distance_loss_loops(ones, t), abs=1e-14)


@pytest.mark.parametrize('loss', ANGLE_LOSSES)
def test_angle_by_hand(loss):
    # right isosceles (cosines 0, 1/sqrt2, 1/sqrt2) vs equilateral (1/2), two ordered triplets per apex
    assert loss(EQ, RIGHT).item() == pytest.approx(2 * (0.5 * 0.25 + 2 * 0.5 * (0.5 - 2 ** -0.5) ** 2) / 6, abs=1e-15)
    assert loss(RIGHT, RIGHT).item() == 0.
    assert loss(3 * RIGHT @ torch.tensor([[0., 1.], [-1., 0.]], **F64) + 2, RIGHT).item() == pytest.approx(0, abs=1e-15)
    # teacher a, a, b: only apex b counts (2 triplets, cosine 1); equilateral student: cosine 1/2 -> 0.125
    dup = torch.tensor([[0., 0.], [0., 0.], [1., 0.]], **F64)
    assert loss(EQ, dup).item() == pytest.approx(0.125, abs=1e-15)
    # student merges b with the second a: coincident student edge at apex b -> potential 0 -> Huber(1) = 0.5
    assert loss(torch.tensor([[0., 0.], [1., 0.], [1., 0.]], **F64), dup).item() == pytest.approx(0.5, abs=1e-15)


def test_angle_potential_by_hand():
    psi = angle_potential(TRI)   # [apex, i, k]
    assert psi[0, 1, 2].item() == pytest.approx(0, abs=1e-15)       # right angle at the origin
    assert psi[1, 0, 2].item() == pytest.approx(3 / 5, abs=1e-15)
    assert psi[2, 0, 1].item() == pytest.approx(4 / 5, abs=1e-15)
    assert torch.equal(psi[:, 0, 0], torch.tensor([0., 1., 1.], **F64))  # i == j: no edge -> 0; i == k (valid): 1


# ---- fast against naive and against the loop references ----
@pytest.mark.parametrize('n,ds,dt', [(7, 3, 5), (13, 8, 2), (40, 16, 24)])
@pytest.mark.parametrize('dups', [False, True])
def test_fast_matches_naive_value_and_grad(n, ds, dt, dups):
    s, t = rand(n, ds, seed=n), rand(n, dt, seed=n + 1)
    if dups: s[3] = s[1]; s[5] = s[1]; t[2] = t[6]; t[0] = t[6]
    ref, ref_grad = value_and_grad(rkd_angle_loss_naive, s, t)
    for chunk in (1, 2, 3, 5, n - 1, n, 64):
        val, grad = value_and_grad(rkd_angle_loss, s, t, chunk_size=chunk)
        assert abs(val.item() - ref.item()) < 1e-8
        assert (grad - ref_grad).abs().max().item() < 1e-8
    assert ref_grad.abs().max() > 0


@pytest.mark.parametrize('seed', [0, 1])
def test_angle_matches_loop_reference_with_many_duplicates(seed):
    s, t = rand(4, 3, seed=seed), rand(4, 5, seed=seed + 10)
    s = s[[0, 1, 1, 2, 3, 3, 0, 2]]   # 8 samples, only 4 distinct, on each side, differently arranged
    t = t[[0, 0, 1, 2, 3, 1, 2, 2]]
    ref = angle_loss_loops(s, t)
    for loss in ANGLE_LOSSES: assert loss(s, t).item() == pytest.approx(ref, abs=1e-12)
    _, g_naive = value_and_grad(rkd_angle_loss_naive, s, t)
    _, g_fast = value_and_grad(rkd_angle_loss, s, t, chunk_size=3)
    assert (g_fast - g_naive).abs().max().item() < 1e-8


def test_angle_matches_loop_reference_random():
    s, t = rand(6, 4, seed=3), rand(6, 2, seed=4)
    assert rkd_angle_loss(s, t, chunk_size=4).item() == pytest.approx(angle_loss_loops(s, t), abs=1e-12)


def test_distance_matches_references():
    s, t = rand(9, 5, seed=5), rand(9, 12, seed=6)
    s[4] = s[2]; t[7] = t[1]
    assert rkd_distance_loss(s, t).item() == pytest.approx(distance_loss_loops(s, t), abs=1e-12)
    v, g = value_and_grad(rkd_distance_loss, s, t)
    rv, rg = value_and_grad(distance_loss_autograd_reference, s, t)
    assert abs(v.item() - rv.item()) < 1e-12 and (g - rg).abs().max().item() < 1e-12


def test_gradcheck():
    t = rand(6, 3, seed=7)
    s = rand(6, 4, seed=8).requires_grad_()
    assert torch.autograd.gradcheck(lambda s: rkd_angle_loss(s, t, chunk_size=4), s)
    assert torch.autograd.gradcheck(lambda s: rkd_distance_loss(s, t), s)


def test_chunk_default_matches_explicit():
    s, t = rand(30, 4, seed=9), rand(30, 6, seed=10)
    assert auto_chunk(1024, 'cpu') == 1 and auto_chunk(256, 'cpu') == 8 and auto_chunk(4, 'cpu') == 4
    assert auto_chunk(1024, 'cuda') == 32
    assert rkd_angle_loss(s, t).item() == pytest.approx(rkd_angle_loss(s, t, chunk_size=7).item(), abs=1e-14)


# ---- degenerate cases ----
def test_collapsed_student_is_penalised_with_zero_gradient():
    t = rand(10, 4, seed=11)
    s = torch.ones(10, 3, **F64)
    ta = angle_potential(t)
    counted = ~torch.eye(10, dtype=torch.bool)[None].expand(10, 10, 10) & (ta != 0)
    expected = F.smooth_l1_loss(torch.zeros_like(ta[counted]), ta[counted]).item()
    assert expected > 0.05
    for loss in ANGLE_LOSSES:
        v, g = value_and_grad(loss, s, t)
        assert v.item() == pytest.approx(expected, abs=1e-14)
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize('loss', ANGLE_LOSSES)
def test_teacher_without_triplets_gives_zero(loss):
    s = rand(5, 2, seed=12).requires_grad_()
    v = loss(s, torch.ones(5, 3, **F64))
    assert v.item() == 0.
    v.backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


def test_near_duplicates_below_tolerance_are_coincident():
    t, s = rand(6, 3, seed=13), rand(6, 2, seed=14)
    exact = t.clone(); exact[1] = exact[0]
    for loss in ANGLE_LOSSES + [rkd_distance_loss]:
        ref = loss(s, exact).item()
        near, apart = t.clone(), t.clone()
        near[1] = near[0] + 1e-6          # squared length ~3e-12, below sqrt(eps64) ~1.5e-8 of the spread: coincident
        apart[1] = apart[0] + 1e-2        # ~3e-4, above it: a real edge, with new triplets or a non-zero distance
        assert loss(s, near).item() == pytest.approx(ref, abs=1e-5)
        assert abs(loss(s, apart).item() - ref) > 1e-3


# ---- invariances ----
def rotation(d, seed): return torch.linalg.qr(rand(d, d, seed=seed))[0]
MOVES = {'translate': lambda x: x + 10 * rand(x.shape[1], seed=20), 'rotate': lambda x: x @ rotation(x.shape[1], 21),
         'scale': lambda x: 7.5 * x, 'shrink': lambda x: 1e-3 * x}

@pytest.mark.parametrize('loss', [rkd_distance_loss, rkd_angle_loss, rkd_angle_loss_naive])
@pytest.mark.parametrize('move', list(MOVES))
def test_invariances(loss, move):
    s, t = rand(20, 6, seed=15), rand(20, 10, seed=16)
    s[3] = s[8]   # with a duplicate: the coincidence rule must be invariant too
    base = loss(s, t).item()
    assert base > 0.01
    assert loss(MOVES[move](s), t).item() == pytest.approx(base, abs=1e-10)
    assert loss(s, MOVES[move](t)).item() == pytest.approx(base, abs=1e-10)


# ---- gradients, dtypes, devices ----
def test_teacher_gets_no_gradient():
    s, t = rand(8, 4, seed=17).requires_grad_(), rand(8, 3, seed=18).requires_grad_()
    (rkd_distance_loss(s, t) + rkd_angle_loss(s, t) + rkd_angle_loss_naive(s, t)).backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_no_grad_mode_and_student_without_grad():
    s, t = rand(8, 4, seed=19), rand(8, 3, seed=20)
    with torch.no_grad(): a = rkd_angle_loss(s.requires_grad_(), t)
    assert not a.requires_grad and a.item() == pytest.approx(rkd_angle_loss_naive(s.detach(), t).item(), abs=1e-14)


def test_dtypes():
    s, t = torch.randn(16, 8), torch.randn(16, 4)
    for loss in (rkd_distance_loss, rkd_angle_loss, rkd_angle_loss_naive):
        assert loss(s, t).dtype == torch.float32
        assert loss(s.double(), t.double()).dtype == torch.float64
        assert loss(s.half(), t.half()).dtype == torch.float32


@pytest.mark.parametrize('loss', [rkd_distance_loss, rkd_angle_loss, rkd_angle_loss_naive])
def test_autocast_bf16_returns_float32(loss):
    s, t = torch.randn(32, 16), torch.randn(32, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        sb = s.bfloat16().requires_grad_()
        out = loss(sb, t.bfloat16())
        out.backward()
    assert out.dtype == torch.float32 and sb.grad.dtype == torch.bfloat16
    assert out.item() == pytest.approx(loss(s, t).item(), rel=0.05)


def test_float32_close_to_float64():
    s, t = rand(64, 32, seed=21) * 3 + 5, rand(64, 16, seed=22)
    v64, g64 = value_and_grad(rkd_angle_loss_naive, s, t)
    v32, g32 = value_and_grad(rkd_angle_loss, s.float(), t.float())
    assert v32.item() == pytest.approx(v64.item(), rel=1e-5)
    assert ((g32.double() - g64).norm() / g64.norm()).item() < 1e-4


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    s, t = rand(50, 7, seed=23), rand(50, 5, seed=24)
    s[2] = s[9]
    for loss in (rkd_distance_loss, rkd_angle_loss, rkd_angle_loss_naive):
        v, g = value_and_grad(loss, s, t)
        vc, gc = value_and_grad(loss, s.cuda(), t.cuda())
        assert abs(vc.item() - v.item()) < 1e-8 and (gc.cpu() - g).abs().max().item() < 1e-8
        with torch.autocast('cuda', dtype=torch.bfloat16):
            assert loss(s.cuda().bfloat16(), t.cuda().bfloat16()).dtype == torch.float32


# ---- memory: no N^3 (or N^2 D) tensor is ever created by the fast loss ----
class LargestTensor(TorchDispatchMode):
    "Records the largest tensor any operation returns (forward and backward)."
    def __init__(self): super().__init__(); self.numel = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in tree_flatten(out)[0]:
            if isinstance(o, torch.Tensor): self.numel = max(self.numel, o.numel())
        return out

def largest_tensor(loss, n, d, **kw):
    s, t = torch.randn(n, d, requires_grad=True), torch.randn(n, d)
    with LargestTensor() as mode: loss(s, t, **kw).backward()
    assert s.grad is not None
    return mode.numel

def test_fast_never_builds_n3_or_n2d_tensors():
    n, d, chunk = 48, 64, 4
    assert largest_tensor(rkd_angle_loss_naive, n, d) >= n ** 3        # the probe sees the naive one's tensors
    assert largest_tensor(rkd_angle_loss, n, d, chunk_size=chunk) <= chunk * n * n
    assert largest_tensor(rkd_distance_loss, n, d) <= n * max(n, d)


# ---- clear errors ----
@pytest.mark.parametrize('call,exc,msg', [
    (lambda: rkd_angle_loss(torch.randn(4, 2, 3), torch.randn(4, 3)), ValueError, 'x.flatten(1)'),
    (lambda: rkd_distance_loss(torch.randn(4, 3), torch.randn(4)), ValueError, '2-D tensor'),
    (lambda: rkd_angle_loss_naive(torch.randn(4, 3), [[0.]] * 4), ValueError, '2-D tensor'),
    (lambda: rkd_distance_loss(torch.randn(4, 3), torch.randn(5, 3)), ValueError, 'same samples'),
    (lambda: rkd_angle_loss(torch.randn(4, 3), torch.randn(5, 3)), ValueError, 'same samples'),
    (lambda: rkd_angle_loss(torch.randn(2, 3), torch.randn(2, 3)), ValueError, 'at least 3'),
    (lambda: rkd_angle_loss_naive(torch.randn(2, 3), torch.randn(2, 3)), ValueError, 'at least 3'),
    (lambda: rkd_distance_loss(torch.randn(1, 3), torch.randn(1, 3)), ValueError, 'at least 2'),
    (lambda: rkd_angle_loss(torch.randn(4, 3), torch.randn(4, 3), chunk_size=0), ValueError, 'positive int'),
    (lambda: rkd_angle_loss(torch.randn(4, 3), torch.randn(4, 3), chunk_size=2.5), ValueError, 'positive int'),
    (lambda: rkd_distance_loss(torch.ones(4, 3, dtype=torch.long), torch.randn(4, 3)), TypeError, 'x.float()'),
])
def test_bad_input(call, exc, msg):
    with pytest.raises(exc, match=None) as e: call()
    assert msg in str(e.value)


# ---- stacks of sets ----
from sslkd.rkd import rkd_distance_loss_sets, rkd_angle_loss_sets

def loop(loss, s, t, **kw):
    return torch.stack([loss(a, b, **kw) for a, b in zip(s.flatten(0, -3), t.flatten(0, -3))]).view(s.shape[:-2])

@pytest.mark.parametrize('one,many,kw', [(rkd_distance_loss, rkd_distance_loss_sets, {}),
                                         (rkd_angle_loss, rkd_angle_loss_sets, {}),
                                         (rkd_angle_loss, rkd_angle_loss_sets, dict(chunk_size=4)),
                                         (rkd_angle_loss, rkd_angle_loss_sets, dict(chunk_size=100))])
def test_stacked_sets_match_the_loop_over_sets(one, many, kw):
    s, t = rand(2, 3, 9, 6, seed=1), rand(2, 3, 9, 4, seed=2)
    s[0, 1, 4] = s[0, 1, 2]; t[1, 2, 0] = t[1, 2, 7]; t[0, 0] = 0.   # duplicates; a teacher set with no relation at all
    w = rand(2, 3, seed=3)                                             # a weight per set: each set's own gradient
    ref, ref_grad = value_and_grad(lambda a, b, **k: (loop(one, a, b, **k) * w).sum(), s, t, **kw)
    val, grad = value_and_grad(lambda a, b, **k: (many(a, b, **k) * w).sum(), s, t, **kw)
    torch.testing.assert_close(val, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert many(s, t, **kw).shape == (2, 3)
    # one set (N, D)
    torch.testing.assert_close(many(s[1, 1], t[1, 1], **kw), one(s[1, 1], t[1, 1], **kw), rtol=1e-14, atol=1e-14)

def test_stacked_angle_groups_sets_within_the_budget(monkeypatch):
    import sslkd.rkd as rkd
    # 3 sets of N=7 per group: 10 sets make 4 groups
    monkeypatch.setattr(rkd, '_element_budget', lambda device: 3 * 7 * 7)
    s, t = rand(10, 7, 3, seed=4), rand(10, 7, 5, seed=5)
    torch.testing.assert_close(rkd_angle_loss_sets(s, t), loop(rkd_angle_loss, s, t), rtol=1e-12, atol=1e-12)
    # 4 sets of N=12: one set per group, one apex per chunk, so no buffer beyond 12 * 12 (all four at once would be
    # 4 * 12 * 12); the largest tensor is the input
    loss = lambda a, b: rkd_angle_loss_sets(a.view(4, 12, -1), b.view(4, 12, -1)).sum()
    assert largest_tensor(loss, 48, 8) <= 48 * 8

def test_stacked_sets_edge_cases():
    assert rkd_angle_loss_sets(torch.randn(0, 5, 3), torch.randn(0, 5, 2)).shape == (0,)
    assert rkd_distance_loss_sets(torch.randn(0, 5, 3), torch.randn(0, 5, 2)).shape == (0,)
    with pytest.raises(ValueError, match='same samples'):
        rkd_angle_loss_sets(torch.randn(4, 5, 3), torch.randn(5, 4, 3))
    with pytest.raises(ValueError, match=r'\(\.\.\., N, D\)'): rkd_distance_loss_sets(torch.randn(3), torch.randn(3))
    with pytest.raises(ValueError, match='positive int'):
        rkd_angle_loss_sets(torch.randn(2, 4, 3), torch.randn(2, 4, 3), chunk_size=0)
    with pytest.raises(ValueError, match='at least 3'): rkd_angle_loss_sets(torch.randn(4, 2, 3), torch.randn(4, 2, 3))
