"""What CIFAR-10 runs cost on a GPU, from FLOPs counted on this CPU (no GPU needed): the figures of the README's
"On a GPU" section.

    python benchmarks/bench_plan.py [--tflops 60] [--methods ibot,ibot_rkd_d,ibot_rkd_a,dino,simclr]

Per method at its CIFAR-10 configuration (ViT-S at patch 4 for the ViT methods, as in the rkd-cifar10 preset; the
registry's ResNet-18 for the contrastive ones): FLOPs per image per training step (forward and backward, counted
with `FlopCounterMode` on a step of four 32x32 RGB images), the memory estimate at batches 64 to 256 (fp32 weights,
gradients and AdamW moments, plus activations saved for backward in fp32: bf16 autocast keeps about half of them),
and the time of an epoch (50,000 images) and of 100 epochs at the stated sustained throughput.
"""
import argparse
import torch
from sslkd.data import ImageData
from sslkd.plan import step_cost
from sslkd.registry import METHODS, build_method, describe, dataset_defaults

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--tflops', type=float, default=60., help='sustained TFLOP/s assumed for the times')
    p.add_argument('--methods', default='ibot,ibot_rkd_d,ibot_rkd_a,dino,simclr')
    a = p.parse_args()
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    data = ImageData(x, torch.zeros(4, dtype=torch.long), ['x'], (0.5,) * 3, (0.25,) * 3)
    print(f"CIFAR-10 (50,000 train images), times at {a.tflops:g} TFLOP/s sustained; memory estimated in fp32")
    print(f"{'method':12s} {'backbone':16s} {'GFLOP/img':>9s} {'GiB@64':>7s} {'GiB@128':>8s} {'GiB@256':>8s} "
          f"{'s/epoch':>8s} {'h/100 ep':>9s}")
    for m in a.methods.split(','):
        d = dataset_defaults('cifar10', m)
        arch = 'vit_small' if d.arch.startswith('vit') else d.arch
        patch = 4 if arch.startswith('vit') else None
        torch.manual_seed(0)
        method = build_method(describe(m, arch, patch, data, METHODS[m].make_config(**d.config), dataset='cifar10'))
        flops, saved = step_cost(method, x, torch.Generator().manual_seed(0))
        n, trained = (sum(q.numel() for q in ps) for ps in (method.parameters(), method.student.parameters()))
        gib = [(16 * trained + 4 * (n - trained) + saved * b) / 2**30 for b in (64, 128, 256)]
        epoch = 50000 * flops / (a.tflops * 1e12)
        name = arch + (f'/{patch}' if patch else '')
        print(f"{m:12s} {name:16s} {flops / 1e9:9.2f} {gib[0]:7.1f} {gib[1]:8.1f} {gib[2]:8.1f} {epoch:8.1f} "
              f"{100 * epoch / 3600:9.2f}")
