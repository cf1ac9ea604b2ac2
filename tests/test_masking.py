import math, random
import pytest
import torch

from sslkd.masking import (mask_counts, random_mask, block_mask, MaskGenerator, mask_fns, default_min_patches,
                           _block_bits, _bits_to_mask, _grid_bits)


def gen_(seed=0): return torch.Generator().manual_seed(seed)


def n_components(mask, gh, gw):
    "4-connected components of True cells in a flat bool mask (independent flood fill)."
    grid = mask.view(gh, gw).tolist()
    seen, n = set(), 0
    for r in range(gh):
        for c in range(gw):
            if not grid[r][c] or (r, c) in seen: continue
            n += 1; stack = [(r, c)]; seen.add((r, c))
            while stack:
                y, x = stack.pop()
                for yy, xx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                    if 0 <= yy < gh and 0 <= xx < gw and grid[yy][xx] and (yy, xx) not in seen:
                        seen.add((yy, xx)); stack.append((yy, xx))
    return n


def test_mask_counts_exact():
    assert mask_counts(torch.tensor([0., .1, .3, .5, 1.]), 49).tolist() == [0, 5, 15, 24, 49]
    r = torch.rand(1000, dtype=torch.float64)
    assert mask_counts(r, 64).tolist() == [round(x * 64) for x in r.tolist()]


@pytest.mark.parametrize('fn', [random_mask, block_mask])
@pytest.mark.parametrize('grid', [(7, 7), (8, 8), (2, 2), (3, 5), 4])
def test_counts_match_per_image_ratio(fn, grid):
    gh, gw = (grid, grid) if isinstance(grid, int) else grid
    g = gen_(1)
    ratio = torch.rand(200, generator=g, dtype=torch.float64)
    m = fn(200, grid, ratio, g)
    assert m.dtype == torch.bool and m.shape == (200, gh * gw)
    assert m.sum(1).tolist() == [round(r * gh * gw) for r in ratio.tolist()]  # block: tolerance 0 (exact)
    m = fn(10, grid, 0.5, g)
    assert (m.sum(1) == round(0.5 * gh * gw)).all()


def test_random_mask_uniform():
    m = random_mask(20000, (7, 7), 0.3, gen_())
    freq = m.float().mean(0)
    assert (freq - 15 / 49).abs().max() < 0.015
    # images differ from each other
    assert len({tuple(row.tolist()) for row in m[:100]}) == 100


@pytest.mark.parametrize('grid', [(7, 7), (8, 8), (2, 2), (1, 1), (1, 7), (14, 14)])
@pytest.mark.parametrize('kw', [{}, dict(min_num_patches=100), dict(min_num_patches=1), dict(aspect=(0.01, 100.)),
                                dict(attempts=1), dict(attempts=0)])
def test_block_mask_terminates_exact(grid, kw):
    N = grid[0] * grid[1]
    r = torch.linspace(0, 1, 51, dtype=torch.float64)
    m = block_mask(51, grid, r, gen_(), **kw)
    assert m.sum(1).tolist() == mask_counts(r, N).tolist()


@pytest.mark.parametrize('mode', ['block', 'random'])
@pytest.mark.parametrize('grid', [(7, 7), (8, 8), (2, 2)])
def test_generator_prob_extremes(mode, grid):
    N = grid[0] * grid[1]
    g = gen_()
    m = MaskGenerator(mode=mode, prob=0.)(64, grid, g)
    assert m.shape == (64, N) and not m.any()
    m = MaskGenerator(mode=mode, prob=1.)(64, grid, g)
    assert (m.sum(1) >= 1).all()                         # every image masked, even on a 2x2 grid
    assert (m.sum(1) <= max(1, round(0.5 * N))).all()


@pytest.mark.parametrize('mode', ['block', 'random'])
def test_generator_counts_follow_drawn_ratio(mode):
    gen = MaskGenerator(mode=mode, prob=0.5, ratio=(0.1, 0.5))
    # the counts are drawn first from g: replay them from a generator in the same state
    expected = gen.counts(512, 64, gen_(3))
    m = gen(512, (8, 8), gen_(3))
    assert m.sum(1).tolist() == expected.tolist()
    # and the counts themselves: Bernoulli(prob) choice, then round(U(0.1, 0.5) * N), at least 1
    g = gen_(3)
    chosen = torch.rand(512, generator=g) < 0.5
    r = 0.1 + 0.4 * torch.rand(512, generator=g, dtype=torch.float64)
    ref = [max(1, round(x * 64)) if c else 0 for c, x in zip(chosen.tolist(), r.tolist())]
    assert expected.tolist() == ref
    n = m.sum(1)
    assert 0.4 < (n > 0).float().mean() < 0.6
    assert n[n > 0].min() >= round(0.1 * 64) and n.max() <= round(0.5 * 64)


def test_generator_min_one_on_tiny_grid():
    m = MaskGenerator(prob=1., ratio=(0.1, 0.1))(32, (2, 2), gen_())
    assert (m.sum(1) == 1).all()


@pytest.mark.parametrize('mode', ['block', 'random'])
def test_seeded_repeatability(mode):
    gen = MaskGenerator(mode=mode)
    a = gen(64, (7, 7), gen_(7))
    b = gen(64, (7, 7), gen_(7))
    assert torch.equal(a, b)
    g = gen_(7)
    c, d = gen(64, (7, 7), g), gen(64, (7, 7), g)
    assert torch.equal(c, a) and not torch.equal(c, d)   # g advances between calls
    assert not torch.equal(a, gen(64, (7, 7), gen_(8)))


@pytest.mark.parametrize('grid', [(7, 7), (8, 8)])
def test_block_masks_are_blocky(grid):
    # same per-image counts for both modes (same seed), so the comparison is fair
    kw = dict(prob=1., ratio=(0.1, 0.5))
    blk = MaskGenerator('block', **kw)(300, grid, gen_(0))
    rnd = MaskGenerator('random', **kw)(300, grid, gen_(0))
    assert torch.equal(blk.sum(1), rnd.sum(1))
    cb = sum(n_components(m, *grid) for m in blk) / 300
    cr = sum(n_components(m, *grid) for m in rnd) / 300
    assert cb < 2.5 and cb < cr / 2, (cb, cr)


def test_bits_roundtrip():
    for N in (1, 9, 49, 64, 65, 196):
        bits = [random.Random(N).getrandbits(N) for _ in range(20)]
        m = _bits_to_mask(bits, N)
        assert m.shape == (20, N)
        assert [sum(1 << i for i in row.nonzero().flatten().tolist()) for row in m] == bits
    assert _bits_to_mask([], 49).shape == (0, 49)


def test_large_grid_is_cheap():
    # rectangles are shifted, not enumerated: a 56x56 grid (224 px, patch 4) needs no huge table
    m = block_mask(4, (56, 56), 0.4, gen_())
    assert (m.sum(1) == round(0.4 * 3136)).all()


def test_rectangles_and_fallback_growth():
    full, not_first, not_last, blocks = _grid_bits(3, 4)
    r = _bits_to_mask([blocks[2, 3] << 4], 12).view(3, 4)
    assert r.int().tolist() == [[0, 0, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    # attempts=0: pure growth from one random patch, so the mask is one connected piece
    rng = random.Random(0)
    for k in range(1, 50):
        m = _bits_to_mask([_block_bits(k, 7, 7, rng, 4, (math.log(.3), math.log(1 / .3)), 0)], 49)[0]
        assert m.sum() == k and n_components(m, 7, 7) == 1


def test_grow_false_is_beit_behaviour():
    # BEiT/iBOT stop when no block fits: never above the target, sometimes below
    rng = random.Random(0)
    la = (math.log(.3), math.log(1 / .3))
    got = [(_block_bits(k, 7, 7, rng, 4, la, 10, grow=False).bit_count(), k) for k in [3, 7, 11, 15, 19, 24] * 200]
    assert all(n <= k for n, k in got) and any(n < k for n, k in got)


def test_default_min_patches():
    assert [default_min_patches(g, g) for g in (2, 7, 8, 14)] == [1, 4, 4, 16]


def test_device_follows_generator():
    g = gen_()
    for mode in mask_fns:
        assert MaskGenerator(mode)(4, (7, 7), g).device == g.device


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('mode', ['block', 'random'])
def test_cuda_generator(mode):
    g = torch.Generator(device='cuda').manual_seed(0)
    m = MaskGenerator(mode, prob=1.)(16, (7, 7), g)
    assert m.device.type == 'cuda' and m.dtype == torch.bool and (m.sum(1) >= 1).all()
    assert torch.equal(m, MaskGenerator(mode, prob=1.)(16, (7, 7), torch.Generator(device='cuda').manual_seed(0)))


def test_errors():
    with pytest.raises(ValueError, match='use one of'): MaskGenerator(mode='blocks')
    with pytest.raises(ValueError, match=r'prob=1.5 must be in \[0, 1\]'): MaskGenerator(prob=1.5)
    with pytest.raises(ValueError, match='low <= high'): MaskGenerator(ratio=(0.5, 0.1))
    with pytest.raises(ValueError, match='lie in'): random_mask(4, (7, 7), 1.2, gen_())
    with pytest.raises(ValueError, match='one ratio per image'): block_mask(4, (7, 7), torch.rand(3), gen_())
    with pytest.raises(ValueError, match='at least one row'): block_mask(4, (0, 7), 0.3, gen_())
    with pytest.raises(ValueError, match='aspect'): block_mask(4, (7, 7), 0.3, gen_(), aspect=(2., 1.))
