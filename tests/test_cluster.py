"Unsupervised classification: the scores against independent references, the assignment solver, k-means, heads."
import itertools, math
from collections import Counter
import pytest, torch, torch.nn as nn
import sslkd.cluster as cl
from sslkd.cluster import (contingency, contingency_nmi, contingency_ari, contingency_acc, hungarian,
                           linear_assignment, cluster_scores, kmeans, assign, prototype_assignments)


def ref_scores(a, y):
    "NMI, ARI and ACC in percent from the points themselves: explicit sums, a loop over all pairs, all namings."
    a, y, N = a.tolist(), y.tolist(), len(a)
    na, ny, nay = Counter(a), Counter(y), Counter(zip(a, y))
    ent = lambda cnt: -sum(v / N * math.log(v / N) for v in cnt.values())
    mi = sum(v / N * math.log(N * v / (na[k] * ny[c])) for (k, c), v in nay.items())
    hu, hv = ent(na), ent(ny)
    nmi = 100. if hu == hv == 0 else 0. if hu == 0 or hv == 0 else 200 * mi / (hu + hv)
    both = same_a = same_y = 0
    for i in range(N):
        for j in range(i + 1, N):
            sa, sy = a[i] == a[j], y[i] == y[j]
            both += sa and sy; same_a += sa; same_y += sy
    pairs = N * (N - 1) / 2
    expected = same_a * same_y / pairs
    ari = 100 * (both - expected) / ((same_a + same_y) / 2 - expected)
    ks, cs = sorted(na), sorted(ny)
    if len(ks) <= len(cs): namings = (dict(zip(ks, p)) for p in itertools.permutations(cs, len(ks)))
    else: namings = (dict(zip(p, cs)) for p in itertools.permutations(ks, len(cs)))
    acc = 100 * max(sum(name.get(k) == c for k, c in zip(a, y)) for name in namings) / N
    return nmi, ari, acc


def brute_force(cost):
    "Smallest total cost over every one-to-one matching of a small cost matrix."
    n, m = cost.shape
    if n > m: return brute_force(cost.T)
    return min(sum(cost[i, j].item() for i, j in enumerate(cols)) for cols in itertools.permutations(range(m), n))


def test_contingency_counts_and_pads():
    g = torch.Generator().manual_seed(0)
    a, y = torch.randint(0, 6, (300,), generator=g), torch.randint(0, 4, (300,), generator=g)
    n = contingency(a, y)
    ref = torch.zeros(6, 4, dtype=torch.long)
    for k, c in zip(a.tolist(), y.tolist()): ref[k, c] += 1
    assert torch.equal(n, ref)
    assert torch.equal(contingency(torch.tensor([2, 2]), torch.tensor([0, 1]), n_clusters=4, n_classes=3),
                       torch.tensor([[0, 0, 0], [0, 0, 0], [1, 1, 0], [0, 0, 0]]))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_perfect_clustering_under_any_names(seed):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (2000,), generator=g)
    ids = torch.randperm(65536, generator=g)[:10]  # arbitrary prototype ids, not 0..9
    assert cluster_scores(ids[y], y) == dict(nmi=100., ari=100., acc=100., n_clusters=10)


def test_random_assignments_score_near_zero():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 10, (10000,), generator=g)
    s = cluster_scores(torch.randint(0, 10, (10000,), generator=g), y)
    assert abs(s['ari']) < 1 and 0 <= s['nmi'] < 1 and 10 <= s['acc'] < 13 and s['n_clusters'] == 10
    many = cluster_scores(torch.randint(0, 1000, (10000,), generator=g), y)
    assert abs(many['ari']) < 1 and many['nmi'] > 5  # NMI's bias towards many clusters; ARI has none


def test_hand_made_table():
    "The worked example of the chapter: [[2, 0], [1, 3]]."
    a, y = torch.tensor([0, 0, 1, 1, 1, 1]), torch.tensor([0, 0, 0, 1, 1, 1])
    s = cluster_scores(a, y)
    assert s['nmi'] == pytest.approx(47.8704, abs=1e-4) and s['ari'] == pytest.approx(100 * 1.2 / 3.7)
    assert s['acc'] == pytest.approx(500 / 6) and s['n_clusters'] == 2
    assert [s['nmi'], s['ari'], s['acc']] == pytest.approx(ref_scores(a, y), abs=1e-9)


@pytest.mark.parametrize('K,C,N,seed', [(3, 3, 30, 0), (4, 2, 25, 1), (2, 4, 25, 2), (5, 3, 40, 3), (1, 3, 12, 4)])
def test_scores_equal_independent_references(K, C, N, seed):
    g = torch.Generator().manual_seed(seed)
    a, y = torch.randint(0, K, (N,), generator=g), torch.randint(0, C, (N,), generator=g)
    s = cluster_scores(a * 100 + 7, y)  # spaced-out ids
    assert [s['nmi'], s['ari'], s['acc']] == pytest.approx(ref_scores(a, y), abs=1e-9)
    assert s['n_clusters'] == len(set(a.tolist()))


def test_more_and_fewer_clusters_than_classes():
    # K > C: the third cluster's points are errors; K < C: the middle class gets no cluster
    assert cluster_scores(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2]), torch.tensor([0, 0, 0, 1, 1, 1, 0, 1]))['acc'] == 75.
    assert contingency_acc([[3, 1, 0], [0, 1, 3]]) == 75.
    over = cluster_scores(torch.arange(12), torch.arange(12) % 3)  # every point its own cluster
    assert over['acc'] == 25. and over['ari'] == 0. and over['n_clusters'] == 12


def test_degenerate_partitions():
    one, two = torch.zeros(6, dtype=torch.long), torch.tensor([0, 0, 0, 1, 1, 1])
    assert cluster_scores(one, one) == dict(nmi=100., ari=100., acc=100., n_clusters=1)
    s = cluster_scores(one, two)
    assert (s['nmi'], s['ari'], s['acc']) == (0., 0., 50.)
    assert cluster_scores(torch.arange(5), torch.arange(5) + 3)['ari'] == 100.  # all singletons in both
    assert cluster_scores(torch.tensor([4]), torch.tensor([9]))['ari'] == 100.
    assert contingency_ari([[1, 1], [1, 1]]) == pytest.approx(-50.)


@pytest.mark.parametrize('n,m', [(1, 1), (1, 5), (5, 1), (2, 6), (3, 3), (4, 6), (6, 4), (6, 6)])
def test_hungarian_equals_brute_force(n, m):
    g = torch.Generator().manual_seed(10 * n + m)
    for cost in (torch.rand(n, m, generator=g, dtype=torch.float64) * 10 - 5,
                 torch.randint(0, 3, (n, m), generator=g).double(),  # ties
                 torch.zeros(n, m, dtype=torch.float64)):
        rows, cols = hungarian(cost)
        assert rows.dtype == cols.dtype == torch.long and len(rows) == len(cols) == min(n, m)
        assert len(set(rows.tolist())) == len(set(cols.tolist())) == min(n, m) and rows.tolist() == sorted(rows)
        assert cost[rows, cols].sum().item() == pytest.approx(brute_force(cost), abs=1e-9)
        r2, c2 = linear_assignment(cost, use_scipy=False)
        assert torch.equal(r2, rows) and torch.equal(c2, cols)


def test_hungarian_equals_scipy():
    scipy_opt = pytest.importorskip('scipy.optimize')
    g = torch.Generator().manual_seed(0)
    for n, m in [(7, 7), (20, 35), (35, 20), (60, 60)]:
        ties = -torch.randint(0, 9, (n, m), generator=g).double()
        for cost in (torch.rand(n, m, generator=g, dtype=torch.float64), ties):
            r, c = scipy_opt.linear_sum_assignment(cost.numpy())
            best = cost[torch.as_tensor(r), torch.as_tensor(c)].sum().item()
            rows, cols = hungarian(cost)
            assert cost[rows, cols].sum().item() == pytest.approx(best, abs=1e-9)
            rs, cs = linear_assignment(cost, use_scipy=True)
            assert torch.equal(rs, torch.as_tensor(r)) and torch.equal(cs, torch.as_tensor(c))


def test_acc_same_with_either_solver():
    g = torch.Generator().manual_seed(3)
    table = torch.randint(0, 30, (6, 5), generator=g)
    best = -brute_force(-table.double())
    assert contingency_acc(table, use_scipy=False) == pytest.approx(100 * best / table.sum().item())
    assert contingency_acc(table) == pytest.approx(contingency_acc(table, use_scipy=False))


def blobs(n_per, k, dim, noise, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, dim, generator=g), dim=1)
    y = torch.arange(k).repeat_interleave(n_per)
    return centres[y] + noise * torch.randn(len(y), dim, generator=g), y


def test_kmeans_recovers_blobs_and_is_deterministic():
    feats, y = blobs(60, 6, 24, 0.1, seed=0)
    a, c = kmeans(feats, 6, seed=0)
    assert cluster_scores(a, y) == dict(nmi=100., ari=100., acc=100., n_clusters=6)
    assert c.shape == (6, 24) and torch.allclose(c.norm(dim=1), torch.ones(6))
    a2, c2 = kmeans(feats, 6, seed=0)
    assert torch.equal(a, a2) and torch.equal(c, c2)
    # the scale of a feature does not matter: the clustering is by cosine
    a3, _ = kmeans(feats * torch.rand(len(feats), 1) * 10, 6, seed=0)
    assert cluster_scores(a3, y)['acc'] == 100.


def test_kmeans_chunks_change_nothing(monkeypatch):
    feats, _ = blobs(40, 4, 16, 0.5, seed=1)
    a, c = kmeans(feats, 4, seed=3, iters=5)
    monkeypatch.setattr(cl, '_CHUNK', 4 * 3)  # chunks of 3 points
    a2, c2 = kmeans(feats, 4, seed=3, iters=5)
    assert torch.equal(a, a2) and torch.allclose(c, c2, atol=1e-6)


def test_kmeans_best_of_n_init():
    feats, _ = blobs(30, 8, 8, 0.6, seed=2)
    score = lambda a, c: (torch.nn.functional.normalize(feats, dim=1) * c[a]).sum().item()
    runs = [kmeans(feats, 8, seed=5, n_init=n) for n in (1, 4)]
    assert score(*runs[1]) >= score(*runs[0]) - 1e-4


def test_assign_matches_kmeans_and_brute_force():
    feats, _ = blobs(50, 5, 12, 0.3, seed=4)
    a, c = kmeans(feats, 5, seed=1)
    assert torch.equal(assign(feats, c), a)
    new = torch.randn(40, 12, generator=torch.Generator().manual_seed(9))
    cos = [[(p @ q / (p.norm() * q.norm())).item() for q in c] for p in new]
    assert assign(new, c).tolist() == [max(range(5), key=row.__getitem__) for row in cos]


def test_empty_cluster_restarts_at_farthest_point():
    x = torch.nn.functional.normalize(torch.tensor([[1., .1], [1., .2], [1., -.1], [.2, 1.]]), dim=1)
    c0 = torch.nn.functional.normalize(torch.tensor([[1., 0.], [-1., -1.]]), dim=1)
    c = cl._lloyd(x, c0, iters=1, tol=0)
    assert torch.allclose(c[1], x[3])  # least similar to the centroid it was assigned to
    a, _ = kmeans(torch.tensor([[1., 0.], [1., 0.], [0., 1.], [0., 1.]]), 3, seed=0)
    assert len(a) == 4  # more clusters than distinct points: the draws and restarts stay valid


def test_prototype_assignments_mode_batches_and_precision():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(8, 32), nn.Dropout(0.5), nn.Linear(32, 16))
    feats = torch.randn(50, 8)
    pa = prototype_assignments(head, feats, batch_size=7)
    assert head.training  # restored
    with torch.no_grad(): ref = head.eval()(feats).argmax(1)
    assert torch.equal(pa, ref) and pa.dtype == torch.long
    assert not head.training and torch.equal(prototype_assignments(head, feats), ref) and not head.training
    head.train()
    with torch.autocast('cpu', dtype=torch.bfloat16): assert torch.equal(prototype_assignments(head, feats), ref)
    with pytest.raises(ValueError, match='not \\(N, K\\)'): prototype_assignments(nn.Flatten(0), feats)


def test_value_errors():
    z = torch.zeros(4, dtype=torch.long)
    cases = [((torch.tensor([], dtype=torch.long), torch.tensor([], dtype=torch.long)), 'empty'),
             ((z, z[:3]), '4 assignments but 3 labels'),
             ((z.view(2, 2), z), '1-D'),
             ((z.float(), z), 'integer'),
             ((z, z.bool()), 'integer')]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg): cluster_scores(*args)
    with pytest.raises(ValueError, match='non-negative'): contingency(z - 1, z)
    with pytest.raises(ValueError, match='n_clusters=2'): contingency(z + 2, z, n_clusters=2)
    with pytest.raises(ValueError, match='inf or nan'): linear_assignment(torch.tensor([[1., float('nan')]]))
    with pytest.raises(ValueError, match='2-D'): hungarian(torch.ones(3))
    with pytest.raises(ValueError, match='k=5'): kmeans(torch.randn(4, 3), 5)
    with pytest.raises(ValueError, match='do not match'): assign(torch.randn(4, 3), torch.randn(2, 4))
