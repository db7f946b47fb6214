"""Kind `maskgit` of train_transformer and its sampling: the AR loop with the masked objective, exact resume
(the mask generator's state is checkpointed: the resume test is test_train_transformer.py's, run for both kinds),
and samples through the same contract as AR's."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from helpers import transformer_cfg
from models.maskgit import MaskGIT, MaskGITConfig, masked_loss
from pipeline.shards import iter_tar_samples
from stages import sample as sample_stage
from stages import train_transformer as tt
from training.ar import objective


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world["base"]


def mg_cfg(base, out, **kw) -> tt.TrainTransformerParams:
    return transformer_cfg(base, out, kind="maskgit", **kw)


def test_objective_is_the_masked_loss_of_a_mask_drawn_from_the_generator():
    torch.manual_seed(0)
    model = MaskGIT(MaskGITConfig(vocab_size=16, grid=(4, 4), n_layer=1, n_head=2, n_embd=16, n_classes=0)).eval()
    x = torch.randint(0, 16, (5, 16))
    loss, acc = objective(model, model.mask_id, x, None, torch.Generator().manual_seed(3), 0.0)
    again = torch.Generator().manual_seed(3)  # the same draws, by hand: the mask first
    from models.maskgit import random_mask
    mask = random_mask(5, 16, generator=again)
    want, want_acc = masked_loss(model(x.masked_fill(mask, model.mask_id)), x, mask)
    assert torch.equal(loss, want) and torch.equal(acc, want_acc)
    # ar (mask_id None): the GPT's next-token loss, no accuracy
    from models.gpt import GPT, GPTConfig
    gpt = GPT(GPTConfig(vocab_size=16, grid=(4, 4), n_layer=1, n_head=2, n_embd=16)).eval()
    loss, acc = objective(gpt, None, x, None, None)
    assert acc is None and torch.equal(loss, gpt(x[:, :-1], None, targets=x)[1])


def test_the_val_loss_is_unsmoothed_and_training_takes_label_smoothing_and_label_dropout_from_the_generator():
    """val_loss calls objective without label_smoothing: the default must be the plain loss (bits per masked token
    is the stage's metric). Training passes maskgit.label_smoothing through, and the class dropout draws from the
    masks' generator after the mask, so the global RNG (reseeded or drawn from elsewhere) changes nothing."""
    torch.manual_seed(0)
    model = MaskGIT(MaskGITConfig(vocab_size=16, grid=(4, 4), n_layer=1, n_head=2, n_embd=16, n_classes=3,
                                  class_dropout=0.5)).train()
    x, y = torch.randint(0, 16, (8, 16)), torch.arange(8) % 3

    def by_hand(seed: int, smoothing: float) -> torch.Tensor:
        from models.maskgit import random_mask
        again = torch.Generator().manual_seed(seed)
        mask = random_mask(8, 16, generator=again)
        return masked_loss(model(x.masked_fill(mask, model.mask_id), y, generator=again), x, mask, smoothing)[0]

    plain = objective(model, model.mask_id, x, y, torch.Generator().manual_seed(3))[0]
    assert torch.equal(plain, by_hand(3, 0.0))
    smoothed = objective(model, model.mask_id, x, y, torch.Generator().manual_seed(3), 0.3)[0]
    assert torch.equal(smoothed, by_hand(3, 0.3)) and not torch.allclose(smoothed, plain)
    draws = []
    for global_seed in range(4):
        torch.manual_seed(global_seed)
        draws.append(objective(model, model.mask_id, x, y, torch.Generator().manual_seed(3))[0])
    assert all(torch.equal(d, plain) for d in draws)
    # the generator decides the dropout: other seeds drop other labels (and mask other tokens)
    losses = {objective(model, model.mask_id, x, y, torch.Generator().manual_seed(s))[0].item() for s in range(4)}
    assert len(losses) > 1


@pytest.fixture(scope="module")
def trained(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("maskgit")
    tt.run(mg_cfg(world, out))
    return out


def test_metrics_config_and_log(trained):
    config = json.loads((trained / "gpt" / "config.json").read_text())
    assert config["kind"] == "maskgit" and config["model"]["vocab_size"] == 16
    m = json.loads((trained / "gpt" / "metrics.json").read_text())
    assert m["kind"] == "maskgit" and 0 <= m["val_masked_accuracy"] <= 1
    assert json.loads((trained / "metrics.json").read_text()) == {
        "masked_bits": m["val_bits_per_token"], "masked_acc": m["val_masked_accuracy"]}
    rows = list(csv.DictReader((trained / "log.tsv").open(), delimiter="\t"))
    assert [r["step"] for r in rows if r["val_masked_accuracy"]] == ["3", "6"]
    # the same weights are a MaskGIT (bidirectional), not a GPT
    model = MaskGIT(MaskGITConfig(**{**config["model"], "grid": tuple(config["model"]["grid"])}))
    model.load_state_dict(load_file(str(trained / "gpt" / "model.safetensors")))


def test_the_prefect_artifact_reports_masked_bits(trained, tmp_path, monkeypatch):
    """A maskgit run published the GAN headline and failed the flow with KeyError 'family' (the publisher read
    every kind but ar as a GAN)."""
    import yaml

    from pipeline import artifacts
    created = {}
    monkeypatch.setattr(artifacts, "create_table_artifact", lambda rows, key, description: created.update({key: rows}))
    monkeypatch.setattr(artifacts, "create_markdown_artifact", lambda md, key, description: created.update({key: md}))
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"train_transformer": {
        "out_dir": str(trained / "gpt"), "metrics": str(trained / "metrics.json")}}))
    artifacts.publish_stage("train_transformer", tmp_path)
    m = json.loads((trained / "gpt" / "metrics.json").read_text())
    report = created["train-transformer-report"]
    assert f"maskgit: val {m['val_bits_per_token']:.3f} bits per masked token" in report
    assert f"masked-token accuracy {m['val_masked_accuracy']:.1%}" in report


def sample_cfg(world, model_dir, out, **kw):
    return sample_stage.SampleParams(model_dir=str(model_dir), vqgan_dir=str(world / "vqgan"),
                                     out_dir=str(out / "samples"), metrics=str(out / "sample.json"), n=13,
                                     batch_size=5, shard_size=6, cfg_scale=2.0, device="cpu", **kw)


def test_samples_have_no_mask_left_and_are_seeded(world, trained, tmp_path):
    sample_stage.run(sample_cfg(world, trained / "gpt", tmp_path / "a", maskgit_steps=4))
    m = json.loads((tmp_path / "a" / "samples" / "manifest.json").read_text())
    assert m["kind"] == "maskgit" and m["sampler"]["steps"] == 4 and m["sampler"]["choice_temperature"] == 2.0
    tokens = [np.frombuffer(files["tok"], "<u2") for shard in m["shards"]
              for _, files, _ in iter_tar_samples(tmp_path / "a" / "samples" / shard)]
    assert len(tokens) == 13 and max(int(t.max()) for t in tokens) < 16  # 16 = [MASK]: none left
    sample_stage.run(sample_cfg(world, trained / "gpt", tmp_path / "b", maskgit_steps=4))
    sample_stage.run(sample_cfg(world, trained / "gpt", tmp_path / "c", maskgit_steps=2))
    read = lambda d: (d / "samples" / "samples-000000.tar").read_bytes()  # noqa: E731
    assert read(tmp_path / "a") == read(tmp_path / "b") and read(tmp_path / "a") != read(tmp_path / "c")
    # the noise on the confidences is the params' (the manifest records it: it must be what sampled)
    sample_stage.run(sample_cfg(world, trained / "gpt", tmp_path / "d", maskgit_steps=4, choice_temperature=0.0))
    sample_stage.run(sample_cfg(world, trained / "gpt", tmp_path / "e", maskgit_steps=4, choice_temperature=50.0))
    assert len({read(tmp_path / d) for d in "ade"}) == 3
