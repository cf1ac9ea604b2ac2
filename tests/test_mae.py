import math
import pytest, torch, torch.nn as nn
from sslkd.mae import (MAE, MAEConfig, MAEDecoder, PooledViT, n_visible, random_masking, encode_visible,
                       encode_visible_naive, gather_tokens, mae_loss, mae_loss_naive, norm_pix, unpatchify,
                       sincos_pos_embed, mae_view)
from sslkd.vit import vit_nano, patchify
from sslkd.resnet import small_cnn
from sslkd.metrics import collapse_warning

pytestmark = pytest.mark.filterwarnings('ignore:ViT with img_size')
MEAN, STD = (0.286,), (0.353,)


def tiny_vit(img=16, p=4, c=1, **kw):
    return vit_nano(img, p, c, depth=2, embed_dim=32, num_heads=2, **kw)


@pytest.mark.parametrize('N,ratio', [(49, 0.75), (49, 0.5), (64, 0.75), (16, 0.9), (16, 0.05), (10, 0.25)])
def test_masking_counts_distinct_and_consistent(N, ratio):
    g = torch.Generator().manual_seed(N)
    ids, mask = random_masking(7, N, ratio, g)
    k = min(max(round(N * (1 - ratio)), 1), N - 1)
    assert n_visible(N, ratio) == k
    assert ids.shape == (7, k) and mask.shape == (7, N) and mask.dtype == torch.bool
    assert (mask.sum(1) == N - k).all()
    for row, m in zip(ids, mask):
        assert len(set(row.tolist())) == k                       # distinct
        assert row.tolist() == sorted(row.tolist())              # raster order
        assert set(row.tolist()) == set((~m).nonzero().flatten().tolist())


def test_masking_exact_count_at_75_percent_on_7x7():
    ids, mask = random_masking(3, 49, 0.75, torch.Generator().manual_seed(0))
    assert ids.shape == (3, 12) and mask.sum(1).tolist() == [37, 37, 37]


def test_masking_seeded_repeatable_and_varies():
    a = random_masking(5, 49, 0.75, torch.Generator().manual_seed(3))
    b = random_masking(5, 49, 0.75, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = random_masking(5, 49, 0.75, torch.Generator().manual_seed(4))
    assert not torch.equal(a[1], c[1])
    assert len({tuple(r.tolist()) for r in a[0]}) == 5          # different images get different masks


def test_masking_is_uniform_over_patches():
    _, mask = random_masking(4000, 49, 0.75, torch.Generator().manual_seed(0))
    freq = (~mask).float().mean(0)                               # how often each patch stays visible
    assert torch.allclose(freq, torch.full((49,), 12 / 49), atol=0.03)


@pytest.mark.parametrize('ratio', [0., 1., -0.1, 1.5])
def test_bad_mask_ratio(ratio):
    with pytest.raises(ValueError, match='strictly between 0 and 1'): random_masking(2, 49, ratio, torch.Generator())
    with pytest.raises(ValueError, match='strictly between 0 and 1'):
        MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(mask_ratio=ratio))


@pytest.mark.parametrize('img,p', [(16, 4), (28, 4), (12, 2)])
def test_batched_encoder_equals_per_image_reference(img, p):
    torch.manual_seed(0)
    vit = tiny_vit(img, p, 3).double()
    x = torch.randn(4, 3, img, img, dtype=torch.float64)
    N = (img // p) ** 2
    ids, _ = random_masking(4, N, 0.75, torch.Generator().manual_seed(1))
    fast, ref = encode_visible(vit, x, ids), encode_visible_naive(vit, x, ids)
    assert fast.shape == (4, 1 + ids.shape[1], 32)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    # unsorted indices: the same tokens in another order give the same tokens, permuted
    perm = torch.randperm(ids.shape[1])
    torch.testing.assert_close(encode_visible(vit, x, ids[:, perm])[:, 1:], fast[:, 1:][:, perm], rtol=1e-10,
                               atol=1e-10)
    # all patches kept: the ViT's own forward
    every = torch.arange(N).expand(4, -1)
    torch.testing.assert_close(encode_visible(vit, x, every), vit.forward_features(x), rtol=1e-12, atol=1e-12)


def test_encoder_ignores_masked_pixels():
    torch.manual_seed(0)
    vit = tiny_vit().double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    ids, mask = random_masking(2, 16, 0.75, torch.Generator().manual_seed(0))
    y = patchify(x, 4)
    y[mask] = torch.randn(int(mask.sum()), 16, dtype=torch.float64)
    torch.testing.assert_close(encode_visible(vit, unpatchify(y, 4), ids), encode_visible(vit, x, ids))


def test_loss_vectorised_equals_naive_and_hand_value():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(3, 16, 12, generator=g, dtype=torch.float64)
    target = torch.rand(3, 16, 12, generator=g, dtype=torch.float64)
    _, mask = random_masking(3, 16, 0.6, g)
    for npl in (True, False):
        torch.testing.assert_close(mae_loss(pred, target, mask, npl), mae_loss_naive(pred, target, mask, npl),
                                   rtol=1e-12, atol=1e-12)
    # by hand: one masked patch, no normalisation
    p = torch.zeros(1, 2, 4, dtype=torch.float64)
    t = torch.tensor([[[1., 2., 3., 4.], [9., 9., 9., 9.]]], dtype=torch.float64)
    m = torch.tensor([[True, False]])
    assert mae_loss(p, t, m, norm_pix_loss=False).item() == pytest.approx((1 + 4 + 9 + 16) / 4)
    # with norm_pix: [1,2,3,4] -> (t - 2.5) / sqrt(5/3 + eps): mean of squares = 3 var_biased / (var_unbiased + eps)
    assert mae_loss(p, t, m).item() == pytest.approx(1.25 / (5 / 3 + 1e-6), rel=1e-12)


def test_loss_depends_on_masked_patches_only():
    g = torch.Generator().manual_seed(1)
    pred = torch.randn(4, 16, 16, generator=g, requires_grad=True)
    target = torch.rand(4, 16, 16, generator=g)
    _, mask = random_masking(4, 16, 0.75, g)
    for npl in (True, False):
        loss = mae_loss(pred, target, mask, npl)
        changed = target.clone(); changed[~mask] = torch.rand(int((~mask).sum()), 16, generator=g) * 5
        assert mae_loss(pred, changed, mask, npl).item() == loss.item()
        pv = pred.detach().clone(); pv[~mask] += 3.
        assert mae_loss(pv, target, mask, npl).item() == loss.item()
        changed = target.clone(); changed[mask] = torch.rand(int(mask.sum()), 16, generator=g)
        assert mae_loss(pred, changed, mask, npl).item() != loss.item()
        grad, = torch.autograd.grad(loss, pred)
        assert (grad[~mask] == 0).all() and (grad[mask] != 0).all()


def test_method_loss_ignores_visible_target_pixels():
    "The method's loss on a batch equals the loss computed with other target pixels at the visible patches."
    torch.manual_seed(0)
    m = MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(augment='none', decoder_dim=32, decoder_heads=2)).double()
    x = torch.rand(3, 1, 16, 16, dtype=torch.float64)
    v = m.augment(x, torch.Generator())
    loss, pred, mask = m.masked_loss(v, torch.Generator().manual_seed(2))
    t = patchify(v, 4); t[~mask] = 7.
    assert mae_loss(pred, t, mask).item() == pytest.approx(loss.item(), rel=1e-12)


def test_norm_pix_targets_are_standardised():
    x = patchify(torch.rand(5, 3, 16, 16, dtype=torch.float64), 4)
    for eps in (0., 1e-6):
        t = norm_pix(x, eps)
        torch.testing.assert_close(t.mean(-1), torch.zeros(5, 16, dtype=torch.float64), atol=1e-12, rtol=0)
        v = x.var(-1)
        torch.testing.assert_close(t.var(-1), v / (v + eps), atol=1e-12, rtol=0)   # exactly 1 at eps=0
    flat = torch.full((1, 2, 16), 0.3, dtype=torch.float64)
    assert torch.equal(norm_pix(flat), torch.zeros_like(flat))
    # invariant to the brightness and contrast of a patch
    x = torch.rand(2, 4, 16, dtype=torch.float64)
    torch.testing.assert_close(norm_pix(3 * x + 1, eps=0), norm_pix(x, eps=0))


def test_unpatchify_inverts_patchify():
    x = torch.randn(2, 3, 8, 12)
    assert torch.equal(unpatchify(patchify(x, 4), 4, (2, 3)), x)
    y = torch.randn(2, 1, 28, 28)
    assert torch.equal(unpatchify(patchify(y, 4), 4), y)
    with pytest.raises(ValueError, match='grid'): unpatchify(patchify(x, 4), 4)


def test_decoder_places_tokens_and_positions():
    dec = MAEDecoder(32, (4, 4), 16, dim=32, depth=1, num_heads=2)
    lat = torch.randn(3, 5, 32)
    ids, mask = random_masking(3, 16, 0.75, torch.Generator().manual_seed(0))
    seen = []
    h = dec.blocks[0].register_forward_pre_hook(lambda mod, a: seen.append(a[0]))
    out = dec(lat, ids); h.remove()
    assert out.shape == (3, 16, 16)
    placed = seen[0] - dec.pos_embed
    torch.testing.assert_close(placed[:, 0], dec.embed(lat)[:, 0])
    torch.testing.assert_close(gather_tokens(placed[:, 1:], ids), dec.embed(lat)[:, 1:])
    torch.testing.assert_close(placed[:, 1:][mask], dec.mask_token[0].expand(int(mask.sum()), -1))
    pe = sincos_pos_embed(32, (4, 4))[0, 1:]
    assert (torch.cdist(pe, pe) + torch.eye(16) > 1e-3).all()
    assert 'pos_embed' not in dec.state_dict()
    with pytest.raises(ValueError, match='divisible by 4'): sincos_pos_embed(30, (4, 4))
    with pytest.raises(ValueError, match='decoder_heads'): MAEDecoder(32, (4, 4), 16, dim=32, num_heads=3)


def synthetic_images(n=16, size=16, seed=0):
    "Bars and blobs: images with structure a decoder can learn to fill in."
    g = torch.Generator().manual_seed(seed)
    r = torch.arange(size, dtype=torch.float32)
    yy, xx = torch.meshgrid(r, r, indexing='ij')
    scale, shift = torch.tensor([size, size, 4.]).view(3, 1, 1, 1), torch.tensor([0, 0, 2.]).view(3, 1, 1, 1)
    cy, cx, w = (torch.rand(3, n, 1, 1, generator=g) * scale + shift)
    img = torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w ** 2))
    bars = (torch.sin(xx / (1 + w)) > 0).float() * (torch.rand(n, 1, 1, generator=g) > 0.5)
    return ((0.7 * img + 0.3 * bars).clamp(0, 1) * 255).to(torch.uint8)[:, None]


def test_loss_goes_down_on_tiny_synthetic_set():
    torch.manual_seed(0)
    m = MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(decoder_dim=32, decoder_heads=2))
    x = synthetic_images()
    opt = torch.optim.AdamW(m.student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(25):
        loss, _ = m.training_step(x, g, step, 25)
        opt.zero_grad(); loss.backward(); m.after_backward(step, 25, 1); opt.step(); m.after_step(step, 25)
        losses.append(loss.item())
    assert all(math.isfinite(l) for l in losses)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses


def test_training_step_logs_signals_and_fp32_under_autocast():
    torch.manual_seed(0)
    m = MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(decoder_dim=32, decoder_heads=2))
    x = synthetic_images(8)
    loss, logs = m.training_step(x, torch.Generator().manual_seed(0), 0, 10, log=True)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert set(logs) >= {'loss', 'mask_ratio', 'feature_std', 'effective_rank'}
    assert logs['loss'] == pytest.approx(loss.item()) and logs['mask_ratio'] == pytest.approx(12 / 16)
    # the yardstick: the same batch and masks with a decoder that predicts 0 (the view is drawn first, then the mask)
    g = torch.Generator().manual_seed(0)
    v = m.augment(x, g)
    _, pred, mask = m.masked_loss(v, g)
    assert logs['loss_predict_zero'] == pytest.approx(mae_loss(torch.zeros_like(pred), patchify(v, 4), mask).item(),
                                                      rel=1e-6)
    assert logs['effective_rank'] > 1.5 and logs['feature_std'] > 1e-4
    assert collapse_warning(logs) is None
    assert m.training_step(x, torch.Generator(), 0, 10)[1] == {}
    with torch.autocast('cpu', dtype=torch.bfloat16):
        loss, _ = m.training_step(x, torch.Generator().manual_seed(0), 0, 10)
    assert loss.dtype == torch.float32


def test_collapsed_encoder_triggers_the_warning():
    torch.manual_seed(0)
    m = MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(decoder_dim=32, decoder_heads=2))
    with torch.no_grad(): m.student.backbone.norm.weight.zero_()    # every feature equals the norm's bias
    _, logs = m.training_step(synthetic_images(8), torch.Generator().manual_seed(0), 0, 10, log=True)
    assert 'dimensional collapse' in collapse_warning(logs)


def test_state_dict_round_trip():
    torch.manual_seed(0)
    cfg = MAEConfig(decoder_dim=32, decoder_heads=2, decoder_depth=2)
    a = MAE(tiny_vit(), 16, 1, MEAN, STD, cfg)
    x = synthetic_images(8)
    opt = torch.optim.AdamW(a.student.parameters(), lr=1e-3)
    loss, _ = a.training_step(x, torch.Generator().manual_seed(0), 0, 10)
    opt.zero_grad(); loss.backward(); opt.step()
    torch.manual_seed(1)
    b = MAE(tiny_vit(), 16, 1, MEAN, STD, cfg)
    la = a.training_step(x, torch.Generator().manual_seed(5), 1, 10)[0]
    assert b.training_step(x, torch.Generator().manual_seed(5), 1, 10)[0].item() != la.item()
    b.load_state_dict(a.state_dict())
    assert b.training_step(x, torch.Generator().manual_seed(5), 1, 10)[0].item() == la.item()
    assert set(a.state_dict()) == set(a.student.state_dict(prefix='student.'))    # all state is the student's
    assert not any('pos_embed' in k and 'decoder' in k for k in a.state_dict())


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    m = MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(decoder_dim=32, decoder_heads=2))
    loss, _ = m.training_step(synthetic_images(8), torch.Generator().manual_seed(0), 0, 10)
    loss.backward()
    missing = [n for n, p in m.student.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_eval_backbone_pools():
    torch.manual_seed(0)
    vit = tiny_vit()
    x = torch.randn(3, 1, 16, 16)
    for pool, ref in (('mean', vit.forward_features(x)[:, 1:].mean(1)), ('cls', vit(x))):
        m = MAE(vit, 16, 1, MEAN, STD, MAEConfig(decoder_dim=32, decoder_heads=2, eval_pool=pool))
        bb = m.eval_backbone()
        assert bb.embed_dim == 32 and bb(x).shape == (3, 32)
        torch.testing.assert_close(bb(x), ref)
        assert all(p is q for p, q in zip(bb.parameters(), vit.parameters()))    # a view, not a copy
    # the evaluator switches the wrapper to eval and back: the ViT must end in the mode it started in
    from sslkd.evaluate import extract_features
    for mode in (False, True):
        vit.train(mode)
        f = extract_features(m.eval_backbone(), (x.clamp(0, 1) * 255).to(torch.uint8), MEAN, STD)
        assert f.shape == (3, 32) and vit.training == mode


def test_reconstruct_shapes_and_visible_patches_pasted():
    torch.manual_seed(0)
    m = MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(decoder_dim=32, decoder_heads=2))
    x = synthetic_images(4)
    masked, recon, orig = m.reconstruct(x, torch.Generator().manual_seed(0))
    _, mask = random_masking(4, 16, 0.75, torch.Generator().manual_seed(0))
    assert masked.shape == recon.shape == orig.shape == (4, 1, 16, 16)
    torch.testing.assert_close(orig, x.float() / 255)
    pm, pr, po = (patchify(t, 4) for t in (masked, recon, orig))
    assert torch.equal(pr[~mask], po[~mask]) and torch.equal(pm[~mask], po[~mask])
    assert (pm[mask] == 0.5).all() and not torch.equal(pr[mask], po[mask])
    assert recon.min() >= 0 and recon.max() <= 1
    assert m.training                                                   # mode restored


def test_bad_config_and_backbone():
    with pytest.raises(ValueError, match='needs an sslkd ViT'): MAE(small_cnn(1), 28, 1, MEAN, STD)
    with pytest.raises(ValueError, match='eval_pool'): MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(eval_pool='max'))
    with pytest.raises(ValueError, match='unknown augment'):
        MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(augment='strong'))
    with pytest.raises(ValueError, match='multiple of'): MAE(tiny_vit(), 18, 1, MEAN, STD)
    with pytest.raises(ValueError, match='in_chans'): MAE(tiny_vit(), 16, 3, MEAN * 3, STD * 3)
    with pytest.raises(ValueError, match='divisible by 4'):
        MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(decoder_dim=30, decoder_heads=2))
    m = MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(decoder_dim=32, decoder_heads=2, augment='none'))
    with pytest.raises(ValueError, match='built for 16 px'):
        m.training_step(torch.zeros(2, 1, 20, 20, dtype=torch.uint8), torch.Generator(), 0, 1)


def test_augment_views():
    spec = mae_view('mae', 28, 1)
    assert spec.size == 28 and spec.scale == (0.5, 1.) and spec.flip_p == 0.5
    assert spec.jitter_p == 0 and spec.blur_p == 0
    assert mae_view('mae', 28, 1, scale=(0.8, 1.)).scale == (0.8, 1.)
    assert mae_view('none', 28, 1) is None
    assert mae_view('moco', 32, 3).size == 32
    m = MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(decoder_dim=32, decoder_heads=2))
    x = synthetic_images(6)
    a, b = m.augment(x, torch.Generator().manual_seed(0)), m.augment(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (6, 1, 16, 16) and a.dtype == torch.float32


def test_runs_in_the_trainer(tmp_path):
    from sslkd.train import fit, TrainConfig
    from sslkd.data import ImageData
    torch.manual_seed(0)
    data = ImageData(synthetic_images(64), torch.zeros(64, dtype=torch.long), ['a'], MEAN, STD)
    m = MAE(tiny_vit(), 16, 1, MEAN, STD, MAEConfig(decoder_dim=32, decoder_heads=2))
    res = fit(m, data, TrainConfig(epochs=1, batch_size=32, log_every=1, progress=False, device='cpu'), out=tmp_path)
    assert res['steps'] == 2
    logs = [l for l in (tmp_path / 'metrics.jsonl').read_text().splitlines() if '"feature_std"' in l]
    assert len(logs) == 2
