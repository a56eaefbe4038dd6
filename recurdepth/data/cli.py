"""`recurdepth data tokenizer|preprocess|check ...`: train a tokenizer, tokenize a corpus into a
megatron-core indexed dataset, and check a dataset against a tokenizer. Bad input raises DataError, which
the main CLI prints as one `error: ...` line with exit status 2."""

from __future__ import annotations

import argparse


def _tokenizer(args: argparse.Namespace) -> int:
    from recurdepth.errors import DataError

    if args.add_specials:
        from recurdepth.data.tokenizer_train import add_special_tokens

        m = add_special_tokens(args.add_specials, args.output_prefix)
        what = (f"added {' '.join(m['added_specials']) or 'nothing'}; made control: "
                f"{' '.join(m['converted_specials']) or 'nothing'}")
    else:
        if not args.input:
            raise DataError("no corpus given; pass --input FILE_OR_FOLDER (repeatable), or --add-specials MODEL "
                            "to add the special tokens to an existing model")
        from recurdepth.data.tokenizer_train import train_tokenizer

        m = train_tokenizer(args.input, args.output_prefix, vocab_size=args.vocab_size, model_type=args.model_type,
                            byte_fallback=args.byte_fallback, input_sentence_size=args.input_sentence_size,
                            seed=args.seed, text_key=args.text_key, skip_bad_lines=args.skip_bad_lines,
                            text_docs=args.text_docs, normalization=args.normalization,
                            character_coverage=args.character_coverage, num_threads=args.threads,
                            verbose=args.verbose)
        what = f"{m['model_type']}, {m['sentences']} sentences from {m['documents']} documents"
    specials = " ".join(f"{k}={v}" for k, v in m["special_ids"].items())
    print(f"wrote {args.output_prefix}.model (vocab {m['vocab_size']}, {what}; fingerprint {m['fingerprint']}); "
          f"special ids: {specials}", flush=True)
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from recurdepth.data.preprocess import preprocess

    m = preprocess(args.input, args.output_prefix, args.tokenizer, text_key=args.text_key, workers=args.workers,
                   skip_bad_lines=args.skip_bad_lines, progress=not args.no_progress, text_docs=args.text_docs)
    skipped = f", skipped {m['skipped_lines']} bad lines" if m["skipped_lines"] else ""
    print(f"wrote {args.output_prefix}.bin/.idx/.json: {m['documents']} documents, {m['tokens']} tokens "
          f"({m['dtype']}){skipped}; {m['tokens_per_s']:,.0f} tokens/s on {m['workers']} workers", flush=True)
    return 0


def _check(args: argparse.Namespace) -> int:
    from recurdepth.data.indexed import check_indexed_dataset, check_tokenizer_matches
    from recurdepth.data.tokenizer import tokenizer_from_spec

    for prefix in args.prefix:
        check_indexed_dataset(prefix)
        if args.tokenizer:
            check_tokenizer_matches(prefix, tokenizer_from_spec(args.tokenizer), model_vocab_size=args.model_vocab_size)
        print(f"ok: {prefix}", flush=True)
    return 0


def _common_input_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", default=[], metavar="PATH",
                   help="JSONL file, plain-text file or folder of them (repeatable)")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX", help="where to write PREFIX.*")
    p.add_argument("--text-key", default="text", help="JSONL field holding the document text (default: text)")
    p.add_argument("--text-docs", default="paragraph", choices=("paragraph", "line", "file"),
                   help="what one document of a plain-text file is (default: a blank-line-separated paragraph)")
    p.add_argument("--skip-bad-lines", action="store_true",
                   help="skip (and count) malformed input lines instead of stopping at the first")


def add_data_parser(verbs) -> argparse.ArgumentParser:
    """Add `data` (with `tokenizer`, `preprocess`, `check`, `procedural`) to the CLI's verb subparsers."""
    data = verbs.add_parser("data", help="prepare training data: tokenizer, preprocess, check",
                            description=__doc__)
    sub = data.add_subparsers(dest="data_verb", required=True)
    from recurdepth.data.procedural.cli import add_procedural_parser

    add_procedural_parser(sub)

    tok = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer with the special tokens reserved",
                         description="Train a sentencepiece model (BPE or unigram) on a bounded, shuffled sample "
                                     "of the corpus; writes PREFIX.model, PREFIX.vocab and PREFIX.json.")
    _common_input_flags(tok)
    tok.add_argument("--vocab-size", type=int, default=8000)
    tok.add_argument("--model-type", default="bpe", choices=("bpe", "unigram"))
    tok.add_argument("--no-byte-fallback", dest="byte_fallback", action="store_false",
                     help="map characters outside the vocabulary to <unk> instead of UTF-8 byte pieces")
    tok.add_argument("--input-sentence-size", type=int, default=1_000_000,
                     help="train on a shuffled sample of at most this many lines (0 = all)")
    tok.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    tok.add_argument("--normalization", default="nfkc",
                     choices=("nfkc", "identity", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf"),
                     help="sentencepiece normalisation rule (default nfkc; whitespace is never collapsed)")
    tok.add_argument("--character-coverage", type=float, default=0.9995)
    tok.add_argument("--threads", type=int, default=None, help="training threads (default: all cores)")
    tok.add_argument("--add-specials", metavar="MODEL", default=None,
                     help="instead of training: copy MODEL with any missing special tokens added (ids kept)")
    tok.add_argument("--verbose", action="store_true", help="show sentencepiece's training log")
    tok.set_defaults(func=_tokenizer)

    pre = sub.add_parser("preprocess", help="tokenize a corpus into a megatron-core indexed dataset (.bin/.idx)",
                         description="Tokenize JSONL / plain text / folders into PREFIX.bin and PREFIX.idx "
                                     "(megatron-core indexed dataset, one EOD per document) plus PREFIX.json.")
    _common_input_flags(pre)
    pre.add_argument("--tokenizer", default="byte", metavar="MODEL|byte",
                     help="sentencepiece .model path (or its prefix), a Hugging Face tokenizer.json (or the folder "
                          "holding it), or 'byte' (default)")
    pre.add_argument("--workers", type=int, default=2, help="tokenizer processes (default 2)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.set_defaults(func=_preprocess)

    chk = sub.add_parser("check", help="check indexed datasets (.bin/.idx sizes, tokenizer match)")
    chk.add_argument("prefix", nargs="+", help="dataset prefix (PREFIX.bin, PREFIX.idx)")
    chk.add_argument("--tokenizer", default=None, metavar="MODEL|byte",
                     help="also check the datasets were made with this tokenizer (as for preprocess)")
    chk.add_argument("--model-vocab-size", type=int, default=None, help="also check the model vocab holds it")
    chk.set_defaults(func=_check)
    return data
