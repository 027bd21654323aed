"""Host calls that the persistent compilation cache can hold.

``jax.pure_callback`` keeps a program out of JAX's persistent compilation cache: the
program refers to a Python object of the process that compiled it. :func:`host_call`
calls a Python function of module level from compiled code through XLA's typed FFI
instead (docs/backends.md): the program holds only the name of one FFI target,
``collapse_sim_host_call``, and an attribute ``key``, a deterministic text that names the
function and its static arguments (:func:`host_key`). The target's handler, registered
once per process through ctypes, looks the key up in this process's registry, which
:func:`host_call` fills when it traces the call. A program loaded from the cache was
traced in this process first (JAX traces and lowers a function to find its cache entry),
so its keys are registered before it runs.

The handler wraps the call's buffers as numpy arrays (the arguments without a copy,
read-only), calls the function and copies its results into the output buffers. An
exception in the function becomes an error of the compiled call (a
:class:`jax.errors.JaxRuntimeError` whose message names the function), never a crash.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import traceback
import types

import jax
import numpy as np
from jax._src import xla_bridge

TARGET = "collapse_sim_host_call"

# --- the C structures of xla/ffi/api/c_api.h (jax.ffi.include_dir()) that the handler reads


class _ExtensionBase(ctypes.Structure):
    pass


_ExtensionBase._fields_ = [("struct_size", ctypes.c_size_t), ("type", ctypes.c_int),
                           ("next", ctypes.POINTER(_ExtensionBase))]
_EXTENSION_METADATA = 1


class _ApiVersion(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("major_version", ctypes.c_int), ("minor_version", ctypes.c_int)]


# the FFI version this handler declares: every structure it reads has this layout since 0.1 (the header is 0.3)
_API_MAJOR, _API_MINOR = 0, 1


class _Metadata(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("api_version", _ApiVersion), ("traits", ctypes.c_uint32),
                ("state_type_id", ctypes.c_int64)]


class _MetadataExtension(ctypes.Structure):
    _fields_ = [("extension_base", _ExtensionBase), ("metadata", ctypes.POINTER(_Metadata))]


class _Buffer(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("dtype", ctypes.c_int),
                ("data", ctypes.c_void_p), ("rank", ctypes.c_int64), ("dims", ctypes.POINTER(ctypes.c_int64))]


class _Args(ctypes.Structure):  # also XLA_FFI_Rets: the same layout
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.POINTER(ctypes.c_int)), ("args", ctypes.POINTER(ctypes.c_void_p))]


class _ByteSpan(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class _Attrs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("size", ctypes.c_int64),
                ("types", ctypes.POINTER(ctypes.c_int)), ("names", ctypes.POINTER(ctypes.POINTER(_ByteSpan))),
                ("attrs", ctypes.POINTER(ctypes.c_void_p))]


_ATTR_STRING = 4
_BUFFER = 1
_STAGE_EXECUTE = 3


class _ErrorCreateArgs(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p),
                ("message", ctypes.c_char_p), ("errc", ctypes.c_int)]


_ERROR_INTERNAL = 13
_ErrorCreate = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_ErrorCreateArgs))


class _Api(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.c_void_p), ("api_version", _ApiVersion),
                ("internal_api", ctypes.c_void_p), ("error_create", _ErrorCreate)]


class _CallFrame(ctypes.Structure):
    _fields_ = [("struct_size", ctypes.c_size_t), ("extension_start", ctypes.POINTER(_ExtensionBase)),
                ("api", ctypes.POINTER(_Api)), ("ctx", ctypes.c_void_p), ("stage", ctypes.c_int), ("args", _Args),
                ("rets", _Args), ("attrs", _Attrs), ("future", ctypes.c_void_p)]


#: XLA_FFI_DataType -> numpy dtype, for every dtype numpy (with ml_dtypes) holds
_DTYPES = {1: np.bool_, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.uint8, 7: np.uint16,
           8: np.uint32, 9: np.uint64, 10: np.float16, 11: np.float32, 12: np.float64, 15: np.complex64,
           18: np.complex128, 16: jax.numpy.bfloat16}


class HostCallError(RuntimeError):
    """A host call that cannot be made (its function unknown to this process, a result of the wrong shape)."""


# --- keys and the registry


def host_key(value) -> str:
    """A text naming ``value`` that is the same in every process: ``value.host_key()`` where
    it has one; the repr of None, bools, numbers (numpy's too) and text; module and qualified
    name for a function or class of module level (not a lambda or a local one); tuples and
    lists element by element. Anything else is refused (its repr could name a memory address)."""
    if hasattr(value, "host_key") and not isinstance(value, type):
        return value.host_key()
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        inner = ", ".join(host_key(v) for v in value)
        return f"({inner}{',' * (len(value) == 1)})" if isinstance(value, tuple) else f"[{inner}]"
    if isinstance(value, np.generic):
        return repr(value)
    if isinstance(value, (types.FunctionType, type)) and "<" not in value.__qualname__:
        return f"{value.__module__}.{value.__qualname__}"
    raise TypeError(f"no host key for {type(value).__name__} {value!r}: give the type a host_key() method "
                    f"or pass a function of module level")


def _describe(key: str) -> str:
    return key if len(key) <= 200 else key[:200] + "..."


class _Entry:
    __slots__ = ("fn", "static", "treedef", "name")

    def __init__(self, fn, static, treedef, name):
        self.fn, self.static, self.treedef, self.name = fn, static, treedef, name


_REGISTRY: dict[str, _Entry] = {}
_LOCK = threading.Lock()


def _register(fn, static: tuple, treedef) -> str:
    """The key of ``fn(*static, *arrays)`` with arrays of the structure ``treedef``,
    registered in this process (once; a second function under the same key is refused)."""
    key = f"{host_key(fn)}{host_key(tuple(static))}{treedef}"
    with _LOCK:
        entry = _REGISTRY.get(key)
        if entry is None:
            _REGISTRY[key] = _Entry(fn, tuple(static), treedef, host_key(fn))
        elif entry.fn is not fn or entry.static != tuple(static):
            raise HostCallError(f"two host functions share the key {_describe(key)!r}: "
                                f"{entry.fn!r}{entry.static!r} and {fn!r}{tuple(static)!r}; their static "
                                f"arguments need host keys that tell them apart")
    return key


# --- the handler


def _array(buf: _Buffer, writable: bool) -> np.ndarray:
    dtype = _DTYPES.get(buf.dtype)
    if dtype is None:
        raise HostCallError(f"a buffer of XLA FFI data type {buf.dtype}, which has no numpy type here")
    shape = tuple(buf.dims[i] for i in range(buf.rank))
    count = int(np.prod(shape, dtype=np.int64))
    if count == 0:
        return np.empty(shape, dtype)
    dtype = np.dtype(dtype)
    raw = (ctypes.c_char * (count * dtype.itemsize)).from_address(buf.data)
    a = np.frombuffer(raw, dtype).reshape(shape)
    a.flags.writeable = writable
    return a


def _key_of(attrs: _Attrs) -> str:
    for i in range(attrs.size):
        name = attrs.names[i].contents
        if ctypes.string_at(name.ptr, name.len) == b"key" and attrs.types[i] == _ATTR_STRING:
            span = ctypes.cast(attrs.attrs[i], ctypes.POINTER(_ByteSpan)).contents
            return ctypes.string_at(span.ptr, span.len).decode()
    raise HostCallError(f"a call of {TARGET} without its key attribute")


def _run(frame: _CallFrame) -> None:
    key = _key_of(frame.attrs)
    entry = _REGISTRY.get(key)
    if entry is None:
        raise HostCallError(f"no host function of the key {_describe(key)!r} in this process (it is registered "
                            f"when a program that calls it is traced)")
    if any(frame.args.types[i] != _BUFFER for i in range(frame.args.size)) or any(
            frame.rets.types[i] != _BUFFER for i in range(frame.rets.size)):
        raise HostCallError(f"a call of host function {entry.name} with an argument or result that is not a buffer")
    args = [_array(ctypes.cast(frame.args.args[i], ctypes.POINTER(_Buffer)).contents, False)
            for i in range(frame.args.size)]
    outs = [_array(ctypes.cast(frame.rets.args[i], ctypes.POINTER(_Buffer)).contents, True)
            for i in range(frame.rets.size)]
    try:
        got = entry.fn(*entry.static, *jax.tree.unflatten(entry.treedef, args))
    except Exception as e:
        raise HostCallError(f"host function {entry.name} raised {type(e).__name__}: {e}\n"
                            f"{''.join(traceback.format_exception(e)[-3:])}") from e
    got = jax.tree.leaves(got)
    if len(got) != len(outs):
        raise HostCallError(f"host function {entry.name} returned {len(got)} arrays, its call expects {len(outs)}")
    for i, (o, g) in enumerate(zip(outs, got)):
        g = np.asarray(g)
        if g.shape != o.shape or g.dtype != o.dtype:
            raise HostCallError(f"host function {entry.name} returned result {i} as {g.dtype}{list(g.shape)}, "
                                f"its call expects {o.dtype}{list(o.shape)}")
        o[...] = g


def _error(frame_ptr, message: str, code: int):
    api = frame_ptr.contents.api.contents
    args = _ErrorCreateArgs(ctypes.sizeof(_ErrorCreateArgs), None, message.encode("utf-8", "replace"), code)
    return api.error_create(ctypes.byref(args))


def _handle(frame_ptr):
    """The FFI handler: the metadata query XLA makes when it registers the target, then one
    call per execution (never raises: an exception becomes the call's error)."""
    try:
        frame = frame_ptr.contents
        ext = frame.extension_start
        if ext and ext.contents.type == _EXTENSION_METADATA:
            meta = ctypes.cast(ext, ctypes.POINTER(_MetadataExtension)).contents.metadata.contents
            meta.api_version.major_version, meta.api_version.minor_version = _API_MAJOR, _API_MINOR
            meta.traits = 0
            return None
        if frame.stage != _STAGE_EXECUTE:
            return None
        _run(frame)
        return None
    except HostCallError as e:
        return _error(frame_ptr, str(e), _ERROR_INTERNAL)
    except BaseException as e:  # noqa: BLE001 (nothing may leave a ctypes callback)
        return _error(frame_ptr, f"{TARGET}: {type(e).__name__}: {e}", _ERROR_INTERNAL)


_HANDLER = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.POINTER(_CallFrame))(_handle)
jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(_HANDLER), platform="cpu", api_version=1)

# A host function that runs compiled programs itself (the redo of backends/_rows.py) does so
# while the program that called it is running. With XLA:CPU's asynchronous dispatch, programs
# that the caller dispatched meanwhile queue behind that program, each holding one of the
# device's slots for programs in flight; once they hold every slot, the nested program waits
# for one that is never released (measured: 40 eager additions dispatched behind a running
# host call hang the process). Dispatched synchronously, a call returns when its program has
# run, so nothing queues. JAX reads the setting when it starts its CPU backend: it is set here,
# on import, unless the backend has started already (then a nested host call is refused).
_ASYNC_OPTION = "jax_cpu_enable_async_dispatch"
if not xla_bridge.backends_are_initialized():
    jax.config.update(_ASYNC_OPTION, False)


def _dispatch_is_synchronous() -> bool:
    return not (xla_bridge.backends_are_initialized() and xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value)


def host_call(fn, static: tuple, result, *args, vmap_method: str, nested: bool = False):
    """``fn(*static, *args)`` computed on the host from compiled code: ``args`` a pytree of
    arrays (numpy arrays in the call, read-only and valid only during it), ``result`` a
    pytree of :class:`jax.ShapeDtypeStruct` that ``fn``'s result (a pytree of arrays of that
    structure, shapes and dtypes) matches. ``fn`` is a function of module level and
    ``static`` its static arguments (each with a :func:`host_key`). ``vmap_method`` as in
    :func:`jax.ffi.ffi_call`. ``nested``: ``fn`` runs compiled programs itself, which through
    the FFI target needs JAX's CPU dispatch to be synchronous (set on this module's import);
    where JAX started its CPU backend asynchronous before, such a call goes through
    ``jax.pure_callback`` instead: the same function and bits, but the program that holds it
    is not written to the persistent compilation cache. CPU only."""
    if nested and not _dispatch_is_synchronous():
        return jax.pure_callback(functools.partial(fn, *static), result, *args, vmap_method=vmap_method)
    leaves, treedef = jax.tree.flatten(args)
    key = _register(fn, static, treedef)
    out_leaves, out_tree = jax.tree.flatten(result)
    out = jax.ffi.ffi_call(TARGET, out_leaves, has_side_effect=False, vmap_method=vmap_method)(*leaves, key=key)
    return jax.tree.unflatten(out_tree, out)
