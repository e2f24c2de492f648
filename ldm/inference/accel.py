"""Speed and memory options applied to a loaded LatentDiffusion model (the CUDA fast path, tiled VAE, threads).

Each technique is a function over the model's parts (``model.model`` = UNet wrapper, ``first_stage_model`` = VAE,
``cond_stage_model`` = text encoder); :func:`apply_fast_path` applies a :class:`FastPath` selection. The CUDA-only
techniques (half-precision weights, channels_last, ``torch.compile``, CUDA graphs) are skipped, with one log line,
when the model is not on a CUDA device. Nothing here changes state_dict keys: compilation uses
``nn.Module.compile`` (in place), so checkpoints load and save as before.

Everything is off by default: none of it has been measured on a GPU yet (see benchmarks/README.md).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from ldm.modules.attention import set_attention_backend

logger = logging.getLogger(__name__)

COMPILE_MODES = ("off", "default", "max-autotune-no-cudagraphs", "reduce-overhead", "max-autotune")


@dataclass(frozen=True)
class FastPath:
    """A selection of speed techniques; the defaults change nothing.

    ``dtype``: cast the network weights (float16 / bfloat16). ``channels_last``: NHWC convolution weights (and so
    activations). ``attention``: attention backend for every attention layer (``"sdpa"`` picks flash attention on
    CUDA). ``compile_unet`` / ``compile_vae``: ``torch.compile`` the UNet / the VAE decoder with ``compile_mode``
    (``"reduce-overhead"`` captures the fixed-shape denoising step in CUDA graphs). ``cudnn_benchmark``: let cuDNN
    pick the fastest convolution algorithms for the fixed shapes (a process-wide setting).
    """

    dtype: Optional[torch.dtype] = None
    channels_last: bool = False
    attention: Optional[str] = None
    compile_unet: bool = False
    compile_vae: bool = False
    compile_mode: str = "default"
    cudnn_benchmark: bool = False

    @classmethod
    def cuda(cls, dtype: torch.dtype = torch.float16, compile_mode: str = "off") -> "FastPath":
        """Everything for a CUDA GPU: half weights, channels_last, SDPA, cuDNN autotuning (+ compile unless off)."""
        compiled = compile_mode != "off"
        return cls(dtype=dtype, channels_last=True, attention="sdpa", compile_unet=compiled, compile_vae=compiled,
                   compile_mode=compile_mode if compiled else "default", cudnn_benchmark=True)


def model_parts(model: nn.Module) -> dict[str, nn.Module]:
    """The networks of a LatentDiffusion model by role: ``unet``, ``vae``, ``text`` (those present)."""
    names = {"unet": "model", "vae": "first_stage_model", "text": "cond_stage_model"}
    return {role: getattr(model, attr) for role, attr in names.items() if isinstance(getattr(model, attr, None),
                                                                                      nn.Module)}


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (cpu for a model without parameters)."""
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def cast_weights(model: nn.Module, dtype: torch.dtype) -> list[str]:
    """Cast the UNet, VAE and text encoder weights to ``dtype`` (the schedule buffers keep float32)."""
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"weights can be cast to float16, bfloat16 or float32, not {dtype}")
    parts = model_parts(model)
    for part in parts.values():
        part.to(dtype)
    return [f"{role} weights {str(dtype).replace('torch.', '')}" for role in parts]


def to_channels_last(model: nn.Module) -> list[str]:
    """Store the 4-D (convolution) weights of the UNet and VAE as channels_last (NHWC)."""
    parts = {role: part for role, part in model_parts(model).items() if role in ("unet", "vae")}
    for part in parts.values():
        part.to(memory_format=torch.channels_last)
    return [f"{role} channels_last" for role in parts]


def select_attention(model: nn.Module, backend: str, chunk_size: Optional[int] = None) -> list[str]:
    """Use attention ``backend`` (optionally query-chunked) in every attention layer of the model."""
    count = set_attention_backend(model, backend, chunk_size)
    return [f"attention {backend}" + (f" chunks of {chunk_size}" if chunk_size else "") + f" ({count} layers)"]


def _mark_step(module: nn.Module, args: Any) -> None:
    torch.compiler.cudagraph_mark_step_begin()


def _own_output(module: nn.Module, args: Any, output: Any) -> Any:
    return output.clone() if torch.is_tensor(output) else output


def compile_parts(model: nn.Module, unet: bool = True, vae: bool = True, mode: str = "default",
                  backend: str = "inductor") -> list[str]:
    """``torch.compile`` (in place, same state_dict keys) the UNet network and/or the VAE decoder.

    With ``mode="reduce-overhead"`` (CUDA graphs) every UNet call starts a new graph step and its output is copied
    out of the graph's memory, so samplers may keep outputs across steps (PLMS, DPM-Solver history).
    """
    if mode not in COMPILE_MODES[1:]:
        raise ValueError(f"unknown compile mode '{mode}'; choose one of {', '.join(COMPILE_MODES[1:])}")
    parts, done = model_parts(model), []
    kwargs = {"backend": backend} if backend != "inductor" else {"mode": mode}
    if unet and "unet" in parts:
        wrapper = parts["unet"]
        network = getattr(wrapper, "diffusion_model", wrapper)
        network.compile(dynamic=False, **kwargs)
        if mode == "reduce-overhead" and network is not wrapper:
            wrapper.register_forward_pre_hook(_mark_step)
            wrapper.register_forward_hook(_own_output)
        done.append(f"unet compiled ({mode if backend == 'inductor' else backend})")
    if vae and "vae" in parts and hasattr(parts["vae"], "decoder"):
        parts["vae"].decoder.compile(dynamic=False, **kwargs)
        done.append(f"vae decoder compiled ({mode if backend == 'inductor' else backend})")
    return done


class CudaGraphCall:
    """A fixed-shape call ``fn(*inputs)`` captured once in a CUDA graph and replayed (no torch.compile needed).

    ``__call__(*inputs)`` copies the new inputs into the captured ones, replays the graph and returns a copy of
    the output (so outputs survive later replays). Shapes, dtypes and devices must match the captured inputs.
    """

    def __init__(self, fn: Any, *inputs: torch.Tensor, warmup: int = 3) -> None:
        if not all(t.is_cuda for t in inputs):
            raise ValueError("CUDA graphs need CUDA tensors as inputs; run on a GPU or skip the capture")
        self.inputs = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as torch.cuda.graph requires
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(*self.inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        """Replay with ``inputs`` (same shapes as captured): the output, copied out of the graph's memory."""
        for static, new in zip(self.inputs, inputs):
            if static.data_ptr() != new.data_ptr():
                static.copy_(new)
        self.graph.replay()
        return self.output.clone()


def apply_fast_path(model: nn.Module, fast: FastPath) -> list[str]:
    """Apply the selected techniques to ``model`` (in place); returns what was done, for the log.

    On a device other than CUDA only the attention backend is applied; the rest is skipped with one info line.
    """
    cuda = model_device(model).type == "cuda"
    done = select_attention(model, fast.attention) if fast.attention else []
    wanted = [name for name, on in (("half weights", fast.dtype not in (None, torch.float32)),
                                    ("channels_last", fast.channels_last), ("compile", fast.compile_unet or
                                                                            fast.compile_vae),
                                    ("cudnn benchmark", fast.cudnn_benchmark)) if on]
    if not cuda:
        if wanted:
            logger.info("fast path: %s skipped (CUDA only; the model is on %s)", ", ".join(wanted),
                        model_device(model))
        return done
    if fast.dtype is not None:
        done += cast_weights(model, fast.dtype)
    if fast.channels_last:
        done += to_channels_last(model)
    if fast.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
        done.append("cudnn benchmark")
    if fast.compile_unet or fast.compile_vae:
        done += compile_parts(model, fast.compile_unet, fast.compile_vae, fast.compile_mode)
    return done


def usable_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not on Linux
        return max(1, os.cpu_count() or 1)


def busy_cores() -> float:
    """Cores kept busy by other work: the 1-minute load average (0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover - not on Unix
        return 0.0


def sensible_threads(requested: Optional[int] = None) -> int:
    """CPU threads for torch: ``requested``, else the usable cores that other work leaves idle (at least 1).

    On a shared machine more threads than idle cores can make torch many times slower (threads wait for each
    other at every operation): on 2 cores with one busy, 2 threads took 3 to 35 times as long as 1.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"the number of threads must be at least 1, got {requested}")
        return requested
    cores = usable_cores()
    return max(1, min(cores, cores - round(busy_cores())))


def apply_options(model: nn.Module, opts: Any) -> list[str]:
    """Apply the inference flags (``--tiled_vae``, ``--fast``, ``--compile``, ``--threads``) to a loaded model.

    ``opts`` is an :class:`ldm.inference.args.Options`; flags it lacks count as off.
    """
    done = []
    threads = getattr(opts, "threads", None)
    if threads is not None:
        torch.set_num_threads(sensible_threads(threads))
        done.append(f"{torch.get_num_threads()} CPU threads")
    elif model_device(model).type == "cpu" and sensible_threads() < torch.get_num_threads():
        logger.info("the CPU is busy (load %.1f on %d cores): --threads %d may be much faster than torch's %d",
                    busy_cores(), usable_cores(), sensible_threads(), torch.get_num_threads())
    tile = getattr(opts, "tiled_vae", None)
    vae = getattr(model, "first_stage_model", None)
    if tile is not None and hasattr(vae, "enable_tiling"):
        vae.enable_tiling(tile)
        done.append(f"tiled VAE ({tile} latent cells per tile)")
    compile_mode = getattr(opts, "compile", "off")
    fast = getattr(opts, "fast", False)
    if (fast or compile_mode != "off") and model_device(model).type != "cuda":
        logger.warning("--fast/--compile apply to CUDA GPUs only; ignored on %s", model_device(model))
    elif fast or compile_mode != "off":
        dtype = torch.bfloat16 if getattr(opts, "bf16", False) else torch.float16
        if getattr(opts, "precision", "autocast") == "full":
            dtype = None  # --precision full keeps float32 weights
        selection = FastPath.cuda(dtype, compile_mode) if fast else FastPath(
            compile_unet=True, compile_vae=True, compile_mode=compile_mode)
        done += apply_fast_path(model, selection)
    if done:
        logger.info("speed options: %s", "; ".join(done))
    return done
