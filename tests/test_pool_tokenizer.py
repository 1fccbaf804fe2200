"""Which tokenizer a pod's pieces go through (`ProviderPool.tokenizer`)."""

from types import SimpleNamespace

from nodeagent.execution import ManagedProvider, ProviderPool

RECORD = SimpleNamespace(digest="sha256:" + "ab" * 32, names=["m"], path="/nonexistent.gguf")


class Engine:
    """Stands in for a provider process: only what the pool reads (name, kind, running)."""

    def __init__(self, name, kind):
        self.name, self.kind, self.running = name, kind, True

    def stop(self):
        self.running = False


def pool_with(*kinds, starts=None):
    started = starts if starts is not None else []

    def start(record):
        started.append(record.digest)
        return Engine(f"tokenizer/{record.digest[7:19]}", "llama_cpp_python")

    pool = ProviderPool(loader=lambda record: None, tokenizer=start,
                        tokenizer_kinds={"llama_cpp_python", "llama_server"})
    for i, kind in enumerate(kinds):
        pool.add(ManagedProvider(Engine(f"p{i}", kind), RECORD.digest))
    return pool, started


def test_one_tokenizer_per_model_for_llama_cpp_kinds_and_none_for_others():
    pool, started = pool_with("llama_cpp_python", "llama_server")
    first = pool.tokenizer(RECORD)
    assert first is not None and pool.tokenizer(RECORD) is first and started == [RECORD.digest]
    vllm, _ = pool_with("llama_cpp_python", "vllm")
    assert vllm.tokenizer(RECORD) is None  # vLLM's tokenizer may differ: ask the providers


def test_a_cold_model_uses_the_loader_kind():
    pool, started = pool_with()
    assert pool.tokenizer(RECORD) is not None and started == [RECORD.digest]
    other = ProviderPool(loader=lambda record: None, loader_kind="vllm", tokenizer=lambda r: Engine("t", "x"),
                         tokenizer_kinds={"llama_cpp_python"})
    assert other.tokenizer(RECORD) is None


def test_a_tokenizer_that_fails_to_start_is_not_retried_and_a_stopped_one_is_not_used(caplog):
    calls = []

    def broken(record):
        calls.append(record)
        raise ValueError("llama.cpp could not load /nonexistent.gguf")

    pool = ProviderPool(loader=lambda record: None, tokenizer=broken, tokenizer_kinds={"llama_cpp_python"})
    assert pool.tokenizer(RECORD) is None and pool.tokenizer(RECORD) is None
    assert len(calls) == 1 and "no tokenizer for m" in caplog.text
    working, _ = pool_with("llama_cpp_python")
    tokenizer = working.tokenizer(RECORD)
    working.close_tokenizers()
    assert tokenizer.running is False


def test_a_tokenizer_that_died_is_reaped_and_started_again():
    pool, started = pool_with("llama_cpp_python")
    first = pool.tokenizer(RECORD)
    first.running = False  # its process died
    second = pool.tokenizer(RECORD)
    assert second is not first and second.running and len(started) == 2


def test_pods_that_chose_to_load_the_same_model_share_one_provider():
    loads = []

    def loader(record):
        loads.append(record.digest)
        return Engine("engine", "llama_cpp_python")

    pool = ProviderPool(loader=loader)
    first = pool.load(RECORD)
    assert pool.load(RECORD) is first and loads == [RECORD.digest] and pool.all() == [first]


def test_only_the_recently_used_models_keep_a_tokenizer_running():
    from nodeagent.execution import MAX_TOKENIZERS

    pool, _ = pool_with()
    records = [SimpleNamespace(digest=f"sha256:{i:064x}", names=[f"m{i}"], path="/x.gguf")
               for i in range(MAX_TOKENIZERS + 1)]
    first = [pool.tokenizer(r) for r in records[:MAX_TOKENIZERS]]
    assert pool.tokenizer(records[0]) is first[0]  # used again: now the most recent
    newest = pool.tokenizer(records[-1])
    assert newest.running and first[0].running
    assert not first[1].running  # the least recently used one was stopped
    assert sum(t.running for t in first) == MAX_TOKENIZERS - 1
