"""The multi-process tests' shared setting: a tiny BERT without dropout (so 1 and N processes compute
the same function), the NER and general-text files, a routed config, and launchers."""

import string

import torch
from safetensors.torch import load_file

from routetune.training import checkpoint as ckpt

from . import WORDS, cli_env, forkserver, make_config, write_task_and_general

TOL = 1e-5  # fp32: the all-reduced gradient sums the same terms in another order


def launch(*args, nproc=1, fault=None, check=True):
    proc = forkserver.run("routetune.cli", [*args] + (["--nproc", str(nproc)] if nproc > 1 else []),
                          cli_env(fault, OMP_NUM_THREADS="1"), timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return proc


def build_setting(tmp_path_factory, name="ddp"):
    """A tiny BERT without dropout (so 1 and 2 processes compute the same function), the NER and
    general-text files, and a config routing examples (each step mixes both sources, and some
    steps give a rank no example of a source)."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizer

    root = tmp_path_factory.mktemp(name)
    model = root / "model"
    vocab = (["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(string.ascii_lowercase)
             + ["##" + c for c in string.ascii_lowercase] + list(string.punctuation) + WORDS)
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True).save_pretrained(model)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                               attention_probs_dropout_prob=0.0)).save_pretrained(model)
    files = write_task_and_general(root)
    cfg = make_config(root, model, files, **{"routing.granularity": "example", "train.log_plan": True,
                                             "train.eval_every_steps": 5})
    return root, cfg


def run(setting, name, *sets, nproc=1, fault=None, check=True):
    root, cfg = setting
    args = ["train", str(cfg), "--no-test", "--set", f"run.name={name}"]
    for s in sets:
        args += ["--set", s]
    proc = launch(*args, nproc=nproc, fault=fault, check=check)
    return root / "runs" / name, proc


def weights(run_dir):
    folder = ckpt.step_checkpoints(run_dir / "checkpoints")[-1][1]
    return {**load_file(str(folder / "model.safetensors")), **load_file(str(folder / "heads.safetensors"))}


def close(a, b):
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < TOL, worst
