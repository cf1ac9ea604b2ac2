"""Fine-tuning: BEiT's layer ids and rates per parameter, a copy that leaves the caller's backbone alone, seeded runs,
and a random ViT that fine-tuning makes useful where a linear probe on its features cannot."""
import math, pytest, torch, torch.nn as nn
from sslkd.data import ImageData
from sslkd.evaluate import extract_features, linear_probe
from sslkd.finetune import FinetuneConfig, layer_id, finetune_param_groups, finetune
from sslkd.mae import PooledViT
from sslkd.resnet import small_cnn, resnet18
from sslkd.vit import ViT


def tiny_vit(depth=2, seed=0, **kw):
    torch.manual_seed(seed)
    return ViT(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=depth, num_heads=2, **kw)


def stripes(n, seed, size=16):
    "Vertical stripes of period 2.5 * 2**class px at a random phase, over noise: learnable, hard for random features."
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    phase = torch.arange(size) / (2.5 * 2 ** y[:, None]) + torch.rand(n, 1, generator=g)
    x = 128 + 60 * torch.sin(2 * math.pi * phase)[:, None, None] + 20 * torch.randn(n, 1, size, size, generator=g)
    x = x.clamp(0, 255).round().to(torch.uint8)
    return ImageData(x, y, list('abcd'), (x.float().mean() / 255,), (x.float().std() / 255,))


def expected_layer(name, depth):
    "The layer by hand, from the start of an unprefixed name: embeddings 0, block i -> i + 1, the rest depth + 1."
    if name.split('.')[0] in ('cls_token', 'pos_embed', 'mask_token', 'patch_embed'): return 0
    if name.startswith('blocks.'): return int(name.split('.')[1]) + 1
    return depth + 1


def test_layer_id_vit_and_prefixed_names():
    vit = tiny_vit(depth=3, use_mask_token=True)
    names = [n for n, _ in vit.named_parameters()]
    assert {expected_layer(n, 3) for n in names} == {0, 1, 2, 3, 4}
    for prefix in ('', 'vit.', 'backbone.', 'student.backbone.'):
        assert [layer_id(prefix + n, 3) for n in names] == [expected_layer(n, 3) for n in names], prefix
    assert layer_id('vit.blocks.3.attn.qkv.weight', 12) == 4 and layer_id('head.bias', 12) == 13
    assert layer_id('blocks.11.mlp.fc2.weight', 12) == 12  # two digits


def test_layer_id_resnet_names():
    names = [n for n, _ in resnet18(1).named_parameters()]
    assert any('stages.3' in n for n in names)
    assert {layer_id(n, 4) for n in names} == {5}  # no blocks, no embeddings: all after the (absent) blocks


@pytest.mark.parametrize('wrap', [False, True])
def test_lr_scale_and_weight_decay_per_parameter(wrap):
    depth, lr, wd, decay = 4, 1e-3, 0.05, 0.6
    vit = tiny_vit(depth=depth, use_mask_token=True)
    backbone, prefix = (PooledViT(vit), 'vit.') if wrap else (vit, '')
    head = nn.Linear(32, 7)
    groups = finetune_param_groups(backbone, head, lr, wd, decay)
    seen = {}
    for gr in groups:
        assert len(gr['params']) == len(gr['param_names']) > 0
        for n, p in zip(gr['param_names'], gr['params']):
            bare = n[len(prefix):] if n.startswith(prefix) else n
            scale = decay ** (depth + 1 - expected_layer(bare, depth))
            assert gr['lr_scale'] == pytest.approx(scale, rel=1e-12) and gr['lr'] == pytest.approx(lr * scale), n
            no_wd = p.ndim < 2 or bare in ('cls_token', 'pos_embed', 'mask_token')
            assert gr['weight_decay'] == (0. if no_wd else wd), n
            seen[n] = p
    params = dict(backbone.named_parameters()) | {f'head.{n}': p for n, p in head.named_parameters()}
    assert seen.keys() == params.keys() and all(seen[n] is params[n] for n in params)
    assert groups[0]['lr_scale'] == pytest.approx(decay ** (depth + 1)) and groups[-1]['lr_scale'] == 1
    by_name = {n: gr for gr in groups for n in gr['param_names']}
    assert by_name[f'{prefix}blocks.3.attn.qkv.weight']['lr'] == pytest.approx(lr * decay)
    assert by_name[f'{prefix}mask_token']['weight_decay'] == 0  # 2-D, but listed by no_weight_decay()
    torch.optim.AdamW(groups)  # the groups are valid optimiser groups


def test_non_vit_learns_at_full_rate():
    cnn, head = small_cnn(1), nn.Linear(256, 3)
    groups = finetune_param_groups(cnn, head, 1e-3, 0.05, 0.5)
    assert all(gr['lr_scale'] == 1 and gr['lr'] == 1e-3 for gr in groups)
    wd = {n: gr['weight_decay'] for gr in groups for n in gr['param_names']}
    assert wd['body.0.0.weight'] == 0.05 and wd['body.0.1.weight'] == 0 and wd['body.0.1.bias'] == 0
    assert wd['head.weight'] == 0.05 and wd['head.bias'] == 0
    assert len(wd) == len(list(cnn.parameters())) + 2


@pytest.mark.parametrize('mode', [True, False])
def test_finetune_leaves_the_backbone_untouched(mode):
    tr, te = stripes(128, 0), stripes(64, 1)
    bb = tiny_vit(drop_path_rate=0.1).train(mode)
    if not mode: bb.requires_grad_(False)  # a frozen teacher, say
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    rng = torch.get_rng_state()
    finetune(bb, tr, te, FinetuneConfig(epochs=2, batch_size=32, lr=1e-2))
    after = bb.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training == mode for m in bb.modules())
    assert all(p.requires_grad == mode for p in bb.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's random stream is not consumed


def test_same_seed_same_result():
    tr, te = stripes(256, 0), stripes(128, 1)
    bb, cfg = tiny_vit(drop_path_rate=0.1), FinetuneConfig(epochs=2, batch_size=64, lr=2e-3)
    torch.manual_seed(1); a = finetune(bb, tr, te, cfg)
    torch.manual_seed(2); b = finetune(bb, tr, te, cfg)  # another global state: only cfg.seed may count
    assert a == b


def test_finetune_beats_the_probe_of_a_random_vit():
    tr, te = stripes(1024, 0), stripes(512, 1)
    vit = tiny_vit()
    ftr, fte = (extract_features(vit, d.x, tr.mean, tr.std) for d in (tr, te))
    probe = linear_probe(ftr, tr.y, fte, te.y)
    tuned = finetune(vit, tr, te, FinetuneConfig(lr=2e-3))
    assert probe[0] < 40, probe  # random ViT features hardly separate the periods
    assert tuned[0] > probe[0] + 25, (tuned, probe)


def test_a_set_smaller_than_a_batch_is_one_batch(monkeypatch):
    tr, te = stripes(36, 0), stripes(16, 1)
    sizes = []
    monkeypatch.setattr('sslkd.finetune._augment', lambda x, *a: sizes.append(len(x)) or
                        torch.zeros(len(x), 1, 16, 16))
    finetune(tiny_vit(), tr, te, FinetuneConfig(epochs=3))  # batch_size 128 > 36 images
    assert sizes == [36] * 3
    sizes.clear()
    finetune(tiny_vit(), tr, te, FinetuneConfig(epochs=2, batch_size=10))  # 3 full batches, 6 images dropped
    assert sizes == [10] * 6


def test_resnet_backbone():
    tr, te = stripes(512, 0), stripes(256, 1)
    torch.manual_seed(0)
    top1, top5 = finetune(small_cnn(1), tr, te, FinetuneConfig(epochs=4, batch_size=64))
    assert top1 > 60 and top5 == 100  # 4 classes: the top 5 holds them all


def test_epochs_zero_and_bad_settings():
    tr, te = stripes(64, 0), stripes(64, 1)
    bb = tiny_vit()
    top1, _ = finetune(bb, tr, te, FinetuneConfig(epochs=0))  # an untrained head: no training step at all
    assert 0 <= top1 <= 100
    for epochs in (-1, 1.5):
        with pytest.raises(ValueError, match='whole number >= 0'): finetune(bb, tr, te, FinetuneConfig(epochs=epochs))
    with pytest.raises(ValueError, match='at least 2'): finetune(bb, stripes(1, 0), te, FinetuneConfig(epochs=1))
    wide = ImageData(torch.zeros(64, 1, 16, 20, dtype=torch.uint8), tr.y, tr.classes, tr.mean, tr.std)
    with pytest.raises(ValueError, match='square'): finetune(bb, wide, te, FinetuneConfig(epochs=1, batch_size=8))
