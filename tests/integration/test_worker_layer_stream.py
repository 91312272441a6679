"""Layer-wise KV streaming in one process: a real prefill engine with the worker's
:class:`LayerStreamer` installed as its layer hook, the real kvtransfer services on 127.0.0.1
(shm), and a decode engine adopting the result. Pages move while the prompt is still being
computed (chunked prefill, several steps), and decoding from the streamed pages equals the
colocated engine token for token."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from pdserve.engine.config import EngineConfig
from pdserve.engine.llm_engine import LLMEngine, PrefillOutput
from pdserve.engine.sampling_params import SamplingParams
from pdserve.kvtransfer.config import TransferConfig
from pdserve.kvtransfer.decode import DecodeTransferService
from pdserve.kvtransfer.prefill import PrefillTransferService
from pdserve.kvtransfer.protocol import AuxData
from pdserve.kvtransfer.states import KVPoll
from pdserve.prefill_worker.layer_stream import LayerStreamer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PROMPT = [random.Random(5).randrange(10, 8000) for _ in range(100)]  # 7 pages; 4 chunks of <= 32


def _engine(model: Path, **kw: object) -> EngineConfig:
    return EngineConfig.build(model=str(model), num_blocks=64, max_model_len=512, max_num_seqs=8,
                              show_progress=False, **kw)  # fmt: skip


@pytest.mark.parametrize("transport", ["shm", "tcp"])
async def test_pages_ship_while_the_prompt_computes(default_model_dir: Path, transport: str) -> None:
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    colocated = LLMEngine(_engine(default_model_dir))
    (expected,) = colocated.generate([PROMPT], params)

    prefill = LLMEngine(_engine(default_model_dir, max_num_batched_tokens=32))
    cfg = TransferConfig(transport=transport)
    layout = prefill.runner.layout
    p_svc = PrefillTransferService(cfg, layout, prefill.runner.kv_storage, registry=CollectorRegistry())
    d_svc = DecodeTransferService(cfg, layout, 64, registry=CollectorRegistry())
    await p_svc.start()
    await d_svc.start()
    try:
        decode = LLMEngine(_engine(default_model_dir), kv_storage=d_svc.kv_storage)
        decode.generate([[30, 31, 32]], params)  # so the decode's page ids differ from the prefill's
        dst = decode.reserve("r", len(PROMPT))
        room = random.getrandbits(63)
        receiving = asyncio.ensure_future(d_svc.receive("127.0.0.1", p_svc.bootstrap_port, room, dst))
        sender = p_svc.create_sender(room)
        await sender.wait_ready(5.0)

        streamer = LayerStreamer(prefill.block_size)
        prefill.layer_callback = streamer
        streamer.attach("r", sender, len(PROMPT))
        prefill.add_request("r", PROMPT, params, hold_kv=True)
        states: list[KVPoll | None] = []
        final: PrefillOutput | None = None
        while final is None:
            for out in prefill.step():
                if out.finished and isinstance(out, PrefillOutput):
                    final = out
            await asyncio.sleep(0.05)  # the data thread and the control channel run meanwhile
            states.append(d_svc.poll(room))
        streamer.detach("r")
        assert len(states) >= 4, "the prompt should take several chunked-prefill steps"
        # pages of the first chunks arrived before the prompt was done
        assert states[0] == KVPoll.Transferring, states
        assert streamer.failures == 0

        result = final.prefill
        assert result is not None
        aux = AuxData(
            room=room,
            first_token_id=result.first_token_id,
            first_token_logprob=result.first_logprob,
            cached_tokens=result.num_cached_tokens,
        )
        outcome = await asyncio.wait_for(sender.finish(aux), 10.0)
        got = await asyncio.wait_for(receiving, 10.0)
        assert outcome.nbytes == -(-len(PROMPT) // layout.block_size) * layout.block_nbytes
        assert prefill.release("r")
        assert got.first_token_id == expected.output_ids[0]

        decode.adopt("r", PROMPT, got.first_token_id, params, got.first_token_logprob, got.cached_tokens)
        tokens: list[int] = []
        while decode.has_unfinished():
            for out in decode.step():
                if out.request_id == "r":
                    tokens += out.new_token_ids
        assert tokens == expected.output_ids
        assert prefill.block_manager.num_used == 0 and decode.block_manager.num_used == 0
    finally:
        await p_svc.close()
        await d_svc.close()
