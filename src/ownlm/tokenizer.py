"""Tokenizer stage: byte-level BPE trained with HF `tokenizers`, saved as a transformers tokenizer.

Byte-level BPE with no normaliser makes encode→decode exact for every valid Unicode string (the
256 byte symbols are always in the vocabulary). The chat template marks assistant turns with
`{% generation %}` so TRL's `assistant_only_loss` and our own SFT mask can find them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

from pydantic import Field

from ownlm.core.artifacts import artifact_hash, is_up_to_date, require_artifact, sha256_tree, stage_dir
from ownlm.core.config import StrictModel
from ownlm.core.errors import OwnlmError
from ownlm.data.records import iter_jsonl
from ownlm.models.chat_templates import BOS, CHAT_TEMPLATE, END_OF_TURN, EOS, PAD, ROLE_TOKENS, SPECIAL_TOKENS


class TokenizerConfig(StrictModel):
    vocab_size: int = Field(8192, ge=512, le=65535, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Merges seen fewer times than this are not learned.")
    train_max_mb: float = Field(
        20.0, gt=0, description="Text sampled for training, spread evenly over files."
    )
    split_digits: bool = Field(
        True,
        description="Every digit its own token (as Llama and DeepSeek do): small models learn arithmetic "
        "and copy numbers (calculator calls) far more easily than with arbitrary digit chunks.",
    )
    path: str | None = Field(
        None, description="Use this existing tokenizer directory instead of training one."
    )


def _training_text(corpus_dir: Path, max_bytes: int) -> Iterator[str]:
    """An even share of the budget from each corpus file (one file per domain), in file order."""
    files = sorted(Path(corpus_dir).glob("*.jsonl"))
    if not files:
        raise OwnlmError(f"{corpus_dir}: corpus has no .jsonl files")
    share = max_bytes // len(files)
    for f in files:
        used = 0
        for rec in iter_jsonl(f):
            if used >= share:
                break
            used += len(rec["text"].encode("utf-8"))
            yield rec["text"]


def train_tokenizer(corpus_dir: Path, cfg: TokenizerConfig):
    """Train a byte-level BPE and wrap it as a `PreTrainedTokenizerFast` with our specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if cfg.split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    n_chars = 0

    def texts() -> Iterator[str]:
        nonlocal n_chars
        for t in _training_text(corpus_dir, int(cfg.train_max_mb * 1e6)):
            n_chars += len(t)
            yield t

    tok.train_from_iterator(texts(), trainer=trainer)
    if n_chars == 0:
        raise OwnlmError(f"{corpus_dir}: corpus is empty: nothing to train a tokenizer on")
    bos_id = tok.token_to_id(BOS)
    # Like Llama's tokenizers: plain `tokenizer(text)` starts with BOS, as pretraining rows do.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[END_OF_TURN, *ROLE_TOKENS],
        model_max_length=1_000_000,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def load_tokenizer(path: Path | str):
    from transformers import AutoTokenizer

    p = Path(path)
    if not (p / "tokenizer.json").is_file() and not (p / "tokenizer_config.json").is_file():
        raise OwnlmError(f"{p}: no tokenizer.json here")
    return AutoTokenizer.from_pretrained(str(p))


def run_tokenizer(recipe, force: bool = False) -> Path:
    """The `tokenizer` stage: runs/<run>/tokenizer/ (trained, or copied from `tokenizer.path`)."""
    cfg: TokenizerConfig = recipe.tokenizer
    out = recipe.run_dir / "tokenizer"
    from ownlm.data.clean import corpus_dir

    corpus = corpus_dir(recipe)
    if cfg.path:
        src = Path(cfg.path)
        load_tokenizer(src)  # fail early, naming the directory
        inputs = {"tokenizer": sha256_tree(src)}
    else:
        require_artifact(corpus, corpus.name)
        inputs = {"corpus": artifact_hash(corpus)}
    config = cfg.model_dump()
    if not force and is_up_to_date(out, config, inputs):
        return out
    with stage_dir(out, "tokenizer", config, inputs) as w:
        if cfg.path:
            for f in Path(cfg.path).iterdir():
                if f.is_file() and (
                    f.name.startswith("tokenizer")
                    or f.name in {"special_tokens_map.json", "chat_template.jinja"}
                ):
                    shutil.copy2(f, w.tmp / f.name)
            tok = load_tokenizer(w.tmp)
        else:
            tok = train_tokenizer(corpus, cfg)
            tok.save_pretrained(str(w.tmp))
        w.metrics = {"vocab_size": len(tok), "special_tokens": list(tok.all_special_tokens)}
    return out
