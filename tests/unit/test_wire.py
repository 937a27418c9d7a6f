"""Frame encoding and header validation (the server's first line of defence)."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from spectrawatch.wire import (
    FrameError,
    FrameKind,
    FrameLimits,
    compress,
    count_nonfinite,
    decode_frame,
    decompress,
    encode_frame,
    nonfinite_steps,
    parse_header,
    read_header,
)


def weights_frame(**tensors: torch.Tensor) -> bytes:
    return encode_frame(FrameKind.WEIGHTS, 7, 3, tensors or {"w": torch.randn(4, 3)}, {"k": 1})


def raw_frame(header: dict[str, object], data: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def meta(**overrides: str) -> dict[str, str]:
    return {"spectrawatch": "1", "kind": "weights", "step": "1", "seq": "0", **overrides}


def test_roundtrip_keeps_values_dtypes_and_metadata() -> None:
    w = torch.randn(5, 3, dtype=torch.float64)
    h = torch.randn(2, 8).to(torch.bfloat16)
    header, tensors = decode_frame(encode_frame("weights", 12, 4, {"a.w": w, "b": h}, {"x": [1]}))
    assert (header.kind, header.step, header.seq, header.info) == (
        FrameKind.WEIGHTS,
        12,
        4,
        {"x": [1]},
    )
    assert torch.equal(tensors["a.w"], w)
    assert tensors["b"].dtype == torch.bfloat16
    assert torch.equal(tensors["b"], h)


def test_encoding_is_safetensors_for_every_dtype_and_layout() -> None:
    """The hand-written layout loads with safetensors itself: all travelling dtypes, 0-d and
    empty tensors, strided ones, views sharing one storage in order, out of order, repeated."""
    from safetensors.torch import load

    base = torch.randn(6, 5)
    tensors = {
        "f64": torch.randn(3, 2, dtype=torch.float64),
        "bf16": torch.randn(2, 3).to(torch.bfloat16),
        "f16": torch.randn(4).half(),
        "i64": torch.arange(7),
        "i32": torch.arange(3, dtype=torch.int32),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6).t(),
        "row2": base[2],
        "row3": base[3],  # continues row2's bytes: one block
        "row1": base[1],  # behind it: a new block
        "row1_again": base[1],
        "column": base[:, 4],
    }
    data = encode_frame("activations", 1, 2, tensors)
    (n,) = struct.unpack("<Q", data[:8])
    assert n % 8 == 0  # header padded as safetensors pads it
    loaded = load(data)
    assert loaded.keys() == tensors.keys()
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype
        assert torch.equal(loaded[name], t), name
    header = json.loads(data[8 : 8 + n])
    assert header["__metadata__"]["kind"] == "activations"


def test_encoding_refuses_dtypes_that_cannot_travel() -> None:
    with pytest.raises(TypeError, match="uint8"):
        encode_frame("weights", 1, 0, {"w": torch.zeros(2, 2, dtype=torch.uint8)})


def test_zstd_roundtrip_and_decompression_cap() -> None:
    data = weights_frame(w=torch.zeros(256, 256))
    packed = compress(data)
    assert len(packed) < len(data) // 10
    assert decompress(packed, len(data)) == data
    with pytest.raises(FrameError) as err:
        decompress(packed, len(data) - 1)
    assert err.value.code == "too_large"
    with pytest.raises(FrameError) as err:
        decompress(b"not zstd at all", 1000)
    assert err.value.code == "bad_encoding"


def test_read_header_of_a_plain_or_zstd_frame() -> None:
    """What the client reads of a frame the server refused: its names and size."""
    data = weights_frame(a=torch.zeros(300, 200), b=torch.ones(2, 2))
    for body, compressed in ((data, False), (compress(data), True)):
        header = read_header(body, compressed)
        assert header.names == ["a", "b"]
        assert header.size == len(data)
        assert header.step == 7
    with pytest.raises(FrameError):
        read_header(b"not zstd at all", True)


def test_zstd_body_is_read_to_its_end() -> None:
    """A zstd stream may hold several frames: all are decoded (only the first was, so a body of
    two whole frames was stored as the first one, 202, the second lost), and bytes after the last
    frame are refused (they were ignored)."""
    a = weights_frame(w=torch.ones(4, 4))
    b = weights_frame(v=torch.zeros(4, 4))
    assert decompress(compress(a) + compress(b), 10_000) == a + b
    with pytest.raises(FrameError) as err:  # the server sees a + b: not one safetensors file
        decode_frame(decompress(compress(a) + compress(b), 10_000))
    assert err.value.status == 400
    with pytest.raises(FrameError) as err:
        decompress(compress(a) + b"trailing bytes", 10_000)
    assert err.value.code == "bad_encoding"
    with pytest.raises(FrameError, match="truncated") as err:  # decoded to nothing before
        decompress(compress(a)[:-3], 10_000)
    assert err.value.code == "bad_encoding"
    for short in (b"", compress(a)[:3]):
        with pytest.raises(FrameError) as err:
            decompress(short, 10_000)
        assert err.value.code == "bad_encoding"
    with pytest.raises(FrameError) as err:  # the cap counts every frame
        decompress(compress(a) * 3, 2 * len(a))
    assert err.value.code == "too_large"


def test_sketch_frames_need_one_step_per_row() -> None:
    rows = torch.randn(3, 16)
    ok = encode_frame("update_sketch", 10, 0, {"l": rows}, {"steps": [10, 11, 12]})
    assert parse_header(ok, len(ok)).info["steps"] == [10, 11, 12]
    bad = encode_frame("update_sketch", 10, 0, {"l": rows}, {"steps": [10, 11]})
    with pytest.raises(FrameError, match=r"info\.steps"):
        parse_header(bad, len(bad))
    # a repeated step: its rows' results would collide in storage
    bad = encode_frame("update_sketch", 10, 0, {"l": rows}, {"steps": [10, 10, 12]})
    with pytest.raises(FrameError, match=r"info\.steps must be strictly increasing"):
        parse_header(bad, len(bad))
    for every in (0, 2**62 + 1, 10**30, "2", 1.0, True):
        info = {"steps": [10, 11, 12], "update_every": every}
        bad = encode_frame("update_sketch", 10, 0, {"l": rows}, info)
        with pytest.raises(FrameError, match=r"info\.update_every") as err:
            parse_header(bad, len(bad))
        assert err.value.code == "bad_metadata"
    info = {"steps": [10, 11, 12], "update_every": 2**62}
    big = encode_frame("update_sketch", 10, 0, {"l": rows}, info)
    assert parse_header(big, len(big)).info["update_every"] == 2**62


def test_info_is_capped_by_its_serialized_size() -> None:
    """``info`` was bounded only by the 8 MiB header and stored as-is with the frame's row: a
    few hundred bytes of zstd added ~8 MB to the database. The bundled client sends ~16 KB for
    GPT-2 small (148 tensors, 16 steps a frame)."""
    w = {"w": torch.ones(2, 2)}
    limits = FrameLimits(max_info_bytes=1000)
    ok = encode_frame("weights", 1, 0, w, {"pad": "a" * 990})  # {"pad":"..."}: 1,000 bytes
    assert parse_header(ok, len(ok), limits).info["pad"] == "a" * 990
    big = encode_frame("weights", 1, 0, w, {"pad": "a" * 991})
    with pytest.raises(FrameError, match=r"1001 bytes exceeds the limit of 1000") as err:
        parse_header(big, len(big), limits)
    assert (err.value.code, err.value.status) == ("info_too_large", 422)
    default = encode_frame("weights", 1, 0, w, {"pad": "a" * (2 * 1024 * 1024)})
    with pytest.raises(FrameError, match="MAX_INFO_BYTES"):
        parse_header(default, len(default))


def test_steps_and_seqs_up_to_their_limits() -> None:
    rows = torch.randn(1, 4)
    top = encode_frame("update_sketch", 2**62, 2**63 - 1, {"l": rows}, {"steps": [2**62]})
    header = parse_header(top, len(top))
    assert (header.step, header.seq) == (2**62, 2**63 - 1)
    for step, seq in ((2**62 + 1, 0), (0, 2**63)):
        bad = encode_frame("update_sketch", step, seq, {"l": rows}, {"steps": [0]})
        with pytest.raises(FrameError, match=r"must be an integer in \[0, ") as err:
            parse_header(bad, len(bad))
        assert err.value.code == "bad_metadata"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"", "truncated"),
        (b"\x01\x00", "truncated"),
        (struct.pack("<Q", 1 << 40) + b"{}", "truncated"),
        (struct.pack("<Q", 100) + b"{}", "truncated"),
        (raw_frame({"__metadata__": meta()}, b"")[:-3] + b"xyz", "bad_header"),
        (
            raw_frame({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
            "missing_metadata",
        ),
        (raw_frame({"__metadata__": meta(kind="gradients")}, b""), "unknown_kind"),
        (raw_frame({"__metadata__": meta(step="-1")}, b""), "bad_metadata"),
        (raw_frame({"__metadata__": meta(spectrawatch="9")}, b""), "bad_version"),
        (raw_frame({"__metadata__": meta()}, b""), "empty_frame"),
        (
            raw_frame(
                {
                    "__metadata__": meta(),
                    "w": {"dtype": "U8", "shape": [2, 2], "data_offsets": [0, 4]},
                },
                b"\0" * 4,
            ),
            "dtype_not_allowed",
        ),
        (
            raw_frame(
                {
                    "__metadata__": meta(),
                    "w": {"dtype": "I64", "shape": [1, 1], "data_offsets": [0, 8]},
                },
                b"\0" * 8,
            ),
            "dtype_not_allowed",
        ),
        (
            raw_frame(
                {
                    "__metadata__": meta(),
                    "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 8]},
                },
                b"\0" * 8,
            ),
            "bad_offsets",
        ),
        (
            raw_frame(
                {
                    "__metadata__": meta(),
                    "w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                },
                b"\0" * 8,
            ),
            "bad_offsets",
        ),
        (
            raw_frame(
                {
                    "__metadata__": meta(),
                    "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                },
                b"\0" * 16,
            ),
            "bad_shape",
        ),
        (
            raw_frame(
                {
                    "__metadata__": meta(),
                    "w": {"dtype": "F32", "shape": [1, 1, 1, 1, 1], "data_offsets": [0, 4]},
                },
                b"\0" * 4,
            ),
            "too_many_dims",
        ),
        (
            raw_frame(
                {
                    "__metadata__": meta(),
                    "w": {"dtype": "F32", "shape": "2x2", "data_offsets": [0, 16]},
                },
                b"\0" * 16,
            ),
            "bad_shape",
        ),
    ],
)
def test_bad_headers_raise_named_errors(body: bytes, code: str) -> None:
    with pytest.raises(FrameError) as err:
        parse_header(body, len(body))
    assert err.value.code == code
    assert 400 <= err.value.status < 500
    assert err.value.message


def test_limits_on_tensor_count_and_size() -> None:
    data = encode_frame("weights", 0, 0, {f"w{i}": torch.zeros(2, 2) for i in range(5)})
    with pytest.raises(FrameError) as err:
        parse_header(data, len(data), FrameLimits(max_tensors=4))
    assert err.value.code == "too_many_tensors"
    with pytest.raises(FrameError) as err:
        parse_header(data, len(data), FrameLimits(max_tensor_elements=3))
    assert err.value.code == "tensor_too_large"
    with pytest.raises(FrameError) as err:
        parse_header(data, len(data), FrameLimits(max_header_bytes=64))
    assert err.value.code == "header_too_large"
    with pytest.raises(FrameError) as err:
        parse_header(data, len(data), FrameLimits(max_tensor_elements=3))
    assert err.value.code == "tensor_too_large"


def test_count_nonfinite_flags_only_bad_tensors() -> None:
    w = torch.ones(3, 3)
    w[0, 0], w[1, 1] = float("nan"), float("inf")
    assert count_nonfinite({"bad": w, "good": torch.ones(2, 2)}) == {"bad": 2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_count_nonfinite_counts_every_kind_of_bad_entry(dtype: torch.dtype) -> None:
    """+Inf and -Inf together (their sum is NaN), a lone -Inf, values whose float64 sum
    overflows (finite: counted 0), complex, integer and empty tensors."""
    both = torch.zeros(4, dtype=dtype)
    both[0], both[1] = float("inf"), float("-inf")
    neg = torch.zeros(5, dtype=dtype)
    neg[2] = float("-inf")
    tensors = {
        "both": both,
        "neg": neg,
        "huge": torch.full((3,), 1e308, dtype=torch.float64),  # sum overflows, entries finite
        "cplx": torch.tensor([1 + 1j, complex("nan+0j")]),
        "ints": torch.arange(4),
        "empty": torch.zeros(0, dtype=dtype),
        "ok": torch.ones(2, 2, dtype=dtype),
    }
    assert count_nonfinite(tensors) == {"both": 2, "neg": 1, "cplx": 1}


def test_nonfinite_steps_of_rows_and_whole_tensors() -> None:
    rows = torch.zeros(4, 3)
    rows[1, 2] = float("nan")
    rows[2, 0] = float("inf")
    whole = torch.ones(2, 5)
    whole[0, 0] = float("nan")
    tensors = {"a": rows, "b": whole, "c": torch.zeros(4, 3)}
    bad = count_nonfinite(tensors)
    assert bad == {"a": 2, "b": 1}
    spans = nonfinite_steps(tensors, bad, [10, 11, 12, 13], 10)
    assert spans == {"a": [11, 12], "b": [10, 10]}  # "b" has no row per step
    assert nonfinite_steps({"b": whole}, ["b"], None, 7) == {"b": [7, 7]}
