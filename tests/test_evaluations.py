"One place to choose evaluations: the registry, shared features, prototypes vs k-means, stages, and the commands."
import json, math
import pytest, torch, torch.nn as nn
from sslkd.cli import main
from sslkd.data import ImageData
from sslkd.evaluations import (evaluate, evaluate_stages, parse_evals, parse_eval_at, stage_files, EvalConfig,
                               EVALUATIONS, ACCURACIES)
from sslkd.evaluate import LinearProbeConfig
from sslkd.train import TrainConfig, fit, Method, load_checkpoint
from sslkd.runner import evaluate_method, results_markdown
from sslkd.viz import plot_knn_curves

TINY = ['--arch', 'vit_nano', '--patch', '4', '--batch-size', '12', '--no-progress']


def classes_in_a_pixel(n_per_class=20, C=4, seed=0):
    "Images whose class is written in the top-left pixel (value 60 * class), over uniform noise elsewhere."
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(C).repeat_interleave(n_per_class)
    x = torch.randint(0, 256, (len(y), 1, 8, 8), dtype=torch.uint8, generator=g)
    x[:, 0, 0, 0] = (60 * y).to(torch.uint8)
    return ImageData(x, y, [f'c{i}' for i in range(C)], (0.,), (1.,))


class OneHotOfClass(nn.Module):
    "A backbone that reads the class from the top-left pixel: one-hot features, perfect for every evaluation."
    embed_dim = 4
    def __init__(self): super().__init__(); self.w = nn.Parameter(torch.ones(1)); self.calls = 0
    def forward(self, x):
        self.calls += 1
        c = (x[:, 0, 0, 0] * 255 / 60).round().long()  # the images arrive scaled to [0, 1] (mean 0, std 1)
        return nn.functional.one_hot(c, 4).float() * self.w + 0.01 * x.mean((1, 2, 3))[:, None]


def test_parse_evals_and_eval_at():
    assert parse_evals('finetune,knn') == ('knn', 'finetune')
    assert parse_evals(['unsup']) == ('unsup',) and tuple(EVALUATIONS) == ('knn', 'linear', 'unsup', 'finetune')
    with pytest.raises(ValueError, match="unknown evaluation 'knnn'"): parse_evals('knnn')
    assert parse_eval_at('1, 0,0.5') == (0., 0.5, 1.)
    for bad in ('1.5', 'half', '', '-0.1'):
        with pytest.raises(ValueError, match=r'in \[0, 1\]'): parse_eval_at(bad)


def test_features_are_extracted_once_for_every_frozen_evaluation():
    tr, te = classes_in_a_pixel(), classes_in_a_pixel(5, seed=1)
    bb = OneHotOfClass()
    probe = LinearProbeConfig(batch_size=16, lr=1e-2)  # 80 images: the default batch of 256 would give 10 steps
    res = evaluate(bb, tr, te, 'knn,linear,unsup', cfg=EvalConfig(batch_size=1000, probe=probe))
    assert bb.calls == 2  # one batch of train, one of test: shared by the three evaluations
    assert res['knn_top1'] == res['linear_top1'] == 100.
    assert (res['unsup_nmi'], res['unsup_ari'], res['unsup_acc'], res['unsup_n_clusters']) == (100., 100., 100., 4)
    assert res['unsup_by'] == 'kmeans' and 'kmeans_nmi' not in res
    assert set(res['eval_seconds']) == {'features', 'knn', 'linear', 'unsup'}
    assert set(evaluate(bb, tr, te, 'knn')) == {'knn_top1', 'knn_top5', 'k', 'T', 'eval_seconds'}


def test_prototypes_come_first_and_kmeans_is_reported_beside_them():
    tr, te = classes_in_a_pixel(), classes_in_a_pixel(5, seed=1)
    merge = nn.Linear(4, 8, bias=False)  # 8 prototypes; classes 0 and 1 share prototype 5, 2 -> 0, 3 -> 7
    with torch.no_grad(): merge.weight.zero_(); merge.weight[5, :2] = merge.weight[0, 2] = merge.weight[7, 3] = 1.
    res = evaluate(OneHotOfClass(), tr, te, 'unsup', head=merge)
    assert res['unsup_by'] == 'prototypes' and res['unsup_n_clusters'] == 3
    assert res['unsup_acc'] == 75.  # one of the merged classes is matched, the other counts as errors
    assert res['kmeans_acc'] == 100. and res['kmeans_n_clusters'] == 4


class TinyDINOLike(Method):
    "The smallest method with a prototype head: a trainable backbone (the student) that is also evaluated."
    def __init__(self):
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 6)), 8, 1, (0.,), (1.,))
        self.head = nn.Linear(6, 5)
    def training_step(self, x, g, step, total_steps, log=False):
        f = self.student(x.float() / 255 + 0.1 * torch.randn(x.shape, generator=g))
        return f.pow(2).mean() + 0 * self.head(f).sum(), {}
    def prototype_head(self): return self.head


def test_fit_keeps_stages_and_evaluate_stages_scores_them_in_order(tmp_path):
    data = classes_in_a_pixel()
    torch.manual_seed(0)
    m = TinyDINOLike()
    first = {k: v.clone() for k, v in m.student.state_dict().items()}
    cfg = TrainConfig(epochs=2, batch_size=8, lr=1e-2, progress=False, eval_every=0, eval_at=(0, .25, .5, 1))
    res = fit(m, data, cfg, out=tmp_path)
    assert [p.name for p in stage_files(tmp_path)] == ['at0.pt', 'at0.25.pt', 'at0.5.pt']  # 1 is the checkpoint
    steps = [load_checkpoint(p)['step'] for p in stage_files(tmp_path)]
    assert steps == [0, math.ceil(.25 * res['total_steps']), math.ceil(.5 * res['total_steps'])]
    assert torch.equal(load_checkpoint(stage_files(tmp_path)[0])['backbone']['1.weight'], first['1.weight'])
    assert 'head' in load_checkpoint(stage_files(tmp_path)[1])
    rows = evaluate_stages(m, tmp_path, data, data, 'knn,unsup')
    assert [r['at'] for r in rows] == [0, .25, .5] and all(r['unsup_by'] == 'prototypes' for r in rows)
    untrained = TinyDINOLike(); untrained.student.load_state_dict(first)
    assert rows[0]['knn_top1'] == round(evaluate(untrained.student, data, data, 'knn')['knn_top1'], 2)


def test_a_resumed_run_keeps_each_stage_once(tmp_path):
    data = classes_in_a_pixel()
    cfg = TrainConfig(epochs=1, batch_size=8, progress=False, eval_every=0, eval_at=(0, .5))
    torch.manual_seed(0); fit(TinyDINOLike(), data, cfg, out=tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in stage_files(tmp_path)}
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match='schedules now span'):
        fit(TinyDINOLike(), data, TrainConfig(**{**cfg.__dict__, 'epochs': 2}), out=tmp_path, resume=True)
    assert {p.name: p.stat().st_mtime_ns for p in stage_files(tmp_path)} == before  # none rewritten at resume


def test_dino_is_clustered_by_its_teachers_prototypes():
    from sslkd.registry import build_method, describe, method_spec
    tr, te = classes_in_a_pixel(), classes_in_a_pixel(5, seed=1)
    torch.manual_seed(0)
    m = build_method(describe('dino', 'vit_nano', 2, tr, method_spec('dino').make_config(out_dim=32, n_local=0)))
    res = evaluate_method(m, tr, te, 'unsup')
    assert res['unsup_by'] == 'prototypes' and 1 <= res['unsup_n_clusters'] <= 32 and 'kmeans_acc' in res


def test_train_eval_and_compare_choose_evaluations(folder, tmp_path, capsys):
    out = tmp_path / 'dino'
    assert main(['train', '--method', 'dino', '--data', f'folder:{folder}', '--epochs', '2', '--out', str(out),
                 '--eval', 'knn,unsup,finetune', '--finetune-epochs', '1', '--eval-at', '0,0.5,1', *TINY]) == 0
    printed = capsys.readouterr().out
    assert 'Unsup CLS NMI' in printed and 'Fine-tune Acc@1' in printed and 'clusters by prototypes' in printed
    row = json.loads((out / 'results.json').read_text())['rows'][0]
    assert {'knn_top1', 'unsup_nmi', 'unsup_ari', 'unsup_acc', 'finetune_top1', 'kmeans_nmi'} <= set(row)
    assert 'linear_top1' not in row and row['finetune_epochs'] == 1
    assert [s['at'] for s in row['eval_at']] == [0, .5, 1] and row['eval_at'][-1]['knn_top1'] == row['knn_top1']
    assert row['eval_at'][0]['epochs'] == 0 and set(row['eval_seconds']) == {'features', 'knn', 'unsup', 'finetune'}
    fig = plot_knn_curves({'dino': out})
    assert not any(l.get_linestyle() == '--' for l in fig.axes[0].lines)  # no linear probe was asked for
    # `sslkd eval` re-scores the checkpoint and the stages with other evaluations
    assert main(['eval', str(out / 'checkpoint.pt'), '--eval', 'linear', '--out', str(tmp_path / 'ev')]) == 0
    ev = json.loads((tmp_path / 'ev' / 'results.json').read_text())['rows'][0]
    assert 'linear_top1' in ev and 'knn_top1' not in ev and [s['at'] for s in ev['eval_at']] == [0, .5, 1]
    assert all('linear_top1' in s for s in ev['eval_at'])
    md = results_markdown([{**row, 'label': 'dino'}], 'folder')
    assert ('| Pre-train | arch | seeds | epochs | Unsup CLS NMI | Unsup CLS ARI | Unsup CLS ACC | Fine-tune Acc@1 '
            '| Fine-tune Acc@5 | kNN Acc@1 | kNN Acc@5 | train s/run |') in md
    assert 'Fine-tuned for 1 epochs' in md


def test_the_kNN_plot_gains_the_linear_probe_at_stages(tmp_path):
    out = tmp_path / 'run'; out.mkdir()
    (out / 'metrics.jsonl').write_text('\n'.join(json.dumps(r) for r in (
        {'epoch': 0, 'epochs_done': 1., 'knn_top1': 60.}, {'epoch': 1, 'epochs_done': 2., 'knn_top1': 70.})) + '\n')
    stages = [{'at': a, 'epochs': e, 'linear_top1': v} for a, e, v in ((0, 0., 40.), (.5, 1., 55.), (1, 2., 66.))]
    (out / 'results.json').write_text(json.dumps({'rows': [{'knn_top1': 72., 'eval_at': stages}]}))
    dashed = [l for l in plot_knn_curves({'r': out}).axes[0].lines if l.get_linestyle() == '--']
    assert len(dashed) == 1 and list(dashed[0].get_ydata()) == [40., 55., 66.]


@pytest.mark.parametrize('argv,msg', [
    (['train', '--eval', 'knn,lienar'], "unknown evaluation 'lienar'"),
    (['train', '--eval-at', '0.5,2'], 'in [0, 1]'),
    (['train', '--finetune-epochs', '0'], 'must be'),
    (['train', '--eval-at', '0.5', '--stages', '2', '--method', 'multi_teacher'], 'one stage'),
    (['eval', 'x.pt', '--eval', 'knn', '--eval-at', '0.5'], 'unrecognized arguments'),
    (['train', '--no-linear', '--eval', 'linear'], 'no evaluation'),
])
def test_bad_evaluation_options_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_accuracies_name_every_score_of_the_tables():
    assert ACCURACIES == ('linear_top1', 'linear_top5', 'unsup_nmi', 'unsup_ari', 'unsup_acc', 'finetune_top1',
                          'finetune_top5', 'knn_top1', 'knn_top5')


@pytest.mark.parametrize('settings,by', [({}, 'kmeans'), ({'add_to_ibot': True}, 'prototypes'),
                                         ({'embedding': 'logits'}, 'prototypes')])
def test_ibot_rkd_is_clustered_by_prototypes_only_when_a_loss_trains_them(settings, by):
    "On the bottleneck alone, relational KD never trains the last layer: its random prototypes are no clustering."
    from sslkd.registry import build_method, describe, method_spec
    tr, te = classes_in_a_pixel(), classes_in_a_pixel(5, seed=1)
    torch.manual_seed(0)
    cfg = method_spec('ibot_rkd_d').make_config(out_dim=32, n_local=0, **settings)
    m = build_method(describe('ibot_rkd_d', 'vit_nano', 2, tr, cfg))
    assert evaluate_method(m, tr, te, 'unsup')['unsup_by'] == by
