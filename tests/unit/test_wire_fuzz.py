"""Property tests: no byte string makes header validation fail with anything but FrameError."""

from __future__ import annotations

import json
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from spectrawatch.wire import FrameError, FrameLimits, decode_frame, parse_header

DTYPES = st.sampled_from(
    ["F16", "BF16", "F32", "F64", "I32", "I64", "U8", "BOOL", "F8_E4M3", "", "x"]
)
INTS = st.one_of(st.integers(-(2**70), 2**70), st.integers(0, 64))
ENTRY = st.fixed_dictionaries(
    {
        "dtype": DTYPES,
        "shape": st.one_of(st.lists(INTS, max_size=6), st.text(max_size=5), st.none()),
        "data_offsets": st.one_of(st.lists(INTS, min_size=0, max_size=3), st.text(max_size=3)),
    }
)
META = st.dictionaries(
    st.sampled_from(["spectrawatch", "kind", "step", "seq", "info", "other"]),
    st.one_of(
        st.sampled_from(["1", "weights", "update_sketch", "0", "-1", "{}", '{"steps": [0]}']),
        st.text(max_size=10),
        st.integers(),
    ),
)


@settings(max_examples=300, deadline=None)
@given(
    meta=st.one_of(
        st.just({"spectrawatch": "1", "kind": "weights", "step": "0", "seq": "0"}),
        META,
        st.none(),
        st.text(max_size=4),
    ),
    entries=st.dictionaries(st.text(min_size=0, max_size=8), ENTRY, max_size=4),
    data=st.binary(max_size=128),
    declared_extra=st.integers(-16, 2**64 - 1),
)
def test_random_headers_only_raise_frame_errors(
    meta: object, entries: dict[str, object], data: bytes, declared_extra: int
) -> None:
    header: dict[str, object] = dict(entries)
    if meta is not None:
        header["__metadata__"] = meta
    head = json.dumps(header).encode()
    declared = max(0, min(2**64 - 1, len(head) + (declared_extra if declared_extra < 0 else 0)))
    body = struct.pack("<Q", declared) + head + data
    status = 400
    try:
        decode_frame(body, FrameLimits(max_tensor_elements=1 << 20))
    except FrameError as exc:  # the only exception allowed; anything else fails the test
        status = exc.status
    assert 400 <= status < 500


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_only_raise_frame_errors(body: bytes) -> None:
    code = "ok"
    try:
        parse_header(body, len(body))
    except FrameError as exc:  # the only exception allowed
        code = exc.code
    assert code


_TORCH_DTYPES = st.sampled_from(["float16", "bfloat16", "float32", "float64", "int32", "int64"])


@settings(max_examples=150, deadline=None)
@given(
    specs=st.lists(
        st.tuples(
            _TORCH_DTYPES,
            st.lists(st.integers(0, 5), max_size=3),  # shape
            st.sampled_from(["own", "view", "transposed"]),
            st.integers(0, 3),  # which row of the shared base a view takes
        ),
        min_size=1,
        max_size=8,
    ),
    names=st.lists(st.text(min_size=1, max_size=6), min_size=8, max_size=8, unique=True),
)
def test_encoded_frames_load_with_safetensors_as_given(
    specs: list[tuple[str, list[int], str, int]], names: list[str]
) -> None:
    """``encode_frame`` against ``safetensors.torch.load``: any mix of dtypes, shapes (0-d,
    empty), strided tensors and views of one shared storage loads back equal."""
    import torch
    from safetensors.torch import load

    from spectrawatch.wire import encode_frame

    bases: dict[str, torch.Tensor] = {}
    tensors: dict[str, torch.Tensor] = {}
    for name, (dtype_name, shape, layout, row) in zip(names, specs, strict=False):
        dtype = getattr(torch, dtype_name)
        if layout == "view":  # rows of one base per dtype: adjacent, repeated or out of order
            base = bases.setdefault(dtype_name, (torch.arange(20) * 3 - 7).to(dtype).view(4, 5))
            t = base[row]
        else:
            t = (torch.arange(max(1, torch.Size(shape).numel())) % 11 - 5).to(dtype)
            t = t[: torch.Size(shape).numel()].reshape(shape)
            if layout == "transposed" and t.dim() >= 2:
                t = t.transpose(0, 1)
        tensors[name] = t
    loaded = load(encode_frame("activations", 3, 4, tensors))
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert loaded[name].shape == t.shape
        assert torch.equal(loaded[name], t)
