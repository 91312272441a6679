"""``TransferConfig``: the KV-transfer section of the pdserve config (policy only).

Addresses (bind host, bootstrap port) are constructor arguments of the services, owned by the
worker that runs them; this section holds what an operator tunes: the transport, one timeout
per phase (seconds), heartbeats, checksums and data-path sizing.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

TransportName = Literal["shm", "tcp", "nccl", "fake"]

# SGLang's FAKE_BOOTSTRAP_HOST: a request naming this host completes instantly (warmup).
DEFAULT_FAKE_BOOTSTRAP_HOST = "2.2.2.2"


class TransferConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    transport: TransportName = Field(
        default="tcp",
        description="shm (same host, shared memory), tcp (pyzmq), nccl (GPU p2p), fake (no bytes move)",
    )
    bootstrap_timeout_s: float = Field(
        default=30.0, gt=0, description="rendezvous: decode registration <-> prefill request, both ways"
    )
    waiting_timeout_s: float = Field(
        default=120.0, gt=0, description="registered, waiting for the prefill forward to produce the KV"
    )
    transfer_timeout_s: float = Field(default=30.0, gt=0, description="first byte moved -> verified arrival")
    abort_timeout_s: float = Field(
        default=2.0, gt=0, description="how long an abort waits for the peer to confirm it stopped writing"
    )
    heartbeat_interval_s: float = Field(default=1.0, gt=0, description="decode pings each busy prefill peer")
    heartbeat_misses: int = Field(default=3, ge=1, description="missed heartbeats before a peer is dead")
    idle_peer_s: float = Field(default=60.0, gt=0, description="close connections to peers idle this long")
    checksum: bool = Field(default=False, description="crc32 per layer of the transferred bytes, verified")
    fake_bootstrap_host: str = Field(default=DEFAULT_FAKE_BOOTSTRAP_HOST, min_length=1)
    frame_pages: int = Field(
        default=32,
        ge=1,
        le=65536,
        description="tcp/nccl: pages of one layer and kind per frame (the batching unit)",
    )
    tcp_hwm: int = Field(default=64, ge=1, description="tcp: zmq high-water mark (messages) on data sockets")
    device: str = Field(
        default="cpu",
        description="decode pool device: cpu for shm/tcp; cuda[:N] for nccl (checked at start)",
    )
    shm_dir: str = Field(default="/dev/shm", min_length=1, description="where shm segments live")
    nccl_library: str | None = Field(
        default=None,
        description="path to libnccl.so.2 (default: the nvidia-nccl-cu12 wheel, then the loader)",
    )

    @model_validator(mode="after")
    def _check(self) -> TransferConfig:
        if self.transport in ("shm", "tcp") and self.device != "cpu":
            raise ValueError(f"transport {self.transport!r} moves host memory: device must be 'cpu'")
        return self

    @property
    def dead_after_s(self) -> float:
        """Silence after which a peer is declared dead."""
        return self.heartbeat_interval_s * self.heartbeat_misses

    def timeout_for(self, phase: str) -> float:
        return {
            "bootstrap": self.bootstrap_timeout_s,
            "waiting": self.waiting_timeout_s,
            "transfer": self.transfer_timeout_s,
        }.get(phase, self.transfer_timeout_s)
