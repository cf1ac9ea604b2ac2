"""Batched per-sample augmentation vs a per-image loop of the same ops (DINO multi-crop preset).

    python benchmarks/bench_augment.py                  # CPU, batch 256
    python benchmarks/bench_augment.py --device cuda    # batched on the GPU; the loop stays on --loop-device (cpu)

Inputs: Fashion-MNIST-shaped (1x28x28, 2 x 28 + 6 x 14 views) and CIFAR-shaped (3x32x32, 2 x 32 + 6 x 16 views)
uint8 batches. The per-image loop draws each image's parameters and applies them with the per-image reference ops
(`sample_view_params` on one image + `augment_one_image_reference` + `normalize`), as a DataLoader worker would;
the batched version is `MultiCrop.__call__`. Reports the median over repeats, after a warm-up. The per-image
reference ops are the ones the tests check the batched ops against, so they live in tests/test_augment.py.
"""
import argparse, statistics, sys, time
from pathlib import Path
import torch
from sslkd.augment import dino_augment, sample_view_params, normalize
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))
from test_augment import augment_one_image_reference

CONFIGS = [('Fashion-MNIST 1x28x28', 1, 28, (0.2860,), (0.3530,)),
           ('CIFAR 3x32x32', 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))]

def per_image_loop(x, aug, g):
    "Every image, every view, one at a time: draw its parameters, apply them, normalise."
    out = []
    for spec in aug.views:
        views = []
        for img in x:
            img = img.float() / 255
            p = sample_view_params(img[None], spec, g)
            views.append(normalize(augment_one_image_reference(img, p, spec), aug.mean, aug.std))
        out.append(torch.stack(views))
    return out

def median_seconds(fn, repeats, device):
    ts = []
    for _ in range(repeats):
        if device.type == 'cuda': torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == 'cuda': torch.cuda.synchronize(device)
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)

def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cpu', help='device of the batched version (cpu, cuda, cuda:1, ...)')
    ap.add_argument('--loop-device', default='cpu',
                    help='device of the per-image loop (where DataLoader workers run: cpu)')
    ap.add_argument('--batch', type=int, default=256)
    ap.add_argument('--n-local', type=int, default=6)
    ap.add_argument('--repeats', type=int, default=10, help='timed repeats of the batched version')
    ap.add_argument('--loop-repeats', type=int, default=3, help='timed repeats of the per-image loop')
    ap.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    args = ap.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    dev, loop_dev = torch.device(args.device), torch.device(args.loop_device)
    print(f'torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s), batched on {dev}, loop on {loop_dev}, '
          f'batch {args.batch}, DINO preset, median of {args.repeats} (batched) / {args.loop_repeats} (loop) runs\n')
    rows = []
    for name, C, S, mean, std in CONFIGS:
        aug = dino_augment(S, C, mean, std, n_local=args.n_local)
        x = torch.randint(0, 256, (args.batch, C, S, S), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        xb, xl = x.to(dev), x.to(loop_dev)
        gb, gl = torch.Generator(device=dev).manual_seed(0), torch.Generator(device=loop_dev).manual_seed(0)
        for _ in range(3): aug(xb, gb)  # warm-up
        per_image_loop(xl[:16], aug, gl)
        t_batch = median_seconds(lambda: aug(xb, gb), args.repeats, dev)
        t_loop = median_seconds(lambda: per_image_loop(xl, aug, gl), args.loop_repeats, loop_dev)
        views = f'2x{S} + {args.n_local}x{S // 2}'
        rows.append((name, views, args.batch / t_batch, args.batch / t_loop, t_loop / t_batch))
    head = ('input', 'views', f'batched img/s ({dev.type})', f'per-image img/s ({loop_dev.type})', 'speedup')
    w = [max(len(h), 14) for h in head]
    w[0] = max(w[0], max(len(r[0]) for r in rows))
    print('  '.join(h.ljust(n) for h, n in zip(head, w)))
    for r in rows:
        cells = (r[0], r[1], f'{r[2]:,.0f}', f'{r[3]:,.0f}', f'{r[4]:.1f}x')
        print('  '.join(c.ljust(n) for c, n in zip(cells, w)))

if __name__ == '__main__': main()
