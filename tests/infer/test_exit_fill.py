"""Early exit in a batch against a reference that decodes each row alone, one position at a time, without
`LoopedKVCache`: its keys and values live in plain per-position lists, and a later token's core iteration i reads
an earlier position u's keys and values of iteration min(i, d_u) — the last one u computed (the stated fill rule
for skipped iterations, as Huginn and Ouro decode). Greedy tokens equal, logits to 1e-10 in float64; and the test
fails when the decoder's fill is removed (checked below by removing it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recurdepth.infer.decoder import DecodeOptions, LoopedDecoder
from recurdepth.infer.kv_cache import LoopedKVCache
from recurdepth.model.depth import BackpropWindow
from recurdepth.model.layers import hook_output, hook_qkv
from tests.infer.test_decoder import make_model, tokens

R = 6


def reference_logits(model, x: torch.Tensor, depths: list, share=None, prompt_len: int = 0) -> torch.Tensor:
    """Logits `[1, T, V]` of one row `x [1, T]` whose position t ran `depths[t]` core iterations (zeros s_0).
    With `share=m` (Huginn's compressed cache, restated): iteration i of a core layer writes slot (i - 1) mod m,
    a later write to the same slot replacing an earlier one, and a later token reads each earlier position's
    slot as that position left it; a slot a position never wrote holds its last computed keys and values (the
    prompt, `prompt_len` positions, is then one parallel chunk, as the decoder prefills it)."""
    if share is not None:
        return _shared_reference(model, x, depths, share, prompt_len)
    cfg = model.config
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    rope = model.rotary_pos_emb(x.shape[1])
    store: dict = {}  # (layer name, iteration or None) -> {position: (k, v)}

    def hooks(t: int, iteration):
        def attend_for(name, layer):
            slot = iteration if name.startswith("core.") else None

            def attend(normed):
                attn = layer.self_attention
                q, k, v = hook_qkv(attn, normed, rope[t:t + 1])
                store.setdefault((name, slot), {})[t] = (k, v)
                # earlier positions: the keys/values of their last computed iteration at or before this one
                past = [store[(name, slot if slot is None else min(slot, depths[u]))][u] for u in range(t + 1)]
                keys = torch.cat([kv[0] for kv in past]).permute(1, 2, 0, 3)
                values = torch.cat([kv[1] for kv in past]).permute(1, 2, 0, 3)
                out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), keys, values,
                                                     enable_gqa=groups != heads)
                return hook_output(attn, out.permute(2, 0, 1, 3).reshape(1, 1, -1))
            return attend
        return attend_for

    rows = []
    with torch.no_grad():
        for t in range(x.shape[1]):
            e = model.embed(x[:, t:t + 1], attend_for=hooks(t, None))
            state = torch.zeros_like(e)
            for it in BackpropWindow(depths[t], 0).iterations():
                state = model.iteration(it, state, e, None, attend_for=hooks(t, it.index))
            rows.append(model.head(state, attend_for=hooks(t, None)).transpose(0, 1))
    return torch.cat(rows, 1)


def _shared_reference(model, x: torch.Tensor, depths: list, m: int, prompt_len: int) -> torch.Tensor:
    """The prompt [0, prompt_len) runs as one parallel chunk (its positions attend to each other's keys of the
    same iteration, as a prefill does); every later position runs alone."""
    cfg = model.config
    heads, groups = cfg.num_attention_heads, cfg.num_query_groups or cfg.num_attention_heads
    rope = model.rotary_pos_emb(x.shape[1])
    slots: dict = {}  # (layer, slot or None) -> {position: (k, v)}, overwritten in place
    last: dict = {}  # layer -> {position: (k, v)} of the newest iteration each position ran

    def hooks(start: int, n: int, iteration):
        def attend_for(name, layer):
            slot = None if not name.startswith("core.") else (iteration - 1) % m

            def attend(normed):
                attn = layer.self_attention
                q, k, v = hook_qkv(attn, normed, rope[start:start + n])  # [n, 1, heads | groups, d]
                for j in range(n):
                    slots.setdefault((name, slot), {})[start + j] = (k[j:j + 1], v[j:j + 1])
                    if slot is not None:
                        last.setdefault(name, {})[start + j] = (k[j:j + 1], v[j:j + 1])
                past = [slots[(name, slot)].get(u) or last[name][u] for u in range(start)]
                keys = torch.cat([kv[0] for kv in past] + [k]).permute(1, 2, 0, 3)
                values = torch.cat([kv[1] for kv in past] + [v]).permute(1, 2, 0, 3)
                mask = torch.arange(start + n).view(1, -1) <= (start + torch.arange(n)).view(-1, 1)
                out = F.scaled_dot_product_attention(q.permute(1, 2, 0, 3), keys, values, attn_mask=mask,
                                                     enable_gqa=groups != heads)
                return hook_output(attn, out.permute(2, 0, 1, 3).reshape(n, 1, -1))
            return attend
        return attend_for

    rows = []
    chunks = [(0, prompt_len)] + [(t, 1) for t in range(prompt_len, x.shape[1])]
    with torch.no_grad():
        for start, n in chunks:
            e = model.embed(x[:, start:start + n], attend_for=hooks(start, n, None))
            state = torch.zeros_like(e)
            for it in BackpropWindow(depths[start], 0).iterations():
                state = model.iteration(it, state, e, None, attend_for=hooks(start, n, it.index))
            rows.append(model.head(state, attend_for=hooks(start, n, None)))  # [1, n, V]
    return torch.cat(rows, 1)


def decode_with_exits(model, prompt: torch.Tensor, new: int, eps: float, share=None):
    """Greedy decoding of the batch with the KL exit: (tokens `[b, T]`, logits `[b, T, V]`, depths `[b, T]`: the
    core iterations each position ran; the prompt's prefill runs all R)."""
    b, p = prompt.shape
    dec = LoopedDecoder(model, b, p + new, DecodeOptions(depth=R, exit_kl=eps, kv_share=share))
    logits = [dec.step(prompt)]
    seq = prompt
    for _ in range(new - 1):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        logits.append(dec.step(nxt))
    depths = [dec.depths[0].view(b, 1).expand(b, p)] + [d.view(b, 1) for d in dec.depths[1:]]
    return seq, torch.cat(logits, 1), torch.cat(depths, 1)


@pytest.fixture(scope="module")
def decoded(megatron_single_process):
    model = make_model()
    prompt = tokens(2, 4, seed=5)
    for eps in (3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4):
        seq, logits, depths = decode_with_exits(model, prompt, 10, eps)
        decode = depths[:, 4:]
        # a useful case: exits below R that later positions attend through, differing between the rows
        if (decode < R).sum() >= 3 and (decode[0] != decode[1]).any() and (decode[:, :-1] < R).any():
            return model, prompt, seq, logits, depths, eps
    pytest.fail("no eps gave early exits that later tokens attend through")


def test_batched_early_exit_equals_each_row_decoded_alone(decoded):
    model, prompt, seq, logits, depths, eps = decoded
    for row in range(2):
        ref = reference_logits(model, seq[row:row + 1], depths[row].tolist())
        torch.testing.assert_close(logits[row:row + 1], ref[:, :logits.shape[1]], rtol=0, atol=1e-10)
        assert torch.equal(ref[0, prompt.shape[1] - 1:-1].argmax(-1), seq[row, prompt.shape[1]:])  # same greedy tokens


def test_the_fill_of_skipped_iterations_is_what_makes_them_equal(decoded, monkeypatch):
    """Without the fill, a skipped slot keeps zeros (or an older token's values): the reference disagrees."""
    model, prompt, _, _, _, eps = decoded
    monkeypatch.setattr(LoopedKVCache, "fill", lambda self, start, done: self._last.clear())
    seq, logits, depths = decode_with_exits(model, prompt, 10, eps)
    worst = max((logits[row:row + 1] - reference_logits(model, seq[row:row + 1], depths[row].tolist())
                 [:, :logits.shape[1]]).abs().max().item() for row in range(2))
    assert worst > 1e-6


def reference_gate_decode(model, x: torch.Tensor, prompt_len: int, q: float):
    """One row decoded alone with the learned gate's exit: position t >= prompt_len stops at the first iteration
    whose exit CDF sum_j lambda_j prod_{l<j} (1 - lambda_l) reaches q (Ouro); the reference's own depths and
    logits, its keys and values in plain lists (`reference_logits`' fill rule). Recomputes the row once per
    position: position t's depth is found with positions < t fixed."""
    depths = [R] * x.shape[1]
    for t in range(prompt_len, x.shape[1]):
        for d in range(1, R + 1):  # the first depth at which the CDF over iterations 1..d reaches q
            depths[t] = d
            cdf, survive = 0.0, 1.0
            for i in range(1, d + 1):
                lam = gate_at(model, x[:, :t + 1], depths[:t] + [i])
                cdf, survive = cdf + lam * survive, survive * (1 - lam)
            if cdf >= q:
                break
    return reference_logits(model, x, depths), depths


def gate_at(model, x, depths) -> float:
    """lambda of the last position of `x` after depths[-1] iterations (earlier positions at their depths)."""
    captured = {}
    handle = model.final_layernorm.register_forward_hook(lambda m, a, out: captured.__setitem__("h", out))
    try:
        reference_logits(model, x, depths)
    finally:
        handle.remove()
    return torch.sigmoid(model.exit_gate(captured["h"][-1, 0])).item()


def test_the_gate_exit_in_a_batch_equals_each_row_decoded_alone(megatron_single_process):
    model = make_model("objective.kind=exit_gate")
    with torch.no_grad():
        model.exit_gate.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(11))
        model.exit_gate.bias.fill_(-1.5)
    prompt = tokens(2, 3, seed=6)
    b, p, new, q = 2, 3, 6, 0.5
    dec = LoopedDecoder(model, b, p + new, DecodeOptions(depth=R, exit_gate=q))
    logits, seq = [dec.step(prompt)], prompt
    for _ in range(new - 1):
        nxt = logits[-1][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        logits.append(dec.step(nxt))
    got = torch.cat(logits, 1)
    decode_depths = torch.stack(dec.depths[1:], 1)  # [b, new - 1]
    print("gate exit depths", decode_depths.tolist())
    assert (decode_depths < R).any() and (decode_depths > 1).any(), decode_depths  # the gate really decides
    for row in range(b):
        ref, depths = reference_gate_decode(model, seq[row:row + 1], p, q)
        assert depths[p:] == decode_depths[row].tolist()
        torch.testing.assert_close(got[row:row + 1], ref, rtol=0, atol=1e-10)


def test_rows_that_exited_leave_the_batch(decoded):
    """Compaction: after a row exits, the core and the head run on the other rows only; the core's rows summed
    over its calls equal the iterations the rows used (a masked batch would run all rows every iteration)."""
    model, prompt, seq, _, _, eps = decoded
    rows = []
    handle = model.core["0"].register_forward_hook(lambda m, args, out: rows.append(args[0].shape[1]))
    try:
        dec = LoopedDecoder(model, 2, seq.shape[1], DecodeOptions(depth=R, exit_kl=eps))
        dec.step(seq[:, :prompt.shape[1]])
        rows.clear()
        for t in range(prompt.shape[1], seq.shape[1]):
            dec.step(seq[:, t:t + 1])
    finally:
        handle.remove()
    used = torch.stack(dec.depths[1:])
    assert sum(rows) == int(used.sum()) < 2 * R * used.shape[0]


@pytest.mark.parametrize("share", [2, 4])
def test_a_shared_cache_with_exits_equals_the_restated_compressed_cache(decoded, share):
    """KV sharing with m < r (Huginn's compressed cache) and early exits in a batch, against the restatement."""
    model, prompt, _, _, _, eps = decoded
    seq, logits, depths = decode_with_exits(model, prompt, 10, eps, share=share)
    assert (depths[:, prompt.shape[1]:] < R).any()
    for row in range(2):
        ref = reference_logits(model, seq[row:row + 1], depths[row].tolist(), share=share,
                               prompt_len=prompt.shape[1])
        torch.testing.assert_close(logits[row:row + 1], ref, rtol=0, atol=1e-10)
    unshared = reference_logits(model, seq[:1], depths[0].tolist())
    assert (unshared - logits[:1]).abs().max() > 1e-6  # sharing is another computation: the check can fail
