"""Name alignment, module kinds and selection."""

from __future__ import annotations

from ftaudit.layout import Layout
from ftaudit.pairing import Selection, align, layer_index, module_kind, pair_tensors, quantized_matrix
from ftaudit.sources.safetensors import TensorInfo


def infos(shapes: dict[str, tuple[int, ...]], dtype: str = "F32") -> dict[str, TensorInfo]:
    return {n: TensorInfo(n, dtype, s, 0, 0) for n, s in shapes.items()}


def test_module_kinds_across_architectures():
    assert module_kind("model.layers.3.self_attn.q_proj.weight") == "attention"
    assert module_kind("model.layers.3.mlp.down_proj.weight") == "mlp"
    assert module_kind("encoder.layer.0.attention.output.dense.weight") == "attention"
    assert module_kind("encoder.layer.0.intermediate.dense.weight") == "mlp"
    assert module_kind("encoder.layer.0.output.dense.weight") == "mlp"
    assert module_kind("transformer.h.2.attn.c_attn.weight") == "attention"
    assert module_kind("transformer.h.2.mlp.c_fc.weight") == "mlp"
    assert module_kind("model.embed_tokens.weight") == "embedding"
    assert module_kind("embeddings.word_embeddings.weight") == "embedding"
    assert module_kind("lm_head.weight") == "head"
    assert module_kind("pooler.dense.weight") == "head"
    assert module_kind("model.layers.0.input_layernorm.weight") == "norm"
    assert module_kind("transformer.blocks.0.norm_attn_norm.attn.Wqkv.weight") == "attention"  # DBRX: in a norm's block
    assert module_kind("transformer.blocks.0.norm_attn_norm.norm_1.weight") == "norm"
    assert module_kind("model.layers.5.linear.weight") == "mlp"  # Zamba's hybrid layer: the shared block's output
    assert module_kind("multi_modal_projector.linear_1.weight") == "other"
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("lm_head.weight") is None


def test_aligns_wrapper_prefixes():
    base = ["encoder.layer.0.attention.self.query.weight", "encoder.layer.0.output.dense.weight"]
    tuned = ["bert." + n for n in base] + ["classifier.weight"]
    b, t = align(base, tuned)
    assert b.keys() & t.keys() == set(base)
    b, t = align(["model.layers.0.mlp.up_proj.weight"], ["base_model.model.model.layers.0.mlp.up_proj.weight"])
    assert b.keys() == t.keys()


def test_pairs_selects_and_reports_missing_and_mismatched():
    base = infos({
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.mlp.up_proj.weight": (12, 8),
        "model.layers.0.mlp.down_proj.weight": (8, 12),
        "model.embed_tokens.weight": (20, 8),
        "model.norm.weight": (8,),
    })
    tuned = infos({
        "model.layers.0.self_attn.q_proj.weight": (8, 8),
        "model.layers.0.mlp.up_proj.weight": (12, 9),
        "model.layers.0.self_attn.k_proj.weight": (8, 8),
        "model.embed_tokens.weight": (22, 8),
    })
    p = pair_tensors(base, tuned, Selection())
    assert [x.name for x in p.pairs] == ["model.layers.0.self_attn.q_proj.weight"]
    assert p.pairs[0].kind == "attention" and p.pairs[0].layer == 0
    assert p.missing_in_model == ["model.layers.0.mlp.down_proj.weight"]
    assert p.missing_in_base == ["model.layers.0.self_attn.k_proj.weight"]
    assert p.shape_mismatch == [("model.layers.0.mlp.up_proj.weight", (12, 8), (12, 9))]
    assert p.not_selected == 1  # the embedding; the 1-D norm is never a candidate

    with_embeddings = pair_tensors(base, tuned, Selection.from_options(["embedding"], ["*q_proj*"]))
    assert [(x.name, x.shape, x.rows) for x in with_embeddings.pairs] == [("model.embed_tokens.weight", (20, 8), 20)]
    assert with_embeddings.resized == [("model.embed_tokens.weight", 20, 22)]


def test_non_float_and_empty_matrices_are_never_analysed():
    base = infos({"a.q_proj.weight": (4, 4)}, dtype="I8") | infos({"b.q_proj.weight": (0, 4)})
    p = pair_tensors(base, base, Selection())
    assert p.pairs == [] and p.not_selected == 0


def test_globs_that_match_nothing_are_named():
    base = infos({"model.layers.0.self_attn.q_proj.weight": (4, 4), "model.layers.0.mlp.up_proj.weight": (6, 4)})
    tuned = {("base_model.model." + n): i for n, i in base.items()}
    selection = Selection.from_options(["head", "*.q_porj.*", "model.layers.0.mlp.*"], ["*.up_proj.weight", "*.k_proj.*"])
    assert pair_tensors(base, tuned, selection).unmatched_globs == ["*.q_porj.*", "*.k_proj.*"]
    assert pair_tensors(base, tuned, Selection()).unmatched_globs == []


def test_stacked_experts_give_one_pair_per_expert():
    stack, other = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"
    conv = "model.layers.0.linear_attn.conv1d.weight"
    base = infos({stack: (3, 8, 12), other: (3, 6, 8), conv: (16, 1, 4), "model.layers.0.mlp.up_proj.weight": (6, 4)})
    tuned = {"base_model.model." + n: i for n, i in base.items()}
    tuned["base_model.model." + other] = TensorInfo(other, "F32", (3, 8, 6), 0, 0)
    for layout, shape in ((Layout(), (8, 12)), (Layout(experts_in_out=True), (12, 8))):
        pairing = pair_tensors(base, tuned, Selection(), layout=layout)
        experts = [p for p in pairing.pairs if p.base_name == stack]
        assert [(p.name, p.expert, p.shape, p.layer, p.kind) for p in experts] == [
            (f"{stack}[{e}]", e, shape, 0, "mlp") for e in range(3)]
        assert all(p.tuned_name == "base_model.model." + stack for p in experts)
        assert pairing.shape_mismatch == [(other, (3, 6, 8), (3, 8, 6))]
        assert conv not in {p.base_name for p in pairing.pairs}  # a convolution's kernel is no stack of matrices
    untargeted = pair_tensors(base, {}, Selection(), unchanged={stack, other})
    assert untargeted.unchanged == [f"{stack}[{e}]" for e in range(3)] + [f"{other}[{e}]" for e in range(3)]


def test_one_experts_matrix_is_selected_by_its_name_in_the_report():
    """`stack[1]` names expert 1's matrix as the report does: its brackets are taken as written (a glob alone would
    read `[1]` as a character class); a glob of the stack's name still takes every expert."""
    stack, other = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"
    base = infos({stack: (4, 8, 12), other: (4, 12, 4), "model.layers.0.embed.weight": (16, 8)})
    names = lambda pairing: [p.name for p in pairing.pairs]  # noqa: E731
    one = pair_tensors(base, base, Selection.from_options([], ["*.gate_up_proj[1]", f"{other}[3]", "*_proj[[]0]"]))
    assert names(one) == [f"{other}[{e}]" for e in (1, 2)] + [f"{stack}[{e}]" for e in (2, 3)]
    assert one.not_selected == 4 + 1 and one.unmatched_globs == []  # the experts left out, and the embedding
    whole = pair_tensors(base, base, Selection.from_options([], ["*.gate_up_proj"]))
    assert names(whole) == [f"{other}[{e}]" for e in range(4)] and whole.not_selected == 4 + 1
    included = pair_tensors(base, base, Selection(frozenset(), ("*.down_proj[2]",)))
    assert names(included) == [f"{other}[2]"] and included.not_selected == 3 + 4 + 1
    unchanged = pair_tensors(base, {}, Selection.from_options([], ["*.down_proj[3]"]), unchanged={stack, other})
    assert unchanged.unchanged == [f"{other}[{e}]" for e in range(3)] + [f"{stack}[{e}]" for e in range(4)]
    assert pair_tensors(base, base, Selection.from_options([], ["*.gate_up_proj[7]"])).unmatched_globs == [
        "*.gate_up_proj[7]"]


def test_a_bracket_of_digits_names_an_expert_and_no_character_class():
    """`*[2]` is every stack's expert 2: read as a glob it had also matched DBRX's stack `…mlp.w2` whole (the name ends
    in 2), leaving out all its experts; a bracket that is not all digits stays a character class."""
    w1, w2 = "transformer.blocks.0.ffn.experts.mlp.w1", "transformer.blocks.0.ffn.experts.mlp.w2"
    base = infos({w1: (3, 8, 4), w2: (3, 8, 4)})
    names = lambda pairing: [p.name for p in pairing.pairs]  # noqa: E731
    assert names(pair_tensors(base, base, Selection.from_options([], ["*[2]"]))) == [
        f"{w1}[0]", f"{w1}[1]", f"{w2}[0]", f"{w2}[1]"]
    literal = pair_tensors(base, base, Selection.from_options([], ["*.w[2]"]))  # no stack is named `w`
    assert len(literal.pairs) == 6 and literal.unmatched_globs == ["*.w[2]"]
    assert names(pair_tensors(base, base, Selection.from_options([], ["*.w[1-2]"]))) == []
    assert names(pair_tensors(base, base, Selection.from_options([], ["*.w1[0-1]"]))) == [
        f"{w1}[0]", f"{w1}[1]", f"{w1}[2]"] + [f"{w2}[{e}]" for e in range(3)]


def test_moe_blocks_are_mlp():
    assert module_kind("model.layers.0.block_sparse_moe.input_linear.weight") == "mlp"  # GraniteMoE's experts
    assert module_kind("model.layers.0.block_sparse_moe.gate.weight") == "mlp"  # Mixtral's router


def test_quantized_experts_are_found():
    mxfp4 = infos({"model.layers.0.mlp.experts.gate_up_proj_blocks": (4, 96, 2, 16)}, "U8")
    assert quantized_matrix(mxfp4) is not None
    assert quantized_matrix(infos({"model.layers.0.mlp.experts.down_proj": (4, 32, 48)}, "F8_E4M3")) is not None
    assert quantized_matrix(infos({"model.layers.0.mlp.experts.down_proj": (4, 32, 48)}, "BF16")) is None


def test_a_name_is_not_stripped_to_its_last_part():
    """A tuned tensor the base does not have (an adapter's `lm_head.weight`, the base's head tied to its embedding) had
    been paired with the base's one `model.norm.weight` by stripping both to `weight`, which won one more match."""
    base = ["model.embed_tokens.weight", "model.layers.0.q_proj.weight", "model.norm.weight"]
    tuned = ["model.layers.0.q_proj.weight", "lm_head.weight"]
    b, t = align(base, tuned)
    assert t["lm_head.weight"] == "lm_head.weight" and "lm_head.weight" not in b
    assert b[next(k for k, v in t.items() if v == "model.layers.0.q_proj.weight")] == "model.layers.0.q_proj.weight"


def test_an_option_may_list_several_values_separated_by_commas():
    listed = Selection.from_options(["embedding, head", "*.w[1,2]"], ["*.k_proj.*,*.v_proj.*", ""])
    repeated = Selection.from_options(["embedding", "head", "*.w[1,2]"], ["*.k_proj.*", "*.v_proj.*"])
    assert listed == repeated
    assert {"embedding", "head"} <= listed.kinds and listed.globs == ("*.w[1,2]",)  # a bracket's comma is the glob's
    assert not listed.selects("model.layers.0.self_attn.v_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                              "attention")
