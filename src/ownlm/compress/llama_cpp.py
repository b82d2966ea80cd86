"""A GGUF export run by llama.cpp itself, for the parity card: the check that counts, since a file
transformers reads can still be one llama.cpp tokenizes or computes differently.

Through llama-cpp-python (`make llama-cpp` builds it from its PyPI sdist: it has no CPU wheel
there). Optional: `ownlm export` adds llama.cpp's card when the package is installed.
"""

from __future__ import annotations

from pathlib import Path

from ownlm.core.errors import OwnlmError


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


class LlamaCppScorer:
    """A `parity.Scorer` on llama.cpp: logits of every position, greedy replies."""

    def __init__(
        self, path: Path, *, n_ctx: int = 512, threads: int | None = None, f32_kv: bool = False
    ) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise OwnlmError("llama.cpp checks need llama-cpp-python: make llama-cpp") from None
        except Exception as e:  # a broken build: libllama fails to load
            raise OwnlmError(f"llama-cpp-python is installed but does not load: {e}") from None
        kv = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_kv else {}
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False, **kv,
            )  # fmt: skip
        except (ValueError, RuntimeError) as e:
            raise OwnlmError(f"{path}: llama.cpp cannot load it: {e}") from None

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's own tokenization (special tokens parsed, no BOS added)."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)

    def _run(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)

    def logits(self, ids: list[int]):
        import torch

        self._run(ids)
        return torch.from_numpy(self.llm.scores[: len(ids)].copy())

    def greedy(self, prompts: list[list[int]], n: int, banned: list[int]) -> list[list[int]]:
        out = []
        for prompt in prompts:
            self._run(prompt)
            reply: list[int] = []
            for _ in range(n):
                row = self.llm.scores[self.llm.n_tokens - 1].copy()
                row[banned] = float("-inf")
                reply.append(int(row.argmax()))
                self.llm.eval(reply[-1:])
            out.append(reply)
        return out

    def close(self) -> None:
        self.llm.close()
