"""`prompt_tuning` and `prefix_tuning`: peft's virtual-token modules, wired into routetune's
shared backbone by modules.py beside this file; the whole backbone is frozen. Checkpoints are peft's format.
Virtual tokens cannot be merged into weights; prefix tuning cannot generate (its virtual
keys/values would have to be threaded through transformers' generation cache)."""

from __future__ import annotations

import torch

from routetune.model.methods.base import PeftFormat
from routetune.model.methods.prompts.modules import peft_prompt_config, prefix_cache, virtual_tokens


class VirtualTokens(PeftFormat):
    options = ("num_virtual_tokens", "seed", "train_lm_head")

    def apply(self, model, pcfg, base_path: str) -> None:
        config = peft_prompt_config(self.name, pcfg.num_virtual_tokens, model.config, model.is_decoder, base_path)
        model.attach_prompt(config, torch.Generator().manual_seed(pcfg.seed))
        model.adapter_config = config

    def attach(self, model, config) -> None:
        model.attach_prompt(config)

    def trains(self, name: str) -> bool:
        return False  # only the virtual tokens (model.prompt) and the heads train


class PromptTuning(VirtualTokens):
    name = "prompt_tuning"

    def virtual_inputs(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[dict, int]:
        """The virtual tokens' embeddings before the inputs'; their outputs are dropped."""
        b, n = input_ids.shape[0], model.n_virtual
        mask = model.backbone_mask(torch.cat([attention_mask.new_ones(b, n), attention_mask], 1))
        embeds = model.lm.get_input_embeddings()(input_ids)
        virtual = virtual_tokens(model.prompt, n, b).to(embeds.dtype)
        return {"inputs_embeds": torch.cat([virtual, embeds], 1), "attention_mask": mask}, n
    merge_refusal = ("prompt_tuning adds virtual tokens, which cannot be merged into the weights; export without "
                     "--merge (a peft adapter folder)")


class PrefixTuning(VirtualTokens):
    name = "prefix_tuning"

    def virtual_inputs(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[dict, int]:
        """The virtual keys and values come from the cache, not the inputs: no output to drop."""
        b, n = input_ids.shape[0], model.n_virtual
        mask = model.backbone_mask(torch.cat([attention_mask.new_ones(b, n), attention_mask], 1), input_ids.shape[1])
        return {"input_ids": input_ids, "attention_mask": mask,
                model._cache_kwarg: prefix_cache(model.prompt, model.config, n, b), "use_cache": False}, 0
    merge_refusal = ("prefix_tuning adds virtual tokens, which cannot be merged into the weights; export without "
                     "--merge (a peft adapter folder)")
    generate_refusal = ("generation with prefix tuning is not supported (its virtual keys/values would have to be "
                        "threaded through transformers' generation cache); use prompt_tuning or lora")


PROMPT_TUNING, PREFIX_TUNING = PromptTuning(), PrefixTuning()
