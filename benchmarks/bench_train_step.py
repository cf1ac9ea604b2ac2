"""Training throughput (images/s) of the dino and ibot steps with the Fashion-MNIST defaults.

    python benchmarks/bench_train_step.py [--device cuda] [--methods dino,ibot] [--batch-size N] [--patch P]
                                          [--amp bf16] [--compile on] [--arch vit_tiny --depth 6] [--set KEY=VALUE]

A step is what `sslkd train` does per batch: multi-crop augmentation, student and teacher forward, loss,
backward, gradient clipping, AdamW, EMA teacher update. Median of the timed steps after warm-up. With
`--compile on` the step's tensor work is compiled first (`compile_step`); the warm-up steps' time is printed as
the compile time.
"""
import argparse, statistics, time
import torch
from sslkd.data import ImageData
from sslkd.data import FASHION_MEAN, FASHION_STD
from sslkd.registry import describe, build_backbone, dataset_defaults, parse_overrides, METHODS
from sslkd.train import TrainConfig, train_step, param_groups, resolve_device, compile_step

def bench(method_name, data_name, dev, batch_size, steps, warmup, patch=None, overrides=(), amp='off', compile='off',
          arch=None, depth=None):
    d = dataset_defaults(data_name, method_name)
    batch_size = batch_size or d.batch_size
    shape = (1, 28, 28) if data_name == 'fashion_mnist' else (3, 32, 32)
    mean, std = (FASHION_MEAN, FASHION_STD) if shape[0] == 1 else ((0.5,) * 3, (0.25,) * 3)
    x = torch.randint(0, 256, (batch_size, *shape), dtype=torch.uint8, device=dev)
    data = ImageData(x.cpu(), torch.zeros(batch_size, dtype=torch.long), ['x'], mean, std)
    torch.manual_seed(0)
    arch = arch or d.arch
    spec, patch = METHODS[method_name], patch or (d.patch if arch.startswith('vit') else None)
    cfg = spec.make_config(**parse_overrides(overrides, spec.config))
    kw = {**({'use_mask_token': True} if spec.mask_token else {}), **({'depth': depth} if depth else {})}
    method = spec.cls(build_backbone(arch, shape[-1], shape[0], patch, **kw), shape[-1], shape[0], mean, std, cfg)
    method.to(dev)
    cfg = TrainConfig(batch_size=batch_size, device=str(dev), amp=amp, compile=compile)
    compile_step(method, compile, dev)
    opt = torch.optim.AdamW(param_groups(method.student), lr=cfg.lr)
    g = torch.Generator(device=dev).manual_seed(0)
    times, t_start = [], time.perf_counter()
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        train_step(method, opt, x, g, cfg, dev, i, 10**6, 10**6)
        if dev.type == 'cuda': torch.cuda.synchronize()
        if i >= warmup: times.append(time.perf_counter() - t0)
        if i == warmup - 1: warm = time.perf_counter() - t_start
    return arch, patch, batch_size, batch_size / statistics.median(times), warm

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--device', default='cpu'); p.add_argument('--methods', default='dino,ibot')
    p.add_argument('--data', default='fashion_mnist')
    p.add_argument('--batch-size', type=int, default=None, help='default: the dataset default')
    p.add_argument('--steps', type=int, default=5); p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--patch', type=int, default=None, help='ViT patch size (default: the dataset default)')
    p.add_argument('--amp', default='off', help='autocast precision: off (fp32), bf16, fp16 or auto')
    p.add_argument('--compile', default='off', help="compile the step's tensor work: off or on")
    p.add_argument('--arch', default=None, help='backbone (default: the dataset default)')
    p.add_argument('--depth', type=int, default=None, help="ViT blocks (default: the architecture's)")
    p.add_argument('--set', action='append', default=[], metavar='KEY=VALUE', help='method setting, as in sslkd train')
    a = p.parse_args()
    dev = resolve_device(a.device)
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, {a.data} defaults")
    for m in a.methods.split(','):
        arch, patch, bs, ips, warm = bench(m, a.data, dev, a.batch_size, a.steps, a.warmup, a.patch, a.set, a.amp,
                                           a.compile, a.arch, a.depth)
        extra = f"  ({' '.join(a.set)})" if a.set else ''
        depth = f" depth {a.depth}" if a.depth else ''
        print(f"{m:16s} {arch}{depth} patch {patch} batch {bs} amp {a.amp} compile {a.compile}: {ips:8.1f} images/s, "
              f"warm-up {warm:.0f} s" + extra)
