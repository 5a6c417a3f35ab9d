"""The GGUF header reader (dockyard.weights.gguf_header) reads what independent readers read.

The bundled SmolLM2 file and synthetic files of every metadata value type are compared with ``gguf.GGUFReader``
field by field and tensor by tensor (data included). The Gemma-3 file (a 262k-token vocabulary) is compared
with transformers' own GGUF reader (``transformers.integrations.gguf.reader``), which reads it in a fraction
of a second where ``GGUFReader`` takes many seconds of CPU: every key and value, the whole token list
included, and the tensor names.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from dockyard.errors import InvalidModelFileError
from dockyard.weights.gguf_header import read_header
from dockyard.weights.gguf_metadata import GGUFFile
from tests.helpers import finish_gguf

V = gguf.GGUFValueType
Q = gguf.GGMLQuantizationType


def _assert_equals_gguf_reader(path: Path) -> None:
    header, ref = read_header(path), gguf.GGUFReader(path)
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]  # the reader's own entries for the preamble
    assert header.keys() == keys
    for key in keys:
        field = ref.fields[key]
        got, want = header.get(key), field.contents()
        assert got == want, key
        assert type(got) is type(want), key
        if field.types[0] == V.ARRAY:
            assert header.array_length(key) == len(field.data), key
    assert header.version == ref.fields["GGUF.version"].contents()
    assert header.data_offset == ref.data_offset
    assert len(header.tensors) == len(ref.tensors)
    for ours, theirs in zip(header.tensors, ref.tensors, strict=True):
        assert (ours.name, ours.tensor_type, ours.n_elements, ours.n_bytes, ours.data_offset) == (
            theirs.name, theirs.tensor_type, theirs.n_elements, theirs.n_bytes, theirs.data_offset), theirs.name
        assert ours.shape.tolist() == theirs.shape.tolist(), theirs.name
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape, theirs.name
        assert np.array_equal(ours.data, theirs.data), theirs.name


def test_bundled_file_equals_gguf_reader(bundled_gguf: Path) -> None:
    _assert_equals_gguf_reader(bundled_gguf)


def test_gemma3_file_equals_transformers_reader(gemma3_gguf: Path) -> None:
    hf_reader = pytest.importorskip("transformers.integrations.gguf.reader")
    header = read_header(gemma3_gguf)
    string_arrays = [k for k in header.keys() if isinstance(header.get(k), list) and header.get(k)
                     and isinstance(header.get(k)[0], str)]
    assert "tokenizer.ggml.tokens" in string_arrays
    metadata, names = hf_reader.read_gguf_metadata(str(gemma3_gguf), string_arrays)
    assert header.keys() == list(metadata)
    for key, want in metadata.items():
        assert header.get(key) == want, key
    assert header.array_length("tokenizer.ggml.tokens") == len(metadata["tokenizer.ggml.tokens"]) == 262144
    assert [t.name for t in header.tensors] == list(names)
    # Its tensors' shapes, types and offsets are what tests/test_gemma3_gguf.py loads and runs: its greedy tokens
    # equal transformers' on this file (transformers' table reader does not read the file's Q5_1 type).


def _write_every_value_type(path: Path, endianess: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endianess)
    scalars = {V.UINT8: 200, V.INT8: -100, V.UINT16: 60000, V.INT16: -30000, V.UINT32: 4_000_000_000,
               V.INT32: -2_000_000_000, V.FLOAT32: 0.1, V.BOOL: True, V.UINT64: 2**63 + 5, V.INT64: -(2**62),
               V.FLOAT64: 1e-300, V.STRING: "héllo ✓"}
    for vtype, value in scalars.items():
        writer.add_key_value(f"test.{vtype.name.lower()}", value, vtype)
        if vtype != V.STRING:
            writer.add_key_value(f"test.{vtype.name.lower()}_array", [value, value], V.ARRAY, sub_type=vtype)
    writer.add_key_value("test.string_array", ["a", "", "ünï", "<0x0A>"], V.ARRAY, sub_type=V.STRING)
    writer.add_custom_alignment(64)
    writer.add_tensor("f32", np.arange(6, dtype=np.float32).reshape(2, 3))
    writer.add_tensor("f16", np.arange(64, dtype=np.float16).reshape(2, 32))
    writer.add_tensor("q8_0", gguf.quants.quantize(np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32), Q.Q8_0),
                      raw_dtype=Q.Q8_0)
    return finish_gguf(writer)


def test_every_value_type_equals_gguf_reader(tmp_path: Path) -> None:
    _assert_equals_gguf_reader(_write_every_value_type(tmp_path / "types.gguf"))


def test_big_endian_file_is_refused_by_name(tmp_path: Path) -> None:
    path = _write_every_value_type(tmp_path / "be.gguf", gguf.GGUFEndian.BIG)
    with pytest.raises(InvalidModelFileError, match="big-endian") as info:
        GGUFFile(path)
    assert str(path) in str(info.value)


def test_header_is_parsed_once_per_file_version(tmp_path: Path) -> None:
    path = _write_every_value_type(tmp_path / "c.gguf")
    first = read_header(path)
    assert read_header(path) is first and GGUFFile(path)._header is first
    _write_every_value_type(path)  # rewritten: a new modification time
    os.utime(path, ns=(first_ns := path.stat().st_mtime_ns + 10**9, first_ns))
    assert read_header(path) is not first
