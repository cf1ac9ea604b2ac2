import copy
import pytest, torch, torch.nn as nn, torch.nn.functional as F
from sslkd.resnet import SmallCNN
from sslkd.vit import ViT
from sslkd.data import ImageData
from sslkd.registry import build_backbone
from sslkd.train import TrainConfig, fit, param_groups
from sslkd.distill import (KASSL, KASSLConfig, VIEW_PAIRS, neg_cosine, neg_cosine_naive, kassl_loss, encoder_extension,
                           random_projection, check_kassl_config, target_dim, kassl_from_teacher, teacher_record)

MEAN, STD = (0.3,), (0.3,)


def student(seed=1):
    torch.manual_seed(seed)
    return SmallCNN(1, widths=(4, 8), strides=(2, 2))        # embed_dim 8


def teacher(seed=0):
    torch.manual_seed(seed)
    return build_backbone('small_cnn', 16, 1)                # embed_dim 256, rebuildable from its arch


def make(cfg=None, seed=0, t=None, **kw):
    cfg = cfg or KASSLConfig(teacher_arch='small_cnn', extension_hidden_dim=16, **kw)
    return KASSL(student(seed + 1), 16, 1, MEAN, STD, cfg, t if t is not None else teacher(seed))


def images(n=16, seed=0):
    "Synthetic 16 px images: four stripe patterns at random contrasts plus noise, so features differ between images."
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(16.), torch.arange(16.), indexing='ij')
    protos = torch.stack([torch.sin(xx / 2), torch.sin(yy / 2), torch.sin((xx + yy) / 3), torch.cos(xx * yy / 20)])
    k = torch.randint(0, 4, (n,), generator=g)
    x = protos[k] * torch.rand(n, 1, 1, generator=g) + 0.2 * torch.randn(n, 16, 16, generator=g)
    return ((x - x.amin()) / (x.amax() - x.amin()) * 255).round().to(torch.uint8)[:, None]


def step(m, opt, x, seed, log=False):
    loss, logs = m.training_step(x, torch.Generator().manual_seed(seed), seed, 100, log=log)
    opt.zero_grad(); loss.backward(); m.after_backward(seed, 100, 10); opt.step(); m.after_step(seed, 100)
    return loss.item(), logs


def states_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- the loss ----------------------------------------------------------------------------------------------------

def test_neg_cosine_matches_the_naive_loop_and_its_extremes():
    g = torch.Generator().manual_seed(0)
    p, z = torch.randn(10, 6, generator=g), torch.randn(10, 6, generator=g)
    torch.testing.assert_close(neg_cosine(p, z), neg_cosine_naive(p, z))
    assert neg_cosine(torch.eye(5), torch.eye(5)).item() == -1.0
    assert neg_cosine(torch.eye(5), -torch.eye(5)).item() == 1.0
    torch.testing.assert_close(neg_cosine(p, 7 * p), torch.tensor(-1.0))       # scale-free
    assert neg_cosine(torch.eye(2), torch.tensor([[0., 1.], [1., 0.]])).item() == 0.0


def test_neg_cosine_sends_no_gradient_to_the_target_and_runs_in_fp32_under_autocast():
    p, z = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    neg_cosine(p, z).backward()
    assert p.grad is not None and z.grad is None
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = neg_cosine(p.bfloat16(), z.bfloat16())
    assert out.dtype == torch.float32
    with pytest.raises(ValueError, match="same shape"): neg_cosine(torch.randn(4, 8), torch.randn(4, 9))


def test_symmetric_loss_minimum_is_minus_two_and_swapping_views_changes_nothing():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 8, 5, generator=g)
    cross = VIEW_PAIRS[(False, True)]
    assert kassl_loss([torch.eye(3)] * 2, [torch.eye(3)] * 2, cross).item() == -2.0
    torch.testing.assert_close(kassl_loss([a, b], [b, a], cross), torch.tensor(-2.0))
    torch.testing.assert_close(kassl_loss([a, b], [a, b], cross), kassl_loss([b, a], [b, a], cross))
    # the sum of the two directions, not their mean (KASSL: Loss + Loss')
    torch.testing.assert_close(kassl_loss([a, b], [a, b], cross), neg_cosine(a, b) + neg_cosine(b, a))
    assert kassl_loss([torch.eye(3)] * 2, [torch.eye(3)] * 2, VIEW_PAIRS[(False, False)]).item() == -1.0   # one term


# --- parts -------------------------------------------------------------------------------------------------------

def test_encoder_extension_depth_widths_and_norms():
    ext = encoder_extension(8, 32, depth=3, hidden_dim=12)
    lin = [m for m in ext if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(8, 12), (12, 12), (12, 32)]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in ext) == 2 and isinstance(ext[-1], nn.Linear)
    assert [type(m) for m in encoder_extension(8, 32, depth=1)] == [nn.Linear]
    assert encoder_extension(8, 32, depth=2)[0].out_features == 32        # hidden width defaults to the target dim


def test_random_projection_has_orthonormal_rows_and_is_seeded():
    P = random_projection(20, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(P @ P.T, torch.eye(5), atol=1e-5, rtol=0)
    assert torch.equal(P, random_projection(20, 5, torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match=r"reduction_dim=21 must be in \[1, 20\]"): random_projection(20, 21)


# --- the method --------------------------------------------------------------------------------------------------

def test_teacher_gets_no_gradient_and_never_changes_while_the_student_trains():
    m = make()
    t_before = copy.deepcopy(m.teacher.state_dict())
    s_before = copy.deepcopy(m.student.state_dict())
    opt = torch.optim.AdamW(m.student.parameters(), lr=1e-2)
    m.train()
    for i in range(3):
        loss, _ = m.training_step(images(seed=i), torch.Generator().manual_seed(i), i, 3)
        opt.zero_grad(); loss.backward()
        assert all(p.grad is None and not p.requires_grad for p in m.teacher.parameters())
        opt.step()
    assert states_equal(m.teacher.state_dict(), t_before)                 # weights and BN running statistics
    after = m.student.state_dict()
    assert not torch.equal(after['backbone.body.0.0.weight'], s_before['backbone.body.0.0.weight'])
    assert not torch.equal(after['extension.0.weight'], s_before['extension.0.weight'])


def test_optimiser_sees_only_the_student():
    m = make(feature_reduction=True)
    opt_ids = {id(p) for gr in param_groups(m.student) for p in gr['params']}
    assert opt_ids == {id(p) for p in m.student.parameters()}
    assert not opt_ids & {id(p) for p in m.teacher.parameters()}
    assert all(p is not m.reduction for p in m.parameters())             # the projection is a buffer


def test_teacher_stays_in_eval_mode():
    m = make()
    m.train()
    assert m.student.training and not m.teacher.training
    assert not any(mod.training for mod in m.teacher.modules())
    m.teacher.train()                                                      # even when someone switches it directly
    m.training_step(images(8), torch.Generator().manual_seed(0), 0, 1)
    assert not any(mod.training for mod in m.teacher.modules())


def test_eval_backbone_is_the_student_backbone_without_extension():
    m = make()
    bb = m.eval_backbone()
    assert bb is m.student.backbone and bb is not m.student
    assert not any(mod is m.student.extension for mod in bb.modules())
    assert bb(torch.zeros(2, 1, 16, 16)).shape == (2, bb.embed_dim) == (2, 8)


def _views_and_parts(m, x, seed):
    "The method's two views (same generator) and, in eval mode, student's predictions and teacher's targets by view."
    views = m.augment(x, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        preds = [m.student.extension(m.student.backbone(v)) for v in views]
        targets = [m.teacher_targets(v) for v in views]
    return views, preds, targets


class Linear(nn.Sequential):
    "Flatten + Linear: features of both signs, so that different views give clearly different features."
    def __init__(self, d, seed):
        torch.manual_seed(seed)
        super().__init__(nn.Flatten(), nn.Linear(256, d))
        self.embed_dim = d


@pytest.mark.parametrize('no_aug', [False, True])
def test_pairing_of_views_cross_or_same(no_aug):
    # the student is a copy of the teacher with an identity extension: it matches the teacher on the same view
    m = KASSL(Linear(32, 0), 16, 1, MEAN, STD, KASSLConfig(no_aug=no_aug, extension_depth=1), Linear(32, 0)).eval()
    with torch.no_grad(): m.student.extension[0].weight.copy_(torch.eye(32)); m.student.extension[0].bias.zero_()
    x = images(12)
    _, s, t = _views_and_parts(m, x, seed=5)    # eval mode: BatchNorm per sample, so views can be fed one at a time
    with torch.no_grad(): loss = m.training_step(x, torch.Generator().manual_seed(5), 0, 1)[0]
    same, cross = neg_cosine(s[0], t[0]) + neg_cosine(s[1], t[1]), neg_cosine(s[0], t[1]) + neg_cosine(s[1], t[0])
    torch.testing.assert_close(loss, same if no_aug else cross)
    torch.testing.assert_close(same, torch.tensor(-2.0))
    assert cross > -1.9                         # the two pairings really differ on these views


class Recorder(nn.Module):
    "Wraps a backbone and keeps every input batch it sees."
    def __init__(self, net):
        super().__init__()
        self.net, self.embed_dim, self.seen = net, net.embed_dim, []
    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.net(x)


@pytest.mark.parametrize('no_aug', [False, True])
def test_no_aug_feeds_the_same_view_to_both_networks(no_aug):
    rec_s, rec_t = Recorder(student()), Recorder(teacher())
    m = KASSL(rec_s, 16, 1, MEAN, STD, KASSLConfig(no_aug=no_aug, symmetric=False), rec_t)
    rec_t.seen.clear()                                                     # drop the construction-time check
    m.training_step(images(8), torch.Generator().manual_seed(0), 0, 1)
    (xs,), (xt,) = rec_s.seen, rec_t.seen
    assert xs.shape == xt.shape == (8, 1, 16, 16)
    assert torch.equal(xs, xt) == no_aug
    views = m.augment(images(8), torch.Generator().manual_seed(0))
    assert torch.equal(xs, views[0]) and torch.equal(xt, views[0] if no_aug else views[1])


def test_feature_reduction_changes_the_target_dimension():
    plain, red = make(), make(feature_reduction=True)
    assert plain.reduction is None and plain.student.extension[-1].out_features == 256
    assert red.cfg.reduction_dim is None and target_dim(red.cfg) == 64    # teacher_dim // 4
    assert red.student.extension[-1].out_features == 64 and red.reduction.shape == (64, 256)
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(red.teacher_targets(x), red.teacher(x) @ red.reduction.T)
    assert make(feature_reduction=True, reduction_dim=10).student.extension[-1].out_features == 10
    P = red.reduction.clone()
    opt = torch.optim.AdamW(red.student.parameters(), lr=1e-2)
    step(red, opt, images(8), 0)
    assert torch.equal(red.reduction, P) and 'reduction' in red.state_dict()


def test_centred_targets_subtract_a_running_mean_updated_in_training_only():
    plain, c = make(), make(center_targets=True, center_momentum=0.5)
    assert plain.target_center is None and 'target_center' not in plain.state_dict()  # KASSL's recipe is unchanged
    x1, x2 = torch.randn(6, 1, 16, 16), torch.randn(6, 1, 16, 16)
    t1, t2 = plain.teacher_targets(x1), plain.teacher_targets(x2)
    torch.testing.assert_close(c.teacher_targets(x1), t1 - 0.5 * t1.mean(0))   # 0.5 * 0 + 0.5 * mean
    torch.testing.assert_close(c.teacher_targets(x2), t2 - (0.25 * t1.mean(0) + 0.5 * t2.mean(0)))
    center = c.target_center.clone()
    c.eval()
    torch.testing.assert_close(c.teacher_targets(x1), t1 - center)
    assert torch.equal(c.target_center, center) and torch.equal(c.state_dict()['target_center'], center)
    red = make(center_targets=True, feature_reduction=True)
    assert red.target_center.shape == (64,)  # centred in the space the extension targets


def test_loss_goes_down_on_a_tiny_synthetic_set():
    m = make()
    opt = torch.optim.AdamW(m.student.parameters(), lr=3e-3)
    x = images(32)
    losses = [step(m, opt, x, i)[0] for i in range(20)]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


def test_logs():
    m = make()
    loss, logs = m.training_step(images(16), torch.Generator().manual_seed(0), 0, 1, log=True)
    assert {'loss', 'cosine', 'feature_std', 'effective_rank', 'teacher_feature_std',
            'teacher_effective_rank'} <= logs.keys()
    assert logs['loss'] == pytest.approx(loss.item()) and logs['cosine'] == pytest.approx(-loss.item() / 2)
    assert 0 < logs['feature_std'] < 1 and logs['effective_rank'] > 1
    assert m.training_step(images(16), torch.Generator().manual_seed(0), 0, 1)[1] == {}


def test_seeded_repeatability():
    a = make().training_step(images(8), torch.Generator().manual_seed(3), 0, 1)[0]
    b = make().training_step(images(8), torch.Generator().manual_seed(3), 0, 1)[0]
    assert a.item() == b.item()


def test_state_dict_round_trip_with_a_freshly_built_teacher():
    m = make(feature_reduction=True)
    opt = torch.optim.AdamW(m.student.parameters(), lr=1e-2)
    for i in range(2): step(m, opt, images(8, seed=i), i)
    sd = m.state_dict()
    assert any(k.startswith('teacher.') for k in sd) and 'reduction' in sd   # the checkpoint is self-contained
    cfg = m.cfg
    # as the CLI would, from the config alone
    fresh_teacher = build_backbone(cfg.teacher_arch, 16, 1, cfg.teacher_patch)
    fresh = KASSL(student(seed=7), 16, 1, MEAN, STD, cfg, fresh_teacher)
    assert not torch.equal(fresh.reduction, m.reduction)
    fresh.load_state_dict(sd)
    assert states_equal(fresh.state_dict(), sd)
    x, gen = images(8, seed=9), lambda: torch.Generator().manual_seed(4)
    assert fresh.training_step(x, gen(), 0, 1)[0].item() == m.training_step(x, gen(), 0, 1)[0].item()


def test_vit_teacher_mask_token_is_dropped_so_the_teacher_rebuilds_from_its_arch():
    torch.manual_seed(0)
    vt = build_backbone('vit_nano', 16, 1, 2, use_mask_token=True)
    m = kassl_from_teacher(student(), vt, 16, 1, MEAN, STD, arch='vit_nano', patch=2, source='runs/x/checkpoint.pt')
    assert m.cfg.teacher_arch == 'vit_nano' and m.cfg.teacher_patch == 2 and m.cfg.teacher_dim == 128
    assert m.cfg.teacher_source == 'runs/x/checkpoint.pt' and 'teacher.mask_token' not in m.state_dict()
    fresh = KASSL(student(), 16, 1, MEAN, STD, m.cfg, build_backbone(m.cfg.teacher_arch, 16, 1, m.cfg.teacher_patch))
    fresh.load_state_dict(m.state_dict())                                  # strict: the same keys


def test_teacher_record():
    assert teacher_record(teacher(), 'small_cnn', patch=4, source='a/b.pt') == dict(
        teacher_arch='small_cnn', teacher_patch=None, teacher_dim=256, teacher_source='a/b.pt')


def test_fit_trains_only_the_student_and_checkpoints_the_teacher(tmp_path):
    m = make()
    t_before = copy.deepcopy(m.teacher.state_dict())
    data = ImageData(images(64), torch.arange(64) % 4, list('abcd'), MEAN, STD)
    res = fit(m, data, TrainConfig(epochs=2, batch_size=16, lr=1e-3, eval_every=0, progress=False, device='cpu'),
              out=tmp_path)
    assert res['steps'] == 8 and not m.teacher.training
    assert states_equal(m.teacher.state_dict(), t_before)
    ck = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert all(torch.equal(ck['method'][f'teacher.{k}'], v) for k, v in t_before.items())


# --- errors ------------------------------------------------------------------------------------------------------

class Liar(nn.Module):
    "Claims embed_dim 16 but returns 12 features."
    embed_dim = 16
    def __init__(self): super().__init__(); self.lin = nn.Linear(256, 12)
    def forward(self, x): return self.lin(x.flatten(1))


def test_clear_errors_for_bad_teachers():
    s = student()
    with pytest.raises(ValueError, match='needs a frozen teacher'): KASSL(s, 16, 1, MEAN, STD)
    with pytest.raises(ValueError, match='no `embed_dim`'): KASSL(s, 16, 1, MEAN, STD, teacher=nn.Flatten())
    with pytest.raises(ValueError, match='must be an nn.Module'): KASSL(s, 16, 1, MEAN, STD, teacher=lambda x: x)
    with pytest.raises(ValueError, match='teacher_dim=128'):
        KASSL(s, 16, 1, MEAN, STD, KASSLConfig(teacher_dim=128), teacher())
    with pytest.raises(ValueError, match=r'\(2, 12\), not \(batch, 16\)'): KASSL(s, 16, 1, MEAN, STD, teacher=Liar())
    with pytest.raises(ValueError, match='shares parameters'): KASSL(s, 16, 1, MEAN, STD, teacher=s)
    with pytest.raises(ValueError, match='fails on 1-channel 16 px'):
        KASSL(s, 16, 1, MEAN, STD, teacher=build_backbone('small_cnn', 16, 3))
    with pytest.raises(ValueError, match='student backbone needs an `embed_dim`'):
        KASSL(nn.Flatten(), 16, 1, MEAN, STD, teacher=teacher())


@pytest.mark.parametrize('kw, msg', [
    (dict(extension_depth=0), 'extension_depth=0'),
    (dict(extension_hidden_dim=-3), 'extension_hidden_dim=-3'),
    (dict(teacher_dim=0), 'teacher_dim=0'),
    (dict(augment='nope'), 'choose one of'),
    (dict(global_scale=(0.0, 1.0)), '0 < low <= high <= 1'),
    (dict(global_scale=(0.5, 1.5)), '0 < low <= high <= 1'),
    (dict(reduction_dim=32), 'without feature_reduction=True'),
    (dict(feature_reduction=True, reduction_dim=256), 'smaller than the teacher'),
    (dict(center_targets=True, center_momentum=1.0), 'center_momentum=1.0 must be in'),
])
def test_clear_errors_for_bad_config_values(kw, msg):
    with pytest.raises(ValueError, match=msg): make(KASSLConfig(**kw))
    if 'feature_reduction' not in kw:
        with pytest.raises(ValueError, match=msg): check_kassl_config(KASSLConfig(**kw))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_cuda_bf16_step():
    m = make().cuda()
    opt = torch.optim.AdamW(m.student.parameters(), lr=1e-3)
    x = images(16).cuda()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        loss, logs = m.training_step(x, torch.Generator(device='cuda').manual_seed(0), 0, 1, log=True)
    assert loss.dtype == torch.float32 and loss.device.type == 'cuda' and torch.isfinite(loss)
    loss.backward(); opt.step()
    assert all(p.grad is None for p in m.teacher.parameters())
    red = make(feature_reduction=True).cuda()
    with torch.autocast('cuda', dtype=torch.bfloat16):
        assert red.teacher_targets(torch.zeros(2, 1, 16, 16, device='cuda')).dtype == torch.float32
