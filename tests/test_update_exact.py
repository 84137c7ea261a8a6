"""pygen.models.update.Update with exact answers (issue 17 B: the mutation survivors of
update.py): autocast per precision, the fp16 loss-scaling path (GradScaler on the CPU), the
norm returned with and without clipping and without gradients, the forward used, the
micro-batch weights of every term, and the argument checks' messages."""

import pytest
import torch
from torch import nn

from pygen.models.update import Update, split_micro_batches


class Dot(nn.Module):
    """loss = mean_b (w . x_b) + extra: its gradient is the batch mean of x."""

    def __init__(self, dim: int = 2) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))
        self.seen: list[tuple[bool, torch.dtype]] = []

    def forward(self, x, extra=0.0):
        self.seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        return {"loss": (x @ self.w).mean() + extra, "n": float(x.shape[0]), "first": x[:, 0].mean()}


@pytest.mark.parametrize("precision, enabled, dtype", [("fp32", False, None), ("bf16", True, torch.bfloat16),
                                                       ("fp16", True, torch.float16)])
def test_the_forward_runs_under_the_precisions_autocast(precision, enabled, dtype):
    m = Dot()
    Update(precision=precision, device_type="cpu").backward(m, torch.ones(4, 2))
    assert m.seen[0][0] is enabled
    if enabled:
        assert m.seen[0][1] == dtype
    assert not torch.is_autocast_enabled("cpu")  # and only inside the forward


def test_the_fp16_path_scales_the_loss_unscales_before_clipping_and_updates_the_scale():
    m = Dot()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=1)
    up = Update(grad_clip=1.0, scaler=scaler)
    x = torch.tensor([[3.0, 4.0], [3.0, 4.0]])
    up.backward(m, x)
    torch.testing.assert_close(m.w.grad, torch.tensor([3072.0, 4096.0]))  # the scaled loss's gradient
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    norm = up.step(opt, m.parameters())
    assert float(norm) == pytest.approx(5.0)  # unscaled, before clipping
    torch.testing.assert_close(m.w.detach(), torch.tensor([-0.6, -0.8]))  # clipped to norm 1, stepped
    assert scaler.get_scale() == 2048.0  # a good step: the scale grew (growth_interval 1)
    opt.zero_grad()
    up.backward(m, torch.full((2, 2), float("inf")))
    before = m.w.detach().clone()
    up.step(opt, m.parameters())
    torch.testing.assert_close(m.w.detach(), before)  # an overflow: the step is skipped
    assert scaler.get_scale() == 1024.0  # and the scale backs off


def test_the_norm_without_clipping_and_without_gradients():
    m = Dot()
    up = Update()
    up.backward(m, torch.tensor([[3.0, 4.0]]))
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    norm = up.step(opt, m.parameters())
    assert float(norm) == 5.0
    torch.testing.assert_close(m.w.detach(), torch.tensor([-1.5, -2.0]))  # not clipped
    steps = []
    opt2 = torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=1.0)
    opt2.step = lambda: steps.append(1)
    norm = Update(grad_clip=1.0).step(opt2, [nn.Parameter(torch.ones(2))])  # no .grad anywhere
    assert norm.shape == () and float(norm) == 0.0 and steps == [1]
    norm = Update().step(opt2, [nn.Parameter(torch.ones(2))])
    assert norm.shape == () and float(norm) == 0.0 and steps == [1, 1]


def test_the_wrapper_forward_is_called_with_the_loss_kwargs():
    m = Dot()
    calls = []

    def wrapper(batch, **kw):
        calls.append(kw)
        return m(batch, **kw)

    out = Update(wrapper).backward(m, torch.ones(3, 2), extra=2.0)
    assert calls == [{"extra": 2.0}] and float(out["loss"]) == 2.0
    out = Update().backward(m, torch.ones(3, 2), extra=1.0)  # no wrapper: the model itself
    assert float(out["loss"]) == 1.0 and len(m.seen) == 2


def test_terms_are_example_weighted_means_over_micro_batches():
    m = Dot()
    x = torch.arange(10.0)[:, None].repeat(1, 2)
    out = Update(grad_accum=3).backward(m, x)  # sizes 4, 3, 3
    assert out["n"] == pytest.approx(4 * 0.4 + 3 * 0.3 + 3 * 0.3)  # plain floats too
    torch.testing.assert_close(out["first"], x[:, 0].mean())
    one = Update().backward(Dot(), x)
    assert one["n"] == 10.0 and isinstance(one["n"], float)
    assert not one["loss"].requires_grad and not out["loss"].requires_grad


@pytest.mark.parametrize("kwargs, message", [
    ({"grad_accum": 0}, "grad_accum must be an int >= 1, got 0"),
    ({"grad_accum": True}, "grad_accum must be an int >= 1, got True"),
    ({"grad_accum": 2.0}, "grad_accum must be an int >= 1, got 2.0"),
    ({"precision": "fp8"}, "precision must be one of ['bf16', 'fp16', 'fp32'], got 'fp8'"),
])  # fmt: skip
def test_argument_messages(kwargs, message):
    with pytest.raises(ValueError) as e:
        Update(**kwargs)
    assert str(e.value) == message


def test_split_message_and_tuple_parts():
    x, y = torch.arange(4.0)[:, None], torch.arange(4)
    with pytest.raises(ValueError) as e:
        split_micro_batches(x, 5)
    assert str(e.value) == "grad_accum=5 needs at least 5 examples per rank and step, got a batch of 4"
    parts = split_micro_batches([x, y], 2)  # a list batch comes back as tuples
    assert all(isinstance(p, tuple) and len(p) == 2 for p, _ in parts)
    assert [w for _, w in parts] == [0.5, 0.5]
    assert split_micro_batches(x, 4)[3][0].shape == (1, 1)
