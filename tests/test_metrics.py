import math, re, pytest, torch, torch.nn.functional as F
from pathlib import Path
import sslkd.metrics as M
from sslkd.metrics import entropy, feature_std, effective_rank, collapse_signals, collapse_warning

KEYS = {'teacher_entropy', 'teacher_mean_entropy', 'ln_K', 'kl_teacher_student', 'agreement', 'feature_std',
        'effective_rank'}


def naive_signals(T, S):
    "Reference in plain python: teacher probs T and student probs S as nested lists."
    H = lambda p: -sum(x * math.log(x) for x in p if x > 0)
    B, K = len(T), len(T[0])
    mean = [sum(r[k] for r in T) / B for k in range(K)]
    kl = sum(sum(t * (math.log(t) - math.log(s)) for t, s in zip(rt, rs) if t > 0) for rt, rs in zip(T, S)) / B
    argmax = lambda r: max(range(len(r)), key=lambda k: (r[k], -k))
    agree = sum(argmax(rt) == argmax(rs) for rt, rs in zip(T, S)) / B
    return dict(teacher_entropy=sum(map(H, T)) / B, teacher_mean_entropy=H(mean), ln_K=math.log(K),
                kl_teacher_student=kl, agreement=agree)


# ---- entropy -----------------------------------------------------------------------------------------------
def test_entropy_exact_values():
    assert entropy(torch.tensor([1., 0, 0])).item() == 0.0        # 0 ln 0 = 0, no nan, no -0.
    assert math.copysign(1, entropy(torch.tensor([0., 1.])).item()) == 1
    assert entropy(torch.tensor([.5, .5])).item() == pytest.approx(math.log(2), abs=1e-15)
    assert entropy(torch.full((7,), 1 / 7)).item() == pytest.approx(math.log(7), abs=1e-7)
    p = torch.tensor([[.5, .25, .25], [0., 0., 1.]])
    torch.testing.assert_close(entropy(p), torch.tensor([1.5 * math.log(2), 0.], dtype=torch.float64))
    torch.testing.assert_close(entropy(p.T, dim=0), entropy(p))
    assert entropy(p).dtype == torch.float64


# ---- collapse_signals: exact values on tiny inputs ---------------------------------------------------------
@pytest.mark.parametrize('B,K', [(4, 8), (3, 3), (16, 5)])
def test_uniform_teacher(B, K):
    u = torch.full((B, K), 1 / K)
    s = collapse_signals(u, u.log())
    assert set(s) == KEYS and all(type(v) is float for v in s.values())
    assert s['teacher_entropy'] == pytest.approx(math.log(K), abs=1e-6)
    assert s['teacher_mean_entropy'] == pytest.approx(math.log(K), abs=1e-6)
    assert s['ln_K'] == math.log(K)
    assert abs(s['kl_teacher_student']) < 1e-12
    assert s['agreement'] == 1.0                                   # ties go to index 0 on both sides
    assert math.isnan(s['feature_std']) and math.isnan(s['effective_rank'])


def test_one_hot_same_class():
    T = F.one_hot(torch.full((6,), 2), 5).float()
    s = collapse_signals(T, T)
    assert s['teacher_entropy'] == 0.0 and s['teacher_mean_entropy'] == 0.0
    assert s['kl_teacher_student'] == 0.0 and s['agreement'] == 1.0


@pytest.mark.parametrize('B,K', [(4, 8), (5, 5), (2, 100)])
def test_one_hot_distinct_classes(B, K):
    T = F.one_hot(torch.arange(B), K).float()
    s = collapse_signals(T, T)
    assert s['teacher_entropy'] == 0.0
    assert s['teacher_mean_entropy'] == pytest.approx(math.log(B), abs=1e-12)


def test_kl_identical_is_zero_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    T = torch.softmax(torch.randn(32, 10, generator=g) / 0.2, 1)
    assert abs(collapse_signals(T, T.log())['kl_teacher_student']) < 1e-6
    S = torch.softmax(torch.randn(32, 10, generator=g), 1)
    assert collapse_signals(T, S.log())['kl_teacher_student'] > 0.1


def test_agreement_exact():
    T = torch.tensor([[.7, .2, .1], [.1, .8, .1], [.2, .2, .6], [.5, .4, .1]])
    S = torch.tensor([[.6, .3, .1], [.1, .1, .8], [.1, .3, .6], [.9, .05, .05]])
    assert collapse_signals(T, S)['agreement'] == 0.75


def test_matches_naive_reference_with_zeros():
    g = torch.Generator().manual_seed(1)
    T = torch.rand(9, 6, generator=g, dtype=torch.float64) ** 3
    T[T < 0.05] = 0                                                # exact zeros in the teacher: 0 ln 0 = 0
    T[0] = torch.tensor([0., 0, 1, 0, 0, 0])
    T = T / T.sum(1, keepdim=True)
    S = torch.softmax(torch.randn(9, 6, generator=g, dtype=torch.float64), 1)
    got = collapse_signals(T, S.log())
    for k, v in naive_signals(T.tolist(), S.tolist()).items():
        assert got[k] == pytest.approx(v, abs=1e-9), k


def test_probs_and_logprobs_give_the_same_signals():
    g = torch.Generator().manual_seed(2)
    T = torch.softmax(torch.randn(20, 7, generator=g) / 0.1, 1)
    logits = torch.randn(20, 7, generator=g)
    a = collapse_signals(T, F.log_softmax(logits, 1))
    b = collapse_signals(T, F.softmax(logits, 1))
    c = collapse_signals(T, F.softmax(logits, 1), student_is_log=False)
    for k in KEYS - {'feature_std', 'effective_rank'}:
        assert a[k] == pytest.approx(b[k], abs=1e-6) and b[k] == c[k]


def test_student_zero_prob_under_teacher_mass_is_infinite_kl():
    T = torch.tensor([[.5, .5]]); S = torch.tensor([[1., 0.]])
    assert collapse_signals(T, S)['kl_teacher_student'] == math.inf
    assert collapse_signals(torch.tensor([[1., 0.]]), S)['kl_teacher_student'] == 0.0   # no nan from 0 * -inf


def test_low_precision_and_grad_inputs():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 256, generator=g, requires_grad=True)
    T = torch.softmax(logits.bfloat16() / 0.5, 1)                  # bf16 rows do not sum exactly to 1
    S = F.log_softmax(logits.half() * 0.5, 1)
    s = collapse_signals(T, S, logits.bfloat16()[:, :32])
    ref = collapse_signals(T.double(), S.double(), logits.detach().double()[:, :32])
    assert s['teacher_entropy'] <= s['ln_K'] and s['teacher_mean_entropy'] <= s['ln_K'] + 1e-12
    assert s['kl_teacher_student'] >= -1e-12
    for k in KEYS: assert s[k] == pytest.approx(ref[k], rel=2e-2, abs=1e-3), k


# ---- bad inputs ---------------------------------------------------------------------------------------------
def test_clear_errors():
    u = torch.full((4, 8), 1 / 8)
    with pytest.raises(ValueError, match='raw logits'): collapse_signals(u, torch.randn(4, 8))
    with pytest.raises(ValueError, match='probabilities'): collapse_signals(u, torch.rand(4, 8) + 1)   # positive scores
    with pytest.raises(ValueError, match='teacher_probs'): collapse_signals(torch.randn(4, 8), u)
    with pytest.raises(ValueError, match='same shape'): collapse_signals(u, u[:3])
    with pytest.raises(ValueError, match='same shape'): collapse_signals(u[0], u[0])
    with pytest.raises(ValueError, match=r'\(batch, dim\)'): collapse_signals(u, u, torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match=r'\(batch, dim\)'): effective_rank(torch.randn(5))


# ---- features ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize('D', [1, 3, 16])
def test_effective_rank_identity_like_is_D(D):
    e = torch.eye(D)
    assert effective_rank(torch.cat([e, -e])) == pytest.approx(D, abs=1e-9)
    assert effective_rank(torch.cat([e, -e]) * 1e-3 + 7.) == pytest.approx(D, abs=1e-6)   # scale, offset invariant


def test_effective_rank_rank_one_and_constant():
    g = torch.Generator().manual_seed(4)
    line = torch.randn(200, 1, generator=g) * torch.randn(1, 12, generator=g) + torch.randn(12, generator=g)
    assert effective_rank(line) == pytest.approx(1.0, abs=1e-3)
    assert effective_rank(torch.randn(12, generator=g).expand(30, 12)) == 0.0
    assert effective_rank(torch.randn(1, 12, generator=g)) == 0.0


def test_effective_rank_matches_eigenvalue_reference():
    g = torch.Generator().manual_seed(5)
    spread = torch.tensor([5., 3, 2, 1, 1, .5, .1, 0.]).double()
    x = torch.randn(40, 8, generator=g, dtype=torch.float64) @ torch.diag(spread)
    xc = x - x.mean(0)
    s = torch.linalg.eigvalsh(xc.T @ xc).clamp_min(0).sqrt().tolist()
    p = [v / sum(s) for v in s]
    ref = math.exp(-sum(v * math.log(v) for v in p if v > 0))
    assert effective_rank(x) == pytest.approx(ref, rel=1e-6)
    assert 1 < effective_rank(x) < 7


def test_feature_std_values():
    assert feature_std(torch.tensor([[3., 4.]]).expand(10, 2)) == 0.0
    # rows normalise to e1, e2: each dim holds {1, 0}, unbiased std sqrt(1/2)
    assert feature_std(torch.tensor([[2., 0.], [0., 5.]])) == pytest.approx(math.sqrt(.5), abs=1e-12)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(20000, 64, generator=g)
    assert feature_std(x) == pytest.approx(1 / 8, rel=0.02)       # ~1/sqrt(D) for features spread over the sphere
    scale = torch.rand(20000, 1, generator=g) + 0.1
    assert feature_std(x * scale) == pytest.approx(feature_std(x), abs=1e-12)   # per-row scale does not matter
    assert math.isnan(feature_std(torch.randn(1, 4)))


def test_signals_with_features():
    g = torch.Generator().manual_seed(7)
    T = torch.softmax(torch.randn(50, 9, generator=g), 1)
    f = torch.randn(50, 6, generator=g)
    s = collapse_signals(T, T, f)
    assert s['feature_std'] == feature_std(f) and s['effective_rank'] == effective_rank(f)


# ---- collapse_warning ------------------------------------------------------------------------------------------
def synthetic(mode, B=256, K=64, D=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    if mode == 'healthy':
        logits = torch.randn(B, K, generator=g) * 3
        T = torch.softmax(logits / 0.4, 1)
        S = F.log_softmax(logits + torch.randn(B, K, generator=g), 1)
        f = torch.randn(B, D, generator=g)
    elif mode == 'uniform':
        T = torch.full((B, K), 1 / K)
        S = F.log_softmax(torch.randn(B, K, generator=g) * 1e-3, 1)
        f = torch.randn(B, D, generator=g)
    elif mode == 'one-hot':
        T = F.softmax(torch.zeros(B, K).index_fill_(1, torch.tensor([5]), 30.), 1)
        S = F.log_softmax(torch.zeros(B, K).index_fill_(1, torch.tensor([5]), 10.), 1)
        f = torch.randn(B, D, generator=g)
    elif mode == 'dimensional':
        logits = torch.randn(B, K, generator=g) * 3
        T, S = torch.softmax(logits / 0.4, 1), F.log_softmax(logits, 1)
        f = torch.randn(B, 1, generator=g) * torch.randn(1, D, generator=g)
    return collapse_signals(T, S, f)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_warning_silent_when_healthy(seed):
    s = synthetic('healthy', seed=seed)
    assert s['kl_teacher_student'] > 0.05 and s['teacher_mean_entropy'] > 0.5 * s['ln_K']
    assert collapse_warning(s) is None


def test_warning_uniform():
    msg = collapse_warning(synthetic('uniform'))
    assert msg.startswith('uniform collapse') and 'one-hot' not in msg.split('\n')[0][:20]
    assert len(msg.split('\n')) == 1
    assert 'ln K' in msg and 'deepcopy' in msg and 'temperature' in msg


def test_warning_one_hot():
    s = synthetic('one-hot')
    assert s['teacher_mean_entropy'] < 1e-6
    msg = collapse_warning(s)
    assert msg.startswith('one-hot collapse') and len(msg.split('\n')) == 1
    assert 'centering' in msg and f"{s['teacher_mean_entropy']:.3g}" in msg


def test_warning_dimensional_and_constant_features():
    msg = collapse_warning(synthetic('dimensional'))
    assert msg.startswith('dimensional collapse') and 'stop-gradient' in msg
    s = dict(synthetic('healthy'), feature_std=1e-7, effective_rank=0.0)
    assert collapse_warning(s).startswith('dimensional collapse')


def test_flat_teacher_with_a_sharp_student_is_not_uniform_collapse():
    # high teacher entropy alone is not collapse: the student has not matched it (KL large), e.g. early training
    K = 64
    T = torch.full((128, K), 1 / K)
    S = F.log_softmax(torch.randn(128, K, generator=torch.Generator().manual_seed(9)) * 5, 1)
    s = collapse_signals(T, S)
    assert s['kl_teacher_student'] > 1
    assert collapse_warning(s) is None


def test_warning_thresholds_and_missing_signals():
    s = synthetic('uniform')
    assert collapse_warning(s, uniform_frac=1.01) is None                # thresholds are honoured
    s = synthetic('one-hot')
    assert collapse_warning(s, onehot_frac=0.0) is None
    assert collapse_warning({}) is None                                   # missing keys skip their rule
    assert collapse_warning(dict(synthetic('healthy'), feature_std=math.nan, effective_rank=math.nan)) is None
    assert collapse_warning({'effective_rank': 1.0}).startswith('dimensional')


# ---- dependencies and devices ---------------------------------------------------------------------------------
def test_imports_only_torch_and_math():
    src = Path(M.__file__).read_text()
    imports = re.findall(r'^\s*(?:from|import)\s+([\w.]+)', src, re.M)
    assert imports and all(m.split('.')[0] in ('math', 'torch') or m == 'sslkd.evaluate' for m in imports), imports


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu():
    g = torch.Generator().manual_seed(8)
    T = torch.softmax(torch.randn(128, 512, generator=g) / 0.1, 1)
    S = F.log_softmax(torch.randn(128, 512, generator=g), 1)
    f = torch.randn(128, 64, generator=g)
    a, b = collapse_signals(T, S, f), collapse_signals(T.cuda(), S.cuda(), f.cuda())
    for k in KEYS: assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
