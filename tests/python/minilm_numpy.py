"""all-MiniLM-L6-v2 read and run from its files with numpy: a model loader as real as
sentence-transformers' for what the tests need (it reads the tokenizer, the config, the
pooling config and every weight, and computes the embedding: BERT, mean pooling, normalisation)
in about 60 MB of packages instead of torch's 3 GB.

    python3 minilm_numpy.py DIR SENTENCE  ->  the embedding, as JSON

DIR is a plain snapshot or `models--org--name` in an HF cache (HF_HUB_CACHE), read offline.
"""

import json
import math
import os
import sys

import numpy as np
from safetensors.numpy import load_file
from tokenizers import Tokenizer


def files_of(name):
    """The model's directory: `name` itself, or its snapshot in the HF cache, offline."""
    if os.path.isdir(name):
        return name
    from huggingface_hub import snapshot_download

    return snapshot_download(name, local_files_only=True)


def layer_norm(x, w, b, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * w + b


_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def embed(name, sentence):
    root = files_of(name)
    with open(os.path.join(root, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(root, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    assert pooling.get("pooling_mode_mean_tokens"), pooling
    tokenizer = Tokenizer.from_file(os.path.join(root, "tokenizer.json"))
    # One sentence: no padding, so every token counts in the mean.
    tokenizer.no_padding()
    weights = load_file(os.path.join(root, "model.safetensors"))
    w = {k.removeprefix("bert."): v.astype(np.float64) for k, v in weights.items()}
    eps = config["layer_norm_eps"]
    heads = config["num_attention_heads"]

    ids = np.array(tokenizer.encode(sentence).ids)
    n = len(ids)
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:n]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    dense = lambda x, p: x @ w[p + ".weight"].T + w[p + ".bias"]
    for i in range(config["num_hidden_layers"]):
        p = f"encoder.layer.{i}."
        split = lambda t: t.reshape(n, heads, -1).transpose(1, 0, 2)
        q = split(dense(x, p + "attention.self.query"))
        k = split(dense(x, p + "attention.self.key"))
        v = split(dense(x, p + "attention.self.value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        attn = (scores / scores.sum(-1, keepdims=True)) @ v
        attn = attn.transpose(1, 0, 2).reshape(n, -1)
        x = layer_norm(
            dense(attn, p + "attention.output.dense") + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        inner = gelu(dense(x, p + "intermediate.dense"))
        x = layer_norm(
            dense(inner, p + "output.dense") + x,
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
            eps,
        )
    pooled = x.mean(0)
    return (pooled / np.linalg.norm(pooled)).tolist()


if __name__ == "__main__":
    json.dump(embed(sys.argv[1], sys.argv[2]), sys.stdout)
