import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ownlm.core.errors import OwnlmError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, small_corpus):
    from conftest import prepare_corpus, tiny_recipe
    from ownlm.tokenizer import load_tokenizer, run_tokenizer

    recipe = tiny_recipe(tmp_path_factory.mktemp("runs"), small_corpus)
    prepare_corpus(recipe)
    return load_tokenizer(run_tokenizer(recipe))


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_encode_decode_is_exact_on_any_unicode(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "text",
    [
        "emoji 👩‍👩‍👧‍👦 🇫🇷 ✨",
        "中文字符和日本語のテキスト、한국어",
        "e\u0301 a\u0308 combining",
        "ctrl \x00\x01\x1b[31m\r\n\t\x7f",
        "  leading and trailing spaces  ",
        "<|end|> looks special",
        "\ufeffBOM and \u200bzero width",
    ],
)
def test_encode_decode_edge_cases(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id


def test_saved_files_load_with_auto_tokenizer(tokenizer, tmp_path):
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert len(again) == len(tokenizer) <= 512
    assert again("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    for t in ("<|bos|>", "<|eos|>", "<|pad|>", "<|user|>", "<|assistant|>", "<|end|>"):
        assert t in again.all_special_tokens


def test_chat_template_marks_assistant_tokens(tokenizer):
    chat = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello there"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    out = tokenizer.apply_chat_template(
        chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = out["input_ids"], out["assistant_masks"]
    kept = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    assert kept == "Hello there<|end|>Goodbye<|end|>"
    text = tokenizer.apply_chat_template(chat[:2], tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>Be brief.<|end|><|user|>Hi<|end|><|assistant|>"
    with pytest.raises(Exception, match="unknown chat role"):
        tokenizer.apply_chat_template([{"role": "wizard", "content": "x"}], tokenize=False)


def test_existing_tokenizer_can_be_swapped_in(tokenizer, tmp_path, small_corpus):
    from conftest import prepare_corpus, tiny_recipe
    from ownlm.tokenizer import load_tokenizer, run_tokenizer

    src = tmp_path / "bigger"
    tokenizer.save_pretrained(src)
    recipe = tiny_recipe(tmp_path / "runs", small_corpus, tokenizer={"path": str(src)})
    prepare_corpus(recipe)
    swapped = load_tokenizer(run_tokenizer(recipe))
    assert swapped.get_vocab() == tokenizer.get_vocab()
    with pytest.raises(OwnlmError, match="no tokenizer.json"):
        run_tokenizer(tiny_recipe(tmp_path / "runs2", small_corpus, tokenizer={"path": str(tmp_path)}))


def test_digits_are_single_tokens_and_text_round_trips(tmp_path):
    import json

    from ownlm.tokenizer import TokenizerConfig, train_tokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [
        {"id": str(i), "text": f"In {1990 + i} we sold {i * 1234} apples for {i * 77} pounds."}
        for i in range(300)
    ]
    (corpus / "a.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    text = "What is 4821 * 37? 178377."
    for split, expect_single in ((True, True), (False, False)):
        tok = train_tokenizer(corpus, TokenizerConfig(vocab_size=600, split_digits=split))
        pieces = tok.convert_ids_to_tokens(tok(text, add_special_tokens=False)["input_ids"])
        digit_pieces = [p for p in pieces if any(c.isdigit() for c in p)]
        assert all(len(p.lstrip("Ġ")) == 1 for p in digit_pieces) is expect_single
        assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
