"""What `--compile on` gains per method on this device: eager and compiled steps timed in alternation.

    python benchmarks/bench_compile.py [--methods dino,simclr] [--rounds 6] [--device cpu]

Two copies of a method at its Fashion-MNIST defaults, one with its `forward_loss` compiled (`compile_step`). After
the compiled copy's warm-up (the compile, then one recompile when the schedules' floats change), the two take
turns, one step each, so that a machine whose speed drifts slows both alike. Prints images/s of each, the ratio of
medians, and the compile time.
"""
import argparse, statistics, time
import torch
from sslkd.data import FASHION_MEAN, FASHION_STD
from sslkd.registry import METHODS, build_backbone, dataset_defaults
from sslkd.train import TrainConfig, train_step, param_groups, resolve_device, compile_step


def build(name, dev):
    d, spec = dataset_defaults('fashion_mnist', name), METHODS[name]
    torch.manual_seed(0)
    bb = build_backbone(d.arch, 28, 1, d.patch if d.arch.startswith('vit') else None,
                        **({'use_mask_token': True} if spec.mask_token else {}))
    m = spec.cls(bb, 28, 1, FASHION_MEAN, FASHION_STD, spec.make_config(**d.config)).to(dev)
    return m, torch.optim.AdamW(param_groups(m.student)), d.batch_size


def step(m, opt, x, g, cfg, dev, i):
    t = time.perf_counter()
    train_step(m, opt, x, g, cfg, dev, i, 10**6, 10**6)
    if dev.type == 'cuda': torch.cuda.synchronize()
    return time.perf_counter() - t


if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--methods', default='dino,simclr'); p.add_argument('--rounds', type=int, default=6)
    p.add_argument('--device', default='cpu')
    a = p.parse_args()
    dev = resolve_device(a.device)
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads")
    for name in a.methods.split(','):
        (e, eo, bs), (c, co, _) = build(name, dev), build(name, dev)
        compile_step(c, 'on', dev)
        x = torch.randint(0, 256, (bs, 1, 28, 28), dtype=torch.uint8, device=dev)
        g, cfg = torch.Generator(device=dev).manual_seed(0), TrainConfig(batch_size=bs, device=str(dev), amp='off')
        warm = sum(step(c, co, x, g, cfg, dev, i) for i in range(3))
        step(e, eo, x, g, cfg, dev, 0)
        te, tc = [], []
        for i in range(3, 3 + a.rounds):
            te.append(step(e, eo, x, g, cfg, dev, i)); tc.append(step(c, co, x, g, cfg, dev, i))
        ie, ic = bs / statistics.median(te), bs / statistics.median(tc)
        print(f"{name:16s} batch {bs}: eager {ie:7.1f} images/s, compiled {ic:7.1f} images/s ({ic / ie:.2f}x), "
              f"compile and warm-up {warm:.0f} s")
