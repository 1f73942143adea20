"""JadeCompact: shapes, parameter counts, switchable heads, dropout rules, strict encoder loading."""

from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model import JadeCompact, JadeConfig, load_encoder
from pipeline.reducer import LossConfig, MultiTaskModel


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_match_the_original_model():
    model = JadeCompact(JadeConfig(n_features=12))
    assert n_params(model.lstm) == 84_480
    assert n_params(model.projection) == 12_352
    # The original 97,547 counted its four log-sigma scalars, which live in the weighting here.
    assert n_params(model) == 97_543
    assert n_params(MultiTaskModel.build(JadeConfig(n_features=12))) == 97_547
    assert n_params(JadeCompact(JadeConfig(tasks=("type",)))) == 97_027
    assert n_params(JadeCompact(JadeConfig(tasks=("type", "pointer")))) == 97_157
    assert n_params(JadeCompact(JadeConfig(n_features=13))) == 97_543 + 768


def test_output_shapes_and_only_enabled_heads():
    x = torch.randn(5, 105, 12)
    out = JadeCompact(JadeConfig(num_classes=2))(x)
    assert out["type_logits"].shape == (5, 2)
    assert out["pointers"].shape == (5, 2)
    assert ((out["pointers"] > 0) & (out["pointers"] < 1)).all()
    assert out["span_logits"].shape == (5, 105) and out["countdown"].shape == (5, 105)
    only = JadeCompact(JadeConfig(tasks=("pointer", "countdown")))
    assert set(only(x)) == {"pointers", "countdown"}
    assert not hasattr(only, "type_head") and not hasattr(only, "span_head")


def test_shared_and_head_parameters_partition_the_model():
    model = JadeCompact()
    ids = [id(p) for p in model.shared_parameters()]
    for task in model.tasks:
        ids += [id(p) for p in model.head_parameters(task)]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())
    assert len(model.head_parameters("span")) == 2


def test_recurrent_dropout_only_with_stacked_layers():
    assert JadeCompact(JadeConfig(num_layers=1)).lstm.dropout == 0.0
    assert JadeCompact(JadeConfig(num_layers=2, recurrent_dropout=0.7)).lstm.dropout == 0.7


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    torch.manual_seed(0)
    model = JadeCompact()
    x = torch.randn(3, 105, 12)
    model.eval()
    assert torch.equal(model(x)["countdown"], model(x)["countdown"])
    model.train()
    assert not torch.equal(model(x)["countdown"], model(x)["countdown"])


def test_bad_config_is_a_user_error():
    with pytest.raises(UserError, match="model.tasks"):
        JadeConfig(tasks=("type", "stones"))
    with pytest.raises(UserError, match="model.input_dropout"):
        JadeConfig(input_dropout=1.5)


def test_encoder_round_trip_through_a_checkpoint_file(tmp_path):
    torch.manual_seed(1)
    source = MultiTaskModel.build(loss_cfg=LossConfig(weighting="equal"))
    path = tmp_path / "state.pt"
    # Saved the way a trainer would: wrapped in a dict, keys carrying the DDP prefix.
    torch.save({"model": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    target = JadeCompact()
    head_before = target.type_head[1].weight.clone()
    loaded = load_encoder(target, str(tmp_path), freeze=True)  # a directory holding state.pt
    assert "lstm.weight_ih_l0" in loaded and "projection.weight" in loaded
    assert torch.equal(target.lstm.weight_hh_l0, source.model.lstm.weight_hh_l0)
    assert torch.equal(target.projection.bias, source.model.projection.bias)
    assert torch.equal(target.type_head[1].weight, head_before)  # heads untouched
    assert not target.lstm.weight_ih_l0.requires_grad and target.type_head[1].weight.requires_grad


def test_encoder_shape_mismatch_names_tensor_and_both_shapes(tmp_path):
    path = tmp_path / "enc.pt"
    torch.save(JadeCompact(JadeConfig(n_features=13)).state_dict(), path)
    with pytest.raises(UserError) as err:
        load_encoder(JadeCompact(JadeConfig(n_features=12)), str(path))
    msg = str(err.value)
    assert "lstm.weight_ih_l0" in msg and "[384, 13]" in msg and "[384, 12]" in msg


def test_encoder_with_extra_layer_or_missing_tensor_is_refused(tmp_path):
    two_layer = JadeCompact(JadeConfig(num_layers=2)).state_dict()
    with pytest.raises(UserError, match="weight_ih_l1"):
        load_encoder(JadeCompact(), two_layer)
    no_projection = {k: v for k, v in JadeCompact().state_dict().items() if k.startswith("lstm.")}
    with pytest.raises(UserError, match="projection.weight"):
        load_encoder(JadeCompact(), no_projection)
    # The original pretrainer's LSTM-only checkpoint (encoder.* keys) loads with parts=("lstm",).
    old = {k.replace("lstm.", "encoder."): v for k, v in no_projection.items()}
    assert load_encoder(JadeCompact(), old, parts=("lstm",))[0].startswith("lstm.")


def test_unreadable_or_missing_checkpoint_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(UserError, match="bad.pt"):
        load_encoder(JadeCompact(), str(bad))
    with pytest.raises(UserError, match="nope.pt"):
        load_encoder(JadeCompact(), str(tmp_path / "nope.pt"))


def test_encoder_loads_from_a_trainer_checkpoint_directory(tmp_path):
    # The layout pipeline.train.checkpoint writes: state.pt (with optimizer, scheduler and loader
    # state, numpy values included) beside rng-rank*.pt and meta.json.
    import numpy as np

    from pipeline.train import checkpoint as ckpt

    torch.manual_seed(2)
    mt = MultiTaskModel.build()
    opt = torch.optim.AdamW(mt.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    state = {"multitask": mt.state_dict(), "model": mt.model.state_dict(),
             "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "loader": {"epoch": np.int64(3), "perm": np.arange(4)}, "epoch": 3}
    ckpt.write_checkpoint(str(tmp_path), 0, state, {"epoch": 3})
    target = JadeCompact()
    load_encoder(target, str(tmp_path))
    assert torch.equal(target.lstm.weight_ih_l0, mt.model.lstm.weight_ih_l0)
