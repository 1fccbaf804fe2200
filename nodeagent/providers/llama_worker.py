"""The worker process that holds a `llama_cpp.Llama` for the embedded provider.

Run as ``python -m nodeagent.providers.llama_worker FD`` where FD is one end of
a socketpair. The parent (`nodeagent.providers.llama_cpp_python`) speaks
frames over it: a 4-byte big-endian length, then a UTF-8 JSON object.

A request is ``{"op": ..., **args}``. The answer is ``{"ok": true, "result":
{...}}`` or ``{"ok": false, "error": {"type": ..., "message": ...}}``; a
streaming ``generate`` first sends ``{"event": "delta", "text": ...}`` frames.
While generating the worker polls for ``{"op": "cancel"}`` between tokens.

Why a separate process: llama.cpp aborts the whole process on some errors and
the kernel OOM-killer takes the process it picks; either way only this worker
dies and the parent reports `ProviderCrashed`.

llama.cpp's log goes through a callback: the ``buffer size`` lines (what
llama.cpp really allocated) are kept for the memory-fit check, warnings and
errors are kept for error messages, debug chatter is dropped.
"""

from __future__ import annotations

import codecs
import ctypes
import hashlib
import json
import os
import re
import select
import socket
import struct
import sys
import time
from typing import Any, Callable

FRAME = struct.Struct(">I")
MAX_FRAME = 64 << 20
STATE_MAGIC = b"AMSTATE1"
STATE_HEADER = struct.Struct(">I")

_BUFFER_RE = re.compile(r"(\S+)\s+(model|KV|compute|output|RS)\s+buffer size\s*=\s*([\d.]+)\s*MiB")


class WorkerError(Exception):
    type_name = "ProviderError"


class StateCorruptError(WorkerError):
    type_name = "StateCorrupt"


# ------------------------------------------------------------------ framing
def send_frame(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    sock.sendall(FRAME.pack(len(data)) + data)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise EOFError("peer closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_frame(sock: socket.socket) -> Any:
    (length,) = FRAME.unpack(recv_exact(sock, FRAME.size))
    if length > MAX_FRAME:
        raise ValueError(f"frame of {length} bytes exceeds the {MAX_FRAME}-byte limit")
    return json.loads(recv_exact(sock, length))


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# ------------------------------------------------------------------ llama.cpp log
class LlamaLog:
    def __init__(self) -> None:
        self.buffers: dict[str, float] = {}  # "CPU KV" -> MiB (summed over repeats)
        self.messages: list[str] = []  # recent warnings and errors
        self._line = ""
        self._level = 0

    def install(self, llama_cpp: Any) -> None:
        @llama_cpp.llama_log_callback
        def callback(level: int, text: bytes, user_data: Any) -> None:
            try:
                self.feed(level, text.decode("utf-8", "replace"))
            except Exception:  # a log callback must never raise into C
                pass

        self._callback = callback  # keep the ctypes thunk alive
        llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))

    def feed(self, level: int, text: str) -> None:
        if level != 5:  # 5 = continuation of the previous line
            self._level = level
        self._line += text
        while "\n" in self._line:
            line, self._line = self._line.split("\n", 1)
            self._handle(self._level, line)

    def _handle(self, level: int, line: str) -> None:
        match = _BUFFER_RE.search(line)
        if match and "~" not in line:  # skip the destructor's "matches expectation" echo
            key = f"{match.group(1)} {match.group(2)}"
            self.buffers[key] = self.buffers.get(key, 0.0) + float(match.group(3))
        elif level in (2, 3):  # WARN, ERROR
            self.messages = (self.messages + [line.strip()])[-20:]

    def reset(self) -> None:
        self.buffers = {}
        self.messages = []


# ------------------------------------------------------------------ the worker
class Worker:
    def __init__(self, sock: socket.socket) -> None:
        import llama_cpp

        self.sock = sock
        self.llama_cpp = llama_cpp
        self.log = LlamaLog()
        self.log.install(llama_cpp)
        self.llm: Any = None
        self.identity: str | None = None
        self.options: dict[str, Any] = {}
        self.rss_baseline = rss_bytes()

    # ---- plumbing
    def serve(self) -> None:
        while True:
            try:
                request = recv_frame(self.sock)
            except EOFError:
                return
            op = request.pop("op", None)
            if op == "cancel":
                continue  # a cancel that arrived after its generation ended
            if op == "exit":
                send_frame(self.sock, {"ok": True, "result": {}})
                return
            handler: Callable[..., Any] | None = getattr(self, f"op_{op}", None)
            try:
                if handler is None:
                    raise WorkerError(f"unknown operation {op!r}")
                result = handler(**request)
                send_frame(self.sock, {"ok": True, "result": result})
            except WorkerError as exc:
                send_frame(self.sock, {"ok": False, "error": {"type": exc.type_name, "message": str(exc)}})
            except Exception as exc:  # report, keep serving
                detail = f"{type(exc).__name__}: {exc}"
                if self.log.messages:
                    detail += f" (llama.cpp: {self.log.messages[-1]})"
                send_frame(self.sock, {"ok": False, "error": {"type": "ProviderError", "message": detail}})

    def _need_model(self) -> Any:
        if self.llm is None:
            raise WorkerError("no model loaded")
        return self.llm

    # ---- lifecycle
    def op_ping(self) -> dict:
        return {"pid": os.getpid(), "loaded": self.llm is not None}

    def op_load(self, model_path: str, identity: str, n_ctx: int = 2048, n_threads: int | None = None,
                n_batch: int = 512, n_ubatch: int = 512, n_gpu_layers: int = 0, use_mmap: bool = True,
                kv_type: str = "f16", flash_attn: bool = False, seed: int = 0, vocab_only: bool = False) -> dict:
        if self.llm is not None:
            self.op_unload()
        if not os.path.isfile(model_path):
            raise WorkerError(f"model file {model_path} does not exist")
        ggml_types = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q5_0": 6, "q5_1": 7, "q8_0": 8, "bf16": 30}
        if kv_type not in ggml_types:
            raise WorkerError(f"unknown KV cache type {kv_type!r}")
        self.log.reset()
        rss_before = rss_bytes()
        start = time.perf_counter()
        try:
            self.llm = self.llama_cpp.Llama(
                model_path=model_path, n_ctx=n_ctx, n_threads=n_threads, n_threads_batch=n_threads,
                n_batch=n_batch, n_ubatch=n_ubatch, n_gpu_layers=n_gpu_layers, use_mmap=use_mmap,
                type_k=ggml_types[kv_type], type_v=ggml_types[kv_type], flash_attn=flash_attn,
                seed=seed, vocab_only=vocab_only, verbose=False,
            )
        except Exception as exc:
            why = self.log.messages[-1] if self.log.messages else str(exc)
            raise WorkerError(f"llama.cpp could not load {model_path}: {why}") from None
        load_s = time.perf_counter() - start
        self.identity = identity
        self.options = {"n_ctx": self.llm.n_ctx(), "seed": seed}
        template = self.llm.metadata.get("tokenizer.chat_template")
        return {
            "n_ctx": self.llm.n_ctx(), "n_vocab": self.llm.n_vocab(), "load_s": load_s,
            "rss_before": rss_before, "rss_after": rss_bytes(), "buffers_mib": dict(self.log.buffers),
            "has_chat_template": template is not None, "pid": os.getpid(),
        }

    def op_unload(self) -> dict:
        if self.llm is not None:
            self.llm.close()
            self.llm = None
            self.identity = None
        import gc

        gc.collect()
        return {"rss": rss_bytes()}

    def op_stats(self) -> dict:
        perf = None
        if self.llm is not None:
            self.llama_cpp.llama_synchronize(self.llm.ctx)  # counters of a queued decode land on sync
            data = self.llama_cpp.llama_perf_context(self.llm.ctx)
            perf = {"n_p_eval": data.n_p_eval, "n_eval": data.n_eval,
                    "t_p_eval_ms": data.t_p_eval_ms, "t_eval_ms": data.t_eval_ms}
        return {"rss": rss_bytes(), "rss_baseline": self.rss_baseline, "buffers_mib": dict(self.log.buffers),
                "perf": perf, "n_tokens": self.llm.n_tokens if self.llm is not None else 0}

    # ---- tokens
    def op_tokenize(self, text: str, add_bos: bool = True, special: bool = False) -> dict:
        return {"tokens": self._need_model().tokenize(text.encode(), add_bos=add_bos, special=special)}

    def op_detokenize(self, tokens: list[int]) -> dict:
        return {"text": self._need_model().detokenize(tokens).decode("utf-8", "replace")}

    def op_context_tokens(self) -> dict:
        llm = self._need_model()
        return {"tokens": [int(t) for t in llm.input_ids[: llm.n_tokens]]}

    def op_chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> dict:
        from llama_cpp import llama_chat_format

        llm = self._need_model()
        template = llm.metadata.get("tokenizer.chat_template")
        if template:
            eos = llm._model.token_get_text(llm.token_eos())
            bos = llm._model.token_get_text(llm.token_bos())
            formatter = llama_chat_format.Jinja2ChatFormatter(
                template=template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt)
            response = formatter(messages=messages)
        else:
            response = llama_chat_format.format_llama2(messages=messages)
        stop = response.stop
        return {"prompt": response.prompt, "stop": [stop] if isinstance(stop, str) else list(stop or [])}

    # ---- generation
    def op_generate(self, prompt_tokens: list[int] | None = None, prompt_text: str | None = None,
                    max_tokens: int = 64, temperature: float = 0.0, seed: int | None = None,
                    stop: list[str] | None = None, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                    repeat_penalty: float = 1.0, frequency_penalty: float = 0.0, presence_penalty: float = 0.0,
                    logit_bias: dict[str, float] | None = None, grammar: str | None = None,
                    stream: bool = False, reuse_limit: int | None = None) -> dict:
        llm = self._need_model()
        start = time.perf_counter()
        if prompt_tokens is None:
            if prompt_text is None:
                raise WorkerError("give prompt_tokens or prompt_text")
            prompt_tokens = llm.tokenize(prompt_text.encode(), add_bos=True, special=True)
        tokens = [int(t) for t in prompt_tokens]
        n_ctx = llm.n_ctx()
        if not tokens:
            raise WorkerError("the prompt is empty")
        if len(tokens) >= n_ctx and max_tokens > 0 or len(tokens) > n_ctx:
            raise WorkerError(f"the prompt has {len(tokens)} tokens; the context holds {n_ctx}")
        n_vocab = llm.n_vocab()
        bad = [t for t in tokens if not 0 <= t < n_vocab]
        if bad:
            raise WorkerError(f"token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")

        # Reuse the longest common prefix of what the context holds (T0).
        held = llm.input_ids[: llm.n_tokens].tolist()
        cached = 0
        for a, b in zip(held, tokens):
            if a != b:
                break
            cached += 1
        if reuse_limit is not None:
            cached = min(cached, max(0, int(reuse_limit)))  # the caller's isolation bound
        if max_tokens > 0 and cached == len(tokens):
            cached -= 1  # the last prompt token is re-evaluated to get fresh logits
        llm.n_tokens = cached  # eval() drops the KV from here on before decoding
        llm.eval(tokens[cached:])
        evaluated = len(tokens) - cached
        prefill_s = time.perf_counter() - start

        sampler = self._sampler(llm, temperature=temperature, seed=seed, top_k=top_k, top_p=top_p, min_p=min_p,
                                repeat_penalty=repeat_penalty, frequency_penalty=frequency_penalty,
                                presence_penalty=presence_penalty, logit_bias=logit_bias or {}, grammar=grammar)
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        stops = [s for s in (stop or []) if s]
        hold = max((len(s) for s in stops), default=1) - 1
        text, emitted, completion = "", 0, []
        finish, stopped_on_string = "length", False
        ttft = None
        n_decoded = 0  # generated tokens fed back through decode (each one extends the context)
        decode_start = time.perf_counter()
        for _ in range(max_tokens):
            token = int(sampler.sample(llm._ctx, -1))
            if ttft is None:
                ttft = time.perf_counter() - start
            if self.llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                finish = "stop"
                break
            completion.append(token)
            text += decoder.decode(llm.detokenize([token], prev_tokens=(tokens + completion[:-1])[-8:]))
            hit = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
            if hit >= 0:
                text, finish, stopped_on_string = text[:hit], "stop", True
                break
            if stream and len(text) - hold > emitted:
                send_frame(self.sock, {"event": "delta", "text": text[emitted: len(text) - hold]})
                emitted = len(text) - hold
                if self._cancelled():
                    finish = "stop"
                    break
            if llm.n_tokens >= n_ctx:
                break  # the context is full
            llm.eval([token])
            n_decoded += 1
        if not stopped_on_string:
            text += decoder.decode(b"", final=True)
        if stream and len(text) > emitted:
            send_frame(self.sock, {"event": "delta", "text": text[emitted:]})
        end = time.perf_counter()
        return {
            "text": text, "completion_tokens": completion, "prompt_tokens": len(tokens),
            "cached_tokens": cached, "evaluated_tokens": evaluated,
            "ttft_s": ttft if ttft is not None else end - start, "total_s": end - start,
            "prefill_s": prefill_s, "decode_s": end - decode_start, "decoded_tokens": n_decoded,
            "finish_reason": finish,
        }

    @staticmethod
    def _sampler(llm: Any, *, temperature: float, seed: int | None, top_k: int, top_p: float, min_p: float,
                 repeat_penalty: float, frequency_penalty: float, presence_penalty: float,
                 logit_bias: dict[str, float], grammar: str | None) -> Any:
        """llama.cpp's sampler chain as its own server builds it: bias, penalties,
        grammar, then greedy at temperature 0, else top-k, top-p, min-p, temperature, draw."""
        import random

        from llama_cpp import _internals
        from llama_cpp.llama_grammar import LlamaGrammar

        sampler = _internals.LlamaSampler()
        n_vocab = llm.n_vocab()
        if logit_bias:
            bias = {int(token): float(value) for token, value in logit_bias.items()}
            bad = [t for t in bias if not 0 <= t < n_vocab]
            if bad:
                raise WorkerError(f"logit_bias: token id {bad[0]} is outside the vocabulary (0..{n_vocab - 1})")
            sampler.add_logit_bias(n_vocab, bias)
        sampler.add_penalties(n_vocab=n_vocab, penalty_last_n=llm.last_n_tokens_size, penalty_repeat=repeat_penalty,
                              penalty_freq=frequency_penalty, penalty_present=presence_penalty)
        if grammar:
            try:
                parsed = LlamaGrammar.from_string(grammar, verbose=False)
            except Exception as exc:
                raise WorkerError(f"grammar: llama.cpp could not parse it: {exc}") from None
            sampler.add_grammar(llm._model, parsed)
        if temperature <= 0:
            sampler.add_greedy()
            return sampler
        if top_k > 0:
            sampler.add_top_k(top_k)
        sampler.add_top_p(top_p, 1)
        sampler.add_min_p(min_p, 1)
        sampler.add_temp(temperature)
        sampler.add_dist(seed if seed is not None else random.SystemRandom().randrange(2**32))
        return sampler

    def _cancelled(self) -> bool:
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        message = recv_frame(self.sock)
        return message.get("op") == "cancel"

    # ---- state
    def op_save_state(self, path: str) -> dict:
        from nodeagent.fsutil import atomic_writer

        llm = self._need_model()
        start = time.perf_counter()
        size = self.llama_cpp.llama_state_get_size(llm.ctx)
        buffer = (ctypes.c_uint8 * size)()
        written = self.llama_cpp.llama_state_get_data(llm.ctx, buffer, size)
        payload = memoryview(buffer)[:written]
        tokens = [int(t) for t in llm.input_ids[: llm.n_tokens]]
        header = json.dumps({
            "model": self.identity, "nTokens": len(tokens), "tokens": tokens, "nCtx": llm.n_ctx(),
            "payloadBytes": written, "payloadSha256": hashlib.sha256(payload).hexdigest(),
            "llamaCppPython": getattr(self.llama_cpp, "__version__", "?"),
        }).encode()
        with atomic_writer(path, mode=0o600) as handle:
            handle.write(STATE_MAGIC + STATE_HEADER.pack(len(header)) + header)
            handle.write(payload)
        return {"n_tokens": len(tokens), "size_bytes": os.path.getsize(path), "save_s": time.perf_counter() - start}

    def op_restore_state(self, path: str, verify: bool = True) -> dict:
        llm = self._need_model()
        start = time.perf_counter()
        try:
            with open(path, "rb") as handle:
                data = handle.read()
        except FileNotFoundError:
            raise StateCorruptError(f"state file {path} does not exist") from None
        if not data.startswith(STATE_MAGIC) or len(data) < len(STATE_MAGIC) + STATE_HEADER.size:
            raise StateCorruptError(f"{path} is not an agent-machine state file")
        (hlen,) = STATE_HEADER.unpack_from(data, len(STATE_MAGIC))
        body = len(STATE_MAGIC) + STATE_HEADER.size
        try:
            header = json.loads(data[body: body + hlen])
        except ValueError:
            raise StateCorruptError(f"{path}: unreadable header") from None
        payload = memoryview(data)[body + hlen:]
        if len(payload) != header.get("payloadBytes"):
            raise StateCorruptError(f"{path}: truncated ({len(payload)} of {header.get('payloadBytes')} payload bytes)")
        if verify and hashlib.sha256(payload).hexdigest() != header.get("payloadSha256"):
            raise StateCorruptError(f"{path}: payload digest mismatch (corrupt file)")
        if header.get("model") != self.identity:
            raise StateCorruptError(f"{path} was saved from model {header.get('model')}, not the loaded {self.identity}")
        tokens = header["tokens"]
        if len(tokens) > llm.n_ctx():
            raise StateCorruptError(f"{path} holds {len(tokens)} tokens; this context holds {llm.n_ctx()}")
        buffer = (ctypes.c_uint8 * len(payload)).from_buffer_copy(payload)
        read = self.llama_cpp.llama_state_set_data(llm.ctx, buffer, len(payload))
        if read != len(payload):
            llm.reset()
            llm._ctx.kv_cache_clear() if hasattr(llm._ctx, "kv_cache_clear") else None
            raise StateCorruptError(f"{path}: llama.cpp accepted {read} of {len(payload)} bytes; context cleared")
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = len(tokens)
        return {"n_tokens": len(tokens), "size_bytes": len(data), "restore_s": time.perf_counter() - start}


def main(argv: list[str]) -> int:
    fd = int(argv[1])
    sock = socket.socket(fileno=fd)
    try:
        Worker(sock).serve()
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
