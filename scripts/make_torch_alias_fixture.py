"""Writes tests/fixtures/torch_aliases/aliases.pt: a torch.save (zip) state dict whose names
alias tensors the way torch .bin checkpoints store tied weights. Needs no torch: the pickle
names torch's rebuild function and storage class through stand-in modules.

  shared, embed: the same view of storage 0 (4 x 3 f32, one value NaN)
  copy:          storage 1, the same values as shared but NaN replaced by 0
  copy2:         storage 3, the same values as copy
  other:         storage 2, different values
  row:           storage 0 again, a different view (its second row)
"""
import collections
import io
import pickle
import struct
import sys
import types
import zipfile

torch = types.ModuleType("torch")
utils = types.ModuleType("torch._utils")


class FloatStorage:
    pass


def _rebuild_tensor_v2(*args):
    raise RuntimeError("stand-in")


FloatStorage.__module__ = "torch"
_rebuild_tensor_v2.__module__ = "torch._utils"
torch.FloatStorage = FloatStorage
torch._utils = utils
utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch
sys.modules["torch._utils"] = utils


class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class View:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, collections.OrderedDict())

    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args)


class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None


values = [0.5 * i - 2.0 for i in range(12)]
nan_values = list(values)
nan_values[7] = float("nan")
copy_values = list(values)
copy_values[7] = 0.0
s0, s1, s2, s3 = (Storage(str(i), 12) for i in range(4))
state = collections.OrderedDict(
    [
        ("shared", View(s0, 0, (4, 3), (3, 1))),
        ("embed", View(s0, 0, (4, 3), (3, 1))),
        ("copy", View(s1, 0, (4, 3), (3, 1))),
        ("copy2", View(s3, 0, (4, 3), (3, 1))),
        ("other", View(s2, 0, (4, 3), (3, 1))),
        ("row", View(s0, 3, (1, 3), (3, 1))),
    ]
)
buf = io.BytesIO()
Pickler(buf, protocol=2).dump(state)
out = "tests/fixtures/torch_aliases/aliases.pt"
with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as z:
    z.writestr("aliases/data.pkl", buf.getvalue())
    z.writestr("aliases/byteorder", "little")
    z.writestr("aliases/data/0", struct.pack("<12f", *nan_values))
    z.writestr("aliases/data/1", struct.pack("<12f", *copy_values))
    z.writestr("aliases/data/2", struct.pack("<12f", *[v + 1.0 for v in values]))
    z.writestr("aliases/data/3", struct.pack("<12f", *copy_values))
    z.writestr("aliases/version", "3\n")
print("wrote", out)
