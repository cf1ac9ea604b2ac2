import json, math, types, warnings
import pytest, torch, torch.nn as nn, torch.nn.functional as F
import sslkd.train
from sslkd.guard import RunFolderError
from sslkd.data import ImageData
from sslkd.augment import normalize
from sslkd.teacher import make_teacher, ema_update
from sslkd.train import (TrainConfig, fit, load_checkpoint, save_checkpoint, CheckpointError, TrainingDiverged,
                         param_groups, lr_wd_at, CHECKPOINT_FORMAT)


class ToyMethod(nn.Module):
    """A minimal method with every source of state the loop must carry: augmentation drawn from `g`, dropout
    (torch's global RNG), an EMA teacher, a buffer, and a step-dependent schedule."""
    def __init__(self, nan_at=None, interrupt_at=None):
        super().__init__()
        torch.manual_seed(0)
        self.student = nn.Sequential(nn.Flatten(), nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.1), nn.Linear(32, 8))
        self.teacher = make_teacher(self.student)
        self.register_buffer('center', torch.zeros(8))
        self.nan_at, self.interrupt_at = nan_at, interrupt_at

    def view(self, x, g):
        x = normalize(x, (0.5,), (0.25,))
        return x + 0.1 * torch.randn(x.shape, generator=g, device=x.device)

    def training_step(self, x, g, step, total_steps, log=False):
        s = self.student(self.view(x, g))
        with torch.no_grad(): t = self.teacher(self.view(x, g))
        loss = F.mse_loss(s, t - self.center) + 1e-3 * s.pow(2).mean()
        with torch.no_grad(): self.center.mul_(0.9).add_(0.1 * t.mean(0))
        if self.nan_at is not None and step == self.nan_at: loss = loss * float('nan')
        return loss, ({'toy_signal': float(t.std())} if log else {})

    def after_backward(self, step, total_steps, steps_per_epoch): pass

    def after_step(self, step, total_steps):
        if self.interrupt_at is not None and step == self.interrupt_at: raise KeyboardInterrupt
        ema_update(self.teacher, self.student, 0.9 + 0.1 * step / max(total_steps, 1))

    def eval_backbone(self): return self.teacher


def toy_data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = (y.view(-1, 1, 1, 1) * 80 + torch.randint(0, 40, (n, 1, 4, 4), generator=g)).to(torch.uint8)
    return ImageData(x, y, ['a', 'b', 'c'], (0.5,), (0.25,))


CFG = dict(epochs=2, batch_size=16, lr=1e-2, progress=False, eval_every=1, log_every=2)


def weights(m): return {k: v.clone() for k, v in m.state_dict().items()}


def test_resume_is_exact(tmp_path):
    data = toy_data()
    straight = ToyMethod()
    fit(straight, data, TrainConfig(**CFG), eval_data=toy_data(30, 1), out=tmp_path / 'a')
    # the same run interrupted (Ctrl-C) in the first step of epoch 2, then resumed from the epoch-1 checkpoint
    broken = ToyMethod(interrupt_at=6)
    with pytest.raises(KeyboardInterrupt):
        fit(broken, data, TrainConfig(**CFG), eval_data=toy_data(30, 1), out=tmp_path / 'b')
    assert load_checkpoint(tmp_path / 'b' / 'checkpoint.pt')['step'] == 6  # the last good one: end of epoch 1
    resumed = ToyMethod()
    res = fit(resumed, data, TrainConfig(**CFG), eval_data=toy_data(30, 1), out=tmp_path / 'b', resume=True)
    assert res['steps'] == 12
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # and interrupting mid-run really changes something if not resumed (the test can fail)
    fresh = ToyMethod(); fit(fresh, data, TrainConfig(**{**CFG, 'epochs': 1}))
    assert any(not torch.equal(a[k], weights(fresh)[k]) for k in a)


def _as_if_written_on_a_gpu(path):
    "Rewrite checkpoint `path` with every storage tagged 'cuda:0', as torch.save tags them on a GPU."
    entry = (0, lambda storage: 'cuda:0', lambda storage, location: None)
    torch.serialization._package_registry.append(entry)  # the first tagger that answers wins
    torch.serialization._package_registry.sort(key=lambda e: e[0])
    try: save_checkpoint(torch.load(path, weights_only=True), path)
    finally: torch.serialization._package_registry.remove(entry)


def test_resume_of_a_checkpoint_written_on_another_device_is_exact(tmp_path):
    "A checkpoint from a GPU resumes on this CPU exactly: it is loaded onto the CPU, RNG states included."
    data = toy_data()
    straight = ToyMethod(); fit(straight, data, TrainConfig(**CFG), out=tmp_path / 'a')
    with pytest.raises(KeyboardInterrupt):
        fit(ToyMethod(interrupt_at=6), data, TrainConfig(**CFG), out=tmp_path / 'b')
    _as_if_written_on_a_gpu(tmp_path / 'b' / 'checkpoint.pt')
    if not torch.cuda.is_available():  # the rewrite took: without a map to the CPU, loading needs a GPU
        with pytest.raises(RuntimeError, match='CUDA'): torch.load(tmp_path / 'b' / 'checkpoint.pt', weights_only=True)
    resumed = ToyMethod(); fit(resumed, data, TrainConfig(**CFG), out=tmp_path / 'b', resume=True)
    a, b = weights(straight), weights(resumed)
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_rng_states_restore_from_wherever_they_were_loaded():
    "`map_location` to a GPU makes RNG states CUDA tensors, which `Generator.set_state` refuses; here a wider dtype"
    "stands in for the other device (the same refusal on a CPU): `set_rng_state` brings them back as CPU bytes."
    from sslkd.checkpoint import rng_state, set_rng_state
    g = torch.Generator().manual_seed(3); s = rng_state(g); want = torch.rand(4, generator=g)
    moved = {k: v.to(torch.int16) for k, v in s.items() if k != 'cuda'}
    with pytest.raises(TypeError, match='ByteTensor'): torch.Generator().set_state(moved['aug'])
    g2 = torch.Generator(); set_rng_state(g2, moved)
    assert torch.equal(torch.rand(4, generator=g2), want)


def test_checkpoint_contents_and_weights_only(tmp_path):
    fit(ToyMethod(), toy_data(), TrainConfig(**CFG), out=tmp_path)
    ck = torch.load(tmp_path / 'checkpoint.pt', weights_only=True)
    assert ck['format'] == CHECKPOINT_FORMAT and ck['step'] == 12 and ck['total_steps'] == 12
    assert {'method', 'optimizer', 'rng', 'signature', 'history'} <= set(ck)
    assert any(k.startswith('teacher.') for k in ck['method']) and 'center' in ck['method']
    assert [p.name for p in tmp_path.iterdir() if p.suffix == '.tmp'] == []


def test_metrics_jsonl_and_history(tmp_path):
    res = fit(ToyMethod(), toy_data(), TrainConfig(**CFG), eval_data=toy_data(30, 1), out=tmp_path)
    lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    steps = [l for l in lines if 'step' in l and 'epoch' in l and 'toy_signal' in l]
    epochs = [l for l in lines if 'knn_top1' in l]
    assert [l['step'] for l in steps] == [0, 2, 4, 6, 8, 10]
    assert len(epochs) == 2 and all(0 <= l['knn_top1'] <= 100 for l in epochs)
    assert {'lr', 'wd', 'grad_norm', 'loss'} <= set(steps[0])
    assert res['history'][-1]['knn_top1'] == epochs[-1]['knn_top1']


class Regress(ToyMethod):
    "Learn a fixed random projection of the (augmented) input: a loss that must go down."
    def training_step(self, x, g, step, total_steps, log=False):
        v = self.view(x, g)
        target = v.flatten(1) @ torch.ones(16, 8) / 16
        return F.mse_loss(self.student(v), target), {}


def test_loss_goes_down():
    m, data = Regress(), toy_data()
    m.eval()
    with torch.no_grad(): before = m.training_step(data.x, torch.Generator().manual_seed(1), 0, 1)[0].item()
    fit(m, data, TrainConfig(**{**CFG, 'epochs': 10, 'lr': 0.5, 'weight_decay': 0, 'weight_decay_end': 0}))
    m.eval()
    with torch.no_grad(): after = m.training_step(data.x, torch.Generator().manual_seed(1), 0, 1)[0].item()
    assert after < 0.1 * before, (before, after)


def test_nan_stops_with_message_and_keeps_checkpoint(tmp_path):
    with pytest.raises(TrainingDiverged, match=r'step 8 \(epoch 1\).*last good checkpoint'):
        fit(ToyMethod(nan_at=8), toy_data(), TrainConfig(**CFG), out=tmp_path)
    assert load_checkpoint(tmp_path / 'checkpoint.pt')['step'] == 6


def test_resume_refuses_other_configuration(tmp_path):
    fit(ToyMethod(), toy_data(), TrainConfig(**CFG), out=tmp_path, meta={'method': 'toy', 'arch': 'mlp'})
    with pytest.raises(CheckpointError, match=r'weight_decay: checkpoint 0.04 vs now 0.05'):
        fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'weight_decay': 0.05}), out=tmp_path, resume=True,
            meta={'method': 'toy', 'arch': 'mlp'})
    with pytest.raises(CheckpointError, match=r'meta.arch'):
        fit(ToyMethod(), toy_data(), TrainConfig(**CFG), out=tmp_path, resume=True,
            meta={'method': 'toy', 'arch': 'vit'})


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match='does not exist'): load_checkpoint(tmp_path / 'nope.pt')
    (tmp_path / 'trunc.pt').write_bytes(b'PK\x03\x04 truncated')
    with pytest.raises(CheckpointError, match='corrupt'): load_checkpoint(tmp_path / 'trunc.pt')
    torch.save({'something': 1}, tmp_path / 'other.pt')
    with pytest.raises(CheckpointError, match='not an sslkd checkpoint'): load_checkpoint(tmp_path / 'other.pt')


def test_save_checkpoint_is_atomic(tmp_path, monkeypatch):
    save_checkpoint({'format': CHECKPOINT_FORMAT, 'v': 1}, tmp_path / 'c.pt')
    def boom(*a, **k): raise OSError('disk full')
    monkeypatch.setattr(torch, 'save', boom)
    with pytest.raises(OSError): save_checkpoint({'format': CHECKPOINT_FORMAT, 'v': 2}, tmp_path / 'c.pt')
    monkeypatch.undo()
    assert load_checkpoint(tmp_path / 'c.pt')['v'] == 1 and len(list(tmp_path.iterdir())) == 1


def test_time_budget_stretches_schedules():
    cfg = TrainConfig(**{**CFG, 'minutes': 0.02, 'epochs': 1000, 'eval_every': 0})
    res = fit(ToyMethod(), toy_data(), cfg)
    assert 1 <= res['total_steps'] < 1000 * 6  # decided by the budget, not by `epochs`
    assert res['train_seconds'] < 0.02 * 60 * 3
    # schedules end where they should when the run reaches total_steps
    assert lr_wd_at(cfg, res['total_steps'], res['total_steps'])[0] == pytest.approx(cfg.min_lr)


def test_untrainable_method_writes_checkpoint(tmp_path):
    m = ToyMethod(); m.student.requires_grad_(False)
    res = fit(m, toy_data(), TrainConfig(**CFG), out=tmp_path)
    assert res['steps'] == 0 and load_checkpoint(tmp_path / 'checkpoint.pt')['step'] == 0


def test_param_groups_skip_norms_biases_tokens():
    from sslkd.vit import vit_nano
    m = vit_nano(img_size=16, patch_size=4, in_chans=1, depth=1)
    decay, no_decay = param_groups(m)
    names = {id(p): n for n, p in m.named_parameters()}
    nd = {names[id(p)] for p in no_decay['params']}
    assert {'pos_embed', 'cls_token', 'norm.weight', 'blocks.0.attn.qkv.bias'} <= nd
    assert all(p.ndim == 2 or p.ndim == 4 for p in decay['params'])


class Collapsing(ToyMethod):
    """Reports the signals of a uniformly collapsed teacher (numbers that change, a mode that does not): the loop must
    warn once and log it."""
    def training_step(self, x, g, step, total_steps, log=False):
        loss, logs = super().training_step(x, g, step, total_steps, log)
        if log: logs.update(teacher_entropy=6.7 + 0.01 * step, teacher_mean_entropy=6.93, ln_K=6.93,
                            kl_teacher_student=0.001,
                            agreement=0.1, feature_std=0.05, effective_rank=10.0)
        return loss, logs


def test_collapse_is_warned_and_logged(tmp_path, capsys):
    fit(Collapsing(), toy_data(), TrainConfig(**CFG), out=tmp_path)
    out = capsys.readouterr().out
    assert out.count('uniform collapse') == 1  # said once, not at every logged step
    lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert sum('uniform collapse' in l.get('collapse_warning', '') for l in lines) == 6
    fit(ToyMethod(), toy_data(), TrainConfig(**CFG), out=tmp_path / 'ok')
    assert 'collapse' not in capsys.readouterr().out


def test_fractional_eval_every_gives_a_curve(tmp_path):
    "eval_every=0.5 on 6 steps per epoch: kNN after steps 3, 6, 9 and 12 (the last is the final evaluation)."
    res = fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'eval_every': 0.5}), eval_data=toy_data(30, 1),
              out=tmp_path)
    lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    evals = [l for l in lines if 'knn_top1' in l]
    assert [l['step'] for l in evals] == [3, 6, 9, 12]
    assert [l['epochs_done'] for l in evals] == [0.5, 1.0, 1.5, 2.0]
    assert [r['step'] for r in res['history'] if 'knn_top1' in r] == [3, 6, 9, 12]
    # evaluation only at the end
    fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'eval_every': 0}), eval_data=toy_data(30, 1),
        out=tmp_path / 'end')
    lines = [json.loads(l) for l in (tmp_path / 'end' / 'metrics.jsonl').read_text().splitlines()]
    assert [l['step'] for l in lines if 'knn_top1' in l] == [12]


class FeatureCollapse(ToyMethod):
    "A method without prototypes (e.g. RKD) logs only feature signals: the loop must still warn on a collapsed rank."
    def training_step(self, x, g, step, total_steps, log=False):
        loss, logs = super().training_step(x, g, step, total_steps, log)
        if log: logs.update(feature_std=0.0, effective_rank=1.0)
        return loss, logs


def test_feature_only_collapse_is_warned(tmp_path, capsys):
    fit(FeatureCollapse(), toy_data(), TrainConfig(**CFG), out=tmp_path)
    assert capsys.readouterr().out.count('dimensional collapse') == 1


class Drifting(ToyMethod):
    """A toy method whose steps cost `first` seconds while the loop times them, then `later`: a CPU whose speed
    drifts. The cost is added to a fake clock, so the test is exact on a machine of any speed or load."""
    def __init__(self, first, later):
        super().__init__(); self.first, self.later, self.calls, self.now = first, later, 0, 0.
    def clock(self): return self.now
    def training_step(self, x, g, step, total_steps, log=False):
        self.calls += 1
        self.now += self.first if self.calls <= 4 else self.later  # `_time_steps` runs 4 steps (one warm-up)
        return super().training_step(x, g, step, total_steps, log)


def _events(out, kind):
    return [r for r in map(json.loads, (out / 'metrics.jsonl').read_text().splitlines()) if r.get('event') == kind]


@pytest.mark.parametrize('first,later', [(0.01, 0.03), (0.03, 0.01)], ids=['slower', 'faster'])
def test_time_budget_replans_when_the_speed_drifts(tmp_path, monkeypatch, first, later):
    method = Drifting(first, later)
    monkeypatch.setattr(sslkd.train, 'time', types.SimpleNamespace(perf_counter=method.clock))
    cfg = TrainConfig(**{**CFG, 'minutes': 0.05, 'epochs': 1, 'eval_every': 0})  # 3 s
    res = fit(method, toy_data(480), cfg, out=tmp_path)  # 30 steps per epoch
    planned = _events(tmp_path, 'start')[0]['total_steps']
    assert planned == round(3 / first)  # from the timed steps
    replans = _events(tmp_path, 'replan')
    # at 10% and 30% of the budget
    assert [r['train_seconds'] for r in replans] == [pytest.approx(0.3, abs=0.03), pytest.approx(0.9, abs=0.03)]
    # after the re-plans the run ends on its last planned step, so the schedules reach their end, within the budget;
    # without them it would stop at a third of its steps (slower) or of its budget (faster)
    assert res['steps'] == res['total_steps'] == replans[-1]['total_steps'] == pytest.approx(3 / later, abs=1)
    assert res['train_seconds'] == pytest.approx(3, abs=later + 1e-9)
    if later < first: assert res['steps'] > math.ceil(planned / 30) * 30  # epochs were added


def test_a_fresh_run_starts_a_fresh_log(tmp_path):
    # a run that stopped before its first checkpoint: nothing to resume (said), and a fresh start replaces its log
    (tmp_path / 'metrics.jsonl').write_text('{"step": 0, "loss": 9.0}\n')
    with pytest.raises(RunFolderError, match='holds no checkpoint.pt to continue'):
        fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'epochs': 1}), out=tmp_path, resume=True)
    fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'epochs': 1}), out=tmp_path)
    lines = [json.loads(l) for l in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    assert lines[0]['event'] == 'start' and all(l.get('loss') != 9.0 for l in lines)
    fit(ToyMethod(), toy_data(), TrainConfig(**{**CFG, 'epochs': 1}), out=tmp_path, resume=True)  # a resume appends
    assert (tmp_path / 'metrics.jsonl').read_text().splitlines()[:len(lines)] == [json.dumps(l) for l in lines]


def test_out_of_memory_is_one_message_with_the_batch_size_and_the_checkpoint_kept(tmp_path, monkeypatch):
    "An allocator failure mid-run becomes `OutOfDeviceMemory` naming the batch size, a smaller one, and the checkpoint."
    from sslkd.device import OutOfDeviceMemory
    real, calls = sslkd.train.train_step, []
    def oom_in_epoch_2(*a, **k):
        calls.append(1)
        if len(calls) > 7: raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*a, **k)
    monkeypatch.setattr(sslkd.train, 'train_step', oom_in_epoch_2)
    with pytest.raises(OutOfDeviceMemory, match=r'batch size 16 per process.*kept at .*Try --batch-size 8'):
        fit(ToyMethod(), toy_data(), TrainConfig(**CFG), out=tmp_path)
    assert load_checkpoint(tmp_path / 'checkpoint.pt')['step'] == 6  # epoch 1's checkpoint survives


def test_timing_steps_leaves_the_fp16_loss_scale_as_it_was():
    "An overflowing trial step halves a gradient scaler's scale; the timed steps must put it back with the rest."
    from sslkd.data import DeviceLoader
    m, dev = ToyMethod(nan_at=1), torch.device('cpu')  # step 1's loss is NaN: its gradients overflow
    opt = torch.optim.AdamW(param_groups(m.student), lr=1e-2)
    scaler, g = torch.amp.GradScaler('cpu', init_scale=2.**10), torch.Generator().manual_seed(0)
    loader = DeviceLoader(toy_data(), batch_size=16, shuffle=True, drop_last=True, seed=0, device=dev)
    sslkd.train._time_steps(m, opt, loader, g, TrainConfig(**CFG, amp='off'), dev, scaler=scaler)
    assert scaler.get_scale() == 2.**10 and scaler.state_dict()['_growth_tracker'] == 0
