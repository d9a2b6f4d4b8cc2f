"""
cat.py: Causal Attention Tuning (CAT) in one file: data, token adjacency, the Re-Attention
loss, training and evaluation (paper: Sections 4-5 and Appendix F).

    python cat.py                                               # built-in tiny model, STG_E, CPU, minutes
    python cat.py --alpha 0                                     # the vanilla baseline, all else identical
    python cat.py --model TinyLlama/TinyLlama_v1.1 --alpha 0.2  # the paper's setting, on a GPU
    python cat.py --model Qwen/Qwen2.5-1.5B --lora --train a.jsonl --test b.jsonl --ood c.jsonl

Writes to --out: the model (or the LoRA adapter), its tokenizer, metrics.json and attention.json.
Dimension letters: B batch, H heads, L layers, T tokens, V vocabulary.
"""
import argparse
import json
import math
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import stg

# -----------------------------------------------------------------------------
# config

parser = argparse.ArgumentParser(description="Causal Attention Tuning: fine-tune with the Re-Attention loss, test.")
# data
parser.add_argument("--train", default="data/stg_e/train_M.jsonl", help="training JSONL with input, target and "
                    "important (the STG files under data/ are written with stg.py when missing)")
parser.add_argument("--test", default="data/stg_e/test.jsonl", help="IID test JSONL ('' to skip)")
parser.add_argument("--ood", default="data/stg_e/ood.jsonl", help="OOD test JSONL ('' to skip)")
parser.add_argument("--val", type=int, default=0, help="hold out the last N training rows for validation (0: none)")
parser.add_argument("--max-length", type=int, default=256, help="tokens per training example; longer ones are cut")
# model
parser.add_argument("--model", default="tiny", help="'tiny': a small Llama built from a config, with a tokenizer "
                    "trained on --train; or any hub id or local folder")
parser.add_argument("--lora", action="store_true", help="train LoRA adapters instead of all weights")
parser.add_argument("--lora-r", type=int, default=8, help="LoRA rank")
parser.add_argument("--lora-alpha", type=int, default=16, help="LoRA scale numerator (scale = lora_alpha / r)")
parser.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA input")
parser.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj",
                    help="comma-separated module names; keep q_proj and k_proj: the attention loss acts through them")
parser.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) or a torch device such as cuda:1")
# CAT
parser.add_argument("--alpha", type=float, default=None, help="Re-Attention margin: a causal token should get at "
                    "least alpha times the mean attention of the others; 0 = vanilla (default: 2 tiny, 0.2 pretrained)")
parser.add_argument("--gamma-decay", action=argparse.BooleanOptionalAction, default=None,
                    help="weight L_attn by gamma = exp(-epoch) as the paper; --no-gamma-decay holds gamma = 1 "
                    "(default: decay for pretrained models, held for tiny, which trains from scratch)")
# optimisation
parser.add_argument("--epochs", type=int, default=None, help="passes over the data (default: 40 tiny, 6 pretrained)")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 1e-3 tiny, 5e-5 full, 1e-4 LoRA)")
parser.add_argument("--batch-size", type=int, default=None, help="examples per micro-batch (default: 32 tiny, 8 pretrained)")
parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
parser.add_argument("--warmup", type=float, default=0.1, help="fraction of steps of linear warm-up, then cosine decay to 0")
parser.add_argument("--seed", type=int, default=42, help="seed for the model's initialisation and the data order")
# evaluation and output
parser.add_argument("--eval-batch-size", type=int, default=64, help="prompts per generation batch")
parser.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default: longest answer + 8)")
parser.add_argument("--log-every", type=int, default=1, help="optimizer steps between log lines (0: none)")
parser.add_argument("--out", default="out", help="output folder: model, tokenizer, metrics.json, attention.json")

# defaults that depend on the model: the paper's for pretrained models, what the built-in one needs to learn STG
DEFAULTS = {"tiny": dict(alpha=2.0, gamma_decay=False, epochs=40, lr=1e-3, batch_size=32),
            "full": dict(alpha=0.2, gamma_decay=True, epochs=6, lr=5e-5, batch_size=8),
            "lora": dict(alpha=0.2, gamma_decay=True, epochs=6, lr=1e-4, batch_size=8)}
# the built-in model: a 4-layer Llama, width 128, with word-level tokens
TINY = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=1024, tie_word_embeddings=True)


class BadInput(ValueError):
    """Input that cannot be used; the message names the file, line and field."""

# -----------------------------------------------------------------------------
# data: JSONL rows {"input", "target", "important": [{effect: [causes]}]}


def read_jsonl(path, need_important=False):
    """Rows of a JSONL file, checked; a bad line raises BadInput naming file, line and field."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise BadInput(f"{path}:{n}: not valid JSON ({e.msg})") from None
            for field in ["input", "target"] + ["important"] * need_important:
                if not isinstance(row, dict) or field not in row:
                    raise BadInput(f"{path}:{n}: missing field '{field}'")
            if not isinstance(row["input"], str):
                raise BadInput(f"{path}:{n}: field 'input' must be a string")
            links = row.get("important", [])
            if not (isinstance(links, list) and all(isinstance(link, dict) for link in links) and all(
                    isinstance(e, str) and isinstance(cs, list) and all(isinstance(c, str) for c in cs)
                    for link in links for e, cs in link.items())):
                raise BadInput(f'{path}:{n}: field \'important\' must be a list of {{"effect": ["cause", ...]}}')
            rows.append(row)
    return rows


def encode(tokenizer, row, max_length):
    """Tokenize input + target + eos and return (input_ids, labels, adjacency as (K, 2) indices, link counts).
    The next-token loss covers the answer tokens only (those overlapping the target, and eos), as in
    supervised fine-tuning: the question is given, not predicted."""
    prompt_len = len(row["input"])
    text = row["input"] + str(row["target"]) + tokenizer.eos_token
    enc = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)
    ids = torch.tensor(enc["input_ids"])                                             # (T,)
    labels = torch.tensor([i if b > prompt_len else -100 for i, (a, b) in zip(enc["input_ids"], enc["offset_mapping"])])
    adj, counts = build_adjacency(tokenizer, text, row.get("important", []), max_length)
    return dict(ids=ids, labels=labels, adj=adj.nonzero()), counts


def collate(examples, pad_id):
    """Right-pad a list of encoded examples into a batch: ids, mask, labels (B, T) and adjacency (B, T, T)."""
    B, T = len(examples), max(len(e["ids"]) for e in examples)
    ids = torch.full((B, T), pad_id)
    mask, labels, adj = torch.zeros(B, T, dtype=torch.long), torch.full((B, T), -100), torch.zeros(B, T, T)
    for b, e in enumerate(examples):
        n = len(e["ids"])
        ids[b, :n], mask[b, :n], labels[b, :n] = e["ids"], 1, e["labels"]
        adj[b, e["adj"][:, 0], e["adj"][:, 1]] = 1
    return ids, mask, labels, adj

# -----------------------------------------------------------------------------
# adjacency: word-level links -> a token-level 0/1 matrix, through character offsets


def find_spans(text, span):
    """Start offsets of every whole-word occurrence of `span` in `text`.

    >>> find_spans("5 apples, 15 pears, 5 left", "5")   # not the 5 inside 15
    [0, 20]
    """
    if not span:
        return []
    left = r"(?<!\w)" if re.match(r"\w", span[0]) else ""
    right = r"(?!\w)" if re.match(r"\w", span[-1]) else ""
    return [m.start() for m in re.finditer(left + re.escape(span) + right, text)]


def tokens_in(offsets, start, end):
    """Indices of the tokens whose characters overlap [start, end). Overlap, not containment: Llama and
    byte-level tokens carry their leading space ('▁High' covers ' High'). Zero-width special tokens never match."""
    return [t for t, (a, b) in enumerate(offsets) if a < end and b > start and b > a]


def build_adjacency(tokenizer, text, important, max_length):
    """The causal adjacency of the tokens of tokenizer(text, truncation=True, max_length=max_length).
    A[i, j] = 1 when token i+1 lies in an effect span and token j in one of its cause spans (row i
    predicts token i+1, paper Section 4.2), kept lower-triangular (j <= i). Every whole-word occurrence
    of an effect is linked to every occurrence of its cause that ends before that effect starts.
    Counts, each (effect, cause) pair once: found; missing (a span is not in the text, or the cause never
    ends before the effect); truncated (in the text, but cut off by max_length)."""
    offsets = tokenizer(text, truncation=True, max_length=max_length, return_offsets_mapping=True)["offset_mapping"]
    T = len(offsets)
    adj = torch.zeros(T, T)                                                          # (T, T)
    counts = {"found": 0, "missing": 0, "truncated": 0}
    pairs = dict.fromkeys((e, c) for link in important for e, causes in link.items() for c in causes)
    for effect, cause in pairs:
        in_text = linked = False
        for e in find_spans(text, effect):
            rows = [t - 1 for t in tokens_in(offsets, e, e + len(effect)) if t > 0]  # the shift: row t-1 predicts t
            for c in find_spans(text, cause):
                if c + len(cause) > e:  # a cause must end before its effect starts
                    continue
                in_text = True
                for j in tokens_in(offsets, c, c + len(cause)):
                    for i in rows:
                        if j <= i:
                            adj[i, j], linked = 1, True
        counts["found" if linked else "truncated" if in_text else "missing"] += 1
    return adj, counts

# -----------------------------------------------------------------------------
# the Re-Attention loss (paper, Section 4.2)


def average_attention(attentions):
    """Ā = 1/(L·H) Σ_l Σ_h softmax(Q_lh K_lhᵀ / √d_k): one map averaged over all layers and heads, as a running
    sum (in float32) so that no stacked copy of the L maps is made."""
    total = 0
    for a in attentions:                                        # L maps, each (B, H, T, T)
        total = total + a.mean(dim=1, dtype=torch.float32)      # (B, T, T)
    return total / len(attentions)                              # (B, T, T)


def re_attention_loss(attentions, adj, alpha, stats=None):
    """The Re-Attention loss for a batch: `attentions` is the model's tuple of L maps (B, H, T, T), `adj` the
    shifted (B, T, T) 0/1 adjacency. Rows with no causal column or no other column are skipped; with no
    supervised row the loss is 0. If `stats` is a dict, it receives the mean C/N over supervised rows."""
    avg = average_attention(attentions)                         # (B, T, T)
    adj = adj.to(avg.dtype).tril()                              # (B, T, T) causal columns j <= i
    past = torch.ones_like(avg[0]).tril()                       # (T, T) all columns j <= i
    n_causal = adj.sum(-1)                                      # (B, T)
    n_other = past.sum(-1) - n_causal                           # (B, T)
    rows = (n_causal > 0) & (n_other > 0)                       # (B, T) supervised rows
    on_causal = (avg * adj).sum(-1)                             # (B, T)
    # C_i = Σ_{j<=i} Ā_ij A_ij / Σ_{j<=i} A_ij
    C = on_causal / n_causal.clamp(min=1)                       # (B, T)
    # N_i = Σ_{j<=i} Ā_ij (1 - A_ij) / Σ_{j<=i} (1 - A_ij)
    N = ((avg * past).sum(-1) - on_causal) / n_other.clamp(min=1)  # (B, T)
    ratio = C / N.clamp(min=1e-12)                              # (B, T) finite everywhere, so gradients are too
    # L_attn = Σ_i max(0, α - C_i / N_i). The paper writes a sum over rows; like the authors' code, we take
    # the mean over supervised rows, so the loss does not grow with the number of links.
    hinge = torch.where(rows, (alpha - ratio).clamp(min=0), 0)  # (B, T)
    n_rows = rows.sum().clamp(min=1)
    if stats is not None:
        stats["ratio"] = (torch.where(rows, ratio, 0).sum() / n_rows).item()
    return hinge.sum() / n_rows                                 # scalar

# -----------------------------------------------------------------------------
# model


def train_tokenizer(texts):
    """A word-level tokenizer trained on `texts`: words keep their leading space as '▁' (like Llama's),
    punctuation is split off, numbers stay whole ('▁43', '.', '1')."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace("▁", prepend_scheme="never"),
                                                 pre_tokenizers.Split(Regex(r"[^\w▁]"), "isolated")])
    tok.decoder = decoders.Metaspace("▁", prepend_scheme="never")
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def load_model(args, train_rows, device, amp):
    """(model, tokenizer): the built-in tiny model, or a pretrained one, with eager attention (the default
    'sdpa' returns no attention maps), optionally wrapped with LoRA adapters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    if args.model == "tiny":
        tokenizer = train_tokenizer(r["input"] + str(r["target"]) for r in train_rows)
        # a fresh config object for every model: from_config writes into the config it is given
        config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=3, **TINY)
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.model)
            # full fine-tuning keeps float32 master weights (autocast does the bf16 math); LoRA freezes the base
            dtype = amp if (args.lora and amp) else torch.float32
            model = AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="eager", dtype=dtype)
        except (OSError, ValueError) as e:
            raise BadInput(f"cannot load --model {args.model}: {str(e).strip().splitlines()[0]}") from None
        if not tokenizer.is_fast or tokenizer.eos_token is None:
            raise BadInput(f"--model {args.model}: needs a fast tokenizer (for character offsets) with an eos token")
        tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token  # padding is masked; labels come from offsets
    if args.lora:
        from peft import LoraConfig, get_peft_model
        model = get_peft_model(model, LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, task_type="CAUSAL_LM",
                                                 lora_dropout=args.lora_dropout, target_modules=args.lora_targets.split(",")))
    return model.to(device), tokenizer


def pick_device(name):
    """(device, autocast dtype or None, the reason): cuda, then mps, then cpu, unless --device says."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return device, torch.bfloat16, "bfloat16 autocast (this CUDA device supports bf16)"
    return device, None, f"float32 ({device.type}: no bf16 autocast here)"

# -----------------------------------------------------------------------------
# training loop


def lr_at(step, total, peak, warmup):
    """Linear warm-up over the first `warmup` fraction of the steps, then cosine decay to 0."""
    warm = max(1, int(warmup * total))
    if step < warm:
        return peak * (step + 1) / warm
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def train(model, data, args, pad_id, device, amp):
    """Fine-tune `model` on the encoded examples with L_next + γ L_attn: AdamW, warm-up then cosine decay."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    n_layers = model.config.get_text_config().num_hidden_layers
    order_rng = torch.Generator().manual_seed(args.seed)
    per_epoch = math.ceil(math.ceil(len(data) / args.batch_size) / args.grad_accum)
    total, step = per_epoch * args.epochs, 0
    bar = tqdm(total=total, desc="train", disable=None)
    model.train()
    for epoch in range(args.epochs):
        gamma = math.exp(-epoch) if args.gamma_decay else 1.0  # the paper: gamma = e^-epoch
        order = torch.randperm(len(data), generator=order_rng).tolist()
        micro = [order[i:i + args.batch_size] for i in range(0, len(order), args.batch_size)]
        for k in range(0, len(micro), args.grad_accum):
            t0, lr, group = time.time(), lr_at(step, total, args.lr, args.warmup), micro[k:k + args.grad_accum]
            for g in opt.param_groups:
                g["lr"] = lr
            stats, logged = {}, {"L_next": 0.0, "L_attn": 0.0, "C/N": 0.0}  # means over the micro-batches
            for idx in group:
                ids, mask, labels, adj = (x.to(device) for x in collate([data[i] for i in idx], pad_id))
                with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                    out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
                assert len(out.attentions) == n_layers and all(a.requires_grad for a in out.attentions), \
                    "need one attention map per layer that requires grad: eager attention, no reentrant checkpointing"
                logits = out.logits[:, :-1].float()                                  # (B, T-1, V)
                # L_next = -Σ_t log P(x_{t+1} | x_<=t), over the answer tokens
                l_next = F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
                l_attn = re_attention_loss(out.attentions, adj, args.alpha, stats)
                # L_total = L_next + γ L_attn
                ((l_next + gamma * l_attn) / len(group)).backward()
                for key, value in (("L_next", l_next.item()), ("L_attn", l_attn.item()), ("C/N", stats["ratio"])):
                    logged[key] += value / len(group)
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step += 1
            bar.update()
            if args.log_every and step % args.log_every == 0:
                tqdm.write(f"step {step:5d}/{total} | epoch {epoch} | L_next {logged['L_next']:.4f} | L_attn {logged['L_attn']:.4f} "
                           f"| gamma {gamma:.3f} | C/N {logged['C/N']:.3f} | lr {lr:.2e} | {1000 * (time.time() - t0):.0f} ms/step")
    bar.close()

# -----------------------------------------------------------------------------
# evaluation


def answer_of(text, target):
    """The answer in `text`, in the form `target` has: a STG_E label, a choice letter, or a number
    (after '####' when there is one, as in GSM8K; else the first number). None if there is none.

    >>> answer_of(" High Risk</s>", "Low Risk"), answer_of("B. a bacterial population", "B")
    ('High Risk', 'B')
    >>> answer_of("Natalia sold 48/2 = 24 clips. #### 1,072", "#### 72"), answer_of("Answer: 43", "Answer: 43.0")
    (1072.0, 43.0)
    """
    if str(target) in ("High Risk", "Low Risk"):
        m = re.search(r"\b(High|Low) Risk\b", text)
        return m and m.group(0)
    if re.fullmatch(r"(Answer: )?[A-E]", str(target)):
        m = re.search(r"\b([A-E])\b", text)
        return m and m.group(1)
    m = re.search(r"####\s*(-?[\d,]*\.?\d+)", text) or re.search(r"(-?\d[\d,]*(?:\.\d+)?)", text)
    return m and float(m.group(1).replace(",", ""))


def is_correct(prediction, target):
    got, want = answer_of(prediction, target), answer_of(str(target), target)
    if isinstance(want, float):
        return got is not None and abs(got - want) <= 1e-6 * max(1.0, abs(want))
    return got is not None and got == want


@torch.no_grad()
def evaluate(model, tokenizer, rows, args, device, amp, keep=4):
    """Greedy-decoding accuracy on `rows`, and the share of the answer row's averaged attention (the row of
    the last prompt token, which predicts the first answer token) on the causal, spurious and irrelevant
    spans of each row's `factors` (paper, Figure 3). Also returns the first `keep` rows' tokens and weights.
    Prompts lose their trailing spaces: in training, "Answer: " + "High" was tokenized as ':', '▁High'."""
    model.eval()
    correct, share, n_factored, examples = 0, {"causal": 0.0, "spurious": 0.0, "irrelevant": 0.0}, 0, []
    for s in range(0, len(rows), args.eval_batch_size):
        chunk = rows[s:s + args.eval_batch_size]
        prompts = [r["input"].rstrip(" ") for r in chunk]
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", return_offsets_mapping=True)
        offsets = enc.pop("offset_mapping").tolist()
        enc = enc.to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(**enc, output_attentions=True)
            answer_row = average_attention(out.attentions)[:, -1]                    # (B, T)
            new = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)[:, enc["input_ids"].shape[1]:]
        predictions = tokenizer.batch_decode(new, skip_special_tokens=True)
        for b, (row, pred) in enumerate(zip(chunk, predictions)):
            correct += is_correct(pred, row["target"])
            kind_of = {t: kind for kind, spans in row.get("factors", {}).items() for span in spans  # token -> kind
                       for c in find_spans(prompts[b], span) for t in tokens_in(offsets[b], c, c + len(span))}
            n_factored += "factors" in row
            for t, kind in kind_of.items():
                share[kind] += answer_row[b, t].item()
            if len(examples) < keep:
                real = enc["attention_mask"][b].nonzero().flatten().tolist()
                examples.append(dict(tokens=tokenizer.convert_ids_to_tokens(enc["input_ids"][b, real]), prediction=pred,
                                     target=row["target"], kinds=[kind_of.get(t) for t in real],
                                     weights=[round(answer_row[b, t].item(), 5) for t in real]))
    attention = {k: (v / n_factored if n_factored else None) for k, v in share.items()}
    return {"accuracy": correct / len(rows), "attention": attention}, examples

# -----------------------------------------------------------------------------
# main


def resolve(args):
    """Fill the model-dependent defaults (DEFAULTS) into the flags left unset."""
    kind = "tiny" if args.model == "tiny" else "lora" if args.lora else "full"
    for key, value in DEFAULTS[kind].items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    return args


def main(argv=None):
    args = resolve(parser.parse_args(argv))
    torch.manual_seed(args.seed)
    if any(p and not os.path.exists(p) and os.path.relpath(p, "data") in stg.FILES for p in (args.train, args.test, args.ood)):
        print("data/ lacks the STG files: writing them with stg.py")
        stg.write_all("data")
    rows = read_jsonl(args.train, need_important=True)
    if len(rows) <= args.val:
        raise BadInput(f"{args.train}: {len(rows)} rows, not enough to train (with --val {args.val})")
    train_rows, tests = rows[:len(rows) - args.val], {"val": rows[len(rows) - args.val:]} if args.val else {}
    tests.update({name: read_jsonl(path) for name, path in (("iid", args.test), ("ood", args.ood)) if path})
    os.makedirs(args.out, exist_ok=True)  # a bad --out fails now, not after training
    if not os.access(args.out, os.W_OK):
        raise BadInput(f"--out {args.out}: not writable")
    device, amp, why = pick_device(args.device)
    print(f"device: {device} | dtype: {why}")
    model, tokenizer = load_model(args, train_rows, device, amp)
    print(f"model: {args.model} | {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6:.2f}M trained | "
          f"alpha {args.alpha} | gamma {'exp(-epoch)' if args.gamma_decay else '1'}")
    encoded = [encode(tokenizer, row, args.max_length) for row in train_rows]
    data, links = [e for e, _ in encoded], {k: sum(c[k] for _, c in encoded) for k in ("found", "missing", "truncated")}
    cut = sum((e["labels"] == -100).all().item() for e in data)
    print(f"links: {links['found']} found, {links['missing']} missing, {links['truncated']} cut by --max-length"
          f"{f' | {cut} rows lost their whole answer to --max-length' if cut else ''}")
    if args.max_new_tokens is None:
        args.max_new_tokens = max(int((e["labels"] != -100).sum()) for e in data) + 8
    train(model, data, args, tokenizer.pad_token_id, device, amp)
    metrics, shown = {}, {}
    for name, test_rows in tests.items():
        metrics[name], shown[name] = evaluate(model, tokenizer, test_rows, args, device, amp)
        a = metrics[name]["attention"]
        print(f"{name:4s} ({len(test_rows):4d} rows) | accuracy {100 * metrics[name]['accuracy']:6.2f}% | answer-row "
              "attention " + (" / ".join(f"{k} {v:.3f}" for k, v in a.items()) if a["causal"] is not None else "n/a"))
    metrics["links"], metrics["config"] = links, vars(args)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    for name, content in (("metrics.json", metrics), ("attention.json", shown)):  # attention.json: a few rows' maps
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(content, f, indent=1)
    print(f"wrote {args.out}/metrics.json and the {'adapter' if args.lora else 'model'} and tokenizer to {args.out}/")
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (BadInput, OSError) as e:  # bad input, a missing file, an --out that cannot be made: one line
        sys.exit(f"cat.py: error: {e}")
