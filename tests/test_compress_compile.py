"""torch.compile(fullgraph=True) of FactGraSS, LoGra and GraSS: one graph, no breaks, eager results."""
import pytest
import torch

from grass_index.compress import FactGraSS, GraSS, LoGra, make_compressor


def cases():
    g = torch.Generator().manual_seed(0)
    x, go = torch.randn(2, 5, 64, generator=g), torch.randn(2, 5, 96, generator=g)
    return {
        "factgrass": (FactGraSS(64, 96, "random_mask-16*16", "sjlt-64"), (x, go)),
        "logra": (LoGra(64, 96, "normal-8*8"), (x, go)),
        "grass": (GraSS(1000, "random_mask-200", "sjlt-50:s=2"), (torch.randn(3, 1000, generator=g),)),
        "fjlt-factored": (make_compressor("fjlt-16*16", "grass-32", d_in=64, d_out=96), (x, go)),
        "materialised": (make_compressor("random_mask-500", "sjlt-32", d_in=64, d_out=96), (x, go)),
    }


@pytest.mark.parametrize("name", list(cases()))
def test_no_graph_breaks_and_matches_eager(name):
    module, args = cases()[name]
    torch._dynamo.reset()
    explain = torch._dynamo.explain(module)(*args)
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)


def test_compiled_graph_contains_the_custom_ops():
    counter = torch._dynamo.testing.CompileCounter()
    module, args = cases()["factgrass"]
    torch._dynamo.reset()
    gm_ops = []

    def backend(gm, example_inputs):
        gm_ops.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return counter(gm, example_inputs)

    torch.compile(module, fullgraph=True, backend=backend)(*args)
    assert counter.frame_count == 1
    assert any("grass_index.mask" in t for t in gm_ops) and any("grass_index.sjlt" in t for t in gm_ops)


def test_no_recompile_across_batch_sizes():
    module, (x, go) = cases()["factgrass"]
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(module, fullgraph=True, backend=counter, dynamic=True)
    for B, T in ((2, 5), (3, 7), (5, 2)):
        compiled(torch.randn(B, T, 64), torch.randn(B, T, 96))
    assert counter.frame_count == 1


@pytest.mark.inductor
def test_inductor_factgrass_matches_eager():
    module, args = cases()["factgrass"]
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(*args), module(*args), rtol=1e-5, atol=1e-5)
