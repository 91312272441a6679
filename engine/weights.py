"""Load a GLM-4-MoE checkpoint (``config.json`` + safetensors) from a local directory.

Lifecycle of :func:`load_weights`:

1. find the tensors: ``model.safetensors.index.json`` (sharded; every referenced shard must
   exist), else ``model.safetensors``, else the directory's ``*.safetensors`` files;
2. read only the headers and check every name and shape against what the config implies (HF
   names, as saved by ``save_pretrained`` and as published on the hub) — a missing, unexpected or
   mis-shaped tensor raises :class:`ModelLoadError` naming it, before any data is read;
3. read each tensor straight to the target device and cast it to the target dtype; the router
   weight and ``e_score_correction_bias`` stay float32 (HF keeps them in fp32); per-expert
   projections are copied into preallocated stacked ``[E, ...]`` tensors; q/k/v and gate/up are
   fused;
4. MTP (NextN) layers stored after the last decoder layer are loaded into ``ModelWeights.mtp``
   when present; when absent one info line is logged.
"""

from __future__ import annotations

import json
import logging
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm import tqdm

from pdserve.engine.model import (
    AttentionWeights,
    DecoderLayerWeights,
    DenseMLPWeights,
    ModelWeights,
    MtpLayerWeights,
)
from pdserve.engine.model_config import ModelConfig
from pdserve.engine.moe import MoEWeights
from pdserve.errors import ModelLoadError

logger = logging.getLogger(__name__)

_FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")
_ALIGN = 64  # bytes: PyTorch's CPU allocator alignment
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_MTP_OPTIONAL = ("shared_head.head.weight", "embed_tokens.weight")


def expected_shapes(cfg: ModelConfig, num_layers: int | None = None) -> dict[str, tuple[int, ...]]:
    """Required tensor names -> shapes of the main model (HF naming)."""
    h, v = cfg.hidden_size, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg.num_hidden_layers if num_layers is None else num_layers):
        shapes.update(_layer_shapes(cfg, f"model.layers.{i}.", i))
    return shapes


def _layer_shapes(cfg: ModelConfig, p: str, idx: int) -> dict[str, tuple[int, ...]]:
    h, d = cfg.hidden_size, cfg.head_dim
    s: dict[str, tuple[int, ...]] = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (cfg.q_size, h),
        p + "self_attn.k_proj.weight": (cfg.kv_size, h),
        p + "self_attn.v_proj.weight": (cfg.kv_size, h),
        p + "self_attn.o_proj.weight": (h, cfg.q_size),
    }
    if cfg.attention_bias:
        for proj, size in (("q", cfg.q_size), ("k", cfg.kv_size), ("v", cfg.kv_size)):
            s[f"{p}self_attn.{proj}_proj.bias"] = (size,)
    if cfg.use_qk_norm:
        s[p + "self_attn.q_norm.weight"] = (d,)
        s[p + "self_attn.k_norm.weight"] = (d,)
    if not cfg.is_moe_layer(idx):
        inter = cfg.intermediate_size
        s.update({p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h)})
        s[p + "mlp.down_proj.weight"] = (h, inter)
        return s
    inter, e = cfg.moe_intermediate_size, cfg.n_routed_experts
    s[p + "mlp.gate.weight"] = (e, h)
    s[p + "mlp.gate.e_score_correction_bias"] = (e,)
    for j in range(e):
        q = f"{p}mlp.experts.{j}."
        s.update(
            {
                q + "gate_proj.weight": (inter, h),
                q + "up_proj.weight": (inter, h),
                q + "down_proj.weight": (h, inter),
            }
        )
    if cfg.n_shared_experts > 0:
        si = inter * cfg.n_shared_experts
        q = p + "mlp.shared_experts."
        s.update(
            {q + "gate_proj.weight": (si, h), q + "up_proj.weight": (si, h), q + "down_proj.weight": (h, si)}
        )
    return s


def _mtp_shapes(cfg: ModelConfig, idx: int) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """(required, optional) name -> shape for the MTP layer stored at layer index ``idx``."""
    h, p = cfg.hidden_size, f"model.layers.{idx}."
    required = _layer_shapes(cfg, p, idx)
    required.update({p + "eh_proj.weight": (h, 2 * h), p + "enorm.weight": (h,), p + "hnorm.weight": (h,)})
    required[p + "shared_head.norm.weight"] = (h,)
    optional: dict[str, tuple[int, ...]] = {p + name: (cfg.vocab_size, h) for name in _MTP_OPTIONAL}
    return required, optional


def find_checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> shard file, from the index when there is one (names not yet verified)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index} is not a valid safetensors index: {exc}") from exc
        out: dict[str, Path] = {}
        for name, shard in weight_map.items():
            path = model_dir / str(shard)
            if not path.is_file():
                raise ModelLoadError(
                    f"shard {shard!r} named in {index.name} (for tensor {name!r}) is missing"
                )
            out[str(name)] = path
        return out
    single = model_dir / "model.safetensors"
    files = [single] if single.is_file() else sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no safetensors weights in {str(model_dir)!r}")
    out = {}
    for path in files:
        for name in _header_names(path):
            out[name] = path
    return out


def _header_names(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own error types
        raise ModelLoadError(f"cannot read safetensors file {path.name}: {exc}") from exc


class _Reader:
    """Opens each shard once; reads one tensor to the device with the target dtype."""

    def __init__(self, stack: ExitStack, files: dict[str, Path], device: torch.device) -> None:
        self._stack = stack
        self._files = files
        self._device = "cpu" if device.type == "cpu" else str(device)
        self._handles: dict[Path, Any] = {}

    def _handle(self, name: str) -> Any:
        path = self._files[name]
        if path not in self._handles:
            try:
                self._handles[path] = self._stack.enter_context(
                    safe_open(str(path), framework="pt", device=self._device)
                )
            except Exception as exc:
                raise ModelLoadError(f"cannot open safetensors file {path.name}: {exc}") from exc
        return self._handles[path]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        try:
            tensor = self._handle(name).get_tensor(name)
        except Exception as exc:
            raise ModelLoadError(f"cannot read tensor {name!r} from {self._files[name].name}: {exc}") from exc
        if not isinstance(tensor, torch.Tensor):
            raise ModelLoadError(f"tensor {name!r} did not load as a torch tensor")
        tensor = tensor.to(dtype)
        # safetensors hands out tensors at arbitrary offsets of the file buffer; BLAS kernels take
        # different (differently rounded) paths for unaligned data, so copy those into an aligned
        # allocation: the same checkpoint then gives bit-identical results however it is sharded.
        if tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGN:
            tensor = tensor.clone()
        return tensor


def load_weights(
    cfg: ModelConfig,
    model_dir: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device,
    show_progress: bool = True,
) -> ModelWeights:
    """Validate then load every tensor of the checkpoint in ``model_dir`` (see module doc)."""
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"model directory {str(root)!r} does not exist")
    files = find_checkpoint_files(root)
    required = expected_shapes(cfg)
    mtp_layers = _present_mtp_layers(cfg, files)
    optional: dict[str, tuple[int, ...]] = {}
    for idx in mtp_layers:
        req, opt = _mtp_shapes(cfg, idx)
        required.update(req)
        optional.update(opt)
    if cfg.tie_word_embeddings:
        optional["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    with ExitStack() as stack:
        reader = _Reader(stack, files, device)
        _check_names_and_shapes(reader, files, required, optional)
        skip = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
        total = sum(1 for name in files if (name in required or name in optional) and name not in skip)
        bar = tqdm(
            total=total, desc="Loading weights", unit="tensor", file=sys.stderr, disable=not show_progress
        )
        try:
            loader = _Loader(cfg, reader, dtype, device, bar, set(files))
            layers = [loader.decoder_layer(f"model.layers.{i}.", i) for i in range(cfg.num_hidden_layers)]
            embed = loader.get("model.embed_tokens.weight")
            lm_head = embed if cfg.tie_word_embeddings else loader.get("lm_head.weight")
            weights = ModelWeights(embed, layers, loader.get("model.norm.weight"), lm_head, [])
            weights.mtp = [loader.mtp_layer(idx) for idx in mtp_layers]
        finally:
            bar.close()
    if not mtp_layers and cfg.num_nextn_predict_layers > 0:
        logger.info(
            "no MTP (NextN) weights in %s (config num_nextn_predict_layers=%d; HF transformers does not "
            "build MTP layers, so checkpoints saved by it have none): speculative decoding unavailable",
            root,
            cfg.num_nextn_predict_layers,
        )
    return weights


def _present_mtp_layers(cfg: ModelConfig, files: dict[str, Path]) -> list[int]:
    first = cfg.num_hidden_layers
    present = {
        idx
        for idx in range(first, first + cfg.num_nextn_predict_layers)
        if any(name.startswith(f"model.layers.{idx}.") for name in files)
    }
    return sorted(present)


def _check_names_and_shapes(
    reader: _Reader,
    files: dict[str, Path],
    required: dict[str, tuple[int, ...]],
    optional: dict[str, tuple[int, ...]],
) -> None:
    missing = [name for name in required if name not in files]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"checkpoint is missing tensor {missing[0]!r}{more}")
    for name in files:
        want = required.get(name, optional.get(name))
        if want is None:
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            raise ModelLoadError(f"checkpoint has unexpected tensor {name!r}")
        got = reader.shape(name)
        if got != want:
            raise ModelLoadError(f"tensor {name!r} has shape {list(got)}, expected {list(want)}")


class _Loader:
    def __init__(
        self,
        cfg: ModelConfig,
        reader: _Reader,
        dtype: torch.dtype,
        device: torch.device,
        bar: tqdm[Any],
        names: set[str],
    ) -> None:
        self.cfg, self.reader, self.dtype, self.device, self.bar, self.names = (
            cfg,
            reader,
            dtype,
            device,
            bar,
            names,
        )

    def get(self, name: str) -> torch.Tensor:
        dtype = torch.float32 if name.endswith(_FP32_SUFFIXES) else self.dtype
        tensor = self.reader.read(name, dtype)
        self.bar.update(1)
        return tensor

    def opt(self, name: str) -> torch.Tensor | None:
        return self.get(name) if name in self.names else None

    def cat(self, names: list[str]) -> torch.Tensor:
        return torch.cat([self.get(n) for n in names], dim=0)

    def decoder_layer(self, p: str, idx: int) -> DecoderLayerWeights:
        cfg = self.cfg
        a = p + "self_attn."
        bias = self.cat([a + f"{x}_proj.bias" for x in "qkv"]) if cfg.attention_bias else None
        attn = AttentionWeights(
            qkv=self.cat([a + f"{x}_proj.weight" for x in "qkv"]),
            qkv_bias=bias,
            o_proj=self.get(a + "o_proj.weight"),
            qk_norm=self._qk_norm(a) if cfg.use_qk_norm else None,
        )
        mlp: DenseMLPWeights | MoEWeights
        if cfg.is_moe_layer(idx):
            mlp = self._moe(p + "mlp.")
        else:
            mlp = DenseMLPWeights(
                self.cat([p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight"]),
                self.get(p + "mlp.down_proj.weight"),
            )
        return DecoderLayerWeights(
            input_norm=self.get(p + "input_layernorm.weight"),
            post_attention_norm=self.get(p + "post_attention_layernorm.weight"),
            attn=attn,
            mlp=mlp,
        )

    def _qk_norm(self, a: str) -> torch.Tensor:
        """q_norm / k_norm weights laid out per head ``[Hq + Hkv, D]`` for one joint RMSNorm."""
        cfg = self.cfg
        q_norm, k_norm = self.get(a + "q_norm.weight"), self.get(a + "k_norm.weight")
        heads, kv_heads, dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        return torch.cat((q_norm.expand(heads, dim), k_norm.expand(kv_heads, dim)), dim=0)

    def _moe(self, p: str) -> MoEWeights:
        cfg = self.cfg
        e, h, inter = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        gate_up = torch.empty(e, 2 * inter, h, dtype=self.dtype, device=self.device)
        down = torch.empty(e, h, inter, dtype=self.dtype, device=self.device)
        for j, (gu, dn) in enumerate(zip(gate_up, down, strict=True)):
            q = f"{p}experts.{j}."
            gu[:inter].copy_(self.get(q + "gate_proj.weight"))
            gu[inter:].copy_(self.get(q + "up_proj.weight"))
            dn.copy_(self.get(q + "down_proj.weight"))
        shared_gu = shared_down = None
        if cfg.n_shared_experts > 0:
            s = p + "shared_experts."
            shared_gu = self.cat([s + "gate_proj.weight", s + "up_proj.weight"])
            shared_down = self.get(s + "down_proj.weight")
        return MoEWeights(
            router=self.get(p + "gate.weight"),
            correction_bias=self.get(p + "gate.e_score_correction_bias"),
            gate_up=gate_up,
            down=down,
            shared_gate_up=shared_gu,
            shared_down=shared_down,
        )

    def mtp_layer(self, idx: int) -> MtpLayerWeights:
        p = f"model.layers.{idx}."
        return MtpLayerWeights(
            layer_idx=idx,
            eh_proj=self.get(p + "eh_proj.weight"),
            enorm=self.get(p + "enorm.weight"),
            hnorm=self.get(p + "hnorm.weight"),
            head_norm=self.get(p + "shared_head.norm.weight"),
            head=self.opt(p + "shared_head.head.weight"),
            embed=self.opt(p + "embed_tokens.weight"),
            decoder=self.decoder_layer(p, idx),
        )
