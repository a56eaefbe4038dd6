"""`recurdepth bench decode`: tokens/s of greedy decoding at fixed depths r and batch sizes b, four ways.

    kv-cache     `generate` (infer/generate.py): the KV-cached decoder at depth r
    exit-kl      `generate` with KL early exit at eps (at most r iterations per token; the mean depth is reported)
    no-cache     the same megatron model decoding naively: every new token runs the full forward over the whole
                 sequence so far at depth r, the argmax of the last position is appended
    plain-naive  the plain-PyTorch model (bench/plain.py) with the same weights, decoding naively the same way

Every variant decodes the same random prompt ids `[b, P]` (seeded) by N tokens, greedily, from s_0 = zeros
(`DecodeOptions(init="zeros")`; the naive paths pass zeros as their initial state), never choosing a padded
vocabulary id. tokens/s = N x b / seconds of the whole call (prefill included). One untimed warm-up call of each
variant (2 tokens), then `--repeats` rounds in which the variants take turns (the order rotates each round), so
a busy neighbour slows them alike; best and median per variant, and x plain = that variant's tokens/s over
plain-naive's (best over best, median over median). "tokens agree" compares a variant's greedy tokens with
plain-naive's: kv-cache and no-cache must agree (the same function, fp32 rounding aside); exit-kl may differ
(fewer iterations per token are another function).

The model is randomly initialised from CONFIG + overrides (default configs/tiny.yaml) in one process, fp32, on
the GPU when there is one; or loaded from `--checkpoint DIR` (infer/loading.py).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from recurdepth.errors import ConfigError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
VARIANTS = ("kv-cache", "exit-kl", "no-cache", "plain-naive")
QUICK_OVERRIDES = ["model.hidden_size=64", "model.num_heads=4", "model.seq_length=32"]
QUICK = {"depths": "2,4", "batches": "1,2", "new_tokens": 4, "prompt_length": 4, "repeats": 1}
DEFAULTS = {"depths": "4,32", "batches": "1,8", "new_tokens": 32, "prompt_length": 32, "repeats": 3}


def run_decode_bench(args) -> int:
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    depths, batches = _ints(args.depths, "--depths"), _ints(args.batches, "--batches")
    if min(args.new_tokens, args.prompt_length, args.repeats) < 1 or args.exit_kl < 0:
        raise ConfigError("use --new-tokens, --prompt-length, --repeats >= 1 and --exit-kl >= 0")
    model, cfg, vocab = _model(args)
    if args.prompt_length + args.new_tokens > cfg.model.seq_length:
        raise ConfigError(f"--prompt-length {args.prompt_length} + --new-tokens {args.new_tokens} exceeds "
                          f"model.seq_length={cfg.model.seq_length} (the plain model's RoPE table)")
    plain = plain_copy(cfg, model)
    device = next(model.parameters()).device
    print(_header(cfg, model, vocab, args, device))
    print(f"{'r':>3} {'batch':>5} {'variant':<12} {'best tok/s':>10} {'med tok/s':>10} {'depth':>6} "
          f"{'x plain':>8} {'x plain med':>12}  tokens agree")
    rows = []
    for r in depths:
        for b in batches:
            prompt = torch.randint(0, vocab, (b, args.prompt_length), generator=torch.Generator().manual_seed(b))
            runs = decoders(model, plain, r, args.exit_kl, vocab)
            for name in VARIANTS:  # warm-up: allocations, lazy initialisation
                runs[name](prompt.to(device), 2)
            seconds, tokens, depth = {n: [] for n in VARIANTS}, {}, {}
            for rep in range(args.repeats):
                for name in VARIANTS[rep % 4:] + VARIANTS[:rep % 4]:
                    start = time.perf_counter()
                    tokens[name], depth[name] = runs[name](prompt.to(device), args.new_tokens)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    seconds[name].append(time.perf_counter() - start)
            rate = {n: [args.new_tokens * b / s for s in seconds[n]] for n in VARIANTS}
            ref = rate["plain-naive"]
            for name in VARIANTS:
                agree = bool(torch.equal(tokens[name].cpu(), tokens["plain-naive"].cpu()))
                row = {"depth": r, "batch": b, "variant": name, "seconds": seconds[name],
                       "tokens_per_s_best": max(rate[name]), "tokens_per_s_median": statistics.median(rate[name]),
                       "mean_depth": depth[name], "tokens_agree": agree}
                row["x_plain_best"] = row["tokens_per_s_best"] / max(ref)
                row["x_plain_median"] = row["tokens_per_s_median"] / statistics.median(ref)
                rows.append(row)
                note = ("reference" if name == "plain-naive" else
                        ("yes" if agree else "no") + (" (may differ: early exit)" if name == "exit-kl" else ""))
                print(f"{r:>3} {b:>5} {name:<12} {row['tokens_per_s_best']:>10.1f} "
                      f"{row['tokens_per_s_median']:>10.1f} {depth[name]:>6.2f} {row['x_plain_best']:>8.2f} "
                      f"{row['x_plain_median']:>12.2f}  {note}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


def decoders(model, plain, r: int, eps: float, vocab: int) -> dict:
    """Variant name -> `run(prompt [b, P], n) -> (greedy tokens [b, n], mean iterations per generated token)`."""
    from recurdepth.infer.decoder import DecodeOptions
    from recurdepth.infer.generate import generate
    from recurdepth.model.depth import BackpropWindow

    def cached(options):
        def run(prompt, n):
            result = generate(model, prompt, n, options, eod=None, vocab_size=vocab)
            return result.tokens, result.mean_depth
        return run

    h = model.config.hidden_size

    def megatron_logits(seq):
        s0 = torch.zeros(seq.shape[1], seq.shape[0], h, dtype=next(model.parameters()).dtype, device=seq.device)
        return model(seq, window=BackpropWindow(r, 0), s0=s0)

    return {"kv-cache": cached(DecodeOptions(depth=r, init="zeros")),
            "exit-kl": cached(DecodeOptions(depth=r, exit_kl=eps, init="zeros")),
            "no-cache": lambda prompt, n: (naive_decode(megatron_logits, prompt, n, vocab), float(r)),
            "plain-naive": lambda prompt, n: (naive_decode(lambda seq: plain.logits(seq, r, 0), prompt, n, vocab),
                                              float(r))}


@torch.no_grad()
def naive_decode(logits_of, prompt: torch.Tensor, new_tokens: int, vocab: int) -> torch.Tensor:
    """Greedy continuation `[b, new_tokens]` of `prompt [b, P]` without a cache: each step runs `logits_of` over
    the whole sequence so far (`[b, t] -> [b, t, V]`) and appends the argmax over the first `vocab` ids of the
    last position."""
    seq = prompt
    for _ in range(new_tokens):
        last = logits_of(seq)[:, -1, :vocab]
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], 1)
    return seq[:, prompt.shape[1]:]


def plain_copy(cfg, model):
    """The plain-PyTorch model (bench/plain.py) with `model`'s weights (TP = 1, same dtype and device, eval mode),
    starting from s_0 = zeros: megatron's fused qkv rows are [q, k, v] per head, the plain one's [all q, all k,
    all v]."""
    from recurdepth.bench.plain import PlainLoopedModel, copy_weights

    param = next(model.parameters())
    plain = PlainLoopedModel(cfg, model.vocab_size).to(param.dtype)
    plain.zero_state = True
    copy_weights(model, plain)
    return plain.to(param.device).eval()


def _model(args):
    """(model in eval mode, its config, the tokenizer's vocabulary size): from `--checkpoint`, or CONFIG +
    overrides (+ the quick shapes) randomly initialised with `train.seed`, fp32, one process."""
    from recurdepth.config import load_config
    from recurdepth.infer.loading import (init_single_process, load_model, load_tokenizer, require_looped,
                                          single_process_layout)
    from recurdepth.model.build import build_model

    if args.checkpoint:
        if args.config or args.overrides:
            raise ConfigError("--checkpoint decodes the checkpoint's own model; give no CONFIG or overrides")
        loaded = load_model(args.checkpoint)
        require_looped(loaded, "recurdepth bench decode")
        return loaded.model, loaded.cfg, loaded.vocab_size
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.overrides) + ["train.compile=false"]
    cfg = single_process_layout(load_config(args.config or str(DEFAULT_CONFIG), overrides))
    tok = load_tokenizer(cfg)
    device = init_single_process(cfg)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, tok.vocab_size, torch.float32, device)
    return model.eval(), cfg, tok.vocab_size


def _header(cfg, model, vocab: int, args, device) -> str:
    m = cfg.model
    source = f"checkpoint {args.checkpoint}" if args.checkpoint else "random init"
    return (f"greedy decoding ({source}): h={m.hidden_size}, P{m.prelude_layers}+R{m.core_layers}xr+"
            f"C{m.coda_layers}, vocab {vocab} ({model.vocab_size} rows), random prompt of {args.prompt_length} ids "
            f"+ {args.new_tokens} new tokens, s_0 = zeros, {device.type} "
            f"{str(next(model.parameters()).dtype).replace('torch.', '')}, {torch.get_num_threads()} threads\n"
            f"tokens/s = new tokens x batch / s of the whole call; best and median of {args.repeats} interleaved "
            f"rounds after 1 warm-up; x plain = vs plain-naive; exit-kl eps = {args.exit_kl:g}, depth = mean "
            f"iterations per generated token; tokens agree = the same greedy tokens as plain-naive")


def _ints(text: str, flag: str) -> list:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ConfigError(f"{flag} {text!r}: give comma-separated integers") from None
    if min(values) < 1:
        raise ConfigError(f"{flag} {text!r}: every value must be >= 1")
    return values
