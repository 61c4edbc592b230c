"""Tokenizer directories as each family ships them, built from trained BPEs: GPT-2 vocab + merges files (and
transformers' GPT-2 tokenizer reading them, the oracle), SentencePiece-converted (Llama 2 / Mistral), Qwen2 and
Llama 3 byte-level BPE with their chat templates and generation_config.json EOS lists."""

import json
import os

import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, processors, trainers

from aigc_jax import tokenizers as tok

from .hf_models import transformers_or_skip
from .text import CORPUS, EOT, LLAMA3, MISTRAL, QWEN2


def write_bpe_files(directory, vocab_size=400, gpt2_layout=True, names=("vocab.json", "merges.txt")):
    """Trains a byte-level BPE and writes it as vocab + merges files; returns the directory.

    gpt2_layout: renumber so <|endoftext|> is the last id, as in OpenAI's GPT-2 (training puts it first).
    """
    trained = tok.train_bpe(CORPUS, vocab_size, min_frequency=1)
    os.makedirs(directory, exist_ok=True)
    trained.hf.model.save(str(directory))
    vocab_path, merges_path = (os.path.join(directory, n) for n in names)
    with open(os.path.join(directory, "vocab.json")) as f:
        vocab = json.load(f)
    if gpt2_layout:
        order = sorted((t for t in vocab if t != EOT), key=vocab.get) + [EOT]
        vocab = {t: i for i, t in enumerate(order)}
    os.remove(os.path.join(directory, "vocab.json"))
    with open(vocab_path, "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    if merges_path != os.path.join(directory, "merges.txt"):
        os.replace(os.path.join(directory, "merges.txt"), merges_path)
    return directory


def hf_gpt2_tokenizer(bpe_dir):
    """The oracle: transformers' GPT-2 tokenizer reading vocab.json + merges.txt from `bpe_dir`.

    (In transformers 5, `GPT2TokenizerFast(vocab_file=..., merges_file=...)` silently ignores both files and
    builds an empty vocabulary; `from_pretrained(dir)` reads them.)
    """
    transformers = pytest.importorskip("transformers")
    oracle = transformers.GPT2TokenizerFast.from_pretrained(str(bpe_dir))
    with open(os.path.join(bpe_dir, "vocab.json")) as f:
        vocab = json.load(f)
    assert oracle.convert_tokens_to_ids(list(vocab)) == list(vocab.values())  # it really read the file
    return oracle


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")


def _trained_bpe(pre_tokenizer, specials, vocab_size=400, **kwargs):
    hf_tok = tokenizers.Tokenizer(models.BPE(**kwargs))
    hf_tok.pre_tokenizer = pre_tokenizer
    alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre_tokenizer, pre_tokenizers.Sequence) else []
    hf_tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                                           initial_alphabet=alphabet, show_progress=False))
    model = json.loads(hf_tok.to_str())["model"]
    return hf_tok, model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]


def sentencepiece_style(directory):
    """Llama 2 / Mistral: transformers' own LlamaTokenizer (Metaspace, byte fallback, BOS added) on a trained BPE."""
    transformers = transformers_or_skip()
    _, vocab, merges = _trained_bpe(pre_tokenizers.Metaspace(), ["<unk>", "<s>", "</s>"])
    for b in range(256):  # SentencePiece's byte-fallback pieces
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    t = transformers.LlamaTokenizer(vocab=vocab, merges=merges, chat_template=MISTRAL, add_bos_token=True)
    t.save_pretrained(str(directory))
    return t


def sentencepiece_file_style(directory, legacy=True):
    """A Llama 2 / Mistral directory as transformers 4.x's converter wrote it: tokenizer.json with a Prepend("▁")
    normalizer and no pre-tokenizer, tokenizer_config.json naming LlamaTokenizer (which transformers 5 rebuilds
    around the file's vocabulary: the oracle is what AutoTokenizer makes of the directory)."""
    from tokenizers import decoders, normalizers

    transformers_or_skip()
    _, vocab, merges = _trained_bpe(pre_tokenizers.Metaspace(), ["<unk>", "<s>", "</s>"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    hf_tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True,
                                             unk_token="<unk>"))
    hf_tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    hf_tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                        decoders.Strip(" ", 1, 0)])
    hf_tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf_tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                          special_tokens=[("<s>", 1)])
    hf_tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": legacy, "chat_template": MISTRAL}))


def qwen2_style(directory):
    """Qwen2: transformers' Qwen2Tokenizer (byte-level BPE, NFC, no BOS) with <|im_start|>/<|im_end|>."""
    transformers = transformers_or_skip()
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    _, vocab, merges = _trained_bpe(split, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    t = transformers.Qwen2Tokenizer(vocab=vocab, merges=merges, chat_template=QWEN2)
    t.save_pretrained(str(directory))
    with open(directory / "generation_config.json", "w") as f:  # Qwen2.5-Instruct stops at either
        json.dump({"eos_token_id": [t.convert_tokens_to_ids("<|im_end|>"), t.eos_token_id]}, f)
    return t


def llama3_style(directory):
    """Llama 3: a PreTrainedTokenizerFast over a tokenizer.json whose post-processor adds <|begin_of_text|>; the
    Instruct models stop at <|eot_id|> as well as <|end_of_text|> (generation_config.json)."""
    transformers = transformers_or_skip()
    split = pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), "isolated"),
                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf_tok, _, _ = _trained_bpe(split, LLAMA3_SPECIALS)
    hf_tok.decoder = tokenizers.decoders.ByteLevel()
    bos = hf_tok.token_to_id("<|begin_of_text|>")
    hf_tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B",
                                                          special_tokens=[("<|begin_of_text|>", bos)])
    t = transformers.PreTrainedTokenizerFast(tokenizer_object=hf_tok, bos_token="<|begin_of_text|>",
                                             eos_token="<|end_of_text|>", chat_template=LLAMA3)
    t.save_pretrained(str(directory))
    ids = [hf_tok.token_to_id(s) for s in ("<|end_of_text|>", "<|eot_id|>")]
    with open(directory / "generation_config.json", "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": ids}, f)
    return t
