import pytest, torch, torch.nn as nn
from pathlib import Path
from sslkd.evaluate import (extract_features, knn_predict, knn_predict_naive, knn_accuracy, topk_accuracy,
                            linear_probe, LinearProbeConfig, evaluate_backbone)
from sslkd.data import ImageData

FMNIST = Path('/usr/share/datasets/fashion-mnist')
has_fmnist = all((FMNIST / f).exists() for f in ['train-images-idx3-ubyte.gz', 't10k-images-idx3-ubyte.gz'])


def brute_force_knn(train_f, train_y, test_f, k, T, C):
    "Independent reference: explicit cosine, full sort, python sums."
    scores = []
    for q in test_f.tolist():
        sims = []
        for f, y in zip(train_f.tolist(), train_y.tolist()):
            dot = sum(a * b for a, b in zip(q, f))
            nq, nf = sum(a * a for a in q) ** .5, sum(b * b for b in f) ** .5
            sims.append((dot / (nq * nf), y))
        sims.sort(key=lambda t: -t[0])
        s = [0.0] * C
        for sim, y in sims[:k]: s[y] += torch.tensor(sim / T).exp().item()
        scores.append(s)
    return torch.tensor(scores)


@pytest.mark.parametrize('k,T,chunk', [(1, 0.07, 5), (5, 0.1, 64), (20, 0.07, 3), (100, 0.5, 1000)])
def test_knn_equals_brute_force(k, T, chunk):
    g = torch.Generator().manual_seed(k)
    trf, trl = torch.randn(60, 8, generator=g, dtype=torch.float64), torch.randint(0, 4, (60,), generator=g)
    tef = torch.randn(13, 8, generator=g, dtype=torch.float64)
    ref = brute_force_knn(trf, trl, tef, min(k, 60), T, 4)
    torch.testing.assert_close(knn_predict(trf, trl, tef, k, T, 4, chunk), ref.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(knn_predict_naive(trf, trl, tef, k, T, 4), ref.float(), rtol=1e-4, atol=1e-4)


def test_knn_exact_tiny():
    # two training points per class on the unit circle; a query next to class 1 points
    trf = torch.tensor([[1., 0.], [0.9, 0.1], [0., 1.], [0.1, 0.9]])
    trl = torch.tensor([0, 0, 1, 1])
    q = torch.tensor([[0.05, 1.]])
    top1, top5 = knn_accuracy(trf, trl, q, torch.tensor([1]), k=2, T=1.0)
    assert (top1, top5) == (100.0, 100.0)
    s = knn_predict(trf, trl, q, k=2, T=1.0)
    assert s[0, 0] == 0 and s[0, 1] > 0  # only the two class-1 neighbours voted
    assert knn_accuracy(trf, trl, q, torch.tensor([0]), k=2, T=1.0)[0] == 0.0


def test_topk_accuracy_values():
    scores = torch.tensor([[.1, .5, .4, 0, 0, 0], [.6, .3, .1, 0, 0, 0], [0, 0, 0, 0, 0, 1.]])
    assert topk_accuracy(scores, torch.tensor([2, 0, 1]), ks=(1, 2)) == pytest.approx((100 / 3, 200 / 3))


def test_knn_invariant_to_feature_scale():
    g = torch.Generator().manual_seed(1)
    trf, trl = torch.randn(50, 6, generator=g), torch.randint(0, 3, (50,), generator=g)
    tef = torch.randn(9, 6, generator=g)
    torch.testing.assert_close(knn_predict(trf * 7.5, trl, tef * 0.01), knn_predict(trf, trl, tef), rtol=1e-5, atol=0)


def test_knn_rejects_mismatch():
    labels = lambda n: torch.zeros(n, dtype=torch.long)
    with pytest.raises(ValueError, match='dim'): knn_predict(torch.randn(5, 3), labels(5), torch.randn(2, 4))
    with pytest.raises(ValueError, match='labels'): knn_predict(torch.randn(5, 3), labels(4), torch.randn(2, 3))


def test_extract_features_eval_mode_and_batches():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5))
    x = torch.randint(0, 256, (37, 1, 6, 6), dtype=torch.uint8)
    net(torch.randn(2, 1, 6, 6)); net.train()
    f1 = extract_features(net, x, (0.3,), (0.2,), batch_size=5)
    f2 = extract_features(net, x, (0.3,), (0.2,), batch_size=64)
    assert net.training and f1.shape == (37, 5) and f1.dtype == torch.float32
    torch.testing.assert_close(f1, f2)  # eval-mode BN: a sample's feature does not depend on its batch


def test_extract_features_rejects_non_flat():
    with pytest.raises(ValueError, match='batch, dim'):
        extract_features(nn.Conv2d(1, 2, 1), torch.zeros(2, 1, 4, 4, dtype=torch.uint8), (0.,), (1.,))


def test_linear_probe_learns_and_repeats():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 10, generator=g) * 3
    y = torch.randint(0, 4, (800,), generator=g)
    f = centers[y] + torch.randn(800, 10, generator=g) + 100  # a large offset: standardisation must handle it
    cfg = LinearProbeConfig(epochs=20, batch_size=32, lr=3e-3)
    acc = linear_probe(f[:600], y[:600], f[600:], y[600:], cfg)
    assert acc[0] > 90 and acc[1] == 100.0
    assert acc == linear_probe(f[:600], y[:600], f[600:], y[600:], cfg)
    # random labels cannot be predicted: close to chance
    yr = torch.randint(0, 4, (800,), generator=g)
    assert linear_probe(f[:600], yr[:600], f[600:], yr[600:], cfg)[0] < 45


def test_evaluate_backbone_keys():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 4, 4), dtype=torch.uint8, generator=g)
    y = (x.float().mean((1, 2, 3)) > 127).long()
    d = ImageData(x, y, ['dark', 'light'], (0.5,), (0.25,))
    res = evaluate_backbone(nn.Sequential(nn.Flatten(), nn.Linear(16, 16)), d, d, k=3,
                            probe=LinearProbeConfig(epochs=2, batch_size=16))
    assert {'knn_top1', 'knn_top5', 'linear_top1', 'linear_top5', 'k', 'T'} <= set(res)
    assert res['knn_top5'] == 100.0  # two classes: top-5 always holds


@pytest.mark.skipif(not has_fmnist, reason='Fashion-MNIST files absent (apt-get install dataset-fashion-mnist)')
def test_raw_pixel_knn_fashion_mnist():
    from sslkd.data import load_fashion_mnist
    train, test = load_fashion_mnist('train'), load_fashion_mnist('test')
    flat = lambda d: d.x.flatten(1).float() / 255
    mu = flat(train).mean(0)
    top1, top5 = knn_accuracy(flat(train) - mu, train.y, flat(test) - mu, test.y, k=20, T=0.07)
    assert abs(top1 - 86.05) <= 0.3, top1
    assert top5 > 98
