"""The mechanics every NNX helper shares: paths into a model, Linear-like modules, and re-typing a
module in place.

A path is a tuple of attribute names and list indices, as ``nnx.iter_modules`` gives them
(``("blocks", 0, "mlp", "fc1")``), shown joined with '.' (``"blocks.0.mlp.fc1"``; the empty path
is ``"<model>"``). A module is Linear-like when it has a 2-D ``kernel`` variable of shape
(in, out), as ``nnx.Linear``.

Re-typing: :func:`retype` changes a module's class, in place, to a cached subclass of its own
class whose ``__call__`` is ``call(self, base, *args, **kwargs)`` (same class name, module
``gradsparse.nnx``; ``isinstance(module, base)`` holds and the parameter paths do not change); :func:`role_of` reads
back which role a module was given (None for a module never re-typed).
"""

from __future__ import annotations

from typing import Any, Callable

from flax import nnx

Path = tuple  # a path in the model: attribute names and list indices, as nnx.iter_modules gives them
#: a re-typed module's call: (module, its original class, *args, **kwargs) -> output
RoleCall = Callable[..., Any]


def path_name(path: Path) -> str:
    """The path joined with '.', ``"<model>"`` for the model itself."""
    return ".".join(str(p) for p in path) or "<model>"


def get_at(root: Any, path: Path) -> Any:
    """The module (or attribute) of ``root`` at ``path``."""
    obj = root
    for k in path:
        obj = obj[k] if isinstance(k, int) or not hasattr(obj, str(k)) else getattr(obj, k)
    return obj


def set_at(root: Any, path: Path, value: Any) -> None:
    """Replace the attribute (or list entry) of ``root`` at ``path`` by ``value``, in place."""
    parent, k = get_at(root, path[:-1]), path[-1]
    if isinstance(k, int):
        parent[k] = nnx.data(value)
    else:
        setattr(parent, k, nnx.data(value))


def kernel(m: Any) -> Any:
    """``m.kernel`` when it is an ``nnx.Variable``, else None."""
    k = getattr(m, "kernel", None)
    return k if isinstance(k, nnx.Variable) else None


def is_linear(m: Any) -> bool:
    """An ``nnx.Module`` with a 2-D ``kernel`` variable."""
    k = kernel(m)
    return isinstance(m, nnx.Module) and k is not None and getattr(k.get_value(), "ndim", 0) == 2


def capturing(m: Any) -> bool:
    """Whether ``m`` runs inside ``nnx.capture`` (its sows and perturbations are collected)."""
    return hasattr(m, "__captures__")


_CLASSES: dict[tuple[type, str], type] = {}


def _subclass(base: type, role: str, call: RoleCall) -> type:
    """``base`` with ``call`` as ``__call__`` (cached per (base, role); same name, isinstance(base) holds)."""
    key = (base, role)
    if key not in _CLASSES:

        def __call__(self, *args, **kwargs):
            return call(self, base, *args, **kwargs)

        ns = {"__call__": __call__, "__module__": "gradsparse.nnx", "__qualname__": base.__qualname__,
              "_gradsparse_role": role, "_gradsparse_base": base}
        _CLASSES[key] = type(base)(base.__name__, (base,), ns)
    return _CLASSES[key]


def role_of(m: Any) -> str | None:
    """The role :func:`retype` gave ``m``, or None."""
    return type(m).__dict__.get("_gradsparse_role")


def retype(m: Any, role: str, call: RoleCall) -> None:
    """Give ``m``, in place, the ``__call__`` ``call(self, base, *args, **kwargs)`` under the name ``role``."""
    object.__setattr__(m, "__class__", _subclass(type(m), role, call))
