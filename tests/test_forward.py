"""The one decoder layer loop (adore/attention.run_layers) and its four attention steps, each against
transformers' own forward, and the one top-K rule (kernels.keep_top_k) wherever attention keeps a top-K."""

from __future__ import annotations

import pytest
import torch

from adore.attention import attention_scale, forward_prompt, forward_slots, head_dim, local_kv_heads
from adore.cache import SlotCache
from adore.kernels import keep_top_k, slot_attention_torch
from adore.train.labels import collect_qk
from adore.train.streameval import masked_logprobs


def _ids(T, seed=0):
    return torch.randint(3, 250, (T,), generator=torch.Generator().manual_seed(seed))


def _eager(model, ids):
    """transformers' forward with eager attention: (log-probs [T, V], attentions per layer, hidden)."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(ids[None], output_attentions=True, output_hidden_states=True)
    finally:
        model.set_attn_implementation("sdpa")
    return torch.log_softmax(out.logits[0].float(), -1), out.attentions, out.hidden_states[-1]


def test_collect_qk_attention_equals_transformers_eager_probabilities(tiny_gqa):
    model, _, _ = tiny_gqa
    ids = _ids(40)
    _, att, _ = _eager(model, ids)
    q, k, scale = collect_qk(model, ids, [0, 2])
    assert scale == attention_scale(model) == head_dim(model.config) ** -0.5
    G = q.shape[1] // k.shape[1]
    causal = torch.ones(40, 40, dtype=torch.bool).tril()
    for j, layer in enumerate([0, 2]):
        s = q[j] @ k[j].repeat_interleave(G, 0).transpose(-1, -2) * scale
        p = torch.softmax(s.masked_fill(~causal, float("-inf")), -1)
        assert torch.allclose(p, att[layer][0], atol=1e-6), (p - att[layer][0]).abs().max()


def test_masked_logprobs_without_a_mask_equals_the_models_log_probs(tiny_gqa):
    model, _, _ = tiny_gqa
    ids = _ids(50, seed=1)
    logp, _, _ = _eager(model, ids)
    want = logp[:-1].gather(1, ids[1:, None])[:, 0]
    causal = torch.ones(50, 50, dtype=torch.bool).tril()
    for chunk in (256, 16):  # one chunk, and query rows in chunks
        got = masked_logprobs(model, ids, causal, chunk=chunk)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    assert torch.equal(masked_logprobs(model, ids, causal, top_k=50), masked_logprobs(model, ids, causal))


def test_forward_prompt_equals_transformers_hidden_states(tiny_gqa):
    model, _, _ = tiny_gqa
    ids = _ids(33, seed=2)
    _, _, hidden = _eager(model, ids)
    dense, ks, vs, mass = forward_prompt(model, ids[None])
    assert mass is None and len(ks) == len(vs) == model.config.num_hidden_layers
    assert torch.allclose(dense, hidden, atol=1e-5)
    with_mass, _, _, mass = forward_prompt(model, ids[None], want_mass=True)  # the slot-attention path
    assert torch.allclose(with_mass, dense, atol=1e-6)
    # each query row spreads mass 1 per head and layer
    heads, layers = model.config.num_attention_heads, model.config.num_hidden_layers
    assert mass.shape == (1, 33) and mass.sum().item() == pytest.approx(33 * heads * layers, rel=1e-5)


@pytest.mark.parametrize("pack", [False, True])
def test_forward_slots_over_an_empty_cache_equals_the_prefill(tiny_gqa, pack):
    """A step whose rows are a whole prompt (plus padded rows) into empty slots is its causal prefill."""
    model, _, _ = tiny_gqa
    P, R, C = 12, 15, 20
    prompts = torch.stack([_ids(P, seed=3), _ids(P, seed=4)])
    cache = SlotCache(layers=model.config.num_hidden_layers, batch=2, kv_heads=local_kv_heads(model),
                      head_dim=head_dim(model.config), capacity=C, max_positions=32)
    ids = torch.cat([prompts, torch.zeros(2, R - P, dtype=torch.long)], 1)
    row_pos = torch.cat([torch.arange(P).expand(2, P), torch.full((2, R - P), -1)], 1)
    perm = torch.randperm(R, generator=torch.Generator().manual_seed(5))  # sequence 1: scattered rows
    ids[1], row_pos[1] = ids[1, perm], row_pos[1, perm]
    slots = torch.where(row_pos >= 0, cache.free_slots(2, R), cache.trash)
    cache.pos.scatter_(1, slots, row_pos)
    hidden, mass = forward_slots(model, cache, ids, row_pos, slots, want_mass=True, pack=pack)
    for b in range(2):
        want, ks, _, want_mass = forward_prompt(model, prompts[b : b + 1], want_mass=True)
        live = row_pos[b] >= 0
        order = row_pos[b, live].argsort()
        assert torch.allclose(hidden[b, live][order], want[0], atol=1e-5)
        assert torch.allclose(cache.k[-1, b][:, slots[b, live][order]], ks[-1][0], atol=1e-5)
        assert torch.allclose(mass[b, slots[b, live][order]], want_mass[0], atol=1e-4)
        if pack:
            assert (hidden[b, ~live] == 0).all()


def test_local_kv_heads_are_read_from_the_possibly_sharded_weights(tiny_gqa):
    model, _, _ = tiny_gqa
    attn = model.model.layers[0].self_attn
    assert head_dim(model.config) == 16 and local_kv_heads(model) == model.config.num_key_value_heads == 2
    full = attn.k_proj
    try:  # what AutoTP leaves on a rank of two: half the heads' rows
        attn.k_proj = torch.nn.Linear(full.in_features, full.out_features // 2, bias=False)
        assert local_kv_heads(model) == 1
    finally:
        attn.k_proj = full


def test_keep_top_k_keeps_ties_and_ignores_masked_entries():
    inf = float("-inf")
    s = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0], [inf, 5.0, inf, 4.0, inf]])
    want = torch.tensor([[3.0, inf, 2.0, 2.0, inf], [inf, 5.0, inf, 4.0, inf]])
    assert torch.equal(keep_top_k(s, 2), want)  # the 2nd largest ties with the 3rd: both kept
    assert torch.equal(keep_top_k(s, 1)[0], torch.tensor([3.0, inf, inf, inf, inf]))
    assert keep_top_k(s, None) is s and keep_top_k(s, 5) is s and keep_top_k(s, 9) is s


def test_slot_attention_reference_applies_the_rule_per_row_and_head():
    g = torch.Generator().manual_seed(6)
    B, Hkv, G, R, C, D, K = 2, 2, 3, 4, 11, 8, 3
    q, k, v = (torch.randn(*s, generator=g) for s in ((B, Hkv * G, R, D), (B, Hkv, C, D), (B, Hkv, C, D)))
    slot_pos = torch.randperm(C, generator=g).expand(B, C).clone()
    slot_pos[1, :2] = -1
    row_pos = torch.tensor([[3, 5, 10, 7], [4, 9, 10, 8]])
    out, mass = slot_attention_torch(q, k, v, slot_pos, row_pos, top_k=K, want_mass=True)
    s = q @ k.repeat_interleave(G, 1).transpose(-1, -2) * D**-0.5  # [B, Hq, R, C]
    allowed = (slot_pos[:, None, :] >= 0) & (slot_pos[:, None, :] <= row_pos[:, :, None])
    p = torch.softmax(keep_top_k(s.masked_fill(~allowed[:, None], float("-inf")), K), -1)
    assert torch.allclose(out, p @ v.repeat_interleave(G, 1), atol=1e-6)
    assert torch.allclose(mass, p.sum((1, 2)), atol=1e-5)


def test_one_top_k_rule_in_prefill_masked_forward_and_training_attention():
    """forward_prompt(top_k), masked_logprobs(top_k) and the fine-tuning attention interface
    (transformers' own forward under set_topk_attention) give the same log-probs."""
    from adore.models import load_model
    from adore.train.finetune import set_topk_attention

    model, _, _ = load_model("random:tiny-gqa")
    ids, K, T = _ids(30, seed=7), 4, 30
    hidden = forward_prompt(model, ids[None], top_k=K)[0]
    prefill = torch.log_softmax(model.lm_head(hidden)[0, :-1].float(), -1).gather(1, ids[1:, None])[:, 0]
    masked = masked_logprobs(model, ids, torch.ones(T, T, dtype=torch.bool).tril(), top_k=K, chunk=8)
    set_topk_attention(model, K)
    with torch.no_grad():
        logits = model(ids[None]).logits[0, :-1].float()
    trained = torch.log_softmax(logits, -1).gather(1, ids[1:, None])[:, 0]
    assert not torch.allclose(masked, masked_logprobs(model, ids, torch.ones(T, T, dtype=torch.bool).tril()),
                              atol=1e-3)  # K < T changes the result
    assert torch.allclose(prefill, masked, atol=1e-5) and torch.allclose(trained, masked, atol=1e-5)
