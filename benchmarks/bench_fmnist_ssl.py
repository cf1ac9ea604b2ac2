r"""Fashion-MNIST self-supervised benchmark on this machine: `sslkd compare` with the Fashion-MNIST defaults of each
method, every run with the same training-time budget, evaluated on the test split (final checkpoint, teacher
backbone, kNN k=20 T=0.07 and a linear probe). Prints the table (mean and std over seeds), each run against the
untrained backbone of the same seed and against raw pixels, the kNN-vs-epoch curves and the last collapse
signals; results.md and the plots are written next to the runs.

    python benchmarks/bench_fmnist_ssl.py [--minutes 10] [--methods random,dino,ibot] [--seeds 0] \
        [--out runs/bench_fmnist]
    python benchmarks/bench_fmnist_ssl.py \
        --methods ibot,ibot_rkd_d,ibot_rkd_a,ibot_rkd_da,ibot_rkd_struct,multi_teacher --seeds 0,1,2
    python benchmarks/bench_fmnist_ssl.py --methods random@small_cnn,simclr,moco,byol,random@vit_nano/4,mae \
        --out runs/fmnist_baselines

A method written METHOD@ARCH or METHOD@ARCH/PATCH trains that backbone instead of the method's default
(`random@small_cnn` is the untrained CNN the contrastive methods start from). Each run is compared with the untrained
backbone of the same architecture, patch size and seed, when that row is in the table.

Runs are stored in OUT/METHOD-sSEED; re-running skips runs whose results.json exists (delete it to start again).
Anything after `--` is a method setting for every row, as with `sslkd train --set` (e.g. `-- n_local=0`).
Time budgets are only honest on an otherwise idle machine: the number of steps is fixed from the first steps' speed.
"""
import argparse
from pathlib import Path
from sslkd.registry import parse_overrides, method_spec
from sslkd.runner import Row, run_rows, results_markdown, comparison_plots, write_results
from sslkd.viz import read_metrics, step_records, eval_records

RAW_PIXELS_KNN = 86.05  # weighted kNN on mean-centred raw pixels, k=20, T=0.07 (tests/test_evaluate.py)
SIGNALS = ('teacher_entropy', 'ln_K', 'teacher_mean_entropy', 'kl_teacher_student', 'agreement', 'feature_std',
           'effective_rank')

def _row(name):
    """'simclr' -> Row('simclr'); 'random@small_cnn' -> the untrained small CNN; 'random@vit_nano/4' -> that ViT at
    patch 4."""
    method, _, backbone = name.partition('@')
    if not backbone: return Row(method)
    arch, _, patch = backbone.partition('/')
    return Row(method, f'{method} ({backbone})', {'arch': arch, 'patch': int(patch) if patch else None})

def _backbone(r): return r['arch'], r.get('patch'), r['seed']

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--minutes', type=float, default=10); p.add_argument('--methods', default='random,dino,ibot')
    p.add_argument('--seeds', default='0', help='comma-separated seeds, e.g. 0,1,2')
    p.add_argument('--out', default='runs/bench_fmnist')
    p.add_argument('--eval-every', type=float, default=0.25,
                   help='kNN on the test split every this many epochs (the curve)')
    p.add_argument('settings', nargs='*', help='KEY=VALUE settings of every row\'s method, after --')
    a = p.parse_args()
    seeds, out = [int(s) for s in a.seeds.split(',')], Path(a.out)
    todo = [_row(m) for m in a.methods.split(',')]
    for r in todo: r.args['settings'] = parse_overrides(a.settings, method_spec(r.method).config)
    rows = run_rows(todo, 'fashion_mnist', out, seeds, minutes=a.minutes,
                    common={'eval_every': a.eval_every, 'progress': False})
    write_results(out / 'results.json', 'fashion_mnist', rows)
    md = results_markdown(rows, 'fashion_mnist', f'{a.minutes:g} min per run, seeds {a.seeds}')
    (out / 'results.md').write_text(md); print('\n' + md)
    base = {_backbone(r): r['knn_top1'] for r in rows if r['method'] == 'random'}
    print(f"per run: kNN@1 against the untrained backbone (same architecture, patch and seed) "
          f"and against raw pixels ({RAW_PIXELS_KNN})")
    for r in rows:
        b = base.get(_backbone(r))
        vs = f"{r['knn_top1'] - b:+6.2f} vs random" if b is not None and r['method'] != 'random' else ' ' * 16
        print(f"  {r['label']:18s} {r['arch']:9s} s{r['seed']} {r['epochs']:5.2f} ep {r['train_seconds']:5.0f} s  "
              f"kNN@1 {r['knn_top1']:6.2f}  {vs}  {r['knn_top1'] - RAW_PIXELS_KNN:+6.2f} vs pixels")
    for r in rows:
        recs = read_metrics(r['run'])
        curve = [(e['epochs_done'], round(e['knn_top1'], 2)) for e in eval_records(recs)]
        if curve: print(f"{r['label']} s{r['seed']}: kNN@1 by epochs done {curve}; images/s per epoch "
                        f"{[e['images_per_s'] for e in recs if 'images_per_s' in e]}")
        sig = [e for e in step_records(recs) if 'effective_rank' in e]
        if sig: print(f"{r['label']} s{r['seed']}: last signals at step {sig[-1]['step']}: "
                      + ', '.join(f"{k} {sig[-1][k]:.4g}" for k in SIGNALS if k in sig[-1]))
    plots = comparison_plots(rows, out)
    print(f"plots: {', '.join(str(p) for p in plots)}")

if __name__ == '__main__': main()
