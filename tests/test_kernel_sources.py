"""What Inductor needs of our Triton kernels' sources, checked without a GPU.

torch.compile runs a user's Triton kernel by copying its source and the jit helpers it calls into
its own generated module, each helper under its own `__name__`: a helper imported under another
name (`import ... as ...`) leaves the kernel calling a name that module does not define (a
NameError at compile time, on the GPU only; found so on the H100)."""

import importlib
import pkgutil

import pytest

import ligerzoo.kernels

MODULES = [info.name for info in pkgutil.iter_modules(ligerzoo.kernels.__path__)]


def jit_functions(module):
    """The module's own @triton.jit functions (under the interpreter too): objects with the Python
    function they wrap as `.fn`."""
    for value in vars(module).values():
        fn = getattr(value, "fn", None)
        if callable(fn) and hasattr(fn, "__code__") and type(value).__module__.startswith("triton"):
            if fn.__module__ == module.__name__:
                yield value


@pytest.mark.parametrize("name", MODULES)
def test_kernels_call_their_jit_helpers_by_their_own_names(name):
    module = importlib.import_module(f"ligerzoo.kernels.{name}")
    for kernel in jit_functions(module):
        for called in kernel.fn.__code__.co_names:
            helper = kernel.fn.__globals__.get(called)
            helper_fn = getattr(helper, "fn", None)
            if helper_fn is None or not type(helper).__module__.startswith("triton"):
                continue
            assert helper_fn.__name__ == called, (
                f"{name}.{kernel.fn.__name__} calls {helper_fn.__module__}.{helper_fn.__name__} as {called!r}: "
                f"import it under its own name (Inductor copies it so)")


def test_the_check_finds_a_kernel_to_check():
    module = importlib.import_module("ligerzoo.kernels.float8_group_columns")
    assert {k.fn.__name__ for k in jit_functions(module)} >= {"_group_amax_kernel", "_group_cast_kernel"}
