"""``spectrawatch analyze``: loading every supported checkpoint form, results equal to the
in-process spectral functions and to independent LAPACK references, exact scale laws in
``--compare``, and clear refusals of bad, corrupt and pickle-only files."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from spectrawatch import _analyze as an
from spectrawatch.cli import main
from spectrawatch.spectral.conditioning import GMCN, SIGMA_MAX, SIGMA_MIN
from spectrawatch.spectral.farms import FARMS_CV
from spectrawatch.spectral.htsr import (
    ALPHA,
    LOG_SPECTRAL_NORM,
    NUM_TRAPS,
    RAND_DISTANCE,
    analyze_model,
    farms_key,
)
from tests.training import tiny_gpt2

REL = 1e-9  # same float64 code path: agreement to round-off


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    heavy = torch.randn(96, 48, generator=g) @ torch.diag(torch.rand(48, generator=g) ** 3 * 5)
    return {
        "encoder.dense.weight": torch.randn(80, 40, generator=g),
        "encoder.dense.bias": torch.randn(80, generator=g),
        "encoder.layer_norm.weight": torch.ones(40),
        "decoder.proj.weight": heavy.T.contiguous(),  # wide (48, 96)
        "conv.weight": torch.randn(12, 6, 3, 3, generator=g),
        "head.weight": torch.randn(3, 4, generator=g),  # below WeightWatcher's size filter
        "step": torch.tensor(7),  # an int buffer: ignored
    }


@pytest.fixture(scope="module")
def sd() -> dict[str, torch.Tensor]:
    return _state_dict()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory, sd: dict[str, torch.Tensor]) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file(sd, str(path))
    return path


@pytest.fixture(scope="module")
def analysis(ckpt: Path) -> an.CheckpointAnalysis:
    return an.analyze_checkpoint(ckpt, device="cpu", progress=False)


def test_selects_2d_and_4d_float_weights_except_norms(analysis: an.CheckpointAnalysis) -> None:
    assert [r.layer for r in analysis.layers] == [
        "conv.weight",
        "decoder.proj.weight",
        "encoder.dense.weight",
        "head.weight",
    ]  # safetensors stores names sorted
    assert analysis.ignored == 3  # bias, layer_norm, int buffer
    head = analysis.layer("head.weight")
    assert ALPHA not in head.values
    assert "size filter" in head.note
    assert SIGMA_MAX in head.values  # conditioning needs no size filter


def test_htsr_and_farms_equal_the_in_process_batched_analysis(
    analysis: an.CheckpointAnalysis, sd: dict[str, torch.Tensor]
) -> None:
    reference = analyze_model(sd, farms=FARMS_CV)
    assert {r.layer for r in reference.layers} == {
        r.layer for r in analysis.layers if r.report is not None
    }
    for ref in reference.layers:
        got = analysis.layer(ref.layer).values
        want = ref.values()
        assert (farms_key(ALPHA) in want) == (ref.layer != "conv.weight")  # 12 x 6 slices: < 32
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=REL, abs=1e-12), key


def test_conditioning_matches_lapack(
    analysis: an.CheckpointAnalysis, sd: dict[str, torch.Tensor]
) -> None:
    for name in ("encoder.dense.weight", "decoder.proj.weight", "head.weight", "conv.weight"):
        w = sd[name].double().numpy()
        s = np.linalg.svd(w.reshape(w.shape[0], -1), compute_uv=False)  # conv: (out, in*kh*kw)
        k = math.ceil(0.1 * s.size)
        got = analysis.layer(name).values
        assert got[SIGMA_MAX] == pytest.approx(s[0], rel=1e-10)
        assert got[SIGMA_MIN] == pytest.approx(s[-1], rel=1e-10)
        assert got[GMCN] == pytest.approx(s[0] / np.sort(s)[:k].mean(), rel=1e-10)


def test_alpha_is_independent_of_the_checkpoint_form(
    tmp_path: Path, sd: dict[str, torch.Tensor], analysis: an.CheckpointAnalysis
) -> None:
    """state-dict file, Lightning-style nested checkpoint, a training loop's checkpoint with
    tensors beside the state dict (refused: "no 2-D weights"), a folder of shards: same
    numbers."""
    torch.save(sd, tmp_path / "sd.pt")
    torch.save({"epoch": 3, "state_dict": sd}, tmp_path / "lightning.ckpt")
    # a training loop's checkpoint: its RNG state and step beside the model's state dict
    loop = {"model": sd, "rng_state": torch.get_rng_state(), "step": torch.tensor(7)}
    torch.save(loop, tmp_path / "loop.pt")
    shards = tmp_path / "shards"
    shards.mkdir()
    names = sorted(sd)
    save_file({k: sd[k] for k in names[:3]}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in names[3:]}, str(shards / "model-00002-of-00002.safetensors"))
    (shards / "config.json").write_text("{}")
    want = {r.layer: r.values for r in analysis.layers}
    for path in (tmp_path / "sd.pt", tmp_path / "lightning.ckpt", tmp_path / "loop.pt", shards):
        got = an.analyze_checkpoint(path, device="cpu", progress=False)
        assert {r.layer: r.values for r in got.layers} == want, path


def test_compare_obeys_exact_scale_laws(tmp_path: Path, sd: dict[str, torch.Tensor]) -> None:
    """B = 2 A: every eigenvalue x4, so alpha and GMCN are unchanged, log10 lambda_max +log10 4."""
    a_path, b_path = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file({"w": sd["encoder.dense.weight"]}, str(a_path))
    save_file({"w": 2 * sd["encoder.dense.weight"], "extra": torch.randn(20, 10)}, str(b_path))
    a = an.analyze_checkpoint(a_path, device="cpu", progress=False)
    b = an.analyze_checkpoint(b_path, device="cpu", progress=False)
    diffs = {d.layer: d for d in an.compare(a, b)}
    assert set(diffs) == {"w", "extra"}
    assert diffs["extra"].shape_a is None
    d = diffs["w"]
    assert d.delta(ALPHA) == pytest.approx(0.0, abs=1e-9)
    assert d.delta(GMCN) == pytest.approx(0.0, abs=1e-9)
    assert d.delta(LOG_SPECTRAL_NORM) == pytest.approx(math.log10(4.0), rel=1e-12)
    assert d.delta(SIGMA_MAX) == pytest.approx(a.layer("w").values[SIGMA_MAX], rel=1e-12)

    out = tmp_path / "cmp.csv"
    assert main(["analyze", "-q", "--compare", str(a_path), str(b_path), "--csv", str(out)]) == 0
    with out.open() as f:
        rows = {(r["layer"], r["metric"]): r for r in csv.DictReader(f)}
    assert float(rows[("w", LOG_SPECTRAL_NORM)]["delta"]) == pytest.approx(math.log10(4.0))
    assert rows[("extra", ALPHA)]["a"] == ""


def test_cli_writes_table_csv_json_and_self_contained_html(
    ckpt: Path,
    tmp_path: Path,
    analysis: an.CheckpointAnalysis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    csv_path, json_path, html_path = tmp_path / "m.csv", tmp_path / "m.json", tmp_path / "m.html"
    code = main(
        [
            "analyze",
            str(ckpt),
            "--device",
            "cpu",
            "--csv",
            str(csv_path),
            "--json",
            str(json_path),
            "--html",
            str(html_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "encoder.dense.weight" in out
    assert "4 layers analysed on cpu" in out
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    dense = next(r for r in rows if r["layer"] == "encoder.dense.weight")
    assert float(dense[ALPHA]) == analysis.layer("encoder.dense.weight").values[ALPHA]
    assert float(dense[farms_key(ALPHA)]) > 0
    data = json.loads(json_path.read_text())
    assert {la["layer"] for la in data} == {r.layer for r in analysis.layers}
    page = html_path.read_text()
    assert "<script src=" not in page  # offline: nothing fetched
    assert 'src="http' not in page
    assert len(page) > 1_000_000  # plotly.js inlined
    assert page.count("Plotly.newPlot") == 1 + 3  # alpha bars + one ESD plot per fitted layer
    # no "Share chart" to Plotly Cloud (on by default in plotly.js 4), on every plot
    assert page.count('"showSendToCloud": false') == 1 + 3


def test_refuses_pickles_that_need_code_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (marker.touch, ())  # type: ignore[return-value]

    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"w": Exploit()}, f)
    with pytest.raises(an.AnalyzeError, match=r"refused.*never does"):
        an.load_weights(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("missing.safetensors", None, "no such file"),
        (
            "corrupt.safetensors",
            b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}" + b"x" * 8,
            "not a readable safetensors file",
        ),
        ("truncated.pt", b"PK\x03\x04truncated", "not a readable PyTorch checkpoint"),
        ("notes.txt", b"hello", "unsupported file"),
    ],
)
def test_bad_files_fail_clearly(
    tmp_path: Path,
    name: str,
    content: bytes | None,
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(an.AnalyzeError, match=message):
        an.load_weights(path)
    assert main(["analyze", "-q", str(path)]) == 2
    assert message in capsys.readouterr().err


def test_truncated_and_conflicting_shards_fail_clearly(tmp_path: Path) -> None:
    save_file({"w": torch.randn(32, 16)}, str(tmp_path / "full.safetensors"))
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(an.AnalyzeError, match=r"cut\.safetensors: not a readable safetensors"):
        an.analyze_checkpoint(tmp_path / "cut.safetensors", progress=False)
    shards = tmp_path / "shards"
    shards.mkdir()
    save_file({"w": torch.randn(4, 4)}, str(shards / "a.safetensors"))
    save_file({"w": torch.randn(4, 4)}, str(shards / "b.safetensors"))
    with pytest.raises(an.AnalyzeError, match="'w' already read from another shard"):
        an.checkpoint_tensors(shards)


def test_an_unreadable_shard_is_skipped_named_and_fails_the_exit_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """One truncated shard of a folder: the other shards' layers are analysed and written, the
    bad shard is named on stderr and in the HTML report, and the exit code is 1."""
    folder = tmp_path / "model"
    folder.mkdir()
    g = torch.Generator().manual_seed(3)
    save_file({"a.weight": torch.randn(64, 32, generator=g)}, str(folder / "m-1.safetensors"))
    save_file({"b.weight": torch.randn(48, 32, generator=g)}, str(folder / "m-2.safetensors"))
    data = (folder / "m-2.safetensors").read_bytes()
    (folder / "m-2.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(an.AnalyzeError, match="not a readable safetensors"):
        an.checkpoint_tensors(folder)  # without a list to note it in, a bad shard still ends it
    analysis = an.analyze_checkpoint(folder, device="cpu", progress=False)
    assert [r.layer for r in analysis.layers] == ["a.weight"]
    assert len(analysis.unreadable) == 1
    assert "m-2.safetensors" in analysis.unreadable[0]
    html_path = tmp_path / "r.html"
    argv = [
        "analyze",
        str(folder),
        "-q",
        "--no-farms",
        "--format",
        "json",
        "--html",
        str(html_path),
    ]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert [r["layer"] for r in json.loads(captured.out)] == ["a.weight"]
    assert "error: not read, skipped:" in captured.err
    assert "m-2.safetensors" in captured.err
    assert "m-2.safetensors" in html_path.read_text()
    assert main(["analyze", str(folder), "--no-farms"]) == 1
    assert "1 file not read" in capsys.readouterr().out
    (folder / "m-1.safetensors").write_bytes(b"\x00" * 16)  # every shard unreadable: an error
    assert main(["analyze", str(folder), "-q"]) == 2
    assert "m-1.safetensors: not a safetensors" in capsys.readouterr().err  # the first error


def test_pytorch_files_beside_safetensors_shards_are_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A folder with both formats is read from its safetensors shards (as transformers does);
    the PyTorch files passed over are named on stderr, not skipped silently."""
    folder = tmp_path / "both"
    folder.mkdir()
    save_file({"w": torch.randn(64, 32)}, str(folder / "model.safetensors"))
    torch.save({"w": torch.randn(64, 32)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text("{}")
    assert an.shadowed_files(folder) == [folder / "pytorch_model.bin"]
    assert an.shadowed_files(folder / "model.safetensors") == []
    assert main(["analyze", str(folder), "-q", "--no-farms", "--format", "json"]) == 0
    captured = capsys.readouterr()
    assert "1 PyTorch file beside them not read (pytorch_model.bin)" in captured.err
    assert [r["layer"] for r in json.loads(captured.out)] == ["w"]
    (folder / "pytorch_model.bin").unlink()
    assert an.shadowed_files(folder) == []


def test_a_shard_index_names_the_files_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``save_pretrained`` folder with ``model.safetensors.index.json``: only the shards it
    names are read, not other copies beside them (a Hub snapshot's ``consolidated.safetensors``
    was analysed as a second set of layers; a stale ``model.safetensors`` failed the run)."""
    folder = tmp_path / "hf"
    folder.mkdir()
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(64, 32, generator=g), torch.randn(48, 32, generator=g)
    save_file({"l1.weight": a}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({"l2.weight": b}, str(folder / "model-00002-of-00002.safetensors"))
    weight_map = {"l1.weight": "model-00001-of-00002.safetensors"}
    weight_map["l2.weight"] = "model-00002-of-00002.safetensors"
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    save_file({"layers.0.wq": a, "layers.1.wq": b}, str(folder / "consolidated.safetensors"))
    save_file({"l1.weight": a, "l2.weight": b}, str(folder / "model.safetensors"))
    assert an.checkpoint_files(folder) == sorted(folder / f for f in weight_map.values())
    assert main(["analyze", str(folder), "-q", "--no-farms", "--format", "json"]) == 0
    assert [r["layer"] for r in json.loads(capsys.readouterr().out)] == ["l1.weight", "l2.weight"]
    (folder / "model-00002-of-00002.safetensors").unlink()
    assert main(["analyze", str(folder), "-q"]) == 2
    assert "names 1 shard not in the folder (model-00002-of-00002" in capsys.readouterr().err
    index.write_text("{not json")
    assert main(["analyze", str(folder), "-q"]) == 2
    assert "model.safetensors.index.json: not a readable shard index" in capsys.readouterr().err


def test_empty_weights_are_noted_not_failed(tmp_path: Path) -> None:
    """Zero-size weights (a conv pruned to no output channel) get the size-filter notes; the
    4-D one failed its ``(out, -1)`` reshape ("not analysed: RuntimeError: ... ambiguous")."""
    path = tmp_path / "empty.safetensors"
    save_file({"conv": torch.zeros(0, 16, 3, 3), "fc": torch.zeros(0, 32)}, str(path))
    result = an.analyze_checkpoint(path, device="cpu", progress=False)
    for r in result.layers:
        assert r.values == {}
        assert r.note == (
            "conditioning skipped: fewer than 2 rows or columns; "
            "HT-SR skipped: outside WeightWatcher's size filter"
        ), r.layer


def test_checkpoints_without_weights_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(an.AnalyzeError, match="no weight files"):
        an.load_weights(tmp_path / "empty")
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "meta.pt")
    with pytest.raises(an.AnalyzeError, match="no tensors found"):
        an.load_weights(tmp_path / "meta.pt")
    save_file({"bias": torch.zeros(3)}, str(tmp_path / "bias.safetensors"))
    with pytest.raises(an.AnalyzeError, match="no 2-D or 4-D"):
        an.analyze_checkpoint(tmp_path / "bias.safetensors", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(an.AnalyzeError, match="CUDA is not available"):
            an.resolve_device("cuda")


def test_a_checkpoint_shipped_by_a_pypi_package() -> None:
    """torchmetrics ships LPIPS heads (1 x C x 1 x 1 convs) as weights-only state dicts: they
    load, and every layer is reported as outside the size filters instead of failing."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or spec.origin is None:
        pytest.skip("torchmetrics (test extra) not installed")
    path = Path(spec.origin).parent / "functional/image/lpips_models/alex.pth"
    if not path.is_file():
        pytest.skip(f"{path} not shipped by this torchmetrics version")
    result = an.analyze_checkpoint(path, device="cpu", progress=False)
    assert [r.shape for r in result.layers][:2] == [(1, 64, 1, 1), (1, 192, 1, 1)]
    assert all(not r.values and "size filter" in r.note for r in result.layers)


@pytest.mark.slow
def test_hugging_face_model_directory(tmp_path: Path) -> None:
    """A folder written by ``save_pretrained`` (config.json + model.safetensors)."""
    transformers = pytest.importorskip("transformers")
    model = tiny_gpt2(transformers)
    model.save_pretrained(tmp_path / "gpt2-tiny")
    result = an.analyze_checkpoint(tmp_path / "gpt2-tiny", device="cpu", progress=False)
    names = {r.layer for r in result.layers}
    assert "lm_head.weight" not in names  # tied to the token embedding, saved once
    reference = analyze_model(
        {k: v for k, v in model.state_dict().items() if k in names}, farms=FARMS_CV
    )
    assert len(reference.layers) >= 4
    for ref in reference.layers:
        assert result.layer(ref.layer).values[ALPHA] == pytest.approx(ref.plain.alpha, rel=REL)
    assert "transformer.h.0.attn.c_attn.weight" in {r.layer for r in result.layers}


@pytest.mark.gpu
def test_cuda_matches_cpu(ckpt: Path, analysis: an.CheckpointAnalysis) -> None:
    got = an.analyze_checkpoint(ckpt, device="cuda", progress=False)
    assert got.device.startswith("cuda")
    for r in analysis.layers:
        for key, value in r.values.items():
            # float64 ESDs on both; conditioning SVD is float32 on CUDA
            rel = 1e-4 if key.startswith("conditioning.") else 1e-6
            assert got.layer(r.layer).values[key] == pytest.approx(value, rel=rel, abs=1e-6), key


def test_format_json_and_csv_follow_the_issue_contract(
    ckpt: Path,
    tmp_path: Path,
    analysis: an.CheckpointAnalysis,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """``--format json|csv [-o FILE]``: one flat object / row per weight with WeightWatcher's
    field names; strict JSON (null for what is absent); ``--no-farms`` leaves FARMS null."""
    out = tmp_path / "layers.json"
    assert main(["analyze", str(ckpt), "-q", "--format", "json", "-o", str(out)]) == 0
    assert capsys.readouterr().out == ""
    rows = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert isinstance(rows, list)
    contract = {
        "layer", "shape", "alpha", "alpha_weighted", "xmin", "ks_distance",
        "log_spectral_norm", "log_norm", "stable_rank", "mp_softrank", "num_spikes",
        "entropy", "farms_alpha", "farms_alpha_weighted", "num_traps", "rand_distance",
        "warning",
    }  # fmt: skip
    for row in rows:
        assert contract <= set(row)
        assert row["num_traps"] is None  # without --traps
        ref = analysis.layer(row["layer"])
        assert row["shape"] == list(ref.shape)
        if ALPHA in ref.values:
            assert row["alpha"] == ref.values[ALPHA]
            assert row["farms_alpha"] == ref.values.get(farms_key(ALPHA))  # None: too small
            assert isinstance(row["num_spikes"], int)
        else:
            assert row["alpha"] is None  # e.g. below the size filter: the note says why
            assert row["note"]
    assert main(["analyze", str(ckpt), "-q", "--format", "csv", "--no-farms"]) == 0
    table = list(csv.DictReader(capsys.readouterr().out.splitlines()))
    dense = next(r for r in table if r["layer"] == "encoder.dense.weight")
    assert float(dense["alpha"]) == analysis.layer("encoder.dense.weight").values[ALPHA]
    assert dense["farms_alpha"] == ""
    dense_json = next(r for r in rows if r["layer"] == "encoder.dense.weight")
    assert dense["num_spikes"] == str(dense_json["num_spikes"])  # an integer, as in JSON


def test_traps_flag_adds_the_correlation_traps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--traps``: WeightWatcher's ``randomize=True`` per layer, in JSON, CSV and the table, equal
    to the in-process analysis; a planted outsized entry is a trap."""
    sd = _state_dict()
    sd["encoder.dense.weight"][5, 7] = 60.0
    path = tmp_path / "trapped.safetensors"
    save_file(sd, str(path))
    out = tmp_path / "layers.json"
    assert main(["analyze", str(path), "-q", "--traps", "--format", "json", "-o", str(out)]) == 0
    rows = {r["layer"]: r for r in json.loads(out.read_text())}
    dense = rows["encoder.dense.weight"]
    assert dense["num_traps"] == 5  # one entry, five shuffles pooled (M = 40 < 100)
    assert isinstance(dense["num_traps"], int)
    # a Gaussian conv's small pooled shuffles show one spurious spike for half the seeds
    assert rows["conv.weight"]["num_traps"] <= 1
    # a layer's shuffles are seeded from its name: the same values alone, under that name
    report = analyze_model({"encoder.dense.weight": sd["encoder.dense.weight"]}, traps=True)
    direct = report.layers[0]
    assert dense["rand_distance"] == pytest.approx(direct.values()[RAND_DISTANCE], rel=1e-6)
    assert dense["metrics"][NUM_TRAPS] == 5
    assert main(["analyze", str(path), "--traps", "--no-farms"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[-2:] == ["traps", "warning"]
    line = next(t for t in table if t.startswith("encoder.dense.weight"))
    assert " 5 " in f" {line} "
    assert main(["analyze", str(path)]) == 0
    assert "traps" not in capsys.readouterr().out.splitlines()[0]
    pytest.importorskip("plotly")
    page = tmp_path / "r.html"
    assert main(["analyze", str(path), "-q", "--traps", "--html", str(page)]) == 0
    assert "shuffled weight's ESD: 5 correlation trap(s)" in page.read_text()


def test_odd_tensors_become_notes_not_crashes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """float8 is upcast, a sparse tensor densified, an orthogonal matrix (flat spectrum) gets no
    fit, a meta tensor and a control-character name cannot break the run or the terminal."""
    g = torch.Generator().manual_seed(1)
    dense = torch.randn(64, 32, generator=g)
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    f8 = tmp_path / "f8.safetensors"
    save_file({"w\x1b[31m": dense.to(torch.float8_e4m3fn), "q": q.contiguous()}, str(f8))
    result = an.analyze_checkpoint(f8, device="cpu", progress=False)
    assert result.layer("w\x1b[31m").values[ALPHA] > 0
    assert ALPHA not in result.layer("q").values
    assert "flat spectrum" in result.layer("q").note
    assert main(["analyze", str(f8), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "\x1b" not in printed
    assert "w\\x1b[31m" in printed

    pt = tmp_path / "odd.pt"
    torch.save({"sparse": dense.to_sparse(), "meta": torch.empty(64, 32, device="meta")}, pt)
    odd = an.analyze_checkpoint(pt, device="cpu", progress=False)
    plain = an.analyze_layer("sparse", dense, device=torch.device("cpu"))
    assert odd.layer("sparse").values[ALPHA] == pytest.approx(plain.values[ALPHA], rel=REL)
    assert odd.layer("meta").note.startswith("not analysed")


def test_bad_options_fail_before_any_analysis(
    ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope" / "x.json"
    for argv in (
        [str(ckpt), "--json", str(missing)],
        [str(ckpt), "-o", ""],
        [str(ckpt), "--csv", "-"],  # "-" is stdout only for -o
        ["--compare", str(ckpt), str(tmp_path / "absent.safetensors")],
        [str(ckpt), "--device", "meta"],
        [str(ckpt), "--layers", "zzz"],
    ):
        assert main(["analyze", "-q", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ")
        assert "Traceback" not in err
    assert main(["analyze", "-q", str(ckpt), "--layers", "zzz"]) == 2
    assert "matched none of its 4 weights" in capsys.readouterr().err


def test_output_dash_is_stdout(
    ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-o -`` wrote a file named ``-``; it is stdout, as in most tools."""
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", "-q", str(ckpt), "--format", "json", "-o", "-"]) == 0
    assert len(json.loads(capsys.readouterr().out)) == 4
    assert not (tmp_path / "-").exists()


def test_a_closed_stdout_ends_quietly(ckpt: Path) -> None:
    """``spectrawatch analyze ... | head``: the reader is gone before the output is written."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "spectrawatch", "analyze", "-q", str(ckpt), "--format", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stderr is not None
    proc.stdout.close()
    with proc.stderr:
        err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert "Traceback" not in err


def test_the_first_bytes_decide_the_format_not_the_suffix(tmp_path: Path) -> None:
    w = torch.randn(20, 10, generator=torch.Generator().manual_seed(2))
    save_file({"w": w}, str(tmp_path / "named.pt"))  # safetensors behind a .pt suffix
    torch.save({"w": w}, tmp_path / "named.safetensors")  # a torch zip behind .safetensors
    a = an.analyze_checkpoint(tmp_path / "named.pt", device="cpu", progress=False)
    b = an.analyze_checkpoint(tmp_path / "named.safetensors", device="cpu", progress=False)
    assert a.layer("w").values == b.layer("w").values
    (tmp_path / "noise.bin").write_bytes(bytes(range(256)) * 8)
    with pytest.raises(an.AnalyzeError, match="not a PyTorch checkpoint"):
        an.load_weights(tmp_path / "noise.bin")
