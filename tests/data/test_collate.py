import torch

from routetune.data.collate import IGNORE, encode_words, mask_tokens, pad_batch


def test_first_subtoken_carries_label(tiny_tokenizer):
    words = [["John", "opened", "xyzzyplugh", "in", "Paris"]]
    enc = encode_words(tiny_tokenizer, words, max_length=64, tag_ids=[[1, 0, 2, 0, 3]])[0]
    toks = tiny_tokenizer.convert_ids_to_tokens(enc.input_ids)
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]"
    labelled = [(toks[i], lab) for i, lab in enumerate(enc.labels) if lab != IGNORE]
    assert [lab for _, lab in labelled] == [1, 0, 2, 0, 3]
    assert labelled[2][0] == "x"  # first piece of a word split into many pieces
    assert sum(1 for t in toks if t.startswith("##")) >= 9  # the long word really was split
    assert enc.n_truncated == 0 and enc.n_empty == 0


def test_round_trip_words_in_equal_words_out(tiny_tokenizer):
    sents = [["a"] * 5, ["supercalifragilistic", "word"], ["the"] * 100]
    encoded = encode_words(tiny_tokenizer, sents, max_length=16)
    for words, enc in zip(sents, encoded):
        assert len(enc.first_token) == len(words)
        assert len(enc.input_ids) <= 16
    # the 100-word sentence keeps 14 words (16 minus [CLS] and [SEP]) and counts 86 as truncated
    assert encoded[2].n_truncated == 86 and encoded[2].first_token[13] == 14 and encoded[2].first_token[14] == -1
    # a 20-piece word is cut too: only its first 14 pieces fit, the next word is truncated
    assert encoded[1].n_truncated == 1 and encoded[1].first_token == [1, -1]


def test_pad_batch_is_dynamic():
    b = pad_batch([[1, 2, 3], [4]], pad_id=0, labels=[[5, 6, 7], [8]])
    assert b["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert b["labels"].tolist() == [[5, 6, 7], [8, IGNORE, IGNORE]]


def test_mlm_masking_statistics():
    torch.manual_seed(0)
    ids = torch.randint(10, 1000, (64, 512))
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    special[:, 400:] = True  # padding
    inputs, labels = mask_tokens(ids, special, 0.15, mask_id=3, vocab_size=1000,
                                 generator=torch.Generator().manual_seed(1))
    selected = labels != IGNORE
    n = (~special).sum().item()
    assert abs(selected.sum().item() / n - 0.15) < 0.01
    assert not selected[special].any()
    assert torch.equal(labels[selected], ids[selected])
    masked = (inputs == 3) & selected
    kept = (inputs == ids) & selected
    share_masked = masked.sum().item() / selected.sum().item()
    share_kept = kept.sum().item() / selected.sum().item()
    assert abs(share_masked - 0.8) < 0.02
    assert abs(share_kept - 0.1) < 0.02  # a random replacement equal to the original is rare
    assert torch.equal(inputs[~selected], ids[~selected])


def test_mlm_masking_is_seeded():
    ids = torch.randint(10, 1000, (4, 64))
    special = torch.zeros_like(ids, dtype=torch.bool)
    a = mask_tokens(ids, special, 0.15, 3, 1000, torch.Generator().manual_seed(5))
    b = mask_tokens(ids, special, 0.15, 3, 1000, torch.Generator().manual_seed(5))
    c = mask_tokens(ids, special, 0.15, 3, 1000, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
