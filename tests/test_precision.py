"""The Triton kernels' float32 products run in IEEE float32, never TF32.

On a GPU a ``tl.dot`` of float32 operands defaults to TF32 (10-bit mantissa: 3e-4 relative error in
the LoRA down-projection at real shapes, other neighbours chosen by the hypergraph's top-k), and
the interpreter ignores the setting: its results cannot show a kernel that lost it. What it does
see is the precision each dot asks for, recorded here from the interpreter's builder while every
op family runs forward and backward in float32.
"""

import pytest
import torch

import ace_kernels
from ace_kernels import _dispatch
from test_hypergraph import leaves
from test_hypergraph import make_inputs as hypergraph_inputs
from test_lora import Case
from test_lora import make_inputs as lora_inputs

pytestmark = pytest.mark.triton


@pytest.fixture
def dots(monkeypatch):
    """Every (operand dtypes, input precision) a traced ``tl.dot`` asks for."""
    if not _dispatch.interpreter_enabled():
        pytest.skip("records the dots of the CPU interpreter (TRITON_INTERPRET=1)")
    from triton.runtime import interpreter

    seen = []
    create_dot = interpreter.InterpreterBuilder.create_dot

    def record(self, a, b, d, input_precision, max_num_imprecise_acc):
        seen.append((str(a.dtype), str(b.dtype), getattr(input_precision, "name", str(input_precision))))
        return create_dot(self, a, b, d, input_precision, max_num_imprecise_acc)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", record)
    return seen


def _check(seen):
    assert seen, "no dot was traced"
    fp32 = [d for d in seen if d[:2] == ("fp32", "fp32")]
    assert fp32 and all(d[2] == "IEEE" for d in fp32), sorted(set(seen))


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_lora_dots_are_ieee(dots, dropout_p):
    x, weight, bias, lora_a, lora_b = lora_inputs(Case("qkv", "qkv", (2, 5), 24, 8, 2), dtype=torch.float32)
    q, k, v = ace_kernels.lora_qkv(x, weight, bias, lora_a, lora_b, scaling=0.5, dropout_p=dropout_p,
                                   training=True, backend="triton")
    (q.square().sum() + k.sum() + v.sum()).backward()
    _check(dots)


@pytest.mark.parametrize("cls_only", [False, True], ids=["full", "cls_only"])
def test_hypergraph_dots_are_ieee(dots, cls_only):
    x, c, edge, node, k = hypergraph_inputs((2, 9, 24, 5, 3), dtype=torch.float32)
    x, c, *weights = leaves([x, c, *edge, *node])
    out = ace_kernels.ace_hypergraph(x, c, tuple(weights[:4]), tuple(weights[4:]), topk=k, cls_only=cls_only,
                                     backend="triton")
    out.square().sum().backward()
    _check(dots)


def test_infonce_dots_are_ieee(dots):
    gen = torch.Generator().manual_seed(0)
    u, t = (torch.nn.functional.normalize(torch.randn(7, 40, generator=gen), dim=-1).requires_grad_()
            for _ in range(2))
    scale = torch.tensor(10.0, requires_grad=True)
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3])
    ace_kernels.label_guided_infonce(u, t, scale, labels=labels, backend="triton").backward()
    _check(dots)
