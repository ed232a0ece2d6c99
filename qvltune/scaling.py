"""Time per optimizer step on N GPUs x M nodes, from one GPU's measured rate (pure).

The compute of a step is what one GPU measured for the same config (real tokens/s), so everything
hard to model -- kernels, the host, the data -- is in the input. What changes with the GPU count is
added on top:

- **communication** by ZeRO stage, from the model's sizes (ring collectives: each rank sends and
  receives (W-1)/W of the buffer): ZeRO-0..2 reduce-scatter the trained parameters' bf16 gradients
  at every micro-batch (overlapped with the backward, ``overlap_comm``) and all-gather the updated
  parameters after the optimizer step; ZeRO-3 all-gathers every parameter (frozen ones too) in the
  forward and the backward (and in the recomputed forward with checkpointing), overlapped with
  compute by prefetching, and reduce-scatters the gradients;
- **bandwidth**: NVLink within a node; across nodes each GPU gets its node's inter-node bandwidth
  divided by its GPUs (the ring's slowest hop); a ring collective reaches ``COLLECTIVE_EFFICIENCY``
  of the link;
- **overheads measured on 2 H200s** (``benchmarks/scaling_validation.py`` fits them and checks the
  other runs): a fixed share of the compute once there are several ranks (synchronisation, ranks
  sharing the host's CPU), the host cost of each ZeRO-3 gather, and the CPU optimizer step of
  ZeRO-Offload per trained parameter;
- **compiled layers hide ZeRO-3's hooks** (fitted on one H200): an eager step is already bound by
  the host launching its kernels, so the hooks' host time adds to it; with compiled decoder layers
  the host runs ahead of the GPU and the hooks cost only what outlasts a share of the micro-batch's
  GPU time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

# Link bandwidth per GPU and direction, GB/s: NVLink 4 on H100/H200 SXM (900 GB/s both ways), NVLink 3
# on A100 SXM (600 both ways), NVLink 5 on B200 (1.8 TB/s); other GPUs talk over PCIe 4 x16 (~25 usable).
NVLINK_GBS = (("GH200", 450.0), ("H200", 450.0), ("H100", 450.0), ("B200", 900.0), ("A100", 300.0), ("A800", 200.0))
PCIE_GBS = 25.0
# Across nodes, per node: 8 x 400 Gb/s InfiniBand NDR (one NIC per GPU, the HGX H100/H200 reference
# design) = 400 GB/s. Override with --internode-gbs: e.g. 4 x 200 Gb/s HDR = 100, 2 x 100 GbE = 25.
DEFAULT_INTERNODE_GBS = 400.0
# What a large ring all-gather / reduce-scatter reaches of the link (NCCL's bus bandwidth on NVLink
# and InfiniBand is typically 75-85% of the line rate).
COLLECTIVE_EFFICIENCY = 0.8

# Fitted on 2 x H200 (benchmarks/results/multi-gpu-run3.json; see scaling_validation.py):
# several ranks cost this share of the compute beyond communication (2B mixed, compiled ZeRO-2: 92% per GPU).
MULTI_RANK_OVERHEAD = 0.0924
# each ZeRO-3 gather of a module (DeepSpeed's pre-forward/backward hook, its host synchronisation,
# allocation, the release), per pass (2B mixed, eager, block gathers: 70% of one GPU's eager rate).
GATHER_SECONDS = 0.00214
# ZeRO-Offload: DeepSpeed's CPU Adam and the host<->device copies, per trained parameter and step.
OFFLOAD_SECONDS_PER_PARAM = 2.15e-9
# Fitted on one H200 (benchmarks/results/zero3/8b.json: 8B full, 25 layers, 4,096-token rows, compiled
# ZeRO-3 at 0.89x compiled ZeRO-2): with compiled layers the ZeRO-3 hooks of a micro-batch hide behind
# this share of its GPU time; only what is left over adds to the step.
COMPILED_HOOK_HIDING = 0.769


@dataclass(frozen=True)
class Network:
    intra_gbs: float  # per GPU, within a node (NVLink or PCIe), GB/s
    inter_gbs: float  # per node, across nodes (InfiniBand, Ethernet), GB/s

    @classmethod
    def for_gpu(cls, gpu_name: str | None, *, intra_gbs: float | None = None, inter_gbs: float | None = None) -> Network:
        default = next((gbs for fragment, gbs in NVLINK_GBS if gpu_name and fragment.lower() in gpu_name.lower()), PCIE_GBS)
        return cls(intra_gbs or default, inter_gbs or DEFAULT_INTERNODE_GBS)

    def per_gpu_gbs(self, gpus_per_node: int, nodes: int) -> float:
        """What one rank's ring collective moves per second: NVLink alone within a node; across
        nodes the slower of NVLink and the GPU's share of its node's network."""
        link = self.intra_gbs if nodes == 1 else min(self.intra_gbs, self.inter_gbs / gpus_per_node)
        return link * COLLECTIVE_EFFICIENCY


@dataclass(frozen=True)
class StepInputs:
    """One optimizer step of one rank, and the model's sizes."""

    rate: float  # real tokens/s one GPU measured for this config (ZeRO-0..2, i.e. without ZeRO-3's hooks)
    tokens_per_micro: float  # real tokens per micro-batch per rank
    micro_batches: int  # micro-batches per rank per optimizer step (gradient accumulation)
    total_params: int  # every parameter: ZeRO-3 gathers them all, frozen ones too
    trained_params: int  # gradients reduced, optimizer partitioned
    stage: int
    offload: bool = False
    checkpointing: bool = False
    gathers: int = 0  # ZeRO-3: modules gathered per pass (transformer blocks whole + the rest)
    bytes_per_param: int = 2  # bf16 weights and gradients
    compiled: bool = False  # compiled decoder layers (optim.compile): the host runs ahead of the GPU


@dataclass(frozen=True)
class StepTime:
    gpus_per_node: int
    nodes: int
    compute: float  # seconds per optimizer step
    communication: float  # all collectives of the step, if nothing overlapped
    exposed: float  # the part of it not hidden behind compute
    overhead: float  # several ranks, ZeRO-3 hooks, offloaded optimizer step
    total: float
    tokens_per_s: float  # real tokens/s over all GPUs
    efficiency: float  # per-GPU rate vs one GPU without ZeRO-3 (1.0 = perfect scaling)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    def to_json(self) -> dict:
        return {**asdict(self), "world_size": self.world_size}


def step_time(inp: StepInputs, gpus_per_node: int, nodes: int, network: Network) -> StepTime:
    """Seconds per optimizer step and real tokens/s for ``gpus_per_node`` x ``nodes`` GPUs."""
    world = gpus_per_node * nodes
    micro = inp.tokens_per_micro / inp.rate  # compute of one micro-batch
    compute = inp.micro_batches * micro
    ring = (world - 1) / world
    bandwidth = network.per_gpu_gbs(gpus_per_node, nodes) * 1e9
    grads = inp.trained_params * inp.bytes_per_param * ring / bandwidth  # one reduce-scatter
    passes = 3 if inp.checkpointing else 2  # forward, backward (+ the recomputed forward)
    if inp.stage == 3:
        gather = passes * inp.total_params * inp.bytes_per_param * ring / bandwidth
        per_micro = gather + grads
        communication = inp.micro_batches * per_micro
        exposed = inp.micro_batches * max(0.0, per_micro - micro)  # prefetching overlaps gathers with compute
        hooks = passes * inp.gathers * GATHER_SECONDS  # host time per micro-batch, also at world size 1
        if inp.compiled:
            hooks = max(0.0, hooks - COMPILED_HOOK_HIDING * micro)
        overhead = inp.micro_batches * hooks
    else:
        params = inp.trained_params * inp.bytes_per_param * ring / bandwidth  # after the optimizer step
        communication = inp.micro_batches * grads + params
        exposed = inp.micro_batches * max(0.0, grads - micro * 2 / 3) + params  # reduce overlaps the backward (~2/3 of it)
        overhead = 0.0
    if world > 1:
        overhead += MULTI_RANK_OVERHEAD * compute
    if inp.offload:
        overhead += inp.trained_params * OFFLOAD_SECONDS_PER_PARAM
    total = compute + exposed + overhead
    tokens = world * inp.micro_batches * inp.tokens_per_micro / total
    return StepTime(gpus_per_node, nodes, compute, communication, exposed, overhead, total, tokens, tokens / world / inp.rate)


def compute_rate_from_run(measured_tokens_per_s: float, inp: StepInputs, gpus_per_node: int, nodes: int, network: Network) -> float:
    """The one-GPU rate implied by a run measured on ``gpus_per_node`` x ``nodes`` GPUs (the model
    inverted), for configs that do not fit one GPU: bisection on ``rate``."""
    from dataclasses import replace

    lo, hi = measured_tokens_per_s / (gpus_per_node * nodes) / 4, measured_tokens_per_s * 4
    for _ in range(100):
        mid = (lo + hi) / 2
        if step_time(replace(inp, rate=mid), gpus_per_node, nodes, network).tokens_per_s < measured_tokens_per_s:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def zero3_gathers(layers: int, vision_blocks: int, deepstack: int) -> int:
    """Modules ZeRO-3 gathers per pass with qvltune's leaf blocks (``zero.zero3_leaf_blocks``):
    each decoder layer and vision block whole, plus the embeddings, patch and position embeddings,
    the merger, the DeepStack mergers, the final norm and lm_head one by one."""
    return layers + vision_blocks + deepstack + 6


def inputs_for(cfg, est, stats, rate: float) -> StepInputs:
    """The step of a run config as ``qvltune estimate`` sees it (``estimate.Estimate`` and
    ``ModelStats``): its micro-batch, accumulation, ZeRO stage and the model's sizes."""
    return StepInputs(
        rate=rate,
        tokens_per_micro=est.workload.tokens,
        micro_batches=cfg.optim.grad_accum,
        total_params=est.total_params,
        trained_params=est.trainable_params,
        stage=cfg.deepspeed.stage,
        offload=cfg.deepspeed.offload_optimizer,
        checkpointing=bool(cfg.optim.gradient_checkpointing),
        gathers=zero3_gathers(stats.layers, stats.vision_depth, stats.deepstack),
        compiled=bool(cfg.optim.compile),
    )


def assumed_rate(step_flops_per_token: float, peak_tflops: float, utilization: float) -> float:
    """One GPU's real tokens/s when none was measured: the step's FLOPs at an assumed share of the peak."""
    return peak_tflops * 1e12 * utilization / step_flops_per_token
