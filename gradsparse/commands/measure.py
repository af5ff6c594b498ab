"""``gradsparse measure HF_FOLDER``: sparsity monitors of a pretrained sentence encoder, per MLP layer.

Loads a Hugging Face BERT folder (``gradsparse.models.bert.load_bert``), takes ``--sentences``
sentences of ``--text`` (default: the Python standard library's pydoc_data topics, split as
``gradsparse.sentences`` does; a random subset drawn with ``--seed``) and prints, per layer
(``gradsparse.measure``): fraction of positive pre-activations, derivative sparsity,
E[sigma'^2], density; with ``--activation relu`` the density after swapping the activation
(no finetuning) and the cosine of the swapped model's embeddings to the original's; eta / g
sparsity, AF_K, AF_V and the other monitors under the crop-contrastive InfoNCE loss; and the
spectrum rows of the key matrices. ``--json`` prints one JSON object instead (and nothing else
on stdout). Writes no files.
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from gradsparse._validate import check_float, check_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", metavar="HF_FOLDER",
                        help="Hugging Face model folder (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--text", metavar="FILE", default=None,
                        help="UTF-8 text file to take sentences from (default: Python's pydoc_data topics)")
    parser.add_argument("--sentences", type=int, default=256, metavar="N",
                        help="number of sentences, a random subset of the text's (default 256)")
    parser.add_argument("--activation", default=None,
                        help="also measure the model with this MLP activation swapped in, e.g. relu")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="sentences per batch of the contrastive loss (default 32)")
    parser.add_argument("--crop-tokens", type=int, default=16,
                        help="word pieces per random crop of the contrastive loss (default 16)")
    parser.add_argument("--scale", type=float, default=20.0,
                        help="InfoNCE logit scale, 1/temperature (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence subset and the crops")
    parser.add_argument("--no-gradients", action="store_true", help="skip the gradient pass")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")


def run(args: argparse.Namespace) -> int:
    # imported here, not at the top, so that `gradsparse --help` does not load jax and the models
    import jax

    from gradsparse import spectra
    from gradsparse.activations import get_activation
    from gradsparse.measure import format_table, measure_encoder
    from gradsparse.models.bert import load_bert
    from gradsparse.sentences import load_sentences

    check_int("--sentences", args.sentences, 2, 100_000)
    check_int("--batch-size", args.batch_size, 2, 4096)
    check_int("--crop-tokens", args.crop_tokens, 1, 4096)
    check_float("--scale", args.scale, 0, 1e4, lo_open=True)
    check_int("--seed", args.seed, 0, 2**32 - 1)
    act = get_activation(args.activation) if args.activation is not None else None
    model, tok, info = load_bert(args.folder)
    pool = load_sentences(args.text, min_sentences=2)
    n = min(args.sentences, len(pool))
    pick = np.sort(np.random.default_rng(args.seed).permutation(len(pool))[:n])
    sents = [pool[i] for i in pick]
    res = measure_encoder(model, tok, sents, jax.random.key(args.seed), activation=act, batch_size=args.batch_size,
                          crop_tokens=args.crop_tokens, scale=args.scale, gradients=not args.no_gradients,
                          progress=not args.json and sys.stderr.isatty())
    res.context.update({"model": info.folder, "weights_sha256": info.weights_sha256,
                        "text": args.text or "pydoc_data.topics", "text_sentences": len(pool), "seed": args.seed,
                        "layers": info.config.num_hidden_layers, "d": info.config.hidden_size,
                        "n": info.config.intermediate_size, "pooling": info.pooling, "normalize": info.normalize})
    if args.json:
        sys.stdout.write(json.dumps(res.to_dict(), allow_nan=False) + "\n")
        return 0
    c = res.context
    print(f"model {info.folder} (sha256 {info.weights_sha256[:12]}): {c['layers']} layers, d = {c['d']}, "
          f"n = {c['n']}, MLP activation {c['activation']}, {info.pooling} pooling"
          + (", normalised" if info.normalize else ""))
    print(f"text {c['text']}: {c['sentences']} of {c['text_sentences']} sentences (seed {args.seed}), "
          f"{c['tokens']} real tokens")
    if "gradient" in c:
        g = c["gradient"]
        print(f"gradients: symmetric InfoNCE between two random {g['crop_tokens']}-piece crops per sentence, "
              f"scale {g['scale']:g}, {g['batches']} batches of {g['batch_size']} sentences "
              f"({g['tokens_per_batch']} tokens); loss {g['loss']:.4f} (chance ln B = {g['loss_chance']:.4f})")
    if "swap_activation" in c:
        print(f"{c['swap_activation']} swapped in without finetuning: embedding cosine to the original "
              f"mean {c['swap_teacher_cos']:.4f}, min {c['swap_teacher_cos_min']:.4f}")
    print()
    print(format_table(res))
    if res.spectrum:
        print()
        print("key matrices K (n x d):")
        print(spectra.format_table(res.spectrum))
    return 0
