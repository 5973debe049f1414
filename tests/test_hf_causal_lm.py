"""Hugging Face language models as users load them: the cache on, labels in training, logits out.

Models outside the zoo's lists (``benchmarks/zoo_coverage.py``) - OPT and GPT-NeoX causal LMs,
BART as the encoder-decoder - each from its default config with only the size cut (layers,
widths, vocabulary) and ``use_cache`` left at its default (``True``). ``fxattn.transform``
captures them with the cache off by itself (the plan says so; the config is not touched), one
step of Hugging Face ``Trainer`` trains them with ``SSIA(attach=True)`` on ``labels`` in the
inputs, and the export takes inference inputs (no labels): the lean graph is captured again
with the trained DIA weights (same ``fxattn_dia.*`` keys) and verified in onnxruntime.
A model whose output holds more than its logits (an encoder-decoder's encoder state) exports
the logits alone by default, ``outputs=`` choosing otherwise. Then the errors:
``use_cache=True`` on a model captured without it, a lean graph asked for other inputs, and a
forward that returns a type no graph carries (a cache, a plain class).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import fxattn

transformers = pytest.importorskip("transformers")

BATCH, LENGTH, VOCAB = 2, 12, 96


def _tokens(i: int, decoder: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    ids = torch.randint(3, VOCAB, (LENGTH,), generator=g)
    sample = {"input_ids": ids, "attention_mask": torch.ones(LENGTH, dtype=torch.long),
              "labels": ids.clone()}
    if decoder:  # a target of its own: the decoder inputs come from labels (shifted)
        sample["labels"] = torch.randint(3, VOCAB, (LENGTH,), generator=g)
    return sample


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, size: int, decoder: bool = False) -> None:
        self.size, self.decoder = size, decoder

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return _tokens(i, self.decoder)


def _batch(decoder: bool = False, labels: bool = True) -> dict[str, torch.Tensor]:
    items = [_tokens(i, decoder) for i in range(BATCH)]
    batch = {k: torch.stack([item[k] for item in items]) for k in items[0]}
    if not labels:
        del batch["labels"]
    return batch


def _opt() -> nn.Module:
    return transformers.OPTForCausalLM(transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
        word_embed_proj_dim=32, vocab_size=VOCAB, max_position_embeddings=64))


def _gpt_neox() -> nn.Module:
    return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(
        num_hidden_layers=2, hidden_size=32, intermediate_size=64, num_attention_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64))


def _bart() -> nn.Module:
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        encoder_layers=2, decoder_layers=2, d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64,
        encoder_attention_heads=2, decoder_attention_heads=2, vocab_size=VOCAB,
        max_position_embeddings=64))


def _train_one_step(net: nn.Module, tmp_path: Path, decoder: bool = False) -> None:
    args = transformers.TrainingArguments(
        str(tmp_path / "run"), per_device_train_batch_size=BATCH, max_steps=1, optim="sgd",
        learning_rate=0.1, report_to=[], use_cpu=True, save_strategy="no",
        dataloader_num_workers=0, disable_tqdm=True, logging_steps=1, seed=0)
    trainer = transformers.Trainer(model=net, args=args,
                                   train_dataset=_Tokens(BATCH, decoder))
    fxattn.log_ssia(trainer)
    trainer.train()
    (log,) = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert log["ssia_loss"] > 0


@pytest.fixture(scope="module")
def trained_opt(tmp_path_factory: pytest.TempPathFactory) -> nn.Module:
    """OPT as from_config gives it (cache on), transformed with labels, one Trainer step."""
    torch.manual_seed(0)
    model = _opt()
    assert model.config.use_cache
    net = fxattn.transform(model, _batch(), ssia=fxattn.SSIA(attach=True))
    assert model.config.use_cache  # no config edit
    _train_one_step(net, tmp_path_factory.mktemp("opt"))
    return net.eval()


def _onnx_outputs(path: Path) -> list[str]:
    import onnx

    return [o.name for o in onnx.load(str(path)).graph.output]


def test_causal_lm_captured_with_the_cache_off_exports_logits_from_inference_inputs(
        trained_opt: nn.Module, tmp_path: Path) -> None:
    net = trained_opt
    assert net.plan.fixed_arguments == {"use_cache": False}
    assert any("use_cache=False" in note for note in net.plan.notes)
    # export_onnx of the training module for inputs without labels: captured again for them
    report = fxattn.export_onnx(net, tmp_path / "opt.onnx", _batch(labels=False))
    assert report.verified
    assert any("captured again" in note for note in report.notes), report.notes
    assert len(_onnx_outputs(tmp_path / "opt.onnx")) == 1  # logits: no loss, no cache


def test_the_transformed_lm_is_called_like_the_original(trained_opt: nn.Module) -> None:
    with torch.no_grad():
        out = trained_opt(**_batch(), use_cache=False)
        assert out.past_key_values is None
        torch.testing.assert_close(trained_opt(**_batch()).logits, out.logits)
        torch.testing.assert_close(trained_opt(**_batch(), use_cache=None).logits, out.logits)
    with pytest.raises(fxattn.InputError, match=r"use_cache=False .* cannot run with "
                                                r"use_cache=True.*generat"):
        trained_opt(**_batch(), use_cache=True)


def test_the_lean_graph_of_the_training_signature_names_the_way_to_another(
        trained_opt: nn.Module, tmp_path: Path) -> None:
    lean = fxattn.strip_ssia(trained_opt)  # takes input_ids, attention_mask and labels
    with pytest.raises(fxattn.InputError, match=r"strip_ssia\(net, example_inputs=inputs\)"):
        fxattn.export_onnx(lean, tmp_path / "lean.onnx", _batch(labels=False))


def test_another_causal_lm_family_transforms_with_its_cache_on() -> None:
    torch.manual_seed(0)
    model = _gpt_neox()
    assert model.config.use_cache
    plan = fxattn.inspect(model, _batch(labels=False))
    assert plan.fixed_arguments == {"use_cache": False} and plan.sites  # parallel residuals


def test_encoder_decoder_trains_in_trainer_and_exports_from_inference_inputs(
        tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _bart()
    assert model.config.use_cache
    net = fxattn.transform(model, _batch(decoder=True), ssia=fxattn.SSIA(attach=True))
    assert net.plan.fixed_arguments == {"use_cache": False}
    _train_one_step(net, tmp_path, decoder=True)
    net.eval()
    inference = _batch(decoder=True, labels=False)  # the decoder reads the tokens so far
    inference["decoder_input_ids"] = inference["input_ids"].clone()
    lean = fxattn.strip_ssia(net, example_inputs=inference)
    # the training module's DIA state loads into the graph captured for inference: same keys
    trained = {k: v for k, v in net.state_dict().items() if k.startswith("fxattn_dia.")}
    got = {k: v for k, v in lean.state_dict().items() if k.startswith("fxattn_dia.")}
    assert trained and list(got) == list(trained)
    for key, value in trained.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=0)
    report = fxattn.export_onnx(lean, tmp_path / "bart.onnx", inference)
    assert report.verified
    # a Seq2SeqLMOutput also holds the encoder's last hidden state (for generation): the
    # deployed file keeps the logits alone, named so, and the report says what it left out
    assert _onnx_outputs(tmp_path / "bart.onnx") == ["logits"]
    assert any("left out 'encoder_last_hidden_state'" in note for note in report.notes)
    both = ["logits", "encoder_last_hidden_state"]
    report = fxattn.export_onnx(lean, tmp_path / "both.onnx", inference, outputs=both)
    assert report.verified and _onnx_outputs(tmp_path / "both.onnx") == both


class _TwoHeads(nn.Module):
    """A plain module with a dict output: what ``outputs=`` chooses from."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        for block in self.blocks:
            x = x + torch.relu(block(x))
        return {"features": x, "logits": self.head(x)}


def test_outputs_choose_the_entries_of_a_mapping_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 8)
    lean = fxattn.strip_ssia(fxattn.transform(_TwoHeads(), x, ssia=False))
    for outputs, names in (("auto", ["logits"]), (None, None), (["features"], ["features"]),
                           (["logits", "features"], ["logits", "features"])):
        path = tmp_path / f"{outputs}.onnx"
        assert fxattn.export_onnx(lean, path, x, outputs=outputs).verified
        got = _onnx_outputs(path)
        assert got == names if names else len(got) == 2
    for wrong in (["scores"], ["logits", "logits"], []):
        with pytest.raises(fxattn.ConfigError, match="choose distinct names among the outputs "
                                                     "'features', 'logits'"):
            fxattn.export_onnx(lean, tmp_path / "no.onnx", x, outputs=wrong)
    assert not (tmp_path / "no.onnx").exists()


class _Result:
    """A plain result class: not a tensor, container or registered pytree."""

    def __init__(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden


class _Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> _Result:
        for block in self.blocks:
            x = x + block(x)
        return _Result(x)


def test_an_output_type_no_graph_carries_is_named_with_the_fix() -> None:
    with pytest.raises(fxattn.TraceError) as caught:
        fxattn.transform(_Blocks(), torch.randn(2, 8))
    message = str(caught.value)
    assert message.startswith("cannot capture _Blocks: _Blocks.forward() returns a ")
    assert "_Result" in message and "register_pytree_node" in message
    assert "concrete_args" in message


def test_a_cache_the_example_asks_for_is_named_with_the_fix() -> None:
    torch.manual_seed(0)
    with pytest.raises(fxattn.TraceError,
                       match=r"returns a transformers\.cache_utils\.\w*Cache.*example inputs "
                             r"set use_cache=True; leave use_cache out"):
        fxattn.inspect(_opt(), {**_batch(labels=False), "use_cache": True})


def test_a_file_of_some_outputs_verifies_against_the_module_that_returns_all(
        tmp_path: Path) -> None:
    """verify_onnx compares the entries a file's outputs are named after (the zoo and users
    verify a logits-only file against the lean module, which returns every entry)."""
    from fxattn.capture import ExampleInputs
    from fxattn.export import verify_onnx

    torch.manual_seed(0)
    x = torch.randn(4, 8)
    lean = fxattn.strip_ssia(fxattn.transform(_TwoHeads(), x, ssia=False))
    path = tmp_path / "logits.onnx"
    fxattn.export_onnx(lean, path, x, verify=False)
    assert _onnx_outputs(path) == ["logits"]
    assert verify_onnx(str(path), lean, ExampleInputs.from_user(x)).passed
