"""Fashion-MNIST self-supervised benchmark on this machine: `sslkd train` with the Fashion-MNIST defaults for
random, dino and ibot, each with the same training-time budget, evaluated on the test split (final checkpoint,
teacher backbone, kNN k=20 T=0.07 and a linear probe). Prints the table, the kNN-vs-epoch curves and the last
collapse signals, and saves curves.png next to the runs.

    python benchmarks/bench_fmnist_ssl.py [--minutes 10] [--methods random,dino,ibot] [--out runs/bench_fmnist] [--seed 0] [--eval-every 0.25]

Re-running skips methods whose results.json exists (delete the folder to start again).
"""
import argparse, json, subprocess, sys
from pathlib import Path

RAW_PIXELS_KNN = 86.05  # weighted kNN on mean-centred raw pixels, k=20, T=0.07 (tests/test_evaluate.py)

def run(method, a):
    out = Path(a.out) / method
    if not (out / 'results.json').exists():
        cmd = [sys.executable, '-c', 'from sslkd.experiment import main; main()', 'train', '--method', method, '--data', 'fashion_mnist',
               '--minutes', str(a.minutes), '--seed', str(a.seed), '--eval-every', str(a.eval_every), '--out', str(out), '--no-progress', *a.extra]
        print('+ sslkd', ' '.join(cmd[3:]), flush=True)
        subprocess.run(cmd, check=True)
    row = json.loads((out / 'results.json').read_text())['rows'][0]
    lines = [json.loads(l) for l in (out / 'metrics.jsonl').read_text().splitlines()] if (out / 'metrics.jsonl').exists() else []
    return row, lines

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--minutes', type=float, default=10); p.add_argument('--methods', default='random,dino,ibot')
    p.add_argument('--out', default='runs/bench_fmnist'); p.add_argument('--seed', type=int, default=0)
    p.add_argument('--eval-every', type=float, default=0.25, help='kNN on the test split every this many epochs (the curve)')
    p.add_argument('extra', nargs='*', help='more `sslkd train` options, after --')
    a = p.parse_args()
    res = {m: run(m, a) for m in a.methods.split(',')}
    base = res.get('random', (None,))[0]
    print(f"\nFashion-MNIST, {a.minutes:g} min training budget per method, seed {a.seed}, test split, kNN k=20 T=0.07")
    print(f"{'method':8s} {'arch':9s} {'epochs':>6s} {'train s':>7s} {'kNN@1':>6s} {'kNN@5':>6s} {'lin@1':>6s} {'lin@5':>6s} "
          f"{'vs random':>9s} {'vs pixels':>9s}")
    for m, (r, _) in res.items():
        d = f"{r['knn_top1'] - base['knn_top1']:+9.2f}" if base else ' ' * 9
        print(f"{m:8s} {r['arch']:9s} {r['epochs']:6.2f} {r['train_seconds']:7.0f} {r['knn_top1']:6.2f} {r['knn_top5']:6.2f} "
              f"{r.get('linear_top1', float('nan')):6.2f} {r.get('linear_top5', float('nan')):6.2f} {d} {r['knn_top1'] - RAW_PIXELS_KNN:+9.2f}")
    for m, (r, lines) in res.items():
        curve = [(l['epochs_done'], round(l['knn_top1'], 2)) for l in lines if 'knn_top1' in l]
        sig = [l for l in lines if 'teacher_entropy' in l]
        ips = [l['images_per_s'] for l in lines if 'images_per_s' in l]
        if curve: print(f"{m}: kNN@1 by epoch (periodic eval) {curve}; images/s {ips}")
        if sig:
            s = sig[-1]
            print(f"{m}: last signals at step {s['step']}: teacher entropy {s['teacher_entropy']:.3f} / ln K {s['ln_K']:.3f}, "
                  f"mean entropy {s['teacher_mean_entropy']:.3f}, KL {s['kl_teacher_student']:.4f}, agreement {s['agreement']:.3f}, "
                  f"feature std {s['feature_std']:.4f}, effective rank {s['effective_rank']:.1f}")
    try:
        import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
        keys = ['loss', 'teacher_entropy', 'kl_teacher_student', 'agreement', 'effective_rank']
        fig, axs = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3))
        for m, (_, lines) in res.items():
            sig = [l for l in lines if 'teacher_entropy' in l]
            for ax, k in zip(axs, keys):
                if sig: ax.plot([l['step'] for l in sig], [l[k] for l in sig], label=m); ax.set_title(k); ax.set_xlabel('step')
        axs[0].legend(); fig.tight_layout(); fig.savefig(Path(a.out) / 'curves.png', dpi=80)
        print(f"saved {Path(a.out) / 'curves.png'}")
    except Exception as e: print('no plot:', e)

if __name__ == '__main__': main()
