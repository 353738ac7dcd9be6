"""A restricted unpickler for third-party feature files and checkpoints.

Unpickling runs code: a pickle can name any importable callable (``os.system``, ``subprocess.Popen``) and
call it with arguments of its choosing while it loads. Feature LMDBs (ViLBERT's ``convert_to_lmdb``
layout) and detector ``.pkl`` weights are pickles written by someone else, so regionflow reads them through
``RestrictedUnpickler``, whose ``find_class`` admits only:

* builtin containers and scalars: ``dict``, ``list``, ``tuple``, ``set``, ``frozenset``, ``bytes``,
  ``bytearray``, ``str``, ``int``, ``float``, ``complex``, ``bool``, ``slice``, ``range``;
* numpy array and scalar reconstruction: ``numpy.ndarray``, ``numpy.dtype``,
  ``numpy(._)core.multiarray._reconstruct`` / ``scalar``, ``numpy(._)core.numeric._frombuffer``
  (the names numpy 1 and numpy 2 write with pickle protocols 2 to 5);
* ``_codecs.encode`` restricted to the ``latin1`` codec (how protocol 2 pickles carry ``bytes``).

Everything else raises ``UnsafePickleError`` naming the refused global and the file. Object-dtype arrays
stay safe: their elements are unpickled through the same ``find_class``.
"""

from __future__ import annotations

import codecs
import io
import pickle
from collections.abc import Callable
from typing import Any, BinaryIO

_BUILTINS = frozenset(
    {
        "dict",
        "list",
        "tuple",
        "set",
        "frozenset",
        "bytes",
        "bytearray",
        "str",
        "int",
        "float",
        "complex",
        "bool",
        "slice",
        "range",
    }
)
# (module, name) pairs numpy writes for arrays, dtypes and numpy scalars; "numpy.core" (numpy 1) is
# an alias of "numpy._core" (numpy 2) and is mapped to it before import.
_NUMPY_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),
    }
)
_LATIN1 = codecs.lookup("latin1").name


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle names a global outside the allow-list (it may run code); nothing from it was used."""


def _latin1_encode(text: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; any codec but latin1 is refused."""
    if not isinstance(text, str) or codecs.lookup(encoding).name != _LATIN1:
        raise UnsafePickleError(f"_codecs.encode is only allowed on str with latin1, got {encoding!r}")
    return text.encode(_LATIN1, errors)


def _numpy_module(module: str) -> str:
    """``numpy.core.x`` (numpy 1 pickles) -> ``numpy._core.x`` when numpy 2 is installed."""
    if not module.startswith("numpy.core"):
        return module
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        return "numpy._core" + module[len("numpy.core") :]
    return module


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals (module docstring).

    Args:
        file: a binary file object positioned at the pickle.
        where: names the source (file, LMDB key) in error messages.

    Raises (from ``load``):
        UnsafePickleError: the pickle names a global outside the allow-list.
        pickle.UnpicklingError, EOFError, ValueError: malformed pickle data.
    """

    def __init__(self, file: BinaryIO, *, where: str) -> None:
        super().__init__(file)
        self.where = where

    def find_class(self, module: str, name: str) -> Callable[..., Any]:
        if module == "builtins" and name in _BUILTINS:
            return super().find_class(module, name)
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        canonical = "numpy._core" + module[len("numpy.core") :] if module.startswith("numpy.core") else module
        if (canonical, name) in _NUMPY_GLOBALS:
            return super().find_class(_numpy_module(module), name)
        raise UnsafePickleError(
            f"{self.where}: refusing to unpickle global {module}.{name}: only builtin containers/scalars "
            "and numpy arrays are allowed (a pickle naming other globals can run code)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self.where}: persistent ids are not allowed in pickles")


def safe_loads(data: bytes, *, where: str) -> Any:
    """Unpickle ``data`` with ``RestrictedUnpickler`` (raises as its ``load``)."""
    return RestrictedUnpickler(io.BytesIO(data), where=where).load()


def safe_load(file: BinaryIO, *, where: str) -> Any:
    """Unpickle one object from a binary file object with ``RestrictedUnpickler``."""
    return RestrictedUnpickler(file, where=where).load()
