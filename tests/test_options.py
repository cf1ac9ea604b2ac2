"Every option checked: a bad number, setting or output folder is one line on stderr and exit 2, never a traceback."
import errno, json, os
import pytest, torch
import sslkd, sslkd.cli as cli
from sslkd.cli import main, parser
from sslkd.checkpoint import save_checkpoint, load_checkpoint, CHECKPOINT_FORMAT
from sslkd.data import ImageData
from sslkd.registry import OPTIONS, build_method, describe, check_settings, METHODS


def one_line(argv, capsys):
    "Run `sslkd ARGV...`, which must fail with exit 2 and exactly one line on stderr; that line."
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert 'Traceback' not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.mark.parametrize('argv,line', [
    (['train', '--batch-size', '0'], 'sslkd train: error: --batch-size 0: must be a positive integer'),
    (['train', '--patch', '0'], 'sslkd train: error: --patch 0: must be a positive integer'),
    (['train', '--patch', '-4'], 'sslkd train: error: --patch -4: must be a positive integer'),
    (['train', '--lr', '0'], 'sslkd train: error: --lr 0: must be a positive number'),
    (['train', '--epochs', '0'], 'sslkd train: error: --epochs 0: must be a positive number'),
    (['train', '--minutes', '0'], 'sslkd train: error: --minutes 0: must be a positive number'),
    (['train', '--minutes', '-1'], 'sslkd train: error: --minutes -1: must be a positive number'),
    (['train', '--eval-every', '-1'], 'sslkd train: error: --eval-every -1: must be 0 or more'),
    (['train', '--val-split', '1'], 'sslkd train: error: --val-split 1: must be in [0, 1)'),
    (['train', '--stages', '0'], 'sslkd train: error: --stages 0: must be a positive integer'),
    (['train', '--batch-size', '12.5'], 'sslkd train: error: --batch-size 12.5: must be a positive integer'),
    (['train', '--lr', 'nan'], 'sslkd train: error: --lr nan: must be a positive number'),
    (['train', '--tflops', '0'], 'sslkd train: error: --tflops 0: must be a positive number'),
    (['eval', 'x.pt', '--k', '0'], 'sslkd eval: error: --k 0: must be a positive integer'),
    (['eval', 'x.pt', '--T', '-0.1'], 'sslkd eval: error: --T -0.1: must be a positive number'),
    (['compare', '--seeds', '0'], 'sslkd compare: error: --seeds 0: must be a positive integer'),
    (['demo', '--minutes', '0'], 'sslkd demo: error: --minutes 0: must be a positive number'),
    (['train', '--compile', 'x'], "sslkd train: error: --compile: invalid choice: 'x'"),
    (['train', '--batch-size'], 'sslkd train: error: --batch-size: expected one argument; see sslkd train --help'),
])
def test_bad_numbers_are_refused_by_the_parser(argv, line, capsys):
    assert one_line(argv, capsys).startswith(line)


def test_parser_and_python_check_options_alike():
    "Every numeric option of the command line is read by the type of its kind in the registry's OPTIONS."
    checked = set()
    for sub in parser()._subparsers._group_actions[0].choices.values():
        for act in sub._actions:
            if act.dest in OPTIONS:
                assert act.type.__name__ == OPTIONS[act.dest], act.option_strings
                checked.add(act.dest)
    assert checked == set(OPTIONS)


@pytest.mark.parametrize('setting,line', [
    ('out_dim=abc', '--set out_dim=abc: out_dim takes an integer, e.g. out_dim=1024'),
    ('out_dim=12.5', '--set out_dim=12.5: out_dim takes an integer, e.g. out_dim=1024'),
    ('momentum_start=high', '--set momentum_start=high: momentum_start takes a number, e.g. momentum_start=0.99'),
    ('global_scale=big', '--set global_scale=big: global_scale takes two numbers low,high'),
    ('global_scale=0.4', '--set global_scale=0.4: global_scale takes two numbers low,high'),
    ('global_scale=1,0.4', '--set global_scale=1,0.4: global_scale takes two numbers low,high (low <= high)'),
    ('global_scale=0,1', '--set global_scale=0,1: global_scale must be in (0, 1]'),
    ('teacher_temp=-1', '--set teacher_temp=-1: teacher_temp must be > 0'),
    ('student_temp=0', '--set student_temp=0: student_temp must be > 0'),
    ('center_momentum=1.5', '--set center_momentum=1.5: center_momentum must be in [0, 1]'),
    ('norm_last_layer=maybe', '--set norm_last_layer=maybe: norm_last_layer takes true or false'),
    ('n_locals=2', "--set n_locals=2: DINOConfig has no setting 'n_locals'; settings are: out_dim, "),
    ('n_local', "--set expects KEY=VALUE"),
])
def test_bad_settings_are_one_line(setting, line, capsys):
    assert one_line(['train', '--method', 'dino', '--set', setting], capsys).startswith(f'sslkd train: error: {line}')


@pytest.mark.parametrize('method,setting,line', [
    ('ibot', 'mask_prob=2', 'mask_prob must be in [0, 1]'),
    ('ibot', 'mask_ratio=0.3', 'mask_ratio takes two numbers low,high'),
    ('multi_teacher', 'momenta=0.9,1.2', 'momenta must be in [0, 1]'),
    ('moco', 'temperature=0', 'temperature must be > 0'),
    ('moco', 'queue_size=0', 'queue_size must be > 0'),
    ('ibot_rkd_d', 'rkd_weight=-1', 'rkd_weight must be >= 0'),
    ('random', 'out_dim=8', "NoConfig has no setting 'out_dim'; settings are: none"),
])
def test_ranges_by_name_in_every_method(method, setting, line, capsys):
    assert line in one_line(['train', '--method', method, '--set', setting], capsys)


class Recorder:
    "Stands in for `sslkd.run` behind `sslkd train`: records its keywords."
    def __call__(self, method, data, **kw): self.kw = kw


def test_good_settings_and_zeros_reach_run_as_typed(monkeypatch):
    rec = Recorder(); monkeypatch.setattr(cli, 'run', rec)
    assert main(['train', '--method', 'dino', '--eval-every', '0', '--val-split', '0', '--set', 'global_scale=0.4,1',
                 '--set', 'warmup_teacher_temp=0.04', '--set', 'local_size=none', '--set', 'norm_last_layer=false',
                 '--set', 'out_dim=256']) == 0
    assert rec.kw['global_scale'] == (0.4, 1.) and rec.kw['warmup_teacher_temp'] == 0.04
    assert rec.kw['local_size'] is None and rec.kw['norm_last_layer'] is False and rec.kw['out_dim'] == 256
    assert rec.kw['eval_every'] == 0 and rec.kw['val_split'] == 0
    assert main(['train', '--method', 'dino', '--set', 'global_scale=[0.4, 1]']) == 0
    assert rec.kw['global_scale'] == (0.4, 1.)
    assert main(['train', '--method', 'multi_teacher', '--set', 'momenta=0.9,0.99,0.999']) == 0
    assert rec.kw['momenta'] == (0.9, 0.99, 0.999)


@pytest.mark.parametrize('kw,msg', [
    (dict(minutes=0), 'minutes=0: must be a positive number'),
    (dict(epochs=-1), 'epochs=-1: must be a positive number'),
    (dict(batch_size=0), 'batch_size=0: must be a positive integer'),
    (dict(patch=0), 'patch=0: must be a positive integer'),
    (dict(eval_every=-1), 'eval_every=-1: must be 0 or more'),
    (dict(stages=0), 'stages=0: must be a positive integer'),
    (dict(val_split=1.), 'val_split=1.0: must be in [0, 1)'),
    (dict(lr=0.), 'lr=0.0: must be a positive number'),
    (dict(teacher_temp=-1), 'teacher_temp=-1: teacher_temp must be > 0'),
    (dict(out_dim='abc'), "out_dim='abc': out_dim takes an integer, e.g. out_dim=1024"),
    (dict(global_scale='big'), "global_scale='big': global_scale takes two numbers low,high"),
])
def test_python_run_raises_the_same_lines(kw, msg):
    "sslkd.run checks its numbers and settings before it reads a dataset (fashion_mnist is never loaded here)."
    with pytest.raises(ValueError) as e: sslkd.run('dino', 'fashion_mnist', **kw)
    assert str(e.value).startswith(msg) and '\n' not in str(e.value)


def test_python_compare_and_eval_check_first(tmp_path):
    with pytest.raises(ValueError, match='seeds=0: must be a positive integer'): sslkd.compare('dino', seeds=0)
    with pytest.raises(ValueError, match='eval_every=-1'): sslkd.compare('dino', eval_every=-1)
    with pytest.raises(ValueError, match='batch_size=0'): sslkd.compare('dino', batch_size=0)
    with pytest.raises(ValueError, match='k=0: must be a positive integer'):
        sslkd.evaluate_checkpoint(tmp_path / 'x.pt', k=0)
    assert check_settings({'lambda1': 1, 'global_scale': [0.4, 1]}, METHODS['ibot'].config) == \
        {'lambda1': 1., 'global_scale': (0.4, 1.)}  # an int is fine for a float, a list for a tuple


def test_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / 'results.txt'; f.write_text('x')
    for out in (f, f / 'run'):
        line = one_line(['train', '--method', 'dino', '--out', str(out)], capsys)
        assert line == f'sslkd train: error: {f} is a file, not a folder; choose another --out'
    assert one_line(['eval', 'x.pt', '--out', str(f)], capsys).endswith('is a file, not a folder; choose another --out')
    assert one_line(['compare', '--methods', 'dino', '--out', str(f / 'c')], capsys).endswith('choose another --out')


def test_out_that_cannot_be_written(tmp_path, capsys):
    locked = tmp_path / 'locked'; locked.mkdir(); locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK): pytest.skip('running as root: a read-only folder is writable')
        line = one_line(['train', '--method', 'dino', '--out', str(locked / 'run')], capsys)
        assert line == f'sslkd train: error: cannot write {locked}: permission denied; choose another --out'
    finally: locked.chmod(0o700)


def test_out_that_cannot_be_written_as_root_too(tmp_path, monkeypatch, capsys):
    "Root may write anywhere, so the check is shown with `os.access` saying no."
    monkeypatch.setattr(cli.os, 'access', lambda *a: False)
    line = one_line(['train', '--method', 'dino', '--out', str(tmp_path / 'run')], capsys)
    assert line == f'sslkd train: error: cannot write {tmp_path}: permission denied; choose another --out'


def raises(exc):
    def run(*a, **k): raise exc
    return run


@pytest.mark.parametrize('exc,line', [
    (OSError(errno.ENOSPC, 'No space left on device', 'OUT/checkpoint.pt.123.tmp'),
     'no space left on the device holding '),
    (RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4371'),
     'no space left on the device holding '),
    (RuntimeError('PytorchStreamWriter failed writing file data/0: file write failed'), 'no space left'),
    (PermissionError(errno.EACCES, 'Permission denied', 'OUT/metrics.jsonl'), 'cannot write '),
    (OSError(errno.EROFS, 'Read-only file system', 'OUT/metrics.jsonl'), 'read-only file system; choose another'),
])
def test_os_mistakes_while_running_are_one_line(exc, line, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'OUT'
    if isinstance(exc, OSError): exc.filename = str(out / os.path.basename(exc.filename))
    monkeypatch.setattr(cli, 'run', raises(exc))
    got = one_line(['train', '--method', 'dino', '--out', str(out)], capsys)
    assert line in got and (str(out) in got)
    if 'space' in line: assert got.endswith('free some space or choose another --out (the last good checkpoint is '
                                            'kept)')
    with pytest.raises(type(exc)): main(['--debug', 'train', '--method', 'dino', '--out', str(out)])
    with pytest.raises(type(exc)): main(['train', '--debug', '--method', 'dino', '--out', str(out)])


def test_a_bug_still_ends_in_a_traceback(monkeypatch):
    monkeypatch.setattr(cli, 'run', raises(KeyError('x')))
    with pytest.raises(KeyError): main(['train', '--method', 'dino'])
    monkeypatch.setattr(cli, 'run', raises(RuntimeError('shape mismatch in a matmul')))
    with pytest.raises(RuntimeError): main(['train', '--method', 'dino'])


def test_debug_shows_the_traceback_of_a_user_error():
    for argv in (['--debug', 'train', '--set', 'out_dim=abc'], ['train', '--set', 'out_dim=abc', '--debug']):
        with pytest.raises(ValueError, match='out_dim takes an integer'): main(argv)


def test_eval_of_a_checkpoint_whose_weights_disagree(tmp_path, capsys):
    "One short line: how many weights are missing or unexpected, and at most 3 names of each, not kilobytes."
    d = ImageData(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long), ['a'], (.3,), (.3,))
    desc = json.loads(json.dumps(describe('dino', 'vit_nano', 7, d, dataset='fashion_mnist')))
    sd = build_method(desc).state_dict()
    weights = {k: v for k, v in sd.items() if 'blocks.1.' not in k}
    weights['extra.weight'] = torch.zeros(2)
    save_checkpoint({'format': CHECKPOINT_FORMAT, 'meta': desc, 'method': weights}, tmp_path / 'checkpoint.pt')
    line = one_line(['eval', str(tmp_path / 'checkpoint.pt')], capsys)
    n = sum('blocks.1.' in k for k in sd)
    assert f'{n} weights missing (student.backbone.blocks.1.' in line and ', ...)' in line
    assert '1 weight unexpected (extra.weight)' in line and len(line) < 500


def test_eval_every_zero_evaluates_only_at_the_end(folder, tmp_path, capsys):
    "Zero means zero: no periodic kNN, one at the end (it used to become the default, every epoch)."
    out = tmp_path / 'z'
    assert main(['train', '--method', 'dino', '--data', f'folder:{folder}', '--epochs', '2', '--eval-every', '0',
                 '--out', str(out), '--arch', 'vit_nano', '--patch', '4', '--batch-size', '12', '--no-progress',
                 '--no-linear', '--set', 'global_scale=0.4,1']) == 0
    lines = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()]
    assert sum('knn_top1' in l for l in lines) == 1
    assert load_checkpoint(out / 'checkpoint.pt')['meta']['method_config']['global_scale'] == [0.4, 1.]
