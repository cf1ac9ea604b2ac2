import warnings
import pytest
import torch
import torch.nn as nn

from sslkd.vit import (patchify, drop_path, PatchEmbed, interpolate_pos_embed, naive_attention, Attention, ViT,
                       vit_nano, vit_tiny, vit_small, vit_base, vit_archs, vit_configs, num_params, check_tokens)


def assert_eq(a, b):
    "Exact equality (tensors: same shape and values); usable on tensors that require grad."
    if isinstance(a, torch.Tensor): assert a.shape == b.shape and torch.equal(a.detach(), b.detach()), (a, b)
    elif isinstance(a, torch.Size): assert tuple(a) == tuple(b), (a, b)
    else: assert a == b, (a, b)


def assert_close(a, b, eps=1e-5):
    torch.testing.assert_close(a.detach(), b.detach(), atol=eps, rtol=0)


def small_vit(img_size=28, in_chans=1, patch_size=4, **kw):
    torch.manual_seed(0)
    kw = {**dict(embed_dim=32, depth=2, num_heads=4), **kw}
    return ViT(img_size=img_size, patch_size=patch_size, in_chans=in_chans, **kw)


def test_patchify_exact():
    img = torch.arange(2 * 4 * 4.).reshape(1, 2, 4, 4)
    p = patchify(img, 2)
    assert_eq(p.shape, (1, 4, 8))
    # first patch: channel 0 top-left block, then channel 1 top-left block
    assert_eq(p[0, 0], torch.tensor([0., 1., 4., 5., 16., 17., 20., 21.]))
    assert_eq(p[0, 1], torch.tensor([2., 3., 6., 7., 18., 19., 22., 23.]))
    assert_eq(p[0, 2], torch.tensor([8., 9., 12., 13., 24., 25., 28., 29.]))
    with pytest.raises(ValueError, match='not a multiple of patch size 4'):
        patchify(torch.randn(1, 1, 14, 14), 4)


@pytest.mark.parametrize('in_chans,size', [(1, 28), (3, 32)])
def test_patch_embed_is_linear_on_patchify(in_chans, size):
    torch.manual_seed(0)
    pe = PatchEmbed(4, in_chans, 24)
    x = torch.randn(3, in_chans, size, size)
    lin = nn.Linear(in_chans * 16, 24)
    with torch.no_grad():
        lin.weight.copy_(pe.proj.weight.reshape(24, -1)); lin.bias.copy_(pe.proj.bias)
    assert_close(pe(x), lin(patchify(x, 4)), eps=1e-5)


@pytest.mark.parametrize('in_chans,size', [(1, 28), (3, 32), (1, 32), (3, 28)])
def test_shapes(in_chans, size):
    m = vit_nano(img_size=size, patch_size=4, in_chans=in_chans).eval()
    x = torch.randn(2, in_chans, size, size)
    n = (size // 4) ** 2
    tok = m.forward_features(x)
    assert_eq(tok.shape, (2, 1 + n, m.embed_dim))
    assert_eq(m(x).shape, (2, m.embed_dim))
    assert_eq(m(x), tok[:, 0])
    assert_eq(m.num_patches, n)
    # attributes other modules rely on
    assert_eq((m.patch_size, m.num_heads, m.depth, m.embed_dim),
            (4, vit_configs['nano']['num_heads'], vit_configs['nano']['depth'], vit_configs['nano']['embed_dim']))


def test_naive_attention_matches_sdpa_float64():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 4, 7, 8, dtype=torch.float64).unbind(0)
    out, w = naive_attention(q, k, v)
    assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), eps=1e-12)
    # exact values on a tiny case: equal keys -> uniform weights -> mean of values
    qq = torch.randn(1, 1, 3, 4, dtype=torch.float64); kk = torch.ones(1, 1, 3, 4, dtype=torch.float64)
    vv = torch.arange(12.).reshape(1, 1, 3, 4).double()
    o, ww = naive_attention(qq, kk, vv)
    assert_close(ww, torch.full((1, 1, 3, 3), 1 / 3, dtype=torch.float64), eps=1e-14)
    assert_close(o, vv.mean(2, keepdim=True).expand(-1, -1, 3, -1), eps=1e-12)


@pytest.mark.parametrize('dtype,eps', [(torch.float32, 1e-5), (torch.float64, 1e-12)])
def test_model_sdpa_path_equals_naive_path(dtype, eps):
    m = small_vit().to(dtype).eval()
    x = torch.randn(2, 1, 28, 28, dtype=dtype)
    fused = m.forward_features(x)
    naive, attns = m.forward_features(x, return_attn=True)
    assert_close(fused, naive, eps=eps)
    att = Attention(32, 4).to(dtype)
    t = torch.randn(2, 9, 32, dtype=dtype)
    assert_close(att(t), att(t, return_attn=True)[0], eps=eps)


def test_attention_maps_shape_and_rows_sum_to_one():
    m = small_vit(img_size=32, in_chans=3).eval()
    maps = m.attention_maps(torch.randn(2, 3, 32, 32))
    assert_eq(len(maps), m.depth)
    for a in maps:
        assert_eq(a.shape, (2, m.num_heads, 65, 65))
        assert (a >= 0).all()
        assert_close(a.sum(-1), torch.ones(2, m.num_heads, 65), eps=1e-5)
    # local crop: maps follow the input's token count
    assert_eq(m.attention_maps(torch.randn(1, 3, 16, 16))[-1].shape, (1, m.num_heads, 17, 17))


def test_pos_embed_interpolation():
    m = small_vit(img_size=28, patch_size=4)
    pos = m.pos_embed
    # exact identity (the parameter itself) at the training grid
    assert interpolate_pos_embed(pos, m.grid, (7, 7)) is pos
    x = torch.randn(2, 1, 28, 28)
    assert_eq(m.prepare_tokens(x), torch.cat([m.cls_token.expand(2, -1, -1), m.patch_embed(x)], 1) + pos)
    # 16 px local crop, patch 4: 4x4 grid
    p16 = interpolate_pos_embed(pos, (7, 7), (4, 4))
    assert_eq(p16.shape, (1, 17, 32)); assert_eq(p16[:, 0], pos[:, 0])
    assert_eq(m.forward_features(torch.randn(2, 1, 16, 16)).shape, (2, 17, 32))
    # 14 px local crop needs a patch size dividing 14: patch 2 (28 px -> 14x14 grid, 14 px -> 7x7)
    m2 = small_vit(img_size=28, patch_size=2)
    p14 = interpolate_pos_embed(m2.pos_embed, (14, 14), (7, 7))
    assert_eq(p14.shape, (1, 1 + 49, 32)); assert_eq(p14[:, 0], m2.pos_embed[:, 0])
    assert_eq(m2.forward_features(torch.randn(2, 1, 14, 14)).shape, (2, 50, 32))
    # non-square grid
    assert_eq(m.forward_features(torch.randn(1, 1, 16, 28)).shape, (1, 1 + 4 * 7, 32))
    # bicubic resize preserves a constant field, and downsizing a smooth (linear) ramp keeps it monotone
    ramp = torch.arange(7.).view(1, 7, 1, 1).expand(1, 7, 7, 3).reshape(1, 49, 3)
    pe = torch.cat([torch.zeros(1, 1, 3), ramp], 1)
    r = interpolate_pos_embed(pe, (7, 7), (4, 4))[0, 1:, 0].reshape(4, 4)
    assert (r[1:] > r[:-1]).all() and torch.allclose(r[:, :1], r)


def test_pos_embed_interpolation_is_dino_bicubic():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 8 * 8, 6)
    grid_img = pos[:, 1:].reshape(1, 8, 8, 6).permute(0, 3, 1, 2)  # (1, D, 8, 8)
    ref = torch.nn.functional.interpolate(grid_img, size=(4, 4), mode='bicubic', align_corners=False)
    ref = torch.cat([pos[:, :1], ref.permute(0, 2, 3, 1).reshape(1, 16, 6)], 1)
    assert_close(interpolate_pos_embed(pos, (8, 8), (4, 4)), ref, eps=1e-6)
    bilinear = torch.nn.functional.interpolate(grid_img, size=(4, 4), mode='bilinear', align_corners=False)
    assert not torch.allclose(ref[:, 1:], bilinear.permute(0, 2, 3, 1).reshape(1, 16, 6), atol=1e-3)


def test_drop_path_exact():
    x = torch.ones(1000, 3, 2)
    torch.manual_seed(0)
    y = drop_path(x, 0.25, training=True)
    per_sample = y[:, 0, 0]
    assert ((per_sample == 0) | (per_sample == 1 / 0.75)).all()       # whole samples kept (rescaled) or dropped
    assert_eq(y, per_sample.view(-1, 1, 1).expand_as(y))
    assert 0.2 < (per_sample == 0).float().mean() < 0.3
    assert_eq(drop_path(x, 0.25, training=False), x)


def test_pos_embed_follows_current_weights():
    m = small_vit().eval()
    x = torch.randn(1, 1, 16, 16)
    before = m(x)
    with torch.no_grad(): m.pos_embed.add_(1.)
    assert not torch.allclose(before, m(x))  # nothing cached


def test_forward_size_errors():
    m = small_vit()
    with pytest.raises(ValueError, match=r'14x14 is not a multiple of patch_size=4'):
        m(torch.randn(1, 1, 14, 14))
    with pytest.raises(ValueError, match=r'img_size=30 is not divisible by patch_size=4'):
        ViT(img_size=30, patch_size=4)


def test_mask_token():
    m = small_vit(use_mask_token=True).eval()
    with torch.no_grad(): m.mask_token.normal_()
    x = torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 49, dtype=torch.bool)
    mask[0, [0, 5, 48]] = True; mask[1, 10:20] = True
    plain, masked = m.prepare_tokens(x), m.prepare_tokens(x, mask)
    full = torch.cat([torch.zeros(2, 1, dtype=torch.bool), mask], 1)
    assert_eq(masked[~full], plain[~full])                      # unmasked positions (and CLS) untouched
    expect = (m.mask_token + m.pos_embed[0, 1:])[mask.nonzero()[:, 1]]
    assert_close(masked[full], expect, eps=1e-6)                # masked = mask_token + position
    assert not torch.allclose(m(x, mask), m(x))
    assert_eq(m(x, torch.zeros_like(mask)), m(x))               # empty mask = no mask
    with pytest.raises(ValueError, match='use_mask_token=True'):
        small_vit()(x, mask)
    with pytest.raises(ValueError, match='mask shape'):
        m(x, mask[:, :10])


def test_param_counts_match_timm():
    with torch.device('meta'):
        assert_eq(num_params(vit_tiny(img_size=224, patch_size=16, in_chans=3)), 5_524_416)
        assert_eq(num_params(vit_small(img_size=224, patch_size=16, in_chans=3)), 21_665_664)
        # mask token adds exactly embed_dim parameters
        assert_eq(num_params(vit_tiny(img_size=224, patch_size=16, use_mask_token=True)), 5_524_416 + 192)
        assert_eq(vit_base(img_size=224, patch_size=16).embed_dim, 768)


def test_token_warning():
    with pytest.warns(UserWarning, match=r'only 16 patch tokens.*~30% on CIFAR-10.*patch_size=4 gives 64'):
        with torch.device('meta'): vit_small(img_size=32, patch_size=8)
    with pytest.warns(UserWarning, match=r'only 4 patch tokens \(< 16\).*patch_size=4 gives 49'):
        check_tokens(28, 14)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with torch.device('meta'):
            vit_small(img_size=32, patch_size=4); vit_nano(img_size=28, patch_size=4, in_chans=1)
            check_tokens(24, 4)  # exactly 36 tokens: fine
            check_tokens(28, 7)  # 16 tokens on small centred images (Fashion-MNIST): fine


def test_gradients_flow():
    m = small_vit(use_mask_token=True)
    x = torch.randn(2, 1, 28, 28)
    mask = torch.zeros(2, 49, dtype=torch.bool); mask[:, :5] = True
    m.forward_features(x, mask).square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_eval_deterministic_and_drop_path():
    m = small_vit(drop_path_rate=0.5, depth=4)
    x = torch.randn(4, 1, 28, 28)
    m.eval()
    assert_eq(m(x), m(x))
    m.train()
    torch.manual_seed(1); a = m(x)
    torch.manual_seed(2); b = m(x)
    assert not torch.allclose(a, b)  # stochastic depth is active in training
    torch.manual_seed(1); assert_eq(m(x), a)


def test_registry_and_constructors():
    assert_eq(set(vit_archs), {'vit_nano', 'vit_tiny', 'vit_small', 'vit_base'})
    assert_eq(vit_configs['tiny'], dict(embed_dim=192, depth=12, num_heads=3))
    assert_eq(vit_configs['small'], dict(embed_dim=384, depth=12, num_heads=6))
    assert_eq(vit_configs['base'], dict(embed_dim=768, depth=12, num_heads=12))
    m = vit_nano(img_size=28, in_chans=1, depth=2)  # kw overrides the config
    assert_eq((m.depth, m.patch_size, m.img_size, m.in_chans), (2, 4, 28, 1))


def test_init():
    m = vit_tiny(img_size=32)
    assert_eq(m.blocks[0].norm1.weight, torch.ones(192)); assert_eq(m.blocks[0].attn.qkv.bias, torch.zeros(576))
    w = m.blocks[0].mlp.fc1.weight
    assert abs(w.std().item() - 0.02) < 0.002 and w.abs().max() < 0.2
    assert abs(m.pos_embed.std().item() - 0.02) < 0.003
