"""Routed batches over two small labelled sources and a text stream (router and data-parallel tests)."""

import numpy as np

from routetune.data.mixing import Schedule
from routetune.data.plan import RoutedBatches
from routetune.data.readers import Sentence
from routetune.data.router import AdaptiveRouter, IIDRouter, InterleavedRouter
from routetune.data.sources import LabelledSource
from routetune.data.text import TextStream, text_parts


def probs(w):
    w = np.array(w, dtype=float)
    return w / w.sum()


def _labelled(tokenizer, name="ner", n=23):
    sents = [Sentence(["the", "store"] * (i % 3 + 1), ["O", "O"] * (i % 3 + 1), i) for i in range(n)]
    return LabelledSource(name, sents, ["O"], tokenizer, 32, seed=5)


def _batches(tokenizer, text_file, strategy="iid", granularity="batch", rank=0, world=1, on_exhausted="restart"):
    sources = {"ner": _labelled(tokenizer), "aux": _labelled(tokenizer, "aux", 11),
               "general": TextStream("general", text_parts([text_file]), tokenizer, 16, seed=9, shuffle_buffer=8)}
    p = probs([0.5, 0.2, 0.3])
    names = list(sources)
    r = {"iid": IIDRouter, "interleaved": InterleavedRouter}.get(strategy)
    if r is None:
        r = AdaptiveRouter(names, Schedule("constant", p), 11, 100, eta=1.0, floor=0.05, smoothing=0.5, update_every=2)
    else:
        r = r(names, Schedule("constant", p), 11, 100)
    return RoutedBatches(r, sources, 6, granularity, on_exhausted, rank, world)
