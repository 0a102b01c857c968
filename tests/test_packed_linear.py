"""serving.packed_linear: oneDNN-packed linears compute what nn.Linear does and follow weight changes."""

import pytest
import torch
from torch import nn

from serving.packed_linear import PackedLinear, pack_linears


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 40, bias=True)
        self.down = nn.Linear(40, 16, bias=False)
        self.head = nn.Linear(16, 50, bias=False)
        self.head.weight = self.embed.weight  # tied, as SmolLM2's lm_head

    def forward(self, ids):
        return self.head(self.down(torch.relu(self.up(self.embed(ids)))))


def _pair(dtype):
    torch.manual_seed(0)
    plain = Tiny().to(dtype)
    packed = Tiny().to(dtype)
    packed.load_state_dict(plain.state_dict())
    return plain, packed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_packed_equals_plain_and_keeps_parameters(dtype):
    plain, packed = _pair(dtype)
    keys = list(packed.state_dict())
    assert pack_linears(packed) == 3
    assert all(type(m) is PackedLinear for m in (packed.up, packed.down, packed.head))
    assert list(packed.state_dict()) == keys
    assert packed.head.weight is packed.embed.weight  # the tie survives
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        want, got = plain(ids), packed(ids)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)  # the serving dtype: bit-identical
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_packed_follows_in_place_swaps_and_casts():
    plain, packed = _pair(torch.bfloat16)
    pack_linears(packed)
    ids = torch.randint(0, 50, (1, 5))
    with torch.no_grad():
        packed(ids)  # the packed copies now exist
        for p in plain.parameters():
            p.mul_(-0.5)
        packed.load_state_dict(plain.state_dict())  # a hot-swap: written in place
        assert torch.equal(packed(ids), plain(ids))
        packed.float(), plain.float()
        torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)
        packed.half(), plain.half()  # packable or not on this CPU: the same products either way
        torch.testing.assert_close(packed(ids), plain(ids), rtol=2e-3, atol=2e-3)
