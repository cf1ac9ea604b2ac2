import json, math, warnings
import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import pytest, torch
from sslkd.augment import normalize
from sslkd.vit import vit_nano
from sslkd.resnet import small_cnn
from sslkd.viz import (read_metrics, step_records, eval_records, plot_loss_curves, plot_knn_curves,
                       plot_collapse_signals, plot_agreement, COLLAPSE_PANELS, cls_attention, attention_grid,
                       plot_attention_maps, save_figure)

LN_K = math.log(64)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close('all')


def step(s, epoch, loss, **signals):
    return {'step': s, 'epoch': epoch, 'loss': loss, 'lr': 1e-3, **signals}


def dino_like(s, epoch, loss, te, agree=0.5):
    return step(s, epoch, loss, teacher_entropy=te, teacher_mean_entropy=te + 0.2, ln_K=LN_K,
                kl_teacher_student=0.3 - s / 1000,
                agreement=agree, feature_std=0.05 + s / 1e4, effective_rank=10 + s / 10)


def write_run(path, records, results=None):
    path.mkdir(parents=True, exist_ok=True)
    (path / 'metrics.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))
    if results is not None: (path / 'results.json').write_text(json.dumps({'dataset': 'x', 'rows': results}))
    return path


def make_dino(path, offset=0.):
    "A run in the layout of sslkd.train.fit: start, steps 0..40 every 10, a mid-epoch eval, end-of-epoch records."
    recs = [{'event': 'start', 'total_steps': 50, 'steps_per_epoch': 25, 'epochs': 2},
            dino_like(0, 0, 4.0 + offset, 3.0), dino_like(10, 0, 3.8 + offset, 3.1, 0.6),
            {'step': 12, 'epochs_done': 0.5, 'train_seconds': 1.0, 'knn_top1': 50. + offset, 'knn_top5': 90.},
            dino_like(20, 0, 3.6 + offset, 3.2, 0.7),
            {'epoch': 0, 'step': 25, 'epochs_done': 1.0, 'loss': 3.5, 'train_seconds': 2.0, 'images_per_s': 10.,
             'knn_top1': 55. + offset, 'knn_top5': 92.},
            dino_like(30, 1, 3.4 + offset, 3.3, 0.8), dino_like(40, 1, 3.2 + offset, 3.4, 0.9),
            {'epoch': 1, 'step': 50, 'epochs_done': 2.0, 'loss': 3.1, 'train_seconds': 4.0, 'images_per_s': 10.,
             'knn_top1': 60. + offset, 'knn_top5': 95.}]
    return write_run(path, recs)


def make_contrastive(path):
    "A method that logs only the feature signals (one of them NaN at one step)."
    recs = [{'event': 'start', 'total_steps': 20, 'steps_per_epoch': 20, 'epochs': 1},
            step(0, 0, 2.0, feature_std=0.04, effective_rank=5.),
            step(10, 0, 1.5, feature_std=float('nan'), effective_rank=6.),
            {'epoch': 0, 'step': 20, 'epochs_done': 1.0, 'loss': 1.4, 'train_seconds': 1., 'images_per_s': 5.,
             'knn_top1': 40., 'knn_top5': 80.}]
    return write_run(path, recs)


# --- reading ---

def test_read_and_split(tmp_path):
    run = make_dino(tmp_path / 'dino')
    recs = read_metrics(run)
    assert len(recs) == 9 and recs[0]['event'] == 'start'
    assert read_metrics(run / 'metrics.jsonl') == recs  # the file itself works too
    steps, evals = step_records(recs), eval_records(recs)
    assert [r['step'] for r in steps] == [0, 10, 20, 30, 40]
    assert [r['loss'] for r in steps] == [4.0, 3.8, 3.6, 3.4, 3.2]
    assert [(r['epochs_done'], r['knn_top1']) for r in evals] == [(0.5, 50.), (1.0, 55.), (2.0, 60.)]
    assert [r['knn_top5'] for r in eval_records(recs, 'knn_top5')] == [90., 92., 95.]


def test_resumed_run_keeps_the_later_records(tmp_path):
    "A resume re-logs the steps after the last checkpoint: the later record of a step wins, each step appears once."
    recs = [{'event': 'start'}, step(0, 0, 5.), step(10, 0, 4.), step(20, 0, 3.),
            {'epoch': 0, 'step': 25, 'epochs_done': 1.0, 'loss': 3., 'knn_top1': 10.},
            step(10, 0, 40.), step(20, 0, 30.), step(30, 1, 2.),
            {'epoch': 0, 'step': 25, 'epochs_done': 1.0, 'loss': 3., 'knn_top1': 11.}]
    got = step_records(read_metrics(write_run(tmp_path / 'r', recs)))
    assert [(r['step'], r['loss']) for r in got] == [(0, 5.), (10, 40.), (20, 30.), (30, 2.)]
    assert [r['knn_top1'] for r in eval_records(recs)] == [11.]


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r'metrics\.jsonl.*sslkd train --out'):
        read_metrics(tmp_path / 'nothing')
    run = make_dino(tmp_path / 'dino')
    with open(run / 'metrics.jsonl', 'a') as f: f.write('{"step": 50, "lo')  # killed mid-write
    with pytest.warns(UserWarning, match='unfinished last line'):
        assert len(read_metrics(run)) == 9
    lines = (run / 'metrics.jsonl').read_text().splitlines()
    (run / 'metrics.jsonl').write_text('\n'.join(lines[:3] + ['not json'] + lines[3:-1]) + '\n')
    with pytest.raises(ValueError, match='line 4 is not JSON'):
        read_metrics(run)


def test_nan_is_read(tmp_path):
    run = make_contrastive(tmp_path / 'c')
    assert math.isnan(step_records(read_metrics(run))[1]['feature_std'])


# --- curves ---

def test_loss_curves_data(tmp_path):
    a, b = make_dino(tmp_path / 'a'), make_dino(tmp_path / 'b', offset=1.)
    fig = plot_loss_curves({'A': a, 'B': b})
    ax = fig.axes[0]
    assert [l.get_label() for l in ax.lines] == ['A', 'B']
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0, 10, 20, 30, 40])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [4.0, 3.8, 3.6, 3.4, 3.2])
    np.testing.assert_allclose(ax.lines[1].get_ydata(), [5.0, 4.8, 4.6, 4.4, 4.2])
    assert ax.lines[0].get_color() != ax.lines[1].get_color()


def test_list_of_folders_is_labelled_by_name(tmp_path):
    fig = plot_loss_curves([make_dino(tmp_path / 'dino-s0'), make_contrastive(tmp_path / 'simclr-s0')])
    assert [l.get_label() for l in fig.axes[0].lines] == ['dino-s0', 'simclr-s0']


def test_seeds_mean_and_band(tmp_path):
    s0, s1 = make_dino(tmp_path / 's0'), make_dino(tmp_path / 's1', offset=1.)
    # a third seed that stopped early: only the steps all seeds logged are averaged
    recs = read_metrics(s0)[:5]
    s2 = write_run(tmp_path / 's2', recs)
    fig = plot_loss_curves({'dino': [s0, s1, s2]})
    ax = fig.axes[0]
    assert len(ax.lines) == 1 and ax.lines[0].get_label() == 'dino (mean of 3 seeds)'
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0, 10, 20])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), np.array([4.0, 3.8, 3.6]) + 1 / 3)
    band = ax.collections[0].get_paths()[0].vertices
    assert band[:, 1].min() == pytest.approx(3.6) and band[:, 1].max() == pytest.approx(5.0)


def test_knn_curves_with_baseline(tmp_path):
    dino = make_dino(tmp_path / 'dino')
    start = [{'event': 'start', 'total_steps': 0}]
    rnd = write_run(tmp_path / 'random', start, results=[{'method': 'random', 'knn_top1': 42.5}])
    rnd2 = write_run(tmp_path / 'random2', start, results=[{'method': 'random', 'knn_top1': 44.5}])
    none = write_run(tmp_path / 'none', [{'event': 'start', 'total_steps': 0}])
    fig = plot_knn_curves({'dino': dino, 'random': [rnd, rnd2], 'nothing': none})
    ax = fig.axes[0]
    assert [l.get_label() for l in ax.lines] == ['dino', 'random (final)']
    np.testing.assert_array_equal(ax.lines[0].get_xdata(), [0.5, 1.0, 2.0])
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [50., 55., 60.])
    np.testing.assert_array_equal(ax.lines[1].get_ydata(), [43.5, 43.5])
    fig5 = plot_knn_curves({'dino': dino}, key='knn_top5')
    np.testing.assert_array_equal(fig5.axes[0].lines[0].get_ydata(), [90., 92., 95.])


def test_knn_curves_mark_the_final_evaluation(tmp_path):
    "The final kNN (whole training set as memory) is a star at the run's last epoch, not a point of the periodic curve."
    dino = make_dino(tmp_path / 'dino')
    (tmp_path / 'dino' / 'results.json').write_text(json.dumps({'rows': [{'method': 'dino', 'knn_top1': 63.0}]}))
    ax = plot_knn_curves({'dino': dino}).axes[0]
    star = [l for l in ax.lines if l.get_marker() == '*']
    assert len(star) == 1 and list(star[0].get_xdata()) == [2.0] and list(star[0].get_ydata()) == [63.0]
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [50., 55., 60.])  # the curve is unchanged
    assert 'whole training set' in ax.get_title()


def test_agreement(tmp_path):
    fig = plot_agreement({'dino': make_dino(tmp_path / 'd'), 'simclr': make_contrastive(tmp_path / 'c')})
    ax = fig.axes[0]
    assert [l.get_label() for l in ax.lines] == ['dino']  # the contrastive run logs no agreement
    np.testing.assert_array_equal(ax.lines[0].get_ydata(), [0.5, 0.6, 0.7, 0.8, 0.9])


def test_collapse_signals_skip_missing(tmp_path):
    runs = {'dino': make_dino(tmp_path / 'd'), 'simclr': make_contrastive(tmp_path / 'c')}
    fig = plot_collapse_signals(runs)
    panels = dict(zip(COLLAPSE_PANELS, fig.axes))
    assert len(fig.axes) == 6  # 5 panels on a 2x3 grid, the sixth holds the legend
    ent = panels['teacher_entropy']
    assert [l.get_label() for l in ent.lines] == ['dino', f'ln K = {LN_K:.2f} (K = 64)']
    np.testing.assert_array_equal(ent.lines[0].get_ydata(), [3.0, 3.1, 3.2, 3.3, 3.4])
    np.testing.assert_allclose(ent.lines[1].get_ydata(), [LN_K, LN_K], atol=1e-6)
    assert ent.lines[1].get_linestyle() == '--'
    np.testing.assert_allclose(panels['teacher_mean_entropy'].lines[0].get_ydata(), [3.2, 3.3, 3.4, 3.5, 3.6])
    assert [l.get_label() for l in panels['kl_teacher_student'].lines] == ['dino']
    # both runs log feature signals; the NaN step of the contrastive run is skipped
    fs = panels['feature_std']
    assert [l.get_label() for l in fs.lines] == ['dino', 'simclr']
    np.testing.assert_array_equal(fs.lines[1].get_xdata(), [0])
    np.testing.assert_array_equal(panels['effective_rank'].lines[1].get_ydata(), [5., 6.])
    # only contrastive runs: the entropy panel is empty (no ln K line) and says so
    fig = plot_collapse_signals({'simclr': runs['simclr']}, signals=['teacher_entropy', 'feature_std'])
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 0 and 'no run logs' in fig.axes[0].texts[0].get_text()


def test_draw_on_given_axes_and_save(tmp_path):
    run = make_dino(tmp_path / 'd')
    fig, axs = plt.subplots(1, 2)
    assert plot_loss_curves({'d': run}, ax=axs[0]) is fig
    assert plot_agreement({'d': run}, ax=axs[1], save=tmp_path / 'out' / 'a.png') is fig
    assert len(axs[0].lines) == 1 and len(axs[1].lines) == 1
    assert (tmp_path / 'out' / 'a.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    f = plot_collapse_signals({'d': run}, save=tmp_path / 'c.png')
    assert (tmp_path / 'c.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    p = save_figure(plot_knn_curves({'d': run}), tmp_path / 'k.png')
    assert p.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert f.number in plt.get_fignums() and len(plt.get_fignums()) == 2  # save_figure closed its figure


# --- attention ---

def tiny_vit():
    torch.manual_seed(0)
    return vit_nano(12, 2, 1, depth=2, embed_dim=16, num_heads=2)  # 6x6 = 36 tokens


def images(n=3, size=12):
    return torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def test_cls_attention_rows():
    vit, x = tiny_vit(), images()
    vit.train()
    rows = cls_attention(vit, x, (0.5,), (0.25,))
    assert rows.shape == (3, 2, 37)
    torch.testing.assert_close(rows.sum(-1), torch.ones(3, 2))
    assert vit.training  # the mode is restored
    vit.eval()
    with torch.no_grad(): ref = vit.attention_maps(normalize(x, (0.5,), (0.25,)))
    torch.testing.assert_close(rows, ref[-1][:, :, 0])
    torch.testing.assert_close(cls_attention(vit, x, (0.5,), (0.25,), layer=0), ref[0][:, :, 0])
    grid = attention_grid(rows, (6, 6))
    assert grid.shape == (3, 2, 6, 6)
    torch.testing.assert_close(grid[1, 0, 2, 3], rows[1, 0, 1 + 2 * 6 + 3])
    with pytest.raises(ValueError, match='grid'): attention_grid(rows, (5, 5))
    with pytest.raises(IndexError, match='2 blocks'): cls_attention(vit, x, (0.5,), (0.25,), layer=2)


def test_plot_attention_maps():
    vit, x = tiny_vit(), images()
    fig = plot_attention_maps(vit, x, (0.5,), (0.25,))
    assert len(fig.axes) == 3 * (1 + 2)
    assert all(len(ax.images) == 1 for ax in fig.axes)  # one image per (image, head), plus the inputs
    maps = attention_grid(cls_attention(vit, x, (0.5,), (0.25,)), (6, 6))
    for i in range(3):
        np.testing.assert_allclose(fig.axes[3 * i].images[0].get_array(), x[i, 0].float().numpy() / 255)
        for h in range(2):
            np.testing.assert_allclose(fig.axes[3 * i + 1 + h].images[0].get_array(), maps[i, h].numpy(), rtol=1e-6)
    fig = plot_attention_maps(vit, x[0], (0.5,), (0.25,), vmax=0.5)  # one image (C, H, W), one colour scale
    assert len(fig.axes) == 3 and fig.axes[1].images[0].get_clim() == (0, 0.5)


def test_attention_accepts_a_method_and_rejects_cnns():
    class Method(torch.nn.Module):
        def __init__(self): super().__init__(); self.teacher = tiny_vit()
        def eval_backbone(self): return self.teacher
    m, x = Method(), images(2)
    torch.testing.assert_close(cls_attention(m, x, (0.5,), (0.25,)), cls_attention(m.teacher, x, (0.5,), (0.25,)))
    with pytest.raises(ValueError, match='needs? a ViT|ViT backbone'):
        plot_attention_maps(small_cnn(1), images(2, 28), (0.5,), (0.25,))
