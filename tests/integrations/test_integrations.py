"""The Lightning and Hugging Face callbacks, with the real libraries, against the plain
training loop: they must record the same things."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from torch import nn

import torchvitals

STEPS = 3


def plain_loop(path, model, batches, lr: float, loss_of) -> torchvitals.Run:
    """The reference: the README's two-line integration in a plain loop, SGD, one full
    batch per optimizer step."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    with torchvitals.Monitor(model, path, optimizer=opt) as mon:
        for batch in batches:
            loss = loss_of(model, batch)
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    return torchvitals.load_run(path)


def frame(run, kind: str, prefix: str = ""):
    """The ``kind`` rows by (step, layer), ``prefix`` removed from layer names."""
    df = run.to_pandas("layers").astype({"layer": str, "kind": str})
    df["layer"] = df["layer"].str.removeprefix(prefix)
    return df[df["kind"] == kind].set_index(["step", "layer"]).sort_index()


def assert_same_params(run, ref, prefix: str = ""):
    for kind in ("grad", "weight"):
        got, want = frame(run, kind, prefix), frame(ref, kind)
        assert list(got.index) == list(want.index), kind
        assert got["numel"].tolist() == want["numel"].tolist()
        # fp32 tolerance: the frameworks sum the batch in another order (micro-batches)
        np.testing.assert_allclose(got["sumsq"], want["sumsq"], rtol=1e-5, err_msg=kind)
    np.testing.assert_allclose(run.scalar("grad_norm")[1], ref.scalar("grad_norm")[1], rtol=1e-5)
    np.testing.assert_allclose(run.scalar("loss")[1], ref.scalar("loss")[1], rtol=1e-5)
    assert run.scalar("lr/group0")[1].tolist() == ref.scalar("lr/group0")[1].tolist()


def test_core_import_does_not_import_the_integrations():
    code = (
        "import sys, torchvitals, torchvitals.store.reader, torchvitals.store.merge; "
        "bad = [m for m in ('lightning', 'pytorch_lightning', 'transformers', "
        "'torchvitals.integrations') if m in sys.modules]; print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- Lightning --------------------------------------------------------------------------


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def dataset():
    gen = torch.Generator().manual_seed(0)
    return torch.randn(32, 8, generator=gen), torch.randint(0, 4, (32,), generator=gen)


def test_lightning_callback_records_what_the_plain_loop_records(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from torchvitals.integrations.lightning import TorchvitalsCallback

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.cross_entropy(self.net(x), y)  # not self(x): no forward

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x, y = dataset()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    module = Module()
    callback = TorchvitalsCallback(tmp_path / "lightning")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        accumulate_grad_batches=2,  # two batches of 16 per optimizer step: all 32 samples
        callbacks=[callback],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, loader)
    assert callback.monitor.closed and callback.monitor.errors == 0
    run = torchvitals.load_run(tmp_path / "lightning")

    def loss_of(model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1])

    ref = plain_loop(tmp_path / "plain", mlp(), [(x, y)] * STEPS, 0.1, loss_of)
    assert run.scalar("loss")[0].tolist() == list(range(STEPS))  # one step per optimizer step
    assert_same_params(run, ref, prefix="net.")  # the LightningModule holds it as `net`
    acts = frame(run, "act")  # the first batch of 16 of each step, hooked without forward()
    assert acts.groupby("step").size().tolist() == [3] * STEPS
    assert acts.loc[(0, "net.0"), "numel"] == 16 * 16
    assert run.manifest["world_size"] == 1 and run.manifest["rank"] == 0


def test_lightning_fit_resumed_from_a_checkpoint_is_a_new_attempt(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.callbacks import ModelCheckpoint

    from torchvitals.integrations.lightning import TorchvitalsCallback
    from torchvitals.store.merge import SupersededRowsWarning, superseded_rows

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def training_step(self, batch, batch_idx):
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)

    x, y = dataset()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)

    def fit(path, max_steps, ckpt_path=None, checkpoints=None):
        callbacks = [TorchvitalsCallback(path)]
        if checkpoints is not None:
            every = ModelCheckpoint(checkpoints, "{step}", every_n_train_steps=2, save_top_k=-1)
            callbacks.append(every)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=max_steps,
            callbacks=callbacks,
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=checkpoints is not None,
            logger=False,
            default_root_dir=tmp_path,
        )
        trainer.fit(Module(), loader, ckpt_path=ckpt_path)

    fit(tmp_path / "whole", 6)
    fit(tmp_path / "run", 4, checkpoints=tmp_path / "ckpt")  # the job dies after step 3
    fit(tmp_path / "run", 6, ckpt_path=tmp_path / "ckpt" / "step=2.ckpt")
    with pytest.warns(SupersededRowsWarning, match=r"attempt 0 at step\(s\) 2-3"):
        run = torchvitals.load_run(tmp_path / "run")
    whole = torchvitals.load_run(tmp_path / "whole")
    assert run.scalar("loss")[0].tolist() == list(range(6))
    np.testing.assert_allclose(run.scalar("loss")[1], whole.scalar("loss")[1], rtol=1e-6)
    losses = run.scalars.filter(pc.equal(run.scalars["name"].cast("string"), "loss"))
    assert losses["attempt"].to_pylist() == [0, 0, 1, 1, 1, 1]
    assert [a["start_step"] for a in run.manifest["attempts"]] == [0, 2]
    steps_2_3 = pc.is_in(whole.layers["step"], pa.array([2, 3]))
    assert superseded_rows(run.layers) == whole.layers.filter(steps_2_3).num_rows
    assert run.layers.num_rows == whole.layers.num_rows
    got, want = frame(run, "grad"), frame(whole, "grad")
    np.testing.assert_allclose(got["sumsq"], want["sumsq"], rtol=1e-5)


# --- Hugging Face -------------------------------------------------------------------


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=32,
        n_positions=16,
        n_embd=16,
        n_layer=1,
        n_head=2,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)  # input and output embeddings tied


def test_hf_callback_records_what_the_plain_loop_records(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torchvitals.integrations.hf import TorchvitalsCallback

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (8, 12), generator=gen)
    labels = ids.clone()
    # The first token is never predicted; masked, the Trainer's token count (its
    # num_items_in_batch) is that of the shifted loss, so its loss is the plain mean.
    labels[:, 0] = -100
    data = [{"input_ids": i, "labels": label} for i, label in zip(ids, labels, strict=True)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,  # two micro-batches of 4: all 8 sequences per step
        max_steps=STEPS,
        learning_rate=0.05,
        optim="sgd",
        lr_scheduler_type="constant",
        max_grad_norm=0.0,  # no clipping, as in the plain loop
        weight_decay=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    callback = TorchvitalsCallback(tmp_path / "hf", weight_every=1)
    trainer = transformers.Trainer(
        model=tiny_gpt2(), args=args, train_dataset=data, callbacks=[callback]
    )
    trainer.train()
    assert callback.monitor.closed and callback.monitor.errors == 0
    run = torchvitals.load_run(tmp_path / "hf")

    model = tiny_gpt2()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with torchvitals.Monitor(model, tmp_path / "plain", optimizer=opt, weight_every=1) as mon:
        for _ in range(STEPS):
            loss = model(input_ids=ids, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            mon.step(loss=loss)
    ref = torchvitals.load_run(tmp_path / "plain")

    assert run.scalar("loss")[0].tolist() == list(range(STEPS))
    assert_same_params(run, ref)
    assert "transformer.wte.weight" in set(frame(run, "grad").index.get_level_values("layer"))
    assert "lm_head.weight" not in set(frame(run, "grad").index.get_level_values("layer"))  # tied
    # the loss and gradient norm it records are those the Trainer logs
    for name in ("loss", "grad_norm"):
        logged = [e[name] for e in trainer.state.log_history if name in e]
        np.testing.assert_allclose(run.scalar(name)[1], logged, rtol=1e-5, err_msg=name)
    assert set(frame(run, "act").index.get_level_values("layer")) == set(
        frame(ref, "act").index.get_level_values("layer")
    )


def test_hf_training_resumed_from_a_checkpoint_is_a_new_attempt(tmp_path):
    transformers = pytest.importorskip("transformers")
    from torchvitals.integrations.hf import TorchvitalsCallback
    from torchvitals.store.merge import SupersededRowsWarning, superseded_rows

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 32, (8, 12), generator=gen)
    data = [{"input_ids": i, "labels": i} for i in ids]

    def train(path, max_steps, output_dir, resume=None):
        args = transformers.TrainingArguments(
            output_dir=str(output_dir),
            per_device_train_batch_size=4,
            max_steps=max_steps,
            learning_rate=0.05,
            optim="sgd",
            lr_scheduler_type="constant",
            save_strategy="steps",
            save_steps=2,
            report_to=[],
            use_cpu=True,
            disable_tqdm=True,
            seed=0,
        )
        trainer = transformers.Trainer(
            model=tiny_gpt2(), args=args, train_dataset=data, callbacks=[TorchvitalsCallback(path)]
        )
        trainer.train(resume_from_checkpoint=resume)

    train(tmp_path / "whole", 6, tmp_path / "out-whole")
    train(tmp_path / "run", 4, tmp_path / "out")  # the job dies after step 3
    train(tmp_path / "run", 6, tmp_path / "out", resume=str(tmp_path / "out" / "checkpoint-2"))
    with pytest.warns(SupersededRowsWarning, match=r"attempt 0 at step\(s\) 2-3"):
        run = torchvitals.load_run(tmp_path / "run")
    whole = torchvitals.load_run(tmp_path / "whole")
    assert [a["start_step"] for a in run.manifest["attempts"]] == [0, 2]
    assert run.scalar("loss")[0].tolist() == list(range(6))
    np.testing.assert_allclose(run.scalar("loss")[1], whole.scalar("loss")[1], rtol=1e-5)
    assert run.layers.num_rows == whole.layers.num_rows and superseded_rows(run.layers) > 0
