"""Safe loading of EDM pickles.

EDM-format pickles are produced here without EDM's code: ``_edm_style_pickle`` writes the same structure EDM's
``torch_utils.persistence`` emits (a call to ``torch_utils.persistence._reconstruct_persistent_obj(meta)`` per
network object, with ``meta = {type, version=6, module_src, class_name, state=__dict__}``; plain torch containers
pickled normally; ``dnnlib.util.EasyDict`` for configs). The module source planted in ``meta`` creates a marker file
if it is ever executed. (A side-by-side check against EDM's real classes lives outside the repo.)
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import io
import os
import pickle
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from repro.errors import MissingResource, ReproError
from repro.restart import networks as N
from repro.restart.edm_pickle import (
    UnsafePickleError,
    load_edm_pickle,
    load_state_dict_checkpoint,
    read_edm_pickle,
    save_state_dict_checkpoint,
)

# ---------------------------------------------------------------------------------------------------------------
# Helpers that write EDM-shaped pickles


@contextlib.contextmanager
def _fake_edm_modules():
    """Make ``torch_utils.persistence`` and ``dnnlib.util`` importable *while pickling* so that pickle can write
    references to them; they are removed again before anything is loaded."""

    def _reconstruct_persistent_obj(meta):  # pragma: no cover - must never be called by the loader
        raise AssertionError("the real EDM reconstruct function must not be called")

    class EasyDict(dict):
        pass

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    EasyDict.__module__, EasyDict.__qualname__ = "dnnlib.util", "EasyDict"
    fakes = {
        "torch_utils": types.ModuleType("torch_utils"),
        "torch_utils.persistence": types.ModuleType("torch_utils.persistence"),
        "dnnlib": types.ModuleType("dnnlib"),
        "dnnlib.util": types.ModuleType("dnnlib.util"),
    }
    fakes["torch_utils.persistence"]._reconstruct_persistent_obj = _reconstruct_persistent_obj
    fakes["torch_utils"].persistence = fakes["torch_utils.persistence"]
    fakes["dnnlib.util"].EasyDict = EasyDict
    fakes["dnnlib"].util = fakes["dnnlib.util"]
    saved = {name: sys.modules.get(name) for name in fakes}
    sys.modules.update(fakes)
    try:
        yield _reconstruct_persistent_obj, EasyDict
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class FakeEDMLoss:
    """Like EDM's EDMLoss: a persistent non-module object stored beside the network."""

    def __init__(self):
        self.P_mean, self.P_std, self.sigma_data = -1.2, 1.2, 0.5


def _marker_source(marker: Path) -> str:
    """Stands for EDM's module_src; running it would leave a marker file."""
    return (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('module_src was executed')\n"
            "class EDMPrecond:\n    pass\n")


def _edm_style_pickle(obj, path: Path, marker: Path, tamper=None, protocol: int = 4) -> Path:
    """Pickle ``obj`` the way EDM's persistence does, from our own modules."""
    persistent_types = tuple(N.NETWORK_CLASSES.values()) + (FakeEDMLoss,)
    with _fake_edm_modules() as (reconstruct, EasyDict):
        if isinstance(obj, dict) and isinstance(obj.get("dataset_kwargs"), dict):
            obj = {**obj, "dataset_kwargs": EasyDict(obj["dataset_kwargs"])}  # EDM's configs are EasyDicts

        class EDMStylePickler(pickle.Pickler):
            def reducer_override(self, item):
                if not isinstance(item, persistent_types):
                    return NotImplemented
                state = dict(item.__dict__)
                state.pop("init_kwargs", None)
                state["_init_args"] = ()
                state["_init_kwargs"] = dict(getattr(item, "init_kwargs", {}))
                class_name = "EDMLoss" if isinstance(item, FakeEDMLoss) else type(item).__name__
                if tamper is not None:
                    tamper(class_name, state)
                meta = dict(type="class", version=6, module_src=_marker_source(marker), class_name=class_name,
                            state=state)
                return reconstruct, (meta,)

        with open(path, "wb") as handle:
            EDMStylePickler(handle, protocol=protocol).dump(obj)
    return path


def _snapshot(net: nn.Module):
    """The dict EDM's training loop pickles."""
    dataset_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path="cifar10.zip")
    return dict(ema=net, loss_fn=FakeEDMLoss(), augment_pipe=None, dataset_kwargs=dataset_kwargs)


def _random_net(class_name: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    net = N.build_network(class_name, N.tiny_config(class_name, **overrides))
    with torch.no_grad():
        for p in net.parameters():  # no zero-initialised layers: every weight must matter
            p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.ndim >= 2 else 1))
    return net.eval().requires_grad_(False)


class _Payload:
    """An object whose unpickling runs ``func(*args)``."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload_ran"
    assert not path.exists()
    return path


# ---------------------------------------------------------------------------------------------------------------
# Refusing code


def test_refuses_os_system_payload(tmp_path, marker):
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(_Payload(os.system, f"touch {marker}")))
    qualified = f"{os.system.__module__}.system"  # posix.system on Linux
    with pytest.raises(UnsafePickleError, match=qualified.replace(".", r"\.")) as info:
        load_edm_pickle(path)
    assert "not on the allow-list" in str(info.value) and isinstance(info.value, ReproError)
    assert not marker.exists()


def test_refuses_builtins_exec_payload_even_next_to_a_valid_network(tmp_path, marker):
    net = _random_net("EDMPrecond", img_resolution=8)
    snapshot = _snapshot(net)
    snapshot["augment_pipe"] = _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()")
    path = _edm_style_pickle(snapshot, tmp_path / "evil.pkl", marker)
    with pytest.raises(UnsafePickleError, match=r"builtins\.exec"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_refuses_payload_hidden_in_a_tensor_storage_blob(tmp_path, marker):
    # Upstream torch opens these nested blobs with weights_only=False; the loader must not.
    inner = pickle.dumps(_Payload(os.system, f"touch {marker}"), protocol=2)
    path = tmp_path / "evil_storage.pkl"
    path.write_bytes(pickle.dumps(_Payload(torch.storage._load_from_bytes, inner)))
    with pytest.raises(UnsafePickleError, match="weights-only"):
        load_edm_pickle(path)
    assert not marker.exists()


def test_refuses_tensors_carrying_hooks(tmp_path):
    import collections

    storage = torch.arange(2.0)._typed_storage()
    hooked = _Payload(torch._utils._rebuild_tensor_v2, storage, 0, (2,), (1,), False,
                      collections.OrderedDict(hook=collections.OrderedDict))
    path = tmp_path / "hooked.pkl"
    path.write_bytes(pickle.dumps({"ema": hooked}))
    with pytest.raises(UnsafePickleError, match="backward hooks"):
        read_edm_pickle(path)
    plain = _Payload(torch._utils._rebuild_tensor_v2, storage, 0, (2,), (1,), False, collections.OrderedDict())
    path.write_bytes(pickle.dumps({"ema": plain}))
    assert torch.equal(read_edm_pickle(path)["ema"], torch.arange(2.0))


def test_refuses_unknown_classes(tmp_path):
    path = tmp_path / "other.pkl"
    path.write_bytes(pickle.dumps({"ema": io.BytesIO(b"x")}))
    with pytest.raises(UnsafePickleError, match=r"_io\.BytesIO"):
        read_edm_pickle(path)


# ---------------------------------------------------------------------------------------------------------------
# Loading EDM-format pickles


@pytest.mark.parametrize("class_name,overrides,protocol", [
    ("EDMPrecond", dict(img_resolution=8), 4),
    ("VPPrecond", dict(img_resolution=8, embedding_type="fourier", encoder_type="residual", channel_mult_noise=2,
                       resample_filter=[1, 3, 3, 1]), 2),
    ("EDMPrecond", dict(img_resolution=8, model_type="DhariwalUNet", label_dim=4), 4),
    ("iDDPMPrecond", dict(img_resolution=8), 3),
    # PFGM++ checkpoints pickle EDMPrecond with two extra arguments (pfgmpp, D) and attributes D, N.
    ("EDMPrecond", dict(img_resolution=8, pfgmpp=True, D=2048), 4),
])
def test_edm_format_pickle_loads_without_running_module_src(tmp_path, marker, class_name, overrides, protocol):
    net = _random_net(class_name, **overrides)
    path = _edm_style_pickle(_snapshot(net), tmp_path / "network-snapshot.pkl", marker, protocol=protocol)
    assert b"torch_utils.persistence" in path.read_bytes() and b"module_src was executed" in path.read_bytes()

    loaded, meta = load_edm_pickle(path)

    assert not marker.exists()
    assert not any(name.startswith("torch_utils") or name.startswith("dnnlib") for name in sys.modules)
    assert type(loaded) is type(net) and loaded is not net
    assert meta["class_name"] == class_name
    assert meta["model_class_name"] == overrides.get("model_type", type(net.model).__name__)
    assert meta["module_src_present"] is True and len(meta["module_src_sha256"]) == 64
    assert meta["persistence_version"] == 6
    assert meta["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert meta["other_entries"] == {"loss_fn": "EDMLoss", "augment_pipe": "NoneType", "dataset_kwargs": "dict"}
    assert meta["init_kwargs"] == net.init_kwargs and meta["num_parameters"] == N.count_parameters(net)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    if overrides.get("pfgmpp"):
        assert (loaded.D, loaded.N) == (2048, 3 * 8 * 8) and meta["init_kwargs"]["D"] == 2048

    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    sigma = torch.tensor([0.01, 1.0, 50.0])
    labels = torch.eye(4)[:3] if overrides.get("label_dim") else None
    with torch.no_grad():
        assert torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))


def test_bare_network_pickle_and_other_key(tmp_path, marker):
    net = _random_net("VEPrecond", img_resolution=8)
    path = _edm_style_pickle(net, tmp_path / "bare.pkl", marker)
    loaded, meta = load_edm_pickle(path)
    assert meta["top_level"] == "object" and meta["other_entries"] == {}
    x, sigma = torch.randn(1, 3, 8, 8), torch.tensor([2.0])
    assert torch.equal(loaded(x, sigma), net(x, sigma))

    path = _edm_style_pickle({"net": net}, tmp_path / "keyed.pkl", marker)
    with pytest.raises(ReproError, match="without 'ema'"):
        load_edm_pickle(path)
    assert type(load_edm_pickle(path, key="net")[0]) is N.VEPrecond
    assert not marker.exists()


def test_mismatched_attributes_are_reported(tmp_path, marker):
    def tamper(class_name, state):
        if class_name == "UNetBlock" and "skip_scale" in state:
            state["skip_scale"] = 0.25  # the weights would load, but the network would compute something else

    path = _edm_style_pickle(_snapshot(_random_net("EDMPrecond", img_resolution=8)), tmp_path / "t.pkl", marker,
                             tamper=tamper)
    with pytest.raises(ReproError, match=r"skip_scale: pickle has 0\.25"):
        load_edm_pickle(path)


def test_kwargs_that_disagree_with_the_tensors_fail_strict_loading(tmp_path, marker):
    def tamper(class_name, state):
        if class_name == "EDMPrecond":
            state["_init_kwargs"]["model_channels"] = 8  # real tensors were made with 16

    path = _edm_style_pickle(_snapshot(_random_net("EDMPrecond", img_resolution=8)), tmp_path / "t.pkl", marker,
                             tamper=tamper)
    with pytest.raises((ReproError, RuntimeError)):
        load_edm_pickle(path)


def test_missing_file_and_wrong_format(tmp_path):
    with pytest.raises(MissingResource, match="edm-cifar10-32x32-uncond-vp.pkl"):
        load_edm_pickle(tmp_path / "absent.pkl")
    zipped = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(2)}, zipped)
    with pytest.raises(UnsafePickleError, match="load_state_dict_checkpoint"):
        load_edm_pickle(zipped)
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(UnsafePickleError, match="could not read"):
        load_edm_pickle(garbage)


# ---------------------------------------------------------------------------------------------------------------
# Re-saved weights


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_checkpoint_roundtrip(tmp_path, marker, suffix):
    net = _random_net("EDMPrecond", img_resolution=8, model_type="DhariwalUNet", label_dim=4)
    loaded, _ = load_edm_pickle(_edm_style_pickle(_snapshot(net), tmp_path / "s.pkl", marker))
    path = save_state_dict_checkpoint(loaded, tmp_path / f"weights{suffix}", extra={"source_sha256": "abc"})
    again, meta = load_state_dict_checkpoint(path)
    assert meta["class_name"] == "EDMPrecond" and meta["extra"] == {"source_sha256": "abc"}
    assert meta["init_kwargs"]["sigma_max"] == float("inf")
    x, sigma, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 5.0]), torch.eye(4)[:2]
    assert torch.equal(again(x, sigma, labels), net(x, sigma, labels))


def test_state_dict_checkpoint_refuses_foreign_files(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(ReproError, match="not written by save_state_dict_checkpoint"):
        load_state_dict_checkpoint(foreign)
    with pytest.raises(MissingResource):
        load_state_dict_checkpoint(tmp_path / "absent.safetensors")


# ---------------------------------------------------------------------------------------------------------------
# Optional side-by-side check against EDM's own classes (EDM is CC BY-NC-SA and not part of this repository):
# REPRO_EDM_SRC=/path/to/NVlabs/edm checkout runs it in a subprocess, so EDM's modules never enter this process.

_SIDE_BY_SIDE = r"""
import copy, pickle, sys, torch
sys.path.insert(0, sys.argv[1])
import dnnlib
from training import networks, loss
from repro.restart.edm_pickle import load_edm_pickle
from repro.restart.networks import tiny_config
torch.manual_seed(0)
worst = 0.0
for name, kwargs in [("EDMPrecond", tiny_config("EDMPrecond", img_resolution=8, augment_dim=9)),
                     ("VPPrecond", tiny_config("VPPrecond", img_resolution=8, embedding_type="fourier",
                                               encoder_type="residual", channel_mult_noise=2,
                                               resample_filter=[1, 3, 3, 1])),
                     ("EDMPrecond", tiny_config("EDMPrecond", img_resolution=8, model_type="DhariwalUNet",
                                                label_dim=4))]:
    net = getattr(networks, name)(**kwargs)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p) / (p[0].numel() ** 0.5 if p.ndim >= 2 else 1))
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    path = sys.argv[2] + f"/{name}.pkl"
    with open(path, "wb") as f:
        pickle.dump(dict(ema=ema, loss_fn=loss.EDMLoss(), augment_pipe=None,
                         dataset_kwargs=dnnlib.EasyDict(path="x")), f)
    ours, meta = load_edm_pickle(path)
    assert type(ours).__module__ == "repro.restart.networks"
    x, sigma = torch.randn(2, 3, 8, 8), torch.tensor([0.05, 20.0])
    labels = torch.eye(4)[:2] if kwargs["label_dim"] else None
    with torch.no_grad():
        worst = max(worst, (ours(x, sigma, labels) - ema(x, sigma, labels)).abs().max().item())
print("MAXDIFF", worst)
"""


def test_side_by_side_with_official_edm_classes(tmp_path):
    edm_src = os.environ.get("REPRO_EDM_SRC")
    if not edm_src or not (Path(edm_src) / "training" / "networks.py").is_file():
        pytest.skip("set REPRO_EDM_SRC to a checkout of github.com/NVlabs/edm to compare with EDM's own classes")
    import subprocess

    repo_root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", _SIDE_BY_SIDE, edm_src, str(tmp_path)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(repo_root)})
    assert result.returncode == 0, result.stderr[-3000:]
    worst = float(result.stdout.split("MAXDIFF")[-1])
    assert worst <= 1e-5
