"""torch.compile of the language model's decoder layers (``optim.compile``): which layers, how under
each ZeRO stage, and what dynamo is allowed to trace in them.

Where the compiled code is kept between runs is ``qvltune.compile_cache``; what the first step's
compile cost, by part, is ``qvltune.compile_cache.compile_breakdown``.
"""

from __future__ import annotations

from collections.abc import Callable

from qvltune.model import DECODER_LAYER, transformer_blocks


def compile_blocks(model, backend: str | Callable = "inductor", zero3: bool = False) -> int:
    """torch.compile every language-model decoder layer in place; returns how many were compiled.

    One graph serves all layers (same code, parameters are graph inputs) and ``dynamic=True`` makes
    it cover every packed-row length from the first step, so there is one compilation, not one per
    length. Vision blocks stay eager: with sdpa their attention loops over the images of the batch in
    Python (``lengths.tolist()``), so every new image count would be a graph break and a recompile.

    ``zero3``: compile each layer's ``forward`` only. ``Module.compile`` compiles the whole call,
    module hooks included, and ZeRO-3's gather/release hooks then run through dynamo as graph breaks
    (DeepSpeed's fetch is ``compiler.disable``d, its release and backward hook are not traceable);
    with the forward alone compiled the hooks run eagerly around the compiled graph.
    """
    import torch

    layers = transformer_blocks(model, (DECODER_LAYER,))
    allow_checkpointed_side_effects()
    specialize_python_floats()
    for layer in layers:
        if zero3:
            layer.forward = torch.compile(layer.forward, dynamic=True, backend=backend)
        else:
            layer.compile(dynamic=True, backend=backend)
    return len(layers)


def same_graph_with_and_without_images(model) -> None:
    """Where text-only micro-batches carry no dummy image (one GPU, the LLM trained:
    qvltune.training_data.gets_dummy_image), give the first decoder layer an input that always needs
    a gradient when the vision side (tower, merger, DeepStack mergers) trains (the worker calls it
    with compiled layers).

    Image features from a trained merger make the LLM's input embeddings need a gradient; a
    micro-batch without images (a packed row of text-only samples: first-fit-decreasing packing puts
    the shortest samples, often the text-only ones, together in its last rows) reaches the first
    layer with an input that needs none. The compiled graph guards on that (``requires_grad
    mismatch``): the layer compiled a second time mid-run, and on one H200 that step of an 8B mixed
    epoch took 14.9 s, 2.7x its median. A hook makes the embeddings' output always need a gradient,
    so every micro-batch takes the same graph, at the cost of the first layer's input gradient on
    text-only micro-batches (1/36 of the LLM's input products at 8B, on those alone). Only where gradients are on:
    transformers' ``enable_input_require_grads`` marks the output in evaluation too, where no other
    layer's input needs one, and the first layer then got an eval graph of its own. Not where the
    dummy image is given (qvltune.data.packing.dummy_image: it already makes the input need a
    gradient), which on several GPUs matters: under ZeRO-3 a hooked embedding output would make
    DeepSpeed gather the frozen embedding matrix again in every backward (1.2 GB at 8B) for a
    gradient it does not have."""
    import torch

    from qvltune.model import vision_side_trains

    def needs_grad(module, args, output):
        if torch.is_grad_enabled():
            output.requires_grad_(True)

    if vision_side_trains(model):
        model.get_input_embeddings().register_forward_hook(needs_grad)


def allow_checkpointed_side_effects() -> None:
    """Let dynamo trace a gradient-checkpointed decoder layer whose forward mutates Python state.

    With activation checkpointing on (the default), a compiled layer's forward runs inside the
    checkpoint operator, where dynamo refuses Python side effects it could not replay in the backward
    recompute: it breaks the graph and the whole layer runs eagerly, so ``optim.compile`` silently
    compiled nothing in training. transformers 5.25 made the ``kernels`` package a dependency, and
    with it installed Qwen3-VL's text attention (``@use_kernelized_func``) sets and resets a
    context variable around every call: a side effect with no net change, so not replaying it is
    exact. This is dynamo's own switch for accepting that."""
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):  # older torch has no such switch
        dynamo_config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def specialize_python_floats() -> None:
    """Compile the layers' Python floats (RMSNorm's eps, the attention and LoRA scalings, dropout
    rates) as constants.

    With ``dynamic=True`` dynamo first makes every float argument a symbolic input, then fails to
    turn some into tensors and restarts its whole analysis of the layer with them specialized
    (``Restarting analysis due to ... _tensorify_python_scalars``): every first step traced the
    layer twice, and the discarded attempt also ran AOTAutograd (on the H200 at 2B cold 8.3 s; the
    tiny model on the CPU, benchmarks/compile_cache.py: warm first step 3.5-3.7 -> 1.9-2.2 s). These floats are the same
    in every layer and never change during a run, so as constants they cost no recompilation."""
    import torch._dynamo.config as dynamo_config

    if hasattr(dynamo_config, "specialize_float"):  # process-wide: only the decoder layers are compiled
        dynamo_config.specialize_float = True
