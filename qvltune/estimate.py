"""Memory per GPU, host memory, FLOPs and time of a training run, from the model's config.json alone.

No weights are read: ``qvltune.model_stats`` counts parameters per component and finds every linear
layer LoRA would adapt on a model built on the meta device. Everything else is arithmetic on those
counts, the run config and the machine, so the estimate is a pure function
(``estimate``) tested by tables of cases and used by the planner to search ZeRO stages. This
module owns that model (its calibration constants, its terms, the ``Estimate``); its inputs (the
machine, the dataset summary, the worst micro-batch) are built in qvltune.estimate_inputs.

Per GPU, the peak of ``torch.cuda.max_memory_allocated`` is modelled as

    static  = weights + gradients + optimizer states + DeepSpeed buffers (+ ZeRO-3 gathered params)
    peak    = static + max(activations of one micro-batch + logits/loss,  optimizer-step temporaries)

and what ``nvidia-smi`` shows adds ``framework overhead`` (CUDA context, NCCL, allocator slack).
Each term below says where its bytes come from; the named constants are the calibration knobs
(``benchmarks/estimate_accuracy.py`` measures predicted vs real peaks on a GPU machine).

It models the worker as it runs: the Trainer + DeepSpeed ZeRO (qvltune.zero's buckets), torch
AdamW (fused on GPUs, DeepSpeed's CPU Adam when offloading), peft LoRA (adapters and
modules_to_save copies), varlen attention on GPUs (``attn_implementation: auto``; sdpa with a mask
on CPUs or when asked), and the fused chunked loss (qvltune.loss) unless it is turned off. FLOPs per
token follow worker.llm_flops_per_token's 6N rule (N = the LLM's parameters a token passes through;
for the MoE model, its routed experts only); time follows what a step really computes
(qvltune.step_flops).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from qvltune.config import COMPONENTS, RunConfig
from qvltune.estimate_inputs import Machine, Workload, workload_for
from qvltune.model_stats import ModelStats, _adapted_inputs, lora_params
from qvltune.step_flops import Part, sdpa_with_mask, step_parts, uses_fused_loss
from qvltune.step_flops import total as total_flops
from qvltune.units import GiB, format_count
from qvltune.zero import STAGE3_MAX_LIVE_PARAMETERS, ZERO12_BUCKET_SIZE, zero3_values

# ----------------------------------------------------------------------------------------------
# Calibration constants (bytes unless said otherwise)

# Mixed-precision AdamW: bf16 weights and gradients on the GPU, and per trained parameter an fp32
# master copy plus two fp32 moments = 12 bytes (the ZeRO paper, Rajbhandari et al. 2020, sec. 3.1:
# "K = 12"). DeepSpeed keeps gradients in the model dtype unless data_types.grad_accum_dtype says
# otherwise (deepspeed/runtime/engine.py get_data_types), and upcasts the gradient partition to fp32
# only for the optimizer step (stage_1_and_2.py step(); stage3.py _prepare_fp32_grad_for_sub_group).
OPTIMIZER_STATE_BYTES = 12
STEP_FP32_GRAD_BYTES = 4
# torch.optim.AdamW without fused kernels (adamw_torch) keeps foreach temporaries of about one fp32
# copy of the parameters it steps; the fused kernel (adamw_torch_fused, the default on GPUs) none.
FOREACH_STEP_TEMP_BYTES = 4

# ZeRO-1/2 gradient buckets: with contiguous_gradients and overlap_comm (qvltune.zero writes both)
# DeepSpeed allocates two reduce buffers of reduce_bucket_size elements in the gradient dtype
# (stage_1_and_2.py setup_buckets: buf_0 and buf_1) of qvltune.zero's reduce_bucket_size.
# ZeRO-3: one reduce buffer of reduce_bucket_size elements per gradient dtype (stage3.py, with
# contiguous_gradients), the size qvltune.zero derives from the model (zero3_tuning: a decoder
# layer's trained parameters, at least hidden^2). Gathered parameters are kept while they will be reused
# soon (stage3_max_reuse_distance) up to stage3_max_live_parameters (both set by qvltune.zero):
# the largest single tensor (embeddings / lm_head) plus up to that many elements.

# Activations, bytes per token per decoder layer. Derived by listing the tensors autograd saves in
# transformers 5's Qwen3VLTextDecoderLayer with sdpa attention (modeling_qwen3_vl.py):
#   RMSNorm (x2): fp32 copy of the input (4h), + bf16 normalised input for the weight gradient (2h)
#     when norms train, + the bf16 output the next projections save (2h) when their weights train;
#   q/k RMSNorm on each head: the same 4 (+2) bytes per q and k element;
#   RoPE outputs q, k and v (2 each), saved by sdpa, and sdpa's output (2 per q element);
#   o_proj's input (2 per q element) when o_proj trains;
#   SwiGLU: gate, silu(gate) and up (2i each), + the product (2i) when down_proj trains.
# => full training: 16h + 12 q_dim + 10 kv_dim + 8i. LoRA (frozen base) saves fewer base inputs but
# each adapted linear keeps its dropout output (2) and mask (1): 3 bytes per input element.
# optim.compile (qvltune.compiled_layers.compile_blocks): inductor fuses each RMSNorm into one kernel that
# saves its bf16 input and per-token statistics instead of an fp32 copy (-4h per norm, two norms),
# and SwiGLU's silu(gate) is recomputed in backward from the saved gate (-2i). Checked on the H200
# against eager runs of the same configs (benchmarks/RESULTS.md).
COMPILED_SAVES_PER_HIDDEN = 8
COMPILED_SAVES_PER_INTERMEDIATE = 2
# Scale with these two knobs after measuring:
ACT_LLM_SCALE = 1.0
ACT_VISION_SCALE = 1.0
LORA_DROPOUT_BYTES = 3
# Per token outside the decoder layers: input embeddings, the image-feature scatter, final norm.
LLM_EXTRA_PER_HIDDEN = 10
# Vision block (Qwen3VLVisionBlock), bytes per patch when the tower trains: 2 LayerNorms (in + out,
# 8hv), qkv output (6hv, kept whole because v is a view of it), RoPE'd q and k (4hv), attention
# output and proj input (4hv), MLP fc1 output and GELU output (4iv).
VISION_ACT_PER_HIDDEN = 22
VISION_ACT_PER_INTERMEDIATE = 4
# Merger / DeepStack merger (each, when trained), bytes per LLM image token: LayerNorm in/out,
# fc1 output and GELU output, each 4 patches x hv wide in bf16.
MERGER_ACT_PER_VISION_HIDDEN = 32
# Logits and loss (optim.fused_loss: false, or lm_head trained beside LoRA), bytes per token per
# vocabulary entry: the worker upcasts the bf16 logits to fp32 and takes a log-softmax (saved, 4);
# at the start of backward the loss gradient (4) and the log-softmax gradient (4) coexist with it:
# 12 (the forward's 2 + 4 + 4 = 10 is lower).
LOGITS_BYTES_PER_VOCAB = 12
# The fused loss (qvltune.loss, the default) never holds full logits: one chunk of CHUNK_ELEMENTS
# logits at a time (bf16 matmul output 2 + its fp32 copy 4; then the fp32 probabilities, in place,
# and their bf16 copy 2): 6 bytes per element, whatever the number of chunks (each chunk is freed
# before the next, and the allocator reuses its blocks), +4 for the fp32 copy of the gradient when
# lm_head trains. It saves d(loss)/d(hidden) (2 bytes x hidden per labelled token) and, when lm_head
# trains, d(loss)/d(weight) in fp32 (4 x vocab x hidden), which backward scales into another fp32
# (4) and a bf16 (2) copy. (Measured on the H200, benchmarks/RESULTS.md: 12 bytes over-predicted
# every peak with several chunks by ~1.5 GiB.)
FUSED_CHUNK_ELEMENTS = 1 << 28  # qvltune.loss.CHUNK_ELEMENTS
FUSED_BYTES_PER_LOGIT = 6
FUSED_WEIGHT_GRAD_FORWARD = 4
FUSED_WEIGHT_GRAD_BACKWARD = 10
# Backward of one layer needs gradients of its intermediates while its saved tensors still exist:
# about one more layer's activations (two with checkpointing: the recomputed layer and its grads).
BACKWARD_TRANSIENT_LAYERS = 1.0

# What nvidia-smi shows beyond torch.cuda.max_memory_allocated: CUDA context, cuBLAS/NCCL buffers
# (outside PyTorch's allocator) and the caching allocator's fragmentation.
CUDA_CONTEXT_BYTES = 1.0 * GiB
FRAGMENTATION = 0.05
# A plan fits when the total is at most (1 - SAFETY_MARGIN) of the GPU's memory: variable-resolution
# batches and long records make real peaks wander above any single estimate.
SAFETY_MARGIN = 0.10

# Time: the share of the GPUs' bf16 peak at which a step's FLOPs (step_flops.step_parts: what the
# step computes, not the 6N of MFU) run. Reported MFU for bf16 training of 2-30B models with the HF
# Trainer + DeepSpeed is ~30-45%; qvltune's 8B mixed runs on one H200 computed 0.81x their 6N at
# 41-45% MFU: 35% of the peak (benchmarks/RESULTS.md, "Steady state: what a step computes"). CPU
# offload steps the optimizer on the host and stalls the GPUs (ZeRO-Offload paper: roughly
# 0.5-0.8x throughput).
ASSUMED_UTILIZATION = 0.35
OFFLOAD_OPTIMIZER_SPEED = 0.7
OFFLOAD_PARAMS_SPEED = 0.5


# ----------------------------------------------------------------------------------------------
# The estimate


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    note: str


@dataclass(frozen=True)
class ComponentCount:
    component: str
    mode: str
    params: int
    trainable: int  # full-trained parameters + LoRA adapters on this component


@dataclass
class Estimate:
    components: list[ComponentCount]
    total_params: int
    trainable_params: int
    lora_params: int
    world_size: int
    workload: Workload
    gpu_terms: list[Term]  # what the peak is made of (per GPU)
    peak_allocated: float  # comparable to torch.cuda.max_memory_allocated
    overhead: float  # CUDA context + fragmentation (nvidia-smi minus max_memory_allocated)
    host_terms: list[Term]
    host_total: float  # bytes per node
    flops_per_token: float  # 6 x LLM parameters per token (the MFU counting rule of worker.py)
    step_flops_per_token: float  # what a training step really computes per token: the sum of step_parts
    step_parts: list[Part]  # qvltune.step_flops: LoRA, checkpointing, attention, vision, lm_head
    seconds_per_epoch: float | None
    assumptions: list[str] = field(default_factory=list)
    peak_phase: str = "backward"

    @property
    def per_gpu(self) -> float:
        return self.peak_allocated + self.overhead

    def fits(self, gpu_memory: int, margin: float = SAFETY_MARGIN) -> bool:
        return self.per_gpu <= gpu_memory * (1 - margin)

    def host_fits(self, host_ram: int | None, margin: float = SAFETY_MARGIN) -> bool:
        return host_ram is None or self.host_total <= host_ram * (1 - margin)

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["per_gpu"] = self.per_gpu
        return doc


def attention_kind(cfg: RunConfig, machine: Machine) -> str:
    """The attention the worker will run: ``auto`` is varlen where its CUDA kernels exist (GPUs),
    else sdpa (qvltune.model.load_model)."""
    a = cfg.model.attn_implementation
    if a == "auto":
        return "sdpa" if machine.is_cpu else "varlen"
    return a


def _llm_layer_bytes(s: ModelStats, cfg: RunConfig, *, trains_base: bool, lora: bool, repeat_kv: bool) -> float:
    """Bytes saved for backward per token by one decoder layer (see the constants above)."""
    h, q, kv, i = s.hidden, s.heads * s.head_dim, s.kv_heads * s.head_dim, s.intermediate
    base = 8 * h + 4 * (q + kv)  # fp32 copies in the 2 RMSNorms and the q/k norms
    # q, k, v as sdpa saves them: with a mask (padding or packing) transformers repeats k and v to
    # every query head (integrations/sdpa_attention.py use_gqa_in_sdpa), else they stay kv-wide.
    base += 6 * q if repeat_kv else 2 * q + 4 * kv
    base += 2 * q  # sdpa output
    dropout = cfg.lora.dropout > 0
    adapted = _adapted_inputs(s, cfg, "model.language_model.layers.0.") if lora else {}
    if s.is_moe:
        k, m = s.experts_per_token, s.moe_intermediate
        mlp = k * ((4 * h + 8 * m) if trains_base else (2 * h + 6 * m)) + 6 * s.experts
    else:
        mlp = 6 * i + (2 * i if trains_base else 0)
    base += mlp
    if trains_base:
        base += 2 * (2 * h) + 2 * (q + kv) + 2 * (2 * h) + 2 * q  # norm inputs for weight grads, outputs for projections, o_proj input
    if adapted:
        if dropout:
            base += LORA_DROPOUT_BYTES * sum(adapted.values())
        elif not trains_base:
            base += 2 * (2 * h) + (2 * q if "o_proj" in adapted else 0) + (2 * i if "down_proj" in adapted else 0)
    # Compiled MoE layers are counted as eager: 30B-A3B LoRA on an H200 peaked at 87.3 GiB compiled
    # and 92.7 eager against 91.0 predicted for both (benchmarks/RESULTS.md), close enough either way.
    if cfg.optim.compile and not s.is_moe:
        base -= COMPILED_SAVES_PER_HIDDEN * h + COMPILED_SAVES_PER_INTERMEDIATE * i
    return base * ACT_LLM_SCALE


def _vision_block_bytes(s: ModelStats, cfg: RunConfig, lora: bool) -> float:
    hv, iv = s.vision_hidden, s.vision_intermediate
    b = VISION_ACT_PER_HIDDEN * hv + VISION_ACT_PER_INTERMEDIATE * iv
    if lora and cfg.lora.dropout > 0:
        b += LORA_DROPOUT_BYTES * sum(_adapted_inputs(s, cfg, "model.visual.blocks.0.").values())
    return b * ACT_VISION_SCALE


def estimate(cfg: RunConfig, stats: ModelStats, machine: Machine, workload: Workload | None = None) -> Estimate:
    """Memory per GPU and per node, FLOPs per token and time per epoch of ``cfg`` on ``machine``."""
    s = stats
    wl = workload or workload_for(cfg)
    modes = cfg.modes()
    ds = cfg.deepspeed
    W = max(1, machine.world_size)
    bf16 = cfg.optim.bf16
    wbytes = 2 if bf16 else 4  # weights, gradients and activations scale with the dtype
    act_scale = wbytes / 2
    assumptions: list[str] = [wl.assumption] if wl.assumption else []

    # -- parameters ---------------------------------------------------------------------------
    lora = lora_params(s, cfg) if cfg.uses_lora() else dict.fromkeys(COMPONENTS, 0)
    uses_lora = cfg.uses_lora()
    components = []
    full_trained = 0
    saved_copies = 0  # peft modules_to_save: a trainable copy beside the frozen original
    for c in COMPONENTS:
        n = s.params[c]
        full = n if modes[c] == "full" else 0
        full_trained += full
        if uses_lora and modes[c] == "full":
            saved_copies += n
        components.append(ComponentCount(c, modes[c], n, full + lora[c]))
    n_lora = sum(lora.values())
    trainable = full_trained + n_lora
    n_weights = s.total + n_lora + saved_copies  # everything resident as model weights

    # -- static memory: weights, gradients, optimizer states, buffers -------------------------
    gpu: list[Term] = []
    host: list[Term] = []
    stage = ds.stage
    part = W if stage >= 1 else 1  # optimizer states are partitioned from stage 1
    ranks_per_node = machine.gpus_per_node or machine.cpu_processes
    if stage == 3 and ds.offload_params:
        host.append(Term("weights (offloaded)", wbytes * n_weights / W * ranks_per_node, "ZeRO-3 param offload: the partitions of this node's ranks, pinned host memory"))
    elif stage == 3:
        gpu.append(Term("weights", wbytes * n_weights / W, f"{'bf16' if bf16 else 'fp32'}, {format_count(n_weights)} parameters partitioned over {W} rank(s) (ZeRO-3)"))
    else:
        gpu.append(Term("weights", wbytes * n_weights, f"{'bf16' if bf16 else 'fp32'}, all {format_count(n_weights)} parameters on every rank (ZeRO-{stage})"))
    if stage == 3:
        live = wbytes * (s.largest_tensor + min(STAGE3_MAX_LIVE_PARAMETERS, s.total - s.largest_tensor))
        gpu.append(Term("gathered parameters", live, f"ZeRO-3 working set: the largest tensor + up to {STAGE3_MAX_LIVE_PARAMETERS:.0e} live parameters (stage3_max_live_parameters)"))

    grad_part = W if stage >= 2 else 1
    if trainable:
        if ds.offload_optimizer:
            per_rank = (OPTIMIZER_STATE_BYTES + STEP_FP32_GRAD_BYTES) * trainable / W
            host.append(Term("optimizer states (offloaded)", per_rank * ranks_per_node, "fp32 master + 2 moments + fp32 gradients of each rank's partition, pinned host memory (ZeRO-Offload)"))
        else:
            gpu.append(Term("gradients", wbytes * trainable / grad_part, f"{'bf16' if bf16 else 'fp32'} gradients of {format_count(trainable)} trained parameters" + (f", partitioned over {W}" if grad_part > 1 else "")))
            states = (OPTIMIZER_STATE_BYTES if bf16 else 8) * trainable / part
            gpu.append(Term("optimizer states", states, ("fp32 master + " if bf16 else "") + "AdamW's 2 fp32 moments" + (f", partitioned over {W}" if part > 1 else "")))
        if stage in (1, 2):
            gpu.append(Term("gradient buckets", 2 * ZERO12_BUCKET_SIZE * wbytes, "DeepSpeed's two reduce buffers of reduce_bucket_size (5e8) elements"))
        elif stage == 3:
            bucket = zero3_values(cfg, s)["reduce_bucket_size"]  # the config's, else qvltune.zero's from the model's sizes
            gpu.append(Term("gradient buckets", bucket * wbytes, f"DeepSpeed's reduce buffer of reduce_bucket_size ({bucket:,}) elements (ZeRO-3, stage3.py: one per gradient dtype)"))

    # -- activations of one micro-batch --------------------------------------------------------
    t, img = wl.tokens, wl.image_tokens
    ckpt = cfg.optim.gradient_checkpointing
    llm_trains = modes["llm"] != "frozen"
    attention = attention_kind(cfg, machine)
    masked = sdpa_with_mask(attention, cfg.data.packing, wl.rows)
    # transformers' eager attention, and its sdpa with a mask, repeat k and v to every query head
    repeat_kv = masked or attention == "eager"
    layer = _llm_layer_bytes(s, cfg, trains_base=modes["llm"] == "full", lora=modes["llm"] == "lora", repeat_kv=repeat_kv) * act_scale
    act_terms: list[Term] = []
    if llm_trains or any(modes[c] != "frozen" for c in ("vision", "merger", "deepstack")):
        if ckpt:
            act_terms.append(Term("LLM activations", t * (s.layers * 2 * s.hidden * act_scale + layer * (1 + BACKWARD_TRANSIENT_LAYERS)), f"checkpointed: each of {s.layers} layers keeps its input; one layer is recomputed at a time"))
        else:
            act_terms.append(Term("LLM activations", t * layer * (s.layers + BACKWARD_TRANSIENT_LAYERS), f"{layer / 1024:.0f} KiB per token per layer x {s.layers} layers, {t:,} tokens"))
        act_terms.append(Term("embeddings, final norm", t * LLM_EXTRA_PER_HIDDEN * s.hidden * act_scale, "per token outside the decoder layers"))
        if cfg.model.attn_implementation == "eager":
            act_terms.append(Term("eager attention scores", wl.rows * s.heads * (t / wl.rows) ** 2 * 6 * (1 if ckpt else s.layers), "softmax in fp32 + bf16 copy per head (use sdpa)"))
        elif masked:
            act_terms.append(Term("attention mask", wl.rows * (t / wl.rows) ** 2, "one boolean (rows x seq x seq) mask shared by the layers"))
    patches = img * s.spatial_merge**2
    if modes["vision"] != "frozen" and patches:
        vb = _vision_block_bytes(s, cfg, modes["vision"] == "lora") * act_scale
        if ckpt:
            v = patches * (s.vision_depth * 2 * s.vision_hidden * act_scale + vb * (1 + BACKWARD_TRANSIENT_LAYERS))
            act_terms.append(Term("vision activations", v, f"checkpointed: {patches:,} patches, one block recomputed at a time"))
        else:
            act_terms.append(Term("vision activations", patches * vb * (s.vision_depth + BACKWARD_TRANSIENT_LAYERS), f"{patches:,} patches x {s.vision_depth} blocks"))
    trained_mergers = (modes["merger"] != "frozen") + (s.deepstack if modes["deepstack"] != "frozen" else 0)
    if img and (trained_mergers or llm_trains):
        m = img * (trained_mergers * MERGER_ACT_PER_VISION_HIDDEN * s.vision_hidden + (1 + s.deepstack) * 2 * s.vision_out) * act_scale
        act_terms.append(Term("merger activations", m, f"{img:,} image tokens through {trained_mergers} trained merger(s), + the visual features held for the LLM"))
    head_trains = modes["lm_head"] == "full"
    if uses_fused_loss(cfg):
        n = max(1, int(t * wl.label_share))
        chunk_rows = max(1, FUSED_CHUNK_ELEMENTS // s.vocab)
        per_logit = FUSED_BYTES_PER_LOGIT + (4 if head_trains else 0)
        forward = min(n, chunk_rows) * s.vocab * per_logit + (FUSED_WEIGHT_GRAD_FORWARD * s.vocab * s.hidden if head_trains else 0)
        backward = FUSED_WEIGHT_GRAD_BACKWARD * s.vocab * s.hidden if head_trains else 0
        logits = n * s.hidden * wbytes + max(forward, backward)
        act_terms.append(Term("loss (fused)", logits, f"{n:,} labelled tokens, logits {min(n, chunk_rows):,} rows at a time" + (", + the fp32 lm_head gradient" if head_trains else "")))
    else:
        logits = t * s.vocab * LOGITS_BYTES_PER_VOCAB
        if head_trains:
            logits = max(logits, t * s.vocab * 4 + wbytes * s.vocab * s.hidden)  # + the lm_head weight gradient
        act_terms.append(Term("logits + loss", logits, f"{t:,} tokens x {s.vocab:,} vocabulary: fp32 log-softmax and its gradients"))
    activations = sum(x.bytes for x in act_terms)

    step_temp = 0.0
    if trainable and not ds.offload_optimizer:
        step_temp = STEP_FP32_GRAD_BYTES * trainable / grad_part
        if cfg.optim.optimizer != "adamw_torch_fused" or machine.is_cpu:
            step_temp += FOREACH_STEP_TEMP_BYTES * trainable / part
    static = sum(x.bytes for x in gpu)
    phase = "backward" if activations >= step_temp else "optimizer step"
    if activations >= step_temp:
        gpu += act_terms
    else:
        gpu.append(Term("optimizer-step temporaries", step_temp, "the fp32 copy of the gradient partition (and foreach temporaries)"))
        assumptions.append(f"the peak is the optimizer step (activations {activations / GiB:.1f} GiB are freed by then)")
    peak = static + max(activations, step_temp)
    overhead = CUDA_CONTEXT_BYTES + FRAGMENTATION * peak if not machine.is_cpu else 0.0
    if machine.is_cpu:
        assumptions.append("CPU mode: the numbers are host memory per process")

    # -- FLOPs and time ------------------------------------------------------------------------
    flops_rule = 6.0 * s.llm_active_params()  # worker.llm_flops_per_token's rule (active experts for MoE)
    parts = step_parts(cfg, s, wl, attention)
    step = total_flops(parts)
    if cfg.stage == "dpo":
        ref = next(p for p in parts if p.kind == "reference")
        assumptions.append(f"DPO: two sequences per pair; the reference ({cfg.preference().reference}) adds {ref.flops / step:.0%} of the compute")
    seconds = None
    if wl.tokens_per_epoch and machine.peak_tflops and not machine.is_cpu:
        speed = ASSUMED_UTILIZATION * (OFFLOAD_OPTIMIZER_SPEED if ds.offload_optimizer else 1.0) * (OFFLOAD_PARAMS_SPEED if ds.offload_params else 1.0)
        seconds = wl.tokens_per_epoch * step / (W * machine.peak_tflops * 1e12 * speed)
        assumptions.append(f"time at {speed:.0%} of the GPUs' bf16 peak ({machine.peak_tflops:g} TFLOP/s each)")
    host_total = sum(x.bytes for x in host)
    return Estimate(
        components=components,
        total_params=s.total,
        trainable_params=trainable,
        lora_params=n_lora,
        world_size=W,
        workload=wl,
        gpu_terms=gpu,
        peak_allocated=peak,
        overhead=overhead,
        host_terms=host,
        host_total=host_total,
        flops_per_token=flops_rule,
        step_flops_per_token=step,
        step_parts=parts,
        seconds_per_epoch=seconds,
        assumptions=assumptions,
        peak_phase=phase,
    )


def overhead_term(est: Estimate) -> Term:
    return Term("framework overhead", est.overhead, f"CUDA context + NCCL ({CUDA_CONTEXT_BYTES / GiB:.1f} GiB) + {FRAGMENTATION:.0%} allocator fragmentation")
