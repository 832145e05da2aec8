"""Contract table: every parameter-sharing method on a tiny encoder and a tiny decoder.

Train 3 steps -> save -> load -> identical outputs; only the intended parameters change;
adapter checkpoints load with plain peft."""

import json

import pytest
import torch
from support.methods import METHODS, _config, check_method_contract

from routetune.model.routed import RoutedModel
from routetune.training.checkpoint import run_checkpoint
from routetune.workflow import train


@pytest.mark.parametrize("decoder", [False, True], ids=["encoder", "decoder"])
@pytest.mark.parametrize(
    "peft, freeze, kind",
    METHODS,
    ids=[
        f"{p['method']}{'-' + '-'.join(p['adapter_placement']) if 'adapter_placement' in p else ''}"
        f"-{'-'.join(f) or 'all'}"
        for p, f, _ in METHODS
    ],
)
def test_method_contract(tmp_path, tiny_model_dir, tiny_llama_dir, decoder, peft, freeze, kind):
    check_method_contract(tmp_path, tiny_llama_dir if decoder else tiny_model_dir, decoder, peft, freeze, kind)


def test_trainable_parameters_logged(tmp_path, tiny_llama_dir, caplog):
    import logging

    from routetune.config import load_config
    from routetune.training.setup import prepare

    logging.getLogger("routetune").setLevel(logging.INFO)
    path = _config(tmp_path, tiny_llama_dir, True, {"method": "lora", "r": 2}, {})
    with caplog.at_level(logging.INFO, logger="routetune"):
        prepare(load_config(path))
    line = next(r.message for r in caplog.records if r.message.startswith("parameters:"))
    assert "adapters" in line and "head:cls" in line and "embeddings 0/" in line


def test_bottleneck_adapter_is_identity_at_start(tiny_model_dir):
    from routetune.model.methods.bottleneck.adapters import add_bottleneck_adapters
    from routetune.model.routed import build_model

    model = build_model(str(tiny_model_dir), 0).eval()
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    before = model.hidden_states(ids, torch.ones_like(ids))
    assert add_bottleneck_adapters(model.lm, 8, ["attention", "ffn"]) == 4  # 2 layers x 2 places
    assert torch.equal(model.hidden_states(ids, torch.ones_like(ids)), before)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "bitfit", "none"])
def test_export_merged_equals_unmerged(tmp_path, tiny_model_dir, method):
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

    from routetune.export import export

    path = _config(tmp_path, tiny_model_dir, False, {"method": method, **({"r": 4} if "ra" in method else {})}, {})
    run_dir, _ = train(path)
    ours = RoutedModel.load(run_checkpoint(run_dir, "last"))
    written = export(run_dir, tmp_path / "out", "last", merge=True)
    assert str(tmp_path / "out" / "lm") in written
    card = (tmp_path / "out" / "heads" / "cls" / "README.md").read_text()  # a model card in each folder
    assert f"parameter-sharing method: `{'full' if method == 'none' else method}` (merged into the weights)" in card
    assert "| cls | sequence-classification |" in card and "| general | language-modeling |" in card
    assert str(tmp_path) not in card and "`cls.jsonl`" in card  # file names, no path of this machine
    assert "Labels (class id: label): 0: `neg`, 1: `pos`" in card
    assert "Load with `transformers.AutoModelForSequenceClassification.from_pretrained" in card
    lm_card = (tmp_path / "out" / "lm" / "README.md").read_text()
    assert "Load with `transformers.AutoModelForMaskedLM.from_pretrained" in lm_card and str(tmp_path) not in lm_card
    marker = json.loads((tmp_path / "out" / "routetune-export.json").read_text())
    assert marker["run"] == run_dir.name
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    lm = AutoModelForMaskedLM.from_pretrained(tmp_path / "out" / "lm").eval()
    assert torch.allclose(lm(input_ids=ids, attention_mask=mask).logits,
                          ours.lm(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
    task = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "heads" / "cls").eval()
    assert task.config.id2label == {0: "neg", 1: "pos"}
    assert torch.allclose(task(input_ids=ids, attention_mask=mask).logits, ours.head_logits("cls", ids, mask),
                          atol=1e-5)
    if method in ("lora", "dora", "ia3"):  # without --merge: the PEFT adapter folder
        adapter = export(run_dir, tmp_path / "out2", "last", merge=False)
        assert adapter == [str(tmp_path / "out2" / "adapter")]


def test_export_refuses_bottleneck_merge(tmp_path, tiny_model_dir):
    from routetune.errors import RunError
    from routetune.export import export

    run_dir, _ = train(_config(tmp_path, tiny_model_dir, False, {"method": "adapter", "adapter_size": 4}, {}))
    with pytest.raises(RunError, match="cannot be merged"):
        export(run_dir, tmp_path / "out", "last", merge=True)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_export_as_peft_folders_and_refuse_merge(tmp_path, tiny_llama_dir, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from routetune.errors import RunError
    from routetune.export import export

    run_dir, _ = train(_config(tmp_path, tiny_llama_dir, True, {"method": method, "num_virtual_tokens": 3}, {}))
    with pytest.raises(RunError, match="cannot be merged"):
        export(run_dir, tmp_path / "out", "last", merge=True)
    written = export(run_dir, tmp_path / "out2", "last", merge=False)
    assert written == [str(tmp_path / "out2" / "adapter")]
    plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), written[0])
    ours = RoutedModel.load(run_checkpoint(run_dir, "last"))
    assert torch.equal(plain.prompt_encoder["default"].embedding.weight, ours.prompt.embedding.weight)


def test_prompt_tuning_generates_and_prefix_tuning_refuses(tmp_path, tiny_llama_dir):
    from routetune.errors import RunError
    from routetune.model.inference import generate
    from routetune.model.load import load_tokenizer

    tok = load_tokenizer(str(tiny_llama_dir))
    for method in ("prompt_tuning", "prefix_tuning"):
        (tmp_path / method).mkdir()
        run_dir, _ = train(
            _config(tmp_path / method, tiny_llama_dir, True, {"method": method, "num_virtual_tokens": 3}, {})
        )
        model = RoutedModel.load(run_checkpoint(run_dir, "last"))
        if method == "prefix_tuning":
            with pytest.raises(RunError, match="prefix tuning"):
                generate(model, tok, ["where is john"], 3, 32)
        else:
            out = generate(model, tok, ["where is john", "a"], 3, 32)
            assert len(out) == 2 and all(isinstance(o, str) for o in out)


def test_a_model_card_names_the_hub_model_behind_an_alias():
    from routetune.export import _base_name

    assert _base_name("minilm-l6") == "sentence-transformers/all-MiniLM-L6-v2"
    assert _base_name("smollm2-135m") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert _base_name("/home/me/models/my-bert") == "my-bert"  # a local folder: its name, not the path
    assert _base_name("bert-base-cased") == "bert-base-cased"


@pytest.mark.parametrize("method, option", [("adapter", "r"), ("lora", "adapter_size"), ("full", "num_virtual_tokens"),
                                            ("ia3", "alpha"), ("prompt_tuning", "target_modules")])
def test_an_option_the_method_does_not_take_is_refused_naming_it(tmp_path, tiny_model_dir, method, option):
    from routetune.config import load_config
    from routetune.errors import ConfigError
    from routetune.training.setup import prepare

    value = ["query"] if option == "target_modules" else 4
    path = _config(tmp_path, tiny_model_dir, False, {"method": method, option: value}, {})
    with pytest.raises(ConfigError, match=rf"^peft\.{option}: not an option of peft.method {method} \(its options"):
        prepare(load_config(path))


def test_method_none_reads_as_full():
    from routetune.config.schema import PeftConfig
    from routetune.model import methods

    assert PeftConfig(method="none").method == "full" == PeftConfig().method
    assert methods.get(PeftConfig(method="none").method) is methods.METHODS["full"]


def test_freezing_strategies_with_a_method_that_freezes_the_backbone_are_refused(tmp_path, tiny_model_dir):
    from routetune.config import load_config
    from routetune.errors import ConfigError
    from routetune.training.setup import prepare

    path = _config(tmp_path, tiny_model_dir, False, {"method": "lora"}, {"head_only": True})
    message = "^freeze: freezing strategies apply to full fine-tuning; with peft.method lora the"
    with pytest.raises(ConfigError, match=message):
        prepare(load_config(path))
