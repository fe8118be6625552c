"""Taking one hook out of the middle of a module's diffusers hook stack (``cache.base.remove_hook``).

diffusers' public ``HookRegistry.remove_hook`` relinks the hook above the removed one by its
``forward``, which for a hook written with ``new_forward`` is the hook itself, so every hook above
the removed one stops running.  ``remove_hook`` works around it by reading the registry's private
``_hook_order`` / ``_fn_refs``; these tests pin both: if a diffusers release fixes the relinking or
changes the private state, they fail and say what to change.
"""

import torch
from diffusers.hooks import HookRegistry, ModelHook

from sdinfer.cache.base import remove_hook


class Tag(ModelHook):
    def __init__(self, log: list, tag: str):
        super().__init__()
        self.log, self.tag = log, tag

    def new_forward(self, module, *args, **kwargs):
        self.log.append(self.tag)
        return self.fn_ref.original_forward(*args, **kwargs)


def _stack():
    model, log = torch.nn.Linear(2, 2), []
    registry = HookRegistry.check_if_exists_or_initialize(model)
    for tag in "abc":
        registry.register_hook(Tag(log, tag), tag)
    return model, registry, log


def test_removing_a_middle_hook_keeps_the_others_running_in_order():
    model, _, log = _stack()
    x = torch.ones(2)
    plain = torch.nn.functional.linear(x, model.weight, model.bias)
    model(x)
    assert log == ["c", "b", "a"]
    remove_hook(model, "b")
    log.clear()
    assert torch.equal(model(x), plain)
    assert log == ["c", "a"]
    remove_hook(model, "c")
    remove_hook(model, "a")
    remove_hook(model, "a")   # absent: nothing happens
    log.clear()
    assert torch.equal(model(x), plain) and log == []


def test_diffusers_private_hook_state_is_as_remove_hook_reads_it():
    _, registry, _ = _stack()
    assert hasattr(registry, "_hook_order") and hasattr(registry, "_fn_refs"), \
        "diffusers renamed HookRegistry's _hook_order / _fn_refs: rewrite sdinfer.cache.base.remove_hook"
    assert registry._hook_order == ["a", "b", "c"] and len(registry._fn_refs) == 3
    assert all(ref.original_forward is not None for ref in registry._fn_refs)


def test_diffusers_public_remove_hook_still_drops_the_hooks_above():
    """When this fails, diffusers relinks the stack itself: make ``remove_hook`` call
    ``HookRegistry.remove_hook(name, recurse=False)`` alone and delete this test."""
    model, registry, log = _stack()
    registry.remove_hook("b", recurse=False)
    model(torch.ones(2))
    assert log == ["a"], ("diffusers' HookRegistry.remove_hook now keeps the hooks above the removed one: "
                          "drop the relinking workaround in sdinfer.cache.base.remove_hook")
