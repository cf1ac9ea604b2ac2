import io
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sslkd.heads import DINOHead, dino_mlp, cancel_last_layer_grads


def small_head(**kw):
    torch.manual_seed(0)
    return DINOHead(**{**dict(in_dim=24, out_dim=50, hidden_dim=32, bottleneck_dim=8), **kw})


def gain(head): return head.last_layer.parametrizations.weight.original0
def direction(head): return head.last_layer.parametrizations.weight.original1


@pytest.mark.parametrize('nlayers', [1, 2, 3, 4])
def test_shapes_and_layers(nlayers):
    head = small_head(nlayers=nlayers)
    x = torch.randn(5, 24)
    logits, z = head(x, return_embedding=True)
    assert logits.shape == (5, 50) and z.shape == (5, 8)
    assert logits.dtype == torch.float32 and z.dtype == torch.float32
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == nlayers
    assert sum(isinstance(m, nn.GELU) for m in head.mlp) == nlayers - 1
    assert head.last_layer.bias is None
    assert torch.equal(head(x), logits)
    assert torch.equal(head.embed(x), z)


def test_dino_defaults():
    with torch.device('meta'):
        h = DINOHead(384)
    assert h.out_dim == 4096 and h.bottleneck_dim == 256
    assert [m.out_features for m in h.mlp if isinstance(m, nn.Linear)] == [2048, 2048, 256]
    assert direction(h).shape == (4096, 256) and gain(h).shape == (4096, 1)


def test_bad_nlayers():
    with pytest.raises(ValueError, match='at least one layer'):
        DINOHead(8, 10, nlayers=0)


def test_use_bn():
    head = small_head(use_bn=True, nlayers=3)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in head.mlp) == 2
    assert head(torch.randn(4, 24)).shape == (4, 50)


def test_init_trunc_normal():
    torch.manual_seed(0)
    head = DINOHead(256, 10, hidden_dim=512, bottleneck_dim=64)
    for m in head.mlp:
        if isinstance(m, nn.Linear):
            # trunc_normal_(std=.02) truncates at +-2 in absolute terms (as DINO/timm): a plain N(0, .02) in practice
            assert abs(m.weight.std().item() - 0.02) < 0.001 and abs(m.weight.mean().item()) < 0.001
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
    assert torch.equal(gain(head), torch.ones_like(gain(head)))


def test_logits_are_cosines():
    head = small_head()
    x = 100 * torch.randn(7, 24)  # large inputs: normalisation must bound the logits anyway
    with torch.no_grad():
        logits, z = head(x, return_embedding=True)
        expected = F.cosine_similarity(head.mlp(x)[:, None, :], direction(head)[None], dim=-1)
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)
    assert logits.abs().max() <= 1 + 1e-5
    # prototypes are unit rows
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(50), atol=1e-5, rtol=0)


def test_gain_frozen_when_norm_last_layer():
    head = small_head(norm_last_layer=True)
    assert not gain(head).requires_grad
    assert direction(head).requires_grad
    opt = torch.optim.AdamW(head.parameters(), lr=0.1, weight_decay=0.5)
    v0 = direction(head).detach().clone()
    for _ in range(3):
        opt.zero_grad()
        head(torch.randn(6, 24)).logsumexp(-1).mean().backward()
        assert gain(head).grad is None
        opt.step()
    assert torch.equal(gain(head), torch.ones(50, 1))
    assert not torch.equal(direction(head), v0)  # the prototypes themselves do train


def test_gain_trains_when_not_normed():
    head = small_head(norm_last_layer=False)
    assert gain(head).requires_grad
    opt = torch.optim.SGD(head.parameters(), lr=1.)
    head(torch.randn(6, 24))[:, 0].sum().backward()
    opt.step()
    assert not torch.equal(gain(head), torch.ones(50, 1))


def test_state_dict_weights_only_roundtrip():
    head = small_head()
    with torch.no_grad(): direction(head).mul_(3)
    buf = io.BytesIO(); torch.save(head.state_dict(), buf); buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    head2 = DINOHead(24, 50, hidden_dim=32, bottleneck_dim=8)
    head2.load_state_dict(sd)
    x = torch.randn(3, 24)
    with torch.no_grad(): assert torch.equal(head2(x), head(x))
    assert not gain(head2).requires_grad  # frozen-ness comes from the constructor, not the checkpoint


@pytest.mark.parametrize('wrap', [False, True])
def test_cancel_last_layer_grads(wrap):
    head = small_head(norm_last_layer=False)
    model = nn.Sequential(nn.Linear(3, 24), head) if wrap else head
    x = torch.randn(4, 3 if wrap else 24)
    model(x).pow(2).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in grads.values())
    # not frozen any more: nothing changes
    assert cancel_last_layer_grads(model, epoch=2, freeze_epochs=2) is False
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    # frozen: exactly the last-layer grads are cancelled, both g and v
    assert cancel_last_layer_grads(model, epoch=1, freeze_epochs=2) is True
    cancelled = [n for n, p in model.named_parameters() if p.grad is None]
    assert len(cancelled) == 2 and all('last_layer' in n for n in cancelled)
    for n, p in model.named_parameters():
        if 'last_layer' not in n: assert torch.equal(p.grad, grads[n]), n
    # an optimizer step then leaves the last layer untouched (even with weight decay) and moves the rest
    lw = [p.detach().clone() for p in head.last_layer.parameters()]
    w0 = head.mlp[0].weight.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1).step()
    assert all(torch.equal(a, b) for a, b in zip(lw, head.last_layer.parameters()))
    assert not torch.equal(w0, head.mlp[0].weight)


def test_cancel_zero_freeze_epochs():
    head = small_head()
    head(torch.randn(2, 24)).sum().backward()
    assert cancel_last_layer_grads(head, epoch=0, freeze_epochs=0) is False
    assert direction(head).grad is not None


def test_embedding_float32_under_autocast():
    head = small_head()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits, z = head(torch.randn(4, 24), return_embedding=True)
    assert z.dtype == torch.float32
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    assert logits.abs().max() <= 1 + 1e-2
