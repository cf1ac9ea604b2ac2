"""Fashion-MNIST self-supervised benchmark on this machine: `sslkd train` with the Fashion-MNIST defaults for each
method and seed, each with the same training-time budget, evaluated on the test split (final checkpoint, teacher
backbone, kNN k=20 T=0.07 and a linear probe). Prints one row per run, then mean and std over seeds per method,
the kNN-vs-epoch curves and the last collapse signals, and saves curves.png next to the runs.

    python benchmarks/bench_fmnist_ssl.py [--minutes 10] [--methods random,dino,ibot] [--seeds 0] [--out runs/bench_fmnist]
    python benchmarks/bench_fmnist_ssl.py --methods ibot,ibot_rkd_d,ibot_rkd_a,ibot_rkd_da,ibot_rkd_struct,multi_teacher --seeds 0,1,2

Runs are stored in OUT/METHOD-sSEED; re-running skips runs whose results.json exists (delete it to start again).
Anything after `--` goes to `sslkd train` (e.g. `-- --set n_local=0`).
"""
import argparse, json, statistics, subprocess, sys
from pathlib import Path

RAW_PIXELS_KNN = 86.05  # weighted kNN on mean-centred raw pixels, k=20, T=0.07 (tests/test_evaluate.py)

def run(method, seed, a):
    out = Path(a.out) / f'{method}-s{seed}'
    if not (out / 'results.json').exists():
        cmd = [sys.executable, '-c', 'from sslkd.experiment import main; main()', 'train', '--method', method, '--data', 'fashion_mnist',
               '--minutes', str(a.minutes), '--seed', str(seed), '--eval-every', str(a.eval_every), '--out', str(out), '--no-progress', *a.extra]
        print('+ sslkd', ' '.join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)
    row = json.loads((out / 'results.json').read_text())['rows'][0]
    lines = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()] if (out / 'metrics.jsonl').exists() else []
    return row, lines

def mean_std(xs):
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float('nan'))

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--minutes', type=float, default=10); p.add_argument('--methods', default='random,dino,ibot')
    p.add_argument('--seeds', default='0', help='comma-separated seeds, e.g. 0,1,2')
    p.add_argument('--out', default='runs/bench_fmnist')
    p.add_argument('--eval-every', type=float, default=0.25, help='kNN on the test split every this many epochs (the curve)')
    p.add_argument('extra', nargs='*', help='more `sslkd train` options, after --')
    a = p.parse_args()
    methods, seeds = a.methods.split(','), [int(s) for s in a.seeds.split(',')]
    res = {(m, s): run(m, s, a) for m in methods for s in seeds}
    print(f"\nFashion-MNIST, {a.minutes:g} min training budget per run, test split, final checkpoint, kNN k=20 T=0.07")
    print(f"{'method':16s} {'seed':>4s} {'epochs':>6s} {'train s':>7s} {'kNN@1':>6s} {'kNN@5':>6s} {'lin@1':>6s} {'lin@5':>6s} "
          f"{'vs random':>9s} {'vs pixels':>9s}")
    for (m, s), (r, _) in res.items():
        base = res.get(('random', s), (None,))[0]
        d = f"{r['knn_top1'] - base['knn_top1']:+9.2f}" if base else ' ' * 9
        print(f"{m:16s} {s:4d} {r['epochs']:6.2f} {r['train_seconds']:7.0f} {r['knn_top1']:6.2f} {r['knn_top5']:6.2f} "
              f"{r.get('linear_top1', float('nan')):6.2f} {r.get('linear_top5', float('nan')):6.2f} {d} {r['knn_top1'] - RAW_PIXELS_KNN:+9.2f}")
    if len(seeds) > 1:
        print(f"\nmean +- std over seeds {a.seeds} (raw pixels: kNN@1 {RAW_PIXELS_KNN})")
        print(f"{'method':16s} {'n':>2s} {'kNN@1':>14s} {'kNN@5':>14s} {'lin@1':>14s} {'epochs':>6s}")
        for m in methods:
            rows = [res[m, s][0] for s in seeds]
            cols = [mean_std([r.get(k, float('nan')) for r in rows]) for k in ('knn_top1', 'knn_top5', 'linear_top1')]
            print(f"{m:16s} {len(rows):2d} " + ' '.join(f"{mu:6.2f} +- {sd:4.2f}" for mu, sd in cols)
                  + f" {statistics.mean(r['epochs'] for r in rows):6.2f}")
    for (m, s), (r, lines) in res.items():
        curve = [(l['epochs_done'], round(l['knn_top1'], 2)) for l in lines if 'knn_top1' in l and 'epochs_done' in l]
        sig = [l for l in lines if 'effective_rank' in l and 'step' in l]
        ips = [l['images_per_s'] for l in lines if 'images_per_s' in l]
        if curve: print(f"{m} s{s}: kNN@1 by epochs done {curve}; images/s per epoch {ips}")
        if sig:
            last = sig[-1]
            keys = ('teacher_entropy', 'ln_K', 'teacher_mean_entropy', 'kl_teacher_student', 'agreement', 'feature_std', 'effective_rank')
            print(f"{m} s{s}: last signals at step {last['step']}: " + ', '.join(f"{k} {last[k]:.4g}" for k in keys if k in last))
    try:
        import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
        keys = ['knn_top1', 'loss', 'teacher_entropy', 'kl_teacher_student', 'agreement', 'effective_rank']
        fig, axs = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
        for (m, s), (_, lines) in res.items():
            if s != seeds[0]: continue
            ev = [l for l in lines if 'knn_top1' in l and 'epochs_done' in l]
            if ev: axs[0].plot([l['epochs_done'] for l in ev], [l['knn_top1'] for l in ev], 'o-', label=m)
            sig = [l for l in lines if 'effective_rank' in l and 'step' in l]
            for ax, k in zip(axs[1:], keys[1:]):
                pts = [(l['step'], l[k]) for l in sig if k in l]
                if pts: ax.plot(*zip(*pts), label=m)
        axs[0].axhline(RAW_PIXELS_KNN, ls='--', c='gray', label='raw pixels')
        axs[0].set_xlabel('epochs'); axs[0].set_title(f'test kNN@1 (seed {seeds[0]})')
        for ax, k in zip(axs[1:], keys[1:]): ax.set_title(k); ax.set_xlabel('step')
        axs[0].legend(fontsize=7); fig.tight_layout(); fig.savefig(Path(a.out) / 'curves.png', dpi=80)
        print(f"saved {Path(a.out) / 'curves.png'}")
    except Exception as e: print('no plot:', e)

if __name__ == '__main__': main()
