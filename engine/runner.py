"""The decode runner: static buffers, CUDA graphs per batch-size bucket, on-device sampling.

    runner = DecodeRunner(model, pool)          # graphs on CUDA, eager elsewhere
    runner.capture()                            # CUDA: one graph per (bucket, sampler kind)
    tokens, logits = runner.decode(states, ids, params)   # advances each state's length

Only this module knows about CUDA graphs. A step copies the live rows' (slot, position, id,
sampling params) into static device buffers, pads to the smallest bucket >= the live rows
(1, 2, 4, 8, 16, 32) with rows on the pool's scratch slot (position 0, id 0, greedy), and
replays that bucket's graph, or runs the same function eagerly (CPU; `graphs=False`; a
batch larger than every bucket; a bucket whose capture failed, e.g. while the MoE still
syncs). The captured function is `engine.decode.DecodeStep` plus the sampler below, writing
logits [B, V] fp32 and tokens [B] int64 into static output buffers; they stay valid until
the next step. Graphs are captured largest bucket first and share one memory pool.

Sampling without a host sync: greedy is argmax; temperature / top-k / top-p follow
engine.sampling.filter_top_k_top_p (same rules, per-row parameters in static buffers, one
descending sort) and draw by the exponential race argmax(p / Exp(1)) from the runner's
device generator. Two graphs per bucket: "greedy" (no sort, no RNG) and "sample". Requests
the graph cannot sample as the reference would - a seed with temperature > 0 (its own
generator stream), a logits mask, or any sampling field beyond max_tokens / temperature /
top_p / top_k / stop / stop_token_ids / ignore_eos (penalties, logprobs, ... as
engine.sampling grows) - take their row's logits to the reference `Sampler` instead
(`graph_can_sample(params)`); the forward itself stays in the graph.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import torch

from engine import kernels
from engine.cache import SequenceState
from engine.decode import DecodeStep
from engine.kv import SlotPool
from engine.model import Transformer
from engine.moe import stack_all_experts
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)

GRAPH_BUCKETS = (1, 2, 4, 8, 16, 32)
# fields the in-graph sampler honours itself or that only the host loop reads
_GRAPH_FIELDS = frozenset({"max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                           "stop_token_ids", "ignore_eos"})
_DEFAULTS = SamplingParams()


def graph_can_sample(params: SamplingParams) -> bool:
    """Whether the runner's in-graph sampler serves `params` as the reference Sampler would
    (up to the random stream). False: sample the row's logits with engine.sampling."""
    for f in dataclasses.fields(params):
        if f.name in _GRAPH_FIELDS:
            continue
        value, default = getattr(params, f.name), getattr(_DEFAULTS, f.name)
        if value is default:
            continue
        if default is None or value != default:
            return False
    return params.greedy or params.seed is None


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                top_p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits [B, V] fp32: argmax where temperature[b] == 0, else a draw
    from softmax(logits / t) restricted to the top-k (0 = off) and the top-p nucleus (1 = off)
    exactly as engine.sampling.filter_top_k_top_p restricts it. No host sync."""
    V = logits.shape[-1]
    greedy = logits.argmax(-1)
    t = torch.where(temperature > 0, temperature, 1.0).unsqueeze(-1)
    ordered, order = (logits / t).sort(dim=-1, descending=True)  # [B, V]
    k = torch.where((top_k > 0) & (top_k < V), top_k, V).unsqueeze(-1)
    ordered = ordered.masked_fill(ordered < ordered.gather(1, k - 1), float("-inf"))
    probs = ordered.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs
    # top_p == 1 is off (a cumsum can round past 1.0 on the tail and would cut it)
    cut = torch.where(top_p < 1, top_p, float("inf")).unsqueeze(-1)
    probs = ordered.masked_fill(before >= cut, float("-inf")).softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    drawn = order.gather(1, (probs / race).argmax(-1, keepdim=True))[:, 0]
    return torch.where(temperature > 0, drawn, greedy)


class DecodeRunner:
    def __init__(self, model: Transformer, pool: SlotPool, *,
                 buckets: Sequence[int] = GRAPH_BUCKETS, graphs: bool | None = None,
                 seed: int = 0) -> None:
        self.model = model
        self.pool = pool
        # the routed-expert kernels read the experts stacked (the Linears become views)
        stack_all_experts(model)
        self.step_fn = DecodeStep(model, pool)
        self.device = model.embed.weight.device
        cuda = self.device.type == "cuda"
        self.use_graphs = cuda if graphs is None else graphs  # the switch: False = eager
        # buckets up to the first that holds every slot: larger ones would only pad
        wanted = sorted(set(buckets))
        cover = next((b for b in wanted if b >= pool.max_seqs), wanted[-1] if wanted else 0)
        self.buckets = tuple(b for b in wanted if b <= cover)
        size = max([*self.buckets, pool.max_seqs])
        dev, V = self.device, model.config.vocab_size
        self.ids = torch.zeros(size, dtype=torch.int64, device=dev)
        self.slots = torch.full((size,), pool.scratch_slot, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(size, dtype=torch.int64, device=dev)
        self.temperature = torch.zeros(size, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(size, dtype=torch.int64, device=dev)
        self.top_p = torch.ones(size, dtype=torch.float32, device=dev)
        self.logits = torch.zeros(size, V, dtype=torch.float32, device=dev)
        self.tokens = torch.zeros(size, dtype=torch.int64, device=dev)
        self.generator = torch.Generator(device=dev).manual_seed(seed)
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.capture_errors: dict[int, str] = {}

    # -- the captured function -----------------------------------------------------------------

    def _forward(self, B: int, sample: bool) -> None:
        logits = self.step_fn(self.ids[:B], self.slots[:B], self.positions[:B])
        if sample:
            tokens = sample_rows(logits, self.temperature[:B], self.top_k[:B], self.top_p[:B],
                                 self.generator)
        else:
            tokens = logits.argmax(-1)
        self.logits[:B].copy_(logits)
        self.tokens[:B].copy_(tokens)

    def _park(self) -> None:
        """Every row on the scratch slot: what warm-up and capture run on."""
        self.slots.fill_(self.pool.scratch_slot)
        self.positions.zero_()
        self.ids.zero_()
        self.temperature.fill_(1.0)
        self.top_k.zero_()
        self.top_p.fill_(1.0)

    @torch.inference_mode()
    def capture(self, kinds: Sequence[bool] = (False, True)) -> dict[tuple[int, bool], str]:
        """Capture a graph per (bucket, sampler kind: False greedy, True sample), largest
        bucket first, one memory pool. First a probe step under the sync debug mode: a step
        that syncs the host is not captured at all. The first failure stops capturing (its
        cause is the same for every bucket): what has no graph runs eagerly. Returns the
        error per (bucket, kind) that has no graph."""
        if not self.use_graphs or self.device.type != "cuda" or not kinds:
            return {}
        errors: dict[tuple[int, bool], str] = {}
        mempool = None
        generator_ok = hasattr(torch.cuda.CUDAGraph, "register_generator_state")
        if not generator_ok:  # older torch: only the default generator is graph-safe
            self.generator = None
        probe = self._host_sync_probe(max(kinds))
        if probe is not None:  # a capture would fail on it: do not try (it can leave junk)
            log.warning("decode step syncs the host, no CUDA graphs (eager decode): %s", probe)
            errors = {(B, k): probe for B in self.buckets for k in kinds}
            self.capture_errors = {b: probe for b in self.buckets}
            return errors
        for B in sorted(self.buckets, reverse=True):
            for sample in kinds:
                self._park()
                try:
                    side = torch.cuda.Stream(self.device)
                    side.wait_stream(torch.cuda.current_stream(self.device))
                    # the kernels as the graph launches them (engine.kernels.pdl_launch): the
                    # warm-up compiles those variants, so the capture compiles nothing
                    with kernels.graph_launches():
                        with torch.cuda.stream(side):
                            for _ in range(2):  # warm-up: allocator, cuBLAS, Triton JIT
                                self._forward(B, sample)
                        torch.cuda.current_stream(self.device).wait_stream(side)
                        graph = torch.cuda.CUDAGraph()
                        if sample and self.generator is not None:
                            graph.register_generator_state(self.generator)
                        with torch.cuda.graph(graph, pool=mempool):
                            self._forward(B, sample)
                    mempool = graph.pool()
                    self.graphs[(B, sample)] = graph
                except Exception as e:  # e.g. a host sync inside the step: stay eager
                    errors[(B, sample)] = f"{type(e).__name__}: {e}"
                    log.warning("decode graph capture failed for bucket %d (%s): %s; it and "
                                "the buckets not captured yet run eagerly", B,
                                "sample" if sample else "greedy", e)
                    torch.cuda.synchronize(self.device)
                    break
            if errors:  # systemic (a sync, an uncapturable op): do not retry per bucket
                break
        self._park()
        self.capture_errors = {b: msg for (b, _), msg in errors.items()}
        return errors

    def _host_sync_probe(self, sample: bool) -> str | None:
        """Run the smallest bucket once plainly (one-time caches may copy from the host), then
        once under torch.cuda.set_sync_debug_mode("error"): the first op that synchronises
        (.item(), .tolist(), nonzero, a pageable host copy) raises here, named, instead of
        breaking a capture. None if the step is sync-free."""
        B = min(self.buckets) if self.buckets else 1
        self._park()
        self._forward(B, sample)
        torch.cuda.synchronize(self.device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            self._forward(B, sample)
        except RuntimeError as e:
            return f"{type(e).__name__}: {e}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize(self.device)
        return None

    # -- a step --------------------------------------------------------------------------------

    def bucket(self, n: int) -> int:
        """The static batch size n live rows run at (n itself beyond the largest bucket)."""
        return next((b for b in self.buckets if b >= n), n)

    @torch.inference_mode()
    def step(self, slots: Sequence[int], positions: Sequence[int],
             ids: Sequence[int] | torch.Tensor,
             params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode one token for each live row; returns (tokens [n] int64, logits [n, V] fp32),
        views of the static outputs (valid until the next step). Rows whose params the graph
        cannot sample get greedy tokens here: sample their logits with engine.sampling."""
        n = len(slots)
        if not 0 < n == len(positions) == len(params) or len(ids) != n:
            raise ValueError("slots, positions, ids and params need one entry per row")
        if max(positions) >= self.pool.max_len or min(positions) < 0:
            raise ValueError(f"positions must be in 0..{self.pool.max_len - 1}")
        if not 0 <= min(slots) <= max(slots) < self.pool.max_seqs or len(set(slots)) != n:
            raise ValueError(f"slots must be distinct and in 0..{self.pool.max_seqs - 1}")
        B = self.bucket(n)
        pad = B - n
        on_graph = [graph_can_sample(p) for p in params]
        temps = [p.temperature if ok else 0.0 for p, ok in zip(params, on_graph, strict=True)]
        sample = any(t > 0 for t in temps)
        pin = self.device.type == "cuda"
        ints = torch.tensor([[*slots, *[self.pool.scratch_slot] * pad],
                             [*positions, *[0] * pad],
                             [*(p.top_k for p in params), *[0] * pad]],
                            dtype=torch.int64, pin_memory=pin)
        floats = torch.tensor([[*temps, *[0.0] * pad], [*(p.top_p for p in params), *[1.0] * pad]],
                              dtype=torch.float32, pin_memory=pin)
        self.slots[:B].copy_(ints[0], non_blocking=True)
        self.positions[:B].copy_(ints[1], non_blocking=True)
        self.top_k[:B].copy_(ints[2], non_blocking=True)
        self.temperature[:B].copy_(floats[0], non_blocking=True)
        self.top_p[:B].copy_(floats[1], non_blocking=True)
        if isinstance(ids, torch.Tensor):
            self.ids[:n].copy_(ids.reshape(-1))
        else:
            self.ids[:n].copy_(torch.tensor(list(ids), dtype=torch.int64, pin_memory=pin),
                               non_blocking=True)
        self.ids[n:B].zero_()
        graph = self.graphs.get((B, sample)) if self.use_graphs else None
        if graph is not None:
            graph.replay()
        else:
            self._forward(B, sample)
        return self.tokens[:n], self.logits[:n]

    def decode(self, states: Sequence[SequenceState], ids: Sequence[int] | torch.Tensor,
               params: Sequence[SamplingParams]) -> tuple[torch.Tensor, torch.Tensor]:
        """`step` for sequences viewing this runner's pool; advances each state's length, as
        Transformer.forward does."""
        if any(s.slot is None for s in states):
            raise ValueError("a sequence state that is not in the runner's pool")
        out = self.step([s.slot for s in states], [s.length for s in states], ids, params)
        for s in states:
            s.length += 1
        return out
