"""Our paths inside ``torch.compile`` graphs (``fast/compiled.py``): an eval block that wants no gradients, on a
Triton device, is traced as one ``timm_convmixer::block`` node that dispatches when it runs; everything else is
traced as the plain modules. Checked through Triton's interpreter (CPU tensors count as a Triton device), mostly
with the ``aot_eager`` backend (the graph, its fake tensors and the node's real calls, without Inductor's C++
build), once with Inductor.
"""
import copy
import gc
import os
import shutil

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

from timm_convmixer import fast
from timm_convmixer.fast import compiled
from timm_convmixer.fast.eligibility import block_parts

pytestmark = pytest.mark.kernels  # the Triton kernels through the interpreter: ./run.sh test-min leaves these out

NODE = 'timm_convmixer.block'


def _model(small_model, depth=2):
    return small_model(dim=8, depth=depth, kernel_size=5, patch_size=4, num_classes=3, randomize={})


def _nodes(counter):
    """How many block nodes the graphs a ``CompileCounterWithBackend`` saw hold."""
    return sum(str(n.target).startswith(NODE) for g in counter.graphs for n in g.graph.nodes)


def _compile(model, backend='aot_eager'):
    torch._dynamo.reset()
    counter = CompileCounterWithBackend(backend)
    return torch.compile(model, backend=counter, fullgraph=True), counter


@pytest.mark.parametrize('backend,layout,autocast', [  # each value twice, each pair of values once (~7 s a case)
    ('triton', 'nchw', False), ('triton_gemm', 'channels_last', False),
    ('triton', 'channels_last', True), ('triton_gemm', 'nchw', True)])
def test_each_eval_block_is_one_node_running_the_forced_path(interpreter, small_model, run_counted, backend,
                                                             layout, autocast):
    """Same values as the same path uncompiled, the plain modules' dtype, channels_last out whatever came in (the
    fused paths' layout, kept between nodes), each call counted when it runs, one graph for repeated calls."""
    model = _model(small_model)
    x = torch.randn(2, 3, 16, 12)
    if layout == 'channels_last':
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    cm, counter = _compile(model.forward_features)

    def run(fn):
        with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            return fn(x)
    plain, _ = run_counted(run, model.forward_features, backend='eager')
    want, _ = run_counted(run, model.forward_features, backend=backend)
    for _ in range(2):
        got, paths = run_counted(run, cm, backend=backend)
    assert paths == {backend: 2} and counter.frame_count == 1 and _nodes(counter) == 2
    assert got.dtype == plain.dtype and got.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(got, want, rtol=1e-2 if autocast else 1e-5, atol=1e-2 if autocast else 1e-5)


def test_auto_checks_the_case_when_the_node_first_runs(interpreter, small_model, run_counted, auto_choice):
    """auto's check needs a real input, which tracing has not: the node makes it on its first call, on that call's
    input, and every later call follows the decision (through the interpreter the plain modules win)."""
    from timm_convmixer.fast import checked
    model = _model(small_model)
    x = torch.randn(2, 3, 16, 12)
    cm, counter = _compile(model)
    with torch.no_grad():
        want = model(x)
        checked.forget()
        got, first = run_counted(cm, x)
        assert checked.decision_records(), 'the check ran inside the compiled graph'
        _, second = run_counted(cm, x)
    choice = auto_choice(checked.decision_records(), block_mode='eval')
    assert first == second == {choice: 2} and counter.frame_count == 1 and _nodes(counter) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('case', ['grad', 'train', 'eager_backend'])
def test_plain_modules_are_traced_where_the_node_does_not_apply(interpreter, small_model, run_counted, case):
    """The node has no backward and runs eval blocks only: with gradients wanted, in training mode (no gradients
    either, so the mode alone decides) or under the ``eager`` backend Inductor gets the plain modules, as before, and
    no block call is counted."""
    model = _model(small_model)
    if case == 'train':
        model.train()
    x = torch.randn(2, 3, 16, 12)
    cm, counter = _compile(model)
    with torch.set_grad_enabled(case == 'grad'):
        got, paths = run_counted(cm, x, backend='eager' if case == 'eager_backend' else 'triton')
    assert paths == {} and _nodes(counter) == 0 and counter.frame_count == 1
    if case == 'grad':
        got.sum().backward()
        assert all(p.grad is not None for p in model.parameters())


def test_functorch_transforms_get_the_plain_modules(interpreter, small_model, run_counted):
    """vmap's batched tensors inside a compiled function: the node has no batching rule, so no node."""
    model = _model(small_model)
    xs = torch.randn(3, 2, 3, 16, 12)
    fn, counter = _compile(torch.func.vmap(lambda x: model(x)))  # (vmap(model) itself: Dynamo fails on its repr)
    with torch.no_grad():
        got, paths = run_counted(fn, xs, backend='triton')
        want, _ = run_counted(torch.func.vmap(model), xs, backend='eager')
    assert paths == {} and _nodes(counter) == 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_switching_to_training_recompiles_without_the_node(interpreter, small_model, run_counted):
    model = _model(small_model)
    x = torch.randn(2, 3, 16, 12)
    cm, counter = _compile(model)
    with torch.no_grad(), fast.use_backend('triton'):
        _, eval_paths = run_counted(cm, x)
        model.train()
        _, train_paths = run_counted(cm, x)
    assert eval_paths == {'triton': 2} and train_paths == {}
    assert counter.frame_count == 2 and _nodes(counter) == 2  # the second graph has none


def test_one_graph_serves_every_instance_with_its_own_weights(interpreter, small_model, run_counted):
    """The node holds no module's identity, only its architecture, so instances of one architecture share one graph
    (beyond 8 Dynamo would stop compiling), and each runs its own blocks: a ``copy.deepcopy`` (how benchmarks and EMA
    copy a model) with other weights, and fresh models."""
    model = _model(small_model)
    twin = copy.deepcopy(model)
    for p in twin.parameters():
        p.data.mul_(1.5)
    models = [model, twin] + [_model(small_model) for _ in range(8)]
    x = torch.randn(2, 3, 16, 12)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend('aot_eager')
    with torch.no_grad():
        for m in models:
            want, _ = run_counted(m, x, backend='eager')
            got, paths = run_counted(torch.compile(m, backend=counter), x, backend='triton')
            assert paths == {'triton': 2}
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1 and _nodes(counter) == 2


@pytest.mark.parametrize('strict', [False, True])
def test_export_gets_the_plain_modules(interpreter, small_model, strict):
    """An exported program must stand alone: the node's key means nothing outside this process. (Strict export traces
    with Dynamo, which answers ``is_exporting()`` with True under torch.compile too, so that is no test for it.)"""
    model = _model(small_model)
    with fast.use_backend('triton'), torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 3, 16, 12),), strict=strict)
    targets = [str(n.target) for n in program.graph.nodes]
    # no node; the stem's conv and each block's two
    assert not any(t.startswith(NODE) for t in targets) and sum('conv' in t for t in targets) == 5


def _op_inputs(small_model, eps):
    """A model whose BatchNorm eps is this test's alone (other tests' models may still be alive, in Dynamo's caches),
    its first block, an input in the layout the op computes in, the block's architecture and tensors."""
    model = small_model(dim=8, depth=2, kernel_size=5, patch_size=4, num_classes=3, randomize={}, bn_eps=eps)
    block = model.blocks[0]
    x = torch.randn(2, 8, 4, 3).contiguous(memory_format=torch.channels_last)
    return (model, block, x, *compiled._signature(block_parts(block)))


def test_the_op_runs_the_tensors_it_is_given(interpreter, small_model):
    """Where no block holds the op's inputs (Inductor's freezing may pass copies) a private copy of a block of the
    same architecture computes its forward on them, and goes on doing so once the model is gone; an architecture no
    live block has is an error that says so."""
    model, block, x, architecture, own = _op_inputs(small_model, 1.25e-5)
    tensors = [t.clone() for t in own]
    tensors[0].mul_(2.)  # the depthwise weight
    name_of = {id(t): n for n, t in [*block.named_parameters(), *block.named_buffers()]}
    names = [name_of[id(t)] for t in own]
    with torch.no_grad():
        got = torch.ops.timm_convmixer.block(x, tensors, architecture, False, torch.bfloat16)
        with fast.use_backend('eager'):
            want = torch.func.functional_call(block, dict(zip(names, tensors)), (x,))
            mine = block(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, mine)
    with pytest.raises(RuntimeError, match='outlived its model'):  # another architecture
        torch.ops.timm_convmixer.block(x, tensors, architecture.replace('k5', 'k7'), False, torch.bfloat16)
    del model, block
    gc.collect()
    with torch.no_grad():
        again = torch.ops.timm_convmixer.block(x, tensors, architecture, False, torch.bfloat16)
    torch.testing.assert_close(again, want, rtol=0, atol=0)


def test_the_stand_in_takes_a_weight_held_as_a_plain_attribute(interpreter, small_model):
    """A weight that is no parameter (``del conv.weight; conv.weight = t``, as FSDP1 without ``use_orig_params``
    holds them) is still one of the op's inputs, and the stand-in computes with the op's copy of it."""
    model, block, x, _, _ = _op_inputs(small_model, 1.75e-5)
    conv_pw = block[1]
    weight = conv_pw.weight.detach().clone()
    del conv_pw.weight
    conv_pw.weight = weight
    architecture, own = compiled._signature(block_parts(block))
    tensors = [t.clone() for t in own]
    assert any(t.shape == weight.shape for t in tensors)
    tensors[2].mul_(2.)  # the pointwise weight (the convolutions' tensors come first)
    with torch.no_grad():
        got = torch.ops.timm_convmixer.block(x, tensors, architecture, False, torch.bfloat16)
        conv_pw.weight = tensors[2]
        with fast.use_backend('eager'):
            want = block(x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_the_op_never_runs_a_block_in_another_mode_or_with_hooks(interpreter, small_model):
    """The block holding the op's tensors counts only in the traced architecture, mode included: put in training
    mode (or another block sharing its storage, say) it would normalise by batch statistics and update its running
    ones. A block with hooks of its own is no stand-in (its hooks would run inside the op)."""
    model, block, x, architecture, own = _op_inputs(small_model, 1.5e-5)
    with torch.no_grad(), fast.use_backend('eager'):
        want = block(x)
    block.register_forward_hook(lambda module, args, out: out * 0)
    model.train()
    stats = block[3].running_mean.clone()
    with torch.no_grad(), pytest.raises(RuntimeError, match='outlived its model'):
        torch.ops.timm_convmixer.block(x, own, architecture, False, torch.bfloat16)
    assert torch.equal(block[3].running_mean, stats)
    twin = copy.deepcopy(model).eval()  # no hooks of its own: deepcopy copies them too, so take them off
    twin.blocks[0]._forward_hooks.clear()
    with torch.no_grad():
        got = torch.ops.timm_convmixer.block(x, own, architecture, False, torch.bfloat16)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(block[3].running_mean, stats)


@pytest.mark.slow
def test_inductor_runs_the_node(interpreter, small_model, run_counted):
    """The same through Inductor's own code generation (its C++ build on CPU): the plain modules' layout and values."""
    if shutil.which(os.environ.get('CXX', 'g++')) is None and shutil.which('c++') is None:
        pytest.skip('torch.compile (inductor on CPU) needs a C++ compiler; none on PATH')
    model = _model(small_model).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 16, 12).contiguous(memory_format=torch.channels_last)
    torch._dynamo.reset()
    with torch.no_grad():
        want, _ = run_counted(model, x, backend='eager')
        got, paths = run_counted(torch.compile(model), x, backend='triton')
    assert paths == {'triton': 2}
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_search_that_found_no_holder_is_not_repeated_on_every_call(interpreter, small_model, monkeypatch):
    """Inductor's freezing hands every node copies, which no live block holds: the op searches the live blocks for
    them once, not on every call (~0.8 ms a call for a 20-block model), then again at once when a block is made or
    copied, and otherwise every ``RESCAN_EVERY`` calls, which finds a holder put back in eval mode since."""
    model, block, x, architecture, own = _op_inputs(small_model, 2e-5)
    searched = []
    parts_if = compiled._parts_if

    def counted(candidate, tensors, arch, key):
        if key is torch.Tensor.data_ptr:
            searched.append(candidate)
        return parts_if(candidate, tensors, arch, key)
    monkeypatch.setattr(compiled, '_parts_if', counted)

    def call(tensors):
        with torch.no_grad(), fast.use_backend('eager'):
            return torch.ops.timm_convmixer.block(x, tensors, architecture, False, torch.bfloat16)
    copies = [t.clone() for t in own]
    want = call(copies)
    first = len(searched)
    assert first >= len(model.blocks)  # every live block
    for _ in range(compiled.RESCAN_EVERY):
        torch.testing.assert_close(call(copies), want, rtol=0, atol=0)
    assert len(searched) == first
    call(copies)
    assert len(searched) > first
    searched.clear()
    twin = copy.deepcopy(model)  # registers its blocks: a search at once
    call(copies)
    assert twin.blocks[0] in searched

    for t, c in zip(own, copies):  # the block comes to hold the copies, with no registration: found by a rescan
        t.data = c
    for _ in range(compiled.RESCAN_EVERY + 1):
        torch.testing.assert_close(call(copies), want, rtol=0, atol=0)
    assert compiled._holder.get(copies[0].data_ptr()) is block
