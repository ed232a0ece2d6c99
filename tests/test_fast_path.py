"""The fast training path computes what the plain path computes: fused chunked loss == full-logits
cross-entropy (value and gradients), varlen attention == masked sdpa on packed rows."""

from __future__ import annotations

import pytest
import torch

from qvltune import loss as loss_mod
from qvltune.attention import cu_seqlens, varlen_attention_forward
from qvltune.data.packing import PackedCollator, PaddedCollator, RopeIndex
from qvltune.data.tokenize import Encoder
from qvltune.loss import IGNORE_INDEX, LossHead, install_loss_head, linear_cross_entropy, loss_positions
from test_packing import records

MODEL_INPUTS = ("input_ids", "mm_token_type_ids", "position_ids", "pixel_values", "image_grid_thw", "attention_mask", "use_cache", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@pytest.mark.parametrize("chunk_elements", [1 << 28, 7 * 50])  # one chunk, and 7-row chunks
def test_linear_cross_entropy_matches_full_logits(monkeypatch, chunk_elements):
    monkeypatch.setattr(loss_mod, "CHUNK_ELEMENTS", chunk_elements)
    torch.manual_seed(0)
    hidden = torch.randn(23, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (23,))
    targets[[0, 5, 6, 22]] = IGNORE_INDEX
    ours = linear_cross_entropy(hidden, weight, targets)
    (ours * 0.7).backward()
    gh, gw = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    (ref * 0.7).backward()
    assert torch.allclose(ours, ref, rtol=1e-10)
    assert torch.allclose(gh, hidden.grad, rtol=1e-8) and torch.allclose(gw, weight.grad, rtol=1e-8)


def test_frozen_weight_gets_no_gradient_and_no_grad_mode_is_cheap():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(10, 8)
    linear_cross_entropy(hidden, weight, torch.tensor([1, 2, -100, 3])).backward()
    assert hidden.grad is not None and weight.grad is None
    with torch.no_grad():
        assert linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 3, 4])).requires_grad is False


def test_loss_positions():
    labels = torch.tensor([[-100, -100, 5, 6, -100], [-100, 7, -100, -100, -100]])
    index, targets = loss_positions(labels)
    assert index.tolist() == [1, 2, 5] and targets.tolist() == [5, 6, 7]


def test_varlen_fallback_equals_block_diagonal_sdpa():
    torch.manual_seed(0)
    b, hq, hkv, n, d = 2, 4, 2, 9, 8
    q, k, v = torch.randn(b, hq, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    lengths = [4, 5, 2, 3, 4]  # row 0: 4+5, row 1: 2+3+4
    out, _ = varlen_attention_forward(None, q, k, v, None, cu_seq_lens_q=cu_seqlens(lengths), max_length_q=5)
    seg = torch.tensor([0] * 4 + [1] * 5 + [2] * 2 + [3] * 3 + [4] * 4).view(b, n)
    allowed = (seg[:, :, None] == seg[:, None, :]) & torch.ones(n, n, dtype=torch.bool).tril()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed[:, None])
    assert torch.allclose(out, ref.transpose(1, 2), atol=1e-6)


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    from qvltune.model import load_model

    plain = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa").eval()
    fast = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="varlen").eval()
    return plain, fast


def test_fast_path_loss_equals_plain_path(tmp_path, models, tiny_processor):
    """Packed rows + varlen attention + fused loss vs padded rows + sdpa + full logits."""
    plain, fast = models
    head = install_loss_head(fast)
    assert isinstance(head, LossHead) and head.weight is fast.model.language_model.embed_tokens.weight  # still tied
    samples = [Encoder(tiny_processor).encode(r) for r in records(tmp_path)]

    batch = PaddedCollator(0)([[s] for s in samples])
    logits = plain(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits
    logits = logits.detach()
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=IGNORE_INDEX, reduction="sum")

    packed = PackedCollator(tiny_processor.tokenizer.pad_token_id, RopeIndex(fast.config), varlen=True)([samples[:3], samples[3:]])
    head.set_targets(packed["loss_index"], packed["loss_targets"])
    try:
        ours = fast(**{k: v for k, v in packed.items() if k in MODEL_INPUTS}).logits.detach()
    finally:
        head.set_targets(None, None)
    assert ours.ndim == 0
    assert abs(float(ours) - float(ref)) / float(ref) < 1e-5, (float(ours), float(ref))
    # Without targets the head is the ordinary lm_head, and without boundaries attention is masked
    # sdpa: the fast model then gives the plain model's logits (generation, evaluation elsewhere).
    assert torch.allclose(fast(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits, logits, atol=1e-4)


@pytest.mark.slow
def test_compiled_decoder_layers_compute_what_eager_layers_compute(tmp_path, tiny_model_dir, tiny_processor):
    """optim.compile: the same loss and gradients as eager layers, and one compilation serves packed
    rows of every length and sample count (no recompilation on a new batch shape)."""
    import torch._dynamo

    from qvltune.compiled_layers import compile_blocks
    from qvltune.config import RunConfig
    from qvltune.model import apply_strategy, load_model

    torch.manual_seed(0)
    cfg = RunConfig.model_validate({"name": "c", "model": {"path": str(tiny_model_dir)}, "data": {"train": "t.jsonl"}, "strategy": "mixed", "lora": {"dropout": 0.0}})
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32", attn_implementation="varlen"), cfg)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; make the adapters contribute
            torch.nn.init.normal_(p, std=0.02)
    head = install_loss_head(model.get_base_model())
    samples = [Encoder(tiny_processor).encode(r) for r in records(tmp_path)]
    collate = PackedCollator(tiny_processor.tokenizer.pad_token_id, RopeIndex(model.config), varlen=True)
    batches = [collate([samples]), collate([samples[1:3]])]  # one packed row each (per_device_batch 1)

    def loss_and_grads(batch):
        model.zero_grad()
        head.set_targets(batch["loss_index"], batch["loss_targets"])
        try:
            loss = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits
        finally:
            head.set_targets(None, None)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}

    eager = [loss_and_grads(b) for b in batches]
    torch._dynamo.reset()
    assert compile_blocks(model) == model.config.text_config.num_hidden_layers
    compiled = [loss_and_grads(batches[0])]
    with torch._dynamo.config.patch(error_on_recompile=True):  # a new length and sample count
        compiled.append(loss_and_grads(batches[1]))
    for (loss_e, grads_e), (loss_c, grads_c) in zip(eager, compiled):
        assert abs(loss_c - loss_e) / loss_e < 1e-5, (loss_c, loss_e)
        assert grads_e.keys() == grads_c.keys() and any("lora_A" in n for n in grads_e)
        for n in grads_e:
            assert torch.allclose(grads_c[n], grads_e[n], rtol=1e-3, atol=1e-6), n


@pytest.mark.parametrize("zero3", [False, True])
def test_zero3_compiles_the_layer_forward_and_leaves_module_hooks_outside(tiny_model_dir, zero3):
    """Under ZeRO-3 (``compile_blocks(zero3=True)``) only each decoder layer's ``forward`` is compiled:
    a module hook that dynamo cannot trace, as DeepSpeed's release hook is, runs eagerly around the
    graph instead of breaking it. ``Module.compile`` (the ZeRO-0..2 path) traces the hooks with the
    call. Real ZeRO-3 runs with compiled layers: README, "ZeRO-3"."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qvltune.model import DECODER_LAYER, load_model, transformer_blocks
    from qvltune.compiled_layers import compile_blocks

    calls = []

    def release(module, args, output):  # DeepSpeed's release hook: code dynamo cannot put in a graph
        torch._dynamo.graph_break()
        calls.append(module)

    model = load_model(str(tiny_model_dir), dtype="float32", attn_implementation="sdpa").eval()
    layers = transformer_blocks(model, (DECODER_LAYER,))
    for layer in layers:
        layer.register_forward_hook(release)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        eager = model(input_ids=ids).logits
    torch._dynamo.reset()
    counters.clear()
    assert compile_blocks(model, backend="eager", zero3=zero3) == len(layers)
    with torch.no_grad():
        compiled = model(input_ids=ids).logits
    assert torch.allclose(compiled, eager, atol=1e-5) and len(calls) == 2 * len(layers)
    hook_breaks = [reason for reason in counters["graph_break"] if "graph_break" in reason]
    assert bool(hook_breaks) != zero3, hook_breaks


def test_compiled_decoder_layers_are_compiled_under_activation_checkpointing(tmp_path, tiny_model_dir, tiny_processor):
    """optim.compile with gradient checkpointing (the default): the training forward runs the compiled
    graph. A Python side effect inside a checkpointed layer (Qwen3-VL's attention under transformers
    5.25 with ``kernels`` installed) made dynamo break the graph there and run the layer eagerly:
    compile silently did nothing in training, and only eval (no checkpointing) was compiled."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qvltune.config import RunConfig
    from qvltune.model import apply_strategy, load_model
    from qvltune.compiled_layers import compile_blocks

    cfg = RunConfig.model_validate({"name": "c", "model": {"path": str(tiny_model_dir)}, "data": {"train": "t.jsonl"}, "strategy": "lora"})
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32"), cfg)
    model.config.use_cache = False
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # as the worker's Trainer does
    model.train()
    batch = PaddedCollator(tiny_processor.tokenizer.pad_token_id)([[Encoder(tiny_processor).encode(records(tmp_path)[0])]])
    graphs = []

    def backend(gm, example_inputs):  # no code generation: only whether dynamo hands over a graph
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    with torch._dynamo.config.patch(skip_fwd_side_effects_in_bwd_under_checkpoint=False):  # restored after
        try:
            compile_blocks(model, backend=backend)
            out = model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
            out.logits.float().mean().backward()
        finally:
            torch._dynamo.reset()
    assert graphs, "the checkpointed decoder layers ran eagerly in training"
    assert not counters["graph_break"], dict(counters["graph_break"])


def test_dynamo_analyses_a_compiled_decoder_layer_once(tiny_model_dir):
    """With ``dynamic=True`` dynamo made the layer's Python floats (norm eps, scalings) symbolic,
    then restarted its whole analysis to specialize them: every first step traced the layer twice
    (qvltune.compiled_layers.specialize_python_floats). Inductor, as in training (the restart comes
    from its passes); a forward without gradients keeps the compile short."""
    import torch._dynamo
    from torch._dynamo.utils import compilation_time_metrics, counters

    from qvltune.compiled_layers import compile_blocks
    from qvltune.model import load_model

    model = load_model(str(tiny_model_dir), dtype="float32")
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False
    torch._dynamo.reset()
    counters.clear()
    try:
        compile_blocks(model)
        with torch.no_grad():
            model(input_ids=torch.randint(0, 100, (1, 32)))
        attempts = sorted(k for k in compilation_time_metrics if k.startswith("compile_attempt_"))
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert attempts == ["compile_attempt_0"], attempts
    assert graphs == 1  # the constants are the same in every layer: one graph still serves them all


@pytest.mark.parametrize("strategy", ["mixed", "lora"])
def test_a_micro_batch_without_images_compiles_nothing_new(tmp_path, tiny_model_dir, tiny_processor, strategy):
    """mixed trains the merger: image features make the first layer's input need a gradient, and a
    text-only micro-batch (one GPU: no dummy image) made the compiled layer compile again mid-run
    (``requires_grad mismatch``; an 8B step at 2.7x its median); now one graph serves every layer
    and batch. lora trains nothing before the LLM: the first layer's input never needs a gradient
    (none is added: it would cost its input gradient at every step), so the first layer has a graph
    of its own, made in the first step like the others'."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from qvltune.compiled_layers import compile_blocks, same_graph_with_and_without_images
    from qvltune.config import RunConfig
    from qvltune.model import apply_strategy, load_model

    cfg = RunConfig.model_validate({"name": "c", "model": {"path": str(tiny_model_dir)}, "data": {"train": "t.jsonl"}, "strategy": strategy})
    model = apply_strategy(load_model(str(tiny_model_dir), dtype="float32"), cfg)
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False
    model.train()
    encoder, collate = Encoder(tiny_processor), PaddedCollator(tiny_processor.tokenizer.pad_token_id)
    image, text = (collate([[encoder.encode(records(tmp_path)[i])]]) for i in (0, 1))
    assert "pixel_values" in image and "pixel_values" not in text
    hidden_needs_grad = []

    def backend(gm, example_inputs):  # no code generation: which graphs dynamo makes, and for what input
        hidden_needs_grad.append(next(t.requires_grad for t in example_inputs if isinstance(t, torch.Tensor) and t.shape[-1] == model.config.text_config.hidden_size))
        return gm.forward

    torch._dynamo.reset()
    counters.clear()
    graphs = []
    try:
        compile_blocks(model, backend=backend)
        same_graph_with_and_without_images(model)  # as the worker does on one GPU
        for batch in (image, text, image):
            model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS}).logits.float().mean().backward()
            graphs.append(counters["stats"]["unique_graphs"])
        with torch.no_grad():  # an evaluation: one graph more, for every layer (no input needs a gradient)
            for batch in (image, text):
                model(**{k: v for k, v in batch.items() if k in MODEL_INPUTS})
        graphs.append(counters["stats"]["unique_graphs"])
    finally:
        torch._dynamo.reset()
    assert graphs[1:3] == [graphs[0], graphs[0]], f"compiled again after the first step: {graphs}, inputs needing a gradient: {hidden_needs_grad}"
    assert hidden_needs_grad[: graphs[0]] == ([True] if strategy == "mixed" else [False, True])
    assert graphs[3] == graphs[0] + 1 and hidden_needs_grad[-1] is False
