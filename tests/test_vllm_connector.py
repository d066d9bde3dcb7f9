"""LMCacheMPConnector inside the real vLLM 0.33: its Scheduler with our connector (by module path
and by the bare name), and a WORKER-role connector in the same process over CPU KV tensors from
vLLM's own ``allocate_kv_cache``, driven step by step in vLLM's order. A fake model writes
deterministic KV for the tokens it computes; a repeated prefix must be loaded from the server
byte for byte, and at the end vLLM holds no request and no block."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM 0.33 is not installed (see README: testing with vLLM)")
torch = pytest.importorskip("torch")

from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, KVCacheTensor  # noqa: E402
from vllm.v1.kv_cache_layout import KVCacheLayout  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402
from vllm.v1.worker.utils import allocate_kv_cache  # noqa: E402

from lmcache.integration.vllm.lmcache_mp_connector import LMCacheMPConnector  # noqa: E402
from lmcache.server.process import ServerProcess  # noqa: E402

BLOCK, CHUNK, NUM_BLOCKS = 16, 64, 64
LAYERS = ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"]


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    with ServerProcess(extra_args=["--chunk-size", str(CHUNK)]) as proc:
        yield proc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
        "intermediate_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
        "num_hidden_layers": 2, "vocab_size": 1000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
        "torch_dtype": "bfloat16",
    }))
    return path


class VllmStack:
    """A real vLLM Scheduler and a WORKER connector with a fake forward pass."""

    def __init__(self, model_dir: Path, port: int, layout: KVCacheLayout, by_module_path: bool, mode: str) -> None:
        extra = {"lmcache.mp.host": "tcp://127.0.0.1", "lmcache.mp.port": port,
                 "lmcache.mp.mp_transfer_mode": mode, "lmcache.mp.lookup_wait_ms": 20}
        transfer = KVTransferConfig(
            kv_connector="LMCacheMPConnector", kv_role="kv_both", kv_connector_extra_config=extra,
            **({"kv_connector_module_path": "lmcache.integration.vllm.lmcache_mp_connector"} if by_module_path else {}),
        )
        self.config = VllmConfig(
            model_config=ModelConfig(model=str(model_dir), skip_tokenizer_init=True, dtype="bfloat16", max_model_len=4096),
            cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=False),
            scheduler_config=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=4096, max_model_len=4096,
                                             is_encoder_decoder=False),
            kv_transfer_config=transfer,
            device_config=DeviceConfig("cpu"),
        )
        spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.bfloat16)
        page = spec.page_size_bytes
        self.kv_config = KVCacheConfig(
            num_blocks=NUM_BLOCKS,
            kv_cache_tensors=[KVCacheTensor(size=page * NUM_BLOCKS * len(LAYERS), layers=LAYERS,
                                            layer_stride=page * NUM_BLOCKS, block_stride=page)],
            kv_cache_groups=[KVCacheGroupSpec(LAYERS, spec)],
        )
        self.config.cache_config.num_gpu_blocks = NUM_BLOCKS  # what the engine core sets after profiling
        self.scheduler = Scheduler(self.config, self.kv_config, StructuredOutputManager(self.config), block_size=BLOCK)
        assert isinstance(self.scheduler.connector, LMCacheMPConnector)
        self.worker = KVConnectorFactory.create_connector(self.config, KVConnectorRole.WORKER, self.kv_config)
        assert isinstance(self.worker, LMCacheMPConnector)
        self.kv = allocate_kv_cache(self.kv_config, torch.device("cpu"), layout)
        self.worker.register_kv_caches(self.kv)
        self.written: dict[str, set[int]] = {}
        self.blocks: dict[str, list[int]] = {}

    def value(self, token: int, pos: int, layer: int) -> float:
        return float((token * 7 + pos * 3 + layer) % 97)

    def forward(self, req: Request, start: int, count: int) -> None:
        blocks = self.scheduler.kv_cache_manager.get_block_ids(req.request_id)[0]
        self.blocks[req.request_id] = list(blocks)
        tokens = req.all_token_ids
        for pos in range(start, start + count):
            for layer, name in enumerate(LAYERS):
                self.kv[name][blocks[pos // BLOCK], :, pos % BLOCK, :] = self.value(tokens[pos], pos, layer)
            self.written.setdefault(req.request_id, set()).add(pos)

    def step(self) -> None:
        out = self.scheduler.schedule()
        meta = out.kv_connector_metadata
        self.worker.handle_preemptions(meta)
        self.worker.bind_connector_metadata(meta)
        self.worker.start_load_kv(None)
        sampled, req_ids = [], []
        for req_id, count in out.num_scheduled_tokens.items():
            req = self.scheduler.requests[req_id]
            start = req.num_computed_tokens - count  # schedule() already counted this step's tokens
            self.forward(req, start, count)
            req_ids.append(req_id)
            done_prefill = req.num_computed_tokens >= req.num_tokens
            sampled.append([1 + (req.num_tokens % 900)] if done_prefill else [])
        self.worker.wait_for_save()
        sending, recving = self.worker.get_finished(out.finished_req_ids)
        errors = self.worker.get_block_ids_with_load_errors()
        self.worker.clear_connector_metadata()
        output = ModelRunnerOutput(
            req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)}, sampled_token_ids=sampled,
            kv_connector_output=KVConnectorOutput(finished_sending=sending, finished_recving=recving,
                                                  invalid_block_ids=errors),
        )
        self.scheduler.update_from_output(out, output)

    def run_until_idle(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while self.scheduler.requests or self.scheduler.has_finished_requests():
            assert time.monotonic() < deadline, f"requests left: {list(self.scheduler.requests)}"
            self.step()

    def add(self, req_id: str, tokens: list[int]) -> Request:
        req = Request(req_id, tokens, SamplingParams(max_tokens=2, temperature=0), None)
        self.scheduler.add_request(req)
        return req

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.connector.shutdown()


@pytest.mark.parametrize(
    ("layout", "by_module_path", "mode"),
    [
        (KVCacheLayout.LBNHC, True, "auto"),
        (KVCacheLayout.LBHNC, False, "engine_driven"),
        (KVCacheLayout.LBNHC, False, "lmcache_driven"),
    ],
)
def test_a_repeated_prefix_loads_from_the_server(
    server: ServerProcess, model_dir: Path, layout: KVCacheLayout, by_module_path: bool, mode: str
) -> None:
    stack = VllmStack(model_dir, server.port, layout, by_module_path, mode)
    tokens = random.Random(layout.name + mode).choices(range(1, 900), k=300)
    stack.add("first", tokens)
    stack.run_until_idle()
    assert len(stack.written["first"]) >= 300  # computed everything itself
    for t in stack.kv.values():
        t.zero_()
    second = stack.add("second", tokens)
    stack.run_until_idle()
    loaded = 4 * CHUNK  # 300 tokens: 4 whole chunks, and the last one is not the whole prompt
    assert min(stack.written["second"]) == loaded  # vLLM computed only what was not loaded
    # Every loaded position holds, byte for byte, what the first request computed there.
    blocks = stack.blocks["second"]
    for layer, name in enumerate(LAYERS):
        kv = stack.kv[name]
        for pos in range(loaded):
            got = kv[blocks[pos // BLOCK], :, pos % BLOCK, :]
            want = torch.full_like(got, stack.value(tokens[pos], pos, layer))
            assert torch.equal(got.view(torch.int16), want.view(torch.int16)), (name, pos)
    assert not stack.scheduler.requests
    free = stack.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    assert free == NUM_BLOCKS - 1  # every block but the null block is free again
    stack.close()
