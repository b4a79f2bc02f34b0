"""Load EDM network pickles without running the code they carry.

EDM's released checkpoints (``*.pkl`` on nvlabs-fi-cdn.nvidia.com/edm/pretrained/) are pickles of
``dict(ema=net, loss_fn=..., augment_pipe=..., dataset_kwargs=...)``. Each network object is written by EDM's
``torch_utils.persistence`` as a call ``_reconstruct_persistent_obj(meta)`` where ``meta`` holds the *whole source
text* of EDM's ``training/networks.py`` (``module_src``), the class name, a version number (6) and the object's
``__dict__`` (parameters, buffers, sub-modules, ``_init_kwargs``). EDM's own loader ``exec``s ``module_src``.

This loader never executes anything from the file:

* a restricted :class:`pickle.Unpickler` resolves only an allow-list of globals (tensor-rebuild helpers, a few
  containers and numpy scalar helpers) and refuses everything else with :class:`UnsafePickleError`, naming the
  ``module.attribute`` it refused;
* ``torch_utils.persistence._reconstruct_persistent_obj`` resolves to a local function that keeps ``meta`` as inert
  data (``module_src`` is only hashed);
* tensor storages, which ``pickle`` stores as nested ``torch.save`` blobs (``torch.storage._load_from_bytes``, which
  upstream opens with ``weights_only=False``), are opened with ``torch.load(weights_only=True)``;
* the network is then rebuilt from our re-implementation (:mod:`repro.restart.networks`) using the pickled
  ``_init_kwargs`` and filled with ``load_state_dict(strict=True)``, after checking that the pickled module tree
  (class names, sub-module names, scalar attributes) matches the rebuilt one.

Re-saved weights can be kept as ``.safetensors`` or a ``weights_only`` torch file with
:func:`save_state_dict_checkpoint` / :func:`load_state_dict_checkpoint`.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import math
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repro.errors import MissingResource, ReproError
from repro.provenance import sha256_file
from repro.restart.networks import build_network, count_parameters, skip_weight_init

__all__ = [
    "UnsafePickleError", "PersistentObject", "ModuleRecord", "load_edm_pickle", "read_edm_pickle",
    "rebuild_network", "save_state_dict_checkpoint", "load_state_dict_checkpoint", "file_sha256",
    "EDM_CHECKPOINT_URLS",
]

EDM_CHECKPOINT_URLS = {
    "cifar10-uncond-vp-baseline": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/baseline/baseline-cifar10-32x32-uncond-vp.pkl",
    "cifar10-uncond-edm": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-uncond-vp.pkl",
    "imagenet64-cond-edm": "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl",
}

STATE_DICT_FORMAT = "repro.restart.state_dict/v1"


class UnsafePickleError(ReproError):
    """The pickle asks for something outside the allow-list (it could run code), or is malformed."""


# ---------------------------------------------------------------------------------------------------------------
# Inert stand-ins for objects in the pickle


class _StandIn:
    """Common shape of the stand-ins: the original class name and the pickled ``__dict__``."""

    class_name: str
    state: dict[str, Any]

    def children(self) -> dict[str, _StandIn]:
        modules = self.state.get("_modules") or {}
        return {name: child for name, child in modules.items() if child is not None}


class PersistentObject(_StandIn):
    """What an EDM persistent object becomes here: its metadata, never its code."""

    def __init__(self, meta: dict[str, Any]):
        if not isinstance(meta, dict):
            raise UnsafePickleError(f"persistent object metadata is a {type(meta).__name__}, expected a dict")
        if meta.get("type", "class") != "class":
            raise UnsafePickleError(f"unsupported persistent object type {meta.get('type')!r} (only 'class')")
        class_name = meta.get("class_name")
        if not isinstance(class_name, str):
            raise UnsafePickleError("persistent object metadata has no class_name string")
        state = meta.get("state") or {}
        if not isinstance(state, dict):
            raise UnsafePickleError(f"persistent object {class_name!r} has a state of type {type(state).__name__}")
        source = meta.get("module_src")
        self.class_name = class_name
        self.state = dict(state)
        self.version = meta.get("version")
        self.module_src_present = isinstance(source, str) and len(source) > 0
        # The source text is kept only as a fingerprint; it is never compiled or executed.
        self.module_src_sha256 = hashlib.sha256(source.encode("utf-8")).hexdigest() if self.module_src_present else None

    def __repr__(self) -> str:
        return f"PersistentObject({self.class_name!r}, version={self.version!r}, keys={sorted(self.state)[:8]}...)"


class ModuleRecord(_StandIn):
    """Stand-in for a plain ``torch.nn`` module in the stream (``ModuleDict`` etc.); subclassed per class name."""

    class_name = "Module"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = state[0]
        if not isinstance(state, dict):
            raise UnsafePickleError(f"{self.class_name} record got a state of type {type(state).__name__}")
        self.state = dict(state)

    def __repr__(self) -> str:
        return f"ModuleRecord({self.class_name!r})"


_module_record_classes: dict[str, type[ModuleRecord]] = {}


def _module_record_class(name: str) -> type[ModuleRecord]:
    if name not in _module_record_classes:
        _module_record_classes[name] = type(f"{name}Record", (ModuleRecord,), {"class_name": name, "state": {}})
    return _module_record_classes[name]


# ---------------------------------------------------------------------------------------------------------------
# Safe replacements for the callables the stream names


def _reconstruct_persistent_obj(meta: dict[str, Any]) -> PersistentObject:
    return PersistentObject(meta)


def _load_storage_from_bytes(data: bytes):
    """Open a nested ``torch.save`` blob with the weights-only unpickler (upstream uses ``weights_only=False``)."""
    if not isinstance(data, (bytes, bytearray)):
        raise UnsafePickleError(f"tensor storage payload is a {type(data).__name__}, expected bytes")
    try:
        return torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        raise UnsafePickleError(f"a nested tensor storage was refused by torch's weights-only loader: {err}") from None


def _set_plain_state(obj: Any, state: Any) -> Any:
    if not state:
        return obj
    if isinstance(state, tuple) and len(state) == 2:
        state = {**(state[0] or {}), **(state[1] or {})}
    if not isinstance(state, dict) or not all(isinstance(key, str) for key in state):
        raise UnsafePickleError(f"unsupported tensor state of type {type(state).__name__}")
    if any(key.startswith("__") for key in state):  # e.g. __class__ / __torch_function__ would change behaviour
        raise UnsafePickleError(f"refusing tensor state with special attributes {sorted(state)}")
    for key, value in state.items():
        setattr(obj, key, value)
    return obj


def _no_hooks(backward_hooks: Any) -> Any:
    # Hooks are callables attached to tensors; a network checkpoint has none, so any hook is refused.
    if backward_hooks:
        raise UnsafePickleError("refusing a tensor that carries backward hooks")
    return backward_hooks


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, *metadata):
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad,
                                           _no_hooks(backward_hooks), *metadata)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    return torch._utils._rebuild_parameter(data, requires_grad, _no_hooks(backward_hooks))


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state):
    param = torch._utils._rebuild_parameter(data, requires_grad, _no_hooks(backward_hooks))
    return _set_plain_state(param, state)


def _rebuild_from_type_v2(func, new_type, args, state):
    if new_type not in (torch.Tensor, torch.nn.Parameter):
        raise UnsafePickleError(f"refusing tensor subclass {getattr(new_type, '__qualname__', new_type)!r}")
    if func not in _TENSOR_REBUILDERS:
        raise UnsafePickleError(f"refusing tensor rebuild function {func!r}")
    result = func(*args)
    if type(result) is not new_type:
        result = result.as_subclass(new_type)
    return _set_plain_state(result, state)


def _numpy_scalar(dtype: np.dtype, data: bytes | None = None):
    if not isinstance(dtype, np.dtype) or dtype.kind not in "biufc":
        raise UnsafePickleError(f"refusing numpy scalar of dtype {dtype!r} (only numeric scalars are allowed)")
    if not isinstance(data, bytes):
        raise UnsafePickleError("numpy scalar payload is not bytes")
    return np.frombuffer(data, dtype=dtype, count=1)[0]


def _numpy_reconstruct(subtype, shape, dtype_code):
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"refusing numpy array subclass {subtype!r}")
    return np.ndarray.__new__(np.ndarray, shape, dtype_code)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    # Protocol 2 writes bytes objects as _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _copyreg_reconstructor(cls, base, state):
    # Protocol 0/1 spelling of "make an empty instance"; only our inert record classes may be made this way.
    if not (isinstance(cls, type) and issubclass(cls, ModuleRecord)) or base is not object or state is not None:
        raise UnsafePickleError(f"refusing copyreg._reconstructor for {cls!r}")
    return cls.__new__(cls)


_TENSOR_REBUILDERS = {torch._utils._rebuild_tensor, _rebuild_tensor_v2, _rebuild_parameter,
                      _rebuild_parameter_with_state}

_ALLOWED_GLOBALS: dict[str, Any] = {
    # Tensors (outer pickle); storages are nested torch.save blobs opened weights-only.
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter_with_state,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "torch.storage._load_from_bytes": _load_storage_from_bytes,
    "torch.device": torch.device,
    "torch.Size": torch.Size,
    # EDM's persistence and config containers.
    "torch_utils.persistence._reconstruct_persistent_obj": _reconstruct_persistent_obj,
    "dnnlib.util.EasyDict": dict,
    "dnnlib.EasyDict": dict,
    # Plain containers.
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "builtins.bytearray": bytearray,
    "builtins.complex": complex,
    "copyreg._reconstructor": _copyreg_reconstructor,
    "_codecs.encode": _latin1_bytes,
    # numpy scalars (e.g. EDM's skip_scale = np.sqrt(0.5)) and arrays.
    "numpy.dtype": np.dtype,
    "numpy.ndarray": np.ndarray,
    "numpy.core.multiarray.scalar": _numpy_scalar,
    "numpy._core.multiarray.scalar": _numpy_scalar,
    "numpy.core.multiarray._reconstruct": _numpy_reconstruct,
    "numpy._core.multiarray._reconstruct": _numpy_reconstruct,
}


_PYTHON2_MODULE_NAMES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        # Protocols 0-2 spell some modules the Python 2 way; pickle's own find_class renames them, ours must too.
        module = _PYTHON2_MODULE_NAMES.get(module, module)
        qualified = f"{module}.{name}"
        if qualified in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[qualified]
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module.startswith("torch.nn.modules.") and name.isidentifier() and name[:1].isupper():
            # Plain torch containers (ModuleDict, ...) become inert records; nothing of torch.nn runs.
            return _module_record_class(name)
        raise UnsafePickleError(
            f"refused to load {self.source}: it references {qualified}, which is not on the allow-list for EDM "
            f"network pickles (loading it could run arbitrary code). Nothing from the file was executed.")

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"refused to load {self.source}: it uses a persistent id ({str(pid)[:60]!r}); "
                                "torch.save zip files should be opened with load_state_dict_checkpoint")


# ---------------------------------------------------------------------------------------------------------------
# Public API


# Shared with the runner's provenance, which hashes the same checkpoint again (cached by path, size and mtime).
file_sha256 = sha256_file


def _missing_checkpoint(path: Path) -> MissingResource:
    urls = "\n  ".join(f"{name}: {url}" for name, url in EDM_CHECKPOINT_URLS.items())
    return MissingResource(f"EDM checkpoint not found: {path}. Download the pickle (CC BY-NC-SA 4.0) and pass its "
                           f"path; the ones used by the Restart paper are:\n  {urls}")


def read_edm_pickle(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with the allow-list; persistent objects come back as :class:`PersistentObject`."""
    path = Path(path)
    if not path.is_file():
        raise _missing_checkpoint(path)
    with open(path, "rb") as handle:
        if handle.read(4) == b"PK\x03\x04":
            raise UnsafePickleError(f"{path} is a zip archive (torch.save format), not an EDM pickle; re-saved "
                                    "weights are read with load_state_dict_checkpoint")
        handle.seek(0)
        try:
            return _RestrictedUnpickler(handle, source=str(path)).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, KeyError, IndexError,
                RuntimeError) as err:
            raise UnsafePickleError(f"could not read {path} as an EDM pickle: {type(err).__name__}: {err}") from None


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (bool, int, float, str, np.generic)) and not isinstance(value, np.ndarray)


def _same_scalar(a: Any, b: Any) -> bool:
    if isinstance(a, str) or isinstance(b, str):
        return a == b
    a, b = float(a), float(b)
    return a == b or math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)


def _check_structure(record: _StandIn, module: nn.Module, where: str, problems: list[str]) -> None:
    """Compare the pickled tree with ours: class names, children and shared scalar attributes."""
    ours = type(module).__name__
    if record.class_name != ours:
        problems.append(f"{where}: pickle has class {record.class_name}, rebuilt network has {ours}")
        return
    for key, value in record.state.items():
        if key.startswith("_") or key == "training" or not _is_scalar(value):
            continue
        if key in module.__dict__ and _is_scalar(module.__dict__[key]):
            if not _same_scalar(value, module.__dict__[key]):
                problems.append(f"{where}.{key}: pickle has {value!r}, rebuilt network has {module.__dict__[key]!r}")
    pickled_children = record.children()
    our_children = {name: child for name, child in module._modules.items() if child is not None}
    if list(pickled_children) != list(our_children):
        problems.append(f"{where}: sub-modules differ: pickle {list(pickled_children)}, rebuilt {list(our_children)}")
        return
    for name, child in pickled_children.items():
        if not isinstance(child, _StandIn):
            problems.append(f"{where}.{name}: unexpected object of type {type(child).__name__}")
            continue
        _check_structure(child, our_children[name], f"{where}.{name}", problems)


def _collect_tensors(record: _StandIn, prefix: str, out: dict[str, torch.Tensor]) -> None:
    """Flatten a pickled module tree into ``state_dict`` form (persistent buffers only, like torch does)."""
    for name, value in (record.state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = value
    non_persistent = set(record.state.get("_non_persistent_buffers_set") or ())
    for name, value in (record.state.get("_buffers") or {}).items():
        if value is not None and name not in non_persistent:
            out[prefix + name] = value
    for name, child in record.children().items():
        _collect_tensors(child, f"{prefix}{name}.", out)


def rebuild_network(record: PersistentObject, where: str = "ema") -> nn.Module:
    """Build our re-implementation for a pickled EDM network and load its tensors with ``strict=True``."""
    if not isinstance(record, PersistentObject):
        raise UnsafePickleError(f"{where} is a {type(record).__name__}, not an EDM persistent network object")
    init_args = record.state.get("_init_args") or ()
    init_kwargs = record.state.get("_init_kwargs")
    if init_args or not isinstance(init_kwargs, dict):
        raise UnsafePickleError(f"{where} ({record.class_name}) records no keyword-only constructor arguments; "
                                "cannot rebuild it")
    with skip_weight_init():  # every tensor is overwritten below (strict=True guarantees it)
        net = build_network(record.class_name, init_kwargs)
    problems: list[str] = []
    _check_structure(record, net, where, problems)
    if problems:
        raise ReproError(f"the pickled {record.class_name} does not match the re-implementation:\n  "
                         + "\n  ".join(problems[:20]))
    state_dict: dict[str, torch.Tensor] = {}
    _collect_tensors(record, "", state_dict)
    net.load_state_dict(state_dict, strict=True)
    return net.eval().requires_grad_(False)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)


def load_edm_pickle(path: str | os.PathLike, key: str = "ema") -> tuple[nn.Module, dict[str, Any]]:
    """Load the network stored under ``key`` of an EDM snapshot pickle (or a pickled bare network) safely.

    Returns ``(network, meta)``; the network is our re-implementation in eval mode with gradients off, on the CPU.
    ``meta`` has ``path``, ``sha256``, ``class_name``, ``model_class_name``, ``init_kwargs``, ``module_src_present``,
    ``module_src_sha256``, ``persistence_version``, ``top_level``, ``other_entries`` and ``num_parameters``.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing_checkpoint(path)
    digest = file_sha256(path)
    obj = read_edm_pickle(path)
    other_entries: dict[str, str] = {}
    if isinstance(obj, dict):
        if key not in obj:
            raise ReproError(f"{path} holds a dict with keys {sorted(map(str, obj))}, without {key!r}")
        record = obj[key]
        top_level = "dict"
        for name, value in obj.items():
            if name != key:
                other_entries[str(name)] = value.class_name if isinstance(value, _StandIn) else type(value).__name__
    else:
        record, top_level = obj, "object"
    net = rebuild_network(record, where=key if top_level == "dict" else "network")
    inner = record.children().get("model")
    meta = dict(
        path=str(path), sha256=digest, top_level=top_level, class_name=record.class_name,
        model_class_name=inner.class_name if inner is not None else None,
        init_kwargs=_jsonable(record.state["_init_kwargs"]),
        module_src_present=record.module_src_present, module_src_sha256=record.module_src_sha256,
        persistence_version=record.version, other_entries=other_entries, num_parameters=count_parameters(net),
    )
    return net, meta


def save_state_dict_checkpoint(net: nn.Module, path: str | os.PathLike, class_name: str | None = None,
                               init_kwargs: dict[str, Any] | None = None,
                               extra: dict[str, Any] | None = None) -> Path:
    """Save ``net``'s weights with what is needed to rebuild it (class name + constructor kwargs).

    ``.safetensors`` paths use safetensors (kwargs as JSON metadata); anything else a ``torch.save`` dict that
    :func:`load_state_dict_checkpoint` opens with ``weights_only=True``. Written atomically.
    """
    path = Path(path)
    class_name = class_name or type(net).__name__
    if init_kwargs is None:
        init_kwargs = getattr(net, "init_kwargs", None)
        if init_kwargs is None:
            raise ReproError(f"{class_name} has no init_kwargs; pass init_kwargs= to save_state_dict_checkpoint")
    init_kwargs = _jsonable(init_kwargs)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in net.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(tmp), metadata={"format": STATE_DICT_FORMAT, "class_name": class_name,
                                             "init_kwargs": json.dumps(init_kwargs),
                                             "extra": json.dumps(_jsonable(extra or {}))})
    else:
        torch.save(dict(format=STATE_DICT_FORMAT, class_name=class_name, init_kwargs=init_kwargs,
                        state_dict=state, extra=_jsonable(extra or {})), tmp)
    os.replace(tmp, path)
    return path


def load_state_dict_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu"
                               ) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a network saved by :func:`save_state_dict_checkpoint`; returns ``(network, meta)``."""
    path = Path(path)
    if not path.is_file():
        raise MissingResource(f"state-dict checkpoint not found: {path} (create it with save_state_dict_checkpoint "
                              "from a network loaded by load_edm_pickle)")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device=str(map_location)) as handle:
            header = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
        if header.get("format") != STATE_DICT_FORMAT:
            raise ReproError(f"{path} was not written by save_state_dict_checkpoint (format {header.get('format')!r})")
        class_name = header["class_name"]
        init_kwargs = json.loads(header["init_kwargs"])
        extra = json.loads(header.get("extra", "{}"))
    else:
        try:
            payload = torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise UnsafePickleError(f"{path} was refused by torch's weights-only loader: {err}") from None
        if not isinstance(payload, dict) or payload.get("format") != STATE_DICT_FORMAT:
            raise ReproError(f"{path} was not written by save_state_dict_checkpoint")
        class_name, init_kwargs = payload["class_name"], payload["init_kwargs"]
        state, extra = payload["state_dict"], payload.get("extra", {})
    with skip_weight_init():
        net = build_network(class_name, init_kwargs)
    net.load_state_dict(state, strict=True)
    net = net.eval().requires_grad_(False)
    meta = dict(path=str(path), sha256=file_sha256(path), class_name=class_name, init_kwargs=init_kwargs,
                extra=extra, num_parameters=count_parameters(net))
    return net, meta
