import inspect, json, warnings
import pytest, torch
from PIL import Image
from sslkd.cli import main, parser
from sslkd.registry import build_backbone, build_method, describe, load_method, METHODS, dataset_defaults
from sslkd.runner import split_train_val, Row, PRESETS, results_markdown, get_preset
import sslkd, sslkd.runner as runner
from sslkd.data import ImageData
from sslkd.train import load_checkpoint


def cli(argv, capsys=None):
    "`sslkd ARGV...`, which must succeed; what it printed."
    assert main(argv) == 0
    return capsys.readouterr() if capsys else None


TINY = ['--arch', 'vit_nano', '--patch', '4', '--batch-size', '12', '--no-progress', '--no-linear']


def test_help_explains_every_option(capsys):
    for cmd in ('train', 'eval', 'compare', 'demo'):
        with pytest.raises(SystemExit): main([cmd, '--help'])  # argparse's own exit
        out = capsys.readouterr().out
        sub = parser()._subparsers._group_actions[0].choices[cmd]
        for act in sub._actions:
            for opt in act.option_strings: assert opt in out
            assert act.help, f'{cmd} {act.option_strings} has no help'


@pytest.mark.parametrize('argv,msg', [
    (['train', '--method', 'simclrr'], "unknown method 'simclrr'; choose one of random, dino, ibot"),
    (['train', '--arch', 'vit_giant'], "unknown architecture 'vit_giant'; choose one of vit_nano"),
    (['train', '--data', 'imagenet'], "unknown dataset 'imagenet'"),
])
def test_unknown_names_list_valid_ones(argv, msg, capsys):
    assert main(argv) == 2
    assert msg in capsys.readouterr().err


def test_defaults_learnable():
    d = dataset_defaults('fashion_mnist')
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # the default backbone must not trigger the few-tokens warning
        build_backbone(d.arch, 28, 1, d.patch)
    s = dataset_defaults('fashion_mnist', 'simclr')  # a method's own defaults sit on top of the dataset's
    assert (s.arch, s.batch_size, s.config['global_scale']) == ('small_cnn', 256, [0.5, 1.0]) and d.arch == 'vit_nano'
    for name in ('cifar10', 'cifar100'):
        c = dataset_defaults(name)
        assert c.arch.startswith('vit') and c.patch == 4
        with warnings.catch_warnings():
            warnings.simplefilter('error'); build_backbone(c.arch, 32, 3, c.patch)


def test_few_tokens_warning_on_request():
    with pytest.warns(UserWarning, match='patch tokens'): build_backbone('vit_nano', 32, 3, 8)


def test_split_train_val_disjoint_and_seeded():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    d = ImageData(x, torch.arange(100) % 3, list('abc'), (0.5,), (0.2,))
    tr, va = split_train_val(d, 0.2, seed=1)
    assert len(tr) == 80 and len(va) == 20
    assert set(tr.x.flatten().tolist()).isdisjoint(va.x.flatten().tolist())
    assert torch.equal(split_train_val(d, 0.2, seed=1)[1].x, va.x)
    assert not torch.equal(split_train_val(d, 0.2, seed=2)[1].x, va.x)


@pytest.mark.parametrize('method', ['random', 'dino', 'ibot', 'ibot_rkd_da', 'ibot_rkd_struct', 'multi_teacher',
                                    'simclr', 'moco', 'byol', 'mae'])
def test_train_then_eval_roundtrip(method, folder, tmp_path, capsys):
    out = tmp_path / method
    cli(['train', '--method', method, '--data', f'folder:{folder}', '--epochs', '2', '--out', str(out), *TINY], capsys)
    res = json.loads((out / 'results.json').read_text())
    row = res['rows'][0]
    assert res['dataset'] == f'folder:{folder}'
    assert {'method', 'arch', 'seed', 'epochs', 'train_seconds', 'knn_top1', 'knn_top5'} <= set(row)
    assert row['method'] == method and 0 <= row['knn_top1'] <= 100
    assert row['epochs'] == (0 if method == 'random' else 2)
    lines = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    if method != 'random':
        assert any('effective_rank' in l for l in lines)  # collapse signals are logged
        assert sum('knn_top1' in l for l in lines) == 2     # kNN every epoch
    # `sslkd eval` on the checkpoint reproduces the kNN numbers of `sslkd train`
    cli(['eval', str(out / 'checkpoint.pt'), '--no-linear', '--out', str(tmp_path / 'ev')], capsys)
    ev = json.loads((tmp_path / 'ev' / 'results.json').read_text())['rows'][0]
    assert ev['knn_top1'] == row['knn_top1'] and ev['knn_top5'] == row['knn_top5']


def test_resume_continues_and_refuses_other_config(folder, tmp_path, capsys):
    out = tmp_path / 'r'
    cli(['train', '--method', 'dino', '--data', f'folder:{folder}', '--epochs', '1', '--out', str(out), *TINY], capsys)
    assert load_checkpoint(out / 'checkpoint.pt')['step'] == 3
    cli(['train', '--method', 'dino', '--data', f'folder:{folder}', '--epochs', '2', '--resume', '--out', str(out),
         *TINY], capsys)
    assert load_checkpoint(out / 'checkpoint.pt')['step'] == 6
    assert main(['train', '--method', 'ibot', '--data', f'folder:{folder}', '--epochs', '2', '--resume',
                 '--out', str(out), *TINY]) == 2
    err = capsys.readouterr().err
    assert 'another configuration' in err and "meta.method: checkpoint 'dino' vs now 'ibot'" in err


def test_eval_errors(folder, tmp_path, capsys):
    assert main(['eval', str(tmp_path / 'missing.pt')]) == 2
    assert 'does not exist' in capsys.readouterr().err
    (tmp_path / 'junk.pt').write_bytes(b'junk')
    assert main(['eval', str(tmp_path / 'junk.pt')]) == 2
    assert 'corrupt' in capsys.readouterr().err


def test_build_method_from_description_roundtrip():
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    d = ImageData(x, torch.zeros(4, dtype=torch.long), ['a'], (0.3,), (0.3,))
    for name in METHODS:
        # kassl records its teacher
        cfg = METHODS[name].make_config(teacher_arch='small_cnn') if name == 'kassl' else None
        desc = json.loads(json.dumps(describe(name, 'vit_nano', 4, d, cfg, dataset='fashion_mnist')))
        m1, m2 = build_method(desc), build_method(desc)
        assert type(m1) is METHODS[name].cls
        m2.load_state_dict(m1.state_dict())  # same description, same structure
        for k, v in METHODS[name].defaults.items(): assert getattr(m1.cfg, k) == v  # the variant's own settings
    assert build_method(describe('ibot_rkd_a', 'vit_nano', 4, d)).cfg.relation == 'a'


def test_set_overrides_a_variant_setting_but_not_its_identity():
    x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    d = ImageData(x, torch.zeros(4, dtype=torch.long), ['a'], (0.3,), (0.3,))
    cfg = METHODS['ibot_rkd_d'].make_config(embedding='backbone')
    assert cfg.relation == 'd' and cfg.embedding == 'backbone'
    assert build_method(describe('ibot_rkd_d', 'vit_nano', 4, d, cfg)).cfg.embedding == 'backbone'


def test_multi_stage_training(folder, tmp_path, capsys):
    out = tmp_path / 'ms'
    argv = ['train', '--method', 'multi_teacher', '--data', f'folder:{folder}', '--epochs', '2', '--stages', '2',
            '--out', str(out), *TINY]
    text = cli(argv, capsys).out
    assert 'stage 2/2: teacher frozen (1 frozen)' in text
    first, last = load_checkpoint(out / 'stage1' / 'checkpoint.pt'), load_checkpoint(out / 'checkpoint.pt')
    assert first['step'] == last['step'] == 3  # 2 epochs over 2 stages: 1 epoch (3 steps) each
    assert (not any(k.startswith('frozen.') for k in first['method'])
            and any(k.startswith('frozen.0.') for k in last['method']))
    # the frozen teacher is stage 1's evaluated (slowest EMA) teacher
    k = next(k for k in first['method'] if k.startswith('teachers.1.net.backbone.'))
    assert torch.equal(first['method'][k], last['method'][k.replace('teachers.1.', 'frozen.0.')])
    row = json.loads((out / 'results.json').read_text())['rows'][0]
    assert row['stages'] == 2 and row['epochs'] == 2
    method, _ = load_method(out / 'checkpoint.pt')  # rebuilt with its frozen teacher
    assert method.n_frozen == 1
    cli(argv + ['--resume'], capsys)  # both stages done: resuming changes nothing
    torch.testing.assert_close(load_checkpoint(out / 'checkpoint.pt')['method'], last['method'], rtol=0, atol=0)
    assert main(['train', '--method', 'dino', '--data', f'folder:{folder}', '--stages', '2', *TINY]) == 2
    assert 'multi_teacher' in capsys.readouterr().err


def test_val_split_run_is_scored_on_validation_not_test(folder, tmp_path, capsys):
    """With --val-split the final numbers are the validation split's (the same as the last periodic kNN), never the
    test split's."""
    out = tmp_path / 'v'
    text = cli(['train', '--method', 'dino', '--data', f'folder:{folder}', '--epochs', '1', '--val-split', '0.25',
                '--out', str(out), *TINY], capsys).out
    row = json.loads((out / 'results.json').read_text())['rows'][0]
    last = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines() if 'knn_top1' in l][-1]
    assert row['split'] == 'val 0.25' and 'val 0.25 split' in text
    assert row['knn_top1'] == pytest.approx(last['knn_top1'], abs=1e-6)
    cli(['eval', str(out / 'checkpoint.pt'), '--no-linear', '--out', str(tmp_path / 'ev')], capsys)
    ev = json.loads((tmp_path / 'ev' / 'results.json').read_text())['rows'][0]
    assert ev['split'] == 'test'


def test_results_markdown_mean_std():
    base = dict(method='dino', arch='vit_nano', patch=4, k=20, T=0.07, split='test', knn_top5=90., linear_top1=50.,
                linear_top5=80.)
    rows = [dict(base, label='dino', seed=0, epochs=1., train_seconds=10., knn_top1=60.),
            dict(base, label='dino', seed=1, epochs=1., train_seconds=12., knn_top1=64.)]
    md = results_markdown(rows, 'fashion_mnist', '1 min per run')
    assert '| dino | vit_nano /4 | 2 | 1.00 | 50.00 | 80.00 | 62.00 ± 2.83 | 90.00 | 11 |' in md  # std of (60, 64)
    assert 'k=20, T=0.07' in md


class FakeRun:
    "Stands in for `sslkd.run` in a comparison: records each call's keywords, returns a results row."
    def __init__(self): self.calls = []
    def __call__(self, method, data, **kw):
        self.calls.append(dict(kw, method=method))
        row = dict(method=method, arch='small_cnn', seed=kw['seed'], epochs=1., train_seconds=1., knn_top1=50.)
        return runner.RunResult(None, {'knn_top1': 50.}, kw['out'], row)


def test_compare_writes_table_plots_and_skips_finished_runs(folder, tmp_path, capsys, monkeypatch):
    out = tmp_path / 'cmp'
    argv = ['compare', '--methods', 'random,dino', '--data', f'folder:{folder}', '--seeds', '2', '--epochs', '1',
            '--out', str(out), '--arch', 'vit_nano', '--batch-size', '12', '--no-progress', '--no-linear']
    cli(argv, capsys)
    res = json.loads((out / 'results.json').read_text())['rows']
    assert [(r['label'], r['seed']) for r in res] == [('random', 0), ('random', 1), ('dino', 0), ('dino', 1)]
    assert {r['epochs'] for r in res if r['method'] == 'dino'} == {1.0}
    md = (out / 'results.md').read_text()
    assert md.count('| random |') == 1 and md.count('| dino |') == 1
    for png in ('loss', 'knn', 'collapse', 'agreement', 'attention_dino'):
        assert (out / f'{png}.png').stat().st_size > 1000
    fake = FakeRun()
    monkeypatch.setattr(runner, 'run', fake)
    cli(argv, capsys)  # every run finished: nothing is trained again
    assert fake.calls == []
    (out / 'dino-s1' / 'results.json').unlink()  # as if the run had stopped after its last checkpoint
    cli(argv, capsys)
    assert [(c['method'], c['seed'], c['resume']) for c in fake.calls] == [('dino', 1, True)]


def test_compare_from_python_equals_the_command_line(monkeypatch, tmp_path):
    "sslkd.compare and `sslkd compare` make the same runs with the same options."
    calls = []
    for how in ('cli', 'python'):
        fake = FakeRun(); monkeypatch.setattr(runner, 'run', fake)
        monkeypatch.setattr(runner, 'comparison_plots', lambda *a, **k: [])
        if how == 'cli': assert main(['compare', '--preset', 'kassl', '--out', str(tmp_path), '--no-progress']) == 0
        else: runner.compare(preset='kassl', out=tmp_path, progress=False)
        calls.append(fake.calls)
    defaults = {k: p.default for k, p in inspect.signature(sslkd.run).parameters.items() if p.default is not p.empty}
    effective = lambda c: {**defaults, **c}  # the command line spells out what Python leaves to the defaults
    assert [effective(c) for c in calls[0]] == [effective(c) for c in calls[1]] and len(calls[0]) == 7


def test_compare_errors(capsys):
    assert main(['compare', '--methods', 'dino,dinov9']) == 2
    assert "unknown method 'dinov9'" in capsys.readouterr().err
    assert main(['compare', '--preset', 'seed999']) == 2
    assert "unknown preset 'seed999'; choose one of demo" in capsys.readouterr().err
    assert {r.method for p in PRESETS.values() for r in p.rows} <= set(METHODS)


def test_presets_have_names_that_say_what_they_show_and_keep_their_old_ones():
    assert set(PRESETS) == {'demo', 'short-training', 'rkd-cifar10', 'kassl'}
    for old, new in (('seed000', 'short-training'), ('seed001', 'rkd-cifar10'), ('seed002', 'kassl')):
        assert get_preset(old) == (new, PRESETS[new])


def test_kassl_from_a_teacher_checkpoint(folder, tmp_path, capsys):
    """Train a teacher, distil it into a small CNN through the CLI; the kassl checkpoint reloads without the teacher's
    file."""
    cli(['train', '--method', 'dino', '--data', f'folder:{folder}', '--epochs', '1', '--out', str(tmp_path / 't'),
         *TINY], capsys)
    (tmp_path / 't2').mkdir(); (tmp_path / 't' / 'checkpoint.pt').rename(tmp_path / 't2' / 'checkpoint.pt')
    out = tmp_path / 'k'
    cli(['train', '--method', 'kassl', '--teacher', str(tmp_path / 't2' / 'checkpoint.pt'),
         '--student-arch', 'small_cnn', '--data', f'folder:{folder}', '--epochs', '2', '--batch-size', '12',
         '--out', str(out), '--no-progress', '--no-linear'], capsys)
    row = json.loads((out / 'results.json').read_text())['rows'][0]
    assert (row['method'], row['arch'], row['epochs']) == ('kassl', 'small_cnn', 2)
    (tmp_path / 't2' / 'checkpoint.pt').unlink()  # the teacher's weights travel inside the kassl checkpoint
    method, ck = load_method(out / 'checkpoint.pt')
    cfg = ck['meta']['method_config']
    assert (cfg['teacher_arch'], cfg['teacher_patch'], cfg['teacher_dim']) == ('vit_nano', 4, 128)
    assert not any(p.requires_grad for p in method.teacher.parameters())
    cli(['eval', str(out / 'checkpoint.pt'), '--no-linear', '--out', str(tmp_path / 'ev')], capsys)
    assert json.loads((tmp_path / 'ev' / 'results.json').read_text())['rows'][0]['knn_top1'] == row['knn_top1']


@pytest.mark.parametrize('argv,msg', [
    (['--method', 'kassl'], 'give --teacher CHECKPOINT'),
    (['--method', 'kassl', '--teacher', 'nowhere/checkpoint.pt'], 'does not exist'),
    (['--method', 'dino', '--teacher', 'x.pt'], '--teacher is for kassl'),
    (['--method', 'kassl', '--arch', 'small_cnn', '--student-arch', 'resnet18'], 'disagree'),
])
def test_kassl_errors(argv, msg, folder, capsys):
    assert main(['train', '--data', f'folder:{folder}', *argv]) == 2
    assert msg in capsys.readouterr().err


def test_row_options_name_other_rows_checkpoints(tmp_path):
    assert runner._fill('{teacher (dino)}', tmp_path, 2) == str(tmp_path / 'teacher_dino_-s2' / 'checkpoint.pt')
    assert runner._fill(3, tmp_path, 0) == 3
    labels = {r.label for r in PRESETS['kassl'].rows}
    assert all(r.args['teacher'][1:-1] in labels for r in PRESETS['kassl'].rows if r.method == 'kassl')


def test_a_once_row_trains_one_seed_that_every_seed_uses(tmp_path, monkeypatch):
    "A pretrained teacher trains once; the students of seeds 3 and 4 both distil the teacher trained with seed 3."
    fake = FakeRun(); monkeypatch.setattr(runner, 'run', fake)
    rows = [Row('byol', 'teacher', once=True),
            Row('kassl', 'student', {'teacher': '{teacher}', 'settings': {'no_aug': True}})]
    res = runner.run_rows(rows, 'fashion_mnist', tmp_path, [3, 4], epochs=1)
    assert [(c['method'], c['seed']) for c in fake.calls] == [('byol', 3), ('kassl', 3), ('kassl', 4)]
    assert {c['teacher'] for c in fake.calls[1:]} == {str(tmp_path / 'teacher-s3' / 'checkpoint.pt')}
    assert all(c['no_aug'] is True and 'settings' not in c for c in fake.calls[1:])  # settings go to the method
    assert [r['label'] for r in res] == ['teacher', 'student', 'student']
    # not once: same seed
    assert runner._fill('{teacher}', tmp_path, 4) == str(tmp_path / 'teacher-s4' / 'checkpoint.pt')


@pytest.mark.parametrize('budget', [{'minutes': 2}, {'epochs': 3}])
def test_a_row_keeps_its_own_budget(tmp_path, monkeypatch, budget):
    "A teacher row trains its 30 epochs whatever budget the comparison gives the other rows."
    fake = FakeRun(); monkeypatch.setattr(runner, 'run', fake)
    runner.run_rows([Row('byol', 'teacher', {'epochs': 30}), Row('byol', 'baseline')], 'fashion_mnist', tmp_path, [0],
                    **budget)
    assert [(c.get('epochs'), c.get('minutes')) for c in fake.calls] == [(30, None), (budget.get('epochs'),
                                                                                     budget.get('minutes'))]


def test_kassl_refuses_a_pooled_teacher(folder, tmp_path, capsys):
    "MAE is scored on pooled patch tokens; a teacher rebuilt from its architecture would give CLS features instead."
    cli(['train', '--method', 'mae', '--data', f'folder:{folder}', '--epochs', '1', '--out', str(tmp_path / 'm'),
         *TINY], capsys)
    assert main(['train', '--method', 'kassl', '--teacher', str(tmp_path / 'm' / 'checkpoint.pt'),
                 '--data', f'folder:{folder}', *TINY]) == 2
    assert 'pooled patch tokens (mae)' in capsys.readouterr().err


def test_dry_run_plans_without_training(folder, tmp_path, capsys, monkeypatch):
    "--dry-run prints the plan (FLOPs per image, memory, time per epoch) and trains nothing, writes nothing."
    monkeypatch.chdir(tmp_path)
    assert main(['train', '--method', 'dino', '--data', f'folder:{folder}', '--dry-run', '--tflops', '1',
                 '--batch-size', '8', '--device', 'cpu']) == 0
    out = capsys.readouterr().out
    assert 'GFLOP per image per step' in out and 'memory at batch 8' in out and 'at 1 TFLOP/s' in out
    assert not (tmp_path / 'runs').exists() and [p.name for p in tmp_path.iterdir()] == ['imgs']  # only the fixture
