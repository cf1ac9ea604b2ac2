"Host syncs of one ordinary training step of a method, its augmentation held fixed: shared by the method tests."
import torch
from sslkd.data import ImageData, FASHION_MEAN, FASHION_STD
from sslkd.masking import HostSyncs
from sslkd.registry import METHODS, build_method, describe, dataset_defaults


class FixedViews:
    "The views `augment` made once, returned at every call: a step counted without the augmentation's own ops."
    def __init__(self, augment, x, g): self.n_global, self.views = augment.n_global, augment(x, g)
    def __call__(self, x, g): return self.views


def syncs_in_step(m, x, **kw):
    "Host syncs of one ordinary training step of `m` on `x`, its backward included; returns the counter and the logs."
    m.augment = FixedViews(m.augment, x, torch.Generator().manual_seed(0))
    m.training_step(x, torch.Generator().manual_seed(1), 0, 100, **kw)  # the first call may make constants
    with HostSyncs() as s:
        loss, logs = m.training_step(x, torch.Generator().manual_seed(1), 1, 100, **kw)
        loss.backward()
    return s, logs


def default_method(name, batch=16):
    "Method `name` at its Fashion-MNIST defaults (on vit_nano/7 where it takes a ViT) and a random uint8 batch."
    torch.manual_seed(0)
    x = torch.randint(0, 256, (batch, 1, 28, 28), dtype=torch.uint8)
    data = ImageData(x, torch.zeros(batch, dtype=torch.long), ['x'], FASHION_MEAN, FASHION_STD)
    d = dataset_defaults('fashion_mnist', name)
    arch = 'vit_nano' if d.arch.startswith('vit') else d.arch
    cfg = METHODS[name].make_config(**({'teacher_arch': 'small_cnn'} if name == 'kassl' else {}), **d.config)
    return build_method(describe(name, arch, 7 if arch.startswith('vit') else None, data, cfg,
                                 dataset='fashion_mnist')), x
