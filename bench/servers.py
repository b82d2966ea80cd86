"""Server processes for the serving benchmarks: start one, wait until it answers, freeze it while
another is measured, stop it; and what it used while measured (peak RSS, CPU by process and thread)."""

import contextlib
import os
import subprocess
import threading
import time
from pathlib import Path


class Proc:
    def __init__(self, name: str, cmd: list[str], port: int, log: Path, env: dict | None = None):
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "OWNLM_QUIET": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"} | (
            env or {}
        )
        self.log = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} did not become healthy in {timeout} s")

    def _tree(self):
        import psutil

        root = psutil.Process(self.proc.pid)
        return [root, *root.children(recursive=True)]

    def pause(self) -> None:
        """Freeze the server (SIGSTOP) while another system is measured: an idle vLLM worker polls
        at ~10% of a core, which would slow the others on a 2-core machine."""
        for p in self._tree():
            p.suspend()

    def resume(self) -> None:
        for p in self._tree():
            p.resume()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.resume()
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class ServerUsage:
    """Peak RSS (MB) of a process and its children, sampled in a thread, and the CPU they used
    (cores: CPU seconds over wall seconds) by process and by thread: beside the load generator's
    share, it shows whether a 2-core machine ran out of cores, and which thread took them."""

    def __init__(self, pid: int):
        import psutil

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.cpu_share = 0.0
        self.process_cpu_shares: list[float] = []  # the server's own process first
        self.thread_cpu_shares: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _tree(self) -> list:
        return [self.proc, *self.proc.children(recursive=True)]

    def _sample(self) -> None:
        import psutil

        with contextlib.suppress(psutil.Error):
            self.peak = max(self.peak, sum(p.memory_info().rss for p in self._tree()))

    def _cpu(self) -> tuple[dict[int, float], dict[tuple[int, int], float]]:
        """CPU seconds by process and by thread, over the tree."""
        import psutil

        procs, threads = {}, {}
        for p in self._tree():
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                procs[p.pid] = t.user + t.system
                threads |= {(p.pid, x.id): x.user_time + x.system_time for x in p.threads()}
        return procs, threads

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> "ServerUsage":
        self._sample()
        self._cpu0, self._wall0 = self._cpu(), time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        wall = time.perf_counter() - self._wall0
        (procs0, threads0), (procs1, threads1) = self._cpu0, self._cpu()

        def shares(before: dict, after: dict) -> list[float]:
            used = [(t - before.get(k, 0.0)) / wall for k, t in after.items()]
            return sorted((round(u, 3) for u in used if u >= 0.01), reverse=True)

        self.process_cpu_shares = [round((procs1[p] - procs0.get(p, 0.0)) / wall, 3) for p in procs1]
        self.cpu_share = sum(self.process_cpu_shares)
        self.thread_cpu_shares = shares(threads0, threads1)

    @property
    def mb(self) -> float:
        return self.peak / 2**20


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
