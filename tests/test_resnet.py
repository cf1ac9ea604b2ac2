import pytest
import torch

from sslkd.resnet import (BasicBlock, Bottleneck, ResNet, SmallCNN, resnet18, resnet34, resnet50, small_cnn, wide_cnn,
                          resnet_archs, num_params)


def assert_eq(a, b):
    if isinstance(a, torch.Tensor): assert a.shape == b.shape and torch.equal(a.detach(), b.detach())
    else: assert tuple(a) == tuple(b) if isinstance(a, torch.Size) else a == b, (a, b)


@pytest.mark.parametrize('arch,dim,in_chans,size', [
    ('resnet18', 512, 1, 28), ('resnet18', 512, 3, 32), ('resnet34', 512, 3, 32), ('resnet50', 2048, 1, 28),
    ('resnet50', 2048, 3, 32), ('small_cnn', 256, 1, 28), ('small_cnn', 256, 3, 32), ('wide_cnn', 512, 1, 28)])
def test_shapes(arch, dim, in_chans, size):
    torch.manual_seed(0)
    m = resnet_archs[arch](in_chans=in_chans).eval()
    with torch.no_grad(): f = m(torch.randn(2, in_chans, size, size))
    assert_eq(f.shape, (2, dim))
    assert_eq(m.embed_dim, dim)
    assert torch.isfinite(f).all()


def test_cifar_stem_keeps_resolution():
    m = resnet18(3)
    conv = m.stem[0][0]
    assert_eq((conv.kernel_size, conv.stride, conv.in_channels), ((3, 3), (1, 1), 3))
    assert not any(isinstance(x, torch.nn.MaxPool2d) for x in m.modules())
    with torch.no_grad():
        assert_eq(m.forward_features(torch.randn(1, 3, 32, 32)).shape, (1, 512, 4, 4))
        assert_eq(m.stem(torch.randn(1, 3, 32, 32)).shape, (1, 64, 32, 32))


def test_param_counts():
    with torch.device('meta'):
        # torchvision's counts minus the classifier and minus the 7x7 -> 3x3 stem difference (3*64*(49-9) = 7,680)
        assert_eq(num_params(resnet18(3)), 11_168_832)
        assert_eq(num_params(resnet18(3)), 11_689_512 - 513_000 - 7_680)
        assert_eq(num_params(resnet34(3)), 21_797_672 - 513_000 - 7_680)
        assert_eq(num_params(resnet50(3)), 23_500_352)
        assert_eq(num_params(resnet50(3)), 25_557_032 - 2_049_000 - 7_680)
        assert_eq(num_params(resnet18(1)), 11_168_832 - 2 * 9 * 64)
    assert_eq(num_params(small_cnn(1)), 388_320)
    assert_eq(num_params(small_cnn(3)), 388_320 + 2 * 9 * 32)
    assert 100_000 < num_params(small_cnn(1)) < 1_000_000
    assert_eq(num_params(wide_cnn(1)), 1_550_784)   # twice the width: about 4x the parameters (and the compute)


def test_small_cnn_structure():
    m = small_cnn(1)
    convs = [x for x in m.modules() if isinstance(x, torch.nn.Conv2d)]
    assert_eq([c.out_channels for c in convs], [32, 64, 128, 256])
    assert_eq(convs[0].stride, (2, 2))
    assert all(c.bias is None for c in convs)
    with torch.no_grad():
        assert_eq(m.forward_features(torch.randn(1, 1, 28, 28)).shape, (1, 256, 4, 4))


@pytest.mark.parametrize('arch', ['resnet18', 'small_cnn'])
def test_gradients_flow(arch):
    torch.manual_seed(0)
    m = resnet_archs[arch](in_chans=1)
    m(torch.randn(4, 1, 28, 28)).square().mean().backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize('arch', ['resnet18', 'small_cnn'])
def test_eval_deterministic_train_uses_batch_stats(arch):
    torch.manual_seed(0)
    m = resnet_archs[arch](in_chans=1)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        m.eval(); a = m(x); b = m(x)
        assert_eq(a, b)
        # eval output of one image does not depend on the rest of the batch; train mode (batch stats) does
        assert torch.allclose(m(x[:1]), a[:1], atol=1e-5)
        m.train(); t = m(x)
        assert not torch.allclose(t, a, atol=1e-3)


def test_blocks():
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        assert_eq(BasicBlock(64, 128, stride=2)(x).shape, (2, 128, 4, 4))
        assert_eq(Bottleneck(64, 64)(x).shape, (2, 256, 8, 8))
        assert isinstance(BasicBlock(64, 64).shortcut, torch.nn.Identity)
        # identity shortcut: a block whose body outputs zero returns relu(x)
        b = BasicBlock(64, 64); torch.nn.init.zeros_(b.body[-1][1].weight)
        assert_eq(b.eval()(x), torch.relu(x))


def test_registry():
    assert_eq(set(resnet_archs), {'resnet18', 'resnet34', 'resnet50', 'small_cnn', 'wide_cnn'})
    assert isinstance(resnet50(), ResNet) and isinstance(small_cnn(), SmallCNN) and isinstance(wide_cnn(), SmallCNN)
    assert_eq(small_cnn().in_chans, 1)
    assert_eq(resnet18().in_chans, 3)
