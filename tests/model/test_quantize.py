"""4-bit base weights (QLoRA) through bitsandbytes on the CPU, on a tiny random Llama and BERT: LoRA
trains over an NF4 base that stays 4-bit, a step checkpoint resumes exactly, evaluation and serving
quantize the base again, the adapter folder loads in plain peft over the quantized base, `export
--merge` gives a plain folder computing what the quantized model computed, and methods that train
the base are refused naming the key."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

bnb = pytest.importorskip("bitsandbytes")

from support import GENERAL, make_config  # noqa: E402
from routetune.config import load_config  # noqa: E402
from routetune.errors import ConfigError  # noqa: E402
from routetune.training import state  # noqa: E402
from routetune.training.engine import Trainer  # noqa: E402
from routetune.training.setup import prepare  # noqa: E402


def _decoder_config(tmp_path, model_dir, method="lora", quantize="nf4", **train) -> object:
    (tmp_path / "t.txt").write_text(GENERAL)
    cfg = {"model": {"name": str(model_dir), "max_length": 24, "quantize": quantize},
           "sources": {"lm": {"objective": "causal-lm", "train": str(tmp_path / "t.txt"), "text": {"stream": False}}},
           "peft": {"method": method, **({"r": 4} if method in ("lora", "dora") else {})},
           "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-2, "precision": "fp32", "device": "cpu",
                     "progress": False, "save_every_steps": 3, **train},
           "run": {"name": "q", "output_dir": str(tmp_path / "runs")}}
    path = tmp_path / "q.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _four_bit(model) -> int:
    return sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())


@pytest.fixture(scope="module")
def qlora_run(tmp_path_factory, tiny_llama_dir):
    from routetune.workflow import train

    root = tmp_path_factory.mktemp("qlora")
    run_dir, summary = train(_decoder_config(root, tiny_llama_dir))
    return root, run_dir, summary


def test_lora_trains_over_a_base_that_stays_4_bit(qlora_run):
    root, run_dir, _ = qlora_run
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [e["sources"]["lm"]["loss"] for e in events if e["event"] == "train"]
    setup = prepare(load_config(root / "q.yaml"))
    assert _four_bit(setup.model) == 2 * 7  # every projection of both layers
    trainable = [n for n, p in setup.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in setup.model.named_parameters() if p.requires_grad)
    first = Trainer(setup, root / "scratch")
    before = first.train_step(0, setup.batches.next())["lm"]
    for step in range(1, 8):
        after = first.train_step(step, setup.batches.next())["lm"]
    assert after < before, (before, after, losses)
    assert _four_bit(setup.model) == 14  # still 4-bit after training


def test_a_step_checkpoint_holds_the_adapters_and_resumes_exactly(qlora_run, tmp_path):
    root, run_dir, _ = qlora_run
    folder = run_dir / "checkpoints" / state.step_folder(3)
    files = {p.name for p in folder.iterdir()}
    assert "adapter_model.safetensors" in files and "model.safetensors" not in files
    note = json.loads((folder / "routetune.json").read_text())
    assert note["quantization"] == {"quantize": "nf4", "double": False}
    import shutil

    copy = tmp_path / "copy"  # a resume cuts the run's logs back to the checkpoint: on a copy
    shutil.copytree(run_dir, copy)
    resumed = Trainer(prepare(load_config(root / "q.yaml")), copy)
    assert resumed.restore(copy / "checkpoints" / state.step_folder(3)) == 3
    for step in range(3, 6):
        resumed.train_step(step, resumed.batches.next())
    from safetensors.torch import load_file
    from peft import get_peft_model_state_dict

    final = load_file(str(run_dir / "checkpoints" / state.step_folder(6) / "adapter_model.safetensors"))
    mine = get_peft_model_state_dict(resumed.model.lm)
    for key, value in final.items():
        assert torch.equal(mine[key.removeprefix("base_model.model.")], value), key


def test_gradients_still_flow_through_4_bit_layers_after_an_evaluation(tiny_llama_dir):
    """A no-gradient forward in eval mode (scoring, dev evaluations) must not turn the 4-bit layers
    into inference-only ones: on CPUs with AVX512-BF16 bitsandbytes repacks the weights for a kernel
    without a backward unless routetune switches that off (on other CPUs it never repacks)."""
    from routetune.model.load import load_lm

    lm, _ = load_lm(str(tiny_llama_dir), "auto", "cpu", torch.float32, {"quantize": "nf4"})
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    lm.eval()
    with torch.no_grad():
        lm(input_ids=ids)
    lm.train()
    embeds = lm.get_input_embeddings()(ids).detach().requires_grad_(True)
    lm(inputs_embeds=embeds).logits.sum().backward()
    assert embeds.grad is not None and embeds.grad.abs().sum() > 0
    assert all(not m.support_avx512bf16_for_cpu for m in lm.modules() if hasattr(m, "support_avx512bf16_for_cpu"))


def test_eval_and_serve_quantize_the_base_again(qlora_run):
    from fastapi.testclient import TestClient

    from routetune.model.inference import generate
    from routetune.runs import load_run
    from routetune.serve.server import Limits, create_app

    _, run_dir, _ = qlora_run
    cfg, model, tok = load_run(run_dir)
    assert _four_bit(model) == 14
    offline = generate(model, tok, ["the store of john"], 6, cfg.model.max_length)[0]
    with TestClient(create_app(model, tok, cfg, Limits(max_new_tokens=6), "fp32")) as c:
        r = c.post("/v1/completions", json={"model": "q", "prompt": "the store of john", "max_tokens": 6,
                                            "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"].strip() == offline


def test_the_adapter_loads_in_plain_peft_and_merging_dequantizes(qlora_run, tiny_llama_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from routetune.export import export
    from routetune.runs import load_run

    _, run_dir, _ = qlora_run
    _, ours, _ = load_run(run_dir)
    ids = torch.randint(5, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours.lm(input_ids=ids).logits
    export(run_dir, tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, device_map={"": "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    # bitsandbytes' packed CPU kernel (AVX512-BF16 CPUs) cannot repack this tiny model's 32-wide layers
    from routetune.model.quantize import keep_trainable_layout

    keep_trainable_layout(base)
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter" / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(peft_model(input_ids=ids).logits, expected, atol=1e-4)
    export(run_dir, tmp_path / "merged", merge=True)
    merged_cfg = json.loads((tmp_path / "merged" / "lm" / "config.json").read_text())
    assert "quantization_config" not in merged_cfg
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "lm").eval()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, expected, atol=1e-4)


def test_an_encoder_with_a_task_head_over_an_8_bit_base(tmp_path, tiny_model_dir, ner_files):
    path = make_config(tmp_path, tiny_model_dir, ner_files, **{"model.quantize": "int8", "peft.method": "lora",
                                                                "train.max_steps": 2})
    setup = prepare(load_config(path))
    assert any(isinstance(m, bnb.nn.Linear8bitLt) for m in setup.model.modules())
    assert all(p.dtype == torch.float32 for p in setup.model.heads.parameters())
    trainer = Trainer(setup, tmp_path / "run")
    losses = trainer.train_step(0, setup.batches.next())
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values())


@pytest.mark.parametrize("method", ["full", "bitfit", "ia3", "prompt_tuning", "adapter"])
def test_a_method_that_changes_the_base_is_refused_naming_the_key(tmp_path, tiny_llama_dir, method):
    with pytest.raises(ConfigError, match=rf"^model.quantize: nf4 .* peft.method {method} "):
        prepare(load_config(_decoder_config(tmp_path, tiny_llama_dir, method=method)))


@pytest.mark.parametrize("extra", [
    {"sources": {"general": {"distill": 1.0}}},  # the teacher: this quantized base with the adapters off
    {"train": {"gradient_checkpointing": True}},
    {"routing": {"budget": {"measure": "general-dev", "max_change": 0.05, "every": 2, "blocks": 2}}},
], ids=["distilled", "checkpointing", "budget"])
def test_general_text_distillation_checkpointing_and_a_budget_over_a_4_bit_base(tmp_path, tiny_llama_dir, extra):
    from routetune.workflow import train

    (tmp_path / "d.txt").write_text("the store of john opened in paris and london . " * 60)
    (tmp_path / "g.txt").write_text(GENERAL)
    cfg = {"model": {"name": str(tiny_llama_dir), "max_length": 24, "quantize": "nf4"},
           "sources": {"domain": {"objective": "causal-lm", "train": str(tmp_path / "d.txt"),
                                  "text": {"stream": False}},
                       "general": {"objective": "causal-lm", "train": str(tmp_path / "g.txt"),
                                   "text": {"stream": False}, **extra.get("sources", {}).get("general", {})}},
           "evals": {"general-dev": {"path": str(tmp_path / "g.txt"), "split": "dev"}},
           "routing": {"weights": {"domain": 0.7, "general": 0.3}, "granularity": "example",
                       **extra.get("routing", {})},
           "peft": {"method": "lora", "r": 4},
           "train": {"max_steps": 4, "batch_size": 4, "lr": 2e-2, "precision": "fp32", "device": "cpu",
                     "progress": False, **extra.get("train", {})},
           "run": {"name": "mix", "output_dir": str(tmp_path / "runs")}}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(cfg))
    run_dir, summary = train(tmp_path / "mix.yaml")
    events = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [v["loss"] for e in events if e["event"] == "train" for v in e["sources"].values()
              if v.get("loss") is not None]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    if "routing" in extra:
        assert [e["step"] for e in events if e["event"] == "budget"] == [0, 2, 4]
