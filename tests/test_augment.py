"Tests for sslkd.augment: every batched op against a per-image reference with the same parameters, plus invariances."
import colorsys, math
from pathlib import Path
import pytest, torch, torch.nn.functional as F
from torch import Tensor
from sslkd.augment import *

DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
FASHION_DIR = Path('/usr/share/datasets/fashion-mnist')

def gen(seed): return torch.Generator().manual_seed(seed)
def batch(C, dtype=torch.float64, B=12, S=20, seed=0): return torch.rand(B, C, S, S, generator=gen(seed), dtype=dtype)
def close(a, b, dtype): torch.testing.assert_close(a, b, atol=TOL[dtype], rtol=0)
def stack_ref(fn, x, *per_image): return torch.stack([fn(x[i], *(p[i] for p in per_image)) for i in range(len(x))])

# ---------------------------------------------------------------- per-image references
# The textbook definitions, one image at a time (as in the augment chapter): the batched ops must match them
# given the same parameters. benchmarks/bench_augment.py times them as the per-image baseline.
def _ref_crop(img, box, size, flip=False):
    t, l, h, w = (int(v) for v in box)
    out = F.interpolate(img[None, :, t:t + h, l:l + w], size=(size, size), mode='bilinear', align_corners=False)[0]
    return out.flip(-1) if flip else out

def _ref_gray(img): return LUMA[0] * img[0] + LUMA[1] * img[1] + LUMA[2] * img[2] if img.shape[0] == 3 else img
def _ref_brightness(img, f): return (f * img).clamp(0, 1)
def _ref_contrast(img, f): return (f * img + (1 - f) * _ref_gray(img).mean()).clamp(0, 1)
def _ref_saturation(img, f): return img if img.shape[0] != 3 else (f * img + (1 - f) * _ref_gray(img)).clamp(0, 1)

def _ref_rgb2hsv(img):
    r, g, b = img
    maxc, minc = img.max(0).values, img.min(0).values
    eqc, cr = maxc == minc, maxc - minc
    s = cr / torch.where(eqc, torch.ones_like(maxc), maxc)
    crd = torch.where(eqc, torch.ones_like(maxc), cr)
    rc, gc, bc = (maxc - r) / crd, (maxc - g) / crd, (maxc - b) / crd
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    return torch.stack([torch.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0), s, maxc])

def _ref_hsv2rgb(hsv):
    h, s, v = hsv
    i = torch.floor(h * 6.0)
    f, i = h * 6.0 - i, i.long() % 6
    p, q, t = (v * (1 - s)).clamp(0, 1), (v * (1 - s * f)).clamp(0, 1), (v * (1 - s * (1 - f))).clamp(0, 1)
    cases = (v, q, p, p, t, v), (t, v, v, q, p, p), (p, p, t, v, v, q)  # R, G, B for each sixth of the hue circle
    table = torch.stack([torch.stack(c) for c in cases])  # (3,6,H,W)
    return table.gather(1, i[None, None].expand(3, 1, *i.shape))[:, 0]

def _ref_hue(img, f):
    if img.shape[0] != 3: return img
    hsv = _ref_rgb2hsv(img)
    return _ref_hsv2rgb(torch.stack([(hsv[0] + f) % 1.0, hsv[1], hsv[2]]))

_REF_JITTER = (_ref_brightness, _ref_contrast, _ref_saturation, _ref_hue)

def _ref_jitter(img, factors, order):
    for op in order.tolist(): img = _REF_JITTER[op](img, factors[op].item())
    return img

def _ref_blur(img, sigma, ksize):
    t = torch.linspace(-(ksize // 2), ksize // 2, ksize, dtype=img.dtype, device=img.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    r, C = ksize // 2, img.shape[0]
    k2 = (k[:, None] * k[None, :]).expand(C, 1, ksize, ksize)
    return F.conv2d(F.pad(img[None], (r, r, r, r), mode='reflect'), k2, groups=C)[0]

def _ref_solarize(img, threshold=0.5): return torch.where(img >= threshold, 1 - img, img)

def augment_one_image_reference(img:Tensor, p:ViewParams, spec:ViewSpec, i=0) -> Tensor:
    "Per-image reference: apply image `i`'s parameters in `p` to `img` (C,H,W), one op after another."
    x = _ref_crop(img, p.box[i].tolist(), spec.size, bool(p.flip[i]))
    if spec.jitter_p > 0 and p.jitter[i]: x = _ref_jitter(x, p.factors[i], p.order[i])
    if spec.gray_p > 0 and x.shape[0] == 3 and p.gray[i]: x = _ref_gray(x).expand_as(x)
    if spec.blur_p > 0 and p.blur[i]: x = _ref_blur(x, p.sigma[i].item(), blur_kernel_size(spec.blur_sigma[1]))
    if spec.solarize_p > 0 and p.solarize[i]: x = _ref_solarize(x)
    return x

# ---------------------------------------------------------------- normalize
def test_normalize_uint8_and_float():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)
    want = torch.tensor([[[[-1., 1.]], [[0., 2.]]]])
    torch.testing.assert_close(normalize(x, (0.5, 0.2), (0.5, 0.1)), want)
    torch.testing.assert_close(normalize(x.double() / 255, (0.5, 0.2), (0.5, 0.1)), want.double())
    torch.testing.assert_close(normalize(x[0], (0.5, 0.2), (0.5, 0.1)), want[0])  # a single (C,H,W) image
    assert normalize(x, (0.5, 0.2), (0.5, 0.1)).dtype == torch.float32

def test_normalize_errors():
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    with pytest.raises(ValueError, match='one per channel'): normalize(x, (0.5, 0.5), (1., 1.))
    with pytest.raises(TypeError, match='uint8 or float'): normalize(x.int(), (0.5,), (1.,))

# ---------------------------------------------------------------- crop boxes
def _torchvision_box(H, W, scale, ratio, ua, ur, u):
    "torchvision's RandomResizedCrop.get_params loop, fed the uniforms our sampler draws (same float32 arithmetic)."
    logr = (math.log(ratio[0]), math.log(ratio[1]))
    for k in range(len(ua)):
        target = H * W * (scale[0] + (scale[1] - scale[0]) * ua[k])
        aspect = torch.exp(logr[0] + (logr[1] - logr[0]) * ur[k])
        w, h = int(torch.round(torch.sqrt(target * aspect))), int(torch.round(torch.sqrt(target / aspect)))
        if 0 < w <= W and 0 < h <= H:
            return [int(u[0] * (H - h + 1)), int(u[1] * (W - w + 1)), h, w]
    in_ratio = W / H
    if in_ratio < min(ratio): w, h = W, int(round(W / min(ratio)))
    elif in_ratio > max(ratio): h, w = H, int(round(H * max(ratio)))
    else: w, h = W, H
    return [(H - h) // 2, (W - w) // 2, h, w]

@pytest.mark.parametrize('H,W,scale,ratio', [(28, 28, (0.08, 1.0), (3/4, 4/3)), (20, 32, (0.5, 1.0), (0.2, 5.0)),
                                             (28, 28, (0.9, 1.0), (2.0, 3.0)), (28, 28, (0.1, 0.4), (3/4, 4/3))])
def test_crop_boxes_follow_torchvision(H, W, scale, ratio):
    n = 300
    boxes = sample_crop_boxes(n, H, W, scale, ratio, gen(0))
    g = gen(0)  # replay the draws: areas (n,10), log-ratios (n,10), positions (n,2)
    ua, ur, u = torch.rand(n, 10, generator=g), torch.rand(n, 10, generator=g), torch.rand(n, 2, generator=g)
    want = torch.tensor([_torchvision_box(H, W, scale, ratio, ua[i], ur[i], u[i]) for i in range(n)], dtype=boxes.dtype)
    # Vectorised and scalar exp/sqrt may differ by one ulp (torch picks SIMD or scalar code by chunking, which
    # depends on the thread count), flipping a round() that sits on .5: allow a rare 1-px difference.
    diff = (boxes - want).abs()
    assert diff.max() <= 1 and (diff.sum(1) > 0).sum() <= n // 100, boxes[diff.sum(1) > 0]

def test_crop_boxes_in_range():
    boxes = sample_crop_boxes(2000, 100, 100, (0.3, 0.6), (0.5, 2.0), gen(1))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 100).all() and (left + w <= 100).all()
    area = h * w / 100**2
    assert area.min() > 0.3 - 0.03 and area.max() < 0.6 + 0.03 and area.max() - area.min() > 0.25
    assert (w / h).min() > 0.5 * 0.95 and (w / h).max() < 2.0 * 1.05
    assert len(boxes.unique(dim=0)) > 1500  # every image its own box

def test_crop_boxes_fallback_and_errors():
    # area >= 0.5 at ratio >= 10 needs a width >= 62 px: no try can fit (with scale down to 0.08, a thin 3 x 28 box
    # could, depending on the global RNG), so every image gets the central crop with the ratio clamped
    test = sample_crop_boxes(3, 28, 28, (0.5, 1.0), (10., 20.))
    assert test.tolist() == [[12., 0., 3., 28.]] * 3
    with pytest.raises(ValueError, match='scale'): sample_crop_boxes(3, 28, 28, (0.5, 1.5))
    with pytest.raises(ValueError, match='ratio'): sample_crop_boxes(3, 28, 28, ratio=(2., 1.))

# ---------------------------------------------------------------- crop and flip
@pytest.mark.parametrize('C', [1, 3])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('size', [10, 20, 33])
def test_resized_crop_matches_reference(C, dtype, size):
    x = batch(C, dtype)
    boxes = sample_crop_boxes(len(x), 20, 20, (0.05, 1.0), g=gen(2))
    flip = sample_coin(0.5, len(x), gen(3))
    assert 0 < flip.sum() < len(x)
    close(resized_crop(x, boxes, size, flip), stack_ref(_ref_crop, x, boxes, [size] * len(x), flip), dtype)

@pytest.mark.parametrize('dtype', DTYPES)
def test_crop_whole_image_is_identity(dtype):
    x = batch(3, dtype)
    close(random_resized_crop(x, 20, (1., 1.), (1., 1.), g=gen(0)), x, dtype)
    close(random_resized_crop(x, 20, (1., 1.), (1., 1.), flip_p=1., g=gen(0)), x.flip(-1), dtype)

def test_crop_non_square_input():
    x = torch.rand(4, 3, 20, 32, dtype=torch.float64)
    boxes = sample_crop_boxes(4, 20, 32, (0.2, 1.0), g=gen(4))
    close(resized_crop(x, boxes, 16), stack_ref(_ref_crop, x, boxes, [16] * 4), torch.float64)

def test_flip():
    x, flip = batch(3), sample_coin(0.5, 12, gen(5))
    assert torch.equal(hflip(hflip(x, flip), flip), x)
    assert torch.equal(hflip(x, flip)[flip], x[flip].flip(-1)) and torch.equal(hflip(x, flip)[~flip], x[~flip])
    assert torch.equal(random_hflip(x, 0., gen(0)), x) and torch.equal(random_hflip(x, 1., gen(0)), x.flip(-1))

# ---------------------------------------------------------------- colour
def test_gray_luma_weights():
    px = torch.eye(3, dtype=torch.float64)[None, :, :, None]  # pure R, G, B pixels, (1,3,3,1)
    torch.testing.assert_close(rgb_to_gray(px).flatten(), torch.tensor([0.2989, 0.587, 0.114], dtype=torch.float64))
    g = rgb_to_grayscale(batch(3))
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    x = batch(3)
    close(g[:, 0], 0.2989 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2], torch.float64)
    assert torch.equal(random_grayscale(batch(1), 1., gen(0)), batch(1))  # one channel: nothing to do
    out = random_grayscale(x, 0.5, gen(0))
    grey = (out[:, 0] == out[:, 1]).flatten(1).all(1) & (out[:, 1] == out[:, 2]).flatten(1).all(1)
    assert 0 < grey.sum() < 12 and torch.equal(out[~grey], x[~grey])

@pytest.mark.parametrize('C', [1, 3])
@pytest.mark.parametrize('dtype', DTYPES)
@pytest.mark.parametrize('op,ref', [(adjust_brightness, _ref_brightness), (adjust_contrast, _ref_contrast),
                                    (adjust_saturation, _ref_saturation)])
def test_blends_match_reference(C, dtype, op, ref):
    x, f = batch(C, dtype), sample_uniform(0., 2., 12, gen(6), dtype=dtype)
    close(op(x, f), stack_ref(ref, x, f.tolist()), dtype)
    assert op(x, f).min() >= 0 and op(x, f).max() <= 1

@pytest.mark.parametrize('C', [1, 3])
def test_factor_one_is_identity(C):
    x, one = batch(C), torch.ones(12)
    assert torch.equal(adjust_brightness(x, one), x)
    assert torch.equal(adjust_contrast(x, one), x)
    assert torch.equal(adjust_saturation(x, one), x)
    close(adjust_hue(x, torch.zeros(12)), x, torch.float64)

def test_brightness_contrast_values():
    x = torch.tensor([0.1, 0.3, 0.6, 0.8], dtype=torch.float64).view(1, 1, 2, 2)
    want = lambda *v: torch.tensor(v, dtype=torch.float64)
    torch.testing.assert_close(adjust_brightness(x, [2.0]).flatten(), want(0.2, 0.6, 1.0, 1.0))
    torch.testing.assert_close(adjust_contrast(x, [0.0]).flatten(), torch.full((4,), 0.45, dtype=torch.float64))
    torch.testing.assert_close(adjust_contrast(x, [2.0]).flatten(), want(0., 0.15, 0.75, 1.0))

def test_one_channel_colour_ops_are_noops():
    x = batch(1)
    assert torch.equal(adjust_saturation(x, torch.full((12,), 0.3)), x)
    assert torch.equal(adjust_hue(x, torch.full((12,), 0.3)), x)

def test_hsv_matches_colorsys():
    px = torch.rand(1, 3, 10, 10, generator=gen(7), dtype=torch.float64)
    px[0, :, 0, :4] = torch.tensor([[.5, .5, .5], [.2, .2, .9], [0., 0., 0.], [.9, .9, .1]]).T  # grey, ties, black
    hsv = rgb_to_hsv(px)
    want = [colorsys.rgb_to_hsv(*p) for p in px[0].permute(1, 2, 0).reshape(-1, 3).tolist()]
    torch.testing.assert_close(hsv[0].permute(1, 2, 0).reshape(-1, 3), torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(hsv_to_rgb(hsv), px)
    back = [colorsys.hsv_to_rgb(*p) for p in want]
    rgb = hsv_to_rgb(hsv)[0].permute(1, 2, 0).reshape(-1, 3)
    torch.testing.assert_close(rgb, torch.tensor(back, dtype=torch.float64))

def test_hue_values():
    rgb = torch.tensor([[1., 0., 0.], [0., 1., 0.], [0., 0., 1.]])[:, :, None, None]
    rotated = torch.tensor([[0., 1., 0.], [0., 0., 1.], [1., 0., 0.]])  # red -> green, green -> blue, blue -> red
    torch.testing.assert_close(adjust_hue(rgb, [1/3] * 3).flatten(1), rotated)
    torch.testing.assert_close(adjust_hue(rgb[:1], [0.5]).flatten(), torch.tensor([0., 1., 1.]))  # red -> cyan
    torch.testing.assert_close(adjust_hue(rgb[:1], [-1/6]).flatten(), torch.tensor([1., 0., 1.]))  # red -> magenta

@pytest.mark.parametrize('dtype', DTYPES)
def test_hue_matches_reference(dtype):
    x, f = batch(3, dtype), sample_uniform(-0.5, 0.5, 12, gen(8), dtype=dtype)
    close(adjust_hue(x, f), stack_ref(_ref_hue, x, f.tolist()), dtype)

@pytest.mark.parametrize('C', [1, 3])
@pytest.mark.parametrize('dtype', DTYPES)
def test_color_jitter_matches_sequential_reference(C, dtype):
    x = batch(C, dtype, B=64)
    factors, order = sample_jitter(64, 0.8, 0.8, 0.8, 0.5, gen(9), dtype=dtype)
    assert set(order.argsort(1)[:, 3].tolist()) == {0, 1, 2, 3}  # hue first, ..., hue last all occur
    assert len(order.unique(dim=0)) > 16
    close(color_jitter(x, factors, order), stack_ref(_ref_jitter, x, factors, order), dtype)

def test_color_jitter_order_matters():
    x = batch(3, B=2)
    f = torch.tensor([[1.5, 0.5, 1.8, 0.3]] * 2, dtype=torch.float64)
    order = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0]])
    out = color_jitter(x[:1].expand(2, -1, -1, -1), f, order)
    assert not torch.allclose(out[0], out[1], atol=1e-3)

def test_sample_jitter_ranges_and_errors():
    f, order = sample_jitter(4000, 0.4, 0.3, 1.5, 0.1, gen(10))
    assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 1].min() >= 0.7 and f[:, 1].max() <= 1.3
    assert f[:, 2].min() >= 0 and f[:, 2].max() <= 2.5 and f[:, 3].abs().max() <= 0.1
    assert torch.equal(order.sort(1).values, torch.arange(4).expand(4000, 4))
    with pytest.raises(ValueError, match='hue'): sample_jitter(4, hue=0.7)

def test_random_color_jitter():
    x = batch(3)
    assert torch.equal(random_color_jitter(x, p=0., g=gen(0)), x)
    out = random_color_jitter(x, p=0.5, g=gen(0))
    changed = (out != x).flatten(1).any(1)
    assert 0 < changed.sum() < 12

# ---------------------------------------------------------------- solarize and blur
def test_solarize_values():
    x = torch.tensor([0., 0.25, 0.375, 0.5, 0.75, 1.]).view(1, 1, 1, 6)  # exact in binary
    assert solarize(x).flatten().tolist() == [0., 0.25, 0.375, 0.5, 0.25, 0.]
    assert solarize(x, 0.375).flatten().tolist() == [0., 0.25, 0.625, 0.5, 0.25, 0.]  # the threshold itself flips
    xb = batch(3)
    assert torch.equal(solarize(xb), stack_ref(_ref_solarize, xb))
    assert torch.equal(solarize(xb[:2], torch.tensor([0.5, 2.0]))[1], xb[1])  # per-image threshold
    assert torch.equal(random_solarize(xb, 1., g=gen(0)), solarize(xb))
    assert torch.equal(random_solarize(xb, 0., g=gen(0)), xb)

@pytest.mark.parametrize('C', [1, 3])
@pytest.mark.parametrize('dtype', DTYPES)
def test_blur_matches_reference(C, dtype):
    x, sigma = batch(C, dtype), sample_uniform(0.1, 2.0, 12, gen(11), dtype=dtype)
    for ksize in (3, 7, 13):
        close(gaussian_blur(x, sigma, ksize), stack_ref(_ref_blur, x, sigma.tolist(), [ksize] * 12), dtype)

def test_blur_invariants():
    const = torch.full((3, 3, 14, 14), 0.37, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.3, 1.0, 2.0]), 13), const)
    x = batch(3)
    assert torch.equal(gaussian_blur(x, torch.zeros(12), 7), x)  # sigma 0: identity kernel
    y = gaussian_blur(x, torch.full((12,), 1.0), 7)
    torch.testing.assert_close(y.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=0.02, atol=0)  # mass kept up to the borders
    assert y.std() < 0.7 * x.std()  # and it does smooth noise
    k = gaussian_kernels(torch.tensor([0.5, 1.0, 2.0]), 9)
    torch.testing.assert_close(k.sum(1), torch.ones(3)) and torch.testing.assert_close(k, k.flip(1))
    with pytest.raises(ValueError, match='too wide'): gaussian_blur(torch.rand(2, 1, 6, 6), torch.ones(2), 13)
    assert blur_kernel_size(1.0) == 7 and blur_kernel_size(0.4375) == 5

def test_random_gaussian_blur():
    x = batch(1)
    assert torch.equal(random_gaussian_blur(x, (0.5, 1.0), p=0., g=gen(0)), x)
    out = random_gaussian_blur(x, (0.5, 1.0), p=0.5, g=gen(0))
    blurred = (out != x).flatten(1).any(1)
    assert 0 < blurred.sum() < 12 and torch.equal(out[~blurred], x[~blurred])

# ---------------------------------------------------------------- a whole view
SPEC = ViewSpec(16, scale=(0.1, 1.0), saturation=0.8, hue=0.4, jitter_p=0.7, gray_p=0.3, blur_p=0.5,
                blur_sigma=(0.1, 1.0), solarize_p=0.5)

@pytest.mark.parametrize('C', [1, 3])
@pytest.mark.parametrize('dtype', DTYPES)
def test_view_matches_per_image_reference(C, dtype):
    x = batch(C, dtype, B=32)
    p = sample_view_params(x, SPEC, gen(12))
    for name in ('flip', 'jitter', 'gray', 'blur', 'solarize'): assert 0 < getattr(p, name).sum() < 32, name
    out = apply_view(x, p, SPEC)
    assert out.dtype == dtype and out.shape == (32, C, 16, 16)
    close(out, torch.stack([augment_one_image_reference(x[i], p, SPEC, i) for i in range(32)]), dtype)
    close(augment_view(x, SPEC, gen(12)), out, dtype)

def test_every_image_gets_its_own_parameters():
    one = batch(3, B=1).expand(32, -1, -1, -1)
    p = sample_view_params(one, SPEC, gen(13))
    assert len(p.box.unique(dim=0)) > 24 and len(p.factors.unique(dim=0)) == 32 and len(p.sigma.unique()) == 32
    out = apply_view(one, p, SPEC)
    assert len(out.flatten(1).unique(dim=0)) == 32  # 32 copies of one image, 32 different views

def test_seeds_repeat_exactly_and_differ():
    aug = dino_augment(32, 3, (0.5,) * 3, (0.25,) * 3)
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=gen(0))
    a, b, c = aug(x, gen(1)), aug(x, gen(1)), aug(x, gen(2))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not any(torch.equal(u, v) for u, v in zip(a, c))

def test_input_errors():
    with pytest.raises(ValueError, match='x.float'): augment_view(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), SPEC)
    with pytest.raises(ValueError, match=r'\(B,C,H,W\)'): augment_view(torch.zeros(1, 8, 8), SPEC)

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_matches_cpu_reference_and_checks_generator():
    x = batch(3, torch.float32, B=16).cuda()
    with pytest.raises(ValueError, match='torch.Generator'): augment_view(x, SPEC, gen(0))
    g = torch.Generator(device='cuda').manual_seed(0)
    p = sample_view_params(x, SPEC, g)
    out = apply_view(x, p, SPEC)
    assert out.device == x.device
    pc = ViewParams(**{k: v.cpu() for k, v in vars(p).items()})
    ref = torch.stack([augment_one_image_reference(x[i].cpu(), pc, SPEC, i) for i in range(16)])
    close(out.cpu(), ref, torch.float32)

# ---------------------------------------------------------------- multi-crop and presets
@pytest.mark.parametrize('name', sorted(AUGMENT_PRESETS))
@pytest.mark.parametrize('S,C', [(28, 1), (32, 3)])
def test_preset_shapes(name, S, C):
    aug = multicrop_preset(name, S, C, (0.5,) * C, (0.25,) * C)
    x = torch.randint(0, 256, (5, C, S, S), dtype=torch.uint8, generator=gen(0))
    views = aug(x, gen(0))
    n_local = 6 if name in ('dino', 'ibot') else 0
    assert [tuple(v.shape) for v in views] == [(5, C, S, S)] * 2 + [(5, C, S // 2, S // 2)] * n_local
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views)
    assert all(0 - 1e-6 <= (v * 0.25 + 0.5).min() and (v * 0.25 + 0.5).max() <= 1 + 1e-6 for v in views)
    for v in aug.views: assert blur_kernel_size(v.blur_sigma[1]) // 2 < v.size  # blur fits the view

def test_dino_preset_details():
    aug = dino_augment(28, 1, (0.286,), (0.353,), n_local=4)
    (g1, g2), locs = aug.global_views, aug.local_views
    assert (aug.n_global, aug.n_local) == (2, 4)
    assert (g1.blur_p, g1.solarize_p, g2.blur_p, g2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert all(l.blur_p == 0.5 and l.solarize_p == 0 and l.size == 14 for l in locs)
    assert g1.size == 28 and g1.scale[0] >= 0.4 and locs[0].scale == (0.1, 0.4)
    assert g1.blur_sigma == blur_sigma_for(28) and locs[0].blur_sigma == blur_sigma_for(14)
    half = (0.5,) * 3
    assert multicrop_preset('ibot', 32, 3, half, half) == multicrop_preset('dino', 32, 3, half, half)
    custom = dino_augment(32, 3, (0.5,), (0.5,), n_local=2, global_scale=(0.7, 1), local_scale=(0.2, 0.5),
                          local_size=12)
    assert custom.global_views[0].scale == (0.7, 1) and custom.local_views[0].scale == (0.2, 0.5)
    assert custom.local_views[0].size == 12 and custom.local_views[0].blur_sigma == blur_sigma_for(12)
    assert len(byol_augment(32, 3, (0.5,), (0.5,)).views) == 2 and len(moco_augment(28, 1, (0.5,), (0.5,)).views) == 2

def test_preset_errors():
    with pytest.raises(ValueError, match="'dino'"): multicrop_preset('swav', 28, 1, (0.5,), (0.5,))
    with pytest.raises(ValueError, match='one per channel'): multicrop_preset('dino', 28, 1, (0.5, 0.5), (0.5, 0.5))

@pytest.mark.parametrize('dtype', DTYPES)
def test_multicrop_without_randomness_is_normalize(dtype):
    plain = ViewSpec(20, (1., 1.), (1., 1.), flip_p=0., jitter_p=0., gray_p=0.)
    aug = MultiCrop([plain, plain], [], (0.4, 0.5, 0.6), (0.2, 0.3, 0.4))
    x = batch(3, dtype)
    views = aug(x, gen(0))
    assert len(views) == 2 and views[0].dtype == dtype
    close(views[0], normalize(x, aug.mean, aug.std), dtype)
    xu = (x * 255).round().to(torch.uint8)
    close(aug(xu, gen(0))[1], normalize(xu, aug.mean, aug.std), torch.float32)

@pytest.mark.skipif(not (FASHION_DIR / 'train-images-idx3-ubyte.gz').exists(), reason='Fashion-MNIST files absent')
def test_dino_views_of_real_fashion_mnist():
    from sslkd.data import load_fashion_mnist
    d = load_fashion_mnist('test')
    aug = dino_augment(28, 1, d.mean, d.std)
    views = aug(d.x[:64], gen(0))
    assert [tuple(v.shape) for v in views] == [(64, 1, 28, 28)] * 2 + [(64, 1, 14, 14)] * 6
    g1, g2 = (v * d.std[0] + d.mean[0] for v in views[:2])
    assert g1.min() >= -1e-6 and g1.max() <= 1 + 1e-6
    assert (g1 - g2).abs().flatten(1).amax(1).min() > 0.05  # the two global views of every image differ
    # the always-blurred first view is smoother than the originals
    tv = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()
    assert tv(g1) < tv(d.x[:64].float() / 255)

def test_byol_and_simclr_presets_reuse_dino_and_moco():
    half = (0.5,) * 3
    dino, byol = multicrop_preset('dino', 32, 3, half, half), multicrop_preset('byol', 32, 3, half, half)
    assert byol.n_local == 0 and byol.global_views == [replace(v, scale=(0.08, 1.0)) for v in dino.global_views]
    moco, simclr = multicrop_preset('moco', 32, 3, half, half), multicrop_preset('simclr', 32, 3, half, half)
    assert moco.global_views[0].saturation == 0.4 and moco.global_views[0].scale == (0.2, 1.0)
    assert simclr.global_views[0] == replace(moco.global_views[0], scale=(0.08, 1.0), brightness=0.8, contrast=0.8,
                                             saturation=0.8, hue=0.2)

# ---------------------------------------------------------------- constants and host syncs
from dataclasses import replace
from torch.utils._python_dispatch import TorchDispatchMode

class CountSyncs(TorchDispatchMode):
    "Ops that copy from the host or wait for it: tensors from Python data, numbers read back, boolean indexing."
    def __init__(self): super().__init__(); self.ops = []
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        bool_idx = name.startswith('aten::index') and any(isinstance(i, Tensor) and i.dtype == torch.bool
                                                          for i in (args[1] if len(args) > 1 else None) or [])
        if bool_idx or name in ('aten::lift_fresh', 'aten::_local_scalar_dense', 'aten::nonzero',
                                'aten::masked_select'): self.ops.append(name)
        return func(*args, **(kwargs or {}))

def test_const_is_made_once_per_values_device_dtype():
    cpu = torch.device('cpu')
    c = const((0.5, 0.25), cpu)
    assert const([0.5, 0.25], cpu) is c and const((0.5, 0.25), cpu, torch.float32) is c
    assert c.dtype == torch.float32 and c.tolist() == [0.5, 0.25]
    assert const((0.5, 0.25), cpu, torch.float64) is not c and const((0.5, 0.26), cpu) is not c
    assert const(0.3, cpu, torch.float64).ndim == 0 and const(0.3, cpu, torch.float64).item() == 0.3
    assert torch.signbit(const(-0.0, cpu)) and not torch.signbit(const(0.0, cpu))  # -0.0 == 0.0, yet two tensors
    t = torch.arange(3)
    assert const(t, cpu, torch.float64).dtype == torch.float64 and const(t, cpu, torch.int64) is t  # not cached

def test_const_made_in_inference_mode_works_with_autograd():
    with torch.inference_mode(): normalize(torch.zeros(1, 2, 3, 3), (0.123, 0.456), (0.789, 0.321))
    x = torch.rand(1, 2, 3, 3, requires_grad=True)
    normalize(x, (0.123, 0.456), (0.789, 0.321)).sum().backward()
    close(x.grad, (1 / torch.tensor([0.789, 0.321])).view(1, 2, 1, 1).expand_as(x), torch.float32)

def _pipelines(x, g):
    "Every augmentation entry point the methods and the notebook use, on batch `x`."
    C, S = x.shape[1], x.shape[-1]
    for name in AUGMENT_PRESETS: multicrop_preset(name, S, C, (0.5,) * C, (0.25,) * C, n_local=2)(x, g)
    xf = x.float() / 255
    augment_view(xf, ViewSpec(S // 2, blur_p=0.5, solarize_p=0.5), g)
    random_resized_crop(xf, S // 2, flip_p=0.5, g=g); random_hflip(xf, g=g); random_color_jitter(xf, g=g)
    random_grayscale(xf, g=g); random_gaussian_blur(xf, g=g); random_solarize(xf, g=g)
    normalize(x, [0.5] * C, [0.25] * C)

@pytest.mark.parametrize('C', [1, 3])
def test_no_host_copies_or_syncs_in_a_step(C):
    x = torch.randint(0, 256, (4, C, 24, 24), dtype=torch.uint8, generator=gen(0))
    _pipelines(x, gen(1))  # the first call makes the constants
    with CountSyncs() as counted: _pipelines(x, gen(1))
    assert counted.ops == []

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_constants_are_cached_and_steps_do_not_sync():
    dev = torch.device('cuda', torch.cuda.current_device())
    c = const((0.5, 0.25), dev)
    assert c.device == dev and const((0.5, 0.25), dev) is c and const((0.5, 0.25), torch.device('cpu')) is not c
    x = torch.randint(0, 256, (4, 3, 24, 24), dtype=torch.uint8, generator=gen(0)).to(dev)
    g = torch.Generator(device=dev).manual_seed(0)
    _pipelines(x, g)
    with CountSyncs() as counted: _pipelines(x, g)
    assert counted.ops == []
