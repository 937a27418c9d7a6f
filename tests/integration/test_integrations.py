"""The Hugging Face Trainer and Lightning callbacks, each driving a real tiny model for a few
steps against a real ``spectrawatch server`` subprocess: the run, its scalars and its frames
arrive. transformers / lightning are test-only extras; without them these tests skip."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from tests.servers import ServerProcess
from tests.training import tiny_gpt2

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    # third-party deprecation / "few dataloader workers" notices, not ours
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:.*(num_workers|does not have many workers).*:UserWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]

STEPS = 6
SETTINGS: dict[str, Any] = {
    "every": {"update": 1, "weights": 3, "activations": 0, "theta": 0, "defect": 0},
    "frame_steps": 2,
}


def _run(api: httpx.Client, project: str, name: str) -> dict[str, Any]:
    runs = api.get("/runs", params={"project": project}).raise_for_status().json()
    matching = [r for r in runs if r["name"] == name]
    assert matching, f"run {name!r} not found in {[r['name'] for r in runs]}"
    run: dict[str, Any] = matching[0]
    return run


def _frames(api: httpx.Client, run_id: int) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = api.get(f"/runs/{run_id}/frames").raise_for_status().json()
    return frames


def _scalars(api: httpx.Client, run_id: int) -> dict[str, list[int]]:
    series = api.get(f"/runs/{run_id}/scalars").raise_for_status().json()
    return {s["name"]: s["steps"] for s in series}


def test_hf_trainer_callback_streams_a_run(
    server: ServerProcess, api: httpx.Client, tmp_path: Path
) -> None:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from spectrawatch.integrations.hf import SpectrawatchCallback

    model = tiny_gpt2(transformers)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (16, 8)).unbind(0)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        logging_steps=2,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        run_name="hf-gpt2",
        dataloader_num_workers=0,
    )
    callback = SpectrawatchCallback(
        url=server.url, project="integrations", spool_dir=str(tmp_path / "spool"), **SETTINGS
    )
    assert isinstance(callback, transformers.TrainerCallback)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback])
    trainer.train()  # on_train_end finishes the run (flushes the queue)

    run = _run(api, "integrations", "hf-gpt2")
    assert run["status"] == "finished"
    assert run["config"]["max_steps"] == STEPS
    assert run["config"]["gradient_accumulation_steps"] == 2
    scalars = _scalars(api, run["id"])
    assert scalars["loss"] == [2, 4, 6]  # Trainer logs every logging_steps optimizer steps
    assert "learning_rate" in scalars
    frames = _frames(api, run["id"])
    kinds = {f["kind"] for f in frames}
    assert {"update_sketch", "weights"} <= kinds
    # frame_steps=2 rows per frame, one row per real optimizer step (6), not per micro-batch (12)
    assert len([f for f in frames if f["kind"] == "update_sketch"]) == STEPS // 2
    weights = [f for f in frames if f["kind"] == "weights"]
    assert "transformer.h.0.attn.c_attn.weight" in weights[0]["layers"]
    assert {f["step"] for f in weights} >= {3, STEPS}


class _Pruned(Exception):
    """What Optuna's ``TrialPruned`` is to a sweep loop: raised from a callback, caught."""


def _cpu_args(transformers: Any, output_dir: Path, steps: int) -> Any:
    """``TrainingArguments`` of a short CPU run logging every step, saving nothing."""
    return transformers.TrainingArguments(
        output_dir=str(output_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )


def test_hf_trials_ended_by_an_exception_close_crashed_and_free_their_model(
    server: ServerProcess, api: httpx.Client, tmp_path: Path
) -> None:
    """A ``train()`` ended by an exception never calls ``on_train_end``: each such trial of a
    sweep left its run ``running`` (closed ``finished`` at exit), its last rows in the client,
    and a monitor, a sender thread and the model alive. The next trial's ``on_train_begin``
    now finishes it ``crashed``; a trial still open at exit is closed ``crashed`` too."""
    import gc
    import weakref

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from spectrawatch.integrations.hf import SpectrawatchCallback

    monitor_module = sys.modules["spectrawatch.monitor"]  # spectrawatch.monitor: the instance

    class Pruner(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 3:
                raise _Pruned

    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 8)).unbind(0)]
    models: list[weakref.ref[torch.nn.Module]] = []
    monitors = []
    for trial, pruned in enumerate((True, False, True)):
        model = tiny_gpt2(transformers)
        models.append(weakref.ref(model))
        callback = SpectrawatchCallback(
            url=server.url, project="sweep", run=f"t{trial}", spool_dir=str(tmp_path / "spool")
        )
        monitors.append(callback.monitor)
        args = _cpu_args(transformers, tmp_path / "out", 5)
        callbacks = [callback, Pruner()] if pruned else [callback]
        trainer = transformers.Trainer(
            model=model, args=args, train_dataset=data, callbacks=callbacks
        )
        try:
            trainer.train()
            interrupted = False
        except _Pruned:
            interrupted = True
        assert interrupted is pruned
        del trainer, model, callback, callbacks
        gc.collect()
        # at most the trial that just ended holds a model and a monitor
        assert sum(ref() is not None for ref in models) == (1 if pruned else 0)
        assert len([m for m in monitors if m in monitor_module._LIVE]) == (1 if pruned else 0)
    monitor_module._finish_at_exit()  # what the interpreter's exit runs
    runs = {name: _run(api, "sweep", name) for name in ("t0", "t1", "t2")}
    assert {n: (r["status"], r["last_step"]) for n, r in runs.items()} == {
        "t0": ("crashed", 3),
        "t1": ("finished", 5),
        "t2": ("crashed", 3),
    }
    assert _scalars(api, runs["t0"]["id"])["loss"] == [1, 2]  # step 3 raised before its log
    sketched = [f["step"] for f in _frames(api, runs["t0"]["id"]) if f["kind"] == "weights"]
    assert sketched == [3]  # the final snapshot of the interrupted trial


def test_hf_callbacks_of_one_trainer_or_of_a_nested_trainer_leave_each_other_alone(
    server: ServerProcess, api: httpx.Client, tmp_path: Path
) -> None:
    """Two ``SpectrawatchCallback``s of one Trainer: the second's ``on_train_begin`` finished
    the first's run ``crashed``; a Trainer trained from inside another's ``train()`` (a callback
    fine-tuning a probe) did the same to the outer run. Only a ``train()`` that ended is closed."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from spectrawatch.integrations.hf import SpectrawatchCallback

    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (8, 8)).unbind(0)]

    def trainer(name: str, steps: int, *extra: Any) -> Any:
        callbacks = [
            SpectrawatchCallback(
                url=server.url, project="nest", run=run, spool_dir=str(tmp_path / "spool")
            )
            for run in name.split(",")
        ]
        args = _cpu_args(transformers, tmp_path / name, steps)
        return transformers.Trainer(
            model=tiny_gpt2(transformers),
            args=args,
            train_dataset=data,
            callbacks=[*callbacks, *extra],
        )

    class Nested(transformers.TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 2:
                trainer("inner", 2).train()

    trainer("a,b", 3).train()
    trainer("outer", 4, Nested()).train()
    runs = {name: _run(api, "nest", name) for name in ("a", "b", "outer", "inner")}
    assert {n: (r["status"], r["last_step"]) for n, r in runs.items()} == {
        "a": ("finished", 3),
        "b": ("finished", 3),
        "outer": ("finished", 4),
        "inner": ("finished", 2),
    }


class _TinyLightningModel:
    """Built lazily so that this module imports without lightning."""

    @staticmethod
    def make(pl: Any) -> Any:
        class Tiny(pl.LightningModule):  # type: ignore[misc]
            def __init__(self, hidden: int = 16, lr: float = 0.05) -> None:
                super().__init__()
                self.save_hyperparameters()
                self.net = torch.nn.Sequential(
                    torch.nn.Linear(8, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
                )

            def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
                x, y = batch
                loss = torch.nn.functional.mse_loss(self.net(x), y)
                self.log("train_loss", loss)
                return loss

            def validation_step(self, batch: Any, batch_idx: int) -> None:
                x, y = batch
                self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

            def configure_optimizers(self) -> Any:
                return torch.optim.SGD(self.parameters(), lr=self.hparams["lr"])

        return Tiny()


def test_lightning_callback_streams_a_run(
    server: ServerProcess, api: httpx.Client, tmp_path: Path
) -> None:
    pl = pytest.importorskip("lightning.pytorch")
    from spectrawatch.integrations.lightning import SpectrawatchCallback

    torch.manual_seed(0)
    x = torch.randn(64, 8)
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    train = torch.utils.data.DataLoader(data, batch_size=8)
    val = torch.utils.data.DataLoader(data, batch_size=32)
    callback = SpectrawatchCallback(
        url=server.url,
        project="integrations",
        run="lightning-mlp",
        log_every=2,
        spool_dir=str(tmp_path / "spool"),
        **SETTINGS,
    )
    assert isinstance(callback, pl.Callback)
    trainer = pl.Trainer(
        max_steps=STEPS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        val_check_interval=3,
        num_sanity_val_steps=0,
        callbacks=[callback],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(_TinyLightningModel.make(pl), train, val)

    run = _run(api, "integrations", "lightning-mlp")
    assert run["status"] == "finished"
    assert run["config"] == {"hidden": 16, "lr": 0.05}
    scalars = _scalars(api, run["id"])
    assert scalars["train_loss"] == [2, 4, 6]
    assert scalars["val_loss"] == [3, 6]
    frames = _frames(api, run["id"])
    assert len([f for f in frames if f["kind"] == "update_sketch"]) == STEPS // 2
    weights = [f for f in frames if f["kind"] == "weights"]
    assert weights
    assert "net.0.weight" in weights[0]["layers"]


def test_integrations_do_not_import_frameworks() -> None:
    """``import spectrawatch`` and the integration modules leave the frameworks unimported."""
    import subprocess

    code = (
        "import sys, spectrawatch, spectrawatch.integrations.hf, "
        "spectrawatch.integrations.lightning; "
        "print(sorted(m for m in ('transformers', 'lightning', 'pytorch_lightning') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("framework", ["hf", "lightning"])
def test_callbacks_survive_pickling(framework: str, tmp_path: Path) -> None:
    """Lightning's ``ddp_spawn`` pickles the Trainer with its callbacks into each process it
    starts; a callback holding a ``Monitor`` (a lock) failed that before fit() began."""
    import pickle

    if framework == "hf":
        pytest.importorskip("transformers")
        from spectrawatch.integrations.hf import SpectrawatchCallback
    else:
        pytest.importorskip("lightning.pytorch")
        from spectrawatch.integrations.lightning import SpectrawatchCallback  # type: ignore[assignment]
    callback = SpectrawatchCallback(project="p", run="r", spool_dir=str(tmp_path), mode="offline")
    copy = pickle.loads(pickle.dumps(callback))
    assert copy.monitor is not callback.monitor
    assert copy.monitor._init_kwargs == callback.monitor._init_kwargs


def test_numeric_logs_keep_numbers_only() -> None:
    """NaN/Inf stay (the monitor sends them: a NaN loss fires a loss rule); they were left out."""
    from spectrawatch.integrations.hf import numeric_logs

    logs = {
        "loss": 0.5,
        "step": 3,
        "grad_norm": torch.tensor(1.25),
        "nan": float("nan"),
        "flag": True,
        "name": "x",
        "vector": torch.ones(2),
    }
    kept = numeric_logs(logs)
    assert math.isnan(kept.pop("nan"))
    assert kept == {"loss": 0.5, "step": 3.0, "grad_norm": 1.25}
    assert numeric_logs(None) == {}


def test_inner_optimizer_unwraps_accelerate_style_wrappers() -> None:
    from spectrawatch.integrations.hf import inner_optimizer

    opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)

    class Wrapper:  # accelerate's AcceleratedOptimizer keeps the real one in .optimizer
        def __init__(self, optimizer: object) -> None:
            self.optimizer = optimizer

    assert inner_optimizer(opt) is opt
    assert inner_optimizer(Wrapper(Wrapper(opt))) is opt
    assert inner_optimizer(None) is None
