import math, random
import pytest
import torch

from sslkd.masking import (mask_counts, random_mask, block_mask, MaskGenerator, mask_fns, default_min_patches,
                           HostSyncs, _rect_rounds, _manhattan_to, _complete, _block_from_counts)


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
                                dict(attempts=1), dict(attempts=0), dict(rounds=1)])
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


def test_manhattan_distance_matches_brute_force():
    for gh, gw in [(7, 7), (3, 5), (1, 6), (8, 8)]:
        base = torch.rand(40, gh * gw, generator=gen_(gh * gw)) < 0.1
        pos = [(i // gw, i % gw) for i in range(gh * gw)]
        for b, row in zip(base.tolist(), _manhattan_to(base, gh, gw).tolist()):
            ref = [min([abs(r - rr) + abs(c - cc) for (rr, cc), on in zip(pos, b) if on], default=gh + gw)
                   for r, c in pos]
            assert row == ref


def test_large_grid_is_cheap():
    # rectangles are compared with the grid in one batched test, not enumerated: a 56x56 grid (224 px, patch 4)
    m = block_mask(4, (56, 56), 0.4, gen_())
    assert (m.sum(1) == round(0.4 * 3136)).all()


def test_rectangles_never_overshoot_and_beit_stops_short():
    la = (math.log(.3), math.log(1 / .3))
    counts = torch.tensor([3, 7, 11, 15, 19, 24] * 200)
    rects = _rect_rounds(counts, 7, 7, gen_(), 4, la, 10, 8)
    n = rects.sum(1)
    assert (n <= counts).all() and (n < counts).any() and (n == counts).float().mean() > 0.9
    assert not _rect_rounds(counts, 7, 7, gen_(), 4, la, 0, 8).any()       # no attempts: no rectangle
    sq = _rect_rounds(torch.full((50,), 4), 3, 4, gen_(), 4, (0., 0.), 10, 1).view(50, 3, 4)  # area 4, aspect 1
    assert (sq.sum((1, 2)) == 4).all() and (sq.any(2).sum(1) == 2).all() and (sq.any(1).sum(1) == 2).all()


def test_completion_grows_ring_by_ring_in_one_piece():
    # attempts=0: pure growth from one random seed patch, so the mask is one connected piece
    counts = torch.arange(1, 50)
    m = _block_from_counts(counts, 7, 7, gen_(), attempts=0)
    assert m.sum(1).tolist() == counts.tolist()
    assert all(n_components(row, 7, 7) == 1 for row in m)
    short = _rect_rounds(counts % 25, 7, 7, gen_(1), 4, (math.log(.3), math.log(1 / .3)), 10, 1)
    full = _complete(short, counts % 25, 7, 7, gen_(2))
    assert full.sum(1).tolist() == (counts % 25).tolist() and (full | ~short).all()
    d = _manhattan_to(short, 7, 7)
    for row_d, added, left, has in zip(d.tolist(), (full & ~short).tolist(), (~full).tolist(), short.any(1).tolist()):
        if has and any(added): assert max(x for x, a in zip(row_d, added) if a) <= min(
            [x for x, lf in zip(row_d, left) if lf], default=99)


def beit_reference(k, gh, gw, rng, min_area, attempts=10):
    "BEiT's loop plus random growth from the border, on Python sets: the sequential algorithm the batch version copies."
    mask, la = set(), (math.log(.3), math.log(1 / .3))
    while len(mask) < k:
        need = k - len(mask)
        for _ in range(attempts):
            area, ar = rng.uniform(min_area, need), math.exp(rng.uniform(*la))
            h, w = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
            if not (1 <= h <= gh and 1 <= w <= gw): continue
            top, left = rng.randrange(gh - h + 1), rng.randrange(gw - w + 1)
            rect = {(top + r) * gw + left + c for r in range(h) for c in range(w)}
            if 0 < len(rect - mask) <= need: mask |= rect; break
        else: break
    while len(mask) < k:
        near = sorted({j for i in mask for j in (i - gw, i + gw, i - 1, i + 1) if 0 <= j < gh * gw and
                       (j // gw == i // gw or j % gw == i % gw)} - mask) or sorted(set(range(gh * gw)) - mask)
        mask.add(rng.choice(near))
    return [i in mask for i in range(gh * gw)]


@pytest.mark.parametrize('grid', [7, 8])
def test_batched_blocks_match_the_sequential_algorithm_in_distribution(grid):
    N, rng = grid * grid, random.Random(grid)
    counts = mask_counts(0.1 + 0.4 * torch.rand(1500, generator=gen_(grid), dtype=torch.float64), N).clamp(min=1)
    seq = torch.tensor([beit_reference(k, grid, grid, rng, default_min_patches(grid, grid)) for k in counts.tolist()])
    bat = _block_from_counts(counts, grid, grid, gen_(grid + 1))
    assert seq.sum(1).tolist() == bat.sum(1).tolist() == counts.tolist()
    pieces = [sum(n_components(m, grid, grid) for m in ms) / len(ms) for ms in (seq, bat)]
    assert abs(pieces[0] - pieces[1]) < 0.15, pieces
    assert (seq.float().mean(0) - bat.float().mean(0)).abs().max() < 0.07


@pytest.mark.parametrize('mode', ['block', 'random'])
def test_no_host_sync_and_a_fixed_sequence_of_ops(mode):
    ops = []
    for B in (8, 300):
        with HostSyncs() as s: MaskGenerator(mode, prob=0.5)(B, (7, 7), gen_())
        assert s.n == 0, dict(s.counts)
        ops.append(s.ops)
    assert ops[0] == ops[1]                         # the same ops whatever the batch size and the masks drawn


def test_host_syncs_counts_what_it_should():
    with HostSyncs() as s:
        torch.tensor([1., 2.]).sum().item()
        x = torch.arange(5); x[x > 2]; x.nonzero(); x[torch.tensor([0, 1])]
    assert dict(s.counts) == {'aten::lift_fresh': 2, 'aten::_local_scalar_dense': 1, 'aten::index': 1,
                              'aten::nonzero': 1}


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
