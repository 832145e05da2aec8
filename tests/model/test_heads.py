"""Reference tests: our heads on the shared backbone give the same loss as plain transformers."""

import torch
from transformers import BertForMaskedLM, BertForTokenClassification

from routetune.model.routed import RoutedModel, build_model


def _batch(vocab, labels_max=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    ids[1, 9:] = 0
    if labels_max is None:
        labels = torch.full_like(ids, -100)
        labels[:, 2:6] = ids[:, 2:6]
    else:
        labels = torch.randint(0, labels_max, ids.shape, generator=g)
        labels[mask == 0] = -100
        labels[:, 0] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_token_classification_loss_matches_transformers(tiny_model_dir):
    model = build_model(str(tiny_model_dir), seed=0)
    head = model.add_token_head("ner", ["O", "B-x", "I-x"], seed=3)
    model.eval()
    ref = BertForTokenClassification.from_pretrained(tiny_model_dir, num_labels=3).eval()
    ref.classifier.load_state_dict(head.classifier.state_dict())
    batch = _batch(model.config.vocab_size, labels_max=3)
    ours = model.loss("ner", "token-classification", batch)
    theirs = ref(**batch).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_masked_lm_loss_matches_transformers(tiny_model_dir):
    model = build_model(str(tiny_model_dir), seed=0).eval()
    ref = BertForMaskedLM.from_pretrained(tiny_model_dir).eval()
    batch = _batch(model.config.vocab_size)
    ours = model.loss("general", "masked-lm", batch)
    theirs = ref(**batch).loss
    assert abs(ours.item() - theirs.item()) < 1e-5


def test_save_load_round_trip(tiny_model_dir, tmp_path):
    model = build_model(str(tiny_model_dir), seed=0)
    model.add_token_head("ner", ["O", "B-x", "I-x"], seed=3)
    model.eval()
    model.save(tmp_path / "ckpt")
    loaded = RoutedModel.load(tmp_path / "ckpt").eval()
    batch = _batch(model.config.vocab_size, labels_max=3)
    a = model.token_logits("ner", batch["input_ids"], batch["attention_mask"])
    b = loaded.token_logits("ner", batch["input_ids"], batch["attention_mask"])
    assert torch.equal(a, b) and loaded.heads["ner"].labels == ["O", "B-x", "I-x"]
    # the backbone + LM head folder loads with plain transformers
    plain = BertForMaskedLM.from_pretrained(tmp_path / "ckpt")
    assert torch.equal(plain.bert.embeddings.word_embeddings.weight, model.lm.bert.embeddings.word_embeddings.weight)
