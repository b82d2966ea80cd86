"""The command line as a user meets it: help, and one clear error line for each bad input."""

from pathlib import Path

import pytest

from conftest import ownlm


def test_help_lists_every_stage(tmp_path):
    res = ownlm("--help", cwd=tmp_path)
    assert res.returncode == 0
    for stage in ("data", "tokenizer", "pretrain", "run", "sample"):
        assert stage in res.stdout
    assert "fetch-default" in ownlm("data", "--help", cwd=tmp_path).stdout


def _bad_jsonl(p: Path):
    p.write_text('{"id": "1", "text": "fine"}\n[1, 2]\n')


def _bad_utf8(p: Path):
    p.mkdir()
    (p / "good.txt").write_text("some text")
    (p / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))


def _empty(p: Path):
    p.write_text("")


@pytest.mark.parametrize(
    ("name", "make", "expect"),
    [
        ("empty.jsonl", _empty, "corpus is empty"),
        ("notes", _bad_utf8, "latin1.txt: not valid UTF-8"),
        ("lines.jsonl", _bad_jsonl, "lines.jsonl:2: expected a JSON object"),
    ],
)
def test_bad_corpus_gives_one_error_line_and_no_artifact(tmp_path, name, make, expect):
    make(tmp_path / name)
    res = ownlm("data", "build", "--data.sources", f"[{tmp_path / name}]", "--runs_dir", "runs", cwd=tmp_path)
    assert res.returncode != 0
    assert res.stderr.strip().count("\n") == 0, res.stderr
    assert res.stderr.startswith("error: ") and expect in res.stderr
    assert not (tmp_path / "runs" / "tiny" / "data").exists()
    assert (
        not [p for p in (tmp_path / "runs" / "tiny").glob(".*")]
        if (tmp_path / "runs" / "tiny").exists()
        else True
    )


def test_wrong_config_type_names_the_field(tmp_path):
    res = ownlm("pretrain", "--pretrain.max_steps", "lots", cwd=tmp_path)
    assert res.returncode != 0 and res.stderr.count("\n") == 1
    assert "tiny.yaml: field 'pretrain.max_steps'" in res.stderr and "lots" in res.stderr


def test_missing_init_from_path(tmp_path, small_corpus):
    res = ownlm(
        "pretrain",
        "--init-from",
        str(tmp_path / "nowhere"),
        "--data.sources",
        f"[{small_corpus}]",
        cwd=tmp_path,
    )
    assert res.returncode != 0 and res.stderr.count("\n") == 1
    assert "--init-from" in res.stderr and "nowhere" in res.stderr
    assert not (tmp_path / "runs" / "tiny" / "pretrain").exists()


def test_sample_prints_a_continuation(trained_run, tmp_path):
    res = ownlm("sample", str(trained_run.run_dir), "--prompt", "The", "--max-new-tokens", "10", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("The") and len(res.stdout.strip()) > len("The")


def test_serve_safety_options_fail_before_loading_a_model(tmp_path):
    """`ownlm serve --safety FILE` reads the file first: a malformed one is one error line naming
    the file and field; `--safety` with `--no-safety` is refused."""
    bad = tmp_path / "safety.yaml"
    bad.write_text("stream: {mode: sometimes}\n")
    res = ownlm("serve", "smollm2-135m-instruct", "--safety", str(bad), cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
    assert "safety.yaml: field 'stream.mode'" in res.stderr
    res = ownlm("serve", "smollm2-135m-instruct", "--safety", str(bad), "--no-safety", cwd=tmp_path)
    assert res.returncode == 1 and "contradict" in res.stderr
