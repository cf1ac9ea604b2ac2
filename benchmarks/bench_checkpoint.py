"""What one checkpoint costs: its size and the seconds to write it, for the methods' CPU and GPU configurations.

    python benchmarks/bench_checkpoint.py [--methods dino,ibot] [--repeats 3] [--dir /tmp]

A checkpoint holds what `fit` writes: the method (student, teacher, heads, centres), AdamW's two moments for
every trained parameter, the random states and the counters; written atomically (temporary file, fsync, rename).
The default `--checkpoint-every` is chosen from these numbers: at 5 minutes, the write costs this many seconds
in 300.
"""
import argparse, statistics, tempfile, time
from pathlib import Path
import torch
from sslkd.checkpoint import CHECKPOINT_FORMAT, save_checkpoint, rng_state
from sslkd.registry import METHODS, build_backbone
from sslkd.train import param_groups

CONFIGS = {'fashion_mnist, vit_nano/7': ('vit_nano', 7, 28, 1), 'cifar10, vit_small/4': ('vit_small', 4, 32, 3)}


def checkpoint_of(name, arch, patch, size, chans):
    spec = METHODS[name]
    bb = build_backbone(arch, size, chans, patch, **({'use_mask_token': True} if spec.mask_token else {}))
    m = spec.cls(bb, size, chans, (0.5,) * chans, (0.25,) * chans, spec.make_config())
    opt = torch.optim.AdamW(param_groups(m.student))
    for p in m.student.parameters(): p.grad = torch.zeros_like(p)
    opt.step()  # AdamW's moments exist from the first step on
    g = torch.Generator()
    return {'format': CHECKPOINT_FORMAT, 'method': m.state_dict(), 'optimizer': opt.state_dict(),
            'rng': rng_state(g), 'step': 1, 'history': []}


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', default='dino,ibot'); p.add_argument('--repeats', type=int, default=3)
    p.add_argument('--dir', default=None, help='where to write (default: a temporary folder)')
    a = p.parse_args()
    folder = Path(a.dir or tempfile.mkdtemp())
    for label, (arch, patch, size, chans) in CONFIGS.items():
        for name in a.methods.split(','):
            ck, path = checkpoint_of(name, arch, patch, size, chans), folder / 'checkpoint.pt'
            times = []
            for _ in range(a.repeats):
                t = time.perf_counter(); save_checkpoint(ck, path); times.append(time.perf_counter() - t)
            sec = statistics.median(times)
            print(f"{name:6s} {label}: {path.stat().st_size / 2**20:7.1f} MiB, {sec:6.2f} s per checkpoint "
                  f"({100 * sec / 300:.2f}% of 5 minutes)")
            path.unlink()
