"""graphsel.ir.copying.deepcopy_module: the result of copy.deepcopy, on random architectures and on
the awkward cases (aliasing, tied and memo-shared parameters, classes with their own protocol)."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from hypothesis import given, settings

from graphsel.ir.copying import clone_memo, deepcopy_module
from strategies import architectures, assert_same_function


def _structure(m: nn.Module) -> list:
    """Module tree, attribute names and non-tensor attribute values, parameter/buffer shapes."""
    out = []
    for name, mod in m.named_modules(remove_duplicate=False):
        attrs = {k: v for k, v in vars(mod).items()
                 if not k.startswith("_") and not isinstance(v, (torch.Tensor, nn.Module))}
        out.append((name, type(mod), sorted(vars(mod)), repr(attrs)))
    out += [(n, tuple(t.shape), t.dtype) for n, t in m.named_parameters(remove_duplicate=False)]
    out += [(n, tuple(t.shape), t.dtype) for n, t in m.named_buffers(remove_duplicate=False)]
    return out


def _tensor_ptrs(m: nn.Module) -> set[int]:
    return {t.data_ptr() for t in list(m.parameters()) + list(m.buffers())}


@settings(max_examples=25, deadline=None)
@given(arch=architectures())
def test_deepcopy_module_equals_copy_deepcopy_on_random_architectures(arch):
    model = arch.build()
    ours, theirs = deepcopy_module(model), copy.deepcopy(model)
    assert _structure(ours) == _structure(theirs)
    assert not _tensor_ptrs(ours) & _tensor_ptrs(model)
    x = (torch.randn(arch.input_shape),)
    assert_same_function(model, ours, x, rtol=0, atol=0)


class _Custom(nn.Module):
    """Its own __deepcopy__: must be honoured (handed to copy.deepcopy)."""
    copies = 0

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def __deepcopy__(self, memo):
        _Custom.copies += 1
        new = _Custom()
        new.lin = copy.deepcopy(self.lin, memo)
        return new


class _Aliased(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = self.a                                  # the same module twice
        self.c = nn.Linear(3, 3)
        self.c.weight = self.a.weight                    # a tied parameter
        self.config = {"sizes": [1, 2], "shared": self.a}
        self.custom = _Custom()
        self.register_buffer("steps", torch.zeros(()))


def test_deepcopy_module_keeps_aliasing_and_respects_custom_protocols():
    m = _Aliased()
    new = deepcopy_module(m)
    assert new.a is new.b and new.a is not m.a
    assert new.c.weight is new.a.weight and new.a.weight is not m.a.weight
    assert new.config["shared"] is new.a and new.config["sizes"] == [1, 2]
    assert new.config["sizes"] is not m.config["sizes"]
    assert _Custom.copies == 1 and isinstance(new.custom, _Custom)
    assert new.steps is not m.steps


def test_deepcopy_module_shares_what_the_memo_names():
    m = _Aliased()
    memo = {id(p): p for p in m.parameters()}
    new = deepcopy_module(m, memo)
    assert new.a.weight is m.a.weight and new.c.weight is m.a.weight
    assert new.steps is not m.steps                    # buffers not in the memo are copied


def test_shallow_copy_module_shares_entries_but_not_the_registries():
    from graphsel.ir.copying import shallow_copy_module
    for m in (nn.Conv2d(3, 4, 3, stride=2), nn.BatchNorm2d(4), _Custom()):
        new = shallow_copy_module(m)
        assert type(new) is type(m) and vars(new).keys() == vars(m).keys()
        assert all(new._parameters[k] is v for k, v in m._parameters.items())
        assert new._parameters is not m._parameters and new._modules is not m._modules
        if isinstance(m, nn.Conv2d):
            new.weight = nn.Parameter(torch.zeros(1))
            assert m.weight.shape == (4, 3, 3, 3) and new.stride == (2, 2)


@settings(max_examples=15, deadline=None)
@given(arch=architectures())
def test_module_index_is_named_modules(arch):
    from graphsel.ir.graph import module_index
    model = arch.build()
    model.alias = model[0] if isinstance(model, nn.Sequential) else nn.Identity()    # a duplicate entry
    assert list(module_index(model).items()) == list(model.named_modules())
    m = _Aliased()
    assert list(module_index(m).items()) == list(m.named_modules())


@settings(max_examples=20, deadline=None)
@given(arch=architectures())
def test_delete_unused_modules_follows_torch_fx(arch):
    """Same modules left as torch.fx's delete_all_unused_submodules, with spare and nested extras."""
    import graphsel
    from graphsel.ir.graph import delete_unused_modules, module_index
    gm = graphsel.trace(arch.build(), (torch.randn(arch.input_shape),))
    gm.add_submodule("spare.inner", nn.Linear(2, 2))                    # unused, nested
    called = next(n.target for n in gm.graph.nodes if n.op == "call_module")
    gm.get_submodule(called).add_module("extra_child", nn.ReLU())     # a called module's child stays
    theirs = copy.deepcopy(gm)
    theirs.delete_all_unused_submodules()
    delete_unused_modules(gm)
    assert list(module_index(gm)) == list(module_index(theirs))


class _Buffers(nn.Module):
    """Buffers clone_memo may clone (own storage) and must leave to the copier (views sharing a
    storage, a tensor with Python attributes, one buffer registered twice)."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        base = torch.arange(6.0)
        self.register_buffer("whole", base)
        self.register_buffer("view", base[2:4])          # shares whole's storage
        tagged = torch.ones(3)
        tagged.note = "kept"
        self.register_buffer("tagged", tagged)
        self.inner = nn.Module()
        self.inner.register_buffer("same", self.bn.running_mean)   # one tensor, two names


def test_clone_memo_gives_what_copy_deepcopy_gives():
    model = _Buffers()
    tensors = list(model.parameters()) + list(model.buffers())
    memo = clone_memo(tensors, model.buffers())
    assert id(model.bn.running_var) in memo and id(model.bn.num_batches_tracked) in memo
    assert not {id(model.whole), id(model.view), id(model.tagged)} & set(memo)
    ours, theirs = deepcopy_module(model, memo), copy.deepcopy(model)
    assert _structure(ours) == _structure(theirs)
    assert not _tensor_ptrs(ours) & _tensor_ptrs(model)
    for name, t in theirs.named_buffers(remove_duplicate=False):
        assert torch.equal(ours.get_buffer(name), t)
    assert ours.inner.same is ours.bn.running_mean                            # aliasing kept
    assert ours.view.untyped_storage().data_ptr() == ours.whole.untyped_storage().data_ptr()
    assert ours.tagged.note == "kept"
