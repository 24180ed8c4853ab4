"""The local model builder without MPI: which tensors each (tp, pp) rank holds, their init,
the flat layout, loading a full state dict, and the layout errors."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mpipar.nn.gpt import GPT, PRESETS
from mpipar.nn.block import SERIAL
from mpipar.nn.stages import BlockStage, EmbeddingStage, HeadStage
from mpipar.parallel.layout import Layout, LayoutError
from mpipar.parallel.model import build_local_model, load_full_state_dict
from mpipar.parallel.tensor_parallel import TPEmbeddingStage, TPHeadStage
from mpipar.parallel.tp_comm import TensorParallelRegion

TINY = PRESETS["tiny"]


def fake_mesh(tp: int, pp: int, tp_rank: int, pp_rank: int) -> SimpleNamespace:
    """What the builder reads of a Mesh; the tp group is never used at construction."""
    return SimpleNamespace(dp=1, tp=tp, pp=pp, dp_rank=0, tp_rank=tp_rank, pp_rank=pp_rank,
                           tp_group=None)


def assemble(locals_: list, which: str = "params") -> dict:
    full = {k: np.full(v.shape, np.nan) for k, v in GPT(TINY, 0, "float64").params.items()}
    for local in locals_:
        for name, spec in local.shard_spec.items():
            src = getattr(local, which)[name]
            if spec is None:
                full[name][...] = src
            else:
                spec.put(full[name], src)
    return full


def test_single_process_layout_is_gpts():
    ref = GPT(TINY, seed=3, dtype="float32")
    local = build_local_model(TINY, None, seed=3, dtype="float32")
    assert local.layout.offsets == ref.layout.offsets
    assert np.array_equal(local.param_buffer, ref.param_buffer)
    assert local.param_buffer.dtype == np.float32 and local.tied_names == []
    assert local.first_stage and local.last_stage and list(local.layers) == list(range(8))
    kinds = [type(s) for s in local.stages]
    assert kinds == [EmbeddingStage] + [BlockStage] * 8 + [HeadStage]


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 1), (2, 4), (4, 2), (8, 1), (1, 8)])
def test_slices_of_every_rank_reassemble_the_init_bitwise(tp, pp):
    ref = GPT(TINY, seed=0, dtype="float64").params
    locals_ = [build_local_model(TINY, fake_mesh(tp, pp, t, p)) for p in range(pp) for t in range(tp)]
    full = assemble(locals_)
    for name, w in ref.items():
        assert np.array_equal(full[name], w), name
    for local in locals_:
        assert local.layout.numel == local.param_buffer.size == local.grad_buffer.size
        # the layout is the single-process order restricted to this rank
        order = [n for n in ref if n in local.params]
        assert local.layout.names == order
        holds_wte = local.first_stage or local.last_stage
        assert ("transformer.wte.weight" in local.params) == holds_wte
        assert local.tied_names == (["transformer.wte.weight"] if pp > 1 and holds_wte else [])
        Emb, Head = (EmbeddingStage, HeadStage) if tp == 1 else (TPEmbeddingStage, TPHeadStage)
        want = ([Emb] if local.first_stage else []) + [BlockStage] * len(local.layers) + \
            ([Head] if local.last_stage else [])
        assert [type(s) for s in local.stages] == want
        # tensor parallelism substitutes the block's communication points, not the block
        for st in local.stages:
            if isinstance(st, BlockStage):
                assert st.NH == TINY.n_head // tp
                assert st.region is SERIAL if tp == 1 else isinstance(st.region, TensorParallelRegion)


def test_shard_shapes_at_tp4():
    local = build_local_model(TINY, fake_mesh(4, 1, 1, 0))
    C = TINY.n_embd
    p = local.params
    assert p["transformer.wte.weight"].shape == (64, C)
    assert p["transformer.wpe.weight"].shape == (32, C)
    assert p["transformer.h.0.attn.c_attn.weight"].shape == (3 * C // 4, C)
    assert p["transformer.h.0.attn.c_proj.weight"].shape == (C, C // 4)
    assert p["transformer.h.0.attn.c_proj.bias"].shape == (C,)
    assert p["transformer.h.0.mlp.c_fc.weight"].shape == (C, C)
    assert p["transformer.h.0.mlp.c_proj.weight"].shape == (C, C)
    assert local.shard_spec["transformer.h.0.ln_1.weight"] is None
    assert local.vocab == (64, 128)


def test_custom_stage_layers_and_balanced_default():
    local = build_local_model(TINY, fake_mesh(1, 2, 0, 1), layout=Layout(pp=2, stage_layers=(5, 3)))
    assert list(local.layers) == [5, 6, 7] and local.last_stage and not local.first_stage
    assert all(n.startswith(("transformer.h.5", "transformer.h.6", "transformer.h.7",
                             "transformer.ln_f", "transformer.wte")) for n in local.params)
    with pytest.raises(LayoutError, match="add up to 7"):
        build_local_model(TINY, fake_mesh(1, 2, 0, 0), layout=Layout(pp=2, stage_layers=(4, 3)))
    # default: balanced by estimated FLOPs (the byte vocabulary's head is cheap: even here)
    assert [len(build_local_model(TINY, fake_mesh(1, 4, 0, p)).layers) for p in range(4)] == [2] * 4


@pytest.mark.parametrize("tp", [1, 2])
def test_virtual_stages_build_interleaved_chunks(tp):
    """pp 2 x v 2 of 8 blocks: rank 0 holds virtual stages 0 and 2, rank 1 stages 1 and 3; the
    embedding leads rank 0's first chunk, the head ends rank 1's last; every rank's slices
    still reassemble the single process's init bitwise."""
    lay = Layout(tp=tp, pp=2, micro_batches=2, virtual_stages=2)
    locals_ = [build_local_model(TINY, fake_mesh(tp, 2, t, p), layout=lay)
               for p in range(2) for t in range(tp)]
    full = assemble(locals_)
    assert all(np.array_equal(full[k], w) for k, w in GPT(TINY, 0, "float64").params.items())
    Emb, Head = (EmbeddingStage, HeadStage) if tp == 1 else (TPEmbeddingStage, TPHeadStage)
    r0, r1 = locals_[0], locals_[-1]
    assert [[getattr(s, "i", type(s)) for s in c] for c in r0.chunks] == [[Emb, 0, 1], [4, 5]]
    assert [[getattr(s, "i", type(s)) for s in c] for c in r1.chunks] == [[2, 3], [6, 7, Head]]
    assert r0.stages == r0.chunks[0] + r0.chunks[1] and r0.layers == (0, 1, 4, 5)
    assert r0.tied_names == r1.tied_names == ["transformer.wte.weight"]
    assert not any(n.startswith("transformer.h.2.") for n in r0.params)
    with pytest.raises(ValueError, match="does not match the mesh"):
        build_local_model(TINY, fake_mesh(tp, 2, 0, 0), layout=Layout(tp=tp, pp=4))


def test_load_full_state_dict_round_trip():
    rng = np.random.default_rng(0)
    sd = {k: rng.standard_normal(v.shape) for k, v in GPT(TINY, 0, "float64").params.items()}
    locals_ = [build_local_model(TINY, fake_mesh(2, 2, t, p)) for p in range(2) for t in range(2)]
    for local in locals_:
        load_full_state_dict(local, sd)
    full = assemble(locals_)
    assert all(np.array_equal(full[k], v) for k, v in sd.items())
    with pytest.raises(KeyError, match="missing"):
        load_full_state_dict(locals_[0], {})


@pytest.mark.parametrize("cfg,tp,pp,match", [
    (TINY.replace(n_head=6, n_embd=48), 4, 1, "degree 4 does not divide the 6 attention heads"),
    (TINY, 3, 1, "degree 3 does not divide the 8 attention heads"),
    (TINY.replace(n_layer=2), 1, 4, "4 pipeline stages for 2 blocks"),
])
def test_layout_errors(cfg, tp, pp, match):
    with pytest.raises(LayoutError, match=match):
        build_local_model(cfg, fake_mesh(tp, pp, 0, 0))
