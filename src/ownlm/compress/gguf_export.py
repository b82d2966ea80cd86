"""Write a Llama-architecture HF model as a GGUF file that llama.cpp loads unpatched.

The `gguf` package (llama.cpp's own Python writer) writes the file and quantizes the tensors
(f32, f16, bf16, q8_0, q4_0/q4_1, q5_0/q5_1: the types it can quantize in numpy; the K-quants it
can only read). llama.cpp's `convert_hf_to_gguf.py` is a script in its repository, not in any
package, and refuses a BPE tokenizer whose pre-tokenizer hash it does not list (llama.cpp #8649):
ours is byte-level BPE trained by ownlm. So the conversion is here, and small: metadata, the
tensor names from gguf's `TensorNameMap`, and the one layout change llama.cpp needs (the query
and key rows of each head interleaved for its RoPE; transformers undoes it on load).

Types follow llama.cpp's `llama-quantize`: norms stay f32; in 4- and 5-bit files the output
matrix (the embedding, when tied) keeps more bits (llama.cpp gives it Q6_K, which gguf cannot
write, so Q8_0, llama.cpp's own fallback): all of SmolLM2 in Q4_0 moved its held-out next-token
distributions by a mean KLD of 0.38 (same top token 56%).

The tokenizer goes in whole: every token with its type (special tokens CONTROL, other added
tokens USER_DEFINED), the merges, the special token ids, whether BOS is added, the chat template,
and `tokenizer.ggml.pre`, the name of llama.cpp's pre-tokenizer regexes. We name it from the
tokenizer's own structure rather than hash-matching a vocabulary: byte-level GPT-2 splitting is
`gpt-2`; digits split one by one before it (ownlm's tokenizer, and SmolLM2's) is llama.cpp's
`smollm` set, the same two regexes. Anything else is an error naming tokenizer.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from ownlm.core.errors import OwnlmError

# Our name -> (gguf tensor type, llama.cpp file type).
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")


def _types(fmt: str):
    import gguf

    if fmt not in GGUF_TYPES:
        readable_only = {t.name.lower() for t in gguf.GGMLQuantizationType} - set(GGUF_TYPES)
        why = "gguf can read it but not write it" if fmt in readable_only else "no such GGUF type"
        raise OwnlmError(f"--type {fmt}: {why}; ownlm writes {', '.join(GGUF_TYPES)}")
    q = gguf.GGMLQuantizationType[fmt.upper()]
    ftype = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}.get(fmt, f"MOSTLY_{fmt.upper()}")
    return q, gguf.LlamaFileType[ftype]


def llama_cpp_pre(tokenizer_json: dict, where: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (its regex set), from its structure."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if tokenizer_json.get("normalizer") is None and byte_level is not None:
        plain = byte_level.get("use_regex", True) and not byte_level.get("add_prefix_space", False)
        if plain and kinds == ["ByteLevel"]:
            return "gpt-2"
        if plain and kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
            return "smollm"
    raise OwnlmError(
        f"{where}: pre_tokenizer {json.dumps(pre)[:200]} (normalizer {tokenizer_json.get('normalizer')}) "
        "has no llama.cpp equivalent ownlm knows (byte-level GPT-2 splitting, optionally after "
        "single digits); llama.cpp would split text differently from the model's training"
    )


def check_llama(config, where: Path) -> None:
    """Only what llama.cpp's `llama` architecture computes exactly like transformers."""
    problems = []
    if config.model_type != "llama":
        problems.append(f"model_type {config.model_type!r} (ownlm writes GGUF for llama only)")
    variant = getattr(config, "attention_variant", "dense")
    if variant != "dense":
        problems.append(f"attention_variant {variant!r} (llama.cpp has dense attention only)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope.get('rope_type')!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        problems.append("bias terms in attention or MLP")
    if config.hidden_act != "silu":
        problems.append(f"hidden_act {config.hidden_act!r}")
    if problems:
        raise OwnlmError(f"{where}: cannot be written as GGUF: {'; '.join(problems)}")


def _rope_theta(config) -> float:
    rope = getattr(config, "rope_parameters", None) or {}
    return float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _interleave_heads(w: np.ndarray, n_head: int) -> np.ndarray:
    # transformers rotates the two halves of each head; llama.cpp rotates adjacent pairs.
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _vocab(model_dir: Path, n_vocab: int) -> tuple[list[bytes], list[int], dict]:
    import gguf

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise OwnlmError(f"{model_dir}: no tokenizer.json (GGUF export needs the fast tokenizer)")
    tj = json.loads(path.read_text(encoding="utf-8"))
    model = tj.get("model", {})
    if (
        model.get("type") != "BPE"
        or model.get("byte_fallback")
        or (tj.get("decoder") or {}).get("type") != "ByteLevel"
    ):
        raise OwnlmError(f"{path}: GGUF export handles byte-level BPE tokenizers only")
    by_id = {i: t for t, i in model["vocab"].items()}
    added = {a["id"]: a for a in tj.get("added_tokens", [])}
    by_id |= {i: a["content"] for i, a in added.items()}
    if max(by_id) >= n_vocab:
        raise OwnlmError(f"{path}: token id {max(by_id)} is past the model's {n_vocab} embeddings")
    tokens, types = [], []
    for i in range(n_vocab):  # rows the tokenizer never produces are written as unused
        if i not in by_id:
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
            continue
        tokens.append(by_id[i].encode("utf-8"))
        a = added.get(i)
        types.append(
            gguf.TokenType.NORMAL if a is None
            else gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED
        )  # fmt: skip
    return tokens, [int(t) for t in types], tj


def write_gguf(model_dir: Path, out_file: Path, fmt: str, *, name: str | None = None) -> dict:
    """Write `model_dir` (an HF llama directory) to `out_file`; return what each tensor became.
    Every tensor is read back through gguf's reader and compared byte for byte."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ownlm.models import load_model

    qtype, ftype = _types(fmt)
    config = AutoConfig.from_pretrained(str(model_dir))
    check_llama(config, model_dir)
    tokens, types, tj = _vocab(model_dir, config.vocab_size)
    pre = llama_cpp_pre(tj, model_dir / "tokenizer.json")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head

    w = gguf.GGUFWriter(str(out_file), arch="llama")
    w.add_name(name or model_dir.name)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(_rope_theta(config))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(int(ftype))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=config.vocab_size)
    if not special.merges:
        raise OwnlmError(f"{model_dir / 'tokenizer.json'}: no BPE merges found; llama.cpp could not tokenize")
    # The ids from the tokenizer itself, not from whatever files SpecialVocab happened to parse; the
    # end of a turn (the stop ids of generation_config beyond EOS) as llama.cpp's `eot`.
    ids = {"bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id, "unk": tok.unk_token_id}
    special.special_token_ids = {k: v for k, v in ids.items() if v is not None}
    try:
        stops = GenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except OSError:  # no generation_config.json
        stops = config.eos_token_id
    stops = [stops] if isinstance(stops, int) else list(stops or [])
    eot = [i for i in stops if i != tok.eos_token_id]
    if eot:
        special.special_token_ids["eot"] = eot[0]
    probe = tok("a")["input_ids"]
    special.add_special_token = {"bos": bool(probe) and probe[0] == tok.bos_token_id, "eos": False}
    special.chat_template = tok.chat_template
    special.add_to_gguf(w, quiet=True)

    model = load_model(model_dir, dtype=torch.float32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    # The matrix that makes the logits: output.weight, or the embedding when they are tied.
    output = "token_embd.weight" if config.tie_word_embeddings else "output.weight"
    written: dict[str, dict] = {}
    expected: dict[str, bytes] = {}  # sha256 of each tensor's bytes: copies would double the memory
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp uses token_embd when there is no output.weight
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise OwnlmError(f"{model_dir}: tensor {hf_name} has no GGUF name")
        data = t.detach().float().numpy()
        if hf_name.endswith("q_proj.weight"):
            data = _interleave_heads(data, n_head)
        elif hf_name.endswith("k_proj.weight"):
            data = _interleave_heads(data, n_kv)
        tq = qtype
        if gname == output and fmt[1] in "45":
            tq = gguf.GGMLQuantizationType.Q8_0  # llama.cpp's own rule: the output matrix keeps more bits
        block = gguf.GGML_QUANT_SIZES[tq][0]
        if data.ndim < 2:
            tq = gguf.GGMLQuantizationType.F32  # norms stay f32, as in llama.cpp's own conversion
        elif data.shape[-1] % block:
            tq = gguf.GGMLQuantizationType.F16  # rows that do not divide into blocks
        q = gguf.quants.quantize(np.ascontiguousarray(data), tq)
        w.add_tensor(gname, q, raw_dtype=tq)
        written[gname] = {"type": tq.name, "shape": list(data.shape)}
        expected[gname] = hashlib.sha256(np.ascontiguousarray(q)).digest()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    reader = gguf.GGUFReader(str(out_file))
    got = {t.name: t for t in reader.tensors}
    if set(got) != set(expected):
        raise OwnlmError(f"{out_file}: read back {len(got)} tensors, wrote {len(expected)}")
    for gname, raw in expected.items():
        if hashlib.sha256(np.ascontiguousarray(got[gname].data)).digest() != raw:
            raise OwnlmError(f"{out_file}: tensor {gname} reads back different from what was written")
    return {"tensors": written, "tokenizer_pre": pre, "read_back": "identical"}
