"""Training throughput of the sslkd backbones: forward + backward + AdamW step, images per second.

    python benchmarks/bench_backbones.py [--device cuda] [--amp] [--batch 128] [--steps N] [--sweep-nano]

Each row times one training step on random input: forward, a scalar loss (mean square of the features),
backward, and an AdamW step (included: it is part of every real step). Warm-up steps first, then `--steps`
timed steps; the figure is batch / median step time (one view per image; halve it for two views).
ViTs use patch 4. `--amp` runs under bf16 autocast on CUDA. `--sweep-nano` also times candidate
`nano` widths / depths at 28 px, 1 channel (how the `nano` config was chosen).
"""
import argparse, time, statistics
import torch
from sslkd.vit import ViT, vit_archs, num_params
from sslkd.resnet import resnet_archs

ROWS = [  # (arch, img_size, in_chans)
    ('vit_nano', 28, 1), ('vit_nano', 32, 3), ('vit_tiny', 28, 1), ('vit_tiny', 32, 3),
    ('small_cnn', 28, 1), ('small_cnn', 32, 3), ('resnet18', 28, 1), ('resnet18', 32, 3)]
SLOW_ON_CPU = {'vit_tiny', 'resnet18'}  # smaller default batch on CPU so a run stays in minutes
NANO_CANDIDATES = [(64, 4, 4), (96, 4, 4), (128, 3, 4), (128, 4, 4), (128, 6, 4), (192, 4, 3), (192, 6, 3)]

def build(arch, img_size, in_chans):
    if arch in vit_archs: return vit_archs[arch](img_size=img_size, patch_size=4, in_chans=in_chans)
    return resnet_archs[arch](in_chans=in_chans)

def throughput(model, img_size, in_chans, batch, steps, warmup, device, amp):
    "Images/s of forward + backward + AdamW step (median over timed steps)."
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, in_chans, img_size, img_size, device=device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    times = []
    for i in range(warmup + steps):
        sync(); t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = model(x).float().square().mean()
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
        sync()
        if i >= warmup: times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--amp', action='store_true', help='bf16 autocast (CUDA)')
    ap.add_argument('--batch', type=int, default=128)
    ap.add_argument('--steps', type=int, default=None, help='timed steps (default 20 on CUDA, 5 on CPU)')
    ap.add_argument('--warmup', type=int, default=None, help='warm-up steps (default 5 on CUDA, 2 on CPU)')
    all_archs = ','.join(dict.fromkeys(a for a, _, _ in ROWS))
    ap.add_argument('--archs', default=None, help='comma-separated subset of ' + all_archs)
    ap.add_argument('--sweep-nano', action='store_true', help='also time candidate nano configs at 28 px, 1 channel')
    a = ap.parse_args()
    device = torch.device(a.device)
    cpu = device.type == 'cpu'
    if a.amp and cpu: print('note: --amp is for CUDA; on CPU bf16 autocast is usually slower')
    steps, warmup = a.steps or (5 if cpu else 20), a.warmup or (2 if cpu else 5)
    archs = a.archs.split(',') if a.archs else None
    cuda = device.type == 'cuda'
    where = f' ({torch.cuda.get_device_name(device)})' if cuda else f', {torch.get_num_threads()} threads'
    print(f'torch {torch.__version__}, device {device}{where}, amp={a.amp}, {warmup} warm-up + {steps} timed steps, '
          'AdamW step included')
    print(f"{'arch':10} {'input':>9} {'params':>11} {'batch':>6} {'img/s':>9}")
    for arch, size, ch in ROWS:
        if archs and arch not in archs: continue
        batch = min(a.batch, 32) if cpu and arch in SLOW_ON_CPU else a.batch
        torch.manual_seed(0)
        m = build(arch, size, ch)
        ips = throughput(m, size, ch, batch, steps, warmup, device, a.amp)
        print(f"{arch:10} {f'{size}px x{ch}':>9} {num_params(m):11,} {batch:6} {ips:9.0f}", flush=True)
    if a.sweep_nano:
        print('\nnano candidates, 28 px, 1 channel, patch 4 (width/depth/heads):')
        for d, L, h in NANO_CANDIDATES:
            torch.manual_seed(0)
            m = ViT(img_size=28, patch_size=4, in_chans=1, embed_dim=d, depth=L, num_heads=h)
            ips = throughput(m, 28, 1, a.batch, steps, warmup, device, a.amp)
            print(f"{f'{d}/{L}/{h}':10} {'28px x1':>9} {num_params(m):11,} {a.batch:6} {ips:9.0f}", flush=True)

if __name__ == '__main__': main()
