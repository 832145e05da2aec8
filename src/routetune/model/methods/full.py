"""`full` (also written `none`): full fine-tuning. Every backbone parameter may train; the `freeze` strategies
(embeddings, top k layers, heads only) decide which do. Checkpoints are plain model folders."""

from routetune.model.methods.base import Method


class FullFineTuning(Method):
    name = "full"
    freezable = True


METHOD = FullFineTuning()
