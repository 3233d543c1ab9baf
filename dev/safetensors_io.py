#!/usr/bin/python3
"""Minimal safetensors reader/writer for the dev scripts (no safetensors
package needed; /usr/bin/python3 has torch 1.13 but not safetensors).

Writes float32 only, reads F32, BF16 and F16 (converted to float32), the
same subset tinylm's C code handles (src/io/safetensors.c).

    from safetensors_io import save_f32, load
    save_f32("x.safetensors", {"w": torch_tensor_or_(shape, flat_list)}, {"format": "pt"})
    tensors, meta = load("x.safetensors")             # name -> (shape, array('f'))
    tensors, meta = load("x.safetensors", torch=True) # name -> torch.float32 tensor

Command line: `python3 dev/safetensors_io.py FILE` lists the tensors.
"""
import array
import json
import struct
import sys

_DTYPE_SIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
               "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _f32_bytes(value):
    """(shape, little-endian float32 bytes) of a torch tensor, a numpy array
    or a (shape, flat sequence) pair."""
    if hasattr(value, "detach"):  # torch
        t = value.detach().to("cpu").float().contiguous()
        shape = list(t.shape)
        try:
            data = t.numpy().astype("<f4").tobytes()
        except Exception:  # torch without numpy
            data = array.array("f", t.flatten().tolist())
            if sys.byteorder == "big":
                data.byteswap()
            data = data.tobytes()
        return shape, data
    if hasattr(value, "astype") and hasattr(value, "shape"):  # numpy
        return list(value.shape), value.astype("<f4").tobytes()
    shape, flat = value
    shape = [int(d) for d in shape]
    data = array.array("f", flat)
    if len(data) != _numel(shape):
        raise ValueError("shape %s needs %d values, got %d" % (shape, _numel(shape), len(data)))
    if sys.byteorder == "big":
        data.byteswap()
    return shape, data.tobytes()


def save_f32(path, tensors, metadata=None):
    """tensors: dict name -> tensor (insertion order is the data order)."""
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name, value in tensors.items():
        shape, data = _f32_bytes(value)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(data)]}
        blobs.append(data)
        off += len(data)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * ((8 - (8 + len(h)) % 8) % 8)  # data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for b in blobs:
            f.write(b)


def _half_to_f32(raw, bf16):
    h = array.array("H")
    h.frombytes(raw)
    if sys.byteorder == "big":
        h.byteswap()
    if bf16:
        bits = array.array("I", (x << 16 for x in h))
        out = array.array("f")
        out.frombytes(bits.tobytes())
        return out
    return array.array("f", (struct.unpack("<e", struct.pack("<H", x))[0] for x in h))


def load(path, torch=False):
    """Returns (tensors, metadata); tensors maps name -> (shape, array('f'))
    or, with torch=True, name -> torch.float32 tensor."""
    with open(path, "rb") as f:
        blob = f.read()
    if len(blob) < 8:
        raise ValueError("%s: shorter than 8 bytes" % path)
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise ValueError("%s: header length %d exceeds the file" % (path, n))
    header = json.loads(blob[8:8 + n].decode("utf-8"))
    data = memoryview(blob)[8 + n:]
    meta = header.pop("__metadata__", {}) or {}
    out = {}
    for name, e in header.items():
        dt, shape, (b, end) = e["dtype"], e["shape"], e["data_offsets"]
        if dt not in _DTYPE_SIZE:
            raise ValueError("%s: tensor %s has unknown dtype %s" % (path, name, dt))
        if end > len(data) or end - b != _numel(shape) * _DTYPE_SIZE[dt]:
            raise ValueError("%s: tensor %s has bad data_offsets" % (path, name))
        raw = bytes(data[b:end])
        if dt == "F32":
            vals = array.array("f")
            vals.frombytes(raw)
            if sys.byteorder == "big":
                vals.byteswap()
        elif dt in ("BF16", "F16"):
            vals = _half_to_f32(raw, dt == "BF16")
        else:
            raise ValueError("%s: tensor %s has dtype %s, not a float type" % (path, name, dt))
        if torch:
            import torch as _t
            out[name] = _t.tensor(vals, dtype=_t.float32).reshape(shape)
        else:
            out[name] = (list(shape), vals)
    return out, meta


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: safetensors_io.py FILE")
    tensors, meta = load(sys.argv[1])
    for k, v in meta.items():
        print("meta %s = %s" % (k, v))
    for name, (shape, vals) in tensors.items():
        head = ", ".join("%.6g" % x for x in vals[:4])
        print("%-48s %-16s [%s%s]" % (name, "x".join(map(str, shape)) or "scalar", head,
                                      ", ..." if len(vals) > 4 else ""))
