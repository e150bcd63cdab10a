"""Fast decoding (issue 16, item 3): the compiled, static-cache decoding step of packed models.

* the decoding step of a packed Llama (int4 layers and the packed tied head) traces into one graph, no
  graph breaks (what ``fullgraph=True`` needs);
* ``compile_for_decoding`` makes plain ``model.generate`` use a static cache and the compiled step, and its
  greedy tokens equal the eager path's, for a model quantized on load and the same model reloaded
  (compiling takes tens of seconds: slow tests).
"""

from __future__ import annotations

import inspect

import pytest
import torch
from helpers import VOCAB, tiny_llama
from transformers import AutoModelForCausalLM, StaticCache

from hf_splitquant import PackedLinear, SplitQuantConfig, compile_for_decoding, kernels
from hf_splitquant.nn.packed_embedding import PackedEmbedding
from hf_splitquant.speed import kernel_paths

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not kernels.int4_available(), reason="this torch build has no int4 CPU kernel")]

CONFIG = dict(bits=4, group_size=32, embedding_bits=4)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("decoding") / "float"
    tiny_llama().save_pretrained(path)
    return str(path)


def _prompt() -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))


def _greedy(model: torch.nn.Module, **kwargs) -> torch.Tensor:  # noqa: ANN003
    with torch.inference_mode():
        return model.generate(_prompt(), max_new_tokens=12, min_new_tokens=12, do_sample=False, **kwargs)


def _explain_decoding_step(model: torch.nn.Module):  # noqa: ANN202
    """``torch._dynamo.explain`` of one decoding step after a prefilled static cache."""
    cache = StaticCache(config=model.config, max_cache_len=16)
    prompt = _prompt()
    with torch.inference_mode():
        token = model(prompt, past_key_values=cache).logits[:, -1:].argmax(-1)
        position = torch.tensor([prompt.shape[1]])
        return torch._dynamo.explain(model)(token, past_key_values=cache, cache_position=position,
                                            position_ids=position[None])


def _int4_calls(explained) -> list:  # noqa: ANN001
    return [node for graph in explained.graphs for node in graph.graph.nodes
            if "_weight_int4pack_mm_for_cpu" in str(node.target)]


def test_compile_for_decoding_sets_the_static_cache_and_builds_the_layouts(llama_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(llama_checkpoint, quantization_config=SplitQuantConfig(**CONFIG))
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m._int4 is None for m in packed)  # built lazily, on the first call
    assert compile_for_decoding(model) is model
    assert all(m._int4 is not None and m._int4_ok[1] for m in packed)
    assert any(isinstance(m, PackedEmbedding) for m in packed)
    config = model.generation_config
    assert config.cache_implementation == "static"
    assert config.compile_config.fullgraph and config.compile_config._compile_all_devices
    assert model._valid_auto_compile_criteria({"cache": StaticCache(config=model.config, max_cache_len=32)}, config)
    # the stored codes were dropped for the layouts: the layers still say where they live and which path runs
    assert all(m.device == torch.device("cpu") for m in packed)
    assert "int4/1 x" in kernel_paths(model, 1, torch.bfloat16)


@pytest.mark.parametrize("rotation", [None, 32])
def test_packed_decoding_step_traces_without_graph_breaks(llama_checkpoint, rotation):
    # (rotated layers: the input rotation is one more small matmul in the same graph)
    model = AutoModelForCausalLM.from_pretrained(
        llama_checkpoint, quantization_config=SplitQuantConfig(**CONFIG, input_rotation=rotation))
    assert all(m.spec.input_rotation == (None if isinstance(m, PackedEmbedding) else rotation)
               for m in model.modules() if isinstance(m, PackedLinear))
    compile_for_decoding(model)
    explained = _explain_decoding_step(model)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    # the int4 kernel is in the graph: every packed layer (and the head) computes there, not in Python
    calls = _int4_calls(explained)
    assert len(calls) == sum(isinstance(m, PackedLinear) for m in model.modules())


def test_a_compiled_graph_refuses_to_rebuild_a_layout_it_lost(llama_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(llama_checkpoint, quantization_config=SplitQuantConfig(bits=4,
                                                                                                      group_size=32))
    layer = next(m for m in model.modules() if isinstance(m, PackedLinear))
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.inference_mode(), pytest.raises(Exception, match="compile_for_decoding"):
        compiled(torch.randn(1, 1, layer.in_features))


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", ["llama_checkpoint", "stackable_checkpoint"])  # the second: stacked calls
def test_compiled_greedy_tokens_equal_eager_on_load_and_after_reload(checkpoint, request, tmp_path):
    llama_checkpoint = request.getfixturevalue(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(llama_checkpoint, quantization_config=SplitQuantConfig(**CONFIG))
    eager = _greedy(model)
    compile_for_decoding(model)
    stacked = any(m._siblings is not None for m in model.modules() if isinstance(m, PackedLinear))
    assert stacked == (checkpoint == "stackable_checkpoint")
    torch._dynamo.reset()
    compiled = _greedy(model)
    assert hasattr(model, "_compiled_call")  # generate took the compiled step
    assert torch.equal(compiled, eager)
    assert torch.equal(_greedy(model, disable_compile=True), eager)  # static cache, eager step: the same

    model.save_pretrained(tmp_path / "packed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed")
    assert torch.equal(_greedy(reloaded), eager)
    compile_for_decoding(reloaded)
    assert torch.equal(_greedy(reloaded), eager)
    # compiling did not change what is saved
    reloaded.save_pretrained(tmp_path / "again")
    saved, again = reloaded.state_dict(), AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert saved.keys() == again.keys() and all(torch.equal(saved[k], again[k]) for k in saved)


def test_inductor_options_reach_torch_compile_without_the_mode():
    from hf_splitquant.integrations.decoding import decoding_compile_config

    settings = decoding_compile_config(options={"cpp_wrapper": True}).to_dict()
    assert settings["options"] == {"cpp_wrapper": True} and settings["mode"] is None
    default = decoding_compile_config().to_dict()
    assert default["options"] == {"size_asserts": False} and default["mode"] is None
    torch.compile(torch.nn.Identity(), **default)
    autotune = decoding_compile_config(mode="max-autotune").to_dict()  # a mode of the user's: no default options
    assert autotune["mode"] == "max-autotune" and autotune["options"] is None
    torch.compile(torch.nn.Identity(), **settings)  # torch refuses a mode beside options; this must not raise
    with pytest.raises(ValueError, match="either `mode` or `options`"):
        decoding_compile_config(mode="max-autotune", options={"cpp_wrapper": True})


def test_single_query_attention_is_sdpa_in_the_compiled_step(monkeypatch):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hf_splitquant.integrations import decoding
    from hf_splitquant.integrations.decoding import single_query_attention

    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = 3, True, False
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 6, 1, 16, generator=gen)
    key, value = torch.randn(2, 2, 10, 16, generator=gen), torch.randn(2, 2, 10, 16, generator=gen)
    mask = torch.ones(2, 1, 1, 10, dtype=torch.bool)
    mask[0, ..., 7:] = False  # unused cache positions
    mask[1, ..., :2] = False  # left padding
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.25)
    compiled = torch.compile(single_query_attention, backend="eager", fullgraph=True)
    with monkeypatch.context() as patch:  # the compiled step must take its own math, not SDPA
        patch.setattr(decoding, "sdpa_attention_forward", lambda *a, **k: pytest.fail("SDPA called"))
        got, _ = compiled(module, query, key, value, mask, scaling=0.25)
    assert got.shape == expected.shape == (2, 1, 6, 16)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the masked positions really are left out (a wrong mask would move the result)
    assert not torch.allclose(got, sdpa_attention_forward(module, query, key, value, None, scaling=0.25)[0])
    # outside compiled code it is SDPA itself
    assert torch.equal(single_query_attention(module, query, key, value, mask, scaling=0.25)[0], expected)


def test_compile_for_decoding_swaps_sdpa_attention_only_and_saves_none_of_it(llama_checkpoint, tmp_path):
    from hf_splitquant.integrations.decoding import DECODING_ATTENTION

    model = AutoModelForCausalLM.from_pretrained(llama_checkpoint, quantization_config=SplitQuantConfig(**CONFIG))
    assert model.config._attn_implementation == "sdpa"
    compile_for_decoding(model)
    assert model.config._attn_implementation == DECODING_ATTENTION
    model.save_pretrained(tmp_path / "packed")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "packed").config._attn_implementation == "sdpa"
    eager = AutoModelForCausalLM.from_pretrained(llama_checkpoint, attn_implementation="eager")
    assert compile_for_decoding(eager).config._attn_implementation == "eager"
    kept = compile_for_decoding(AutoModelForCausalLM.from_pretrained(llama_checkpoint), fast_attention=False)
    assert kept.config._attn_implementation == "sdpa"


@pytest.fixture(scope="module")
def stackable_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama whose q/k/v and gate/up rows are whole blocks of the CPU int4 packing (64 rows)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                         max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    path = tmp_path_factory.mktemp("stackable") / "float"
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("rotation", [None, 64])
def test_stacked_siblings_compute_what_each_layer_did_in_any_order_and_save_the_same(stackable_checkpoint, tmp_path,
                                                                                    rotation):
    from hf_splitquant.integrations.decoding import stack_sibling_layers
    from hf_splitquant.speed import resident_bytes

    config = SplitQuantConfig(bits=4, group_size=64, input_rotation=rotation)
    model = AutoModelForCausalLM.from_pretrained(stackable_checkpoint, dtype=torch.bfloat16, quantization_config=config)
    for _, module in model.named_modules():
        if isinstance(module, PackedLinear):
            assert module.prepare_int4()
    ids = _prompt()
    attention = model.model.layers[0].self_attn
    x1, x2 = torch.randn(2, 1, 5, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        logits = model(ids).logits
        own = [layer(x1) for layer in (attention.q_proj, attention.k_proj, attention.v_proj)]
        k_on_x2 = attention.k_proj(x2)
    saved, memory = model.state_dict(), resident_bytes(model)
    assert stack_sibling_layers(model) == 2 * model.config.num_hidden_layers  # q/k/v and gate/up per block
    assert stack_sibling_layers(model) == 0  # already stacked
    group = attention.q_proj._siblings
    assert group is attention.k_proj._siblings is attention.v_proj._siblings
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, logits)
        # any call order; an output is taken from the stacked call only for the very same input tensor
        assert torch.equal(attention.v_proj(x1), own[2]) and group.source is x1
        assert torch.equal(attention.k_proj(x2), k_on_x2)
        assert torch.equal(attention.k_proj(x1), own[1])
        assert torch.equal(attention.q_proj(x1), own[0])
        assert torch.equal(attention.v_proj(x1), own[2])
        assert group.source is None and not group.pending  # nothing held once every member took its output
    assert resident_bytes(model) <= memory  # the members' layouts are views of the stacked ones
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())
    model.save_pretrained(tmp_path / "packed")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "packed", dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(reloaded(ids).logits, logits)
    model.to("cpu", torch.float32)  # moving or casting dissolves the groups; outputs stay those of the codes
    assert all(m._siblings is None for m in model.modules() if isinstance(m, PackedLinear))
    with torch.inference_mode():
        torch.testing.assert_close(model(ids).logits, logits.float(), rtol=0.05, atol=0.05)


def test_compiled_step_makes_one_int4_call_per_stacked_group(stackable_checkpoint):
    model = AutoModelForCausalLM.from_pretrained(stackable_checkpoint, dtype=torch.bfloat16,
                                                 quantization_config=SplitQuantConfig(bits=4, group_size=64))
    compile_for_decoding(model)
    explained = _explain_decoding_step(model)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    calls = _int4_calls(explained)
    layers = sum(isinstance(m, PackedLinear) for m in model.modules())
    assert len(calls) == layers - 3 * model.config.num_hidden_layers  # 7 -> 4 calls per block


@pytest.mark.parametrize("dynamic", [False, None])
def test_a_second_compiled_model_keeps_static_shapes(stackable_checkpoint, dynamic):
    # Two packed models of one class share the forward's code object, so the second one is a recompile; with
    # torch's automatic dynamic shapes (None) that recompile traces the packed tensors' sizes as symbols (a
    # measured 25-40% slower step on SmolLM2). compile_for_decoding's default (False) keeps every size a
    # constant. The None case shows the check can fail.
    def symbolic_inputs(gm: torch.fx.GraphModule, example_inputs: list) -> torch.fx.GraphModule:
        seen.append(sum(isinstance(x, torch.SymInt) for x in example_inputs))
        return gm

    seen: list[int] = []
    torch._dynamo.reset()
    for group in (32, 64):
        model = AutoModelForCausalLM.from_pretrained(stackable_checkpoint, quantization_config=SplitQuantConfig(
            bits=4, group_size=group, embedding_bits=4))
        compile_for_decoding(model, dynamic=dynamic)
        assert model.generation_config.compile_config.dynamic is dynamic
        cache = StaticCache(config=model.config, max_cache_len=16)
        step = torch.compile(model, backend=symbolic_inputs, fullgraph=True, dynamic=dynamic)
        with torch.inference_mode():
            token = model(_prompt(), past_key_values=cache).logits[:, -1:].argmax(-1)
            position = torch.tensor([_prompt().shape[1]])
            step(token, past_key_values=cache, cache_position=position, position_ids=position[None])
    assert len(seen) == 2
    assert (seen[1] > 0) == (dynamic is None), seen
    assert inspect.signature(compile_for_decoding).parameters["dynamic"].default is False
