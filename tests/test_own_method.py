"A method written outside the package trains and evaluates through sslkd.run, `sslkd train` and `sslkd eval`."
import json, subprocess, sys
import pytest
import sslkd
from sslkd.cli import main
from sslkd.registry import METHODS, method_spec
from sslkd.train import load_checkpoint

MODULE = '''
from dataclasses import dataclass
from sslkd import Method

@dataclass
class FlipConfig:
    weight: float = 1.0

class Flip(Method):
    "Features of an image and of its mirror image pulled together (it collapses, but it trains)."
    config_cls = FlipConfig
    def training_step(self, x, g, step, total_steps, log=False):
        v = (x.float() / 255).sub(0.5)
        loss = self.cfg.weight * (self.student(v) - self.student(v.flip(-1))).pow(2).mean()
        return loss, ({'loss': loss.item()} if log else {})
'''

TINY = ['--arch', 'vit_nano', '--patch', '4', '--batch-size', '12', '--epochs', '1', '--no-progress', '--no-linear']


def fresh_eval(ckpt, cwd):
    "`sslkd eval CKPT` in a new Python process, where nothing was registered."
    code = 'import sys; from sslkd.cli import main; sys.exit(main(sys.argv[1:]))'
    return subprocess.run([sys.executable, '-c', code, 'eval', str(ckpt), '--no-linear', '--out', str(cwd / 'ev')],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def own_module(tmp_path, monkeypatch):
    (tmp_path / 'my_flip.py').write_text(MODULE)
    monkeypatch.chdir(tmp_path)
    yield tmp_path
    for k in [k for k in METHODS if 'Flip' in k or k == 'flip']: del METHODS[k]
    sys.modules.pop('my_flip', None)


def test_cli_trains_and_a_fresh_process_evaluates_a_method_named_by_module(own_module, folder, capsys):
    out = own_module / 'run'
    assert main(['train', '--method', 'my_flip:Flip', '--data', f'folder:{folder}', '--set', 'weight=2', '--out',
                 str(out), *TINY]) == 0
    ck = load_checkpoint(out / 'checkpoint.pt')
    assert ck['meta']['method'] == 'my_flip:Flip' and ck['meta']['method_config'] == {'weight': 2}
    row = json.loads((out / 'results.json').read_text())['rows'][0]
    r = fresh_eval(out / 'checkpoint.pt', own_module)
    assert r.returncode == 0, r.stderr
    assert json.loads((own_module / 'ev' / 'results.json').read_text())['rows'][0]['knn_top1'] == row['knn_top1']


def test_a_file_path_names_a_method_too(own_module, folder):
    out = own_module / 'run'
    assert main(['train', '--method', str(own_module / 'my_flip.py') + ':Flip', '--data', f'folder:{folder}',
                 '--out', str(out), *TINY]) == 0
    assert fresh_eval(out / 'checkpoint.pt', own_module.parent).returncode == 0  # from another folder: the path says


def test_registered_method_records_its_source(own_module, folder):
    from my_flip import Flip
    sslkd.register_method('flip', Flip)
    r = sslkd.run('flip', f'folder:{folder}', arch='vit_nano', patch=4, batch_size=12, epochs=1, linear=False,
                  progress=False, out=own_module / 'run', weight=0.5)
    assert set(r.results) == {'knn_top1', 'knn_top5'} and isinstance(r.results['knn_top1'], float)
    meta = load_checkpoint(r.out / 'checkpoint.pt')['meta']
    assert (meta['method'], meta['source']) == ('flip', 'my_flip:Flip')
    assert fresh_eval(r.out / 'checkpoint.pt', own_module).returncode == 0  # 'flip' is rebuilt from its source


def test_bad_sources_get_one_clear_line(own_module, capsys):
    assert main(['train', '--method', 'no_such_module:X']) == 2
    assert 'cannot import the method' in capsys.readouterr().err
    assert main(['train', '--method', 'my_flip:Flop']) == 2
    assert "has no class 'Flop'" in capsys.readouterr().err
    with pytest.raises(ValueError, match='subclasses sslkd.Method'): sslkd.register_method('x', object)
    assert method_spec('my_flip:Flip').config.__name__ == 'FlipConfig'
